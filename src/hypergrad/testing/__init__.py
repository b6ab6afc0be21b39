"""Checking tools for users' own bilevel code: finite-difference checks and hypothesis strategies.

[`check_hypergrad`][hypergrad.testing.check_hypergrad] needs only torch.
[`hg.testing.strategies`][hypergrad.testing.strategies] needs ``hypothesis`` and is imported on
first use (``hg.testing.strategies``), so ``import hypergrad`` never requires it.
"""

from __future__ import annotations

import importlib
from typing import Any

from hypergrad.testing.check import DirectionCheck, HypergradCheck, check_hypergrad

__all__ = ["DirectionCheck", "HypergradCheck", "check_hypergrad", "strategies"]


def __getattr__(name: str) -> Any:
    if name == "strategies":
        return importlib.import_module("hypergrad.testing.strategies")
    raise AttributeError(f"module 'hypergrad.testing' has no attribute {name!r}")

"""Checking tools for users' own bilevel code: finite-difference checks and hypothesis strategies.

[`check_hypergrad`][hypergrad.testing.check_hypergrad] and the kink-aware
[`finite_difference`][hypergrad.testing.finite_difference] it uses need only torch.
[`hg.testing.strategies`][hypergrad.testing.strategies] needs ``hypothesis`` and is imported on
first use (``hg.testing.strategies``), so ``import hypergrad`` never requires it.
"""

from __future__ import annotations

import importlib
from typing import Any

from hypergrad.testing import check as _check
from hypergrad.testing.check import *  # noqa: F403  (exactly check's __all__, listed below)

__all__ = [*_check.__all__, "strategies"]  # noqa: F405  (strategies: lazily, below)


def __getattr__(name: str) -> Any:
    if name == "strategies":
        return importlib.import_module("hypergrad.testing.strategies")
    raise AttributeError(f"module 'hypergrad.testing' has no attribute {name!r}")

"""Checking tools for users' own bilevel code: finite-difference checks and hypothesis strategies.

[`check_hypergrad`][hypergrad.testing.check_hypergrad] and the kink-aware
[`finite_difference`][hypergrad.testing.finite_difference] it uses need only torch.
[`hg.testing.strategies`][hypergrad.testing.strategies] needs ``hypothesis`` and is imported on
first use (``hg.testing.strategies``), so ``import hypergrad`` never requires it.
"""

from __future__ import annotations

import importlib
from typing import Any

from hypergrad.testing.check import (
    DirectionCheck,
    FiniteDifference,
    HypergradCheck,
    check_hypergrad,
    finite_difference,
)

__all__ = [
    "DirectionCheck",
    "FiniteDifference",
    "HypergradCheck",
    "check_hypergrad",
    "finite_difference",
    "strategies",
]


def __getattr__(name: str) -> Any:
    if name == "strategies":
        return importlib.import_module("hypergrad.testing.strategies")
    raise AttributeError(f"module 'hypergrad.testing' has no attribute {name!r}")

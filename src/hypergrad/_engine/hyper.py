"""Hyperparameters as differentiable inputs: what ``wrt`` names, and tensors for the floats."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller, is_number
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree

__all__ = ["GROUPS", "map_hyper", "parse_wrt", "to_tensor"]

GROUPS = ("aux", "hyperparams", "params")


def _is_hyper_value(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    if is_number(value):
        return True
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_hyper_value(v) for v in value)
    if isinstance(value, Mapping):
        return bool(value) and all(_is_hyper_value(v) for v in value.values())
    return False


def map_hyper(fn: Callable[[Any], Any], value: Any) -> Any:
    """Apply ``fn`` to every number or tensor of a hyperparameter (through tuples and dicts).

    Examples:
        >>> map_hyper(lambda v: v * 2, {"a": 1.0, "b": (2.0, torch.tensor(3.0))})
        {'a': 2.0, 'b': (4.0, tensor(6.))}
    """
    if isinstance(value, (tuple, list)):
        return type(value)(map_hyper(fn, v) for v in value)
    if isinstance(value, Mapping):
        return {k: map_hyper(fn, v) for k, v in value.items()}
    return fn(value)


def to_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    return map_hyper(
        lambda v: (
            v.detach()
            if isinstance(v, torch.Tensor)
            else torch.tensor(float(v), dtype=dtype, device=device)
        ),
        value,
    )


def parse_wrt(
    wrt: str | Sequence[str], aux: PyTree, hp: Mapping[str, Any], opt: Optimizer
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    items = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    differentiable = [k for k, v in hp.items() if _is_hyper_value(v)]
    targets: list[str] = []
    names: list[str] = []
    for item in items:
        if item in GROUPS:
            if item == "hyperparams":
                names += differentiable
            targets.append(item)
        elif item in differentiable:
            names.append(item)
            targets.append("hyperparams")
        else:
            known = ", ".join(differentiable)
            raise ValueError(
                f"{caller()}: wrt entry {item!r} is not 'aux', 'hyperparams', 'params' or a "
                f"differentiable hyperparameter of {opt!r} ({known}). Pass e.g. "
                "wrt=('aux', 'lr')."
            )
    if not targets:
        raise ValueError(
            f"{caller()}: wrt is empty; say what to differentiate, e.g. wrt=('aux',), "
            "wrt=('lr',) or wrt=('hyperparams', 'params')."
        )
    if "aux" in targets and not _tree.leaves(aux):
        raise ValueError(
            f"{caller()}: wrt asks for 'aux' but aux has no tensors (aux={aux!r}). Pass aux=..., "
            "or ask for something else, e.g. wrt=('lr',)."
        )
    ordered = tuple(g for g in GROUPS if g in targets)
    return ordered, tuple(dict.fromkeys(names))

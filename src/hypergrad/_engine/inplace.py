"""In-place operations in the user's losses: which one broke autograd, named in the error.

Autograd refuses an in-place change of a tensor it needs ("a leaf Variable that requires grad is
being used in an in-place operation", "... has been modified by an inplace operation") without
saying which line did it, and the first message even suggests the caller's tensors required grad
(the engine's fresh leaves did). ``explained`` turns such an error into one that names the loss
and the op: it replays the loss once on copies, without autograd, under a ``TorchFunctionMode``
that records the in-place ops it calls. Only when the error happened: nothing is recorded on the
normal path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad._engine.batches import copied

__all__ = ["explained", "is_in_place_error"]

_MARKERS = (
    "is being used in an in-place operation",
    "has been modified by an inplace operation",
    "that would mutate a captured Tensor",  # torch.func (forward mode): aux, say
)


def is_in_place_error(error: BaseException) -> bool:
    """Whether ``error`` is autograd refusing an in-place change of a tensor it needs.

    Examples:
        >>> is_in_place_error(RuntimeError("a leaf Variable that requires grad is being used in an in-place operation."))
        True
        >>> is_in_place_error(RuntimeError("shapes cannot be multiplied"))
        False
    """
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _MARKERS)


class _InPlaceOps(TorchFunctionMode):
    """Record the name of every in-place tensor op called (``mul_``, ``+=``, ``copy_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.startswith("__i") and name.endswith("__"):  # __iadd__: x += y
            self.ops.append(f"{name} (an augmented assignment such as x += y)")
        elif name.endswith("_") and not name.startswith("_"):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _first_op(fn: Callable[..., Any], args: tuple[Any, ...]) -> str | None:
    """The first in-place op ``fn(*args)`` calls, replayed on detached copies without autograd."""
    copies = copied(_tree.detach(args))
    recorder = _InPlaceOps()
    try:
        with torch.no_grad(), recorder:
            fn(*copies)
    except Exception:
        pass
    return recorder.ops[0] if recorder.ops else None


def explained(error: RuntimeError, which: str, fn: Callable[..., Any], args: tuple) -> RuntimeError:
    """A ``RuntimeError`` that names the loss (``which``) and the in-place op that broke autograd.

    Examples:
        >>> def loss(w):
        ...     return w.mul_(2).sum()
        >>> str(explained(RuntimeError("..."), "inner_loss", loss, (torch.ones(2),)))  # doctest: +ELLIPSIS
        'hypergrad: inner_loss changed a tensor in place (mul_), ... w = w * 2 ...'
    """
    op = _first_op(fn, args)
    what = f"({op})" if op else "(an in-place op: a method ending in _, x += y, x[i] = y)"
    return RuntimeError(
        f"{caller()}: {which} changed a tensor in place {what}, which autograd cannot "
        "differentiate through: the tensor is one the hypergradient starts from (params, aux, "
        "a hyperparameter) or one its backward pass needs. Your own tensors are not changed "
        "(the losses get copies). Write the op out of place: w = w * 2 instead of w.mul_(2), "
        "x = x + 1 instead of x += 1, torch.where instead of x[mask] = 0."
    )

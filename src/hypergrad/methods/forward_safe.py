"""Losses that torch cannot differentiate forward-over-reverse, rewritten with elementary ops.

``method="forward"`` takes a ``torch.func.jvp`` of steps whose inner gradient is a
``torch.func.grad``: the jvp needs a forward-mode rule for every op of the inner loss's
*backward*. torch lacks or breaks three of the ``torch.nn.functional`` losses there (the sweep
in ``tests/test_forward_losses.py`` covers every loss of ``torch.nn.functional``, every
reduction, both argument orders, the target captured in a closure or passed in the batch):

- ``F.mse_loss``, ``reduction="mean"``: the rule of ``mse_loss_backward`` divides a multiple of
  the target's tangent in place; for a target without a tangent that is an immutable
  "ZeroTensor", so it fails with "ZeroTensors are immutable" (pytorch/pytorch#123996);
- ``F.huber_loss`` and ``F.soft_margin_loss``: ``huber_loss_backward`` and
  ``soft_margin_loss_backward`` have no forward-mode rule ("Trying to use forward AD with ...").

`forward_safe_losses` is a ``TorchFunctionMode`` that, while active, computes these three
with the same maths written in elementary ops (``torch.nn.MSELoss`` etc. call them, so they are
covered too). The values equal torch's to rounding. A call with an argument the rewrite does not
cover (the deprecated ``size_average``/``reduce``, a target whose shape differs from the input's,
an unknown ``reduction``, a non-positive ``delta``, an input and target of two dtypes for
``F.mse_loss`` and ``F.huber_loss``) goes to torch's own function, which then warns or raises as
usual. The forward method alone activates it, around its jvp:
plain training and the user's own code keep torch's kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["REPLACED", "forward_safe_losses"]

_REDUCTIONS = ("none", "mean", "sum")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """torch's loss reduction: ``"none"`` as is, ``"mean"``, ``"sum"``."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _plain(input: Any, target: Any, reduction: str, *, same_dtype: bool = True) -> bool:
    """Whether the rewrite covers these arguments: tensors of one shape, a known reduction."""
    return (
        isinstance(input, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and input.is_floating_point()
        and input.shape == target.shape
        and (not same_dtype or input.dtype == target.dtype)
        and reduction in _REDUCTIONS
    )


def _mse_loss(
    input: Any,
    target: Any,
    size_average: Any = None,
    reduce: Any = None,
    reduction: str = "mean",
    weight: Any = None,
) -> torch.Tensor | None:
    """``F.mse_loss`` as ``(input - target) ** 2``; ``None``: leave the call to torch.

    torch writes the weighted loss with elementary ops already, so ``weight`` goes to torch.

    Examples:
        >>> x, y = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
        >>> _mse_loss(x, y), torch.nn.functional.mse_loss(x, y)
        (tensor(2.5000), tensor(2.5000))
    """
    if size_average is not None or reduce is not None or weight is not None:
        return None
    if not _plain(input, target, reduction):
        return None
    return _reduce((input - target) ** 2, reduction)


def _huber_loss(
    input: Any, target: Any, reduction: str = "mean", delta: float = 1.0, weight: Any = None
) -> torch.Tensor | None:
    """``F.huber_loss``: ``d ** 2 / 2`` where ``|d| < delta``, else ``delta * (|d| - delta / 2)``.

    The quadratic branch is written on ``d`` itself, not on ``|d|``, so its second derivative is
    1 at ``d == 0`` too. ``weight``, where torch's ``F.huber_loss`` takes one, scales the
    elementwise loss before the reduction, as torch does (``"mean"`` is then the plain mean).
    ``None``: leave the call to torch.

    Examples:
        >>> x, y = torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0])
        >>> _huber_loss(x, y, reduction="none"), torch.nn.functional.huber_loss(x, y, "none")
        (tensor([0.1250, 2.5000]), tensor([0.1250, 2.5000]))
    """
    if not _plain(input, target, reduction) or not isinstance(delta, (int, float)) or delta <= 0:
        return None
    if weight is not None and not (
        isinstance(weight, torch.Tensor) and weight.shape == input.shape
    ):
        return None
    d = input - target
    z = d.abs()
    loss = torch.where(z < delta, 0.5 * d * d, delta * (z - 0.5 * delta))
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def _soft_margin_loss(
    input: Any, target: Any, size_average: Any = None, reduce: Any = None, reduction: str = "mean"
) -> torch.Tensor | None:
    """``F.soft_margin_loss`` as ``log1p(exp(-input * target))``; ``None``: leave it to torch.

    Examples:
        >>> x, y = torch.tensor([0.5, -2.0]), torch.tensor([1.0, 1.0])
        >>> _soft_margin_loss(x, y), torch.nn.functional.soft_margin_loss(x, y)
        (tensor(1.3005), tensor(1.3005))
    """
    if size_average is not None or reduce is not None:
        return None
    if not _plain(input, target, reduction, same_dtype=False):
        return None
    return _reduce(torch.log1p(torch.exp(-input * target)), reduction)


#: The ``torch.nn.functional`` losses replaced while `forward_safe_losses` is active.
REPLACED: dict[Callable[..., Any], Callable[..., torch.Tensor | None]] = {
    F.mse_loss: _mse_loss,
    F.huber_loss: _huber_loss,
    F.soft_margin_loss: _soft_margin_loss,
}


class _ForwardSafeLosses(TorchFunctionMode):
    """Route the losses of `REPLACED` to their rewrites; everything else to torch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rewrite = REPLACED.get(func)
        if rewrite is not None:
            out = rewrite(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def forward_safe_losses() -> Iterator[None]:
    """Within the block, the losses torch cannot take forward-over-reverse use elementary ops.

    Examples:
        >>> from torch.func import grad, jvp
        >>> x, w = torch.randn(5, 3), torch.randn(3)
        >>> y = torch.randn(5)  # captured: it carries no tangent
        >>> dloss = grad(lambda w: torch.nn.functional.mse_loss(x @ w, y))
        >>> with forward_safe_losses():
        ...     _, hvp = jvp(dloss, (w,), (torch.ones(3),))
        >>> torch.allclose(hvp, 2 * x.T @ x @ torch.ones(3) / 5)
        True
    """
    with _ForwardSafeLosses():
        yield

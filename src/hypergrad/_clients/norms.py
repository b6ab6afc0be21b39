"""Affine norms written with elementary ops while the clients' vmapped inner gradient runs.

Under ``torch.func.vmap`` over clients, torch's second derivative (a double backward, or
forward-over-reverse) of ``torch.func.grad`` through an *affine* ``F.batch_norm``,
``F.layer_norm`` or ``F.instance_norm`` is wrong: the meta-gradient of ``hg.Clients`` with
``inner_grad="func"`` (and so ``method="forward"``, ``compile=True`` and ``hg.Implicit``'s
vmapped condition) was off by 0.1-2% with no error (torch 2.13; the sweep in
``benchmarks/vmap_norms.py`` and the pins in ``tests/test_vmap_norms.py``). The same norms
without an affine weight, ``F.group_norm``, ``F.rms_norm``, BatchNorm in eval mode, and the
autograd inner gradient (only the losses vmapped) are exact.

`exact_norms` is a ``TorchFunctionMode`` that, while active, computes those three with the same
maths in elementary ops (means, variances, ``rsqrt``), whose batching rules are right; the
running statistics are updated in place as torch's kernels do. The values equal torch's to
rounding. Only calls with an affine weight or bias are rewritten; the others stay torch's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["REWRITTEN", "exact_norms"]


def _affine(y: torch.Tensor, weight: Any, bias: Any, shape: Sequence[int]) -> torch.Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _normalise(x: torch.Tensor, dims: list[int], eps: float) -> tuple[torch.Tensor, ...]:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), the mean and variance."""
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps), mean, var


def _update(running: Any, value: torch.Tensor, momentum: float) -> None:
    """``running <- (1 - momentum) * running + momentum * value``, in place, as torch does."""
    if running is not None:
        running.mul_(1 - momentum).add_(value.detach().reshape(running.shape), alpha=momentum)


def _unbiased(var: torch.Tensor, n: int) -> torch.Tensor:
    return var * (n / (n - 1)) if n > 1 else var


def _batch_norm(
    input: torch.Tensor,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm``: per channel (dim 1) over the batch and every spatial dim.

    Examples:
        >>> x, w, b = torch.randn(6, 3, 2), torch.randn(3), torch.randn(3)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> ours = _batch_norm(x, rm.clone(), rv.clone(), w, b, True)
        >>> torch.allclose(ours, F.batch_norm(x, rm, rv, w, b, True), atol=1e-6)
        True
    """
    shape = [1, -1] + [1] * (input.dim() - 2)
    dims = [0, *range(2, input.dim())]
    if training or running_mean is None:
        y, mean, var = _normalise(input, dims, eps)
        if training:
            n = input.numel() // input.shape[1]
            _update(running_mean, mean, momentum)
            _update(running_var, _unbiased(var, n), momentum)
    else:
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(y, weight, bias, shape)


def _layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm``: over the last ``len(normalized_shape)`` dims.

    Examples:
        >>> x, w = torch.randn(4, 3), torch.randn(3)
        >>> torch.allclose(_layer_norm(x, (3,), w), F.layer_norm(x, (3,), w), atol=1e-6)
        True
    """
    dims = list(range(input.dim() - len(normalized_shape), input.dim()))
    y, _, _ = _normalise(input, dims, eps)
    return _affine(y, weight, bias, list(normalized_shape))


def _instance_norm(
    input: torch.Tensor,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.instance_norm``: per example and channel over the spatial dims; the running
    statistics (if any) move towards the mean over the batch of each instance's.

    Examples:
        >>> x, w = torch.randn(2, 3, 5), torch.randn(3)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> ours = _instance_norm(x, rm.clone(), rv.clone(), w)
        >>> torch.allclose(ours, F.instance_norm(x, rm, rv, w), atol=1e-6)
        True
    """
    shape = [1, -1] + [1] * (input.dim() - 2)
    if not use_input_stats:
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
        return _affine(y, weight, bias, shape)
    dims = list(range(2, input.dim()))
    y, mean, var = _normalise(input, dims, eps)
    n = input[0, 0].numel()
    _update(running_mean, mean.mean(0), momentum)
    _update(running_var, _unbiased(var, n).mean(0), momentum)
    return _affine(y, weight, bias, shape)


def _is_affine(func: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
    """Whether the call has an affine weight or bias (the case torch gets wrong)."""
    where = (2, 3) if func is F.layer_norm else (3, 4)  # weight's and bias's positions
    found = [args[i] if len(args) > i else kwargs.get(k) for k, i in zip(("weight", "bias"), where)]
    return any(isinstance(t, torch.Tensor) for t in found)


#: The ``torch.nn.functional`` norms rewritten while `exact_norms` is active.
REWRITTEN: dict[Callable[..., Any], Callable[..., torch.Tensor]] = {
    F.batch_norm: _batch_norm,
    F.layer_norm: _layer_norm,
    F.instance_norm: _instance_norm,
}


class _ExactNorms(TorchFunctionMode):
    """Route the affine norms of `REWRITTEN` to their rewrites; everything else to torch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rewrite = REWRITTEN.get(func)
        if rewrite is not None and _is_affine(func, args, kwargs):
            return rewrite(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def exact_norms() -> Iterator[None]:
    """Within the block, affine batch, layer and instance norms run as elementary ops.

    Examples:
        >>> x, w = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        >>> def second(w):  # d/dw of a sum of the gradient, through a vmapped grad
        ...     g = torch.func.grad(lambda w: (F.layer_norm(x * w, (3,), weight=w) ** 3).sum())
        ...     return torch.func.vmap(g)(w[None]).sum()
        >>> with exact_norms():
        ...     ours = torch.func.grad(second)(w)
        >>> unbatched = torch.func.grad(lambda w: torch.func.grad(
        ...     lambda w: (F.layer_norm(x * w, (3,), weight=w) ** 3).sum())(w).sum())(w)
        >>> torch.allclose(ours, unbatched, rtol=1e-10)
        True
    """
    with _ExactNorms():
        yield

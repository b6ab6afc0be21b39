"""RMSprop, as ``torch.optim.RMSprop``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from hypergrad._boundary import is_number
from hypergrad.optim._base import Optimizer
from hypergrad.optim._common import (
    Buffers,
    Flat,
    Leaves,
    axpy,
    build,
    numbers,
    register_states,
    safe_sqrt,
)
from hypergrad.optim._hyper import Hyper, is_zero
from hypergrad.tree import PyTree

__all__ = ["RMSpropState", "rmsprop"]


class RMSpropState(NamedTuple):
    """State of [`rmsprop`][hypergrad.optim.rmsprop] (the names of torch.optim's state entries).

    Attributes:
        step: number of steps taken (a 0-d float tensor).
        square_avg: running average of the squared gradient, keyed like the params.
        momentum_buffer: keyed like the params, or ``None`` without momentum.
        grad_avg: running average of the gradient with ``centered=True``, else ``None``.

    Examples:
        >>> opt = hg.optim.rmsprop(lr=0.01, alpha=0.9)
        >>> _, state = opt.step({"w": torch.zeros(1)}, {"w": torch.ones(1)}, opt.init({"w": torch.zeros(1)}))
        >>> state.square_avg["w"]
        tensor([0.1000])
    """

    step: torch.Tensor
    square_avg: PyTree
    momentum_buffer: PyTree | None
    grad_avg: PyTree | None


def _math(x: Flat) -> tuple[torch.Tensor, Buffers]:
    # Op order of torch.optim.rmsprop._single_tensor_rmsprop / _multi_tensor_rmsprop.
    p, g, bufs = x.p, x.grad(), x.bufs
    lr, alpha, eps = x.hp["lr"], x.hp["alpha"], x.hp["eps"]
    sq = bufs["square_avg"]
    if is_number(alpha):
        square_avg = torch.addcmul(sq * alpha, g, g, value=1 - alpha)
    else:
        square_avg = torch.addcmul(sq * alpha, g * (1 - alpha), g)
    grad_avg = None
    if x.options["centered"]:
        grad_avg = torch.lerp(bufs["grad_avg"], g, 1 - alpha)
        # May round below zero, where torch gives nan: nonnegative=False keeps that forward.
        avg = safe_sqrt(torch.addcmul(square_avg, grad_avg, grad_avg, value=-1), nonnegative=False)
    else:
        avg = safe_sqrt(square_avg)
    avg = avg + eps
    buf = bufs["momentum_buffer"]
    if buf is not None:
        buf = torch.addcdiv(buf * x.hp["momentum"], g, avg)
        new_p = axpy(p, -lr, buf)
    elif is_number(lr):
        new_p = torch.addcdiv(p, g, avg, value=-lr)
    else:
        new_p = p + g * (-lr) / avg
    return new_p, {"square_avg": square_avg, "momentum_buffer": buf, "grad_avg": grad_avg}


def _math_in_place(x: Leaves) -> bool:
    # ``_math`` with number hyperparameters, leaf by leaf with the same kernels.
    hp = x.hp
    if not numbers(hp, "lr", "alpha", "eps", "momentum", "weight_decay"):
        return False
    lr, alpha, eps = hp["lr"], hp["alpha"], hp["eps"]
    p, g, bufs = x.p, x.grad(), x.bufs
    square_avg = bufs["square_avg"]
    assert square_avg is not None
    torch._foreach_mul_(square_avg, alpha)
    torch._foreach_addcmul_(square_avg, g, g, value=1 - alpha)
    grad_avg = bufs["grad_avg"]
    if grad_avg is not None:  # centered
        torch._foreach_lerp_(grad_avg, g, 1 - alpha)
        # safe_sqrt is sqrt itself here (it only changes the backward), nan below zero included
        avg = torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1)
        torch._foreach_sqrt_(avg)
    else:
        avg = torch._foreach_sqrt(square_avg)
    torch._foreach_add_(avg, eps)
    buf = bufs["momentum_buffer"]
    if buf is not None:
        torch._foreach_mul_(buf, hp["momentum"])
        torch._foreach_addcdiv_(buf, g, avg)
        torch._foreach_add_(p, buf, alpha=-lr)
    else:
        torch._foreach_addcdiv_(p, g, avg, value=-lr)
    return True


def _buffers(hp: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "square_avg": 0.0,
        "momentum_buffer": None if is_zero(hp["momentum"]) else 0.0,
        "grad_avg": 0.0 if options["centered"] else None,
    }


def rmsprop(
    lr: Hyper = 1e-2,
    alpha: Hyper = 0.99,
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0,
    momentum: Hyper = 0,
    centered: bool = False,
    *,
    maximize: bool = False,
) -> Optimizer:
    """Functional ``torch.optim.RMSprop``: same options, defaults and numerics, differentiable.

    Hyperparameters may be floats, 0-d tensors, per-parameter dicts or per-element tensors. The
    momentum buffer exists iff ``momentum`` is not the number 0. The square root is zero-safe
    (double-``where`` trick, see [`hg.optim.adam`][hypergrad.optim.adam]): identical forward values,
    no nan in the backward where a gradient element is exactly zero.

    Args:
        lr: learning rate.
        alpha: smoothing constant of the squared-gradient average.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient.
        momentum: momentum factor.
        centered: normalise by the estimated variance instead of the second moment.
        maximize: ascend instead of descend.

    Returns:
        An [`Optimizer`][hypergrad.optim.Optimizer] whose state is
        [`RMSpropState`][hypergrad.optim.RMSpropState].

    Raises:
        ValueError: a negative ``lr``, ``alpha``, ``eps``, ``weight_decay`` or ``momentum``.

    Examples:
        >>> opt = hg.optim.rmsprop(lr=0.1, momentum=0.5, centered=True)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> new, state = opt.step(params, {"w": torch.tensor([0.0, 1.0])}, opt.init(params))
        >>> new["w"], state.grad_avg["w"]
        (tensor([ 1.0000, -3.0050]), tensor([0.0000, 0.0100]))
    """
    hyperparams = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)
    options = {"centered": centered, "maximize": maximize}
    return build(
        "rmsprop", RMSpropState, hyperparams, options,
        buffers=_buffers, math=_math, in_place=_math_in_place,
    )  # fmt: skip


register_states(RMSpropState)

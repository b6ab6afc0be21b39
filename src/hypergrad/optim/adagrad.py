"""Adagrad, as ``torch.optim.Adagrad``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from hypergrad.optim._base import Optimizer
from hypergrad.optim._common import (
    Buffers,
    Flat,
    Leaves,
    build,
    numbers,
    register_states,
    safe_sqrt,
)
from hypergrad.optim._hyper import Hyper, host_value
from hypergrad.tree import PyTree

__all__ = ["AdagradState", "adagrad"]


class AdagradState(NamedTuple):
    """State of [`adagrad`][hypergrad.optim.adagrad] (the names of torch.optim's state entries).

    Attributes:
        step: number of steps taken (a 0-d float tensor).
        sum: running sum of squared gradients (starts at ``initial_accumulator_value``).

    Examples:
        >>> opt = hg.optim.adagrad(lr=0.1)
        >>> _, state = opt.step({"w": torch.zeros(1)}, {"w": torch.full((1,), 2.0)}, opt.init({"w": torch.zeros(1)}))
        >>> state.sum["w"]
        tensor([4.])
    """

    step: torch.Tensor
    sum: PyTree


def _math(x: Flat) -> tuple[torch.Tensor, Buffers]:
    # Op order of torch.optim.adagrad._single_tensor_adagrad / _multi_tensor_adagrad.
    g, hp = x.grad(), x.hp
    t = x.step.to(torch.float64)  # scalar maths in float64, as torch's Python floats
    clr = hp["lr"] / (1 + (t - 1) * hp["lr_decay"])
    state_sum = torch.addcmul(x.bufs["sum"], g, g, value=1)
    std = safe_sqrt(state_sum) + hp["eps"]
    return x.p + g * (-clr) / std, {"sum": state_sum}


def _math_in_place(x: Leaves) -> bool:
    # ``_math`` with number hyperparameters, leaf by leaf with the same kernels.
    hp = x.hp
    if host_value(x.step) is None or not numbers(hp, "lr", "lr_decay", "eps", "weight_decay"):
        return False
    g = x.grad()
    # the out-of-place maths' float64 scalar as a Python number (a 0-d tensor would promote a
    # 0-d leaf's maths to float64, where the flat vector's stays in its dtype)
    clr = float(hp["lr"] / (1 + (x.step.to(torch.float64) - 1) * hp["lr_decay"]))
    sums = x.bufs["sum"]
    assert sums is not None
    torch._foreach_addcmul_(sums, g, g, value=1)
    std = torch._foreach_sqrt(sums)  # safe_sqrt is sqrt itself here
    torch._foreach_add_(std, hp["eps"])
    update = torch._foreach_mul(g, -clr)
    torch._foreach_div_(update, std)
    torch._foreach_add_(x.p, update)
    return True


def _buffers(hp: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    return {"sum": hp["initial_accumulator_value"]}


def adagrad(
    lr: Hyper = 1e-2,
    lr_decay: Hyper = 0,
    weight_decay: Hyper = 0,
    initial_accumulator_value: Hyper = 0,
    eps: Hyper = 1e-10,
    *,
    maximize: bool = False,
) -> Optimizer:
    """Functional ``torch.optim.Adagrad``: same options, defaults and numerics, differentiable.

    Hyperparameters may be floats, 0-d tensors, per-parameter dicts or per-element tensors.
    ``initial_accumulator_value`` enters the state made by ``opt.init``; to differentiate with
    respect to it pass it to ``opt.init(params, hyperparams={...})``. The square root is
    zero-safe (double-``where`` trick, see [`hg.optim.adam`][hypergrad.optim.adam]).

    Args:
        lr: learning rate.
        lr_decay: learning-rate decay: step ``k`` uses ``lr / (1 + (k - 1) * lr_decay)``.
        weight_decay: L2 penalty added to the gradient.
        initial_accumulator_value: starting value of the sum of squared gradients.
        eps: added to the denominator.
        maximize: ascend instead of descend.

    Returns:
        An [`Optimizer`][hypergrad.optim.Optimizer] whose state is
        [`AdagradState`][hypergrad.optim.AdagradState].

    Raises:
        ValueError: a negative ``lr``, ``lr_decay``, ``weight_decay``,
            ``initial_accumulator_value`` or ``eps``.

    Examples:
        >>> opt = hg.optim.adagrad(lr=0.5, initial_accumulator_value=3.0)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> new, state = opt.step(params, {"w": torch.tensor([0.0, 1.0])}, opt.init(params))
        >>> new["w"], state.sum["w"]
        (tensor([ 1.0000, -2.2500]), tensor([3., 4.]))
    """
    hyperparams = dict(
        lr=lr,
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        initial_accumulator_value=initial_accumulator_value,
        eps=eps,
    )
    options = {"maximize": maximize}
    return build(
        "adagrad", AdagradState, hyperparams, options,
        buffers=_buffers, math=_math, in_place=_math_in_place,
    )  # fmt: skip


register_states(AdagradState)

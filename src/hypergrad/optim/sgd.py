"""Stochastic gradient descent with momentum, as ``torch.optim.SGD``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from hypergrad._boundary import caller, is_number
from hypergrad.optim._base import Optimizer
from hypergrad.optim._common import Buffers, Flat, Leaves, axpy, build, numbers, register_states
from hypergrad.optim._hyper import _values, check_hyperparams, host_value, is_zero
from hypergrad.tree import PyTree

__all__ = ["SGDState", "sgd"]


class SGDState(NamedTuple):
    """State of [`sgd`][hypergrad.optim.sgd].

    Attributes:
        step: number of steps taken (a 0-d float tensor, as torch.optim's counters).
        momentum_buffer: a tree keyed like the params, or ``None`` without momentum.

    Examples:
        >>> opt = hg.optim.sgd(lr=0.1, momentum=0.9)
        >>> state = opt.init({"w": torch.zeros(2)})
        >>> _, state = opt.step({"w": torch.zeros(2)}, {"w": torch.ones(2)}, state)
        >>> state.step, state.momentum_buffer
        (tensor(1.), {'w': tensor([1., 1.])})
    """

    step: torch.Tensor
    momentum_buffer: PyTree | None


def _math(x: Flat) -> tuple[torch.Tensor, Buffers]:
    # Op for op as torch.optim.sgd._single_tensor_sgd / _multi_tensor_sgd.
    p, g, step, hp, options = x.p, x.grad(), x.step, x.hp, x.options
    buf = x.bufs["momentum_buffer"]
    if buf is not None:
        momentum, dampening = hp["momentum"], hp["dampening"]
        step_value = host_value(step)
        if (
            is_number(momentum)
            and is_number(dampening)
            and step_value is not None
            and step_value > 1
        ):
            # Eager, float hyperparameters, after step 1: torch's own two ops, no step switch.
            buf = torch.add(buf * momentum, g, alpha=1 - dampening)
            g = torch.add(g, buf, alpha=momentum) if options["nesterov"] else buf
            return axpy(p, -hp["lr"], g), {"momentum_buffer": buf}
        # torch starts the buffer as a copy of the first gradient (no dampening on step 1): on
        # step 1 use factors (0, 1) on (buf, g), chosen as 0-d tensors so no vector op is added.
        first = step == 1

        def pick(on_first: float, later: Any) -> torch.Tensor:
            if is_number(later):
                later = torch.tensor(later, dtype=p.dtype, device=p.device)
            return torch.where(first, torch.full_like(later, on_first), later)

        buf = torch.addcmul(buf * pick(0.0, momentum), g, pick(1.0, 1 - dampening))
        g = axpy(g, momentum, buf) if options["nesterov"] else buf
    lr = hp["lr"]
    return axpy(p, -lr, g), {"momentum_buffer": buf}


def _math_in_place(x: Leaves) -> bool:
    # ``_math``'s eager branch leaf by leaf (torch.optim's foreach step).
    hp = x.hp
    if not numbers(hp, "lr", "momentum", "dampening", "weight_decay"):
        return False
    bufs = x.bufs["momentum_buffer"]
    if bufs is not None:
        step_value = host_value(x.step)
        if step_value is None or step_value <= 1:
            return False
    g = x.grad()
    if bufs is not None:
        torch._foreach_mul_(bufs, hp["momentum"])
        torch._foreach_add_(bufs, g, alpha=1 - hp["dampening"])
        g = (
            list(torch._foreach_add(g, bufs, alpha=hp["momentum"]))
            if x.options["nesterov"]
            else bufs
        )
    torch._foreach_add_(x.p, g, alpha=-hp["lr"])
    return True


def _check(hp: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    check_hyperparams(hp, unchecked=("dampening",))  # torch.optim.SGD takes any dampening
    if options["nesterov"]:
        no_momentum = is_zero(hp["momentum"]) or any(v <= 0 for _, v in _values(hp["momentum"]))
        damped = any(v != 0 for _, v in _values(hp["dampening"]))
        if no_momentum or damped:
            raise ValueError(
                f"{caller()}: nesterov=True requires a momentum > 0 and zero dampening (as "
                f"torch.optim.SGD); got momentum={hp['momentum']!r}, "
                f"dampening={hp['dampening']!r}. Pass e.g. momentum=0.9, dampening=0."
            )


def _buffers(hp: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    return {"momentum_buffer": None if is_zero(hp["momentum"]) else 0.0}


def sgd(
    lr: float | torch.Tensor | Mapping[str, Any] = 1e-3,
    momentum: float | torch.Tensor | Mapping[str, Any] = 0,
    dampening: float | torch.Tensor | Mapping[str, Any] = 0,
    weight_decay: float | torch.Tensor | Mapping[str, Any] = 0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> Optimizer:
    """Functional ``torch.optim.SGD``: same options, defaults and numerics, pure and differentiable.

    Every hyperparameter may be a float, a 0-d tensor (which may require grad), a per-parameter
    dict keyed like the params, or a tensor shaped like the parameter. The momentum buffer
    exists iff ``momentum`` is not the number 0 (a tensor momentum always has one). As in torch,
    the buffer starts as the first (weight-decayed) gradient.

    Args:
        lr: learning rate.
        momentum: momentum factor.
        dampening: dampening for momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and zero dampening).
        maximize: ascend instead of descend.

    Returns:
        An [`Optimizer`][hypergrad.optim.Optimizer] whose state is
        [`SGDState`][hypergrad.optim.SGDState].

    Raises:
        ValueError: a negative ``lr``, ``momentum`` or ``weight_decay``, or nesterov without
            momentum or with dampening.

    Examples:
        Differentiate the loss after two steps with respect to the learning rate:

        >>> opt = hg.optim.sgd(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> def loss_after(hp):
        ...     p, s = params, opt.init(params)
        ...     for _ in range(2):
        ...         p, s = opt.step(p, {"w": 2 * p["w"]}, s, hyperparams=hp)
        ...     return (p["w"] ** 2).sum()
        >>> grad = torch.func.grad(loss_after)({"lr": torch.tensor(0.1)})
        >>> round(grad["lr"].item(), 4)
        -23.0

        A tensor learning rate that requires grad works with plain autograd too:

        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> opt = hg.optim.sgd(lr=lr)
        >>> new, _ = opt.step(params, {"w": torch.ones(2)}, opt.init(params))
        >>> new["w"].sum().backward()
        >>> lr.grad
        tensor(-2.)
    """
    hyperparams = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    options = {"nesterov": nesterov, "maximize": maximize}
    return build(
        "sgd", SGDState, hyperparams, options,
        buffers=_buffers, math=_math, check=_check, in_place=_math_in_place,
    )  # fmt: skip


register_states(SGDState)

"""Adam and AdamW, as ``torch.optim.Adam`` and ``torch.optim.AdamW``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from hypergrad._boundary import caller, is_number
from hypergrad.optim._base import Optimizer
from hypergrad.optim._common import (
    Buffers,
    Flat,
    Leaves,
    build,
    numbers,
    once_per_step,
    register_states,
    safe_sqrt,
)
from hypergrad.optim._hyper import Hyper, check_hyperparams, host_value, is_zero
from hypergrad.tree import PyTree

__all__ = ["AdamState", "adam", "adamw"]


class AdamState(NamedTuple):
    """State of [`adam`][hypergrad.optim.adam] and [`adamw`][hypergrad.optim.adamw].

    The names are those of torch.optim's state entries.

    Attributes:
        step: number of steps taken (a 0-d float tensor, as torch.optim's ``state["step"]``).
        exp_avg: first-moment running average, a tree keyed like the params.
        exp_avg_sq: second-moment running average, keyed like the params.
        max_exp_avg_sq: running maximum of ``exp_avg_sq`` with ``amsgrad=True``, else ``None``.

    Examples:
        >>> opt = hg.optim.adam(lr=0.1)
        >>> _, state = opt.step({"w": torch.zeros(2)}, {"w": torch.ones(2)}, opt.init({"w": torch.zeros(2)}))
        >>> state.exp_avg["w"], state.max_exp_avg_sq
        (tensor([0.1000, 0.1000]), None)
    """

    step: torch.Tensor
    exp_avg: PyTree
    exp_avg_sq: PyTree
    max_exp_avg_sq: PyTree | None


def _adam_math(x: Flat, *, decoupled: bool) -> tuple[torch.Tensor, Buffers]:
    # Op order of torch.optim.adam._single_tensor_adam (its differentiable branch where a
    # hyperparameter is a tensor) and _multi_tensor_adam.
    p, g, bufs, step, options = x.p, x.grad(l2=not decoupled), x.bufs, x.step, x.options
    lr, (beta1, beta2), eps, wd = x.hp["lr"], x.hp["betas"], x.hp["eps"], x.hp["weight_decay"]
    if decoupled and not is_zero(wd):
        p = p * (1 - lr * wd)
    exp_avg = torch.lerp(bufs["exp_avg"], g, 1 - beta1)
    v = bufs["exp_avg_sq"]
    if is_number(beta2):
        exp_avg_sq = torch.addcmul(v * beta2, g, g, value=1 - beta2)
    else:
        exp_avg_sq = torch.lerp(v, g * g, 1 - beta2)
    # Scalar maths in float64, as torch.optim does it in Python floats.
    t = step.to(torch.float64)
    step_value = host_value(step)
    eager_step = is_number(lr) and is_number(beta1) and step_value is not None
    if eager_step:  # torch's own Python floats: one addcdiv kernel for the update below
        bias_correction1: Any = 1 - beta1**step_value
    else:
        bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size: Any = once_per_step(lr / bias_correction1)
    max_sq = None
    if options["amsgrad"]:
        # The running maximum, as a selection: at an exact tie it keeps the old maximum, so the
        # derivative there is that branch's one-sided derivative, by construction rather than
        # by torch's convention for maximum (which splits the gradient half and half).
        old = bufs["max_exp_avg_sq"]
        max_sq = torch.where(exp_avg_sq > old, exp_avg_sq, old)
        second = max_sq
    else:
        second = exp_avg_sq
    denom = safe_sqrt(second) / once_per_step(torch.sqrt(bias_correction2)) + eps
    if eager_step:
        new_p = torch.addcdiv(p, exp_avg, denom, value=-step_size)
    else:
        # (value * exp_avg) / denom, the evaluation order of torch's addcdiv kernel.
        new_p = p + exp_avg * (-step_size) / denom
    return new_p, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_sq}


def _adam_in_place(x: Leaves, *, decoupled: bool) -> bool:
    # ``_adam_math``'s eager branch (number hyperparameters, a step counter on the host) leaf by
    # leaf, with the same kernels (torch.optim's foreach step).
    hp = x.hp
    step_value = host_value(x.step)
    if step_value is None or not numbers(hp, "lr", "eps", "weight_decay"):
        return False
    lr, (beta1, beta2), eps, wd = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    if not (is_number(beta1) and is_number(beta2)):
        return False
    p, g, bufs = x.p, x.grad(l2=not decoupled), x.bufs
    if decoupled and not is_zero(wd):
        torch._foreach_mul_(p, 1 - lr * wd)
    exp_avg, exp_avg_sq = bufs["exp_avg"], bufs["exp_avg_sq"]
    assert exp_avg is not None and exp_avg_sq is not None
    torch._foreach_lerp_(exp_avg, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, g, g, value=1 - beta2)
    second = exp_avg_sq
    if x.options["amsgrad"]:
        second = bufs["max_exp_avg_sq"]  # type: ignore[assignment]
        for old, new in zip(second, exp_avg_sq):
            old.copy_(torch.where(new > old, new, old))
    # The out-of-place maths' float64 scalar, as a Python number: a 0-d tensor would make a 0-d
    # leaf compute in float64 (two 0-d operands promote), where the flat vector does not.
    root = float(torch.sqrt(1 - beta2 ** x.step.to(torch.float64)))
    # safe_sqrt is sqrt itself on these nonnegative values (it only changes the backward)
    denom = torch._foreach_sqrt(second)
    torch._foreach_div_(denom, root)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(p, exp_avg, denom, value=-(lr / (1 - beta1**step_value)))
    return True


def _in_place_l2(x: Leaves) -> bool:
    return _adam_in_place(x, decoupled=False)


def _in_place_decoupled(x: Leaves) -> bool:
    return _adam_in_place(x, decoupled=True)


def _math_l2(x: Flat) -> tuple[torch.Tensor, Buffers]:
    return _adam_math(x, decoupled=False)


def _math_decoupled(x: Flat) -> tuple[torch.Tensor, Buffers]:
    return _adam_math(x, decoupled=True)


def _pair(betas: Any) -> Any:
    return tuple(betas) if isinstance(betas, tuple | list) else betas


def _check(hp: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    betas = hp["betas"]
    if not (isinstance(betas, tuple | list) and len(betas) == 2):
        raise ValueError(
            f"{caller()}: betas must be a tuple of two values, e.g. (0.9, 0.999); got {betas!r}."
        )
    each_beta = {"betas[0]": betas[0], "betas[1]": betas[1]}
    others = {name: value for name, value in hp.items() if name != "betas"}
    check_hyperparams({**others, **each_beta}, below_one=tuple(each_beta))


def _buffers(hp: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "exp_avg": 0.0,
        "exp_avg_sq": 0.0,
        "max_exp_avg_sq": 0.0 if options["amsgrad"] else None,
    }


def _family(
    name: str, lr: Hyper, betas: Any, eps: Hyper, wd: Hyper, amsgrad: bool, maximize: bool
) -> Optimizer:
    """What ``adam`` and ``adamw`` build: the weight decay is added to the gradient or decoupled."""
    hyperparams = {"lr": lr, "betas": _pair(betas), "eps": eps, "weight_decay": wd}
    options = {"amsgrad": amsgrad, "maximize": maximize}
    math = _math_decoupled if name == "adamw" else _math_l2
    in_place = _in_place_decoupled if name == "adamw" else _in_place_l2
    return build(
        name, AdamState, hyperparams, options,
        buffers=_buffers, math=math, check=_check, in_place=in_place,
    )  # fmt: skip


def adam(
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> Optimizer:
    """Functional ``torch.optim.Adam``: same options, defaults and numerics, pure and differentiable.

    Hyperparameters may be floats, 0-d tensors, per-parameter dicts keyed like the params, or
    tensors shaped like the parameter; ``betas`` is a tuple of two such values. The update
    follows torch.optim op for op (``lerp`` for ``exp_avg``, ``addcmul`` for ``exp_avg_sq``,
    bias corrections ``1 - beta**step``), so a trajectory matches ``torch.optim.Adam`` (foreach
    or not) to rounding.

    The square root of ``exp_avg_sq`` is taken with the double-``where`` trick (``sqrt`` of
    ``where(v > 0, v, 1)``, then ``where(v > 0, ..., 0)``): the forward values are exactly
    ``sqrt(v)``, and where a gradient element is exactly zero (``v == 0``) the backward is 0
    instead of ``inf * 0 = nan``.

    Args:
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient.
        amsgrad: use the running maximum of the second moment (AMSGrad).
        maximize: ascend instead of descend.

    Returns:
        An [`Optimizer`][hypergrad.optim.Optimizer] whose state is
        [`AdamState`][hypergrad.optim.AdamState].

    Raises:
        ValueError: a negative ``lr``, ``eps`` or ``weight_decay``, or a beta outside [0, 1).

    Examples:
        The gradient of a later loss with respect to every hyperparameter at once:

        >>> opt = hg.optim.adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
        >>> def loss_after(hp):
        ...     p, s = params, opt.init(params)
        ...     for _ in range(3):
        ...         p, s = opt.step(p, {"w": 2 * p["w"]}, s, hyperparams=hp)
        ...     return (p["w"] ** 2).sum()
        >>> hp = opt.tensor_hyperparams(dtype=torch.float64)
        >>> grads = torch.func.grad(loss_after)(hp)
        >>> sorted(grads), round(grads["lr"].item(), 4)
        (['betas', 'eps', 'lr', 'weight_decay'], -14.3107)
    """
    return _family("adam", lr, betas, eps, weight_decay, amsgrad, maximize)


def adamw(
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> Optimizer:
    """Functional ``torch.optim.AdamW``: Adam with decoupled weight decay.

    The parameters are first multiplied by ``1 - lr * weight_decay``, then take the Adam step
    of [`adam`][hypergrad.optim.adam] (same hyperparameter forms, same zero-safe square root).

    Args:
        lr: learning rate; it also scales the decay.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: decoupled weight decay (default 1e-2, as torch), never added to the
            gradient.
        amsgrad: use the running maximum of the second moment (AMSGrad), as in Adam.
        maximize: ascend instead of descend.

    Returns:
        An [`Optimizer`][hypergrad.optim.Optimizer] named ``"adamw"``, whose state is Adam's
        [`AdamState`][hypergrad.optim.AdamState].

    Raises:
        ValueError: what [`adam`][hypergrad.optim.adam] refuses: a negative ``lr``, ``eps`` or
            ``weight_decay``, or a beta outside [0, 1).

    Examples:
        >>> opt = hg.optim.adamw(lr=0.1, weight_decay=0.5)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> new, state = opt.step(params, {"w": torch.tensor([0.0, 1.0])}, opt.init(params))
        >>> new["w"], state.step
        (tensor([ 0.9500, -2.0000]), tensor(1.))
    """
    return _family("adamw", lr, betas, eps, weight_decay, amsgrad, maximize)


register_states(AdamState)

"""The stationarity condition of the inner problem: what ``hg.Implicit`` differentiates.

An optimizer that has converged sits at a fixed point of its update. For every built-in family
that is a zero of the gradient it steps along (``Flat.grad`` in ``hypergrad.optim._common``)::

    F(p) = s * grad_p inner_loss(p, aux, batch) + weight_decay * p = 0

with ``s = -1`` under ``maximize=True`` and the L2 ``weight_decay`` the family adds to the
gradient (none when it is the number 0). Where the fixed point lies depends on the inner loss,
``aux`` and that weight decay only: the learning rate, momentum, betas, eps, dampening, ...
change how training gets there, not where it ends. AdamW's decoupled decay is the exception:
its fixed point also depends on the adaptive step, so it is not a zero of any gradient.

``make_condition`` builds ``F`` (``Condition.residual``) for the front door; the clients
transform vmaps it over the clients (``hypergrad._clients.federation``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._engine.kernels import math_attention
from hypergrad._engine.step import _call_inner
from hypergrad.optim._base import Optimizer
from hypergrad.optim._hyper import is_zero, resolve
from hypergrad.tree import PyTree

__all__ = ["Condition", "entering", "make_condition", "stationarity"]

Residual = Callable[[PyTree, PyTree, PyTree, Mapping[str, Any], Any], PyTree]


@dataclasses.dataclass(frozen=True)
class Condition:
    """The stationarity condition ``F(params) = 0`` that the trained params satisfy.

    Attributes:
        residual: ``residual(params, buffers, aux, hyperparams, batch) -> tree like params``,
            ``F`` (transformable by torch.func: jvp of it is a Hessian-vector product).
        batch_at: ``batch_at(k)``, step ``k``'s batch as ``residual`` takes it.
        start: the initial params as ``residual`` takes them (clients: stacked).
        hyperparams: the hyperparameter names that enter ``F`` (the L2 weight decay).
        obstacle: why the trained params are not a zero of ``F`` (AdamW's decoupled decay),
            or ``None``.
    """

    residual: Residual
    batch_at: Callable[[int], Any]
    start: Callable[[PyTree], PyTree]
    hyperparams: tuple[str, ...]
    obstacle: str | None = None


def _decayed(grads: PyTree, params: PyTree, decay: Any) -> PyTree:
    """``grads + decay * params`` leaf by leaf, ``decay`` in any hyperparameter form."""
    paths, flat, spec = optree.tree_flatten_with_path(params, namespace=_tree._NAMESPACE)
    values = resolve("weight_decay", decay, paths, [x.shape for x in flat], spec)
    per_leaf = values if isinstance(values, list) else [values] * len(flat)
    g_flat = spec.flatten_up_to(grads)
    out = [g + (wd.to(p.dtype) if isinstance(wd, torch.Tensor) else wd) * p
           for g, p, wd in zip(g_flat, flat, per_leaf)]  # fmt: skip
    return optree.tree_unflatten(spec, out)


def stationarity(inner_loss: Callable[..., Any], opt: Optimizer, *, has_buffers: bool) -> Residual:
    """``F(params, buffers, aux, hyperparams, batch)``: the gradient the optimizer steps along.

    With buffers, ``inner_loss`` is called with the given (final) buffers and the buffers it
    returns are dropped: they are held constant. Attention runs through its math backend: a
    Hessian-vector product is a forward-mode derivative of the gradient, which torch's fused
    attention kernels lack (``hypergrad._engine.kernels``).

    Examples:
        >>> F = stationarity(lambda p, a, x: ((p["w"] - x) ** 2).sum(),
        ...                  hg.optim.sgd(lr=0.1, weight_decay=0.5), has_buffers=False)
        >>> F({"w": torch.tensor([1.0])}, None, None, {"weight_decay": 0.5}, torch.tensor([0.0]))
        {'w': tensor([2.5000])}
    """
    sign = -1.0 if opt.options.get("maximize", False) else 1.0
    l2 = opt.name != "adamw" and "weight_decay" in opt.hyperparams

    def residual(
        params: PyTree, buffers: PyTree, aux: PyTree, hyperparams: Mapping[str, Any], batch: Any
    ) -> PyTree:
        def loss(p: PyTree) -> torch.Tensor:
            return _call_inner(inner_loss, has_buffers, p, aux, batch, buffers)[0]

        with math_attention():
            grads = torch.func.grad(loss)(params)
        if sign < 0:
            grads = _tree.scale(grads, sign)
        decay = hyperparams.get("weight_decay", 0) if l2 else 0
        return grads if is_zero(decay) else _decayed(grads, params, decay)

    return residual


def entering(opt: Optimizer) -> tuple[str, ...]:
    """The hyperparameters of ``opt`` that move the fixed point: the L2 weight decay.

    Examples:
        >>> entering(hg.optim.sgd(lr=0.1)), entering(hg.optim.adamw(lr=0.1))
        (('weight_decay',), ())
    """
    return ("weight_decay",) if opt.name != "adamw" and "weight_decay" in opt.hyperparams else ()


def make_condition(
    inner_loss: Callable[..., Any],
    opt: Optimizer,
    hyperparams: Mapping[str, Any],
    *,
    has_buffers: bool,
    batch_at: Callable[[int], Any],
) -> Condition:
    """The ``Condition`` of one model trained by ``opt`` on ``inner_loss``.

    Examples:
        >>> c = make_condition(lambda p, a, x: (p["w"] ** 2).sum(), hg.optim.adam(lr=0.1),
        ...                    {"weight_decay": 0}, has_buffers=False, batch_at=lambda k: None)
        >>> c.hyperparams, c.obstacle
        (('weight_decay',), None)
    """
    obstacle = None
    if opt.name == "adamw" and not is_zero(hyperparams.get("weight_decay", 0)):
        obstacle = (
            "hg.optim.adamw's decoupled weight decay moves the params outside the gradient, so "
            "its fixed point depends on the adaptive step size and is not a zero of any "
            "gradient. Use hg.optim.adam(weight_decay=...) (an L2 term, the fixed point of "
            "inner_loss + weight_decay / 2 * |p|^2), put the decay into inner_loss, or pass "
            "hg.optim.adamw(weight_decay=0)."
        )
    return Condition(
        residual=stationarity(inner_loss, opt, has_buffers=has_buffers),
        batch_at=batch_at,
        start=lambda params: params,
        hyperparams=entering(opt),
        obstacle=obstacle,
    )

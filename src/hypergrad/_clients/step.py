"""The step of C stacked clients: the engine's step, vmapped (two ways, the same numbers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hypergrad._boundary import caller
from hypergrad._clients.norms import exact_norms
from hypergrad._clients.vmap import vmap_trees
from hypergrad._engine.step import in_functorch_transform, make_step
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree

__all__ = ["StackedOptimizer", "vmapped_step"]


def _scalar_hp(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_scalar_hp(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class StackedOptimizer:
    """Duck-types ``Optimizer.step`` for stacked clients: each client's update, all at once.

    A built-in (elementwise) optimizer with shared scalar hyperparameters, whose clients all
    stand at the same step count, is applied to the stacked trees directly, as to one model
    C times larger: the same numbers as vmapping it per client, without vmap's per-call
    wrapping or a per-client concatenation of the leaves each step. Anything else
    (per-client or per-leaf hyperparameters, other optimizers, clients at different steps,
    inside a torch.func transform) is vmapped over the clients.
    """

    def __init__(self, opt: Optimizer, hp_dims: Any, **options: Any) -> None:
        self._opt = opt
        self._direct = opt.elementwise and all(d is None for d in hp_dims.values())
        self._update = vmap_trees(
            lambda p, g, s, h: opt.update(p, g, s, h), 3, (hp_dims,), **options
        )

    def _uniform_step(self, state: Any) -> torch.Tensor | None:
        """The clients' common step count as a 0-d tensor, or ``None`` if not uniform/known."""
        step = getattr(state, "step", None)
        if not isinstance(step, torch.Tensor) or step.dim() != 1 or in_functorch_transform():
            return None
        if step.stride(0) == 0:  # our own expanded output: uniform by construction
            return step[0]
        return step[0] if bool((step == step[0]).all()) else None

    def step(self, params, grads, state, *, hyperparams):
        if self._direct and all(_scalar_hp(v) for v in hyperparams.values()):
            step = self._uniform_step(state)
            if step is not None:
                new_params, new_state = self._opt.update(
                    params, grads, state._replace(step=step), hyperparams
                )
                clients = state.step.shape[0]
                return new_params, new_state._replace(step=new_state.step.expand(clients))
        return self._update(params, grads, state, hyperparams)

    def update(self, params, grads, state, hyperparams):
        """The engine's name for a step with checked hyperparameters (``Optimizer.update``)."""
        return self.step(params, grads, state, hyperparams=hyperparams)


def vmapped_step(
    inner_loss: Callable[..., Any],
    opt: Optimizer,
    has_buffers: bool,
    first_order: bool,
    dims: dict,
    inner_grad: str,
    math_attention: bool = False,
    **options: Any,
) -> Callable[..., tuple[PyTree, PyTree, PyTree, torch.Tensor]]:
    """``step(params, state, buffers, aux, hp, batch)`` over stacked clients.

    ``"func"``: the engine's step (``torch.func.grad_and_value``) vmapped whole; transformable,
    so it serves ``"forward"`` (jvp). ``"autograd"``: only the clients' losses are vmapped;
    their sum is differentiated by the engine's autograd step (client ``c``'s loss depends on
    client ``c``'s params only, so the gradient of the sum is each client's own gradient),
    and the optimizer update is vmapped. Same numbers; the second records a much lighter
    meta-graph (plain batched ops instead of functorch's wrappers). The first runs affine
    norms as elementary ops (``hypergrad._clients.norms``: torch's vmapped second derivative
    of its own kernels is wrong); the second needs not. ``"auto"`` picks
    ``"func"`` inside a torch.func transform, else ``"autograd"``. ``math_attention``: as for
    the engine's ``make_step``.
    """
    in_dims = (dims["aux"], dims["hyperparams"], dims["batches"])
    single = make_step(
        inner_loss, opt, has_buffers=has_buffers, inner_grad="func", first_order=first_order,
        math_attention=math_attention,
    )  # fmt: skip
    by_func = vmap_trees(single, 3, in_dims, **options)

    def one_loss(p: PyTree, b: PyTree, a: PyTree, batch: Any) -> tuple[torch.Tensor, PyTree]:
        if has_buffers:
            return inner_loss(p, a, batch, b)
        return inner_loss(p, a, batch), None

    losses = vmap_trees(one_loss, 2, (dims["aux"], dims["batches"]), **options)
    last: list[torch.Tensor] = []

    def total(p: PyTree, a: PyTree, batch: Any, b: PyTree = None) -> Any:
        per_client, new_b = losses(p, b, a, batch)
        last[:] = [per_client]
        if per_client.dim() != 1:
            raise ValueError(
                f"{caller()}: inner_loss must return a scalar (0-d) tensor per client, got shape "
                f"{tuple(per_client.shape[1:])}. Reduce it, e.g. return loss.mean()."
            )
        return (per_client.sum(), new_b) if has_buffers else per_client.sum()

    by_autograd = make_step(
        total, StackedOptimizer(opt, dims["hyperparams"], **options),  # type: ignore[arg-type]
        has_buffers=has_buffers, inner_grad="autograd", first_order=first_order,
        math_attention=math_attention,
    )  # fmt: skip

    def step(p, s, b, a, h, batch):
        func = inner_grad == "func" or (inner_grad == "auto" and in_functorch_transform())
        if func:  # torch's vmapped second derivative of an affine norm is wrong: rewritten
            with exact_norms():
                return by_func(p, s, b, a, h, batch)
        p, s, b, summed = by_autograd(p, s, b, a, h, batch)
        return p, s, b, last[0] if summed.requires_grad else last[0].detach()

    return step

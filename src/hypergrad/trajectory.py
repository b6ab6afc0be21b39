"""``hg.unroll``: K differentiable optimizer steps, and the ``Trajectory`` they leave."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hypergrad._boundary import entered
from hypergrad._clients import Clients, across_ranks, problem_of
from hypergrad._engine.compile import Compile
from hypergrad._front import Trajectory, set_up, trajectory
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree

__all__ = ["Trajectory", "unroll"]


def unroll(
    inner_loss: Callable[..., Any],
    params: PyTree,
    opt: Optimizer,
    batches: Any,
    *,
    aux: PyTree = None,
    state: PyTree = None,
    buffers: PyTree = None,
    steps: int | None = None,
    hyperparams: Mapping[str, Any] | None = None,
    seed: int | None = None,
    progress: bool = False,
    inner_grad: str = "auto",
    check_finite: bool = True,
    compile: bool | str | Compile = False,
    clients: Clients | None = None,
    process_group: Any = None,
) -> Trajectory:
    """Run K differentiable optimizer steps of ``inner_loss`` and return the ``Trajectory``.

    The steps are recorded by autograd whenever an input requires grad (``params``, ``aux``, a
    tensor hyperparameter), so ``torch.autograd.grad`` of anything computed from the result
    flows back through all K steps. For a hypergradient with a choice of method (checkpointing,
    truncation, forward mode), use [`hg.hypergrad`][hypergrad.hypergrad]. Inputs are never modified:
    the losses get copies of them (params, aux, state, buffers, each step's batch), so even an
    in-place change inside a loss leaves your tensors as they were.

    Args:
        inner_loss: ``inner_loss(params, aux, batch) -> scalar``; when ``buffers`` is given it is
            called as ``inner_loss(params, aux, batch, buffers)`` and must return
            ``(loss, new_buffers)`` (e.g. BatchNorm running statistics).
        params: the initial parameters (a pytree, e.g. from ``hg.split(model)``).
        opt: a functional optimizer, e.g. ``hg.optim.sgd(lr=0.1)``.
        batches: a tensor / tuple / dict of tensors with a leading step dimension, an iterable
            of batches (consumed lazily), a function ``batch_fn(k)``, or ``None`` with
            ``steps=K``: ``inner_loss`` then receives ``None`` as its batch at every step (the
            data lives in ``aux``, as in dataset distillation).
        aux: a pytree passed unchanged to ``inner_loss`` at every step.
        state: the initial optimizer state; default ``opt.init(params, hyperparams=...)``.
        buffers: the initial buffers; ``None`` when nothing is carried. torch updates
            BatchNorm's running statistics without autograd, so every method treats them as
            constants: no hypergradient flows through them (an outer loss in eval mode sees
            them, but not their dependence on ``aux``). Buffers computed with differentiable
            ops (a functional moving average) are differentiated like the params.
        steps: K; default: the number of stacked batches, or ``len(batches)``.
        hyperparams: replaces ``opt.hyperparams`` (same keys); tensors here are differentiable.
            Or a function ``fn(aux) -> dict`` of them, called once with (a copy of) ``aux``,
            its graph kept: the steps are then differentiable with respect to ``aux`` through
            them too (see [`hg.hypergrad`][hypergrad.hypergrad]).
        seed: base seed; step ``k`` runs with ``torch.manual_seed(seed + k)`` inside
            ``torch.random.fork_rng`` (and the outer loss of [`hg.hypergrad`][hypergrad.hypergrad]
            with ``seed + K``). Default: one draw from the global generator.
        progress: show a tqdm progress bar.
        inner_grad: how the step takes the inner gradient: ``"auto"``, ``"func"`` or
            ``"autograd"`` (same numbers; see the methods concepts page).
        check_finite: after the loop, check (one device sync) that the losses and final params
            are finite; if not, replay to find the step and key and raise.
        compile: ``True`` compiles the steps with ``torch.compile`` (eager fallback with one
            ``hg.CompileFallbackWarning``), ``"strict"`` raises ``hg.CompileError`` instead,
            ``hg.Compile(...)`` sets the options; see [`hg.Compile`][hypergrad.Compile]. A
            compiled trajectory supports one backward pass (no ``create_graph``).
        clients: ``hg.Clients(...)`` runs C stacked client models at once (vmapped), in
            federated rounds: see [`hg.Clients`][hypergrad.Clients]. ``params`` then holds the
            clients' stacked params and the result their stacked values after the last local
            step (not aggregated), with ``losses`` of shape ``(rounds * K, C)``.
        process_group: a ``torch.distributed`` process group for one model, data parallel, as
            in [`hg.hypergrad`][hypergrad.hypergrad]: every rank passes the same params and its
            own shard of every batch, and gets the trajectory (and ``losses``, the global
            batch's) of one process holding the whole batches. To differentiate the result
            yourself, backpropagate the same outer loss on every rank: each rank then gets
            the whole gradient with respect to ``params`` and the hyperparameters, but only
            its share of the part of ``aux``'s that flows through the steps (sum that over the
            ranks). [`hg.hypergrad`][hypergrad.hypergrad] does all of this for you.

    Returns:
        A [`Trajectory`][hypergrad.trajectory.Trajectory] ``(params, state, buffers, losses)`` with
        ``losses`` of shape ``(K,)``.

    Raises:
        TypeError: ``opt`` is not a hypergrad optimizer, or ``params`` not a tree of
            floating-point tensors.
        ValueError: a non-scalar inner loss, batches that run out before ``steps`` (or hold no
            step), a hyperparameter out of range, or a ``state`` built for other params.
        RuntimeError: ``inner_loss`` changes in place a tensor autograd needs (names the op).
        FloatingPointError: a nan/inf loss or update (names the step and the key path).

    Warns:
        UserWarning: ``inner_loss`` does not depend on params (it calls ``model(x)`` instead of
            ``hg.call(model, params, x)``); seen where the inner gradient is taken with
            autograd (the default, eager).

    Examples:
        >>> loss = lambda p, aux, x: ((p["w"] - x) ** 2).sum()
        >>> traj = hg.unroll(loss, {"w": torch.tensor([0.0])}, hg.optim.sgd(lr=0.25), torch.ones(3, 1))
        >>> traj.params["w"], traj.losses
        (tensor([0.8750]), tensor([1.0000, 0.2500, 0.0625]))
    """
    with entered("hg.unroll"), across_ranks(clients, process_group):
        setup = set_up(**locals())  # every argument, by name: the front door checks them all
        return trajectory(setup, problem_of(setup)[0])

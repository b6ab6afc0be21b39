"""``hg.hypergrad``: one entry point over every method, and the ``Hypergradient`` it returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hypergrad._boundary import entered
from hypergrad._clients import Clients, across_ranks, problem_of
from hypergrad._engine.compile import Compile
from hypergrad._engine.hyper import map_hyper
from hypergrad._front import Hypergradient, differentiate, set_up
from hypergrad.methods import Method
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree

__all__ = ["Hypergradient", "hypergrad", "map_hyper"]


def hypergrad(
    outer_loss: Callable[..., Any],
    inner_loss: Callable[..., Any],
    params: PyTree,
    opt: Optimizer,
    batches: Any,
    outer_batch: Any,
    *,
    aux: PyTree = None,
    method: str | Method = "reverse",
    wrt: str | Sequence[str] = ("aux",),
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
) -> Hypergradient:
    """The gradient of ``outer_loss(params_K, aux, outer_batch)`` through K optimizer steps.

    ``params_K`` is the result of K steps of ``opt`` on ``inner_loss`` from ``params`` (as
    [`hg.unroll`][hypergrad.unroll]). The gradient is taken with respect to what ``wrt`` names:
    ``"aux"``, ``"params"`` (the initial params, as MAML), ``"hyperparams"`` (all of the
    optimizer's numbers), or single hyperparameter names such as ``"lr"``, ``"weight_decay"``,
    ``"betas"``. A float hyperparameter is differentiated as a 0-d tensor of the params' dtype;
    a per-parameter dict or per-element tensor gets a gradient of the same shape. The caller's
    tensors, optimizer and modules are never modified.

    Methods (see each class for its cost formula): ``"reverse"`` (exact, memory O(K)),
    ``hg.Truncated(T)`` (last T steps only, biased), ``hg.Checkpointed(S)`` (exact, memory
    O(K/S + S)), ``"forward"`` / ``hg.Forward(chunk_size)`` (exact, memory independent of K,
    one pass per differentiated scalar), ``"first_order"`` (no second-order terms, biased) and
    ``hg.Implicit(solver)`` / ``"implicit"`` (the implicit function theorem at the trained
    params: plain training plus a linear solve, exact at a stationary point of the inner loss).

    Args:
        outer_loss: ``outer_loss(params, aux, outer_batch) -> scalar``; with ``buffers`` it is
            called as ``outer_loss(params, aux, outer_batch, buffers)``.
        inner_loss: ``inner_loss(params, aux, batch) -> scalar``; with ``buffers`` it is called
            as ``inner_loss(params, aux, batch, buffers)`` and returns ``(loss, new_buffers)``.
        params: the initial parameters.
        opt: the functional optimizer.
        batches: the inner batches (as [`hg.unroll`][hypergrad.unroll]); ``None`` with
            ``steps=K`` when the inner loss needs none (its batch is ``None``: the data lives
            in ``aux``, as in dataset distillation).
        outer_batch: passed unchanged to ``outer_loss``.
        aux: the auxiliary pytree (floating-point tensors when differentiated).
        method: one of the methods above.
        wrt: what to differentiate (a name or a tuple of names).
        state: the initial optimizer state; default ``opt.init(params, hyperparams=...)``.
        buffers: the initial buffers (``None``: none carried). Without them, a model with
            BatchNorm that the outer loss runs in eval mode (``hg.call(model, params, x)``)
            normalises with the *module's own* running statistics, the ones it had before the
            unroll, not statistics of the K steps: carry them (``buffers=``, an
            ``inner_loss`` that returns ``(loss, new_buffers)`` and an ``outer_loss`` that
            takes them) to evaluate with the trained ones.
        steps: K; default: the number of stacked batches or ``len(batches)``.
        hyperparams: replacements for some of ``opt.hyperparams``, or a function
            ``fn(aux) -> dict`` of them: the hyperparameters are then computed from ``aux`` in
            the call (tied or log-parametrised rates, a schedule's parameters, a small
            network's output kept in ``aux``), and ``g.aux`` includes their effect, chained
            through ``fn`` (the method differentiates the computed values; forward mode pushes
            one direction per scalar of them too; ``hg.Implicit`` only those that move the
            fixed point). ``fn`` gets ``aux`` alone, not the step: a hyperparameter holds one
            value for the K steps. ``wrt`` naming a computed hyperparameter reports, in
            ``g.hyperparams``, the gradient with respect to the value ``fn`` returned. Tensor
            values are range-checked once per call (a negative learning rate is refused).
        seed: base seed for the random numbers (default: one draw from the global
            generator): step ``k`` runs with ``torch.manual_seed(seed + k)``, and the outer
            loss with ``seed + K`` (its dropout masks differ from every step's). Every method
            sees the same random numbers at step k.
        progress: show a tqdm progress bar (needs tqdm).
        inner_grad: ``"auto"``, ``"func"`` or ``"autograd"`` (as [`hg.unroll`][hypergrad.unroll]);
            forward mode always uses ``"func"``.
        check_finite: check once, at the end (one device sync), that the losses, the outer
            value and the hypergradient are finite; if not, replay the unroll step by step to
            name the first step and key path that went nan/inf, and raise.
        compile: compile the steps with ``torch.compile``, as [`hg.unroll`][hypergrad.unroll]:
            ``"reverse"``, ``Truncated``, ``Checkpointed`` and ``"first_order"`` run compiled;
            ``"forward"`` runs eagerly with one ``hg.CompileFallbackWarning``.
        clients: ``hg.Clients(...)`` differentiates C stacked client models trained at once
            (vmapped), in federated rounds; ``outer_loss`` then receives the aggregate of their
            final params. See [`hg.Clients`][hypergrad.Clients].
        process_group: a ``torch.distributed`` process group for one model, data parallel (with
            ``clients=``, pass it to ``hg.Clients`` instead): every rank passes the same
            ``params``, ``state``, ``aux`` and hyperparameters, and its own shard of every inner
            batch and of ``outer_batch``. The losses are taken to be means over the rank's
            shard; the global loss is the mean over every rank's examples, so a rank's share is
            weighted by its number of examples (the leading dimension of its batch's first
            tensor, the same at every step; a batch without tensors counts as one). Each step's
            inner gradient is all-reduced, differentiably, and every rank returns what one
            process holding the whole batches returns, for every method. Buffers stay each
            rank's own (as with ``DistributedDataParallel``). See the concepts page "Many
            processes".

    Returns:
        ``Hypergradient(value, aux, hyperparams, params, solver, trajectory)``: the outer
        loss, the gradients asked for (``None`` where not asked; ``params`` is the gradient
        with respect to the *initial* params), ``hg.Implicit``'s report (else ``None``), and
        the [`Trajectory`][hypergrad.trajectory.Trajectory] of the K steps, equal to
        [`hg.unroll`][hypergrad.unroll]'s: the params, optimizer state and buffers after the
        last step, from which training may continue without a second unroll.

    Raises:
        ValueError: bad ``wrt``, a non-scalar loss, batches that run out (or hold no step), a
            hyperparameter out of range, an optimizer state built for other params, or a method
            that cannot do what was asked (``Truncated(T < K)`` with ``wrt="params"``).
        RuntimeError: a loss changes in place a tensor autograd needs (names the op).
        TypeError: a differentiated leaf that is not a floating-point tensor.
        FloatingPointError: a nan/inf loss, update or hypergradient (names step and key).

    Warns:
        UserWarning: an ``aux`` leaf does not affect the outer loss (its hypergradient is
            identically zero); reverse-mode methods only. Or ``inner_loss`` does not depend on
            params at all (it calls ``model(x)`` instead of ``hg.call(model, params, x)``);
            seen where the inner gradient is taken with autograd (the default, eager).
        hg.CompileFallbackWarning: ``compile=True`` ran the step eagerly (names the cause).
        hg.ImplicitWarning: with ``hg.Implicit``, the trained params are far from stationary
            or the linear solver did not converge (gives the numbers).

    Examples:
        The gradient of a validation loss after 3 SGD steps with respect to a per-example
        weighting of the training loss (``aux``) and the learning rate:

        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x, y = torch.randn(3, 4, 2), torch.randn(3, 4)  # 3 steps, batches of 4
        >>> def inner(p, weights, batch):
        ...     xb, yb = batch
        ...     return (weights * (xb @ p["w"] - yb) ** 2).mean()
        >>> def outer(p, weights, val):
        ...     return ((val[0] @ p["w"] - val[1]) ** 2).mean()
        >>> g = hg.hypergrad(outer, inner, {"w": torch.zeros(2)}, hg.optim.sgd(lr=0.1),
        ...     (x, y), (x[0], y[0]), aux=torch.ones(4), wrt=("aux", "lr"))
        >>> g.aux.shape, g.hyperparams["lr"].shape, g.params is None
        (torch.Size([4]), torch.Size([]), True)
        >>> g.trajectory.params["w"].shape  # the params after the 3 steps: continue from here
        torch.Size([2])

        The learning rate as a function of ``aux`` (learned as a log), no batches (the data
        of the inner loss lives in ``aux``):

        >>> def inner_fit(p, a, batch):  # batch is None
        ...     return ((a["x"] @ p["w"] - a["y"]) ** 2).mean()
        >>> aux = {"x": x[0], "y": y[0], "log_lr": torch.tensor(-2.0)}
        >>> g = hg.hypergrad(outer, inner_fit, {"w": torch.zeros(2)}, hg.optim.sgd(lr=0.1),
        ...     None, (x[1], y[1]), steps=5, aux=aux,
        ...     hyperparams=lambda a: {"lr": a["log_lr"].exp()})
        >>> g.aux["log_lr"].shape, g.trajectory.losses.shape
        (torch.Size([]), torch.Size([5]))
    """
    with entered("hg.hypergrad"), across_ranks(clients, process_group):
        setup = set_up(**locals())  # every argument, by name: the front door checks them all
        return differentiate(setup, *problem_of(setup))

"""Reverse mode over many clients, one chunk of clients at a time (``hg.clients`` with chunk_size).

Within a federated round the clients are independent: client ``c``'s final params depend on its
own start, data and hyperparameters, and on the shared ``aux``. So the reverse-mode graph of a
round need not hold every client at once. ``by_chunks`` differentiates in two passes:

1. **Forward, no graph.** Each round runs chunk by chunk; the clients' final params (and
   buffers) of every round are kept, ``O(R * C * P)``, and aggregated into the next round's
   start. The outer loss is evaluated on the last aggregate and differentiated with respect to
   the clients' final params (its cotangent) and ``aux``.
2. **Backward, chunk by chunk.** From the last round to the first, each chunk's round is run
   again as a small problem of its own (``hypergrad.unroll.Problem``, one round of
   ``chunk_size`` clients) whose outer loss is the dot product of its final params with their
   cotangent, and the user's method (``"reverse"``, ``hg.Truncated``, ``hg.Checkpointed``,
   ``"first_order"``) differentiates it. That yields the chunk's share of the gradient with
   respect to ``aux`` and the hyperparameters, and the cotangent of the round's start, which
   flows back through the aggregation into the previous round's final params.

Memory is the graph of one chunk's round, ``O(chunk_size * K * A)``, plus the kept params: it no
longer grows with C beyond the params themselves. Time is one more forward pass of the clients,
and the vectorised calls are smaller (2.0-2.4x the unchunked time for 128 clients in chunks of
32 in ``benchmarks/clients.py``). Each chunk draws its own random numbers: step ``k`` (counted
over all rounds) of chunk ``j`` runs with seed
``seed + k + j * (R * K + 1)`` under ``randomness="different"`` (so clients in different chunks
do not share noise), and ``seed + k`` otherwise; both passes see the same numbers.

Buffers are carried through the rounds as values, not differentiated: a buffer that depends
differentiably on the params (a moving average of the weights, say) raises an error naming the
fix. BatchNorm's running statistics never do.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optree
import torch

from hypergrad import tree as _tree
from hypergrad.methods import Checkpointed, FirstOrder, Method, MethodResult, Reverse, Truncated
from hypergrad.methods._base import fresh_leaves, grad_or_none
from hypergrad.tree import PyTree
from hypergrad.unroll import Carry, Problem, requires_grad, run_steps, seeded

__all__ = ["Federation", "by_chunks", "chunkable"]

#: The methods that ``by_chunks`` runs per chunk (reverse mode and its variants).
_CHUNKABLE = (Reverse, Truncated, Checkpointed, FirstOrder)


class Federation(NamedTuple):
    """What ``by_chunks`` needs of a clients problem besides the whole ``Problem``.

    Attributes:
        problem: the whole problem (every client at once); its seed, targets, hyperparameters
            and ``aux`` are the ones differentiated.
        step: the vmapped step, for any number of clients.
        multi: its compiled multi-step (several steps per call), or ``None``.
        init: ``init(params, hyperparams)``, a fresh stacked optimizer state.
        start: ``start() -> Carry``, round 0's stacked start (shared inputs broadcast to C).
        aggregate: ``aggregate(stacked_tree) -> tree``, the server of a round.
        server_outer: ``server_outer(params, buffers, aux)`` on the clients' stacked finals.
        batch_at: ``batch_at(k)``, step ``k``'s client-stacked batch.
        clients: C.
        steps: K, local steps per round.
        rounds: R.
        dims: the resolved ``in_dims`` (``hyperparams`` as a dict per name).
        randomness: vmap's ``randomness``.
    """

    problem: Problem
    step: Callable[..., Any]
    multi: Any
    init: Callable[[PyTree, Mapping[str, Any]], PyTree]
    start: Callable[[], Carry]
    aggregate: Callable[[PyTree], PyTree]
    server_outer: Callable[[PyTree, PyTree, PyTree], torch.Tensor]
    batch_at: Callable[[int], Any]
    clients: int
    steps: int
    rounds: int
    dims: dict
    randomness: str


def chunkable(method: Method) -> bool:
    """Whether ``by_chunks`` can run ``method`` (the reverse-mode family, not forward).

    Examples:
        >>> chunkable(hg.Checkpointed(2)), chunkable(hg.Forward(1))
        (True, False)
    """
    return type(method) in _CHUNKABLE


# --------------------------------------------------------------------------------------------
# Slicing trees along the client dimension, and joining the chunks' gradients


def _leaf_dims(dims: Any, tree: PyTree) -> tuple[list[Any], list[Any], Any]:
    """The leaves of ``tree`` (``None`` included), each one's client dim, and the tree spec."""
    flat, spec = optree.tree_flatten(tree, none_is_leaf=True, namespace=_tree._NAMESPACE)
    if dims is None or isinstance(dims, int):
        return [dims] * len(flat), flat, spec
    full = optree.tree_broadcast_prefix(dims, tree, none_is_leaf=True, namespace=_tree._NAMESPACE)
    return optree.tree_leaves(full, none_is_leaf=True, namespace=_tree._NAMESPACE), flat, spec


def take(tree: PyTree, dims: Any, rows: slice) -> PyTree:
    """The clients ``rows`` of ``tree``: the leaves with client dim 0 sliced, the others kept.

    Examples:
        >>> take({"w": torch.arange(4.0), "s": torch.ones(2)}, {"w": 0, "s": None}, slice(1, 3))
        {'w': tensor([1., 2.]), 's': tensor([1., 1.])}
    """
    if tree is None:
        return None
    ds, flat, spec = _leaf_dims(dims, tree)
    return optree.tree_unflatten(
        spec, [x[rows] if d == 0 and isinstance(x, torch.Tensor) else x for x, d in zip(flat, ds)]
    )


def join(parts: list[PyTree], dims: Any) -> PyTree:
    """Join the chunks' gradients: concatenated where the input has a client dim, else summed.

    Examples:
        >>> join([{"w": torch.ones(2), "s": torch.ones(1)}] * 2, {"w": 0, "s": None})
        {'w': tensor([1., 1., 1., 1.]), 's': tensor([2.])}
    """
    ds, _, spec = _leaf_dims(dims, parts[0])
    columns = zip(
        *(optree.tree_leaves(p, none_is_leaf=True, namespace=_tree._NAMESPACE) for p in parts)
    )
    out = []
    for column, d in zip(columns, ds):
        if column[0] is None:
            out.append(None)
        elif d == 0:
            out.append(torch.cat(column))
        else:
            out.append(functools.reduce(operator.add, column))
    return optree.tree_unflatten(spec, out)


def _cat(trees: list[PyTree]) -> PyTree:
    """Concatenate stacked trees along the client dimension (non-tensor leaves from the first)."""
    if trees[0] is None:
        return None
    return optree.tree_map(
        lambda *xs: torch.cat(xs) if isinstance(xs[0], torch.Tensor) else xs[0],
        *trees,
        none_is_leaf=True,
        namespace=_tree._NAMESPACE,
    )


# --------------------------------------------------------------------------------------------
# Which method runs on each round


def _round_methods(how: Method, rounds: int, steps: int) -> list[tuple[Method | None, bool]]:
    """Per round: the method for its chunk problems (``None``: not differentiated) and whether
    the gradient flows on into the round's start.

    ``hg.Truncated(T)`` differentiates the last T steps over all rounds: earlier rounds are
    skipped, the round holding step ``R*K - T`` is truncated inside, and no gradient reaches
    what came before it.
    """
    if not isinstance(how, Truncated):
        return [(how, True)] * rounds
    first = rounds * steps - how.steps  # the first differentiated step
    if first <= 0:  # every step: reverse mode
        return [(Reverse(), True)] * rounds
    plan: list[tuple[Method | None, bool]] = []
    for r in range(rounds):
        low, high = r * steps, (r + 1) * steps
        if high <= first:
            plan.append((None, False))
        elif low >= first:
            plan.append((Reverse(), low > first))
        else:
            plan.append((Truncated(high - first), False))
    return plan


# --------------------------------------------------------------------------------------------
# The two passes


def _dot_outer(cotangent: list[torch.Tensor | None], caller: str) -> Callable[..., torch.Tensor]:
    """The outer loss of a chunk problem: its final params dotted with their cotangent."""

    def outer(params: PyTree, buffers: PyTree, aux: PyTree) -> torch.Tensor:
        if requires_grad(buffers):
            raise ValueError(
                f"{caller}: with chunk_size, buffers are carried as values, but these buffers "
                "depend differentiably on the params (e.g. a moving average of the weights), "
                "so their gradient would be lost. Pass chunk_size=None, or compute those "
                "buffers without a graph (under torch.no_grad())."
            )
        terms = [(x * g).sum() for x, g in zip(_tree.leaves(params), cotangent) if g is not None]
        if not terms:
            return torch.zeros(())
        return functools.reduce(operator.add, terms)

    return outer


def by_chunks(fed: Federation, how: Method, chunk_size: int, *, caller: str) -> MethodResult:
    """Differentiate a clients problem with ``how``, ``chunk_size`` clients at a time.

    The result equals ``how`` on the whole problem (to rounding; with ``randomness="different"``
    the chunks draw their own random numbers, see the module docstring).

    Examples:
        ``hg.clients.hypergrad`` calls it when ``chunk_size`` is below the number of clients:

        >>> inner = lambda p, a, t: ((p["w"] - t - a) ** 2).sum()
        >>> outer = lambda server, a, t: ((server["w"] - t) ** 2).sum()
        >>> targets = torch.arange(4.0).view(1, 4, 1).expand(5, 4, 1)  # 5 steps, 4 clients
        >>> args = (outer, inner, {"w": torch.zeros(1)}, hg.optim.sgd(lr=0.1), targets,
        ...         torch.tensor([1.0]))
        >>> kwargs = dict(aux=torch.tensor([0.5]), in_dims={"params": None})
        >>> whole = hg.clients.hypergrad(*args, **kwargs)
        >>> by_two = hg.clients.hypergrad(*args, **kwargs, chunk_size=2)
        >>> torch.allclose(whole.aux, by_two.aux)
        True
    """
    problem, K, R, C = fed.problem, fed.steps, fed.rounds, fed.clients
    dims = fed.dims
    chunks = [slice(lo, min(lo + chunk_size, C)) for lo in range(0, C, chunk_size)]
    multi = fed.multi
    hp_names = problem.hyper_names

    def chunk_seed(r: int, j: int) -> int:
        offset = j * (R * K + 1) if fed.randomness == "different" else 0
        return problem.seed + r * K + offset

    def chunk_problem(r: int, j: int, start: Carry, **changes: Any) -> Problem:
        """Round ``r`` of chunk ``j`` as a problem of its own, from the stacked ``start``."""
        rows = chunks[j]
        whole = Problem(
            step=fed.step,
            outer=problem.outer,
            params=start.params,
            state=start.state,
            buffers=start.buffers,
            aux=take(problem.aux, dims["aux"], rows),
            hyperparams={
                n: take(v, dims["hyperparams"].get(n), rows) for n, v in problem.hyperparams.items()
            },
            batch_at=lambda k: take(fed.batch_at(r * K + k), dims["batches"], rows),
            steps=K,
            seed=chunk_seed(r, j),
            targets=(),
            hyper_names=hp_names,
            devices=problem.devices,
            init=fed.init,
            multi=multi,
        )
        return dataclasses.replace(whole, **changes)

    # Pass 1: every round, chunk by chunk, without a graph. Keep each round's start (stacked,
    # or the server broadcast to C) and the clients' final params and buffers.
    starts = [fed.start()]
    finals: list[Carry] = []
    losses: list[list[torch.Tensor]] = [[] for _ in range(R * K)]
    with torch.no_grad():
        for r in range(R):
            ends = []
            for j, rows in enumerate(chunks):
                sub = chunk_problem(r, j, _rows(starts[r], rows))
                carry, aux, hp = sub.bind({})
                carry, chunk_losses = run_steps(sub, carry, aux, hp, 0, K)
                ends.append(carry)
                for k, loss in enumerate(chunk_losses):
                    losses[r * K + k].append(loss)
            params, buffers = _cat([c.params for c in ends]), _cat([c.buffers for c in ends])
            finals.append(Carry(params, None, buffers))
            server_b = None if buffers is None else _broadcast(fed.aggregate(buffers), C)
            starts.append(Carry(_broadcast(fed.aggregate(params), C), None, server_b))

    # The outer loss on the last aggregate: its value, its cotangent on the clients' finals,
    # and its direct gradient with respect to aux (where aux enters outer_loss).
    inputs = problem.inputs()
    last, _, final_leaves = fresh_leaves(finals[-1].params)
    aux_in, _, aux_leaves = fresh_leaves(problem.aux) if "aux" in inputs else (problem.aux, [], [])
    with torch.enable_grad(), seeded(problem.seed + problem.steps, problem.devices):
        value = fed.server_outer(last, finals[-1].buffers, aux_in)
    grads = grad_or_none([value], final_leaves + aux_leaves)
    cotangent, direct = grads[: len(final_leaves)], grads[len(final_leaves) :]
    used = {p for (p, _), g in zip(_paths({"aux": problem.aux}), direct) if g is not None}

    # Pass 2: the rounds backwards, each chunk's round differentiated by the user's method.
    targets = tuple(t for t in ("aux", "hyperparams") if t in inputs)
    dims_of = {"aux": dims["aux"], "hyperparams": {n: dims["hyperparams"][n] for n in hp_names}}
    per_round: dict[str, list[PyTree]] = {key: [] for key in targets}  # a joined tree a round
    initial: PyTree = None  # the gradient with respect to round 0's (stacked) start params
    for r, (method, onward) in reversed(list(enumerate(_round_methods(how, R, K)))):
        if method is None:
            break
        to_start = onward and (r > 0 or "params" in inputs)
        parts: dict[str, list[PyTree]] = {key: [] for key in (*targets, "params")}
        for j, rows in enumerate(chunks):
            sub = chunk_problem(
                r,
                j,
                _rows(starts[r], rows),
                outer=_dot_outer([None if g is None else g[rows] for g in cotangent], caller),
                targets=(*targets, "params") if to_start else targets,
            )
            result = method(sub)
            every = {p for p, _ in _paths(sub.inputs()) if r == 0 or "['params']" not in p}
            used |= every - set(result.unused)
            for key in result.grads:
                parts[key].append(result.grads[key])
        for key in targets:
            per_round[key].append(join(parts[key], dims_of[key]))
        if not to_start:
            break
        start = join(parts["params"], 0)
        if r == 0:
            initial = start
            break
        # Round r started from broadcast(aggregate(finals[r - 1])): back through both.
        previous, _, leaves = fresh_leaves(finals[r - 1].params)
        with torch.enable_grad():
            server = _tree.leaves(fed.aggregate(previous))
        cotangent = grad_or_none(server, leaves, [g.sum(0) for g in _tree.leaves(start)])

    out: dict[str, PyTree] = {}
    for key in targets:  # every round's share holds every client: summed
        out[key] = _fill(join(per_round[key], None) if per_round[key] else None, inputs[key])
    if direct:
        flat, spec = optree.tree_flatten(out["aux"], namespace=_tree._NAMESPACE)
        out["aux"] = optree.tree_unflatten(
            spec, [x if g is None else x + g for x, g in zip(flat, direct)]
        )
    if "params" in inputs:
        if initial is not None and dims["params"] is None:  # one tree for every client
            initial = _tree.map(lambda g: g.sum(0), initial)
        out["params"] = _fill(initial, inputs["params"])
    unused = tuple(p for p, _ in _paths(inputs) if p not in used)
    stacked = torch.stack([torch.cat(step) for step in losses])
    return MethodResult(value.detach(), out, stacked, unused)


def _rows(carry: Carry, rows: slice) -> Carry:
    """The clients ``rows`` of a stacked carry (a ``None`` state: a fresh one from init)."""
    return Carry(*(take(tree, 0, rows) for tree in carry))


def _broadcast(tree: PyTree, clients: int) -> PyTree:
    return _tree.map(lambda x: x.expand(clients, *x.shape), tree)


def _paths(tree: PyTree) -> list[tuple[str, Any]]:
    paths, flat, _ = optree.tree_flatten_with_path(tree, namespace=_tree._NAMESPACE)
    return [(_tree.keystr(p), x) for p, x in zip(paths, flat)]


def _fill(grads: PyTree, like: PyTree) -> PyTree:
    """``grads`` with zeros where it is missing (``None``) or wholly absent."""
    if grads is None:
        return _tree.map(torch.zeros_like, like)
    flat_like, spec = optree.tree_flatten(like, namespace=_tree._NAMESPACE)
    flat = optree.tree_leaves(grads, none_is_leaf=True, namespace=_tree._NAMESPACE)
    return optree.tree_unflatten(
        spec, [torch.zeros_like(x) if g is None else g for x, g in zip(flat_like, flat)]
    )

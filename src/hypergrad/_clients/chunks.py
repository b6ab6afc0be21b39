"""Reverse mode over many clients, one chunk of clients at a time (``chunk_size``).

Within a federated round the clients are independent, so the reverse-mode graph of a round need
not hold every client at once. ``ByChunks`` runs the clients forward without a graph, keeping
every round's final params (``O(R * C * P)``); takes the outer loss's cotangent on the last
round's finals; then, from the last round to the first, runs each chunk's round again as a
problem of its own whose outer loss is its final params dotted with their cotangent, and lets
the user's method (any ``Method.reverse_mode`` one, restricted to the round with
``Method.restricted``) differentiate it. Memory is one chunk's graph, ``O(chunk_size * K * A)``,
plus the kept params; time, one more forward pass. Under ``randomness="different"`` step ``k``
of chunk ``j`` runs with seed ``seed + k + j * (R * K + 1)``, so chunks draw their own numbers.
Buffers are carried between rounds as values: one that depends differentiably on the params
raises an error naming the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad._clients.aggregation import broadcast
from hypergrad._clients.dims import leaf_dims
from hypergrad._clients.federation import Federation
from hypergrad._clients.ranks import sum_shared
from hypergrad._engine.problem import Carry, Problem, run_steps
from hypergrad._engine.randomness import seeded
from hypergrad._engine.step import requires_grad
from hypergrad.methods import Method, MethodResult
from hypergrad.methods._base import fresh_leaves, grad_or_none
from hypergrad.tree import PyTree

__all__ = ["ByChunks", "join", "take"]


def take(tree: PyTree, dims: Any, rows: slice) -> PyTree:
    """The clients ``rows`` of ``tree``: the leaves with client dim 0 sliced, the others kept.

    Examples:
        >>> take({"w": torch.arange(4.0), "s": torch.ones(2)}, {"w": 0, "s": None}, slice(1, 3))
        {'w': tensor([1., 2.]), 's': tensor([1., 1.])}
    """
    if tree is None:
        return None
    ds, flat, spec = leaf_dims(dims, tree)
    return optree.tree_unflatten(
        spec, [x[rows] if d == 0 and isinstance(x, torch.Tensor) else x for x, d in zip(flat, ds)]
    )


def join(parts: list[PyTree], dims: Any) -> PyTree:
    """Join the chunks' gradients: concatenated where the input has a client dim, else summed.

    Examples:
        >>> join([{"w": torch.ones(2), "s": torch.ones(1)}] * 2, {"w": 0, "s": None})
        {'w': tensor([1., 1., 1., 1.]), 's': tensor([2.])}
    """
    ds, _, spec = leaf_dims(dims, parts[0])
    columns = zip(
        *(optree.tree_leaves(p, none_is_leaf=True, namespace=_tree._NAMESPACE) for p in parts)
    )
    out: list[torch.Tensor | None] = []
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
    return optree.tree_map(  # a 0-d leaf (a shared step count) is the same in every chunk
        lambda *xs: torch.cat(xs) if isinstance(xs[0], torch.Tensor) and xs[0].dim() else xs[0],
        *trees,
        none_is_leaf=True,
        namespace=_tree._NAMESPACE,
    )


def _dot_outer(cotangent: list[torch.Tensor | None]) -> Callable[..., torch.Tensor]:
    """The outer loss of a chunk problem: its final params dotted with their cotangent."""

    def outer(params: PyTree, buffers: PyTree, aux: PyTree) -> torch.Tensor:
        if requires_grad(buffers):
            raise ValueError(
                f"{caller()}: with chunk_size, buffers are carried as values, but these buffers "
                "depend differentiably on the params (e.g. a moving average of the weights), "
                "so their gradient would be lost. Pass chunk_size=None, or compute those "
                "buffers without a graph (under torch.no_grad())."
            )
        terms = [(x * g).sum() for x, g in zip(_tree.leaves(params), cotangent) if g is not None]
        if not terms:
            return torch.zeros(())
        return functools.reduce(operator.add, terms)

    return outer


@dataclasses.dataclass
class _Backward:
    """What the backward pass accumulates, round by round from the last."""

    cotangent: list[torch.Tensor | None]  # of the current round's final params
    per_round: dict[str, list[PyTree]]  # each round's joined gradient, per target
    used: set[str]  # key paths with a gradient somewhere
    initial: PyTree = None  # the gradient with respect to round 0's (stacked) start params


class ByChunks:
    """Differentiate a federation with its method, ``chunk_size`` clients at a time.

    The result equals the method on the whole problem (to rounding; with
    ``randomness="different"`` the chunks draw their own random numbers, see the module
    docstring). It is what ``hg.clients.hypergrad`` runs when ``chunk_size`` is below the number
    of clients and the method is reverse-mode.

    Examples:
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

    def __init__(self, fed: Federation) -> None:
        assert fed.setup.method is not None
        self.fed, self.how, size = fed, fed.setup.method, fed.clients.chunk_size or fed.count
        self.chunks = [slice(lo, min(lo + size, fed.count)) for lo in range(0, fed.count, size)]

    def evaluations(self, problem: Problem) -> int:
        """Steps run: the forward pass, then the method's evaluations of every chunk's rounds."""
        return len(self.chunks) * (problem.steps + self.how.evaluations(problem))

    def _seed(self, problem: Problem, r: int, j: int) -> int:
        fed = self.fed
        offset = j * (fed.rounds * fed.steps + 1) if fed.clients.randomness == "different" else 0
        return problem.seed + r * fed.steps + offset

    def _chunk(self, problem: Problem, r: int, j: int, start: Carry, **changes: Any) -> Problem:
        """Round ``r`` of chunk ``j`` as a problem of its own, from the stacked ``start``."""
        fed, rows = self.fed, self.chunks[j]
        dims, K = fed.dims, fed.steps
        start = Carry(*(take(tree, 0, rows) for tree in start))
        hp = {n: take(v, dims["hyperparams"].get(n), rows) for n, v in problem.hyperparams.items()}
        fields: dict[str, Any] = {"targets": (), **changes}
        return dataclasses.replace(
            problem,
            step=fed.step,
            params=start.params,
            state=start.state,
            buffers=start.buffers,
            aux=take(problem.aux, dims["aux"], rows),
            hyperparams=hp,
            batch_at=lambda k: take(fed.batch_at(r * K + k), dims["batches"], rows),
            steps=K,
            seed=self._seed(problem, r, j),
            init=fed.init,
            multi=fed.multi,
            **fields,
        )

    def _forward(self, problem: Problem) -> tuple[list[Carry], list[Carry], torch.Tensor]:
        """Every round, chunk by chunk, without a graph: each round's start, the clients'
        finals, and the step losses ``(R * K, C)``."""
        fed, C, K = self.fed, self.fed.count, self.fed.steps
        starts, finals = [fed.start()], []
        losses: list[list[torch.Tensor]] = [[] for _ in range(fed.rounds * K)]
        with torch.no_grad():
            for r in range(fed.rounds):
                ends = []
                for j in range(len(self.chunks)):
                    sub = self._chunk(problem, r, j, starts[r])
                    carry, aux, hp = sub.bind({})
                    carry, chunk_losses = run_steps(sub, carry, aux, hp, 0, K)
                    ends.append(carry)
                    for k, loss in enumerate(chunk_losses):
                        losses[r * K + k].append(loss)
                params, buffers = _cat([c.params for c in ends]), _cat([c.buffers for c in ends])
                last = r + 1 == fed.rounds  # its state too: the trajectory's
                finals.append(
                    Carry(params, _cat([c.state for c in ends]) if last else None, buffers)
                )
                if r + 1 == fed.rounds:  # the last server is the outer loss's (in _outer)
                    break
                server_b = None if buffers is None else broadcast(fed.aggregate(buffers), C)
                starts.append(Carry(broadcast(fed.aggregate(params), C), None, server_b))
        return starts, finals, torch.stack([torch.cat(step) for step in losses])

    def _outer(self, problem: Problem, last: Carry) -> tuple[torch.Tensor, _Backward, list]:
        """The outer loss on the last aggregate: its value, its cotangent on the clients'
        finals, and its direct gradient with respect to aux (where aux enters outer_loss)."""
        inputs = problem.inputs()
        finals, _, final_leaves = fresh_leaves(last.params)
        aux, _, aux_leaves = fresh_leaves(problem.aux) if "aux" in inputs else (problem.aux, [], [])
        with torch.enable_grad(), seeded(problem.seed + problem.steps, problem.devices):
            value = self.fed.server_outer(finals, last.buffers, aux)
        grads = grad_or_none([value], final_leaves + aux_leaves)
        cotangent, direct = grads[: len(final_leaves)], grads[len(final_leaves) :]
        used = {p for (p, _), g in zip(_paths({"aux": problem.aux}), direct) if g is not None}
        targets = [t for t in ("aux", "hyperparams") if t in inputs]
        return value, _Backward(cotangent, {t: [] for t in targets}, used), direct

    def _round(
        self, problem: Problem, r: int, start: Carry, method: Method, to_start: bool, acc: _Backward
    ) -> PyTree:
        """Differentiate round ``r`` chunk by chunk; add its shares to ``acc``; return the
        gradient with respect to the round's stacked start params (``None`` if not asked)."""
        targets = tuple(acc.per_round)
        parts: dict[str, list[PyTree]] = {key: [] for key in (*targets, "params")}
        for j, rows in enumerate(self.chunks):
            sub = self._chunk(
                problem, r, j, start,
                outer=_dot_outer([None if g is None else g[rows] for g in acc.cotangent]),
                targets=(*targets, "params") if to_start else targets,
            )  # fmt: skip
            result = method(sub)
            every = {p for p, _ in _paths(sub.inputs()) if r == 0 or "['params']" not in p}
            acc.used |= every - set(result.unused)
            for key in result.grads:
                parts[key].append(result.grads[key])
        dims = self.fed.dims
        of = {
            "aux": dims["aux"],
            "hyperparams": {n: dims["hyperparams"][n] for n in problem.hyper_names},
        }
        for key in targets:
            acc.per_round[key].append(join(parts[key], of[key]))
        return join(parts["params"], 0) if to_start else None

    def _backward(
        self, problem: Problem, starts: list[Carry], finals: list[Carry], acc: _Backward
    ) -> None:
        """The rounds backwards, each chunk's round differentiated by the method."""
        fed, inputs = self.fed, problem.inputs()
        K, total = fed.steps, fed.rounds * fed.steps
        for r in reversed(range(fed.rounds)):
            method, onward = self.how.restricted(r * K, (r + 1) * K, total)
            if method is None:
                return
            to_start = onward and (r > 0 or "params" in inputs)
            start = self._round(problem, r, starts[r], method, to_start, acc)
            if start is None:
                return
            if r == 0:
                acc.initial = start
                return
            # Round r started from broadcast(aggregate(finals[r - 1])): back through both. Over
            # ranks, the server's cotangent sums every rank's clients, and each rank's share
            # receives it whole.
            cotangent = [g.sum(0) for g in _tree.leaves(start)]
            if fed.ranks is not None:
                cotangent = fed.ranks.sum(cotangent)
            previous, _, leaves = fresh_leaves(finals[r - 1].params)
            with torch.enable_grad():
                server = _tree.leaves(fed.share(previous))
            acc.cotangent = grad_or_none(server, leaves, cotangent)

    def __call__(self, problem: Problem) -> MethodResult:
        starts, finals, losses = self._forward(problem)
        value, acc, direct = self._outer(problem, finals[-1])
        self._backward(problem, starts, finals, acc)
        inputs = problem.inputs()
        out: dict[str, PyTree] = {}
        for key, shares in acc.per_round.items():  # every round's share holds every client
            out[key] = _fill(join(shares, None) if shares else None, inputs[key])
        if "params" in inputs:
            initial = acc.initial
            if initial is not None and self.fed.dims["params"] is None:  # one shared tree
                initial = _tree.map(lambda g: g.sum(0), initial)
            out["params"] = _fill(initial, inputs["params"])
        if direct:  # over ranks, divided by their number (counted_once): summed below
            flat, spec = optree.tree_flatten(out["aux"], namespace=_tree._NAMESPACE)
            out["aux"] = optree.tree_unflatten(
                spec, [x if g is None else x + g for x, g in zip(flat, direct)]
            )
        if self.fed.ranks is not None:
            dims = self.fed.dims
            of = {"aux": dims["aux"], "hyperparams": dims["hyperparams"], "params": dims["params"]}
            out = sum_shared(self.fed.ranks, out, of)
        unused = tuple(p for p, _ in _paths(inputs) if p not in acc.used)
        return MethodResult(value.detach(), out, losses, unused, carry=finals[-1])


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

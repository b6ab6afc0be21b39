"""The clients transform: the ``Setup`` of one model's call becomes the problem of C clients.

Like ``torch.func.vmap``, it takes the per-model computation and returns a batched one: the
engine's step, vmapped over the clients' leading dimension (``hypergrad._clients.step``), with
federated rounds around it. At the start of every round after the first the clients are
aggregated into a server model, which is broadcast back to every client, and each client's
optimizer state starts afresh. The outer loss is server-side: it sees the aggregate of the
clients' final params. Any method differentiates the result unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller, entered, positive_int
from hypergrad._clients.aggregation import broadcast, fedavg
from hypergrad._clients.dims import count_clients, resolve_in_dims
from hypergrad._clients.norms import exact_norms
from hypergrad._clients.ranks import (
    Ranks,
    check_process_group,
    counted_once,
    describe,
    fedavg_share,
    same_call,
    sum_ranks,
)
from hypergrad._clients.step import vmapped_step
from hypergrad._clients.tasks import check_outer_batch, each_outer
from hypergrad._clients.vmap import guarded, vmap_trees
from hypergrad._engine.compile import compile_step, step_key
from hypergrad._engine.condition import Condition, make_condition
from hypergrad._engine.problem import Carry, Problem
from hypergrad._engine.randomness import rng_devices
from hypergrad._engine.step import StepFn, multi_step
from hypergrad._front import Setup, no_outer
from hypergrad.tree import PyTree
from hypergrad.tree._base import check_weights

__all__ = ["Clients", "Federation", "federate"]

_RANDOMNESS = ("error", "different", "same")
_OUTER = ("server", "each")


@dataclasses.dataclass(frozen=True)
class Clients:
    """C stacked models trained at once: ``clients=hg.Clients(...)`` in ``hg.unroll``/``hg.hypergrad``.

    Inputs with a leading client dimension ``C`` (stacked, e.g. by [`hg.stack`][hypergrad.stack])
    hold one value per client, and the engine's step runs under ``torch.func.vmap`` over them:
    one vectorised computation, never a Python loop. Each client sees exactly what one model
    sees in [`hg.unroll`][hypergrad.unroll] (its params, its batch, ``aux``); the outer loss of
    [`hg.hypergrad`][hypergrad.hypergrad] is server-side: it receives the aggregate of the final
    client params (with buffers, ``outer_loss(server_params, aux, outer_batch,
    server_buffers)``). Every method works; ``hg.Implicit`` solves every client's stationarity
    condition at its own final params and takes the server's gradient back through the
    aggregation (earlier rounds do not matter at the optimum).
    [`hg.clients.unroll`][hypergrad.clients.unroll] and
    [`hg.clients.hypergrad`][hypergrad.clients.hypergrad] are the same calls with these options
    as keywords.

    Args:
        in_dims: which inputs have a client dimension, as ``torch.func.vmap``'s ``in_dims``
            (``0``: stacked, ``None``: shared): a dict with some of the keys ``"params"``,
            ``"state"``, ``"buffers"``, ``"batches"`` (default ``0``), ``"aux"`` (default
            ``None``; any tree prefix), ``"hyperparams"`` (default ``None``; ``0`` or a dict such
            as ``{"lr": 0}`` for per-client ones, shaped ``(C, ...)``). Stacked batches are
            shaped ``(steps, C, ...)``.
        rounds: R federated rounds of K local steps (the batches hold ``R * K`` steps). Between
            rounds the clients are aggregated into a server model, broadcast back, and their
            optimizer states start afresh.
        aggregate: ``fn(stacked_tree) -> tree``, the server of a round; default
            [`fedavg`][hypergrad.clients.fedavg] with ``weights``.
        weights: FedAvg weights, one per client (e.g. the sample counts).
        chunk_size: clients per chunk. With a reverse-mode method the hypergradient is taken
            one chunk at a time (memory bounded by the chunk, one more forward pass); otherwise
            it is vmap's ``chunk_size``, which bounds each step's working memory.
        randomness: as in ``torch.func.vmap``: ``"error"``, ``"different"`` or ``"same"`` (with
            chunks, each chunk draws its own numbers).
        process_group: a ``torch.distributed`` process group (e.g.
            ``torch.distributed.group.WORLD``): each rank passes only its own clients (stacked,
            any number per rank) and their batches, and makes the same call; aggregation spans
            every rank and every rank returns the result of one process holding all the clients.
            ``weights`` are then the rank's own clients' weights; a custom ``aggregate`` returns
            the rank's *share* of the server, which hypergrad sums over the ranks. Reverse-mode
            methods and ``"forward"`` (shared inputs only) work; see the concepts page
            "Many processes".
        outer: ``"server"`` (default): one outer loss on the aggregate of the clients.
            ``"each"`` (tasks): no aggregation at the end; ``outer_loss(params_c, aux,
            outer_batch_c)`` runs on each client's final params (vmapped) with its own slice
            of ``outer_batch``, which has a leading task dimension ``C`` by default
            (``in_dims={"outer_batch": None}`` gives every client the same one), and the value
            is the mean over clients (weighted by ``weights``; over ranks, over every rank's
            clients). The hypergradient is then the mean of the C single-task
            hypergradients. ``rounds`` still aggregates between rounds.

    Examples:
        Three clients pull their weight towards their own target plus a shared offset ``aux``;
        the server (their mean) should match 1.0:

        >>> inner = lambda p, aux, t: ((p["w"] - t - aux) ** 2).sum()
        >>> outer = lambda server, aux, target: ((server["w"] - target) ** 2).sum()
        >>> targets = torch.tensor([[0.0], [1.0], [2.0]]).expand(5, 3, 1)  # 5 steps, 3 clients
        >>> g = hg.hypergrad(outer, inner, {"w": torch.zeros(1)}, hg.optim.sgd(lr=0.1), targets,
        ...                  torch.tensor([1.0]), aux=torch.tensor([0.5]),
        ...                  clients=hg.Clients(in_dims={"params": None}))
        >>> round(g.aux.item(), 4)
        0.0114

        As tasks: each client should match its own target plus 0.5 (the outer batch has a
        leading task dimension), and the value is the mean of the three clients' own losses;
        each has moved ``1 - 0.8**5 = 0.672`` of the way, so all are short:

        >>> own = torch.tensor([[0.5], [1.5], [2.5]])
        >>> g = hg.hypergrad(outer, inner, {"w": torch.zeros(1)}, hg.optim.sgd(lr=0.1), targets,
        ...                  own, aux=torch.tensor([0.5]),
        ...                  clients=hg.Clients(in_dims={"params": None}, outer="each"))
        >>> round(g.value.item(), 4), round(g.aux.item(), 4)
        (0.3132, -0.6609)
    """

    in_dims: Mapping[str, Any] | None = None
    rounds: int = 1
    aggregate: Callable[[PyTree], PyTree] | None = None
    weights: Sequence[float] | torch.Tensor | None = None
    chunk_size: int | None = None
    randomness: str = "error"
    process_group: Any = None
    outer: str = "server"

    def __post_init__(self) -> None:
        with entered("hg.Clients"):
            self._check()

    def _check(self) -> None:
        positive_int(self.rounds, "rounds")
        if self.randomness not in _RANDOMNESS:
            raise ValueError(
                f"{caller()}: randomness must be 'error', 'different' or 'same' (as in "
                f"torch.func.vmap), got {self.randomness!r}."
            )
        if self.aggregate is not None and self.weights is not None:
            raise ValueError(
                f"{caller()}: pass either weights= (for the built-in FedAvg) or aggregate= (your "
                "own function of the stacked tree), not both; fold the weights into your function."
            )
        positive_int(
            self.chunk_size, "chunk_size", "(clients per chunk)", none="(all clients at once)"
        )
        check_weights(self.weights, None)
        check_process_group(self.process_group)
        if self.outer not in _OUTER:
            raise ValueError(
                f"{caller()}: outer must be 'server' (one outer loss on the aggregate of the "
                "clients) or 'each' (one per client, on its own outer batch: tasks), got "
                f"{self.outer!r}."
            )
        if self.outer == "each" and self.aggregate is not None and self.rounds == 1:
            raise ValueError(
                f"{caller()}: with outer='each' and rounds=1 nothing is aggregated (each client "
                "meets its own outer loss), so aggregate= would be ignored. Drop it, or pass "
                "rounds > 1 to aggregate between rounds."
            )

    def total_steps(self, steps: int | None) -> int | None:
        """The steps over all rounds, from K local steps per round (``None``: from the batches)."""
        return None if steps is None else steps * self.rounds

    def aggregator(self) -> Callable[[PyTree], PyTree]:
        """The user's ``aggregate``, or FedAvg with the user's ``weights``."""
        return self.aggregate or functools.partial(fedavg, weights=self.weights)


@dataclasses.dataclass(frozen=True)
class Federation:
    """C clients training together for R rounds of K steps (built by ``federate``).

    Attributes:
        setup: the public call's checked arguments.
        clients: the clients options.
        dims: the resolved ``in_dims`` (``hyperparams`` as a dict per name).
        count: C.
        steps: K, local steps per round.
        step: the vmapped step, for any number of clients (compiled if asked).
        multi: its compiled multi-step, or ``None``.
        init: ``init(params, hyperparams)``, a fresh stacked optimizer state.
        aggregate: ``aggregate(stacked_tree) -> tree``, the server the outer loss sees.
        boundary: the same, for the server of a round that each rank broadcasts to its own
            clients (over ranks, its backward pass all-reduces the cotangent; else
            ``aggregate``).
        share: ``share(stacked_tree) -> tree``, this rank's share of the server (the sum over
            ranks of the shares is ``aggregate``; without a process group, ``aggregate``).
        ranks: the process group's ranks, or ``None`` for one process.
        by_chunk: whether the hypergradient is taken chunk by chunk (``hypergrad._clients.chunks``).
        each: with ``outer="each"``, the tasks' outer loss on the stacked finals
            (``hypergrad._clients.tasks``); ``None`` for the server's.
    """

    setup: Setup
    clients: Clients
    dims: dict
    count: int
    steps: int
    step: StepFn
    multi: Any
    init: Callable[[PyTree, Mapping[str, Any]], PyTree]
    aggregate: Callable[[PyTree], PyTree]
    boundary: Callable[[PyTree], PyTree]
    share: Callable[[PyTree], PyTree]
    ranks: Ranks | None
    by_chunk: bool
    each: Callable[[PyTree, PyTree, PyTree], torch.Tensor] | None = None

    @property
    def rounds(self) -> int:
        """R, the federated rounds."""
        return self.clients.rounds

    def spread(self, tree: PyTree, key: str) -> PyTree:
        """A shared input (``in_dims[key] is None``) broadcast to every client."""
        shared = self.dims[key] is None and tree is not None
        return broadcast(tree, self.count) if shared else tree

    def start(self) -> Carry:
        """Round 0's stacked start (shared inputs broadcast to C; the state may be ``None``)."""
        s = self.setup
        return Carry(
            self.spread(s.params, "params"),
            self.spread(s.state, "state"),
            self.spread(s.buffers, "buffers"),
        )

    def initial_state(self, params: PyTree, hyperparams: Mapping[str, Any]) -> PyTree:
        """The user's state (broadcast if shared), or a fresh one per client."""
        if self.setup.state is not None:
            return self.spread(self.setup.state, "state")
        return self.init(self.spread(params, "params"), hyperparams)

    def prelude(self, k: int, p: PyTree, s: PyTree, b: PyTree, h: Mapping[str, Any]) -> tuple:
        """Before step k: spread shared inputs (k = 0), or aggregate and restart (a new round)."""
        if k == 0:
            return self.spread(p, "params"), s, self.spread(b, "buffers")
        if k % self.steps == 0:
            p = broadcast(self.boundary(p), self.count)
            b = broadcast(self.boundary(b), self.count) if self.setup.has_buffers else b
            s = self.init(p, h)
        return p, s, b

    def federated_step(self, p, s, b, a, h, tagged):
        """The problem's step: its batch is tagged with the step index for the prelude."""
        k, batch = tagged
        p, s, b = self.prelude(k, p, s, b, h)
        return self.step(p, s, b, a, h, batch)

    def server_outer(self, p: PyTree, b: PyTree, a: PyTree) -> torch.Tensor:
        """The outer loss on the aggregate of the clients' params (and buffers), or with
        ``outer="each"`` the mean of each client's own."""
        assert self.setup.outer is not None
        if self.each is not None:
            return self.each(p, b, a)
        server_buffers = self.aggregate(b) if self.setup.has_buffers else None
        how = self.setup.method
        if self.ranks is not None and how is not None and how.reverse_mode:
            a = counted_once(a, self.dims["aux"], self.ranks)  # its ranks' gradients are summed
        return self.setup.outer(self.aggregate(p), server_buffers, a)

    def batch_at(self, k: int) -> Any:
        """Step k's client-stacked batch (k counts over all rounds)."""
        return self.setup.source.at(k)

    @property
    def problem(self) -> Problem:
        """All clients at once, every round: the problem any method differentiates.

        Built anew on each access, not cached: the problem holds the federation's methods, and
        a cached one would make a reference cycle that keeps the process group alive until the
        garbage collector runs (a gloo group freed only at interpreter exit can abort it).
        """
        s = self.setup
        return Problem(
            step=self.federated_step,
            outer=self.server_outer if s.outer is not None else no_outer,
            params=s.params,
            state=None,
            buffers=s.buffers,
            aux=s.aux,
            hyperparams=s.hyperparams,
            batch_at=lambda k: (k, self.batch_at(k)),
            steps=self.steps * self.rounds,
            seed=s.seed,
            targets=s.targets,
            hyper_names=s.hyper_names,
            devices=rng_devices(s.params),
            init=self.initial_state,
            multi=None
            if self.multi is None
            else _WithinRounds(self.multi, self.steps, self.prelude),
            condition=self.condition(),
            agree=None if self.ranks is None else self.ranks.any,
        )

    def condition(self) -> Condition:
        """Every client's stationarity condition at once: one model's, vmapped over clients."""
        s = self.setup
        one = make_condition(
            s.inner_loss, s.opt, s.hyperparams, has_buffers=s.has_buffers, batch_at=self.batch_at
        )
        dims = (self.dims["aux"], self.dims["hyperparams"], self.dims["batches"])
        options = {"randomness": self.clients.randomness, "chunk_size": self.clients.chunk_size}
        each = vmap_trees(lambda p, b, a, h, x: (one.residual(p, b, a, h, x),), 2, dims, **options)

        def residual(p: PyTree, b: PyTree, a: PyTree, h: Any, x: Any) -> PyTree:
            with exact_norms():  # differentiated again (H v): torch's affine norms are wrong
                return each(p, b, a, h, x)[0]

        return dataclasses.replace(
            one,
            residual=residual,
            start=lambda params: self.spread(params, "params"),
        )


class _WithinRounds:
    """The compiled multi-step of the vmapped step, kept inside one federated round.

    A run of steps may start anywhere in a round (the round's prelude, the broadcast of the
    server params, runs before it when it starts the round) and must end by the round's last
    step: aggregation happens between rounds, outside the compiled graphs.
    """

    def __init__(self, multi: Any, steps: int, prelude: Callable[..., tuple]) -> None:
        self.multi, self.steps, self.prelude = multi, steps, prelude
        self.length: int = multi.length

    def fits(self, k: int) -> bool:
        return k % self.steps + self.length <= self.steps and self.multi.fits(k)

    def several(self, p, s, b, a, h, tagged):
        p, s, b = self.prelude(tagged[0][0], p, s, b, h)
        return self.multi.several(p, s, b, a, h, tuple(batch for _, batch in tagged))


def federate(setup: Setup, clients: Clients) -> Federation:
    """The clients transform of ``setup``: its step vmapped over C clients, in rounds."""
    total, rounds = setup.source.steps, clients.rounds
    if total % rounds:
        raise ValueError(
            f"{caller()}: the batches hold {total} steps, which is not a multiple of "
            f"rounds={rounds}; pass steps=K (local steps per round) with at least "
            "rounds * K batches."
        )
    dims = resolve_in_dims(clients.in_dims, setup.hyperparams, clients.outer)
    if setup.source.empty:  # batches=None: each step's batch is None, nothing to map
        dims = {**dims, "batches": None}
    count = count_clients(
        dims, setup.params, setup.state, setup.buffers, setup.hyperparams, clients.weights,
        setup.source.copy_at(0),
    )  # fmt: skip
    if clients.outer == "each" and setup.outer is not None:
        check_outer_batch(setup.outer_batch, dims["outer_batch"], count)
    how = setup.method
    ranks = None if clients.process_group is None else Ranks(clients.process_group)
    weight = None
    if ranks is not None:  # every rank makes the same call, and draws rank 0's seed
        weight, seed = _agree(setup, clients, dims, count, total // rounds, ranks)
        setup = dataclasses.replace(setup, seed=seed)
    by_chunk = clients.chunk_size is not None and how is not None and how.reverse_mode
    vmap = {
        "chunk_size": None if by_chunk else clients.chunk_size,
        "randomness": clients.randomness,
    }
    step = vmapped_step(
        setup.inner_loss, setup.opt, setup.has_buffers, setup.first_order, dims,
        setup.step_inner_grad, setup.math_attention, **vmap,
    )  # fmt: skip
    if setup.compile is not None:  # the vmapped step (torch.func inside) compiled
        key = step_key(setup.inner_loss, setup.opt, has_buffers=setup.has_buffers,
                       first_order=setup.first_order, clients=repr(dims), vmap=tuple(vmap.values()))  # fmt: skip
        step = compile_step(step, compile=setup.compile, key=key, steps=total // rounds)
    init_one = vmap_trees(
        lambda p, h: (setup.opt.init(p, hyperparams=h),), 1, (dims["hyperparams"],), **vmap
    )
    return Federation(
        setup=setup,
        clients=clients,
        dims=dims,
        count=count,
        steps=total // rounds,
        step=guarded(step),
        multi=multi_step(step),
        init=lambda p, h: init_one(p, h)[0],
        **_aggregation(clients, ranks, weight),
        ranks=ranks,
        by_chunk=by_chunk,
        each=_tasks(setup, clients, dims, count if weight is None else weight, ranks, vmap),
    )


def _tasks(
    setup: Setup, clients: Clients, dims: dict, total: float, ranks: Ranks | None, vmap: dict
) -> Callable[[PyTree, PyTree, PyTree], torch.Tensor] | None:
    """With ``outer="each"`` (and an outer loss), the tasks' outer loss; else ``None``."""
    if clients.outer != "each" or setup.outer_loss is None:
        return None
    return each_outer(
        setup.outer_loss, setup.outer_batch, has_buffers=setup.has_buffers,
        math_attention=setup.math_attention, dims=dims, weights=clients.weights, total=total,
        ranks=ranks, **vmap,
    )  # fmt: skip


def _agree(
    setup: Setup, clients: Clients, dims: dict, count: int, steps: int, ranks: Ranks
) -> tuple[float, int]:
    """Check that every rank makes the same call; the total client weight and rank 0's seed."""
    _check_forward(setup, dims)
    if count == 0:
        raise ValueError(
            f"{caller()}: this rank holds no clients; with process_group every rank needs at "
            "least one (spread the clients so that each rank has some)."
        )
    weights = clients.weights
    fingerprint = {
        "the call": caller(),
        "method": repr(setup.method),
        "wrt": repr((setup.targets, setup.hyper_names)),
        "K (local steps per round)": str(steps),
        "rounds": str(clients.rounds),
        "params": describe(setup.params, dims["params"]),
        "buffers": describe(setup.buffers, dims["buffers"]),
        "aux": describe(setup.aux, dims["aux"]),
        "hyperparams": describe(setup.hyperparams, dims["hyperparams"]),
        "in_dims": repr(dims),
        "the aggregation": "aggregate="
        if clients.aggregate
        else f"FedAvg, weights={weights is not None}",
        "randomness": clients.randomness,
        "outer": clients.outer,
        "check_finite": str(setup.check_finite),
    }
    local = count if weights is None else float(torch.as_tensor(weights).sum())
    return same_call(ranks, fingerprint, local, setup.seed)


def _aggregation(
    clients: Clients, ranks: Ranks | None, weight: float | None
) -> dict[str, Callable[[PyTree], PyTree]]:
    """``aggregate``, ``boundary`` and ``share``: one process's, or over ranks the sum of each
    rank's share (FedAvg's divided by ``weight``, the total weight of every rank's clients)."""
    if ranks is None:
        one = clients.aggregator()
        return {"aggregate": one, "boundary": one, "share": one}
    assert weight is not None
    share = clients.aggregate or functools.partial(
        fedavg_share, weights=clients.weights, total=weight, rank=ranks.rank
    )
    return {
        "aggregate": lambda tree: sum_ranks(ranks, share(tree)),
        "boundary": lambda tree: sum_ranks(ranks, share(tree), spread=True),
        "share": share,
    }


def _check_forward(setup: Setup, dims: dict) -> None:
    """Forward mode over ranks pushes the same directions on every rank: shared inputs only."""
    how = setup.method
    if how is not None and not how.spans_processes:
        raise ValueError(
            f"{caller()}: method={how!r} does not run over processes yet: each rank would solve "
            "the implicit system for its own clients only, and the ranks' results would differ "
            "from one process's. Use method='reverse' or hg.Checkpointed(...) with "
            "process_group, or run hg.Implicit in one process holding every client."
        )
    if how is None or how.reverse_mode:
        return
    stacked = []
    if "aux" in setup.targets and 0 in _tree.leaves(dims["aux"]):
        stacked.append("aux")
    if "params" in setup.targets and dims["params"] == 0:
        stacked.append("params")
    stacked += [n for n in setup.hyper_names if dims["hyperparams"].get(n) == 0]
    if stacked:
        raise ValueError(
            f"{caller()}: method={how!r} with process_group differentiates only inputs shared "
            f"by every client, but {', '.join(stacked)} has a client dimension (each rank holds "
            "different clients, so their directions differ). Use method='reverse' (or "
            "hg.Checkpointed), or differentiate shared inputs only."
        )

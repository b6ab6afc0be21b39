"""Many processes: the ranks of a ``torch.distributed`` process group as one federation.

With ``hg.Clients(process_group=group)`` each rank holds only its own clients (stacked, any
number) and their batches, and every rank returns what one process holding all the clients
would. Only plain collectives are used (``all_reduce``, ``all_gather_object``), and every
cross-rank sum is explicit:

- forward: each rank runs its own clients; the server of a round is the sum over ranks of each
  rank's *share* (FedAvg: ``sum_c w_c p_c / W`` over its clients, ``W`` the total weight of
  every rank), all-reduced, so it is the same on every rank;
- backward (reverse-mode methods, ``hypergrad._clients.chunks``): the outer loss and its
  cotangent on the server are the same on every rank; each rank pulls it back through its own
  share and differentiates its own clients' round; the cotangent of the round's start (the
  broadcast server) is all-reduced; the gradients of shared inputs (``aux``, shared
  hyperparameters, shared initial params) are all-reduced once at the end;
- forward mode: the all-reduce of the server carries its tangent along (``sum_ranks``).

Faults (``spanning``): every collective of a call is preceded by a status all-reduce, always
of the same shape: one int64 row per rank (``_COLUMNS``), each rank setting only its own. A rank
that raises (in its loss, its checks, the finite check's replay) joins the next status
all-reduce with its flag set instead; every rank then learns which ranks failed, gathers their
messages and raises the same ``RankFailure``. A rank that dies makes the next collective fail
within the group's timeout, which is reported the same way. The status all-reduces carry more
where a call needs it, so that a hypergradient over R rounds (no buffers) runs 4R + 2
all-reduces and nothing else, an unroll 2R:

- the first (``same_call``, before the first step) carries each rank's 128-bit hash of the
  call's fingerprint (K, rounds, method, structure), its client weight and its seed; only where
  the hashes differ are the fingerprints gathered (``all_gather_object``), to name what differs;
- the finite check's vote (``Ranks.any``) is a status all-reduce with the flag in its row;
  where no rank flagged, every rank returns right after it, so it settles the call and
  ``spanning`` skips the last status all-reduce it otherwise runs after the body.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import optree
import torch
import torch.distributed as dist

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad._clients.dims import leaf_dims
from hypergrad.tree import PyTree

__all__ = [
    "AcrossRanks",
    "RankFailure",
    "Ranks",
    "check_process_group",
    "counted_once",
    "describe",
    "fedavg_share",
    "fingerprint_hash",
    "same_call",
    "same_call_weights",
    "shared",
    "spanning",
    "sum_ranks",
    "sum_shared",
]


class RankFailure(RuntimeError):
    """A rank of the process group failed (or died); raised on every rank with the same message."""


# A status exchange's row, one per rank: whether the rank failed, the finite check's vote, and,
# in a call's first exchange, its fingerprint's hash (128 bits), its weights (client weight, or
# the examples of its inner and outer batches: float64 bits), its seed, and whether it needs the full fingerprints gathered (a seed beyond int64).
_COLUMNS = ("failed", "flag", "hash_hi", "hash_lo", "weight", "weight2", "seed", "detail")


@dataclasses.dataclass
class _Call:
    """A public call in progress over ranks: whether its exchanges are settled (``Ranks.any``
    found no flag and no failure, and every rank returns right after)."""

    settled: bool = False


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("hypergrad_call", default=None)


def check_process_group(group: Any) -> None:
    """Raise unless ``group`` is ``None`` or a process group of an initialised ``torch.distributed``."""
    if group is None:
        return
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{caller()}: process_group must be a torch.distributed process group, e.g. "
            f"torch.distributed.group.WORLD or one from new_group(...), got {type(group).__name__}."
        )
    if not dist.is_initialized():
        raise RuntimeError(
            f"{caller()}: process_group needs torch.distributed initialised in every process; "
            "call torch.distributed.init_process_group('gloo') (or 'nccl' on CUDA) first, e.g. "
            "under torchrun, or pass process_group=None for one process."
        )


@dataclasses.dataclass(frozen=True)
class Ranks:
    """The process group of a call, and the collectives hypergrad runs over it."""

    group: Any

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def device(self) -> torch.device:
        """Where the group's collectives need their tensors (NCCL: the current CUDA device)."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _collective(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RankFailure:
            raise
        except Exception as error:  # gloo/NCCL: a peer closed its connection, or the timeout
            raise RankFailure(
                f"{caller()}: a collective over the process group failed on rank {self.rank} "
                f"of {self.size}: another rank stopped answering (it exited, crashed or hung) "
                f"within the group's timeout ({type(error).__name__}: {error}). Look at the other "
                "ranks' output; set the timeout with init_process_group(timeout=...)."
            ) from error

    def _rows(self, failed: bool, mine: dict[str, int]) -> list[list[int]]:
        """One all-reduce of every rank's row of ``_COLUMNS`` (int64): this rank sets its own
        row, the others' stay zero, so the sum is every rank's row, the same on every rank."""
        call = _CALL.get()
        if call is not None:
            call.settled = False
        rows = torch.zeros(self.size, len(_COLUMNS), dtype=torch.int64, device=self.device)
        rows[self.rank, 0] = int(failed)
        for name, value in mine.items():
            rows[self.rank, _COLUMNS.index(name)] = value
        self._collective(lambda: dist.all_reduce(rows, group=self.group))
        return rows.tolist()

    def exchange(self, **mine: int) -> list[list[int]]:
        """The status exchange, carrying this rank's ``mine`` (columns of ``_COLUMNS``): every
        rank's row, in rank order; raises ``RankFailure`` (on every rank) if a rank failed.

        Every status exchange has the same shape, whatever it carries, so a failing rank
        (``fail``) joins whichever one the others are at.
        """
        rows = self._rows(False, mine)
        failed = [r for r, row in enumerate(rows) if row[0]]
        if failed:
            self._report(failed, None)
        return rows

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order (no status exchange)."""
        out: list[Any] = [None] * self.size
        self._collective(lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def check(self) -> None:
        """The status exchange before a collective: raise ``RankFailure`` if a rank failed."""
        self.exchange()

    def fail(self, error: BaseException) -> NoReturn:
        """This rank failed with ``error``: tell the others at their next check, and raise."""
        rows = self._rows(True, {})
        self._report([r for r, row in enumerate(rows) if row[0]], error)

    def _report(self, failed: list[int], error: BaseException | None) -> NoReturn:
        mine = None if error is None else f"{type(error).__name__}: {error}"
        messages = self.gather(mine)
        who = "rank" if len(failed) == 1 else "ranks"
        lines = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise RankFailure(
            f"{caller()}: {who} {', '.join(map(str, failed))} of the {self.size} in the process "
            f"group failed, so every rank stops here. {lines}"
        ) from error

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (every rank calls it at the same point).

        The flag rides on a status exchange. Where it holds on no rank, that exchange settles
        the call: every rank returns right after it (the finite check's vote, the last thing a
        call does), so ``spanning`` needs no last status exchange.
        """
        rows = self.exchange(flag=int(flag))
        found = any(row[_COLUMNS.index("flag")] for row in rows)
        call = _CALL.get()
        if call is not None:
            call.settled = not found
        return found

    def sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The sum over ranks of each tensor (new tensors; one all-reduce per dtype)."""
        self.check()
        out: list[torch.Tensor | None] = [None] * len(tensors)
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, x in enumerate(tensors):
            groups.setdefault((x.dtype, x.device), []).append(i)
        for (_, device), where in groups.items():
            parts = [tensors[i].detach().reshape(-1) for i in where]
            flat = torch.cat(parts).to(self.device)
            self._collective(functools.partial(dist.all_reduce, flat, group=self.group))
            flat = flat.to(device)
            for i, piece in zip(where, flat.split([p.numel() for p in parts])):
                # A tensor of its own, not a view of the buffer: as the outputs of an autograd
                # function, views of one base get wrong gradients downstream.
                out[i] = piece.view(tensors[i].shape).clone()
        return out  # type: ignore[return-value]

    def sum_tree(self, tree: PyTree) -> PyTree:
        """``sum`` over the tensor leaves of a tree."""
        flat, spec = optree.tree_flatten(tree, namespace=_tree._NAMESPACE)
        return optree.tree_unflatten(spec, self.sum(flat))


@contextlib.contextmanager
def spanning(group: Any) -> Iterator[None]:
    """Run a public call on every rank of ``group`` so that the ranks agree on its outcome.

    An exception on this rank is announced to the others (``Ranks.fail``) and raised as a
    ``RankFailure`` naming it; after the body, a last status exchange makes a rank whose call
    succeeded raise if another's failed, unless the body's last exchange settled the call
    (``Ranks.any``: no rank failed or flagged, and every rank returns right after it). Without
    a group it does nothing.
    """
    if group is None:
        yield
        return
    ranks, call = Ranks(group), _Call()
    token = _CALL.set(call)
    try:
        try:
            yield
        except RankFailure:
            raise
        except Exception as error:
            if call.settled:  # after the call settled (nothing there raises): the others left
                raise
            ranks.fail(error)
        if not call.settled:
            ranks.check()
    finally:
        _CALL.reset(token)


class _SumRanks(torch.autograd.Function):
    """The sum over ranks of every rank's share: forward all-reduce.

    Backward: the result's cotangent is handed to each rank's share either unchanged, where
    the result is used the same way on every rank (the outer loss's server: its cotangent is
    the same everywhere), or summed over the ranks (``spread``: a round's server, which each
    rank broadcasts to its own clients, so each rank holds only its clients' part of the
    cotangent). In forward mode the tangent is a rank's share of the tangent: all-reduced too
    (by applying the function to the tangents, so that vmap's rule sees them batched).
    """

    @staticmethod
    def forward(ranks: Ranks, spread: bool, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(ranks.sum(xs))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.ranks, ctx.spread = inputs[0], inputs[1]
        ctx.like = [(x.shape, x.dtype, x.device) for x in inputs[2:]]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        return (None, None, *(ctx.ranks.sum(grads) if ctx.spread else grads))

    @staticmethod
    def jvp(ctx: Any, _ranks: Any, _spread: Any, *tangents: torch.Tensor | None) -> tuple:
        full = [
            torch.zeros(shape, dtype=dtype, device=device) if t is None else t
            for t, (shape, dtype, device) in zip(tangents, ctx.like)
        ]
        return _SumRanks.apply(ctx.ranks, False, *full)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, ranks: Ranks, spread: bool, *xs: torch.Tensor) -> tuple:
        batched = [
            x.expand(info.batch_size, *x.shape) if d is None else x.movedim(d, 0)
            for x, d in zip(xs, in_dims[2:])
        ]
        return tuple(ranks.sum(batched)), (0,) * len(xs)


def sum_ranks(ranks: Ranks, tree: PyTree, *, spread: bool = False) -> PyTree:
    """The sum over ranks of each leaf of ``tree``, differentiable in its floating-point leaves.

    The result is the same on every rank. Its backward pass hands each rank's share the
    result's cotangent: as it is (``spread=False``: every rank uses the result alike, so the
    cotangent is the same everywhere) or summed over the ranks (``spread=True``: each rank
    uses the result for its own clients). Forward mode all-reduces the tangent.
    """
    flat, spec = optree.tree_flatten(tree, namespace=_tree._NAMESPACE)
    floats = [i for i, x in enumerate(flat) if x.is_floating_point()]
    others = [i for i, x in enumerate(flat) if not x.is_floating_point()]
    out = list(flat)
    if floats:
        for i, x in zip(floats, _SumRanks.apply(ranks, spread, *(flat[i] for i in floats))):
            out[i] = x
    if others:
        for i, x in zip(others, ranks.sum([flat[i] for i in others])):
            out[i] = x
    return optree.tree_unflatten(spec, out)


class _Shared(torch.autograd.Function):
    """The identity on a value every rank holds alike, whose cotangent is summed over ranks.

    Each rank differentiates its own share of a sum over ranks (its shard's loss), so the
    cotangent that reaches a shared input is that rank's share; the backward all-reduces it
    (``_SumRanks``, itself differentiable: a double backward passes its cotangent through), so
    every rank holds the whole cotangent. Forward mode: the tangent is the same on every rank,
    passed through unchanged.
    """

    @staticmethod
    def forward(ranks: Ranks, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.ranks = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        return (None, *_SumRanks.apply(ctx.ranks, False, *grads))

    @staticmethod
    def jvp(ctx: Any, _ranks: Any, *tangents: torch.Tensor) -> tuple:
        return tuple(tangents)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, ranks: Ranks, *xs: torch.Tensor) -> tuple:
        return tuple(x.view_as(x) for x in xs), tuple(in_dims[1:])


def shared(ranks: Ranks, tree: PyTree) -> PyTree:
    """``tree`` unchanged, its floating-point leaves' cotangents summed over the ranks.

    For a value every rank holds alike (the params of data parallelism) and each rank uses in
    its own share of a sum over ranks: the backward pass gives every rank the whole gradient.

    Examples:
        >>> class One:  # a group of one rank: the sum over ranks is the value itself
        ...     rank, size = 0, 1
        ...     def sum(self, xs):
        ...         return [x.detach().clone() for x in xs]
        >>> w = torch.tensor(3.0, requires_grad=True)
        >>> torch.autograd.grad(2 * shared(One(), {"w": w})["w"], w)[0]
        tensor(2.)
    """
    flat, spec = optree.tree_flatten(tree, namespace=_tree._NAMESPACE)
    floats = [i for i, x in enumerate(flat) if x.is_floating_point()]
    if not floats:
        return tree
    out = list(flat)
    for i, x in zip(floats, _Shared.apply(ranks, *(flat[i] for i in floats))):
        out[i] = x
    return optree.tree_unflatten(spec, out)


def counted_once(tree: PyTree, dims: Any, ranks: Ranks) -> PyTree:
    """``tree`` unchanged, with the gradient of its shared leaves divided by the number of ranks.

    The outer loss uses ``aux`` the same way on every rank; dividing that gradient by the
    number of ranks counts it once when the ranks' gradients of ``aux`` are all-reduced.

    Examples:
        >>> x = torch.tensor(2.0, requires_grad=True)
        >>> class Two:
        ...     size = 2
        >>> y = counted_once({"a": x}, None, Two())["a"]
        >>> y.item(), torch.autograd.grad(3 * y, x)[0].item()
        (2.0, 1.5)
    """
    if tree is None:
        return None
    ds, flat, spec = leaf_dims(dims, tree)
    size = ranks.size

    def leaf(x: Any, d: Any) -> Any:
        if d is not None or not isinstance(x, torch.Tensor) or not x.requires_grad:
            return x
        frozen = x.detach()
        return frozen + (x - frozen) / size  # the value of x exactly; the gradient / size

    return optree.tree_unflatten(spec, [leaf(x, d) for x, d in zip(flat, ds)])


def sum_shared(ranks: Ranks, trees: dict[str, PyTree], dims: dict[str, Any]) -> dict[str, PyTree]:
    """The leaves of ``trees[key]`` whose client dim (``dims[key]``) is ``None`` summed over
    the ranks, in one all-reduce; the leaves with a client dimension stay this rank's own."""
    keys = list(trees)
    parts = [leaf_dims(_prefix(dims[key], trees[key]), trees[key]) for key in keys]
    where = [
        (i, j)
        for i, (ds, flat, _) in enumerate(parts)
        for j, (d, x) in enumerate(zip(ds, flat))
        if d is None and isinstance(x, torch.Tensor)
    ]
    summed = ranks.sum([parts[i][1][j] for i, j in where])
    columns = [list(flat) for _, flat, _ in parts]
    for (i, j), x in zip(where, summed):
        columns[i][j] = x
    return {
        key: optree.tree_unflatten(spec, column)
        for key, (_, _, spec), column in zip(keys, parts, columns)
    }


def same_call(
    ranks: Ranks, fingerprint: dict[str, str], weight: float, seed: int
) -> tuple[float, int]:
    """Check that every rank makes the same call; the total client weight, and rank 0's seed.

    ``fingerprint`` names what must agree (K, rounds, the method, the structure of the params
    ...); ``weight`` is this rank's client count, or the sum of its FedAvg weights. Every rank
    takes rank 0's ``seed``, so that random numbers in the outer loss (the same computation on
    every rank) are the same. See ``same_call_weights``.
    """
    totals, seed = same_call_weights(ranks, fingerprint, (weight, 0.0), seed)
    return totals[0], seed


_CLIENTS_MAY_DIFFER = "only the number of clients and their data may differ"


def same_call_weights(
    ranks: Ranks,
    fingerprint: dict[str, str],
    weights: tuple[float, float],
    seed: int,
    may_differ: str = _CLIENTS_MAY_DIFFER,
) -> tuple[tuple[float, float], int]:
    """``same_call`` with two weights per rank: their totals over the ranks, and rank 0's seed.

    One status exchange carries each rank's hash of its fingerprint, weights and seed; only
    where the hashes differ (or a seed is beyond int64) are the fingerprints gathered, to name
    what differs (``may_differ`` ends the message: what the ranks may pass differently).
    """
    fits = -(2**63) <= seed < 2**63
    hi, lo = fingerprint_hash(fingerprint)
    rows = ranks.exchange(
        hash_hi=hi, hash_lo=lo, weight=_float_bits(weights[0]), weight2=_float_bits(weights[1]),
        seed=seed if fits else 0, detail=int(not fits),
    )  # fmt: skip
    column = {name: [row[i] for row in rows] for i, name in enumerate(_COLUMNS)}
    hashes = set(zip(column["hash_hi"], column["hash_lo"]))
    if len(hashes) == 1 and not any(column["detail"]):
        totals = tuple(sum(_bits_float(b) for b in column[c]) for c in ("weight", "weight2"))
        return (totals[0], totals[1]), column["seed"][0]
    return _same_call_gathered(ranks, fingerprint, weights, seed, may_differ)


def _same_call_gathered(
    ranks: Ranks,
    fingerprint: dict[str, str],
    weights: tuple[float, float],
    seed: int,
    may_differ: str,
) -> tuple[tuple[float, float], int]:
    """``same_call`` by gathering every rank's fingerprint: names what differs, if anything."""
    everyone = ranks.gather((fingerprint, tuple(map(float, weights)), int(seed)))
    differ = []
    for key, mine in fingerprint.items():
        values = [fp.get(key) for fp, _, _ in everyone]
        if any(v != mine for v in values):
            said = ", ".join(f"rank {r} has {v}" for r, v in enumerate(values))
            differ.append(f"{key}: {said}")
    if differ:
        raise RankFailure(
            f"{caller()}: the ranks of the process group made different calls, so every rank "
            f"stops before the first step. {'; '.join(differ)}. Every rank must pass the same "
            f"method, wrt, steps, rounds and options, and params of the same structure "
            f"({may_differ})."
        )
    return (sum(w[0] for _, w, _ in everyone), sum(w[1] for _, w, _ in everyone)), everyone[0][2]


def fingerprint_hash(fingerprint: dict[str, str]) -> tuple[int, int]:
    """A 128-bit hash of a fingerprint as two int64s, the same in every process.

    Examples:
        >>> fingerprint_hash({"K": "5"}) == fingerprint_hash({"K": "5"})
        True
        >>> fingerprint_hash({"K": "5"}) == fingerprint_hash({"K": "6"})
        False
    """
    digest = hashlib.blake2b(repr(sorted(fingerprint.items())).encode(), digest_size=16).digest()
    return (
        int.from_bytes(digest[:8], "little", signed=True),
        int.from_bytes(digest[8:], "little", signed=True),
    )


def _float_bits(x: float) -> int:
    """A float64's bits as an int64 (carried exactly through an integer all-reduce).

    Examples:
        >>> _bits_float(_float_bits(2.5)), _bits_float(_float_bits(0.1)) == 0.1
        (2.5, True)
    """
    return int(struct.unpack("<q", struct.pack("<d", float(x)))[0])


def _bits_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def describe(tree: PyTree, dims: Any) -> str:
    """A tree's structure, and each leaf's shape and dtype without its client dimension."""
    if tree is None:
        return "None"
    ds, flat, spec = leaf_dims(dims, tree)
    leaves = [
        f"{tuple(x.shape[1:] if d == 0 else x.shape)} {x.dtype}"
        if isinstance(x, torch.Tensor)
        else repr(x)
        for x, d in zip(flat, ds)
    ]
    return f"{spec} [{', '.join(leaves)}]"


def _prefix(dims: Any, tree: PyTree) -> Any:
    """``dims`` for the keys ``tree`` has (the hyperparameters differentiated are some of all)."""
    if isinstance(dims, dict) and isinstance(tree, dict):
        return {k: dims[k] for k in tree}
    return dims


class AcrossRanks:
    """A reverse-mode method on a problem spread over ranks, then its shared gradients summed.

    Each rank's backward pass gives the gradient of its own clients' part (the round servers'
    cotangents are all-reduced inside it, by ``sum_ranks(spread=True)``, and the outer loss's
    direct gradient with respect to ``aux`` is divided by the number of ranks, by
    ``counted_once``); one all-reduce of the gradients of shared inputs completes them.
    """

    def __init__(self, method: Any, ranks: Ranks, dims: dict[str, Any]) -> None:
        self.method, self.ranks, self.dims = method, ranks, dims

    def evaluations(self, problem: Any) -> int:
        return self.method.evaluations(problem)

    def __call__(self, problem: Any) -> Any:
        result = self.method(problem)
        return result._replace(grads=sum_shared(self.ranks, result.grads, self.dims))


def fedavg_share(
    tree: PyTree, /, weights: Sequence[float] | torch.Tensor | None, total: float, rank: int
) -> PyTree:
    """This rank's share of FedAvg: ``sum_c w_c x_c / total`` over its clients.

    ``total`` is the weight of every rank's clients (their count without ``weights``), so the
    shares sum to the weighted mean over all clients. Integer leaves are rank 0's client 0 (the
    other ranks' shares are zero), as ``fedavg`` takes client 0's.

    Examples:
        >>> fedavg_share({"w": torch.tensor([[1.0], [3.0]])}, None, 4.0, rank=1)
        {'w': tensor([1.])}
    """

    def leaf(x: torch.Tensor) -> torch.Tensor:
        if not (x.is_floating_point() or x.is_complex()):
            return x[0] if rank == 0 else torch.zeros_like(x[0])
        if weights is None:
            return x.sum(0) / total
        w = torch.as_tensor(weights, dtype=x.dtype, device=x.device).detach()
        return (w.view(-1, *([1] * (x.dim() - 1))) * x).sum(0) / total

    return _tree.map(leaf, tree)

"""Many models at once: unroll stacked clients with ``torch.func.vmap`` and differentiate rounds.

A *client* tree is an ordinary tree whose leaves carry a leading client dimension ``C``
([`hg.stack`][hypergrad.stack] builds one from modules). [`unroll`][hypergrad.clients.unroll] and
[`hypergrad`][hypergrad.clients.hypergrad] run the engine's step function (module
``hypergrad.unroll``) under ``torch.func.vmap`` over that dimension: one vectorised computation for
all clients, never a Python loop over them. Every method of [`hg.hypergrad`][hypergrad.hypergrad]
works unchanged (``"reverse"``, ``hg.Truncated``, ``hg.Checkpointed``, ``"forward"``,
``"first_order"``), because the clients are handed to the methods as one problem whose step is the
vmapped step and whose outer loss aggregates the clients.

Which inputs have a client dimension (in_dims)
-----------------------------------------------
``in_dims`` follows ``torch.func.vmap``: ``0`` means "leading client dimension", ``None`` means
"shared by every client". It is a dict with some of these keys (defaults shown):

    {"params": 0, "state": 0, "buffers": 0, "aux": None, "hyperparams": None, "batches": 0}

- ``params``/``state``/``buffers``: ``0`` (stacked) or ``None`` (one tree, copied to every
  client at the start; e.g. one server model).
- ``aux``: ``None`` (one auxiliary tree seen by every client, the usual case) or ``0``; any
  tree prefix of ``aux`` is accepted, as in vmap.
- ``hyperparams``: ``None`` (all shared), ``0`` (all per client) or a dict
  ``{"lr": 0, "weight_decay": None}`` naming the per-client ones (leading dim ``C``; a per-client
  learning rate is a tensor of shape ``(C,)``); the rest are shared.
- ``batches``: the client dimension of *one step's* batch. Stacked batches are shaped
  ``(steps, C, ...)`` (the step dimension first, as in [`hg.unroll`][hypergrad.unroll]); ``None``
  gives every client the same batch.

Rounds and aggregation
----------------------
With ``rounds=R`` the clients run ``R`` federated rounds of ``K`` local steps each (the batches
hold ``R * K`` steps). At the start of every round after the first, the client parameters are
aggregated into a server model, which is broadcast back to every client, and each client's
optimizer state starts afresh (a new local optimizer per round, as FedAvg clients do). The
whole chain is differentiated. The default aggregation is [`fedavg`][hypergrad.clients.fedavg], the
mean over clients weighted by ``weights`` (e.g. the clients' sample counts,
[`Padded.sizes`][hypergrad.clients.Padded.sizes]); ``aggregate=fn`` takes any function of the
stacked tree. [`hypergrad`][hypergrad.clients.hypergrad]'s ``outer_loss`` is server-side: it
receives the aggregate of the final client parameters.

Buffers (BatchNorm) under vmap
------------------------------
In-place updates of a module's *own* running statistics cannot run under vmap (one unbatched
tensor cannot hold C clients' updates). Two policies work:

- **carry** (per client, functionally): pass stacked ``buffers=`` and write the inner loss as
  ``inner_loss(params, aux, batch, buffers) -> (loss, new_buffers)``, with
  ``hg.call(module, params, x, buffers=buffers, return_buffers=True)``. Each client keeps its
  own statistics; between rounds they are aggregated like the params (floating-point leaves
  averaged, integer counters taken from client 0); ``outer_loss`` then gets the server's
  buffers as a fourth argument.
- **freeze**: do not pass ``buffers=``; put the module in ``eval()`` mode (statistics are read,
  never written) or build it with ``track_running_stats=False``.

Anything else raises an error naming the module and these fixes.

**Known torch limitation** (torch 2.13, pinned by a strict-xfail test): under vmap, the second
derivative through ``batch_norm`` or ``layer_norm`` *with an affine weight* taken with
``torch.func.grad`` is wrong. The reverse-mode methods are not affected (outside a torch.func
transform the clients' inner gradient is taken by autograd, see below), but ``"forward"`` is:
with such a layer, write the affine part as a separate op (``nn.BatchNorm1d(d, affine=False)``
then ``* gamma + beta``) or use ``GroupNorm``.

How the inner gradient is taken: outside torch.func transforms (every method but
``"forward"``), only the clients' losses are vmapped and the gradient of their sum is taken by
``torch.autograd.grad`` (client c's loss depends on client c's params only, so this is each
client's own gradient); inside one (``"forward"``), the engine's ``torch.func`` step is vmapped
whole. Both give the same numbers; the first records a much lighter meta-graph.

Clients with different data sizes
---------------------------------
[`pad`][hypergrad.clients.pad] stacks per-client datasets of different lengths into padded tensors
and a mask; [`batches`][hypergrad.clients.batches] turns them into per-step batches ``(data, mask)``
(full batch or sampled mini-batches); [`masked_mean`][hypergrad.clients.masked_mean] averages a
per-example loss over the real examples only.

Cost and chunk_size
-------------------
One vmapped step costs about as much as one step of a model C times wider; memory of a
reverse-mode hypergradient is ``O(K * C * A)``. With ``chunk_size=n < C``,
[`hypergrad`][hypergrad.clients.hypergrad] takes a reverse-mode hypergradient (``"reverse"``,
``hg.Truncated``, ``hg.Checkpointed``, ``"first_order"``) one chunk of n clients at a time: the
clients first run forward without a graph, then each chunk's round is run again and differentiated
on its own (``hypergrad._client_chunks``). Memory becomes ``O(K * n * A + R * C * P)``, at the price
of one more forward pass. Elsewhere (``"forward"``, [`unroll`][hypergrad.clients.unroll])
``chunk_size`` is vmap's: the clients of each step run in chunks, bounding that step's working
memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import nn

from hypergrad import tree as _tree
from hypergrad._client_chunks import Federation, by_chunks, chunkable
from hypergrad._compile import check_compile, compile_step, step_key
from hypergrad.hypergradient import (
    Hypergradient,
    _check_float,
    _parse_wrt,
    _raise_nonfinite,
    _to_tensor,
)
from hypergrad.methods import Method, resolve
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree
from hypergrad.unroll import (
    Batches,
    Carry,
    Problem,
    Trajectory,
    all_finite,
    check_opt,
    check_params,
    draw_seed,
    in_functorch_transform,
    locate_nonfinite,
    make_step,
    multi_step,
    outer_fn,
    rng_devices,
    run_steps,
)

__all__ = [
    "Padded",
    "batches",
    "broadcast",
    "fedavg",
    "hypergrad",
    "masked_mean",
    "pad",
    "unroll",
]

_DEFAULT_IN_DIMS: dict[str, Any] = {
    "params": 0,
    "state": 0,
    "buffers": 0,
    "aux": None,
    "hyperparams": None,
    "batches": 0,
}
_RANDOMNESS = ("error", "different", "same")

# --------------------------------------------------------------------------------------------
# Aggregation


def fedavg(tree: PyTree, /, weights: Sequence[float] | torch.Tensor | None = None) -> PyTree:
    """The mean over the leading client dimension, weighted by ``weights`` (FedAvg).

    Weights are normalised to sum to one (pass the clients' sample counts for FedAvg); they may
    be a tensor that requires grad. Integer leaves (BatchNorm's ``num_batches_tracked``) are not
    averaged: client 0's value is taken.

    Args:
        tree: a stacked tree (every leaf with the leading client dimension ``C``).
        weights: ``C`` non-negative weights, or ``None`` for the plain mean.

    Returns:
        One tree without the client dimension.

    Examples:
        >>> stacked = {"w": torch.tensor([[0.0, 4.0], [4.0, 8.0]]), "n": torch.tensor([3, 3])}
        >>> hg.clients.fedavg(stacked, weights=[1, 3])
        {'w': tensor([3., 7.]), 'n': tensor(3)}
    """

    def leaf(x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() or x.is_complex():
            return _tree.mean(x, weights, stacked=True)
        return x[0]

    return _tree.map(leaf, tree)


def broadcast(tree: PyTree, /, clients: int) -> PyTree:
    """Give every leaf a leading client dimension of size ``clients`` (a view, no copy).

    Differentiable: the gradient with respect to ``tree`` is the sum over clients.

    Examples:
        >>> hg.clients.broadcast({"w": torch.tensor([1.0, 2.0])}, 3)["w"].shape
        torch.Size([3, 2])
    """
    return _tree.map(lambda x: x.expand(clients, *x.shape), tree)


# --------------------------------------------------------------------------------------------
# Clients with different data sizes


class Padded(NamedTuple):
    """Per-client datasets padded to one length (see [`pad`][hypergrad.clients.pad]).

    Attributes:
        data: the datasets' tree, each leaf shaped ``(C, N, ...)`` with ``N`` the largest size.
        mask: a bool tensor ``(C, N)``: ``True`` for real examples, ``False`` for padding.
        sizes: a ``(C,)`` int64 tensor of the real sizes (FedAvg weights).

    Examples:
        >>> padded = hg.clients.pad([torch.ones(2, 3), torch.ones(4, 3)])
        >>> padded.data.shape, padded.sizes.tolist(), padded.mask.sum(1).tolist()
        (torch.Size([2, 4, 3]), [2, 4], [2, 4])
    """

    data: PyTree
    mask: torch.Tensor
    sizes: torch.Tensor


def _size(dataset: PyTree, index: int) -> int:
    flat = _tree.leaves(dataset)
    lengths = {x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None for x in flat}
    if not flat or None in lengths or len(lengths) != 1:
        shapes = ", ".join(
            f"{p}: {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            for p, x in zip(_tree.key_paths(dataset), flat)
        )
        raise ValueError(
            f"hg.clients.pad: dataset {index} needs tensors sharing one leading (example) "
            f"dimension; got {shapes or 'no tensors'}. Pass e.g. (x_c, y_c) with "
            "x_c.shape[0] == y_c.shape[0]."
        )
    return lengths.pop()


def pad(datasets: Sequence[PyTree], /, *, value: float = 0) -> Padded:
    """Stack per-client datasets of different lengths, padding each to the longest.

    Args:
        datasets: one tree per client (e.g. ``(x_c, y_c)``), all of one structure, the leaves of
            a client sharing its number of examples ``N_c`` as their leading dimension.
        value: the fill value of the padding. Keep it finite:
            [`masked_mean`][hypergrad.clients.masked_mean] drops the padded entries of a loss, but a
            nan in the data would still reach the gradient through ops like ``x @ w`` (``0 * nan =
            nan``).

    Returns:
        [`Padded`][hypergrad.clients.Padded] ``(data, mask, sizes)``.

    Raises:
        ValueError: no datasets, different structures, leaves of one client with different
            lengths, or trailing shapes that differ between clients.

    Examples:
        >>> d = hg.clients.pad([(torch.ones(2, 3), torch.zeros(2)), (torch.ones(4, 3), torch.ones(4))])
        >>> d.data[0].shape, d.mask.tolist(), d.sizes.tolist()
        (torch.Size([2, 4, 3]), [[True, True, False, False], [True, True, True, True]], [2, 4])
    """
    if len(datasets) == 0:
        raise ValueError("hg.clients.pad: got no datasets; pass one dataset per client.")
    datasets = list(datasets)
    _tree.check_same_structure(datasets, caller="hg.clients.pad")
    sizes = [_size(d, i) for i, d in enumerate(datasets)]
    longest = max(sizes)
    paths = _tree.key_paths(datasets[0])
    per_leaf = list(zip(*(_tree.leaves(d) for d in datasets)))
    padded = []
    for path, xs in zip(paths, per_leaf):
        for i, x in enumerate(xs[1:], start=1):
            if x.shape[1:] != xs[0].shape[1:] or x.dtype != xs[0].dtype:
                leaf = "the tensor" if path == "<root>" else f"leaf {path}"
                raise ValueError(
                    f"hg.clients.pad: {leaf} of dataset {i} has example shape "
                    f"{tuple(x.shape[1:])} and dtype {x.dtype}, but dataset 0 has "
                    f"{tuple(xs[0].shape[1:])} and {xs[0].dtype}; only the number of examples "
                    "may differ between clients."
                )
        padded.append(
            torch.stack(
                [
                    torch.cat([x, x.new_full((longest - x.shape[0], *x.shape[1:]), value)])
                    for x in xs
                ]
            )
        )
    spec = optree.tree_structure(datasets[0], namespace=_tree._NAMESPACE)
    counts = torch.tensor(sizes, dtype=torch.int64)
    mask = torch.arange(longest).unsqueeze(0) < counts.unsqueeze(1)
    return Padded(optree.tree_unflatten(spec, padded), mask, counts)


def batches(
    padded: Padded,
    /,
    steps: int,
    batch_size: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[PyTree, torch.Tensor]:
    """Per-step client batches ``(data, mask)`` with leading dimensions ``(steps, C)``.

    With ``batch_size=None`` every step sees each client's whole (padded) dataset (an expanded
    view, no copy). Otherwise each step draws, for each client independently, ``batch_size``
    distinct examples among its real ones (all of them, plus padding marked ``False`` in the
    mask, for a client with fewer examples).

    Args:
        padded: the result of [`pad`][hypergrad.clients.pad].
        steps: the number of steps (``rounds * K`` for federated rounds).
        batch_size: examples per client and step, or ``None`` for the full batch.
        generator: the random generator for sampling.

    Returns:
        ``(data, mask)``: the data tree with leaves ``(steps, C, B, ...)`` and the bool mask
        ``(steps, C, B)``. Pass it as ``batches=``; the inner loss gets ``(data_c, mask_c)``.

    Examples:
        >>> d = hg.clients.pad([torch.arange(2.0), torch.arange(5.0)])
        >>> data, mask = hg.clients.batches(d, 3, batch_size=4, generator=torch.Generator().manual_seed(0))
        >>> data.shape, mask.sum(-1).tolist()
        (torch.Size([3, 2, 4]), [[2, 4], [2, 4], [2, 4]])
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"hg.clients.batches: steps must be a positive int, got {steps!r}.")
    mask = padded.mask
    if batch_size is None:
        return (
            _tree.map(lambda x: x.expand(steps, *x.shape), padded.data),
            mask.expand(steps, *mask.shape),
        )
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size > mask.shape[1]:
        raise ValueError(
            f"hg.clients.batches: batch_size must be an int in [1, {mask.shape[1]}] (the "
            f"largest client's size), got {batch_size!r}."
        )
    clients, longest = mask.shape
    scores = torch.rand(steps, clients, longest, generator=generator)
    scores = scores.masked_fill(~mask, 2.0)  # padding sorts last
    index = scores.argsort(dim=-1)[..., :batch_size]
    rows = torch.arange(clients).view(1, clients, 1)
    return _tree.map(lambda x: x[rows, index], padded.data), mask[rows, index]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, /) -> torch.Tensor:
    """The mean of ``values`` over the entries where ``mask`` is ``True``.

    ``mask`` covers the leading dimensions of ``values`` (e.g. per-example losses ``(B,)`` or
    predictions ``(B, d)`` with a ``(B,)`` mask); padded entries contribute nothing, also to
    the gradient (even if they hold nan or inf).

    Examples:
        >>> hg.clients.masked_mean(torch.tensor([1.0, 3.0, float("nan")]), torch.tensor([True, True, False]))
        tensor(2.)
    """
    m = mask.reshape(*mask.shape, *([1] * (values.dim() - mask.dim())))
    kept = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    count = m.expand_as(values).sum().clamp_min(1)
    return kept.sum() / count


# --------------------------------------------------------------------------------------------
# in_dims, client counts, the error for modules that cannot be vmapped


def _in_dims(in_dims: Mapping[str, Any] | None, hp: Mapping[str, Any], caller: str) -> dict:
    if in_dims is None:
        in_dims = {}
    if not isinstance(in_dims, Mapping):
        raise TypeError(
            f"{caller}: in_dims must be a dict such as {{'hyperparams': {{'lr': 0}}}}, got "
            f"{type(in_dims).__name__}."
        )
    unknown = [k for k in in_dims if k not in _DEFAULT_IN_DIMS]
    if unknown:
        raise ValueError(
            f"{caller}: in_dims has unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
            f"{', '.join(map(repr, _DEFAULT_IN_DIMS))}."
        )
    dims = {**_DEFAULT_IN_DIMS, **in_dims}
    for key in ("params", "state", "buffers"):
        if dims[key] not in (0, None):
            raise ValueError(
                f"{caller}: in_dims[{key!r}] must be 0 (stacked clients) or None (one tree for "
                f"every client), got {dims[key]!r}."
            )
    h = dims["hyperparams"]
    if isinstance(h, Mapping):
        extra = [k for k in h if k not in hp]
        if extra:
            raise ValueError(
                f"{caller}: in_dims['hyperparams'] names {', '.join(map(repr, extra))}, which "
                f"the optimizer does not have (it has {', '.join(map(repr, hp))})."
            )
        dims["hyperparams"] = {k: h.get(k) for k in hp}
    elif h in (0, None):
        dims["hyperparams"] = {k: h for k in hp}
    else:
        raise ValueError(
            f"{caller}: in_dims['hyperparams'] must be 0, None or a dict such as {{'lr': 0}}, "
            f"got {h!r}."
        )
    return dims


def _leading(tree: PyTree, where: str) -> list[tuple[str, int | None]]:
    return [
        (f"{where}{'' if p == '<root>' else p}", x.shape[0] if x.dim() else None)
        for p, x in zip(_tree.key_paths(tree), _tree.leaves(tree))
        if isinstance(x, torch.Tensor)
    ]


def _count_clients(
    caller: str,
    dims: dict,
    params: PyTree,
    state: PyTree,
    buffers: PyTree,
    hp: Mapping[str, Any],
    weights: Any,
    first_batch: Any,
) -> int:
    """C, from every input said to have a client dimension; raise on a mismatch."""
    found: list[tuple[str, int | None]] = []
    for key, tree in (("params", params), ("state", state), ("buffers", buffers)):
        if dims[key] == 0 and tree is not None:
            found += _leading(tree, key)
    for name, d in dims["hyperparams"].items():
        if d == 0:
            value = hp[name]
            if not _tree.leaves(value) or not all(
                isinstance(x, torch.Tensor) for x in _tree.leaves(value)
            ):
                raise ValueError(
                    f"{caller}: in_dims says hyperparameter {name!r} is per client, but it is "
                    f"{value!r}; pass a tensor with one value per client, e.g. "
                    f"{name}=torch.full((C,), {name}), or drop it from in_dims."
                )
            found += _leading(value, f"hyperparams[{name!r}]")
    if weights is not None:
        found.append(("weights", len(weights)))
    if dims["batches"] == 0:
        found += _leading(first_batch, "the batch of step 0")
    if not found:
        raise ValueError(
            f"{caller}: nothing has a client dimension (params, state, buffers and "
            "hyperparameters are all shared), so the number of clients is unknown. Stack the "
            "params (hg.stack) or give in_dims={'params': 0}."
        )
    first_where, clients = found[0]
    for where, size in found:
        if size is None or size != clients:
            got = "no leading dimension (0-d)" if size is None else f"leading size {size}"
            raise ValueError(
                f"{caller}: every input with a client dimension needs the same leading size; "
                f"{first_where} has {clients} clients but {where} has {got}. Stack it per "
                "client, or say it is shared with in_dims (e.g. in_dims={'hyperparams': None})."
            )
    return int(clients)


_VMAP_INPLACE = (
    "which will be updated in place, were not batched",
    "vmap: inplace arithmetic",
    "is not possible because there exists a Tensor",
)


def _module_in_traceback(error: BaseException) -> str:
    """Name the innermost module whose forward raised (e.g. "'1' (BatchNorm1d) in Sequential")."""
    modules: list[nn.Module] = []
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and (not modules or modules[-1] is not owner):
            modules.append(owner)
        tb = tb.tb_next
    if not modules:
        return "a module in inner_loss"
    inner, outer = modules[-1], modules[0]
    if inner is outer:
        return f"{type(inner).__name__}"
    name = next((n for n, m in outer.named_modules() if m is inner), "?")
    return f"submodule {name!r} ({type(inner).__name__}) of {type(outer).__name__}"


def _vmap_error(error: RuntimeError, caller: str) -> RuntimeError:
    first = str(error).strip().splitlines()[0]
    return RuntimeError(
        f"{caller}: {_module_in_traceback(error)} cannot run under torch.func.vmap over "
        f"clients: its forward updates its own buffers in place (torch: {first}). Carry the "
        "buffers per client: pass buffers= (stacked, e.g. from hg.stack) and return "
        "(loss, new_buffers) from inner_loss(params, aux, batch, buffers) using "
        "hg.call(module, params, x, buffers=buffers, return_buffers=True). Or freeze them: "
        "module.eval(), or track_running_stats=False."
    )


# --------------------------------------------------------------------------------------------
# vmap over trees that hold None or other non-tensor leaves (SGD's state without momentum)

_TENSOR = object()


def _split(tree: PyTree) -> tuple[list[torch.Tensor], tuple[Any, list[Any]]]:
    """The tensor leaves of ``tree`` and what rebuilds it (the spec and the non-tensor leaves)."""
    flat, spec = optree.tree_flatten(tree, namespace=_tree._NAMESPACE)
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    return tensors, (spec, [_TENSOR if isinstance(x, torch.Tensor) else x for x in flat])


def _join(tensors: Sequence[torch.Tensor], meta: tuple[Any, list[Any]]) -> PyTree:
    spec, static = meta
    it = iter(tensors)
    return optree.tree_unflatten(spec, [next(it) if x is _TENSOR else x for x in static])


def _vmap_trees(
    fn: Callable[..., tuple[PyTree, ...]], mapped: int, other_dims: tuple[Any, ...], **options: Any
) -> Callable[..., tuple[PyTree, ...]]:
    """``torch.func.vmap`` of ``fn`` over dim 0 of the tensors of its first ``mapped`` trees.

    Non-tensor leaves (``None``, numbers) of those trees and of ``fn``'s output trees pass
    through unbatched; the remaining arguments are mapped by ``other_dims`` (vmap's in_dims).
    """

    def call(*args: Any) -> tuple[PyTree, ...]:
        flat = [_split(tree) for tree in args[:mapped]]
        metas: list[Any] = []

        def inner(tensors: list[list[torch.Tensor]], *others: Any) -> list[list[torch.Tensor]]:
            trees = [_join(t, meta) for t, (_, meta) in zip(tensors, flat)]
            outs = [_split(out) for out in fn(*trees, *others)]
            metas[:] = [meta for _, meta in outs]
            return [t for t, _ in outs]

        vmapped = torch.func.vmap(inner, in_dims=(0, *other_dims), **options)
        results = vmapped([t for t, _ in flat], *args[mapped:])
        return tuple(_join(t, meta) for t, meta in zip(results, metas))

    return call


# --------------------------------------------------------------------------------------------
# The vmapped step, two ways


def _elementwise(opt: Optimizer) -> bool:
    """Whether ``opt`` is a built-in family: its update is elementwise given a 0-d step count.

    Those families (``hypergrad.optim._common.build``) run one elementwise formula over the
    flattened leaves, with scalar hyperparameters and a state ``(step, buffers like params)``.
    """
    return getattr(opt.update_fn, "__module__", None) == "hypergrad.optim._common"


def _scalar_hp(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_scalar_hp(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _StackedOptimizer:
    """Duck-types ``Optimizer.step`` for stacked clients: each client's update, all at once.

    A built-in (elementwise) optimizer with shared scalar hyperparameters, whose clients all
    stand at the same step count, is applied to the stacked trees directly, as to one model
    C times larger: the same numbers as vmapping it per client, without vmap's per-call
    wrapping or a per-client concatenation of the leaves each step (about a third of a
    reverse-mode hypergradient's time at C=128 in ``benchmarks/clients.py``). Anything else
    (per-client or per-leaf hyperparameters, other optimizers, clients at different steps,
    inside a torch.func transform) is vmapped over the clients.
    """

    def __init__(self, opt: Optimizer, hp_dims: Any, **options: Any) -> None:
        self._opt = opt
        self._direct = _elementwise(opt) and all(d is None for d in hp_dims.values())
        self._update = _vmap_trees(
            lambda p, g, s, h: opt.step(p, g, s, hyperparams=h), 3, (hp_dims,), **options
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
                new_params, new_state = self._opt.step(
                    params, grads, state._replace(step=step), hyperparams=hyperparams
                )
                clients = state.step.shape[0]
                return new_params, new_state._replace(step=new_state.step.expand(clients))
        return self._update(params, grads, state, hyperparams)


def _vmapped_step(
    inner_loss: Callable[..., Any],
    opt: Optimizer,
    has_buffers: bool,
    first_order: bool,
    dims: dict,
    caller: str,
    inner_grad: str,
    **options: Any,
) -> Callable[..., tuple[PyTree, PyTree, PyTree, torch.Tensor]]:
    """``step(params, state, buffers, aux, hp, batch)`` over stacked clients.

    ``"func"``: the engine's step (``torch.func.grad_and_value``) vmapped whole; transformable,
    so it serves ``"forward"`` (jvp). ``"autograd"``: only the clients' losses are vmapped;
    their sum is differentiated by the engine's autograd step (client ``c``'s loss depends on
    client ``c``'s params only, so the gradient of the sum is each client's own gradient),
    and the optimizer update is vmapped. Same numbers; the second records a much lighter
    meta-graph (plain batched ops instead of functorch's wrappers). ``"auto"`` picks
    ``"func"`` inside a torch.func transform, else ``"autograd"``.
    """
    in_dims = (dims["aux"], dims["hyperparams"], dims["batches"])
    single = make_step(
        inner_loss, opt, has_buffers=has_buffers, inner_grad="func", first_order=first_order,
        caller=caller,
    )  # fmt: skip
    by_func = _vmap_trees(single, 3, in_dims, **options)

    def one_loss(p: PyTree, b: PyTree, a: PyTree, batch: Any) -> tuple[torch.Tensor, PyTree]:
        if has_buffers:
            return inner_loss(p, a, batch, b)
        return inner_loss(p, a, batch), None

    losses = _vmap_trees(one_loss, 2, (dims["aux"], dims["batches"]), **options)
    last: list[torch.Tensor] = []

    def total(p: PyTree, a: PyTree, batch: Any, b: PyTree = None) -> Any:
        per_client, new_b = losses(p, b, a, batch)
        last[:] = [per_client]
        if per_client.dim() != 1:
            raise ValueError(
                f"{caller}: inner_loss must return a scalar (0-d) tensor per client, got shape "
                f"{tuple(per_client.shape[1:])}. Reduce it, e.g. return loss.mean()."
            )
        return (per_client.sum(), new_b) if has_buffers else per_client.sum()

    by_autograd = make_step(
        total, _StackedOptimizer(opt, dims["hyperparams"], **options),  # type: ignore[arg-type]
        has_buffers=has_buffers, inner_grad="autograd", first_order=first_order, caller=caller,
    )  # fmt: skip

    def step(p, s, b, a, h, batch):
        func = inner_grad == "func" or (inner_grad == "auto" and in_functorch_transform())
        if func:
            return by_func(p, s, b, a, h, batch)
        p, s, b, summed = by_autograd(p, s, b, a, h, batch)
        return p, s, b, last[0] if summed.requires_grad else last[0].detach()

    return step


# --------------------------------------------------------------------------------------------
# The problem: a vmapped step with round boundaries, an outer loss on the aggregate


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


def _check_chunk_size(chunk_size: Any, caller: str) -> int | None:
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(
            f"{caller}: chunk_size must be a positive int (clients per chunk) or None (all "
            f"clients at once), got {chunk_size!r}."
        )
    return chunk_size


def _setup(
    caller: str,
    inner_loss: Callable[..., Any],
    params: PyTree,
    opt: Optimizer,
    batches: Any,
    *,
    outer: Callable[[PyTree, PyTree, PyTree], torch.Tensor] | None,
    aux: PyTree,
    state: PyTree,
    buffers: PyTree,
    steps: int | None,
    hp: dict[str, Any],
    dims: dict,
    rounds: int,
    aggregate: Callable[[PyTree], PyTree] | None,
    weights: Any,
    chunk_size: int | None,
    randomness: str,
    seed: int | None,
    first_order: bool,
    inner_grad: str = "auto",
    targets: tuple[str, ...] = (),
    hyper_names: tuple[str, ...] = (),
    compile: bool | str = False,
    by_chunk: bool = False,
) -> Federation:
    """Check the inputs and build the clients problem (``by_chunk``: vmap whole chunks)."""
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"{caller}: rounds must be a positive int, got {rounds!r}.")
    if randomness not in _RANDOMNESS:
        raise ValueError(
            f"{caller}: randomness must be 'error', 'different' or 'same' (as in "
            f"torch.func.vmap), got {randomness!r}."
        )
    if aggregate is not None and weights is not None:
        raise ValueError(
            f"{caller}: pass either weights= (for the built-in FedAvg) or aggregate= (your own "
            "function of the stacked tree), not both; fold the weights into your function."
        )
    if aggregate is None:

        def aggregate(tree: PyTree) -> PyTree:
            return fedavg(tree, weights)

    source = Batches(batches, None if steps is None else steps * rounds, caller=caller)
    if steps is None:
        if source.steps % rounds:
            raise ValueError(
                f"{caller}: the batches hold {source.steps} steps, which is not a multiple of "
                f"rounds={rounds}; pass steps=K (local steps per round) with at least "
                f"rounds * K batches."
            )
        steps = source.steps // rounds
    clients = _count_clients(caller, dims, params, state, buffers, hp, weights, source.at(0))
    has_buffers = buffers is not None
    vmap = dict(chunk_size=None if by_chunk else chunk_size, randomness=randomness)
    hp_dims = dims["hyperparams"]
    compile = check_compile(compile, caller=caller)
    vstep = _vmapped_step(
        inner_loss, opt, has_buffers, first_order, dims, caller,
        "func" if compile else inner_grad, **vmap,
    )  # fmt: skip
    if compile:  # the vmapped step (torch.func inside) compiled, S steps per graph
        key = step_key(inner_loss, opt, has_buffers=has_buffers, first_order=first_order,
                       clients=repr(dims), vmap=tuple(vmap.values()))  # fmt: skip
        vstep = compile_step(vstep, compile=compile, caller=caller, key=key, steps=steps)
    init_one = _vmap_trees(lambda p, h: (opt.init(p, hyperparams=h),), 1, (hp_dims,), **vmap)

    def vinit(p: PyTree, h: Mapping[str, Any]) -> PyTree:
        return init_one(p, h)[0]

    def spread(tree: PyTree, key: str) -> PyTree:
        return broadcast(tree, clients) if dims[key] is None and tree is not None else tree

    def init(p: PyTree, h: Mapping[str, Any]) -> PyTree:
        return spread(state, "state") if state is not None else vinit(spread(p, "params"), h)

    def prelude(k: int, p: PyTree, s: PyTree, b: PyTree, h: Mapping[str, Any]) -> tuple:
        if k == 0:
            p, b = spread(p, "params"), spread(b, "buffers")
        elif k % steps == 0:  # a new round: aggregate, broadcast, fresh local optimizers
            p = broadcast(aggregate(p), clients)
            b = broadcast(aggregate(b), clients) if has_buffers else b
            s = vinit(p, h)
        return p, s, b

    def guarded_step(p, s, b, a, h, batch):
        try:
            return vstep(p, s, b, a, h, batch)
        except RuntimeError as error:
            if any(marker in str(error) for marker in _VMAP_INPLACE):
                raise _vmap_error(error, caller) from error
            raise

    def federated_step(p, s, b, a, h, tagged):
        k, batch = tagged
        p, s, b = prelude(k, p, s, b, h)
        return guarded_step(p, s, b, a, h, batch)

    def server_outer(p: PyTree, b: PyTree, a: PyTree) -> torch.Tensor:
        assert outer is not None
        return outer(aggregate(p), aggregate(b) if has_buffers else None, a)

    multi = multi_step(vstep)
    problem = Problem(
        step=federated_step,
        outer=server_outer if outer is not None else (lambda p, b, a: torch.zeros(())),
        params=params,
        state=None,
        buffers=buffers,
        aux=aux,
        hyperparams=hp,
        batch_at=lambda k: (k, source.at(k)),
        steps=steps * rounds,
        seed=draw_seed() if seed is None else seed,
        targets=targets,
        hyper_names=hyper_names,
        devices=rng_devices(params),
        init=init,
        multi=None if multi is None else _WithinRounds(multi, steps, prelude),
    )
    return Federation(
        problem=problem,
        step=guarded_step,
        multi=multi,
        init=vinit,
        start=lambda: Carry(
            spread(params, "params"), spread(state, "state"), spread(buffers, "buffers")
        ),
        aggregate=aggregate,
        server_outer=server_outer,
        batch_at=source.at,
        clients=clients,
        steps=steps,
        rounds=rounds,
        dims=dims,
        randomness=randomness,
    )


# --------------------------------------------------------------------------------------------
# Public: unroll and hypergrad over clients


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
    in_dims: Mapping[str, Any] | None = None,
    rounds: int = 1,
    aggregate: Callable[[PyTree], PyTree] | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
    seed: int | None = None,
    check_finite: bool = True,
    compile: bool | str = False,
) -> Trajectory:
    """Run K optimizer steps of every client at once (``torch.func.vmap``), for R rounds.

    The per-client view is exactly [`hg.unroll`][hypergrad.unroll]'s: ``inner_loss(params, aux,
    batch)`` sees one client's params, its batch, and ``aux`` (shared, or the client's slice).
    Differentiable like [`hg.unroll`][hypergrad.unroll] (autograd records the steps when an input
    requires grad). See [`hg.clients`][hypergrad.clients] for ``in_dims``, rounds and buffers.

    Args:
        inner_loss: ``inner_loss(params, aux, batch) -> scalar`` for one client; with
            ``buffers`` it is ``inner_loss(params, aux, batch, buffers) -> (loss, new_buffers)``.
        params: stacked client params (leading dim C), or one tree with
            ``in_dims={"params": None}``.
        opt: a functional optimizer (each client gets its own state).
        batches: stacked ``(rounds * K, C, ...)`` tensors (or tuple/dict of them), a function
            ``batch_fn(k)`` returning step ``k``'s client-stacked batch, or an iterable of those.
        aux: passed to every client's ``inner_loss``.
        state: initial stacked optimizer state; default: a fresh state per client.
        buffers: stacked buffers carried per client (see the module docstring).
        steps: K, local steps per round; default: the number of batches divided by ``rounds``.
        hyperparams: replaces ``opt.hyperparams``; per-client ones are named in ``in_dims``.
        in_dims: which inputs have a client dimension (see [`hg.clients`][hypergrad.clients]).
        rounds: R federated rounds; between rounds the clients are aggregated and reset.
        aggregate: ``fn(stacked_tree) -> tree``; default [`fedavg`][hypergrad.clients.fedavg] with
            ``weights``.
        weights: FedAvg weights, one per client (e.g. sample counts).
        chunk_size: as in ``torch.func.vmap``: clients per chunk inside a step.
        randomness: as in ``torch.func.vmap``: ``"error"``, ``"different"`` or ``"same"``.
        seed: base seed; step ``k`` runs with ``seed + k`` (see [`hg.unroll`][hypergrad.unroll]).
        check_finite: check the losses and final params once; name the step and key if not.
        compile: compile the vmapped step with ``torch.compile`` (``True``: eager fallback
            with ``hg.CompileFallbackWarning``; ``"strict"``: raise); see ``hg.unroll``.

    Returns:
        ``Trajectory(params, state, buffers, losses)``: the clients' stacked values after the
        last local step (not aggregated; apply [`fedavg`][hypergrad.clients.fedavg] for the server),
        and ``losses`` of shape ``(rounds * K, C)``.

    Raises:
        ValueError: bad ``in_dims``, inconsistent client counts, batches that run out.
        RuntimeError: a module that updates its own buffers in place (names it, gives the fix).

    Examples:
        >>> loss = lambda p, aux, x: ((p["w"] - x) ** 2).sum()
        >>> params = {"w": torch.zeros(4, 1)}                       # 4 clients
        >>> data = torch.arange(4.0).reshape(1, 4, 1).expand(3, 4, 1)  # 3 steps, one target each
        >>> traj = hg.clients.unroll(loss, params, hg.optim.sgd(lr=0.25), data)
        >>> traj.params["w"].flatten(), traj.losses.shape
        (tensor([0.0000, 0.8750, 1.7500, 2.6250]), torch.Size([3, 4]))
    """
    caller = "hg.clients.unroll"
    check_opt(opt, caller=caller)
    check_params(params, caller=caller)
    hp = dict(opt.hyperparams)  # every value: a cached compiled step may close over another opt
    hp.update(hyperparams or {})
    problem = _setup(
        caller,
        inner_loss,
        params,
        opt,
        batches,
        outer=None,
        aux=aux,
        state=state,
        buffers=buffers,
        steps=steps,
        hp=hp,
        dims=_in_dims(in_dims, hp, caller),
        rounds=rounds,
        aggregate=aggregate,
        weights=weights,
        chunk_size=chunk_size,
        randomness=randomness,
        seed=seed,
        first_order=False,
        compile=compile,
    ).problem
    carry, aux_in, hp_in = problem.bind({})
    carry, losses = run_steps(problem, carry, aux_in, hp_in, 0, problem.steps)
    stacked = torch.stack(losses)
    if check_finite:
        final = [x for x in _tree.leaves(carry.params) if isinstance(x, torch.Tensor)]
        if not all_finite(stacked, *final):
            locate_nonfinite(problem, caller=caller)
    return Trajectory(carry.params, carry.state, carry.buffers, stacked)


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
    in_dims: Mapping[str, Any] | None = None,
    rounds: int = 1,
    aggregate: Callable[[PyTree], PyTree] | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
    seed: int | None = None,
    check_finite: bool = True,
    compile: bool | str = False,
) -> Hypergradient:
    """The gradient of a server-side outer loss through R rounds of K steps of C clients.

    The clients train as in [`unroll`][hypergrad.clients.unroll] (vmapped, aggregated between
    rounds); the outer loss is evaluated on the aggregate of their final params:

        outer_loss(aggregate(params_final), aux, outer_batch)       # or (..., server_buffers)

    and differentiated with any method of [`hg.hypergrad`][hypergrad.hypergrad] with respect to
    ``wrt``: ``"aux"`` (e.g. an auxiliary model that parameterises every client's regulariser),
    hyperparameter names or ``"hyperparams"`` (shared ones get one gradient, per-client ones a
    gradient with the client dimension), and ``"params"`` (the initial params: per client, or
    the one shared tree with ``in_dims={"params": None}``).

    Args:
        outer_loss: ``outer_loss(server_params, aux, outer_batch) -> scalar`` (with
            ``buffers``: ``outer_loss(server_params, aux, outer_batch, server_buffers)``).
        inner_loss: one client's loss, as in [`unroll`][hypergrad.clients.unroll].
        params: stacked client params, or one tree with ``in_dims={"params": None}``.
        opt: the functional optimizer.
        batches: as in [`unroll`][hypergrad.clients.unroll].
        outer_batch: passed unchanged to ``outer_loss``.
        aux: the auxiliary tree.
        method: ``"reverse"``, ``hg.Truncated(T)``, ``hg.Checkpointed(S)``, ``"forward"`` /
            ``hg.Forward(n)`` or ``"first_order"`` (T and S count steps over all rounds).
        wrt: what to differentiate, as in [`hg.hypergrad`][hypergrad.hypergrad].
        state: initial stacked optimizer state; default: fresh per client.
        buffers: stacked buffers carried per client.
        steps: K, local steps per round.
        hyperparams: replacements for some of ``opt.hyperparams``.
        in_dims: which inputs have a client dimension (see [`hg.clients`][hypergrad.clients]).
        rounds: R federated rounds.
        aggregate: ``fn(stacked_tree) -> tree``; default [`fedavg`][hypergrad.clients.fedavg] with
            ``weights``.
        weights: FedAvg weights, one per client.
        chunk_size: clients per chunk. With a reverse-mode method the hypergradient is taken
            chunk by chunk (memory bounded by the chunk, one extra forward pass; see
            [`hg.clients`][hypergrad.clients]); with ``"forward"`` it is vmap's ``chunk_size``.
        randomness: as in ``torch.func.vmap`` (with chunks, each chunk draws its own numbers).
        seed: base seed of the steps' random numbers.
        check_finite: check once that the result is finite; name the step and key if not.
        compile: compile the vmapped step with ``torch.compile``, as in ``hg.hypergrad``
            (``"forward"`` runs eagerly with ``hg.CompileFallbackWarning``; ``"strict"`` raises).

    Returns:
        ``Hypergradient(value, aux, hyperparams, params)``.

    Raises:
        ValueError: bad ``wrt``/``in_dims``/``chunk_size``, inconsistent client counts, a
            non-scalar loss, or (with chunks) buffers that depend differentiably on the params.
        TypeError: a differentiated leaf that is not a floating-point tensor.
        RuntimeError: a module that updates its own buffers in place (names it, gives the fix).
        FloatingPointError: a nan/inf loss, update or hypergradient.

    Examples:
        Three clients pull their weight towards their own target plus a shared offset ``aux``;
        the server (their mean) should match 1.0. After 5 steps each client has moved
        ``1 - 0.8**5 = 0.672`` of the way, so the server sits at ``0.672 * (1 + aux) = 1.008``:

        >>> inner = lambda p, aux, t: ((p["w"] - t - aux) ** 2).sum()
        >>> outer = lambda server, aux, target: ((server["w"] - target) ** 2).sum()
        >>> targets = torch.tensor([[0.0], [1.0], [2.0]]).expand(5, 3, 1)  # 5 steps, 3 clients
        >>> g = hg.clients.hypergrad(outer, inner, {"w": torch.zeros(1)}, hg.optim.sgd(lr=0.1),
        ...     targets, torch.tensor([1.0]), aux=torch.tensor([0.5]), in_dims={"params": None})
        >>> round(g.value.item(), 4), round(g.aux.item(), 4)
        (0.0001, 0.0114)
    """
    caller = "hg.clients.hypergrad"
    how = resolve(method, caller=caller)
    check_opt(opt, caller=caller)
    check_params(params, caller=caller)
    hp: dict[str, Any] = dict(opt.hyperparams)
    hp.update(hyperparams or {})
    targets, names = _parse_wrt(wrt, aux, hp, opt, caller)
    first = _tree.leaves(params)[0]  # check_params: a non-empty tree of floating-point tensors
    for name in names:
        hp[name] = _to_tensor(hp[name], first.dtype, first.device)
    if "aux" in targets:
        _check_float(aux, "aux", caller)
    by_chunk = _check_chunk_size(chunk_size, caller) is not None and chunkable(how)
    federation = _setup(
        caller,
        inner_loss,
        params,
        opt,
        batches,
        outer=outer_fn(outer_loss, outer_batch, buffers is not None, caller),
        aux=aux,
        state=state,
        buffers=buffers,
        steps=steps,
        hp=hp,
        dims=_in_dims(in_dims, hp, caller),
        rounds=rounds,
        aggregate=aggregate,
        weights=weights,
        chunk_size=chunk_size,
        randomness=randomness,
        seed=seed,
        first_order=how.first_order,
        inner_grad="func" if how.functional else "auto",
        targets=targets,
        hyper_names=names,
        compile=compile,
        by_chunk=by_chunk,
    )
    problem = federation.problem
    how.validate(problem, caller=caller)
    if by_chunk and chunk_size < federation.clients:
        result = by_chunks(federation, how, chunk_size, caller=caller)
    else:
        result = how(problem)
    if check_finite:
        grads = [g for g in _tree.leaves(result.grads) if isinstance(g, torch.Tensor)]
        if not all_finite(result.value, result.losses, *grads):
            _raise_nonfinite(problem, result.value, result.grads, caller)
    return Hypergradient(
        result.value,
        result.grads.get("aux"),
        result.grads.get("hyperparams"),
        result.grads.get("params"),
    )

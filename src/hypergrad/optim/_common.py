"""Machinery shared by the optimizer families: the flat-group step and the family builder.

Every family writes its maths once, as a function of one group's flat tensors (``math(Flat(p,
g, buffers, step, hp, options))``). ``flat_update`` runs it once per (dtype, device) group of leaves: the leaves of
the params, grads and state buffers are concatenated into one flat vector each, per-parameter
hyperparameters become flat vectors the same way, the maths runs once on the flat vectors, and the
results are split back into leaves. This batches the tensor work like ``torch._foreach_*`` does,
but with ordinary differentiable ops, so it works under ``torch.func.grad``, ``jvp``, ``vmap``
(foreach ops have no vmap batching rule) and ``torch.autograd.grad(create_graph=True)``.

A family may also give an in-place form of its maths (``InPlace``), which the engine's plain
training uses: inside ``donated()`` (the inputs are the caller's to overwrite) and when nothing
is recorded, ``flat_update`` runs it on the leaves with ``torch._foreach_*`` ops, writing into
the params and the state as torch.optim does, instead of concatenating and allocating new
vectors every step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, cast

import optree
import torch

from hypergrad._boundary import caller, entered, is_number
from hypergrad.optim._hyper import (
    Scalar,
    check_hyperparams,
    concrete,
    flat_hp,
    in_functorch_transform,
    is_zero,
    resolve,
    resolve_all,
    scalar_step_dtype,
)
from hypergrad.tree import _NAMESPACE, PyTree, keystr
from hypergrad.tree._base import describe_difference, same_structure

Buffers = dict[str, Any]  # a tensor per buffer, None where the options turn it off


# --------------------------------------------------------------------------- hyperparameters


# --------------------------------------------------------------------------- safe maths


def safe_sqrt(x: torch.Tensor, *, nonnegative: bool = True) -> torch.Tensor:
    """``torch.sqrt`` with the same forward values and a finite backward at zero.

    ``sqrt`` has an infinite derivative at 0; when the input came from a square of a zero
    gradient element the chain rule gives ``inf * 0 = nan``. The double-``where`` trick avoids
    it: the inner step feeds ``sqrt`` a harmless 1 where ``x <= 0`` (``threshold(x, 0, 1)``, the
    same values as ``where(x > 0, x, 1)`` in one kernel), the outer step puts the exact forward
    value back (0 at 0, as a multiply by the mask ``x > 0``; ``sqrt`` of the detached input,
    i.e. nan, for negative values when ``nonnegative=False``), so the backward through those
    elements is 0.
    """
    positive = x > 0
    root = torch.sqrt(torch.nn.functional.threshold(x, 0.0, 1.0))
    if nonnegative:
        return root * positive
    return torch.where(positive, root, torch.sqrt(x.detach()))


def once_per_step(x: Scalar) -> Scalar:
    """``x``, a 0-d tensor of per-step scalar maths, computed once per step under torch.compile.

    Inductor inlines a 0-d computation into every elementwise kernel that reads it, and g++
    keeps libm calls inside the loop (inductor compiles with ``-fmath-errno``), so Adam's
    ``1 - beta2 ** t`` and its square root would be recomputed for every vector of every
    parameter: half the time of a compiled Adam step on a 270K-parameter MLP. A reduction is
    a loop of its own whose one result the elementwise loop reads; the max of two copies of
    ``x`` is ``x`` exactly, and so is its gradient. Eager (and non-0-d input): ``x`` itself.

    Examples:
        >>> once_per_step(torch.tensor(0.5))
        tensor(0.5000)
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 0 or not torch.compiler.is_compiling():
        return x
    return x.expand(2).amax()


def axpy(x: torch.Tensor, a: Scalar, y: torch.Tensor) -> torch.Tensor:
    """``x + a * y``; one fused ``add(alpha=)`` kernel when ``a`` is a number (as torch.optim)."""
    if is_number(a):
        return torch.add(x, y, alpha=a)
    return x + a * y


# --------------------------------------------------------------------------- the flat step


class Flat(NamedTuple):
    """What a family's maths gets for one flat group of leaves (see ``flat_update``)."""

    p: torch.Tensor
    g: torch.Tensor
    bufs: Buffers
    step: torch.Tensor
    hp: Mapping[str, Any]
    options: Mapping[str, Any]

    def grad(self, *, l2: bool = True) -> torch.Tensor:
        """The gradient torch.optim steps along: negated with ``maximize``, plus the L2 decay.

        ``weight_decay * p`` is added unless ``l2=False`` (AdamW decays the parameters instead).
        """
        g = -self.g if self.options["maximize"] else self.g
        wd = self.hp["weight_decay"]
        return g if not l2 or is_zero(wd) else axpy(g, wd, self.p)


Math = Callable[[Flat], tuple[torch.Tensor, Buffers]]


class Leaves(NamedTuple):
    """What a family's in-place maths gets: the leaves of the params, grads and buffers."""

    p: list[torch.Tensor]
    g: list[torch.Tensor]
    bufs: dict[str, list[torch.Tensor] | None]
    step: torch.Tensor
    hp: Mapping[str, Any]
    options: Mapping[str, Any]

    def grad(self, *, l2: bool = True) -> list[torch.Tensor]:
        """``Flat.grad`` leaf by leaf (new tensors where it changes them); a number decay only."""
        g = list(torch._foreach_neg(self.g)) if self.options["maximize"] else self.g
        wd = self.hp["weight_decay"]
        return g if not l2 or is_zero(wd) else list(torch._foreach_add(g, self.p, alpha=wd))


# The same maths as the family's ``Math``, written into the leaves of ``p`` and of the buffers
# with the same kernels (so the same numbers, bit for bit), for number hyperparameters; returns
# False, having changed nothing, where it does not apply (a hyperparameter that is a tensor or a
# per-parameter dict, torch.optim's first-step branch): the out-of-place maths runs instead.
InPlace = Callable[[Leaves], bool]


# --------------------------------------------------------------------------- donated steps

_DONATED: contextvars.ContextVar[bool] = contextvars.ContextVar("hypergrad_donated", default=False)


@contextlib.contextmanager
def donated() -> Iterator[None]:
    """Inside: the params and state given to a family's update are the caller's to overwrite.

    The engine enters it for a step whose inputs are the previous step's outputs, held by
    nothing else (plain training without a graph: ``hg.Implicit``'s, ``hg.unroll``'s). A
    family's update on CPU tensors then writes into those tensors and returns them (see
    ``flat_update``); the values are the same, bit for bit, as the out-of-place ones.
    """
    token = _DONATED.set(True)
    try:
        yield
    finally:
        _DONATED.reset(token)


def numbers(hp: Mapping[str, Any], *names: str) -> bool:
    """Whether the hyperparameters ``names`` are all Python numbers (what ``InPlace`` takes)."""
    return all(is_number(hp[name]) for name in names)


def _writable(tensors: list[torch.Tensor], hp: Mapping[str, Any]) -> bool:
    """Whether an update may write into its inputs: donated, eager, and nothing recorded."""
    if torch.compiler.is_compiling():  # (and dynamo cannot trace a ContextVar)
        return False
    if not _DONATED.get() or in_functorch_transform():
        return False
    # CPU only: there a new vector costs page faults each step, which torch.optim avoids by
    # writing in place. CUDA's caching allocator reuses memory, and this path has not been
    # measured on a GPU yet (tests/test_cuda.py pins the donated steps' numbers there).
    if any(t.device.type != "cpu" for t in tensors):
        return False
    if not torch.is_grad_enabled():
        return True
    hp_leaves: list[Any] = optree.tree_leaves(cast(Any, dict(hp)))
    hp_tensors = [x for x in hp_leaves if isinstance(x, torch.Tensor)]
    return not any(t.requires_grad for t in (*tensors, *hp_tensors))


TRAINABLE = (
    "only floating-point tensors can be trained. Move integer tensors into buffers or the batch."
)


def check_floating(what: str, leaves: list[Any], spec: optree.PyTreeSpec, why: str) -> None:
    """Raise a ``TypeError`` naming the first leaf of ``what`` that is not floating-point.

    Examples:
        >>> leaves, spec = optree.tree_flatten({"w": torch.ones(1, dtype=torch.long)})
        >>> check_floating("params", leaves, spec, TRAINABLE)
        Traceback (most recent call last):
        ...
        TypeError: hypergrad: params leaf ['w'] is torch.int64; only floating-point tensors can be trained. Move integer tensors into buffers or the batch.
    """
    for path, leaf in zip(spec.paths(), leaves):
        if isinstance(leaf, torch.Tensor) and not leaf.is_floating_point():
            raise TypeError(f"{caller()}: {what} leaf {keystr(path)} is {leaf.dtype}; {why}")


def _check_shapes(
    what: str, leaves: list[Any], spec: optree.PyTreeSpec, shapes: list, fix: str
) -> None:
    """Raise a ``ValueError`` naming the first leaf of ``what`` not shaped like its parameter."""
    for path, leaf, shape in zip(spec.paths(), leaves, shapes):
        if leaf.shape != shape:
            raise ValueError(
                f"{caller()}: {what}{keystr(path)} has shape {tuple(leaf.shape)} but "
                f"params{keystr(path)} has shape {tuple(shape)}{fix}"
            )


def _explain(what: str, params: PyTree, other: PyTree) -> None:
    detail = describe_difference(params, other, "params", what)
    raise ValueError(
        f"{caller()}: {what} does not have the structure of params: {detail}. Pass {what} "
        "keyed exactly like params (e.g. torch.func.grad of a loss of params)."
    )


class _Group(NamedTuple):
    """One (dtype, device) group of leaves: their indices, sizes and shapes, fixed per layout."""

    idx: list[int]
    sizes: list[int]
    shapes: list[torch.Size]
    flat: list[bool]  # leaf i is already 1-d of its own size: no reshape needed


_LAYOUTS: dict[Any, list[_Group]] = {}


def _layout(spec: optree.PyTreeSpec, p_leaves: list[torch.Tensor]) -> list[_Group]:
    """The groups of a params tree; cached on (structure, shapes, dtypes, devices) when eager."""
    key = None
    if not torch.compiler.is_compiling():
        key = (spec, *[(p.shape, p.dtype, p.device) for p in p_leaves])
        hit = _LAYOUTS.get(key)
        if hit is not None:
            return hit
    by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, p in enumerate(p_leaves):
        by_kind.setdefault((p.dtype, p.device), []).append(i)
    groups = [
        _Group(
            idx,
            [p_leaves[i].numel() for i in idx],
            [p_leaves[i].shape for i in idx],
            [p_leaves[i].dim() == 1 for i in idx],
        )
        for idx in by_kind.values()
    ]
    if key is not None:
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.clear()
        _LAYOUTS[key] = groups
    return groups


def flat_update(
    math: Math,
    params: PyTree,
    grads: PyTree,
    buffers: Mapping[str, PyTree | None],
    step: torch.Tensor,
    hyperparams: Mapping[str, Any],
    options: Mapping[str, Any],
    in_place: InPlace | None = None,
) -> tuple[PyTree, dict[str, PyTree | None]]:
    """Run ``math`` once per (dtype, device) group on flat vectors; return new params, buffers.

    ``math`` gets a ``Flat``: flat tensors ``p``, ``g``, a dict of flat buffers (``None`` for a
    buffer that is off), the new step count, the hyperparameters (numbers, 0-d tensors or flat
    vectors) and the options; it returns ``(new_p, new_bufs)``.

    The per-structure work (grouping, sizes, shapes) is cached; when the params or a buffer
    are the consecutive views of one flat vector (as this function returns them) that vector
    is used as is instead of concatenating the leaves again.

    ``in_place``: the family's in-place maths, run instead of ``math`` inside ``donated()``
    when no autograd graph or torch.func transform records the step: it writes into the
    leaves of the params and buffers, and the same trees are returned.
    """
    p_leaves, spec = optree.tree_flatten(params, namespace=_NAMESPACE)
    g_leaves, g_spec = optree.tree_flatten(grads, namespace=_NAMESPACE)
    if not same_structure(grads, params, specs=(g_spec, spec)):
        _explain("grads", params, grads)
    shapes = [p.shape for p in p_leaves]
    if [g.shape for g in g_leaves] != shapes:
        _check_shapes("grads", g_leaves, spec, shapes, ". Pass grads shaped like params.")
    if not all(x.is_floating_point() for x in (*p_leaves, *g_leaves)):
        check_floating("params", p_leaves, spec, TRAINABLE)
        check_floating("grads", g_leaves, spec, "gradients are floating-point tensors.")
    b_leaves: dict[str, list[torch.Tensor] | None] = {}
    for name, tree in buffers.items():
        if tree is None:
            b_leaves[name] = None
            continue
        leaves, b_spec = optree.tree_flatten(tree, namespace=_NAMESPACE)
        if not same_structure(tree, params, specs=(b_spec, spec)):
            _explain(f"state.{name}", params, tree)
        if [b.shape for b in leaves] != shapes:
            fix = (
                ": the state was built for other params. Build it for these with opt.init(params)."
            )
            _check_shapes(f"state.{name}", leaves, spec, shapes, fix)
        b_leaves[name] = leaves
    hp = resolve_all(hyperparams, spec, shapes)
    every = [*p_leaves, *g_leaves, *[b for v in b_leaves.values() if v is not None for b in v]]
    if (
        in_place is not None
        and _writable(every, hp)
        and in_place(Leaves(p_leaves, g_leaves, b_leaves, step, hp, options))
    ):
        return params, dict(buffers)  # written in place
    groups = _layout(spec, p_leaves)
    n = len(p_leaves)
    new_p: list[Any] = [None] * n
    new_b: dict[str, list[Any] | None] = {
        k: (None if v is None else [None] * n) for k, v in b_leaves.items()
    }
    for group in groups:
        idx = group.idx
        p = _cat(p_leaves, group)
        ghp = {
            k: tuple(flat_hp(x, idx, shapes, p) for x in v)
            if isinstance(v, tuple)
            else flat_hp(v, idx, shapes, p)
            for k, v in hp.items()
        }
        bufs = {k: (None if v is None else _cat(v, group)) for k, v in b_leaves.items()}
        out_p, out_b = math(Flat(p, _cat(g_leaves, group), bufs, step, ghp, options))
        _scatter(out_p, group, new_p)
        for k, v in out_b.items():
            if v is not None:
                _scatter(v, group, new_b[k])  # type: ignore[arg-type]
    params_out = optree.tree_unflatten(spec, new_p)
    bufs_out = {
        k: (None if v is None else optree.tree_unflatten(spec, v)) for k, v in new_b.items()
    }
    return params_out, bufs_out


def _cat(leaves: list[torch.Tensor], group: _Group) -> torch.Tensor:
    """The leaves of one group as one flat vector (their common base when they are views of it)."""
    idx = group.idx
    if len(idx) == 1:
        return leaves[idx[0]].reshape(-1)
    if len(idx) == len(leaves):
        chosen = leaves
    else:
        chosen = [leaves[i] for i in idx]
    if concrete(chosen[0]):
        base = _flat_base(chosen, group.sizes)
        if base is not None:
            return base
        # One C++ call: cat of the flattened leaves, the same differentiable ops as below.
        return torch._utils._flatten_dense_tensors(chosen)
    return torch.cat([t if flat else t.reshape(-1) for t, flat in zip(chosen, group.flat)])


def _flat_base(leaves: list[torch.Tensor], sizes: list[int]) -> torch.Tensor | None:
    """The flat vector the leaves are consecutive views of (as our own step returns), or None.

    Using it instead of ``torch.cat`` saves a copy per step; the gradient is the same because
    each leaf is a slice of it. Only for plain tensors (the caller checks ``concrete``).
    """
    base = leaves[0]._base
    if base is None or base.dim() != 1 or base.numel() != sum(sizes):
        return None
    offset = base.storage_offset()
    for leaf, size in zip(leaves, sizes):
        if leaf._base is not base or leaf.storage_offset() != offset or not leaf.is_contiguous():
            return None
        offset += size
    return base


def _scatter(flat: torch.Tensor, group: _Group, out: list) -> None:
    idx = group.idx
    if len(idx) == 1:
        out[idx[0]] = flat.reshape(group.shapes[0])
        return
    pieces = flat.split_with_sizes(group.sizes)
    for i, piece, shape, is_flat in zip(idx, pieces, group.shapes, group.flat):
        out[i] = piece if is_flat else piece.reshape(shape)


# --------------------------------------------------------------------------- family builder


def build(
    name: str,
    state_cls: Any,
    hyperparams: dict[str, Any],
    options: dict[str, Any],
    *,
    buffers: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]],
    math: Math,
    check: Callable[[Mapping[str, Any], Mapping[str, Any]], None] = check_hyperparams,
    in_place: InPlace | None = None,
) -> Any:
    """Assemble an [`Optimizer`][hypergrad.optim.Optimizer] from a family's maths.

    The family constructor ``hg.optim.<name>``'s body: checks the hyperparameters as that call.
    ``buffers(hyperparams, options)`` maps each buffer field of ``state_cls`` to ``None`` (off)
    or to its initial value (a hyperparameter form, e.g. ``0.0``); ``math`` is described in
    ``flat_update``; ``check(hyperparams, options)`` raises for invalid values; ``in_place`` is
    the same maths written into the donated vectors (``InPlace``), or ``None``.
    """
    from hypergrad.optim._base import Optimizer

    with entered(f"hg.optim.{name}"):
        check(hyperparams, options)

    def init_fn(params: PyTree, hp: Mapping[str, Any], opts: Mapping[str, Any]) -> Any:
        paths, p_leaves, spec = optree.tree_flatten_with_path(params, namespace=_NAMESPACE)
        for path, leaf in zip(paths, p_leaves):
            if not isinstance(leaf, torch.Tensor):
                raise ValueError(
                    f"{caller()}: parameter {keystr(path)} is a {type(leaf).__name__}, not a "
                    "tensor; pass a tree of tensors such as hg.split(model)[0]."
                )
        check_floating("params", p_leaves, spec, TRAINABLE)
        shapes = [p.shape for p in p_leaves]
        device = p_leaves[0].device if p_leaves else None
        step = torch.zeros((), dtype=scalar_step_dtype(), device=device)
        fields: dict[str, Any] = {}
        for field, start in buffers(hp, opts).items():
            if start is None:
                fields[field] = None
                continue
            value = resolve(field, start, paths, shapes, spec)
            leaves = []
            for i, p in enumerate(p_leaves):
                v = value[i] if isinstance(value, list) else value
                leaves.append(torch.zeros_like(p) if is_zero(v) else torch.zeros_like(p) + v)
            fields[field] = optree.tree_unflatten(spec, leaves)
        return state_cls(step, **fields)

    def update_fn(
        params: PyTree, grads: PyTree, state: Any, hp: Mapping[str, Any], opts: Mapping[str, Any]
    ) -> tuple[PyTree, Any]:
        if not isinstance(state, state_cls):
            raise ValueError(
                f"{caller()}: state is a {type(state).__name__}; expected the "
                f"{state_cls.__name__} returned by opt.init(params) or a previous opt.step."
            )
        step = state.step + 1
        bufs = {f: getattr(state, f) for f in state_cls._fields[1:]}
        new_params, new_bufs = flat_update(math, params, grads, bufs, step, hp, opts, in_place)
        return new_params, state_cls(step, **new_bufs)

    return Optimizer(name, hyperparams, options, init_fn, update_fn, check, elementwise=True)


def register_states(*classes: type) -> None:
    """Let ``torch.load(weights_only=True)`` rebuild the state NamedTuples."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(list(classes))

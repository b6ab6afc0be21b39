"""Machinery shared by the optimizer families: hyperparameter checks and the flat-group step.

Every family writes its maths once, as a function of tensors (``math(p, g, buffers, step, hp,
options)``). :func:`flat_update` runs it once per (dtype, device) group of leaves: the leaves of
the params, grads and state buffers are concatenated into one flat vector each, per-parameter
hyperparameters become flat vectors the same way, the maths runs once on the flat vectors, and the
results are split back into leaves. This batches the tensor work like ``torch._foreach_*`` does,
but with ordinary differentiable ops, so it works under ``torch.func.grad``, ``jvp``, ``vmap``
(foreach ops have no vmap batching rule) and ``torch.autograd.grad(create_graph=True)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optree
import torch

from hypergrad.tree import _NAMESPACE, PyTree, keystr

Scalar = float | torch.Tensor
Math = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor | None]]]


def is_number(x: Any) -> bool:
    """A real Python number (bools are not hyperparameters)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_zero(x: Any) -> bool:
    """True only for the literal number 0: a tensor (even a zero one) keeps its branch."""
    return is_number(x) and x == 0


def concrete(t: torch.Tensor) -> bool:
    """Whether ``t`` holds real values that may be read (not under vmap/grad/compile)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    return t.device.type != "meta"


def scalar_step_dtype() -> torch.dtype:
    """The dtype torch.optim uses for its ``step`` counters (float64 iff that is the default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# --------------------------------------------------------------------------- hyperparameters


def _values(value: Any) -> Iterator[tuple[str, float]]:
    """Yield ``(where, number)`` for every value of a hyperparameter that can be read now."""
    if is_number(value):
        yield "", float(value)
    elif isinstance(value, torch.Tensor):
        if concrete(value) and value.numel():
            yield "", float(value.detach().min())
            yield "", float(value.detach().max())
    elif isinstance(value, Mapping):
        for key, item in value.items():
            for where, number in _values(item):
                yield f"[{key!r}]{where}", number


def check_range(
    caller: str, name: str, value: Any, *, low: float = 0.0, high: float | None = None
) -> None:
    """Raise ``ValueError`` if a readable value of ``name`` lies outside ``[low, high)``."""
    for where, number in _values(value):
        bad = not (number >= low) or (high is not None and not number < high)
        if bad:
            interval = f"[{low}, {high})" if high is not None else f">= {low}"
            raise ValueError(
                f"{caller}: invalid {name}{where}: {number}; it must be {interval}, "
                "as in torch.optim."
            )


def check_form(caller: str, name: str, value: Any) -> None:
    """Check that a hyperparameter is a number, a tensor or a per-parameter dict of those."""
    if is_number(value) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not (is_number(item) or isinstance(item, torch.Tensor)):
                raise ValueError(
                    f"{caller}: {name}[{key!r}] is a {type(item).__name__}; each entry of a "
                    "per-parameter dict must be a float, a 0-d tensor or a tensor shaped like "
                    "that parameter."
                )
        return
    raise ValueError(
        f"{caller}: {name} is a {type(value).__name__}; expected a float, a 0-d tensor, a "
        "per-parameter dict keyed like the params, or a tensor shaped like the parameter."
    )


def resolve(
    caller: str,
    name: str,
    value: Any,
    paths: list[tuple[Any, ...]],
    shapes: list[torch.Size],
    spec: optree.PyTreeSpec,
) -> Scalar | list[Scalar]:
    """Turn a hyperparameter into a scalar (number or 0-d tensor) or one value per leaf."""
    if is_number(value):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value
        if value.numel() == 1 and len({tuple(s) for s in shapes} | {tuple(value.shape)}) > 1:
            return value.reshape(())
        for path, shape in zip(paths, shapes):
            if value.shape != shape:
                raise ValueError(
                    f"{caller}: {name} has shape {tuple(value.shape)} but parameter "
                    f"{keystr(path)} has shape {tuple(shape)}; a tensor hyperparameter must be "
                    "0-d or shaped like every parameter. Use a per-parameter dict, e.g. "
                    f"{name}={{'fc.weight': tensor, ...}}."
                )
        return [value] * len(shapes)
    if isinstance(value, Mapping):
        if optree.tree_structure(value, namespace=_NAMESPACE) != spec:
            _explain_dict_mismatch(caller, name, value, paths)
        out = optree.tree_leaves(value, namespace=_NAMESPACE)
        for path, shape, item in zip(paths, shapes, out):
            if isinstance(item, torch.Tensor) and item.dim() and item.shape != shape:
                raise ValueError(
                    f"{caller}: {name}{keystr(path)} has shape {tuple(item.shape)} but the "
                    f"parameter has shape {tuple(shape)}; use a 0-d tensor or one shaped like "
                    "the parameter."
                )
        return out
    check_form(caller, name, value)
    raise AssertionError("unreachable")  # pragma: no cover


def _explain_dict_mismatch(caller: str, name: str, value: Mapping, paths: list) -> None:
    hp_paths, _, _ = optree.tree_flatten_with_path(value, namespace=_NAMESPACE)
    have, want = set(hp_paths), set(paths)
    for p in paths:
        if p not in have:
            raise ValueError(
                f"{caller}: the per-parameter dict {name} has no entry for parameter "
                f"{keystr(p)}; give every parameter a value (or pass one float for all)."
            )
    for p in hp_paths:
        if p not in want:
            raise ValueError(
                f"{caller}: the per-parameter dict {name} has an entry {keystr(p)} that is not "
                "a parameter; remove it or check the spelling against params.keys()."
            )
    raise ValueError(  # pragma: no cover - same keys, different containers
        f"{caller}: the per-parameter dict {name} is not keyed like the params."
    )


def flat_hp(value: Scalar | list[Scalar], idx: list[int], shapes: list, like: torch.Tensor) -> Any:
    """The hyperparameter for one flat group: scalar as is, per-leaf values as one flat vector."""
    if not isinstance(value, list):
        if isinstance(value, torch.Tensor) and value.dtype != like.dtype:
            return value.to(dtype=like.dtype)
        return value
    parts = []
    for i in idx:
        v = value[i]
        if is_number(v):
            v = torch.full(shapes[i], float(v), dtype=like.dtype, device=like.device)
        else:
            v = v.to(dtype=like.dtype).expand(shapes[i])
        parts.append(v.reshape(-1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# --------------------------------------------------------------------------- safe maths


def safe_sqrt(x: torch.Tensor, *, nonnegative: bool = True) -> torch.Tensor:
    """``torch.sqrt`` with the same forward values and a finite backward at zero.

    ``sqrt`` has an infinite derivative at 0; when the input came from a square of a zero
    gradient element the chain rule gives ``inf * 0 = nan``. The double-``where`` trick avoids
    it: the inner ``where`` feeds ``sqrt`` a harmless 1 where ``x <= 0``, the outer ``where``
    puts the exact forward value back (0 at 0; ``sqrt`` of the detached input, i.e. nan, for
    negative values when ``nonnegative=False``), so the backward through those elements is 0.
    """
    positive = x > 0
    root = torch.sqrt(torch.where(positive, x, 1.0))
    if nonnegative:
        return torch.where(positive, root, 0.0)
    return torch.where(positive, root, torch.sqrt(x.detach()))


def axpy(x: torch.Tensor, a: Scalar, y: torch.Tensor) -> torch.Tensor:
    """``x + a * y``; one fused ``add(alpha=)`` kernel when ``a`` is a number (as torch.optim)."""
    if is_number(a):
        return torch.add(x, y, alpha=a)
    return x + a * y


def scale(x: torch.Tensor, a: Scalar) -> torch.Tensor:
    """``x * a``."""
    return x * a


# --------------------------------------------------------------------------- the flat step


def check_grads(caller: str, params: PyTree, grads: PyTree) -> optree.PyTreeSpec:
    """Return the params' treespec; raise ``ValueError`` naming the key if grads differ."""
    spec = optree.tree_structure(params, namespace=_NAMESPACE)
    if optree.tree_structure(grads, namespace=_NAMESPACE) != spec:
        _explain(caller, "grads", params, grads)
    return spec


def _explain(caller: str, what: str, params: PyTree, other: PyTree) -> None:
    pa, _, sa = optree.tree_flatten_with_path(params, namespace=_NAMESPACE)
    pb, _, sb = optree.tree_flatten_with_path(other, namespace=_NAMESPACE)
    only_a = [p for p in pa if p not in set(pb)]
    only_b = [p for p in pb if p not in set(pa)]
    if only_a:
        detail = f"key {keystr(only_a[0])} is in params but not in {what}"
    elif only_b:
        detail = f"key {keystr(only_b[0])} is in {what} but not in params"
    else:
        detail = f"same keys but different containers: {sa} vs {sb}"
    raise ValueError(
        f"{caller}: {what} does not have the structure of params: {detail}. Pass {what} "
        "keyed exactly like params (e.g. torch.func.grad of a loss of params)."
    )


def flat_update(
    caller: str,
    math: Math,
    params: PyTree,
    grads: PyTree,
    buffers: Mapping[str, PyTree | None],
    step: torch.Tensor,
    hyperparams: Mapping[str, Any],
    options: Mapping[str, Any],
) -> tuple[PyTree, dict[str, PyTree | None]]:
    """Run ``math`` once per (dtype, device) group on flat vectors; return new params, buffers.

    ``math(p, g, bufs, step, hp, options)`` gets flat tensors ``p``, ``g``, a dict of flat
    buffers (``None`` for a buffer that is off), the new step count and the hyperparameters
    (numbers, 0-d tensors or flat vectors); it returns ``(new_p, new_bufs)``.
    """
    spec = check_grads(caller, params, grads)
    paths, p_leaves, _ = optree.tree_flatten_with_path(params, namespace=_NAMESPACE)
    g_leaves = optree.tree_leaves(grads, namespace=_NAMESPACE)
    b_leaves: dict[str, list[torch.Tensor] | None] = {}
    for name, tree in buffers.items():
        if tree is None:
            b_leaves[name] = None
            continue
        if optree.tree_structure(tree, namespace=_NAMESPACE) != spec:
            _explain(caller, f"state.{name}", params, tree)
        b_leaves[name] = optree.tree_leaves(tree, namespace=_NAMESPACE)
    shapes = [p.shape for p in p_leaves]
    hp = {}
    for name, value in hyperparams.items():
        if isinstance(value, tuple):
            hp[name] = tuple(
                resolve(caller, f"{name}[{i}]", v, paths, shapes, spec) for i, v in enumerate(value)
            )
        else:
            hp[name] = resolve(caller, name, value, paths, shapes, spec)

    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, p in enumerate(p_leaves):
        groups.setdefault((p.dtype, p.device), []).append(i)

    n = len(p_leaves)
    new_p: list[Any] = [None] * n
    new_b: dict[str, list[Any] | None] = {
        k: (None if v is None else [None] * n) for k, v in b_leaves.items()
    }
    for idx in groups.values():

        def cat(leaves: list[torch.Tensor], idx: list[int] = idx) -> torch.Tensor:
            if len(idx) == 1:
                return leaves[idx[0]].reshape(-1)
            base = _flat_base([leaves[i] for i in idx])
            if base is not None:
                return base
            return torch.cat([leaves[i].reshape(-1) for i in idx])

        p = cat(p_leaves)
        ghp = {
            k: tuple(flat_hp(x, idx, shapes, p) for x in v)
            if isinstance(v, tuple)
            else flat_hp(v, idx, shapes, p)
            for k, v in hp.items()
        }
        bufs = {k: (None if v is None else cat(v)) for k, v in b_leaves.items()}
        out_p, out_b = math(p, cat(g_leaves), bufs, step, ghp, options)
        sizes = [p_leaves[i].numel() for i in idx]
        _scatter(out_p, idx, sizes, shapes, new_p)
        for k, v in out_b.items():
            if v is not None:
                _scatter(v, idx, sizes, shapes, new_b[k])  # type: ignore[arg-type]
    params_out = optree.tree_unflatten(spec, new_p)
    bufs_out = {
        k: (None if v is None else optree.tree_unflatten(spec, v)) for k, v in new_b.items()
    }
    return params_out, bufs_out


def _flat_base(leaves: list[torch.Tensor]) -> torch.Tensor | None:
    """The flat vector the leaves are consecutive views of (as our own step returns), or None.

    Using it instead of ``torch.cat`` saves a copy per step; the gradient is the same because
    each leaf is a slice of it. Only for plain tensors (under vmap, grad or compile: ``None``).
    """
    first = leaves[0]
    base = first._base
    if base is None or base.dim() != 1 or not concrete(first):
        return None
    offset = base.storage_offset()
    for leaf in leaves:
        if leaf._base is not base or leaf.storage_offset() != offset or not leaf.is_contiguous():
            return None
        offset += leaf.numel()
    return base if offset - base.storage_offset() == base.numel() else None


def _scatter(flat: torch.Tensor, idx: list[int], sizes: list[int], shapes: list, out: list) -> None:
    if len(idx) == 1:
        out[idx[0]] = flat.reshape(shapes[idx[0]])
        return
    for i, piece in zip(idx, torch.split(flat, sizes)):
        out[i] = piece.reshape(shapes[i])


# --------------------------------------------------------------------------- family builder


def build(
    name: str,
    state_cls: type,
    hyperparams: dict[str, Any],
    options: dict[str, Any],
    *,
    buffers: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]],
    math: Math,
    check: Callable[[Mapping[str, Any], Mapping[str, Any]], None],
) -> Any:
    """Assemble an :class:`~hypergrad.optim.Optimizer` from a family's maths.

    ``buffers(hyperparams, options)`` maps each buffer field of ``state_cls`` to ``None`` (off)
    or to its initial value (a hyperparameter form, e.g. ``0.0``); ``math`` is described in
    :func:`flat_update`.
    """
    from hypergrad.optim._base import Optimizer

    check(hyperparams, options)
    caller = f"hg.optim.{name}"

    def init_fn(params: PyTree, hp: Mapping[str, Any], opts: Mapping[str, Any]) -> Any:
        paths, p_leaves, spec = optree.tree_flatten_with_path(params, namespace=_NAMESPACE)
        for path, leaf in zip(paths, p_leaves):
            if not isinstance(leaf, torch.Tensor):
                raise ValueError(
                    f"{caller}.init: parameter {keystr(path)} is a {type(leaf).__name__}, not a "
                    "tensor; pass a tree of tensors such as hg.split(model)[0]."
                )
        shapes = [p.shape for p in p_leaves]
        device = p_leaves[0].device if p_leaves else None
        step = torch.zeros((), dtype=scalar_step_dtype(), device=device)
        fields: dict[str, Any] = {}
        for field, start in buffers(hp, opts).items():
            if start is None:
                fields[field] = None
                continue
            value = resolve(f"{caller}.init", field, start, paths, shapes, spec)
            leaves = [
                torch.zeros_like(p) + (value[i] if isinstance(value, list) else value)
                if not is_zero(value if not isinstance(value, list) else value[i])
                else torch.zeros_like(p)
                for i, p in enumerate(p_leaves)
            ]
            fields[field] = optree.tree_unflatten(spec, leaves)
        return state_cls(step, **fields)

    def update_fn(
        params: PyTree, grads: PyTree, state: Any, hp: Mapping[str, Any], opts: Mapping[str, Any]
    ) -> tuple[PyTree, Any]:
        if not isinstance(state, state_cls):
            raise ValueError(
                f"{caller}.step: state is a {type(state).__name__}; expected the "
                f"{state_cls.__name__} returned by opt.init(params) or a previous opt.step."
            )
        step = state.step + 1
        bufs = {f: getattr(state, f) for f in state_cls._fields[1:]}
        new_params, new_bufs = flat_update(
            f"{caller}.step", math, params, grads, bufs, step, hp, opts
        )
        return new_params, state_cls(step, **new_bufs)

    return Optimizer(name, hyperparams, options, init_fn, update_fn, check)


def register_states(*classes: type) -> None:
    """Let ``torch.load(weights_only=True)`` rebuild the state NamedTuples."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(list(classes))

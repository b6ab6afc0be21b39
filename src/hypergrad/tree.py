"""Pytree maths for parameter trees, built on optree.

A *tree* is any nesting of dicts, lists, tuples and NamedTuples whose leaves are tensors; the
parameter dicts returned by [`hg.split`][hypergrad.split] are the common case. Every function here
is pure (it returns new tensors and never modifies its inputs), differentiable, and works under
``torch.func.grad``, ``torch.func.jvp`` and ``torch.func.vmap``.

Trees passed together must have the same structure; otherwise a ``ValueError`` names the first
key path where they differ.

Dtypes: leaf-wise functions (``map``, ``add``, ``sub``, ``scale``, ``lerp``, ``mean``) keep each
leaf's own dtype, so a tree may mix float32 and float64 leaves; numbers and weights are cast to
each leaf's dtype. Reductions to one number (``vdot``, ``norm``, ``distance``, ``cosine``) follow
torch's type promotion and return a 0-d tensor of the widest floating dtype among the leaves.
``ravel`` needs one dtype and device, and refuses mixed trees with an error naming the leaves.
An empty tree is allowed everywhere: its norm, inner product and distance are ``tensor(0.)``.

Names: [`select`][hypergrad.tree.select], [`partition`][hypergrad.tree.partition] and the predicates
they take see each leaf's *dotted path*: the tree's keys joined by ``"."`` (``{"fc.weight": w}`` and
``{"fc": {"weight": w}}`` both give ``"fc.weight"``; list and tuple positions give their index,
``"layers.0"``; NamedTuple fields their name, ``"state.exp_avg"``), which for the dicts from
[`hg.split`][hypergrad.split] is exactly the name ``named_parameters()`` uses.
"""

from __future__ import annotations

import builtins
import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import optree
import torch

__all__ = [
    "Pattern",
    "PyTree",
    "add",
    "all_but_last_layer",
    "combine",
    "cosine",
    "detach",
    "distance",
    "dotted_paths",
    "key_paths",
    "keystr",
    "layer_names",
    "leaves",
    "lerp",
    "map",
    "mean",
    "norm",
    "partition",
    "ravel",
    "scale",
    "select",
    "sub",
    "unravel",
    "vdot",
    "zeros_like",
]

PyTree = Any
#: What [`select`][hypergrad.tree.select] and [`partition`][hypergrad.tree.partition] accept: a glob
#: string, a compiled regex, a predicate ``fn(dotted_path, leaf) -> bool``, or a list of these (a
#: leaf is selected if any matches).
Pattern = Union[str, "re.Pattern[str]", Callable[[str, Any], bool], Sequence[Any]]

# Tensors are leaves; None is an empty subtree (optree's default), so optional entries such as
# "no momentum buffer" cost nothing.
_NAMESPACE = "hypergrad"


def keystr(path: Sequence[Any]) -> str:
    """Format an optree key path as Python indexing, e.g. ``['layer.weight'][0]``.

    Args:
        path: a sequence of dict keys, sequence indices or attribute names.

    Returns:
        The path written as indexing, or ``<root>`` for the empty path.

    Examples:
        >>> keystr(("fc.weight",))
        "['fc.weight']"
        >>> keystr(())
        '<root>'
    """
    if not path:
        return "<root>"
    return "".join(f"[{k!r}]" for k in path)


def leaves(tree: PyTree, /) -> list[Any]:
    """Return the leaves of ``tree`` in a fixed (sorted-key) order.

    Examples:
        >>> leaves({"b": torch.ones(1), "a": torch.zeros(1)})
        [tensor([0.]), tensor([1.])]
    """
    return optree.tree_leaves(tree, namespace=_NAMESPACE)


def key_paths(tree: PyTree, /) -> list[str]:
    """Return the key path of every leaf, formatted with [`keystr`][hypergrad.tree.keystr].

    Examples:
        >>> key_paths({"w": torch.ones(2), "opt": (torch.ones(1), torch.ones(1))})
        ["['opt'][0]", "['opt'][1]", "['w']"]
    """
    paths, _, _ = optree.tree_flatten_with_path(tree, namespace=_NAMESPACE)
    return [keystr(p) for p in paths]


def _describe_mismatch(first: PyTree, other: PyTree, index: int) -> str:
    paths_a, _, spec_a = optree.tree_flatten_with_path(first, namespace=_NAMESPACE)
    paths_b, _, spec_b = optree.tree_flatten_with_path(other, namespace=_NAMESPACE)
    set_a, set_b = set(paths_a), set(paths_b)
    only_a = [p for p in paths_a if p not in set_b]
    only_b = [p for p in paths_b if p not in set_a]
    which = "the second tree" if index == 1 else f"tree number {index + 1}"
    if only_a:
        return f"key {keystr(only_a[0])} is in the first tree but not in {which}"
    if only_b:
        return f"key {keystr(only_b[0])} is in {which} but not in the first tree"
    return f"same keys but different containers: {spec_a} vs {spec_b}"


def check_same_structure(trees: Sequence[PyTree], *, caller: str) -> None:
    """Raise ``ValueError`` naming the first differing key path if ``trees`` differ in structure.

    Args:
        trees: two or more trees that must share one structure.
        caller: the public name to start the message with, e.g. ``"hg.tree.add"``.

    Examples:
        >>> check_same_structure([{"a": 1}, {"b": 1}], caller="hg.tree.add")
        Traceback (most recent call last):
        ...
        ValueError: hg.tree.add: the trees have different structure: key ['a'] is in the first tree but not in the second tree. Pass trees with the same keys, e.g. both from hg.split(model).
    """
    if len(trees) < 2:
        return
    spec0 = optree.tree_structure(trees[0], namespace=_NAMESPACE)
    for i, t in enumerate(trees[1:], start=1):
        if optree.tree_structure(t, namespace=_NAMESPACE) != spec0:
            raise ValueError(
                f"{caller}: the trees have different structure: "
                f"{_describe_mismatch(trees[0], t, i)}. "
                "Pass trees with the same keys, e.g. both from hg.split(model)."
            )


def map(
    fn: Callable[..., Any],
    tree: PyTree,
    /,
    *rest: PyTree,
    is_leaf: Callable[[Any], bool] | None = None,
) -> PyTree:
    """Apply ``fn`` leaf-wise over one or more trees of the same structure.

    Args:
        fn: called as ``fn(leaf, *other_leaves)`` for each leaf position.
        tree: the first tree; its structure is the structure of the result.
        *rest: further trees with the same structure as ``tree``.
        is_leaf: optional predicate that stops the recursion early.

    Returns:
        A new tree holding ``fn``'s results.

    Raises:
        ValueError: the trees differ in structure (the message names the key path).

    Examples:
        >>> import hypergrad as hg
        >>> hg.tree.map(lambda a, b: a * b, {"w": torch.tensor(2.0)}, {"w": torch.tensor(3.0)})
        {'w': tensor(6.)}
    """
    if rest and is_leaf is None:
        check_same_structure([tree, *rest], caller="hg.tree.map")
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, namespace=_NAMESPACE)


def _map2(caller: str, fn: Callable[[Any, Any], Any], a: PyTree, b: PyTree) -> PyTree:
    check_same_structure([a, b], caller=caller)
    return optree.tree_map(fn, a, b, namespace=_NAMESPACE)


def zeros_like(tree: PyTree, /) -> PyTree:
    """A tree of zeros shaped like ``tree``.

    Examples:
        >>> zeros_like({"w": torch.ones(2)})
        {'w': tensor([0., 0.])}
    """
    return optree.tree_map(torch.zeros_like, tree, namespace=_NAMESPACE)


def add(a: PyTree, b: PyTree, /) -> PyTree:
    """Leaf-wise ``a + b``.

    Examples:
        >>> add({"w": torch.tensor(1.0)}, {"w": torch.tensor(2.0)})
        {'w': tensor(3.)}
    """
    return _map2("hg.tree.add", torch.add, a, b)


def sub(a: PyTree, b: PyTree, /) -> PyTree:
    """Leaf-wise ``a - b``.

    Examples:
        >>> sub({"w": torch.tensor(1.0)}, {"w": torch.tensor(2.0)})
        {'w': tensor(-1.)}
    """
    return _map2("hg.tree.sub", torch.sub, a, b)


def scale(tree: PyTree, factor: float | torch.Tensor, /) -> PyTree:
    """Multiply every leaf by ``factor`` (a number or a 0-d tensor, which may require grad).

    Examples:
        >>> scale({"w": torch.tensor([1.0, 2.0])}, 0.5)
        {'w': tensor([0.5000, 1.0000])}
    """
    return optree.tree_map(lambda x: x * factor, tree, namespace=_NAMESPACE)


def vdot(a: PyTree, b: PyTree, /) -> torch.Tensor:
    """The inner product of two trees: the sum over leaves of ``(a * b).sum()``.

    Examples:
        >>> vdot({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])})
        tensor(11.)
    """
    check_same_structure([a, b], caller="hg.tree.vdot")
    la, lb = leaves(a), leaves(b)
    if not la:
        return torch.zeros(())
    return builtins.sum((x * y).sum() for x, y in zip(la, lb))


def detach(tree: PyTree, /) -> PyTree:
    """Detach every tensor leaf from the autograd graph (non-tensor leaves pass through).

    Examples:
        >>> w = torch.ones(2, requires_grad=True)
        >>> detach({"w": w * 2})["w"].requires_grad
        False
    """
    return optree.tree_map(
        lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree, namespace=_NAMESPACE
    )


def ravel(tree: PyTree, /) -> tuple[torch.Tensor, Callable[[torch.Tensor], PyTree]]:
    """Flatten a tree of tensors into one 1-d vector, and return the inverse function.

    All leaves must share one dtype and device (the vector is one tensor). The inverse restores
    the structure, shapes and key order; both directions are differentiable.

    Args:
        tree: a tree of tensors.

    Returns:
        ``(vector, unravel_fn)`` where ``unravel_fn(vector)`` rebuilds the tree.

    Raises:
        ValueError: the leaves mix dtypes or devices (the message names the key paths).

    Examples:
        >>> flat, unravel_fn = ravel({"b": torch.zeros(2), "w": torch.ones(2, 2)})
        >>> flat
        tensor([0., 0., 1., 1., 1., 1.])
        >>> unravel_fn(flat)["w"].shape
        torch.Size([2, 2])
    """
    paths, flat_leaves, spec = optree.tree_flatten_with_path(tree, namespace=_NAMESPACE)
    if flat_leaves:
        first = flat_leaves[0]
        for p, leaf in zip(paths, flat_leaves):
            if not isinstance(leaf, torch.Tensor):
                raise ValueError(
                    f"hg.tree.ravel: leaf {keystr(p)} is a {type(leaf).__name__}, not a tensor. "
                    "Convert it with torch.as_tensor, or remove it with hg.tree.partition."
                )
            if leaf.dtype != first.dtype or leaf.device != first.device:
                raise ValueError(
                    f"hg.tree.ravel: leaf {keystr(p)} is {leaf.dtype} on {leaf.device} but leaf "
                    f"{keystr(paths[0])} is {first.dtype} on {first.device}; one vector needs one "
                    "dtype and device. Cast the tree first, e.g. "
                    "hg.tree.map(lambda t: t.double(), tree)."
                )
        vector = torch.cat([leaf.reshape(-1) for leaf in flat_leaves])
    else:
        vector = torch.zeros(0)
    shapes = [leaf.shape for leaf in flat_leaves]
    sizes = [leaf.numel() for leaf in flat_leaves]
    total = builtins.sum(sizes)

    def unravel_fn(vector: torch.Tensor) -> PyTree:
        return unravel(vector, spec, shapes, sizes, total)

    return vector, unravel_fn


def unravel(
    vector: torch.Tensor,
    spec: optree.PyTreeSpec,
    shapes: Sequence[torch.Size],
    sizes: Sequence[int],
    total: int,
) -> PyTree:
    """Rebuild a tree from a vector made by [`ravel`][hypergrad.tree.ravel].

    Usually called via its ``unravel_fn``.

    Raises:
        ValueError: the vector's length does not match the tree it was made from.

    Examples:
        >>> flat, unravel_fn = ravel({"w": torch.ones(3)})
        >>> unravel_fn(flat * 2)
        {'w': tensor([2., 2., 2.])}
    """
    if vector.shape[-1:] != (total,) and not (total == 0 and vector.numel() == 0):
        raise ValueError(
            f"hg.tree.unravel: expected a vector of length {total} (the tree's total size), "
            f"got shape {tuple(vector.shape)}. Pass the vector produced by hg.tree.ravel for "
            "this tree, or one of the same length."
        )
    pieces = torch.split(vector, list(sizes), dim=-1) if sizes else []
    new_leaves = [
        piece.reshape((*vector.shape[:-1], *shape)) for piece, shape in zip(pieces, shapes)
    ]
    return optree.tree_unflatten(spec, new_leaves)


# --------------------------------------------------------------------------------------------
# Interpolation and averages


def _as_weight(weight: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """Cast a tensor weight to ``like``'s dtype and device (differentiably); numbers pass."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype=like.dtype, device=like.device)
    return weight


def lerp(a: PyTree, b: PyTree, weight: float | torch.Tensor, /) -> PyTree:
    """Leaf-wise linear interpolation ``a + weight * (b - a)``.

    Exact at both ends: ``weight=0`` returns ``a``'s values and ``weight=1`` returns ``b``'s
    (``torch.lerp``'s formula). Differentiable in ``a``, ``b`` and ``weight``.

    Args:
        a: the tree at ``weight=0``.
        b: the tree at ``weight=1``, same structure as ``a``.
        weight: a number or a 0-d tensor (which may require grad or be vmapped over).

    Returns:
        A new tree shaped like ``a``.

    Raises:
        ValueError: ``a`` and ``b`` differ in structure.

    Examples:
        >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}
        >>> lerp(a, b, 0.25)
        {'w': tensor([1., 3.])}
        >>> lerp(a, b, torch.tensor(1.0))["w"]
        tensor([4., 6.])
    """
    return _map2("hg.tree.lerp", lambda x, y: torch.lerp(x, y, _as_weight(weight, x)), a, b)


def mean(
    trees: Sequence[PyTree] | PyTree,
    /,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    stacked: bool = False,
) -> PyTree:
    """The (weighted) mean of several trees.

    Weights are normalised to sum to one, so ``weights=[1, 3]`` gives ``0.25 * t0 + 0.75 * t1``.
    They may be a tensor that requires grad (the mean is differentiable in them).

    Args:
        trees: a list of trees with one structure; or, with ``stacked=True``, one tree whose
            leaves all have a leading dimension to average over (as made by
            [`hg.stack`][hypergrad.stack]).
        weights: one non-negative weight per tree (a sequence or a 1-d tensor); ``None`` for
            equal weights.
        stacked: average over the leading dimension of one tree instead of over a list.

    Returns:
        One tree with the structure of each input tree (without the leading dimension).

    Raises:
        ValueError: no trees, a weight count that does not match, weights that sum to zero
            (checked for plain numbers only), or trees of different structure.

    Examples:
        >>> t0, t1 = {"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([4.0, 8.0])}
        >>> mean([t0, t1])
        {'w': tensor([2., 6.])}
        >>> mean([t0, t1], weights=[1, 3])
        {'w': tensor([3., 7.])}
        >>> mean({"w": torch.tensor([[0.0, 4.0], [4.0, 8.0]])}, stacked=True)
        {'w': tensor([2., 6.])}
    """
    if stacked:
        flat = leaves(trees)
        sizes = {x.shape[0] if x.dim() > 0 else None for x in flat}
        if None in sizes or len(sizes) > 1:
            got = sorted(str(tuple(x.shape)) for x in flat)
            raise ValueError(
                "hg.tree.mean: with stacked=True every leaf needs the same leading dimension "
                f"(the one to average over); got leaf shapes {', '.join(got)}. "
                "Build the stacked tree with hg.stack(modules), or pass a list of trees."
            )
        if not flat:
            return trees  # an empty tree: nothing to average
        n = sizes.pop()
    else:
        if isinstance(trees, (Mapping, torch.Tensor)) or not isinstance(trees, Sequence):
            raise ValueError(
                f"hg.tree.mean: expected a list of trees, got a {type(trees).__name__}. "
                "Pass [tree0, tree1, ...], or one stacked tree with stacked=True."
            )
        n = len(trees)
        if n == 0:
            raise ValueError("hg.tree.mean: got an empty list of trees; pass at least one tree.")
        check_same_structure(list(trees), caller="hg.tree.mean")
    if weights is None:
        w: torch.Tensor | list[float] = [1.0 / n] * n
    else:
        count = weights.shape[0] if isinstance(weights, torch.Tensor) else len(weights)
        if (isinstance(weights, torch.Tensor) and weights.dim() != 1) or count != n:
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else f"{count} items"
            raise ValueError(
                f"hg.tree.mean: expected {n} weights (one per tree), got {shape}. "
                "Pass one weight per tree, e.g. weights=[1.0] * len(trees)."
            )
        if isinstance(weights, torch.Tensor):
            w = weights / weights.sum()
        else:
            total = float(builtins.sum(weights))
            if total == 0.0:
                raise ValueError(
                    "hg.tree.mean: the weights sum to zero, so they cannot be normalised. "
                    "Pass non-negative weights with a positive sum."
                )
            w = [float(x) / total for x in weights]

    if stacked:

        def avg(x: torch.Tensor) -> torch.Tensor:
            wx = torch.as_tensor(w, dtype=x.dtype, device=x.device) if isinstance(w, list) else w
            return torch.tensordot(_as_weight(wx, x), x, dims=1)

        return optree.tree_map(avg, trees, namespace=_NAMESPACE)

    def avg_list(*xs: torch.Tensor) -> torch.Tensor:
        terms = (_as_weight(w[i], x) * x for i, x in enumerate(xs))
        return builtins.sum(terms)

    return optree.tree_map(avg_list, trees[0], *trees[1:], namespace=_NAMESPACE)


# --------------------------------------------------------------------------------------------
# Norms and distances


def _check_ord(ord: float, caller: str) -> float:
    if ord not in (1, 2, math.inf):
        raise ValueError(
            f"{caller}: ord must be 1, 2 or math.inf (float('inf')), got {ord!r}. "
            "Use ord=1 for the sum of absolute values, 2 for the Euclidean norm, math.inf for "
            "the largest absolute value."
        )
    return float(ord)


def _leaf_norm(x: torch.Tensor, ord: float, path: Any, caller: str) -> torch.Tensor:
    if not (x.is_floating_point() or x.is_complex()):
        raise ValueError(
            f"{caller}: leaf {keystr(path)} has dtype {x.dtype}; norms need floating-point "
            "leaves. Select the floating leaves first, e.g. "
            "hg.tree.select(tree, lambda path, x: x.is_floating_point())."
        )
    if x.numel() == 0:
        return x.new_zeros(()).real
    return torch.linalg.vector_norm(x, ord)


def norm(tree: PyTree, /, ord: float = 2, *, per_leaf: bool = False) -> PyTree:
    """The L1, L2 or max norm of a tree, as if all its leaves were one flat vector.

    The global norm combines per-leaf norms (the L2 norm of the per-leaf L2 norms, the sum of
    L1 norms, the max of max norms), so it never concatenates the leaves and works for mixed
    dtypes (the result has the promoted dtype). Its gradient at zero is zero, as for
    ``torch.linalg.vector_norm``. An empty tree, or an empty leaf, has norm 0.

    Args:
        tree: a tree of floating-point tensors.
        ord: ``1``, ``2`` or ``math.inf``.
        per_leaf: return a tree of 0-d tensors, one norm per leaf, instead of one number.

    Returns:
        A 0-d tensor, or with ``per_leaf=True`` a tree of 0-d tensors shaped like ``tree``.

    Raises:
        ValueError: an unsupported ``ord``, or an integer or boolean leaf.

    Examples:
        >>> t = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor(-4.0)}
        >>> norm(t)
        tensor(5.)
        >>> norm(t, 1), norm(t, math.inf)
        (tensor(7.), tensor(4.))
        >>> norm(t, per_leaf=True)
        {'a': tensor(3.), 'b': tensor(4.)}
    """
    o = _check_ord(ord, "hg.tree.norm")
    paths, flat, spec = optree.tree_flatten_with_path(tree, namespace=_NAMESPACE)
    per = [_leaf_norm(x, o, p, "hg.tree.norm") for p, x in zip(paths, flat)]
    if per_leaf:
        return optree.tree_unflatten(spec, per)
    if not per:
        return torch.zeros(())
    if len(per) == 1:
        return per[0]
    dtype = per[0].dtype
    for x in per[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return torch.linalg.vector_norm(torch.stack([x.to(dtype) for x in per]), o)


def distance(a: PyTree, b: PyTree, /, ord: float = 2) -> torch.Tensor:
    """The distance ``norm(a - b, ord)`` between two trees of one structure.

    Examples:
        >>> distance({"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([4.0, 5.0])})
        tensor(5.)
    """
    _check_ord(ord, "hg.tree.distance")
    return norm(_map2("hg.tree.distance", torch.sub, a, b), ord)


def cosine(a: PyTree, b: PyTree, /, *, eps: float = 1e-12) -> torch.Tensor:
    """The cosine similarity of two trees seen as flat vectors: ``<a, b> / (|a| |b|)``.

    Each norm is clamped below by ``eps``, so a zero tree gives 0 rather than NaN.

    Examples:
        >>> a = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor(0.0)}
        >>> b = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor(0.0)}
        >>> round(cosine(a, b).item(), 4)
        0.7071
    """
    check_same_structure([a, b], caller="hg.tree.cosine")
    return vdot(a, b) / (norm(a).clamp_min(eps) * norm(b).clamp_min(eps))


# --------------------------------------------------------------------------------------------
# Selecting leaves by name


def _dotted(path: Sequence[Any]) -> str:
    return ".".join(str(k) for k in path)


def _entry_name(entry: Any) -> Any:
    """The name of one optree accessor entry: a NamedTuple field, an attribute, a key or index."""
    for attr in ("field", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry.entry


def dotted_paths(tree: PyTree, /) -> list[str]:
    """The dotted path of every leaf, in the tree's own order (dict insertion order).

    This is the name that patterns in [`select`][hypergrad.tree.select] and
    [`partition`][hypergrad.tree.partition] are matched against.

    Examples:
        >>> dotted_paths({"fc": {"weight": torch.ones(1)}, "head.bias": torch.ones(1)})
        ['fc.weight', 'head.bias']
        >>> dotted_paths({"layers": [torch.ones(1), torch.ones(1)]})
        ['layers.0', 'layers.1']
    """
    out: list[str] = []

    def walk(node: Any, prefix: tuple[Any, ...]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*prefix, k))
            return
        if node is None:
            return
        if optree.tree_is_leaf(node, namespace=_NAMESPACE):
            out.append(_dotted(prefix))
            return
        children, _, entries, _ = optree.tree_flatten_one_level(node, namespace=_NAMESPACE)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            entries = node._fields
        for k, v in zip(entries, children):
            walk(v, (*prefix, k))

    walk(tree, ())
    return out


def _compile_pattern(pattern: Pattern, caller: str) -> Callable[[str, Any], bool]:
    if isinstance(pattern, str):
        return lambda path, leaf: fnmatch.fnmatchcase(path, pattern)
    if isinstance(pattern, re.Pattern):
        return lambda path, leaf: pattern.search(path) is not None
    if callable(pattern):
        return pattern
    if isinstance(pattern, (list, tuple)):
        parts = [_compile_pattern(p, caller) for p in pattern]
        return lambda path, leaf: builtins.any(f(path, leaf) for f in parts)
    raise TypeError(
        f"{caller}: pattern must be a glob string, a compiled re.Pattern, a predicate "
        f"fn(path, leaf) -> bool, or a list of these; got a {type(pattern).__name__}. "
        'Example: hg.tree.select(params, "fc*.weight").'
    )


def _prune(node: Any) -> Any:
    """Drop dict entries whose value is ``None`` (unselected leaves); keep other containers."""
    if isinstance(node, Mapping):
        items = [(k, _prune(v)) for k, v in node.items() if v is not None]
        return _rebuild_mapping(node, items)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return type(node)(*(_prune(v) for v in node))
    if isinstance(node, (list, tuple)):
        return type(node)(_prune(v) for v in node)
    return node


def _rebuild_mapping(like: Mapping, items: list[tuple[Any, Any]]) -> Mapping:
    if hasattr(like, "default_factory"):
        return type(like)(like.default_factory, items)  # type: ignore[attr-defined]
    return type(like)(items)


def partition(tree: PyTree, pattern: Pattern, /) -> tuple[PyTree, PyTree]:
    """Split a tree into the leaves that match ``pattern`` and the rest.

    Matching uses each leaf's dotted path (see [`dotted_paths`][hypergrad.tree.dotted_paths]):

    * a glob string matches the whole path with ``fnmatch`` rules (``*`` also crosses dots):
      ``"fc*.weight"``, ``"encoder.*"``, ``"*.bias"``;
    * a compiled ``re.Pattern`` matches if ``pattern.search(path)`` finds it anywhere (anchor
      with ``^...$`` for the whole path): ``re.compile(r"\\.bias$")``;
    * a predicate is called as ``fn(path, leaf)`` and returns a bool: ``lambda p, x: x.dim() > 1``;
    * a list of any of these selects a leaf if any of them matches.

    In dicts an unselected leaf's key is dropped (so ``selected`` can go straight to
    [`hg.call`][hypergrad.call] or an optimizer); in lists and tuples its place holds ``None``,
    which every ``hg.tree`` function treats as an empty subtree. [`combine`][hypergrad.tree.combine]
    puts the parts back.

    Args:
        tree: a tree of tensors, e.g. ``params`` from [`hg.split`][hypergrad.split].
        pattern: what to select (see above).

    Returns:
        ``(selected, rest)``.

    Raises:
        TypeError: ``pattern`` is none of the accepted kinds.

    Examples:
        >>> params = {"fc1.weight": torch.ones(2, 2), "fc1.bias": torch.ones(2),
        ...           "fc2.weight": torch.ones(1, 2)}
        >>> weights, rest = partition(params, "*.weight")
        >>> list(weights), list(rest)
        (['fc1.weight', 'fc2.weight'], ['fc1.bias'])
        >>> list(partition(params, all_but_last_layer(params))[0])
        ['fc1.weight', 'fc1.bias']
    """
    match = _compile_pattern(pattern, "hg.tree.partition")
    accessors, flat, spec = optree.tree_flatten_with_accessor(tree, namespace=_NAMESPACE)
    names = [_dotted([_entry_name(e) for e in a]) for a in accessors]
    mask = [bool(match(name, x)) for name, x in zip(names, flat)]
    selected = optree.tree_unflatten(spec, [x if m else None for x, m in zip(flat, mask)])
    rest = optree.tree_unflatten(spec, [None if m else x for x, m in zip(flat, mask)])
    return _prune(selected), _prune(rest)


def select(tree: PyTree, pattern: Pattern, /) -> PyTree:
    """The leaves of ``tree`` that match ``pattern``.

    The first half of [`partition`][hypergrad.tree.partition].

    Examples:
        >>> params = {"fc1.weight": torch.ones(2), "fc1.bias": torch.ones(2)}
        >>> select(params, "*.bias")
        {'fc1.bias': tensor([1., 1.])}
        >>> import re
        >>> list(select(params, re.compile(r"^fc1\\.")))
        ['fc1.weight', 'fc1.bias']
    """
    return partition(tree, pattern)[0]


def combine(*trees: PyTree) -> PyTree:
    """Merge disjoint parts of one tree, such as [`partition`][hypergrad.tree.partition]'s outputs.

    Dicts are merged key by key (keys in order of first appearance), lists and tuples position
    by position; at each position at most one tree may hold a leaf (the others ``None`` or no
    key). ``combine(*partition(tree, pattern))`` equals ``tree``.

    Args:
        *trees: one or more parts.

    Returns:
        The merged tree.

    Raises:
        ValueError: two trees hold a leaf at the same key path, or their containers disagree
            there (the message names the key path).

    Examples:
        >>> params = {"a": torch.ones(1), "b": torch.zeros(1)}
        >>> combine(*partition(params, "a")) == params
        True
        >>> combine({"a": torch.ones(1)}, {"b": torch.zeros(1)})
        {'a': tensor([1.]), 'b': tensor([0.])}
    """
    if not trees:
        raise ValueError("hg.tree.combine: pass at least one tree, e.g. combine(selected, rest).")
    return _combine(list(trees), ())


def _combine(nodes: list[Any], path: tuple[Any, ...]) -> Any:
    present = [n for n in nodes if n is not None]
    if not present:
        return None
    if len(present) == 1 and not isinstance(present[0], (Mapping, list, tuple)):
        return present[0]
    first = present[0]
    kinds = {type(n) for n in present}
    if isinstance(first, Mapping) and builtins.all(isinstance(n, Mapping) for n in present):
        keys: dict[Any, None] = {}
        for n in present:
            keys.update(dict.fromkeys(n))
        items = [(k, _combine([n.get(k) for n in present], (*path, k))) for k in keys]
        return _rebuild_mapping(first, items)
    if len(kinds) == 1 and isinstance(first, (list, tuple)):
        lengths = {len(n) for n in present}
        if len(lengths) == 1:
            merged = [_combine([n[i] for n in present], (*path, i)) for i in range(len(first))]
            if hasattr(first, "_fields"):
                return type(first)(*merged)
            return type(first)(merged)
        raise ValueError(
            f"hg.tree.combine: at {keystr(path)} the trees hold {type(first).__name__}s of "
            f"different lengths {sorted(lengths)}; combine parts of one tree, as made by "
            "hg.tree.partition."
        )
    if builtins.all(isinstance(n, (Mapping, list, tuple)) for n in present):
        names = sorted(t.__name__ for t in kinds)
        raise ValueError(
            f"hg.tree.combine: at {keystr(path)} the trees hold different containers "
            f"({', '.join(names)}); combine parts of one tree, as made by hg.tree.partition."
        )
    raise ValueError(
        f"hg.tree.combine: {len(present)} trees hold a value at {keystr(path)}; the parts "
        "must be disjoint. Combine the outputs of one hg.tree.partition call, or hg.tree.add "
        "them if you meant to sum."
    )


def layer_names(tree: PyTree, /) -> list[str]:
    """The layers of a parameter tree, in order: each dotted path without its last part.

    For the params of ``nn.Sequential(nn.Linear(...), nn.ReLU(), nn.Linear(...))`` this is
    ``["0", "2"]``. A parameter that sits directly on the root module belongs to layer ``""``.
    The order is the tree's own (dict insertion) order, so for [`hg.split`][hypergrad.split] output
    it is the module's registration order.

    Examples:
        >>> params = {"0.weight": torch.ones(1), "0.bias": torch.ones(1),
        ...           "2.weight": torch.ones(1), "2.bias": torch.ones(1)}
        >>> layer_names(params)
        ['0', '2']
        >>> select(params, [f"{name}.*" for name in layer_names(params)[1:]])
        {'2.weight': tensor([1.]), '2.bias': tensor([1.])}
    """
    names: dict[str, None] = {}
    for path in dotted_paths(tree):
        names[path.rpartition(".")[0]] = None
    return list(names)


def all_but_last_layer(tree: PyTree, /) -> Callable[[str, Any], bool]:
    """A predicate that selects every layer of ``tree`` but the last.

    For [`select`][hypergrad.tree.select] / [`partition`][hypergrad.tree.partition]. The last layer
    is the last entry of [`layer_names`][hypergrad.tree.layer_names]; all of its parameters are left
    out.

    Raises:
        ValueError: the tree has no leaves.

    Examples:
        >>> params = {"body.weight": torch.ones(1), "body.bias": torch.ones(1),
        ...           "head.weight": torch.ones(1)}
        >>> list(select(params, all_but_last_layer(params)))
        ['body.weight', 'body.bias']
    """
    names = layer_names(tree)
    if not names:
        raise ValueError(
            "hg.tree.all_but_last_layer: the tree has no leaves, so it has no last layer. "
            "Pass the parameter tree, e.g. hg.split(model)[0]."
        )
    last = names[-1]

    def not_last(path: str, leaf: Any) -> bool:
        return path.rpartition(".")[0] != last

    return not_last

"""Pytree maths for parameter trees, built on optree.

A *tree* is any nesting of dicts, lists, tuples and NamedTuples whose leaves are tensors; the
parameter dicts returned by [`hg.split`][hypergrad.split] are the common case. Every function here
is pure (it returns new tensors and never modifies its inputs), differentiable, and works under
``torch.func.grad``, ``torch.func.jvp`` and ``torch.func.vmap``.

Trees passed together must have the same structure, and the functions that combine them leaf by
leaf (``add``, ``sub``, ``lerp``, ``mean``, ``vdot``, ``distance``, ``cosine``) the same leaf
shapes: they never broadcast one tree's leaf against another's. Otherwise a ``ValueError`` names
the first key path where they differ. (``map`` applies your function as it is.)

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
import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch

from hypergrad._boundary import caller, entered
from hypergrad.tree._base import (
    _NAMESPACE,
    PyTree,
    check_alike,
    check_same_structure,
    check_weights,
    key_paths,
    keystr,
    leaves,
)
from hypergrad.tree._select import (
    Pattern,
    all_but_last_layer,
    combine,
    dotted_paths,
    layer_names,
    partition,
    select,
)

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
        with entered("hg.tree.map"):
            check_same_structure([tree, *rest])
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, namespace=_NAMESPACE)


def _map2(fn: Callable[[Any, Any], Any], a: PyTree, b: PyTree) -> PyTree:
    check_alike([a, b])
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
    with entered("hg.tree.add"):
        return _map2(torch.add, a, b)


def sub(a: PyTree, b: PyTree, /) -> PyTree:
    """Leaf-wise ``a - b``.

    Examples:
        >>> sub({"w": torch.tensor(1.0)}, {"w": torch.tensor(2.0)})
        {'w': tensor(-1.)}
    """
    with entered("hg.tree.sub"):
        return _map2(torch.sub, a, b)


def scale(tree: PyTree, factor: float | torch.Tensor, /) -> PyTree:
    """Multiply every leaf by ``factor`` (a number or a 0-d tensor, which may require grad).

    Examples:
        >>> scale({"w": torch.tensor([1.0, 2.0])}, 0.5)
        {'w': tensor([0.5000, 1.0000])}
    """
    with entered("hg.tree.scale"):
        _check_scalar(factor, "factor")
    return optree.tree_map(lambda x: x * factor, tree, namespace=_NAMESPACE)


def _check_scalar(value: Any, name: str) -> None:
    """A number or a 0-d tensor (one per sample under vmap); else an error with the fix."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(
                f"{caller()}: {name} must be a number or a 0-d tensor, got shape "
                f"{tuple(value.shape)}. For a factor per leaf or per element use hg.tree.map, "
                "e.g. hg.tree.map(lambda x, f: x * f, tree, factors)."
            )
    elif not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise TypeError(
            f"{caller()}: {name} must be a number or a 0-d tensor, got a {type(value).__name__}."
        )


def vdot(a: PyTree, b: PyTree, /) -> torch.Tensor:
    """The inner product of two trees: the sum over leaves of ``(a * b).sum()``.

    Examples:
        >>> vdot({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])})
        tensor(11.)
    """
    with entered("hg.tree.vdot"):
        check_alike([a, b])
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
    with entered("hg.tree.lerp"):
        _check_scalar(weight, "weight")
        return _map2(lambda x, y: torch.lerp(x, y, _as_weight(weight, x)), a, b)


def _normalised(
    weights: Sequence[float] | torch.Tensor | None, n: int
) -> torch.Tensor | list[float]:
    """``mean``'s weights, checked (one per tree, non-negative) and divided by their sum."""
    if weights is None:
        return [1.0 / n] * n
    check_weights(weights, n)
    if isinstance(weights, torch.Tensor):
        return weights / weights.sum()
    total = float(builtins.sum(weights))
    return [float(x) / total for x in weights]


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
        ValueError: no trees, a weight count that does not match, a negative weight (tensor
            weights: where their values can be read, not under a transform), weights that sum
            to zero (checked for plain numbers only), or trees of different structure or leaf
            shapes.

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
        n = flat[0].shape[0]  # every leaf's (checked above)
    else:
        if isinstance(trees, (Mapping, torch.Tensor)) or not isinstance(trees, Sequence):
            raise ValueError(
                f"hg.tree.mean: expected a list of trees, got a {type(trees).__name__}. "
                "Pass [tree0, tree1, ...], or one stacked tree with stacked=True."
            )
        n = len(trees)
        if n == 0:
            raise ValueError("hg.tree.mean: got an empty list of trees; pass at least one tree.")
        with entered("hg.tree.mean"):
            check_alike(list(trees))
    with entered("hg.tree.mean"):
        w = _normalised(weights, n)

    if stacked:

        def avg(x: torch.Tensor) -> torch.Tensor:
            wx = torch.as_tensor(w, dtype=x.dtype, device=x.device) if isinstance(w, list) else w
            return torch.tensordot(_as_weight(wx, x), x, dims=1)

        stacked_tree: PyTree = trees
        return optree.tree_map(avg, stacked_tree, namespace=_NAMESPACE)

    def avg_list(*xs: torch.Tensor) -> torch.Tensor:
        terms = (_as_weight(w[i], x) * x for i, x in enumerate(xs))
        return functools.reduce(operator.add, terms)

    return optree.tree_map(avg_list, trees[0], *trees[1:], namespace=_NAMESPACE)


# --------------------------------------------------------------------------------------------
# Norms and distances


def _check_ord(ord: float) -> float:
    if ord not in (1, 2, math.inf):
        raise ValueError(
            f"{caller()}: ord must be 1, 2 or math.inf (float('inf')), got {ord!r}. "
            "Use ord=1 for the sum of absolute values, 2 for the Euclidean norm, math.inf for "
            "the largest absolute value."
        )
    return float(ord)


def _leaf_norm(x: torch.Tensor, ord: float, path: Any) -> torch.Tensor:
    if not (x.is_floating_point() or x.is_complex()):
        raise ValueError(
            f"{caller()}: leaf {keystr(path)} has dtype {x.dtype}; norms need floating-point "
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
    with entered("hg.tree.norm"):
        o = _check_ord(ord)
        paths, flat, spec = optree.tree_flatten_with_path(tree, namespace=_NAMESPACE)
        per = [_leaf_norm(x, o, p) for p, x in zip(paths, flat)]
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
    with entered("hg.tree.distance"):
        _check_ord(ord)
        difference = _map2(torch.sub, a, b)
    return norm(difference, ord)


def cosine(a: PyTree, b: PyTree, /, *, eps: float = 1e-12) -> torch.Tensor:
    """The cosine similarity of two trees seen as flat vectors: ``<a, b> / (|a| |b|)``.

    Each norm is clamped below by ``eps``, so a zero tree gives 0 rather than NaN.

    Examples:
        >>> a = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor(0.0)}
        >>> b = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor(0.0)}
        >>> round(cosine(a, b).item(), 4)
        0.7071
    """
    with entered("hg.tree.cosine"):
        check_alike([a, b])
    return vdot(a, b) / (norm(a).clamp_min(eps) * norm(b).clamp_min(eps))

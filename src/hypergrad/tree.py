"""Pytree maths for parameter trees, built on optree.

A *tree* is any nesting of dicts, lists, tuples and NamedTuples whose leaves are tensors; the
parameter dicts returned by :func:`hypergrad.split` are the common case. Every function here is
pure (it returns new tensors and never modifies its inputs), differentiable, and works under
``torch.func.grad``, ``torch.func.jvp`` and ``torch.func.vmap``.

Trees passed together must have the same structure; otherwise a ``ValueError`` names the first
key path where they differ.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

__all__ = [
    "PyTree",
    "add",
    "detach",
    "key_paths",
    "keystr",
    "leaves",
    "map",
    "ravel",
    "scale",
    "sub",
    "unravel",
    "vdot",
    "zeros_like",
]

PyTree = Any

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
    """Return the key path of every leaf, formatted with :func:`keystr`.

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
    """Rebuild a tree from a vector made by :func:`ravel`; usually called via its ``unravel_fn``.

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
    new_leaves = [piece.reshape(*vector.shape[:-1], *shape) for piece, shape in zip(pieces, shapes)]
    return optree.tree_unflatten(spec, new_leaves)

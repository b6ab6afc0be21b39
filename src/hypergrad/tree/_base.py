"""The ground every ``hg.tree`` function stands on: flattening, key paths and structure checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch

from hypergrad._boundary import caller

PyTree = Any

# Tensors are leaves; None is an empty subtree (optree's default), so optional entries such as
# "no momentum buffer" cost nothing.
_NAMESPACE = "hypergrad"


def same_structure(a: PyTree, b: PyTree, *, specs: tuple[Any, Any] | None = None) -> bool:
    """Whether two trees have the same structure (keys, nesting, container types).

    ``specs``: their tree specs, where the caller flattened them already (saves two flattens).
    Under ``torch.compile`` it compares the leaves' key paths instead: dynamo before torch 2.13
    cannot compare two tree specs.

    Examples:
        >>> same_structure({"w": 1, "b": 2}, {"b": 0, "w": 0}), same_structure({"w": 1}, {"v": 1})
        (True, False)
    """
    if torch.compiler.is_compiling():
        return optree.tree_paths(a, namespace=_NAMESPACE) == optree.tree_paths(
            b, namespace=_NAMESPACE
        )
    if specs is None:
        specs = (
            optree.tree_structure(a, namespace=_NAMESPACE),
            optree.tree_structure(b, namespace=_NAMESPACE),
        )
    return bool(specs[0] == specs[1])


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


def describe_difference(a: PyTree, b: PyTree, a_name: str, b_name: str) -> str:
    """Where two trees of different structure differ: the first key only one of them has.

    Examples:
        >>> describe_difference({"w": 1, "b": 2}, {"w": 1}, "params", "grads")
        "key ['b'] is in params but not in grads"
    """
    paths_a, _, spec_a = optree.tree_flatten_with_path(a, namespace=_NAMESPACE)
    paths_b, _, spec_b = optree.tree_flatten_with_path(b, namespace=_NAMESPACE)
    set_a, set_b = set(paths_a), set(paths_b)
    only_a = [p for p in paths_a if p not in set_b]
    only_b = [p for p in paths_b if p not in set_a]
    if only_a:
        return f"key {keystr(only_a[0])} is in {a_name} but not in {b_name}"
    if only_b:
        return f"key {keystr(only_b[0])} is in {b_name} but not in {a_name}"
    return f"same keys but different containers: {spec_a} vs {spec_b}"


def check_same_structure(trees: Sequence[PyTree]) -> None:
    """Raise ``ValueError`` naming the first differing key path if ``trees`` differ in structure.

    The message starts with the public call in progress, ``caller()``.

    Args:
        trees: two or more trees that must share one structure.

    Examples:
        >>> from hypergrad._boundary import entered
        >>> with entered("hg.tree.add"):
        ...     check_same_structure([{"a": 1}, {"b": 1}])
        Traceback (most recent call last):
        ...
        ValueError: hg.tree.add: the trees have different structure: key ['a'] is in the first tree but not in the second tree. Pass trees with the same keys, e.g. both from hg.split(model).
    """
    if len(trees) < 2:
        return
    for i, t in enumerate(trees[1:], start=1):
        if not same_structure(trees[0], t):
            which = "the second tree" if i == 1 else f"tree number {i + 1}"
            raise ValueError(
                f"{caller()}: the trees have different structure: "
                f"{describe_difference(trees[0], t, 'the first tree', which)}. "
                "Pass trees with the same keys, e.g. both from hg.split(model)."
            )


def check_same_shapes(trees: Sequence[PyTree]) -> None:
    """Raise ``ValueError`` naming the first leaf whose shape differs between ``trees``.

    Leaf-wise maths never broadcasts one tree's leaf against another's: ``{"w": ones(3)}`` and
    ``{"w": ones(1)}`` are two different models, not a model and a scale. The trees must
    already share one structure (``check_same_structure``).

    Examples:
        >>> from hypergrad._boundary import entered
        >>> with entered("hg.tree.add"):
        ...     check_same_shapes([{"w": torch.ones(3)}, {"w": torch.ones(1)}])
        Traceback (most recent call last):
        ...
        ValueError: hg.tree.add: leaf ['w'] has shape (3,) in the first tree but (1,) in the second; leaf-wise maths needs the same shapes (it does not broadcast between trees). Pass trees of one model, e.g. both from hg.split(model), or use hg.tree.map to broadcast on purpose.
    """
    if len(trees) < 2:
        return
    paths, first, _ = optree.tree_flatten_with_path(trees[0], namespace=_NAMESPACE)
    for i, t in enumerate(trees[1:], start=1):
        for path, a, b in zip(paths, first, leaves(t)):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
                which = "the second" if i == 1 else f"tree number {i + 1}"
                raise ValueError(
                    f"{caller()}: leaf {keystr(path)} has shape {tuple(a.shape)} in the first "
                    f"tree but {tuple(b.shape)} in {which}; leaf-wise maths needs the same "
                    "shapes (it does not broadcast between trees). Pass trees of one model, e.g. "
                    "both from hg.split(model), or use hg.tree.map to broadcast on purpose."
                )


def check_alike(trees: Sequence[PyTree]) -> None:
    """``check_same_structure`` and ``check_same_shapes``: trees of one model."""
    check_same_structure(trees)
    check_same_shapes(trees)


def readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values may be read now (not under vmap/grad/compile, not on meta)."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    return t.device.type != "meta"


def check_weights(weights: Sequence[float] | torch.Tensor | None, count: int | None) -> None:
    """Averaging weights: ``count`` of them (when given), non-negative, not all zero.

    Tensor weights are checked where their values can be read (not under a transform).

    Examples:
        >>> from hypergrad._boundary import entered
        >>> with entered("hg.clients.fedavg"):
        ...     check_weights([1.0, -0.5], 2)
        Traceback (most recent call last):
        ...
        ValueError: hg.clients.fedavg: weight 1 is -0.5; weights must be non-negative (they are normalised to sum to one). Pass e.g. each client's number of examples.
    """
    if weights is None:
        return
    if isinstance(weights, torch.Tensor):
        n, shape = (weights.shape[0] if weights.dim() else 0), str(tuple(weights.shape))
        wrong = weights.dim() != 1
    else:
        n, wrong = len(weights), False
        shape = f"{n} items"
    if wrong or (count is not None and n != count):
        raise ValueError(
            f"{caller()}: expected {count} weights (one per tree), got {shape}. "
            "Pass one weight per tree, e.g. weights=[1.0] * len(trees)."
        )
    if isinstance(weights, torch.Tensor):
        if not readable(weights):
            return
        values = [float(w) for w in weights.detach().tolist()]
    else:
        values = [float(w) for w in weights]
    for i, w in enumerate(values):
        if not w >= 0:
            raise ValueError(
                f"{caller()}: weight {i} is {w}; weights must be non-negative (they are "
                "normalised to sum to one). Pass e.g. each client's number of examples."
            )
    if not isinstance(weights, torch.Tensor) and sum(values) == 0.0:
        raise ValueError(
            f"{caller()}: the weights sum to zero, so they cannot be normalised. "
            "Pass non-negative weights with a positive sum."
        )

"""Selecting leaves by name: dotted paths, glob/regex/predicate patterns, partition and combine."""

from __future__ import annotations

import builtins
import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import optree

from hypergrad._boundary import caller, entered
from hypergrad.tree._base import _NAMESPACE, PyTree, keystr

#: What [`select`][hypergrad.tree.select] and [`partition`][hypergrad.tree.partition] accept: a glob
#: string, a compiled regex, a predicate ``fn(dotted_path, leaf) -> bool``, or a list of these (a
#: leaf is selected if any matches).
Pattern = Union[str, "re.Pattern[str]", Callable[[str, Any], bool], Sequence[Any]]


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


def _compile_pattern(pattern: Pattern) -> Callable[[str, Any], bool]:
    if isinstance(pattern, str):
        return lambda path, leaf: fnmatch.fnmatchcase(path, pattern)
    if isinstance(pattern, re.Pattern):
        return lambda path, leaf: pattern.search(path) is not None
    if callable(pattern):
        return pattern
    if isinstance(pattern, (list, tuple)):
        parts = [_compile_pattern(p) for p in pattern]
        return lambda path, leaf: builtins.any(f(path, leaf) for f in parts)
    raise TypeError(
        f"{caller()}: pattern must be a glob string, a compiled re.Pattern, a predicate "
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
    make: Any = type(like)
    if hasattr(like, "default_factory"):
        return make(like.default_factory, items)
    return make(items)


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
    with entered("hg.tree.partition"):
        match = _compile_pattern(pattern)
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

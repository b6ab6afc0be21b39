"""Which inputs have a client dimension (``in_dims``), and how many clients there are."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad.tree import PyTree

__all__ = ["count_clients", "leaf_dims", "resolve_in_dims"]

_DEFAULT_IN_DIMS: dict[str, Any] = {
    "params": 0,
    "state": 0,
    "buffers": 0,
    "aux": None,
    "hyperparams": None,
    "batches": 0,
    "outer_batch": None,
}


def resolve_in_dims(
    in_dims: Mapping[str, Any] | None, hp: Mapping[str, Any], outer: str = "server"
) -> dict:
    """``in_dims`` with the defaults filled in and checked (``hyperparams`` as a dict per name).

    ``outer_batch`` defaults to ``0`` (a leading task dimension) with ``outer="each"`` and is
    ``None`` (the server's one batch) with ``outer="server"``.
    """
    if in_dims is None:
        in_dims = {}
    if not isinstance(in_dims, Mapping):
        raise TypeError(
            f"{caller()}: in_dims must be a dict such as {{'hyperparams': {{'lr': 0}}}}, got "
            f"{type(in_dims).__name__}."
        )
    unknown = [k for k in in_dims if k not in _DEFAULT_IN_DIMS]
    if unknown:
        raise ValueError(
            f"{caller()}: in_dims has unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
            f"{', '.join(map(repr, _DEFAULT_IN_DIMS))}."
        )
    dims = {**_DEFAULT_IN_DIMS, "outer_batch": 0 if outer == "each" else None, **in_dims}
    if outer != "each" and dims["outer_batch"] is not None:
        raise ValueError(
            f"{caller()}: in_dims['outer_batch'] gives the outer batch a client dimension, but "
            "the outer loss is the server's (one loss on the aggregate of the clients). Pass "
            "hg.Clients(outer='each') for one outer loss per client (tasks), or drop "
            "'outer_batch' from in_dims."
        )
    for key in ("params", "state", "buffers"):
        if dims[key] not in (0, None):
            raise ValueError(
                f"{caller()}: in_dims[{key!r}] must be 0 (stacked clients) or None (one tree for "
                f"every client), got {dims[key]!r}."
            )
    h = dims["hyperparams"]
    if isinstance(h, Mapping):
        extra = [k for k in h if k not in hp]
        if extra:
            raise ValueError(
                f"{caller()}: in_dims['hyperparams'] names {', '.join(map(repr, extra))}, which "
                f"the optimizer does not have (it has {', '.join(map(repr, hp))})."
            )
        dims["hyperparams"] = {k: h.get(k) for k in hp}
    elif h in (0, None):
        dims["hyperparams"] = {k: h for k in hp}
    else:
        raise ValueError(
            f"{caller()}: in_dims['hyperparams'] must be 0, None or a dict such as {{'lr': 0}}, "
            f"got {h!r}."
        )
    return dims


def _leading(tree: PyTree, where: str) -> list[tuple[str, int | None]]:
    return [
        (f"{where}{'' if p == '<root>' else p}", x.shape[0] if x.dim() else None)
        for p, x in zip(_tree.key_paths(tree), _tree.leaves(tree))
        if isinstance(x, torch.Tensor)
    ]


def count_clients(
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
                    f"{caller()}: in_dims says hyperparameter {name!r} is per client, but it is "
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
            f"{caller()}: nothing has a client dimension (params, state, buffers and "
            "hyperparameters are all shared), so the number of clients is unknown. Stack the "
            "params (hg.stack) or give in_dims={'params': 0}."
        )
    first_where, clients = found[0]
    for where, size in found:
        if size is None or size != clients:
            got = "no leading dimension (0-d)" if size is None else f"leading size {size}"
            raise ValueError(
                f"{caller()}: every input with a client dimension needs the same leading size; "
                f"{first_where} has {clients} clients but {where} has {got}. Stack it per "
                "client, or say it is shared with in_dims (e.g. in_dims={'hyperparams': None})."
            )
    assert clients is not None  # every size was checked against it above
    return int(clients)


def leaf_dims(dims: Any, tree: PyTree) -> tuple[list[Any], list[Any], Any]:
    """Each leaf's client dim (``dims`` is a prefix of ``tree``), the leaves (``None``
    included), and the tree spec."""
    flat, spec = optree.tree_flatten(tree, none_is_leaf=True, namespace=_tree._NAMESPACE)
    if dims is None or isinstance(dims, int):
        return [dims] * len(flat), flat, spec
    full = optree.tree_broadcast_prefix(dims, tree, none_is_leaf=True, namespace=_tree._NAMESPACE)
    return optree.tree_leaves(full, none_is_leaf=True, namespace=_tree._NAMESPACE), flat, spec

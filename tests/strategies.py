"""Reusable hypothesis strategies for trees of tensors (mixed shapes, 0-d tensors, empty trees)."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

SHAPES = [(), (1,), (3,), (2, 3), (0,), (2, 0, 1), (1, 1, 2)]
KEYS = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "emb"]


def tensor_from(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A deterministic normal tensor (values in a few units) from a seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * 2


@st.composite
def tensors(draw: st.DrawFn, dtypes=(torch.float64,), shapes=SHAPES) -> torch.Tensor:
    shape = draw(st.sampled_from(shapes))
    dtype = draw(st.sampled_from(dtypes))
    return tensor_from(draw(st.integers(0, 2**31 - 1)), shape, dtype)


@st.composite
def trees(
    draw: st.DrawFn,
    dtypes=(torch.float64,),
    shapes=SHAPES,
    max_leaves: int = 5,
    nested: bool = True,
) -> Any:
    """A tree: a flat params-like dict, or (if ``nested``) dicts holding lists/tuples/dicts.

    May be empty. Leaves are float tensors of the given dtypes and shapes.
    """
    leaf = tensors(dtypes=dtypes, shapes=shapes)
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=max_leaves, unique=True))
    out: dict[str, Any] = {}
    for k in keys:
        kind = draw(
            st.sampled_from(["leaf", "leaf", "list", "tuple", "dict"] if nested else ["leaf"])
        )
        if kind == "leaf":
            out[k] = draw(leaf)
        elif kind == "list":
            out[k] = draw(st.lists(leaf, max_size=2))
        elif kind == "tuple":
            out[k] = tuple(draw(st.lists(leaf, min_size=1, max_size=2)))
        else:
            out[k] = {"a": draw(leaf), "b": draw(leaf)}
    return out


def like(tree: Any, seed: int) -> Any:
    """Another tree with ``tree``'s structure, shapes and dtypes and fresh values."""
    import optree

    flat, spec = optree.tree_flatten(tree, namespace="hypergrad")
    new = [tensor_from(seed + i, tuple(x.shape), x.dtype) for i, x in enumerate(flat)]
    return optree.tree_unflatten(spec, new)

"""``torch.func.vmap`` over trees that hold ``None`` leaves, and the error for modules it refuses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from torch import nn

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad.tree import PyTree

__all__ = ["guarded", "vmap_trees"]

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


def guarded(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step``, with vmap's refusal of a module's in-place buffer update explained."""

    def guarded_step(*args: Any) -> Any:
        try:
            return step(*args)
        except RuntimeError as error:
            if any(marker in str(error) for marker in _VMAP_INPLACE):
                raise _vmap_error(error) from error
            raise

    return guarded_step


def _vmap_error(error: RuntimeError) -> RuntimeError:
    first = str(error).strip().splitlines()[0]
    return RuntimeError(
        f"{caller()}: {_module_in_traceback(error)} cannot run under torch.func.vmap over "
        f"clients: its forward updates its own buffers in place (torch: {first}). Carry the "
        "buffers per client: pass buffers= (stacked, e.g. from hg.stack) and return "
        "(loss, new_buffers) from inner_loss(params, aux, batch, buffers) using "
        "hg.call(module, params, x, buffers=buffers, return_buffers=True). Or freeze them: "
        "module.eval(), or track_running_stats=False."
    )


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


def vmap_trees(
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

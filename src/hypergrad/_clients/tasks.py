"""Tasks: one outer loss per client (``hg.Clients(outer="each")``), their mean the value.

A variant of the clients transform's outer loss, not a transform of its own: the clients train
as always; instead of the server's loss on their aggregate, each client's final params meet its
own outer batch (a slice of ``outer_batch`` along its leading task dimension, or the one batch
with ``in_dims={"outer_batch": None}``) in ``outer_loss``, vmapped over the clients, and the
value is the mean of the C losses (weighted by ``weights`` if given). Over ranks each rank holds
a share of the mean (its clients' sum divided by every rank's total weight), summed by an
all-reduce that autograd and forward mode see (``sum_ranks``); unlike the server's loss, each
rank's share of ``aux``'s direct gradient is its own, so it is not counted once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad._clients.dims import leaf_dims
from hypergrad._clients.ranks import Ranks, sum_ranks
from hypergrad._clients.vmap import vmap_trees
from hypergrad._engine.problem import outer_fn
from hypergrad.tree import PyTree

__all__ = ["check_outer_batch", "each_outer"]


def check_outer_batch(outer_batch: Any, dims: Any, count: int) -> None:
    """Raise unless every leaf of ``outer_batch`` with a task dimension has ``count`` rows.

    Examples:
        >>> check_outer_batch((torch.ones(3, 2), torch.ones(5)), (0, None), 3)
    """
    ds, flat, _ = leaf_dims(dims, outer_batch)
    paths = _tree.key_paths(outer_batch) if len(flat) > 1 else [""]
    for path, x, d in zip(paths, flat, ds):
        if d != 0 or not isinstance(x, torch.Tensor):
            continue
        if x.dim() == 0 or x.shape[0] != count:
            got = "a 0-d tensor" if x.dim() == 0 else f"shape {tuple(x.shape)}"
            where = "outer_batch" if path in ("", "<root>") else f"outer_batch{path}"
            raise ValueError(
                f"{caller()}: with hg.Clients(outer='each') each of the {count} clients has its "
                f"own outer batch, so {where} needs a leading task dimension of size {count} "
                f"(one slice per client), got {got}. Stack one outer batch per client "
                "(torch.stack), or pass in_dims={'outer_batch': None} to give every client the "
                "same one."
            )


def each_outer(
    outer_loss: Callable[..., Any],
    outer_batch: Any,
    *,
    has_buffers: bool,
    math_attention: bool,
    dims: dict,
    weights: Any,
    total: float,
    ranks: Ranks | None,
    **options: Any,
) -> Callable[[PyTree, PyTree, PyTree], torch.Tensor]:
    """``outer(stacked_params, stacked_buffers, aux)``: the mean over clients of each one's loss.

    ``total`` is the weight of every client (over ranks, of every rank's): their number, or the
    sum of ``weights``; ``options`` are vmap's (``chunk_size``, ``randomness``).
    """

    def one(p: PyTree, b: PyTree, a: PyTree, x: Any) -> tuple[torch.Tensor]:
        return (outer_fn(outer_loss, x, has_buffers, math_attention=math_attention)(p, b, a),)

    per_client = vmap_trees(one, 2, (dims["aux"], dims["outer_batch"]), **options)

    def outer(params: PyTree, buffers: PyTree, aux: PyTree) -> torch.Tensor:
        (losses,) = per_client(params, buffers, aux, outer_batch)
        if weights is None:
            share = losses.sum() / total
        else:
            w = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)
            share = (w * losses).sum() / (w.sum() if ranks is None else total)
        return share if ranks is None else sum_ranks(ranks, share)

    return outer

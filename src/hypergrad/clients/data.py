"""Clients with different data sizes: padding, per-step batches, masked means."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import entered, positive_int
from hypergrad.tree import PyTree

__all__ = ["Padded", "batches", "masked_mean", "pad"]


class Padded(NamedTuple):
    """Per-client datasets padded to one length (see [`pad`][hypergrad.clients.pad]).

    Attributes:
        data: the datasets' tree, each leaf shaped ``(C, N, ...)`` with ``N`` the largest size.
        mask: a bool tensor ``(C, N)``: ``True`` for real examples, ``False`` for padding.
        sizes: a ``(C,)`` int64 tensor of the real sizes (FedAvg weights).

    Examples:
        >>> padded = hg.clients.pad([torch.ones(2, 3), torch.ones(4, 3)])
        >>> padded.data.shape, padded.sizes.tolist(), padded.mask.sum(1).tolist()
        (torch.Size([2, 4, 3]), [2, 4], [2, 4])
    """

    data: PyTree
    mask: torch.Tensor
    sizes: torch.Tensor


def _size(dataset: PyTree, index: int) -> int:
    flat = _tree.leaves(dataset)
    lengths = {x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None for x in flat}
    if not flat or None in lengths or len(lengths) != 1:
        shapes = ", ".join(
            f"{p}: {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            for p, x in zip(_tree.key_paths(dataset), flat)
        )
        raise ValueError(
            f"hg.clients.pad: dataset {index} needs tensors sharing one leading (example) "
            f"dimension; got {shapes or 'no tensors'}. Pass e.g. (x_c, y_c) with "
            "x_c.shape[0] == y_c.shape[0]."
        )
    return int(lengths.pop())  # type: ignore[arg-type]  # None was refused above


def pad(datasets: Sequence[PyTree], /, *, value: float = 0) -> Padded:
    """Stack per-client datasets of different lengths, padding each to the longest.

    Args:
        datasets: one tree per client (e.g. ``(x_c, y_c)``), all of one structure, the leaves of
            a client sharing its number of examples ``N_c`` as their leading dimension.
        value: the fill value of the padding. Keep it finite:
            [`masked_mean`][hypergrad.clients.masked_mean] drops the padded entries of a loss, but a
            nan in the data would still reach the gradient through ops like ``x @ w`` (``0 * nan =
            nan``).

    Returns:
        [`Padded`][hypergrad.clients.Padded] ``(data, mask, sizes)``.

    Raises:
        ValueError: no datasets, different structures, leaves of one client with different
            lengths, or trailing shapes that differ between clients.

    Examples:
        >>> d = hg.clients.pad([(torch.ones(2, 3), torch.zeros(2)), (torch.ones(4, 3), torch.ones(4))])
        >>> d.data[0].shape, d.mask.tolist(), d.sizes.tolist()
        (torch.Size([2, 4, 3]), [[True, True, False, False], [True, True, True, True]], [2, 4])
    """
    if len(datasets) == 0:
        raise ValueError("hg.clients.pad: got no datasets; pass one dataset per client.")
    datasets = list(datasets)
    with entered("hg.clients.pad"):
        _tree.check_same_structure(datasets)
    sizes = [_size(d, i) for i, d in enumerate(datasets)]
    longest = max(sizes)
    paths = _tree.key_paths(datasets[0])
    per_leaf = list(zip(*(_tree.leaves(d) for d in datasets)))
    padded = []
    for path, xs in zip(paths, per_leaf):
        for i, x in enumerate(xs[1:], start=1):
            if x.shape[1:] != xs[0].shape[1:] or x.dtype != xs[0].dtype:
                leaf = "the tensor" if path == "<root>" else f"leaf {path}"
                raise ValueError(
                    f"hg.clients.pad: {leaf} of dataset {i} has example shape "
                    f"{tuple(x.shape[1:])} and dtype {x.dtype}, but dataset 0 has "
                    f"{tuple(xs[0].shape[1:])} and {xs[0].dtype}; only the number of examples "
                    "may differ between clients."
                )
        padded.append(
            torch.stack(
                [
                    torch.cat([x, x.new_full((longest - x.shape[0], *x.shape[1:]), value)])
                    for x in xs
                ]
            )
        )
    spec = optree.tree_structure(datasets[0], namespace=_tree._NAMESPACE)
    device = padded[0].device  # the mask and sizes live with the data
    counts = torch.tensor(sizes, dtype=torch.int64, device=device)
    mask = torch.arange(longest, device=device).unsqueeze(0) < counts.unsqueeze(1)
    return Padded(optree.tree_unflatten(spec, padded), mask, counts)


def batches(
    padded: Padded,
    /,
    steps: int,
    batch_size: int | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[PyTree, torch.Tensor]:
    """Per-step client batches ``(data, mask)`` with leading dimensions ``(steps, C)``.

    With ``batch_size=None`` every step sees each client's whole (padded) dataset (an expanded
    view, no copy). Otherwise each step draws, for each client independently, ``batch_size``
    distinct examples among its real ones (all of them, plus padding marked ``False`` in the
    mask, for a client with fewer examples).

    Args:
        padded: the result of [`pad`][hypergrad.clients.pad].
        steps: the number of steps (``rounds * K`` for federated rounds).
        batch_size: examples per client and step, or ``None`` for the full batch.
        generator: the random generator for sampling.

    Returns:
        ``(data, mask)``: the data tree with leaves ``(steps, C, B, ...)`` and the bool mask
        ``(steps, C, B)``. Pass it as ``batches=``; the inner loss gets ``(data_c, mask_c)``.

    Examples:
        >>> d = hg.clients.pad([torch.arange(2.0), torch.arange(5.0)])
        >>> data, mask = hg.clients.batches(d, 3, batch_size=4, generator=torch.Generator().manual_seed(0))
        >>> data.shape, mask.sum(-1).tolist()
        (torch.Size([3, 2, 4]), [[2, 4], [2, 4], [2, 4]])
    """
    with entered("hg.clients.batches"):
        if not isinstance(padded, Padded):
            raise TypeError(
                f"hg.clients.batches: padded must be the result of hg.clients.pad(datasets), got "
                f"a {type(padded).__name__}. Pad the clients' datasets first: "
                "hg.clients.batches(hg.clients.pad([(x0, y0), (x1, y1)]), steps)."
            )
        positive_int(steps, "steps")
    mask = padded.mask
    if batch_size is None:
        return (
            _tree.map(lambda x: x.expand(steps, *x.shape), padded.data),
            mask.expand(steps, *mask.shape),
        )
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size > mask.shape[1]:
        raise ValueError(
            f"hg.clients.batches: batch_size must be an int in [1, {mask.shape[1]}] (the "
            f"largest client's size), got {batch_size!r}."
        )
    clients, longest = mask.shape
    on = None if generator is None else generator.device  # draw where the generator lives
    scores = torch.rand(steps, clients, longest, generator=generator, device=on).to(mask.device)
    scores = scores.masked_fill(~mask, 2.0)  # padding sorts last
    index = scores.argsort(dim=-1)[..., :batch_size]
    rows = torch.arange(clients, device=mask.device).view(1, clients, 1)
    return _tree.map(lambda x: x[rows, index], padded.data), mask[rows, index]


def _check_mask(values: torch.Tensor, mask: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(
            f"hg.clients.masked_mean: mask must be a bool tensor, got {got}. Pass the mask from "
            "hg.clients.pad or hg.clients.batches, or compare, e.g. mask > 0."
        )
    if mask.shape != values.shape[: mask.dim()]:
        raise ValueError(
            f"hg.clients.masked_mean: mask has shape {tuple(mask.shape)} but values has shape "
            f"{tuple(values.shape)}; the mask covers the leading dimensions of values (one "
            "entry per example). Pass values and mask of the same batch."
        )


def masked_mean(values: torch.Tensor, mask: torch.Tensor, /) -> torch.Tensor:
    """The mean of ``values`` over the entries where ``mask`` is ``True``.

    ``mask`` covers the leading dimensions of ``values`` (e.g. per-example losses ``(B,)`` or
    predictions ``(B, d)`` with a ``(B,)`` mask); padded entries contribute nothing, also to
    the gradient (even if they hold nan or inf).

    Raises:
        TypeError: a mask that is not a bool tensor.
        ValueError: a mask that is not shaped like the leading dimensions of ``values``.

    Examples:
        >>> hg.clients.masked_mean(torch.tensor([1.0, 3.0, float("nan")]), torch.tensor([True, True, False]))
        tensor(2.)
    """
    _check_mask(values, mask)
    m = mask.reshape(*mask.shape, *([1] * (values.dim() - mask.dim())))
    kept = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    count = m.expand_as(values).sum().clamp_min(1)
    return kept.sum() / count

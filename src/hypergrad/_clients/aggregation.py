"""Aggregating stacked clients into a server model, and broadcasting it back."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hypergrad import tree as _tree
from hypergrad._boundary import entered, positive_int
from hypergrad.tree import PyTree
from hypergrad.tree._base import check_weights

__all__ = ["broadcast", "fedavg"]


def fedavg(tree: PyTree, /, weights: Sequence[float] | torch.Tensor | None = None) -> PyTree:
    """The mean over the leading client dimension, weighted by ``weights`` (FedAvg).

    Weights are normalised to sum to one (pass the clients' sample counts for FedAvg); they may
    be a tensor that requires grad. Integer leaves (BatchNorm's ``num_batches_tracked``) are not
    averaged: client 0's value is taken.

    Args:
        tree: a stacked tree (every leaf with the leading client dimension ``C``).
        weights: ``C`` non-negative weights, or ``None`` for the plain mean.

    Returns:
        One tree without the client dimension.

    Raises:
        ValueError: a weight count other than ``C``, or a negative weight.

    Examples:
        >>> stacked = {"w": torch.tensor([[0.0, 4.0], [4.0, 8.0]]), "n": torch.tensor([3, 3])}
        >>> hg.clients.fedavg(stacked, weights=[1, 3])
        {'w': tensor([3., 7.]), 'n': tensor(3)}
    """

    flat = _tree.leaves(tree)
    if weights is not None and flat and isinstance(flat[0], torch.Tensor) and flat[0].dim():
        with entered("hg.clients.fedavg"):
            check_weights(weights, flat[0].shape[0])

    def leaf(x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() or x.is_complex():
            return _tree.mean(x, weights, stacked=True)
        return x[0]

    return _tree.map(leaf, tree)


def broadcast(tree: PyTree, /, clients: int) -> PyTree:
    """Give every leaf a leading client dimension of size ``clients`` (a view, no copy).

    Differentiable: the gradient with respect to ``tree`` is the sum over clients.

    Examples:
        >>> hg.clients.broadcast({"w": torch.tensor([1.0, 2.0])}, 3)["w"].shape
        torch.Size([3, 2])
    """
    with entered("hg.clients.broadcast"):
        positive_int(clients, "clients", "(the number of clients)")
    return _tree.map(lambda x: x.expand(clients, *x.shape), tree)

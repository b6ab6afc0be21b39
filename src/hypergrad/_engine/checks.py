"""Argument checks shared by every entry point: one version of each, errors that teach."""

from __future__ import annotations

from typing import Any

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad.optim._base import Optimizer
from hypergrad.optim._common import TRAINABLE
from hypergrad.tree import PyTree

__all__ = ["check_float", "check_inner_grad", "check_opt", "check_params", "unchanged", "watch"]

INNER_GRAD = ("auto", "func", "autograd")


def check_opt(opt: Any) -> None:
    """Raise a teaching error if ``opt`` is not an [`Optimizer`][hypergrad.optim.Optimizer].

    Examples:
        >>> check_opt(torch.optim.SGD([torch.zeros(1)], lr=0.1))
        Traceback (most recent call last):
        ...
        TypeError: hypergrad: opt must be a hypergrad optimizer such as hg.optim.sgd(lr=0.1), got SGD. Convert a torch optimizer with hg.optim.from_torch(torch_optimizer, model), model being the module whose parameters it holds.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(
            f"{caller()}: opt must be a hypergrad optimizer such as hg.optim.sgd(lr=0.1), got "
            f"{type(opt).__name__}. Convert a torch optimizer with "
            "hg.optim.from_torch(torch_optimizer, model), model being the module whose parameters "
            "it holds."
        )


def check_params(params: PyTree) -> None:
    """Raise a teaching error unless ``params`` is a non-empty tree of floating-point tensors.

    Tensors on the meta device are refused too: they have no values to train.

    Examples:
        >>> check_params(torch.nn.Linear(2, 1))
        Traceback (most recent call last):
        ...
        TypeError: hypergrad: params must be a tree of tensors (e.g. the dict from hg.split(model)), got a Linear at <root>. Pass params, _ = hg.split(model), and call the module with hg.call(model, params, x) inside the losses.
    """
    paths, leaves, _ = optree.tree_flatten_with_path(params, namespace=_tree._NAMESPACE)
    if not leaves:
        raise ValueError(
            f"{caller()}: params has no tensors (got {params!r}). Pass the parameters to train, "
            "e.g. params, _ = hg.split(model)."
        )
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{caller()}: params must be a tree of tensors (e.g. the dict from "
                f"hg.split(model)), got a {type(leaf).__name__} at {_tree.keystr(path)}. Pass "
                "params, _ = hg.split(model), and call the module with hg.call(model, params, x) "
                "inside the losses."
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{caller()}: params leaf {_tree.keystr(path)} is {leaf.dtype}; {TRAINABLE}"
            )
        if leaf.is_meta:
            raise ValueError(
                f"{caller()}: params leaf {_tree.keystr(path)} is on the meta device: it has a "
                "shape but no values to train. Materialise the model first (e.g. "
                "model.to_empty(device='cpu'), then initialise it), and pass hg.split(model)."
            )


def check_float(tree: PyTree, name: str) -> None:
    """Raise a teaching error unless every leaf of ``tree`` is a floating-point tensor.

    Examples:
        >>> check_float({"w": torch.tensor([1])}, "aux")
        Traceback (most recent call last):
        ...
        TypeError: hypergrad: aux leaf ['w'] is torch.int64; only floating-point tensors can be differentiated. Convert it (e.g. torch.as_tensor(x, dtype=torch.float64)) or move it out of aux (into the batch or outer_batch).
    """
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=_tree._NAMESPACE)
    for p, x in zip(paths, leaves):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(
                f"{caller()}: {name} leaf {_tree.keystr(p)} is {what}; only floating-point "
                "tensors can be differentiated. Convert it (e.g. torch.as_tensor(x, "
                f"dtype=torch.float64)) or move it out of {name} (into the batch or outer_batch)."
            )


def check_inner_grad(inner_grad: Any) -> str:
    """``inner_grad`` if it names a way to take the inner gradient; else a ``ValueError``."""
    if inner_grad not in INNER_GRAD:
        raise ValueError(
            f"{caller()}: inner_grad must be 'auto', 'func' or 'autograd', got {inner_grad!r}."
        )
    return inner_grad


def watch(aux: PyTree) -> tuple[tuple[str, torch.Tensor, int], ...]:
    """The tensor leaves of ``aux`` with their key paths and version counters (see ``unchanged``).

    A detached view shares its tensor's version counter, so an in-place change through any
    view the engine hands to a loss shows here.
    """
    paths, flat, _ = optree.tree_flatten_with_path(aux, namespace=_tree._NAMESPACE)
    return tuple(
        (_tree.keystr(p), x, x._version) for p, x in zip(paths, flat) if isinstance(x, torch.Tensor)
    )


def unchanged(watched: tuple[tuple[str, torch.Tensor, int], ...]) -> None:
    """Raise if a loss changed a leaf of ``aux`` in place since ``watch``.

    Examples:
        >>> aux = {"w": torch.ones(2)}
        >>> watched = watch(aux)
        >>> _ = aux["w"].mul_(2)
        >>> unchanged(watched)
        Traceback (most recent call last):
        ...
        RuntimeError: hypergrad: a loss changed aux['w'] in place. aux is passed unchanged to inner_loss at every step (and to outer_loss), so the steps after the change saw other values and the result would be wrong. Write the op out of place (a = a * 2 instead of a.mul_(2)), or keep what changes in the params or the optimizer state.
    """
    for path, x, version in watched:
        if x._version != version:
            where = "aux" + ("" if path == "<root>" else path)
            raise RuntimeError(
                f"{caller()}: a loss changed {where} in place. aux is passed unchanged to "
                "inner_loss at every step (and to outer_loss), so the steps after the change "
                "saw other values and the result would be wrong. Write the op out of place "
                "(a = a * 2 instead of a.mul_(2)), or keep what changes in the params or the "
                "optimizer state."
            )


def check_clients(clients: Any) -> None:
    """``clients`` is ``None`` or an ``hg.Clients`` (anything with ``total_steps``)."""
    if clients is not None and not callable(getattr(clients, "total_steps", None)):
        raise TypeError(
            f"{caller()}: clients must be hg.Clients(...) (or None for one model), got "
            f"{type(clients).__name__}. Pass e.g. clients=hg.Clients(rounds=3)."
        )

"""Stateless models: a module's tensors as plain dicts, and a forward pass with any of them.

``split`` takes the tensors out of a module, ``call`` runs the module with tensors you pass
(``torch.func.functional_call``), ``load`` copies a tree back in, and ``stack``/``unstack`` add
or remove a leading *client* dimension for ``torch.func.vmap``. The module itself is only a
description of the computation: nothing here changes it except [`load`][hypergrad.nn.load].

Keys are exactly the names of ``named_parameters()`` / ``named_buffers()``. A parameter that is
shared by two submodules (tied weights) appears once, under its first name, and ``call`` uses
the tensor you pass for every place it is tied to.

A module from a user's training code is taken as it comes: one wrapped in
``DistributedDataParallel`` or compiled by ``torch.compile`` stands for the module it wraps
(``model.module``, ``model._orig_mod``), whose names the keys are, and which ``call`` runs
eagerly (hypergrad's own ``process_group=`` does what DDP's all-reduce does, visibly to
autograd). A sharded module (FSDP, or DTensor parameters) is refused: every function here needs
the whole tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch
from torch import nn

from hypergrad import tree as _tree
from hypergrad._boundary import caller, entered

__all__ = ["call", "load", "split", "stack", "unstack"]

Params = dict[str, torch.Tensor]


def split(module: nn.Module, /) -> tuple[Params, Params]:
    """Copy a module's parameters and buffers out as two dicts of detached tensors.

    Args:
        module: any ``torch.nn.Module``; it is not changed.

    Returns:
        ``(params, buffers)``: dicts keyed like ``named_parameters()`` and ``named_buffers()``
        (tied parameters once, under their first name), holding detached copies (they do not
        require grad; differentiate with ``torch.func.grad`` or call ``requires_grad_()``).

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module``.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        >>> params, buffers = hg.split(model)
        >>> list(params), list(buffers)
        (['0.weight', '0.bias', '1.weight', '1.bias'], ['1.running_mean', '1.running_var', '1.num_batches_tracked'])
        >>> params["0.weight"].requires_grad
        False
    """
    with entered("hg.split"):
        _check_module(
            module, "params, buffers = hg.split(model) (for a list of models, hg.stack(models))"
        )
        module = _whole(_inner(module))
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    return params, buffers


def _inner(module: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wrapper or ``torch.compile`` holds (else itself)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
            module = getattr(module, "_orig_mod")  # noqa: B009 - an attribute torch sets
        else:
            return module


def _whole(module: nn.Module) -> nn.Module:
    """``module``, unless it is sharded (FSDP, DTensor parameters): raise naming what works."""
    sharded = type(module).__name__ == "FullyShardedDataParallel" or any(
        type(x).__name__ == "DTensor" or type(getattr(x, "data", None)).__name__ == "DTensor"
        for x in (*module.parameters(), *module.buffers())
    )
    if sharded:
        raise TypeError(
            f"{caller()}: the module is sharded ({type(module).__name__}, with DTensor or "
            "flattened FSDP parameters): hypergrad needs every tensor whole on each process. "
            "Supported: one full copy of the model on every rank, with each rank's shard of "
            "the data (hg.hypergrad(..., process_group=group)), or the module as it is before "
            "DistributedDataParallel or torch.compile wraps it. Pass the model before "
            "fully_shard / FSDP / distribute_tensor."
        )
    return module


def _check_module(module: Any, fix: str) -> None:
    """Raise a ``TypeError`` that names the fix unless ``module`` is an ``nn.Module``."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{caller()}: module must be a torch.nn.Module, got a {type(module).__name__}. "
            f"Pass the model itself: {fix}."
        )


_NAMED = {"params": "parameters", "buffers": "buffers"}


def _check_dict(tree: Any, name: str, fix: str) -> None:
    """Raise a ``TypeError`` that names the fix unless ``tree`` is a dict-like mapping."""
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{caller()}: {name} must be a dict keyed like named_{_NAMED[name]}(), got a "
            f"{type(tree).__name__}. {fix}"
        )


def _aliases(module: nn.Module) -> dict[str, str]:
    """Map every name of a tied parameter that ``split`` leaves out to the name it keeps."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def call(
    module: nn.Module,
    params: Mapping[str, torch.Tensor],
    /,
    *args: Any,
    buffers: Mapping[str, torch.Tensor] | None = None,
    return_buffers: bool = False,
    **kwargs: Any,
) -> Any:
    """Run ``module(*args, **kwargs)`` with the tensors in ``params`` (and ``buffers``).

    A thin layer over ``torch.func.functional_call`` (with ``tie_weights=True``): differentiable
    in ``params`` and ``buffers``, usable under ``torch.func.grad``/``vmap``/``jvp``. For every
    key you give, the module's own tensor is never read; keys you leave out are read from the
    module. Neither the module nor your dicts are modified.

    Buffers: the module's forward may update buffers in place (``BatchNorm`` in train mode
    updates its running statistics). ``call`` runs the forward on *copies* of the buffers, so
    those updates never reach the module or the ``buffers`` dict you passed. With
    ``buffers=None`` the copies are taken from the module's current buffers. To keep the
    updated statistics, pass ``return_buffers=True`` and carry the returned dict forward.

    Args:
        module: the architecture; its state is left untouched.
        params: a dict keyed like [`split`][hypergrad.nn.split]'s params (all or some of the keys; a
            tied parameter may be given under any of its names).
        *args: positional arguments of the module's forward.
        buffers: a dict keyed like [`split`][hypergrad.nn.split]'s buffers, or ``None`` for the
            module's own.
        return_buffers: also return the buffers after the forward pass.
        **kwargs: keyword arguments of the module's forward.

    Returns:
        The module's output, or ``(output, new_buffers)`` with ``return_buffers=True``.

    Raises:
        TypeError: ``module`` is not a module, ``params``/``buffers`` is not a dict, or an entry
            is not a tensor (or, in ``params``, not floating-point).
        ValueError: a key in ``params`` or ``buffers`` that the module does not have, or one
            with another shape than the module's tensor.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> params, _ = hg.split(model)
        >>> params = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([0.5])}
        >>> hg.call(model, params, torch.tensor([[1.0, 1.0]]))
        tensor([[3.5000]])
        >>> bn = torch.nn.BatchNorm1d(1)
        >>> p, b = hg.split(bn)
        >>> _, b2 = hg.call(bn, p, torch.tensor([[1.0], [3.0]]), buffers=b, return_buffers=True)
        >>> b2["running_mean"], bn.running_mean  # the module is unchanged
        (tensor([0.2000]), tensor([0.]))
    """
    with entered("hg.call"):
        _check_module(module, "hg.call(model, params, x)")
        module = _inner(module)
        tied = _check_known_keys(module, params, buffers)
    # Copies of every buffer: a forward that updates one in place (BatchNorm in train mode)
    # changes neither the module nor the caller's dict, whichever keys were given.
    own = {k: v.clone() for k, v in module.named_buffers()}
    if buffers is not None:
        own.update({k: v.clone() for k, v in buffers.items()})
    # Untying costs a second walk over the module inside functional_call; skip it when nothing
    # is tied (the result is the same).
    out = torch.func.functional_call(module, (dict(params), own), args, kwargs, tie_weights=tied)
    if return_buffers:
        return out, own
    return out


def _check_known_keys(
    module: nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor] | None,
) -> bool:
    """Raise for unknown, misshaped or non-tensor keys; return whether the module ties tensors."""
    fix = "Get one with params, buffers = hg.split(module)."
    _check_dict(params, "params", fix)
    if buffers is not None:
        _check_dict(buffers, "buffers", fix)
    named = list(module.named_parameters(remove_duplicate=False))
    named_buffers = list(module.named_buffers(remove_duplicate=False))
    tied = len({id(t) for _, t in named + named_buffers}) < len(named) + len(named_buffers)
    for where, given, own in (("params", params, named), ("buffers", buffers, named_buffers)):
        if given is not None:
            _check_entries(module, where, given, dict(own))
    return tied


def _check_entries(
    module: nn.Module, where: str, given: Mapping[str, Any], own: dict[str, torch.Tensor]
) -> None:
    """Every entry of ``given`` names a tensor of ``module``, with its shape (and a float param)."""
    unknown = [k for k in given if k not in own]
    if unknown:
        known = ", ".join(repr(n) for n in sorted(own)) or "none"
        raise ValueError(
            f"{caller()}: {where} has key(s) {', '.join(repr(k) for k in unknown)} that "
            f"{type(module).__name__} does not have (its {where}: {known}). Use the keys from "
            "hg.split(module)."
        )
    for k, v in given.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"{caller()}: {where}[{k!r}] is a {type(v).__name__}, not a tensor. Pass tensors, "
                "e.g. the dicts from hg.split(module)."
            )
        if where == "params" and not v.is_floating_point():
            raise TypeError(
                f"{caller()}: params[{k!r}] is {v.dtype}; a module's parameters are "
                "floating-point tensors. Pass the values from hg.split(module), or cast them."
            )
        if v.shape != own[k].shape:
            raise ValueError(
                f"{caller()}: {where}[{k!r}] has shape {tuple(v.shape)} but "
                f"{type(module).__name__}'s {k} has shape {tuple(own[k].shape)}. Use the keys "
                "and shapes from hg.split(module)."
            )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}, dtype {x.dtype}"
    return f"a {type(x).__name__}, not a tensor"


def _mismatches(
    kind: str, expected: Mapping[str, torch.Tensor], got: Mapping[str, Any], aliases: dict[str, str]
) -> list[str]:
    problems = []
    for k, ref in expected.items():
        if k not in got:
            problems.append(f"missing {kind} key {k!r} (expected {_describe(ref)})")
            continue
        v = got[k]
        if not isinstance(v, torch.Tensor) or v.shape != ref.shape or v.dtype != ref.dtype:
            problems.append(f"{kind} key {k!r}: expected {_describe(ref)}, got {_describe(v)}")
    for k, v in got.items():
        if k not in expected:
            tied = (
                f"; it is tied to {aliases[k]!r}, pass it once under that name"
                if k in aliases
                else ""
            )
            problems.append(f"unexpected {kind} key {k!r} ({_describe(v)}){tied}")
    return problems


def load(
    module: nn.Module,
    params: Mapping[str, torch.Tensor],
    /,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Copy ``params`` (and ``buffers``) into the module's own tensors, in place, without grad.

    Strict: the keys must be exactly those of [`split`][hypergrad.nn.split], each with the same
    shape and dtype (the device may differ; values are copied to the module's device). Nothing is
    copied unless everything fits.

    Args:
        module: the module to overwrite.
        params: a dict keyed like [`split`][hypergrad.nn.split]'s params.
        buffers: a dict keyed like [`split`][hypergrad.nn.split]'s buffers, or ``None`` to leave
            buffers as they are.

    Returns:
        ``module``, for chaining.

    Raises:
        TypeError: ``module`` is not a module, or ``params``/``buffers`` is not a dict.
        ValueError: listing every missing, unexpected, wrongly-shaped or wrongly-typed key, with
            the expected and the given shape and dtype.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> params, _ = hg.split(model)
        >>> _ = hg.load(model, hg.tree.zeros_like(params))
        >>> model.weight
        Parameter containing:
        tensor([[0., 0.]], requires_grad=True)
    """
    with entered("hg.load"):
        _check_module(module, "hg.load(model, params)")
        inner = _whole(_inner(module))
        fix = "Pass the dicts from hg.split(model)."
        _check_dict(params, "params", fix)
        if buffers is not None:
            _check_dict(buffers, "buffers", fix)
    own_params = dict(inner.named_parameters())
    own_buffers = dict(inner.named_buffers())
    aliases = _aliases(inner)
    problems = _mismatches("params", own_params, params, aliases)
    if buffers is not None:
        problems += _mismatches("buffers", own_buffers, buffers, {})
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(
            f"hg.load: the tree does not fit {type(inner).__name__} "
            f"({len(problems)} problem(s)):\n{listing}\n"
            "Pass dicts made by hg.split of a module with the same architecture, or fix the "
            "keys listed above."
        )
    with torch.no_grad():
        for k, v in params.items():
            own_params[k].copy_(v)
        for k, v in (buffers or {}).items():
            own_buffers[k].copy_(v)
    return module


def _first_difference(ref: Params, other: Params) -> str | None:
    for k, v in ref.items():
        if k not in other:
            return f"key {k!r} is missing from it"
        w = other[k]
        if w.shape != v.shape or w.dtype != v.dtype:
            return f"key {k!r} has {_describe(w)} but module 0 has {_describe(v)}"
    for k in other:
        if k not in ref:
            return f"it has key {k!r} that module 0 does not have"
    return None


def _check_modules(modules: Any) -> None:
    if isinstance(modules, nn.Module) or not isinstance(modules, Sequence):
        raise TypeError(
            f"{caller()}: modules must be a list of modules, got a {type(modules).__name__}. "
            "Pass hg.stack([model_a, model_b, ...]); for one model, hg.split(model)."
        )
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"{caller()}: modules[{i}] is a {type(m).__name__}, not a torch.nn.Module. "
                "Pass modules of one architecture, e.g. copies made with copy.deepcopy."
            )


def stack(modules: Sequence[nn.Module], /) -> tuple[Params, Params]:
    """Stack the parameters and buffers of modules of one architecture along a new leading dim.

    The result feeds ``torch.func.vmap``: ``vmap(lambda p, b, x: hg.call(model, p, x,
    buffers=b))(params, buffers, xs)`` runs every client at once with any one of the modules
    as the architecture.

    Args:
        modules: a non-empty sequence of modules with the same keys, shapes and dtypes.

    Returns:
        ``(params, buffers)`` as [`split`][hypergrad.nn.split] gives, each tensor with a leading
        dimension of ``len(modules)``.

    Raises:
        TypeError: ``modules`` is not a list of modules.
        ValueError: no modules, or a module that differs from the first (the message names the
            first differing key).

    Examples:
        >>> models = [torch.nn.Linear(3, 2) for _ in range(4)]
        >>> params, buffers = hg.stack(models)
        >>> params["weight"].shape
        torch.Size([4, 2, 3])
        >>> torch.equal(hg.unstack(params)[2]["bias"], models[2].bias.detach())
        True
    """
    with entered("hg.stack"):
        _check_modules(modules)
    if len(modules) == 0:
        raise ValueError("hg.stack: got no modules; pass a non-empty list of modules.")
    parts = [split(m) for m in modules]
    for i, (p, b) in enumerate(parts[1:], start=1):
        why = _first_difference(parts[0][0], p) or _first_difference(parts[0][1], b)
        if why is not None:
            raise ValueError(
                f"hg.stack: module {i} ({type(modules[i]).__name__}) has a different structure "
                f"from module 0 ({type(modules[0]).__name__}): {why}. Stack modules of one "
                "architecture, e.g. copies made with copy.deepcopy."
            )
    params = {k: torch.stack([p[k] for p, _ in parts]) for k in parts[0][0]}
    buffers = {k: torch.stack([b[k] for _, b in parts]) for k in parts[0][1]}
    return params, buffers


def unstack(tree: _tree.PyTree, /) -> list[_tree.PyTree]:
    """Split a stacked tree along its leading dimension (inverse of [`stack`][hypergrad.nn.stack]).

    Args:
        tree: any tree whose leaves share one leading dimension ``n``, e.g. ``params`` from
            [`stack`][hypergrad.nn.stack], or the pair ``(params, buffers)``.

    Returns:
        A list of ``n`` trees with the structure of ``tree``; the tensors are views.

    Raises:
        ValueError: the tree has no leaves, a 0-d leaf, or leaves with different leading sizes.

    Examples:
        >>> params, buffers = hg.stack([torch.nn.Linear(3, 2) for _ in range(2)])
        >>> [p["weight"].shape for p in hg.unstack(params)]
        [torch.Size([2, 3]), torch.Size([2, 3])]
    """
    paths = _tree.key_paths(tree)
    flat = _tree.leaves(tree)
    sizes = [x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in flat]
    if not flat or None in sizes or len(set(sizes)) > 1:
        listing = ", ".join(
            f"{p}: {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            for p, x in zip(paths, flat)
        )
        raise ValueError(
            "hg.unstack: every leaf needs the same leading (client) dimension; got "
            f"{listing or 'no leaves'}. Pass a tree made by hg.stack."
        )
    pieces = [torch.unbind(x) for x in flat]
    spec = optree.tree_structure(tree, namespace=_tree._NAMESPACE)
    count = len(pieces[0])  # every leaf has this leading size (checked above)
    return [optree.tree_unflatten(spec, [p[i] for p in pieces]) for i in range(count)]

"""Hyperparameters of the optimizer families: their forms, their ranges, and per-leaf values.

A hyperparameter is a number, a 0-d tensor, a per-parameter dict keyed like the params or a
per-element tensor shaped like one parameter. ``check_hyperparams`` checks forms and ranges as
the family constructor; ``resolve`` turns one hyperparameter into a value per leaf, and
``flat_hp`` into one flat vector per group of leaves (``hypergrad.optim._common``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import optree
import torch

from hypergrad._boundary import caller, is_number
from hypergrad.tree import _NAMESPACE, PyTree, keystr
from hypergrad.tree._base import same_structure

Scalar = float | torch.Tensor

#: A hyperparameter: a number, a 0-d tensor, a per-parameter dict or a per-element tensor.
Hyper = float | torch.Tensor | Mapping[str, Any]


def is_zero(x: Any) -> bool:
    """True only for the literal number 0: a tensor (even a zero one) keeps its branch."""
    return is_number(x) and x == 0


def in_functorch_transform() -> bool:
    """True when called inside a torch.func transform (grad, vmap, jvp, ...)."""
    return torch._C._functorch.maybe_current_level() is not None


def concrete(t: torch.Tensor) -> bool:
    """Whether ``t`` holds real values that may be read (not under vmap/grad/compile)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    return t.device.type != "meta"


def host_value(t: torch.Tensor) -> float | None:
    """The value of a 0-d CPU tensor outside any transform, else ``None``.

    Eager fast paths read the step counter as a Python number, as torch.optim does. They must not
    do so for a tensor on an accelerator (that would sync the device every step), under
    vmap/grad/compile (no concrete value), or with autograd history (detached first).
    """
    if t.device.type != "cpu" or not concrete(t):
        return None
    return float(t.detach())


def scalar_step_dtype() -> torch.dtype:
    """The dtype torch.optim uses for its ``step`` counters (float64 iff that is the default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _values(value: Any) -> Iterator[tuple[str, float]]:
    """Yield ``(where, number)`` for every value of a hyperparameter that can be read now."""
    if is_number(value):
        yield "", float(value)
    elif isinstance(value, torch.Tensor):
        if concrete(value) and value.numel():
            yield "", float(value.detach().min())
            yield "", float(value.detach().max())
    elif isinstance(value, Mapping):
        for key, item in value.items():
            for where, number in _values(item):
                yield f"[{key!r}]{where}", number


def check_range(name: str, value: Any, *, low: float = 0.0, high: float | None = None) -> None:
    """Raise ``ValueError`` if a readable value of ``name`` lies outside ``[low, high)``."""
    for where, number in _values(value):
        bad = not (number >= low) or (high is not None and not number < high)
        if bad:
            interval = f"[{low}, {high})" if high is not None else f">= {low}"
            raise ValueError(
                f"{caller()}: invalid {name}{where}: {number}; it must be {interval}, "
                "as in torch.optim."
            )


def check_form(name: str, value: Any) -> None:
    """Check that a hyperparameter is a number, a tensor or a per-parameter dict of those."""
    if is_number(value) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not (is_number(item) or isinstance(item, torch.Tensor)):
                raise ValueError(
                    f"{caller()}: {name}[{key!r}] is a {type(item).__name__}; each entry of a "
                    "per-parameter dict must be a float, a 0-d tensor or a tensor shaped like "
                    "that parameter."
                )
        return
    raise ValueError(
        f"{caller()}: {name} is a {type(value).__name__}; expected a float, a 0-d tensor, a "
        "per-parameter dict keyed like the params, or a tensor shaped like the parameter."
    )


def check_forms(hp: Mapping[str, Any]) -> None:
    """``check_form`` for every hyperparameter, and for each item of a tuple (Adam's betas)."""
    for name, value in hp.items():
        if isinstance(value, tuple):
            for i, item in enumerate(value):
                check_form(f"{name}[{i}]", item)
        else:
            check_form(name, value)


def check_hyperparams(
    hp: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
    *,
    unchecked: tuple[str, ...] = (),
    below_one: tuple[str, ...] = (),
) -> None:
    """torch.optim's checks: every hyperparameter of a valid form, then in its range.

    A value must be ``>= 0``, or in ``[0, 1)`` for the names in ``below_one``; the names in
    ``unchecked`` may take any value. With the defaults, the whole check of a family whose
    options need none (``build``'s default).
    """
    for name, value in hp.items():
        check_form(name, value)
    for name, value in hp.items():
        if name not in unchecked:
            check_range(name, value, high=1.0 if name in below_one else None)


def resolve(
    name: str,
    value: Any,
    paths: list[tuple[Any, ...]],
    shapes: list[torch.Size],
    spec: optree.PyTreeSpec,
) -> Scalar | list[Scalar]:
    """Turn a hyperparameter into a scalar (number or 0-d tensor) or one value per leaf."""
    if is_number(value):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value
        if value.numel() == 1 and len({tuple(s) for s in shapes} | {tuple(value.shape)}) > 1:
            return value.reshape(())
        for path, shape in zip(paths, shapes):
            if value.shape != shape:
                raise ValueError(
                    f"{caller()}: {name} has shape {tuple(value.shape)} but parameter "
                    f"{keystr(path)} has shape {tuple(shape)}; a tensor hyperparameter must be "
                    "0-d or shaped like every parameter. Use a per-parameter dict, e.g. "
                    f"{name}={{'fc.weight': tensor, ...}}."
                )
        return [value] * len(shapes)
    if isinstance(value, Mapping):
        if not same_structure(value, optree.tree_unflatten(spec, [0] * len(paths))):
            _explain_dict_mismatch(name, value, paths)
        tree: PyTree = value
        out: list[Any] = optree.tree_leaves(tree, namespace=_NAMESPACE)
        for path, shape, item in zip(paths, shapes, out):
            if isinstance(item, torch.Tensor) and item.dim() and item.shape != shape:
                raise ValueError(
                    f"{caller()}: {name}{keystr(path)} has shape {tuple(item.shape)} but the "
                    f"parameter has shape {tuple(shape)}; use a 0-d tensor or one shaped like "
                    "the parameter."
                )
        return out
    check_form(name, value)
    raise AssertionError("unreachable")  # pragma: no cover


def _explain_dict_mismatch(name: str, value: Mapping, paths: list) -> None:
    tree: PyTree = value
    hp_paths, _, _ = optree.tree_flatten_with_path(tree, namespace=_NAMESPACE)
    have, want = set(hp_paths), set(paths)
    for p in paths:
        if p not in have:
            raise ValueError(
                f"{caller()}: the per-parameter dict {name} has no entry for parameter "
                f"{keystr(p)}; give every parameter a value (or pass one float for all)."
            )
    for p in hp_paths:
        if p not in want:
            raise ValueError(
                f"{caller()}: the per-parameter dict {name} has an entry {keystr(p)} that is not "
                "a parameter; remove it or check the spelling against params.keys()."
            )
    raise ValueError(  # pragma: no cover - same keys, different containers
        f"{caller()}: the per-parameter dict {name} is not keyed like the params."
    )


def flat_hp(value: Scalar | list[Scalar], idx: list[int], shapes: list, like: torch.Tensor) -> Any:
    """The hyperparameter for one flat group: scalar as is, per-leaf values as one flat vector."""
    if not isinstance(value, list):
        if isinstance(value, torch.Tensor) and value.dtype != like.dtype:
            return value.to(dtype=like.dtype)
        return value
    parts = []
    for i in idx:
        v = value[i]
        if is_number(v):
            v = torch.full(shapes[i], float(v), dtype=like.dtype, device=like.device)
        else:
            v = v.to(dtype=like.dtype).expand(shapes[i])
        parts.append(v.reshape(-1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def resolve_all(
    hyperparams: Mapping[str, Any], spec: optree.PyTreeSpec, shapes: list
) -> dict[str, Any]:
    """``resolve`` every hyperparameter; numbers (the common case) pass straight through."""
    hp: dict[str, Any] = {}
    paths = None
    for name, value in hyperparams.items():
        values = value if isinstance(value, tuple) else (value,)
        if all(is_number(v) for v in values):
            hp[name] = value
            continue
        if paths is None:
            paths = spec.paths()
        if isinstance(value, tuple):
            hp[name] = tuple(
                resolve(f"{name}[{i}]", v, paths, shapes, spec) for i, v in enumerate(value)
            )
        else:
            hp[name] = resolve(name, value, paths, shapes, spec)
    return hp

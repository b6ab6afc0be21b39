"""Hyperparameters as differentiable inputs: what ``wrt`` names, and tensors for the floats."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller, is_number
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree

__all__ = [
    "GROUPS",
    "Computed",
    "chain",
    "check_tensor_ranges",
    "compute",
    "detached_values",
    "map_hyper",
    "parse_wrt",
    "ranges_unchecked",
    "to_tensor",
    "widened",
]

GROUPS = ("aux", "hyperparams", "params")


def _is_hyper_value(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    if is_number(value):
        return True
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_hyper_value(v) for v in value)
    if isinstance(value, Mapping):
        return bool(value) and all(_is_hyper_value(v) for v in value.values())
    return False


def map_hyper(fn: Callable[[Any], Any], value: Any) -> Any:
    """Apply ``fn`` to every number or tensor of a hyperparameter (through tuples and dicts).

    Examples:
        >>> map_hyper(lambda v: v * 2, {"a": 1.0, "b": (2.0, torch.tensor(3.0))})
        {'a': 2.0, 'b': (4.0, tensor(6.))}
    """
    if isinstance(value, (tuple, list)):
        return type(value)(map_hyper(fn, v) for v in value)
    if isinstance(value, Mapping):
        return {k: map_hyper(fn, v) for k, v in value.items()}
    return fn(value)


def to_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    return map_hyper(
        lambda v: (
            v.detach()
            if isinstance(v, torch.Tensor)
            else torch.tensor(float(v), dtype=dtype, device=device)
        ),
        value,
    )


def parse_wrt(
    wrt: str | Sequence[str], aux: PyTree, hp: Mapping[str, Any], opt: Optimizer
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    items = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    differentiable = [k for k, v in hp.items() if _is_hyper_value(v)]
    targets: list[str] = []
    names: list[str] = []
    for item in items:
        if item in GROUPS:
            if item == "hyperparams":
                names += differentiable
            targets.append(item)
        elif item in differentiable:
            names.append(item)
            targets.append("hyperparams")
        else:
            known = ", ".join(differentiable)
            raise ValueError(
                f"{caller()}: wrt entry {item!r} is not 'aux', 'hyperparams', 'params' or a "
                f"differentiable hyperparameter of {opt!r} ({known}). Pass e.g. "
                "wrt=('aux', 'lr')."
            )
    if not targets:
        raise ValueError(
            f"{caller()}: wrt is empty; say what to differentiate, e.g. wrt=('aux',), "
            "wrt=('lr',) or wrt=('hyperparams', 'params')."
        )
    if "aux" in targets and not _tree.leaves(aux):
        raise ValueError(
            f"{caller()}: wrt asks for 'aux' but aux has no tensors (aux={aux!r}). Pass aux=..., "
            "or ask for something else, e.g. wrt=('lr',)."
        )
    ordered = tuple(g for g in GROUPS if g in targets)
    return ordered, tuple(dict.fromkeys(names))


class Computed(NamedTuple):
    """Hyperparameters computed from ``aux`` by ``hyperparams=fn`` (``fn(aux) -> dict``).

    The method differentiates the computed values as hyperparameters; ``chain`` then carries
    their gradient back through ``fn`` into ``aux`` (one vector-Jacobian product).

    Attributes:
        values: what ``fn`` returned, attached to the graph of ``leaves``.
        leaves: the floating-point leaves of ``aux`` that ``fn`` saw, requiring grad.
        positions: where those leaves sit among ``aux``'s leaves.
        names: the computed names that depend on ``aux`` (their gradient is chained).
    """

    values: dict[str, Any]
    leaves: list[torch.Tensor]
    positions: list[int]
    names: tuple[str, ...]


def compute(fn: Callable[[PyTree], Any], aux: PyTree, opt: Optimizer, *, fresh: bool) -> Computed:
    """``fn(aux)``, checked: a dict of known names.

    ``fresh``: on new leaves of ``aux`` that require grad (to chain a gradient into them);
    else on ``aux`` itself (an unroll: the values keep any graph ``aux`` has).

    Examples:
        >>> c = compute(lambda a: {"lr": a.exp()}, torch.tensor(0.0), hg.optim.sgd(lr=0.1),
        ...             fresh=True)
        >>> c.values["lr"], c.names
        (tensor(1., grad_fn=<ExpBackward0>), ('lr',))
    """
    flat, spec = optree.tree_flatten(aux, namespace=_tree._NAMESPACE)
    positions = [
        i
        for i, x in enumerate(flat)
        if fresh and isinstance(x, torch.Tensor) and x.is_floating_point()
    ]
    leaves = [flat[i].detach().requires_grad_() for i in positions]
    for i, leaf in zip(positions, leaves):
        flat[i] = leaf
    with torch.enable_grad():
        values = fn(optree.tree_unflatten(spec, flat))
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{caller()}: hyperparams is a function, so it must return a dict of "
            f"hyperparameters such as {{'lr': aux['log_lr'].exp()}}, but it returned a "
            f"{type(values).__name__}. Return a dict keyed by names of {opt!r}."
        )
    unknown = [k for k in values if k not in opt.hyperparams]
    if unknown:
        raise ValueError(
            f"{caller()}: the hyperparams function returned the unknown name {unknown[0]!r}; "
            f"{opt!r} has: {', '.join(opt.hyperparams)}. Return only those names (the "
            "others keep the optimizer's values)."
        )
    attached = [k for k, v in values.items() if _attached(v)]
    return Computed(dict(values), leaves, positions, tuple(attached))


def widened(
    targets: tuple[str, ...],
    names: tuple[str, ...],
    computed: Computed,
    moving: tuple[str, ...] | None,
) -> tuple[tuple[str, ...], tuple[str, ...], Computed | None]:
    """``targets`` and hyperparameter ``names`` with the computed ones added (to chain later).

    ``moving``: for a method that differentiates only a fixed point (``hg.Implicit``), the
    hyperparameters that move it (the others have no effect there); ``None``: all count.
    Returns ``computed`` restricted to those added, or ``None`` when none is.

    Examples:
        >>> c = Computed({"lr": torch.tensor(0.1)}, [], [], ("lr",))
        >>> widened(("aux",), (), c, None)[:2]
        (('aux', 'hyperparams'), ('lr',))
        >>> widened(("aux",), (), c, ("weight_decay",))
        (('aux',), (), None)
    """
    added = tuple(n for n in computed.names if moving is None or n in moving)
    if not added:
        return targets, names, None
    ordered = tuple(g for g in GROUPS if g in targets or g == "hyperparams")
    return ordered, tuple(dict.fromkeys(names + added)), computed._replace(names=added)


def _attached(value: Any) -> bool:
    found: list[bool] = []
    map_hyper(lambda v: found.append(isinstance(v, torch.Tensor) and v.requires_grad), value)
    return any(found)


def detached_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The computed hyperparameters without their graph: what the unroll runs with."""
    return {
        k: map_hyper(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, v)
        for k, v in values.items()
    }


def chain(
    computed: Computed, grads: dict[str, PyTree], unused: tuple[str, ...], report: tuple[str, ...]
) -> tuple[dict[str, PyTree], tuple[str, ...]]:
    """Carry the computed hyperparameters' gradients through ``fn`` into ``grads["aux"]``.

    ``report``: the hyperparameter names the caller asked for (their gradients stay in
    ``grads["hyperparams"]``; ``"hyperparams"`` is dropped when none was asked). An aux leaf
    that reaches the outer loss through ``fn`` is no longer ``unused``.
    """
    hyper = grads.get("hyperparams") or {}
    outs, cots = [], []
    for name in computed.names:
        pairs = zip(_hyper_leaves(computed.values[name]), _hyper_leaves(hyper[name]))
        for value, cot in pairs:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                outs.append(value)
                cots.append(cot.to(value.dtype))
    through = torch.autograd.grad(outs, computed.leaves, cots, allow_unused=True)
    out = dict(grads)
    flat, spec = optree.tree_flatten(grads["aux"], namespace=_tree._NAMESPACE)
    named: PyTree = {"aux": grads["aux"]}
    whole = optree.tree_paths(named, namespace=_tree._NAMESPACE)
    paths = [_tree.keystr(p) for p in whole]  # as ``finish`` names unused leaves
    reached = set()
    for i, g in zip(computed.positions, through):
        if g is not None:
            flat[i] = flat[i] + g.to(flat[i].dtype)
            reached.add(paths[i])
    out["aux"] = optree.tree_unflatten(spec, flat)
    if report:
        out["hyperparams"] = {k: hyper[k] for k in report}
    else:
        out.pop("hyperparams", None)
    return out, tuple(p for p in unused if p not in reached)


def _hyper_leaves(value: Any) -> list[Any]:
    """The numbers and tensors of one hyperparameter, in ``map_hyper``'s order."""
    found: list[Any] = []
    map_hyper(found.append, value)
    return found


_RANGES_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("ranges", default=True)


@contextlib.contextmanager
def ranges_unchecked() -> Iterator[None]:
    """Within the block, tensor hyperparameters are not range-checked at the front door.

    For ``hg.testing.check_hypergrad``: its finite differences step a hyperparameter at the
    edge of its range (a momentum of 0) just outside it.
    """
    token = _RANGES_CHECKED.set(False)
    try:
        yield
    finally:
        _RANGES_CHECKED.reset(token)


def check_tensor_ranges(opt: Optimizer, hyperparams: Mapping[str, Any] | None) -> None:
    """The ranges torch.optim enforces (a learning rate >= 0, ...), for tensor values too.

    ``opt.merged`` checks the numbers of ``hyperparams``; the front door checks its tensors
    here, once per call (one read of each, outside any transform: under vmap or grad they have
    no value to read, and are not checked), so the steps never sync the device for it.

    Examples:
        >>> check_tensor_ranges(hg.optim.sgd(lr=0.1), {"lr": torch.tensor(-0.1)})
        Traceback (most recent call last):
        ...
        ValueError: hypergrad: invalid lr: -0.10000000149011612; it must be >= 0.0, as in torch.optim.
    """
    if not hyperparams or opt.check_fn is None or not _RANGES_CHECKED.get():
        return
    tensors = {k: v for k, v in hyperparams.items() if _has_tensor(v)}
    if tensors:  # unseen by torch function modes: a kink-aware finite difference, say
        with torch.no_grad(), torch._C.DisableTorchFunction():
            opt.check_fn({**opt.hyperparams, **tensors}, opt.options)


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in _hyper_leaves(value))


def resolve_call(
    hyperparams: Any,
    aux_copy: PyTree,
    aux: PyTree,
    opt: Optimizer,
    wrt: Any,
    params: PyTree,
    *,
    differentiating: bool,
    moving: Any,
) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...], Computed | None, tuple[str, ...]]:
    """A call's hyperparameters, checked: ``(hp, targets, names, computed, report)``.

    ``hyperparams`` is a mapping, ``None`` or ``fn(aux) -> dict`` (evaluated on ``aux_copy``,
    as the losses see aux); ``differentiating`` says whether the call takes a hypergradient
    (``wrt`` is read then); ``moving`` is what moves ``hg.Implicit``'s optimum, or ``None``.
    The differentiated hyperparameters come back as tensors like the first leaf of ``params``.
    """
    computed = None
    if callable(hyperparams):  # fn(aux) -> dict
        computed = compute(hyperparams, aux_copy, opt, fresh=differentiating)
        hyperparams = detached_values(computed.values) if differentiating else computed.values
    hp: dict[str, Any] = dict(opt.merged(hyperparams))  # checked as the optimizer checks them
    check_tensor_ranges(opt, hyperparams)
    targets, names = parse_wrt(wrt, aux, hp, opt) if differentiating else ((), ())
    report = names
    if differentiating and computed is not None and "aux" in targets:
        targets, names, computed = widened(targets, names, computed, moving)
    else:
        computed = None
    first = _tree.leaves(params)[0]  # a non-empty tree of floating-point tensors (checked)
    for name in names:
        hp[name] = to_tensor(hp[name], first.dtype, first.device)
    return hp, targets, names, computed, report

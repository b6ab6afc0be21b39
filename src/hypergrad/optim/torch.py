"""Build a functional optimizer from a ``torch.optim`` instance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hypergrad._boundary import caller, entered
from hypergrad.optim._base import Optimizer
from hypergrad.optim._hyper import is_zero
from hypergrad.optim.adagrad import adagrad
from hypergrad.optim.adam import adam, adamw
from hypergrad.optim.rmsprop import rmsprop
from hypergrad.optim.sgd import sgd

__all__ = ["from_torch"]

# class -> (hyperparameter names, option names); "decoupled_weight_decay" picks adam or adamw.
_FAMILIES: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {
    torch.optim.SGD: (("lr", "momentum", "dampening", "weight_decay"), ("nesterov", "maximize")),
    torch.optim.Adam: (("lr", "betas", "eps", "weight_decay"), ("amsgrad", "maximize")),
    torch.optim.AdamW: (("lr", "betas", "eps", "weight_decay"), ("amsgrad", "maximize")),
    torch.optim.RMSprop: (
        ("lr", "alpha", "eps", "weight_decay", "momentum"),
        ("centered", "maximize"),
    ),
    torch.optim.Adagrad: (
        ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
        ("maximize",),
    ),
}
# Group entries that only choose an implementation (results are identical) or that schedulers add.
_IGNORED = {"params", "foreach", "differentiable", "initial_lr", "decoupled_weight_decay"}


def _names(torch_optimizer: torch.optim.Optimizer, module_or_names: Any) -> list[list[str]]:
    groups = [g["params"] for g in torch_optimizer.param_groups]
    flat = [p for g in groups for p in g]
    if isinstance(module_or_names, torch.nn.Module):
        by_id = {id(p): n for n, p in module_or_names.named_parameters()}
        missing = [i for i, p in enumerate(flat) if id(p) not in by_id]
        if missing:
            raise ValueError(
                f"{caller()}: the optimizer's parameter number {missing[0]} (shape "
                f"{tuple(flat[missing[0]].shape)}) is not a parameter of the module; pass the "
                "module the optimizer was built for, or a list of names."
            )
        in_opt = {id(p) for p in flat}
        left = [n for n, p in module_or_names.named_parameters() if id(p) not in in_opt]
        if left:
            raise ValueError(
                f"{caller()}: module parameter {left[0]!r} is not in the optimizer, so the "
                "functional optimizer would not know how to update it. Pass the names of the "
                "optimized parameters as a list, and step only those (e.g. with "
                "hg.tree.partition)."
            )
        names = [by_id[id(p)] for p in flat]
    elif isinstance(module_or_names, Sequence) and not isinstance(module_or_names, str):
        names = [str(n) for n in module_or_names]
        if len(names) != len(flat):
            raise ValueError(
                f"{caller()}: got {len(names)} names for the optimizer's {len(flat)} "
                "parameters; give one name per parameter, in the order of its param_groups."
            )
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"{caller()}: the name {dup!r} is given twice; names must be unique.")
    else:
        raise ValueError(
            f"{caller()}: module_or_names must be the nn.Module whose parameters the optimizer "
            f"holds, or a list of parameter names; got a {type(module_or_names).__name__}."
        )
    out, i = [], 0
    for g in groups:
        out.append(names[i : i + len(g)])
        i += len(g)
    return out


def _same(values: list[Any]) -> bool:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return all(v is first for v in values)
    return all(not isinstance(v, torch.Tensor) and v == first for v in values)


def _merge(values: list[Any], names: list[list[str]]) -> Any:
    """One value if every group agrees, else a per-parameter dict keyed by name."""
    if _same(values):
        return values[0]
    return {n: v for v, group in zip(values, names) for n in group}


def _check_arguments(torch_optimizer: Any, module_or_names: Any) -> None:
    call = "hg.optim.from_torch(torch_optimizer, model)"
    if isinstance(torch_optimizer, Optimizer):
        raise TypeError(
            f"{caller()}: torch_optimizer is already a hypergrad optimizer ({torch_optimizer!r}); "
            "use it as it is, no conversion is needed."
        )
    if not isinstance(torch_optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{caller()}: torch_optimizer must be a torch.optim optimizer, got a "
            f"{type(torch_optimizer).__name__}. The arguments come in the order {call}."
        )
    if module_or_names is None:
        raise TypeError(
            f"{caller()}: needs the module (or the parameter names) as well as the optimizer, to "
            f"key the params by name: {call}, with the module the optimizer was built for."
        )


def from_torch(torch_optimizer: torch.optim.Optimizer, module_or_names: Any = None, /) -> Optimizer:
    """The functional optimizer equivalent to a ``torch.optim`` instance.

    Supports ``SGD``, ``Adam``, ``AdamW``, ``RMSprop`` and ``Adagrad``, with or without
    ``differentiable=True`` and ``foreach``. Several param groups with different
    hyperparameters become per-parameter dicts keyed by parameter name; a hyperparameter that
    is a tensor in the group (e.g. a learning rate that requires grad) stays that tensor, so
    gradients flow into it. Adagrad's ``initial_accumulator_value`` is taken from the
    constructor, as torch.optim.Adagrad does. The optimizer's existing state (``exp_avg`` ...) is not imported:
    ``opt.init(params)`` starts fresh.

    Args:
        torch_optimizer: the torch optimizer to mirror (it is only read).
        module_or_names: the module whose ``named_parameters()`` the optimizer holds, or a list
            of names, one per parameter in the order of ``param_groups`` (required: the
            functional optimizer keys its per-parameter values by these names).

    Returns:
        The equivalent [`Optimizer`][hypergrad.optim.Optimizer]; use it on params keyed by those
        names, e.g. ``hg.split(module)[0]``.

    Raises:
        TypeError: ``torch_optimizer`` is not a ``torch.optim`` optimizer, or no module (or
            names) is given.
        ValueError: an unsupported optimizer class; ``fused=True`` or ``capturable=True``; a
            group entry this library does not know; static options (``nesterov``,
            ``amsgrad``, ``centered``, ``maximize``) that differ between groups; parameters
            and names that do not match.

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> torch_opt = torch.optim.Adam(
        ...     [{"params": [model.weight], "lr": 0.1}, {"params": [model.bias]}], lr=0.01
        ... )
        >>> opt = hg.optim.from_torch(torch_opt, model)
        >>> opt.name, opt.hyperparams["lr"]
        ('adam', {'weight': 0.1, 'bias': 0.01})
    """
    with entered("hg.optim.from_torch"):
        _check_arguments(torch_optimizer, module_or_names)
        cls = type(torch_optimizer)
        if cls not in _FAMILIES:
            supported = ", ".join(c.__name__ for c in _FAMILIES)
            raise ValueError(
                f"{caller()}: unsupported optimizer class {cls.__module__}.{cls.__qualname__}; "
                f"supported: {supported} (exact classes). Build the functional optimizer "
                "directly, e.g. hg.optim.adam(...)."
            )
        hp_names, option_names = _FAMILIES[cls]
        groups = torch_optimizer.param_groups
        _check_groups(groups, cls, {*hp_names, *option_names})
        names = _names(torch_optimizer, module_or_names)
        options = {}
        for name in option_names:
            values = [g[name] for g in groups]
            if not _same(values):
                raise ValueError(
                    f"{caller()}: the option {name!r} differs between param groups ({values}); "
                    "a functional optimizer has one value. Use one group per optimizer."
                )
            options[name] = values[0]
        hp: dict[str, Any] = {}
        for name in hp_names:
            if name == "betas":
                hp[name] = tuple(_merge([g["betas"][k] for g in groups], names) for k in range(2))
            else:
                hp[name] = _merge([g[name] for g in groups], names)
        return _family(torch_optimizer, hp, options)


def _check_groups(groups: list[dict[str, Any]], cls: type, names: set[str]) -> None:
    """Refuse group entries a functional optimizer cannot honour (``names``: the family's own)."""
    for i, group in enumerate(groups):
        for flag in ("fused", "capturable"):
            if group.get(flag):
                raise ValueError(
                    f"{caller()}: param_groups[{i}] has {flag}=True, which a functional "
                    f"optimizer cannot honour; rebuild the torch optimizer with {flag}=False "
                    "(the numerics are the same)."
                )
        unknown = sorted(set(group) - names - _IGNORED - {"fused", "capturable"})
        if unknown:
            raise ValueError(
                f"{caller()}: param_groups[{i}] has the entry {unknown[0]!r}, which "
                f"hg.optim cannot honour for {cls.__name__}; remove it from the group."
            )


def _family(
    torch_optimizer: torch.optim.Optimizer, hp: dict[str, Any], options: dict[str, Any]
) -> Optimizer:
    """The family constructor called with the hyperparameters and options read from the groups."""
    cls, groups = type(torch_optimizer), torch_optimizer.param_groups
    if cls is torch.optim.SGD:
        momenta = [g["momentum"] for g in groups]
        damped = any(is_zero(m) and g["dampening"] != 0 for m, g in zip(momenta, groups))
        if damped and not _same(momenta):
            raise ValueError(
                f"{caller()}: a group without momentum but with dampening != 0 next to a group "
                "with momentum cannot be mirrored exactly; set dampening=0 in that group."
            )
        return sgd(**hp, **options)
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        decoupled = [
            bool(g.get("decoupled_weight_decay", cls is torch.optim.AdamW)) for g in groups
        ]
        if not _same(decoupled):
            raise ValueError(
                f"{caller()}: decoupled_weight_decay differs between param groups; use one "
                "value for all groups."
            )
        return (adamw if decoupled[0] else adam)(**hp, **options)
    if cls is torch.optim.RMSprop:
        return rmsprop(**hp, **options)
    # torch.optim.Adagrad fills state["sum"] from its constructor argument (its defaults), never
    # from a group's own initial_accumulator_value; mirror that.
    hp["initial_accumulator_value"] = torch_optimizer.defaults["initial_accumulator_value"]
    return adagrad(**hp, **options)

"""``hg.hypergrad``: one entry point over every method."""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._compile import Compile
from hypergrad.methods import Method, resolve
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree
from hypergrad.unroll import (
    Batches,
    Problem,
    all_finite,
    build_step,
    check_opt,
    check_params,
    draw_seed,
    first_nonfinite,
    locate_nonfinite,
    multi_step,
    outer_fn,
    progress_bar,
    rng_devices,
)

__all__ = ["Hypergradient", "hypergrad", "map_hyper"]

_GROUPS = ("aux", "hyperparams", "params")


class Hypergradient(NamedTuple):
    """The result of [`hypergrad`][hypergrad.hypergrad].

    Attributes:
        value: the outer loss after K steps (a detached 0-d tensor).
        aux: the gradient with respect to ``aux`` (same structure), or ``None`` if not asked.
        hyperparams: a dict ``{name: gradient}`` for the hyperparameters asked for (a float
            hyperparameter gets a 0-d gradient), or ``None``.
        params: the gradient with respect to the initial params (MAML), or ``None``.

    Examples:
        >>> inner = lambda p, a, x: ((p["w"] - a * x) ** 2).sum()
        >>> outer = lambda p, a, x: (p["w"] ** 2).sum()
        >>> g = hg.hypergrad(outer, inner, {"w": torch.ones(1)}, hg.optim.sgd(lr=0.1),
        ...                  torch.ones(3, 1), None, aux=torch.tensor(0.5), wrt=("aux", "lr"))
        >>> g.aux.shape, sorted(g.hyperparams), g.params is None
        (torch.Size([]), ['lr'], True)
    """

    value: torch.Tensor
    aux: PyTree
    hyperparams: dict[str, Any] | None
    params: PyTree


def _is_hyper_value(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
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


def _to_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    return map_hyper(
        lambda v: (
            v.detach()
            if isinstance(v, torch.Tensor)
            else torch.tensor(float(v), dtype=dtype, device=device)
        ),
        value,
    )


def _parse_wrt(
    wrt: str | Sequence[str], aux: PyTree, hp: Mapping[str, Any], opt: Optimizer, caller: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    items = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    differentiable = [k for k, v in hp.items() if _is_hyper_value(v)]
    targets: list[str] = []
    names: list[str] = []
    for item in items:
        if item in _GROUPS:
            if item == "hyperparams":
                names += differentiable
            targets.append(item)
        elif item in differentiable:
            names.append(item)
            targets.append("hyperparams")
        else:
            known = ", ".join(differentiable)
            raise ValueError(
                f"{caller}: wrt entry {item!r} is not 'aux', 'hyperparams', 'params' or a "
                f"differentiable hyperparameter of {opt!r} ({known}). Pass e.g. "
                "wrt=('aux', 'lr')."
            )
    if not targets:
        raise ValueError(
            f"{caller}: wrt is empty; say what to differentiate, e.g. wrt=('aux',), "
            "wrt=('lr',) or wrt=('hyperparams', 'params')."
        )
    if "aux" in targets and not _tree.leaves(aux):
        raise ValueError(
            f"{caller}: wrt asks for 'aux' but aux has no tensors (aux={aux!r}). Pass aux=..., "
            "or ask for something else, e.g. wrt=('lr',)."
        )
    ordered = tuple(g for g in _GROUPS if g in targets)
    return ordered, tuple(dict.fromkeys(names))


def _check_float(tree: PyTree, name: str, caller: str) -> None:
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=_tree._NAMESPACE)
    for p, x in zip(paths, leaves):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(
                f"{caller}: {name} leaf {_tree.keystr(p)} is {what}; only floating-point tensors "
                f"can be differentiated. Convert it (e.g. torch.as_tensor(x, dtype=torch.float64)) "
                f"or move it out of {name} (into the batch or outer_batch)."
            )


def hypergrad(
    outer_loss: Callable[..., Any],
    inner_loss: Callable[..., Any],
    params: PyTree,
    opt: Optimizer,
    batches: Any,
    outer_batch: Any,
    *,
    aux: PyTree = None,
    method: str | Method = "reverse",
    wrt: str | Sequence[str] = ("aux",),
    state: PyTree = None,
    buffers: PyTree = None,
    steps: int | None = None,
    hyperparams: Mapping[str, Any] | None = None,
    seed: int | None = None,
    progress: bool = False,
    inner_grad: str = "auto",
    check_finite: bool = True,
    compile: bool | str | Compile = False,
) -> Hypergradient:
    """The gradient of ``outer_loss(params_K, aux, outer_batch)`` through K optimizer steps.

    ``params_K`` is the result of K steps of ``opt`` on ``inner_loss`` from ``params`` (as
    [`hg.unroll`][hypergrad.unroll]). The gradient is taken with respect to what ``wrt`` names:
    ``"aux"``, ``"params"`` (the initial params, as MAML), ``"hyperparams"`` (all of the
    optimizer's numbers), or single hyperparameter names such as ``"lr"``, ``"weight_decay"``,
    ``"betas"``. A float hyperparameter is differentiated as a 0-d tensor of the params' dtype;
    a per-parameter dict or per-element tensor gets a gradient of the same shape. The caller's
    tensors, optimizer and modules are never modified.

    Methods (see each class for its cost formula): ``"reverse"`` (exact, memory O(K)),
    ``hg.Truncated(T)`` (last T steps only, biased), ``hg.Checkpointed(S)`` (exact, memory
    O(K/S + S)), ``"forward"`` / ``hg.Forward(chunk_size)`` (exact, memory independent of K,
    one pass per differentiated scalar) and ``"first_order"`` (no second-order terms, biased).

    Args:
        outer_loss: ``outer_loss(params, aux, outer_batch) -> scalar``; with ``buffers`` it is
            called as ``outer_loss(params, aux, outer_batch, buffers)``.
        inner_loss: ``inner_loss(params, aux, batch) -> scalar``; with ``buffers`` it is called
            as ``inner_loss(params, aux, batch, buffers)`` and returns ``(loss, new_buffers)``.
        params: the initial parameters.
        opt: the functional optimizer.
        batches: the inner batches (as [`hg.unroll`][hypergrad.unroll]).
        outer_batch: passed unchanged to ``outer_loss``.
        aux: the auxiliary pytree (floating-point tensors when differentiated).
        method: one of the methods above.
        wrt: what to differentiate (a name or a tuple of names).
        state: the initial optimizer state; default ``opt.init(params, hyperparams=...)``.
        buffers: the initial buffers (``None``: none carried).
        steps: K; default: the number of stacked batches or ``len(batches)``.
        hyperparams: replacements for some of ``opt.hyperparams``.
        seed: base seed for the steps' random numbers (default: one draw from the global
            generator). Every method sees the same random numbers at step k.
        progress: show a tqdm progress bar (needs tqdm).
        inner_grad: ``"auto"``, ``"func"`` or ``"autograd"`` (see the ``hypergrad.unroll`` module
            docstring); forward mode always uses ``"func"``.
        check_finite: check once, at the end (one device sync), that the losses, the outer
            value and the hypergradient are finite; if not, replay the unroll step by step to
            name the first step and key path that went nan/inf, and raise.
        compile: ``True`` compiles the steps (inner gradient + update) with ``torch.compile``,
            several consecutive steps per graph (``hg.Compile(steps_per_graph=S)`` sets how
            many), cached across calls with the same ``inner_loss`` and optimizer family; same
            results as eager. ``"reverse"``, ``Truncated``, ``Checkpointed`` and ``"first_order"`` run
            compiled; ``"forward"`` (``torch.func.jvp``) and anything dynamo cannot compile run
            eagerly with one ``hg.CompileFallbackWarning`` naming the cause; ``"strict"``
            raises ``hg.CompileError`` instead. See [`hg.Compile`][hypergrad.Compile].

    Returns:
        ``Hypergradient(value, aux, hyperparams, params)``; what was not asked is ``None``.

    Raises:
        ValueError: bad ``wrt``, a non-scalar loss, batches that run out, or a method that
            cannot do what was asked (``Truncated(T < K)`` with ``wrt="params"``).
        TypeError: a differentiated leaf that is not a floating-point tensor.
        FloatingPointError: a nan/inf loss, update or hypergradient (names step and key).

    Warns:
        UserWarning: an ``aux`` leaf does not affect the outer loss (its hypergradient is
            identically zero); reverse-mode methods only.
        hg.CompileFallbackWarning: ``compile=True`` ran the step eagerly (names the cause).

    Examples:
        The gradient of a validation loss after 3 SGD steps with respect to a per-example
        weighting of the training loss (``aux``) and the learning rate:

        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x, y = torch.randn(3, 4, 2), torch.randn(3, 4)  # 3 steps, batches of 4
        >>> def inner(p, weights, batch):
        ...     xb, yb = batch
        ...     return (weights * (xb @ p["w"] - yb) ** 2).mean()
        >>> def outer(p, weights, val):
        ...     return ((val[0] @ p["w"] - val[1]) ** 2).mean()
        >>> g = hg.hypergrad(outer, inner, {"w": torch.zeros(2)}, hg.optim.sgd(lr=0.1),
        ...     (x, y), (x[0], y[0]), aux=torch.ones(4), wrt=("aux", "lr"))
        >>> g.aux.shape, g.hyperparams["lr"].shape, g.params is None
        (torch.Size([4]), torch.Size([]), True)
    """
    caller = "hg.hypergrad"
    how = resolve(method, caller=caller)
    check_opt(opt, caller=caller)
    check_params(params, caller=caller)
    source = Batches(batches, steps, caller=caller)
    hp: dict[str, Any] = dict(opt.hyperparams)
    hp.update(hyperparams or {})
    targets, names = _parse_wrt(wrt, aux, hp, opt, caller)
    first = _tree.leaves(params)[0]  # check_params: a non-empty tree of floating-point tensors
    for name in names:
        hp[name] = _to_tensor(hp[name], first.dtype, first.device)
    if "aux" in targets:
        _check_float(aux, "aux", caller)
    if how.functional and inner_grad == "autograd":
        raise ValueError(
            f"{caller}: method {how!r} runs torch.func.jvp through the steps, which needs "
            "inner_grad='func' (or 'auto'); torch.autograd.grad cannot run under it."
        )
    step = build_step(
        inner_loss,
        opt,
        has_buffers=buffers is not None,
        inner_grad="func" if how.functional else inner_grad,
        first_order=how.first_order,
        compile=compile,
        steps=source.steps,
        caller=caller,
    )
    problem = Problem(
        step=step,
        outer=outer_fn(outer_loss, outer_batch, buffers is not None, caller),
        params=params,
        state=state,
        buffers=buffers,
        aux=aux,
        hyperparams=hp,
        batch_at=source.at,
        steps=source.steps,
        seed=draw_seed() if seed is None else seed,
        targets=targets,
        hyper_names=names,
        devices=rng_devices(params),
        init=lambda p, h: opt.init(p, hyperparams=h),
        multi=multi_step(step),
    )
    how.validate(problem, caller=caller)
    with progress_bar(progress, how.evaluations(problem), repr(how), caller) as bar:
        on_step = None if bar is None else (lambda: bar.update(1))
        result = how(dataclasses.replace(problem, on_step=on_step))
    if check_finite:
        grads = [g for g in _tree.leaves(result.grads) if isinstance(g, torch.Tensor)]
        if not all_finite(result.value, result.losses, *grads):
            _raise_nonfinite(problem, result.value, result.grads, caller)
    prefix = "['aux']"
    for path in result.unused:
        if path.startswith(prefix):
            where = "aux" + path[len(prefix) :]
            if how.first_order:
                why = (
                    "with method='first_order' (inner gradients held constant), so its "
                    "hypergradient is identically zero. Use an exact method for aux that enters "
                    "only the inner loss."
                )
            else:
                why = (
                    "through the unroll: its hypergradient is identically zero. Check that "
                    "inner_loss or outer_loss uses it, or remove it from aux."
                )
            warnings.warn(
                f"{caller}: {where} does not affect the outer loss {why}", UserWarning, stacklevel=2
            )
    return Hypergradient(
        result.value,
        result.grads.get("aux"),
        result.grads.get("hyperparams"),
        result.grads.get("params"),
    )


def _raise_nonfinite(problem: Problem, value: torch.Tensor, grads: PyTree, caller: str) -> None:
    locate_nonfinite(problem, caller=caller)
    if not bool(value.isfinite()):
        raise FloatingPointError(
            f"{caller}: every inner step is finite but the outer loss is {value.item()}. "
            "Check outer_loss and outer_batch."
        )
    bad = first_nonfinite(grads)
    raise FloatingPointError(
        f"{caller}: every inner step and the outer loss are finite, but the hypergradient is "
        f"nan/inf at {bad} (an overflow in the backward pass). Lower the learning rate or K, "
        "or use float64."
    )

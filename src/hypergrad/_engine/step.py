"""The step function: one pure optimizer step of the inner loss, the one the loop runs K times.

``step(params, state, buffers, aux, hyperparams, batch) -> (params, state, buffers, loss)``. It
never mutates its inputs and never touches the global RNG (the loop seeds each step). The inner
gradient is taken one of two ways, with the same numbers:

- ``inner_grad="func"``: ``torch.func.grad_and_value``; the step is then a composition of
  torch.func transforms and may run under ``vmap`` (clients), ``jvp`` (forward mode) or
  ``torch.compile``;
- ``inner_grad="autograd"``: ``torch.autograd.grad(create_graph=True)``; faster in eager mode;
- ``"auto"`` (default): ``"func"`` inside a torch.func transform, else ``"autograd"``.

Under ``torch.no_grad()`` the step records no meta-graph (how ``Truncated`` and ``Checkpointed``
run steps they do not differentiate); with ``first_order=True`` the inner gradient is detached.

A step whose inner gradient may be differentiated (it records a meta-graph, or runs inside a
torch.func transform) runs scaled-dot-product attention through its math backend, which has
the double-backward and forward-mode rules the fused kernels lack
(``hypergrad._engine.kernels``); ``math_attention=True`` makes every step do so, as does a
compiled step unless ``first_order``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad._engine.checks import check_inner_grad
from hypergrad._engine.compile import Compile, compile_step, step_key
from hypergrad._engine.inplace import explained, is_in_place_error
from hypergrad._engine.kernels import math_attention as _math_attention
from hypergrad.optim._base import Optimizer
from hypergrad.optim._hyper import in_functorch_transform
from hypergrad.tree import PyTree

__all__ = [
    "StepFn",
    "StepParts",
    "in_functorch_transform",
    "make_step",
    "multi_step",
    "requires_grad",
]

StepFn = Callable[..., tuple[PyTree, PyTree, PyTree, torch.Tensor]]


class StepParts(NamedTuple):
    """A step's two halves, for a backward that treats them apart (``_engine.backward``).

    ``loss(params, aux, batch, buffers) -> (loss, new_buffers)`` and
    ``update(params, grads, state, hyperparams) -> (params, state)``.
    """

    loss: Callable[..., tuple[torch.Tensor, PyTree]]
    update: Callable[..., tuple[PyTree, PyTree]]


def _call_inner(
    inner_loss: Callable[..., Any],
    has_buffers: bool,
    params: PyTree,
    aux: PyTree,
    batch: Any,
    buffers: PyTree,
) -> tuple[torch.Tensor, PyTree]:
    if has_buffers:
        out = inner_loss(params, aux, batch, buffers)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"{caller()}: buffers are carried, so inner_loss(params, aux, batch, buffers) must "
                f"return (loss, new_buffers); it returned {type(out).__name__}. Return the "
                "updated buffers too, or pass buffers=None."
            )
        loss, new_buffers = out
    else:
        loss = inner_loss(params, aux, batch)
        if isinstance(loss, tuple):
            raise TypeError(
                f"{caller()}: inner_loss(params, aux, batch) returned a tuple; without buffers it "
                "must return a scalar tensor. To carry BatchNorm statistics, pass buffers= and "
                "return (loss, new_buffers) from inner_loss(params, aux, batch, buffers)."
            )
        new_buffers = buffers
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = (
            f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        )
        raise ValueError(
            f"{caller()}: inner_loss must return a scalar (0-d) tensor, got {got}. Reduce it, "
            "e.g. return loss.mean()."
        )
    return loss, new_buffers


def requires_grad(tree: PyTree) -> bool:
    """Whether any tensor leaf of ``tree`` requires grad."""
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in _tree.leaves(tree))


def _graph_through_gradient(params: PyTree, aux: PyTree, first_order: bool) -> bool:
    """Whether autograd records how this step's inner gradient depends on params or aux."""
    return (
        torch.is_grad_enabled()
        and not first_order
        and (requires_grad(params) or requires_grad(aux))
    )


def _functional_grad(
    loss_fn: Callable[..., Any],
    has_buffers: bool,
    first_order: bool,
    params: PyTree,
    aux: PyTree,
    batch: Any,
    buffers: PyTree,
) -> tuple[PyTree, torch.Tensor, PyTree]:
    """The inner gradient by ``torch.func.grad_and_value``: ``(grads, loss, new_buffers)``."""
    if has_buffers:
        grads, (loss, new_buffers) = torch.func.grad_and_value(loss_fn, has_aux=True)(
            params, aux, batch, buffers
        )
    else:
        grads, loss = torch.func.grad_and_value(lambda p: loss_fn(p, aux, batch, None)[0])(params)
        new_buffers = None
    if first_order:
        grads = _tree.detach(grads)
    return grads, loss, new_buffers


def make_step(
    inner_loss: Callable[..., Any],
    opt: Optimizer,
    *,
    has_buffers: bool,
    inner_grad: str = "auto",
    first_order: bool = False,
    compile: Compile | None = None,
    steps: int = 1,
    math_attention: bool = False,
) -> StepFn:
    """Build the pure step function ``step(params, state, buffers, aux, hyperparams, batch)``.

    Args:
        inner_loss: ``inner_loss(params, aux, batch)`` returning a scalar, or, when
            ``has_buffers``, ``inner_loss(params, aux, batch, buffers)`` returning
            ``(loss, new_buffers)``.
        opt: the functional optimizer.
        has_buffers: whether buffers are carried.
        inner_grad: ``"func"``, ``"autograd"`` or ``"auto"`` (see the module docstring).
        first_order: detach the inner gradient (no second-order terms).
        compile: compile the step (and runs of several steps, ``multi_step``) with these
            options, cached across calls; the inner gradient is then taken with ``torch.func``,
            and every hyperparameter must be given at each call (``{**opt.hyperparams, ...}``).
        steps: K, from which a compiled step chooses how many steps one graph runs.
        math_attention: run attention through its math backend in every step, not only in
            those whose inner gradient is differentiated (the steps of one call then draw the
            same dropout masks whether or not they record a graph).

    Returns:
        ``step(params, state, buffers, aux, hyperparams, batch) -> (params, state, buffers, loss)``.

    Examples:
        >>> opt = hg.optim.sgd(lr=0.1)
        >>> step = make_step(lambda p, a, b: (p["w"] ** 2).sum(), opt, has_buffers=False)
        >>> params = {"w": torch.tensor([1.0])}
        >>> new_params, state, buffers, loss = step(
        ...     params, opt.init(params), None, None, {"lr": 0.1}, None)
        >>> new_params, loss
        ({'w': tensor([0.8000])}, tensor(1.))
    """
    check_inner_grad(inner_grad)
    if compile is not None:
        inner_grad = "func"  # torch.autograd.grad inside torch.compile breaks the graph
        # one compiled graph serves hg.unroll and hg.hypergrad: it selects the math backend
        # whenever the inner gradient is not detached (inductor compiles it)
        math_attention = not first_order

    def loss_fn(params: PyTree, aux: PyTree, batch: Any, buffers: PyTree) -> Any:
        return _call_inner(inner_loss, has_buffers, params, aux, batch, buffers)

    def grad_func(params, aux, batch, buffers):
        return _functional_grad(loss_fn, has_buffers, first_order, params, aux, batch, buffers)

    warned: list[bool] = []  # one warning per built step, i.e. per public call

    def unused(leaves: list[torch.Tensor], grads: tuple[Any, ...]) -> list[torch.Tensor]:
        """The gradients, zeros where unused; a warning if the loss ignores every parameter."""
        if leaves and all(g is None for g in grads) and not warned:
            warned.append(True)
            warnings.warn(
                f"{caller()}: inner_loss does not depend on params: its gradient is zero for "
                "every parameter, so the steps do not train them and a hypergradient through "
                "them is zero. Inside the loss, run the model on the params it is given, "
                "hg.call(model, params, x), not model(x) (which reads the module's own tensors).",
                UserWarning,
                stacklevel=2,
            )
        return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]

    def grad_autograd(params, aux, batch, buffers):
        flat, spec = optree.tree_flatten(params, namespace=_tree._NAMESPACE)
        # A meta-graph is needed only when the inner loss depends on something that requires
        # grad (params or aux); hyperparameters enter later, in opt.step.
        create = _graph_through_gradient(flat, aux, first_order)
        with torch.enable_grad():
            leaves = [
                p if (create and p.requires_grad) else p.detach().requires_grad_() for p in flat
            ]
            loss, new_buffers = loss_fn(optree.tree_unflatten(spec, leaves), aux, batch, buffers)
            found: tuple[Any, ...] = (None,) * len(leaves)
            if loss.requires_grad:
                found = torch.autograd.grad(loss, leaves, create_graph=create, allow_unused=True)
            grads = unused(leaves, found)
        if not create:
            loss, new_buffers = loss.detach(), _tree.detach(new_buffers)
        return optree.tree_unflatten(spec, grads), loss, new_buffers

    def math(params: PyTree, aux: PyTree) -> bool:
        """Whether this step runs attention through the math backend."""
        if math_attention or _graph_through_gradient(params, aux, first_order):
            return True
        # A torch.func transform (vmap, jvp) may differentiate the step; a compiled step never
        # runs inside one (it falls back to eager there).
        return not first_order and not torch.compiler.is_compiling() and in_functorch_transform()

    def step(params, state, buffers, aux, hyperparams, batch):
        use_func = inner_grad == "func" or (inner_grad == "auto" and in_functorch_transform())
        compute = grad_func if use_func else grad_autograd
        try:
            with _math_attention(math(params, aux)):
                grads, loss, new_buffers = compute(params, aux, batch, buffers)
        except RuntimeError as error:
            if not is_in_place_error(error):
                raise
            args = (params, aux, batch, buffers)
            raise explained(error, "inner_loss", loss_fn, args) from error
        new_params, new_state = opt.update(params, grads, state, hyperparams)
        return new_params, new_state, new_buffers, loss

    if compile is not None:
        key = step_key(inner_loss, opt, has_buffers=has_buffers, first_order=first_order)
        step = compile_step(step, compile=compile, key=key, steps=steps)
    step.parts = StepParts(loss_fn, opt.update)  # type: ignore[attr-defined]
    return step


def multi_step(step: StepFn) -> Any:
    """The multi-step of a compiled ``step`` (see ``run_steps``), or ``None`` for others.

    Examples:
        >>> opt = hg.optim.sgd(lr=0.1)
        >>> multi_step(make_step(lambda p, a, b: p["w"].sum(), opt, has_buffers=False)) is None
        True
    """
    return step if hasattr(step, "several") else None

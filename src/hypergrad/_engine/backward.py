"""One step's backward: the cotangent of a step's output carry taken to its inputs.

Every method that recomputes steps (``hg.Checkpointed``) reverses them one unit at a time
through ``unit_vjp``. A unit is a step, or the outer loss after the last step. Two ways:

- **reverse over reverse** (any step): the step runs again with a graph from fresh leaves
  and ``torch.autograd.grad`` takes the cotangent back through it, its inner gradient's
  double backward included;
- **micro-batched** (``micro_batches=m``, one model): the step's inner gradient over the
  whole batch without a graph, the optimizer update's backward, and then the second-order
  terms (the Hessian-vector product and the mixed ``aux`` term) micro-batch by micro-batch,
  each a reverse-over-reverse over a slice of the batch weighted by its share of the
  examples. Exact when the inner loss is a mean over the batch's leading dimension; the
  inner gradient summed over the micro-batches is compared with the whole batch's at every
  step, and a difference (a BatchNorm in training mode, dropout, a loss over pairs) is an
  error at the end of the call, never a number.

Measured before choosing (``benchmarks/memory.py --step``, a 3.3M-parameter GPT-like model,
batch 16, CPU): one step's reverse over reverse peaks at 2.3x a training step; forward over
reverse (``torch.func.jvp`` of ``torch.func.grad``, the mixed mode of Kemaev et al. 2025)
at 1.67x *that*, the dual-number forward with a plain backward at 1.35x; four micro-batches
at 0.38x of it, eight at 0.27x. In PyTorch the memory lever is the batch, not the mode.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad._engine.kernels import math_attention
from hypergrad._engine.problem import Carry, Problem, run_steps
from hypergrad._engine.randomness import seeded
from hypergrad._engine.step import StepParts
from hypergrad.tree import PyTree

__all__ = [
    "Opened",
    "StepParts",
    "fresh_leaves",
    "grad_or_none",
    "open_carry",
    "split_batch",
    "unit_vjp",
]

Grads = list[torch.Tensor | None]


class Opened(NamedTuple):
    """A carry whose floating-point leaves were replaced by fresh leaves that require grad.

    ``positions`` are the places of those leaves among the leaves of ``(params, state)`` and
    of ``buffers`` (the latter only when buffers are differentiated).
    """

    carry: Carry
    leaves: list[torch.Tensor]
    positions: tuple[list[int], list[int]]


def fresh_leaves(tree: PyTree) -> tuple[PyTree, list[int], list[torch.Tensor]]:
    """Replace the floating-point leaves of ``tree`` by detached leaves that require grad.

    Returns ``(new_tree, positions, leaves)``: the positions (in flattening order) of the
    floating-point leaves and those new leaves. Nothing of ``tree`` is written.
    """
    flat, spec = optree.tree_flatten(tree, namespace=_tree._NAMESPACE)
    positions, leaves, out = [], [], list(flat)
    for i, x in enumerate(flat):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out[i] = leaf = x.detach().requires_grad_()
            positions.append(i)
            leaves.append(leaf)
    return optree.tree_unflatten(spec, out), positions, leaves


def open_carry(carry: Carry, with_buffers: bool) -> Opened:
    """Fresh grad-requiring leaves for the float leaves of params and state (and buffers)."""
    (params, state), pos_ps, leaves_ps = fresh_leaves((carry.params, carry.state))
    buffers = carry.buffers
    pos_b: list[int] = []
    leaves_b: list[torch.Tensor] = []
    if with_buffers:
        buffers, pos_b, leaves_b = fresh_leaves(carry.buffers)
    return Opened(Carry(params, state, buffers), leaves_ps + leaves_b, (pos_ps, pos_b))


def select(carry: Carry, positions: tuple[list[int], list[int]]) -> list[torch.Tensor]:
    """The leaves of ``carry`` at ``positions`` (see ``Opened``)."""
    flat_ps = _tree.leaves((carry.params, carry.state))
    flat_b = _tree.leaves(carry.buffers)
    return [flat_ps[p] for p in positions[0]] + [flat_b[p] for p in positions[1]]


def grad_or_none(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor | None] | None = None,
) -> Grads:
    """``torch.autograd.grad`` that skips outputs without a graph or without a cotangent
    (``None`` grads where nothing reaches an input, all ``None`` when no output is left)."""
    cot = [None] * len(outputs) if grad_outputs is None else grad_outputs
    pairs = [
        (o, g)
        for o, g in zip(outputs, cot)
        if o.requires_grad and (grad_outputs is None or g is not None)
    ]
    if not pairs or not inputs:
        return [None] * len(inputs)
    outs, gouts = zip(*pairs)
    got = torch.autograd.grad(
        list(outs), list(inputs), None if grad_outputs is None else list(gouts), allow_unused=True
    )
    return list(got)


def split_batch(batch: Any, pieces: int) -> list[tuple[Any, float]]:
    """``batch`` cut into ``pieces`` slices along the leading dim of its tensors, with weights.

    Every tensor leaf with at least one dimension is sliced (all must share the leading
    size); other leaves go whole to every slice. A slice's weight is its share of the rows.

    Examples:
        >>> [(x.tolist(), w) for x, w in split_batch(torch.arange(5), 2)]
        [([0, 1], 0.4), ([2, 3, 4], 0.6)]
    """
    flat, spec = optree.tree_flatten(batch, namespace=_tree._NAMESPACE, none_is_leaf=True)
    sizes = {x.shape[0] for x in flat if isinstance(x, torch.Tensor) and x.dim() > 0}
    if len(sizes) != 1 or min(sizes) < pieces:
        found = (
            "no tensor with a batch dimension" if not sizes else f"leading sizes {sorted(sizes)}"
        )
        raise ValueError(
            f"{caller()}: micro_batches={pieces} slices each inner batch along the leading "
            f"dimension of its tensors, which must share one size of at least {pieces}; found "
            f"{found}. Pass micro_batches=1, or batches whose tensors share a leading batch "
            "dimension."
        )
    (rows,) = sizes
    bounds = [round(i * rows / pieces) for i in range(pieces + 1)]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        part = [x[lo:hi] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in flat]
        out.append((optree.tree_unflatten(spec, part), (hi - lo) / rows))
    return out


def _micro_vjp(
    parts: StepParts,
    opened: Opened,
    aux: PyTree,
    hp: PyTree,
    batch: Any,
    wrt: list[torch.Tensor],
    cotangent: Grads | None,
    pieces: int,
) -> tuple[Grads, torch.Tensor, torch.Tensor | None]:
    """The micro-batched backward of one step (module docstring). Also returns the step's
    loss and how far the micro-batches' inner gradient is from the whole batch's (relative,
    max norm; ``None`` when no cotangent reached the inner gradient). ``cotangent`` is
    consumed: the list is emptied once the update's backward has used it."""
    params, state, buffers = opened.carry
    p_leaves, spec = optree.tree_flatten(params, namespace=_tree._NAMESPACE)
    with torch.enable_grad():
        # 1. the whole batch's inner gradient, as the step computed it, without a graph
        whole = [p.detach().requires_grad_() for p in p_leaves]
        loss, _ = parts.loss(optree.tree_unflatten(spec, whole), aux, batch, buffers)
        found = torch.autograd.grad(loss, whole, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(whole, found)]
        # 2. the optimizer update's backward: cotangents of params, state, hp and of g
        g_in = [x.detach().requires_grad_() for x in g]
        new_params, new_state = parts.update(params, optree.tree_unflatten(spec, g_in), state, hp)
        out = select(Carry(new_params, new_state, buffers), opened.positions)
        through = grad_or_none(out, wrt + g_in, cotangent)
        del new_params, new_state, out, g_in  # the update's outputs: not kept through the slices
        if cotangent is not None:
            cotangent.clear()  # consumed (the caller hands it over): not kept through the slices
    grads, v = through[: len(wrt)], through[len(wrt) :]
    if all(x is None for x in v):
        return grads, loss.detach(), None
    # 3. the inner gradient's backward, slice by slice: H v and the mixed aux term; what the
    # slices' gradients leave of the whole batch's is kept to check that they add up to it
    scale = torch.stack([x.abs().max() for x in g if x.numel()] or [torch.ones(())]).max()
    rest = [x.detach().clone() for x in g]
    del g, found
    for piece, weight in split_batch(batch, pieces):
        with torch.enable_grad():
            part = _piece_loss(parts, params, aux, piece, buffers, pieces)
            gi = torch.autograd.grad(part * weight, p_leaves, create_graph=True, allow_unused=True)
            used = [(x, vi) for x, vi in zip(gi, v) if x is not None]
            second = grad_or_none([x for x, _ in used], wrt, [vi for _, vi in used])
        grads = [_add(a, b) for a, b in zip(grads, second)]
        for r, x in zip(rest, gi):
            if x is not None:
                r.sub_(x.detach())
        del part, gi, used, second
    gap = torch.stack([r.abs().max() for r in rest if r.numel()] or [torch.zeros(())]).max()
    return grads, loss.detach(), gap / scale.clamp_min(torch.finfo(scale.dtype).tiny)


def _piece_loss(
    parts: StepParts, params: PyTree, aux: PyTree, piece: Any, buffers: PyTree, pieces: int
) -> torch.Tensor:
    """The inner loss on a slice of the batch; a failure there is explained."""
    try:
        loss, _ = parts.loss(params, aux, piece, buffers)
    except (RuntimeError, IndexError) as error:
        raise ValueError(
            f"{caller()}: with micro_batches={pieces}, inner_loss failed on a slice of its "
            f"batch ({str(error).splitlines()[0]}). Micro-batches need a loss that takes any "
            "number of examples (per-example weights belong in the batch, not in aux). Pass "
            "micro_batches=1."
        ) from error
    return loss


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    # out of place: autograd may hand back a cotangent it was given (a sum of one term)
    if a is None:
        return b
    return a if b is None else a + b


def unit_vjp(
    problem: Problem,
    k: int,
    opened: Opened,
    aux: PyTree,
    hp: PyTree,
    extra: list[torch.Tensor],
    cotangent: Grads | None,
    *,
    pieces: int = 1,
) -> tuple[Grads, Grads, torch.Tensor, torch.Tensor | None]:
    """Reverse unit ``k`` (a step, or the outer loss when ``k == problem.steps``).

    ``opened`` is the carry at ``k``; ``extra`` are the leaves of ``aux`` and ``hp`` to
    differentiate; ``cotangent`` is that of the carry at ``k + 1`` on the leaves at
    ``opened.positions`` (``None`` for the outer loss). ``pieces > 1`` takes a step's
    second-order terms by micro-batches (the step must have ``parts``). Returns the
    cotangent at ``k``, the grads of ``extra``, the unit's value (the outer loss, or the
    step's loss; detached) and the micro-batches' gap (``None`` without micro-batches).
    """
    wrt = opened.leaves + extra
    if k == problem.steps:
        with torch.enable_grad():
            value = problem.value(opened.carry, aux)
        grads = grad_or_none([value], wrt)
        return grads[: len(opened.leaves)], grads[len(opened.leaves) :], value.detach(), None
    parts: StepParts | None = getattr(problem.step, "parts", None)
    if pieces > 1 and parts is not None:
        with seeded(problem.seed + k, problem.devices), math_attention(True):
            batch = problem.batch_at(k)
            grads, loss, gap = _micro_vjp(parts, opened, aux, hp, batch, wrt, cotangent, pieces)
        if problem.on_step is not None:
            problem.on_step()
        n = len(opened.leaves)
        return grads[:n], grads[n:], loss, gap
    with torch.enable_grad():
        out, losses = run_steps(problem, opened.carry, aux, hp, k, k + 1)
    grads = grad_or_none(select(out, opened.positions), wrt, cotangent)
    n = len(opened.leaves)
    return grads[:n], grads[n:], losses[0].detach(), None

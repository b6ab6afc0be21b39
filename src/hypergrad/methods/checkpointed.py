"""Checkpointed reverse mode: store every S-th carry, recompute each segment for its backward."""

from __future__ import annotations

import torch

from hypergrad import tree as _tree
from hypergrad._boundary import entered, positive_int
from hypergrad._engine.problem import Carry, Problem, run_steps
from hypergrad._engine.step import requires_grad
from hypergrad.methods._base import (
    Method,
    MethodResult,
    finish,
    fresh_leaves,
    grad_or_none,
    leaf_inputs,
)

__all__ = ["Checkpointed"]


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


_Positions = tuple[list[int], list[int]]


def _no_positions() -> _Positions:
    return [], []


def _open(carry: Carry, with_buffers: bool) -> tuple[Carry, list[torch.Tensor], _Positions]:
    """Fresh grad-requiring leaves for the float leaves of params and state (and buffers)."""
    (params, state), pos_ps, leaves_ps = fresh_leaves((carry.params, carry.state))
    buffers = carry.buffers
    pos_b: list[int] = []
    leaves_b: list[torch.Tensor] = []
    if with_buffers:
        buffers, pos_b, leaves_b = fresh_leaves(carry.buffers)
    return Carry(params, state, buffers), leaves_ps + leaves_b, (pos_ps, pos_b)


def _select(carry: Carry, positions: _Positions) -> list[torch.Tensor]:
    flat_ps = _tree.leaves((carry.params, carry.state))
    flat_b = _tree.leaves(carry.buffers)
    return [flat_ps[p] for p in positions[0]] + [flat_b[p] for p in positions[1]]


class Checkpointed(Method):
    """Exact reverse-mode hypergradient with memory ``O(K / S + S)`` instead of ``O(K)``.

    A first pass runs all K steps without a meta-graph and keeps the carry (params, optimizer
    state, buffers) at the start of every segment of ``S`` steps. The backward pass then walks
    the segments from last to first: it recomputes the segment with a graph from its stored
    carry and backpropagates the cotangent of the segment's end carry into its start carry,
    ``aux`` and the hyperparameters. Recomputation sees the same batches (``batch_at(k)``) and
    the same random numbers (step ``k`` is seeded with ``seed + k``), so the result equals
    ``"reverse"`` to rounding.

    Cost, with C the size of the carry (params + state + buffers):

    - time: ``K * c`` (first pass) plus ``K * c`` forward and ``K * (2 to 3) * c`` backward,
      i.e. ``"reverse"`` plus one forward of the loop;
    - memory: ``O(ceil(K / S) * C + S * A)``; ``S = sqrt(K * C / A)`` balances the two terms.

    Args:
        segment: S, the number of steps per segment (a positive int).

    Examples:
        >>> loss = lambda p, a, x: ((p["w"] - x) ** 2).sum()
        >>> g = hg.hypergrad(lambda p, a, y: (p["w"] ** 2).sum(), loss, {"w": torch.ones(1)},
        ...     hg.optim.sgd(lr=0.1), torch.zeros(3, 1), None, method=hg.Checkpointed(2),
        ...     wrt=("lr",))
        >>> g.hyperparams["lr"]
        tensor(-3.9322)
    """

    name = "checkpointed"
    reverse_mode = True

    def __init__(self, segment: int) -> None:
        with entered("hg.Checkpointed"):
            self.segment = positive_int(segment, "segment", "(steps between stored carries)")

    def evaluations(self, problem: Problem) -> int:
        return 2 * problem.steps

    def __call__(self, problem: Problem) -> MethodResult:
        inputs = leaf_inputs(problem)
        carry0, aux, hp = problem.bind(inputs.trees)
        K, S = problem.steps, self.segment
        starts = list(range(0, K, S))

        stored: list[Carry] = []
        losses: list[torch.Tensor] = []
        with torch.no_grad():
            carry = carry0
            for s in starts:
                stored.append(carry if s == 0 else Carry(*_tree.detach(tuple(carry))))
                carry, seg_losses = run_steps(problem, carry, aux, hp, s, min(s + S, K))
                losses += seg_losses

        acc: list[torch.Tensor | None] = [None] * len(inputs.leaves)
        cotangent: list[torch.Tensor | None] | None = None
        positions = _no_positions()  # where the cotangent's leaves sit in the carry
        value = torch.zeros(())
        # Buffers are differentiated only if the step makes them a differentiable function of
        # the carry (a functional moving average); BatchNorm's running statistics are not, and
        # torch refuses running statistics that require grad. The last segment tells.
        diff_buffers = False
        c_leaves: list[torch.Tensor]
        i = len(starts) - 1
        while i >= 0:
            s, e = starts[i], min(starts[i] + S, K)
            if i == 0:
                c_in, c_leaves, positions_in = carry0, [], _no_positions()
            else:
                c_in, c_leaves, positions_in = _open(stored[i], diff_buffers)
            with torch.enable_grad():
                c_out, _ = run_steps(problem, c_in, aux, hp, s, e)
                if (
                    cotangent is None
                    and i > 0
                    and not diff_buffers
                    and requires_grad(c_out.buffers)
                ):
                    diff_buffers = True
                    continue  # redo the last segment with differentiable buffers
                if cotangent is None:
                    value = problem.value(c_out, aux)
                    outs, gouts = [value], None
                else:
                    outs, gouts = _select(c_out, positions), cotangent
            grads = grad_or_none(outs, c_leaves + inputs.leaves, gouts)
            cotangent = grads[: len(c_leaves)]
            acc = [_add(a, g) for a, g in zip(acc, grads[len(c_leaves) :])]
            positions = positions_in
            i -= 1
        return finish(inputs, acc, value, losses, carry)  # carry: the first pass's last

    def __repr__(self) -> str:
        return f"hg.Checkpointed({self.segment})"

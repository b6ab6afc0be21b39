"""Checkpointed reverse mode: store some carries, recompute the steps between them.

Two schedules, one executor. ``hg.Checkpointed(S)`` stores every S-th carry and
differentiates a segment of S steps at a time; ``hg.Checkpointed(slots=c)`` follows
Revolve's binomial schedule (``methods._revolve``) and reverses one step at a time with at
most ``c`` carries stored, for any K. Both reverse a unit (a segment, a step, or the outer
loss) through ``_engine.backward``, which with ``micro_batches`` takes a step's second-order
terms a slice of the batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller, entered, positive_int
from hypergrad._engine.backward import Opened, grad_or_none, open_carry, select, unit_vjp
from hypergrad._engine.problem import Carry, Problem, run_steps
from hypergrad._engine.step import requires_grad
from hypergrad.methods import _revolve
from hypergrad.methods._base import Method, MethodResult, finish, leaf_inputs
from hypergrad.methods._revolve import Backward, Forward, Free

__all__ = ["Checkpointed", "plan"]


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _segments(steps: int, segment: int) -> Iterator[Any]:
    """Store every ``segment``-th carry in one pass, then reverse segment by segment.

    A ``Backward`` here spans a whole segment: ``(start, stop)``; the last one ends with the
    outer loss (unit ``steps``).
    """
    starts = list(range(0, steps, segment))
    for s in starts:
        yield Forward(s, min(s + segment, steps), store=s + segment < steps)
    ends = [*starts[1:], steps + 1]
    for s, e in reversed(list(zip(starts, ends))):
        yield (s, e)
        if s > 0:
            yield Free(s)


def plan(steps: int, segment: int | None, slots: int | None) -> Iterator[Any]:
    """The schedule of ``hg.Checkpointed``: Revolve's with ``slots``, else by segments.

    Examples:
        >>> [a for a in plan(2, 1, None)]  # doctest: +NORMALIZE_WHITESPACE
        [Forward(start=0, stop=1, store=True), Forward(start=1, stop=2, store=False),
         (1, 3), Free(k=1), (0, 1)]
    """
    if slots is not None:
        return _revolve.schedule(steps + 1, slots)
    assert segment is not None
    return _segments(steps, segment)


class _Executor:
    """Runs a schedule on a problem: the stored carries, the working carry, the cotangent."""

    def __init__(self, problem: Problem, micro_batches: int) -> None:
        self.problem, self.pieces = problem, micro_batches
        self.inputs = leaf_inputs(problem)
        self.carry0, aux, hp = problem.bind(self.inputs.trees)
        # aux and the hyperparameters as leaves of their own: each unit's backward adds to
        # their cotangent, and one backward at the end takes it on through ``bind``.
        self.bound: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.aux, self.hp = self._cut(aux), self._cut(hp)
        self.extra = [leaf for _, leaf in self.bound]
        self.acc: list[torch.Tensor | None] = [None] * len(self.extra)
        self.stored: dict[int, Carry] = {0: self.carry0}
        self.working: Carry | None = self.carry0  # the working carry, at ``at`` (-1: none)
        self.at = 0
        self.losses: dict[int, torch.Tensor] = {}
        self.gaps: list[tuple[int, torch.Tensor]] = []
        self.cotangent: list[torch.Tensor | None] | None = None
        self.diff_buffers = self._buffers_differentiable()
        self.value = torch.zeros(())
        self.final: Carry | None = None

    def _cut(self, tree: Any) -> Any:
        """``tree`` with each tensor leaf that requires grad replaced by a fresh leaf."""
        flat, spec = optree.tree_flatten(tree, namespace=_tree._NAMESPACE)
        out = []
        for x in flat:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                leaf = x.detach().requires_grad_()
                self.bound.append((x, leaf))
                x = leaf
            out.append(x)
        return optree.tree_unflatten(spec, out)

    def _buffers_differentiable(self) -> bool:
        """Whether a step makes the buffers a differentiable function of the carry (a
        functional moving average does; BatchNorm's running statistics do not, and torch
        refuses running statistics that require grad): step 0 run once with a graph tells."""
        if not any(torch.is_tensor(x) for x in _tree.leaves(self.carry0.buffers)):
            return False
        opened = open_carry(self.carry0, False)
        with torch.enable_grad():
            out, _ = run_steps(self.problem, opened.carry, self.aux, self.hp, 0, 1)
        return requires_grad(out.buffers)

    def carry_at(self, k: int) -> Carry:
        if self.at == k and self.working is not None:
            return self.working
        return self.stored[k]

    def forward(self, action: Forward) -> None:
        start = self.carry_at(action.start)
        self.at, self.working = -1, None  # not kept while the run makes the next one
        with torch.no_grad():
            carry, losses = run_steps(
                self.problem, start, self.aux, self.hp, action.start, action.stop, donate=True
            )
        del start
        for k, loss in enumerate(losses, action.start):
            self.losses.setdefault(k, loss)
        self.at, self.working = action.stop, carry
        if action.store:
            self.stored[action.stop] = carry

    def backward(self, start: int, stop: int) -> None:
        """Reverse units ``[start, stop)`` (one unit, or a segment) from the carry at start."""
        problem = self.problem
        opened = open_carry(self.carry_at(start), self.diff_buffers)
        if stop == start + 1:
            handed, self.cotangent = self.cotangent, None  # a micro-batched backward frees it
            cot, extra, value, gap = unit_vjp(
                problem, start, opened, self.aux, self.hp, self.extra, handed, pieces=self.pieces
            )
            if start == problem.steps:
                self.value, self.final = value, self.carry_at(start)
            else:
                self.losses.setdefault(start, value)
                if gap is not None:
                    self.gaps.append((start, gap))
        else:
            cot, extra = self._segment(opened, start, stop)
        if self.at >= start:  # units go backwards: no later action needs a carry past start
            self.at, self.working = -1, None
        self.cotangent = cot
        self.acc = [_add(a, g) for a, g in zip(self.acc, extra)]

    def _segment(self, opened: Opened, start: int, stop: int) -> tuple[list, list]:
        """Reverse steps ``[start, stop)`` (and the outer loss if ``stop`` passes the last)."""
        problem, steps = self.problem, self.problem.steps
        with torch.enable_grad():
            out, losses = run_steps(
                problem, opened.carry, self.aux, self.hp, start, min(stop, steps)
            )
            for k, loss in enumerate(losses, start):
                self.losses.setdefault(k, loss.detach())
            if stop > steps:
                self.final = Carry(*_tree.detach(tuple(out)))
                value = problem.value(out, self.aux)
                self.value = value.detach()
                outs, cot = [value], None
            else:
                outs, cot = select(out, opened.positions), self.cotangent
        grads = grad_or_none(outs, opened.leaves + self.extra, cot)
        return grads[: len(opened.leaves)], grads[len(opened.leaves) :]

    def run(self, actions: Iterator[Any]) -> MethodResult:
        for action in actions:
            if isinstance(action, Forward):
                self.forward(action)
            elif isinstance(action, Free):
                del self.stored[action.k]
            elif isinstance(action, Backward):
                self.backward(action.k, action.k + 1)
            else:
                self.backward(*action)
        self._check_gaps()
        # the cotangents of the carry at 0, aux and the hyperparameters, through ``bind``
        positions = open_carry(self.carry0, self.diff_buffers).positions
        outs = select(self.carry0, positions) + [x for x, _ in self.bound]
        grads = grad_or_none(outs, self.inputs.leaves, (self.cotangent or []) + self.acc)
        losses = [self.losses[k] for k in range(self.problem.steps)]
        return finish(self.inputs, grads, self.value, losses, self.final)

    def _check_gaps(self) -> None:
        """Raise if the micro-batches' inner gradient differed from the whole batch's."""
        if not self.gaps:
            return
        gaps = torch.stack([g for _, g in self.gaps])
        dtype = gaps.dtype
        tolerance = torch.finfo(dtype).eps ** 0.5
        worst = int(gaps.argmax())
        if float(gaps[worst]) <= tolerance:
            return
        k = self.gaps[worst][0]
        raise ValueError(
            f"{caller()}: with micro_batches={self.pieces}, the inner gradient summed over the "
            f"micro-batches differs from the whole batch's (relative difference "
            f"{float(gaps[worst]):.2g} at step {k}, above {tolerance:.1g}): inner_loss is not a "
            "mean over the leading dimension of its batch (a BatchNorm in training mode, "
            "dropout, a loss over pairs of examples, or a batch tensor without a batch "
            "dimension). Pass micro_batches=1."
        )


class Checkpointed(Method):
    """Exact reverse-mode hypergradient that stores a few carries and recomputes the rest.

    Two schedules (give one):

    - ``hg.Checkpointed(S)``: a first pass runs all K steps without a meta-graph and keeps the
      carry (params, optimizer state, buffers) at the start of every segment of S steps; the
      backward pass recomputes each segment with a graph, last first, and backpropagates
      through it. Time: ``"reverse"`` plus one forward of the loop; memory
      ``O(ceil(K / S) * C + S * A)``, where ``S = sqrt(K * C / A)`` balances the two terms.
    - ``hg.Checkpointed(slots=c)``: Griewank and Walther's binomial schedule (Revolve), at
      most ``c`` carries stored at once (the initial one included), one step differentiated at
      a time. With ``r`` the least integer such that ``K + 1 <= C(c + r, c)``, the loop runs
      ``r * (K + 1) - C(c + r, c + 1)`` steps without a graph (the optimum for ``c`` slots;
      no step runs more than ``r`` times, and ``r`` grows like ``log K``), plus each step
      once with a graph and its backward. Memory: about ``(c + 3) * C`` (the stored carries, the working one,
      its cotangent, and the last one for the result's trajectory) plus one step's backward,
      whatever K.

    Here C is the size of the carry and A what one step keeps for its backward (activations,
    the inner gradient's graph); ``hg.checkpoint_cost`` predicts time and memory for any K and
    ``c`` from one measured step. Recomputation sees the same batches (``batch_at(k)``) and the
    same random numbers (step ``k`` is seeded with ``seed + k``), so the result equals
    ``"reverse"`` to rounding.

    ``micro_batches=m`` (one model): each step's backward takes its second-order terms one
    m-th of the batch at a time (slicing every batch tensor along its leading dimension), so
    its memory is about ``A / m`` instead of ``A``, in about the same time. Exact when the
    inner loss is a mean over the examples of its batch; the inner gradient summed over the
    slices is checked against the whole batch's at every step, and a difference (BatchNorm
    in training mode, dropout, a loss over pairs) raises instead of returning a number.

    Args:
        segment: S, the number of steps per segment (a positive int).
        slots: c, the most carries stored at once (a positive int), instead of ``segment``.
        micro_batches: m, the slices of the batch per step's backward (default 1: whole).

    Examples:
        >>> def lr_gradient(method):
        ...     inner = lambda p, a, x: ((p["w"] - x) ** 2).sum()
        ...     outer = lambda p, a, y: (p["w"] ** 2).sum()
        ...     g = hg.hypergrad(outer, inner, {"w": torch.ones(1)}, hg.optim.sgd(lr=0.1),
        ...                      torch.zeros(3, 1), None, method=method, wrt=("lr",))
        ...     return g.hyperparams["lr"]
        >>> lr_gradient(hg.Checkpointed(2)), lr_gradient(hg.Checkpointed(slots=2))
        (tensor(-3.9322), tensor(-3.9322))
    """

    name = "checkpointed"
    reverse_mode = True

    def __init__(
        self, segment: int | None = None, *, slots: int | None = None, micro_batches: int = 1
    ) -> None:
        with entered("hg.Checkpointed"):
            if (segment is None) == (slots is None):
                raise TypeError(
                    f"{caller()}: give one of segment and slots, got segment={segment!r} and "
                    f"slots={slots!r}. hg.Checkpointed(S) stores every S-th carry; "
                    "hg.Checkpointed(slots=c) stores at most c carries (Revolve's schedule)."
                )
            self.segment = None
            if segment is not None:
                self.segment = positive_int(segment, "segment", "(steps between stored carries)")
            self.slots = None if slots is None else positive_int(slots, "slots", "(stored carries)")
            self.micro_batches = positive_int(
                micro_batches, "micro_batches", "(slices of the batch per step's backward)"
            )

    def validate(self, problem: Problem) -> None:
        if self.micro_batches > 1 and getattr(problem.step, "parts", None) is None:
            raise ValueError(
                f"{caller()}: {self!r} takes a step's backward a slice of its batch at a time, "
                "which needs the step of one model; with clients= it is not available. Pass "
                "micro_batches=1 (the default)."
            )

    def evaluations(self, problem: Problem) -> int:
        if self.slots is None:
            return 2 * problem.steps
        return _revolve.forward_runs(problem.steps + 1, self.slots) + problem.steps

    def __call__(self, problem: Problem) -> MethodResult:
        steps = problem.steps
        if self.micro_batches > 1 and self.segment is not None:
            # one step at a time inside each segment: every carry of a segment stored
            actions = _stepwise_segments(steps, self.segment)
        else:
            actions = plan(steps, self.segment, self.slots)
        return _Executor(problem, self.micro_batches).run(actions)

    def __repr__(self) -> str:
        how = f"{self.segment}" if self.slots is None else f"slots={self.slots}"
        if self.micro_batches > 1:
            how += f", micro_batches={self.micro_batches}"
        return f"hg.Checkpointed({how})"


def _stepwise_segments(steps: int, segment: int) -> Iterator[Any]:
    """``hg.Checkpointed(S)`` one step at a time: the segments' starts stored in a first pass,
    then each segment run again storing every carry, and its steps reversed one by one."""
    starts = list(range(0, steps, segment))
    for s in starts:
        yield Forward(s, min(s + segment, steps), store=s + segment < steps)
    yield Backward(steps)
    for s in reversed(starts):
        e = min(s + segment, steps)
        for k in range(s, e - 1):
            yield Forward(k, k + 1, store=True)
        for k in reversed(range(s, e)):
            yield Backward(k)
            if k > 0:
                yield Free(k)

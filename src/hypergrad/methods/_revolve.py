"""Binomial checkpointing (Griewank and Walther's Revolve): the optimal order to reverse K steps.

A pure schedule over ``n`` *units* (the K steps of an unroll, then the outer loss as unit K),
with at most ``slots`` carries stored at once, the initial one included. The executor
(``methods.checkpointed``) keeps the stored carries and one working carry; the schedule is a
sequence of three actions:

- ``Forward(start, stop, store)``: from the carry at ``start`` (the working carry if it is
  there, else the stored one), run units ``start .. stop-1`` without a graph; with ``store``,
  keep the carry at ``stop`` in a slot;
- ``Backward(k)``: differentiate unit ``k`` from the carry at ``k`` (working or stored), taking
  the cotangent of its output to the cotangent of its input; units are reversed from ``n - 1``
  down to 0, each once;
- ``Free(k)``: drop the carry stored at ``k``.

With ``c`` slots and ``r`` the least integer with ``n <= C(c + r, c)``, every unit is run at
most ``r`` times without a graph and the total number of such runs is
``r * n - C(c + r, c + 1)``, the least any schedule with ``c`` slots needs (Griewank 1992).
The recursion splits ``[lo, hi)`` at an ``m`` in the range where the cost
``m + cost(hi - m, c - 1) + cost(m, c)`` is least; the closed form makes each split O(r).
"""

from __future__ import annotations

from collections.abc import Iterator
from math import comb
from typing import NamedTuple

from hypergrad._boundary import caller, entered, positive_int

__all__ = [
    "Backward",
    "CheckpointCost",
    "Forward",
    "Free",
    "checkpoint_cost",
    "forward_runs",
    "repetitions",
    "schedule",
]


class Forward(NamedTuple):
    """Run units ``start .. stop-1`` without a graph; keep the carry at ``stop`` if ``store``."""

    start: int
    stop: int
    store: bool


class Backward(NamedTuple):
    """Differentiate unit ``k`` from the carry at ``k``."""

    k: int


class Free(NamedTuple):
    """Drop the carry stored at ``k``."""

    k: int


Action = Forward | Backward | Free


def _beta(slots: int, reps: int) -> int:
    """How many units ``slots`` carries reverse with each unit run at most ``reps`` times."""
    return comb(slots + reps, slots) if reps >= 0 else 0


def repetitions(units: int, slots: int) -> int:
    """The least ``r`` with ``units <= C(slots + r, slots)``: runs per unit at most.

    Examples:
        >>> repetitions(256, 4), repetitions(16, 4), repetitions(5, 1)
        (7, 3, 4)
    """
    reps = 0
    while _beta(slots, reps) < units:
        reps += 1
    return reps


def forward_runs(units: int, slots: int) -> int:
    """How many unit runs without a graph ``schedule(units, slots)`` makes (the optimum).

    Examples:
        >>> forward_runs(257, 4)  # K = 256 steps and the outer loss, 4 slots
        1337
        >>> forward_runs(4, 1)  # one slot: 3 + 2 + 1
        6
    """
    if units <= 1:
        return 0
    reps = repetitions(units, slots)
    return reps * units - comb(slots + reps, slots + 1)


def _split(units: int, slots: int) -> int:
    """An optimal length of the left part when ``units >= 2`` are reversed with ``slots >= 2``."""
    reps = repetitions(units, slots)
    low = max(1, units - _beta(slots - 1, reps), _beta(slots, reps - 2))
    high = min(_beta(slots, reps - 1), units - _beta(slots - 1, reps - 1))
    return max(1, min(low, high, units - 1))


def _plan(lo: int, hi: int, free: int) -> Iterator[Action]:
    """Reverse units ``[lo, hi)`` with the carry at ``lo`` available and ``free`` slots left."""
    while hi - lo > 1:
        if free == 0:  # one carry: run up to each unit from ``lo``, last unit first
            for k in range(hi - 1, lo, -1):
                yield Forward(lo, k, store=False)
                yield Backward(k)
            break
        mid = lo + _split(hi - lo, free + 1)
        yield Forward(lo, mid, store=True)
        yield from _plan(mid, hi, free - 1)
        yield Free(mid)
        hi = mid  # the left part, with the same slots (a loop: no recursion along it)
    yield Backward(lo)


def schedule(units: int, slots: int) -> Iterator[Action]:
    """The actions that reverse ``units`` units with at most ``slots`` stored carries.

    The carry at 0 is stored when the schedule starts and counts as one slot.

    Examples:
        >>> list(schedule(3, 2))
        [Forward(start=0, stop=1, store=True), Forward(start=1, stop=2, store=False), \
Backward(k=2), Backward(k=1), Free(k=1), Backward(k=0)]
    """
    if units < 1 or slots < 1:
        raise ValueError(f"schedule needs units >= 1 and slots >= 1, got {units} and {slots}")
    yield from _plan(0, units, slots - 1)


class CheckpointCost(NamedTuple):
    """What [`checkpoint_cost`][hypergrad.checkpoint_cost] predicts for one call.

    Attributes:
        slots: c, the carries stored at most.
        forward_runs: steps run without a graph (Revolve's recomputation).
        sweeps: ``forward_runs / K``: the extra passes over the loop, about ``r``.
        seconds: predicted time, ``forward_runs * step_seconds + K * backward_seconds``.
        peak_bytes: predicted peak, ``(c + 3) * carry_bytes + backward_bytes`` (the stored
            carries, the working carry, its cotangent and the last carry, kept for the
            result's trajectory; one step's backward).

    Examples:
        >>> hg.checkpoint_cost(16, 4, carry_bytes=100, backward_bytes=1000)
        CheckpointCost(slots=4, forward_runs=30, sweeps=1.875, seconds=78.0, peak_bytes=1700)
    """

    slots: int
    forward_runs: int
    sweeps: float
    seconds: float
    peak_bytes: int


def checkpoint_cost(
    steps: int,
    slots: int | None = None,
    *,
    carry_bytes: int,
    backward_bytes: int = 0,
    budget_bytes: int | None = None,
    step_seconds: float = 1.0,
    backward_seconds: float = 3.0,
) -> CheckpointCost:
    """Predict time and memory of ``hg.Checkpointed(slots=c)``, or choose ``c`` for a budget.

    Measure one step once (see "Choosing slots" on the methods page): ``carry_bytes`` is the
    size of params plus optimizer state plus buffers (``sum(x.nbytes for x in leaves)``),
    ``backward_bytes`` the peak of one step's backward (``hg.Checkpointed(slots=1)`` on
    ``steps=1``, measured with ``torch.cuda.max_memory_allocated``, or in a fresh process on
    the CPU), ``step_seconds`` a training step and ``backward_seconds`` one step's backward.
    Without ``slots``, returns the cost with the most slots whose peak fits ``budget_bytes``
    (more slots, fewer recomputations).

    Args:
        steps: K.
        slots: c; or ``None`` with ``budget_bytes``.
        carry_bytes: bytes of one carry.
        backward_bytes: bytes one step's backward needs beyond the carries.
        budget_bytes: the memory to fit in, when choosing ``slots``.
        step_seconds: time of one step without a graph (the unit of the time prediction).
        backward_seconds: time of one step's backward (about 3 steps).

    Returns:
        A [`CheckpointCost`][hypergrad.CheckpointCost].

    Examples:
        >>> cost = hg.checkpoint_cost(256, 4, carry_bytes=6 * 2**20, backward_bytes=40 * 2**20)
        >>> cost.forward_runs, round(cost.sweeps, 1), cost.peak_bytes // 2**20
        (1337, 5.2, 82)
        >>> hg.checkpoint_cost(256, carry_bytes=6 * 2**20, backward_bytes=40 * 2**20,
        ...                    budget_bytes=100 * 2**20).slots
        7
    """
    with entered("hg.checkpoint_cost"):
        positive_int(steps, "steps")
        if slots is None:
            if budget_bytes is None:
                raise TypeError(
                    f"{caller()}: give slots=c, or budget_bytes= to choose c; got neither."
                )
            slots = _most_slots(budget_bytes, carry_bytes, backward_bytes, steps)
        positive_int(slots, "slots")
    runs = forward_runs(steps + 1, slots)
    return CheckpointCost(
        slots=slots,
        forward_runs=runs,
        sweeps=runs / steps,
        seconds=runs * step_seconds + steps * backward_seconds,
        peak_bytes=(slots + 3) * carry_bytes + backward_bytes,
    )


def _most_slots(budget: int, carry: int, backward: int, steps: int) -> int:
    slots = (budget - backward) // max(carry, 1) - 3
    if slots < 1:
        need = 4 * carry + backward
        raise ValueError(
            f"{caller()}: no number of slots fits budget_bytes={budget}: one slot already needs "
            f"{need} bytes (4 carries of {carry} and one step's backward of {backward}). Raise "
            "the budget, shrink the step's backward (hg.Checkpointed(..., micro_batches=m)), or "
            "use method='first_order'."
        )
    return int(min(slots, steps + 1))  # more than K + 1 slots store nothing more

"""Shared by the benchmarks: every variant timed in turns, medians reported; optional peers.

A shared VM drifts by tens of percent over minutes; running each variant once per round, round
after round, keeps that drift out of the ratios between variants.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any


def interleaved_medians(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
    warm_up: bool = True,
) -> dict[str, float]:
    """Median time of each function: a warm-up call each, then ``repeats`` rounds in turns.

    Examples:
        >>> medians = interleaved_medians({"a": lambda: None, "b": lambda: None}, 3)
        >>> sorted(medians)
        ['a', 'b']
    """
    if warm_up:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def importable(name: str) -> bool:
    """Whether an optional peer (``higher``, ``torchopt``) imports here; its notices hidden."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            __import__(name)
    except Exception:
        return False
    return True

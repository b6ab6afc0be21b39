"""Forward mode's memory, estimated before it starts, and the chunk of directions it affords.

Forward mode pushes B tangent directions at once through the unroll; every tensor the step
makes then carries B tangents of its own size. ``measure`` tracks the bytes of the tensors an
op returns while they live (a ``TorchDispatchMode``, and a finaliser per tensor), and their peak;
one step (and the outer loss) with two directions against one gives what one more costs.
``available`` is the memory left to the process: on CUDA the device's free memory, on the CPU
the smaller of the system's available memory (``MemAvailable``) and what an address-space limit
(``RLIMIT_AS``) leaves. ``plan`` turns the two into a chunk of directions, or refuses.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hypergrad._boundary import caller

__all__ = ["available", "measure", "plan"]

_GIB = 2**30


def _storage(x: Any) -> int | None:
    """The address of a tensor's storage (``None``: not a tensor, or one without storage)."""
    if not isinstance(x, torch.Tensor):
        return None
    try:
        return x.untyped_storage().data_ptr()
    except RuntimeError:  # a wrapper without storage of its own (e.g. a ZeroTensor)
        return None


class _Bytes(TorchDispatchMode):
    """Track the bytes of the tensors ops return while they live, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(x) for x in torch.utils._pytree.tree_leaves((args, kwargs))}
        for x in out if isinstance(out, (tuple, list)) else (out,):
            at = _storage(x)
            if at is not None and at not in inputs:  # new memory, not a view of an input
                n = x.untyped_storage().nbytes()
                self.live += n
                weakref.finalize(x, self._free, n)
        self.peak = max(self.peak, self.live)
        return out


def measure(fn: Callable[[], Any]) -> int:
    """The peak bytes of the tensors made while ``fn()`` runs and alive at once (its working
    memory, beyond what existed before).

    Examples:
        >>> measure(lambda: [torch.ones(1000, dtype=torch.float64) * 2 for _ in range(3)])
        32000
    """
    mode = _Bytes()
    with mode:
        fn()
    return mode.peak


def _meminfo_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def _address_space_left() -> float:
    """What ``RLIMIT_AS`` leaves above the process's current virtual size (``inf``: no limit)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return math.inf
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        return float(soft - size)
    except (ImportError, OSError, ValueError):
        return math.inf


def available(device: torch.device) -> float:
    """The memory left to this process on ``device``, in bytes (``inf`` if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    return min(_meminfo_available(), _address_space_left())


def _gib(n: float) -> str:
    return f"{n / _GIB:.3g} GiB"


def plan(directions: int, per_direction: int, budget: float, chunk_size: int | None = None) -> int:
    """Directions per pass: as many as ``budget`` affords (all if they fit), or ``chunk_size``.

    Raises ``MemoryError`` (with the estimate and the way out) when one direction needs more
    than ``budget``, or ``chunk_size`` of them more than twice ``budget`` (the budget is half
    of the free memory by default: an explicit chunk may use all of it).

    Examples:
        >>> plan(10_000, 2**20, 2**30)  # 1 MiB a direction, 1 GiB: 1024 at a time
        1024
        >>> plan(100, 2**20, 2**30), plan(10_000, 2**20, 2**30, chunk_size=2000)
        (100, 2000)
    """
    if per_direction > budget:
        raise MemoryError(
            f"{caller()}(method='forward'): one tangent direction needs about "
            f"{_gib(per_direction)} (the tensors of one step and the outer loss, each with its "
            f"tangent), above the memory budget of {_gib(budget)}, and the {directions} "
            "directions run at least one at a time. Use a reverse-mode method "
            "(method='reverse', or hg.Checkpointed(S) for a long unroll), or raise the budget "
            "with hg.Forward(memory=bytes)."
        )
    fits = int(budget // per_direction)
    if chunk_size is None:
        return max(1, min(directions, fits))
    pushed = min(chunk_size, directions)
    if pushed * per_direction > 2 * budget:
        raise MemoryError(
            f"{caller()}(method='forward'): hg.Forward(chunk_size={chunk_size}) pushes "
            f"{pushed} of the {directions} tangent directions at once, about "
            f"{_gib(pushed * per_direction)} ({_gib(per_direction)} each), more than the "
            f"{_gib(2 * budget)} free. Pass hg.Forward(chunk_size={fits}) (or chunk_size=None: "
            "forward mode then chunks the directions to fit), or use method='reverse'."
        )
    return chunk_size

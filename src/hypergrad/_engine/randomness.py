"""Per-step random numbers: step ``k`` runs after ``manual_seed(seed + k)``, the caller's stream kept.

``seed`` is drawn once per public call from the global generator (one draw) or given by the user.
Dropout masks are therefore the same whenever a method recomputes a step (checkpointing, forward
mode's chunks), and the outer loss runs with ``seed + K``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from hypergrad import tree as _tree
from hypergrad.tree import PyTree

__all__ = ["draw_seed", "manual_seed", "rng_devices", "seeded"]


@contextlib.contextmanager
def seeded(seed: int, devices: tuple[int, ...] = ()) -> Iterator[None]:
    """Run the body with ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``.

    The global generators (CPU and the given CUDA devices) are restored afterwards.

    Examples:
        >>> with seeded(3):
        ...     a = torch.rand(1)
        >>> with seeded(3):
        ...     b = torch.rand(1)
        >>> torch.equal(a, b)
        True
    """
    with torch.random.fork_rng(devices=list(devices)):
        manual_seed(seed, devices)
        yield


def manual_seed(seed: int, devices: tuple[int, ...] = ()) -> None:
    """Seed the CPU generator and those of the given CUDA devices.

    Unlike ``torch.manual_seed`` this does not queue a lazy seeding of every accelerator
    backend, which records a Python stack trace per call (milliseconds per step on CPU).

    Examples:
        >>> manual_seed(0); a = torch.rand(1)
        >>> manual_seed(0); torch.equal(a, torch.rand(1))
        True
    """
    torch.default_generator.manual_seed(seed)
    for index in devices:
        torch.cuda.default_generators[index].manual_seed(seed)


def draw_seed() -> int:
    """Draw the per-call base seed: exactly one draw from the global torch generator."""
    return int(torch.randint(0, 2**62, ()).item())


def rng_devices(tree: PyTree) -> tuple[int, ...]:
    """CUDA device indices among the leaves of ``tree`` (forked around each step)."""
    return tuple(
        sorted(
            {
                x.device.index or 0
                for x in _tree.leaves(tree)
                if isinstance(x, torch.Tensor) and x.device.type == "cuda"
            }
        )
    )

"""``Batches``: the batch of step k, from any batch argument a user may pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller, positive_int

__all__ = ["Batches", "copied"]


def copied(tree: Any) -> Any:
    """``tree`` with every tensor leaf cloned (differentiably): what the engine works on.

    The engine hands the caller's tensors to the user's losses; a loss that changes one in
    place (``x.mul_(2)``, ``p.data.add_(1)``) would change the caller's own tensor, which shares
    its memory with every detached view the engine makes. Copies keep them safe, at the cost of
    one copy of the inputs per call (of a batch per step).

    Examples:
        >>> x = torch.ones(2)
        >>> copied({"x": x, "n": 3})["x"] is x
        False
    """
    return _tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _is_stacked(batches: Any) -> bool:
    if isinstance(batches, torch.Tensor):
        return True
    if isinstance(batches, (tuple, Mapping)):
        leaves = _tree.leaves(batches)
        return bool(leaves) and all(isinstance(x, torch.Tensor) for x in leaves)
    return False


def _stacked_steps(batches: Any, steps: int | None) -> int:
    """The number of steps of stacked batches (their common leading size, or ``steps``)."""
    sizes = {x.shape[0] if x.dim() else None for x in _tree.leaves(batches)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{caller()}: stacked batches must all have the same leading (step) dimension; "
            f"got leading sizes {sorted(str(s) for s in sizes)}. Pass tensors shaped "
            "(K, ...), a list of batches, or a function batch_fn(k)."
        )
    available: int = sizes.pop()  # type: ignore[assignment]  # None was refused above
    if available == 0:
        raise ValueError(
            f"{caller()}: the stacked batches hold 0 steps (their leading dimension is 0); "
            "there must be at least one step to run. Pass tensors shaped (K, ...) with "
            "K >= 1."
        )
    steps = available if steps is None else steps
    if steps > available:
        raise ValueError(
            f"{caller()}: batches ran out at step {available}: the stacked batches hold "
            f"{available} steps but steps={steps}. Pass steps={available} or more batches."
        )
    return steps


def _no_batch(k: int) -> None:
    """The batch of every step under ``batches=None``."""
    return None


class Batches:
    """``batch_at(k)`` over a stacked tensor tree, a callable, or a lazily consumed iterable.

    Args:
        batches: a tensor / tuple / dict of tensors with a leading step dimension, a callable
            ``batch_fn(k)``, an iterable of batches (a list, generator, DataLoader), or
            ``None`` with ``steps``: every step's batch is ``None``.
        steps: the number of steps K; may be omitted for stacked batches and sized iterables.

    Examples:
        >>> b = Batches(torch.arange(6.0).reshape(3, 2), None)
        >>> b.steps, b.at(2)
        (3, tensor([4., 5.]))
        >>> Batches(lambda k: k * 10, 4).at(3)
        30
        >>> Batches(None, 2).at(1) is None
        True
    """

    def __init__(self, batches: Any, steps: int | None) -> None:
        self._fn: Callable[[int], Any] | None = None
        self._stacked: Any = None
        self._iter: Iterator[Any] | None = None
        self._seen: list[Any] = []
        # Whether the inner loss changes its batch in place: None until the first batch (a
        # copy) comes back; then False (hand out the caller's own slices: no copy, and nothing
        # extra kept for the backward pass) or True (a copy every step).
        self._mutates: bool | None = None
        self._watched: list[tuple[torch.Tensor, int]] = []
        self._watched_copy = False
        #: ``batches=None``: every step's batch is ``None`` (nothing to map over clients).
        self.empty = batches is None
        if steps is not None:
            positive_int(steps, "steps")
        if _is_stacked(batches):
            steps = _stacked_steps(batches, steps)
            self._stacked = batches
        elif batches is None:  # no data per step (it lives in aux): inner_loss gets None
            if steps is None:
                raise ValueError(
                    f"{caller()}: batches=None runs steps without a batch (inner_loss receives "
                    "None, e.g. when the data lives in aux), so the number of steps is unknown; "
                    "pass steps=K."
                )
            self._fn = _no_batch
        elif callable(batches):
            if steps is None:
                raise ValueError(
                    f"{caller()}: batches is a function of the step index, so the number of steps "
                    "is unknown; pass steps=K."
                )
            self._fn = batches
        elif isinstance(batches, Iterable):
            if steps is None:
                try:
                    steps = len(batches)  # type: ignore[arg-type]
                except TypeError:
                    raise ValueError(
                        f"{caller()}: batches is an iterable without a length; pass steps=K."
                    ) from None
                if steps < 1:
                    raise ValueError(f"{caller()}: batches is empty; pass at least one batch.")
            self._iter = iter(batches)
        else:
            raise TypeError(
                f"{caller()}: batches must be a tensor (or tuple/dict of tensors) with a leading "
                f"step dimension, an iterable of batches, a function batch_fn(k), or None with "
                f"steps=K (no batch); got {type(batches).__name__}."
            )
        assert steps is not None  # every branch above set it or raised
        self.steps: int = steps

    def at(self, k: int) -> Any:
        """The batch of step ``k``; the caller's tensors never change through it.

        The first batch is a copy. If the inner loss leaves it unchanged, later batches are the
        caller's own slices (no copy per step, and the backward pass keeps no extra copies);
        if it changed the copy in place, every batch is a copy. Each batch handed out is
        checked at the next call (and by ``verify``): a loss that changes a slice of the
        caller's batch only at a later step gets a clear error. A batch from an iterable is a
        copy, the same object every time it is asked for.
        """
        self.verify()
        if self._stacked is not None:
            return self._hand(_tree.map(lambda x: x[k], self._stacked))
        if self._fn is not None:
            return self._hand(self._fn(k))
        while len(self._seen) <= k:
            try:
                self._seen.append(copied(next(self._iter)))  # type: ignore[arg-type]
            except StopIteration:
                n = len(self._seen)
                if n == 0:
                    raise ValueError(
                        f"{caller()}: batches ran out at step 0 of {self.steps}: the iterable "
                        "yielded no batches (a generator that an earlier call consumed?). Pass "
                        "a fresh iterable (a new generator, or a list, which can be read again)."
                    ) from None
                raise ValueError(
                    f"{caller()}: batches ran out at step {n} of {self.steps}: the iterable "
                    f"yielded only {n} batches. Pass steps={n}, or a longer iterable (e.g. "
                    "itertools.cycle(batches))."
                ) from None
        return self._seen[k]

    def copy_at(self, k: int) -> Any:
        """A copy of step ``k``'s batch, for a caller that runs no loss on it right away (a shape
        probe, a fetch of every batch up front); ``at``'s watch is left as it was."""
        if self._stacked is not None:
            return copied(_tree.map(lambda x: x[k], self._stacked))
        if self._fn is not None:
            return copied(self._fn(k))
        return self.at(k)  # an iterable's batches are copies already

    def _hand(self, batch: Any) -> Any:
        """``batch``, or a copy of it while the loss may change it in place; watched."""
        copy = self._mutates is not False
        if copy:
            batch = copied(batch)
        leaves = [x for x in _tree.leaves(batch) if isinstance(x, torch.Tensor)]
        self._watched = [(x, x._version) for x in leaves]
        self._watched_copy = copy
        return batch

    def verify(self) -> None:
        """Check the batch handed out last: learn whether the loss changes batches in place.

        Raises:
            RuntimeError: the loss changed the caller's own batch in place (it left the first
                batch, a copy, unchanged, and changed a later one).
        """
        changed = any(x._version != v for x, v in self._watched)
        self._watched = []
        if self._watched_copy:
            if self._mutates is None or changed:
                self._mutates = changed
        elif changed:
            raise RuntimeError(
                f"{caller()}: inner_loss changed its batch in place at a later step (not at the "
                "first), so it changed your own batches tensors. Write the op out of place "
                "(x = x * 2 instead of x.mul_(2), x = x - m instead of x -= m), or pass a copy "
                "of the batches."
            )

"""The public boundary: which public call is running, and the checks every layer shares.

Every public entry point runs its body inside ``entered("hg.hypergrad")`` (once, at the top);
code below it starts an error or a warning with ``caller()`` instead of receiving the name as an
argument. A nested public call (``hg.testing.check_hypergrad`` calling ``hg.hypergrad``) names
itself while it runs and restores the outer name afterwards. The lowest layer: it imports
nothing of hypergrad (torch only), so ``tree``, ``nn``, ``optim`` and the engine all use it.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Iterator
from typing import Any

import torch
from typing_extensions import TypeIs

__all__ = ["caller", "entered", "is_number", "positive_int"]

_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar(
    "hypergrad_caller", default="hypergrad"
)


_DELEGATED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "hypergrad_delegated", default=False
)


def entered(name: str, *, delegating: bool = False) -> contextlib.AbstractContextManager[None]:
    """Run the body as the public call ``name``.

    ``delegating=True`` marks a public function that hands the call on to another public one
    (``hg.clients.hypergrad`` is ``hg.hypergrad`` with ``clients=``): the next ``entered``
    inside keeps this name, so messages name the function the user called; calls nested deeper
    name themselves again. While ``torch.compile`` traces (an ``hg.tree`` function in a loss, an
    optimizer step) it does nothing: dynamo cannot trace a ``ContextVar``.

    Examples:
        >>> with entered("hg.unroll"):
        ...     caller()
        'hg.unroll'
        >>> caller()
        'hypergrad'
        >>> with entered("hg.clients.unroll", delegating=True), entered("hg.unroll"):
        ...     caller()
        'hg.clients.unroll'
    """
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _entered(name, delegating)


@contextlib.contextmanager
def _entered(name: str, delegating: bool) -> Iterator[None]:
    if _DELEGATED.get() and not delegating:  # the call handed on: keep the caller's name
        token = _DELEGATED.set(False)
        try:
            yield
        finally:
            _DELEGATED.reset(token)
        return
    name_token, flag_token = _CALLER.set(name), _DELEGATED.set(delegating)
    try:
        yield
    finally:
        _DELEGATED.reset(flag_token)
        _CALLER.reset(name_token)


def caller() -> str:
    """The name of the public call in progress (``"hypergrad"`` outside any)."""
    return _CALLER.get()


def is_number(value: Any) -> TypeIs[float]:
    """A real Python number that is not a bool (``True`` is not a learning rate).

    Examples:
        >>> is_number(0.1), is_number(3), is_number(True), is_number(torch.tensor(1.0))
        (True, True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(value: Any, name: str, meaning: str = "", *, none: str | None = None) -> Any:
    """``value`` if it is a positive int (or ``None``, when ``none`` says what it means).

    Otherwise a ``ValueError`` that starts with the public call in progress and says what the
    number means.

    Examples:
        >>> positive_int(3, "steps")
        3
        >>> positive_int(True, "segment", "(steps between stored carries)")
        Traceback (most recent call last):
        ...
        ValueError: hypergrad: segment must be a positive int (steps between stored carries), got True.
    """
    if value is None and none is not None:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        expected = "a positive int" + (f" {meaning}" if meaning else "")
        if none is not None:
            expected += " or None" + (f" {none}" if none else "")
        raise ValueError(f"{caller()}: {name} must be {expected}, got {value!r}.")
    return value

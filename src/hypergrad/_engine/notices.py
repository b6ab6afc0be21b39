"""Which warnings reach a user through hypergrad: ours, never a dependency's notes about itself.

torch's internals warn about torch's own deprecations (``torch.jit.script`` on the first
``torch.func.jvp``: a ``DeprecationWarning`` or, in newer releases, a ``FutureWarning``)
and dynamo warns that guards run slower on Python 3.13.0. Neither is about the user's code, and
under an ``error`` filter (``-W error``, pytest's ``filterwarnings``) the second would turn a
``compile=True`` call into an eager fallback. The library runs torch's transforms and compiler
inside ``torch_notices_hidden``; warnings that torch attributes to the caller's own code
(a deprecated argument the user passed) still come through.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["torch_notices_hidden"]

_TORCH = r"torch(\.|$)"  # a warning raised in torch's own modules
_NOTICES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@contextlib.contextmanager
def torch_notices_hidden() -> Iterator[None]:
    """Hide torch's deprecation notices about itself, and dynamo's Python 3.13.0 note.

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     with torch_notices_hidden():
        ...         warnings.warn_explicit("old", FutureWarning, "_script.py", 1, module="torch.jit")
        ...         warnings.warn_explicit("yours", FutureWarning, "user.py", 1, module="user")
        >>> [str(w.message) for w in seen]
        ['yours']
    """
    with warnings.catch_warnings():
        for category in _NOTICES:
            warnings.filterwarnings("ignore", category=category, module=_TORCH)
        warnings.filterwarnings(
            "ignore", message="Guards may run slower on Python 3.13.0", category=RuntimeWarning
        )
        yield

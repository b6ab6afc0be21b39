"""How a hypergradient is taken: one engine (``hypergrad._engine``), several methods.

Each method receives a ``Problem`` (``hypergrad._engine.problem``) and returns a
[`MethodResult`][hypergrad.methods.MethodResult]; it changes only how the loop is differentiated.
"""

from hypergrad._boundary import caller
from hypergrad.methods._base import Method, MethodResult
from hypergrad.methods.checkpointed import Checkpointed
from hypergrad.methods.first_order import FirstOrder
from hypergrad.methods.forward import Forward
from hypergrad.methods.implicit import Implicit, ImplicitReport, ImplicitWarning
from hypergrad.methods.reverse import Reverse
from hypergrad.methods.truncated import Truncated

__all__ = [
    "Checkpointed",
    "FirstOrder",
    "Forward",
    "Implicit",
    "ImplicitReport",
    "ImplicitWarning",
    "Method",
    "MethodResult",
    "Reverse",
    "Truncated",
    "resolve",
]

_NAMES = {
    "reverse": Reverse,
    "forward": Forward,
    "first_order": FirstOrder,
    "implicit": Implicit,
}


def resolve(method: str | Method) -> Method:
    """Turn ``"reverse"`` / ``"forward"`` / ``"first_order"`` / ``"implicit"`` or a method object
    into a method.

    Examples:
        >>> resolve("forward")
        "forward"
        >>> resolve(hg.Checkpointed(10))
        hg.Checkpointed(10)
    """
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method in _NAMES:
        return _NAMES[method]()
    raise ValueError(
        f"{caller()}: unknown method {method!r}; use 'reverse', 'forward', 'first_order', "
        "'implicit', hg.Truncated(T), hg.Checkpointed(segment), hg.Forward(chunk_size) or "
        "hg.Implicit(solver, ...)."
    )

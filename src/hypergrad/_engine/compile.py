"""The compiled fast path: ``torch.compile``-d steps, several steps per graph, eager fallback.

It wraps any step function ``step(params, state, buffers, aux, hyperparams, batch)`` (the
engine's, or the clients' vmapped one) and hands back a step with the same signature plus a
*multi-step* that runs several steps as one compiled graph (``several``), so the loop and the
methods run unchanged. It imports nothing above ``hypergrad.optim``. How it works (graphs,
random numbers, requires-grad flags, caching, fallback) is on the Architecture page of the
docs; when it pays, in Sharp bits.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import threading
import types
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller, entered, positive_int
from hypergrad._engine.notices import torch_notices_hidden
from hypergrad.optim._base import Optimizer

__all__ = [
    "CACHE_SIZE",
    "Compile",
    "CompileError",
    "CompileFallbackWarning",
    "check_compile",
    "clear_cache",
    "compile_step",
    "step_key",
    "steps_per_graph",
]

#: How many compiled steps are kept (least recently used ones are dropped).
CACHE_SIZE = 32

#: The keyword arguments given to ``torch.compile`` (see the module docstring).
COMPILE_KWARGS: dict[str, Any] = {
    "fullgraph": True,
    "dynamic": False,
    "options": {"fallback_random": True},
}

#: The chunk lengths ``steps_per_graph`` chooses from when K is longer than the largest.
AUTO_STEPS_PER_GRAPH = (6, 5, 4)

_NON_LEAF_GRAD = r"The \.grad attribute of a Tensor that is not a leaf Tensor"


class CompileFallbackWarning(UserWarning):
    """``compile=True`` could not compile the step, which ran eagerly (same results, eager speed).

    The message names the cause. Silence it with ``compile=False``, turn it into an error with
    ``compile="strict"``, or filter it:
    ``warnings.filterwarnings("ignore", category=hg.CompileFallbackWarning)``.

    Examples:
        >>> issubclass(hg.CompileFallbackWarning, UserWarning)
        True
    """


class CompileError(RuntimeError):
    """``compile="strict"`` could not compile the step (the message names the cause).

    Examples:
        >>> issubclass(hg.CompileError, RuntimeError)
        True
    """


@dataclasses.dataclass(frozen=True)
class Compile:
    """How ``compile=`` compiles the inner loop; ``compile=True`` means ``hg.Compile()``.

    Args:
        steps_per_graph: how many consecutive steps one compiled graph runs. ``None`` (default)
            chooses from the number of steps K (see
            [`steps_per_graph`][hypergrad._engine.compile.steps_per_graph]); larger compiles longer and
            runs faster; ``1`` compiles one step per graph (the shortest compile).
        strict: raise [`hg.CompileError`][hypergrad.CompileError] where the step cannot be
            compiled, instead of running it eagerly with a
            [`hg.CompileFallbackWarning`][hypergrad.CompileFallbackWarning] (``compile="strict"``).

    Examples:
        >>> hg.Compile(steps_per_graph=2)
        hg.Compile(steps_per_graph=2, strict=False)
        >>> hg.Compile(steps_per_graph=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: hg.Compile: steps_per_graph must be a positive int or None ..., got 0.

        Pass it as ``compile=hg.Compile(steps_per_graph=4)`` to ``hg.unroll``,
        ``hg.hypergrad`` or ``hg.clients.*``.
    """

    steps_per_graph: int | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        with entered("hg.Compile"):
            positive_int(self.steps_per_graph, "steps_per_graph", none="(chosen from the steps)")
            if not isinstance(self.strict, bool):
                raise ValueError(f"{caller()}: strict must be True or False, got {self.strict!r}.")

    def __repr__(self) -> str:
        return f"hg.Compile(steps_per_graph={self.steps_per_graph}, strict={self.strict})"


def check_compile(compile: Any) -> Compile | None:
    """Validate a ``compile=`` argument: ``None`` for ``False``, else the ``Compile`` options.

    ``True`` is ``Compile()``, ``"strict"`` is ``Compile(strict=True)``.

    Examples:
        >>> check_compile("strict")
        hg.Compile(steps_per_graph=None, strict=True)
        >>> check_compile(False) is None
        True
    """
    if compile is False:
        return None
    if compile is True:
        return Compile()
    if isinstance(compile, str) and compile == "strict":
        return Compile(strict=True)
    if isinstance(compile, Compile):
        return compile
    raise ValueError(
        f"{caller()}: compile must be False, True, 'strict' or hg.Compile(...), got {compile!r}. "
        "True compiles the steps with torch.compile and falls back to eager with a warning; "
        "'strict' raises instead; hg.Compile(steps_per_graph=S) also sets how many steps one "
        "graph runs."
    )


def steps_per_graph(steps: int, options: Compile) -> int:
    """How many steps one compiled graph runs, for an unroll of ``steps`` steps.

    The user's [`Compile.steps_per_graph`][hypergrad.Compile.steps_per_graph] if set; else
    ``steps`` itself when it is at most the largest of ``AUTO_STEPS_PER_GRAPH``, otherwise the
    length among them that leaves the fewest steps over (the longer one on a tie): every chunk
    then has that one length, and the steps left over run one per graph.

    Examples:
        >>> [steps_per_graph(k, Compile()) for k in (1, 3, 10, 11, 12, 16, 20, 1000)]
        [1, 3, 5, 5, 6, 4, 5, 5]
        >>> steps_per_graph(20, Compile(steps_per_graph=1))
        1
    """
    if options.steps_per_graph is not None:
        return options.steps_per_graph
    if steps <= max(AUTO_STEPS_PER_GRAPH):
        return steps
    return min(AUTO_STEPS_PER_GRAPH, key=lambda s: (steps % s, -s))


def _value_key(value: Any, depth: int = 0) -> Hashable:
    """A hashable stand-in for ``value``; functions compare by code and closure contents.

    Optimizer constructors build their ``update_fn``/``init_fn`` as closures, a new function
    object per optimizer, so identity would miss the cache for ``hg.optim.sgd(lr=...)`` built
    afresh each outer iteration; two closures with the same code and the same cell contents
    compute the same thing. Raises ``TypeError`` for anything unhashable.
    """
    if isinstance(value, types.FunctionType) and depth < 4:
        cells = tuple(_value_key(c.cell_contents, depth + 1) for c in value.__closure__ or ())
        defaults = _value_key(value.__defaults__, depth + 1)
        keywords = tuple(sorted((value.__kwdefaults__ or {}).items()))
        return ("function", value.__code__, cells, defaults, _value_key(keywords, depth + 1))
    if isinstance(value, torch.Tensor):
        return _Same(value)
    hash(value)
    return value


class _Same:
    """A key part that compares by identity: a tensor's ``==`` is elementwise, not a bool."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value  # kept alive with the key, so its id is not reused meanwhile

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def step_key(inner_loss: Callable[..., Any], opt: Optimizer, **static: Any) -> Hashable | None:
    """The cache key of a compiled step, or ``None`` when something in it is not hashable.

    Built from ``inner_loss`` (by code, closure contents and defaults, as the optimizer's
    functions: a loss defined anew inside the user's loop, over the same objects, finds the
    step compiled for the previous one; by identity if its closure holds something unhashable),
    the optimizer's family, functions and static options, and the
    given static switches of the step (``has_buffers``, ``first_order``, how clients are
    vmapped, ...). Not from hyperparameter values: those are inputs of the step, so the caller
    must pass all of them to the step.

    Examples:
        >>> loss = lambda p, a, b: p["w"].sum()
        >>> a = step_key(loss, hg.optim.sgd(lr=0.1), has_buffers=False)
        >>> a == step_key(loss, hg.optim.sgd(lr=0.5), has_buffers=False)
        True
        >>> a == step_key(loss, hg.optim.adam(lr=0.1), has_buffers=False)
        False
        >>> make = lambda scale: (lambda p, a, b: scale * p["w"].sum())
        >>> step_key(make(2.0), hg.optim.sgd(), has_buffers=False) == step_key(
        ...     make(2.0), hg.optim.sgd(), has_buffers=False)  # new function, same code and cells
        True
    """
    try:
        return (
            _loss_key(inner_loss),
            opt.name,
            _value_key(opt.update_fn),
            _value_key(opt.init_fn),
            tuple(sorted(opt.options.items())),
            tuple(opt.hyperparams),
            tuple(sorted(static.items())),
        )
    except TypeError:
        return None


def _loss_key(inner_loss: Callable[..., Any]) -> Hashable:
    """The loss's part of the key: by code and closure contents, or by identity if unhashable."""
    try:
        return _value_key(inner_loss)
    except TypeError:  # a closure over a dict or a list: only this very function is known
        return inner_loss


def _code(loss_key: Any) -> Any:
    """The code object behind a loss key (``None`` for a callable that is not a function)."""
    if isinstance(loss_key, tuple) and loss_key[:1] == ("function",):
        return loss_key[1]
    return getattr(loss_key, "__code__", None)


_WARNED: set[Any] = set()


def _warn_if_recompiled(key: Hashable, cached: list[Hashable]) -> None:
    """Warn (once per code) when a loss of known code compiles again only for its closure.

    Each compile takes seconds; it happens when the user defines the inner loss inside their
    loop over a tensor or dict made anew each time, so the cache cannot tell it is the same.
    """
    if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], tuple)):
        return
    code = _code(key[0][0])
    if code is None or code in _WARNED:
        return
    for other in cached:
        if (
            isinstance(other, tuple)
            and len(other) == 2
            and isinstance(other[0], tuple)
            and other[1] == key[1]
            and other[0][1:] == key[0][1:]
            and _code(other[0][0]) is code
        ):
            _WARNED.add(code)
            warnings.warn(
                f"{caller()}: compile=True compiles inner_loss again: it is a new function with "
                "the same code as one compiled before, but its closure holds other objects (a "
                "tensor, dict or list made anew each time), so the compiled step cannot be "
                "reused and every call compiles for seconds. Define inner_loss once, outside "
                "your loop, and pass what changes through aux or the batches.",
                UserWarning,
                stacklevel=5,
            )
            return


@contextlib.contextmanager
def _tracing_notices_hidden() -> Iterator[None]:
    """Run a compiled call with torch's notices about itself hidden (see ``hypergrad._engine.notices``).

    Dynamo also reads ``.grad`` of non-leaf inputs while tracing and discards the warning that
    raises (torch/_dynamo/side_effects.py, ``catch_warnings(record=True)``); under an "error"
    filter (pytest's filterwarnings, ``-W error``) it would abort the compile instead.
    """
    with torch_notices_hidden(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning)
        yield


def _import_inductor() -> None:
    """Import inductor once, hiding the deprecation warning torch's own import chain emits.

    Importing ``torch._inductor.compile_fx`` defines a ``torch.jit.ScriptModule`` in
    ``torch.utils.mkldnn``, which warns that ``torch.jit.script_method`` is deprecated (torch's
    code, not the user's); under ``-W error`` that warning would abort the first compile.
    """
    with torch_notices_hidden():
        import torch._inductor.compile_fx  # noqa: F401


def _with_own_code(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own, named ``name``.

    Dynamo caches compiled graphs per code object and limits recompiles per code object; every
    engine step shares the code of one nested function, so each entry (and each chunk length)
    gets a fresh code object.
    """
    renames: dict[str, Any] = {"co_name": name}
    if sys.version_info >= (3, 11):  # code objects have a qualified name from Python 3.11
        renames["co_qualname"] = name
    code = fn.__code__.replace(**renames)
    own = types.FunctionType(code, fn.__globals__, name, None, fn.__closure__)
    own.__qualname__ = name
    return own


def _one_step(step: Callable[..., Any], name: str) -> Callable[..., Any]:
    def trampoline(params, state, buffers, aux, hyperparams, batch):
        return step(params, state, buffers, aux, hyperparams, batch)

    return _with_own_code(trampoline, name)


def _several_steps(step: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``steps(params, state, buffers, aux, hyperparams, batches)``: one step per batch."""

    def trampoline(params, state, buffers, aux, hyperparams, batches):
        losses = []
        for batch in batches:  # a tuple of fixed length: dynamo unrolls it into one graph
            params, state, buffers, loss = step(params, state, buffers, aux, hyperparams, batch)
            losses.append(loss)
        return params, state, buffers, tuple(losses)

    return _with_own_code(trampoline, name)


class _Entry:
    """One cached compiled step: its graphs for one step and for each chunk length, and flags.

    ``failure``: why the one-step graph could not be compiled (then everything runs eagerly);
    ``chunk_failure``: why a multi-step graph could not (then one step per graph);
    ``draws_random``: the step draws random numbers, so it runs one step per graph.
    """

    def __init__(self, step: Callable[..., Any], number: int) -> None:
        _import_inductor()
        self.step = step
        self.name = f"hypergrad_step_{number}"
        self.fn = torch.compile(_one_step(step, self.name), **COMPILE_KWARGS)
        self.chunks: dict[int, Callable[..., Any]] = {}
        self.failure: str | None = None
        self.chunk_failure: str | None = None
        self.draws_random = False

    @property
    def one_step_only(self) -> bool:
        """Whether several steps per graph are known not to work for this step."""
        return bool(self.failure or self.chunk_failure or self.draws_random)

    def chunk(self, length: int) -> Callable[..., Any]:
        if length not in self.chunks:
            name = f"{self.name}_x{length}"
            self.chunks[length] = torch.compile(_several_steps(self.step, name), **COMPILE_KWARGS)
        return self.chunks[length]


_CACHE: collections.OrderedDict[Hashable, _Entry] = collections.OrderedDict()
_LOCK = threading.Lock()
_COUNT = [0]


def clear_cache() -> None:
    """Forget every compiled step (the next compiled call compiles again).

    Examples:
        >>> clear_cache()
    """
    with _LOCK:
        _CACHE.clear()


def _entry(step: Callable[..., Any], key: Hashable | None) -> _Entry:
    with _LOCK:
        if key is not None and key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        if key is not None:
            _warn_if_recompiled(key, list(_CACHE))
        _COUNT[0] += 1
        entry = _Entry(step, _COUNT[0])
        if key is not None:
            _CACHE[key] = entry
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        return entry


def _describe(error: BaseException) -> str:
    from torch._dynamo.exc import FailOnRecompileLimitHit

    if isinstance(error, FailOnRecompileLimitHit):
        limit = torch._dynamo.config.recompile_limit
        return (
            f"the step needed more than torch._dynamo.config.recompile_limit={limit} compiled "
            "variants (one per set of input shapes, grad mode and which inputs require grad); "
            "keep batch shapes fixed (e.g. DataLoader(drop_last=True)) or raise that limit"
        )
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    head = " ".join(lines[:2]) if lines and lines[0].endswith(":") else "".join(lines[:1])
    text = f"{type(error).__name__}: {head}".rstrip(": ")
    return text if len(text) <= 300 else text[:297] + "..."


def _in_transform() -> bool:
    return torch._C._functorch.maybe_current_level() is not None


def _records(*trees: Any) -> bool:
    """Whether a compiled step called on ``trees`` records a graph (its outputs require grad)."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in _tree.leaves(trees)
    )


def _settle(tree: Any, record: bool) -> Any:
    """Floating-point leaves of ``tree`` require grad exactly when ``record`` (see module doc)."""

    def settle(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad != record:
            return x.detach().requires_grad_() if record else x.detach()
        return x

    return _tree.map(settle, tree)


def _generator_states(tree: Any) -> list[torch.Tensor]:
    """The states of the CPU generator and of the CUDA devices holding leaves of ``tree``."""
    devices = {
        x.device.index or 0
        for x in _tree.leaves(tree)
        if isinstance(x, torch.Tensor) and x.device.type == "cuda"
    }
    return [torch.default_generator.get_state()] + [
        torch.cuda.default_generators[i].get_state() for i in sorted(devices)
    ]


class _CompiledStep:
    """A step with the engine's signature: compiled when possible, else eager (see module doc).

    ``several`` runs several steps as one graph (the engine's multi-step protocol, see
    the engine's ``run_steps``): ``length`` steps per call, ``fits(k)``, and a call
    that returns ``None`` when those steps must run one by one.
    """

    def __init__(
        self,
        step: Callable[..., Any],
        key: Hashable | None,
        options: Compile,
        length: int,
    ) -> None:
        self.eager = step
        self.key = key
        self.entry: _Entry | None = None  # chosen at the first call, by the params' dtypes
        self.strict = options.strict
        self.length = length
        self.warned = False

    def _fall_back(self, cause: str, error: BaseException | None = None) -> None:
        if self.strict:
            raise CompileError(
                f"{caller()}: compile='strict' could not compile the step: {cause}. Fix the "
                "cause, or pass compile=True to run such steps eagerly with a warning, or "
                "compile=False."
            ) from error
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"{caller()}: compile=True could not compile the step: {cause}. The step ran "
                "eagerly (same results, eager speed). Fix the cause, pass compile=False to "
                "silence this, or compile='strict' to make it an error.",
                CompileFallbackWarning,
                stacklevel=4,
            )

    def _entry_for(self, params: Any) -> _Entry:
        if self.entry is None:
            kinds = {(x.dtype, x.device) for x in _tree.leaves(params) if hasattr(x, "dtype")}
            signature = tuple(sorted(kinds, key=str))
            self.entry = _entry(self.eager, None if self.key is None else (self.key, signature))
        return self.entry

    def fits(self, k: int) -> bool:
        """Whether steps ``k .. k+length-1`` may be tried as one graph (this entry permitting)."""
        known_off = self.entry is not None and self.entry.one_step_only
        return self.length > 1 and not known_off and not _in_transform()

    def __call__(self, params, state, buffers, aux, hyperparams, batch):
        args = (params, state, buffers, aux, hyperparams, batch)
        if _in_transform():
            self._fall_back(
                "it runs inside a torch.func transform (method='forward', or torch.func.grad/"
                "vmap/jvp around the call), and PyTorch cannot apply torch.func transforms to a "
                "torch.compile-d function (pytorch/pytorch#128711). Use method='reverse' or "
                "hg.Checkpointed(...) for a compiled hypergradient"
            )
            return self.eager(*args)
        entry = self._entry_for(params)
        if entry.failure is not None:
            self._fall_back(entry.failure)
            return self.eager(*args)
        record = _records(params, state, aux, hyperparams, batch)
        settled = (_settle(params, record), _settle(state, record), *args[2:])
        try:
            with _tracing_notices_hidden():
                return entry.fn(*settled)
        except Exception as error:
            # Dynamo restores the RNG state after tracing, so the eager step sees the same random
            # numbers. If the eager step fails too, the error is the user's: raise that one.
            result = self.eager(*args)
            entry.failure = _describe(error)
            self._fall_back(entry.failure, error)
            return result

    def several(self, params, state, buffers, aux, hyperparams, batches):
        """Run ``len(batches)`` steps as one graph; ``None``: run them one by one instead.

        ``None`` inside a torch.func transform, when the step could not be compiled, and when
        the steps drew random numbers (then never again: those need a seed per step).
        """
        if _in_transform():
            return None
        entry = self._entry_for(params)
        if entry.one_step_only:
            return None
        record = _records(params, state, aux, hyperparams, batches)
        settled = (_settle(params, record), _settle(state, record), buffers, aux, hyperparams)
        before = _generator_states(params)
        try:
            with _tracing_notices_hidden():
                result = entry.chunk(len(batches))(*settled, tuple(batches))
        except Exception as error:
            entry.chunk_failure = _describe(error)
            return None
        after = _generator_states(params)
        if any(not torch.equal(a, b) for a, b in zip(before, after)):
            entry.draws_random = True
            return None
        return result


def compile_step(
    step: Callable[..., Any],
    *,
    compile: Compile | None,
    key: Hashable | None = None,
    steps: int = 1,
) -> Callable[..., Any]:
    """Return ``step`` compiled with ``torch.compile`` (cached by ``key``), or ``step`` itself.

    Args:
        step: a step function ``step(params, state, buffers, aux, hyperparams, batch)`` that is
            traceable by torch.func (the engine's ``make_step(..., inner_grad="func")``, or a
            ``torch.func.vmap`` of it). It is also the eager fallback.
        compile: the options from ``check_compile``; ``None`` returns ``step``.
        key: reuse the compiled step cached under this key (see ``step_key``); ``None``
            compiles afresh. The key must capture everything ``step`` closes over except the
            hyperparameter values, which every call must pass in full.
        steps: the number of steps of the unroll, from which ``steps_per_graph`` chooses
            how many steps one graph runs.

    Returns:
        A step with the same signature and results; a compiled one also has ``length``,
        ``fits(k)`` and ``several(...)``, the multi-step that
        the engine's ``run_steps`` uses.

    Examples:
        >>> opt = hg.optim.sgd(lr=0.5)
        >>> loss = lambda p, a, b: (p["w"] ** 2).sum()
        >>> from hypergrad._engine.step import make_step
        >>> eager = make_step(loss, opt, has_buffers=False, inner_grad="func")
        >>> compile_step(eager, compile=None) is eager
        True
        >>> compile_step(eager, compile=Compile(), steps=20).length
        5
    """
    if compile is None:
        return step
    return _CompiledStep(step, key, compile, steps_per_graph(steps, compile))

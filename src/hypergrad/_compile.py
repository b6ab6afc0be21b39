"""The compiled fast path: a ``torch.compile``-d step function with a cache and an eager fallback.

This module sits at the level of :mod:`hypergrad.unroll` (it imports nothing above
:mod:`hypergrad.optim`): it wraps any step function ``step(params, state, buffers, aux,
hyperparams, batch)`` (the engine's, or a ``torch.func.vmap``-ed one from :mod:`hypergrad.clients`)
and hands back a step with the same signature, so the loop and the methods run unchanged.

What is compiled, and how
-------------------------

The whole step (inner loss, inner gradient by ``torch.func.grad_and_value``, optimizer update)
is one graph: ``torch.compile(step, fullgraph=True, dynamic=False,
options={"fallback_random": True})``.

- ``fullgraph=True``: a graph break (an unsupported op, ``.item()``, printing inside the loss)
  surfaces at the first call, where we can fall back, instead of silently splitting the step
  into slow pieces.
- ``dynamic=False``: shapes are specialised (fastest kernels); a new shape compiles once more.
- ``fallback_random=True``: random ops (dropout) call ATen's generators, so compiled and eager
  steps draw the same numbers under the engine's per-step seeding (``"checkpointed"``
  recomputes the same masks, and results equal eager ones).
- default mode (not ``"reduce-overhead"``): CUDA graphs would overwrite the outputs of step k at
  step k+1, while the unroll keeps every step's outputs for the backward pass.

The outer ``torch.autograd.grad`` differentiates through the compiled step's backward (a
first-order backward of a graph that contains the inner gradient), so ``"reverse"``,
``Truncated``, ``Checkpointed`` and ``"first_order"`` run compiled.

Caching: a compiled step is kept (a small LRU of :data:`CACHE_SIZE` entries) under a key built
by :func:`step_key` from the inner loss (by identity), the optimizer's family, update function
and static options, and the step's static switches, plus the dtypes and devices of the params
(read at the first step of each call). Hyperparameter *values* are not in the key: they are
inputs of the step. Repeated ``hg.hypergrad`` calls with the same ``inner_loss`` and optimizer
family therefore reuse the compiled graphs: no recompilation while shapes, grad mode and which
inputs require grad stay the same. Each entry holds one graph per such variant (a method
uses 2 to 4: the first step, the later ones, steps without a graph) and gets its own code
object, so dynamo's ``torch._dynamo.config.recompile_limit`` (8) counts per entry; past it the
step falls back (see below) with advice. A *float* hyperparameter is a compile-time constant
(the optimizers branch on it, e.g. skip a zero weight decay), so a float that changes between
calls compiles new variants; vary a hyperparameter as a 0-d tensor (``hyperparams={"lr":
torch.tensor(0.05)}``, or name it in ``wrt``, which makes it one) and nothing recompiles.

Fallback: the step runs eagerly, with ONE :class:`CompileFallbackWarning` per public call naming
the cause, when compilation fails (a graph break, an unsupported op, the recompile limit), and
when the step is called inside a ``torch.func`` transform (``method="forward"``, or a user's
``torch.func.grad`` over ``hg.unroll``): PyTorch cannot apply ``torch.func.jvp``/``vmap``/
``grad`` to a compiled function (pytorch/pytorch#128711). ``compile="strict"`` raises
:class:`CompileError` instead. If the eager step fails too, its error (the user's) is raised.

Limitation: the backward of a compiled region runs once: ``retain_graph=True`` or
``create_graph=True`` (a double backward) through a compiled unroll raises torch's error at
backward time, where no fallback is possible; use ``compile=False`` for higher-order
derivatives of a trajectory.
"""

from __future__ import annotations

import collections
import threading
import types
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch

from hypergrad import tree as _tree
from hypergrad.optim._base import Optimizer

__all__ = [
    "CACHE_SIZE",
    "CompileError",
    "CompileFallbackWarning",
    "check_compile",
    "clear_cache",
    "compile_step",
    "step_key",
]

#: How many compiled steps are kept (least recently used ones are dropped).
CACHE_SIZE = 32

#: The keyword arguments given to ``torch.compile`` (see the module docstring).
COMPILE_KWARGS: dict[str, Any] = {
    "fullgraph": True,
    "dynamic": False,
    "options": {"fallback_random": True},
}


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


def check_compile(compile: Any, *, caller: str) -> bool | str:
    """Validate a ``compile=`` argument: ``False``, ``True`` or ``"strict"``.

    Examples:
        >>> check_compile("strict", caller="hg.unroll")
        'strict'
    """
    if compile is False or compile is True or compile == "strict":
        return compile
    raise ValueError(
        f"{caller}: compile must be False, True or 'strict', got {compile!r}. True compiles the "
        "step with torch.compile and falls back to eager with a warning; 'strict' raises instead."
    )


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
        return ("function", value.__code__, cells, defaults)
    hash(value)
    return value


def step_key(inner_loss: Callable[..., Any], opt: Optimizer, **static: Any) -> Hashable | None:
    """The cache key of a compiled step, or ``None`` when something in it is not hashable.

    Built from ``inner_loss`` (by identity: define it once, outside the outer loop), the
    optimizer's family, functions (by code and closure contents) and static options, and the given static switches of the step
    (``has_buffers``, ``first_order``, how clients are vmapped, ...). Not from hyperparameter
    values: those are inputs of the step, so the caller must pass all of them to the step.

    Examples:
        >>> loss = lambda p, a, b: p["w"].sum()
        >>> a = step_key(loss, hg.optim.sgd(lr=0.1), has_buffers=False)
        >>> a == step_key(loss, hg.optim.sgd(lr=0.5), has_buffers=False)
        True
        >>> a == step_key(loss, hg.optim.adam(lr=0.1), has_buffers=False)
        False
    """
    try:
        return (
            inner_loss,
            opt.name,
            _value_key(opt.update_fn),
            _value_key(opt.init_fn),
            tuple(sorted(opt.options.items())),
            tuple(opt.hyperparams),
            tuple(sorted(static.items())),
        )
    except TypeError:
        return None


class _Entry:
    """One compiled step: the compiled function and, once it failed, the cause."""

    def __init__(self, step: Callable[..., Any], number: int) -> None:
        _import_inductor()
        self.fn = torch.compile(_own_code(step, number), **COMPILE_KWARGS)
        self.failure: str | None = None


def _import_inductor() -> None:
    """Import inductor once, hiding the deprecation warning torch's own import chain emits.

    Importing ``torch._inductor.compile_fx`` defines a ``torch.jit.ScriptModule`` in
    ``torch.utils.mkldnn``, which warns that ``torch.jit.script_method`` is deprecated (torch's
    code, not the user's); under ``-W error`` that warning would abort the first compile.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning
        )
        import torch._inductor.compile_fx  # noqa: F401


def _own_code(step: Callable[..., Any], number: int) -> Callable[..., Any]:
    """A trampoline calling ``step`` with a code object of its own.

    Dynamo caches compiled graphs per code object and limits recompiles per code object; every
    engine step shares the code of one nested function, so each entry gets a fresh code object.
    """

    def trampoline(params, state, buffers, aux, hyperparams, batch):
        return step(params, state, buffers, aux, hyperparams, batch)

    name = f"hypergrad_step_{number}"
    code = trampoline.__code__.replace(co_name=name, co_qualname=name)
    fn = types.FunctionType(code, trampoline.__globals__, name, None, trampoline.__closure__)
    fn.__qualname__ = name
    return fn


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


class _CompiledStep:
    """A step with the engine's signature: compiled when possible, else eager (see module doc)."""

    def __init__(
        self, step: Callable[..., Any], key: Hashable | None, strict: bool, caller: str
    ) -> None:
        self.eager = step
        self.key = key
        self.entry: _Entry | None = None  # chosen at the first call, by the params' dtypes
        self.strict = strict
        self.caller = caller
        self.warned = False

    def _fall_back(self, cause: str, error: BaseException | None = None) -> None:
        if self.strict:
            raise CompileError(
                f"{self.caller}: compile='strict' could not compile the step: {cause}. Fix the "
                "cause, or pass compile=True to run such steps eagerly with a warning, or "
                "compile=False."
            ) from error
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"{self.caller}: compile=True could not compile the step: {cause}. The step ran "
                "eagerly (same results, eager speed). Fix the cause, pass compile=False to "
                "silence this, or compile='strict' to make it an error.",
                CompileFallbackWarning,
                stacklevel=4,
            )

    def __call__(self, params, state, buffers, aux, hyperparams, batch):
        args = (params, state, buffers, aux, hyperparams, batch)
        if torch._C._functorch.maybe_current_level() is not None:
            self._fall_back(
                "it runs inside a torch.func transform (method='forward', or torch.func.grad/"
                "vmap/jvp around the call), and PyTorch cannot apply torch.func transforms to a "
                "torch.compile-d function (pytorch/pytorch#128711). Use method='reverse' or "
                "hg.Checkpointed(...) for a compiled hypergradient"
            )
            return self.eager(*args)
        if self.entry is None:
            kinds = {(x.dtype, x.device) for x in _tree.leaves(params) if hasattr(x, "dtype")}
            signature = tuple(sorted(kinds, key=str))
            self.entry = _entry(self.eager, None if self.key is None else (self.key, signature))
        if self.entry.failure is not None:
            self._fall_back(self.entry.failure)
            return self.eager(*args)
        try:
            with warnings.catch_warnings():
                # Dynamo reads .grad of non-leaf inputs while tracing and discards the warning
                # that raises (torch/_dynamo/side_effects.py, catch_warnings(record=True));
                # under an "error" filter (pytest's filterwarnings, -W error) it would abort
                # the compile instead.
                warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning)
                return self.entry.fn(*args)
        except Exception as error:
            # Dynamo restores the RNG state after tracing, so the eager step sees the same random
            # numbers. If the eager step fails too, the error is the user's: raise that one.
            result = self.eager(*args)
            self.entry.failure = _describe(error)
            self._fall_back(self.entry.failure, error)
            return result


def compile_step(
    step: Callable[..., Any],
    *,
    compile: bool | str,
    caller: str,
    key: Hashable | None = None,
) -> Callable[..., Any]:
    """Return ``step`` compiled with ``torch.compile`` (cached by ``key``), or ``step`` itself.

    Args:
        step: a step function ``step(params, state, buffers, aux, hyperparams, batch)`` that is
            traceable by torch.func (the engine's ``make_step(..., inner_grad="func")``, or a
            ``torch.func.vmap`` of it). It is also the eager fallback.
        compile: ``False`` (return ``step``), ``True`` (fall back to eager with a
            :class:`CompileFallbackWarning`) or ``"strict"`` (raise :class:`CompileError`).
        caller: the public name used in warnings and errors.
        key: reuse the compiled step cached under this key (see :func:`step_key`); ``None``
            compiles afresh. The key must capture everything ``step`` closes over except the
            hyperparameter values, which every call must pass in full.

    Returns:
        A step with the same signature and results.

    Examples:
        >>> opt = hg.optim.sgd(lr=0.5)
        >>> loss = lambda p, a, b: (p["w"] ** 2).sum()
        >>> from hypergrad.unroll import make_step
        >>> eager = make_step(loss, opt, has_buffers=False, inner_grad="func")
        >>> compile_step(eager, compile=False, caller="hg.unroll") is eager
        True
    """
    mode = check_compile(compile, caller=caller)
    if mode is False:
        return step
    return _CompiledStep(step, key, mode == "strict", caller)

"""``check_hypergrad``: a method's hypergradient against central finite differences.

Kinks: a loss built from ``max``, ``clamp``, ``abs``, ``relu`` or a comparison (AMSGrad's
``maximum(max_exp_avg_sq, exp_avg_sq)``, say) is only piecewise smooth, and a central
difference whose stencil straddles a kink is not a derivative of either piece.
``finite_difference`` records, at every point of the stencil, which side of each such op's
kink every element is on; where the stencil leaves the origin's piece it falls back to the
one-sided difference on the side that stays in it, or reports the direction as a ``"kink"``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from hypergrad import tree as _tree
from hypergrad._boundary import caller, entered, is_number
from hypergrad._engine.batches import Batches
from hypergrad._engine.checks import check_opt
from hypergrad._engine.hyper import ranges_unchecked
from hypergrad._engine.kernels import math_attention
from hypergrad._engine.problem import outer_fn
from hypergrad._engine.randomness import rng_devices, seeded
from hypergrad.hypergradient import Hypergradient, hypergrad, map_hyper
from hypergrad.methods import Method, resolve
from hypergrad.optim._base import Optimizer
from hypergrad.trajectory import unroll
from hypergrad.tree import PyTree
from hypergrad.tree._base import check_alike

__all__ = [
    "DirectionCheck",
    "FiniteDifference",
    "HypergradCheck",
    "check_hypergrad",
    "finite_difference",
]


@dataclasses.dataclass(frozen=True)
class DirectionCheck:
    """One random direction: the analytic and the finite-difference directional derivative.

    Attributes:
        analytic: ``<hypergradient, direction>``.
        numeric: the finite-difference estimate (``nan`` where ``formula`` is ``"kink"``).
        formula: the finite difference used: ``"central"``, or ``"forward"`` / ``"backward"``
            where the central stencil straddles a kink (see ``finite_difference``), or
            ``"kink"`` where neither side of the stencil stays on the origin's smooth piece, so
            that the direction could not be checked.

    Examples:
        >>> d = hg.testing.DirectionCheck(analytic=1.0, numeric=1.000001)
        >>> round(d.abs_err, 9), round(d.rel_err, 9), d.formula, d.checked
        (1e-06, 1e-06, 'central', True)
    """

    analytic: float
    numeric: float
    formula: str = "central"

    @property
    def checked(self) -> bool:
        """Whether a finite difference could be formed (``formula`` is not ``"kink"``)."""
        return self.formula != "kink"

    @property
    def abs_err(self) -> float:
        """``|analytic - numeric|``."""
        return abs(self.analytic - self.numeric)

    @property
    def rel_err(self) -> float:
        """``abs_err / max(|analytic|, |numeric|)`` (0 when both are 0)."""
        scale = max(abs(self.analytic), abs(self.numeric))
        return self.abs_err / scale if scale else 0.0


@dataclasses.dataclass(frozen=True)
class HypergradCheck:
    """The report of [`check_hypergrad`][hypergrad.testing.check_hypergrad].

    Attributes:
        method: the method checked, as written (e.g. ``hg.Checkpointed(2)``).
        wrt: what was differentiated.
        directions: one [`DirectionCheck`][hypergrad.testing.DirectionCheck] per random direction.
        rtol: the relative tolerance used.
        atol: the absolute tolerance used.
        hypergradient: the (float64) hypergradient that was checked.

    Examples:
        >>> inner = lambda p, a, x: ((p["w"] - a * x) ** 2).sum()
        >>> outer = lambda p, a, x: (p["w"] ** 2).sum()
        >>> report = hg.testing.check_hypergrad(outer, inner, {"w": torch.ones(2)},
        ...     hg.optim.adam(lr=0.1), torch.ones(3, 2), None, aux=torch.tensor(0.5))
        >>> report.method, len(report.directions) > 0, all(report.ok(d) for d in report.directions)
        ("'reverse'", True, True)
    """

    method: str
    wrt: tuple[str, ...]
    directions: tuple[DirectionCheck, ...]
    rtol: float
    atol: float
    hypergradient: Hypergradient

    def ok(self, d: DirectionCheck) -> bool:
        """Whether one direction is within tolerance: ``abs_err <= atol + rtol * scale``."""
        return d.abs_err <= self.atol + self.rtol * max(abs(d.analytic), abs(d.numeric))

    @property
    def passed(self) -> bool:
        """Whether every checked direction is within tolerance, and at least one was checked.

        A direction whose stencil sits on a kink (``formula == "kink"``) is not counted.
        """
        checked = [d for d in self.directions if d.checked]
        return bool(checked) and all(self.ok(d) for d in checked)

    @property
    def max_rel_err(self) -> float:
        """The largest relative error over the checked directions."""
        return max((d.rel_err for d in self.directions if d.checked), default=0.0)

    def __str__(self) -> str:
        lines = [
            f"hypergradient check: method={self.method}, wrt={self.wrt}, "
            f"rtol={self.rtol:g}, atol={self.atol:g}: {'passed' if self.passed else 'FAILED'}",
            f"  {'dir':>3}  {'analytic':>22}  {'finite diff':>22}  {'rel err':>9}  ok",
        ]
        for i, d in enumerate(self.directions):
            verdict = ("yes" if self.ok(d) else "NO") if d.checked else "kink (not checked)"
            if d.checked and d.formula != "central":
                verdict += f" ({d.formula} difference: the central one straddles a kink)"
            lines.append(
                f"  {i:>3}  {d.analytic:>22.15g}  {d.numeric:>22.15g}  {d.rel_err:>9.2e}  {verdict}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- kinks

# Ops whose result changes formula where two values cross. For each call the recorder keeps, per
# element, which side of the kink the input is on: the sign of ``a - b`` for a comparison,
# ``maximum``/``minimum`` or ``clamp``, of ``x - threshold`` for ``abs``/``relu``/``threshold``,
# the winning index for a reduction, the output of a piecewise-constant op. Names are matched
# without leading or trailing underscores, so ``Tensor.__gt__`` and ``clamp_`` count.
_BINARY = frozenset(
    {"gt", "ge", "lt", "le", "eq", "ne", "greater", "greater_equal", "less", "less_equal",
     "not_equal", "maximum", "minimum", "fmax", "fmin"}
)  # fmt: skip
_AT_ZERO = frozenset({"abs", "absolute", "relu", "leaky_relu", "sign", "sgn", "heaviside"})
_REDUCTIONS = frozenset(
    {"max", "min", "amax", "amin", "argmax", "argmin", "sort", "argsort", "topk", "kthvalue",
     "median", "nanmedian", "mode"}
)  # fmt: skip
_STEPS = frozenset({"floor", "ceil", "round", "trunc", "fix"})
_BOUNDS = {  # name -> (position and keyword of the lower bound, of the upper bound, defaults)
    "clamp": ((1, "min"), (2, "max"), (None, None)),
    "clip": ((1, "min"), (2, "max"), (None, None)),
    "clamp_min": ((1, "min"), (None, None), (None, None)),
    "clamp_max": ((None, None), (1, "max"), (None, None)),
    "threshold": ((1, "threshold"), (None, None), (None, None)),
    "hardtanh": ((1, "min_val"), (2, "max_val"), (-1.0, 1.0)),
    "relu6": ((None, None), (None, None), (0.0, 6.0)),
}
_TRACKED = _BINARY | _AT_ZERO | _REDUCTIONS | _STEPS | frozenset(_BOUNDS)


def _arg(args: tuple, kwargs: dict, position: int | None, keyword: str | None) -> Any:
    if position is not None and len(args) > position:
        return args[position]
    return kwargs.get(keyword) if keyword is not None else None


def _side(a: Any, b: Any = 0) -> torch.Tensor:
    """Per element, -1, 0 or 1 as ``a`` is below, at or above ``b`` (2 where undefined)."""
    return torch.sign(torch.as_tensor(a) - b).nan_to_num(2.0, 2.0, 2.0)


def _input_sides(name: str, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
    """The sides of an elementwise kink, from the inputs (before an in-place op changes them)."""
    x = _arg(args, kwargs, 0, "input")
    other = _arg(args, kwargs, 1, "other")
    if name in _BINARY or (name in ("max", "min") and isinstance(other, torch.Tensor)):
        return [_side(x, other)]
    if name in _AT_ZERO:
        return [_side(x)]
    if name in _BOUNDS:
        (lo_at, lo_kw), (hi_at, hi_kw), defaults = _BOUNDS[name]
        given = (_arg(args, kwargs, lo_at, lo_kw), _arg(args, kwargs, hi_at, hi_kw))
        bounds = [d if b is None else b for b, d in zip(given, defaults)]
        return [_side(x, b) for b in bounds if b is not None]
    return None


def _output_sides(name: str, args: tuple, kwargs: dict, out: Any) -> list[torch.Tensor]:
    """The sides of a reduction (the winning index) or a piecewise-constant op (its output)."""
    x = _arg(args, kwargs, 0, "input")
    if name in _STEPS or name.startswith("arg") or name not in _REDUCTIONS:
        return [out]  # (or an elementwise kink whose inputs cannot be subtracted: bools)
    if isinstance(out, tuple) and hasattr(out, "indices"):  # (values, indices)
        return [out.indices]
    if name in ("amax", "amin"):
        dim = _arg(args, kwargs, 1, "dim")
        return [x == getattr(torch, name)(x, () if dim is None else dim, keepdim=True)]
    return [x == out]  # a reduction to one value


def _wrapped(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)


class _Branches(TorchFunctionMode):
    """Records which side of every kink an evaluation is on (see ``finite_difference``).

    Inside a ``torch.func`` transform or ``torch.compile`` nothing is recorded.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sides: list[torch.Tensor] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "").strip("_")
        x = _arg(args, kwargs, 0, "input")
        track = (
            name in _TRACKED
            and isinstance(x, torch.Tensor)
            and not _wrapped(x)
            and not torch.compiler.is_compiling()
        )
        sides = None
        if track:
            try:
                sides = _input_sides(name, args, kwargs)
            except (RuntimeError, TypeError, ValueError):  # bool inputs, say: use the output
                sides = None
        out = func(*args, **kwargs)
        if track and sides is None and isinstance(out, torch.Tensor | tuple):
            try:
                sides = _output_sides(name, args, kwargs, out)
            except (RuntimeError, TypeError, ValueError):
                sides = [out] if isinstance(out, torch.Tensor) else []
        if sides:
            self.sides.extend(s.detach().clone() for s in sides)
        return out


_Point = tuple[float, tuple[torch.Tensor, ...] | None]


def _same_piece(a: _Point, b: _Point) -> bool:
    sa, sb = a[1], b[1]
    if sa is None or sb is None:
        return True
    return len(sa) == len(sb) and all(
        s.shape == t.shape and s.dtype == t.dtype and torch.equal(s, t) for s, t in zip(sa, sb)
    )


class FiniteDifference(NamedTuple):
    """The result of ``finite_difference``.

    Attributes:
        value: the directional derivative estimate (``nan`` where ``formula`` is ``"kink"``).
        formula: ``"central"``, ``"forward"``, ``"backward"`` or ``"kink"``.

    Examples:
        >>> from hypergrad.testing.check import FiniteDifference
        >>> FiniteDifference(2.0, "central").formula
        'central'
    """

    value: float
    formula: str


def _directional(
    point: Callable[[float], _Point], eps: float, origin: _Point | None = None
) -> FiniteDifference:
    """``point(t)`` evaluates ``f(x + t v)`` (value and sides); see ``finite_difference``."""
    h = eps
    f = {t: point(t) for t in (h / 2, -h / 2, h, -h)}

    def central(s: float) -> float:
        return (f[s][0] - f[-s][0]) / (2 * s)

    if all(p[1] is None for p in f.values()):
        return FiniteDifference((4 * central(h / 2) - central(h)) / 3, "central")
    f[0.0] = origin if origin is not None else point(0.0)
    if all(_same_piece(f[0.0], p) for p in f.values()):
        return FiniteDifference((4 * central(h / 2) - central(h)) / 3, "central")
    for sign, formula in ((1.0, "forward"), (-1.0, "backward")):
        if not (_same_piece(f[0.0], f[sign * h]) and _same_piece(f[0.0], f[sign * h / 2])):
            continue
        f[sign * h / 4] = point(sign * h / 4)
        if not _same_piece(f[0.0], f[sign * h / 4]):
            continue

        def one_sided(s: float, sign: float = sign) -> float:
            return sign * (f[sign * s][0] - f[0.0][0]) / s

        # Two Richardson steps: the one-sided difference's error is O(h), then O(h^2), O(h^3).
        r1 = [2 * one_sided(s / 2) - one_sided(s) for s in (h, h / 2)]
        return FiniteDifference((4 * r1[1] - r1[0]) / 3, formula)
    return FiniteDifference(math.nan, "kink")


def _evaluator(f: Callable[[Any], Any], kink_aware: bool) -> Callable[[Any], _Point]:
    def evaluate(x: Any) -> _Point:
        if not kink_aware:
            return float(f(x)), None
        recorder = _Branches()
        with recorder:
            value = f(x)
        return float(value), tuple(recorder.sides)

    return evaluate


def finite_difference(
    f: Callable[[Any], Any],
    x: PyTree,
    v: PyTree,
    eps: float = 1e-5,
    *,
    kink_aware: bool = True,
) -> FiniteDifference:
    """The directional derivative of ``f`` at ``x`` along ``v`` by finite differences.

    Smooth case: the central difference ``D(h) = (f(x + h v) - f(x - h v)) / (2 h)`` with one
    Richardson step, ``(4 D(eps / 2) - D(eps)) / 3`` (truncation error O(eps^4); 4
    evaluations), as [`check_hypergrad`][hypergrad.testing.check_hypergrad].

    Kinks: a function built from ``maximum``, ``clamp``, ``abs``, ``relu``, ``threshold``, a
    comparison (``x > 0``), a ``max`` reduction or ``round`` is only piecewise smooth. With
    ``kink_aware`` (the default) every evaluation runs under a ``TorchFunctionMode`` that
    records, for each call of such an op, which side of its kink each element is on (the sign
    of ``a - b`` for ``maximum(a, b)`` or ``a > b``, the winning index of a reduction, ...).
    Where the stencil ``x ± eps v, x ± eps/2 v`` records the same sides as ``x`` itself, the
    function is smooth along it and the central difference is used. Otherwise a kink lies
    within ``eps`` of ``x``, and the central difference is not a derivative of either piece:
    the one-sided difference on the side that stays on ``x``'s piece (points at ``eps``,
    ``eps / 2`` and ``eps / 4``, two Richardson steps, error O(eps^3)) is used; it is the
    derivative of the piece ``x`` is on, which is what autograd differentiates. Where neither
    side stays on it (``x`` is exactly at a tie, or kinks lie on both sides), ``value`` is
    ``nan`` and ``formula`` is ``"kink"``: no finite difference can check the derivative
    there. A reduction that breaks a tie by the index it returns (``max(dim=...)``) puts the
    tie on that index's piece, as its backward does.

    Limits: "same sides at the five points" is taken to mean "the same piece all along the
    stencil" (two kinks closer than ``eps / 4`` that are crossed and crossed back go unseen);
    every recorded op counts, including one whose result only feeds a check (a
    ``float(x.max())`` range check on a tensor whose elements tie turns every direction into a
    ``"kink"``); ops inside a ``torch.func`` transform or ``torch.compile`` are not recorded.

    Args:
        f: a function of a tree shaped like ``x`` returning a number or a one-element tensor.
        x: the point, a tree of floating-point tensors.
        v: the direction, a tree with ``x``'s structure.
        eps: the (larger) finite-difference step.
        kink_aware: record the kinks; ``False`` gives the plain central difference.

    Returns:
        A ``FiniteDifference`` ``(value, formula)``.

    Examples:
        ``relu(x - 1)`` has a kink at 1: at ``x = 1 + 1e-6`` the central stencil crosses it
        and the forward difference, which stays above it, gives the slope of the right piece.

        >>> from hypergrad.testing.check import finite_difference
        >>> f = lambda x: 3 * torch.relu(x - 1)
        >>> x, v = torch.tensor(1.0 + 1e-6, dtype=torch.float64), torch.tensor(1.0)
        >>> fd = finite_difference(f, x, v)
        >>> fd.formula, round(fd.value, 6)
        ('forward', 3.0)
        >>> round(finite_difference(f, x, v, kink_aware=False).value, 2)  # not a derivative
        1.85

        At the kink itself no finite difference is a derivative:

        >>> finite_difference(f, torch.tensor(1.0, dtype=torch.float64), v)
        FiniteDifference(value=nan, formula='kink')
    """
    with entered("hg.testing.finite_difference"):
        check_alike([x, v])
        _check_eps(eps)
    evaluate = _evaluator(f, kink_aware)

    def point(t: float) -> _Point:
        return evaluate(_tree.map(lambda a, b: a + t * b, x, v))

    with torch.no_grad():
        return _directional(point, eps)


def _check_eps(eps: Any) -> None:
    if not is_number(eps) or not eps > 0:
        raise ValueError(
            f"{caller()}: eps must be a positive number (the finite-difference step), got "
            f"{eps!r}. Pass e.g. eps=1e-5 for float64."
        )


def _double_leaf(x: Any) -> Any:
    return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _double(tree: Any) -> Any:
    return _tree.map(_double_leaf, tree)


def _double_batches(batches: Any, steps: int | None) -> tuple[Any, int]:
    source = Batches(batches, steps)
    fetched = [_double(source.copy_at(k)) for k in range(source.steps)]
    return (lambda k: fetched[k]), source.steps


def check_hypergrad(
    outer_loss: Callable[..., Any],
    inner_loss: Callable[..., Any],
    params: PyTree,
    opt: Optimizer,
    batches: Any,
    outer_batch: Any,
    *,
    aux: PyTree = None,
    method: str | Method = "reverse",
    wrt: str | Sequence[str] = ("aux",),
    buffers: PyTree = None,
    steps: int | None = None,
    directions: int = 3,
    eps: float = 1e-5,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    seed: int = 0,
    raise_on_failure: bool = True,
    kink_aware: bool = True,
) -> HypergradCheck:
    """Compare a method's hypergradient with central finite differences, in float64.

    Everything floating-point (params, aux, buffers, batches, outer batch, tensor
    hyperparameters) is cast to float64; the batches are fetched once so every evaluation sees
    the same data, and the same ``seed`` fixes the steps' random numbers (dropout). For each of
    ``directions`` random unit directions ``v`` in the space of the differentiated inputs, the
    analytic directional derivative ``<g, v>`` is compared with the central difference
    ``D(h) = (f(x + h v) - f(x - h v)) / (2 h)``, improved by one Richardson step,
    ``(4 D(eps / 2) - D(eps)) / 3``, where ``f`` is the outer loss after the unroll. Its
    truncation error is O(eps^4) rather than O(eps^2), which matters when the loss is stiff in an
    input (a small Adam or RMSprop ``eps``, say); cost: 4 unrolls per direction.

    Kinks (``kink_aware``, the default): the unrolls record which side of every kink
    (AMSGrad's ``maximum``, a ``relu`` or ``clamp`` in the losses, a comparison) each element is
    on, as ``finite_difference``. A direction whose central stencil crosses one is checked with
    the one-sided difference on the side that stays on the origin's smooth piece
    (``DirectionCheck.formula`` says which; one more unroll); one with a kink on both sides (an
    exact tie at the origin) is reported as ``"kink"`` and not counted, and a check none of
    whose directions could be formed does not pass. Cost: one more unroll per check.

    Biased methods (``"first_order"``, ``hg.Truncated(T < K)``) are expected to fail: the check
    measures their bias. ``hg.Implicit`` is checked against finite differences of the K-step
    unroll, i.e. of the converged solution when the K steps converge: choose K (and the
    solver's ``tol``) so that they do; the gap measures how far they are from it.

    Args:
        outer_loss: as [`hg.hypergrad`][hypergrad.hypergrad].
        inner_loss: as [`hg.hypergrad`][hypergrad.hypergrad].
        params: the initial params.
        opt: the optimizer.
        batches: the inner batches.
        outer_batch: the outer batch.
        aux: the auxiliary tree.
        method: the method to check.
        wrt: what to differentiate (as [`hg.hypergrad`][hypergrad.hypergrad]).
        buffers: the initial buffers.
        steps: K.
        directions: the number of random directions.
        eps: the finite-difference step (the larger of the two; see above).
        rtol: relative tolerance.
        atol: absolute tolerance.
        seed: seeds the directions and the steps' random numbers.
        raise_on_failure: raise ``AssertionError`` (with the report) when a direction fails.
        kink_aware: detect kinks within ``eps`` (see above); ``False`` gives the plain central
            difference everywhere.

    Returns:
        A [`HypergradCheck`][hypergrad.testing.HypergradCheck] report (``print`` it for a table).

    Raises:
        AssertionError: a direction is out of tolerance and ``raise_on_failure`` is true.

    Examples:
        >>> loss = lambda p, a, x: ((p["w"] - a * x) ** 2).sum()
        >>> report = hg.testing.check_hypergrad(
        ...     lambda p, a, y: (p["w"] ** 2).sum(), loss, {"w": torch.ones(2)},
        ...     hg.optim.sgd(lr=0.1, momentum=0.5), torch.randn(4, 2), None,
        ...     aux=torch.tensor(0.3), wrt=("aux", "lr"))
        >>> report.passed, len(report.directions)
        (True, 3)
    """
    with entered("hg.testing.check_hypergrad"):
        if directions < 1:
            raise ValueError(f"{caller()}: directions must be >= 1, got {directions}.")
        _check_eps(eps)
        check_opt(opt)
        params, aux, buffers = _double(params), _double(aux), _double(buffers)
        outer_batch = _double(outer_batch)
        batch_fn, steps = _double_batches(batches, steps)
        hp = {k: map_hyper(_double_leaf, v) for k, v in opt.hyperparams.items()}
        opt = dataclasses.replace(opt, hyperparams=hp)
        common = {"aux": aux, "buffers": buffers, "steps": steps, "seed": seed}
        g = hypergrad(
            outer_loss, inner_loss, params, opt, batch_fn, outer_batch,
            method=method, wrt=wrt, **common,
        )  # fmt: skip
        asked = {
            k: v
            for k, v in g._asdict().items()
            if k not in ("value", "solver", "trajectory") and v is not None
        }

        # attention's kernel as in the method's steps: the same dropout masks (_engine.kernels)
        math = not resolve(method).first_order

        def f(x: dict[str, PyTree]) -> float:  # the outer loss after the unroll, at x
            hyper = {**hp, **x.get("hyperparams", {})}
            x_aux = x.get("aux", aux)
            with math_attention(math), ranges_unchecked():  # a step may leave the range
                traj = unroll(inner_loss, x.get("params", params), opt, batch_fn,
                              hyperparams=hyper, check_finite=False,
                              **{**common, "aux": x_aux})  # fmt: skip
            outer = outer_fn(outer_loss, outer_batch, buffers is not None, math_attention=math)
            with seeded(seed + steps, rng_devices(params)):  # as Problem.value
                return float(outer(traj.params, traj.buffers, x_aux))

        origin = _origin(asked, {"aux": aux, "hyperparams": hp, "params": params})
        checks = _check_directions(f, origin, asked, directions, eps, seed, kink_aware)
        report = HypergradCheck(
            method=repr(method),
            wrt=(wrt,) if isinstance(wrt, str) else tuple(wrt),
            directions=tuple(checks),
            rtol=rtol,
            atol=atol,
            hypergradient=g,
        )
        if raise_on_failure and not report.passed:
            raise AssertionError(
                f"{caller()}: the hypergradient disagrees with finite differences.\n{report}"
            )
        return report


def _origin(asked: dict[str, PyTree], inputs: dict[str, PyTree]) -> dict[str, PyTree]:
    """The point the directions start from: the inputs that were differentiated (float64)."""
    origin: dict[str, PyTree] = {}
    if "aux" in asked:
        origin["aux"] = inputs["aux"]
    if "hyperparams" in asked:
        device = _tree.leaves(inputs["params"])[0].device
        origin["hyperparams"] = {
            k: map_hyper(
                lambda v: torch.as_tensor(v, dtype=torch.float64, device=device),
                inputs["hyperparams"][k],
            )
            for k in asked["hyperparams"]
        }
    if "params" in asked:
        origin["params"] = inputs["params"]
    return origin


def _check_directions(
    f: Callable[[Any], float],
    origin: dict[str, PyTree],
    asked: dict[str, PyTree],
    directions: int,
    eps: float,
    seed: int,
    kink_aware: bool,
) -> list[DirectionCheck]:
    """Each random unit direction: ``<g, v>`` against the finite difference of ``f`` along it."""
    flat_g, _ = _tree.ravel(asked)
    flat_x, unravel_x = _tree.ravel(origin)
    evaluate = _evaluator(f, kink_aware)
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same directions on any device
    checks = []
    with torch.no_grad():
        at_origin = evaluate(unravel_x(flat_x)) if kink_aware else None
        for _ in range(directions):
            v = torch.randn(flat_x.shape, generator=gen, dtype=torch.float64).to(flat_x.device)
            v = v / v.norm()

            def point(t: float, v: torch.Tensor = v) -> _Point:
                return evaluate(unravel_x(flat_x + t * v))

            numeric, formula = _directional(point, eps, at_origin)
            checks.append(DirectionCheck(float(flat_g @ v), numeric, formula))
    return checks

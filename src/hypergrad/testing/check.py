"""``check_hypergrad``: a method's hypergradient against central finite differences."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hypergrad import tree as _tree
from hypergrad.hypergradient import Hypergradient, hypergrad, map_hyper
from hypergrad.methods import Method
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree
from hypergrad.unroll import Batches, outer_fn, seeded, unroll

__all__ = ["DirectionCheck", "HypergradCheck", "check_hypergrad"]


@dataclasses.dataclass(frozen=True)
class DirectionCheck:
    """One random direction: the analytic and the finite-difference directional derivative.

    Examples:
        >>> d = hg.testing.DirectionCheck(analytic=1.0, numeric=1.000001)
        >>> round(d.abs_err, 9), round(d.rel_err, 9)
        (1e-06, 1e-06)
    """

    analytic: float
    numeric: float

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
        """Whether every direction is within tolerance."""
        return all(self.ok(d) for d in self.directions)

    @property
    def max_rel_err(self) -> float:
        """The largest relative error over the directions."""
        return max((d.rel_err for d in self.directions), default=0.0)

    def __str__(self) -> str:
        lines = [
            f"hypergradient check: method={self.method}, wrt={self.wrt}, "
            f"rtol={self.rtol:g}, atol={self.atol:g}: {'passed' if self.passed else 'FAILED'}",
            f"  {'dir':>3}  {'analytic':>22}  {'finite diff':>22}  {'rel err':>9}  ok",
        ]
        for i, d in enumerate(self.directions):
            lines.append(
                f"  {i:>3}  {d.analytic:>22.15g}  {d.numeric:>22.15g}  {d.rel_err:>9.2e}  "
                f"{'yes' if self.ok(d) else 'NO'}"
            )
        return "\n".join(lines)


def _double_leaf(x: Any) -> Any:
    return x.detach().double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _double(tree: Any) -> Any:
    return _tree.map(_double_leaf, tree)


def _double_batches(batches: Any, steps: int | None) -> tuple[Any, int]:
    source = Batches(batches, steps, caller="hg.testing.check_hypergrad")
    fetched = [_double(source.at(k)) for k in range(source.steps)]
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

    Biased methods (``"first_order"``, ``hg.Truncated(T < K)``) are expected to fail: the check
    measures their bias.

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
    caller = "hg.testing.check_hypergrad"
    if directions < 1:
        raise ValueError(f"{caller}: directions must be >= 1, got {directions}.")
    params, aux, buffers = _double(params), _double(aux), _double(buffers)
    outer_batch = _double(outer_batch)
    outer = outer_fn(outer_loss, outer_batch, buffers is not None, "hg.testing.check_hypergrad")
    batch_fn, steps = _double_batches(batches, steps)
    hp = {k: map_hyper(_double_leaf, v) for k, v in opt.hyperparams.items()}
    opt = dataclasses.replace(opt, hyperparams=hp)
    common = {"aux": aux, "buffers": buffers, "steps": steps, "seed": seed}
    g = hypergrad(
        outer_loss, inner_loss, params, opt, batch_fn, outer_batch,
        method=method, wrt=wrt, **common,
    )  # fmt: skip
    asked = {k: v for k, v in g._asdict().items() if k != "value" and v is not None}
    flat_g, _unravel = _tree.ravel(asked)

    def f(x: dict[str, PyTree]) -> float:
        hyper = {**hp, **x.get("hyperparams", {})}
        traj = unroll(
            inner_loss,
            x.get("params", params),
            opt,
            batch_fn,
            aux=x.get("aux", aux),
            buffers=buffers,
            steps=steps,
            hyperparams=hyper,
            seed=seed,
            check_finite=False,
        )
        with seeded(seed + steps):  # as Problem.value
            return float(outer(traj.params, traj.buffers, x.get("aux", aux)))

    origin: dict[str, PyTree] = {}
    if "aux" in asked:
        origin["aux"] = aux
    if "hyperparams" in asked:
        origin["hyperparams"] = {
            k: map_hyper(lambda v: torch.as_tensor(v, dtype=torch.float64), hp[k])
            for k in asked["hyperparams"]
        }
    if "params" in asked:
        origin["params"] = params
    flat_x, unravel_x = _tree.ravel(origin)
    gen = torch.Generator().manual_seed(seed)
    checks = []
    with torch.no_grad():
        for _ in range(directions):
            v = torch.randn(flat_x.shape, generator=gen, dtype=torch.float64)
            v = v / v.norm()

            def central(h: float, v: torch.Tensor = v) -> float:
                return (f(unravel_x(flat_x + h * v)) - f(unravel_x(flat_x - h * v))) / (2 * h)

            numeric = (4 * central(eps / 2) - central(eps)) / 3
            checks.append(DirectionCheck(float(flat_g @ v), numeric))
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
            f"{caller}: the hypergradient disagrees with finite differences.\n{report}"
        )
    return report

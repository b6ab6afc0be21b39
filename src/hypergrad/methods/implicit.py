"""Implicit differentiation: the hypergradient at a stationary point of the inner problem."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller, entered, is_number, positive_int
from hypergrad._engine.hyper import map_hyper
from hypergrad._engine.notices import torch_notices_hidden
from hypergrad._engine.problem import Carry, Problem, run_steps
from hypergrad._engine.randomness import seeded
from hypergrad.methods._base import (
    Method,
    MethodResult,
    finish,
    fresh_leaves,
    grad_or_none,
    leaf_inputs,
)
from hypergrad.methods._solvers import SOLVERS, Solve
from hypergrad.tree import PyTree

__all__ = ["Implicit", "ImplicitReport", "ImplicitWarning"]


class ImplicitWarning(UserWarning):
    """``hg.Implicit``'s assumptions do not hold: the params are far from stationary, or the
    linear solver did not converge. The hypergradient is returned, but may be inaccurate.

    Examples:
        >>> issubclass(hg.ImplicitWarning, UserWarning)
        True
    """


class ImplicitReport(NamedTuple):
    """How the implicit hypergradient was solved: ``Hypergradient.solver`` with ``hg.Implicit``.

    Attributes:
        solver: the solver's name (``"cg"``, ``"minres"`` or ``"neumann"``).
        iterations: the Hessian-vector products the solver made.
        residual: the solver's relative residual ``|H v - g| / |g|`` at the end.
        converged: whether ``residual <= tol`` was reached within ``maxiter``.
        stationarity: ``|F(params_K)| / |F(params_0)|``, the inner gradient's norm after training
            relative to the start (on the condition's batch; 0 is an exact stationary point).

    Examples:
        >>> inner = lambda p, a, x: ((p["w"] - a) ** 2).sum()
        >>> g = hg.hypergrad(lambda p, a, y: (p["w"] ** 2).sum(), inner, {"w": torch.zeros(1)},
        ...     hg.optim.sgd(lr=0.5), torch.zeros(2, 1), None, aux=torch.tensor(3.0),
        ...     method=hg.Implicit())
        >>> g.aux, g.solver.solver, g.solver.converged, g.solver.stationarity
        (tensor(6.), 'cg', True, 0.0)
    """

    solver: str
    iterations: int
    residual: float
    converged: bool
    stationarity: float


def _number(value: Any, name: str, *, low: float, strict: bool, inf: bool = False) -> float:
    ok = is_number(value) and (value > low if strict else value >= low)
    ok = ok and (math.isfinite(value) or (inf and value == math.inf))
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        kind = "a number" if inf else "a finite number"
        raise ValueError(f"{caller()}: {name} must be {kind} {bound}, got {value!r}.")
    return float(value)


class Implicit(Method):
    """Implicit differentiation at a stationary point (the implicit function theorem).

    Training runs as plain training (no graph). At the trained params ``p`` the stationarity
    condition ``F(p, aux) = 0`` holds, with ``F`` the gradient the optimizer steps along (the inner
    gradient, plus ``weight_decay * p`` for an L2 weight decay; see below), so
    ``dp/daux = -H^{-1} dF/daux`` with ``H = dF/dp``, the inner Hessian. The hypergradient is

        ``d outer/d aux = d_aux outer - (dF/daux)^T v``, where ``H v = d_p outer``,

    solved with Hessian-vector products (never a materialised Hessian), followed by one
    vector-Jacobian product of ``F``. ``F = torch.func.grad`` of the inner loss; a product is a
    double backward through its graph, recorded once and kept across the solver's iterations
    (``hvp="reverse"``), or ``torch.func.jvp`` of it (``hvp="forward"``, forward-over-reverse:
    nothing kept, each product recomputes the gradient; about 3x slower in eager PyTorch on a
    CPU MLP). It is exact when training has
    reached a stationary point of a twice-differentiable inner loss with ``H`` invertible, and
    independent of the optimizer: any family, momentum, learning rate or schedule gives the
    same answer for the same fixed point.

    What it can differentiate: ``aux`` and the hyperparameters that move the fixed point, which
    for the built-in families is only the L2 ``weight_decay`` (not AdamW's decoupled one). The
    learning rate, momentum, betas, eps, ... change how training gets to the fixed point, not
    where it is, and the initial params do not matter at a unique minimum: asking for them
    raises ``ValueError`` (use an unrolled method). For iMAML put the initial params in ``aux``
    with a proximal term ``lam / 2 * |p - aux|^2`` in the inner loss.

    The condition's batch: ``batch`` if given, else the batch of the last step. With
    mini-batch training pass the data training converged on (the full training set, say), for
    which ``F(p) = 0`` holds. With buffers the condition calls ``inner_loss`` with the final
    buffers as they are, drops the buffers it returns, and holds them constant (their own
    dependence on ``aux`` is not differentiated). With ``hg.Clients`` each client's condition is
    solved at its own final params (one block-diagonal system, vmapped), and the cotangent of the
    server's outer loss reaches every client through the aggregation; earlier rounds do not
    matter at the optimum.

    Honesty: the result's ``solver`` field is an [`ImplicitReport`][hypergrad.ImplicitReport]
    (iterations, residual, convergence, stationarity). A solver that stops above ``tol``, and
    params whose inner gradient is more than ``stationarity`` times its norm at the start, each
    give an [`hg.ImplicitWarning`][hypergrad.ImplicitWarning] with the numbers.

    Cost, with c one step of training and h one Hessian-vector product (``"reverse"``: a
    double backward, about 1.3 c; ``"forward"``: about 4 c): time ``K * c`` (plain training, no
    graph) plus ``I * h`` for I solver iterations plus about 4 c; memory ``O(P + A)`` (the
    graph of one inner gradient), independent of K.

    Args:
        solver: ``"cg"`` (conjugate gradients; a positive definite ``H``, i.e. a strict local
            minimum), ``"minres"`` (symmetric ``H`` that may be indefinite or singular: saddles,
            flat directions) or ``"neumann"`` (the truncated Neumann series
            ``alpha * sum_j (I - alpha H)^j g``; converges when the eigenvalues of ``alpha H``
            lie in (0, 2)).
        maxiter: the most Hessian-vector products the solver makes.
        tol: the solver stops at relative residual ``|H v - g| / |g| <= tol``.
        damping: solve ``(H + damping * I) v = g`` instead: regularises an ill-conditioned or
            singular ``H`` at the price of a bias.
        alpha: the Neumann series' step (``"neumann"`` only); it converges for ``alpha``
            below ``2 / lambda_max(H)``. ``None`` (default): ``1 / lambda``, with ``lambda``
            the top eigenvalue of ``H`` from a few power iterations (at most 20 products,
            counted in ``iterations``), which converges for any positive definite ``H``
            without tuning. A series that diverges (its residual grows) raises
            ``ValueError``: its partial sum is not an answer.
        batch: the batch of the stationarity condition (default: the last step's batch);
            with clients, stacked as the batches are.
        stationarity: warn when ``|F(params_K)| > stationarity * |F(params_0)|``;
            ``float("inf")`` turns the check off (a warm start at the optimum, where training
            has nothing left to reduce).
        hvp: how a Hessian-vector product is taken: ``"reverse"`` (default) or ``"forward"``
            (see above; the same numbers).

    Examples:
        Ridge regression ``min_w |X w - y|^2 / 2 + aux / 2 * |w|^2``: at its solution
        ``w = (X^T X + aux I)^{-1} X^T y``, and the hypergradient of a validation loss
        with respect to ``aux`` (checked against the closed form):

        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        >>> inner = lambda p, lam, b: ((b[0] @ p["w"] - b[1]) ** 2).sum() / 2 + lam / 2 * (
        ...     p["w"] ** 2).sum()
        >>> outer = lambda p, lam, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()
        >>> batches = (X.expand(300, 20, 3), y.expand(300, 20))  # 300 full-batch steps
        >>> lam = torch.tensor(1.0, dtype=torch.float64)
        >>> g = hg.hypergrad(outer, inner, {"w": torch.zeros(3, dtype=torch.float64)},
        ...     hg.optim.sgd(lr=0.02), batches, (X, y), aux=lam, method=hg.Implicit(tol=1e-10))
        >>> exact = torch.func.grad(lambda l: outer(
        ...     {"w": torch.linalg.solve(X.T @ X + l * torch.eye(3), X.T @ y)}, l, (X, y)))(lam)
        >>> bool(torch.isclose(g.aux, exact, rtol=1e-8)), g.solver.iterations
        (True, 3)
    """

    name = "implicit"
    fixed_point = True
    spans_processes = False  # each rank would solve for its own clients only: not yet exact

    def __init__(
        self,
        solver: str = "cg",
        *,
        maxiter: int = 100,
        tol: float = 1e-6,
        damping: float = 0.0,
        alpha: float | None = None,
        batch: Any = None,
        stationarity: float = 1e-2,
        hvp: str = "reverse",
    ) -> None:
        with entered("hg.Implicit"):
            if solver not in SOLVERS:
                raise ValueError(
                    f"{caller()}: unknown solver {solver!r}; use 'cg' (positive definite "
                    "Hessian), 'minres' (symmetric, possibly indefinite) or 'neumann'."
                )
            self.solver = solver
            self.maxiter = positive_int(maxiter, "maxiter", "(the most Hessian-vector products)")
            self.tol = _number(tol, "tol", low=0.0, strict=True)
            self.damping = _number(damping, "damping", low=0.0, strict=False)
            self.alpha = None if alpha is None else _number(alpha, "alpha", low=0.0, strict=True)
            self.stationarity = _number(
                stationarity, "stationarity", low=0.0, strict=True, inf=True
            )
            self.batch = batch
            if hvp not in ("reverse", "forward"):
                raise ValueError(
                    f"{caller()}: hvp must be 'reverse' (a double backward through the "
                    "condition's graph, kept across products) or 'forward' (torch.func.jvp of "
                    f"it, forward-over-reverse), got {hvp!r}."
                )
            self.hvp = hvp

    def validate(self, problem: Problem) -> None:
        condition = problem.condition
        if condition is None:  # pragma: no cover - every entry point builds one
            raise ValueError(f"{caller()}: {self!r} needs the problem's stationarity condition.")
        if condition.obstacle is not None:
            raise ValueError(f"{caller()}: {self!r} cannot be used here: {condition.obstacle}")
        if "params" in problem.targets:
            raise ValueError(
                f"{caller()}: {self!r} has no gradient with respect to the initial params: at a "
                "(unique) stationary point the trained params do not depend on where training "
                "started. Use method='reverse' or hg.Checkpointed(...) for MAML, or, as iMAML, "
                "pass the initial params as aux with a proximal term lam / 2 * |p - aux|^2 in "
                "inner_loss; or drop 'params' from wrt."
            )
        fixed = [n for n in problem.hyper_names if n not in condition.hyperparams]
        if fixed:
            entering = " and ".join(condition.hyperparams) or "none of them"
            raise ValueError(
                f"{caller()}: {self!r} has no gradient with respect to {', '.join(fixed)}: "
                "they decide how training reaches its fixed point, not where it lies, and the "
                "implicit hypergradient differentiates only the fixed point (of the optimizer's "
                f"hyperparameters, {entering} moves it). Use method='reverse' or "
                "hg.Checkpointed(...) for them, or drop them from wrt (e.g. wrt=('aux',))."
            )

    def __call__(self, problem: Problem) -> MethodResult:
        condition = problem.condition
        assert condition is not None
        inputs = leaf_inputs(problem)
        start, aux, hp = problem.bind(inputs.trees)
        with torch.no_grad():  # plain training: no graph
            carry, losses = run_steps(problem, start, aux, hp, 0, problem.steps, donate=True)
        carry = Carry(*(_tree.detach(t) for t in carry))
        batch = self.batch if self.batch is not None else condition.batch_at(problem.steps - 1)
        fixed_aux = _tree.detach(aux)
        fixed_hp = {k: map_hyper(_detached, v) for k, v in hp.items()}

        def residual(params: PyTree, aux: PyTree = fixed_aux, hp: Any = fixed_hp) -> PyTree:
            with seeded(problem.seed + problem.steps - 1, problem.devices):
                return condition.residual(params, carry.buffers, aux, hp, batch)

        with torch_notices_hidden():
            at_tree, _, at = fresh_leaves(carry.params)  # params: floating-point leaves only
            spec = optree.tree_structure(carry.params, namespace=_tree._NAMESPACE)
            with torch.enable_grad():  # F at params_K, its graph kept for the products
                moved = _tree.leaves(residual(at_tree, aux, hp))
            ratio = self._check_stationary(residual, moved, condition.start(problem.params))
            value, direct, cotangent = _outer_grads(problem, carry, aux, inputs.leaves)
            if self.hvp == "reverse":
                hvp = _reverse_hvp(moved, at, spec)
            else:
                hvp = _forward_hvp(residual, carry.params)
            solve, x = self._solve(hvp, cotangent)
            through = grad_or_none(moved, inputs.leaves, _tree.leaves(x))
        grads = [_minus(d, t) for d, t in zip(direct, through)]
        report = ImplicitReport(
            self.solver, solve.iterations, solve.residual, solve.converged, ratio
        )
        return finish(inputs, grads, value, losses, carry)._replace(report=report)

    def _check_stationary(self, residual: Any, moved: list[torch.Tensor], params0: PyTree) -> float:
        """``|F(params_K)| / |F(params_0)|``, with a warning above ``self.stationarity``."""
        end = float(_tree.norm([x.detach() for x in moved]))
        begin = float(_tree.norm(residual(_tree.detach(params0))))
        ratio = end / begin if begin > 0 else (0.0 if end == 0 else math.inf)
        if ratio > self.stationarity:
            warnings.warn(
                f"{caller()}: {self!r} assumes the trained params are a stationary point of the "
                f"inner loss, but its gradient norm is {end:.3g}, {ratio:.3g} times its norm "
                f"{begin:.3g} at the start (above stationarity={self.stationarity:g}); the "
                "hypergradient may be far off. Train longer or with a larger learning rate, "
                "pass hg.Implicit(batch=...) with the data training converges on, or use an "
                "unrolled method (method='reverse').",
                ImplicitWarning,
                stacklevel=5,
            )
        return ratio

    def _solve(self, hvp: Callable[[PyTree], PyTree], rhs: PyTree) -> tuple[Solve, PyTree]:
        """``(H + damping I) v = rhs``, given ``v -> H v``; the solve and ``v`` as a tree."""
        flatten, unflatten = _flat_space(rhs)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            out = flatten(hvp(unflatten(v)))
            return out if self.damping == 0 else out.add_(v, alpha=self.damping)

        solve = SOLVERS[self.solver](
            matvec, flatten(rhs), maxiter=self.maxiter, tol=self.tol, alpha=self.alpha
        )
        if solve.diverged:
            raise ValueError(
                f"{caller()}: {self!r} diverged after {solve.iterations} Hessian-vector "
                f"products ({solve.note}; relative residual {solve.residual:.3g}), so its "
                "partial sum is not the hypergradient. Leave alpha=None (it is then chosen from "
                "the Hessian's top eigenvalue), pass a smaller alpha, or use solver='cg' "
                "('minres' if the Hessian may be indefinite)."
            )
        if not solve.converged:
            why = f" ({solve.note})" if solve.note else ""
            warnings.warn(
                f"{caller()}: {self!r} did not converge: relative residual {solve.residual:.3g} "
                f"after {solve.iterations} Hessian-vector products (tol={self.tol:g}){why}. "
                f"{_advice(self.solver)}",
                ImplicitWarning,
                stacklevel=5,
            )
        return solve, unflatten(solve.x)

    def __repr__(self) -> str:
        args = [repr(self.solver)] if self.solver != "cg" else []
        defaults = {"maxiter": 100, "tol": 1e-6, "damping": 0.0, "alpha": None, "hvp": "reverse"}
        args += [f"{k}={getattr(self, k)!r}" for k, d in defaults.items() if getattr(self, k) != d]
        return f"hg.Implicit({', '.join(args)})"


def _advice(solver: str) -> str:
    if solver == "neumann":
        return (
            "The Neumann series converges slowly on an ill-conditioned Hessian; use "
            "solver='cg' (or 'minres'), more maxiter, or damping > 0."
        )
    if solver == "cg":
        return (
            "Raise maxiter, add damping > 0 for an ill-conditioned Hessian, or use "
            "solver='minres' if the params are not at a strict minimum."
        )
    return "Raise maxiter, or add damping > 0 for an ill-conditioned or singular Hessian."


def _flat_space(
    like: PyTree,
) -> tuple[Callable[[PyTree], torch.Tensor], Callable[[torch.Tensor], PyTree]]:
    """``(flatten, unflatten)`` between trees like ``like`` and one 1-d vector the solvers use.

    ``hg.tree.ravel`` of the tree cast to the leaves' promoted dtype (on the first leaf's
    device); ``unflatten`` casts each leaf back. Every leaf is a floating-point tensor (the
    params' gradient).
    """
    leaves = _tree.leaves(like)
    dtypes = [x.dtype for x in leaves]
    dtype = functools.reduce(torch.promote_types, dtypes) if leaves else torch.get_default_dtype()
    device = leaves[0].device if leaves else torch.device("cpu")

    def flatten(tree: PyTree) -> torch.Tensor:
        return _tree.ravel(_tree.map(lambda x: x.to(dtype=dtype, device=device), tree))[0]

    _, unravel = _tree.ravel(_tree.map(lambda x: x.to(dtype=dtype, device=device), like))

    def unflatten(vector: torch.Tensor) -> PyTree:
        return _tree.map(lambda v, x: v.to(dtype=x.dtype, device=x.device), unravel(vector), like)

    return flatten, unflatten


def _reverse_hvp(
    moved: list[torch.Tensor], at: list[torch.Tensor], spec: Any
) -> Callable[[PyTree], PyTree]:
    """``v -> H v`` as a double backward through the graph of ``F`` at ``at``, kept for reuse."""
    live = [i for i, f in enumerate(moved) if f.requires_grad]

    def hvp(v: PyTree) -> PyTree:
        vs = spec.flatten_up_to(v)
        if not live:  # F does not depend on the params: H = 0
            return _tree.zeros_like(v)
        out = torch.autograd.grad(
            [moved[i] for i in live], at, grad_outputs=[vs[i] for i in live],
            retain_graph=True, allow_unused=True, materialize_grads=True,
        )  # fmt: skip
        return optree.tree_unflatten(spec, list(out))

    return hvp


def _forward_hvp(
    residual: Callable[[PyTree], PyTree], params: PyTree
) -> Callable[[PyTree], PyTree]:
    """``v -> H v`` as ``torch.func.jvp`` of ``F`` (forward-over-reverse; nothing kept)."""
    return lambda v: torch.func.jvp(residual, (params,), (v,))[1]


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _minus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if b is None:
        return a
    return -b if a is None else a - b


def _outer_grads(
    problem: Problem, carry: Carry, aux: PyTree, leaves: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor | None], PyTree]:
    """The outer value, its direct gradient for each input leaf, and its gradient at params_K."""
    at_tree, _, at = fresh_leaves(carry.params)
    spec = optree.tree_structure(carry.params, namespace=_tree._NAMESPACE)
    with torch.enable_grad():
        value = problem.value(Carry(at_tree, carry.state, carry.buffers), aux)
    grads = grad_or_none([value], at + leaves)
    cotangent = [torch.zeros_like(x) if g is None else g for x, g in zip(at, grads)]
    return value.detach(), grads[len(at) :], optree.tree_unflatten(spec, cotangent)

"""Linear solvers over pytrees for ``A x = b``, given only ``x -> A x`` (Hessian-vector products).

Each takes ``matvec``, the right-hand side ``b`` (a tree), ``maxiter`` and ``tol`` and stops when
the residual ``|b - A x|`` falls to ``tol * |b|`` or after ``maxiter`` products with ``A``:

- ``cg``: conjugate gradients, for symmetric positive definite ``A`` (a Hessian at a strict
  minimum); stops early on a direction of non-positive curvature.
- ``minres``: MINRES (Paige and Saunders, 1975), for symmetric ``A`` that may be indefinite or
  singular (a Hessian at a saddle, or along flat directions); it minimises the residual.
- ``neumann``: the truncated Neumann series ``x = alpha * sum_j (I - alpha A)^j b``
  (Lorraine et al., 2020), which converges when every eigenvalue of ``alpha A`` is in (0, 2).

The residual they report is the recurrence's (exact in exact arithmetic). Tree maths from
``hypergrad.tree``; one device sync per iteration (the stopping test).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from hypergrad import tree as _tree
from hypergrad.tree import PyTree

__all__ = ["SOLVERS", "Solve", "cg", "minres", "neumann"]

MatVec = Callable[[PyTree], PyTree]


class Solve(NamedTuple):
    """A solver's outcome: the solution, products with ``A`` made, relative residual, verdict."""

    x: PyTree
    iterations: int
    residual: float
    converged: bool
    note: str = ""


def _axpy(a: torch.Tensor | float, x: PyTree, y: PyTree) -> PyTree:
    """``a * x + y``."""
    return _tree.add(_tree.scale(x, a), y)


def cg(matvec: MatVec, b: PyTree, *, maxiter: int, tol: float, alpha: float = 1.0) -> Solve:
    """Conjugate gradients from ``x = 0`` (``alpha`` unused).

    Examples:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> out = cg(lambda v: {"w": A @ v["w"]}, {"w": torch.tensor([1.0, 2.0])}, maxiter=10,
        ...          tol=1e-6)
        >>> out.x["w"], out.iterations, out.converged
        (tensor([0.0909, 0.6364]), 2, True)
    """
    x = _tree.zeros_like(b)
    r, p = b, b
    rs = _tree.vdot(r, r)
    scale = math.sqrt(float(rs))
    if scale == 0.0:
        return Solve(x, 0, 0.0, True)
    residual = 1.0
    for it in range(1, maxiter + 1):
        ap = matvec(p)
        curvature = _tree.vdot(p, ap)
        if not float(curvature) > 0:
            return Solve(x, it, residual, False, "negative curvature: the system is not positive "
                         "definite")  # fmt: skip
        step = rs / curvature
        x = _axpy(step, p, x)
        r = _axpy(-step, ap, r)
        rs_new = _tree.vdot(r, r)
        residual = math.sqrt(float(rs_new)) / scale
        if residual <= tol:
            return Solve(x, it, residual, True)
        p = _axpy(rs_new / rs, p, r)
        rs = rs_new
    return Solve(x, maxiter, residual, False)


def neumann(matvec: MatVec, b: PyTree, *, maxiter: int, tol: float, alpha: float = 1.0) -> Solve:
    """The truncated Neumann series ``alpha * sum_j (I - alpha A)^j b``, one product per term.

    Examples:
        >>> A = torch.tensor([[1.0, 0.2], [0.2, 0.5]])
        >>> out = neumann(lambda v: {"w": A @ v["w"]}, {"w": torch.tensor([1.0, 2.0])},
        ...               maxiter=200, tol=1e-6)
        >>> out.x["w"], out.converged
        (tensor([0.2174, 3.9130]), True)
    """
    x = _tree.zeros_like(b)
    r = b  # r = b - A x, kept by r <- r - alpha A r
    scale = float(_tree.norm(b))
    if scale == 0.0:
        return Solve(x, 0, 0.0, True)
    residual = 1.0
    for it in range(1, maxiter + 1):
        x = _axpy(alpha, r, x)
        r = _axpy(-alpha, matvec(r), r)
        residual = float(_tree.norm(r)) / scale
        if residual <= tol:
            return Solve(x, it, residual, True)
        if not residual < 1e8:  # the series diverges (or overflowed): stop early
            return Solve(x, it, residual, False, "the series diverges: alpha * A has an "
                         "eigenvalue outside (0, 2)")  # fmt: skip
    return Solve(x, maxiter, residual, False)


def minres(matvec: MatVec, b: PyTree, *, maxiter: int, tol: float, alpha: float = 1.0) -> Solve:
    """MINRES from ``x = 0`` for symmetric, possibly indefinite ``A`` (``alpha`` unused).

    Examples:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, -1.0]])  # indefinite
        >>> out = minres(lambda v: {"w": A @ v["w"]}, {"w": torch.tensor([1.0, 1.0])},
        ...              maxiter=10, tol=1e-6)
        >>> out.x["w"], out.converged
        (tensor([ 0.5000, -1.0000]), True)
    """
    x = _tree.zeros_like(b)
    beta1 = float(_tree.norm(b))
    if beta1 == 0.0:
        return Solve(x, 0, 0.0, True)
    # Lanczos vectors (r1, r2 = y), the QR factorisation's last rotation (cs, sn), the two
    # previous search directions (w1, w2) and the residual norm (phibar).
    r1 = r2 = y = b
    beta, old_beta, dbar, epsilon, phibar = beta1, 0.0, 0.0, 0.0, beta1
    cs, sn = -1.0, 0.0
    w = w2 = _tree.zeros_like(b)
    residual = 1.0
    for it in range(1, maxiter + 1):
        v = _tree.scale(y, 1.0 / beta)
        y = matvec(v)
        if it >= 2:
            y = _axpy(-beta / old_beta, r1, y)
        alfa = float(_tree.vdot(v, y))
        y = _axpy(-alfa / beta, r2, y)
        r1, r2 = r2, y
        old_beta, beta = beta, float(_tree.norm(y))
        old_epsilon = epsilon
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsilon, dbar = sn * beta, -cs * beta
        gamma = max(math.hypot(gbar, beta), 1e-300)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = _tree.scale(_tree.sub(_axpy(-old_epsilon, w1, v), _tree.scale(w2, delta)), 1 / gamma)
        x = _axpy(phi, w, x)
        residual = phibar / beta1
        if residual <= tol:
            return Solve(x, it, residual, True)
        if beta == 0.0:  # the Krylov space is exhausted: x is the least-squares solution
            return Solve(x, it, residual, False, "the system is singular and b is not in the "
                         "range of A")  # fmt: skip
    return Solve(x, maxiter, residual, False)


SOLVERS: dict[str, Callable[..., Solve]] = {"cg": cg, "neumann": neumann, "minres": minres}

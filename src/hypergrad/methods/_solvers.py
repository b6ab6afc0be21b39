"""Linear solvers for ``A x = b`` on one flat vector, given only ``x -> A x`` (Hessian-vector products).

Each takes ``matvec``, the right-hand side ``b`` (a 1-d tensor), ``maxiter`` and ``tol`` and stops
when the residual ``|b - A x|`` falls to ``tol * |b|`` or after ``maxiter`` products with ``A``:

- ``cg``: conjugate gradients, for symmetric positive definite ``A`` (a Hessian at a strict
  minimum); stops early on a direction of non-positive curvature.
- ``minres``: MINRES (Paige and Saunders, 1975), for symmetric ``A`` that may be indefinite or
  singular (a Hessian at a saddle, or along flat directions); it minimises the residual.
- ``neumann``: the truncated Neumann series ``x = alpha * sum_j (I - alpha A)^j b``
  (Lorraine et al., 2020), which converges when every eigenvalue of ``alpha A`` is in (0, 2);
  by default ``alpha`` is one over the top eigenvalue from a few power iterations, and a
  residual that grows stops it as divergent.

The residual they report is the recurrence's (exact in exact arithmetic). The vectors are
updated in place (``matvec`` returns a new vector each call, and ``b`` is never written), and
the scalars of the recurrences are Python floats: one device sync per iteration for the
stopping test, as before, and a few vector passes per product. ``hg.Implicit`` flattens the
params' tree into the one vector (``hypergrad.methods.implicit``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["SOLVERS", "Solve", "cg", "minres", "neumann", "top_eigenvalue"]

MatVec = Callable[[torch.Tensor], torch.Tensor]


class Solve(NamedTuple):
    """A solver's outcome: the solution, products with ``A`` made, relative residual, verdict."""

    x: torch.Tensor
    iterations: int
    residual: float
    converged: bool
    note: str = ""
    diverged: bool = False


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b))


def cg(
    matvec: MatVec, b: torch.Tensor, *, maxiter: int, tol: float, alpha: float | None = None
) -> Solve:
    """Conjugate gradients from ``x = 0`` (``alpha`` unused).

    Examples:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> out = cg(lambda v: A @ v, torch.tensor([1.0, 2.0]), maxiter=10, tol=1e-6)
        >>> out.x, out.iterations, out.converged
        (tensor([0.0909, 0.6364]), 2, True)
    """
    x = torch.zeros_like(b)
    rs = _dot(b, b)
    scale = math.sqrt(rs)
    if scale == 0.0:
        return Solve(x, 0, 0.0, True)
    r, p = b.clone(), b.clone()
    residual = 1.0
    for it in range(1, maxiter + 1):
        ap = matvec(p)
        curvature = _dot(p, ap)
        if not curvature > 0:
            return Solve(x, it, residual, False, "negative curvature: the system is not positive "
                         "definite")  # fmt: skip
        step = rs / curvature
        x.add_(p, alpha=step)
        r.add_(ap, alpha=-step)
        rs_new = _dot(r, r)
        residual = math.sqrt(rs_new) / scale
        if residual <= tol:
            return Solve(x, it, residual, True)
        p.mul_(rs_new / rs).add_(r)
        rs = rs_new
    return Solve(x, maxiter, residual, False)


def top_eigenvalue(matvec: MatVec, b: torch.Tensor, *, iterations: int = 20) -> tuple[float, int]:
    """The largest eigenvalue of ``A`` that ``b`` reaches, by power iteration from ``b``.

    Returns the Rayleigh quotient of the last iterate (never above the largest eigenvalue of a
    symmetric ``A``) and the products made: it stops when the quotient moves by less than 1e-3
    relative, or after ``iterations`` products.

    Examples:
        >>> A = torch.diag(torch.tensor([0.5, 1.0, 3.0]))
        >>> value, used = top_eigenvalue(lambda v: A @ v, torch.ones(3))
        >>> round(value, 2), used < 20
        (3.0, True)
    """
    v = b / torch.linalg.vector_norm(b)
    value = 0.0
    for it in range(1, iterations + 1):
        w = matvec(v)
        new = _dot(v, w)
        norm = float(torch.linalg.vector_norm(w))
        if norm == 0.0 or not math.isfinite(norm):
            return new, it
        if it > 1 and abs(new - value) <= 1e-3 * abs(new):
            return new, it
        value, v = new, w.div_(norm)
    return value, iterations


def neumann(
    matvec: MatVec, b: torch.Tensor, *, maxiter: int, tol: float, alpha: float | None = None
) -> Solve:
    """The truncated Neumann series ``alpha * sum_j (I - alpha A)^j b``, one product per term.

    ``alpha=None``: ``1 / lambda``, with ``lambda`` the top eigenvalue of ``A`` that ``b``
    reaches, from a few power iterations (``top_eigenvalue``; their products count in
    ``iterations``): then ``alpha * A`` has its eigenvalues in (0, 1] and the series converges
    for any positive definite ``A``. For symmetric ``A`` the residual ``(I - alpha A)^j b``
    never grows while the series converges, so a residual that grows proves that it diverges:
    the solve stops there with ``diverged=True``.

    Examples:
        >>> A = torch.tensor([[1.0, 0.2], [0.2, 0.5]])
        >>> out = neumann(lambda v: A @ v, torch.tensor([1.0, 2.0]), maxiter=200, tol=1e-6)
        >>> out.x, out.converged
        (tensor([0.2174, 3.9130]), True)
        >>> neumann(lambda v: A @ v, torch.tensor([1.0, 2.0]), maxiter=200, tol=1e-6,
        ...         alpha=2.0).diverged
        True
    """
    x = torch.zeros_like(b)
    scale = float(torch.linalg.vector_norm(b))
    if scale == 0.0:
        return Solve(x, 0, 0.0, True)
    used = 0
    if alpha is None:
        top, used = top_eigenvalue(matvec, b)
        if not top > 0:
            return Solve(x, used, 1.0, False, f"the Hessian's top eigenvalue is {top:.3g}, not "
                         "positive: the series diverges for every alpha", diverged=True)  # fmt: skip
        alpha = 1.0 / top
    r = b.clone()  # r = b - A x, kept by r <- r - alpha A r
    residual = best = 1.0
    for it in range(used + 1, used + maxiter + 1):
        x.add_(r, alpha=alpha)
        r.add_(matvec(r), alpha=-alpha)
        residual = float(torch.linalg.vector_norm(r)) / scale
        if residual <= tol:
            return Solve(x, it, residual, True)
        if not residual <= 2 * best:  # grew (or overflowed): the series diverges
            return Solve(x, it, residual, False, f"the series diverges: alpha={alpha:.3g} "
                         "times the Hessian has an eigenvalue outside (0, 2)", diverged=True)  # fmt: skip
        best = min(best, residual)
    return Solve(x, used + maxiter, residual, False)


def minres(
    matvec: MatVec, b: torch.Tensor, *, maxiter: int, tol: float, alpha: float | None = None
) -> Solve:
    """MINRES from ``x = 0`` for symmetric, possibly indefinite ``A`` (``alpha`` unused).

    Examples:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, -1.0]])  # indefinite
        >>> out = minres(lambda v: A @ v, torch.tensor([1.0, 1.0]), maxiter=10, tol=1e-6)
        >>> out.x, out.converged
        (tensor([ 0.5000, -1.0000]), True)
    """
    x = torch.zeros_like(b)
    beta1 = float(torch.linalg.vector_norm(b))
    if beta1 == 0.0:
        return Solve(x, 0, 0.0, True)
    # Normalised Lanczos vectors (v_prev, v; beta is the norm v had before normalising), the QR
    # factorisation's last rotation (cs, sn), the two previous search directions (w1, w2, two
    # buffers in turn) and the residual norm (phibar).
    v_prev, v = None, b / beta1
    beta, dbar, epsilon, phibar = beta1, 0.0, 0.0, beta1
    cs, sn = -1.0, 0.0
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    residual = 1.0
    for it in range(1, maxiter + 1):
        y = matvec(v)  # a new vector: written in place below, then the next v
        if v_prev is not None:
            y.add_(v_prev, alpha=-beta)
        alfa = _dot(v, y)
        y.add_(v, alpha=-alfa)
        beta = float(torch.linalg.vector_norm(y))
        old_epsilon = epsilon
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsilon, dbar = sn * beta, -cs * beta
        gamma = max(math.hypot(gbar, beta), 1e-300)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        # the new direction (v - old_epsilon w1 - delta w2) / gamma, written over w1 (used up)
        w = w1.mul_(-old_epsilon).add_(v).add_(w2, alpha=-delta).div_(gamma)
        x.add_(w, alpha=phi)
        residual = phibar / beta1
        if residual <= tol:
            return Solve(x, it, residual, True)
        if beta == 0.0:  # the Krylov space is exhausted: x is the least-squares solution
            return Solve(x, it, residual, False, "the system is singular and b is not in the "
                         "range of A")  # fmt: skip
        v_prev, v = v, y.div_(beta)
    return Solve(x, maxiter, residual, False)


SOLVERS: dict[str, Callable[..., Solve]] = {"cg": cg, "neumann": neumann, "minres": minres}

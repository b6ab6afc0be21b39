"""Truncated backpropagation: differentiate only the last T steps."""

from __future__ import annotations

from hypergrad._boundary import caller, entered, positive_int
from hypergrad._engine.problem import Problem
from hypergrad.methods._base import Method, MethodResult
from hypergrad.methods.reverse import Reverse, reverse_from

__all__ = ["Truncated"]


class Truncated(Method):
    """Backpropagate through the last ``T`` steps only (Shaban et al., 2019).

    The first ``K - T`` steps run without a meta-graph and their outcome is treated as a
    constant, so the result is a biased hypergradient (exact when ``T >= K``, where it equals
    ``"reverse"``). The initial parameters do not reach the outer loss through the last T steps,
    so ``wrt="params"`` with ``T < K`` raises instead of returning a silent zero.

    Cost: time ``(K - T) * c`` (no graph) plus ``T * c`` forward and ``T * (2 to 3) * c``
    backward; memory ``O(T * A + P)``, independent of K.

    Args:
        steps: T, the number of final steps to differentiate (a positive int).

    Examples:
        >>> loss = lambda p, a, x: ((p["w"] - x) ** 2).sum()
        >>> args = (lambda p, a, y: (p["w"] ** 2).sum(), loss, {"w": torch.ones(1)},
        ...     hg.optim.sgd(lr=0.1), torch.zeros(3, 1), None)
        >>> hg.hypergrad(*args, method=hg.Truncated(3), wrt=("lr",)).hyperparams["lr"]
        tensor(-3.9322)
        >>> hg.hypergrad(*args, method=hg.Truncated(1), wrt=("lr",)).hyperparams["lr"]
        tensor(-1.3107)
    """

    name = "truncated"
    reverse_mode = True

    def __init__(self, steps: int) -> None:
        with entered("hg.Truncated"):
            self.steps = positive_int(
                steps, "steps", "(the number of final steps to differentiate)"
            )

    def validate(self, problem: Problem) -> None:
        if "params" in problem.targets and self.steps < problem.steps:
            raise ValueError(
                f"{caller()}: hg.Truncated({self.steps}) cannot differentiate with respect to the "
                f"initial params: with {problem.steps} steps, the first "
                f"{problem.steps - self.steps} run without a graph, so the gradient would be "
                f"silently zero. Use hg.Truncated({problem.steps}), method='reverse' or "
                "hg.Checkpointed(...), or drop 'params' from wrt."
            )

    def __call__(self, problem: Problem) -> MethodResult:
        return reverse_from(problem, max(problem.steps - self.steps, 0))

    def restricted(self, first: int, last: int, total: int) -> tuple[Method | None, bool]:
        """The last ``T`` steps of ``total`` that fall in ``[first, last)``.

        Examples:
            >>> [hg.Truncated(3).restricted(lo, lo + 2, 6) for lo in (0, 2, 4)]
            [(None, False), (hg.Truncated(1), False), ("reverse", True)]
        """
        start = total - self.steps  # the first differentiated step
        if start <= first:  # the whole range, and on into its start unless the window opens there
            return Reverse(), first > start or start <= 0
        if start >= last:
            return None, False
        return Truncated(last - start), False

    def __repr__(self) -> str:
        return f"hg.Truncated({self.steps})"

"""First order: backpropagation through the updates with the inner gradients held constant."""

from __future__ import annotations

from hypergrad._engine.problem import Problem
from hypergrad.methods._base import Method, MethodResult
from hypergrad.methods.reverse import reverse_from

__all__ = ["FirstOrder"]


class FirstOrder(Method):
    """``"first_order"``: reverse mode through a step whose inner gradient is detached.

    This drops every second-order term (the Hessian and mixed second derivatives of the inner
    loss), as first-order MAML does. **The result is biased**: it is not the hypergradient, and
    it is identically zero for an ``aux`` that enters only the inner loss. Use it for a cheap
    direction with respect to hyperparameters or initial parameters, never to check exactness.

    Cost: time about ``K * c`` forward plus ``K * c_update`` backward (no second-order pass);
    memory ``O(K * P)`` (the chain of updates only, no activations).

    Examples:
        >>> loss = lambda p, a, x: ((p["w"] - x) ** 2).sum()
        >>> g = hg.hypergrad(lambda p, a, y: (p["w"] ** 2).sum(), loss, {"w": torch.ones(1)},
        ...     hg.optim.sgd(lr=0.1), torch.zeros(3, 1), None, method="first_order",
        ...     wrt=("params",))
        >>> g.params["w"]  # the true value is 2 * 0.8 ** 6 = 0.5243
        tensor([1.0240])
    """

    name = "first_order"
    first_order = True
    reverse_mode = True

    def __call__(self, problem: Problem) -> MethodResult:
        return reverse_from(problem, 0)

"""Reverse mode: backpropagation through every step of the unroll."""

from __future__ import annotations

import torch

from hypergrad._engine.problem import Problem, run_steps
from hypergrad.methods._base import Method, MethodResult, finish, grad_or_none, leaf_inputs

__all__ = ["Reverse", "reverse_from"]


def reverse_from(problem: Problem, start: int) -> MethodResult:
    """Run steps ``[0, start)`` without a meta-graph, then ``[start, K)`` with one; backprop."""
    inputs = leaf_inputs(problem)
    carry, aux, hp = problem.bind(inputs.trees)
    losses: list[torch.Tensor] = []
    if start > 0:
        with torch.no_grad():
            carry, losses = run_steps(problem, carry, aux, hp, 0, start)
    with torch.enable_grad():
        carry, tail = run_steps(problem, carry, aux, hp, start, problem.steps)
        value = problem.value(carry, aux)
    grads = grad_or_none([value], inputs.leaves)
    return finish(inputs, grads, value, losses + tail, carry)


class Reverse(Method):
    """``"reverse"``: exact hypergradient by backpropagation through all K steps.

    Cost, with c the cost of one step (forward + inner gradient + update) and A the memory one
    step keeps for the backward pass (activations, inner gradient graph, update):

    - time: about ``K * c`` forward plus ``K * (2 to 3) * c`` backward (a second-order pass);
    - memory: ``O(K * A + P)``, linear in K.

    Examples:
        >>> loss = lambda p, lr, x: ((p["w"] - x) ** 2).sum()
        >>> g = hg.hypergrad(lambda p, a, y: (p["w"] ** 2).sum(), loss, {"w": torch.ones(1)},
        ...     hg.optim.sgd(lr=0.1), torch.zeros(3, 1), None, method="reverse", wrt=("lr",))
        >>> g.hyperparams["lr"]
        tensor(-3.9322)
    """

    name = "reverse"
    reverse_mode = True

    def __call__(self, problem: Problem) -> MethodResult:
        return reverse_from(problem, 0)

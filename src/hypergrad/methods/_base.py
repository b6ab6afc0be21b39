"""What every method shares: the method type, its result, and the leaf bookkeeping.

A method turns a ``Problem`` (``hypergrad._engine.problem``) into a
[`MethodResult`][hypergrad.methods.MethodResult]. It never builds a step: it declares what it needs
from the step with two class attributes, ``first_order`` (the step must detach its inner gradient)
and ``functional`` (the step must be transformable by torch.func), and whoever builds the problem
(``hypergradient.py``, ``clients.py``) honours them.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._engine.backward import fresh_leaves, grad_or_none
from hypergrad._engine.problem import Carry, Problem
from hypergrad.tree import PyTree

__all__ = [
    "Inputs",
    "Method",
    "MethodResult",
    "detached",
    "fresh_leaves",
    "grad_or_none",
    "leaf_inputs",
]


class MethodResult(NamedTuple):
    """What a method returns.

    Attributes:
        value: the outer loss (detached 0-d tensor).
        grads: the gradient of ``value`` for each key of ``Problem.inputs``, shaped like it.
        losses: the inner loss of each step, a detached 1-d tensor.
        unused: key paths (e.g. ``"['aux']['w']"``) of input leaves that the outer loss does not
            depend on at all (their gradient is identically zero); empty when the method cannot
            tell (forward mode).
        report: what the method reports about itself (``hg.Implicit``: an
            [`ImplicitReport`][hypergrad.ImplicitReport]), or ``None``.
        carry: the carry after the last step (params, optimizer state, buffers; detached), as
            the method computed it on its way (``hypergrad._front.differentiate`` makes the
            result's trajectory of it), or ``None`` where the method did not keep it.
    """

    value: torch.Tensor
    grads: dict[str, PyTree]
    losses: torch.Tensor
    unused: tuple[str, ...]
    report: Any = None
    carry: Carry | None = None


class Inputs(NamedTuple):
    """The differentiable inputs of a problem as fresh leaves that require grad."""

    trees: dict[str, PyTree]
    leaves: list[torch.Tensor]
    paths: list[str]
    spec: Any


def leaf_inputs(problem: Problem) -> Inputs:
    """Detached copies of the problem's differentiable inputs, each requiring grad.

    The caller's tensors are never touched: ``detach()`` makes a new tensor object that shares
    memory, and nothing here writes to it.
    """
    inputs: PyTree = problem.inputs()
    paths, flat, spec = optree.tree_flatten_with_path(inputs, namespace=_tree._NAMESPACE)
    leaves: list[torch.Tensor] = [x.detach().requires_grad_() for x in flat]
    trees: dict[str, PyTree] = optree.tree_unflatten(spec, leaves)  # type: ignore[assignment]
    return Inputs(trees, leaves, [_tree.keystr(p) for p in paths], spec)


def finish(
    inputs: Inputs,
    grads: list[torch.Tensor | None],
    value: torch.Tensor,
    losses: list[torch.Tensor],
    carry: Carry | None = None,
) -> MethodResult:
    """Assemble a [`MethodResult`][hypergrad.methods.MethodResult].

    Zeros (and an ``unused`` entry) where a grad is None; ``carry`` (the final one) detached.
    """
    unused = tuple(p for p, g in zip(inputs.paths, grads) if g is None)
    full = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs.leaves, grads)]
    tree = optree.tree_unflatten(inputs.spec, full)
    stacked = torch.stack([x.detach() for x in losses]) if losses else torch.zeros(0)
    final = None if carry is None else detached(carry)
    return MethodResult(value.detach(), dict(tree), stacked, unused, carry=final)


def detached(carry: Carry) -> Carry:
    """The carry with every tensor detached (what a result reports)."""
    return Carry(*(_tree.detach(t) for t in carry))


class Method:
    """Base class of the hypergradient methods.

    Subclasses implement ``__call__`` and state their time and memory cost in their
    docstring with K steps, T truncation, S segment, P parameters, D directions.
    """

    name: ClassVar[str] = "method"
    #: The step must detach its inner gradient.
    first_order: ClassVar[bool] = False
    #: The step must be transformable by torch.func (``inner_grad="func"``).
    functional: ClassVar[bool] = False
    #: Reverse mode: the method backpropagates a scalar through the steps, so it can also
    #: differentiate a range of steps given the cotangent of their end (client chunks do).
    reverse_mode: ClassVar[bool] = False
    #: It differentiates only where training ends (a fixed point, ``hg.Implicit``): the
    #: hyperparameters that do not move the fixed point have no effect there.
    fixed_point: ClassVar[bool] = False
    #: The clients transform can spread it over processes (``process_group=``).
    spans_processes: ClassVar[bool] = True

    def restricted(self, first: int, last: int, total: int) -> tuple[Method | None, bool]:
        """This method on steps ``[first, last)`` of a ``total``-step unroll.

        Returns the method to differentiate that range with (``None``: the range is not
        differentiated) and whether the gradient flows on into the range's start. Exact
        methods differentiate every range as a whole; ``hg.Truncated`` overrides this.
        """
        return self, True

    def validate(self, problem: Problem) -> None:
        """Raise ``ValueError`` if this method cannot differentiate ``problem`` as asked."""

    def evaluations(self, problem: Problem) -> int:
        """How many step evaluations a call makes (the progress bar's total)."""
        return problem.steps

    def __call__(self, problem: Problem) -> MethodResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'"{self.name}"'

"""Finiteness: one cheap check at the end of a call, and a replay that names the first nan/inf."""

from __future__ import annotations

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad._engine.problem import Carry, Problem, run_steps
from hypergrad.tree import PyTree

__all__ = ["all_finite", "first_nonfinite", "locate_nonfinite", "raise_nonfinite"]


def first_nonfinite(tree: PyTree) -> str | None:
    """The key path of the first floating-point leaf holding nan/inf, or ``None``."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=_tree._NAMESPACE)
    for p, x in zip(paths, leaves):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(x.isfinite().all()):
            return _tree.keystr(p)
    return None


def locate_nonfinite(problem: Problem) -> None:
    """Replay the unroll without a meta-graph, checking every step; raise at the first nan/inf.

    Called only after a cheap end-of-run check found a non-finite number (one sync per call, not
    per step). Raises ``FloatingPointError`` naming the step and the key path; returns ``None``
    if the replay finds nothing (the non-finite number came from the outer loss).
    """
    carry, aux, hp = problem.bind(problem.inputs())
    carry = Carry(*_tree.detach(tuple(carry)))
    bad = first_nonfinite(carry.params)
    if bad is not None:
        raise FloatingPointError(
            f"{caller()}: the initial params are not finite at {bad}. Check the initialisation."
        )
    with torch.no_grad():
        for k in range(problem.steps):
            new, losses = run_steps(problem, carry, aux, hp, k, k + 1)
            if not bool(losses[0].isfinite().all()):  # one loss, or one per client
                raise FloatingPointError(
                    f"{caller()}: the inner loss is {losses[0].tolist()} at step {k} (steps count "
                    "from 0). Check the batch of that step, lower the learning rate, or clip "
                    "the loss."
                )
            for name, tree in (("params", new.params), ("optimizer state", new.state)):
                bad = first_nonfinite(tree)
                if bad is not None:
                    raise FloatingPointError(
                        f"{caller()}: at step {k} the update made {name} {bad} nan/inf (its "
                        "inner gradient or the optimizer update is not finite). Lower the "
                        "learning rate, clip gradients in inner_loss, or check the data."
                    )
            carry = new


def all_finite(*tensors: torch.Tensor) -> bool:
    """One device sync: whether every given tensor is finite."""
    flags = [t.detach().isfinite().all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def raise_nonfinite(problem: Problem, value: torch.Tensor, grads: PyTree) -> None:
    locate_nonfinite(problem)
    if not bool(value.isfinite()):
        raise FloatingPointError(
            f"{caller()}: every inner step is finite but the outer loss is {value.item()}. "
            "Check outer_loss and outer_batch."
        )
    bad = first_nonfinite(grads)
    raise FloatingPointError(
        f"{caller()}: every inner step and the outer loss are finite, but the hypergradient is "
        f"nan/inf at {bad} (an overflow in the backward pass). Lower the learning rate or K, "
        "or use float64."
    )

"""Data parallelism: one model over the ranks of a process group, each with a shard of the data.

``hg.hypergrad(..., process_group=group)`` (and ``hg.unroll``) without ``clients``: every rank
holds the same params, optimizer state, ``aux`` and hyperparameters and passes its own shard of
every inner batch and of the outer batch. The loss of a step is the mean over the global batch,
so rank ``r`` with ``n_r`` of the ``N`` examples contributes ``n_r / N`` of it (``n_r``: the
leading dimension of its batch's first tensor, the same at every step; ``m_r`` of ``M`` likewise
for the outer batch). Two differentiable collectives of ``hypergrad._clients.ranks`` do the
rest, so every method differentiates the problem unchanged:

- the params enter each loss through ``shared`` (the identity, whose backward all-reduces the
  cotangent), so the inner gradient a step takes of its rank's weighted loss is already the
  global one, ``sum_r n_r g_r / N``: one all-reduce per step, inside the gradient;
- each rank differentiates its own weighted share of the outer loss.

Every rank then runs the same trajectory, and every cotangent and tangent of the carry is the
whole one on every rank (the all-reduce inside ``shared``'s backward completes it). What is a
share at the end is summed in one all-reduce (``Completed``): the outer value, and ``aux``'s
gradient (``aux`` enters each rank's losses directly); in forward mode every output (the
directional derivatives of the rank's share of the outer loss).

The ranks agree before the first step (``same_call_weights``: the call, the structure and a
digest of the values of what every rank must hold alike), and every collective runs inside the
fault protocol of ``spanning``. Buffers (BatchNorm's statistics) stay each rank's own, as with
``DistributedDataParallel``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad._clients.ranks import (
    Ranks,
    describe,
    same_call_weights,
    shared,
    sum_ranks,
    sum_shared,
)
from hypergrad._engine.problem import Problem
from hypergrad._front import Runner, Setup, single_problem
from hypergrad.methods import Forward
from hypergrad.tree import PyTree

__all__ = ["Completed", "data_parallel", "digest", "examples"]

_INTS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def examples(batch: Any) -> int:
    """The number of examples in a batch: the leading dimension of its first tensor leaf (in
    ``hg.tree`` order), or 1 for a batch without one (every rank's share then counts alike).

    Examples:
        >>> examples((torch.zeros(5, 3), torch.zeros(5))), examples({"x": torch.zeros(2, 4)})
        (5, 2)
        >>> examples(None), examples(torch.tensor(1.0))
        (1, 1)
    """
    for x in _tree.leaves(batch):
        if isinstance(x, torch.Tensor):
            return int(x.shape[0]) if x.dim() > 0 else 1
    return 1


def digest(tree: PyTree) -> str:
    """A digest of the values of a tree's tensors: sums of their bits, of every second and every
    third element's (exact integer sums, so the same on every process for the same values;
    one pass, no copy), and every other leaf's ``repr``.

    Examples:
        >>> digest({"w": torch.ones(3)}) == digest({"w": torch.ones(3)})
        True
        >>> digest({"w": torch.ones(3)}) == digest({"w": torch.tensor([1.0, 1.0, 1.5])})
        False
    """
    parts: list[torch.Tensor] = []
    others: list[str] = []
    for x in _tree.leaves(tree):
        if not isinstance(x, torch.Tensor):
            others.append(repr(x))
            continue
        flat = x.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        bits = flat.view(_INTS[flat.element_size()])  # sums in int64: no copy, exact
        sums = [bits.sum(dtype=torch.int64), bits[::2].sum(dtype=torch.int64)]
        parts.append(torch.stack([*sums, bits[::3].sum(dtype=torch.int64)]))
    device = parts[0].device if parts else None
    sums = torch.cat([x.to(device) for x in parts]).tolist() if parts else []  # one sync
    return f"{sums} {others}"


def _fingerprint(setup: Setup) -> dict[str, str]:
    """What every rank must pass alike: the call, and the structure and values of what each
    holds (not the batches, nor the buffers, which are each rank's own)."""
    return {
        "the call": f"{caller()}, data parallel",
        "method": repr(setup.method),
        "wrt": repr((setup.targets, setup.hyper_names)),
        "K (steps)": str(setup.source.steps),
        "params": describe(setup.params, None),
        "buffers": describe(setup.buffers, None),
        "aux": describe(setup.aux, None),
        "hyperparams": describe(setup.hyperparams, None),
        "values of params, state, aux and hyperparams": digest(
            (setup.params, setup.state, setup.aux, setup.hyperparams)
        ),
        "inner_grad": setup.inner_grad,
        "check_finite": str(setup.check_finite),
    }


def _check(setup: Setup) -> None:
    if setup.compile is not None:
        raise ValueError(
            f"{caller()}: compile does not run with process_group yet: the all-reduce of each "
            "step's gradient cannot be part of a compiled graph. Pass compile=False with "
            "process_group."
        )


@dataclasses.dataclass(frozen=True)
class _Shard:
    """This rank's part of a data-parallel call: its weights and how its losses are combined."""

    ranks: Ranks
    setup: Setup
    examples: int
    inner_weight: float
    outer_weight: float

    def inner_loss(self, params: PyTree, aux: PyTree, batch: Any, *buffers: Any) -> Any:
        """The rank's weighted share of the global inner loss, the params entering shared."""
        out = self.setup.inner_loss(shared(self.ranks, params), aux, batch, *buffers)
        if buffers and isinstance(out, tuple) and len(out) == 2:
            loss, new = out
            return (loss * self.inner_weight if isinstance(loss, torch.Tensor) else loss), new
        return out * self.inner_weight if isinstance(out, torch.Tensor) else out

    def outer(self, params: PyTree, buffers: PyTree, aux: PyTree) -> torch.Tensor:
        """This rank's weighted share of the global outer loss (``Completed`` sums the value)."""
        assert self.setup.outer is not None
        return self.setup.outer(shared(self.ranks, params), buffers, aux) * self.outer_weight

    def batch_at(self, k: int) -> Any:
        """Step ``k``'s batch, checked to hold this rank's number of examples."""
        batch = self.setup.source.at(k)
        got = examples(batch)
        if got != self.examples:
            raise ValueError(
                f"{caller()}: with process_group, a rank's share of each step's loss is its "
                f"number of examples, read from step 0's batch ({self.examples}), but step "
                f"{k}'s batch has {got} (the leading dimension of its first tensor). Give "
                "every step's batch the same number of examples on a rank, e.g. "
                "DataLoader(..., drop_last=True)."
            )
        return batch

    def total(self, losses: torch.Tensor) -> torch.Tensor:
        """The global step losses from this rank's shares."""
        return sum_ranks(self.ranks, losses)


def data_parallel(setup: Setup) -> tuple[Problem, Runner | None]:
    """The problem of ``setup`` spread over the ranks of ``setup.process_group`` (see the module
    docstring), and for a hypergradient the runner that completes the method's result."""
    _check(setup)
    ranks = Ranks(setup.process_group)
    mine = (examples(setup.source.copy_at(0)), examples(setup.outer_batch))
    if min(mine) == 0:
        which = "step 0's batch" if mine[0] == 0 else "the outer batch"
        raise ValueError(
            f"{caller()}: {which} holds no examples on this rank (its first tensor's leading "
            "dimension is 0); with process_group every rank needs some of every batch, since "
            "its loss is the mean over its shard. Spread the examples so that each rank has "
            "some."
        )
    (total, total_outer), seed = same_call_weights(
        ranks, _fingerprint(setup), (float(mine[0]), float(mine[1])), setup.seed,
        may_differ="only each rank's shard of the inner and outer batches may differ",
    )  # fmt: skip
    setup = dataclasses.replace(setup, seed=seed)  # every rank draws rank 0's numbers
    shard = _Shard(ranks, setup, mine[0], mine[0] / total, mine[1] / total_outer)
    outer = None if setup.outer is None else shard.outer
    one = single_problem(dataclasses.replace(setup, inner_loss=shard.inner_loss, outer=outer))
    problem = dataclasses.replace(one, batch_at=shard.batch_at, agree=ranks.any, total=shard.total)
    how = setup.method
    runner = None if how is None else Completed(how, ranks, forward=isinstance(how, Forward))
    return problem, runner


class Completed:
    """A method on the data-parallel problem, then what is each rank's share summed, in one
    all-reduce: the outer value, and the gradients that are shares (see the module docstring).

    Every rank backpropagates its own share of the outer loss, so the value and ``aux``'s
    gradient are shares; the gradients of the params and hyperparameters are whole already
    (``shared`` summed their cotangents). In forward mode every output is the share of the
    rank's outer loss: all of them are summed.
    """

    def __init__(self, method: Any, ranks: Ranks, *, forward: bool) -> None:
        self.method, self.ranks, self.forward = method, ranks, forward

    def evaluations(self, problem: Problem) -> int:
        return self.method.evaluations(problem)

    def __call__(self, problem: Problem) -> Any:
        result = self.method(problem)
        shares = ("aux", "hyperparams", "params") if self.forward else ("aux",)
        trees = {"value": result.value, **{k: result.grads[k] for k in shares if k in result.grads}}
        trees["losses"] = result.losses  # the step losses are shares too (the trajectory's)
        summed = sum_shared(self.ranks, trees, dict.fromkeys(trees))
        value, losses = summed.pop("value"), summed.pop("losses")
        return result._replace(value=value, losses=losses, grads={**result.grads, **summed})

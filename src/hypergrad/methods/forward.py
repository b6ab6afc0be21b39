"""Forward mode: Jacobian-vector products through the unroll, one per input direction."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch

from hypergrad import tree as _tree
from hypergrad.methods._base import Method, MethodResult
from hypergrad.tree import PyTree
from hypergrad.unroll import Problem, run_steps

__all__ = ["Forward"]

# torch's forward-mode formula of some double-backward ops writes into the tangent of an input
# that has none (an immutable "ZeroTensor"): F.mse_loss with reduction="mean" is the known case
# (pytorch/pytorch#123996, unfixed in torch 2.13).
_ZERO_TENSOR_BUG = "ZeroTensors are immutable"


def _with_zero_tangents(batch: PyTree, anchor: torch.Tensor) -> PyTree:
    """Give every floating-point tensor of ``batch`` a dense zero tangent; values unchanged.

    ``anchor`` is ``0 * vector.sum()`` of the dual input: its value is 0 and its tangent a real
    (materialised) zero, so ``x + anchor`` equals ``x`` and carries a tangent that torch's
    formulas may write into. This sidesteps #123996 for targets that come in through the batch.
    """

    def attach(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x + anchor.to(x.dtype)
        return x

    return _tree.map(attach, batch)


def _explain_zero_tensor_bug(error: RuntimeError) -> RuntimeError:
    return RuntimeError(
        "hg.hypergrad(method='forward'): torch's forward-mode rule for an op in inner_loss failed "
        f"({error}). This is a torch bug (pytorch/pytorch#123996; known case: "
        "F.mse_loss / nn.MSELoss with reduction='mean') that strikes when one input of that op "
        "carries no tangent, typically a target tensor captured from outside inner_loss. "
        "Fixes: pass the target in through the batch (hypergrad gives batch tensors a zero "
        "tangent), or write the loss with elementary ops, e.g. ((pred - y) ** 2).mean(), or use "
        "method='reverse' or hg.Checkpointed(S)."
    )


class Forward(Method):
    """``"forward"``: forward-mode differentiation (``torch.func.jvp``) through the K steps.

    Each pass pushes a batch of tangent directions through the whole unroll alongside the
    values; the directions are the basis vectors of the differentiated inputs (D scalars in
    all: ``aux``, the hyperparameters asked for, and the params if asked), batched with
    ``torch.func.vmap`` in chunks of ``chunk_size``. Nothing is stored per step, so memory does
    not grow with K. Random numbers are shared across directions (``randomness="same"``) and
    step ``k`` is seeded with ``seed + k``, so dropout masks match ``"reverse"``'s.

    Best for a few hyperparameters (a learning rate, per-layer weight decays). The step must be
    transformable by torch.func (``inner_grad="func"``). This method cannot tell an ``aux`` leaf
    that does not affect the outer loss from one whose gradient happens to be zero, so it does
    not warn about such leaves.

    Cost, with B = chunk_size (default D):

    - time: ``ceil(D / B) * K * c_jvp(B)``, where ``c_jvp(B)`` is a step with B tangents
      (about 2-3 c when B = 1, sublinear in B through vectorisation);
    - memory: ``O(B * (P + A_1))`` where A_1 is one step's working memory, independent of K
      apart from the K scalar step losses kept for the finiteness check (about 2 KB a step).

    Args:
        chunk_size: number of directions per vmapped pass (``None``: all D at once).

    Examples:
        >>> loss = lambda p, a, x: ((p["w"] - x) ** 2).sum()
        >>> g = hg.hypergrad(lambda p, a, y: (p["w"] ** 2).sum(), loss, {"w": torch.ones(1)},
        ...     hg.optim.sgd(lr=0.1), torch.zeros(3, 1), None, method="forward", wrt=("lr",))
        >>> g.hyperparams["lr"]
        tensor(-3.9322)
    """

    name = "forward"
    functional = True

    def __init__(self, chunk_size: int | None = None) -> None:
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ValueError(
                f"hg.Forward: chunk_size must be a positive int or None, got {chunk_size!r}."
            )
        self.chunk_size = chunk_size

    def _size(self, problem: Problem) -> int:
        return sum(x.numel() for x in _tree.leaves(problem.inputs()))

    def evaluations(self, problem: Problem) -> int:
        d = max(self._size(problem), 1)
        return problem.steps * math.ceil(d / (self.chunk_size or d))

    def validate(self, problem: Problem, *, caller: str) -> None:
        dtypes = {x.dtype for x in _tree.leaves(problem.inputs())}
        if len(dtypes) > 1:
            raise ValueError(
                f"{caller}: method='forward' pushes one tangent vector through all inputs, so "
                f"they need one dtype; got {sorted(str(d) for d in dtypes)}. Cast aux and "
                "params to one dtype, or use method='reverse'."
            )

    def __call__(self, problem: Problem) -> MethodResult:
        inputs = _tree.detach(problem.inputs())
        flat, unravel = _tree.ravel(inputs)
        size = flat.numel()

        def run(vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            carry, aux, hp = problem.bind(unravel(vector))
            anchor = vector.sum() * 0
            dual_problem = dataclasses.replace(
                problem, batch_at=lambda k: _with_zero_tangents(problem.batch_at(k), anchor)
            )
            carry, losses = run_steps(dual_problem, carry, aux, hp, 0, problem.steps)
            return problem.value(carry, aux), torch.stack(losses)

        def directional(tangent: torch.Tensor):
            with warnings.catch_warnings():
                # torch loads its forward-AD decompositions on the first jvp with
                # torch.jit.script, which warns about its own deprecation (torch's, not ours).
                warnings.filterwarnings(
                    "ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning
                )
                return torch.func.jvp(run, (flat,), (tangent,), has_aux=True)

        if size == 0:
            with torch.no_grad():
                value, losses = run(flat)
            return MethodResult(value.detach(), dict(inputs), losses.detach(), ())

        chunk = self.chunk_size or size
        parts, value, losses = [], None, None
        with torch.no_grad():
            for lo in range(0, size, chunk):
                hi = min(lo + chunk, size)
                rows = torch.arange(hi - lo, device=flat.device)
                basis = torch.zeros(hi - lo, size, dtype=flat.dtype, device=flat.device)
                basis[rows, rows + lo] = 1
                try:
                    values, tangents, step_losses = torch.func.vmap(directional, randomness="same")(
                        basis
                    )
                except RuntimeError as error:
                    if _ZERO_TENSOR_BUG in str(error):
                        raise _explain_zero_tensor_bug(error) from error
                    raise
                parts.append(tangents)
                value, losses = values[0], step_losses[0]
        grads = unravel(torch.cat(parts))
        return MethodResult(value, dict(grads), losses, ())

    def __repr__(self) -> str:
        return '"forward"' if self.chunk_size is None else f"hg.Forward({self.chunk_size})"

"""Forward mode: Jacobian-vector products through the unroll, one per input direction."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller, entered, positive_int
from hypergrad._engine.notices import torch_notices_hidden
from hypergrad._engine.problem import Carry, Problem, run_steps
from hypergrad.methods._base import Method, MethodResult
from hypergrad.methods._memory import available, measure, plan
from hypergrad.methods.forward_safe import REPLACED, forward_safe_losses
from hypergrad.tree import PyTree

__all__ = ["Forward"]

# torch's forward-mode rule of some double-backward ops writes into the tangent of an input that
# has none (an immutable "ZeroTensor"; pytorch/pytorch#123996), and some
# have no forward-mode rule at all. The torch.nn.functional losses among them are rewritten with
# elementary ops during the jvp (hypergrad._forward_safe); these explain any other op.
_ZERO_TENSOR_BUG = "ZeroTensors are immutable"
_NO_FORWARD_RULE = "Trying to use forward AD with"


def _explain_zero_tensor_bug(error: RuntimeError) -> RuntimeError:
    """The torch bug #123996 struck an op that `forward_safe_losses` does not rewrite."""
    replaced = ", ".join(f"F.{f.__name__}" for f in REPLACED)
    return RuntimeError(
        f"{caller()}(method='forward'): torch's forward-mode rule for an op in inner_loss's "
        f"gradient failed ({error}). This is a torch bug (pytorch/pytorch#123996) that strikes "
        "when one input of that op carries no tangent, typically a target tensor (captured in "
        f"a closure or passed in the batch). hypergrad's forward mode rewrites {replaced} (and "
        "their nn modules) with elementary ops to avoid it; this op is another one, or one of "
        "those called with arguments left to torch (size_average/reduce, a target shaped "
        "unlike the input). Fixes: write that op with elementary ops, e.g. "
        "((pred - y) ** 2).mean() for a mean squared error, or use method='reverse' or "
        "hg.Checkpointed(S)."
    )


def _explain_no_forward_rule(error: NotImplementedError) -> NotImplementedError:
    """torch has no forward-mode rule for an op of the inner loss or of its backward."""
    return NotImplementedError(
        f"{caller()}(method='forward'): torch has no forward-mode rule for an op in inner_loss "
        f"or in its gradient ({str(error).splitlines()[0]}). Forward mode differentiates the "
        "inner gradient forward-over-reverse (torch.func.jvp of torch.func.grad), so every op "
        "of inner_loss and of its backward needs one. Fixes: write that part of the loss with "
        "elementary ops (torch.where, clamp, exp, log, sums), or use method='reverse' or "
        "hg.Checkpointed(S), which need the op's double backward instead."
    )


def _push(directional, basis: torch.Tensor):
    """``vmap(directional)(basis)`` with the forward-safe losses, torch's notices hidden."""
    # torch.func calls torch.jit.script on the first jvp, which warns of its own deprecation.
    with torch_notices_hidden(), forward_safe_losses():
        try:
            return torch.func.vmap(directional, randomness="same")(basis)
        except NotImplementedError as error:  # a RuntimeError too: catch it first
            if _NO_FORWARD_RULE in str(error):
                raise _explain_no_forward_rule(error) from error
            raise
        except RuntimeError as error:
            if _ZERO_TENSOR_BUG in str(error):
                raise _explain_zero_tensor_bug(error) from error
            raise


def _final(kept: list[Any], tensors: list[torch.Tensor]) -> Carry:
    """The final carry from the jvp's primal tensors and what ``run`` kept: the structure and
    the non-tensor leaves (``None`` where a tensor goes)."""
    spec, flat = kept
    it = iter(tensors)
    leaves = [next(it).detach() if x is None else x for x in flat]
    return Carry(*optree.tree_unflatten(spec, leaves))


class Forward(Method):
    """``"forward"``: forward-mode differentiation (``torch.func.jvp``) through the K steps.

    Each pass pushes a batch of tangent directions through the whole unroll alongside the
    values; the directions are the basis vectors of the differentiated inputs (D scalars in
    all: ``aux``, the hyperparameters asked for, and the params if asked), batched with
    ``torch.func.vmap`` in chunks of ``chunk_size``. Nothing is stored per step, so memory does
    not grow with K. Random numbers are shared across directions (``randomness="same"``) and
    step ``k`` is seeded with ``seed + k``, as in the other methods; but torch's dropout can draw
    its mask through another kernel under forward mode (seen on CUDA), so the masks can differ
    from ``"reverse"``'s at the same seed (see the sharp bits).

    Best for a few hyperparameters (a learning rate, per-layer weight decays). The step must be
    transformable by torch.func (``inner_grad="func"``). This method cannot tell an ``aux`` leaf
    that does not affect the outer loss from one whose gradient happens to be zero, so it does
    not warn about such leaves.

    torch cannot take three losses forward-over-reverse: `F.mse_loss` with a target that
    carries no tangent (pytorch/pytorch#123996), `F.huber_loss` and `F.soft_margin_loss` (no
    forward-mode rule for their backward). While this method's jvp runs, those (and
    `nn.MSELoss`, `nn.HuberLoss`, `nn.SoftMarginLoss`) are computed with elementary ops, equal to
    torch's to rounding; everywhere else torch's own kernels run. torch's notices about its own
    deprecations, raised inside the jvp, are hidden.

    Memory is estimated before the first pass when there are more than 8 directions: one step
    (and the outer loss) runs with one and with two directions while the live bytes of the
    tensors they make are tracked, and twice the difference of the peaks is the estimate of one
    more direction (on a 17k-parameter MLP: 1.07 MB, against about 0.83 MB of resident memory
    per direction measured; ``benchmarks/forward_memory.py``). With ``chunk_size=None`` the
    directions are then pushed in chunks that fit the budget (all at once when they fit). The
    budget is ``memory`` bytes, by default half of what the process has left (on CUDA the
    device's free memory; on the CPU the system's available memory, or less under an
    address-space limit, ``RLIMIT_AS``). ``MemoryError`` says so, with the estimate and the way
    out, when one direction does not fit the budget, or an explicit ``chunk_size`` needs more
    than twice the budget (all the free memory by default). Over processes
    (``process_group``: every rank must run the same passes) nothing is measured.

    Cost, with B = chunk_size (default: D, or what the memory budget affords):

    - time: ``ceil(D / B) * K * c_jvp(B)``, where ``c_jvp(B)`` is a step with B tangents
      (about 2-3 c when B = 1, sublinear in B through vectorisation);
    - memory: ``O(B * (P + A_1))`` where A_1 is one step's working memory, independent of K
      apart from the K scalar step losses kept for the finiteness check (about 2 KB a step).

    Args:
        chunk_size: number of directions per vmapped pass (``None``: all D at once, or as many
            as fit the memory budget).
        memory: the memory budget in bytes (``None``: half of what the process has left).

    Examples:
        Two scalars (``aux`` and the learning rate), one direction per pass, against reverse:

        >>> inner = lambda p, a, x: ((p["w"] - a * x) ** 2).sum()
        >>> args = (lambda p, a, y: (p["w"] ** 2).sum(), inner, {"w": torch.ones(1)},
        ...         hg.optim.sgd(lr=0.1), torch.ones(3, 1), None)
        >>> kw = dict(aux=torch.tensor(0.5), wrt=("aux", "lr"))
        >>> fwd = hg.hypergrad(*args, method=hg.Forward(chunk_size=1), **kw)
        >>> rev = hg.hypergrad(*args, method="reverse", **kw)
        >>> torch.allclose(fwd.aux, rev.aux), torch.allclose(fwd.hyperparams["lr"], rev.hyperparams["lr"])
        (True, True)
    """

    name = "forward"
    functional = True

    def __init__(self, chunk_size: int | None = None, *, memory: int | None = None) -> None:
        with entered("hg.Forward"):
            self.chunk_size = positive_int(chunk_size, "chunk_size", none="")
            self.memory = positive_int(memory, "memory", "(bytes)", none="(half the free memory)")

    def _size(self, problem: Problem) -> int:
        return sum(x.numel() for x in _tree.leaves(problem.inputs()))

    def evaluations(self, problem: Problem) -> int:
        d = max(self._size(problem), 1)
        return problem.steps * math.ceil(d / (self.chunk_size or d))

    def validate(self, problem: Problem) -> None:
        dtypes = {x.dtype for x in _tree.leaves(problem.inputs())}
        if len(dtypes) > 1:
            raise ValueError(
                f"{caller()}: method='forward' pushes one tangent vector through all inputs, so "
                f"they need one dtype; got {sorted(str(d) for d in dtypes)}. Cast aux and "
                "params to one dtype, or use method='reverse'."
            )

    def __call__(self, problem: Problem) -> MethodResult:
        inputs = _tree.detach(problem.inputs())
        flat, unravel = _tree.ravel(inputs)
        size = flat.numel()

        kept: list[Any] = []  # the final carry's tree structure and its non-tensor leaves

        def run(vector: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, list]]:
            carry, aux, hp = problem.bind(unravel(vector))
            carry, losses = run_steps(problem, carry, aux, hp, 0, problem.steps)
            tree: PyTree = carry
            flat_carry: list[Any]
            flat_carry, spec = optree.tree_flatten(tree, namespace=_tree._NAMESPACE)
            kept[:] = [spec, [None if isinstance(x, torch.Tensor) else x for x in flat_carry]]
            tensors = [x for x in flat_carry if isinstance(x, torch.Tensor)]
            return problem.value(carry, aux), (torch.stack(losses), tensors)

        def directional(tangent: torch.Tensor):
            return torch.func.jvp(run, (flat,), (tangent,), has_aux=True)

        if size == 0:
            with torch.no_grad():
                value, (losses, tensors) = run(flat)
            carry = _final(kept, tensors)
            return MethodResult(value.detach(), dict(inputs), losses.detach(), (), carry=carry)

        chunk = self._chunk(problem, flat, unravel)
        parts: list[torch.Tensor] = []
        with torch.no_grad():
            for lo in range(0, size, chunk):
                hi = min(lo + chunk, size)
                rows = torch.arange(hi - lo, device=flat.device)
                basis = torch.zeros(hi - lo, size, dtype=flat.dtype, device=flat.device)
                basis[rows, rows + lo] = 1
                values, tangents, (step_losses, tensors) = _push(directional, basis)
                parts.append(tangents)
                value, losses = values[0], step_losses[0]
        grads = unravel(torch.cat(parts))
        carry = _final(kept, [x[0] for x in tensors])  # the primal: the same in every direction
        # the last chunk's value, losses and carry: every chunk's are equal
        return MethodResult(value, dict(grads), losses, (), carry=carry)

    def _chunk(self, problem: Problem, flat: torch.Tensor, unravel) -> int:
        """Directions per pass: measured on one step with one direction, against the budget."""
        size = flat.numel()
        # Over processes every rank must make the same passes (collectives): chunk_size as given.
        if size <= 8 or problem.agree is not None:
            return self.chunk_size or size
        one = dataclasses.replace(problem, steps=1, on_step=None, multi=None)

        def first(vector: torch.Tensor):
            carry, aux, hp = one.bind(unravel(vector))
            carry, losses = run_steps(one, carry, aux, hp, 0, 1)
            return one.value(carry, aux), torch.stack(losses)

        def pushed(rows: int) -> int:  # the bytes made by one step with ``rows`` directions
            basis = torch.zeros(rows, size, dtype=flat.dtype, device=flat.device)
            basis[torch.arange(rows), torch.arange(rows)] = 1
            with torch.no_grad():
                return measure(lambda: _push(lambda t: torch.func.jvp(first, (flat,), (t,)), basis))

        # One more direction's share: two directions minus one (the values' share cancels),
        # doubled for what the count misses (the allocator's slack: 1.5x on an MLP), with its
        # basis row and its result.
        per_direction = 2 * max(pushed(2) - pushed(1), 1) + 2 * size * flat.element_size()
        budget = self.memory if self.memory is not None else available(flat.device) / 2
        return plan(size, per_direction, budget, self.chunk_size)

    def __repr__(self) -> str:
        if self.memory is not None:
            return f"hg.Forward({self.chunk_size}, memory={self.memory})"
        return '"forward"' if self.chunk_size is None else f"hg.Forward({self.chunk_size})"

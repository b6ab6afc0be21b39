"""The problem and its loop: ``Problem`` holds everything a method needs, ``run_steps`` is the loop.

A method (``hypergrad.methods``)

1. gets the differentiable inputs with ``Problem.inputs`` (a dict with some of the keys
   ``"aux"``, ``"hyperparams"``, ``"params"``),
2. maps them to the loop's inputs with ``Problem.bind``,
3. runs steps ``[start, stop)`` with ``run_steps`` (as often, and under whatever autograd mode,
   it likes: the loop is deterministic given the problem),
4. evaluates ``Problem.value`` and differentiates.

Methods never build a step: whoever builds the problem (the front door, the clients transform)
gives it a step that honours the method's needs (``Method.first_order``, ``Method.functional``).

**Multi-step.** A compiled step also runs several consecutive steps as one graph: the problem
carries it as ``multi``, an object with ``length`` (steps per call), ``fits(k)`` (whether steps
``k .. k+length-1`` may run as one call) and ``several(params, state, buffers, aux, hyperparams,
batches) -> (params, state, buffers, losses)`` or ``None`` (run those steps one by one).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from hypergrad._boundary import caller
from hypergrad._engine.condition import Condition
from hypergrad._engine.inplace import explained, is_in_place_error
from hypergrad._engine.kernels import math_attention as _math_attention
from hypergrad._engine.randomness import manual_seed, seeded
from hypergrad._engine.step import StepFn
from hypergrad.optim._common import donated
from hypergrad.tree import PyTree

__all__ = ["Carry", "Problem", "outer_fn", "run_steps"]


class Carry(NamedTuple):
    """What the loop carries from step to step."""

    params: PyTree
    state: PyTree
    buffers: PyTree


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything a method needs to differentiate a K-step unroll (see the module docstring).

    Attributes:
        step: the step function.
        outer: ``outer(params, buffers, aux) -> scalar`` with the outer batch bound.
        params: the initial parameters.
        state: the initial optimizer state.
        buffers: the initial buffers (or ``None``).
        aux: the auxiliary tree (or ``None``).
        hyperparams: the optimizer hyperparameters passed to every step.
        batch_at: ``batch_at(k)``, the batch of step ``k``.
        steps: K.
        seed: the base seed; step ``k`` runs with ``seed + k``.
        targets: which inputs to differentiate: a tuple of ``"aux"``, ``"params"`` and
            ``"hyperparams"``.
        hyper_names: the hyperparameter names differentiated when ``"hyperparams"`` is a target.
        devices: CUDA device indices whose RNG is forked around each step.
        on_step: called once after every step (a progress bar), or ``None``.
        init: ``init(params, hyperparams) -> state``, used by ``bind`` when ``state`` is
            ``None`` (the state may depend on differentiated hyperparameters, e.g. Adagrad's
            ``initial_accumulator_value``, or exist only for tensor ones, e.g. SGD's momentum).
        multi: a multi-step that runs several steps per call (the compiled path, see
            ``run_steps``), or ``None``: one ``step`` call per step.
        condition: the stationarity condition the trained params satisfy
            (``hypergrad._engine.condition``), which ``hg.Implicit`` differentiates, or ``None``.
        in_place: whether ``run_steps(donate=True)`` may let a step write into its inputs when
            they are the previous step's outputs: true for the one-model step, whose inputs
            are exactly the carry; false (the default) for a step that puts other tensors into
            its inputs itself (the federated step broadcasts the server at a round's start).
        agree: for a problem spread over processes, ``agree(flag)`` tells whether ``flag``
            holds in any of them (every process calls it at the same point); ``None`` for one
            process. The finite check uses it so that every process replays together; where
            it finds no flag, the processes return right after it (the call's last exchange).
        total: for a problem spread over processes whose step losses are each process's
            share (data parallel), ``total(losses)`` sums them over the processes (``hg.unroll``
            reports the sum); ``None``: the losses are whole.
    """

    step: StepFn
    outer: Callable[[PyTree, PyTree, PyTree], torch.Tensor]
    params: PyTree
    state: PyTree
    buffers: PyTree
    aux: PyTree
    hyperparams: Mapping[str, Any]
    batch_at: Callable[[int], Any]
    steps: int
    seed: int
    targets: tuple[str, ...] = ("aux",)
    hyper_names: tuple[str, ...] = ()
    devices: tuple[int, ...] = ()
    on_step: Callable[[], None] | None = None
    init: Callable[[PyTree, Mapping[str, Any]], PyTree] | None = None
    multi: Any = None
    condition: Condition | None = None
    in_place: bool = False
    agree: Callable[[bool], bool] | None = None
    total: Callable[[torch.Tensor], torch.Tensor] | None = None

    def inputs(self) -> dict[str, PyTree]:
        """The trees to differentiate, keyed ``"aux"`` / ``"hyperparams"`` / ``"params"``."""
        out: dict[str, PyTree] = {}
        if "aux" in self.targets:
            out["aux"] = self.aux
        if "hyperparams" in self.targets:
            out["hyperparams"] = {k: self.hyperparams[k] for k in self.hyper_names}
        if "params" in self.targets:
            out["params"] = self.params
        return out

    def bind(self, inputs: Mapping[str, PyTree]) -> tuple[Carry, PyTree, Mapping[str, Any]]:
        """Return ``(initial carry, aux, hyperparams)`` with ``inputs`` substituted."""
        params = inputs.get("params", self.params)
        aux = inputs.get("aux", self.aux)
        hp = dict(self.hyperparams)
        hp.update(inputs.get("hyperparams", {}))
        state = self.state
        if state is None and self.init is not None:
            state = self.init(params, hp)
        return Carry(params, state, self.buffers), aux, hp

    def value(self, carry: Carry, aux: PyTree) -> torch.Tensor:
        """The outer loss at ``carry``, with its random numbers seeded by ``seed + K``."""
        with seeded(self.seed + self.steps, self.devices):
            return self.outer(carry.params, carry.buffers, aux)


def run_steps(
    problem: Problem,
    carry: Carry,
    aux: PyTree,
    hyperparams: Mapping[str, Any],
    start: int,
    stop: int,
    *,
    donate: bool = False,
) -> tuple[Carry, list[torch.Tensor]]:
    """Run steps ``start .. stop-1`` of ``problem`` from ``carry``: the one loop of the engine.

    Step ``k`` (its ``batch_at(k)`` call and the step) runs after ``torch.manual_seed(seed + k)``,
    all inside one ``torch.random.fork_rng``, so the caller's generator is left as it was. Runs under
    whatever autograd mode the caller set. Returns the new carry and the step losses (attached
    to the graph when one is recorded).

    With a ``Problem.multi`` (the compiled path), runs of ``multi.length`` consecutive steps
    where ``multi.fits(k)`` go to ``multi.several(params, state, buffers, aux, hyperparams,
    batches)`` in one call (each batch still fetched after its own seed); that returns the new
    carry and the steps' losses, or ``None`` when the steps must run one by one (they drew
    random numbers, which need the seed of each step, or the multi-step cannot run here), and
    the loop then runs them through ``Problem.step``. The numbers are the same either way.

    ``donate=True``: the caller keeps no step's carry but the last (plain training), so, for
    a problem whose steps allow it (``Problem.in_place``), every step after the first may
    overwrite its inputs, the previous step's outputs: the optimizer then updates in place
    where nothing is recorded (``hypergrad.optim._common.donated``). The first step never
    does: its inputs are the caller's.
    """
    losses: list[torch.Tensor] = []
    params, state, buffers = carry
    donate = donate and problem.in_place
    multi, seed, devices = problem.multi, problem.seed, problem.devices

    def fetch(k: int) -> Any:
        manual_seed(seed + k, devices)  # before batch_at: seeds batch_fn too
        return problem.batch_at(k)

    # One fork for the whole range (the caller's generator is restored at the end), then a
    # cheap re-seed per step: nothing but the step itself draws random numbers in between.
    with torch.random.fork_rng(devices=list(devices)):
        k = start
        while k < stop:
            if multi is not None and stop - k >= multi.length > 1 and multi.fits(k):
                batches = tuple(fetch(j) for j in range(k, k + multi.length))
                out = multi.several(params, state, buffers, aux, hyperparams, batches)
                if out is not None:
                    params, state, buffers, chunk = out
                    losses.extend(chunk)
                    for _ in chunk:
                        if problem.on_step is not None:
                            problem.on_step()
                    k += len(chunk)
                    continue
            batch = fetch(k)
            with donated() if donate and k > start else contextlib.nullcontext():
                params, state, buffers, loss = problem.step(
                    params, state, buffers, aux, hyperparams, batch
                )
            losses.append(loss)
            if problem.on_step is not None:
                problem.on_step()
            k += 1
    return Carry(params, state, buffers), losses


def outer_fn(
    outer_loss: Callable[..., Any],
    outer_batch: Any,
    has_buffers: bool,
    *,
    math_attention: bool = False,
) -> Callable[[PyTree, PyTree, PyTree], torch.Tensor]:
    """Bind the outer batch: ``outer(params, buffers, aux) -> scalar`` (shape-checked).

    ``math_attention``: the outer loss runs attention through its math backend, as the steps
    of the call do (``hypergrad._engine.kernels``).
    """

    def call(params: PyTree, buffers: PyTree, aux: PyTree) -> Any:
        with _math_attention(math_attention):
            if has_buffers:
                return outer_loss(params, aux, outer_batch, buffers)
            return outer_loss(params, aux, outer_batch)

    def outer(params: PyTree, buffers: PyTree, aux: PyTree) -> torch.Tensor:
        try:
            value = call(params, buffers, aux)
        except RuntimeError as error:
            if not is_in_place_error(error):
                raise
            raise explained(error, "outer_loss", call, (params, buffers, aux)) from error
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            got = (
                f"shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise ValueError(
                f"{caller()}: outer_loss must return a scalar (0-d) tensor, got {got}. Reduce it, "
                "e.g. return loss.mean()."
            )
        return value

    return outer

"""The front door and the finish: what every entry point does before and after the loop.

``set_up`` checks and normalises the arguments of a public call once (the optimizer, the
params, the batches, the hyperparameters and ``wrt``, the method, ``inner_grad``, ``compile``,
the seed) into a ``Setup``. ``single_problem`` turns it into the ``Problem`` of one model; the
clients transform (``hypergrad._clients.federation``) turns the same ``Setup`` into the problem
of many. ``differentiate`` and ``trajectory`` finish every call the same way: a progress bar,
the method (or the loop), one finiteness check that replays the unroll to name the first
nan/inf, the unused-aux warning, and the result.

``hg.unroll``, ``hg.hypergrad``, ``hg.clients.unroll``, ``hg.clients.hypergrad`` and
``hg.testing.check_hypergrad`` all come through here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from hypergrad import tree as _tree
from hypergrad._boundary import caller
from hypergrad._engine import hyper as _hyper
from hypergrad._engine.batches import Batches, copied
from hypergrad._engine.checks import (
    check_clients,
    check_float,
    check_inner_grad,
    check_opt,
    check_params,
    unchanged,
    watch,
)
from hypergrad._engine.compile import Compile, check_compile
from hypergrad._engine.condition import entering, make_condition
from hypergrad._engine.diagnosis import all_finite, locate_nonfinite, raise_nonfinite
from hypergrad._engine.kernels import explain_missing_rule
from hypergrad._engine.problem import Problem, outer_fn, run_steps
from hypergrad._engine.randomness import draw_seed, rng_devices
from hypergrad._engine.step import in_functorch_transform, make_step, multi_step
from hypergrad.methods import ImplicitReport, Method, MethodResult, resolve
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree

if TYPE_CHECKING:  # the clients transform stands above the front door
    from hypergrad._clients.federation import Clients

__all__ = [
    "Hypergradient",
    "Runner",
    "Setup",
    "Trajectory",
    "differentiate",
    "no_outer",
    "set_up",
    "single_problem",
    "trajectory",
]


class Trajectory(NamedTuple):
    """The result of [`unroll`][hypergrad.unroll], and the ``trajectory`` of every
    [`Hypergradient`][hypergrad.Hypergradient] (the same values for the same call).

    Attributes:
        params: the parameters after the last step.
        state: the optimizer state after the last step.
        buffers: the buffers after the last step (``None`` when none were carried).
        losses: a 1-d tensor, the inner loss at each step (evaluated before that step's update).

    Examples:
        >>> traj = hg.unroll(lambda p, a, x: ((p["w"] - x) ** 2).sum(), {"w": torch.zeros(1)},
        ...                  hg.optim.sgd(lr=0.25), torch.ones(3, 1))
        >>> traj.params["w"], traj.losses
        (tensor([0.8750]), tensor([1.0000, 0.2500, 0.0625]))
    """

    params: PyTree
    state: PyTree
    buffers: PyTree
    losses: torch.Tensor


class Hypergradient(NamedTuple):
    """The result of [`hypergrad`][hypergrad.hypergrad].

    Attributes:
        value: the outer loss after K steps (a detached 0-d tensor).
        aux: the gradient with respect to ``aux`` (same structure), or ``None`` if not asked.
        hyperparams: a dict ``{name: gradient}`` for the hyperparameters asked for (a float
            hyperparameter gets a 0-d gradient), or ``None``.
        params: the gradient with respect to the initial params (MAML), or ``None``.
        solver: with [`hg.Implicit`][hypergrad.Implicit], an
            [`ImplicitReport`][hypergrad.ImplicitReport] (the linear solver's iterations,
            residual and convergence, and how stationary the trained params are); else ``None``.
        trajectory: the [`Trajectory`][hypergrad.trajectory.Trajectory] of the K steps (the
            params, optimizer state and buffers after the last step, detached, and the inner
            losses), equal to [`hg.unroll`][hypergrad.unroll]'s: continue training from it
            without a second unroll. With clients, the clients' stacked values after the last
            local step, as [`hg.clients.unroll`][hypergrad.clients.unroll] returns them.
            ``None`` only for a method of your own whose result carries no ``carry``.

    Examples:
        >>> inner = lambda p, a, x: ((p["w"] - a * x) ** 2).sum()
        >>> outer = lambda p, a, x: (p["w"] ** 2).sum()
        >>> g = hg.hypergrad(outer, inner, {"w": torch.ones(1)}, hg.optim.sgd(lr=0.1),
        ...                  torch.ones(3, 1), None, aux=torch.tensor(0.5), wrt=("aux", "lr"))
        >>> g.aux.shape, sorted(g.hyperparams), g.params is None
        (torch.Size([]), ['lr'], True)
        >>> g.trajectory.params["w"], g.trajectory.losses.shape  # the params after the 3 steps
        (tensor([0.7560]), torch.Size([3]))
    """

    value: torch.Tensor
    aux: PyTree
    hyperparams: dict[str, Any] | None
    params: PyTree
    solver: ImplicitReport | None = None
    trajectory: Trajectory | None = None


@dataclasses.dataclass(frozen=True)
class Setup:
    """The checked, normalised arguments of one public call (see ``set_up``).

    ``hyperparams`` holds every hyperparameter (the optimizer's, with the call's replacements),
    those named by ``wrt`` as tensors; ``outer`` is ``outer(params, buffers, aux)`` with the
    outer batch bound (``None`` for an unroll); ``method`` is ``None`` for an unroll.
    ``computed``: the hyperparameters ``hyperparams=fn`` computed from aux whose gradient the
    finish chains into aux's (they are among ``hyper_names``), or ``None``; ``report``: the
    hyperparameter names ``wrt`` asked for, whose gradients the result reports; ``watched``:
    aux's tensors and their versions, checked unchanged at the finish.
    """

    inner_loss: Callable[..., Any]
    params: PyTree
    opt: Optimizer
    source: Batches
    aux: PyTree
    state: PyTree
    buffers: PyTree
    hyperparams: dict[str, Any]
    seed: int
    inner_grad: str
    compile: Compile | None
    progress: bool
    check_finite: bool
    method: Method | None = None
    targets: tuple[str, ...] = ()
    hyper_names: tuple[str, ...] = ()
    outer: Callable[[PyTree, PyTree, PyTree], torch.Tensor] | None = None
    clients: Clients | None = None
    computed: _hyper.Computed | None = None
    report: tuple[str, ...] = ()
    watched: tuple[tuple[str, torch.Tensor, int], ...] = ()
    outer_loss: Callable[..., Any] | None = None  # as passed (tasks bind each client's batch)
    outer_batch: Any = None  # a copy of the caller's
    process_group: Any = None

    @property
    def has_buffers(self) -> bool:
        """Whether buffers are carried from step to step."""
        return self.buffers is not None

    @property
    def first_order(self) -> bool:
        """Whether the step must detach its inner gradient (the method says so)."""
        return self.method is not None and self.method.first_order

    @property
    def math_attention(self) -> bool:
        """Whether every step and the outer loss run attention through its math backend.

        So in a call that differentiates inner gradients (every method but ``"first_order"``):
        the steps it runs without a graph (``hg.Checkpointed``'s first pass, ``hg.Truncated``'s
        first steps) draw the same dropout masks as those it differentiates, and forward mode
        gets the forward-mode rules it needs in the outer loss too. And with clients: torch's
        fused kernels have no vmap rule. Other steps choose for themselves
        (``hypergrad._engine.step``).
        """
        differentiates = self.method is not None and not self.method.first_order
        return differentiates or self.clients is not None

    @property
    def step_inner_grad(self) -> str:
        """How the step takes the inner gradient: torch.func where a transform or compile needs it."""
        functional = self.method is not None and self.method.functional
        return "func" if functional or self.compile is not None else self.inner_grad


def set_up(
    inner_loss: Callable[..., Any],
    params: PyTree,
    opt: Optimizer,
    batches: Any,
    *,
    steps: int | None,
    aux: PyTree,
    state: PyTree,
    buffers: PyTree,
    hyperparams: Mapping[str, Any] | Callable[[PyTree], Mapping[str, Any]] | None,
    seed: int | None,
    inner_grad: str,
    compile: bool | str | Compile,
    progress: bool,
    check_finite: bool,
    method: str | Method | None = None,
    wrt: str | Sequence[str] = ("aux",),
    outer_loss: Callable[..., Any] | None = None,
    outer_batch: Any = None,
    clients: Clients | None = None,
    process_group: Any = None,
) -> Setup:
    """Check a public call's arguments and normalise them into a ``Setup`` (the front door).

    The public entry points pass every argument they received by name (``set_up(**locals())``).
    Without ``method`` it sets up an unroll (``wrt`` and the outer loss unused). With
    ``clients``, ``steps`` counts the local steps of one round.
    """
    how = None if method is None else resolve(method)
    _check_losses(inner_loss, outer_loss, needs_outer=how is not None)
    check_opt(opt)
    check_params(params)
    check_clients(clients)
    source = Batches(batches, steps if clients is None else clients.total_steps(steps))
    _check_seed(seed)
    moving = entering(opt) if how is not None and how.fixed_point else None  # Implicit's optimum
    hp, targets, names, computed, report = _hyper.resolve_call(
        hyperparams, copied(aux), aux, opt, wrt, params, differentiating=how is not None,
        moving=moving,
    )  # fmt: skip
    if "aux" in targets:
        check_float(aux, "aux")
    options = _check_modes(how, inner_grad, compile)
    # The losses get copies: an in-place change inside them never reaches the caller's tensors.
    params, aux, state, buffers = copied((params, aux, state, buffers))
    outer_batch = copied(outer_batch)
    setup = Setup(
        inner_loss=inner_loss,
        params=params,
        opt=opt,
        source=source,
        aux=aux,
        state=state,
        buffers=buffers,
        hyperparams=hp,
        seed=draw_seed() if seed is None else seed,
        inner_grad=inner_grad,
        compile=options,
        progress=progress,
        check_finite=check_finite,
        method=how,
        targets=targets,
        hyper_names=names,
        clients=clients,
        computed=computed,
        report=report,
        watched=watch(aux),
        outer_batch=outer_batch,
        process_group=process_group,
    )
    if outer_loss is None:
        return setup
    outer = outer_fn(
        outer_loss, outer_batch, buffers is not None, math_attention=setup.math_attention
    )
    return dataclasses.replace(setup, outer=outer, outer_loss=outer_loss)


def _check_seed(seed: Any) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(
            f"{caller()}: seed must be an int or None, got {seed!r}. Step k runs with "
            "torch.manual_seed(seed + k); pass e.g. seed=0, or None to draw one."
        )


def _check_modes(how: Method | None, inner_grad: str, compile: Any) -> Compile | None:
    """``inner_grad`` and ``compile`` checked, and checked against the method; the options."""
    check_inner_grad(inner_grad)
    options = check_compile(compile)
    if how is not None and how.functional and inner_grad == "autograd":
        raise ValueError(
            f"{caller()}: method {how!r} runs torch.func.jvp through the steps, which needs "
            "inner_grad='func' (or 'auto'); torch.autograd.grad cannot run under it."
        )
    if options is not None and inner_grad == "autograd":
        raise ValueError(
            f"{caller()}: compile={compile!r} compiles the inner gradient with torch.func, so it "
            "needs inner_grad='func' or 'auto'; torch.autograd.grad inside torch.compile breaks "
            "the graph. Pass inner_grad='auto', or compile=False."
        )
    return options


def _check_losses(inner_loss: Any, outer_loss: Any, needs_outer: bool) -> None:
    losses = [("inner_loss", inner_loss, "inner_loss(params, aux, batch) -> scalar")]
    if needs_outer:
        losses.append(("outer_loss", outer_loss, "outer_loss(params, aux, outer_batch) -> scalar"))
    for name, fn, signature in losses:
        if not callable(fn):
            raise TypeError(
                f"{caller()}: {name} must be a function {signature}, got {type(fn).__name__}. "
                "The arguments come in the order (outer_loss, inner_loss, params, opt, batches, "
                "outer_batch) for a hypergradient, (inner_loss, params, opt, batches) for an "
                "unroll."
            )


def no_outer(params: PyTree, buffers: PyTree, aux: PyTree) -> torch.Tensor:
    """The outer loss of an unroll, which differentiates nothing."""
    return torch.zeros(())


def single_problem(setup: Setup) -> Problem:
    """The problem of one model: the engine's step (compiled if asked) in the K-step loop."""
    step = make_step(
        setup.inner_loss,
        setup.opt,
        has_buffers=setup.has_buffers,
        inner_grad=setup.step_inner_grad,
        first_order=setup.first_order,
        compile=setup.compile,
        steps=setup.source.steps,
        math_attention=setup.math_attention,
    )
    return Problem(
        step=step,
        outer=setup.outer or no_outer,
        params=setup.params,
        state=setup.state,
        buffers=setup.buffers,
        aux=setup.aux,
        hyperparams=setup.hyperparams,
        batch_at=setup.source.at,
        steps=setup.source.steps,
        seed=setup.seed,
        targets=setup.targets,
        hyper_names=setup.hyper_names,
        devices=rng_devices(setup.params),
        init=lambda p, h: setup.opt.init(p, hyperparams=h),
        multi=multi_step(step),
        condition=make_condition(
            setup.inner_loss,
            setup.opt,
            setup.hyperparams,
            has_buffers=setup.has_buffers,
            batch_at=setup.source.at,
        ),
        in_place=True,
    )


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, desc: str) -> Iterator[Any]:
    """A tqdm bar (or ``None``) whose ``update`` is passed as ``Problem.on_step``."""
    if not enabled:
        yield None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            f"{caller()}: progress=True needs tqdm, which is not installed. Install it with "
            "`pip install tqdm`, or pass progress=False."
        ) from None
    bar = tqdm(total=total, desc=desc, unit="step")
    try:
        yield bar
    finally:
        bar.close()


def _with_bar(problem: Problem, bar: Any) -> Problem:
    return problem if bar is None else dataclasses.replace(problem, on_step=lambda: bar.update(1))


class Runner(Protocol):
    """What ``differentiate`` runs: a method, or a transform's own way to run one."""

    def evaluations(self, problem: Problem) -> int: ...

    def __call__(self, problem: Problem) -> MethodResult: ...


def differentiate(setup: Setup, problem: Problem, runner: Runner | None = None) -> Hypergradient:
    """Run the method on ``problem`` and finish: finite check, unused-aux warning, result."""
    how = setup.method
    assert how is not None, "differentiate needs a Setup with a method"
    how.validate(problem)
    run = runner or how
    with progress_bar(setup.progress, run.evaluations(problem), repr(how)) as bar:
        try:
            result = run(_with_bar(problem, bar))
        except (RuntimeError, NotImplementedError) as error:
            unchanged(setup.watched)  # a loss changed aux in place before it failed: say so
            explained = explain_missing_rule(error, repr(how))
            if explained is None:
                raise
            raise explained from error
    setup.source.verify()  # the last batch handed out: unchanged (see Batches.at)
    unchanged(setup.watched)  # and aux (the copy every step saw)
    # Before the finite check: over processes, its vote is the call's last exchange.
    grads, unused = result.grads, result.unused
    if setup.computed is not None:  # hyperparams=fn(aux): their gradient flows on into aux
        grads, unused = _hyper.chain(setup.computed, grads, unused, setup.report)
    _warn_unused(unused, how)
    if setup.check_finite:
        leaves = [g for g in _tree.leaves(grads) if isinstance(g, torch.Tensor)]
        bad = not all_finite(result.value, result.losses, *leaves)
        if _anywhere(problem, bad):
            if bad:
                raise_nonfinite(problem, result.value, grads)
            locate_nonfinite(problem)  # another process's: replay in step with it
    carry = result.carry  # None: a method of the user's own that does not keep it
    traj = None if carry is None else Trajectory(*carry, result.losses)
    return Hypergradient(
        result.value,
        grads.get("aux"),
        grads.get("hyperparams"),
        grads.get("params"),
        result.report,
        traj,
    )


def _warn_unused(unused: tuple[str, ...], how: Method) -> None:
    prefix = "['aux']"
    for path in unused:
        if not path.startswith(prefix):
            continue
        where = "aux" + path[len(prefix) :]
        if how.first_order:
            why = (
                "with method='first_order' (inner gradients held constant), so its "
                "hypergradient is identically zero. Use an exact method for aux that enters "
                "only the inner loss."
            )
        else:
            why = (
                "through the unroll: its hypergradient is identically zero. Check that "
                "inner_loss or outer_loss uses it, or remove it from aux."
            )
        warnings.warn(
            f"{caller()}: {where} does not affect the outer loss {why}", UserWarning, stacklevel=4
        )


def _anywhere(problem: Problem, bad: bool) -> bool:
    """Whether a nan/inf was found here or, for a problem spread over processes, in any of them.

    Every process then replays the unroll together (the replay runs the same collectives), and
    the ones that find the nan/inf raise; the others learn of it at their next collective. Over
    processes the vote is the call's last exchange when it finds nothing (``Ranks.any``): the
    caller returns right after it, running nothing that could raise.
    """
    return bad if problem.agree is None else problem.agree(bad)


def trajectory(setup: Setup, problem: Problem) -> Trajectory:
    """Run the whole loop of ``problem`` and finish: finite check, result."""
    with progress_bar(setup.progress, problem.steps, "unroll") as bar:
        run = _with_bar(problem, bar)
        carry, aux, hp = run.bind({})
        carry, losses = run_steps(run, carry, aux, hp, 0, problem.steps, donate=True)
    setup.source.verify()  # the last batch handed out: unchanged (see Batches.at)
    unchanged(setup.watched)  # and aux (the copy every step saw)
    stacked = torch.stack(losses)
    if problem.total is not None:  # over processes: each one's share of the losses, summed
        stacked = problem.total(stacked)
    if setup.check_finite and not in_functorch_transform():
        final = [x for x in _tree.leaves(carry.params) if isinstance(x, torch.Tensor)]
        if _anywhere(problem, not all_finite(stacked, *final)):
            locate_nonfinite(problem)
    return Trajectory(carry.params, carry.state, carry.buffers, stacked)

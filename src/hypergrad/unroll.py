"""The K-step loop, written once: the step function, the batch source, the problem, the trajectory.

Public: [`unroll`][hypergrad.unroll] and [`Trajectory`][hypergrad.unroll.Trajectory]. Everything
else in this module is the engine's internal API, the contract between the loop and the code that
plugs into it (``methods/``, ``hypergradient.py``, ``clients.py``, the compiled fast path).

The internal API
----------------

**Step function.** One pure function advances the carry by one optimizer step:

    step(params, state, buffers, aux, hyperparams, batch) -> (params, state, buffers, loss)

``make_step`` builds it from ``(inner_loss, opt)``. It never mutates its inputs and never
touches the global RNG (the loop seeds each step, see below). Two ways to take the inner gradient:

- ``inner_grad="func"``: ``torch.func.grad_and_value``. The step is then a composition of
  torch.func transforms, so it may be wrapped in ``torch.func.vmap`` (many clients),
  ``torch.func.jvp`` (the ``"forward"`` method) or ``torch.compile``.
- ``inner_grad="autograd"``: ``torch.autograd.grad(create_graph=True)``; not transformable by
  torch.func, measurably faster in eager mode on CPU (see ``benchmarks/unroll.py``).
- ``inner_grad="auto"`` (default): ``"func"`` when called inside a torch.func transform,
  otherwise ``"autograd"``. Both give the same numbers.

Under ``torch.no_grad()`` the step still computes the inner gradient but records no meta-graph
(this is how ``Truncated`` and ``Checkpointed`` run steps they do not differentiate). With
``first_order=True`` the inner gradient is detached (stop-gradient), which is the
``"first_order"`` method.

**Multi-step.** A compiled step also runs several consecutive steps as one graph: the
``Problem`` carries it as ``multi`` (from ``multi_step``), an object with ``length``
(steps per call), ``fits(k)`` (whether steps ``k .. k+length-1`` may run as one call) and
``several(params, state, buffers, aux, hyperparams, batches) -> (params, state, buffers,
losses)`` or ``None`` (run these steps one by one instead). ``run_steps`` uses it where it
fits; methods never see it. ``hg.clients`` wraps it to keep chunks inside a federated round.

**Problem.** A ``Problem`` holds everything a method needs: the step, the outer function
``outer(params, buffers, aux) -> scalar`` (the outer batch is already bound), the initial carry
``(params, state, buffers)``, ``aux``, ``hyperparams``, ``batch_at(k)``, the number of steps ``K``,
the base seed, and *which* inputs to differentiate (``targets``). A method

1. gets the differentiable inputs with ``Problem.inputs`` (a dict with some of the keys
   ``"aux"``, ``"hyperparams"``, ``"params"``),
2. maps them to the loop's inputs with ``Problem.bind``,
3. runs steps ``[start, stop)`` with ``run_steps`` (as many times, and under whatever autograd
   mode, it likes: the loop is deterministic given the problem),
4. evaluates ``Problem.outer`` and differentiates.

Methods never build a step. A caller that wants a vmapped step over stacked clients, or a
``torch.compile``-d one, builds the problem with that step (and an ``outer`` that aggregates the
clients) and hands it to any method unchanged. Methods declare what they need from the step:
``method.first_order`` (the step must detach its inner gradient) and ``method.functional`` (the
step must be transformable by torch.func, i.e. ``inner_grad="func"``).

**Randomness.** Step ``k`` (fetching its batch, then the step) runs after
``torch.manual_seed(seed + k)`` inside ``torch.random.fork_rng`` (and the outer loss with
``seed + K``, see ``Problem.value``), where ``seed`` is drawn once per call from the global
generator (or passed by the user). Dropout masks
are therefore identical when a method recomputes a step (checkpointing, forward-mode chunks), and
the caller's global RNG stream advances by exactly one draw per call.

**Batches.** ``Batches`` turns any accepted batch argument into ``batch_at(k)``. A tensor,
tuple or dict of tensors is indexed along its leading (step) dimension; a callable is called with
``k``; any other iterable (a list, a generator, a DataLoader) is consumed lazily and each batch is
kept, so recomputation sees the same batch (this keeps references to K batches: pass a tensor or a
callable for very long unrolls if that memory matters).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import optree
import torch

from hypergrad import tree as _tree
from hypergrad._compile import Compile, check_compile, compile_step, step_key
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree

__all__ = [
    "Batches",
    "Carry",
    "Problem",
    "StepFn",
    "Trajectory",
    "build_step",
    "check_opt",
    "check_params",
    "draw_seed",
    "first_nonfinite",
    "locate_nonfinite",
    "make_step",
    "manual_seed",
    "multi_step",
    "requires_grad",
    "run_steps",
    "seeded",
    "unroll",
]

StepFn = Callable[..., tuple[PyTree, PyTree, PyTree, torch.Tensor]]


class Trajectory(NamedTuple):
    """The result of [`unroll`][hypergrad.unroll].

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


class Carry(NamedTuple):
    """What the loop carries from step to step."""

    params: PyTree
    state: PyTree
    buffers: PyTree


# --------------------------------------------------------------------------------------------
# The step function


def in_functorch_transform() -> bool:
    """True when called inside a torch.func transform (grad, vmap, jvp, ...)."""
    return torch._C._functorch.maybe_current_level() is not None


def _call_inner(
    inner_loss: Callable[..., Any],
    has_buffers: bool,
    caller: str,
    params: PyTree,
    aux: PyTree,
    batch: Any,
    buffers: PyTree,
) -> tuple[torch.Tensor, PyTree]:
    if has_buffers:
        out = inner_loss(params, aux, batch, buffers)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"{caller}: buffers are carried, so inner_loss(params, aux, batch, buffers) must "
                f"return (loss, new_buffers); it returned {type(out).__name__}. Return the "
                "updated buffers too, or pass buffers=None."
            )
        loss, new_buffers = out
    else:
        loss = inner_loss(params, aux, batch)
        if isinstance(loss, tuple):
            raise TypeError(
                f"{caller}: inner_loss(params, aux, batch) returned a tuple; without buffers it "
                "must return a scalar tensor. To carry BatchNorm statistics, pass buffers= and "
                "return (loss, new_buffers) from inner_loss(params, aux, batch, buffers)."
            )
        new_buffers = buffers
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = (
            f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        )
        raise ValueError(
            f"{caller}: inner_loss must return a scalar (0-d) tensor, got {got}. Reduce it, "
            "e.g. return loss.mean()."
        )
    return loss, new_buffers


def requires_grad(tree: PyTree) -> bool:
    """Whether any tensor leaf of ``tree`` requires grad."""
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in _tree.leaves(tree))


def make_step(
    inner_loss: Callable[..., Any],
    opt: Optimizer,
    *,
    has_buffers: bool,
    inner_grad: str = "auto",
    first_order: bool = False,
    caller: str = "hg.unroll",
) -> StepFn:
    """Build the pure step function ``step(params, state, buffers, aux, hyperparams, batch)``.

    Args:
        inner_loss: ``inner_loss(params, aux, batch)`` returning a scalar, or, when
            ``has_buffers``, ``inner_loss(params, aux, batch, buffers)`` returning
            ``(loss, new_buffers)``.
        opt: the functional optimizer.
        has_buffers: whether buffers are carried.
        inner_grad: ``"func"``, ``"autograd"`` or ``"auto"`` (see the module docstring).
        first_order: detach the inner gradient (no second-order terms).
        caller: the public name used in error messages.

    Returns:
        ``step(params, state, buffers, aux, hyperparams, batch) -> (params, state, buffers, loss)``.

    Examples:
        >>> opt = hg.optim.sgd(lr=0.1)
        >>> step = make_step(lambda p, a, b: (p["w"] ** 2).sum(), opt, has_buffers=False)
        >>> params = {"w": torch.tensor([1.0])}
        >>> new_params, state, buffers, loss = step(
        ...     params, opt.init(params), None, None, {"lr": 0.1}, None)
        >>> new_params, loss
        ({'w': tensor([0.8000])}, tensor(1.))
    """
    if inner_grad not in ("auto", "func", "autograd"):
        raise ValueError(
            f"{caller}: inner_grad must be 'auto', 'func' or 'autograd', got {inner_grad!r}."
        )

    def loss_fn(params: PyTree, aux: PyTree, batch: Any, buffers: PyTree) -> Any:
        return _call_inner(inner_loss, has_buffers, caller, params, aux, batch, buffers)

    def grad_func(params, aux, batch, buffers):
        if has_buffers:
            (grads, (loss, new_buffers)) = torch.func.grad_and_value(loss_fn, has_aux=True)(
                params, aux, batch, buffers
            )
        else:
            grads, loss = torch.func.grad_and_value(lambda p: loss_fn(p, aux, batch, None)[0])(
                params
            )
            new_buffers = None
        if first_order:
            grads = _tree.detach(grads)
        return grads, loss, new_buffers

    def grad_autograd(params, aux, batch, buffers):
        flat, spec = optree.tree_flatten(params, namespace=_tree._NAMESPACE)
        # A meta-graph is needed only when the inner loss depends on something that requires
        # grad (params or aux); hyperparameters enter later, in opt.step.
        create = (
            torch.is_grad_enabled()
            and not first_order
            and (requires_grad(flat) or requires_grad(aux))
        )
        with torch.enable_grad():
            leaves = [
                p if (create and p.requires_grad) else p.detach().requires_grad_() for p in flat
            ]
            loss, new_buffers = loss_fn(optree.tree_unflatten(spec, leaves), aux, batch, buffers)
            grads = torch.autograd.grad(
                loss, leaves, create_graph=create, allow_unused=True, materialize_grads=True
            )
        if not create:
            loss, new_buffers = loss.detach(), _tree.detach(new_buffers)
        return optree.tree_unflatten(spec, list(grads)), loss, new_buffers

    def step(params, state, buffers, aux, hyperparams, batch):
        use_func = inner_grad == "func" or (inner_grad == "auto" and in_functorch_transform())
        compute = grad_func if use_func else grad_autograd
        grads, loss, new_buffers = compute(params, aux, batch, buffers)
        new_params, new_state = opt.step(params, grads, state, hyperparams=hyperparams)
        return new_params, new_state, new_buffers, loss

    return step


def build_step(
    inner_loss: Callable[..., Any],
    opt: Optimizer,
    *,
    has_buffers: bool,
    inner_grad: str = "auto",
    first_order: bool = False,
    compile: bool | str | Compile = False,
    steps: int = 1,
    caller: str = "hg.unroll",
) -> StepFn:
    """``make_step``, compiled (and cached) when ``compile`` asks (see ``hypergrad._compile``).

    A compiled step takes its inner gradient with ``torch.func`` (``inner_grad="func"``) and must
    be given every hyperparameter (``{**opt.hyperparams, **changes}``) at each call; it also
    runs several steps per graph (``multi_step``), how many chosen from ``steps`` (K).

    Examples:
        >>> opt = hg.optim.sgd(lr=0.1)
        >>> step = build_step(lambda p, a, b: (p["w"] ** 2).sum(), opt, has_buffers=False)
        >>> step({"w": torch.tensor([1.0])}, opt.init({}), None, None, {"lr": 0.1}, None)[0]
        {'w': tensor([0.8000])}
    """
    options = check_compile(compile, caller=caller)
    if options is not None and inner_grad == "autograd":
        raise ValueError(
            f"{caller}: compile={compile!r} compiles the inner gradient with torch.func, so it "
            "needs inner_grad='func' or 'auto'; torch.autograd.grad inside torch.compile breaks "
            "the graph. Pass inner_grad='auto', or compile=False."
        )
    step = make_step(
        inner_loss,
        opt,
        has_buffers=has_buffers,
        inner_grad="func" if options is not None else inner_grad,
        first_order=first_order,
        caller=caller,
    )
    key = step_key(inner_loss, opt, has_buffers=has_buffers, first_order=first_order)
    return compile_step(step, compile=options, caller=caller, key=key, steps=steps)


def multi_step(step: StepFn) -> Any:
    """The multi-step of a compiled ``step`` (see ``run_steps``), or ``None`` for others.

    Examples:
        >>> opt = hg.optim.sgd(lr=0.1)
        >>> multi_step(build_step(lambda p, a, b: p["w"].sum(), opt, has_buffers=False)) is None
        True
    """
    return step if hasattr(step, "several") else None


# --------------------------------------------------------------------------------------------
# Batches


def _is_stacked(batches: Any) -> bool:
    if isinstance(batches, torch.Tensor):
        return True
    if isinstance(batches, (tuple, Mapping)):
        leaves = _tree.leaves(batches)
        return bool(leaves) and all(isinstance(x, torch.Tensor) for x in leaves)
    return False


class Batches:
    """``batch_at(k)`` over a stacked tensor tree, a callable, or a lazily consumed iterable.

    Args:
        batches: a tensor / tuple / dict of tensors with a leading step dimension, a callable
            ``batch_fn(k)``, or an iterable of batches (a list, generator, DataLoader).
        steps: the number of steps K; may be omitted for stacked batches and sized iterables.
        caller: the public name used in error messages.

    Examples:
        >>> b = Batches(torch.arange(6.0).reshape(3, 2), None, caller="hg.unroll")
        >>> b.steps, b.at(2)
        (3, tensor([4., 5.]))
        >>> Batches(lambda k: k * 10, 4, caller="hg.unroll").at(3)
        30
    """

    def __init__(self, batches: Any, steps: int | None, *, caller: str) -> None:
        self._caller = caller
        self._fn: Callable[[int], Any] | None = None
        self._stacked: Any = None
        self._iter: Iterator[Any] | None = None
        self._seen: list[Any] = []
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"{caller}: steps must be a positive int, got {steps!r}.")
        if _is_stacked(batches):
            sizes = {x.shape[0] if x.dim() else None for x in _tree.leaves(batches)}
            if len(sizes) != 1 or None in sizes:
                raise ValueError(
                    f"{caller}: stacked batches must all have the same leading (step) dimension; "
                    f"got leading sizes {sorted(str(s) for s in sizes)}. Pass tensors shaped "
                    "(K, ...), a list of batches, or a function batch_fn(k)."
                )
            available = sizes.pop()
            steps = available if steps is None else steps
            if steps > available:
                raise ValueError(
                    f"{caller}: batches ran out at step {available}: the stacked batches hold "
                    f"{available} steps but steps={steps}. Pass steps={available} or more batches."
                )
            self._stacked = batches
        elif callable(batches):
            if steps is None:
                raise ValueError(
                    f"{caller}: batches is a function of the step index, so the number of steps "
                    "is unknown; pass steps=K."
                )
            self._fn = batches
        elif isinstance(batches, Iterable):
            if steps is None:
                try:
                    steps = len(batches)  # type: ignore[arg-type]
                except TypeError:
                    raise ValueError(
                        f"{caller}: batches is an iterable without a length; pass steps=K."
                    ) from None
                if steps < 1:
                    raise ValueError(f"{caller}: batches is empty; pass at least one batch.")
            self._iter = iter(batches)
        else:
            raise TypeError(
                f"{caller}: batches must be a tensor (or tuple/dict of tensors) with a leading "
                f"step dimension, an iterable of batches, or a function batch_fn(k); got "
                f"{type(batches).__name__}."
            )
        self.steps: int = steps

    def at(self, k: int) -> Any:
        """The batch of step ``k`` (the same object every time it is asked for)."""
        if self._stacked is not None:
            return _tree.map(lambda x: x[k], self._stacked)
        if self._fn is not None:
            return self._fn(k)
        while len(self._seen) <= k:
            try:
                self._seen.append(next(self._iter))  # type: ignore[arg-type]
            except StopIteration:
                n = len(self._seen)
                raise ValueError(
                    f"{self._caller}: batches ran out at step {n} of {self.steps}: the iterable "
                    f"yielded only {n} batches. Pass steps={n}, or a longer iterable (e.g. "
                    "itertools.cycle(batches))."
                ) from None
        return self._seen[k]


# --------------------------------------------------------------------------------------------
# The problem and the loop


@contextlib.contextmanager
def seeded(seed: int, devices: tuple[int, ...] = ()) -> Iterator[None]:
    """Run the body with ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``.

    The global generators (CPU and the given CUDA devices) are restored afterwards.

    Examples:
        >>> with seeded(3):
        ...     a = torch.rand(1)
        >>> with seeded(3):
        ...     b = torch.rand(1)
        >>> torch.equal(a, b)
        True
    """
    with torch.random.fork_rng(devices=list(devices)):
        manual_seed(seed, devices)
        yield


def manual_seed(seed: int, devices: tuple[int, ...] = ()) -> None:
    """Seed the CPU generator and those of the given CUDA devices.

    Unlike ``torch.manual_seed`` this does not queue a lazy seeding of every accelerator
    backend, which records a Python stack trace per call (milliseconds per step on CPU).

    Examples:
        >>> manual_seed(0); a = torch.rand(1)
        >>> manual_seed(0); torch.equal(a, torch.rand(1))
        True
    """
    torch.default_generator.manual_seed(seed)
    for index in devices:
        torch.cuda.default_generators[index].manual_seed(seed)


def draw_seed() -> int:
    """Draw the per-call base seed: exactly one draw from the global torch generator."""
    return int(torch.randint(0, 2**62, ()).item())


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
    """
    losses: list[torch.Tensor] = []
    params, state, buffers = carry
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
            params, state, buffers, loss = problem.step(
                params, state, buffers, aux, hyperparams, batch
            )
            losses.append(loss)
            if problem.on_step is not None:
                problem.on_step()
            k += 1
    return Carry(params, state, buffers), losses


def check_opt(opt: Any, *, caller: str) -> None:
    """Raise a teaching error if ``opt`` is not an [`Optimizer`][hypergrad.optim.Optimizer].

    Examples:
        >>> check_opt(torch.optim.SGD([torch.zeros(1)], lr=0.1), caller="hg.hypergrad")
        Traceback (most recent call last):
        ...
        TypeError: hg.hypergrad: opt must be a hypergrad optimizer such as hg.optim.sgd(lr=0.1), got SGD. Convert a torch optimizer with hg.optim.from_torch.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(
            f"{caller}: opt must be a hypergrad optimizer such as hg.optim.sgd(lr=0.1), got "
            f"{type(opt).__name__}. Convert a torch optimizer with hg.optim.from_torch."
        )


def check_params(params: PyTree, *, caller: str) -> None:
    """Raise a teaching error unless ``params`` is a non-empty tree of floating-point tensors.

    Examples:
        >>> check_params(torch.nn.Linear(2, 1), caller="hg.unroll")
        Traceback (most recent call last):
        ...
        TypeError: hg.unroll: params must be a tree of tensors (e.g. the dict from hg.split(model)), got a Linear at <root>. Pass params, _ = hg.split(model), and call the module with hg.call(model, params, x) inside the losses.
    """
    paths, leaves, _ = optree.tree_flatten_with_path(params, namespace=_tree._NAMESPACE)
    if not leaves:
        raise ValueError(
            f"{caller}: params has no tensors (got {params!r}). Pass the parameters to train, "
            "e.g. params, _ = hg.split(model)."
        )
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{caller}: params must be a tree of tensors (e.g. the dict from hg.split(model)), "
                f"got a {type(leaf).__name__} at {_tree.keystr(path)}. Pass params, _ = "
                "hg.split(model), and call the module with hg.call(model, params, x) inside the "
                "losses."
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{caller}: params leaf {_tree.keystr(path)} is {leaf.dtype}; only floating-point "
                "tensors can be trained. Move integer tensors into buffers or the batch."
            )


def first_nonfinite(tree: PyTree) -> str | None:
    """The key path of the first floating-point leaf holding nan/inf, or ``None``."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, namespace=_tree._NAMESPACE)
    for p, x in zip(paths, leaves):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(x.isfinite().all()):
            return _tree.keystr(p)
    return None


def locate_nonfinite(problem: Problem, *, caller: str) -> None:
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
            f"{caller}: the initial params are not finite at {bad}. Check the initialisation."
        )
    with torch.no_grad():
        for k in range(problem.steps):
            new, losses = run_steps(problem, carry, aux, hp, k, k + 1)
            if not bool(losses[0].isfinite().all()):  # one loss, or one per client
                raise FloatingPointError(
                    f"{caller}: the inner loss is {losses[0].tolist()} at step {k} (steps count "
                    "from 0). Check the batch of that step, lower the learning rate, or clip "
                    "the loss."
                )
            for name, tree in (("params", new.params), ("optimizer state", new.state)):
                bad = first_nonfinite(tree)
                if bad is not None:
                    raise FloatingPointError(
                        f"{caller}: at step {k} the update made {name} {bad} nan/inf (its "
                        "inner gradient or the optimizer update is not finite). Lower the "
                        "learning rate, clip gradients in inner_loss, or check the data."
                    )
            carry = new


def all_finite(*tensors: torch.Tensor) -> bool:
    """One device sync: whether every given tensor is finite."""
    flags = [t.detach().isfinite().all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def rng_devices(tree: PyTree) -> tuple[int, ...]:
    """CUDA device indices among the leaves of ``tree`` (forked around each step)."""
    return tuple(
        sorted(
            {
                x.device.index or 0
                for x in _tree.leaves(tree)
                if isinstance(x, torch.Tensor) and x.device.type == "cuda"
            }
        )
    )


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, desc: str, caller: str) -> Iterator[Any]:
    """A tqdm bar (or ``None``) whose ``update`` is passed as ``Problem.on_step``."""
    if not enabled:
        yield None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            f"{caller}: progress=True needs tqdm, which is not installed. Install it with "
            "`pip install tqdm`, or pass progress=False."
        ) from None
    bar = tqdm(total=total, desc=desc, unit="step")
    try:
        yield bar
    finally:
        bar.close()


def outer_fn(
    outer_loss: Callable[..., Any], outer_batch: Any, has_buffers: bool, caller: str
) -> Callable[[PyTree, PyTree, PyTree], torch.Tensor]:
    """Bind the outer batch: ``outer(params, buffers, aux) -> scalar`` (shape-checked)."""

    def outer(params: PyTree, buffers: PyTree, aux: PyTree) -> torch.Tensor:
        if has_buffers:
            value = outer_loss(params, aux, outer_batch, buffers)
        else:
            value = outer_loss(params, aux, outer_batch)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            got = (
                f"shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise ValueError(
                f"{caller}: outer_loss must return a scalar (0-d) tensor, got {got}. Reduce it, "
                "e.g. return loss.mean()."
            )
        return value

    return outer


# --------------------------------------------------------------------------------------------
# Public: unroll


def unroll(
    inner_loss: Callable[..., Any],
    params: PyTree,
    opt: Optimizer,
    batches: Any,
    *,
    aux: PyTree = None,
    state: PyTree = None,
    buffers: PyTree = None,
    steps: int | None = None,
    hyperparams: Mapping[str, Any] | None = None,
    seed: int | None = None,
    progress: bool = False,
    inner_grad: str = "auto",
    check_finite: bool = True,
    compile: bool | str | Compile = False,
) -> Trajectory:
    """Run K differentiable optimizer steps of ``inner_loss`` and return the ``Trajectory``.

    The steps are recorded by autograd whenever an input requires grad (``params``, ``aux``, a
    tensor hyperparameter), so ``torch.autograd.grad`` of anything computed from the result
    flows back through all K steps. For a hypergradient with a choice of method (checkpointing,
    truncation, forward mode), use [`hg.hypergrad`][hypergrad.hypergrad]. Inputs are never modified.

    Args:
        inner_loss: ``inner_loss(params, aux, batch) -> scalar``; when ``buffers`` is given it is
            called as ``inner_loss(params, aux, batch, buffers)`` and must return
            ``(loss, new_buffers)`` (e.g. BatchNorm running statistics).
        params: the initial parameters (a pytree, e.g. from ``hg.split(model)``).
        opt: a functional optimizer, e.g. ``hg.optim.sgd(lr=0.1)``.
        batches: a tensor / tuple / dict of tensors with a leading step dimension, an iterable
            of batches (consumed lazily), or a function ``batch_fn(k)``.
        aux: a pytree passed unchanged to ``inner_loss`` at every step.
        state: the initial optimizer state; default ``opt.init(params, hyperparams=...)``.
        buffers: the initial buffers; ``None`` when nothing is carried. torch updates
            BatchNorm's running statistics without autograd, so every method treats them as
            constants: no hypergradient flows through them (an outer loss in eval mode sees
            them, but not their dependence on ``aux``). Buffers computed with differentiable
            ops (a functional moving average) are differentiated like the params.
        steps: K; default: the number of stacked batches, or ``len(batches)``.
        hyperparams: replaces ``opt.hyperparams`` (same keys); tensors here are differentiable.
        seed: base seed; step ``k`` runs with ``torch.manual_seed(seed + k)`` inside
            ``torch.random.fork_rng``. Default: one draw from the global generator.
        progress: show a tqdm progress bar.
        inner_grad: how the step takes the inner gradient: ``"auto"``, ``"func"`` or
            ``"autograd"`` (same numbers; see the ``hypergrad.unroll`` module docstring).
        check_finite: after the loop, check (one device sync) that the losses and final params
            are finite; if not, replay to find the step and key and raise.
        compile: ``True`` compiles the steps (inner gradient + update) with ``torch.compile``,
            several consecutive steps per graph, and reuses the graphs across calls with the
            same ``inner_loss`` and optimizer family (see [`hg.Compile`][hypergrad.Compile]); where
            that fails it runs eagerly with one ``hg.CompileFallbackWarning``; ``"strict"``
            raises ``hg.CompileError`` instead; ``hg.Compile(steps_per_graph=S)`` sets how many
            steps one graph runs. A compiled trajectory supports one backward pass (no
            ``create_graph``).

    Returns:
        A [`Trajectory`][hypergrad.unroll.Trajectory] ``(params, state, buffers, losses)`` with
        ``losses`` of shape ``(K,)``.

    Raises:
        ValueError: a non-scalar inner loss, or batches that run out before ``steps``.
        FloatingPointError: a nan/inf loss or update (names the step and the key path).

    Examples:
        >>> loss = lambda p, aux, x: ((p["w"] - x) ** 2).sum()
        >>> traj = hg.unroll(loss, {"w": torch.tensor([0.0])}, hg.optim.sgd(lr=0.25), torch.ones(3, 1))
        >>> traj.params["w"], traj.losses
        (tensor([0.8750]), tensor([1.0000, 0.2500, 0.0625]))
    """
    caller = "hg.unroll"
    check_params(params, caller=caller)
    source = Batches(batches, steps, caller=caller)
    hp = dict(opt.hyperparams)  # every value: a cached compiled step may close over another opt
    hp.update(hyperparams or {})
    step = build_step(
        inner_loss,
        opt,
        has_buffers=buffers is not None,
        inner_grad=inner_grad,
        compile=compile,
        steps=source.steps,
        caller=caller,
    )
    with progress_bar(progress, source.steps, "unroll", caller) as bar:
        problem = Problem(
            step=step,
            outer=lambda p, b, a: torch.zeros(()),
            params=params,
            state=state,
            buffers=buffers,
            aux=aux,
            hyperparams=hp,
            batch_at=source.at,
            steps=source.steps,
            seed=draw_seed() if seed is None else seed,
            targets=(),
            devices=rng_devices(params),
            on_step=None if bar is None else (lambda: bar.update(1)),
            init=lambda p, h: opt.init(p, hyperparams=h),
            multi=multi_step(step),
        )
        carry, aux, hp = problem.bind({})
        carry, losses = run_steps(problem, carry, aux, hp, 0, source.steps)
    stacked = torch.stack(losses)
    if check_finite and not in_functorch_transform():
        final = [x for x in _tree.leaves(carry.params) if isinstance(x, torch.Tensor)]
        if not all_finite(stacked, *final):
            locate_nonfinite(dataclasses.replace(problem, on_step=None), caller=caller)
    return Trajectory(carry.params, carry.state, carry.buffers, stacked)

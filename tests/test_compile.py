"""The compiled fast path (compile=True): same numbers as eager, no recompiles, clear fallbacks.

Compiling is slow on a small CPU, so every test reuses the same loss functions (module level):
the compiled steps are cached by (inner_loss, optimizer family, static switches) and shared
across tests. The fast run covers every method and every optimizer at least once; the full
method x optimizer x dtype sweep is marked slow.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import hypergrad as hg
from hypergrad._clients.federation import _WithinRounds
from hypergrad._engine import compile as _compile

K = 3
NO_CUDA = "no CUDA device in this session: the CUDA cases run only where torch.cuda.is_available()"
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA),
    ),
]

OPTIMIZERS = {
    "sgd": hg.optim.sgd(lr=0.1, momentum=0.8, weight_decay=0.01),
    "adam": hg.optim.adam(lr=0.02, betas=(0.8, 0.95), eps=1e-3),
    "adamw": hg.optim.adamw(lr=0.02, weight_decay=0.1, eps=1e-3),
    "rmsprop": hg.optim.rmsprop(lr=0.01, momentum=0.5, eps=1e-3),
    "adagrad": hg.optim.adagrad(lr=0.1, lr_decay=0.01, eps=1e-3),
}
WRT = {
    "reverse": ("aux", "hyperparams", "params"),
    "truncated": ("aux", "hyperparams"),
    "checkpointed": ("aux", "hyperparams", "params"),
    "slots": ("aux", "hyperparams", "params"),
    "first_order": ("hyperparams", "params"),  # aux enters only the inner loss: zero, warned
    "forward": ("aux", "lr"),
}
METHODS = {
    "reverse": "reverse",
    "truncated": hg.Truncated(2),
    "checkpointed": hg.Checkpointed(2),
    "slots": hg.Checkpointed(slots=2),
    "first_order": "first_order",
    "forward": "forward",
}


def inner(p, aux, batch):
    x, y = batch
    h = torch.tanh(x @ p["w1"] + p["b1"])
    err = ((h @ p["w2"]).squeeze(-1) - y) ** 2
    return (aux * err).mean() + 0.01 * (p["w1"] ** 2).sum()


def outer(p, aux, batch):
    x, y = batch
    return (((torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]).squeeze(-1) - y) ** 2).mean()


def dropout_inner(p, aux, batch):
    x, y = batch
    h = torch.nn.functional.dropout(torch.tanh(x @ p["w1"] + p["b1"]), 0.3)
    return (aux * ((h @ p["w2"]).squeeze(-1) - y) ** 2).mean()


def breaking_inner(p, aux, batch):
    torch._dynamo.graph_break()  # stands for anything dynamo cannot put in one graph
    return inner(p, aux, batch)


def problem(dtype=torch.float64, device="cpu", batch=4, loss=inner):
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    params = {"w1": 0.5 * rand(3, 5), "b1": 0.1 * rand(5), "w2": 0.5 * rand(5, 1)}
    aux = (torch.rand(batch, generator=g, dtype=dtype) + 0.5).to(device)
    return {
        "outer_loss": outer,
        "inner_loss": loss,
        "params": params,
        "batches": (rand(K, batch, 3), rand(K, batch)),
        "outer_batch": (rand(batch, 3), rand(batch)),
        "aux": aux,
        "seed": 7,
    }


def flat(result: hg.Hypergradient) -> list[torch.Tensor]:
    return [x for x in hg.tree.leaves(tuple(result)) if isinstance(x, torch.Tensor)]


def assert_close(got, want, dtype):
    """float64: 1e-10; float32: 1e-5 relative to each leaf and to the largest entry overall.

    A float32 hypergradient sums K steps of second-order terms with cancellation, so a small
    entry carries rounding of the order of eps * (the largest entry); fused compiled kernels round
    differently from eager ones.
    """
    got = flat(got) if isinstance(got, hg.Hypergradient) else got
    want = flat(want) if isinstance(want, hg.Hypergradient) else want
    assert len(got) == len(want) > 0
    scale = max(float(b.detach().abs().max()) for b in want if b.numel())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol * max(scale, 1.0))


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def run(method_name, opt, *, compile, dtype=torch.float64, device="cpu", **changes):
    kwargs = problem(dtype, device) | changes
    with warnings.catch_warnings():
        if method_name == "first_order":  # the aux hypergradient warning is not under test
            warnings.filterwarnings("ignore", message="hg.hypergrad: aux does not affect")
        return hg.hypergrad(
            **kwargs, opt=opt, method=METHODS[method_name], wrt=WRT[method_name], compile=compile
        )


# Every method and every optimizer at least once (float64), plus float32 cases.
FAST = [
    ("reverse", "sgd", torch.float64),
    ("reverse", "adam", torch.float64),
    ("truncated", "adamw", torch.float64),
    ("checkpointed", "rmsprop", torch.float64),
    ("first_order", "adagrad", torch.float64),
    ("reverse", "adam", torch.float32),
    ("checkpointed", "sgd", torch.float32),
    ("slots", "adam", torch.float64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("method", "opt", "dtype"), FAST, ids=[f"{m}-{o}-{str(d)[6:]}" for m, o, d in FAST]
)
def test_compiled_hypergradient_equals_eager(method, opt, dtype, device):
    eager = run(method, OPTIMIZERS[opt], compile=False, dtype=dtype, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)  # it really compiled
        compiled = run(method, OPTIMIZERS[opt], compile=True, dtype=dtype, device=device)
    assert_close(compiled, eager, dtype)
    assert compiled.value.device.type == device


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("HYPOTHESIS_PROFILE") != "thorough",
    reason="the full compile sweep (40 compiled variants, minutes) runs in the thorough profile "
    "(make test-thorough); the fast cases above cover every method and optimizer",
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("method", [m for m in METHODS if m != "forward"])
def test_compiled_hypergradient_equals_eager_sweep(method, opt, dtype):
    eager = run(method, OPTIMIZERS[opt], compile=False, dtype=dtype)
    compiled = run(method, OPTIMIZERS[opt], compile=True, dtype=dtype)
    assert_close(compiled, eager, dtype)


def test_forward_method_falls_back_with_one_warning_and_strict_raises():
    eager = run("forward", OPTIMIZERS["sgd"], compile=False)
    with pytest.warns(hg.CompileFallbackWarning) as record:
        compiled = run("forward", OPTIMIZERS["sgd"], compile=True)
    assert len(record) == 1
    assert "hg.hypergrad: compile=True could not compile the step: it runs inside a torch.func" in (
        str(record[0].message)
    )
    assert_close(compiled, eager, torch.float64)
    with pytest.raises(hg.CompileError, match=r"hg.hypergrad: compile='strict' could not .*func"):
        run("forward", OPTIMIZERS["sgd"], compile="strict")


@pytest.mark.parametrize("device", DEVICES)
def test_no_recompile_across_calls_with_the_same_shapes(device):
    sgd = OPTIMIZERS["sgd"]
    run("reverse", sgd, compile=True, device=device)  # warm: compiles (or reuses) the graphs
    before = graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scale in (2.0, 3.0):
            # new values everywhere: aux, a differentiated lr, and a fresh optimizer object
            opt = hg.optim.sgd(lr=0.1 / scale, momentum=0.8, weight_decay=0.01)
            kwargs = problem(device=device)
            kwargs["aux"] = kwargs["aux"] * scale
            with warnings.catch_warnings():
                warnings.simplefilter("error", hg.CompileFallbackWarning)
                got = hg.hypergrad(**kwargs, opt=opt, wrt=WRT["reverse"], compile=True)
            want = hg.hypergrad(**kwargs, opt=opt, wrt=WRT["reverse"])
            assert_close(got, want, torch.float64)
    assert graphs() == before


def test_unroll_compiled_equals_eager_and_shares_the_cache():
    kwargs = problem()
    aux = kwargs["aux"].clone().requires_grad_()
    sgd = OPTIMIZERS["sgd"]
    args = (inner, kwargs["params"], sgd, kwargs["batches"])
    # hg.hypergrad with float hyperparameters compiles the same variants hg.unroll needs
    hg.hypergrad(**problem(), opt=sgd, wrt=("aux",), compile=True)
    before = graphs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        compiled = hg.unroll(*args, aux=aux, seed=7, compile=True)
    eager = hg.unroll(*args, aux=aux, seed=7)
    assert graphs() == before  # hg.unroll reused hg.hypergrad's compiled graphs
    assert_close([compiled.losses, *compiled.params.values()], [eager.losses,
                 *eager.params.values()], torch.float64)  # fmt: skip
    grad_c = torch.autograd.grad(compiled.params["w2"].sum(), aux)
    grad_e = torch.autograd.grad(eager.params["w2"].sum(), aux)
    assert_close(list(grad_c), list(grad_e), torch.float64)


def test_changed_shapes_compile_a_bounded_number_of_times():
    # Start from an empty cache: earlier tests may already hold several variants of this step, and
    # dynamo's per-step limit would then be reached by this test's new shapes (order dependence).
    _compile.clear_cache()
    sgd, one = OPTIMIZERS["sgd"], hg.Compile(steps_per_graph=1)
    run("reverse", sgd, compile=one)
    first = graphs()
    run("reverse", sgd, compile=one, **problem(batch=6))  # new shapes: new graphs
    assert graphs() == first + 1  # one graph per shape: every step of "reverse" shares it
    with torch._dynamo.config.patch(error_on_recompile=True):
        run("reverse", sgd, compile=one)  # both shapes are cached now
        run("reverse", sgd, compile=one, **problem(batch=6))
    assert graphs() == first + 1


THOROUGH_ONLY = pytest.mark.skipif(
    os.environ.get("HYPOTHESIS_PROFILE") != "thorough",
    reason="compiling is slow on a small CPU: this case runs in the thorough profile (make "
    "test-thorough); the fast cases cover the same code path",
)


def entries_of(inner_loss):
    """The cached compiled steps of ``inner_loss``, least recently used first."""
    own = _compile._loss_key(inner_loss)  # by code and closure
    return [e for key, e in _compile._CACHE.items() if key[0][0] == own]


def several_inner(p, aux, batch):
    return inner(p, aux, batch)


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("reverse", marks=THOROUGH_ONLY),
        pytest.param("truncated", marks=THOROUGH_ONLY),
        "checkpointed",  # chunks with and without a graph, and a step left over, in one call
        pytest.param("first_order", marks=THOROUGH_ONLY),
    ],
)
def test_several_steps_per_graph_equal_eager_with_a_step_left_over(method):
    # K = 3 in chunks of 2: one two-step graph, then one step on its own; Truncated(2) and
    # Checkpointed(2) run their ranges [0, 1) / [1, 3) and [0, 2) / [2, 3) that way, with and
    # without a graph.
    sgd = OPTIMIZERS["sgd"]
    eager = run(method, sgd, compile=False, inner_loss=several_inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        compiled = run(method, sgd, compile=hg.Compile(steps_per_graph=2), inner_loss=several_inner)
    assert_close(compiled, eager, torch.float64)
    entry = entries_of(several_inner)[-1]  # first_order has an entry of its own
    assert list(entry.chunks) == [2]  # the two-step graph was used
    assert entry.chunk_failure is None and not entry.draws_random


def first_step_inner(p, aux, batch):
    return inner(p, aux, batch)


def test_the_first_step_shares_the_graph_of_the_later_ones():
    # The initial optimizer state does not require grad, the later ones do; settling the flags
    # before each call keeps one graph for all steps (dynamo would otherwise compile two).
    before = graphs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        run("reverse", OPTIMIZERS["sgd"], compile=hg.Compile(steps_per_graph=1),
            inner_loss=first_step_inner)  # fmt: skip
    assert graphs() == before + 1


def test_steps_that_draw_random_numbers_run_one_per_graph_with_their_seeds():
    # A multi-step graph cannot re-seed between its steps: the generator moved, so the chunk
    # is discarded, the steps rerun one per graph (eager's masks), and it is remembered.
    sgd, two = OPTIMIZERS["sgd"], hg.Compile(steps_per_graph=2)
    eager = run("reverse", sgd, compile=False, inner_loss=dropout_inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        compiled = run("reverse", sgd, compile=two, inner_loss=dropout_inner)
    assert_close(compiled, eager, torch.float64)
    (entry,) = entries_of(dropout_inner)
    assert entry.draws_random
    before = graphs()
    again = run("reverse", sgd, compile=two, inner_loss=dropout_inner)  # no chunk tried
    assert graphs() == before
    assert_close(again, eager, torch.float64)


def test_dropout_matches_eager_when_checkpointing_recomputes_it():
    # fallback_random: compiled dropout draws eager's numbers, so Checkpointed recomputes them.
    sgd = OPTIMIZERS["sgd"]
    eager = run("checkpointed", sgd, compile=False, inner_loss=dropout_inner)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        compiled = run("checkpointed", sgd, compile=True, inner_loss=dropout_inner)
    assert_close(compiled, eager, torch.float64)
    plain = run("reverse", sgd, compile=False)
    assert not torch.allclose(plain.aux, eager.aux)  # the dropout did change the result


def test_graph_break_falls_back_once_with_the_cause_and_strict_raises():
    sgd = OPTIMIZERS["adam"]
    eager = run("reverse", sgd, compile=False, inner_loss=breaking_inner)
    for _ in range(2):  # the failure is remembered: the second call does not try again
        with pytest.warns(hg.CompileFallbackWarning) as record:
            compiled = run("reverse", sgd, compile=True, inner_loss=breaking_inner)
        assert len(record) == 1
        message = str(record[0].message)
        assert message.startswith("hg.hypergrad: compile=True could not compile the step: ")
        assert "graph_break" in message
        assert_close(compiled, eager, torch.float64)
    with pytest.raises(hg.CompileError, match=r"hg.hypergrad: compile='strict' could not compile"):
        _compile.clear_cache()
        run("reverse", sgd, compile="strict", inner_loss=breaking_inner)


def test_user_errors_surface_as_in_eager_without_a_fallback_warning():
    def vector_loss(p, aux, batch):
        return aux * (p["w1"] ** 2).sum()  # not a scalar

    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        with pytest.raises(ValueError, match=r"hg.hypergrad: inner_loss must return a scalar"):
            run("reverse", OPTIMIZERS["sgd"], compile=True, inner_loss=vector_loss)


def test_func_transform_over_a_compiled_unroll_falls_back():
    kwargs = problem()

    def final_w2(aux, compile):
        traj = hg.unroll(inner, kwargs["params"], OPTIMIZERS["sgd"], kwargs["batches"], aux=aux,
                         seed=7, compile=compile)  # fmt: skip
        return traj.params["w2"].sum()

    want = torch.func.grad(final_w2)(kwargs["aux"], False)
    with pytest.warns(hg.CompileFallbackWarning, match="hg.unroll: .*inside a torch.func"):
        got = torch.func.grad(final_w2)(kwargs["aux"], True)
    assert_close([got], [want], torch.float64)


def test_a_compiled_unroll_supports_one_plain_backward():
    kwargs = problem()
    aux = kwargs["aux"].clone().requires_grad_()

    def final_w2(compile):
        traj = hg.unroll(inner, kwargs["params"], OPTIMIZERS["sgd"], kwargs["batches"], aux=aux,
                         seed=7, compile=compile)  # fmt: skip
        return traj.params["w2"].sum()

    (want,) = torch.autograd.grad(final_w2(False), aux, create_graph=True)
    (got,) = torch.autograd.grad(final_w2(True), aux)
    assert_close([got], [want], torch.float64)
    # A double backward is torch's documented limitation; where torch refuses it, it says so,
    # and where this torch build allows it, the numbers must be right.
    try:
        (second,) = torch.autograd.grad(final_w2(True), aux, create_graph=True)
    except RuntimeError as error:
        assert "create_graph=False and retain_graph=False" in str(error)
    else:
        assert_close([second], [want], torch.float64)


def test_bad_arguments_are_rejected():
    with pytest.raises(
        ValueError, match=r"hg.hypergrad: compile must be False, True, 'strict' or hg.Compile"
    ):
        run("reverse", OPTIMIZERS["sgd"], compile="yes")
    with pytest.raises(ValueError, match=r"hg.Compile: steps_per_graph must be a positive int"):
        hg.Compile(steps_per_graph=0)
    with pytest.raises(ValueError, match=r"hg.Compile: strict must be True or False"):
        hg.Compile(strict="yes")
    with pytest.raises(ValueError, match=r"hg.unroll: compile=True compiles the inner gradient"):
        kwargs = problem()
        hg.unroll(inner, kwargs["params"], OPTIMIZERS["sgd"], kwargs["batches"], aux=kwargs["aux"],
                  compile=True, inner_grad="autograd")  # fmt: skip


def test_cache_key_ignores_hyperparameter_values_but_not_the_family():
    sgd = OPTIMIZERS["sgd"]
    a = _compile.step_key(inner, sgd, has_buffers=False)
    assert a == _compile.step_key(inner, sgd.replace(lr=0.5), has_buffers=False)
    assert a != _compile.step_key(inner, sgd.replace(nesterov=True), has_buffers=False)
    assert a != _compile.step_key(outer, sgd, has_buffers=False)
    assert a != _compile.step_key(inner, sgd, has_buffers=True)
    # A cached step compiled for one float lr gives the right numbers for another (a float is a
    # compile-time constant: this compiles new variants in the same entry).
    opt = sgd.replace(lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        got = hg.hypergrad(**problem(), opt=opt, wrt=("aux",), compile=True)
    assert_close(got, hg.hypergrad(**problem(), opt=opt, wrt=("aux",)), torch.float64)


def limited_inner(p, aux, batch):
    return inner(p, aux, batch)


def test_recompile_limit_falls_back_with_advice():
    sgd, one = OPTIMIZERS["sgd"], hg.Compile(steps_per_graph=1)
    wider = problem(batch=6) | {"inner_loss": limited_inner}  # new shapes need a new variant
    eager = run("reverse", sgd, compile=False, **wider)
    with torch._dynamo.config.patch(recompile_limit=1):
        with warnings.catch_warnings():
            warnings.simplefilter("error", hg.CompileFallbackWarning)
            run("reverse", sgd, compile=one, inner_loss=limited_inner)  # the one variant
        with pytest.warns(hg.CompileFallbackWarning, match=r"recompile_limit=1 compiled variants"):
            compiled = run("reverse", sgd, compile=one, **wider)
    assert_close(compiled, eager, torch.float64)


def rounds_inner(p, aux, batch):
    return inner(p, aux, batch)


def clients_problem(clients: int) -> dict:
    """``hg.clients.hypergrad`` arguments: two rounds of the single-model problem's steps."""
    base = problem()
    params = {k: torch.stack([v * (1 + 0.1 * c) for c in range(clients)]) for k, v in
              base["params"].items()}  # fmt: skip
    batches = tuple(torch.cat([torch.stack([b] * clients, dim=1)] * 2) for b in base["batches"])
    return dict(outer_loss=outer, inner_loss=rounds_inner, params=params, opt=OPTIMIZERS["sgd"],
                batches=batches, outer_batch=base["outer_batch"], aux=base["aux"], seed=7,
                wrt=("aux", "lr"), rounds=2)  # fmt: skip


def test_clients_runs_of_steps_stay_inside_federated_rounds():
    # hg.clients compiles its vmapped step (torch.func.vmap of the engine step). Two rounds of
    # K = 3 local steps in graphs of 2 steps: steps 0-1 as one graph, step 2 alone (a graph may
    # not cross the aggregation after it), then 3-4 (after the server's broadcast) and 5 alone.
    kwargs = clients_problem(clients=2)
    eager = hg.clients.hypergrad(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        compiled = hg.clients.hypergrad(**kwargs, compile=hg.Compile(steps_per_graph=2))
    assert_close(compiled, eager, torch.float64)
    entry = entries_of(rounds_inner)[-1]
    assert list(entry.chunks) == [2] and entry.chunk_failure is None
    with pytest.raises(ValueError, match=r"hg.clients.hypergrad: compile must be False, True"):
        hg.clients.hypergrad(**kwargs, compile=1)


def test_clients_chunks_fit_inside_a_round():
    class Multi:
        length = 2

        def fits(self, k):
            return True

    within = _WithinRounds(Multi(), 3, prelude=None)
    assert [within.fits(k) for k in range(6)] == [True, True, False, True, True, False]


@THOROUGH_ONLY
def test_clients_by_chunks_compile_each_chunk_shape():
    # chunk_size=2 over 3 clients: the chunks' rounds run compiled, at 2 and at 1 client
    kwargs = clients_problem(clients=3)
    eager = hg.clients.hypergrad(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        compiled = hg.clients.hypergrad(**kwargs, chunk_size=2, compile=True)
    assert_close(compiled, eager, torch.float64)


def test_a_loss_defined_anew_with_the_same_closure_reuses_the_compiled_step():
    """A loss written inside the user's loop is a new function each time: same code, same cells."""
    sgd = OPTIMIZERS["sgd"]
    scale = torch.tensor(2.0)

    def make(factor):
        return lambda p, a, b: (factor * p["w"]).sum()

    key = _compile.step_key(make(scale), sgd, has_buffers=False)
    assert key == _compile.step_key(make(scale), sgd, has_buffers=False)
    assert key != _compile.step_key(make(torch.tensor(2.0)), sgd, has_buffers=False)


def test_a_loss_recompiled_only_for_its_closure_warns_once_with_the_fix():
    sgd = OPTIMIZERS["sgd"]

    def make(factor):
        return lambda p, a, b: (factor * p["w"]).sum()

    keys = [(_compile.step_key(make(torch.tensor(1.0)), sgd, has_buffers=False), ()) for _ in "ab"]
    step = make(1.0)
    try:
        _compile._entry(step, keys[0])
        with pytest.warns(UserWarning, match=r"inner_loss again: it is a new function .*outside"):
            _compile._entry(step, keys[1])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _compile._entry(step, (_compile.step_key(make(3.0), sgd, has_buffers=False), ()))
    finally:
        _compile.clear_cache()


def test_compiled_hypergradient_trajectory_equals_unroll():
    sgd = OPTIMIZERS["sgd"]
    kwargs = problem()
    eager = hg.unroll(inner, kwargs["params"], sgd, kwargs["batches"], aux=kwargs["aux"], seed=7)
    for method in ("reverse", hg.Checkpointed(2)):
        got = hg.hypergrad(**kwargs, opt=sgd, method=method, wrt=("aux",), compile=True)
        flat_got = hg.tree.leaves(tuple(got.trajectory))
        flat_want = hg.tree.leaves(tuple(eager))
        assert len(flat_got) == len(flat_want) > 4  # the momentum buffers too
        for a, b in zip(flat_got, flat_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

"""The library on a CUDA device: every method, dropout seeding, hg.clients, hg.optim, compile.

Each case builds a small float64 problem on the device and compares it with the same problem on
the CPU, with finite differences, with a Python loop over clients, or with ``torch.optim``.
The problems and references come from the CPU suites (``test_compile``, ``test_clients``,
``test_optim_torch``), imported rather than repeated; only the device changes.

Without CUDA every case is skipped (``torch.cuda.is_available()`` is false). To check the cases
themselves on a machine without a GPU, run them on the CPU:

    HYPERGRAD_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py -p no:cacheprovider

``HYPERGRAD_TEST_DEVICE=cuda`` runs them on CUDA and fails, rather than skips, where CUDA is
missing (``benchmarks/gpu.sh`` sets it, so a broken CUDA set-up cannot pass as all skipped).
The compiled cases come last in this file (a cold ``torch.compile`` takes tens of seconds).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import hypergrad as hg
import test_checkpointing as tckpt
import test_clients as tclients
import test_compile as tcompile
import test_implicit as timplicit
import test_modules as tmodules
import test_optim as toptim_sweep
import test_optim_torch as toptim
import test_parallel as tparallel
import test_ranks as tranks
from _parallel_worker import ON_DEVICE as DATA_PARALLEL_ON_DEVICE
from _ranks_worker import ON_DEVICE

F64 = torch.float64
_FORCED = os.environ.get("HYPERGRAD_TEST_DEVICE", "")
if _FORCED not in ("", "cpu", "cuda"):
    raise ValueError(f"HYPERGRAD_TEST_DEVICE must be 'cpu' or 'cuda', got {_FORCED!r}.")
DEVICE = _FORCED or "cuda"

pytestmark = pytest.mark.skipif(
    not _FORCED and not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False): these cases run on a GPU "
    "machine (benchmarks/gpu.sh); HYPERGRAD_TEST_DEVICE=cpu runs them on the CPU as a smoke check",
)

SGD, ADAM = tcompile.OPTIMIZERS["sgd"], tcompile.OPTIMIZERS["adam"]
EXACT = {
    "reverse",
    "checkpointed",
    "slots",
    "forward",
}  # Truncated(2) < K = 3 and first_order are biased


def to_device(tree, device=DEVICE):
    """Every tensor of ``tree`` moved to ``device`` (other leaves, e.g. functions, unchanged)."""
    return hg.tree.map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def cpu_leaves(result):
    return [x.cpu() for x in tcompile.flat(result)]


def on_device(result) -> bool:
    return all(x.device.type == DEVICE for x in tcompile.flat(result))


def rng_state() -> torch.Tensor:
    return torch.cuda.get_rng_state() if DEVICE == "cuda" else torch.get_rng_state()


# --------------------------------------------------------------------------------------------
# Every method: the device gives the CPU's hypergradient, and finite differences agree


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("method", list(tcompile.METHODS))
def test_every_method_on_device_equals_cpu(method, opt):
    # test_compile.problem: an MLP 3-5-1 (tanh), K = 3, float64; wrt aux, hyperparams, params
    got = tcompile.run(method, tcompile.OPTIMIZERS[opt], compile=False, device=DEVICE)
    want = tcompile.run(method, tcompile.OPTIMIZERS[opt], compile=False, device="cpu")
    assert on_device(got)
    tcompile.assert_close(cpu_leaves(got), tcompile.flat(want), F64)


@pytest.mark.parametrize("method", list(tcompile.METHODS))
def test_every_method_on_device_matches_check_hypergrad(method):
    kwargs = tcompile.problem(device=DEVICE)
    exact = method in EXACT
    report = hg.testing.check_hypergrad(
        **kwargs, opt=ADAM, method=tcompile.METHODS[method], wrt=tcompile.WRT[method],
        directions=2, raise_on_failure=exact,
    )  # fmt: skip
    assert report.passed == exact, str(report)  # the biased methods' bias is measurable
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="hg.hypergrad: aux does not affect")
        got = hg.hypergrad(
            **kwargs, opt=ADAM, method=tcompile.METHODS[method], wrt=tcompile.WRT[method]
        )
    tcompile.assert_close(report.hypergradient, got, F64)  # the report holds our hypergradient


# --------------------------------------------------------------------------------------------
# Dropout: the per-step seeds drive the device's generator


def dropout_problem(**changes):
    return tcompile.problem(device=DEVICE) | {"inner_loss": tcompile.dropout_inner} | changes


def test_dropout_with_a_fixed_seed_repeats_on_device_and_leaves_its_generator_alone():
    before = rng_state()
    first = hg.hypergrad(**dropout_problem(), opt=SGD, wrt=("aux", "lr"))
    again = hg.hypergrad(**dropout_problem(), opt=SGD, wrt=("aux", "lr"))
    assert torch.equal(rng_state(), before)  # seed= given: the caller's generator is untouched
    assert on_device(first)
    tcompile.assert_close(again, first, F64)
    other_seed = hg.hypergrad(**dropout_problem(seed=8), opt=SGD, wrt=("aux", "lr"))
    no_dropout = hg.hypergrad(**tcompile.problem(device=DEVICE), opt=SGD, wrt=("aux", "lr"))
    for other in (other_seed, no_dropout):  # the masks are drawn, and drawn from the seed
        assert not torch.allclose(other.aux, first.aux)


@pytest.mark.parametrize(
    "method",
    [hg.Checkpointed(1), hg.Checkpointed(2), hg.Checkpointed(slots=2)],
    ids=["ckpt1", "ckpt2", "slots2"],
)
def test_recomputing_methods_see_the_same_dropout_masks_on_device(method):
    want = hg.hypergrad(**dropout_problem(), opt=ADAM, wrt=("aux", "lr"))
    got = hg.hypergrad(**dropout_problem(), opt=ADAM, wrt=("aux", "lr"), method=method)
    tcompile.assert_close(got, want, F64)


def test_forward_mode_with_dropout_on_device_is_exact_for_the_masks_it_draws():
    # Under torch.func's forward mode, torch's dropout draws its mask through another kernel on
    # CUDA than in eager mode (seen on an H200, torch 2.11), so "forward" and "reverse" can see
    # different masks at one seed (docs/sharp-bits.md). What holds on every device: "forward"
    # repeats at a fixed seed and is the exact gradient of the loss under its own masks, i.e.
    # central finite differences of the values it reports.
    def forward(aux):
        return hg.hypergrad(**dropout_problem(aux=aux), opt=ADAM, wrt="aux", method="forward")

    aux = dropout_problem()["aux"]
    g = forward(aux)
    tcompile.assert_close(forward(aux), g, F64)
    direction = torch.randn(aux.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    direction = direction.to(DEVICE)
    eps = 1e-6
    slope = (forward(aux + eps * direction).value - forward(aux - eps * direction).value) / (
        2 * eps
    )
    torch.testing.assert_close(slope, (g.aux * direction).sum(), rtol=1e-6, atol=1e-9)
    no_dropout = hg.hypergrad(
        **tcompile.problem(device=DEVICE), opt=ADAM, wrt="aux", method="forward"
    )
    assert not torch.allclose(no_dropout.aux, g.aux)  # the masks are drawn


# --------------------------------------------------------------------------------------------
# hg.clients: the vmapped clients equal a Python loop over clients on the same device


CLIENT_CASES = [  # (method, chunk_size, batchnorm, optimizer)
    ("reverse", None, False, "adam"),
    ("reverse", 2, False, "sgd"),
    ("reverse", None, True, "adam"),
    ("checkpointed", None, False, "sgd"),
    ("truncated", None, False, "adam"),
    ("forward", None, False, "sgd"),
]


@pytest.mark.parametrize(
    ("method_name", "chunk_size", "bn", "opt_name"),
    CLIENT_CASES,
    ids=[f"{m}-chunk{c}-{'bn' if b else 'plain'}-{o}" for m, c, b, o in CLIENT_CASES],
)
def test_clients_on_device_equal_a_python_loop(method_name, chunk_size, bn, opt_name):
    # test_clients.make: 3 client MLPs 3-4-1, 2 rounds of 2 steps, per-client lr, FedAvg weights
    prob = tclients.make(F64, bn=bn, affine=method_name != "forward")
    prob = {k: to_device(v) for k, v in prob.items()}
    opt = tclients.OPTS[opt_name]()
    method, ref_kwargs = tclients.METHODS[method_name]
    lr = torch.tensor([0.1, 0.05, 0.08], dtype=F64, device=DEVICE)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=F64, device=DEVICE)
    g = hg.clients.hypergrad(
        prob["outer"], prob["inner"], prob["params"], opt, prob["batches"], prob["outer_batch"],
        aux=prob["aux"], buffers=prob["buffers"], method=method, wrt=("aux", "lr"),
        hyperparams={"lr": lr}, in_dims={"hyperparams": {"lr": 0}}, steps=tclients.K,
        rounds=tclients.R, weights=weights, chunk_size=chunk_size, seed=0,
    )  # fmt: skip
    hp = {**opt.hyperparams, "lr": lr}
    value, ref = tclients.loop_reference(
        prob, opt, hp, ("lr",), ("lr",), weights=weights, **ref_kwargs
    )
    assert on_device(g)
    tol = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(g.value, value, **tol)
    torch.testing.assert_close(g.aux, ref["aux"], **tol)
    torch.testing.assert_close(g.hyperparams["lr"], ref["hyperparams"]["lr"], **tol)
    assert hg.tree.norm(g.aux) > 0


def padded_clients_hypergrad(device):
    """Clients with 5, 8 and 3 examples on ``device``: pad, sample batches, masked mean."""
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(device)

    datasets = [(rand(n, 3), rand(n)) for n in (5, 8, 3)]
    padded = hg.clients.pad(datasets)  # the data are on the device: so must the mask be
    batches = hg.clients.batches(
        padded, 4, batch_size=4, generator=torch.Generator().manual_seed(0)
    )

    def inner(p, a, batch):
        (x, y), mask = batch
        return hg.clients.masked_mean((x @ p["w"] - y) ** 2, mask) + a * (p["w"] ** 2).sum()

    def outer(p, a, batch):
        return ((batch[0] @ p["w"] - batch[1]) ** 2).mean()

    return hg.clients.hypergrad(
        outer, inner, {"w": rand(3)}, hg.optim.sgd(lr=0.1, momentum=0.5), batches,
        (rand(6, 3), rand(6)), aux=torch.tensor(0.1, dtype=F64, device=device),
        in_dims={"params": None}, wrt=("aux", "params"), steps=2, rounds=2,
        weights=padded.sizes, seed=0,
    )  # fmt: skip


def test_padded_clients_on_device_equal_cpu():
    got = padded_clients_hypergrad(DEVICE)
    want = padded_clients_hypergrad("cpu")
    assert on_device(got)
    tcompile.assert_close(cpu_leaves(got), tcompile.flat(want), F64)
    assert hg.tree.norm(got.aux) > 0


# --------------------------------------------------------------------------------------------
# hg.optim: the functional optimizers follow torch.optim on the device


@pytest.mark.parametrize(
    ("method", "dropout"),
    [(hg.Checkpointed(1), 0.1), (hg.Truncated(tmodules.K), 0.1), ("forward", 0.0)],
    ids=["checkpointed-dropout", "truncated-dropout", "forward"],
)
def test_a_float32_transformer_on_device_agrees_in_every_method(method, dropout):
    # float32 is where CUDA's fused attention kernels (memory-efficient, cuDNN) apply to plain
    # training; the steps of a hypergradient must use the math backend instead, dropout included
    prob = tmodules.lm_problem(dropout=dropout, dtype=torch.float32, device=DEVICE)
    reverse = hg.hypergrad(*prob["args"], method="reverse", **prob["kw"])
    other = hg.hypergrad(*prob["args"], method=method, **prob["kw"])
    assert other.aux.device.type == DEVICE
    torch.testing.assert_close(other.aux, reverse.aux, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(other.hyperparams, reverse.hyperparams, rtol=1e-4, atol=1e-6)


def test_a_transformer_on_device_matches_check_hypergrad():
    prob = tmodules.lm_problem(dropout=0.1, device=DEVICE)
    hg.testing.check_hypergrad(*prob["args"], method="reverse", **prob["kw"], rtol=1e-6)


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize(
    ("cls", "first", "rest", "common"),
    toptim.CASES,
    ids=[f"{c.__name__}{i}" for i, (c, *_) in enumerate(toptim.CASES)],
)
def test_optimizers_follow_torch_optim_on_device(cls, first, rest, common, foreach):
    m, params, state = toptim.follow_two_groups(cls, first, rest, common, foreach, DEVICE)
    for n, p in m.named_parameters():
        assert params[n].device == p.device
        torch.testing.assert_close(params[n], p.detach(), rtol=1e-10, atol=1e-12, msg=n)
    devices = {x.device.type for x in hg.tree.leaves(state) if isinstance(x, torch.Tensor)}
    assert devices <= {DEVICE}, devices  # the state lives with the params


@pytest.mark.parametrize(
    ("family", "options"),
    [(f, o) for f in toptim_sweep.FAMILIES for o in toptim_sweep.every_option(f)],
    ids=[f"{f.name}-{'-'.join(k for k, v in o.items() if v) or 'plain'}"
         for f in toptim_sweep.FAMILIES for o in toptim_sweep.every_option(f)],
)  # fmt: skip
def test_donated_steps_on_device_give_the_out_of_place_numbers(family, options):
    # donated steps on the device: out of place for now (the in-place path is CPU-only); this
    # pins their numbers for the day it is not
    hyper = dict(family.hyper)
    if options.get("nesterov"):
        hyper["dampening"] = 0.0
    params = to_device(toptim_sweep.make_params([(3,), (), (2, 3)], torch.float32))
    grads = to_device(toptim_sweep.grad_stream(params, 5))
    opt = family.make(**toptim_sweep.kwargs_of(hyper), **options)
    want = toptim_sweep.hg_trajectory(opt, params, grads)
    got = toptim_sweep.donated_trajectory(opt, params, grads)[:2]
    for a, b in zip(hg.tree.leaves(got), hg.tree.leaves(want)):
        assert a.device.type == DEVICE
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# hg.Implicit: the closed form on the device, for every solver


@pytest.mark.parametrize("method", timplicit.SOLVERS)
def test_implicit_on_device_matches_the_closed_form(method):
    train, val = timplicit.ridge_data()
    aux = timplicit.ridge_aux()
    exact = timplicit.ridge_exact(aux, train, val)  # on the CPU
    g = hg.hypergrad(
        timplicit.ridge_outer,
        timplicit.ridge_inner,
        {"w": torch.zeros(5, dtype=F64, device=DEVICE)},
        hg.optim.sgd(lr=0.01, momentum=0.5),
        to_device(timplicit.full_batch(train, 400)),
        to_device(val),
        aux=to_device(aux),
        method=method,
    )
    assert on_device(g) and g.solver.converged
    timplicit.assert_close({k: v.cpu() for k, v in g.aux.items()}, exact, 1e-7)


# --------------------------------------------------------------------------------------------
# process_group: NCCL (one rank: NCCL allows one rank per GPU) and gloo with device tensors


@pytest.mark.parametrize(("backend", "world"), [("nccl", 1), ("gloo", 2)])
def test_process_groups_on_device_equal_one_process(tmp_path, backend, world):
    if DEVICE == "cpu":  # the CPU smoke check: gloo, as test_ranks.py runs it
        backend = "gloo"
    env = {"HG_TEST_BACKEND": backend, "HG_TEST_DEVICE": DEVICE}
    results = tranks.Launch(world, "on_device", tmp_path, timeout=180, env=env).results()
    for rank, got in enumerate(results):
        for check in ON_DEVICE:
            assert got.get(check) == "ok", f"rank {rank}, {check}: {got.get(check, got.get('log'))}"


@pytest.mark.parametrize(("backend", "world"), [("nccl", 1), ("gloo", 2)])
def test_data_parallel_on_device_equals_one_process(tmp_path, backend, world):
    if DEVICE == "cpu":  # the CPU smoke check: gloo, as test_parallel.py runs it
        backend = "gloo"
    env = {"HG_TEST_BACKEND": backend, "HG_TEST_DEVICE": DEVICE}
    launch = tranks.Launch(
        world, "on_device", tmp_path, timeout=180, env=env, worker=tparallel.WORKER
    )
    for rank, got in enumerate(launch.results()):
        for check in DATA_PARALLEL_ON_DEVICE:
            assert got.get(check) == "ok", f"rank {rank}, {check}: {got.get(check, got.get('log'))}"


# --------------------------------------------------------------------------------------------
# compile=True on the device (test_compile runs its own cases on CUDA too: -k cuda)


def test_compiled_dropout_on_device_equals_eager_without_a_fallback():
    # the compiled steps draw the device generator's numbers (fallback_random), so Checkpointed
    # recomputes eager's masks; the multi-step's generator check watches the device generator
    kwargs = {"device": DEVICE, "inner_loss": tcompile.dropout_inner}
    eager = tcompile.run("checkpointed", SGD, compile=False, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        compiled = tcompile.run("checkpointed", SGD, compile=True, **kwargs)
    assert on_device(compiled)
    tcompile.assert_close(compiled, eager, F64)


def test_compiled_clients_on_device_equal_eager_without_a_fallback():
    kwargs = tcompile.clients_problem(clients=2)
    for key in ("params", "batches", "outer_batch", "aux"):
        kwargs[key] = to_device(kwargs[key])
    eager = hg.clients.hypergrad(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.CompileFallbackWarning)
        compiled = hg.clients.hypergrad(**kwargs, compile=True)
    assert on_device(compiled)
    tcompile.assert_close(compiled, eager, F64)


def test_slots_and_micro_batches_equal_reverse_on_device():
    problem = tckpt.domain_problem(hg.optim.adamw(lr=0.02, weight_decay=0.1), device=DEVICE)
    ref = hg.hypergrad(**problem, method="reverse", wrt=("aux", "lr"))
    for method in (hg.Checkpointed(slots=3), hg.Checkpointed(slots=3, micro_batches=3)):
        got = hg.hypergrad(**problem, method=method, wrt=("aux", "lr"))
        assert got.aux["w"].device.type == DEVICE
        tcompile.assert_close(got, ref, F64)

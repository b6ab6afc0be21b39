"""Tests for hypergrad.unroll: the step factory, batch sources, the loop, errors, the plug-in API."""

from __future__ import annotations

import copy
import itertools
import sys

import pytest
import torch
from torch import nn

import hypergrad as hg
from hypergrad._engine.batches import Batches
from hypergrad._engine.problem import Carry, Problem, run_steps
from hypergrad._engine.step import make_step


def quad_loss(p, aux, x):
    return ((p["w"] - x) ** 2).sum() + (0.0 if aux is None else aux * (p["w"] ** 2).sum())


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def regression_data(steps=4, batch=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, 3, generator=g, dtype=torch.float64)
    y = torch.randn(steps, batch, 2, generator=g, dtype=torch.float64)
    return x, y


def mse_inner(model):
    def inner(p, aux, batch):
        x, y = batch
        return ((hg.call(model, p, x) - y) ** 2).mean()

    return inner


# ------------------------------------------------------------------ trajectory vs torch.optim


@pytest.mark.parametrize(
    ("opt", "torch_opt"),
    [
        (hg.optim.sgd(lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
        (hg.optim.adam(lr=0.01), lambda ps: torch.optim.Adam(ps, lr=0.01)),
    ],
)
@pytest.mark.parametrize("inner_grad", ["autograd", "func"])
def test_unroll_follows_torch_optim(opt, torch_opt, inner_grad):
    model = mlp()
    x, y = regression_data()
    params, _ = hg.split(model)
    traj = hg.unroll(mse_inner(model), params, opt, (x, y), inner_grad=inner_grad)

    reference = copy.deepcopy(model)
    optimizer = torch_opt(reference.parameters())
    losses = []
    for k in range(4):
        optimizer.zero_grad()
        loss = ((reference(x[k]) - y[k]) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(traj.params[name], p.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(traj.losses, torch.stack(losses), rtol=1e-12, atol=1e-12)
    assert traj.losses.shape == (4,)
    assert type(traj.state).__name__ in ("SGDState", "AdamState")


@pytest.mark.parametrize(
    "opt", [hg.optim.sgd(lr=0.1, momentum=0.9, nesterov=True), hg.optim.adam(lr=0.05, amsgrad=True)]
)
def test_unroll_without_a_graph_writes_in_place_and_gives_the_graphs_numbers(opt):
    # Nothing to record: the steps after the first update the params and the state in place;
    # with a graph they cannot. Bit for bit the same numbers, and the caller's params and the
    # state passed in stay as they were.
    model = mlp()
    x, y = regression_data(steps=6)
    params, _ = hg.split(model)
    state = opt.init(params)
    kept = copy.deepcopy((params, state))
    plain = hg.unroll(mse_inner(model), params, opt, (x, y), state=state)
    graph = hg.unroll(mse_inner(model), {k: v.clone().requires_grad_() for k, v in params.items()},
                      opt, (x, y), state=state)  # fmt: skip
    for a, b in zip(hg.tree.leaves((plain.params, plain.state, plain.losses)),
                    hg.tree.leaves((graph.params, graph.state, graph.losses))):  # fmt: skip
        assert torch.equal(a, b.detach())
    assert graph.params["0.weight"].grad_fn is not None
    # an in-place op bumps the version of the tensor it writes (a fresh result starts at 0)
    assert plain.params["0.weight"]._version > 0 and graph.params["0.weight"]._version == 0
    for a, b in zip(hg.tree.leaves((params, state)), hg.tree.leaves(kept)):
        assert torch.equal(a, b)


def test_unroll_is_differentiable_by_autograd_and_func_equals_autograd():
    model = mlp()
    x, y = regression_data()
    params, _ = hg.split(model)

    def inner(p, aux, batch):
        xb, yb = batch
        return ((hg.call(model, p, xb) - yb) ** 2).mean() + aux * sum(
            (v**2).sum() for v in p.values()
        )

    grads = []
    for inner_grad in ("autograd", "func"):
        aux = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        traj = hg.unroll(
            inner, params, hg.optim.sgd(lr=0.2), (x, y), aux=aux, inner_grad=inner_grad
        )
        (g,) = torch.autograd.grad(traj.params["2.bias"].sum(), aux)
        grads.append(g)
    assert grads[0].abs() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)


def test_step_is_vmappable_over_stacked_clients():
    # The plug-in contract for clients.py: a vmapped func step, run by the same loop.
    model = mlp()
    x, y = regression_data(steps=3)
    clients = [hg.split(mlp(seed=s))[0] for s in range(3)]
    stacked = {k: torch.stack([c[k] for c in clients]) for k in clients[0]}
    # torch.func.vmap treats None as a leaf, so use a state without None entries (Adam's
    # amsgrad slot is None): SGD with momentum.
    opt = hg.optim.sgd(lr=0.05, momentum=0.9)
    step = make_step(mse_inner(model), opt, has_buffers=False, inner_grad="func")
    vstep = torch.func.vmap(
        step, in_dims=(0, 0, None, None, None, None), out_dims=(0, 0, None, 0), randomness="same"
    )
    problem = Problem(
        step=vstep,
        outer=lambda p, b, a: torch.zeros(()),
        params=stacked,
        state=hg.tree.map(lambda *xs: torch.stack(xs), *[opt.init(c) for c in clients]),
        buffers=None,
        aux=None,
        hyperparams=dict(opt.hyperparams),
        batch_at=lambda k: (x[k], y[k]),
        steps=3,
        seed=0,
    )
    carry, _, hp = problem.bind({})
    carry, losses = run_steps(problem, carry, None, hp, 0, 3)
    for i, c in enumerate(clients):
        single = hg.unroll(mse_inner(model), c, opt, (x, y), seed=0)
        for k in c:
            torch.testing.assert_close(carry.params[k][i], single.params[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.stack(losses)[:, i], single.losses, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ batches


def test_batch_sources_give_the_same_trajectory():
    x = torch.randn(4, 2, dtype=torch.float64)
    p = {"w": torch.zeros(2, dtype=torch.float64)}
    opt = hg.optim.sgd(lr=0.1)
    ref = hg.unroll(quad_loss, p, opt, x)
    sources = [
        list(x),
        iter(list(x)),
        lambda k: x[k],
        (x,),
        {"x": x},
    ]
    losses = {
        0: lambda p, a, b: quad_loss(p, a, b),
        3: lambda p, a, b: quad_loss(p, a, b[0]),
        4: lambda p, a, b: quad_loss(p, a, b["x"]),
    }
    for i, source in enumerate(sources):
        loss = losses.get(i, losses[0])
        traj = hg.unroll(loss, p, opt, source, steps=4)
        torch.testing.assert_close(traj.params["w"], ref.params["w"], rtol=0, atol=0)
    # steps may be fewer than the batches available
    assert hg.unroll(quad_loss, p, opt, x, steps=2).losses.shape == (2,)


def test_iterable_batches_are_consumed_lazily_and_kept():
    fetched = []

    def gen():
        for k in itertools.count():
            fetched.append(k)
            yield torch.full((2,), float(k))

    source = Batches(gen(), 3)
    assert fetched == []
    first = source.at(1)
    assert fetched == [0, 1]
    assert source.at(1) is first and fetched == [0, 1]


@pytest.mark.parametrize(
    ("batches", "steps", "error", "match"),
    [
        (torch.zeros(3, 2), 5, ValueError, r"hg.unroll: batches ran out at step 3: the stacked"),
        (
            [torch.zeros(2)] * 2,
            3,
            ValueError,
            r"hg.unroll: batches ran out at step 2 of 3: the iterable yielded only 2",
        ),
        (
            (x for x in [torch.zeros(2)]),
            None,
            ValueError,
            r"hg.unroll: batches is an iterable without a length; pass steps=K",
        ),
        (
            lambda k: torch.zeros(2),
            None,
            ValueError,
            r"hg.unroll: batches is a function of the step index.*pass steps=K",
        ),
        (
            (torch.zeros(3, 2), torch.zeros(4, 2)),
            None,
            ValueError,
            r"hg.unroll: stacked batches must all have the same leading",
        ),
        (5, None, TypeError, r"hg.unroll: batches must be a tensor .* got int"),
        (
            None,
            None,
            ValueError,
            r"hg.unroll: batches=None runs steps without a batch .*pass steps=K",
        ),
        ([], None, ValueError, r"hg.unroll: batches is empty"),
        (torch.zeros(3, 2), 0, ValueError, r"hg.unroll: steps must be a positive int, got 0"),
    ],
)
def test_bad_batches_raise(batches, steps, error, match):
    p = {"w": torch.zeros(2)}
    with pytest.raises(error, match=match):
        hg.unroll(quad_loss, p, hg.optim.sgd(lr=0.1), batches, steps=steps)


# ------------------------------------------------------------------ bad inner losses


def test_non_scalar_inner_loss_raises():
    with pytest.raises(
        ValueError,
        match=r"hg.unroll: inner_loss must return a scalar \(0-d\) tensor, got shape \(2,\)",
    ):
        hg.unroll(
            lambda p, a, x: p["w"] * x, {"w": torch.ones(2)}, hg.optim.sgd(lr=0.1), torch.ones(2, 2)
        )


@pytest.mark.parametrize("inner_grad", ["func", "autograd"])
def test_tuple_without_buffers_and_scalar_with_buffers_raise(inner_grad):
    p, opt, x = {"w": torch.ones(2)}, hg.optim.sgd(lr=0.1), torch.ones(2, 2)
    with pytest.raises(
        TypeError, match=r"hg.unroll: inner_loss\(params, aux, batch\) returned a tuple"
    ):
        hg.unroll(lambda p, a, x: (quad_loss(p, a, x), {}), p, opt, x, inner_grad=inner_grad)
    with pytest.raises(
        TypeError,
        match=r"hg.unroll: buffers are carried, so inner_loss\(params, aux, batch, buffers\) must return \(loss, new_buffers\)",
    ):
        hg.unroll(
            lambda p, a, x, b: quad_loss(p, a, x),
            p,
            opt,
            x,
            buffers={"m": torch.zeros(1)},
            inner_grad=inner_grad,
        )


def test_bad_inner_grad_raises():
    with pytest.raises(
        ValueError, match=r"hg.unroll: inner_grad must be 'auto', 'func' or 'autograd', got 'jax'"
    ):
        hg.unroll(
            quad_loss,
            {"w": torch.ones(2)},
            hg.optim.sgd(lr=0.1),
            torch.ones(2, 2),
            inner_grad="jax",
        )


def test_nan_loss_names_the_step():
    x = torch.ones(5, 2)
    x[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"hg.unroll: the inner loss is nan at step 3"):
        hg.unroll(quad_loss, {"w": torch.zeros(2)}, hg.optim.sgd(lr=0.1), x)


def test_nonfinite_update_names_the_step_and_the_key():
    def loss(p, aux, x):
        return (p["a"] ** 2).sum() + (p["b"] * x).sum()

    # steps 0, 1: b's gradient is 0; step 2: a finite loss (3e38) and gradient whose update
    # overflows float32 (1 - 10 * 3e38 = -inf).
    batches = torch.tensor([[0.0], [0.0], [3e38], [0.0]])
    p = {"a": torch.ones(1), "b": torch.ones(1)}
    with pytest.raises(
        FloatingPointError, match=r"hg.unroll: at step 2 the update made params \['b'\] nan/inf"
    ):
        hg.unroll(loss, p, hg.optim.sgd(lr=10.0), batches)
    # check_finite=False skips the check (and the sync)
    traj = hg.unroll(loss, p, hg.optim.sgd(lr=10.0), batches, check_finite=False)
    assert not torch.isfinite(traj.params["b"]).all()


def test_nonfinite_initial_params_are_named():
    with pytest.raises(
        FloatingPointError, match=r"hg.unroll: the initial params are not finite at \['w'\]"
    ):
        hg.unroll(
            quad_loss, {"w": torch.tensor([float("inf")])}, hg.optim.sgd(lr=0.1), torch.ones(2, 1)
        )


# ------------------------------------------------------------------ purity, randomness, BatchNorm


def test_inputs_are_not_modified():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params, _ = hg.split(model)
    params_before = {k: v.clone() for k, v in params.items()}
    aux = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    opt = hg.optim.adam(lr=0.1)
    hp_before = dict(opt.hyperparams)
    x, y = regression_data()

    def inner(p, a, batch):
        return mse_inner(model)(p, a, batch) + a * sum((v**2).sum() for v in p.values())

    hg.unroll(inner, params, opt, (x, y), aux=aux)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in params.items():
        assert torch.equal(v, params_before[k]) and not v.requires_grad
    assert aux.grad is None and opt.hyperparams == hp_before


def test_global_rng_advances_by_exactly_one_draw_and_dropout_is_seeded():
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    params, _ = hg.split(model)
    x, y = regression_data(steps=5)

    def inner(p, aux, batch):
        xb, yb = batch
        return ((hg.call(model, p, xb) - yb[:, :1]) ** 2).mean()

    torch.manual_seed(123)
    a = hg.unroll(inner, params, hg.optim.sgd(lr=0.1), (x, y))
    after = torch.rand(1)
    torch.manual_seed(123)
    torch.randint(0, 2**62, ())  # the one draw
    assert torch.equal(torch.rand(1), after)
    b = hg.unroll(inner, params, hg.optim.sgd(lr=0.1), (x, y), seed=7)
    c = hg.unroll(inner, params, hg.optim.sgd(lr=0.1), (x, y), seed=7)
    d = hg.unroll(inner, params, hg.optim.sgd(lr=0.1), (x, y), seed=8)
    assert torch.equal(b.losses, c.losses)
    assert not torch.equal(b.losses, d.losses)
    assert not torch.equal(a.losses, b.losses)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.bn(self.fc(x))))


@pytest.mark.parametrize("inner_grad", ["func", "autograd"])
def test_batchnorm_buffers_are_carried_like_torch(inner_grad):
    torch.manual_seed(0)
    model = BNNet().double()
    params, buffers = hg.split(model)
    x, y = regression_data(steps=3)

    def inner(p, aux, batch, bufs):
        xb, yb = batch
        out, new_bufs = hg.call(model, p, xb, buffers=bufs, return_buffers=True)
        return ((out - yb[:, :1]) ** 2).mean(), new_bufs

    traj = hg.unroll(
        inner, params, hg.optim.sgd(lr=0.1), (x, y), buffers=buffers, inner_grad=inner_grad
    )
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for k in range(3):
        optimizer.zero_grad()
        ((reference(x[k]) - y[k][:, :1]) ** 2).mean().backward()
        optimizer.step()
    for k, v in reference.named_buffers():
        torch.testing.assert_close(traj.buffers[k], v, rtol=1e-12, atol=1e-12)
    for k, v in reference.named_parameters():
        torch.testing.assert_close(traj.params[k], v.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(buffers["bn.running_mean"], torch.zeros(4, dtype=torch.float64))


# ------------------------------------------------------------------ progress bar


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    hg.unroll(
        quad_loss, {"w": torch.zeros(2)}, hg.optim.sgd(lr=0.1), torch.ones(7, 2), progress=True
    )
    assert "7/7" in capsys.readouterr().err


def test_progress_without_tqdm_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r"hg.unroll: progress=True needs tqdm"):
        hg.unroll(
            quad_loss, {"w": torch.zeros(2)}, hg.optim.sgd(lr=0.1), torch.ones(2, 2), progress=True
        )


def test_run_steps_resumes_where_it_stopped():
    p = {"w": torch.zeros(2, dtype=torch.float64)}
    opt = hg.optim.adam(lr=0.1)
    x = torch.randn(6, 2, dtype=torch.float64)
    problem = Problem(
        step=make_step(quad_loss, opt, has_buffers=False),
        outer=lambda p, b, a: torch.zeros(()),
        params=p, state=None, buffers=None, aux=None, hyperparams=dict(opt.hyperparams),
        batch_at=lambda k: x[k], steps=6, seed=0, init=lambda p, h: opt.init(p, hyperparams=h),
    )  # fmt: skip
    carry, aux, hp = problem.bind({})
    whole, _ = run_steps(problem, carry, aux, hp, 0, 6)
    half, _ = run_steps(problem, carry, aux, hp, 0, 4)
    rest, _ = run_steps(problem, Carry(*half), aux, hp, 4, 6)
    assert torch.equal(whole.params["w"], rest.params["w"])

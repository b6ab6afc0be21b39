"""hg.clients: the vmapped clients equal a Python loop over clients with the engine's single step.

The reference (:func:`loop_reference`) runs rounds, steps and clients in plain Python, each
client with the engine's single-model step (``make_step``, autograd inner gradient), aggregates
by hand between rounds, and differentiates with ``torch.autograd.grad``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import hypergrad as hg
from hypergrad._engine.step import make_step

C, K, R = 3, 2, 2  # clients, local steps per round, rounds
LAM = 0.5


def make(dtype=torch.float64, bn=False, seed=0, affine=False):
    """Stacked client params/buffers, aux model params, batches (R*K, C, B, ...), losses."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # BatchNorm after the activation (a bias right before it would get a zero gradient, which
    # Adam turns into rounding noise); an affine one only where torch gets it right under vmap
    # (not with "forward": see test_torch_vmap_bug_...)
    norm = [nn.BatchNorm1d(4, affine=affine)] if bn else []
    layers = [nn.Linear(3, 4), nn.Tanh(), *norm, nn.Linear(4, 1)]
    model = nn.Sequential(*layers).to(dtype)
    aux_model = nn.Linear(3, 1).to(dtype)
    clients = []
    for c in range(C):
        torch.manual_seed(seed + 1 + c)
        clients.append(nn.Sequential(*[type(m)(*_args(m)) for m in layers]).to(dtype))
    params, buffers = hg.stack(clients)
    aux, _ = hg.split(aux_model)
    x = torch.randn(R * K, C, 6, 3, generator=gen, dtype=dtype)
    y = x.sum(-1, keepdim=True) * torch.linspace(0.5, 1.5, C, dtype=dtype).view(1, C, 1, 1)
    val = (
        torch.randn(8, 3, generator=gen, dtype=dtype),
        torch.randn(8, 1, generator=gen, dtype=dtype),
    )

    def forward(p, a, batch, b):
        xb, yb = batch
        if bn:
            pred, nb = hg.call(model, p, xb, buffers=b, return_buffers=True)
        else:
            pred, nb = hg.call(model, p, xb), None
        target = hg.call(aux_model, a, xb)
        return ((pred - yb) ** 2).mean() + LAM * ((pred - target) ** 2).mean(), nb

    if bn:

        def inner(p, a, batch, b):
            return forward(p, a, batch, b)

        def outer(p, a, batch, b):
            return ((hg.call(model, p, batch[0], buffers=b) - batch[1]) ** 2).mean()
    else:

        def inner(p, a, batch):
            return forward(p, a, batch, None)[0]

        def outer(p, a, batch):
            return ((hg.call(model, p, batch[0]) - batch[1]) ** 2).mean()

    return {
        "params": params,
        "buffers": buffers if bn else None,
        "aux": aux,
        "batches": (x, y),
        "outer_batch": val,
        "inner": inner,
        "outer": outer,
    }


def _args(m):
    if isinstance(m, nn.Linear):
        return (m.in_features, m.out_features)
    if isinstance(m, nn.BatchNorm1d):
        return (m.num_features, m.eps, m.momentum, m.affine)
    return ()


def loop_reference(prob, opt, hp, per_client, wrt, *, start=0, first_order=False, weights=None):
    """Rounds x steps x clients in Python with the single-model step; autograd.grad at the end."""
    has_b = prob["buffers"] is not None
    step = make_step(prob["inner"], opt, has_buffers=has_b, first_order=first_order)
    aux = hg.tree.map(lambda a: a.detach().requires_grad_(), prob["aux"])
    hp = {k: (v.detach().requires_grad_() if k in wrt else v) for k, v in hp.items()}
    params = [
        hg.tree.map(lambda a: a.detach().requires_grad_(), p) for p in hg.unstack(prob["params"])
    ]
    buffers = hg.unstack(prob["buffers"]) if has_b else [None] * C
    hp_c = [{k: (v[c] if k in per_client else v) for k, v in hp.items()} for c in range(C)]
    states = [opt.init(params[c], hyperparams=hp_c[c]) for c in range(C)]
    x, y = prob["batches"]

    def fedavg(trees):
        return hg.clients.fedavg(hg.tree.map(lambda *xs: torch.stack(xs), *trees), weights)

    for k in range(R * K):
        if k and k % K == 0:
            server = fedavg(params)
            params = [server] * C
            if has_b:
                buffers = [fedavg(buffers)] * C
            states = [opt.init(params[c], hyperparams=hp_c[c]) for c in range(C)]
        with torch.set_grad_enabled(k >= start):
            for c in range(C):
                params[c], states[c], buffers[c], _ = step(
                    params[c], states[c], buffers[c], aux, hp_c[c], (x[k, c], y[k, c])
                )
    args = (fedavg(params), aux, prob["outer_batch"]) + ((fedavg(buffers),) if has_b else ())
    value = prob["outer"](*args)
    inputs = {"aux": aux, "hyperparams": {k: hp[k] for k in wrt if k in hp}}
    _, unravel = hg.tree.ravel(inputs)
    grads = torch.autograd.grad(value, hg.tree.leaves(inputs), materialize_grads=True)
    return value.detach(), unravel(torch.cat([g.reshape(-1) for g in grads]))


METHODS = {
    "reverse": ("reverse", {}),
    "truncated": (hg.Truncated(3), {"start": R * K - 3}),
    "checkpointed": (hg.Checkpointed(2), {}),
    "forward": ("forward", {}),
    "first_order": ("first_order", {"first_order": True}),
}
OPTS = {
    "sgd": lambda: hg.optim.sgd(lr=0.1, momentum=0.5),
    "adam": lambda: hg.optim.adam(lr=0.05),
}


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["whole", "chunked"])
@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("opt_name", list(OPTS))
@pytest.mark.parametrize("method_name", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_vmap_equals_a_python_loop_over_clients(method_name, opt_name, bn, chunk_size, dtype):
    prob = make(dtype, bn=bn, affine=method_name != "forward")
    opt = OPTS[opt_name]()
    method, ref_kwargs = METHODS[method_name]
    lr = torch.tensor([0.1, 0.05, 0.08], dtype=dtype)  # a per-client learning rate
    hp = {**{k: v for k, v in opt.hyperparams.items()}, "lr": lr}
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    # aux enters only the inner loss: with first order its hypergradient is identically zero,
    # and hg.clients.hypergrad says so, as hg.hypergrad does
    unused = r"aux\['\w+'\] does not affect the outer loss with method='first_order'"
    warns = pytest.warns(UserWarning, match=unused)
    with warns if method_name == "first_order" else contextlib.nullcontext():
        g = hg.clients.hypergrad(
            prob["outer"],
            prob["inner"],
            prob["params"],
            opt,
            prob["batches"],
            prob["outer_batch"],
            aux=prob["aux"],
            buffers=prob["buffers"],
            method=method,
            wrt=("aux", "lr"),
            hyperparams={"lr": lr},
            in_dims={"hyperparams": {"lr": 0}},
            steps=K,
            rounds=R,
            weights=weights,
            chunk_size=chunk_size,
            seed=0,
        )
    value, ref = loop_reference(prob, opt, hp, ("lr",), ("lr",), weights=weights, **ref_kwargs)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(g.value, value, **tol)
    torch.testing.assert_close(g.aux, ref["aux"], **tol)
    torch.testing.assert_close(g.hyperparams["lr"], ref["hyperparams"]["lr"], **tol)
    assert g.hyperparams["lr"].shape == (C,) and g.params is None
    if method_name != "first_order":  # aux enters only the inner loss: first order gives 0
        assert hg.tree.norm(g.aux) > 0


SHARED_OPTS = {
    "sgd_nesterov": lambda: hg.optim.sgd(lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.01),
    "adam_amsgrad": lambda: hg.optim.adam(lr=0.05, amsgrad=True),
    "adamw": lambda: hg.optim.adamw(lr=0.05, weight_decay=0.1),
    "rmsprop": lambda: hg.optim.rmsprop(lr=0.01, centered=True, momentum=0.3),
    "adagrad": lambda: hg.optim.adagrad(lr=0.1, lr_decay=0.01),
}


@pytest.mark.parametrize("opt_name", list(SHARED_OPTS))
def test_shared_hyperparameters_match_the_loop_for_every_optimizer(opt_name):
    # Shared scalar hyperparameters take the stacked (un-vmapped) optimizer update.
    prob = make(torch.float64, bn=False)
    opt = SHARED_OPTS[opt_name]()
    g = hg.clients.hypergrad(
        prob["outer"], prob["inner"], prob["params"], opt, prob["batches"],
        prob["outer_batch"], aux=prob["aux"], wrt=("aux", "lr"), steps=K, rounds=R, seed=0,
    )  # fmt: skip
    lr = torch.tensor(opt.hyperparams["lr"], dtype=torch.float64)
    value, ref = loop_reference(prob, opt, {**opt.hyperparams, "lr": lr}, (), ("lr",))
    tol = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(g.value, value, **tol)
    torch.testing.assert_close(g.aux, ref["aux"], **tol)
    torch.testing.assert_close(g.hyperparams["lr"], ref["hyperparams"]["lr"], **tol)
    assert hg.tree.norm(g.aux) > 0


def test_clients_at_different_step_counts_keep_their_own_adam_bias_correction():
    prob = make(torch.float64, bn=False)
    opt = hg.optim.adam(lr=0.05)
    x, y = prob["batches"]
    ps = hg.unstack(prob["params"])
    states = [opt.init(p) for p in ps]
    states = [s._replace(step=torch.full_like(s.step, 3.0 * c)) for c, s in enumerate(states)]
    stacked = hg.tree.map(lambda *xs: torch.stack(xs), *states)
    got = hg.clients.unroll(
        prob["inner"], prob["params"], opt, (x[:K], y[:K]), aux=prob["aux"], state=stacked
    )
    assert got.state.step.tolist() == [K + 3.0 * c for c in range(C)]
    for c in range(C):
        one = hg.unroll(prob["inner"], ps[c], opt, (x[:K, c], y[:K, c]), aux=prob["aux"],
                        state=states[c])  # fmt: skip
        torch.testing.assert_close(hg.unstack(got.params)[c], one.params, rtol=1e-12, atol=1e-14)


def test_unroll_equals_per_client_unrolls_and_chunks_agree():
    prob = make(torch.float64, bn=True)
    opt = hg.optim.adam(lr=0.05)
    x, y = prob["batches"]
    kwargs = dict(aux=prob["aux"], buffers=prob["buffers"], seed=0)
    whole = hg.clients.unroll(prob["inner"], prob["params"], opt, (x[:K], y[:K]), **kwargs)
    chunked = hg.clients.unroll(
        prob["inner"], prob["params"], opt, (x[:K], y[:K]), chunk_size=1, **kwargs
    )
    assert whole.losses.shape == (K, C)
    ps, bs = hg.unstack(prob["params"]), hg.unstack(prob["buffers"])
    for c in range(C):
        one = hg.unroll(
            prob["inner"], ps[c], opt, (x[:K, c], y[:K, c]), aux=prob["aux"], buffers=bs[c]
        )
        for got in (whole, chunked):
            torch.testing.assert_close(
                hg.unstack(got.params)[c], one.params, rtol=1e-12, atol=1e-14
            )
            torch.testing.assert_close(
                hg.unstack(got.buffers)[c], one.buffers, rtol=1e-12, atol=1e-14
            )
            torch.testing.assert_close(got.losses[:, c], one.losses, rtol=1e-12, atol=1e-14)
    # the running statistics really were carried per client
    assert not torch.equal(whole.buffers["2.running_mean"][0], whole.buffers["2.running_mean"][1])
    assert whole.buffers["2.num_batches_tracked"].tolist() == [K] * C


@given(
    clients=st.integers(1, 4),
    steps=st.integers(1, 3),
    rounds=st.integers(1, 3),
    shared_params=st.booleans(),
    per_client_lr=st.booleans(),
    per_client_aux=st.booleans(),
    weighted=st.booleans(),
    chunk_size=st.one_of(st.none(), st.integers(1, 4)),
    method=st.sampled_from(["reverse", "first_order", 1, 2]),  # an int: hg.Checkpointed(int)
)
def test_property_shared_or_stacked_inputs_match_the_loop(
    clients, steps, rounds, shared_params, per_client_lr, per_client_aux, weighted, chunk_size,
    method,
):  # fmt: skip
    # A quadratic problem: client c pulls w towards t_c + aux; the server should reach 1. The
    # outer loss also holds aux itself. With chunk_size < clients, reverse mode goes by chunks.
    gen = torch.Generator().manual_seed(clients * 100 + steps * 10 + rounds)
    t = torch.randn(clients, 2, generator=gen, dtype=torch.float64)
    w0 = torch.randn(clients, 2, generator=gen, dtype=torch.float64)
    aux = torch.randn(clients, 2, generator=gen, dtype=torch.float64)
    aux = aux if per_client_aux else aux[0]
    lr = torch.rand(clients, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    lr = lr if per_client_lr else lr[0]
    weights = torch.rand(clients, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    opt = hg.optim.sgd(lr=0.1, momentum=0.3)
    first_order = method == "first_order"

    def inner(p, a, target):
        return ((p["w"] - target - a) ** 2).sum()

    def outer(p, a, goal):
        return ((p["w"] - goal) ** 2).sum() + 0.1 * (a**2).sum()

    params = {"w": w0[0]} if shared_params else {"w": w0}
    g = hg.clients.hypergrad(
        outer,
        inner,
        params,
        opt,
        t.expand(rounds * steps, clients, 2),
        torch.ones(2),
        aux=aux,
        wrt=("aux", "lr", "params"),
        hyperparams={"lr": lr},
        steps=steps,
        rounds=rounds,
        weights=weights,
        seed=0,
        in_dims={
            "params": None if shared_params else 0,
            "aux": 0 if per_client_aux else None,
            "hyperparams": {"lr": 0 if per_client_lr else None},
        },
        chunk_size=chunk_size,
        method=hg.Checkpointed(method) if isinstance(method, int) else method,
    )
    # the reference: a loop over rounds, steps and clients with torch.autograd
    a = aux.clone().requires_grad_()
    lr_l = lr.clone().requires_grad_()
    p0 = params["w"].clone().requires_grad_()
    ws = [p0 if shared_params else p0[c] for c in range(clients)]
    bufs = [torch.zeros(2, dtype=torch.float64)] * clients
    for k in range(rounds * steps):
        if k and k % steps == 0:
            server = hg.clients.fedavg(torch.stack(ws), weights)
            ws, bufs = [server] * clients, [torch.zeros(2, dtype=torch.float64)] * clients
        for c in range(clients):
            grad = 2 * (ws[c] - t[c] - (a[c] if per_client_aux else a))
            grad = grad.detach() if first_order else grad
            bufs[c] = grad if k % steps == 0 else 0.3 * bufs[c] + grad  # torch.optim.SGD momentum
            ws[c] = ws[c] - (lr_l[c] if per_client_lr else lr_l) * bufs[c]
    value = outer({"w": hg.clients.fedavg(torch.stack(ws), weights)}, a, torch.ones(2))
    ga, glr, gp = torch.autograd.grad(value, (a, lr_l, p0))
    torch.testing.assert_close(g.value, value.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g.aux, ga, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g.hyperparams["lr"], glr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g.params["w"], gp, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Reverse mode by chunks of clients (chunk_size < C)


class SavedTensorMeter:
    """The peak bytes of the tensors autograd keeps for the backward pass, alive at once.

    Each saved tensor counts the memory its view spans; it is released when autograd drops it.
    """

    def __init__(self) -> None:
        self.live = self.peak = 0

    def pack(self, x: torch.Tensor) -> _Saved:
        spanned = sum((d - 1) * st for d, st in zip(x.shape, x.stride())) + 1
        size = spanned * x.element_size() if x.nelement() else 0
        self.live += size
        self.peak = max(self.peak, self.live)
        box = _Saved(x)
        weakref.finalize(box, self._release, size)
        return box

    def _release(self, size: int) -> None:
        self.live -= size

    @staticmethod
    def unpack(box: _Saved) -> torch.Tensor:
        return box.tensor


class _Saved:
    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _mlp_clients(clients: int, steps: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    params, _ = hg.split(model)
    aux = {"w": torch.randn(4, dtype=torch.float64)}
    x = torch.randn(steps, clients, 10, 4, dtype=torch.float64)

    def inner(p, a, xb):
        return ((hg.call(model, p, xb).squeeze(-1) - xb @ a["w"]) ** 2).mean()

    def outer(p, a, xb):
        return (hg.call(model, p, xb) ** 2).mean()

    return outer, inner, params, x, aux


def test_chunks_bound_the_stored_graph_and_give_the_same_hypergradient():
    outer, inner, params, x, aux = _mlp_clients(16)
    peaks, grads = {}, {}
    for chunk in (None, 2, 4):
        meter = SavedTensorMeter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            g = hg.clients.hypergrad(
                outer, inner, params, hg.optim.sgd(lr=0.1), x, x[0, 0], aux=aux,
                in_dims={"params": None}, chunk_size=chunk, seed=0,
            )  # fmt: skip
        peaks[chunk], grads[chunk] = meter.peak, g.aux["w"]
    for chunk in (2, 4):
        torch.testing.assert_close(grads[chunk], grads[None], rtol=1e-10, atol=1e-12)
    # whole: the graph of 16 clients; by chunks: one chunk's graph plus O(C * P) of params
    assert peaks[2] < peaks[4] < peaks[None]
    assert peaks[2] < 0.3 * peaks[None], peaks


@pytest.mark.parametrize("truncate", [1, 2, 3, 5, 6, 7])
def test_truncated_by_chunks_equals_truncated_on_all_clients(truncate):
    # 3 rounds of 2 steps: T cuts inside a round (1, 3, 5), at a round's start (2, 6) or
    # reaches past the first step (7)
    outer, inner, params, x, aux = _mlp_clients(5, steps=6)
    kwargs = dict(aux=aux, steps=2, rounds=3, method=hg.Truncated(truncate), seed=0,
                  wrt=("aux", "lr"), in_dims={"params": None})  # fmt: skip
    opt = hg.optim.sgd(lr=0.1, momentum=0.5)
    whole = hg.clients.hypergrad(outer, inner, params, opt, x, x[0, 0], **kwargs)
    chunked = hg.clients.hypergrad(outer, inner, params, opt, x, x[0, 0], chunk_size=2, **kwargs)
    torch.testing.assert_close(chunked.aux, whole.aux, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked.hyperparams, whole.hyperparams, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked.value, whole.value, rtol=1e-12, atol=0)


def _noisy_problem():
    def inner(p, a, x):
        return ((torch.nn.functional.dropout(p["w"], 0.3) - x - a) ** 2).sum()

    def outer(p, a, goal):
        return ((p["w"] - goal) ** 2).sum()

    gen = torch.Generator().manual_seed(1)
    data = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)  # 2 steps, 4 clients
    params = {"w": torch.ones(3, dtype=torch.float64)}
    aux = torch.full((3,), 0.2, dtype=torch.float64)
    return inner, outer, params, data, aux


def test_chunks_with_randomness():
    inner, outer, params, data, aux = _noisy_problem()
    opt = hg.optim.sgd(lr=0.1)
    kwargs = dict(aux=aux, in_dims={"params": None}, seed=3)

    def grad(randomness, chunk, a=aux):
        return hg.clients.hypergrad(
            outer, inner, params, opt, data, torch.ones(3), randomness=randomness,
            chunk_size=chunk, **{**kwargs, "aux": a},
        )  # fmt: skip

    # "same": every client draws the same mask, so chunks change nothing
    torch.testing.assert_close(grad("same", 1).aux, grad("same", None).aux, rtol=1e-12, atol=0)
    # "different": each chunk draws its own masks; the result is reproducible and is the exact
    # gradient of the function the chunked call computes (its masks fixed by the seed)
    g = grad("different", 2)
    torch.testing.assert_close(g.aux, grad("different", 2).aux, rtol=0, atol=0)
    eps = 1e-6
    for i in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[i] = eps
        fd = (grad("different", 2, aux + step).value - grad("different", 2, aux - step).value) / (
            2 * eps
        )
        torch.testing.assert_close(g.aux[i], fd, rtol=1e-6, atol=1e-9)
    # the chunks do not share masks: with the same data and start for every client, client 0
    # (chunk 0) and client 2 (chunk 1) would otherwise get the same per-client gradient
    per_client = hg.clients.hypergrad(
        lambda p, a, b: (p["w"] ** 2).sum(), inner, {"w": torch.ones(4, 3, dtype=torch.float64)},
        opt, data[:, :1].expand(2, 4, 3), None, aux=aux, wrt="params", aggregate=lambda t: t,
        randomness="different", chunk_size=2, seed=3,
    ).params["w"]  # fmt: skip
    assert not torch.allclose(per_client[0], per_client[2])
    assert not torch.allclose(per_client[0], per_client[1])


@pytest.mark.parametrize("chunk", [0, -1, 1.5, True, "2"])
def test_chunk_size_must_be_a_positive_int(chunk):
    loss, params, data = _quad()
    with pytest.raises(ValueError, match=r"hg.clients.hypergrad: chunk_size must be a positive"):
        hg.clients.hypergrad(loss, loss, params, hg.optim.sgd(lr=0.1), data, None,
                             wrt="params", chunk_size=chunk)  # fmt: skip


def test_chunks_refuse_buffers_that_depend_differentiably_on_the_params():
    # an exponential moving average of the weights, carried as a buffer
    def inner(p, a, x, b):
        return ((p["w"] - x - a) ** 2).sum(), {"ema": 0.9 * b["ema"] + 0.1 * p["w"]}

    def outer(p, a, goal, b):
        return ((b["ema"] - goal) ** 2).sum()

    params = {"w": torch.zeros(4, 2)}
    buffers = {"ema": torch.zeros(4, 2)}
    args = (outer, inner, params, hg.optim.sgd(lr=0.1), torch.ones(3, 4, 2), torch.ones(2))
    whole = hg.clients.hypergrad(*args, aux=torch.zeros(2), buffers=buffers)
    assert hg.tree.norm(whole.aux) > 0  # the gradient does flow through the buffer
    with pytest.raises(ValueError, match=r"buffers are carried as values, but these buffers"):
        hg.clients.hypergrad(*args, aux=torch.zeros(2), buffers=buffers, chunk_size=2)


# --------------------------------------------------------------------------------------------
# Seed problem 5 (the vmap example) against central finite differences

_PATH = Path(__file__).resolve().parent.parent / "examples" / "seed5_federated_vmap.py"
_spec = importlib.util.spec_from_file_location("seed5_federated_vmap", _PATH)
seed5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seed5)


def _fd(fn, x, direction, eps=1e-6):
    return (fn(x + eps * direction) - fn(x - eps * direction)) / (2 * eps)


@pytest.mark.parametrize(
    "opt", [hg.optim.sgd(lr=0.1, momentum=0.5), hg.optim.adam(lr=0.05)], ids=["sgd", "adam"]
)
def test_seed5_with_clients_matches_finite_differences(opt):
    problem = seed5.make_problem(clients=5, steps=3, rounds=2, opt=opt)
    # per-client learning rates as well as the auxiliary model
    lr = torch.linspace(0.03, 0.08, 5, dtype=torch.float64)
    problem = {
        **problem,
        "hyperparams": {"lr": lr},
        "in_dims": {"params": None, "hyperparams": {"lr": 0}},
    }
    g = hg.clients.hypergrad(**problem, wrt=("aux", "lr"))
    flat, unravel = hg.tree.ravel({"aux": problem["aux"], "lr": lr})
    analytic = torch.cat([hg.tree.ravel(g.aux)[0], g.hyperparams["lr"]])
    gen = torch.Generator().manual_seed(3)

    def value(v):
        moved = unravel(v)
        return hg.clients.hypergrad(
            **{**problem, "aux": moved["aux"], "hyperparams": {"lr": moved["lr"]}}, wrt="aux"
        ).value

    for _ in range(3):
        d = torch.randn(flat.shape, generator=gen, dtype=torch.float64)
        assert (analytic @ d).item() == pytest.approx(
            _fd(value, flat, d).item(), rel=1e-6, abs=1e-10
        )
    assert g.hyperparams["lr"].shape == (5,)


def test_seed5_example_main_lowers_the_server_loss(capsys):
    out = seed5.main(clients=4, steps=2, rounds=2, outer_steps=2)
    assert out["last"] < out["first"] and out["max_rel_err"] < 1e-5
    assert "finite differences" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Padding, masks, aggregation, randomness


def test_padded_clients_equal_unpadded_per_client_training():
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 7, 5]
    data = [
        (
            torch.randn(n, 2, generator=gen, dtype=torch.float64),
            torch.randn(n, generator=gen, dtype=torch.float64),
        )
        for n in sizes
    ]
    padded = hg.clients.pad(data, value=1e6)  # padding must not change anything
    opt = hg.optim.sgd(lr=0.2)

    def inner(p, aux, batch):
        (x, y), mask = batch
        return hg.clients.masked_mean((x @ p["w"] - y) ** 2, mask)

    params = {"w": torch.zeros(2, dtype=torch.float64)}
    traj = hg.clients.unroll(
        inner, params, opt, hg.clients.batches(padded, 4), in_dims={"params": None}
    )
    for c, (x, y) in enumerate(data):
        one = hg.unroll(
            lambda p, a, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(), params, opt, [(x, y)] * 4
        )
        torch.testing.assert_close(traj.params["w"][c], one.params["w"], rtol=1e-12, atol=1e-14)
    server = hg.clients.fedavg(traj.params, padded.sizes.double())
    manual = sum(n * traj.params["w"][c] for c, n in enumerate(sizes)) / sum(sizes)
    torch.testing.assert_close(server["w"], manual)
    assert padded.sizes.tolist() == sizes and padded.mask.sum(1).tolist() == sizes


def test_sampled_batches_only_hold_real_examples_when_there_are_enough():
    padded = hg.clients.pad([torch.arange(3.0), torch.arange(10.0) + 100])
    data, mask = hg.clients.batches(
        padded, 50, batch_size=3, generator=torch.Generator().manual_seed(0)
    )
    assert data.shape == (50, 2, 3) and mask.all()
    assert set(data[:, 0].flatten().tolist()) == {0.0, 1.0, 2.0}
    client1 = data[:, 1]
    assert ((client1 >= 100) & (client1 < 110)).all() and len(set(client1.flatten().tolist())) == 10
    assert all(len(set(row.tolist())) == 3 for row in client1)  # without replacement
    data, mask = hg.clients.batches(
        padded, 2, batch_size=5, generator=torch.Generator().manual_seed(0)
    )
    assert mask[:, 0].sum(-1).tolist() == [3, 3] and mask[:, 1].all()


def test_masked_mean_ignores_padding_in_value_and_gradient():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [float("inf"), float("nan")]], requires_grad=True)
    m = torch.tensor([True, True, False])
    out = hg.clients.masked_mean(v, m)
    (g,) = torch.autograd.grad(out, v)
    assert out.item() == 2.5
    assert g.tolist() == [[0.25, 0.25], [0.25, 0.25], [0.0, 0.0]]


def test_custom_aggregate_and_randomness():
    def inner(p, a, x):
        return ((torch.nn.functional.dropout(p["w"], 0.5) - x) ** 2).sum()

    # 64 elements a client: two clients end equal by chance with probability (3/8)**64 < 1e-27,
    # whatever random stream this torch draws from.
    wide, data = {"w": torch.ones(4, 64)}, torch.zeros(2, 4, 64)
    opt = hg.optim.sgd(lr=0.1)
    with pytest.raises(RuntimeError, match="randomness"):
        hg.clients.unroll(inner, wide, opt, data)
    a = hg.clients.unroll(inner, wide, opt, data, randomness="different", seed=5)
    b = hg.clients.unroll(inner, wide, opt, data, randomness="different", seed=5)
    same = hg.clients.unroll(inner, wide, opt, data, randomness="same", seed=5)
    assert torch.equal(a.params["w"], b.params["w"])  # reproducible given the seed
    assert not torch.equal(a.params["w"][0], a.params["w"][1])  # clients draw different masks
    assert torch.equal(same.params["w"][0], same.params["w"][1])
    # any function of the stacked tree aggregates between rounds: here the first client wins
    first = hg.clients.unroll(
        lambda p, a, x: ((p["w"] - x) ** 2).sum(),
        {"w": torch.ones(4, 3)},
        opt,
        torch.arange(4.0).view(1, 4, 1).expand(2, 4, 3),
        rounds=2,
        aggregate=lambda t: hg.tree.map(lambda v: v[0], t),
    )
    # round 1: w_c = 1 - 0.2 (1 - c); round 2 starts from client 0's 0.8: w_c = 0.8 - 0.2 (0.8 - c)
    torch.testing.assert_close(first.params["w"][:, 0], 0.64 + 0.2 * torch.arange(4.0))


# --------------------------------------------------------------------------------------------
# Errors


def _quad():
    return (
        (lambda p, a, x: ((p["w"] - x) ** 2).sum()),
        {"w": torch.zeros(3, 2)},
        torch.zeros(2, 3, 2),
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_dims": [0]}, r"hg.clients.unroll: in_dims must be a dict such as"),
        ({"in_dims": {"param": 0}}, r"in_dims has unknown key\(s\) 'param'; the keys are 'params'"),
        ({"in_dims": {"params": 1}}, r"in_dims\['params'\] must be 0 \(stacked clients\) or None"),
        (
            {"in_dims": {"hyperparams": {"learning_rate": 0}}},
            r"names 'learning_rate', which the optimizer does not have",
        ),
        ({"in_dims": {"hyperparams": 2}}, r"in_dims\['hyperparams'\] must be 0, None or a dict"),
        (
            {"in_dims": {"hyperparams": {"lr": 0}}},
            r"hyperparameter 'lr' is per client, but it is 0.1; pass a tensor",
        ),
        (
            {"in_dims": {"hyperparams": {"lr": 0}}, "hyperparams": {"lr": torch.ones(4)}},
            r"params\['w'\] has 3 clients but hyperparams\['lr'\] has leading size 4",
        ),
        ({"weights": [1.0, 2.0]}, r"params\['w'\] has 3 clients but weights has leading size 2"),
        (
            {"weights": [1, 1, 1], "aggregate": lambda t: t},
            r"pass either weights= .* or aggregate=",
        ),
        ({"rounds": 0}, r"hg.clients.unroll: rounds must be a positive int, got 0"),
        ({"rounds": 3}, r"the batches hold 2 steps, which is not a multiple of rounds=3"),
        ({"randomness": "differ"}, r"randomness must be 'error', 'different' or 'same'"),
        ({"in_dims": {"params": None, "batches": None}}, r"nothing has a client dimension"),
    ],
)
def test_unroll_errors(kwargs, match):
    loss, params, data = _quad()
    with pytest.raises((ValueError, TypeError), match=match):
        hg.clients.unroll(loss, params, hg.optim.sgd(lr=0.1), data, **kwargs)


def test_batch_with_the_wrong_client_count_is_named():
    loss, params, _ = _quad()
    with pytest.raises(
        ValueError, match=r"params\['w'\] has 3 clients but the batch of step 0 has leading size 5"
    ):
        hg.clients.unroll(loss, params, hg.optim.sgd(lr=0.1), torch.zeros(2, 5, 2))


def test_hypergrad_errors():
    loss, params, data = _quad()
    with pytest.raises(TypeError, match=r"hg.clients.hypergrad: opt must be a hypergrad optimizer"):
        hg.clients.hypergrad(
            loss, loss, params, torch.optim.SGD([torch.zeros(1)], lr=0.1), data, None, wrt="params"
        )
    with pytest.raises(ValueError, match=r"hg.clients.hypergrad: wrt entry 'momentum_x'"):
        hg.clients.hypergrad(loss, loss, params, hg.optim.sgd(lr=0.1), data, None, wrt="momentum_x")
    with pytest.raises(ValueError, match=r"hg.clients.hypergrad: outer_loss must return a scalar"):
        hg.clients.hypergrad(
            lambda p, a, b: p["w"], loss, params, hg.optim.sgd(lr=0.1), data, None, wrt="params"
        )


def test_a_module_that_updates_its_own_buffers_is_named_with_the_fix():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    params, _ = hg.stack([model, model])

    def inner(p, a, x):  # no buffers passed: BatchNorm would update the module's own stats
        return hg.call(model, p, x).sum()

    with pytest.raises(
        RuntimeError,
        match=r"hg.clients.unroll: submodule '1' \(BatchNorm1d\) of Sequential cannot run under "
        r"torch.func.vmap over clients: its forward updates its own buffers in place.*"
        r"pass buffers=.*return_buffers=True.*module.eval\(\), or track_running_stats=False",
    ):
        hg.clients.unroll(inner, params, hg.optim.sgd(lr=0.1), torch.randn(1, 2, 4, 2))
    model.eval()  # the freeze policy: statistics are read, not written
    traj = hg.clients.unroll(inner, params, hg.optim.sgd(lr=0.1), torch.randn(1, 2, 4, 2))
    assert traj.losses.shape == (1, 2)


def test_nonfinite_client_loss_names_the_step():
    loss, params, data = _quad()
    data = data.clone()
    data[1, 2, 0] = float("nan")
    with pytest.raises(
        FloatingPointError,
        match=r"hg.clients.unroll: the inner loss is \[0.0, 0.0, nan\] at step 1",
    ):
        hg.clients.unroll(loss, params, hg.optim.sgd(lr=0.1), data)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([],), r"hg.clients.pad: got no datasets"),
        (([(torch.ones(2, 1), torch.ones(3))],), r"dataset 0 needs tensors sharing one leading"),
        (
            ([torch.ones(2, 1), torch.ones(3, 2)],),
            r"hg.clients.pad: the tensor of dataset 1 has example shape \(2,\)",
        ),
    ],
)
def test_pad_errors(args, match):
    with pytest.raises(ValueError, match=match):
        hg.clients.pad(*args)


def test_batches_errors():
    padded = hg.clients.pad([torch.ones(2), torch.ones(3)])
    with pytest.raises(ValueError, match=r"hg.clients.batches: steps must be a positive int"):
        hg.clients.batches(padded, 0)
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 3\]"):
        hg.clients.batches(padded, 2, batch_size=4)

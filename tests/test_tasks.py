"""Tasks (``hg.Clients(outer="each")``): the mean of the single-task hypergradients, every method."""

from __future__ import annotations

import pytest
import torch

import hypergrad as hg

F64 = torch.float64
C, K = 3, 4


def inner(p, a, b):
    x, y = b
    return ((torch.tanh(x @ p["w"]) @ p["v"] - y) ** 2).mean() + a["wd"] * (p["w"] ** 2).sum()


def outer(p, a, b):
    x, y = b
    return ((torch.tanh(x @ p["w"]) @ p["v"] - y) ** 2).mean() + (a["o"] * p["v"]).sum()


def problem(steps=K):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    return {
        "params": {"w": randn(2, 3), "v": randn(3)},
        "aux": {"wd": torch.tensor(0.1, dtype=F64), "o": randn(3) * 0.1},
        "batches": (randn(steps, C, 5, 2), randn(steps, C, 5)),
        "outer_batch": (randn(C, 6, 2), randn(C, 6)),
    }


def singles(prob, opt, method, wrt, **kwargs):
    """Each task alone (a loop, the reference), and the mean of their hypergradients."""
    X, Y = prob["batches"]
    Xo, Yo = prob["outer_batch"]
    out = [
        hg.hypergrad(
            outer,
            inner,
            prob["params"],
            opt,
            (X[:, c], Y[:, c]),
            (Xo[c], Yo[c]),
            aux=prob["aux"],
            method=method,
            wrt=wrt,
            **kwargs,
        )
        for c in range(C)
    ]
    mean = lambda xs: hg.tree.map(lambda *v: sum(v) / C, *xs)  # noqa: E731
    return out, {
        "value": mean([g.value for g in out]),
        "aux": mean([g.aux for g in out]),
        "hyperparams": mean([g.hyperparams for g in out]) if out[0].hyperparams else None,
        "params": mean([g.params for g in out]) if out[0].params is not None else None,
    }


def assert_tree_close(got, want, tol=1e-10):
    for a, b in zip(hg.tree.leaves(got), hg.tree.leaves(want), strict=True):
        assert torch.allclose(a, b, rtol=tol, atol=tol), (a, b)


METHODS = [
    pytest.param("reverse", ("aux", "params", "lr"), id="reverse"),
    pytest.param(hg.Checkpointed(2), ("aux", "params", "momentum"), id="checkpointed"),
    pytest.param(hg.Truncated(2), ("aux", "lr"), id="truncated"),
    pytest.param("forward", ("aux", "params", "lr"), id="forward"),
    pytest.param(hg.Forward(chunk_size=5), ("aux", "lr"), id="forward-chunked"),
]


@pytest.mark.parametrize(("method", "wrt"), METHODS)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_tasks_equal_the_mean_of_single_task_hypergradients(method, wrt, chunk_size):
    prob = problem()
    opt = hg.optim.sgd(lr=0.1, momentum=0.5)
    _, want = singles(prob, opt, method, wrt)
    g = hg.hypergrad(outer, inner, prob["params"], opt, prob["batches"], prob["outer_batch"],
                     aux=prob["aux"], method=method, wrt=wrt,
                     clients=hg.Clients(in_dims={"params": None}, outer="each",
                                        chunk_size=chunk_size))  # fmt: skip
    assert_tree_close(g.value, want["value"])
    assert_tree_close(g.aux, want["aux"])
    assert_tree_close(g.hyperparams, want["hyperparams"])
    if "params" in wrt:
        assert_tree_close(g.params, want["params"])


def test_first_order_tasks_equal_the_mean():
    prob = problem()
    opt = hg.optim.adam(lr=0.05)
    wrt = ("params", "lr")
    _, want = singles(prob, opt, "first_order", wrt)
    g = hg.clients.hypergrad(outer, inner, prob["params"], opt, prob["batches"],
                             prob["outer_batch"], aux=prob["aux"], method="first_order", wrt=wrt,
                             in_dims={"params": None}, outer="each")  # fmt: skip
    assert_tree_close((g.value, g.params, g.hyperparams), (want["value"], want["params"],
                                                           want["hyperparams"]))  # fmt: skip


def test_implicit_tasks_equal_the_mean():
    # Ridge per task: converged training, so each task's implicit solve is exact.
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(C, 20, 3, generator=g, dtype=F64), torch.randn(C, 20, generator=g, dtype=F64)
    Xv, yv = torch.randn(C, 8, 3, generator=g, dtype=F64), torch.randn(C, 8, generator=g, dtype=F64)
    quad = lambda p, a, b: ((b[0] @ p["w"] - b[1]) ** 2).mean() / 2 + a / 2 * (p["w"] ** 2).sum()  # noqa: E731
    val = lambda p, a, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()  # noqa: E731
    lam, opt, steps = torch.tensor(0.5, dtype=F64), hg.optim.sgd(lr=0.5), 200
    method = hg.Implicit(tol=1e-13)
    batches = (X.expand(steps, *X.shape), y.expand(steps, *y.shape))
    each = [
        hg.hypergrad(
            val,
            quad,
            {"w": torch.zeros(3, dtype=F64)},
            opt,
            (X[c].expand(steps, 20, 3), y[c].expand(steps, 20)),
            (Xv[c], yv[c]),
            aux=lam,
            method=method,
        )
        for c in range(C)
    ]
    tasks = hg.hypergrad(val, quad, {"w": torch.zeros(3, dtype=F64)}, opt, batches, (Xv, yv),
                         aux=lam, method=method,
                         clients=hg.Clients(in_dims={"params": None}, outer="each"))  # fmt: skip
    assert_tree_close(tasks.aux, sum(e.aux for e in each) / C)
    assert_tree_close(tasks.value, sum(e.value for e in each) / C)


def test_a_shared_outer_batch_and_weights():
    prob = problem()
    opt = hg.optim.sgd(lr=0.1)
    Xo, Yo = prob["outer_batch"]
    shared = (Xo[0], Yo[0])
    weights = torch.tensor([1.0, 2.0, 5.0], dtype=F64)
    X, Y = prob["batches"]
    each = [
        hg.hypergrad(
            outer,
            inner,
            prob["params"],
            opt,
            (X[:, c], Y[:, c]),
            shared,
            aux=prob["aux"],
            wrt=("aux", "params"),
        )
        for c in range(C)
    ]
    g = hg.hypergrad(outer, inner, prob["params"], opt, prob["batches"], shared, aux=prob["aux"],
                     wrt=("aux", "params"),
                     clients=hg.Clients(in_dims={"params": None, "outer_batch": None},
                                        outer="each", weights=weights))  # fmt: skip
    w = weights / weights.sum()
    want = hg.tree.map(lambda *v: sum(wc * x for wc, x in zip(w, v)), *[(e.aux, e.params) for e in each])  # fmt: skip
    assert_tree_close((g.aux, g.params), want)


def test_rounds_with_tasks_match_a_plain_autograd_loop():
    # Two federated rounds (FedAvg between them), then each client meets its own outer batch.
    prob = problem(steps=2 * 2)
    params = hg.tree.map(lambda x: x.expand(C, *x.shape).clone(), prob["params"])
    lr = 0.1
    g = hg.hypergrad(outer, inner, params, hg.optim.sgd(lr=lr), prob["batches"],
                     prob["outer_batch"], aux=prob["aux"], wrt=("aux",),
                     clients=hg.Clients(rounds=2, outer="each"))  # fmt: skip
    chunked = hg.hypergrad(outer, inner, params, hg.optim.sgd(lr=lr), prob["batches"],
                           prob["outer_batch"], aux=prob["aux"], wrt=("aux",),
                           clients=hg.Clients(rounds=2, outer="each", chunk_size=2))  # fmt: skip
    aux = hg.tree.map(lambda x: x.clone().requires_grad_(), prob["aux"])
    X, Y = prob["batches"]
    p = [{k: v[c].clone().requires_grad_() for k, v in params.items()} for c in range(C)]
    for r in range(2):
        for k in range(2 * r, 2 * r + 2):
            for c in range(C):
                grads = torch.autograd.grad(inner(p[c], aux, (X[k, c], Y[k, c])), list(p[c].values()),
                                            create_graph=True)  # fmt: skip
                p[c] = {n: v - lr * d for (n, v), d in zip(p[c].items(), grads)}
        if r == 0:
            server = {n: sum(q[n] for q in p) / C for n in p[0]}
            p = [dict(server) for _ in range(C)]
    Xo, Yo = prob["outer_batch"]
    value = sum(outer(p[c], aux, (Xo[c], Yo[c])) for c in range(C)) / C
    want = dict(zip(aux, torch.autograd.grad(value, list(aux.values()))))
    assert_tree_close(g.aux, want)
    assert_tree_close(chunked.aux, want)
    assert_tree_close(g.value, value.detach())


def test_tasks_errors():
    prob = problem()
    args = (outer, inner, prob["params"], hg.optim.sgd(lr=0.1), prob["batches"])
    kw = dict(aux=prob["aux"])
    Xo, Yo = prob["outer_batch"]
    with pytest.raises(
        ValueError,
        match=r"hg\.hypergrad: with hg\.Clients\(outer='each'\) each of the 3 clients has its own "
        r"outer batch, so outer_batch\[0\] needs a leading task dimension of size 3 \(one slice "
        r"per client\), got shape \(6, 2\)\. Stack one outer batch per client \(torch\.stack\), "
        r"or pass in_dims=\{'outer_batch': None\}",
    ):
        hg.hypergrad(*args, (Xo[0], Yo), **kw,
                     clients=hg.Clients(in_dims={"params": None}, outer="each"))  # fmt: skip
    with pytest.raises(ValueError, match=r"hg\.clients\.hypergrad: .* outer_batch needs a leading "
                       r"task dimension of size 3 \(one slice per client\), got a 0-d tensor"):  # fmt: skip
        hg.clients.hypergrad(lambda p, a, b: outer(p, a, (Xo[0], Yo[0])) * b, *args[1:],
                             torch.tensor(1.0, dtype=F64), **kw, in_dims={"params": None},
                             outer="each")  # fmt: skip
    with pytest.raises(ValueError, match=r"hg\.Clients: outer must be 'server' \(one outer loss "
                       r"on the aggregate of the clients\) or 'each'.*got 'mean'"):  # fmt: skip
        hg.Clients(outer="mean")
    with pytest.raises(ValueError, match=r"hg\.Clients: with outer='each' and rounds=1 nothing "
                       r"is aggregated .* Drop it, or pass rounds > 1"):  # fmt: skip
        hg.Clients(outer="each", aggregate=lambda t: t)
    with pytest.raises(ValueError, match=r"hg\.hypergrad: in_dims\['outer_batch'\] gives the outer "
                       r"batch a client dimension, but the outer loss is the server's .* Pass "
                       r"hg\.Clients\(outer='each'\)"):  # fmt: skip
        hg.hypergrad(*args, prob["outer_batch"], **kw,
                     clients=hg.Clients(in_dims={"params": None, "outer_batch": 0}))  # fmt: skip


def test_a_task_outer_loss_that_is_not_a_scalar_is_named():
    prob = problem()
    with pytest.raises(ValueError, match=r"hg\.hypergrad: outer_loss must return a scalar \(0-d\) "
                       r"tensor, got shape \(3,\)"):  # fmt: skip
        hg.hypergrad(lambda p, a, b: p["v"] * 1.0, inner, prob["params"], hg.optim.sgd(lr=0.1),
                     prob["batches"], prob["outer_batch"], aux=prob["aux"],
                     clients=hg.Clients(in_dims={"params": None}, outer="each"))  # fmt: skip


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_tasks_with_batchnorm_buffers_equal_the_mean(method):
    # Each task's outer loss sees its own final buffers; the affine BatchNorm's running
    # statistics are carried through the vmapped step (its elementary-op rewrite with "func").
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 1)).double()  # fmt: skip
    params, buffers = hg.split(model)

    def bn_inner(p, a, b, buf):
        out, new = hg.call(model, p, b[0], buffers=buf, return_buffers=True)
        return ((out - b[1]) ** 2).mean() + a * hg.tree.vdot(p, p), new

    def bn_outer(p, a, b, buf):
        fit = ((hg.call(model, p, b[0], buffers=buf) - b[1]) ** 2).mean()
        return fit + (buf["1.running_mean"] ** 2).sum()

    g = torch.Generator().manual_seed(3)
    X, Y = (
        torch.randn(3, C, 6, 3, generator=g, dtype=F64),
        torch.randn(3, C, 6, 1, generator=g, dtype=F64),
    )
    Xo, Yo = (
        torch.randn(C, 5, 3, generator=g, dtype=F64),
        torch.randn(C, 5, 1, generator=g, dtype=F64),
    )
    common = dict(aux=torch.tensor(0.1, dtype=F64), buffers=buffers, method=method,
                  wrt=("aux", "params"))  # fmt: skip
    opt = hg.optim.sgd(lr=0.1)
    tasks = hg.hypergrad(bn_outer, bn_inner, params, opt, (X, Y), (Xo, Yo), inner_grad="func",
                         clients=hg.Clients(in_dims={"params": None, "buffers": None},
                                            outer="each"), **common)  # fmt: skip
    each = [
        hg.hypergrad(bn_outer, bn_inner, params, opt, (X[:, c], Y[:, c]), (Xo[c], Yo[c]), **common)
        for c in range(C)
    ]
    mean = hg.tree.map(lambda *v: sum(v) / C, *[(e.aux, e.params) for e in each])
    assert_tree_close((tasks.aux, tasks.params), mean)

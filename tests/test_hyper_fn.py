"""``hyperparams=fn``: hyperparameters computed from aux inside the call, for every method.

``g.aux`` includes their effect (checked against central finite differences of the whole
call in float64); ``wrt`` naming a computed hyperparameter reports its own partial gradient.
"""

from __future__ import annotations

import pytest
import torch

import hypergrad as hg
import test_results
from hypergrad.testing import finite_difference

K = 4
METHODS = [m for m in test_results.METHODS if m.id != "implicit"]  # every method but Implicit


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(K, 6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(K, 6, generator=g, dtype=torch.float64)
    params = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.5,
              "b": torch.zeros(4, dtype=torch.float64),
              "v": torch.randn(4, generator=g, dtype=torch.float64) * 0.5}  # fmt: skip

    def inner(p, a, batch):
        err = (torch.tanh(batch[0] @ p["w"] + p["b"]) @ p["v"] - batch[1]) ** 2
        return err.mean() + a["l2"] * (p["w"] ** 2).sum()

    def outer(p, a, batch):
        err = (torch.tanh(batch[0] @ p["w"] + p["b"]) @ p["v"] - batch[1]) ** 2
        return err.mean() + a["l2"] ** 2  # l2 reaches it directly too (first order sees it)

    aux = {"log_lr": torch.tensor([-2.0, -1.5], dtype=torch.float64),
           "l2": torch.tensor(0.02, dtype=torch.float64)}  # fmt: skip
    return outer, inner, params, (x, y), (x[0] + 0.1, y[0]), aux


def tied(a):
    """One log learning rate per layer, shared by its weight and bias."""
    first, last = a["log_lr"].exp().unbind()
    return {"lr": {"w": first, "b": first, "v": last}}


def value_at(outer, inner, params, opt, batches, outer_batch, fn):
    """The outer loss of the whole call as a function of aux (what g.aux differentiates)."""

    def f(a):
        traj = hg.unroll(inner, params, opt, batches, aux=a, hyperparams=fn, seed=0)
        return float(outer(traj.params, a, outer_batch))

    return f


@pytest.mark.parametrize("method", METHODS)
def test_tied_log_learning_rates_match_finite_differences(method):
    outer, inner, params, batches, outer_batch, aux = problem()
    opt = hg.optim.sgd(lr=0.1, momentum=0.5)
    g = hg.hypergrad(outer, inner, params, opt, batches, outer_batch, aux=aux, seed=0,
                     hyperparams=tied, method=method)  # fmt: skip
    assert g.hyperparams is None
    # against the hand-written chain rule: the gradient w.r.t. the per-parameter rates, chained
    rates = {k: v.detach() for k, v in tied(aux)["lr"].items()}
    ref = hg.hypergrad(outer, inner, params, opt, batches, outer_batch, aux={"l2": aux["l2"]}, seed=0,
                       hyperparams={"lr": rates}, method=method, wrt=("aux", "lr"))  # fmt: skip
    log_lr = aux["log_lr"].detach().requires_grad_()
    chained = torch.autograd.grad(
        list(tied({"log_lr": log_lr})["lr"].values()), log_lr, list(ref.hyperparams["lr"].values())
    )[0]
    torch.testing.assert_close(g.aux["log_lr"], chained, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g.aux["l2"], ref.aux["l2"], rtol=1e-10, atol=1e-13)
    assert_close_to_finite_differences(g, outer, inner, params, opt, batches, outer_batch, aux,
                                       exact=not hg.methods.resolve(method).first_order
                                       and not isinstance(method, hg.Truncated))  # fmt: skip


def assert_close_to_finite_differences(g, outer, inner, params, opt, batches, outer_batch, aux,
                                       exact):  # fmt: skip
    if not exact:  # biased methods: checked against the chain rule above
        return
    f = value_at(outer, inner, params, opt, batches, outer_batch, tied)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        v = {k: torch.randn(x.shape, generator=gen, dtype=torch.float64) for k, x in aux.items()}
        fd = finite_difference(f, aux, v, 1e-4).value
        got = sum(float((g.aux[k] * v[k]).sum()) for k in aux)
        assert got == pytest.approx(fd, rel=1e-7, abs=1e-10)


def test_wrt_naming_a_computed_hyperparameter_reports_its_partial_gradient():
    outer, inner, params, batches, outer_batch, aux = problem()
    opt = hg.optim.adam(lr=0.01)

    def fn(a):
        return {"lr": a["log_lr"][0].exp(), "betas": (0.8, 1 - a["log_lr"][1].exp())}

    g = hg.hypergrad(outer, inner, params, opt, batches, outer_batch, aux=aux, seed=0,
                     hyperparams=fn, wrt=("aux", "lr"))  # fmt: skip
    fixed = {"lr": fn(aux)["lr"].detach(), "betas": (0.8, float(1 - aux["log_lr"][1].exp()))}
    ref = hg.hypergrad(outer, inner, params, opt, batches, outer_batch, aux={"l2": aux["l2"]},
                       seed=0, hyperparams=fixed, wrt=("aux", "lr", "betas"))  # fmt: skip
    assert sorted(g.hyperparams) == ["lr"]
    torch.testing.assert_close(g.hyperparams["lr"], ref.hyperparams["lr"], rtol=1e-10, atol=0)
    lr, beta2 = (
        ref.hyperparams["lr"] * fixed["lr"],
        -ref.hyperparams["betas"][1] * (1 - fixed["betas"][1]),
    )
    torch.testing.assert_close(g.aux["log_lr"], torch.stack([lr, beta2]), rtol=1e-10, atol=1e-14)
    f = value_at(outer, inner, params, opt, batches, outer_batch, fn)
    v = {"log_lr": torch.tensor([0.6, -0.8], dtype=torch.float64), "l2": torch.tensor(0.0).double()}
    fd = finite_difference(f, aux, v, 1e-4).value
    assert float((g.aux["log_lr"] * v["log_lr"]).sum()) == pytest.approx(fd, rel=1e-7)


def test_unroll_with_a_function_keeps_the_graph_to_aux():
    outer, inner, params, batches, outer_batch, aux = problem()
    aux = {k: v.clone().requires_grad_() for k, v in aux.items()}
    opt = hg.optim.sgd(lr=0.1)
    traj = hg.unroll(inner, params, opt, batches, aux=aux, hyperparams=tied, seed=0)
    got = torch.autograd.grad(outer(traj.params, aux, outer_batch), aux["log_lr"])[0]
    g = hg.hypergrad(outer, inner, params, opt, batches, outer_batch, aux=aux, seed=0,
                     hyperparams=tied)  # fmt: skip
    torch.testing.assert_close(got, g.aux["log_lr"], rtol=1e-10, atol=1e-14)


def test_implicit_differentiates_a_computed_weight_decay():
    # ridge regression: w* = (X^T X + lam I)^{-1} X^T y with lam = exp(aux), learned as a log
    g = torch.Generator().manual_seed(0)
    X, y = (
        torch.randn(20, 3, generator=g, dtype=torch.float64),
        torch.randn(20, generator=g, dtype=torch.float64),
    )
    Xv, yv = (
        torch.randn(10, 3, generator=g, dtype=torch.float64),
        torch.randn(10, generator=g, dtype=torch.float64),
    )

    def inner(p, a, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).sum() / 2

    def outer(p, a, b):
        return ((b[0] @ p["w"] - b[1]) ** 2).mean()

    log_lam = torch.tensor(0.3, dtype=torch.float64)
    got = hg.hypergrad(outer, inner, {"w": torch.zeros(3, dtype=torch.float64)}, hg.optim.sgd(lr=0.02),
                       (X.expand(300, 20, 3), y.expand(300, 20)), (Xv, yv), aux=log_lam,
                       hyperparams=lambda a: {"weight_decay": a.exp(), "lr": 0.01 + 0.01 * a.exp()},
                       method=hg.Implicit(tol=1e-12))  # fmt: skip

    def closed(a):
        w = torch.linalg.solve(X.T @ X + a.exp() * torch.eye(3, dtype=torch.float64), X.T @ y)
        return outer({"w": w}, a, (Xv, yv))

    torch.testing.assert_close(got.aux, torch.func.grad(closed)(log_lam), rtol=1e-8, atol=0)
    assert got.trajectory.losses.shape == (300,)


def test_clients_with_a_function_of_shared_aux():
    g = torch.Generator().manual_seed(5)
    C = 3
    params = {"w": torch.randn(C, 2, generator=g, dtype=torch.float64)}
    data = torch.randn(K, C, 2, generator=g, dtype=torch.float64)

    def inner(p, a, x):
        return ((p["w"] - x) ** 2).sum() + a["c"] * (p["w"] ** 2).sum()

    def outer(server, a, t):
        return ((server["w"] - t) ** 2).sum()

    aux = {
        "log_lr": torch.tensor(-1.0, dtype=torch.float64),
        "c": torch.tensor(0.1, dtype=torch.float64),
    }
    opt, target = hg.optim.sgd(lr=0.1, momentum=0.5), torch.ones(2, dtype=torch.float64)
    fn = lambda a: {"lr": a["log_lr"].exp()}  # noqa: E731
    got = hg.clients.hypergrad(outer, inner, params, opt, data, target, aux=aux, hyperparams=fn,
                               chunk_size=2)  # fmt: skip
    ref = hg.clients.hypergrad(outer, inner, params, opt, data, target, aux={"c": aux["c"]},
                               hyperparams={"lr": aux["log_lr"].exp()}, wrt=("aux", "lr"))  # fmt: skip
    torch.testing.assert_close(got.aux["c"], ref.aux["c"], rtol=1e-10, atol=0)
    torch.testing.assert_close(got.aux["log_lr"], ref.hyperparams["lr"] * aux["log_lr"].exp(),
                               rtol=1e-10, atol=0)  # fmt: skip


# ------------------------------------------------------------------ errors


def call(hyperparams, **kw):
    outer, inner, params, batches, outer_batch, aux = problem()
    return hg.hypergrad(outer, inner, params, hg.optim.sgd(lr=0.1), batches, outer_batch,
                        aux=aux, hyperparams=hyperparams, **kw)  # fmt: skip


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        (
            lambda a: [a["log_lr"].exp()],
            TypeError,
            r"^hg\.hypergrad: hyperparams is a function, so it must return a dict .* returned a list",
        ),
        (
            lambda a: {"learning_rate": a["log_lr"].exp()},
            ValueError,
            r"^hg\.hypergrad: the hyperparams function returned the unknown name 'learning_rate'; "
            r"hg\.optim\.sgd\(.*\) has: lr, ",
        ),
        (
            lambda a: {"lr": -a["log_lr"].exp()[0]},
            ValueError,
            r"^hg\.hypergrad: invalid lr: -0\.135.*; it must be >= 0\.0",
        ),
        (lambda a: {"lr": "fast"}, ValueError, r"^hg\.hypergrad: lr is a str"),
    ],
    ids=["not-a-dict", "unknown-name", "negative", "a-string"],
)
def test_bad_hyperparams_function_raises(fn, error, match):
    with pytest.raises(error, match=match):
        call(fn)


def test_check_hypergrad_steps_past_the_edge_of_a_range():
    # momentum = 0: the finite differences evaluate momentum = -eps, which the front door
    # refuses from a user; check_hypergrad's own evaluations are exempt.
    outer, inner, params, batches, outer_batch, aux = problem()
    report = hg.testing.check_hypergrad(outer, inner, params, hg.optim.sgd(lr=0.1, momentum=0.0),
                                        batches, outer_batch, aux=aux, wrt=("momentum",))  # fmt: skip
    assert report.passed
    with pytest.raises(ValueError, match=r"^hg\.unroll: invalid momentum: -0\.001"):
        hg.unroll(inner, params, hg.optim.sgd(lr=0.1, momentum=0.5), batches, aux=aux,
                  hyperparams={"momentum": torch.tensor(-1e-3, dtype=torch.float64)})  # fmt: skip

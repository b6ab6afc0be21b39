"""Every method against finite differences (one parametrisation, jaxopt style) and each other."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import hypergrad as hg
from hypergrad.testing import strategies as hst

K = 4
EXACT = [
    pytest.param("reverse", id="reverse"),
    pytest.param(hg.Truncated(K), id="truncated-K"),
    pytest.param(hg.Checkpointed(1), id="checkpointed-1"),
    pytest.param(hg.Checkpointed(3), id="checkpointed-3"),
    pytest.param("forward", id="forward"),
    pytest.param(hg.Forward(chunk_size=5), id="forward-chunked"),
]


def make_problem(opt, *, dropout=0.0, steps=K, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 4), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    model = nn.Sequential(*layers, nn.Linear(4, 1)).double()
    params, _ = hg.split(model)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(steps, 6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(steps, 6, 1, generator=g, dtype=torch.float64)
    vx = torch.randn(6, 3, generator=g, dtype=torch.float64)
    vy = torch.randn(6, 1, generator=g, dtype=torch.float64)
    aux = {"weights": torch.rand(6, generator=g, dtype=torch.float64) + 0.5,
           "l2": torch.tensor(0.05, dtype=torch.float64)}  # fmt: skip

    def inner(p, a, batch):
        xb, yb = batch
        err = ((hg.call(model, p, xb) - yb) ** 2).squeeze(-1)
        return (a["weights"] * err).mean() + a["l2"] * sum((w**2).sum() for w in p.values())

    def outer(p, a, batch):
        xb, yb = batch
        return ((hg.call(model, p, xb) - yb) ** 2).mean()

    return {"outer_loss": outer, "inner_loss": inner, "params": params, "opt": opt,
            "batches": (x, y), "outer_batch": (vx, vy), "aux": aux}  # fmt: skip


SGD = hg.optim.sgd(lr=0.1, momentum=0.8, weight_decay=0.01)
ADAM = hg.optim.adam(lr=0.02, betas=(0.8, 0.95), eps=1e-3)


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("opt", [SGD, ADAM], ids=["sgd", "adam"])
def test_exact_method_matches_finite_differences(method, opt):
    report = hg.testing.check_hypergrad(
        **make_problem(opt), method=method, wrt=("aux", "params", "lr"), directions=3
    )
    assert report.passed and report.max_rel_err < 1e-6


@pytest.mark.parametrize("method", EXACT)
def test_hyperparameter_hypergradients_match_finite_differences(method):
    # lr, momentum, dampening and a weight decay per layer (SGD); betas, eps (Adam).
    problem = make_problem(SGD)
    per_layer = {k: 0.01 * (i + 1) for i, k in enumerate(problem["params"])}
    problem["opt"] = hg.optim.sgd(lr=0.1, momentum=0.8, dampening=0.1, weight_decay=per_layer)
    report = hg.testing.check_hypergrad(**problem, method=method, wrt=("hyperparams",))
    assert set(report.hypergradient.hyperparams) == {"lr", "momentum", "dampening", "weight_decay"}
    assert set(report.hypergradient.hyperparams["weight_decay"]) == set(per_layer)
    problem["opt"] = ADAM
    report = hg.testing.check_hypergrad(**problem, method=method, wrt=("betas", "eps", "lr"))
    betas = report.hypergradient.hyperparams["betas"]
    assert isinstance(betas, tuple) and len(betas) == 2 and betas[0].shape == ()


def test_exact_methods_agree_with_reverse_to_1e_10():
    problem = make_problem(ADAM, steps=7)
    wrt = ("aux", "hyperparams", "params")
    ref = hg.hypergrad(**problem, method="reverse", wrt=wrt, seed=0)
    methods = [hg.Truncated(7), hg.Truncated(100), hg.Checkpointed(1), hg.Checkpointed(2),
               hg.Checkpointed(3), hg.Checkpointed(7), hg.Checkpointed(50), "forward",
               hg.Forward(chunk_size=7)]  # fmt: skip
    for method in methods:
        g = hg.hypergrad(**problem, method=method, wrt=wrt, seed=0)
        torch.testing.assert_close(g.value, ref.value, rtol=0, atol=1e-12)
        for a, b in zip(hg.tree.leaves(g[1:]), hg.tree.leaves(ref[1:])):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{method} != reverse")


@pytest.mark.parametrize("method", [hg.Checkpointed(2), "forward"])
def test_dropout_is_reproduced_by_recomputation(method):
    problem = make_problem(SGD, dropout=0.3)
    wrt = ("aux", "lr")
    ref = hg.hypergrad(**problem, method="reverse", wrt=wrt, seed=11)
    got = hg.hypergrad(**problem, method=method, wrt=wrt, seed=11)
    for a, b in zip(hg.tree.leaves(got[1:]), hg.tree.leaves(ref[1:])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the masks matter: another seed gives another hypergradient
    other = hg.hypergrad(**problem, method="reverse", wrt=wrt, seed=12)
    assert not torch.allclose(other.aux["weights"], ref.aux["weights"])
    # and the whole thing is a true gradient of the seeded, dropout-dependent loss
    hg.testing.check_hypergrad(**problem, method=method, wrt=wrt, seed=11)


def test_batchnorm_model_through_every_method():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    params, buffers = hg.split(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(3, 8, 1, generator=g, dtype=torch.float64)
    aux = torch.tensor(0.1, dtype=torch.float64)

    def inner(p, a, batch, bufs):
        out, new = hg.call(model, p, batch[0], buffers=bufs, return_buffers=True)
        return ((out - batch[1]) ** 2).mean() + a * (p["3.weight"] ** 2).sum(), new

    def outer(p, a, batch, bufs):  # eval mode: uses the carried running statistics
        out = torch.func.functional_call(model.eval(), (p, bufs), (batch[0],))
        model.train()
        return ((out - batch[1]) ** 2).mean()

    problem = {"outer_loss": outer, "inner_loss": inner, "params": params,
               "opt": hg.optim.adam(lr=0.05, eps=1e-3), "batches": (x, y),
               "outer_batch": (x[0], y[0]), "aux": aux, "buffers": buffers}  # fmt: skip
    ref = hg.hypergrad(**problem, wrt=("aux", "lr"))
    for method in [hg.Checkpointed(2), "forward", hg.Truncated(3)]:
        got = hg.hypergrad(**problem, method=method, wrt=("aux", "lr"))
        torch.testing.assert_close(got.aux, ref.aux, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.hyperparams, ref.hyperparams, rtol=1e-10, atol=1e-12)

    # torch updates running statistics without autograd, so every method treats them as
    # constants; a finite-difference check therefore needs an outer loss on batch statistics.
    def outer_train(p, a, batch, bufs):
        return ((hg.call(model, p, batch[0], buffers=bufs) - batch[1]) ** 2).mean()

    hg.testing.check_hypergrad(**{**problem, "outer_loss": outer_train}, wrt=("aux", "lr"))
    assert torch.equal(buffers["1.running_mean"], torch.zeros(4, dtype=torch.float64))


# ------------------------------------------------------------------ biased methods


def scalar_problem():
    # w_{k+1} = w_k - lr * 2 (w_k - a x_k): linear, so every method has a closed form.
    def inner(p, a, x):
        return ((p["w"] - a * x) ** 2).sum()

    def outer(p, a, y):
        return ((p["w"] - y) ** 2).sum()

    x = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    return {"outer_loss": outer, "inner_loss": inner, "params": {"w": torch.zeros(1, dtype=torch.float64)},
            "opt": hg.optim.sgd(lr=0.1), "batches": x, "outer_batch": torch.tensor([0.5], dtype=torch.float64),
            "aux": torch.tensor(0.7, dtype=torch.float64)}  # fmt: skip


def test_truncated_differentiates_only_the_last_steps():
    problem = scalar_problem()
    a, lr, x, y = 0.7, 0.1, [1.0, 2.0, -1.0], 0.5
    w = [0.0]
    for xk in x:
        w.append(w[-1] - lr * 2 * (w[-1] - a * xk))
    # last step only: w3 = (1 - 2 lr) w2 + 2 lr a x2 with w2 constant
    expected_t1 = 2 * (w[3] - y) * 2 * lr * x[2]
    # last two steps: w2 also depends on a
    expected_t2 = 2 * (w[3] - y) * ((1 - 2 * lr) * 2 * lr * x[1] + 2 * lr * x[2])
    for t, expected in [(1, expected_t1), (2, expected_t2)]:
        got = hg.hypergrad(**problem, method=hg.Truncated(t))
        assert got.aux.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(AssertionError, match="disagrees with finite differences"):
        hg.testing.check_hypergrad(**problem, method=hg.Truncated(1))


def test_truncated_wrt_params_with_t_below_k_raises():
    with pytest.raises(
        ValueError,
        match=r"hg.hypergrad: hg.Truncated\(2\) cannot differentiate with respect to the initial params: with 3 steps",
    ):
        hg.hypergrad(**scalar_problem(), method=hg.Truncated(2), wrt=("params",))


def test_first_order_drops_second_order_terms():
    problem = scalar_problem()
    lr = 0.1
    ref = hg.hypergrad(**problem, wrt=("params", "aux"))
    with pytest.warns(
        UserWarning,
        match=r"hg.hypergrad: aux does not affect the outer loss with method='first_order'",
    ):
        got = hg.hypergrad(**problem, method="first_order", wrt=("params", "aux"))
    # inner gradient held constant: dw_K/dw_0 = 1 (exact: (1 - 2 lr)^3), d/da of w_K = 0
    traj = hg.unroll(
        problem["inner_loss"],
        problem["params"],
        problem["opt"],
        problem["batches"],
        aux=problem["aux"],
    )
    w3 = traj.params["w"]
    torch.testing.assert_close(got.params["w"], 2 * (w3 - 0.5), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        ref.params["w"], 2 * (w3 - 0.5) * (1 - 2 * lr) ** 3, rtol=1e-12, atol=0
    )
    assert got.aux.item() == 0.0 and ref.aux.item() != 0.0


def test_first_order_matches_a_detached_hand_unroll_for_adam():
    problem = make_problem(ADAM)
    got = hg.hypergrad(**problem, method="first_order", wrt=("params", "lr"), seed=0)
    opt, params = ADAM, problem["params"]
    x, y = problem["batches"]
    lr = torch.tensor(0.02, dtype=torch.float64, requires_grad=True)
    p0 = {k: v.clone().requires_grad_() for k, v in params.items()}
    p, s = p0, opt.init(p0, hyperparams={"lr": lr})
    for k in range(K):
        g = torch.func.grad(problem["inner_loss"])(hg.tree.detach(p), problem["aux"], (x[k], y[k]))
        p, s = opt.step(p, g, s, hyperparams={"lr": lr})
    value = problem["outer_loss"](p, problem["aux"], problem["outer_batch"])
    grads = torch.autograd.grad(value, [lr, *p0.values()])
    torch.testing.assert_close(got.hyperparams["lr"], grads[0], rtol=1e-12, atol=1e-14)
    for got_p, want in zip(got.params.values(), grads[1:]):
        torch.testing.assert_close(got_p, want, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ property test over configurations


METHODS = st.sampled_from(["reverse", "checkpointed", "forward", "truncated"])


@given(hst.bilevel_problems(max_steps=4), METHODS, st.integers(1, 4))
def test_property_exact_methods_match_finite_differences(problem, name, segment):
    kwargs = problem.kwargs()
    steps = kwargs["batches"][0].shape[0]
    method = {
        "reverse": "reverse",
        "checkpointed": hg.Checkpointed(segment),
        "forward": hg.Forward(chunk_size=segment),
        "truncated": hg.Truncated(steps + segment - 1),
    }[name]
    hg.testing.check_hypergrad(
        **kwargs, method=method, wrt=("aux", "lr", "params"), directions=2, rtol=1e-5, atol=1e-9
    )


# ------------------------------------------------------------------ constructors


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: hg.Truncated(0), r"hg.Truncated: steps must be a positive int .* got 0"),
        (lambda: hg.Truncated(2.0), r"hg.Truncated: steps must be a positive int .* got 2.0"),
        (lambda: hg.Checkpointed(0), r"hg.Checkpointed: segment must be a positive int .* got 0"),
        (
            lambda: hg.Forward(chunk_size=0),
            r"hg.Forward: chunk_size must be a positive int or None, got 0",
        ),
    ],
)
def test_bad_method_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_unknown_method_raises():
    with pytest.raises(
        ValueError, match=r"hg.hypergrad: unknown method 'backward'; use 'reverse', 'forward'"
    ):
        hg.hypergrad(**scalar_problem(), method="backward")


def test_method_reprs():
    assert [repr(m) for m in (hg.Truncated(3), hg.Checkpointed(4), hg.Forward(), hg.Forward(2))] == [
        "hg.Truncated(3)", "hg.Checkpointed(4)", '"forward"', "hg.Forward(2)"]  # fmt: skip


def test_checkpointed_differentiates_through_differentiable_buffers():
    # a functional moving average of the params, carried as a buffer and used by the outer loss
    def inner(p, a, x, bufs):
        loss = ((p["w"] - a * x) ** 2).sum()
        return loss, {"ema": 0.5 * bufs["ema"] + 0.5 * p["w"]}

    def outer(p, a, y, bufs):
        return ((bufs["ema"] - y) ** 2).sum() + (p["w"] ** 2).sum()

    problem = {**scalar_problem(), "inner_loss": inner, "outer_loss": outer,
               "buffers": {"ema": torch.zeros(1, dtype=torch.float64)}}  # fmt: skip
    ref = hg.hypergrad(**problem, wrt=("aux", "lr", "params"))
    for method in [hg.Checkpointed(1), hg.Checkpointed(2), "forward"]:
        got = hg.hypergrad(**problem, method=method, wrt=("aux", "lr", "params"))
        for a, b in zip(hg.tree.leaves(got[1:]), hg.tree.leaves(ref[1:])):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    hg.testing.check_hypergrad(**problem, method=hg.Checkpointed(2), wrt=("aux", "lr", "params"))


# --------------------------------------------------------------- torch #123996 (mse_loss, forward)


def _mse_problem():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    model = model.double()
    x = torch.randn(4, 8, 3, dtype=torch.float64)
    y = torch.randn(4, 8, 1, dtype=torch.float64)
    params, _ = hg.split(model)
    return model, params, x, y


@pytest.mark.parametrize("opt", [hg.optim.sgd(lr=0.1, momentum=0.5), hg.optim.adam(lr=0.05)])
def test_forward_with_mse_loss_target_in_batch_matches_reverse(opt):
    # F.mse_loss's forward-over-reverse rule writes into the target's missing tangent (a torch bug);
    # the forward method gives batch tensors a zero tangent so this common loss just works.
    model, params, x, y = _mse_problem()

    def inner(p, s, batch):
        xb, yb = batch
        fit = torch.nn.functional.mse_loss(hg.call(model, p, xb), yb)
        return fit + s * hg.tree.vdot(p, p)

    def outer(p, s, batch):
        return torch.nn.functional.mse_loss(hg.call(model, p, batch[0]), batch[1])

    s = torch.tensor(0.01, dtype=torch.float64)
    args = (outer, inner, params, opt, (x, y), (x[0], y[0]))
    fwd = hg.hypergrad(*args, aux=s, method="forward", wrt=("aux", "lr"), seed=0)
    rev = hg.hypergrad(*args, aux=s, method="reverse", wrt=("aux", "lr"), seed=0)
    torch.testing.assert_close(fwd.aux, rev.aux, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fwd.hyperparams["lr"], rev.hyperparams["lr"], rtol=1e-10, atol=1e-12)


def test_forward_with_mse_loss_target_from_closure_equals_reverse():
    # torch's forward-mode rule of mse_loss's backward fails on a target without a tangent
    # (pytorch/pytorch#123996); forward mode rewrites F.mse_loss with elementary ops.
    model, params, x, y = _mse_problem()

    def inner(p, s, xb):  # the target y is captured, so it has no tangent
        return torch.nn.functional.mse_loss(hg.call(model, p, xb), y[0]) + s * hg.tree.vdot(p, p)

    def outer(p, s, xb):
        return hg.call(model, p, xb).pow(2).mean()

    args = (outer, inner, params, hg.optim.sgd(lr=0.1), x, x[0])
    s = torch.tensor(0.01, dtype=torch.float64)
    fwd = hg.hypergrad(*args, aux=s, method="forward", wrt=("aux", "lr"))
    rev = hg.hypergrad(*args, aux=s, method="reverse", wrt=("aux", "lr"))
    torch.testing.assert_close(fwd.aux, rev.aux, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fwd.hyperparams["lr"], rev.hyperparams["lr"], rtol=1e-10, atol=1e-12)

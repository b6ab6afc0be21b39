"""hg.Implicit: closed forms (jaxopt style ridge), the long unroll at convergence, its honesty."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hypergrad as hg
from hypergrad.methods._solvers import cg, minres, neumann

F64 = torch.float64
SOLVERS = [
    pytest.param(hg.Implicit("cg", tol=1e-10), id="cg"),
    pytest.param(hg.Implicit("minres", tol=1e-10), id="minres"),
    pytest.param(hg.Implicit("neumann", tol=1e-10, alpha=0.01, maxiter=2000), id="neumann"),
]


def ridge_data(dtype=F64, n=30, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype)
    Xv, yv = torch.randn(12, d, generator=g, dtype=dtype), torch.randn(12, generator=g, dtype=dtype)
    return (X, y), (Xv, yv)


def ridge_inner(p, aux, batch):
    """Per-example weighted least squares with an L2 penalty: aux = {"lam", "weights"}."""
    X, y = batch
    return (aux["weights"] * (X @ p["w"] - y) ** 2).sum() / 2 + aux["lam"] / 2 * (p["w"] ** 2).sum()


def ridge_outer(p, aux, batch):
    X, y = batch
    return ((X @ p["w"] - y) ** 2).mean()


def ridge_solution(aux, batch):
    X, y = batch
    A = X.T @ (aux["weights"][:, None] * X) + aux["lam"] * torch.eye(X.shape[1], dtype=X.dtype)
    return {"w": torch.linalg.solve(A, X.T @ (aux["weights"] * y))}


def ridge_exact(aux, train, val):
    return torch.func.grad(lambda a: ridge_outer(ridge_solution(a, train), a, val))(aux)


def ridge_aux(dtype=F64, n=30):
    g = torch.Generator().manual_seed(5)
    return {
        "lam": torch.tensor(2.0, dtype=dtype),
        "weights": torch.rand(n, generator=g, dtype=dtype) + 0.5,
    }


def full_batch(batch, steps):
    return tuple(t.expand(steps, *t.shape) for t in batch)


def ridge(method, *, steps=400, opt=None, dtype=F64, **kwargs):
    train, val = ridge_data(dtype)
    aux = ridge_aux(dtype)
    opt = opt or hg.optim.sgd(lr=0.01, momentum=0.5)
    g = hg.hypergrad(ridge_outer, ridge_inner, {"w": torch.zeros(5, dtype=dtype)}, opt,
                     full_batch(train, steps), val, aux=aux, method=method, **kwargs)  # fmt: skip
    return g, ridge_exact(aux, train, val)


def assert_close(got, want, rtol):
    for key in want:
        err = (got[key] - want[key]).norm() / want[key].norm()
        assert err <= rtol, (key, float(err))


@pytest.mark.parametrize("method", SOLVERS)
def test_ridge_matches_the_closed_form_for_every_solver(method):
    g, exact = ridge(method)
    assert_close(g.aux, exact, 1e-7)
    assert g.solver.converged and g.solver.residual <= 1e-10 and g.solver.iterations >= 1
    assert g.solver.solver == method.solver and g.solver.stationarity < 1e-10


def test_ridge_float32_and_the_string_name():
    g, exact = ridge("implicit", dtype=torch.float32)
    assert g.aux["lam"].dtype == torch.float32
    assert_close(g.aux, exact, 1e-4)


@pytest.mark.parametrize(
    "opt",
    [hg.optim.sgd(lr=0.01, momentum=0.9, nesterov=True), hg.optim.adam(lr=0.05),
     hg.optim.rmsprop(lr=0.01, momentum=0.5), hg.optim.adagrad(lr=0.5)],
    ids=["sgd-nesterov", "adam", "rmsprop", "adagrad"],
)  # fmt: skip
def test_every_optimizer_family_reaches_the_same_hypergradient(opt):
    g, exact = ridge(hg.Implicit(tol=1e-10), steps=1500, opt=opt)
    assert_close(g.aux, exact, 1e-2)  # adaptive families hover near the optimum (lr-sized)


def test_l2_weight_decay_is_differentiable_per_parameter():
    train, val = ridge_data()
    plain = lambda p, a, b: ((b[0] @ p["w"] - b[1]) ** 2).sum() / 2 + p["b"] ** 2 / 2  # noqa: E731
    params = {"w": torch.zeros(5, dtype=F64), "b": torch.zeros((), dtype=F64)}
    decay = {"w": torch.full((5,), 2.0, dtype=F64), "b": torch.tensor(0.0, dtype=F64)}
    opt = hg.optim.sgd(lr=0.01, momentum=0.5, weight_decay=decay)
    g = hg.hypergrad(ridge_outer, plain, params, opt, full_batch(train, 400), val,
                     method=hg.Implicit(tol=1e-10), wrt="weight_decay")  # fmt: skip

    def closed(wd):  # per-feature ridge: (X^T X + diag(wd)) w = X^T y
        X, y = train
        return ridge_outer({"w": torch.linalg.solve(X.T @ X + torch.diag(wd), X.T @ y)}, None, val)

    exact = torch.func.grad(closed)(decay["w"])
    assert torch.allclose(g.hyperparams["weight_decay"]["w"], exact, rtol=1e-7, atol=1e-12)
    assert g.hyperparams["weight_decay"]["b"].shape == ()


def test_maximize_uses_the_negated_gradient():
    neg = lambda p, a, b: -ridge_inner(p, a, b)  # noqa: E731
    train, val = ridge_data()
    aux = ridge_aux()
    g = hg.hypergrad(ridge_outer, neg, {"w": torch.zeros(5, dtype=F64)},
                     hg.optim.sgd(lr=0.01, momentum=0.5, maximize=True), full_batch(train, 400),
                     val, aux=aux, method=hg.Implicit(tol=1e-10))  # fmt: skip
    assert_close(g.aux, ridge_exact(aux, train, val), 1e-7)


def logistic_problem(steps):
    """A non-quadratic inner problem: L2-regularised logistic regression, weighted examples."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, generator=g, dtype=F64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + torch.randn(40, generator=g, dtype=F64) > 0
    Xv, yv = torch.randn(10, 3, generator=g, dtype=F64), torch.rand(10, generator=g, dtype=F64)

    def inner(p, a, b):
        logits = b[0] @ p["w"] + p["b"]
        nll = nn.functional.binary_cross_entropy_with_logits(logits, b[1].to(F64), reduction="none")
        return (a["weights"] * nll).mean() + a["lam"] * (p["w"] ** 2).sum()

    def outer(p, a, b):
        return nn.functional.binary_cross_entropy_with_logits(b[0] @ p["w"] + p["b"], b[1])

    aux = {
        "weights": torch.rand(40, generator=g, dtype=F64) + 0.5,
        "lam": torch.tensor(0.1, dtype=F64),
    }
    return dict(outer_loss=outer, inner_loss=inner, params={"w": torch.zeros(3, dtype=F64),
                "b": torch.zeros((), dtype=F64)}, opt=hg.optim.sgd(lr=3.0, momentum=0.5),
                batches=full_batch((X, y), steps), outer_batch=(Xv, yv), aux=aux)  # fmt: skip


def test_non_quadratic_problem_equals_the_long_unroll_at_convergence():
    problem = logistic_problem(300)
    implicit = hg.hypergrad(**problem, method=hg.Implicit(tol=1e-12))
    unrolled = hg.hypergrad(**problem, method="reverse")
    assert_close(implicit.aux, unrolled.aux, 1e-6)
    assert torch.equal(implicit.value, unrolled.value)


def test_check_hypergrad_takes_finite_differences_of_the_converged_solution():
    problem = logistic_problem(300)
    report = hg.testing.check_hypergrad(**problem, method=hg.Implicit(tol=1e-12), rtol=1e-6)
    assert report.passed and report.hypergradient.solver.converged


def test_badly_conditioned_neumann_does_not_converge_and_says_so():
    scales = torch.logspace(0, 2, 5, dtype=F64)  # Hessian eigenvalues 1 .. 1e4
    train, val = ridge_data()
    X = train[0] / train[0].norm(dim=0) * scales
    train = (X, train[1])
    quad = lambda p, a, b: ((b[0] @ p["w"] - b[1]) ** 2).sum() / 2 + a / 2 * (p["w"] ** 2).sum()  # noqa: E731
    common = dict(outer_loss=ridge_outer, inner_loss=quad, params={"w": torch.zeros(5, dtype=F64)},
                  batches=full_batch(train, 3), outer_batch=val, aux=torch.tensor(1e-3, dtype=F64),
                  hyperparams={"lr": 0.0})  # fmt: skip
    start = ridge_solution({"lam": common["aux"], "weights": torch.ones(30, dtype=F64)}, train)
    common["params"] = start  # start at the optimum: only the solver is tested
    off = {"stationarity": float("inf")}  # a warm start at the optimum: no progress to measure
    slow = hg.Implicit("neumann", alpha=1e-4, maxiter=50, tol=1e-8, **off)
    with pytest.warns(hg.ImplicitWarning, match=r"did not converge: relative residual .* after 50 "
                      r"Hessian-vector products \(tol=1e-08\)\. The Neumann series"):  # fmt: skip
        g = hg.hypergrad(opt=hg.optim.sgd(), method=slow, **common)
    assert not g.solver.converged and g.solver.iterations == 50 and g.solver.residual > 0.1
    with pytest.raises(ValueError, match=r"hg\.hypergrad: hg\.Implicit\('neumann', alpha=1\.0\) "
                       r"diverged after \d+ Hessian-vector products \(the series diverges: "
                       r"alpha=1 times the Hessian has an eigenvalue outside \(0, 2\); relative "
                       r"residual .*\), so its partial sum is not the hypergradient\. Leave "
                       r"alpha=None"):  # fmt: skip
        hg.hypergrad(opt=hg.optim.sgd(), method=hg.Implicit("neumann", alpha=1.0, **off), **common)
    good = hg.hypergrad(opt=hg.optim.sgd(), method=hg.Implicit(tol=1e-12, **off), **common)
    exact = torch.func.grad(lambda lam: ridge_outer(ridge_solution(
        {"lam": lam, "weights": torch.ones(30, dtype=F64)}, train), None, val))(common["aux"])  # fmt: skip
    assert good.solver.converged and torch.allclose(good.aux, exact, rtol=1e-6)


def conditioned_ridge(low, high):
    """Ridge data whose Hessian X^T X + lam I has eigenvalues spread over [low, high]."""
    g = torch.Generator().manual_seed(3)
    lam = torch.tensor(0.5, dtype=F64)
    U = torch.linalg.qr(torch.randn(30, 5, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))[0]
    X = U @ torch.diag((torch.linspace(low, high, 5, dtype=F64) - lam).sqrt()) @ V.T
    train = (X, torch.randn(30, generator=g, dtype=F64))
    val = (torch.randn(12, 5, generator=g, dtype=F64), torch.randn(12, generator=g, dtype=F64))
    return train, val, lam


@pytest.mark.parametrize("tol", [1e-10, 1e-6])
def test_neumann_default_step_converges_on_a_well_conditioned_ridge(tol):
    # Issue 23: eigenvalues of H in [0.87, 2.08]; the old default alpha=1.0 diverged (a warning
    # and 1.5e6 for -0.046). The default step comes from power iterations on H.
    train, val, lam = conditioned_ridge(0.87, 2.08)
    quad = lambda p, a, b: ((b[0] @ p["w"] - b[1]) ** 2).sum() / 2 + a / 2 * (p["w"] ** 2).sum()  # noqa: E731
    start = ridge_solution({"lam": lam, "weights": torch.ones(30, dtype=F64)}, train)
    exact = torch.func.grad(lambda a: ridge_outer(ridge_solution(
        {"lam": a, "weights": torch.ones(30, dtype=F64)}, train), None, val))(lam)  # fmt: skip
    args = (ridge_outer, quad, start, hg.optim.sgd(lr=0.5), full_batch(train, 3), val)
    off = {"stationarity": float("inf")}  # a start at the optimum: only the solver is tested
    g = hg.hypergrad(*args, aux=lam, method=hg.Implicit("neumann", tol=tol, **off))
    assert g.solver.converged and g.solver.iterations < 100
    assert abs(float(g.aux - exact)) <= 10 * tol * abs(float(exact))
    with pytest.raises(ValueError, match=r"diverged after .* alpha=1 times the Hessian"):
        hg.hypergrad(*args, aux=lam, method=hg.Implicit("neumann", alpha=1.0, **off))


def test_neumann_refuses_a_hessian_without_a_positive_top_eigenvalue():
    A = -torch.eye(3, dtype=F64)
    out = neumann(lambda v: A @ v, torch.ones(3, dtype=F64), maxiter=10, tol=1e-8)
    assert out.diverged and not out.converged and "not positive" in out.note


def test_far_from_stationary_warns_with_the_ratio():
    with pytest.warns(hg.ImplicitWarning, match=r"gradient norm is .*, 0\.\d+ times its norm"):
        g, _ = ridge(hg.Implicit(), steps=3)
    assert 1e-2 < g.solver.stationarity < 1


def test_buffers_are_held_constant_and_equal_the_unroll():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 1)).double()
    params, buffers = hg.split(model)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 3, generator=g, dtype=F64), torch.randn(16, 1, generator=g, dtype=F64)

    def inner(p, a, b, bufs):
        out, new = hg.call(model, p, b[0], buffers=bufs, return_buffers=True)
        return ((out - b[1]) ** 2).mean() + a * sum((w**2).sum() for w in p.values()), new

    def outer(p, a, b, bufs):  # train mode: batch statistics, as in training
        return ((hg.call(model, p, b[0], buffers=bufs) - b[1] * 0.5) ** 2).mean()

    problem = dict(outer_loss=outer, inner_loss=inner, params=params,
                   opt=hg.optim.sgd(lr=0.1, momentum=0.5), batches=full_batch((x, y), 400), outer_batch=(x, y),
                   aux=torch.tensor(0.05, dtype=F64), buffers=buffers)  # fmt: skip
    implicit = hg.hypergrad(**problem, method=hg.Implicit(tol=1e-10, stationarity=1e-3))
    unrolled = hg.hypergrad(**problem, method=hg.Checkpointed(50))
    assert torch.allclose(implicit.aux, unrolled.aux, rtol=1e-4)


def test_compiled_inner_loop_gives_the_same_hypergradient():
    eager, _ = ridge(hg.Implicit(tol=1e-10), steps=200)
    compiled, _ = ridge(hg.Implicit(tol=1e-10), steps=200, compile=True)
    assert_close(compiled.aux, eager.aux, 1e-10)


@pytest.mark.parametrize("rounds", [1, 2])
def test_clients_vmap_equals_a_loop_of_closed_forms(rounds):
    C, steps = 3, 400
    g = torch.Generator().manual_seed(3)
    X = torch.randn(C, 30, 5, generator=g, dtype=F64)
    Y = torch.randn(C, 30, generator=g, dtype=F64)
    _, val = ridge_data()
    aux = {"lam": torch.tensor(1.5, dtype=F64), "weights": torch.ones(30, dtype=F64)}
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    got = hg.clients.hypergrad(
        ridge_outer, ridge_inner, {"w": torch.zeros(5, dtype=F64)}, hg.optim.sgd(lr=0.01, momentum=0.5),
        full_batch((X, Y), steps * rounds), val, aux=aux, steps=steps, rounds=rounds,
        in_dims={"params": None}, weights=weights, method=hg.Implicit(tol=1e-12),
    )  # fmt: skip

    def server_loss(a):  # a Python loop over clients: each one's optimum, then FedAvg
        ws = [ridge_solution(a, (X[c], Y[c]))["w"] for c in range(C)]
        server = sum(w * ws[c] for c, w in enumerate(weights / weights.sum()))
        return ridge_outer({"w": server}, a, val)

    assert_close(got.aux, torch.func.grad(server_loss)(aux), 1e-8)
    assert got.solver.converged


def test_solvers_on_an_explicit_indefinite_system():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=F64))[0]
    A = Q @ torch.diag(torch.tensor([-3.0, -1.0, -0.5, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=F64)) @ Q.T
    b = torch.randn(8, generator=g, dtype=F64)
    kept = b.clone()
    want = torch.linalg.solve(A, b)
    out = minres(lambda v: A @ v, b, maxiter=50, tol=1e-12)
    assert out.converged and torch.allclose(out.x, want, rtol=1e-9)
    assert "negative curvature" in cg(lambda v: A @ v, b, maxiter=50, tol=1e-12).note
    zero = neumann(lambda v: v, torch.zeros(3), maxiter=5, tol=1e-6)
    assert zero.converged and zero.iterations == 0
    spd = A @ A + torch.eye(8, dtype=F64)
    for solve in (cg, minres):
        assert torch.allclose(solve(lambda v: spd @ v, b, maxiter=50, tol=1e-13).x,
                              torch.linalg.solve(spd, b), rtol=1e-9)  # fmt: skip
    assert torch.equal(b, kept)  # the solvers update their own vectors in place, never b


ERRORS = [
    (lambda: hg.Implicit("lu"), r"hg\.Implicit: unknown solver 'lu'; use 'cg'"),
    (lambda: hg.Implicit(maxiter=0), r"hg\.Implicit: maxiter must be a positive int"),
    (lambda: hg.Implicit(tol=0), r"hg\.Implicit: tol must be a finite number > 0, got 0"),
    (lambda: hg.Implicit(damping=-1.0), r"hg\.Implicit: damping must be a finite number >= 0"),
    (lambda: hg.Implicit(alpha=float("inf")), r"hg\.Implicit: alpha must be a finite number > 0"),
    (lambda: hg.Implicit(stationarity=0), r"hg\.Implicit: stationarity must be a number > 0"),
    (lambda: hg.Implicit(hvp="both"), r"hg\.Implicit: hvp must be 'reverse' .* or 'forward'"),
    (lambda: hg.hypergrad(method="implicitt", **ridge_args()), r"'implicit', hg\.Truncated"),
    (lambda: hg.hypergrad(method=hg.Implicit(), wrt=("aux", "lr", "momentum"), **ridge_args()),
     r"hg\.hypergrad: hg\.Implicit\(\) has no gradient with respect to lr, momentum: they decide "
     r"how training reaches its fixed point, not where it lies.*weight_decay moves it.*"
     r"method='reverse'"),
    (lambda: hg.hypergrad(method=hg.Implicit(), wrt="params", **ridge_args()),
     r"hg\.hypergrad: hg\.Implicit\(\) has no gradient with respect to the initial params.*iMAML"),
    (lambda: hg.hypergrad(method=hg.Implicit(), **ridge_args(hg.optim.adamw(lr=0.1))),
     r"hg\.hypergrad: hg\.Implicit\(\) cannot be used here: hg\.optim\.adamw's decoupled weight "
     r"decay.*hg\.optim\.adam\(weight_decay=\.\.\.\)"),
    (lambda: hg.hypergrad(method=hg.Implicit(), wrt="betas", **ridge_args(hg.optim.adam(lr=0.1))),
     r"no gradient with respect to betas"),
]  # fmt: skip


def ridge_args(opt=None):
    train, val = ridge_data()
    return dict(outer_loss=ridge_outer, inner_loss=ridge_inner, params={"w": torch.zeros(5, dtype=F64)},
                opt=opt or hg.optim.sgd(lr=0.01, momentum=0.5), batches=full_batch(train, 2),
                outer_batch=val, aux=ridge_aux())  # fmt: skip


@pytest.mark.parametrize(("call", "message"), ERRORS, ids=range(len(ERRORS)))
def test_every_error_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_repr():
    assert repr(hg.Implicit()) == "hg.Implicit()"
    assert (
        repr(hg.Implicit("neumann", alpha=0.1, maxiter=5))
        == "hg.Implicit('neumann', maxiter=5, alpha=0.1)"
    )
    assert repr(hg.Implicit(hvp="forward")) == "hg.Implicit(hvp='forward')"


def test_minres_differentiates_a_saddle_where_cg_stops_on_negative_curvature():
    g = torch.Generator().manual_seed(4)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))[0]
    A = Q @ torch.diag(torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0, 5.0], dtype=F64)) @ Q.T
    b = torch.randn(6, generator=g, dtype=F64)
    saddle = lambda p, a, _: p["w"] @ A @ p["w"] / 2 - a @ p["w"]  # noqa: E731
    outer = lambda p, a, _: (p["w"] ** 2).sum()  # noqa: E731
    at = {"w": torch.linalg.solve(A, b)}  # the stationary point, a saddle; lr=0: stay there
    common = dict(outer_loss=outer, inner_loss=saddle, params=at, opt=hg.optim.sgd(lr=0.0),
                  batches=torch.zeros(1, 1), outer_batch=None, aux=b)  # fmt: skip
    off = {"stationarity": float("inf"), "tol": 1e-12}
    got = hg.hypergrad(**common, method=hg.Implicit("minres", **off))
    exact = torch.func.grad(lambda a: outer({"w": torch.linalg.solve(A, a)}, a, None))(b)
    assert got.solver.converged and torch.allclose(got.aux, exact, rtol=1e-9)
    with pytest.warns(hg.ImplicitWarning, match="negative curvature.*solver='minres'"):
        hg.hypergrad(**common, method=hg.Implicit(**off))


def test_clients_with_buffers_and_chunks_equal_the_unroll_at_convergence():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 1)).double()
    params, buffers = hg.stack([model] * 4)

    def inner(p, a, b, bufs):
        out, new = hg.call(model, p, b[0], buffers=bufs, return_buffers=True)
        return ((out - b[1]) ** 2).mean() + a * sum((w**2).sum() for w in p.values()), new

    def outer(p, a, b, bufs):
        return ((hg.call(model, p, b[0], buffers=bufs) - b[1]) ** 2).mean()

    g = torch.Generator().manual_seed(6)
    x, y = (
        torch.randn(4, 16, 3, generator=g, dtype=F64),
        torch.randn(4, 16, 1, generator=g, dtype=F64),
    )
    common = dict(outer_loss=outer, inner_loss=inner, params=params,
                  opt=hg.optim.sgd(lr=0.1, momentum=0.5), batches=full_batch((x, y), 300),
                  outer_batch=(x[0], y[0]), aux=torch.tensor(0.5, dtype=F64), buffers=buffers,
                  chunk_size=2)  # fmt: skip
    implicit = hg.clients.hypergrad(**common, method=hg.Implicit(tol=1e-10))
    unrolled = hg.clients.hypergrad(**common, method=hg.Checkpointed(30))
    assert torch.allclose(implicit.aux, unrolled.aux, rtol=1e-6)


def test_the_condition_batch_is_the_last_steps_unless_given():
    train, val = ridge_data()
    half = tuple(t[:15] for t in train)
    quad = lambda p, lam, b: ((b[0] @ p["w"] - b[1]) ** 2).sum() / 2 + lam / 2 * (p["w"] ** 2).sum()  # noqa: E731
    lam = torch.tensor(2.0, dtype=F64)
    common = dict(outer_loss=ridge_outer, inner_loss=quad, params={"w": torch.zeros(5, dtype=F64)},
                  opt=hg.optim.sgd(lr=0.01, momentum=0.5), outer_batch=val, aux=lam, steps=400)  # fmt: skip
    with pytest.warns(hg.ImplicitWarning, match="stationary"):  # the default: the last batch
        hg.hypergrad(**common, batches=lambda k: half if k == 399 else train, method=hg.Implicit())
    with pytest.warns(hg.ImplicitWarning, match="stationary"):  # optimal for train, not half
        hg.hypergrad(**common, batches=lambda k: train, method=hg.Implicit(batch=half))
    got = hg.hypergrad(**common, batches=lambda k: half if k == 0 else train,
                       method=hg.Implicit(tol=1e-10, batch=train))  # fmt: skip
    ones = {"lam": lam, "weights": torch.ones(30, dtype=F64)}
    assert_close({"lam": got.aux}, {"lam": ridge_exact(ones, train, val)["lam"]}, 1e-7)


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_forward_over_reverse_products_give_the_same_numbers(solver):
    reverse, exact = ridge(hg.Implicit(solver, tol=1e-10))
    forward, _ = ridge(hg.Implicit(solver, tol=1e-10, hvp="forward"))
    assert_close(forward.aux, exact, 1e-7)
    assert_close(forward.aux, reverse.aux, 1e-9)


def test_the_solvers_flat_space_round_trips_mixed_dtypes_and_no_leaves():
    from hypergrad.methods.implicit import _flat_space

    tree = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1.5, -2.0], dtype=F64)}
    flatten, unflatten = _flat_space(tree)
    flat = flatten(tree)
    assert flat.dtype == F64 and flat.shape == (8,)  # the promoted dtype
    back = unflatten(flat)
    assert back["a"].dtype == torch.float32 and back["a"].shape == (2, 3)
    assert torch.equal(back["a"], tree["a"]) and torch.equal(back["b"], tree["b"])
    flatten, unflatten = _flat_space({})
    assert flatten({}).shape == (0,) and unflatten(torch.zeros(0)) == {}

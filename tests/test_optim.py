"""Tests for hg.optim: one sweep every optimizer passes (trajectories vs torch.optim, gradients vs
finite differences and vs torch's differentiable route, zero-gradient safety, transforms, state
round trip), plus every error message."""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st

import hypergrad as hg
from hypergrad.optim._common import donated
from hypergrad.testing.check import finite_difference

F64 = torch.float64
SHAPES = [(3,), (2, 3), (), (4, 1), (1,)]


@dataclass(frozen=True)
class Family:
    name: str
    torch_cls: type
    make: Any  # kwargs -> hg optimizer
    hyper: dict[str, float]  # hyperparameters and a valid, interesting value
    options: dict[str, list]  # static options and their values


FAMILIES = [
    Family(
        "sgd",
        torch.optim.SGD,
        hg.optim.sgd,
        {"lr": 0.1, "momentum": 0.8, "dampening": 0.2, "weight_decay": 0.05},
        {"nesterov": [False, True], "maximize": [False, True]},
    ),
    Family(
        "adam",
        torch.optim.Adam,
        hg.optim.adam,
        {"lr": 0.05, "beta1": 0.8, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.1},
        {"amsgrad": [False, True], "maximize": [False, True]},
    ),
    Family(
        "adamw",
        torch.optim.AdamW,
        hg.optim.adamw,
        {"lr": 0.05, "beta1": 0.8, "beta2": 0.9, "eps": 1e-3, "weight_decay": 0.1},
        {"amsgrad": [False, True], "maximize": [False, True]},
    ),
    Family(
        "rmsprop",
        torch.optim.RMSprop,
        hg.optim.rmsprop,
        {"lr": 0.02, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.1, "momentum": 0.5},
        {"centered": [False, True], "maximize": [False, True]},
    ),
    Family(
        "adagrad",
        torch.optim.Adagrad,
        hg.optim.adagrad,
        {
            "lr": 0.1,
            "lr_decay": 0.05,
            "weight_decay": 0.1,
            "initial_accumulator_value": 0.2,
            "eps": 1e-3,
        },
        {"maximize": [False, True]},
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}
ids = [f.name for f in FAMILIES]


def kwargs_of(hyper: dict[str, Any]) -> dict[str, Any]:
    """Family hyper dict -> constructor kwargs (beta1/beta2 become betas)."""
    out = {k: v for k, v in hyper.items() if k not in ("beta1", "beta2")}
    if "beta1" in hyper:
        out["betas"] = (hyper["beta1"], hyper["beta2"])
    return out


@st.composite
def configs(draw, family: Family):
    """Random hyperparameters (some switched off), options and shapes for one family."""
    hyper = {}
    for k, v in family.hyper.items():
        scale = draw(st.sampled_from([0.0, 0.5, 1.0])) if k not in ("lr", "eps") else 1.0
        hyper[k] = v * scale if k not in ("beta1", "beta2", "alpha") else v
    options = {k: draw(st.sampled_from(vals)) for k, vals in family.options.items()}
    if options.get("nesterov"):
        hyper["momentum"], hyper["dampening"] = family.hyper["momentum"], 0.0
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4))
    return hyper, options, shapes


def make_params(shapes, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g, dtype=F64).to(dtype) for i, s in enumerate(shapes)}


def grad_stream(params, steps, seed=1, zeros=0.2):
    """Gradients with some elements exactly zero (dead units)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append(
            {
                k: torch.randn(v.shape, generator=g, dtype=F64).to(v.dtype)
                * (torch.rand(v.shape, generator=g) > zeros).to(v.dtype)
                for k, v in params.items()
            }
        )
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.equal(a.isnan(), b.isnan())
    a, b = a.nan_to_num(), b.nan_to_num()
    return float((a - b).norm() / b.norm().clamp_min(1e-300)) if b.numel() else 0.0


# --------------------------------------------------------------------------- trajectories


def torch_trajectory(family, hyper, options, params, grads, foreach):
    ps = [v.clone().requires_grad_(True) for v in params.values()]
    opt = family.torch_cls(ps, foreach=foreach, **kwargs_of(hyper), **options)
    for g in grads:
        for p, gv in zip(ps, g.values()):
            p.grad = gv.clone()
        opt.step()
    return {k: p.detach() for k, p in zip(params, ps)}


def hg_trajectory(opt, params, grads):
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(params, g, state)
    return params, state


@pytest.mark.parametrize("family", FAMILIES, ids=ids)
@given(data=st.data())
def test_trajectory_matches_torch_optim(family, data):
    hyper, options, shapes = data.draw(configs(family))
    dtype = data.draw(st.sampled_from([F64, torch.float32]))
    params = make_params(shapes, dtype)
    grads = grad_stream(params, 100)
    opt = family.make(**kwargs_of(hyper), **options)
    ours, state = hg_trajectory(opt, params, grads)
    assert float(state.step) == 100
    tol = 1e-12 if dtype == F64 else 1e-6
    for foreach in (False, True):
        ref = torch_trajectory(family, hyper, options, params, grads, foreach)
        for k in params:
            assert ours[k].dtype == dtype and ours[k].shape == params[k].shape
            assert rel_err(ours[k], ref[k]) <= tol, (k, foreach)


def donated_trajectory(opt, params, grads):
    """``hg_trajectory`` as the engine's plain training runs it: steps after the first donate.

    Also returns, per step after the first, the storage of each leaf of the new params (every
    step's params are kept alive, so that a freed address cannot be handed out again).
    """
    state = opt.init(params)
    params, state = opt.step(params, grads[0], state)
    kept = []
    for g in grads[1:]:
        with donated():
            params, state = opt.step(params, g, state)
        kept.append(params)
    storages = [[v.untyped_storage().data_ptr() for v in p.values()] for p in kept]
    return params, state, storages


@pytest.mark.parametrize("family", FAMILIES, ids=ids)
@given(data=st.data())
def test_donated_steps_write_in_place_bit_for_bit(family, data):
    hyper, options, shapes = data.draw(configs(family))
    dtype = data.draw(st.sampled_from([F64, torch.float32]))
    params = make_params(shapes, dtype)
    before = {k: v.clone() for k, v in params.items()}
    grads = grad_stream(params, 6)
    opt = family.make(**kwargs_of(hyper), **options)
    want, want_state = hg_trajectory(opt, params, grads)
    got, got_state, storages = donated_trajectory(opt, params, grads)
    for a, b in zip(hg.tree.leaves((got, got_state)), hg.tree.leaves((want, want_state))):
        assert torch.equal(a, b)
    assert all(s == storages[0] for s in storages)  # the same memory, written over each step
    for k in params:
        assert torch.equal(params[k], before[k])  # the first step's inputs are the caller's


def every_option(family):
    names = list(family.options)
    for values in itertools.product(*(family.options[n] for n in names)):
        yield dict(zip(names, values))


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("family", "options"),
    [(f, o) for f in FAMILIES for o in every_option(f)],
    ids=[f"{f.name}-{'-'.join(k for k, v in o.items() if v) or 'plain'}"
         for f in FAMILIES for o in every_option(f)],
)  # fmt: skip
def test_donated_steps_are_bit_for_bit_with_every_option_and_0d_leaves(family, options, dtype):
    # 0-d leaves: a 0-d scalar operand would promote their maths to float64 (it did for Adam)
    hyper = dict(family.hyper)
    if options.get("nesterov"):
        hyper["dampening"] = 0.0
    params = make_params([(3,), (), (2, 3), ()], dtype)
    grads = grad_stream(params, 5)
    opt = family.make(**kwargs_of(hyper), **options)
    want = hg_trajectory(opt, params, grads)
    got = donated_trajectory(opt, params, grads)[:2]
    for a, b in zip(hg.tree.leaves(got), hg.tree.leaves(want)):
        assert torch.equal(a, b)


def test_donated_steps_with_tensor_hyperparameters_or_a_graph_stay_out_of_place():
    params = make_params([(3,), (2, 3)])
    grads = grad_stream(params, 4)
    tensor_lr = hg.optim.sgd(lr=torch.tensor(0.1, dtype=F64), momentum=0.9)
    want, _ = hg_trajectory(tensor_lr, params, grads)
    got, _, storages = donated_trajectory(tensor_lr, params, grads)
    for k in params:
        assert torch.equal(got[k], want[k])
    assert storages[0] != storages[-1]  # new vectors every step: nothing overwritten
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    got, _, storages = donated_trajectory(hg.optim.adam(lr=0.1), leaves, grads)
    assert got["p0"].grad_fn is not None and storages[0] != storages[-1]  # a graph: kept
    with torch.no_grad():  # nothing recorded: the same call writes in place
        _, _, storages = donated_trajectory(hg.optim.adam(lr=0.1), leaves, grads)
    assert storages[0] == storages[-1]


def test_mixed_dtypes_are_grouped():
    params = {"a": torch.randn(3, dtype=F64), "b": torch.randn(2, dtype=torch.float32)}
    grads = grad_stream(params, 5)
    for family in FAMILIES:
        opt = family.make(**kwargs_of(family.hyper))
        ours, _ = hg_trajectory(opt, params, grads)
        ref = torch_trajectory(family, family.hyper, {}, params, grads, foreach=True)
        assert {k: v.dtype for k, v in ours.items()} == {"a": F64, "b": torch.float32}
        assert rel_err(ours["a"], ref["a"]) < 1e-12 and rel_err(ours["b"], ref["b"]) < 1e-6


# --------------------------------------------------------------------------- gradients

CURV = 0.7  # inner "loss" 0.5 * CURV * |p|^2: the gradient fed at step k is CURV * p_k + noise_k


def hp_tensors(family, hyper, form, params):
    """Hyperparameters as tensors in one of three forms: scalar, per-parameter, per-element."""

    def one(v):
        if form == "scalar":
            return torch.tensor(v, dtype=F64)
        if form == "per-parameter":
            return {k: torch.tensor(v * (1 - 0.05 * i), dtype=F64) for i, k in enumerate(params)}
        return {k: torch.full(p.shape, v, dtype=F64) for k, p in params.items()}

    hp = {k: one(v) for k, v in hyper.items() if k not in ("beta1", "beta2")}
    if "beta1" in hyper:
        hp["betas"] = (one(hyper["beta1"]), one(hyper["beta2"]))
    return hp


def unrolled_loss(opt, hp, params, noise):
    """Loss after len(noise) steps as a function of hyperparams, initial params, fed grads."""
    state = opt.init(params, hyperparams=hp)
    for n in noise:
        grads = {k: CURV * params[k] + n[k] for k in params}
        params, state = opt.step(params, grads, state, hyperparams=hp)
    return sum((v**2).sum() + v.sum() for v in params.values())


def fd_directional(fn, x, v, h=1e-5):
    """The central difference with one Richardson step, for a function smooth around ``x``.

    Richardson: truncation error O(h^4), not O(h^2). A plain central difference at h = 1e-6 is
    off by ~4e-6 relative when the loss is stiff in a hyperparameter (RMSprop with eps = 1e-3
    and a per-parameter eps direction; found by the thorough profile), which is more than the
    1e-6 the test asks for. Where ``fn`` may have a kink near ``x``, use ``finite_difference``
    itself (see test_gradients_match_finite_differences).
    """
    fd = finite_difference(fn, x, v, h)
    assert fd.formula == "central", fd
    return torch.tensor(fd.value, dtype=F64)


def tree_dot(a, b):
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return sum((x * y).sum() for x, y in zip(la, lb))


@pytest.mark.parametrize("family", FAMILIES, ids=ids)
@given(data=st.data())
def test_gradients_match_finite_differences(family, data):
    hyper, options, shapes = data.draw(configs(family))
    hyper = {**family.hyper, **{k: v for k, v in hyper.items() if k == "dampening"}}
    if options.get("nesterov"):
        hyper["dampening"] = 0.0
    k_steps = data.draw(st.integers(1, 10))
    form = data.draw(st.sampled_from(["scalar", "per-parameter", "per-element"]))
    params = make_params(shapes)
    noise = grad_stream(params, k_steps, zeros=0.0)
    opt = family.make(**kwargs_of(hyper), **options)
    hp = hp_tensors(family, hyper, form, params)
    inputs = (hp, params, noise)

    def loss(inputs):
        return unrolled_loss(opt, *inputs)

    grads = torch.func.grad(loss)(inputs)
    g = torch.Generator().manual_seed(3)
    for i, name in enumerate(["hyperparams", "params", "grads"]):
        direction = torch.utils._pytree.tree_map(
            lambda t: torch.randn(t.shape, generator=g, dtype=F64), inputs[i]
        )
        full_dir = tuple(
            direction if j == i else torch.utils._pytree.tree_map(torch.zeros_like, inputs[j])
            for j in range(3)
        )
        # Kink-aware: AMSGrad's maximum(max_exp_avg_sq, exp_avg_sq) has a kink where the two
        # cross. The thorough profile found examples whose central stencil (+-1e-5) crosses it
        # (adam/adamw, amsgrad, per-element, K = 3-4: 1e-4 to 3e-4 relative off); the one-sided
        # difference on the origin's side is compared, and an exact tie (no side stays on the
        # origin's piece) is rejected; the library's derivative at a tie is pinned by
        # test_amsgrad_derivative_at_an_exact_tie_is_the_mean_of_both_branches.
        fd = finite_difference(loss, inputs, full_dir)
        assume(fd.formula != "kink")
        if fd.formula != "central":
            event(f"{fd.formula} difference (the central stencil straddles a kink)")
        analytic = tree_dot(grads[i], direction)
        numeric = torch.tensor(fd.value, dtype=F64)
        assert torch.isclose(analytic, numeric, rtol=1e-6, atol=1e-9), (name, analytic, fd)


def amsgrad_tie(family):
    """Two AMSGrad steps where element 0 ties exactly: max_exp_avg_sq == exp_avg_sq == 1.

    beta2 = 0.75 and the gradients 2, then 1: exp_avg_sq is 0.25 * 4 = 1 after step 1 (so is
    max_exp_avg_sq) and 0.75 * 1 + 0.25 * 1 = 1 after step 2, exactly in floating point (with a
    float beta2, torch's addcmul; with a tensor one, lerp). Element 1 (gradients 2, then 3) is
    strictly on the exp_avg_sq branch. Returns max_exp_avg_sq after step 2 as a function of
    (beta2, second gradient).
    """
    opt = BY_NAME[family].make(lr=0.1, betas=(0.5, 0.75), eps=1e-3, amsgrad=True)
    params = {"w": torch.tensor([1.0, -1.0], dtype=F64)}
    first = {"w": torch.tensor([2.0, 2.0], dtype=F64)}

    def max_sq(b2, g2):
        hp = None if b2 is None else {"betas": (torch.tensor(0.5, dtype=F64), b2)}
        state = opt.init(params, hyperparams=hp)
        p, state = opt.step(params, first, state, hyperparams=hp)
        _, state = opt.step(p, {"w": g2}, state, hyperparams=hp)
        return state.max_exp_avg_sq["w"], state.exp_avg_sq["w"]

    return max_sq


@pytest.mark.parametrize("family", ["adam", "adamw"])
def test_amsgrad_derivative_at_an_exact_tie_keeps_the_old_maximum(family):
    """At an exact tie the library returns the one-sided derivative of the old maximum's branch.

    AMSGrad's running maximum is a selection, ``where(exp_avg_sq > max_exp_avg_sq, exp_avg_sq,
    max_exp_avg_sq)``: at a tie it keeps the old maximum, so the derivative is that branch's
    (the one-sided derivative along which ``exp_avg_sq`` does not grow past it), in reverse and
    forward mode alike, whatever torch's convention for ``maximum`` at a tie. Away from the tie
    the derivative is the branch's own.
    """
    max_sq = amsgrad_tie(family)
    g2 = torch.tensor([1.0, 3.0], dtype=F64)
    b2 = torch.tensor(0.75, dtype=F64)
    for b2_form in (None, b2):  # float beta2 (addcmul) and tensor beta2 (lerp)
        m, v = max_sq(b2_form, g2)
        assert torch.equal(m, torch.tensor([1.0, 3.0], dtype=F64)) and torch.equal(m, v)

        # d max_sq / d g2: the old maximum's branch gives 0 (max_exp_avg_sq of step 1 does not
        # depend on g2; the other side would be 2 * (1 - beta2) * g2 = 0.5); element 1 is on the
        # exp_avg_sq branch: 1.5.
        def of_g2(g, b2_form=b2_form):
            return max_sq(b2_form, g)[0]

        jac = torch.func.jacrev(of_g2)(g2)
        assert torch.equal(jac, torch.tensor([[0.0, 0.0], [0.0, 1.5]], dtype=F64)), jac
        _, tangent = torch.func.jvp(of_g2, (g2,), (torch.ones_like(g2),))
        assert torch.equal(tangent, torch.tensor([0.0, 1.5], dtype=F64)), tangent
    # d max_sq[0] / d beta2: left -4 (the old maximum's branch: step 1's (1 - beta2) * 4),
    # right -3 (exp_avg_sq of step 2); the library gives the left one. The one-sided
    # differences confirm the two branches, and finite_difference reports that no central
    # difference can check it.
    d_beta2 = torch.func.grad(lambda b: max_sq(b, g2)[0][0])(b2)
    assert torch.isclose(d_beta2, torch.tensor(-4.0, dtype=F64), rtol=1e-15, atol=0), d_beta2
    f = lambda b: float(max_sq(b, g2)[0][0])  # noqa: E731
    h = 1e-7
    right, left = (f(b2 + h) - f(b2)) / h, (f(b2) - f(b2 - h)) / h
    assert abs(right - -3.0) < 1e-5 and abs(left - -4.0) < 1e-5, (left, right)
    fd = finite_difference(lambda b: max_sq(b, g2)[0][0], b2, torch.ones((), dtype=F64))
    assert fd.formula == "kink" and math.isnan(fd.value)
    # just off the tie the finite difference is one-sided and matches the branch's derivative
    off = b2 + 4e-6
    fd = finite_difference(lambda b: max_sq(b, g2)[0][0], off, torch.ones((), dtype=F64))
    d_off = torch.func.grad(lambda b: max_sq(b, g2)[0][0])(off)
    assert fd.formula == "forward" and abs(d_off - -3.0) < 1e-4, (fd, d_off)
    assert math.isclose(fd.value, float(d_off), rel_tol=1e-8), (fd, d_off)


@pytest.mark.parametrize("family", FAMILIES, ids=ids)
def test_every_hyperparameter_gets_a_nonzero_gradient(family):
    params = make_params([(3,), (2, 2)])
    noise = grad_stream(params, 4, zeros=0.0)
    opt = family.make(**kwargs_of(family.hyper))
    hp = hp_tensors(family, family.hyper, "scalar", params)
    grads = torch.func.grad(lambda hp: unrolled_loss(opt, hp, params, noise))(hp)
    for leaf in torch.utils._pytree.tree_leaves(grads):
        assert torch.isfinite(leaf) and leaf != 0


def torch_differentiable_route(family, hyper_t, params, noise):
    """The torch.optim(differentiable=True) route: clone params, rebuild the optimizer per step."""
    ps = {k: v.clone() for k, v in params.items()}
    state: dict[str, dict] = {}
    for n in noise:
        new = {k: v.clone() for k, v in ps.items()}
        opt = family.torch_cls(list(new.values()), differentiable=True, foreach=False, **hyper_t)
        for k, p in new.items():
            if k in state:
                opt.state[p] = {
                    s: (v.clone() if torch.is_tensor(v) else v) for s, v in state[k].items()
                }
            p.grad = CURV * ps[k] + n[k]
        opt.step()
        state = {k: opt.state[p] for k, p in new.items()}
        ps = new
    return sum((v**2).sum() + v.sum() for v in ps.values())


# What torch.optim(differentiable=True) lets us differentiate w.r.t. Its SGD starts the momentum
# buffer as grad.detach().clone(), which cuts the graph, so SGD is compared without momentum.
TORCH_DIFF = {
    "sgd": ["lr", "weight_decay"],
    "adam": ["lr", "beta1", "beta2", "weight_decay"],
    "adamw": ["lr", "beta1", "beta2", "weight_decay"],
}


@pytest.mark.parametrize("name", sorted(TORCH_DIFF))
@pytest.mark.parametrize("k_steps", [1, 4, 10])
def test_gradients_match_torch_differentiable_route(name, k_steps):
    family = BY_NAME[name]
    params = make_params([(3,), (2, 2)])
    noise = grad_stream(params, k_steps, zeros=0.0)
    wrt = {
        k: torch.tensor(family.hyper[k], dtype=F64, requires_grad=True) for k in TORCH_DIFF[name]
    }
    p0 = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    hyper_t = {**kwargs_of(family.hyper), **kwargs_of(wrt)}
    if name == "sgd":
        hyper_t.update(momentum=0.0, dampening=0.0)
    ref = torch.autograd.grad(
        torch_differentiable_route(family, hyper_t, p0, noise), [*wrt.values(), *p0.values()]
    )
    opt = family.make(**hyper_t)
    ours = torch.autograd.grad(unrolled_loss(opt, None, p0, noise), [*wrt.values(), *p0.values()])
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_sgd_tensor_lr_gets_grad_with_plain_autograd():
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    opt = hg.optim.sgd(lr=lr, momentum=0.9)
    params = make_params([(3,)])
    noise = grad_stream(params, 3, zeros=0.0)
    unrolled_loss(opt, None, params, noise).backward()
    fd = fd_directional(
        lambda x: unrolled_loss(hg.optim.sgd(lr=x, momentum=0.9), None, params, noise),
        torch.tensor(0.1, dtype=F64),
        torch.tensor(1.0, dtype=F64),
    )
    assert torch.isclose(lr.grad, fd, rtol=1e-6)


# --------------------------------------------------------------------------- zeros and sqrt


@pytest.mark.parametrize("family", FAMILIES, ids=ids)
@pytest.mark.parametrize("opts", [{}, "all"])
def test_zero_gradient_elements_give_finite_gradients(family, opts):
    options = {k: v[-1] for k, v in family.options.items()} if opts == "all" else {}
    options.pop("maximize", None)
    hyper = {**family.hyper, "eps": 1e-8} if "eps" in family.hyper else dict(family.hyper)
    if "initial_accumulator_value" in hyper:
        hyper["initial_accumulator_value"] = 0.0
    if options.get("nesterov"):
        hyper["dampening"] = 0.0
    params = make_params([(4,), (2, 3)])
    noise = grad_stream(params, 3, zeros=0.0)
    dead = {k: torch.zeros_like(v) for k, v in params.items()}  # exactly zero gradients

    def loss(inputs):
        hp, p0, extra = inputs
        opt = family.make(**kwargs_of(hyper), **options)
        state = opt.init(p0, hyperparams=hp)
        p = p0
        for _ in noise:
            p, state = opt.step(p, {k: 0 * p[k] * extra[k] for k in p}, state, hyperparams=hp)
        p, state = opt.step(p, {k: CURV * p[k] + noise[0][k] for k in p}, state, hyperparams=hp)
        return sum((v**2).sum() for v in p.values())

    inputs = (hp_tensors(family, hyper, "scalar", params), params, dead)
    grads = torch.func.grad(loss)(inputs)
    for leaf in torch.utils._pytree.tree_leaves(grads):
        assert torch.isfinite(leaf).all()
    # and the forward of a zero-gradient step is torch's, bit for bit
    zero_grads = [dead, *grad_stream(params, 3)]
    ours, _ = hg_trajectory(family.make(**kwargs_of(hyper), **options), params, zero_grads)
    ref = torch_trajectory(family, hyper, options, params, zero_grads, foreach=False)
    for k in params:
        assert rel_err(ours[k], ref[k]) < 1e-14


def test_safe_sqrt_forward_is_sqrt_and_backward_is_finite():
    from hypergrad.optim._common import safe_sqrt

    x = torch.tensor([0.0, 4.0, 1e-300, -1.0], dtype=F64, requires_grad=True)
    y = safe_sqrt(x, nonnegative=False)
    assert torch.equal(y[:3], torch.sqrt(x.detach())[:3]) and torch.isnan(y[3])
    (g,) = torch.autograd.grad(y[:3].sum(), x)
    assert torch.isfinite(g).all() and g[0] == 0 and g[1] == 0.25


# --------------------------------------------------------------------------- transforms


# torch 2.13's first torch.func.jvp imports torch._decomp.decompositions_for_jvp, which calls the
# deprecated torch.jit.script: torch's warning, not ours.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("family", FAMILIES, ids=ids)
def test_jvp_and_create_graph_agree_with_grad(family):
    params = make_params([(3,), (2,)])
    noise = grad_stream(params, 3, zeros=0.0)
    opt = family.make(**kwargs_of(family.hyper))
    lr = torch.tensor(family.hyper["lr"], dtype=F64)

    def loss_of_lr(lr):
        return unrolled_loss(opt, {"lr": lr}, params, noise)

    d_grad = torch.func.grad(loss_of_lr)(lr)
    _, d_jvp = torch.func.jvp(loss_of_lr, (lr,), (torch.ones((), dtype=F64),))
    assert torch.isclose(d_grad, d_jvp, rtol=1e-10)
    lr_leaf = lr.clone().requires_grad_(True)
    (d_ag,) = torch.autograd.grad(loss_of_lr(lr_leaf), lr_leaf, create_graph=True)
    (d2,) = torch.autograd.grad(d_ag, lr_leaf)
    fd2 = fd_directional(
        lambda x: torch.func.grad(loss_of_lr)(x), lr, torch.ones((), dtype=F64), h=1e-5
    )
    assert torch.isclose(d_ag, d_grad, rtol=1e-10)
    assert torch.isclose(d2, fd2, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", FAMILIES, ids=ids)
def test_vmap_over_clients_each_with_its_own_hyperparameters(family):
    n_clients = 3
    clients = [make_params([(3,), (2, 2)], seed=s) for s in range(n_clients)]
    noise = [grad_stream(c, 4, seed=10 + s, zeros=0.0) for s, c in enumerate(clients)]
    lrs = torch.tensor([0.01, 0.05, 0.1], dtype=F64)
    opt = family.make(**kwargs_of(family.hyper))
    stack = lambda trees: {k: torch.stack([t[k] for t in trees]) for k in trees[0]}  # noqa: E731
    stacked_params = stack(clients)
    stacked_noise = [stack([noise[c][k] for c in range(n_clients)]) for k in range(4)]

    def client_loss(lr, params, noise):
        return unrolled_loss(opt, {"lr": lr}, params, noise)

    batched = torch.func.vmap(torch.func.grad_and_value(client_loss))(
        lrs, stacked_params, stacked_noise
    )
    for c in range(n_clients):
        g, v = torch.func.grad_and_value(client_loss)(lrs[c], clients[c], noise[c])
        assert torch.allclose(batched[0][c], g, rtol=1e-12)
        assert torch.allclose(batched[1][c], v, rtol=1e-12)


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize("family", FAMILIES, ids=ids)
def test_state_round_trips_through_torch_save_weights_only(family):
    options = {k: v[-1] for k, v in family.options.items()}
    if options.get("nesterov"):
        options["nesterov"] = False
    opt = family.make(**kwargs_of(family.hyper), **options)
    params = make_params([(3,), (2, 2)])
    _, state = hg_trajectory(opt, params, grad_stream(params, 2))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert type(loaded) is type(state)
    a, b = torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(loaded)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert loaded.step.dtype == torch.float32 and loaded.step.dim() == 0


def test_inputs_are_not_modified():
    params = make_params([(3,)])
    before = params["p0"].clone()
    grads = grad_stream(params, 1)[0]
    for family in FAMILIES:
        opt = family.make(**kwargs_of(family.hyper))
        state = opt.init(params)
        new, new_state = opt.step(params, grads, state)
        assert torch.equal(params["p0"], before) and float(state.step) == 0
        assert new_state is not state and new["p0"] is not params["p0"]


def test_per_parameter_and_per_element_hyperparams_match_separate_optimizers():
    params = make_params([(3,), (2,)])
    grads = grad_stream(params, 5)
    lr = {"p0": 0.1, "p1": torch.tensor([0.2, 0.3], dtype=F64)}
    ours, _ = hg_trajectory(
        hg.optim.adam(lr=lr, betas=({"p0": 0.5, "p1": 0.9}, 0.99)), params, grads
    )
    for key, lrs, b1 in [("p0", [0.1], 0.5), ("p1", [0.2, 0.3], 0.9)]:
        for j, lr_j in enumerate(lrs):
            sub = {"x": params[key].reshape(-1)[j : j + 1]}
            sub_grads = [{"x": g[key].reshape(-1)[j : j + 1]} for g in grads]
            ref, _ = hg_trajectory(hg.optim.adam(lr=lr_j, betas=(b1, 0.99)), sub, sub_grads)
            assert rel_err(ours[key].reshape(-1)[j : j + 1], ref["x"]) < 1e-14


def test_replace_and_tensor_hyperparams():
    opt = hg.optim.adam(lr=0.1).replace(lr=0.2, amsgrad=True)
    assert opt.hyperparams["lr"] == 0.2 and opt.options["amsgrad"]
    hp = opt.tensor_hyperparams(dtype=F64)
    assert hp["betas"][0].dtype == F64 and float(hp["lr"]) == 0.2
    assert "hg.optim.adam(lr=0.2" in repr(opt)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: hg.optim.sgd(lr=-0.1), r"hg\.optim\.sgd: invalid lr: -0\.1; it must be >= 0\.0"),
        (
            lambda: hg.optim.sgd(lr=torch.tensor(-1.0)),
            r"hg\.optim\.sgd: invalid lr: -1\.0",
        ),
        (lambda: hg.optim.sgd(momentum=-1), r"invalid momentum: -1\.0"),
        (lambda: hg.optim.sgd(weight_decay=-1), r"invalid weight_decay: -1\.0"),
        (
            lambda: hg.optim.sgd(nesterov=True),
            r"hg\.optim\.sgd: nesterov=True requires a momentum > 0 and zero dampening",
        ),
        (
            lambda: hg.optim.sgd(momentum=0.9, dampening=0.1, nesterov=True),
            r"dampening=0\.1\. Pass e\.g\. momentum=0\.9, dampening=0\.",
        ),
        (
            lambda: hg.optim.adam(betas=(1.0, 0.9)),
            r"hg\.optim\.adam: invalid betas\[0\]: 1\.0; it must be \[0\.0, 1\.0\)",
        ),
        (lambda: hg.optim.adamw(betas=(0.9, -0.1)), r"hg\.optim\.adamw: invalid betas\[1\]: -0\.1"),
        (lambda: hg.optim.adam(betas=0.9), r"betas must be a tuple of two values"),
        (lambda: hg.optim.adam(eps=-1e-8), r"invalid eps: -1e-08"),
        (
            lambda: hg.optim.adam(lr={"w": 0.1, "b": -0.1}),
            r"hg\.optim\.adam: invalid lr\['b'\]: -0\.1",
        ),
        (lambda: hg.optim.rmsprop(alpha=-0.5), r"hg\.optim\.rmsprop: invalid alpha: -0\.5"),
        (
            lambda: hg.optim.adagrad(initial_accumulator_value=-1),
            r"hg\.optim\.adagrad: invalid initial_accumulator_value: -1\.0",
        ),
        (lambda: hg.optim.adagrad(lr_decay=-1), r"invalid lr_decay: -1\.0"),
        (lambda: hg.optim.sgd(lr="0.1"), r"hg\.optim\.sgd: lr is a str; expected a float"),
        (lambda: hg.optim.sgd(lr={"w": "x"}), r"lr\['w'\] is a str; each entry"),
        (
            lambda: hg.optim.sgd(lr=0.1).replace(lr=-1.0),
            r"^hg\.optim\.sgd\.replace: invalid lr: -1\.0",
        ),
        (
            lambda: hg.optim.sgd(lr=0.1).replace(foo=1),
            r"^hg\.optim\.sgd\.replace: unknown name 'foo'",
        ),
    ],
)
def test_construction_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_step_errors():
    params = {"w": torch.ones(2), "b": torch.ones(1)}
    opt = hg.optim.adam()
    state = opt.init(params)
    with pytest.raises(
        ValueError,
        match=r"hg\.optim\.adam\.step: grads does not have the structure of params: key \['b'\] "
        r"is in params but not in grads",
    ):
        opt.step(params, {"w": torch.ones(2)}, state)
    with pytest.raises(ValueError, match=r"key \['c'\] is in grads but not in params"):
        opt.step(params, {**params, "c": torch.ones(1)}, state)
    with pytest.raises(ValueError, match=r"adam\.step: unknown hyperparameter 'momentum'"):
        opt.step(params, params, state, hyperparams={"momentum": torch.tensor(0.9)})
    with pytest.raises(ValueError, match=r"adam\.step: hyperparams must be a dict"):
        opt.step(params, params, state, hyperparams=[0.1])
    with pytest.raises(
        ValueError, match=r"adam\.step: state is a SGDState; expected the AdamState"
    ):
        opt.step(params, params, hg.optim.sgd(momentum=0.9).init(params))
    with pytest.raises(
        ValueError, match=r"adam\.step: state\.exp_avg does not have the structure of params"
    ):
        opt.step(params, params, opt.init({"w": torch.ones(2)}))
    with pytest.raises(
        ValueError,
        match=r"hg\.optim\.adam\.step: the per-parameter dict lr has no entry for parameter "
        r"\['b'\]",
    ):
        opt.step(params, params, state, hyperparams={"lr": {"w": 0.1}})
    with pytest.raises(
        ValueError, match=r"the per-parameter dict lr has an entry \['x'\] that is not a parameter"
    ):
        opt.step(params, params, state, hyperparams={"lr": {"w": 0.1, "b": 0.1, "x": 0.1}})
    with pytest.raises(ValueError, match=r"lr\['w'\] has shape \(3,\) but the parameter has shape"):
        opt.step(params, params, state, hyperparams={"lr": {"w": torch.ones(3), "b": 0.1}})
    with pytest.raises(
        ValueError, match=r"lr has shape \(2,\) but parameter \['b'\] has shape \(1,\)"
    ):
        opt.step(params, params, state, hyperparams={"lr": torch.ones(2)})
    with pytest.raises(ValueError, match=r"adam\.init: parameter \['w'\] is a float, not a tensor"):
        opt.init({"w": 1.0})
    with pytest.raises(ValueError, match=r"adam\.init: unknown hyperparameter 'lrr'"):
        opt.init(params, hyperparams={"lrr": 1.0})

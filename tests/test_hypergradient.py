"""Tests for hg.hypergrad: wrt, the Hypergradient result, purity, warnings and every error."""

from __future__ import annotations

import pytest
import torch

import hypergrad as hg
from hypergrad.hypergradient import map_hyper


def inner(p, a, x):
    return ((p["w"] - a["scale"] * x) ** 2).sum()


def outer(p, a, y):
    return ((p["w"] - y) ** 2).sum()


def problem(**changes):
    base = {
        "outer_loss": outer,
        "inner_loss": inner,
        "params": {"w": torch.zeros(2, dtype=torch.float64)},
        "opt": hg.optim.sgd(lr=0.1, momentum=0.5),
        "batches": torch.randn(
            3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        ),
        "outer_batch": torch.ones(2, dtype=torch.float64),
        "aux": {"scale": torch.tensor(0.7, dtype=torch.float64)},
    }
    return {**base, **changes}


def test_result_has_what_was_asked_and_none_elsewhere():
    g = hg.hypergrad(**problem())
    assert isinstance(g, hg.Hypergradient)
    assert g.hyperparams is None and g.params is None
    assert set(g.aux) == {"scale"} and g.aux["scale"].shape == ()
    assert g.value.shape == () and not g.value.requires_grad

    g = hg.hypergrad(**problem(), wrt=("lr", "momentum", "params"))
    assert g.aux is None and set(g.hyperparams) == {"lr", "momentum"}
    assert g.hyperparams["lr"].dtype == torch.float64
    assert g.params["w"].shape == (2,)

    g = hg.hypergrad(**problem(), wrt="hyperparams")
    assert set(g.hyperparams) == {"lr", "momentum", "dampening", "weight_decay"}


def test_value_is_the_outer_loss_after_the_unroll():
    p = problem()
    traj = hg.unroll(inner, p["params"], p["opt"], p["batches"], aux=p["aux"])
    g = hg.hypergrad(**p)
    torch.testing.assert_close(g.value, outer(traj.params, p["aux"], p["outer_batch"]))


def test_hypergradient_equals_autograd_through_a_hand_unroll():
    p = problem()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    scale = p["aux"]["scale"].clone().requires_grad_()
    opt = p["opt"]
    w = {"w": p["params"]["w"].clone().requires_grad_()}
    state = opt.init(w, hyperparams={"lr": lr})
    for k in range(3):
        loss = inner(w, {"scale": scale}, p["batches"][k])
        (gw,) = torch.autograd.grad(loss, [w["w"]], create_graph=True)
        w, state = opt.step(w, {"w": gw}, state, hyperparams={"lr": lr})
    want = torch.autograd.grad(outer(w, None, p["outer_batch"]), [scale, lr])
    g = hg.hypergrad(**p, wrt=("aux", "lr"))
    torch.testing.assert_close(g.aux["scale"], want[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(g.hyperparams["lr"], want[1], rtol=1e-12, atol=0)


def test_inputs_and_optimizer_are_not_modified():
    p = problem()
    user_lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    p["opt"] = hg.optim.sgd(lr=user_lr, momentum=0.5)
    before = {k: v.clone() for k, v in p["params"].items()}
    hp_before = dict(p["opt"].hyperparams)
    for method in ["reverse", hg.Checkpointed(1), "forward", "first_order", hg.Truncated(2)]:
        wrt = ("lr",) if method == "first_order" else ("aux", "lr")
        hg.hypergrad(**p, method=method, wrt=wrt)
    assert torch.equal(p["params"]["w"], before["w"]) and not p["params"]["w"].requires_grad
    assert p["aux"]["scale"].grad is None and not p["aux"]["scale"].requires_grad
    assert user_lr.grad is None and dict(p["opt"].hyperparams) == hp_before


def test_hyperparams_argument_replaces_some_values():
    a = hg.hypergrad(**problem(), wrt=("lr",), hyperparams={"lr": 0.2})
    b = hg.hypergrad(**problem(opt=hg.optim.sgd(lr=0.2, momentum=0.5)), wrt=("lr",))
    torch.testing.assert_close(a.hyperparams["lr"], b.hyperparams["lr"], rtol=0, atol=0)


def test_state_and_steps_arguments():
    p = problem()
    g3 = hg.hypergrad(**p, steps=2)
    g2 = hg.hypergrad(**{**p, "batches": p["batches"][:2]})
    torch.testing.assert_close(g3.aux, g2.aux, rtol=0, atol=0)
    state = p["opt"].init(p["params"])
    g = hg.hypergrad(**p, state=state)
    torch.testing.assert_close(g.aux, hg.hypergrad(**p).aux, rtol=0, atol=0)


def test_unused_aux_leaf_warns():
    p = problem(aux={"scale": torch.tensor(0.7, dtype=torch.float64), "unused": torch.ones(3)})
    with pytest.warns(
        UserWarning,
        match=r"hg.hypergrad: aux\['unused'\] does not affect the outer loss through the unroll: its hypergradient is identically zero",
    ):
        g = hg.hypergrad(**p)
    assert torch.equal(g.aux["unused"], torch.zeros(3))


def test_progress_bar_counts_step_evaluations(capsys):
    pytest.importorskip("tqdm")
    hg.hypergrad(**problem(), method=hg.Checkpointed(2), progress=True)
    assert "6/6" in capsys.readouterr().err


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (
            {"wrt": ("lrr",)},
            ValueError,
            r"hg.hypergrad: wrt entry 'lrr' is not 'aux', 'hyperparams', 'params' or a differentiable hyperparameter of hg.optim.sgd\(.*\) \(lr, momentum, dampening, weight_decay\)",
        ),
        ({"wrt": ()}, ValueError, r"hg.hypergrad: wrt is empty"),
        (
            {"aux": None},
            ValueError,
            r"hg.hypergrad: wrt asks for 'aux' but aux has no tensors \(aux=None\)",
        ),
        (
            {"aux": {"scale": torch.tensor(1)}},
            TypeError,
            r"hg.hypergrad: aux leaf \['scale'\] is torch.int64; only floating-point tensors can be differentiated",
        ),
        (
            {"opt": torch.optim.SGD},
            TypeError,
            r"hg.hypergrad: opt must be a hypergrad optimizer such as hg.optim.sgd\(lr=0.1\), got type",
        ),
        (
            {"method": "forward", "inner_grad": "autograd"},
            ValueError,
            r"hg.hypergrad: method \"forward\" runs torch.func.jvp through the steps, which needs inner_grad='func'",
        ),
        (
            {"method": "forward", "wrt": ("aux", "params"), "params": {"w": torch.zeros(2)}},
            ValueError,
            r"hg.hypergrad: method='forward' pushes one tangent vector through all inputs, so they need one dtype",
        ),
        (
            {"outer_loss": lambda p, a, y: p["w"]},
            ValueError,
            r"hg.hypergrad: outer_loss must return a scalar \(0-d\) tensor, got shape \(2,\)",
        ),
        (
            {"inner_loss": lambda p, a, x: p["w"] * x},
            ValueError,
            r"hg.hypergrad: inner_loss must return a scalar \(0-d\) tensor, got shape \(2,\)",
        ),
    ],
)
def test_bad_arguments_raise(changes, error, match):
    kwargs = {k: changes.pop(k) for k in list(changes) if k in ("wrt", "method", "inner_grad")}
    with pytest.raises(error, match=match):
        hg.hypergrad(**problem(**changes), **kwargs)


def test_params_leaf_not_float_raises():
    with pytest.raises(TypeError, match=r"hg.hypergrad: params leaf \['n'\] is torch.int64"):
        hg.hypergrad(
            **problem(params={"w": torch.zeros(2, dtype=torch.float64), "n": torch.tensor(3)}),
            wrt="params",
        )


def test_nan_in_an_inner_step_names_the_step():
    batches = torch.randn(4, 2, dtype=torch.float64)
    batches[2, 1] = float("inf")
    for method in ["reverse", hg.Checkpointed(2), "forward"]:
        with pytest.raises(
            FloatingPointError, match=r"hg.hypergrad: the inner loss is inf at step 2"
        ):
            hg.hypergrad(**problem(batches=batches), method=method)


def test_nan_outer_loss_and_nan_hypergradient_are_named():
    with pytest.raises(
        FloatingPointError,
        match=r"hg.hypergrad: every inner step is finite but the outer loss is nan",
    ):
        hg.hypergrad(**problem(outer_loss=lambda p, a, y: (p["w"] * float("nan")).sum()))

    def outer_sqrt(p, a, y):  # finite value, infinite derivative at w = y
        return ((p["w"] - p["w"].detach() + 0 * y).abs().sqrt()).sum()

    with pytest.raises(
        FloatingPointError,
        match=r"hg.hypergrad: every inner step and the outer loss are finite, but the hypergradient is nan/inf at \['aux'\]\['scale'\]",
    ):
        hg.hypergrad(**problem(outer_loss=outer_sqrt))


def test_map_hyper():
    assert map_hyper(lambda v: v + 1, (1.0, {"a": 2.0})) == (2.0, {"a": 3.0})


@pytest.mark.parametrize(
    ("call", "caller"),
    [
        (
            lambda p: hg.unroll(
                lambda q, a, b: (q["w"] ** 2).sum(), p, hg.optim.sgd(lr=0.1), torch.zeros(2, 1)
            ),
            "hg.unroll",
        ),
        (
            lambda p: hg.hypergrad(
                lambda q, a, b: (q["w"] ** 2).sum(),
                lambda q, a, b: (q["w"] ** 2).sum(),
                p,
                hg.optim.sgd(lr=0.1),
                torch.zeros(2, 1),
                None,
            ),
            "hg.hypergrad",
        ),
        (
            lambda p: hg.clients.hypergrad(
                lambda q, a, b: (q["w"] ** 2).sum(),
                lambda q, a, b: (q["w"] ** 2).sum(),
                p,
                hg.optim.sgd(lr=0.1),
                torch.zeros(2, 3, 1),
                None,
                aux=torch.tensor(0.0),
            ),
            "hg.clients.hypergrad",
        ),
    ],
    ids=["unroll", "hypergrad", "clients"],
)
def test_a_module_or_integer_params_are_named_by_the_call_that_failed(call, caller):
    with pytest.raises(
        TypeError,
        match=rf"^{caller}: params must be a tree of tensors .* got a Linear at <root>\. Pass params, _ = hg\.split\(model\)",
    ):
        call(torch.nn.Linear(2, 1))
    with pytest.raises(
        TypeError, match=rf"^{caller}: params leaf \['w'\] is torch\.int64; only floating-point"
    ):
        call({"w": torch.zeros(3, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match=rf"^{caller}: params has no tensors"):
        call({})


@pytest.mark.parametrize(
    "call",
    [
        lambda opt: hg.hypergrad(_sq, _sq, {"w": torch.ones(1)}, opt, torch.zeros(2, 1), None),
        lambda opt: hg.clients.unroll(_sq, {"w": torch.ones(3, 1)}, opt, torch.zeros(2, 3, 1)),
        lambda opt: hg.clients.hypergrad(
            _sq, _sq, {"w": torch.ones(3, 1)}, opt, torch.zeros(2, 3, 1), None, aux=torch.ones(1)
        ),
    ],
    ids=["hypergrad", "clients.unroll", "clients.hypergrad"],
)
def test_a_torch_optimizer_is_refused_with_the_from_torch_fix(call):
    # hg.clients.unroll used to read opt.hyperparams first and fail with an AttributeError.
    with pytest.raises(
        TypeError, match=r"opt must be a hypergrad optimizer .* got SGD\. .*from_torch"
    ):
        call(torch.optim.SGD([torch.zeros(1)], lr=0.1))


def _sq(p, a, b):
    return (p["w"] ** 2).sum()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: hg.hypergrad(None, lambda p, a, x: p["w"].sum(), {"w": torch.ones(1)},
                              hg.optim.sgd(lr=0.1), torch.ones(2, 1), None),
         r"hg.hypergrad: outer_loss must be a function outer_loss\(params, aux, outer_batch\)"),
        (lambda: hg.hypergrad(lambda p, a, y: p["w"].sum(), {"w": torch.ones(1)}, {"w": torch.ones(1)},
                              hg.optim.sgd(lr=0.1), torch.ones(2, 1), None),
         r"hg.hypergrad: inner_loss must be a function .* got dict\. The arguments come in the order"),
        (lambda: hg.unroll({"w": torch.ones(1)}, lambda p, a, x: p["w"].sum(),
                           hg.optim.sgd(lr=0.1), torch.ones(2, 1)),
         r"hg.unroll: inner_loss must be a function inner_loss\(params, aux, batch\)"),
        (lambda: hg.clients.hypergrad(lambda p, a, y: p["w"].sum(), 3, {"w": torch.ones(2, 1)},
                                      hg.optim.sgd(lr=0.1), torch.ones(2, 2, 1), None),
         r"hg.clients.hypergrad: inner_loss must be a function .* got int"),
    ],
    ids=["outer", "swapped", "unroll", "clients"],
)  # fmt: skip
def test_losses_that_are_not_functions_are_refused_with_the_argument_order(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_clients_must_be_a_clients_object():
    with pytest.raises(
        TypeError, match=r"hg.unroll: clients must be hg.Clients\(...\) .* got dict"
    ):
        hg.unroll(lambda p, a, x: (p["w"] ** 2).sum(), {"w": torch.ones(2, 1)},
                  hg.optim.sgd(lr=0.1), torch.ones(2, 2, 1), clients={"rounds": 2})  # fmt: skip

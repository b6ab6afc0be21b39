"""Tests for hypergrad.nn: split, call, load, stack, unstack (and every error message)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hypergrad as hg


def state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def assert_state_identical(module, before):
    after = module.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


class Tied(nn.Module):
    """Two layers that share one weight Parameter."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 3, bias=False)
        shared = nn.Parameter(torch.randn(3, 3))
        self.head.weight = shared
        self.out = nn.Linear(3, 3, bias=False)
        self.out.weight = shared

    def forward(self, x):
        return self.out(self.head(x))


def mlp_bn():
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


# ------------------------------------------------------------------------------------- split


def test_split_keys_and_detached_copies():
    model = mlp_bn()
    params, buffers = hg.split(model)
    assert list(params) == [k for k, _ in model.named_parameters()]
    assert list(buffers) == [k for k, _ in model.named_buffers()]
    for k, p in model.named_parameters():
        assert torch.equal(params[k], p) and not params[k].requires_grad
        assert params[k].data_ptr() != p.data_ptr()  # a copy, not a view
    before = state_copy(model)
    params["0.weight"].add_(1.0)  # changing the copy leaves the module alone
    buffers["1.running_mean"].add_(1.0)
    assert_state_identical(model, before)


def test_tied_parameters_appear_once_and_stay_tied():
    model = Tied()
    params, _ = hg.split(model)
    assert list(params) == ["head.weight"]  # out.weight is the same Parameter
    x = torch.randn(2, 3)
    w = torch.randn(3, 3)
    out = hg.call(model, {"head.weight": w}, x)
    torch.testing.assert_close(out, x @ w.T @ w.T)  # both uses take the given tensor
    out2 = hg.call(model, {"out.weight": w}, x)  # any name of the tie works
    torch.testing.assert_close(out2, out)
    # gradient sums over both uses
    g = torch.func.grad(lambda p: hg.call(model, p, x).sum())({"head.weight": w})
    w_ref = w.clone().requires_grad_()
    (x @ w_ref.T @ w_ref.T).sum().backward()
    torch.testing.assert_close(g["head.weight"], w_ref.grad)


# -------------------------------------------------------------------------------------- call


def test_call_matches_forward_and_never_reads_given_module_tensors():
    model = mlp_bn().eval()
    x = torch.randn(6, 4)
    params, buffers = hg.split(model)
    torch.testing.assert_close(hg.call(model, params, x, buffers=buffers), model(x))
    torch.testing.assert_close(hg.call(model, params, x), model(x))
    # poison the module: a given key must never be read from it
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        for p in poisoned.parameters():
            p.fill_(float("nan"))
    torch.testing.assert_close(hg.call(poisoned, params, x), model(x))
    # keys left out are read from the module
    some = {"3.bias": torch.full((2,), 10.0)}
    expected = model(x) - model[3].bias + 10.0
    torch.testing.assert_close(hg.call(model, some, x), expected)


@pytest.mark.parametrize("give_buffers", [False, True])
def test_call_leaves_module_and_inputs_bit_identical_in_train_mode(give_buffers):
    model = mlp_bn().train()
    params, buffers = hg.split(model)
    before = state_copy(model)
    given_before = {k: v.clone() for k, v in buffers.items()}
    x = torch.randn(8, 4)
    grads = torch.func.grad(
        lambda p: hg.call(model, p, x, buffers=buffers if give_buffers else None).pow(2).sum()
    )(params)
    assert set(grads) == set(params)
    out, new_buffers = hg.call(
        model, params, x, buffers=buffers if give_buffers else None, return_buffers=True
    )
    assert_state_identical(model, before)
    for k, v in given_before.items():
        assert torch.equal(buffers[k], v)
    # the returned buffers hold what the module itself would have computed
    reference = copy.deepcopy(model)
    torch.testing.assert_close(out, reference(x))
    for k, v in reference.named_buffers():
        torch.testing.assert_close(new_buffers[k], v)
    assert not torch.equal(new_buffers["1.running_mean"], buffers["1.running_mean"])


def test_call_gradient_matches_finite_differences():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    params, _ = hg.split(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    keys = list(params)

    def f(*ts):
        return hg.call(model, dict(zip(keys, ts)), x).pow(2).sum()

    assert torch.autograd.gradcheck(f, tuple(params[k].clone().requires_grad_() for k in keys))


def test_call_under_vmap_over_stacked_clients():
    models = [nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(3)]
    params, buffers = hg.stack(models)
    x = torch.randn(3, 5, 3)
    out = torch.func.vmap(lambda p, b, xi: hg.call(models[0], p, xi, buffers=b))(params, buffers, x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x[i]))


def test_call_errors():
    model = nn.Linear(2, 1)
    with pytest.raises(
        ValueError,
        match=r"^hg\.call: params has key\(s\) 'wieght' that Linear does not have \(its params: "
        r"'bias', 'weight'\)\. Use the keys from hg\.split\(module\)\.$",
    ):
        hg.call(model, {"wieght": torch.ones(1, 2)}, torch.ones(1, 2))
    with pytest.raises(
        ValueError,
        match=r"^hg\.call: buffers has key\(s\) 'running_mean' that Linear does not have "
        r"\(its buffers: none\)",
    ):
        hg.call(model, {}, torch.ones(1, 2), buffers={"running_mean": torch.ones(1)})
    with pytest.raises(
        TypeError,
        match=r"^hg\.call: params must be a dict keyed like named_parameters\(\), got a list",
    ):
        hg.call(model, [torch.ones(1, 2)], torch.ones(1, 2))


# -------------------------------------------------------------------------------------- load


def test_load_round_trip_and_merged_module_matches_call():
    a, b = mlp_bn().eval(), mlp_bn().eval()
    pa, ba = hg.split(a)
    pb, _ = hg.split(b)
    merged = hg.tree.mean([pa, pb])
    fresh = mlp_bn().eval()
    assert hg.load(fresh, merged, ba) is fresh
    x = torch.randn(4, 4)
    torch.testing.assert_close(fresh(x), hg.call(a, merged, x, buffers=ba))
    p2, b2 = hg.split(fresh)
    assert all(torch.equal(p2[k], merged[k]) for k in merged)
    assert all(torch.equal(b2[k], ba[k]) for k in ba)
    assert all(p.requires_grad for p in fresh.parameters())  # still trainable Parameters


def test_load_names_every_offending_key_and_copies_nothing():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    before = state_copy(model)
    bad = {
        "0.weight": torch.zeros(2, 3),  # wrong shape
        "0.bias": torch.zeros(3, dtype=torch.float64),  # wrong dtype
        "1.wieght": torch.zeros(1, 3),  # unexpected
        # '1.weight' and '1.bias' missing
    }
    with pytest.raises(ValueError) as info:
        hg.load(model, bad)
    msg = str(info.value)
    assert msg.startswith("hg.load: the tree does not fit Sequential (5 problem(s)):\n")
    for line in [
        "  - params key '0.weight': expected shape (3, 2), dtype torch.float32, got shape (2, 3), dtype torch.float32",
        "  - params key '0.bias': expected shape (3,), dtype torch.float32, got shape (3,), dtype torch.float64",
        "  - missing params key '1.weight' (expected shape (1, 3), dtype torch.float32)",
        "  - missing params key '1.bias' (expected shape (1,), dtype torch.float32)",
        "  - unexpected params key '1.wieght' (shape (1, 3), dtype torch.float32)",
    ]:
        assert line in msg.splitlines()
    assert msg.endswith(
        "Pass dicts made by hg.split of a module with the same architecture, or fix the keys listed above."
    )
    with pytest.raises(ValueError, match=r"unexpected params key '1\.wieght' \(shape \(1, 3\)"):
        hg.load(model, bad)
    assert_state_identical(model, before)


def test_load_errors_for_buffers_tied_aliases_and_non_tensors():
    bn = nn.BatchNorm1d(2)
    params, buffers = hg.split(bn)
    del buffers["num_batches_tracked"]
    with pytest.raises(
        ValueError,
        match=r"missing buffers key 'num_batches_tracked' \(expected shape \(\), dtype torch\.int64\)",
    ):
        hg.load(bn, params, buffers)
    tied = Tied()
    p, _ = hg.split(tied)
    with pytest.raises(
        ValueError,
        match=r"unexpected params key 'out\.weight' \(shape \(3, 3\), dtype torch\.float32\); it is "
        r"tied to 'head\.weight', pass it once under that name",
    ):
        hg.load(tied, {**p, "out.weight": p["head.weight"]})
    with pytest.raises(
        ValueError,
        match=r"params key 'bias': expected shape \(2,\), dtype torch\.float32, got a float, not a tensor",
    ):
        hg.load(bn, {**params, "bias": 0.0})


# ----------------------------------------------------------------------------- stack, unstack


def test_stack_unstack_round_trip_with_buffers():
    models = [mlp_bn() for _ in range(3)]
    params, buffers = hg.stack(models)
    assert params["0.weight"].shape == (3, 5, 4)
    assert buffers["1.num_batches_tracked"].shape == (3,)
    pairs = hg.unstack((params, buffers))
    assert len(pairs) == 3
    for (p, b), m in zip(pairs, models):
        ref_p, ref_b = hg.split(m)
        assert all(torch.equal(p[k], ref_p[k]) for k in ref_p)
        assert all(torch.equal(b[k], ref_b[k]) for k in ref_b)


def test_stack_errors_name_the_first_differing_key():
    with pytest.raises(ValueError, match=r"^hg\.stack: got no modules"):
        hg.stack([])
    with pytest.raises(
        ValueError,
        match=r"^hg\.stack: module 1 \(Sequential\) has a different structure from module 0 "
        r"\(Sequential\): key '0\.weight' has shape \(6, 4\), dtype torch\.float32 but module 0 "
        r"has shape \(5, 4\), dtype torch\.float32\. Stack modules of one architecture",
    ):
        hg.stack(
            [
                mlp_bn(),
                nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)),
            ]
        )
    with pytest.raises(
        ValueError, match=r"module 2 \(Linear\) .*key '0\.weight' is missing from it"
    ):
        hg.stack([mlp_bn(), mlp_bn(), nn.Linear(4, 5)])
    with pytest.raises(
        ValueError, match=r"module 1 \(Linear\) .*it has key 'bias' that module 0 does not have"
    ):
        hg.stack([nn.Linear(2, 2, bias=False), nn.Linear(2, 2)])
    with pytest.raises(
        ValueError, match=r"module 1 \(Sequential\) .*key '1\.running_mean' is missing"
    ):
        hg.stack(
            [mlp_bn(), nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 2))]
        )


def test_unstack_errors():
    with pytest.raises(
        ValueError,
        match=r"^hg\.unstack: every leaf needs the same leading \(client\) dimension; got "
        r"\['a'\]: \(3, 2\), \['b'\]: \(2,\)\. Pass a tree made by hg\.stack\.$",
    ):
        hg.unstack({"a": torch.ones(3, 2), "b": torch.ones(2)})
    with pytest.raises(ValueError, match=r"leading \(client\) dimension; got \['s'\]: \(\)"):
        hg.unstack({"s": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"leading \(client\) dimension; got no leaves"):
        hg.unstack({})


def test_a_compiled_module_stands_for_the_module_it_compiles():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    compiled = torch.compile(model)  # compiles nothing until called
    params, buffers = hg.split(compiled)
    assert (list(params), list(buffers)) == tuple(list(t) for t in hg.split(model))
    x = torch.randn(4, 3)
    torch.testing.assert_close(hg.call(compiled, params, x), hg.call(model, params, x))
    hg.load(compiled, hg.tree.zeros_like(params))
    assert model[0].weight.abs().sum() == 0

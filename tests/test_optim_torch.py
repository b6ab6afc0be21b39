"""Tests for hg.optim.from_torch: several param groups, differentiable=True, every error."""

from __future__ import annotations

import pytest
import torch

import hypergrad as hg

F64 = torch.float64


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()


def two_groups(m, cls, first, rest, **common):
    return cls(
        [
            {"params": [m[0].weight, m[0].bias], **first},
            {"params": [m[2].weight, m[2].bias], **rest},
        ],
        **common,
    )


CASES = [
    (torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.1}, {"lr": 0.05}, {"momentum": 0.9}),
    (
        torch.optim.SGD,
        {"momentum": 0.9},
        {"lr": 0.2},
        {"lr": 0.1, "momentum": 0.5, "nesterov": True},
    ),
    (torch.optim.Adam, {"lr": 0.1, "betas": (0.8, 0.9)}, {}, {"amsgrad": True}),
    (torch.optim.Adam, {}, {"weight_decay": 0.1}, {"decoupled_weight_decay": True}),
    (torch.optim.AdamW, {"lr": 0.1}, {"weight_decay": 0.5}, {"eps": 1e-4}),
    (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}, {"alpha": 0.9}, {"centered": True}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1}, {"initial_accumulator_value": 0.5}, {}),
]


def follow_two_groups(cls, first, rest, common, foreach, device="cpu"):
    """20 steps of a two-group torch optimizer and of its from_torch twin, side by side.

    Returns the module (stepped by torch), and the hypergrad params and state.
    """
    m = model().to(device)  # before the optimizer: .to keeps the Parameter objects
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    torch_opt = two_groups(m, cls, first, rest, foreach=foreach, **common)
    opt = hg.optim.from_torch(torch_opt, m)
    state = opt.init(params)
    x = torch.randn(8, 3, dtype=F64, device=device)
    for _ in range(20):
        torch_opt.zero_grad()
        m(x).square().sum().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        torch_opt.step()
        params, state = opt.step(params, grads, state)
    return m, params, state


@pytest.mark.parametrize(("cls", "first", "rest", "common"), CASES)
@pytest.mark.parametrize("foreach", [False, True])
def test_several_groups_follow_the_torch_optimizer(cls, first, rest, common, foreach):
    m, params, _ = follow_two_groups(cls, first, rest, common, foreach)
    for n, p in m.named_parameters():
        assert torch.allclose(params[n], p.detach(), rtol=1e-12, atol=1e-14), n


def test_names_list_and_per_parameter_dicts():
    m = model()
    torch_opt = two_groups(m, torch.optim.Adam, {"lr": 0.1}, {"betas": (0.5, 0.9)}, lr=0.01)
    names = ["a", "b", "c", "d"]
    opt = hg.optim.from_torch(torch_opt, names)
    assert opt.hyperparams["lr"] == {"a": 0.1, "b": 0.1, "c": 0.01, "d": 0.01}
    assert opt.hyperparams["betas"] == (
        {"a": 0.9, "b": 0.9, "c": 0.5, "d": 0.5},
        {"a": 0.999, "b": 0.999, "c": 0.9, "d": 0.9},
    )
    assert opt.hyperparams["eps"] == 1e-8


def test_adagrad_initial_accumulator_comes_from_the_constructor_as_in_torch():
    # torch.optim.Adagrad fills state["sum"] from its constructor argument, not the group's.
    m = model()
    torch_opt = two_groups(m, torch.optim.Adagrad, {}, {"initial_accumulator_value": 0.5}, lr=0.1)
    opt = hg.optim.from_torch(torch_opt, m)
    assert opt.hyperparams["initial_accumulator_value"] == 0
    state = opt.init({n: p.detach() for n, p in m.named_parameters()})
    assert torch.equal(state.sum["2.bias"], torch_opt.state[m[2].bias]["sum"])


def test_differentiable_tensor_lr_keeps_the_graph():
    m = model()
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    torch_opt = torch.optim.SGD(m.parameters(), lr=lr, differentiable=True)
    opt = hg.optim.from_torch(torch_opt, m)
    assert opt.hyperparams["lr"] is lr
    params = {n: p.detach() for n, p in m.named_parameters()}
    new, _ = opt.step(params, {n: torch.ones_like(p) for n, p in params.items()}, opt.init(params))
    sum(v.sum() for v in new.values()).backward()
    assert lr.grad == -sum(p.numel() for p in params.values())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda m: torch.optim.Adamax(m.parameters()),
            r"hg\.optim\.from_torch: unsupported optimizer class torch\.optim\.adamax\.Adamax; "
            r"supported: SGD, Adam, AdamW, RMSprop, Adagrad",
        ),
        (
            lambda m: torch.optim.Adam(m.parameters(), fused=True),
            r"param_groups\[0\] has fused=True, which a functional optimizer cannot honour",
        ),
        (
            lambda m: torch.optim.Adam(m.parameters(), capturable=True),
            r"param_groups\[0\] has capturable=True",
        ),
        (
            lambda m: two_groups(m, torch.optim.Adam, {"amsgrad": True}, {}),
            r"the option 'amsgrad' differs between param groups \(\[True, False\]\)",
        ),
        (
            lambda m: two_groups(m, torch.optim.Adam, {"decoupled_weight_decay": True}, {}),
            r"decoupled_weight_decay differs between param groups",
        ),
        (
            lambda m: two_groups(m, torch.optim.SGD, {"dampening": 0.5}, {"momentum": 0.9}, lr=0.1),
            r"a group without momentum but with dampening != 0",
        ),
        (
            lambda m: torch.optim.SGD(list(m.parameters())[:2], lr=0.1),
            r"module parameter '2\.weight' is not in the optimizer",
        ),
    ],
)
def test_errors(make, match):
    m = model()
    with pytest.raises(ValueError, match=match):
        hg.optim.from_torch(make(m), m)


def test_errors_unknown_entry_and_names():
    m = model()
    torch_opt = torch.optim.SGD(m.parameters(), lr=0.1)
    torch_opt.param_groups[0]["my_flag"] = 1
    with pytest.raises(ValueError, match=r"param_groups\[0\] has the entry 'my_flag'"):
        hg.optim.from_torch(torch_opt, m)
    torch_opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"got 2 names for the optimizer's 4 parameters"):
        hg.optim.from_torch(torch_opt, ["a", "b"])
    with pytest.raises(ValueError, match=r"the name 'a' is given twice"):
        hg.optim.from_torch(torch_opt, ["a", "a", "b", "c"])
    with pytest.raises(ValueError, match=r"module_or_names must be the nn\.Module"):
        hg.optim.from_torch(torch_opt, "names")
    with pytest.raises(
        ValueError, match=r"parameter number 0 \(shape \(4, 3\)\) is not a parameter"
    ):
        hg.optim.from_torch(torch_opt, torch.nn.Linear(1, 1))

"""Tests for the kink-aware finite differences of hg.testing (``finite_difference`` and
``check_hypergrad``): a central stencil that straddles a kink falls back to the one-sided
difference on the origin's side, and an exact tie is reported, never compared."""

from __future__ import annotations

import math

import pytest
import torch

import hypergrad as hg
from hypergrad.testing.check import DirectionCheck, FiniteDifference, finite_difference

F64 = torch.float64
ONE = torch.ones((), dtype=F64)


def t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# Each function has a kink (or a jump) at x = 0, slope 2 on the left and 5 on the right (or a
# jump), and is smooth elsewhere; each goes through a different recorded op.
def via_maximum(x):
    return torch.maximum(2 * x, 5 * x) + x**2


def via_clamp(x):
    return 2 * x + 3 * torch.clamp(x, min=0.0)


def via_inplace_clamp(x):
    return 2 * x + 3 * (x.clone().clamp_(min=0.0))  # recorded before the op changes its input


def via_abs(x):
    return 3.5 * x + 1.5 * torch.abs(x)


def via_relu(x):
    return 2 * x + 3 * torch.nn.functional.relu(x)


def via_comparison(x):
    return torch.where(x > 0, 5 * x, 2 * x)


def via_reduction(x):
    return torch.stack([2 * x, 5 * x]).max(dim=0).values


def via_full_reduction(x):
    return torch.stack([2 * x, 5 * x]).max()


def via_amax(x):
    return torch.stack([2 * x, 5 * x]).amax(0)


KINKS = [via_maximum, via_clamp, via_inplace_clamp, via_abs, via_relu, via_comparison,
         via_reduction, via_full_reduction, via_amax]  # fmt: skip


@pytest.mark.parametrize("fn", KINKS, ids=lambda f: f.__name__)
def test_a_kink_within_the_step_gives_the_one_sided_difference_of_the_origins_side(fn):
    # 3e-6 above the kink, the central stencil (+-1e-5) crosses it; the forward one does not
    fd = finite_difference(fn, t(3e-6), ONE)
    assert fd.formula == "forward" and fd.value == pytest.approx(5.0 + 6e-6 * (fn is via_maximum))
    # along -1 the same side is the backward one
    fd = finite_difference(fn, t(3e-6), -ONE)
    assert fd.formula == "backward" and fd.value == pytest.approx(-5.0, rel=1e-5)
    fd = finite_difference(fn, t(-3e-6), ONE)
    assert fd.formula == "backward" and fd.value == pytest.approx(2.0, rel=1e-5)
    # the plain central difference is wrong there: that is what the check guards against
    plain = finite_difference(fn, t(3e-6), ONE, kink_aware=False)
    assert plain.formula == "central" and abs(plain.value - 5.0) > 0.1


@pytest.mark.parametrize("fn", KINKS, ids=lambda f: f.__name__)
def test_away_from_a_kink_the_difference_is_central_and_at_a_tie_there_is_none(fn):
    assert finite_difference(fn, t(0.5), ONE).formula == "central"
    assert finite_difference(fn, t(-0.5), ONE).formula == "central"
    fd = finite_difference(fn, t(0.0), ONE)
    if fn is via_reduction:
        # max(dim=0) breaks the tie by the index it returns (the first: 2 * x), and autograd
        # follows that index: the tie is on that piece, whose side is the backward one
        assert fd.formula == "backward" and fd.value == pytest.approx(2.0)
        assert torch.func.grad(fn)(t(0.0)) == 2.0
    else:
        assert fd.formula == "kink" and math.isnan(fd.value)


def test_a_jump_is_a_kink_too():
    def step(x):
        return x + torch.floor(x)

    assert finite_difference(step, t(3e-6), ONE).formula == "forward"
    assert finite_difference(step, t(3e-6), ONE).value == pytest.approx(1.0)
    assert finite_difference(step, t(0.5), ONE).formula == "central"


def test_a_kink_the_direction_does_not_cross_is_no_kink():
    # maximum(x[0], x[1]) at a tie, moved along the tie: smooth along the line
    def f(x):
        return torch.maximum(x[0], x[1]) ** 2

    fd = finite_difference(
        f, torch.tensor([1.0, 1.0], dtype=F64), torch.tensor([1.0, 1.0], dtype=F64)
    )
    assert fd.formula == "central" and fd.value == pytest.approx(2.0)


def test_the_central_value_is_the_plain_central_difference_exactly():
    def f(tree):
        return (torch.sin(tree["a"]) * tree["b"]).sum()

    x = {"a": torch.tensor([0.3, -1.2], dtype=F64), "b": t(2.0)}
    v = {"a": torch.tensor([0.5, 1.0], dtype=F64), "b": t(-0.25)}
    fd = finite_difference(f, x, v)
    h = 1e-5

    def central(s):
        plus = {k: x[k] + s * v[k] for k in x}
        minus = {k: x[k] - s * v[k] for k in x}
        return (float(f(plus)) - float(f(minus))) / (2 * s)

    assert fd == FiniteDifference((4 * central(h / 2) - central(h)) / 3, "central")
    assert finite_difference(f, x, v, kink_aware=False) == fd


def test_ops_inside_a_torch_func_transform_are_not_recorded():
    # the derivative of relu(x) ** 2 / 2 is relu(x): its kink is inside torch.func.grad
    def f(x):
        return torch.func.grad(lambda y: torch.relu(y) ** 2 / 2)(x)

    assert finite_difference(f, t(0.5), ONE) == finite_difference(f, t(0.5), ONE, kink_aware=False)


# --------------------------------------------------------------------------- check_hypergrad


def relu_problem(offset):
    """The outer loss has a kink (a relu of aux) at aux = 0.5 - offset."""
    g = torch.Generator().manual_seed(0)

    def inner(p, a, x):
        return ((p["w"] - (1 + torch.relu(a - 0.5)) * x) ** 2).sum()

    def outer(p, a, y):
        return ((p["w"] - y) ** 2).sum()

    return {"outer_loss": outer, "inner_loss": inner, "params": {"w": torch.zeros(3, dtype=F64)},
            "opt": hg.optim.sgd(lr=0.1), "batches": torch.randn(4, 3, generator=g, dtype=F64),
            "outer_batch": torch.ones(3, dtype=F64), "aux": t(0.5 + offset)}  # fmt: skip


def test_check_hypergrad_uses_the_one_sided_difference_near_a_kink():
    problem = relu_problem(3e-6)
    report = hg.testing.check_hypergrad(**problem, directions=4)
    assert report.passed and {d.formula for d in report.directions} <= {"forward", "backward"}
    assert "difference: the central one straddles a kink" in str(report)
    plain = hg.testing.check_hypergrad(
        **problem, directions=4, kink_aware=False, raise_on_failure=False
    )
    assert not plain.passed and {d.formula for d in plain.directions} == {"central"}


def test_check_hypergrad_at_an_exact_tie_checks_nothing_and_does_not_pass():
    report = hg.testing.check_hypergrad(**relu_problem(0.0), raise_on_failure=False)
    assert all(d.formula == "kink" and not d.checked for d in report.directions)
    assert not report.passed and report.max_rel_err == 0.0
    assert "kink (not checked)" in str(report)
    with pytest.raises(AssertionError, match=r"kink \(not checked\)"):
        hg.testing.check_hypergrad(**relu_problem(0.0))


def test_check_hypergrad_away_from_kinks_is_unchanged():
    problem = relu_problem(0.1)
    a = hg.testing.check_hypergrad(**problem, wrt=("aux", "lr"))
    b = hg.testing.check_hypergrad(**problem, wrt=("aux", "lr"), kink_aware=False)
    assert a.passed and a.directions == b.directions
    assert {d.formula for d in a.directions} == {"central"}


def test_direction_check_keeps_its_two_field_constructor():
    d = DirectionCheck(1.0, 1.0)
    assert d.formula == "central" and d.checked and d.abs_err == 0.0

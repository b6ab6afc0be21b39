"""Tests for hg.testing: check_hypergrad catches wrong gradients; the strategies build valid problems."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given

import hypergrad as hg
from hypergrad.testing import strategies as hst


def problem(dtype=torch.float64):
    def inner(p, a, x):
        return ((p["w"] - a * x) ** 2).sum() + 0.1 * (p["w"] ** 4).sum()

    def outer(p, a, y):
        return ((p["w"] - y) ** 2).sum()

    g = torch.Generator().manual_seed(0)
    return {"outer_loss": outer, "inner_loss": inner,
            "params": {"w": torch.zeros(3, dtype=dtype)}, "opt": hg.optim.adam(lr=0.1, eps=1e-3),
            "batches": torch.randn(4, 3, generator=g, dtype=dtype),
            "outer_batch": torch.ones(3, dtype=dtype), "aux": torch.tensor(0.5, dtype=dtype)}  # fmt: skip


def test_check_passes_for_an_exact_method_and_reports():
    report = hg.testing.check_hypergrad(**problem(), wrt=("aux", "lr", "params"), directions=4)
    assert isinstance(report, hg.testing.HypergradCheck)
    assert report.passed and len(report.directions) == 4 and report.max_rel_err < 1e-6
    assert all(isinstance(d, hg.testing.DirectionCheck) for d in report.directions)
    text = str(report)
    assert "passed" in text and "finite diff" in text and text.count("yes") == 4
    assert report.wrt == ("aux", "lr", "params") and report.method == "'reverse'"


def test_check_runs_in_float64_even_for_float32_inputs():
    report = hg.testing.check_hypergrad(**problem(torch.float32), wrt=("aux", "params"))
    assert report.passed and report.hypergradient.aux.dtype == torch.float64


def test_check_catches_a_biased_method_with_a_readable_diff():
    with pytest.raises(
        AssertionError,
        match=r"(?s)hg.testing.check_hypergrad: the hypergradient disagrees with finite differences.\nhypergradient check: method='first_order'.*FAILED.*NO",
    ):
        hg.testing.check_hypergrad(**problem(), method="first_order", wrt=("lr",))
    report = hg.testing.check_hypergrad(
        **problem(), method=hg.Truncated(1), wrt=("aux",), raise_on_failure=False
    )
    assert not report.passed and report.max_rel_err > 1e-3


def test_check_catches_a_wrong_gradient():
    # A method that returns twice the right answer must fail the check.
    from hypergrad.methods import MethodResult, Reverse

    class Doubled(Reverse):
        def __call__(self, problem):
            r = super().__call__(problem)
            return MethodResult(r.value, hg.tree.scale(r.grads, 2.0), r.losses, r.unused)

    report = hg.testing.check_hypergrad(**problem(), method=Doubled(), raise_on_failure=False)
    assert not report.passed
    for d in report.directions:
        assert d.analytic == pytest.approx(2 * d.numeric, rel=1e-5)


def test_check_with_iterable_and_callable_batches():
    p = problem()
    batches = p.pop("batches")
    a = hg.testing.check_hypergrad(**p, batches=list(batches))
    b = hg.testing.check_hypergrad(**p, batches=lambda k: batches[k], steps=4)
    assert a.directions == b.directions


def test_check_rejects_zero_directions():
    with pytest.raises(
        ValueError, match=r"hg.testing.check_hypergrad: directions must be >= 1, got 0"
    ):
        hg.testing.check_hypergrad(**problem(), directions=0)


@given(hst.optimizers())
def test_optimizers_strategy_builds_working_optimizers(opt):
    assert isinstance(opt, hg.optim.Optimizer)
    params = {"w": torch.ones(3, dtype=torch.float64)}
    new, _ = opt.step(params, {"w": torch.ones(3, dtype=torch.float64)}, opt.init(params))
    assert torch.isfinite(new["w"]).all() and not torch.equal(new["w"], params["w"])


@given(hst.bilevel_problems(max_steps=3))
def test_bilevel_problems_strategy_is_checkable(problem):
    assert problem.batches[0].shape[0] <= 3 and problem.batches[0].dtype == torch.float64
    assert isinstance(problem.model, torch.nn.Module)
    hg.testing.check_hypergrad(**problem.kwargs(), wrt=("aux", "lr"), directions=1)


def test_strategies_without_hypothesis_raise_a_clear_error():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import hypergrad as hg\n"
        "try:\n"
        "    hg.testing.strategies\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "hg.testing.strategies needs hypothesis, which is not installed" in out.stdout


def test_unknown_testing_attribute():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        hg.testing.nope  # noqa: B018

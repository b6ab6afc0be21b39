"""Forward mode estimates its memory before it starts and chunks the directions to fit."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import hypergrad as hg
import hypergrad.methods.forward as forward
from hypergrad.methods._memory import available, measure, plan

F64 = torch.float64


def mlp_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    params, _ = hg.split(model.double())  # 37 params: 38 directions with aux
    X, Y = torch.randn(3, 8, 4, dtype=F64), torch.randn(3, 8, 1, dtype=F64)

    def inner(p, a, b):
        return ((hg.call(model, p, b[0]) - b[1]) ** 2).mean() + a * hg.tree.vdot(p, p)

    def outer(p, a, b):
        return ((hg.call(model, p, b[0]) - b[1]) ** 2).mean()

    args = (outer, inner, params, hg.optim.sgd(lr=0.1, momentum=0.9), (X, Y), (X[0], Y[0]))
    return args, dict(aux=torch.tensor(1e-2, dtype=F64), wrt=("aux", "params"))


def test_directions_beyond_the_budget_are_chunked_and_equal_reverse(monkeypatch):
    args, kw = mlp_problem()
    seen, pushes = [], []
    real_plan, real_push = forward.plan, forward._push

    def spy_plan(*a):
        seen.append(a)
        return real_plan(*a)

    def spy_push(fn, basis):
        pushes.append(basis.shape[0])
        return real_push(fn, basis)

    monkeypatch.setattr(forward, "plan", spy_plan)
    monkeypatch.setattr(forward, "_push", spy_push)
    hg.hypergrad(*args, **kw, method="forward")
    directions, per_direction, budget, chunk = seen[0]
    assert directions == 38 and 0 < per_direction < budget and chunk is None
    assert pushes == [2, 1, 38]  # the measurement (two directions, one), then all at once
    pushes.clear()
    g = hg.hypergrad(*args, **kw, method=hg.Forward(memory=10 * per_direction))
    assert pushes == [2, 1, 10, 10, 10, 8]
    want = hg.hypergrad(*args, **kw, method="reverse")
    for a, b in zip(hg.tree.leaves((g.aux, g.params)), hg.tree.leaves((want.aux, want.params))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_one_direction_beyond_the_budget_is_refused_with_the_estimate_and_the_way_out():
    args, kw = mlp_problem()
    with pytest.raises(
        MemoryError,
        match=r"hg\.hypergrad\(method='forward'\): one tangent direction needs about .* GiB \(the "
        r"tensors of one step and the outer loss, each with its tangent\), above the memory "
        r"budget of 9\.31e-10 GiB, and the 38 directions run at least one at a time\. Use a "
        r"reverse-mode method \(method='reverse', or hg\.Checkpointed\(S\) for a long unroll\), "
        r"or raise the budget with hg\.Forward\(memory=bytes\)\.",
    ):
        hg.hypergrad(*args, **kw, method=hg.Forward(memory=1))


def test_an_explicit_chunk_size_beyond_the_free_memory_is_refused_with_the_chunk_that_fits(
    monkeypatch,
):
    args, kw = mlp_problem()
    seen = []
    real_plan = forward.plan
    monkeypatch.setattr(forward, "plan", lambda *a: seen.append(a) or real_plan(*a))
    hg.hypergrad(*args, **kw, method=hg.Forward(chunk_size=16))
    per_direction = seen[0][1]
    with pytest.raises(
        MemoryError,
        match=r"hg\.hypergrad\(method='forward'\): hg\.Forward\(chunk_size=16\) pushes 16 of the "
        r"38 tangent directions at once, about .* GiB \(.* GiB each\), more than the .* GiB "
        r"free\. Pass hg\.Forward\(chunk_size=5\) \(or chunk_size=None: forward mode then "
        r"chunks the directions to fit\), or use method='reverse'\.",
    ):
        hg.hypergrad(*args, **kw, method=hg.Forward(chunk_size=16, memory=5 * per_direction))


def test_few_directions_skip_the_measurement(monkeypatch):
    args, kw = mlp_problem()
    monkeypatch.setattr(forward, "plan", lambda *a: pytest.fail("measured"))
    hg.hypergrad(*args, aux=kw["aux"], wrt=("aux", "lr"), method=hg.Forward(memory=1))


def test_plan_and_measure():
    assert plan(10_000, 2**20, 2**30) == 1024
    assert plan(5, 2**20, 2**30) == 5
    assert plan(5, 2**20, 2**20 + 1) == 1
    assert plan(10_000, 2**20, 2**30, chunk_size=2048) == 2048  # all of the free memory
    with pytest.raises(MemoryError, match=r"chunk_size=2049\) pushes 2049 of the 10000"):
        plan(10_000, 2**20, 2**30, chunk_size=2049)
    x = torch.ones(100, dtype=F64)
    assert measure(lambda: (x * 2) * 3) == 1600  # the first product is freed after the second
    assert measure(lambda: x.view(10, 10)) == 0  # a view owns no memory


def test_the_budget_sees_an_address_space_limit():
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30)); "
        "import torch; from hypergrad.methods._memory import available; "
        "print(available(torch.device('cpu')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    left = float(out.stdout)
    assert 0 < left < 6 * 2**30
    assert math.isfinite(available(torch.device("cpu")))


def test_memory_must_be_a_positive_int():
    with pytest.raises(ValueError, match=r"hg\.Forward: memory must be a positive int"):
        hg.Forward(memory=0)
    assert repr(hg.Forward(4, memory=2**30)) == "hg.Forward(4, memory=1073741824)"

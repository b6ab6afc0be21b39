"""hg.Checkpointed(slots=c): Revolve's schedule, property-tested, and equal to "reverse";
micro-batched step backwards; the cost model."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import hypergrad as hg
from hypergrad.methods._revolve import (
    Backward,
    Forward,
    Free,
    forward_runs,
    repetitions,
    schedule,
)
from hypergrad.testing import strategies as hst

# ------------------------------------------------------------------ the schedule itself


@functools.cache
def least_runs(units: int, free: int) -> int:
    """The fewest runs without a graph that reverse ``units`` with ``free`` slots besides the
    stored left end, by exhaustive search over the first split (the definition, no formula)."""
    if units == 1:
        return 0
    if free == 0:
        return units * (units - 1) // 2
    return min(m + least_runs(units - m, free - 1) + least_runs(m, free) for m in range(1, units))


def simulate(units: int, slots: int) -> tuple[int, list[int], int, list[int]]:
    """Run the schedule on positions only: (runs, reversal order, most stored, runs per unit),
    asserting that every action finds the carry it needs."""
    stored, at = {0}, 0
    runs, order, most, per_unit = 0, [], 1, [0] * units
    for action in schedule(units, slots):
        if isinstance(action, Forward):
            assert action.start == at or action.start in stored, (action, at, stored)
            assert 0 <= action.start < action.stop < units
            runs += action.stop - action.start
            for u in range(action.start, action.stop):
                per_unit[u] += 1
            at = action.stop
            if action.store:
                stored.add(action.stop)
            most = max(most, len(stored))
        elif isinstance(action, Backward):
            assert action.k == at or action.k in stored, (action, at, stored)
            order.append(action.k)
        else:
            assert isinstance(action, Free) and action.k in stored and action.k != 0
            stored.remove(action.k)
    return runs, order, most, per_unit


@given(st.integers(1, 400), st.integers(1, 8))
def test_schedule_reverses_each_unit_once_within_the_slots_at_the_formulas_cost(units, slots):
    runs, order, most, per_unit = simulate(units, slots)
    assert order == list(range(units - 1, -1, -1))  # each unit once, last first
    assert most <= slots
    assert runs == forward_runs(units, slots)
    assert max(per_unit, default=0) <= repetitions(units, slots)


@given(st.integers(1, 60), st.integers(1, 6))
def test_schedule_is_optimal(units, slots):
    assert forward_runs(units, slots) == least_runs(units, slots - 1)


def test_schedule_of_thousands_of_steps_is_cheap_to_plan():
    runs, order, most, _ = simulate(10_001, 4)
    assert runs == forward_runs(10_001, 4) and most == 4 and len(order) == 10_001


def test_schedule_rejects_nonsense():
    with pytest.raises(ValueError, match="units >= 1 and slots >= 1"):
        list(schedule(3, 0))


# ------------------------------------------------------------------ equal to "reverse"


def assert_same(got, ref, rtol=1e-10):
    for a, b in zip(hg.tree.leaves(got[:4]), hg.tree.leaves(ref[:4]), strict=True):
        scale = b.abs().max().clamp_min(1e-300)
        assert float((a - b).abs().max() / scale) <= rtol, (a, b)


@given(hst.bilevel_problems(max_steps=9), st.integers(1, 5))
def test_property_slots_equal_reverse(problem, slots):
    kwargs = {**problem.kwargs(), "seed": 0, "wrt": ("aux", "lr", "params")}
    ref = hg.hypergrad(**kwargs, method="reverse")
    assert_same(hg.hypergrad(**kwargs, method=hg.Checkpointed(slots=slots)), ref)


def domain_problem(opt, steps=5, batch=6, *, norm=None, dropout=0.0, device="cpu"):
    """One weight per data domain (aux), per-example losses averaged: a mean over the batch."""
    torch.manual_seed(0)
    layers = [nn.Linear(3, 5)]
    if norm is not None:
        layers.append(norm)
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(5, 1)]
    model = nn.Sequential(*layers).double().to(device)
    params, buffers = hg.split(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, batch, 3, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(steps, batch, 1, generator=g, dtype=torch.float64).to(device)
    domain = torch.randint(0, 3, (steps, batch), generator=g).to(device)

    def per_example(p, xb, yb, bufs):
        if bufs is None:
            return ((hg.call(model, p, xb) - yb) ** 2).squeeze(-1), None
        out, new = hg.call(model, p, xb, buffers=bufs, return_buffers=True)
        return ((out - yb) ** 2).squeeze(-1), new

    def inner(p, a, b, bufs=None):
        xb, yb, db = b
        err, new = per_example(p, xb, yb, bufs)
        loss = (a["w"][db] * err).mean() + a["l2"] * sum((t**2).sum() for t in p.values())
        return loss if bufs is None else (loss, new)

    def outer(p, a, b, bufs=None):
        return per_example(p, b[0], b[1], bufs)[0].mean()

    aux = {"w": torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64, device=device),
           "l2": torch.tensor(0.01, dtype=torch.float64, device=device)}  # fmt: skip
    return {"outer_loss": outer, "inner_loss": inner, "params": params, "opt": opt,
            "batches": (x, y, domain), "outer_batch": (x[0], y[0]), "aux": aux,
            "buffers": buffers if norm is not None else None, "seed": 0}  # fmt: skip


FAMILIES = [
    hg.optim.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    hg.optim.adam(lr=0.02, betas=(0.8, 0.95), eps=1e-3),
    hg.optim.adamw(lr=0.02, weight_decay=0.1, amsgrad=True),
    hg.optim.rmsprop(lr=0.01, momentum=0.5, centered=True),
    hg.optim.adagrad(lr=0.1, lr_decay=0.01),
]


@pytest.mark.parametrize("opt", FAMILIES, ids=lambda o: repr(o)[:30])
def test_every_family_slots_and_micro_batches_equal_reverse(opt):
    problem = {**domain_problem(opt), "wrt": ("aux", "lr", "params")}
    ref = hg.hypergrad(**problem, method="reverse")
    for method in [hg.Checkpointed(slots=2), hg.Checkpointed(slots=3, micro_batches=4),
                   hg.Checkpointed(2, micro_batches=3)]:  # fmt: skip
        got = hg.hypergrad(**problem, method=method)
        assert_same(got, ref)
        torch.testing.assert_close(got.value, ref.value, rtol=1e-12, atol=0)


def test_micro_batches_match_finite_differences():
    problem = domain_problem(hg.optim.adam(lr=0.05))
    hg.testing.check_hypergrad(
        **problem, method=hg.Checkpointed(slots=2, micro_batches=2), wrt=("aux", "lr")
    )


def test_slots_with_dropout_and_batchnorm_equal_reverse():
    problem = domain_problem(hg.optim.sgd(lr=0.1, momentum=0.5), dropout=0.3)
    ref = hg.hypergrad(**problem, method="reverse")
    assert_same(hg.hypergrad(**problem, method=hg.Checkpointed(slots=2)), ref)
    norm = domain_problem(hg.optim.sgd(lr=0.1), norm=nn.BatchNorm1d(5).double())
    ref = hg.hypergrad(**norm, method="reverse")
    assert_same(hg.hypergrad(**norm, method=hg.Checkpointed(slots=3)), ref)


def test_slots_with_clients_equal_reverse():
    problem = domain_problem(hg.optim.sgd(lr=0.1, momentum=0.5), steps=6)
    stacked = {k: torch.stack([v, 1.1 * v]) for k, v in problem["params"].items()}
    x, y, d = problem["batches"]
    clients = hg.Clients(rounds=2, in_dims={"params": 0, "batches": 0})
    problem = {**problem, "params": stacked, "batches": (torch.stack([x, x.flip(1)], 1),
               torch.stack([y, y.flip(1)], 1), torch.stack([d, d.flip(1)], 1))}  # fmt: skip
    kwargs = {**problem, "clients": clients, "wrt": ("aux", "lr")}
    ref = hg.hypergrad(**kwargs, method="reverse")
    for slots in (1, 2, 4):
        assert_same(hg.hypergrad(**kwargs, method=hg.Checkpointed(slots=slots)), ref)
    chunked = hg.Clients(rounds=2, in_dims={"params": 0, "batches": 0}, chunk_size=1)
    got = hg.hypergrad(**{**kwargs, "clients": chunked}, method=hg.Checkpointed(slots=2))
    assert_same(got, ref)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, TypeError, r"hg.Checkpointed: give one of segment and slots, got segment=None"),
        ({"segment": 2, "slots": 2}, TypeError, r"give one of segment and slots"),
        ({"slots": 0}, ValueError, r"hg.Checkpointed: slots must be a positive int .* got 0"),
        ({"slots": 2, "micro_batches": 0}, ValueError, r"micro_batches must be a positive int"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        hg.Checkpointed(**kwargs)


def test_repr():
    assert repr(hg.Checkpointed(slots=4)) == "hg.Checkpointed(slots=4)"
    assert repr(hg.Checkpointed(3, micro_batches=2)) == "hg.Checkpointed(3, micro_batches=2)"


@pytest.mark.parametrize(
    "build",
    [
        lambda: domain_problem(hg.optim.sgd(lr=0.1), norm=nn.BatchNorm1d(5).double()),
        lambda: domain_problem(hg.optim.sgd(lr=0.1), dropout=0.5),
    ],
    ids=["batchnorm", "dropout"],
)
def test_micro_batches_refuse_a_loss_that_is_not_a_mean_over_its_batch(build):
    with pytest.raises(ValueError, match=r"hg.hypergrad: with micro_batches=2, the inner gradient "
                       r"summed over the micro-batches differs from the whole batch's \(relative "
                       r"difference .* at step \d\b.*Pass micro_batches=1"):  # fmt: skip
        hg.hypergrad(**build(), method=hg.Checkpointed(slots=2, micro_batches=2))


def test_micro_batches_need_a_batch_dimension():
    problem = domain_problem(hg.optim.sgd(lr=0.1), batch=3)
    with pytest.raises(ValueError, match=r"micro_batches=4 slices each inner batch .* at least 4; "
                       r"found leading sizes \[3\]"):  # fmt: skip
        hg.hypergrad(**problem, method=hg.Checkpointed(slots=2, micro_batches=4))


def test_micro_batches_explain_a_loss_that_fails_on_a_slice():
    x, y, _ = domain_problem(hg.optim.sgd(lr=0.1))["batches"]

    def inner(p, a, b):  # per-example weights in aux: they do not follow the slices
        return (a * ((b[0] @ p["w"] + p["b"] - b[1]) ** 2).squeeze(-1)).mean()

    params = {"w": torch.ones(3, 1, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"with micro_batches=2, inner_loss failed on a slice of "
                       r"its batch \(.*\)\. Micro-batches need a loss that takes any number"):  # fmt: skip
        hg.hypergrad(lambda p, a, b: (p["w"] ** 2).sum(), inner, params, hg.optim.sgd(lr=0.1),
                     (x, y), None, aux=torch.ones(6, dtype=torch.float64),
                     method=hg.Checkpointed(slots=2, micro_batches=2))  # fmt: skip


def test_micro_batches_with_clients_raise():
    problem = domain_problem(hg.optim.sgd(lr=0.1))
    stacked = {k: torch.stack([v, v]) for k, v in problem["params"].items()}
    with pytest.raises(ValueError, match=r"needs the step of one model; with clients="):
        hg.hypergrad(**{**problem, "params": stacked}, clients=hg.Clients(in_dims={"params": 0, "batches": None}),
                     method=hg.Checkpointed(slots=2, micro_batches=2))  # fmt: skip


def test_nothing_passed_in_is_modified():
    problem = domain_problem(hg.optim.adam(lr=0.05))
    before = [t.clone() for t in hg.tree.leaves((problem["params"], problem["aux"]))]
    hg.hypergrad(**problem, method=hg.Checkpointed(slots=2, micro_batches=2), wrt=("aux", "params"))
    after = hg.tree.leaves((problem["params"], problem["aux"]))
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ------------------------------------------------------------------ the cost model


def test_checkpoint_cost_predicts_the_schedules_runs_and_chooses_slots_for_a_budget():
    mb = 2**20
    cost = hg.checkpoint_cost(256, 4, carry_bytes=6 * mb, backward_bytes=40 * mb,
                              step_seconds=0.1, backward_seconds=0.3)  # fmt: skip
    assert cost.forward_runs == simulate(257, 4)[0] == 1337
    assert cost.peak_bytes == 7 * 6 * mb + 40 * mb
    assert cost.seconds == pytest.approx(1337 * 0.1 + 256 * 0.3)
    chosen = hg.checkpoint_cost(256, carry_bytes=6 * mb, backward_bytes=40 * mb,
                                budget_bytes=100 * mb)  # fmt: skip
    assert chosen.slots == 7 and chosen.peak_bytes <= 100 * mb
    assert (
        hg.checkpoint_cost(256, 9, carry_bytes=6 * mb, backward_bytes=40 * mb).peak_bytes > 100 * mb
    )
    assert hg.checkpoint_cost(3, carry_bytes=1, budget_bytes=10**9).slots == 4  # K + 1 at most


def test_checkpoint_cost_errors():
    with pytest.raises(TypeError, match=r"hg.checkpoint_cost: give slots=c, or budget_bytes="):
        hg.checkpoint_cost(10, carry_bytes=1)
    with pytest.raises(ValueError, match=r"no number of slots fits budget_bytes=100: one slot "
                       r"already needs 140 bytes .* micro_batches=m"):  # fmt: skip
        hg.checkpoint_cost(10, carry_bytes=10, backward_bytes=100, budget_bytes=100)

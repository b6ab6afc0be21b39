"""Seed problem 5: federated clients, a regulariser from an auxiliary model, server = average.

The problem is built by ``examples/seed5_federated.py`` (loaded here, so the example is tested).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import hypergrad as hg

_PATH = Path(__file__).resolve().parent.parent / "examples" / "seed5_federated.py"
_spec = importlib.util.spec_from_file_location("seed5_federated", _PATH)
seed5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seed5)


def by_hand_one_sgd_step(problem, aux, lr):
    """What a by-hand script does: each client's gradient, one SGD step, average, server loss."""
    x, y = problem["batches"]
    params = problem["params"]
    new = {}
    for name, p in params.items():
        leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
        loss = problem["inner_loss"]({**params, name: leaves}, aux, (x[0], y[0]))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        new[name] = {k: v - lr * g for (k, v), g in zip(leaves.items(), grads)}
    return problem["outer_loss"](hg.tree.detach(new), aux, problem["outer_batch"]).item()


def test_one_sgd_step_matches_a_by_hand_finite_difference():
    lr = 0.05
    problem = seed5.make_federated_problem(clients=3, steps=1, opt=hg.optim.sgd(lr=lr))
    g = hg.hypergrad(**problem, wrt="aux")
    aux, eps = problem["aux"], 1e-6
    for key, value in aux.items():
        numeric = torch.zeros_like(value)
        for i in range(value.numel()):
            delta = torch.zeros(value.numel(), dtype=value.dtype)
            delta[i] = eps
            delta = delta.reshape(value.shape)
            plus = by_hand_one_sgd_step(problem, {**aux, key: value + delta}, lr)
            minus = by_hand_one_sgd_step(problem, {**aux, key: value - delta}, lr)
            numeric.view(-1)[i] = (plus - minus) / (2 * eps)
        torch.testing.assert_close(g.aux[key], numeric, rtol=1e-6, atol=1e-10)
    assert g.aux["0.weight"].abs().sum() > 0
    assert g.value.item() == pytest.approx(by_hand_one_sgd_step(problem, aux, lr), rel=1e-12)


@pytest.mark.parametrize(
    "opt", [hg.optim.sgd(lr=0.05, momentum=0.5), hg.optim.adam(lr=0.05)], ids=["sgd", "adam"]
)
@pytest.mark.parametrize(
    "method", ["reverse", hg.Checkpointed(2), "forward"], ids=["reverse", "checkpointed", "forward"]
)
def test_k_steps_match_finite_differences(opt, method):
    problem = seed5.make_federated_problem(clients=3, steps=4, opt=opt)
    report = hg.testing.check_hypergrad(**problem, method=method, wrt="aux", directions=2)
    assert report.passed


def test_clients_train_independently():
    # Summing the clients' losses gives each client exactly its own gradient: one client's
    # trajectory does not change when another client's initial params do.
    problem = seed5.make_federated_problem(clients=2, steps=3, opt=hg.optim.adam(lr=0.05))
    a = hg.unroll(
        problem["inner_loss"],
        problem["params"],
        problem["opt"],
        problem["batches"],
        aux=problem["aux"],
    )
    changed = {**problem["params"], "client1": hg.tree.scale(problem["params"]["client1"], 0.5)}
    b = hg.unroll(
        problem["inner_loss"], changed, problem["opt"], problem["batches"], aux=problem["aux"]
    )
    torch.testing.assert_close(a.params["client0"], b.params["client0"], rtol=0, atol=0)
    assert not torch.equal(a.params["client1"]["0.weight"], b.params["client1"]["0.weight"])


def test_example_main_runs_and_the_outer_loop_lowers_the_server_loss(capsys):
    out = seed5.main(clients=2, steps=3, outer_steps=3)
    assert out["last"] < out["first"] and out["max_rel_err"] < 1e-5
    assert "passed" in capsys.readouterr().out

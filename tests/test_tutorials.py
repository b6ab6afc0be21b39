"""The claims of tutorials 5-10 and 12 and of the flagship demo, on their example scripts (small settings)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "examples"))


@pytest.fixture(scope="module", autouse=True)
def _examples_on_path():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sys.path.insert(0, EXAMPLES)
    yield
    sys.path.remove(EXAMPLES)
    torch.set_num_threads(threads)


def run(name, **kwargs):
    return importlib.import_module(name).main(**kwargs)


def test_learned_lr_and_weight_decay_beat_the_fixed_baseline():
    r = run("hyperparameter_optimisation", meta_iterations=8, steps=40)
    assert len(r["val_loss"]) == 9
    assert r["learned_val_loss"] < r["baseline_val_loss"] - 0.01
    assert r["learned_test_loss"] < r["baseline_test_loss"]  # data meta-learning never saw
    assert r["val_loss"][0] == pytest.approx(r["baseline_val_loss"], rel=1e-5)


def test_maml_init_adapts_better_than_a_random_init():
    r = run("maml_sine", meta_iterations=150, test_tasks=50)
    assert r["maml_after"] < r["random_init_after"] * 0.75
    assert r["maml_after"] < r["maml_before"]  # the few steps of adaptation help


def test_distilled_digits_train_fresh_inits_better_than_real_ones():
    r = run("distill_digits", meta_iterations=40, test_inits=4)
    assert r["meta_loss"][-1] < r["meta_loss"][0] - 0.5
    assert r["distilled_accuracy"] > r["real_accuracy"] + 0.1


def test_learned_per_block_learning_rates_train_the_transformer_better():
    r = run("transformer_lr", meta_iterations=3, steps=8)
    assert len(r["val_loss"]) == 4 and r["lr_history"].shape == (4, 5)
    assert r["val_loss"][-1] < r["val_loss"][0]
    assert r["learned_test_loss"] < r["fixed_test_loss"]


def test_reweighting_beats_unweighted_training_under_label_noise():
    r = run("reweighting", meta_iterations=15, steps=40)
    assert r["reweighted_test_loss"] < r["unweighted_test_loss"]
    assert r["reweighted_test_accuracy"] > r["unweighted_test_accuracy"]
    assert r["mean_weight_noisy"] < 0.7 * r["mean_weight_clean"]  # mislabelled examples down
    assert r["weights"].mean().item() == pytest.approx(1.0, rel=1e-5)


def test_tutorial5_loop_and_vmap_hypergradients_match_finite_differences_and_each_other():
    r = run("seed5_loop_vs_vmap", clients=3, steps=4, timing_clients=(2,))
    for name in ("SGD", "Adam"):
        assert r["checks"][name].passed and r["checks"][name].max_rel_err < 1e-6
        assert r["max_diff"][name] < 1e-12
        loop_value, vmap_value = r[f"{name} value"]
        assert loop_value == pytest.approx(vmap_value, rel=1e-12)
    assert set(r["timing"]) == {2} and all(t > 0 for t in r["timing"][2])


def test_flagship_learned_penalty_beats_fedavg_on_held_out_test_loss(tmp_path):
    out = tmp_path / "flagship.png"
    r = run(
        "flagship_demo", clients=40, rounds=6, local_steps=20, meta_iterations=4,
        out=str(out), progress=False,
    )  # fmt: skip
    assert out.exists() and out.stat().st_size > 1000 and r["plot"] == str(out)
    before, after = r["table"]["FedAvg (before)"], r["table"]["learned (after)"]
    # The start is FedAvg with a negligible pull (every strength 1e-4, off the kink of max(0, .),
    # so the first hypergradient does not depend on torch's choice of subgradient there).
    assert r["val_curve"][0] == pytest.approx(before["val_loss"], abs=0.02)
    assert after["val_loss"] < before["val_loss"] - 0.02
    assert after["test_loss"] < before["test_loss"]  # held-out data, never used above
    assert after["test_accuracy"] > before["test_accuracy"]
    assert r["strengths"].shape == (r["clients"], 2) and (r["strengths"] >= 0).all()
    assert r["strengths"].max() > 0  # the learned penalty is not FedAvg again


def test_per_weight_decays_by_implicit_hypergradients_beat_the_best_single_decay():
    r = run("implicit_weight_decay", meta_iterations=8)
    assert r["hyperparameters"] == 2560 and len(r["val_loss"]) == 9
    assert r["learned_val_loss"] < r["single_val_loss"] - 0.1
    assert r["learned_test_loss"] < r["single_test_loss"]  # data meta-learning never saw


def test_online_learning_rates_beat_the_initial_fixed_rate():
    r = run("online_learning_rates", windows=15, T=10, grid=(3e-3,))
    assert len(r["history"]) == 15
    initial = r["fixed"][r["initial_rate"]]
    assert r["online"][0] < initial[0]  # validation loss
    assert r["online"][1] < initial[1]  # test loss: data the rates never saw
    assert all(rate > r["initial_rate"] for rate in r["rates"])  # the rates rose

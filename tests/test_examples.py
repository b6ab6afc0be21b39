"""Each seed-problem example runs (small settings) and its claim holds."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


@pytest.fixture(scope="module", autouse=True)
def _examples_on_path():
    # Tiny models run fastest on one thread (and do not fight other processes for cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.abspath(EXAMPLES))
    yield
    sys.path.remove(os.path.abspath(EXAMPLES))
    torch.set_num_threads(threads)


def run(name, **kwargs):
    return importlib.import_module(name).main(**kwargs)


def test_seed1_loss_on_another_models_parameters():
    r = run("seed1_loss_on_other_model", steps=80)
    assert r["A_unchanged"]  # gradients flow into B only; A's module is untouched
    assert r["cosine_to_A_with_term"] < r["cosine_to_A_without_term"] - 0.5
    assert r["accuracy_B"] > 0.8 and r["accuracy_A"] > 0.8


def test_seed2_penalty_on_every_layer_but_the_last():
    r = run("seed2_penalty_on_some_layers", steps=40)
    assert r["last_layer"] == "4.weight, 4.bias"
    assert r["head_grad_unchanged"]  # bit-identical gradient for the last layer
    assert r["body_grad_changed"]
    assert r["body_drift_with_penalty"] < r["body_drift_without"]
    assert r["task_A_accuracy_with_penalty"] > r["task_A_accuracy_without"]


def test_seed3_combining_models(tmp_path):
    out = tmp_path / "path.png"
    r = run("seed3_combine_models", steps=300, out=str(out))
    assert out.exists() and out.stat().st_size > 1000 and r["plot"] == str(out)
    assert r["merged_module_max_abs_diff"] == 0.0  # loaded module == functional call
    assert r["accuracy_average"] > 0.8 and r["accuracy_task_arithmetic"] > 0.8
    assert r["loss_average_coupled"] < r["loss_average_one_init"]
    assert r["loss_average_coupled"] < r["loss_average_two_inits"]
    assert r["path_max_loss"]["one init, coupled"] < r["path_max_loss"]["two inits"]


def test_seed4_noisy_weights():
    r = run("seed4_noisy_weights", epochs=2)
    assert r["grad_gap_vs_noisy_copy"] == 0.0  # clean weights get the noisy-point gradient
    assert r["sigma0_equals_plain_training"]
    assert r["accuracy_clean_weights"] > 0.8

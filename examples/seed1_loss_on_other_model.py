"""Seed problem 1: a loss on another model's parameters.

Model A is trained on the digits. Model B starts from the same initialisation and trains on the
same task, plus a term ``lam * cosine(params_B, params_A)`` that pushes B's weights away from A's
direction. A's parameters are a plain tree of tensors that nothing differentiates, so the
gradient flows into B only, and the module A is never touched.

Run: ``python examples/seed1_loss_on_other_model.py``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _digits import accuracy, digits, mlp

import hypergrad as hg


def train(params, loss_fn, steps, lr=1e-2):
    """Full-batch Adam on ``loss_fn(params)`` with hg.optim; returns the trained params."""
    opt = hg.optim.adam(lr=lr)
    state = opt.init(params)
    grad_fn = torch.func.grad(loss_fn)
    for _ in range(steps):
        params, state = opt.step(params, grad_fn(params), state)
    return params


def main(steps: int = 150, lam: float = 1.0, seed: int = 0) -> dict[str, float | bool]:
    x, y, x_test, y_test = digits(seed)
    model_a = mlp(seed=seed)
    init, _ = hg.split(model_a)

    def task_loss(p):
        return F.cross_entropy(hg.call(model_a, p, x), y)

    params_a = train(init, task_loss, steps)
    hg.load(model_a, params_a)  # A is now a trained nn.Module
    a_before = {k: v.clone() for k, v in model_a.state_dict().items()}
    target = hg.split(model_a)[0]  # A's weights as a tree: data, not a variable

    def loss_b(p):
        return task_loss(p) + lam * hg.tree.cosine(p, target)

    # Gradients go to B only: differentiate w.r.t. B's tree; A's tree is a constant.
    grads = torch.func.grad(loss_b)(init)
    assert set(grads) == set(init)

    params_b = train(init, loss_b, steps)
    params_plain = train(init, task_loss, steps)
    a_unchanged = all(torch.equal(model_a.state_dict()[k], v) for k, v in a_before.items())
    return {
        "cosine_to_A_with_term": hg.tree.cosine(params_b, target).item(),
        "cosine_to_A_without_term": hg.tree.cosine(params_plain, target).item(),
        "accuracy_A": accuracy(model_a(x_test), y_test),
        "accuracy_B": accuracy(hg.call(model_a, params_b, x_test), y_test),
        "A_unchanged": a_unchanged,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lam", type=float, default=1.0)
    args = parser.parse_args()
    for k, v in main(args.steps, args.lam).items():
        print(f"{k:>26}: {v}")

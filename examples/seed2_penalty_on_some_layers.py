"""Seed problem 2: a penalty on some layers only (every layer but the last).

Continual-learning style: after training on digits 0-4 (task A), keep an anchor copy of the
weights and a per-parameter importance (squared gradients, a diagonal Fisher estimate). While
training on digits 5-9 (task B), add ``lam * sum(importance * (p - anchor)**2)`` over every
layer but the last, selected by name with ``hg.tree.all_but_last_layer``. The last layer's
gradient is exactly the task gradient: the penalty does not touch it.

Run: ``python examples/seed2_penalty_on_some_layers.py``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _digits import accuracy, digits, mlp

import hypergrad as hg


def main(steps: int = 100, lam: float = 1000.0, seed: int = 0) -> dict[str, float | bool]:
    x, y, x_test, y_test = digits(seed)
    task_a, task_b = y < 5, y >= 5
    model = mlp(seed=seed)
    params, _ = hg.split(model)

    def task_loss(p, mask):
        return F.cross_entropy(hg.call(model, p, x[mask]), y[mask])

    def train(p, loss_fn):
        opt = hg.optim.adam(lr=1e-2)
        state = opt.init(p)
        grad_fn = torch.func.grad(loss_fn)
        for _ in range(steps):
            p, state = opt.step(p, grad_fn(p), state)
        return p

    params = train(params, lambda p: task_loss(p, task_a))

    # The anchor and the importance, restricted to every layer but the last.
    body = hg.tree.all_but_last_layer(params)
    anchor = hg.tree.select(params, body)
    fisher = hg.tree.map(torch.square, torch.func.grad(lambda p: task_loss(p, task_a))(params))
    importance = hg.tree.select(fisher, body)
    importance = hg.tree.scale(importance, 1.0 / hg.tree.norm(importance, 1))  # sums to one

    def penalty(p):
        drift = hg.tree.map(torch.square, hg.tree.sub(hg.tree.select(p, body), anchor))
        return lam * hg.tree.vdot(importance, drift)

    def loss_b(p):
        return task_loss(p, task_b) + penalty(p)

    # The claim: at any point, the last layer's gradient is unchanged by the penalty.
    probe = hg.tree.map(lambda t: t + 0.01 * torch.randn_like(t), params)
    g_plain = torch.func.grad(lambda p: task_loss(p, task_b))(probe)
    g_pen = torch.func.grad(loss_b)(probe)
    head = [k for k in params if not body(k, None)]
    head_unchanged = all(torch.equal(g_plain[k], g_pen[k]) for k in head)
    body_changed = any(not torch.equal(g_plain[k], g_pen[k]) for k in anchor)

    with_penalty = train(params, loss_b)
    without = train(params, lambda p: task_loss(p, task_b))
    old = y_test < 5
    return {
        "last_layer": ", ".join(head),
        "head_grad_unchanged": head_unchanged,
        "body_grad_changed": body_changed,
        "body_drift_with_penalty": hg.tree.distance(
            hg.tree.select(with_penalty, body), anchor
        ).item(),
        "body_drift_without": hg.tree.distance(hg.tree.select(without, body), anchor).item(),
        # task-incremental evaluation: which of the digits 0-4 is it?
        "task_A_accuracy_with_penalty": accuracy(
            hg.call(model, with_penalty, x_test[old])[:, :5], y_test[old]
        ),
        "task_A_accuracy_without": accuracy(
            hg.call(model, without, x_test[old])[:, :5], y_test[old]
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lam", type=float, default=1000.0)
    args = parser.parse_args()
    for k, v in main(args.steps, args.lam).items():
        print(f"{k:>30}: {v}")

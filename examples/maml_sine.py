"""MAML on sine-wave regression: learn initial weights that adapt to a new sine in a few steps.

Each task is a sine ``a * sin(x + phase)`` (amplitude in [0.1, 5], phase in [0, pi]) seen through
a few support points; adaptation is ``K`` SGD steps on the support points, and the meta-loss is
the adapted model's error on query points of the same sine. The initial weights are what the
hypergradient differentiates (``wrt="params"``).

A meta-batch of tasks runs in one ``hg.hypergrad`` call: the initial weights are copied once per
task along a new leading dimension, the inner loss is the *sum* of the tasks' losses (so each
copy's gradient is its own task's gradient), and the hypergradient with respect to the copies,
summed over the copies, is the meta-gradient with respect to the shared initial weights.

Run: ``python examples/maml_sine.py``
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import hypergrad as hg


def sample_tasks(
    n: int, points: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``n`` sines: their ``(amplitude, phase)`` and ``points`` samples ``(x, y)`` of each."""
    amplitude = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=generator)
    phase = math.pi * torch.rand(n, 1, 1, generator=generator)
    x = 10 * torch.rand(n, points, 1, generator=generator) - 5
    return amplitude, phase, (x, amplitude * torch.sin(x + phase))


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def main(
    meta_iterations: int = 600,
    tasks_per_batch: int = 8,
    support: int = 10,
    query: int = 10,
    steps: int = 3,
    inner_lr: float = 0.01,
    meta_lr: float = 0.002,
    test_tasks: int = 100,
    seed: int = 0,
) -> dict:
    model = make_model(seed)
    init, _ = hg.split(model)
    gen = torch.Generator().manual_seed(seed)

    def mse(params, x, y):
        return ((hg.call(model, params, x) - y) ** 2).mean()

    # Per-task losses on stacked copies of the weights: vmap over the task dimension.
    task_losses = torch.func.vmap(mse)

    def inner_loss(copies, aux, batch):
        return task_losses(copies, *batch).sum()

    def outer_loss(copies, aux, batch):
        return task_losses(copies, *batch).mean()

    inner_opt = hg.optim.sgd(lr=inner_lr)

    def adapt(params, batch, n_steps=steps):
        n = batch[0].shape[0]
        batches = tuple(t.expand(n_steps, *t.shape) for t in batch)  # same support each step
        return hg.unroll(inner_loss, hg.clients.broadcast(params, n), inner_opt, batches).params

    meta = init
    meta_opt = hg.optim.adam(lr=meta_lr)
    meta_state = meta_opt.init(meta)
    meta_losses = []
    for _ in range(meta_iterations):
        _, _, (x, y) = sample_tasks(tasks_per_batch, support + query, gen)
        support_batch = (x[:, :support], y[:, :support])
        batches = tuple(t.expand(steps, *t.shape) for t in support_batch)
        g = hg.hypergrad(
            outer_loss,
            inner_loss,
            hg.clients.broadcast(meta, tasks_per_batch),
            inner_opt,
            batches,
            (x[:, support:], y[:, support:]),
            wrt="params",
        )
        meta_losses.append(g.value.item())
        meta_grad = hg.tree.map(lambda d: d.sum(0), g.params)
        meta, meta_state = meta_opt.step(meta, meta_grad, meta_state)

    # New tasks: adapt both initialisations with the same K steps on the same support points.
    amplitude, phase, (x, y) = sample_tasks(test_tasks, support + query, gen)
    support_batch, query_batch = (x[:, :support], y[:, :support]), (x[:, support:], y[:, support:])
    result = {"meta_loss": meta_losses}
    for name, params in [("maml", meta), ("random_init", init)]:
        adapted = adapt(params, support_batch)
        result[f"{name}_before"] = outer_loss(
            hg.clients.broadcast(params, test_tasks), None, query_batch
        ).item()
        result[f"{name}_after"] = outer_loss(adapted, None, query_batch).item()
        result[f"{name}_params"] = params
    result["steps"] = steps
    result["model"] = model
    result["adapt"] = adapt
    result["example_task"] = (
        amplitude[0].item(),
        phase[0].item(),
        support_batch[0][0],
        support_batch[1][0],
    )

    print(f"query MSE on {test_tasks} new sines     before adaptation   after {steps} steps")
    for name in ("maml", "random_init"):
        label = "MAML init" if name == "maml" else "random init (no meta-learning)"
        print(f"{label:36s} {result[f'{name}_before']:18.3f} {result[f'{name}_after']:14.3f}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-iterations", type=int, default=600)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    main(meta_iterations=args.meta_iterations, steps=args.steps)

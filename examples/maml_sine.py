"""MAML on sine-wave regression: learn initial weights that adapt to a new sine in a few steps.

Each task is a sine ``a * sin(x + phase)`` (amplitude in [0.1, 5], phase in [0, pi]) seen through
a few support points; adaptation is ``K`` SGD steps on the support points, and the meta-loss is
the adapted model's error on query points of the same sine. The initial weights are what the
hypergradient differentiates (``wrt="params"``).

A meta-batch of tasks runs in one ``hg.hypergrad`` call with ``clients=hg.Clients(outer="each")``:
every task (a client) starts from the one shared init (``in_dims={"params": None}``), adapts on
its own support points (batches shaped ``(steps, tasks, points, 1)``), and meets its own query
points (``outer_batch`` shaped ``(tasks, points, 1)``); the meta-loss is the mean over tasks, and
the hypergradient with respect to the shared init is the meta-gradient.

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

    def loss(params, aux, batch):  # one task: the model's error on its points
        x, y = batch
        return ((hg.call(model, params, x) - y) ** 2).mean()

    inner_opt = hg.optim.sgd(lr=inner_lr)
    tasks = hg.Clients(in_dims={"params": None}, outer="each")  # one shared init, task losses

    def adapt(params, batch, n_steps=steps):
        batches = tuple(t.expand(n_steps, *t.shape) for t in batch)  # same support each step
        return hg.unroll(loss, params, inner_opt, batches, clients=tasks).params

    def task_mean(stacked, batch):  # the mean over tasks of each task's loss
        return torch.func.vmap(lambda p, x, y: loss(p, None, (x, y)))(stacked, *batch).mean()

    meta = init
    meta_opt = hg.optim.adam(lr=meta_lr)
    meta_state = meta_opt.init(meta)
    meta_losses = []
    for _ in range(meta_iterations):
        _, _, (x, y) = sample_tasks(tasks_per_batch, support + query, gen)
        support_batch = (x[:, :support], y[:, :support])
        batches = tuple(t.expand(steps, *t.shape) for t in support_batch)
        g = hg.hypergrad(
            loss,
            loss,
            meta,
            inner_opt,
            batches,
            (x[:, support:], y[:, support:]),  # each task's own query points
            wrt="params",
            clients=tasks,
        )
        meta_losses.append(g.value.item())  # the mean over tasks of the query loss
        meta, meta_state = meta_opt.step(meta, g.params, meta_state)

    # New tasks: adapt both initialisations with the same K steps on the same support points.
    amplitude, phase, (x, y) = sample_tasks(test_tasks, support + query, gen)
    support_batch, query_batch = (x[:, :support], y[:, :support]), (x[:, support:], y[:, support:])
    result = {"meta_loss": meta_losses}
    for name, params in [("maml", meta), ("random_init", init)]:
        adapted = adapt(params, support_batch)
        before = hg.clients.broadcast(params, test_tasks)
        result[f"{name}_before"] = task_mean(before, query_batch).item()
        result[f"{name}_after"] = task_mean(adapted, query_batch).item()
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

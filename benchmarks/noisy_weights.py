"""Benchmark: one training epoch with noisy-weight forward passes vs plain training.

Three ways to train the same model on the same batches with the same optimizer:

* ``plain``: ``loss(model(x))``, the baseline;
* ``hg.call``: forward with ``{k: p + noise}`` through ``hg.call``, clean weights updated
  (``examples/seed4_noisy_weights.py``);
* ``save/restore``: the way users reach for: copy the weights, add noise in place, forward and
  backward, copy the clean weights back, step;
* ``deepcopy``: perturb a ``copy.deepcopy`` of the model each step and copy its gradients back.

Each is timed for one epoch, median of ``--repeats`` runs after a warm-up, on two models (a
small MLP on the digits and a wider one on synthetic data). Prints a table and writes
``benchmarks/results/noisy_weights.json``. Target: ``hg.call`` <= 1.3x plain.

Run: ``python benchmarks/noisy_weights.py``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "examples"))
from _digits import digits
from seed4_noisy_weights import batches, noisy_step, plain_step

SIGMA = 0.05


def save_restore_step(model, opt, xb, yb, sigma=SIGMA):
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(sigma * torch.randn_like(p))
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    opt.step()
    return loss


def deepcopy_step(model, opt, xb, yb, sigma=SIGMA):
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(sigma * torch.randn_like(p))
    loss = F.cross_entropy(noisy(xb), yb)
    loss.backward()
    for p, q in zip(model.parameters(), noisy.parameters()):
        p.grad = q.grad
    opt.step()
    opt.zero_grad()
    return loss


STEPS = {
    "plain": lambda m, o, x, y: plain_step(m, o, x, y),
    "hg.call": lambda m, o, x, y: noisy_step(m, o, x, y, SIGMA),
    "save/restore": save_restore_step,
    "deepcopy": deepcopy_step,
}


def workloads():
    x, y, _, _ = digits()
    small = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    g = torch.Generator().manual_seed(0)
    xw = torch.randn(4096, 784, generator=g)
    yw = torch.randint(10, (4096,), generator=g)
    wide = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    return {
        "digits MLP 64-32-32-10, batch 64": (small, batches(x, y, 64)),
        "MLP 784-512-512-10, batch 128": (wide, batches(xw, yw, 128)),
    }


def time_epoch(model0, data, step, repeats):
    times = []
    for r in range(repeats + 1):  # the first run is a warm-up
        model = copy.deepcopy(model0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch.manual_seed(r)
        t0 = time.perf_counter()
        for xb, yb in data:
            step(model, opt, xb, yb)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(repeats: int = 7, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for name, (model, data) in workloads().items():
        base = None
        for method, step in STEPS.items():
            t = time_epoch(model, data, step, repeats)
            base = t if method == "plain" else base
            rows.append({"workload": name, "method": method, "epoch_s": t, "ratio": t / base})
    print(f"{'workload':<36} {'method':<13} {'epoch (ms)':>11} {'x plain':>8}")
    for r in rows:
        print(
            f"{r['workload']:<36} {r['method']:<13} {1000 * r['epoch_s']:>11.1f} {r['ratio']:>8.2f}"
        )
    result = {
        "benchmark": "noisy_weights",
        "target": "hg.call epoch <= 1.3x plain",
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "rows": rows,
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "noisy_weights.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    main(args.repeats, args.threads)

"""Benchmark: one training epoch with noisy-weight forward passes vs plain training.

Three ways to train the same model on the same batches with the same optimizer:

* ``plain``: ``loss(model(x))``, the baseline;
* ``noise floor``: the plain step plus drawing the same Gaussian noise (unused): the cost every
  noisy-weight method pays whatever the library, so ``x floor`` isolates the method's own cost;
* ``hg.call``: forward with ``{k: p + noise}`` through ``hg.call``, clean weights updated
  (``examples/seed4_noisy_weights.py``);
* ``save/restore``: the way users reach for: copy the weights, add noise in place, forward and
  backward, copy the clean weights back, step;
* ``deepcopy``: perturb a ``copy.deepcopy`` of the model each step and copy its gradients back.

Each is timed for one epoch, median of ``--repeats`` interleaved rounds after a warm-up round, on two models (a
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


def noise_floor_step(model, opt, xb, yb, sigma=SIGMA):
    noise = [sigma * torch.randn_like(p) for p in model.parameters()]  # drawn, never used
    del noise
    return plain_step(model, opt, xb, yb)


STEPS = {
    "plain": lambda m, o, x, y: plain_step(m, o, x, y),
    "noise floor": noise_floor_step,
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


def time_epochs(model0, data, steps, repeats):
    """Median epoch time per method, the methods interleaved round by round.

    Each round runs every method once, on a fresh copy of the model, in a rotated order, so no
    method is always first after a warm-up or always measured while the allocator is cold.
    """
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats + 1):  # round 0 is a warm-up
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model = copy.deepcopy(model0)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            torch.manual_seed(r)
            t0 = time.perf_counter()
            for xb, yb in data:
                steps[name](model, opt, xb, yb)
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(repeats: int = 7, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for name, (model, data) in workloads().items():
        base = floor = None
        medians = time_epochs(model, data, STEPS, repeats)
        for method, t in medians.items():
            base = t if method == "plain" else base
            floor = t if method == "noise floor" else floor
            row = {"workload": name, "method": method, "epoch_s": t, "ratio": t / base}
            if floor is not None:
                row["ratio_vs_noise_floor"] = t / floor
            rows.append(row)
    print(f"{'workload':<36} {'method':<13} {'epoch (ms)':>11} {'x plain':>8} {'x floor':>8}")
    for r in rows:
        vs_floor = f"{r['ratio_vs_noise_floor']:>8.2f}" if "ratio_vs_noise_floor" in r else " " * 8
        print(
            f"{r['workload']:<36} {r['method']:<13} {1000 * r['epoch_s']:>11.1f} "
            f"{r['ratio']:>8.2f} {vs_floor}"
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

"""Seed problem 3: combining two trained models' weights.

Two models start from one initialisation and train on disjoint halves of the digits. Their
weights are then combined as trees: averaged (``hg.tree.mean``), interpolated
(``hg.tree.lerp``, the whole path at once with ``torch.func.vmap``), and merged by task
arithmetic (``init + alpha * sum of task vectors``, with ``hg.tree.sub``/``add``/``scale``). A
merged tree is loaded into a fresh module with ``hg.load``. The loss along the interpolation
path is plotted to ``--out``. Finally, training the two models *coupled* by a penalty
``lam/2 * |pA - pB|^2`` makes their average work much better than averaging models trained
independently.

Run: ``python examples/seed3_combine_models.py --out path.png``
"""

from __future__ import annotations

import argparse
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from _digits import accuracy, digits, mlp

import hypergrad as hg


def train_pair(model, pa, pb, halves, steps, lam, lr=0.1, batch=64, seed=0):
    """Minibatch SGD on both models at once; ``lam > 0`` couples them by their distance."""
    (xa, ya), (xb, yb) = halves
    opt = hg.optim.sgd(lr=lr, momentum=0.9)
    params = (pa, pb)
    state = opt.init(params)

    def loss(ps, ia, ib):
        la = F.cross_entropy(hg.call(model, ps[0], xa[ia]), ya[ia])
        lb = F.cross_entropy(hg.call(model, ps[1], xb[ib]), yb[ib])
        return la + lb + 0.5 * lam * hg.tree.distance(ps[0], ps[1]) ** 2

    grad_fn = torch.func.grad(loss)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ia = torch.randint(len(xa), (batch,), generator=gen)
        ib = torch.randint(len(xb), (batch,), generator=gen)
        params, state = opt.step(params, grad_fn(params, ia, ib), state)
    return params


def main(
    steps: int = 300, lam: float = 0.05, out: str | None = None, alpha: float = 0.8, seed: int = 0
) -> dict:
    x, y, x_test, y_test = digits(seed)
    half = len(x) // 2
    halves = ((x[:half], y[:half]), (x[half:], y[half:]))
    model = mlp(seed=seed)
    init, _ = hg.split(model)
    other_init, _ = hg.split(mlp(seed=seed + 1))

    def test_loss(p):
        return F.cross_entropy(hg.call(model, p, x_test), y_test)

    pa, pb = train_pair(model, init, init, halves, steps, lam=0.0, seed=seed)
    ca, cb = train_pair(model, init, init, halves, steps, lam=lam, seed=seed)
    da, db = train_pair(model, init, other_init, halves, steps, lam=0.0, seed=seed)

    # Combine: average, interpolate, task arithmetic.
    average = hg.tree.mean([pa, pb])
    quarter = hg.tree.lerp(pa, pb, 0.25)
    task_vectors = [hg.tree.sub(pa, init), hg.tree.sub(pb, init)]
    task_sum = hg.tree.add(*task_vectors)
    arithmetic = hg.tree.add(init, hg.tree.scale(task_sum, alpha))

    # Load a merged tree into a fresh module: its forward equals the functional call.
    fresh = hg.load(mlp(seed=seed + 2), average)
    merged_gap = (fresh(x_test) - hg.call(model, average, x_test)).abs().max().item()

    # The loss along the interpolation path, all points at once.
    ws = torch.linspace(0, 1, 11)
    along = {
        name: torch.func.vmap(lambda w, a=a, b=b: test_loss(hg.tree.lerp(a, b, w)))(ws)
        for name, (a, b) in {
            "one init": (pa, pb),
            "one init, coupled": (ca, cb),
            "two inits": (da, db),
        }.items()
    }
    out = out or os.path.join(tempfile.mkdtemp(prefix="hypergrad-"), "interpolation.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, losses in along.items():
        ax.plot(ws.numpy(), losses.detach().numpy(), marker="o", label=name)
    ax.set(xlabel="interpolation weight (0 = model A, 1 = model B)", ylabel="test loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)

    return {
        "plot": out,
        "merged_module_max_abs_diff": merged_gap,
        "accuracy_A": accuracy(hg.call(model, pa, x_test), y_test),
        "accuracy_B": accuracy(hg.call(model, pb, x_test), y_test),
        "accuracy_average": accuracy(hg.call(model, average, x_test), y_test),
        "accuracy_lerp_0.25": accuracy(hg.call(model, quarter, x_test), y_test),
        "accuracy_task_arithmetic": accuracy(hg.call(model, arithmetic, x_test), y_test),
        "loss_average_one_init": test_loss(average).item(),
        "loss_average_coupled": test_loss(hg.tree.mean([ca, cb])).item(),
        "loss_average_two_inits": test_loss(hg.tree.mean([da, db])).item(),
        "loss_endpoints_coupled": (test_loss(ca).item(), test_loss(cb).item()),
        "path_max_loss": {k: v.max().item() for k, v in along.items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lam", type=float, default=0.05)
    parser.add_argument("--out", default=None, help="where to save the plot (PNG)")
    args = parser.parse_args()
    for k, v in main(args.steps, args.lam, args.out).items():
        print(f"{k:>28}: {v}")

"""Thousands of hyperparameters by implicit differentiation: one weight decay per weight.

A linear classifier on scikit-learn's digits trains on only 200 images whose 64 pixels come with
192 features of pure noise (256 features, 10 classes: 2,570 weights). Every weight gets its own L2
decay, ``exp(log_decay)``: 2,560 hyperparameters (the biases are not decayed), the
*meta-parameters*. Each meta-iteration trains the classifier to its optimum, and ``hg.Implicit``
gives the gradient of the validation loss with respect to all 2,560 log-decays at the price of
that training plus a few dozen Hessian-vector products; Adam updates them.

The baseline is the best *single* weight decay for all weights, chosen on the same validation
set from a grid. Both are judged on held-out test images that neither ever saw.

Run: ``python examples/implicit_weight_decay.py``
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from _digits import digits

import hypergrad as hg

NOISE = 192  # noise features appended to the 64 pixels
FEATURES = 64 + NOISE
LOWEST = math.log(3e-4)  # the smallest decay: the inner Hessian's smallest eigenvalue


def with_noise(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The pixels and ``NOISE`` features of Gaussian noise (std 0.5), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([x, 0.5 * torch.randn(len(x), NOISE, generator=g)], dim=1)


def loss(params: dict, log_decay: torch.Tensor, batch: tuple) -> torch.Tensor:
    """Cross-entropy plus one L2 decay per weight: ``sum(exp(log_decay) * W^2) / 2``."""
    x, y = batch
    ce = F.cross_entropy(x @ params["W"] + params["b"], y)
    return ce + 0.5 * (log_decay.exp() * params["W"] ** 2).sum()


def validation(params: dict, log_decay: torch.Tensor, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(x @ params["W"] + params["b"], y)


def train(start: dict, log_decay: torch.Tensor, data: tuple, steps: int, opt) -> dict:
    """``steps`` full-batch steps from ``start`` (``hg.unroll``, no graph)."""
    batches = tuple(t.expand(steps, *t.shape) for t in data)
    return hg.unroll(loss, start, opt, batches, aux=log_decay).params


def main(
    meta_iterations: int = 30,
    steps: int = 400,
    n_train: int = 200,
    meta_lr: float = 0.2,
    seed: int = 0,
) -> dict:
    x, y, x_test, y_test = digits(seed)
    f, f_test = with_noise(x, seed), with_noise(x_test, seed + 1)
    train_data = (f[:n_train], y[:n_train])
    val_data = (f[n_train : n_train + 400], y[n_train : n_train + 400])
    test_data = (f_test, y_test)
    zero = {"W": torch.zeros(FEATURES, 10), "b": torch.zeros(10)}
    opt = hg.optim.sgd(lr=0.5, momentum=0.9)

    # The baseline: one weight decay for every weight, the best on the validation set.
    single = {}
    for decay in torch.logspace(-4, -1, 7).tolist():
        trained = train(zero, torch.full((FEATURES, 10), math.log(decay)), train_data, steps, opt)
        single[decay] = (validation(trained, None, val_data).item(),
                         validation(trained, None, test_data).item())  # fmt: skip
    best = min(single, key=lambda d: single[d][0])

    # Implicit hypergradient descent on 2,560 log-decays, starting from the best single one.
    log_decay = torch.full((FEATURES, 10), math.log(best))
    meta_opt = hg.optim.adam(lr=meta_lr)
    meta_state = meta_opt.init(log_decay)
    batches = tuple(t.expand(steps, *t.shape) for t in train_data)
    val_losses, iterations = [], []
    start = time.perf_counter()
    for _ in range(meta_iterations):
        g = hg.hypergrad(validation, loss, zero, opt, batches, val_data, aux=log_decay,
                         method=hg.Implicit(maxiter=200, tol=1e-3))  # fmt: skip
        val_losses.append(g.value.item())
        iterations.append(g.solver.iterations)
        log_decay, meta_state = meta_opt.step(log_decay, g.aux, meta_state)
        log_decay = log_decay.clamp(min=LOWEST)  # keeps the inner problem well conditioned
    seconds = time.perf_counter() - start
    params = train(zero, log_decay, train_data, steps, opt)
    val_losses.append(validation(params, None, val_data).item())

    result = {
        "hyperparameters": log_decay.numel(),
        "grid": single,
        "best_single_decay": best,
        "single_val_loss": single[best][0],
        "single_test_loss": single[best][1],
        "val_loss": val_losses,
        "learned_val_loss": val_losses[-1],
        "learned_test_loss": validation(params, None, test_data).item(),
        "learned_decay": log_decay.exp(),
        "solver_iterations": iterations,
        "seconds": seconds,
    }
    median = sorted(iterations)[len(iterations) // 2]
    print(f"{result['hyperparameters']} weight decays, {meta_iterations} implicit hypergradients "
          f"in {seconds:.1f} s (CG iterations: median {median})")  # fmt: skip
    print(f"{'':28s} {'validation':>10s} {'test':>10s}")
    print(
        f"{f'best single decay ({best:.0e})':28s} {single[best][0]:10.4f} {single[best][1]:10.4f}"
    )
    print(f"{'learned, one per weight':28s} {val_losses[-1]:10.4f} "
          f"{result['learned_test_loss']:10.4f}")  # fmt: skip
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-iterations", type=int, default=30)
    args = parser.parse_args()
    main(meta_iterations=args.meta_iterations)

"""Learning to reweight training examples with noisy labels, by hypergradient descent.

A fraction of the training labels of scikit-learn's digits is replaced by a random wrong class.
Every training example gets a weight in its loss (the auxiliary tree: one logit per example,
``weights = N * softmax(logits)`` over the N examples, so they stay positive with mean 1 and all
start at 1). Each meta-iteration trains an MLP for
``K`` SGD steps on the weighted loss from the same initial weights and takes the gradient of the
loss on a small *clean* validation set with respect to the per-example logits; Adam lowers the
weights that hurt the validation loss. The baseline trains on the same noisy data, unweighted.

Run: ``python examples/reweighting.py``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _digits import accuracy, digits, mlp

import hypergrad as hg


def corrupt(y: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple:
    """Replace ``fraction`` of the labels by a random *wrong* class; return ``(labels, is_noisy)``."""
    noisy = torch.rand(len(y), generator=generator) < fraction
    shift = torch.randint(1, 10, (len(y),), generator=generator)
    return torch.where(noisy, (y + shift) % 10, y), noisy


def example_weights(logits: torch.Tensor) -> torch.Tensor:
    """Positive weights with mean 1 (a softmax over the examples, times their number)."""
    return len(logits) * torch.softmax(logits, 0)


def main(
    meta_iterations: int = 40,
    steps: int = 60,
    n_train: int = 400,
    n_val: int = 100,
    noise: float = 0.4,
    lr: float = 0.1,
    meta_lr: float = 0.1,
    seed: int = 0,
) -> dict:
    x, y, x_test, y_test = digits(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, (y_train, is_noisy) = x[:n_train], corrupt(y[:n_train], noise, gen)
    val = (x[n_train : n_train + n_val], y[n_train : n_train + n_val])  # small and clean
    model = mlp(seed=seed)
    init, _ = hg.split(model)

    def weighted_loss(params, logits, batch):
        xb, yb = batch
        losses = F.cross_entropy(hg.call(model, params, xb), yb, reduction="none")
        return (example_weights(logits) * losses).mean()

    def val_loss(params, logits, batch):
        return F.cross_entropy(hg.call(model, params, batch[0]), batch[1])

    batches = tuple(t.expand(steps, *t.shape) for t in (x_train, y_train))  # full batch
    opt = hg.optim.sgd(lr=lr, momentum=0.9)

    def train(logits, data=batches):
        return hg.unroll(weighted_loss, init, opt, data, aux=logits).params

    logits = torch.zeros(n_train)
    meta_opt = hg.optim.adam(lr=meta_lr)
    meta_state = meta_opt.init(logits)
    val_losses = []
    for _ in range(meta_iterations):
        g = hg.hypergrad(val_loss, weighted_loss, init, opt, batches, val, aux=logits)
        val_losses.append(g.value.item())
        logits, meta_state = meta_opt.step(logits, g.aux, meta_state)

    weights = example_weights(logits)
    result = {"val_loss": val_losses, "weights": weights, "is_noisy": is_noisy}
    # A second baseline: the clean validation examples alone, as the only training data.
    clean_only = train(torch.zeros(n_val), tuple(t.expand(steps, *t.shape) for t in val))
    runs = [("unweighted", train(torch.zeros(n_train))), ("reweighted", train(logits))]
    for name, trained in [*runs, ("clean_val_only", clean_only)]:
        result[f"{name}_test_accuracy"] = accuracy(hg.call(model, trained, x_test), y_test)
        result[f"{name}_test_loss"] = val_loss(trained, None, (x_test, y_test)).item()
    result["mean_weight_clean"] = weights[~is_noisy].mean().item()
    result["mean_weight_noisy"] = weights[is_noisy].mean().item()

    print(f"{int(is_noisy.sum())} of {n_train} training labels are wrong; {n_val} clean validation")
    print(f"{'':14s} {'test acc':>9s} {'test loss':>10s}")
    for name in ("unweighted", "reweighted", "clean_val_only"):
        acc, loss = result[f"{name}_test_accuracy"], result[f"{name}_test_loss"]
        print(f"{name:14s} {acc:9.3f} {loss:10.4f}")
    print(
        f"mean learned weight: clean examples {result['mean_weight_clean']:.3f}, "
        f"mislabelled examples {result['mean_weight_noisy']:.3f}"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-iterations", type=int, default=40)
    parser.add_argument("--noise", type=float, default=0.4)
    args = parser.parse_args()
    main(meta_iterations=args.meta_iterations, noise=args.noise)

"""Hyperparameter optimisation by hypergradient descent: a learning rate and per-layer weight decay.

An MLP trains for ``K`` steps of SGD with momentum on a small training split of scikit-learn's
digits (few examples, so regularisation matters). The learning rate and one weight decay per
layer are the *meta-parameters*, kept in log space. Each meta-iteration unrolls the K steps from
the same initial weights, takes the gradient of the validation loss with respect to the
hyperparameters (``wrt=("lr", "weight_decay")``), and updates the log-hyperparameters with Adam.
The baseline trains with the initial hyperparameters kept fixed.

Run: ``python examples/hyperparameter_optimisation.py``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _digits import digits, mlp

import hypergrad as hg

LAYERS = ("0", "2", "4")  # the Linear layers of _digits.mlp


def hyperparams_of(meta: dict[str, torch.Tensor]) -> dict:
    """The optimizer's hyperparameters from the log-space meta-parameters.

    One weight decay per layer, shared by its weight and bias (a per-parameter dict).
    """
    decay = meta["log_weight_decay"].exp()
    return {
        "lr": meta["log_lr"].exp(),
        "weight_decay": {
            f"{layer}.{kind}": decay[i]
            for i, layer in enumerate(LAYERS)
            for kind in ("weight", "bias")
        },
    }


def main(
    meta_iterations: int = 30,
    steps: int = 80,
    n_train: int = 200,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    meta_lr: float = 0.15,
    seed: int = 0,
) -> dict:
    x, y, x_test, y_test = digits(seed)
    train, val = (
        (x[:n_train], y[:n_train]),
        (x[n_train : n_train + 400], y[n_train : n_train + 400]),
    )
    model = mlp(seed=seed)
    init, _ = hg.split(model)

    def loss(params, aux, batch):
        return F.cross_entropy(hg.call(model, params, batch[0]), batch[1])

    # Full-batch steps: the same (x, y) at each of the K steps, stacked along a leading dim.
    batches = tuple(t.expand(steps, *t.shape) for t in train)
    opt = hg.optim.sgd(lr=lr, momentum=0.9, weight_decay={k: 0.0 for k in init})
    meta = {
        "log_lr": torch.tensor(lr).log(),
        "log_weight_decay": torch.full((len(LAYERS),), weight_decay).log(),
    }
    meta_opt = hg.optim.adam(lr=meta_lr)
    meta_state = meta_opt.init(meta)

    def evaluate(hyperparams, data):
        trained = hg.unroll(loss, init, opt, batches, hyperparams=hyperparams).params
        return loss(trained, None, data).item()

    fixed = hyperparams_of(meta)
    baseline_val = evaluate(fixed, val)
    val_losses = []
    for _ in range(meta_iterations):
        # hyperparams_of is differentiable: pull the hypergradient back to the log-space meta.
        hyperparams, pullback = torch.func.vjp(hyperparams_of, meta)
        g = hg.hypergrad(
            loss, loss, init, opt, batches, val, hyperparams=hyperparams, wrt=("lr", "weight_decay")
        )
        val_losses.append(g.value.item())
        (meta_grad,) = pullback(g.hyperparams)
        meta, meta_state = meta_opt.step(meta, meta_grad, meta_state)
    learned = hyperparams_of(meta)
    val_losses.append(evaluate(learned, val))

    result = {
        "val_loss": val_losses,  # one per meta-iteration, and the final one
        "baseline_val_loss": baseline_val,
        "learned_val_loss": val_losses[-1],
        "baseline_test_loss": evaluate(fixed, (x_test, y_test)),
        "learned_test_loss": evaluate(learned, (x_test, y_test)),
        "lr": (lr, learned["lr"].item()),
        "weight_decay": {
            layer: (weight_decay, learned["weight_decay"][f"{layer}.weight"].item())
            for layer in LAYERS
        },
    }
    print(f"{'':24s} {'fixed':>10s} {'learned':>10s}")
    print(f"{'validation loss':24s} {baseline_val:10.4f} {result['learned_val_loss']:10.4f}")
    print(
        f"{'test loss':24s} {result['baseline_test_loss']:10.4f} {result['learned_test_loss']:10.4f}"
    )
    print(f"{'learning rate':24s} {lr:10.4f} {result['lr'][1]:10.4f}")
    for layer, (before, after) in result["weight_decay"].items():
        print(f"{'weight decay, layer ' + layer:24s} {before:10.2e} {after:10.2e}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-iterations", type=int, default=30)
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    main(meta_iterations=args.meta_iterations, steps=args.steps)

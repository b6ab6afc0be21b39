"""Small shared helpers for the seed-problem examples: scikit-learn's bundled digits and an MLP."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn


def digits(
    seed: int = 0, n_test: int = 400
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8x8 digits (1797 images, no download) as float32 tensors: ``x_train, y_train, x_test, y_test``.

    Pixels are scaled to [0, 1]; the split is a fixed random permutation.
    """
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def mlp(hidden: int = 32, seed: int = 0) -> nn.Sequential:
    """A 64-hidden-hidden-10 MLP with a seeded initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()

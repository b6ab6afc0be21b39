"""Seed problem 4: noisy weights in the forward pass, clean weights updated.

Each step perturbs the weights with Gaussian noise, runs the forward pass with the perturbed
tensors through ``hg.call``, and lets an ordinary ``torch.optim`` optimizer update the clean
parameters with the gradient taken at the noisy point. Nothing is saved or restored: the noisy
tensors are ``p + noise`` (a differentiable expression of the clean ``p``), and ``hg.call``
uses them without touching the module.

Run: ``python examples/seed4_noisy_weights.py``
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _digits import accuracy, digits, mlp

import hypergrad as hg


def batches(x, y, batch_size, seed=0):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[i], y[i]) for i in perm.split(batch_size)]


def noisy_step(model, opt, xb, yb, sigma):
    """One step: forward with ``p + sigma * noise``, update the clean ``p``."""
    noisy = {k: p + sigma * torch.randn_like(p) for k, p in model.named_parameters()}
    loss = F.cross_entropy(hg.call(model, noisy, xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def plain_step(model, opt, xb, yb):
    """The baseline: an ordinary training step."""
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def main(epochs: int = 5, sigma: float = 0.05, batch_size: int = 64, seed: int = 0) -> dict:
    x, y, x_test, y_test = digits(seed)
    model = mlp(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    # The gradient reaching the clean weights is the gradient at the noisy weights.
    xb, yb = x[:batch_size], y[:batch_size]
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    noisy_step(model, torch.optim.SGD(model.parameters(), lr=0.0), xb, yb, sigma)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(sigma * torch.randn_like(p))  # the same noise, put into a copy
    F.cross_entropy(reference(xb), yb).backward()
    grad_gap = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(model.parameters(), reference.parameters())
    )
    model.zero_grad()

    # With sigma = 0 the noisy path is exactly plain training.
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for xb, yb in batches(x, y, batch_size, seed)[:5]:
        noisy_step(model, opt, xb, yb, 0.0)
        plain_step(twin, twin_opt, xb, yb)
    same_as_plain = all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))

    for epoch in range(epochs):
        for xb, yb in batches(x, y, batch_size, seed + epoch):
            noisy_step(model, opt, xb, yb, sigma)
    with torch.no_grad():
        clean = accuracy(model(x_test), y_test)
        noisy = {k: p + sigma * torch.randn_like(p) for k, p in model.named_parameters()}
        under_noise = accuracy(hg.call(model, noisy, x_test), y_test)
    return {
        "grad_gap_vs_noisy_copy": grad_gap,
        "sigma0_equals_plain_training": same_as_plain,
        "accuracy_clean_weights": clean,
        "accuracy_noisy_weights": under_noise,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sigma", type=float, default=0.05)
    args = parser.parse_args()
    for k, v in main(args.epochs, args.sigma).items():
        print(f"{k:>30}: {v}")

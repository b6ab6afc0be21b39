"""Seed problem 5: backpropagating through optimizer steps, in a federated setting.

``k`` client models each train for ``K`` steps on their own data, with a regulariser produced by
an auxiliary model: a term ``lam * mean((f_client(x) - g_aux(x))^2)`` that pulls each client's
predictions towards the auxiliary model's. The server model is the average of the clients'
final parameters. We want the gradient of the server's validation loss with respect to the
auxiliary model's parameters, through all K steps of every client's SGD or Adam, and check it
against central finite differences.

This version loops over the clients in plain Python (the ``vmap`` version lives in
``hg.clients``): all clients' parameters form one tree ``{"client0": {...}, ...}``, the inner
loss is the sum of the clients' losses (each client's gradient only sees its own term), and the
optimizer, being element-wise, updates every client independently.

Run: ``python examples/seed5_federated.py``
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

import hypergrad as hg


def make_federated_problem(
    clients: int = 3,
    steps: int = 5,
    opt: hg.optim.Optimizer | None = None,
    lam: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """The keyword arguments of ``hg.hypergrad`` for the federated problem (wrt aux)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    client_model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    aux_model = nn.Sequential(nn.Linear(4, 1)).to(dtype)
    params = {}
    for c in range(clients):
        torch.manual_seed(seed + 1 + c)
        params[f"client{c}"] = hg.split(
            nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
        )[0]
    aux, _ = hg.split(aux_model)
    # each client's data: (steps, clients, batch, features); a shifted linear task per client
    x = torch.randn(steps, clients, 16, 4, generator=gen, dtype=dtype)
    w_true = torch.randn(clients, 4, 1, generator=gen, dtype=dtype) * 0.5 + 1.0
    y = x @ w_true + 0.1 * torch.randn(steps, clients, 16, 1, generator=gen, dtype=dtype)
    val_x = torch.randn(64, 4, generator=gen, dtype=dtype)
    val_y = val_x @ w_true.mean(0)

    def inner_loss(p, aux_params, batch):
        xb, yb = batch
        total = 0.0
        for c in range(clients):  # plain Python loop over clients
            pred = hg.call(client_model, p[f"client{c}"], xb[c])
            target = hg.call(aux_model, aux_params, xb[c])
            task = ((pred - yb[c]) ** 2).mean()
            total = total + task + lam * ((pred - target) ** 2).mean()
        return total

    def outer_loss(p, aux_params, batch):
        server = hg.tree.mean([p[f"client{c}"] for c in range(clients)])
        vx, vy = batch
        return ((hg.call(client_model, server, vx) - vy) ** 2).mean()

    return {
        "outer_loss": outer_loss,
        "inner_loss": inner_loss,
        "params": params,
        "opt": opt if opt is not None else hg.optim.sgd(lr=0.05),
        "batches": (x, y),
        "outer_batch": (val_x, val_y),
        "aux": aux,
    }


def main(clients: int = 3, steps: int = 5, outer_steps: int = 20) -> dict[str, float]:
    problem = make_federated_problem(clients, steps, hg.optim.adam(lr=0.05))
    g = hg.hypergrad(**problem, wrt="aux")
    print(f"server loss after {steps} steps: {g.value.item():.5f}")
    for name, grad in g.aux.items():
        print(f"  d server_loss / d aux[{name!r}] = {grad.flatten().tolist()}")

    report = hg.testing.check_hypergrad(**problem, wrt="aux", directions=3)
    print(report)

    # Use the hypergradient: train the auxiliary model so that the server model gets better.
    aux = problem["aux"]
    first = g.value.item()
    for _ in range(outer_steps):
        g = hg.hypergrad(**{**problem, "aux": aux}, wrt="aux")
        aux = hg.tree.map(lambda a, d: a - 0.5 * d, aux, g.aux)
    last = hg.hypergrad(**{**problem, "aux": aux}, wrt="aux").value.item()
    print(f"server loss: {first:.5f} -> {last:.5f} after {outer_steps} outer steps on aux")
    return {"first": first, "last": last, "max_rel_err": report.max_rel_err}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--outer-steps", type=int, default=20)
    args = parser.parse_args()
    main(args.clients, args.steps, args.outer_steps)

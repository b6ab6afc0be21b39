"""Seed problem 5, vectorised: C federated clients at once with ``hg.clients`` (``torch.func.vmap``).

The same scenario as ``seed5_federated.py``, at scale and without a Python loop over clients.
Each client trains a small MLP on its own data (clients hold different numbers of examples:
``hg.clients.pad`` pads them and the inner loss averages over the real ones with
``hg.clients.masked_mean``), with a regulariser ``lam * mean((f_client(x) - g_aux(x))^2)``
produced by an auxiliary model ``g_aux``. After K local steps the server averages the clients
weighted by their sample counts (FedAvg) and broadcasts the average back; after R rounds the
server's validation loss is differentiated with respect to the auxiliary model's parameters,
through every client's SGD or Adam steps and every aggregation, and checked against central
finite differences.

Run: ``python examples/seed5_federated_vmap.py --clients 32``
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

import hypergrad as hg


def make_problem(
    clients: int = 8,
    steps: int = 4,
    rounds: int = 2,
    opt: hg.optim.Optimizer | None = None,
    lam: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """The keyword arguments of ``hg.clients.hypergrad`` (wrt the auxiliary model)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    client_model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    aux_model = nn.Linear(4, 1).to(dtype)
    server, _ = hg.split(client_model)  # one initial server model, broadcast to every client
    aux, _ = hg.split(aux_model)

    # Each client: a shifted linear task with 6 to 20 examples.
    sizes = torch.randint(6, 21, (clients,), generator=gen).tolist()
    w_true = torch.randn(clients, 4, 1, generator=gen, dtype=dtype) * 0.5 + 1.0
    datasets = []
    for c, n in enumerate(sizes):
        x = torch.randn(n, 4, generator=gen, dtype=dtype)
        datasets.append((x, x @ w_true[c] + 0.1 * torch.randn(n, 1, generator=gen, dtype=dtype)))
    padded = hg.clients.pad(datasets)
    batches = hg.clients.batches(padded, steps * rounds)  # full batch at every step
    val_x = torch.randn(64, 4, generator=gen, dtype=dtype)
    val_y = val_x @ w_true.mean(0)

    def inner_loss(p, aux_params, batch):  # one client; vmapped over all of them
        (x, y), mask = batch
        pred = hg.call(client_model, p, x)
        target = hg.call(aux_model, aux_params, x)
        per_example = (pred - y) ** 2 + lam * (pred - target) ** 2
        return hg.clients.masked_mean(per_example, mask)

    def outer_loss(server_params, aux_params, batch):  # on the aggregated server model
        vx, vy = batch
        return ((hg.call(client_model, server_params, vx) - vy) ** 2).mean()

    return {
        "outer_loss": outer_loss,
        "inner_loss": inner_loss,
        "params": server,
        "opt": opt if opt is not None else hg.optim.sgd(lr=0.1),
        "batches": batches,
        "outer_batch": (val_x, val_y),
        "aux": aux,
        "in_dims": {"params": None},
        "steps": steps,
        "rounds": rounds,
        "weights": padded.sizes.to(dtype),
    }


def directional_check(problem: dict[str, Any], directions: int = 3, eps: float = 1e-6) -> float:
    """Max relative error of the hypergradient against central differences along random directions."""
    g = hg.clients.hypergrad(**problem, wrt="aux")
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(directions):
        d = hg.tree.map(
            lambda a: torch.randn(a.shape, generator=gen, dtype=a.dtype), problem["aux"]
        )

        def value(sign: float, d=d) -> float:
            moved = hg.tree.map(lambda a, v: a + sign * eps * v, problem["aux"], d)
            return hg.clients.hypergrad(**{**problem, "aux": moved}, wrt="aux").value.item()

        numeric = (value(1.0) - value(-1.0)) / (2 * eps)
        analytic = hg.tree.vdot(g.aux, d).item()
        worst = max(worst, abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-12))
    return worst


def main(clients: int = 8, steps: int = 4, rounds: int = 2, outer_steps: int = 10) -> dict:
    problem = make_problem(clients, steps, rounds, hg.optim.adam(lr=0.05))
    g = hg.clients.hypergrad(**problem, wrt="aux")
    print(f"{clients} clients, {rounds} rounds of {steps} Adam steps (one vmapped computation)")
    print(f"server loss: {g.value.item():.5f}")
    for name, grad in g.aux.items():
        print(
            f"  d server_loss / d aux[{name!r}] = {[round(v, 6) for v in grad.flatten().tolist()]}"
        )
    err = directional_check(problem)
    print(f"max relative error vs central finite differences (float64): {err:.2e}")

    aux, first = problem["aux"], g.value.item()
    for _ in range(outer_steps):  # train the auxiliary model so that the server gets better
        g = hg.clients.hypergrad(**{**problem, "aux": aux}, wrt="aux")
        aux = hg.tree.map(lambda a, d: a - 0.5 * d, aux, g.aux)
    last = hg.clients.hypergrad(**{**problem, "aux": aux}, wrt="aux").value.item()
    print(f"server loss: {first:.5f} -> {last:.5f} after {outer_steps} outer steps on aux")
    return {"first": first, "last": last, "max_rel_err": err}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--outer-steps", type=int, default=10)
    args = parser.parse_args()
    main(args.clients, args.steps, args.rounds, args.outer_steps)

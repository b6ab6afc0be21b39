"""Seed problem 5, written twice: a Python loop over the clients, then ``hg.clients`` (vmap).

``C`` clients start from one server model and each takes ``K`` optimizer steps (SGD or Adam) on
its own regression task, plus a regulariser produced by an auxiliary model ``g``:
``lam * mean((f_client(x) - g(x))^2)``, which pulls the client's predictions towards ``g``'s.
The server is the clients' average. We want the gradient of the server's validation loss with
respect to ``g``'s parameters, through every client's K steps.

- :func:`loop_problem` is what one writes first: all clients in one dict of trees, an inner
  loss that sums the clients' losses in a Python loop, and ``hg.hypergrad``.
- :func:`vmap_problem` is the same problem for ``hg.clients.hypergrad``: the inner loss is *one*
  client's loss, vmapped over the clients; the server average is FedAvg.

Both are checked against central finite differences in float64 and against each other; the
tutorial (docs/tutorials/05-federated-hypergradients.md) times them.

Run: ``python examples/seed5_loop_vs_vmap.py``
"""

from __future__ import annotations

import statistics
import timeit
from typing import Any

import torch
from torch import nn

import hypergrad as hg


def make_data(
    clients: int, steps: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> dict[str, Any]:
    """Models, the initial server params, the aux params and every client's batches."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    client_model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)
    aux_model = nn.Linear(4, 1).to(dtype)
    # Client c regresses y = x @ w_c: tasks that differ between clients.
    w = torch.randn(clients, 4, 1, generator=gen, dtype=dtype) * 0.5 + 1.0
    x = torch.randn(steps, clients, 16, 4, generator=gen, dtype=dtype)  # (K, C, batch, features)
    y = x @ w + 0.1 * torch.randn(steps, clients, 16, 1, generator=gen, dtype=dtype)
    val_x = torch.randn(128, 4, generator=gen, dtype=dtype)
    return {
        "client_model": client_model,
        "aux_model": aux_model,
        "server": hg.split(client_model)[0],
        "aux": hg.split(aux_model)[0],
        "batches": (x, y),
        "val": (val_x, val_x @ w.mean(0)),  # the server should fit the average task
        "clients": clients,
    }


def losses(data: dict[str, Any], lam: float = 0.5):
    """One client's inner loss and the server's outer loss."""
    f, g = data["client_model"], data["aux_model"]

    def client_loss(params, aux, batch):
        x, y = batch
        pred = hg.call(f, params, x)
        return ((pred - y) ** 2).mean() + lam * ((pred - hg.call(g, aux, x)) ** 2).mean()

    def server_loss(server, aux, val):
        x, y = val
        return ((hg.call(f, server, x) - y) ** 2).mean()

    return client_loss, server_loss


def loop_problem(data: dict[str, Any], opt: hg.optim.Optimizer) -> dict[str, Any]:
    """The problem as a Python loop over clients, for ``hg.hypergrad`` / ``check_hypergrad``."""
    client_loss, server_loss = losses(data)
    names = [f"client{c}" for c in range(data["clients"])]

    def inner_loss(params, aux, batch):  # the sum: each client's gradient sees only its term
        x, y = batch  # (C, batch, ...)
        return sum(client_loss(params[n], aux, (x[c], y[c])) for c, n in enumerate(names))

    def outer_loss(params, aux, val):
        return server_loss(hg.tree.mean([params[n] for n in names]), aux, val)

    return {
        "outer_loss": outer_loss,
        "inner_loss": inner_loss,
        "params": {n: data["server"] for n in names},  # every client starts from the server
        "opt": opt,
        "batches": data["batches"],
        "outer_batch": data["val"],
        "aux": data["aux"],
    }


def vmap_problem(data: dict[str, Any], opt: hg.optim.Optimizer) -> dict[str, Any]:
    """The same problem for ``hg.clients.hypergrad``: one client's loss, vmapped."""
    client_loss, server_loss = losses(data)
    return {
        "outer_loss": server_loss,  # receives the FedAvg of the clients' final params
        "inner_loss": client_loss,
        "params": data["server"],
        "opt": opt,
        "batches": data["batches"],  # (K, C, ...): step first, then client
        "outer_batch": data["val"],
        "aux": data["aux"],
        "in_dims": {"params": None},  # one server tree, broadcast to every client
    }


def median_seconds(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))


def timing(clients: int, steps: int = 10, repeats: int = 3) -> tuple[float, float]:
    """Seconds per hypergradient (float32, reverse mode, Adam): the loop and the vmap version."""
    data = make_data(clients, steps, dtype=torch.float32)
    opt = hg.optim.adam(lr=0.05)
    loop, vmapped = loop_problem(data, opt), vmap_problem(data, opt)
    return (
        median_seconds(lambda: hg.hypergrad(**loop), repeats),
        median_seconds(lambda: hg.clients.hypergrad(**vmapped), repeats),
    )


def main(clients: int = 4, steps: int = 5, timing_clients: tuple[int, ...] = (4, 16, 64)) -> dict:
    data = make_data(clients, steps)
    result: dict[str, Any] = {"checks": {}, "max_diff": {}, "timing": {}}
    optimizers = {"SGD": hg.optim.sgd(lr=0.1, momentum=0.9), "Adam": hg.optim.adam(lr=0.05)}
    for name, opt in optimizers.items():
        report = hg.testing.check_hypergrad(**loop_problem(data, opt), directions=3)
        loop = report.hypergradient
        vmapped = hg.clients.hypergrad(**vmap_problem(data, opt))
        diff = max((loop.aux[k] - vmapped.aux[k]).abs().max().item() for k in loop.aux)
        print(f"{name}, {clients} clients x {steps} steps, the loop version:\n{report}")
        print(
            f"  server loss {loop.value.item():.6f} (loop) {vmapped.value.item():.6f} (vmap); "
            f"largest |loop - vmap| over the hypergradient: {diff:.1e}\n"
        )
        result["checks"][name], result["max_diff"][name] = report, diff
        result[f"{name} value"] = (loop.value.item(), vmapped.value.item())
    print(f"{'clients':>7}  {'loop (s)':>9}  {'vmap (s)':>9}  {'speed-up':>8}")
    for c in timing_clients:
        t_loop, t_vmap = timing(c)
        result["timing"][c] = (t_loop, t_vmap)
        print(f"{c:>7}  {t_loop:>9.4f}  {t_vmap:>9.4f}  {t_loop / t_vmap:>7.1f}x")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

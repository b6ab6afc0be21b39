"""Seed problem 5 over several processes: each rank holds its own clients (torch.distributed).

The federated problem of ``seed5_federated_vmap.py`` (C clients with different amounts of data,
a regulariser from an auxiliary model, FedAvg weighted by sample counts, R rounds of K steps),
with the clients split unevenly over the ranks of a process group. Each rank passes only its own
clients, their batches and their FedAvg weights, with ``process_group=``; aggregation spans
every rank, and every rank gets the same hypergradient: the one a single process holding all
the clients computes (rank 0 checks it, in float64). Then every rank takes the same few
gradient steps on the auxiliary model, so that the server's validation loss falls.

Run: ``torchrun --nproc-per-node 2 examples/federated_distributed.py`` (gloo on CPU; on GPUs
with NCCL, pass ``--backend nccl``: each rank then uses ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from seed5_federated_vmap import make_problem

import hypergrad as hg


def my_clients(clients: int, rank: int, world: int) -> slice:
    """An uneven split: rank r holds about (r + 1) parts of the clients."""
    parts = world * (world + 1) // 2
    bounds = [clients * (r * (r + 1) // 2) // parts for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def main(clients: int = 12, steps: int = 4, rounds: int = 3, outer_steps: int = 5) -> dict:
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    everyone = make_problem(clients, steps, rounds, hg.optim.adam(lr=0.05))  # same on every rank
    if device is not None:
        everyone = {k: hg.tree.map(lambda x: x.to(device), v) if k in ("params", "batches", "outer_batch", "aux", "weights") else v for k, v in everyone.items()}  # fmt: skip
    rows = my_clients(clients, rank, world)
    mine = {
        **everyone,
        "batches": hg.tree.map(lambda b: b[:, rows], everyone["batches"]),  # (steps, C, ...)
        "weights": everyone["weights"][rows],  # this rank's clients' sample counts
        "process_group": group,
    }
    print(f"rank {rank} of {world}: clients {rows.start}..{rows.stop - 1}")

    g = hg.clients.hypergrad(**mine, wrt="aux")  # every rank: the same numbers
    if rank == 0:  # one process holding every client, for comparison
        one = hg.clients.hypergrad(**everyone, wrt="aux")
        diff = max(
            (a - b).abs().max().item()
            for a, b in zip(hg.tree.leaves(g.aux), hg.tree.leaves(one.aux))
        )
        print(f"server loss {g.value.item():.6f}; max |grad - one process's| = {diff:.1e}")

    aux, first = mine["aux"], g.value.item()
    for _ in range(outer_steps):  # the same update on every rank: aux stays replicated
        g = hg.clients.hypergrad(**{**mine, "aux": aux}, wrt="aux")
        aux = hg.tree.map(lambda a, d: a - 0.5 * d, aux, g.aux)
    last = hg.clients.hypergrad(**{**mine, "aux": aux}, wrt="aux").value.item()
    if rank == 0:
        print(f"server loss: {first:.5f} -> {last:.5f} after {outer_steps} steps on aux")
    return {"first": first, "last": last}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--clients", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(args.backend)
    result = main(args.clients)
    assert result["last"] < result["first"]
    dist.barrier()  # every rank done before any tears the group down
    dist.destroy_process_group()

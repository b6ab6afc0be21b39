"""Hyperparameter optimisation, data parallel: one model, each rank a shard of every batch.

The learned-learning-rate problem of ``hyperparameter_optimisation.py`` (an MLP on scikit-learn's
digits, SGD with momentum; the learning rate and one weight decay per layer are learned by
hypergradient descent on the validation loss), with every batch split unevenly over the ranks
of a process group, as ``DistributedDataParallel`` would split it. Every rank holds the same
model and hyperparameters and passes ``process_group=`` and its own shard of each training
batch and of the validation batch; each step's inner gradient is all-reduced (differentiably),
and every rank gets the hypergradient one process holding the whole batches computes (rank 0
checks it, in float64). Then every rank takes the same steps on the log-hyperparameters, so the
validation loss falls on every rank alike.

Run: ``torchrun --nproc-per-node 2 examples/data_parallel.py`` (gloo on CPU; on GPUs with NCCL,
pass ``--backend nccl``: each rank then uses ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _digits import digits, mlp
from hyperparameter_optimisation import LAYERS, hyperparams_of

import hypergrad as hg


def my_rows(n: int, rank: int, world: int) -> slice:
    """An uneven split of n examples: rank r holds about (r + 1) parts."""
    parts = world * (world + 1) // 2
    bounds = [n * (r * (r + 1) // 2) // parts for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def main(steps: int = 20, batch: int = 64, meta_iterations: int = 4, meta_lr: float = 0.1) -> dict:
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"  # fmt: skip
    x, y, _, _ = digits(0)
    x = x.to(torch.float64)
    model = mlp(hidden=32, seed=0).to(torch.float64)
    init = hg.tree.map(lambda p: p.to(device), hg.split(model)[0])  # the same on every rank

    def loss(params, aux, data):  # the mean over this rank's shard
        return F.cross_entropy(hg.call(model, params, data[0]), data[1])

    # The global batches: step k trains on examples [k * batch, (k + 1) * batch) of x.
    order = torch.randperm(len(x) - 400, generator=torch.Generator().manual_seed(0))[
        : steps * batch
    ]
    batches = (x[order].view(steps, batch, 64).to(device), y[order].view(steps, batch).to(device))
    val = (x[-400:].to(device), y[-400:].to(device))
    rows, val_rows = my_rows(batch, rank, world), my_rows(400, rank, world)
    shard = tuple(b[:, rows] for b in batches)  # (steps, my examples, ...)
    val_shard = tuple(v[val_rows] for v in val)
    print(f"rank {rank} of {world}: {rows.stop - rows.start} of {batch} examples per step")

    opt = hg.optim.sgd(lr=0.05, momentum=0.9, weight_decay={k: 0.0 for k in init})
    meta = {
        "log_lr": torch.tensor(0.05, dtype=torch.float64).log(),
        "log_weight_decay": torch.full((len(LAYERS),), 1e-4, dtype=torch.float64).log(),
    }
    meta = hg.tree.map(lambda m: m.to(device), meta)

    def hypergradient(meta, batches, val, **kw):
        hyperparams, pullback = torch.func.vjp(hyperparams_of, meta)
        g = hg.hypergrad(
            loss, loss, init, opt, batches, val, hyperparams=hyperparams,
            wrt=("lr", "weight_decay"), seed=0, **kw,
        )  # fmt: skip
        return g.value, pullback(g.hyperparams)[0]

    value, grad = hypergradient(meta, shard, val_shard, process_group=group)
    if rank == 0:  # one process holding the whole batches, for comparison
        one_value, one_grad = hypergradient(meta, batches, val)
        diff = max(
            (a - b).abs().max().item()
            for a, b in zip(hg.tree.leaves((value, grad)), hg.tree.leaves((one_value, one_grad)))
        )
        print(f"validation loss {value.item():.6f}; max |grad - one process's| = {diff:.1e}")

    first = value.item()
    meta_opt = hg.optim.adam(lr=meta_lr)
    meta_state = meta_opt.init(meta)
    for _ in range(meta_iterations):  # the same update on every rank: meta stays replicated
        value, grad = hypergradient(meta, shard, val_shard, process_group=group)
        meta, meta_state = meta_opt.step(meta, grad, meta_state)
    last = hypergradient(meta, shard, val_shard, process_group=group)[0].item()
    if rank == 0:
        print(f"validation loss: {first:.5f} -> {last:.5f} after {meta_iterations} meta-steps")
    return {"first": first, "last": last}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(args.backend)
    result = main(args.steps)
    assert result["last"] < result["first"]
    dist.barrier()  # every rank done before any tears the group down
    dist.destroy_process_group()

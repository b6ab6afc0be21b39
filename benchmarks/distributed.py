"""Benchmark: strong scaling of the federated hypergradient over processes (torch.distributed).

Workload: ``benchmarks/clients.py``'s seed-5 problem (C client MLPs 16 -> 64 -> 64 -> 1, tanh,
a regulariser from an auxiliary linear model, batches of 32) in R = 2 federated rounds of
K = 5 SGD steps, FedAvg server, reverse mode; the gradient of the server's validation loss with
respect to the auxiliary model. The C clients are split evenly over 1 or 2 processes (gloo on
127.0.0.1, one thread each, ``process_group=torch.distributed.group.WORLD``); every process
times the same call (a barrier before each run; the call itself ends with the ranks agreeing,
so they finish together) and rank 0 reports the median of ``--repeats`` runs after a warm-up.
One process without a process group (``process_group=None``) is timed as well, to show what the
collectives cost. The speed-up divides by a baseline timed in the same launch as the two
processes, interleaved with them: after each two-process call, rank 0 alone runs all C clients
without a group while rank 1 waits at a barrier (a machine's speed drifts between launches by
several per cent; the separate one-process launch's ratio is kept as
``speedup_separate_launches``). The ceiling is timed the same way: every rank runs its share
without a group, all at once (``solo``), so ``alone / solo`` is what the split gives on this
machine with no communication at all (the processes share caches and memory bandwidth). Each
rank's compute thread is held to a core of its own once the group is up (``PIN=0`` in the
environment turns that off; gloo's threads, started before, stay free): unpinned, the
scheduler moves threads between cores at every collective. The CPU time of each rank's call
(``time.process_time``) is reported too: the work a rank does, which halves with two processes
when the scheme scales. Bytes communicated are counted by wrapping
``torch.distributed.all_reduce`` and ``all_gather_object`` for one call: the payload each rank
sends into the collectives, divided by R for a per-round figure (the collectives' own protocol
overhead is not counted), and the number of collectives in the call (each costs a round trip).

Target: 2 processes >= 1.6x one process at C = 256 and >= 1.3x at C = 64 (one thread each),
on a quiet 2-core machine.

**Data parallel** (one model, ``process_group=`` without clients), in the same two-process
launch: a compute-bound model (an MLP 64 -> 1024 -> 1024 -> 10, tanh, cross-entropy, global
batches of ``DP_BATCH`` examples, float32; ``--hidden`` sets the width: at 512 a step takes
about 45 ms per rank on the 2-core benchmark machine, beside 5-10 ms of latency in its four
all-reduces there, at 1024 about 150-190 ms), reverse mode, K = 10 SGD steps with momentum, the
gradient of the validation loss with respect to an L2 penalty's strength (``aux``); each rank
holds half of every batch. The baseline and the ceiling are interleaved as above: rank 0 alone
runs the whole batches without a group while rank 1 waits; every rank runs its half without a
group at once. Bytes per step per rank: what each rank puts into the all-reduces of one call,
divided by K. The overhead is measured apart, on a model too small to compute anything
(P = 12): with 2 processes and with rank 0 alone, at K = 1 and K = 11, the extra time per step
(the slope) and per call (the rest) that the process group adds.
Target: 2 processes >= 1.7x one.

Writes ``benchmarks/results/distributed.json``.

Run: ``python benchmarks/distributed.py`` (``--quick``: C = 8, one repeat, nothing written).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pickle
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from clients import LR, workload
from torch import nn

import hypergrad as hg

HERE = os.path.dirname(os.path.abspath(__file__))
ROUNDS = 2
FEDERATED_REPEATS = 3  # the federated calls are short: this many times --repeats
DP_STEPS, DP_BATCH, DP_HIDDEN = 10, 1024, 1024


class Counter:
    """Collectives this rank runs and the bytes it puts into them, by wrapping torch.distributed's
    functions (``all_gather_object`` counts once, though it runs two all-gathers)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self._reduce, self._gather = dist.all_reduce, dist.all_gather_object

    def __enter__(self) -> Counter:
        def all_reduce(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return self._reduce(tensor, *args, **kwargs)

        def all_gather_object(out, obj, *args, **kwargs):
            self.bytes += len(pickle.dumps(obj))
            self.calls += 1
            return self._gather(out, obj, *args, **kwargs)

        dist.all_reduce, dist.all_gather_object = all_reduce, all_gather_object  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce, dist.all_gather_object = self._reduce, self._gather  # type: ignore[assignment]


def call(w: dict, rows: slice, group) -> torch.Tensor:
    params, _ = hg.split(w["model"])
    aux, _ = hg.split(w["aux_model"])
    g = hg.clients.hypergrad(
        w["outer"], w["inner"], params, hg.optim.sgd(lr=LR), (w["x"][:, rows], w["y"][:, rows]),
        w["val"], aux=aux, in_dims={"params": None}, rounds=ROUNDS, seed=0,
        process_group=group,
    )  # fmt: skip
    return g.aux["weight"]


def dp_workload(hidden: int, features: int = 64, batch: int = DP_BATCH) -> dict:
    """The data-parallel problem: an MLP on random classification data, K steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, 10),
    )  # fmt: skip

    def inner(p, aux, batch):
        penalty = sum((w**2).sum() for w in p.values())
        return F.cross_entropy(hg.call(model, p, batch[0]), batch[1]) + aux.exp() * penalty

    def outer(p, aux, batch):
        return F.cross_entropy(hg.call(model, p, batch[0]), batch[1])

    x, y = torch.randn(DP_STEPS + 1, batch, features), torch.randint(0, 10, (DP_STEPS + 1, batch))
    return {"model": model, "inner": inner, "outer": outer, "x": x, "y": y}


def dp_call(w: dict, rows: slice, group, steps: int = DP_STEPS) -> torch.Tensor:
    params, _ = hg.split(w["model"])
    g = hg.hypergrad(
        w["outer"], w["inner"], params, hg.optim.sgd(lr=0.1, momentum=0.9),
        (w["x"][:steps, rows], w["y"][:steps, rows]), (w["x"][-1, rows], w["y"][-1, rows]),
        aux=torch.tensor(-6.0), seed=0, process_group=group,
    )  # fmt: skip
    return g.aux


def timed(fn) -> tuple[float, float]:
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


def interleaved(fns: dict, rank: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Each ``fns[name]`` repeatedly, after a barrier; a name starting with ``alone`` runs on
    rank 0 only (the other ranks wait at the next barrier). (wall, cpu) seconds per run."""
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up
        if rank == 0 or not name.startswith("alone"):
            fn()
        dist.barrier()
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            if rank == 0 or not name.startswith("alone"):
                out[name].append(timed(fn))
        dist.barrier()
    return out


def data_parallel(repeats: int, hidden: int) -> dict:
    """The data-parallel row and the overhead, from every rank of a two-process launch."""
    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    half = DP_BATCH // world
    rows, everyone = slice(rank * half, (rank + 1) * half), slice(0, DP_BATCH)
    w, tiny = dp_workload(hidden), dp_workload(2, features=2)
    runs = interleaved(
        {
            "two": lambda: dp_call(w, rows, group),
            "solo": lambda: dp_call(w, rows, None),
            "alone": lambda: dp_call(w, everyone, None),
        },
        rank,
        repeats,
    )
    over = interleaved(
        {
            f"{who}{k}": functools.partial(dp_call, tiny, r, g, k)
            for who, g, r in (("two", group, rows), ("alone", None, everyone))
            for k in (1, 11)
        },
        rank,
        3 * repeats,
    )
    with Counter() as counter:
        dp_call(w, rows, group)
    if rank != 0:  # rank 0 alone timed the baseline
        return {}
    med = {n: statistics.median(t for t, _ in ts) for n, ts in {**runs, **over}.items() if ts}
    cpu = {n: statistics.median(c for _, c in ts) for n, ts in runs.items() if ts}
    per_step = ((med["two11"] - med["two1"]) - (med["alone11"] - med["alone1"])) / 10
    return {
        "params": sum(p.numel() for p in w["model"].parameters()),
        "two_processes_s": med["two"],
        "one_process_interleaved_s": med["alone"],
        "speedup": med["alone"] / med["two"],
        "no_group_at_once_s": med["solo"],
        "ceiling": med["alone"] / med["solo"],
        "cpu_s_per_rank": [cpu["alone"], cpu["two"]],
        "bytes_per_step_per_rank": counter.bytes / DP_STEPS,
        "collectives_per_call": counter.calls,
        "overhead_per_step_s": per_step,
        "overhead_per_call_s": (med["two1"] - med["alone1"]) - per_step,
    }


def worker(sizes: list[int], repeats: int, hidden: int) -> dict:
    """One rank: time the call at every C; rank 0 returns the rows."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    if os.environ.get("PIN", "1") == "1":  # this (compute) thread on a core of its own
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    group = dist.group.WORLD
    rows_out = {}
    for clients in sizes:
        w = workload(clients)
        share = clients // world
        rows = slice(rank * share, clients if rank == world - 1 else (rank + 1) * share)
        fns = {"process group": functools.partial(call, w, rows, group)}
        if world == 1:
            fns["none"] = functools.partial(call, w, rows, None)
        else:  # every rank its share with no group, at once; rank 0 alone with all C
            fns["solo"] = functools.partial(call, w, rows, None)
            fns["alone"] = functools.partial(call, w, slice(0, clients), None)
        runs = interleaved(fns, rank, FEDERATED_REPEATS * repeats)
        with Counter() as counter:
            grad = call(w, rows, group)
        rows_out[clients] = {
            "seconds": {n: statistics.median(t for t, _ in ts) for n, ts in runs.items() if ts},
            "cpu_seconds": {n: statistics.median(c for _, c in ts) for n, ts in runs.items() if ts},
            "bytes_per_round": counter.bytes / ROUNDS,
            "collectives_per_call": counter.calls,
            "grad_norm": float(grad.norm()),
        }
    if world > 1:
        rows_out["data_parallel"] = data_parallel(repeats, hidden)
    dist.barrier()  # every rank done before any tears the group down
    dist.destroy_process_group()
    return rows_out if rank == 0 else {}


def launch(world: int, sizes: list[int], repeats: int, hidden: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = [sys.executable, __file__, "--worker", ",".join(map(str, sizes)), str(repeats),
            str(hidden)]  # fmt: skip
    procs = [
        subprocess.Popen(args, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a rank failed: {[p.returncode for p in procs]}")
    rows = json.loads(outs[0].strip().splitlines()[-1])
    return {(c if c == "data_parallel" else int(c)): row for c, row in rows.items()}


def main(sizes: list[int], repeats: int, write: bool, hidden: int = DP_HIDDEN) -> None:
    """The federated rows for ``sizes`` (none: the data-parallel row alone) and the data-parallel
    row (an MLP of width ``hidden``)."""
    one = launch(1, sizes, repeats, hidden) if sizes else {}
    two = launch(2, sizes, repeats, hidden)
    table = []
    print(f"{'C':>5} {'1 proc':>9} {'1 proc, no group':>17} {'1 proc, interleaved':>20} "
          f"{'2 procs':>9} {'speed-up':>9} {'ceiling':>8} "
          f"{'KiB/round/rank (2 procs)':>25} {'collectives/call':>17} "
          f"{'CPU s/rank (1 -> 2)':>20}")  # fmt: skip
    for c in sizes:
        t1, t0 = one[c]["seconds"]["process group"], one[c]["seconds"]["none"]
        t2, alone = two[c]["seconds"]["process group"], two[c]["seconds"]["alone"]
        solo = two[c]["seconds"]["solo"]
        row = {
            "clients": c,
            "one_process_s": t1,
            "one_process_no_group_s": t0,
            "one_process_interleaved_s": alone,
            "two_processes_s": t2,
            "speedup": alone / t2,
            "speedup_separate_launches": t1 / t2,
            "no_group_at_once_s": solo,
            "ceiling": alone / solo,
            "cpu_s_per_rank": [
                one[c]["cpu_seconds"]["process group"],
                two[c]["cpu_seconds"]["process group"],
            ],
            "bytes_per_round_per_rank": two[c]["bytes_per_round"],
            "collectives_per_call": two[c]["collectives_per_call"],
            "grad_norms": [one[c]["grad_norm"], two[c]["grad_norm"]],
        }
        table.append(row)
        print(f"{c:>5} {t1:>8.3f}s {t0:>16.3f}s {alone:>19.3f}s {t2:>8.3f}s {alone / t2:>8.2f}x {alone / solo:>7.2f}x "
              f"{row['bytes_per_round_per_rank'] / 1024:>25.1f} {row['collectives_per_call']:>17} "
              f"{row['cpu_s_per_rank'][0]:>9.3f} -> {row['cpu_s_per_rank'][1]:.3f}")  # fmt: skip
    dp = two["data_parallel"]
    print(
        f"data parallel, {dp['params']} params, K = {DP_STEPS}, reverse: 1 process "
        f"{dp['one_process_interleaved_s']:.3f}s, 2 processes {dp['two_processes_s']:.3f}s, "
        f"speed-up {dp['speedup']:.2f}x (no group, both at once: {dp['ceiling']:.2f}x); CPU s/rank {dp['cpu_s_per_rank'][0]:.3f} -> "
        f"{dp['cpu_s_per_rank'][1]:.3f}; {dp['bytes_per_step_per_rank'] / 1024:.1f} KiB per "
        f"step per rank, {dp['collectives_per_call']} collectives per call; overhead "
        f"{dp['overhead_per_step_s'] * 1e3:.2f} ms per step, "
        f"{dp['overhead_per_call_s'] * 1e3:.2f} ms per call"
    )
    if write:
        out = {
            "command": "python benchmarks/distributed.py",
            "rounds": ROUNDS,
            "threads_per_process": 1,
            "compute_thread_pinned": os.environ.get("PIN", "1") == "1",
            "data_parallel_hidden": hidden,
            "torch": torch.__version__,
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "rows": table,
            "data_parallel": dp,
        }
        with open(os.path.join(HERE, "results", "distributed.json"), "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sizes = [int(c) for c in sys.argv[2].split(",") if c]
        result = worker(sizes, int(sys.argv[3]), int(sys.argv[4]))
        print(json.dumps(result))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--repeats", type=int, default=5)
        parser.add_argument("--quick", action="store_true", help="C = 8, one repeat, no file")
        parser.add_argument(
            "--data-parallel", action="store_true", help="the data-parallel row only, no file"
        )
        parser.add_argument(
            "--hidden", type=int, default=DP_HIDDEN, help="the data-parallel MLP's width"
        )
        a = parser.parse_args()
        if a.quick:
            main([8], 1, write=False, hidden=32)
        elif a.data_parallel:
            main([], a.repeats, write=False, hidden=a.hidden)
        else:
            main([64, 256], a.repeats, write=True, hidden=a.hidden)

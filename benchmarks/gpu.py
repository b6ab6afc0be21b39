"""Benchmarks on a CUDA device: unroll time, Checkpointed memory, hg.clients vs a loop.

Three parts, each a ratio against a baseline timed in the same run (wall clock after
``torch.cuda.synchronize()``, the variants timed in turns, medians of ``--repeats`` rounds, at
most 3 in (b) and (c); ``benchmarks/_timing.py``):

(a) ``unroll``: the reverse hypergradient (``hg.hypergrad``) of a validation loss with respect
    to an L2 coefficient, through K steps of SGD or Adam, for the MLP 784-256-256-10 at batch
    128, K in {20, 100}, against the same K plain ``torch.optim`` training steps and against a
    hand-written ``torch.autograd.grad(create_graph=True)`` unroll. The model, data and both
    baselines are ``benchmarks/unroll.py``'s, moved to the device.
(b) ``memory``: peak CUDA memory (``torch.cuda.max_memory_allocated`` above what was allocated
    before the call) of ``hg.Checkpointed(sqrt K)`` and ``"forward"`` against ``"reverse"``, K
    from 100 to 1000, MLP 100-128-10 at batch 32 with SGD (``unroll.py``'s ``run_hg``), and the
    time of Checkpointed against reverse at the largest K.
(c) ``clients``: ``hg.clients.hypergrad`` (vmap; by chunks of 32 clients where C > 32) against a
    Python loop over clients with hand-written autograd and the plain ``torch.func`` prototype,
    at C in {32, 128, 512} (``benchmarks/clients.py``'s workload and runners, on the device).
    Each runner's result is checked against the loop before it is timed.

The compiled path is measured by ``benchmarks/compile.py --devices cuda`` (``benchmarks/gpu.sh``
runs both). ``--budget S`` stops starting new rows after S seconds (the skipped rows are listed
in the JSON), so a slow machine cannot overrun a time-limited session; the JSON is rewritten
after every row. It records the device, torch and CUDA versions, and each part's duration.

Run: ``python benchmarks/gpu.py --output gpu.json`` on a CUDA machine (about 1-2 minutes);
``--device cpu --quick`` is a smoke run of the same code with tiny sizes. Without CUDA and with
the default ``--device cuda`` it says so and exits (status 0, so ``make bench`` passes).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import clients as bench_clients  # benchmarks/clients.py: the clients workload and runners
import torch
import unroll as bench_unroll  # benchmarks/unroll.py: the MLP, the data and the baselines
from _timing import interleaved_medians
from torch import nn

import hypergrad as hg

RESULTS = Path(__file__).resolve().parent / "results"


class Budget:
    """Wall-clock budget: ``left()`` seconds remain; rows that do not fit are recorded as skipped."""

    def __init__(self, seconds: float | None) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, what: str, needs: float = 0.0) -> bool:
        if self.left() > needs:
            return True
        self.skipped.append(what)
        print(f"  (skipped, out of budget: {what}; {self.left():.0f} s left, needs ~{needs:.0f})")
        return False


def make_clock(device: torch.device):
    if device.type == "cuda":

        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return clock
    return time.perf_counter


def to(tensors, device):
    return [t.to(device) for t in tensors]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = max(float(b.abs().max()), 1e-30)
    return float((a - b).abs().max()) / scale


# ----------------------------------------------------------------------------- (a) unroll time


def part_unroll(device, ks, batch, repeats, budget, clock, rows, save) -> None:
    print(f"\n(a) reverse hypergradient vs plain torch.optim and a hand-written unroll: MLP "
          f"784-256-256-10, batch {batch}; median ms (ratio to plain)")  # fmt: skip
    print(f"{'opt':>4} {'K':>4} {'plain ms':>9} {'hg reverse':>18} {'hand-written':>18} "
          f"{'hg/hand':>8} {'rel diff':>9}")  # fmt: skip
    for family in ("sgd", "adam"):
        for k in ks:
            if not budget.allows(f"unroll {family} K={k}", needs=5.0):
                continue
            torch.manual_seed(0)
            model = bench_unroll.mlp().to(device)
            x, y, vx, vy = to(bench_unroll.data(k, batch, 784), device)
            aux = torch.tensor(1e-4, device=device)
            args = (model, family, x, y, vx, vy, aux)
            # the same model state for both hypergradients (run_plain trains it in place)
            diff = rel_diff(bench_unroll.run_hg(*args), bench_unroll.run_hand(*args))
            fns = {
                "plain": functools.partial(bench_unroll.run_plain, *args),
                "hg_reverse": functools.partial(bench_unroll.run_hg, *args),
                "hand_written": functools.partial(bench_unroll.run_hand, *args),
            }
            times = interleaved_medians(fns, repeats, clock=clock)
            plain = times["plain"]
            row = {"opt": family, "K": k, "batch": batch, "seconds": times,
                   "hg_over_plain": times["hg_reverse"] / plain,
                   "hand_over_plain": times["hand_written"] / plain,
                   "hg_over_hand": times["hg_reverse"] / times["hand_written"],
                   "hg_vs_hand_rel_diff": diff}  # fmt: skip
            rows.append(row)
            save()
            print(f"{family:>4} {k:>4} {plain * 1e3:>9.2f} "
                  f"{times['hg_reverse'] * 1e3:>9.2f} ({row['hg_over_plain']:>4.2f}x) "
                  f"{times['hand_written'] * 1e3:>9.2f} ({row['hand_over_plain']:>4.2f}x) "
                  f"{row['hg_over_hand']:>7.2f}x {diff:>9.1e}", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- (b) memory


def small_mlp() -> nn.Module:
    """unroll.py's memory workload model (MLP 100-128-10)."""
    return nn.Sequential(nn.Linear(100, 128), nn.Tanh(), nn.Linear(128, 10))


def peak_bytes(fn, device) -> int | None:
    """Peak CUDA bytes allocated by ``fn()`` above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def part_memory(device, ks, repeats, budget, clock, rows, save) -> None:
    print("\n(b) peak CUDA memory above the inputs (MiB) / wall time (s): MLP 100-128-10, "
          "batch 32, SGD")  # fmt: skip
    names = ("reverse", "checkpointed", "forward")
    print(f"{'K':>5} " + " ".join(f"{n:>22}" for n in names) + f" {'ckpt/rev mem':>13}")
    for k in ks:
        if not budget.allows(f"memory K={k}", needs=2.0 + 0.02 * k):
            continue
        torch.manual_seed(0)
        model = small_mlp().to(device)
        x, y, vx, vy = to(bench_unroll.data(k, 32, 100), device)
        aux = torch.tensor(1e-3, device=device)
        s = max(1, round(math.sqrt(k)))
        methods = {"reverse": "reverse", "checkpointed": hg.Checkpointed(s), "forward": "forward"}
        args = (model, "sgd", x, y, vx, vy, aux)
        run = {
            n: functools.partial(bench_unroll.run_hg, *args, method=m) for n, m in methods.items()
        }
        for m in methods.values():  # warm-up: lazy initialisation, kernels
            bench_unroll.run_hg(model, "sgd", x[:5], y[:5], vx, vy, aux, method=m)
        row: dict[str, Any] = {"K": k, "checkpoint_every": s, "peak_mib": {}, "seconds": {}}
        want = None
        for name, fn in run.items():
            start = clock()
            out: list[torch.Tensor] = []
            peak = peak_bytes(lambda fn=fn, out=out: out.append(fn()), device)
            row["seconds"][name] = clock() - start
            row["peak_mib"][name] = None if peak is None else peak / 2**20
            want = out[0] if want is None else want
            row.setdefault("rel_diff_vs_reverse", {})[name] = rel_diff(out[0], want)
        mem = row["peak_mib"]
        if mem["reverse"]:
            row["checkpointed_over_reverse_memory"] = mem["checkpointed"] / mem["reverse"]
            row["forward_over_reverse_memory"] = mem["forward"] / mem["reverse"]
        rows.append(row)
        save()
        cells = [
            f"{'n/a' if mem[n] is None else f'{mem[n]:.1f}':>10} / {row['seconds'][n]:>8.3f}"
            for n in names
        ]
        ratio = row.get("checkpointed_over_reverse_memory")
        print(f"{k:>5} " + " ".join(f"{c:>22}" for c in cells)
              + f" {'n/a' if ratio is None else f'{ratio:.3f}x':>13}", flush=True)  # fmt: skip
    if rows:
        last = rows[-1]
        k = last["K"]
        reverse_s = last["seconds"]["reverse"]
        if budget.allows(f"checkpointed time at K={k}", needs=2 * repeats * 3 * reverse_s):
            torch.manual_seed(0)
            model = small_mlp().to(device)
            x, y, vx, vy = to(bench_unroll.data(k, 32, 100), device)
            aux = torch.tensor(1e-3, device=device)
            args = (model, "sgd", x, y, vx, vy, aux)
            fns = {
                "reverse": functools.partial(bench_unroll.run_hg, *args),
                "checkpointed": functools.partial(
                    bench_unroll.run_hg, *args, method=hg.Checkpointed(last["checkpoint_every"])
                ),
            }
            times = interleaved_medians(fns, repeats, clock=clock, warm_up=False)
            last["time_check"] = {
                "seconds": times,
                "checkpointed_over_reverse_time": times["checkpointed"] / times["reverse"],
            }
            print(f"time at K={k} (interleaved, median of {repeats}): checkpointed / reverse "
                  f"{last['time_check']['checkpointed_over_reverse_time']:.2f}x")  # fmt: skip


# ----------------------------------------------------------------------------- (c) clients


def client_workload(clients: int, device) -> dict[str, Any]:
    """clients.py's workload on ``device`` (its losses close over the modules, moved in place)."""
    w = bench_clients.workload(clients)
    w["model"].to(device)
    w["aux_model"].to(device)
    w["x"], w["y"] = w["x"].to(device), w["y"].to(device)
    w["val"] = tuple(to(w["val"], device))
    return w


def part_clients(device, sizes, repeats, budget, clock, rows, save, failures) -> None:
    chunk = bench_clients.CHUNK
    print(f"\n(c) hg.clients.hypergrad (vmap) vs a Python loop over clients: MLP "
          f"{bench_clients.DIM}-{bench_clients.WIDTH}-{bench_clients.WIDTH}-1, K = "
          f"{bench_clients.K} SGD steps, batch {bench_clients.BATCH}; median s (loop / runner)")  # fmt: skip
    loop_per_client = None  # seconds per client of one loop run, from the last row
    for c in sizes:
        # the loop dominates: the check run, then `repeats` timed runs
        needs = 0.0 if loop_per_client is None else (1 + repeats) * loop_per_client * c * 1.3
        if not budget.allows(f"clients C={c}", needs=needs):
            continue
        w = client_workload(c, device)
        runners = {
            "vmap": bench_clients.run_vmap,
            "loop": bench_clients.run_loop,
            "torch.func prototype": bench_clients.run_func_prototype,
        }
        if c > chunk:
            runners[f"vmap chunk_size={chunk}"] = bench_clients.run_vmap_chunked
        start = clock()
        reference = bench_clients.run_loop(w)
        loop_per_client = (clock() - start) / c
        diffs = {}
        for name, fn in runners.items():
            if name == "loop":
                continue
            got = fn(w)  # also the warm-up
            diffs[name] = rel_diff(got, reference)
            try:
                torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6)
            except AssertionError as error:
                failures.append(f"clients C={c}: {name} differs from the loop: {error}")
                print(f"  MISMATCH: {name} vs loop at C={c}: {error}")
        times = interleaved_medians(
            {n: functools.partial(fn, w) for n, fn in runners.items()},
            repeats,
            clock=clock,
            warm_up=False,
        )
        loop = times["loop"]
        row = {
            "clients": c,
            "seconds": times,
            "speedup_over_loop": {n: loop / t for n, t in times.items() if n != "loop"},
            "rel_diff_vs_loop": diffs,
        }
        if device.type == "cuda":
            row["peak_mib_vmap"] = peak_bytes(lambda w=w: bench_clients.run_vmap(w), device) / 2**20
            if c > chunk:
                row[f"peak_mib_chunk_size={chunk}"] = (
                    peak_bytes(lambda w=w: bench_clients.run_vmap_chunked(w), device) / 2**20
                )
        rows.append(row)
        save()
        speed = "  ".join(f"{n} {x:6.1f}x" for n, x in row["speedup_over_loop"].items())
        print(f"C={c:4d}  loop {loop:7.3f}s  vmap {times['vmap']:7.4f}s  speed-up: {speed}",
              flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- main


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hypergrad": getattr(hg, "__version__", None),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
        )
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds ((b), (c): <= 3)")
    parser.add_argument("--budget", type=float, default=None, help="seconds; then rows are skipped")
    parser.add_argument("--parts", default="unroll,memory,clients", help="comma-separated")
    parser.add_argument("--output", default=str(RESULTS / "gpu.json"), help="the JSON to write")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA device here (torch {torch.__version__}, "
              "torch.cuda.is_available() is False); nothing measured. Run it on a GPU "
              "machine, or `--device cpu --quick` for a smoke run.")  # fmt: skip
        return 0
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"unroll", "memory", "clients"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from unroll, memory, clients")
    if args.quick:
        sizes = {"unroll": ([3], 16), "memory": [10, 20], "clients": [4, 8]}
        repeats = 1
    else:
        sizes = {"unroll": ([20, 100], 128), "memory": [100, 300, 1000], "clients": [32, 128, 512]}
        repeats = args.repeats
    budget = Budget(args.budget)
    clock = make_clock(device)
    out = Path(args.output)
    failures: list[str] = []
    payload: dict[str, Any] = {
        "benchmark": "gpu",
        "info": device_info(device),
        "quick": args.quick,
        "repeats": {"unroll": repeats, "memory": min(repeats, 3), "clients": min(repeats, 3)},
        "budget_s": args.budget,
        "timing": "wall clock (CUDA: after torch.cuda.synchronize), variants timed in turns, "
        "median of the repeats",
        "parts": {},
    }
    info = payload["info"]
    print(f"{info['device_name']} ({device}), torch {info['torch']}, CUDA {info.get('cuda')}, "
          f"python {info['python']}, {repeats} repeat(s)"
          + (f", budget {args.budget:.0f} s" if args.budget else ""))  # fmt: skip
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes (e.g. TF32) must not clutter the table
        for part in parts:
            start = time.perf_counter()
            record: dict[str, Any] = {"seconds": None, "rows": []}
            payload["parts"][part] = record

            def save(record=record, start=start) -> None:  # after every row: a timeout keeps it
                record["seconds"] = time.perf_counter() - start
                payload["skipped"] = budget.skipped
                payload["failures"] = failures
                payload["total_s"] = time.perf_counter() - started
                write(out, payload)

            common = (budget, clock, record["rows"], save)
            if part == "unroll":
                ks, batch = sizes["unroll"]
                part_unroll(device, ks, batch, repeats, *common)
            elif part == "memory":
                part_memory(device, sizes["memory"], min(repeats, 3), *common)
            else:
                part_clients(device, sizes["clients"], min(repeats, 3), *common, failures)
            save()
    summary = summarise(payload)
    payload["summary"] = summary
    payload["total_s"] = time.perf_counter() - started
    write(out, payload)
    took = ", ".join(f"{p} {v['seconds']:.1f} s" for p, v in payload["parts"].items())
    print(f"\nparts: {took}; total {payload['total_s']:.1f} s")
    if budget.skipped:
        print(f"skipped (budget): {budget.skipped}")
    print(f"wrote {out}")
    if failures:
        print("FAILED checks:\n  " + "\n  ".join(failures))
        return 1
    return 0


def summarise(payload: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios (the same quantities as docs/benchmarks.md's CPU rows)."""
    parts, summary = payload["parts"], {}
    rows = parts.get("unroll", {}).get("rows", [])
    if rows:
        summary["hg_over_plain"] = {f"{r['opt']} K={r['K']}": r["hg_over_plain"] for r in rows}
        summary["hg_over_hand_written"] = {
            f"{r['opt']} K={r['K']}": r["hg_over_hand"] for r in rows
        }
    rows = parts.get("memory", {}).get("rows", [])
    if rows:
        last = rows[-1]
        summary[f"checkpointed_over_reverse_memory_K{last['K']}"] = last.get(
            "checkpointed_over_reverse_memory"
        )
        if "time_check" in last:
            summary[f"checkpointed_over_reverse_time_K{last['K']}"] = last["time_check"][
                "checkpointed_over_reverse_time"
            ]
        summary["forward_peak_mib_by_K"] = {r["K"]: r["peak_mib"]["forward"] for r in rows}
    rows = parts.get("clients", {}).get("rows", [])
    if rows:
        summary["vmap_speedup_over_loop"] = {
            r["clients"]: r["speedup_over_loop"]["vmap"] for r in rows
        }
    print("\nsummary: " + json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main())

"""Compiled vs eager hypergradient: ``hg.hypergrad(..., compile=True)`` against ``compile=False``.

The hypergradient of a validation loss with respect to per-example weights of the training loss
(``aux``) and the learning rate, through K = 20 steps of SGD (momentum 0.9) or Adam, method
``"reverse"``, for two models:

- ``mlp64``: MLP 16-64-64-1 (tanh), regression, batch 32;
- ``mlp784``: MLP 784-256-256-10 (ReLU), cross-entropy, batch 64.

For each case, in the same run: the eager time (the default ``compile=False``; its inner gradient
is ``torch.autograd.grad``, the faster eager route), the compiled time (``compile=True``: S
steps per graph, S chosen from K, 5 for K = 20), the compiled time with one step per graph
(``hg.Compile(steps_per_graph=1)``), and the eager time of the same ``torch.func`` step that is
compiled (``inner_grad="func"``), each the median of ``--repeats`` calls timed in turns after a
warm-up, and the ratios; the compile times are reported separately: the wall-clock time of the
first call of each compiled variant (tracing, inductor codegen, C++/Triton compile and one
run). The results are checked to agree (max relative difference).

On CPU, times are CPU time of this process (``time.process_time``) with one torch thread
(``--threads``), so that other processes on a shared machine do not distort the ratio; on CUDA
they are wall-clock times with ``torch.cuda.synchronize``. Inductor's on-disk caches are
disabled (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``, unless ``--warm-cache``) so the compile time
is a cold one.

Run: ``python benchmarks/compile.py`` (CPU, and CUDA when available; several minutes on 2 cores,
most of it compiling) or ``--quick`` (mlp64 only, fewer repeats). Writes
``benchmarks/results/compile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if "--warm-cache" not in sys.argv:  # must be set before torch._inductor reads its config
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch
import torch.nn.functional as F
from _timing import interleaved_medians
from torch import nn

import hypergrad as hg
from hypergrad._engine.compile import steps_per_graph

RESULTS = Path(__file__).resolve().parent / "results"
# torch notes that disabling the caches (our cold-compile measurement) disables its PGO too.
warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
K = 20
OPTIMIZERS = {
    "sgd": lambda: hg.optim.sgd(lr=0.05, momentum=0.9),
    "adam": lambda: hg.optim.adam(lr=1e-3),
}


def make_case(name: str, device: str) -> dict[str, Any]:
    """Model, losses and data of one benchmark model (the losses are built once per case)."""
    torch.manual_seed(0)
    if name == "mlp64":
        model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                              nn.Linear(64, 1))  # fmt: skip
        batch, x_shape = 32, (16,)
        y = torch.randn(K + 1, batch, 1)

        def task(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return ((out - target) ** 2).squeeze(-1)

    else:
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 10))  # fmt: skip
        batch, x_shape = 64, (784,)
        y = torch.randint(0, 10, (K + 1, batch))

        def task(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out, target, reduction="none")

    model = model.to(device)
    x = torch.randn(K + 1, batch, *x_shape).to(device)
    y = y.to(device)

    def inner(p, weights, b):
        return (weights * task(hg.call(model, p, b[0]), b[1])).mean()

    def outer(p, weights, b):
        return task(hg.call(model, p, b[0]), b[1]).mean()

    params, _ = hg.split(model)
    return {
        "inner": inner,
        "outer": outer,
        "params": params,
        "batches": (x[:K], y[:K]),
        "outer_batch": (x[K], y[K]),
        "aux": torch.ones(batch, device=device),
    }


def timer(device: str):
    if device == "cuda":

        def clock() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return clock
    return time.process_time


def run_case(model: str, opt_name: str, device: str, repeats: int) -> dict[str, Any]:
    case = make_case(model, device)
    opt = OPTIMIZERS[opt_name]()

    def hypergradient(compile: Any, inner_grad: str = "auto") -> hg.Hypergradient:
        return hg.hypergrad(case["outer"], case["inner"], case["params"], opt, case["batches"],
                            case["outer_batch"], aux=case["aux"], wrt=("aux", "lr"), seed=0,
                            compile=compile, inner_grad=inner_grad)  # fmt: skip

    def first_call_s(compile: Any) -> tuple[float, hg.Hypergradient]:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = hypergradient(compile)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    one_per_graph = hg.Compile(steps_per_graph=1)
    compile_s, compiled_result = first_call_s(True)
    compile_one_s, _ = first_call_s(one_per_graph)
    eager_result = hypergradient(False)
    times = interleaved_medians(
        {
            "eager": lambda: hypergradient(False),
            "compiled": lambda: hypergradient(True),
            "compiled_one": lambda: hypergradient(one_per_graph),
            "eager_func": lambda: hypergradient(False, "func"),
        },
        repeats,
        clock=timer(device),
    )
    scale = max(float(t.abs().max()) for t in (eager_result.aux, eager_result.hyperparams["lr"]))
    diff = max(
        float((a - b).abs().max())
        for a, b in ((compiled_result.aux, eager_result.aux),
                     (compiled_result.hyperparams["lr"], eager_result.hyperparams["lr"]))
    )  # fmt: skip
    return {
        "model": model,
        "optimizer": opt_name,
        "device": device,
        "K": K,
        "steps_per_graph": steps_per_graph(K, hg.Compile()),
        "eager_ms": 1e3 * times["eager"],
        "compiled_ms": 1e3 * times["compiled"],
        "speedup": times["eager"] / times["compiled"],
        "compiled_one_per_graph_ms": 1e3 * times["compiled_one"],
        "speedup_one_per_graph": times["eager"] / times["compiled_one"],
        "eager_func_ms": 1e3 * times["eager_func"],
        "speedup_vs_func": times["eager_func"] / times["compiled"],
        "compile_s": compile_s,
        "compile_one_per_graph_s": compile_one_s,
        "max_rel_diff": diff / scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="mlp64 only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda if present")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's disk caches")
    parser.add_argument("--output", default=str(RESULTS / "compile.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    models = ["mlp64"] if args.quick else ["mlp64", "mlp784"]
    repeats = 3 if args.quick else args.repeats
    rows = []
    header = (f"{'model':<8} {'opt':<5} {'device':<6} {'S':>2} {'eager ms':>9} "
              f"{'compiled ms':>12} {'speedup':>8} {'S=1 ms':>8} {'S=1 x':>6} "
              f"{'vs func':>8} {'compile s':>10} {'S=1 s':>6} {'rel diff':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for device in devices:
        for model in models:
            for opt_name in OPTIMIZERS:
                row = run_case(model, opt_name, device, repeats)
                rows.append(row)
                print(f"{model:<8} {opt_name:<5} {device:<6} {row['steps_per_graph']:>2} "
                      f"{row['eager_ms']:>9.2f} {row['compiled_ms']:>12.2f} "
                      f"{row['speedup']:>7.2f}x {row['compiled_one_per_graph_ms']:>8.2f} "
                      f"{row['speedup_one_per_graph']:>5.2f}x {row['speedup_vs_func']:>7.2f}x "
                      f"{row['compile_s']:>10.1f} {row['compile_one_per_graph_s']:>6.1f} "
                      f"{row['max_rel_diff']:>9.1e}", flush=True)  # fmt: skip
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cold_compile": "--warm-cache" not in sys.argv,
        "timing": "CPU: median process_time; CUDA: median wall-clock with synchronize; "
        "the variants timed in turns",
        "repeats": repeats,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

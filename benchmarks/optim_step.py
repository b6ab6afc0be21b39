"""One differentiable optimizer step (graph recorded) vs torch.optim's foreach step.

A model with 100 parameter tensors (50 Linear(width, width) layers). For each optimizer: the
median time of ``hg.optim.<name>.step`` on params that require grad and are the outputs of a
previous recorded step (so autograd records the graph, as inside an unrolled hypergradient),
against ``torch.optim.<Name>(foreach=True).step()``
(in place, no graph) on the same tensors. Prints a table and records it in
benchmarks/results/optim_step.json, one run per (width, layers, threads): running again at
another width adds a run, at the same width replaces it.

Usage: OMP_NUM_THREADS=1 python benchmarks/optim_step.py [--width 256] [--repeats 30] [--threads 1]

Where the time goes at large widths (memory-bound; default float hyperparameters, after step 1,
grads given as separate tensors) is printed with the table (NOTES): full-size passes over the
data and fresh full-size buffers per step, ours vs torch's in-place foreach step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import hypergrad as hg

CASES = {
    "sgd-momentum": (torch.optim.SGD, hg.optim.sgd, {"lr": 0.1, "momentum": 0.9}),
    "adam": (torch.optim.Adam, hg.optim.adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, hg.optim.adamw, {"lr": 1e-3}),
    "rmsprop": (torch.optim.RMSprop, hg.optim.rmsprop, {"lr": 1e-3}),
    "adagrad": (torch.optim.Adagrad, hg.optim.adagrad, {"lr": 1e-2}),
}


NOTES = [
    "sgd-momentum: torch foreach = 3 full-size passes (buf.mul_, buf.add_, param.add_), 0 new "
    "buffers; hypergrad = 4 passes (cat of the 100 grads, buf*momentum, add(alpha=1-dampening), "
    "add(alpha=-lr)), 4 new full-size buffers (flat grads, scaled buffer, new buffer, new "
    "params). The new buffer and params are the outputs of an out-of-place step; the scaled "
    "buffer is kept because the one-kernel forms (add(alpha=), addcmul) round differently "
    "(FMA); the cat is needed because the grads are separate tensors. At large widths the "
    "difference is memory traffic to the extra pass and the fresh buffers (minor page faults "
    "per step are measured: 0 on both sides here, the allocator reuses freed blocks), not "
    "Python; at small widths it is Python and autograd bookkeeping (100 split views).",
    "adam: torch foreach = 7 passes (lerp_, mul_, addcmul_, sqrt, div_, add_, addcdiv_), 1 new "
    "buffer; hypergrad = 11 passes (cat, lerp, mul, addcmul, 4 for the zero-safe sqrt: gt, "
    "threshold, sqrt, mask multiply; div, add, addcdiv), 10 new full-size buffers (+1 bool "
    "mask). Eager float lr/beta1: step size in Python floats and one addcdiv, as torch.",
    "Params and state buffers that are the previous step's outputs are used as one flat "
    "vector without a copy (views of one base); per-structure layout is cached.",
]


def median_times(fns, repeats: int) -> tuple[list[float], list[float]]:
    """Median seconds and median minor page faults of each function, timed interleaved (one
    call of each per round) so a burst of load from another process hits both sides alike."""
    for _ in range(3):  # warm-up
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    faults: list[list[int]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out, flt in zip(fns, times, faults):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
            flt.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return [statistics.median(t) for t in times], [statistics.median(f) for f in faults]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [s for _ in range(args.layers) for s in ((args.width, args.width), (args.width,))]
    values = {f"p{i}": torch.randn(s) for i, s in enumerate(shapes)}
    grads = {k: torch.randn_like(v) for k, v in values.items()}
    n_elements = sum(v.numel() for v in values.values())
    rows = []
    for name, (torch_cls, make, kwargs) in CASES.items():
        leaves = [v.clone() for v in values.values()]
        torch_opt = torch_cls(leaves, foreach=True, **kwargs)
        for p, g in zip(leaves, grads.values()):
            p.grad = g.clone()
        torch_opt.step()  # create the state

        def torch_step(torch_opt=torch_opt):
            torch_opt.step()

        opt = make(**kwargs)
        leaves0 = {k: v.clone().requires_grad_(True) for k, v in values.items()}
        # As inside an unroll: params and state are the outputs of a previous recorded step.
        params, state = opt.step(leaves0, grads, opt.init(leaves0))

        def hg_step(opt=opt, params=params, state=state):
            new_params, _ = opt.step(params, grads, state)
            assert new_params["p0"].requires_grad

        (t_torch, t_hg), (f_torch, f_hg) = median_times([torch_step, hg_step], args.repeats)
        rows.append(
            {
                "optimizer": name,
                "torch_foreach_ms": 1e3 * t_torch,
                "hypergrad_differentiable_ms": 1e3 * t_hg,
                "ratio": t_hg / t_torch,
                "torch_page_faults": f_torch,
                "hypergrad_page_faults": f_hg,
            }
        )
    print(
        f"{len(shapes)} parameter tensors, {n_elements:,} elements, float32, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} (interleaved)"
    )
    print(
        f"{'optimizer':<14}{'torch foreach ms':>18}{'hg differentiable ms':>22}{'ratio':>8}"
        f"{'page faults torch / hg':>26}"
    )
    for r in rows:
        print(
            f"{r['optimizer']:<14}{r['torch_foreach_ms']:>18.3f}"
            f"{r['hypergrad_differentiable_ms']:>22.3f}{r['ratio']:>8.2f}"
            f"{r['torch_page_faults']:>17.0f} / {r['hypergrad_page_faults']:<6.0f}"
        )
    for note in NOTES:
        print(f"- {note}")
    out = Path(__file__).parent / "results" / "optim_step.json"
    out.parent.mkdir(exist_ok=True)
    meta = {
        "width": args.width,
        "layers": args.layers,
        "n_tensors": len(shapes),
        "n_elements": n_elements,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    runs = []
    if out.exists():
        runs = json.loads(out.read_text()).get("runs", [])
    same = ("width", "layers", "threads")
    runs = [r for r in runs if any(r["meta"].get(k) != meta[k] for k in same)]
    runs.append({"meta": meta, "rows": rows})
    runs.sort(key=lambda r: (r["meta"]["threads"], r["meta"]["layers"], r["meta"]["width"]))
    out.write_text(json.dumps({"runs": runs, "notes": NOTES}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""One differentiable optimizer step (graph recorded) vs torch.optim's foreach step.

A model with 100 parameter tensors (50 Linear(width, width) layers). For each optimizer: the
median time of ``hg.optim.<name>.step`` on params that require grad and are the outputs of a
previous recorded step (so autograd records the graph, as inside an unrolled hypergradient),
against ``torch.optim.<Name>(foreach=True).step()``
(in place, no graph) on the same tensors. Prints a table and writes
benchmarks/results/optim_step.json.

Usage: python benchmarks/optim_step.py [--width 256] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
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


def median_time(fn, repeats: int) -> float:
    for _ in range(3):  # warm-up
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
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

        t_torch = median_time(torch_step, args.repeats)
        t_hg = median_time(hg_step, args.repeats)
        rows.append(
            {
                "optimizer": name,
                "torch_foreach_ms": 1e3 * t_torch,
                "hypergrad_differentiable_ms": 1e3 * t_hg,
                "ratio": t_hg / t_torch,
            }
        )
    print(
        f"{len(shapes)} parameter tensors, {n_elements:,} elements, float32, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'optimizer':<14}{'torch foreach ms':>18}{'hg differentiable ms':>22}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['optimizer']:<14}{r['torch_foreach_ms']:>18.3f}"
            f"{r['hypergrad_differentiable_ms']:>22.3f}{r['ratio']:>8.2f}"
        )
    out = Path(__file__).parent / "results" / "optim_step.json"
    out.parent.mkdir(exist_ok=True)
    meta = {
        "n_tensors": len(shapes),
        "n_elements": n_elements,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

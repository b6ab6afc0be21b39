"""Benchmark ``hg.Implicit``: hypergradient time against the plain training it follows, and memory.

The hypergradient of a validation loss with respect to an L2 coefficient ``aux`` of the inner
loss (``CE + aux * ||params||^2``) after K steps of SGD with momentum, for an MLP 784-256-256-10,
batch 128, synthetic data, K in {100, 1000}. Side by side in the same run, each time divided by
the time of the same K plain training steps with ``torch.optim`` (forward, backward, step):

- ``hg.Implicit("minres", maxiter=M)``: K steps of plain training inside the engine, then M
  MINRES iterations (Hessian-vector products) on the last batch and one vector-Jacobian
  product. An MLP trained on mini-batches is not at a stationary point and its Hessian is
  indefinite (CG would stop early on negative curvature, which would flatter the time), so
  MINRES runs all M iterations (printed) and warns (silenced here): this times the method, it
  does not claim an exact hypergradient for this problem. Its Hessian-vector products are double
  backwards through one recorded gradient graph (``hvp="reverse"``, the default); the row
  ``hvp=forward`` takes them with ``torch.func.jvp`` (forward-over-reverse) instead.
- ``hg.unroll``: the engine's plain training alone, which ``hg.Implicit`` runs first (with no
  graph to record, its optimizer writes into its vectors from the second step on, as
  ``torch.optim`` does; the rest of its overhead is the functional call and the flat update).
- ``"reverse"`` (up to ``--reverse-max-k``: its memory is linear in K) and
  ``hg.Checkpointed(sqrt K)``.
- ``torchopt``'s implicit differentiation (``torchopt.diff.implicit.custom_root`` with its CG
  solve, the same optimality condition and M) where torchopt is importable; skipped otherwise.

Memory: peak live bytes of glibc's allocator (``mallinfo2``: heap plus mmapped chunks; every
torch CPU allocation goes through malloc, which ``tracemalloc`` does not see), sampled every 5 ms
in a thread during one call, above the live bytes just before it.

Times are CPU time of the process (``time.process_time``) with one torch thread, interleaved
rounds, median of ``--repeats``, so other processes on a shared machine distort the ratios less.

Run: ``python benchmarks/implicit.py`` (K = 100 and 1000; several minutes on 2 cores) or
``--quick`` (K = 20 and 100). Writes ``benchmarks/results/implicit.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import math
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _timing import importable, interleaved_medians
from torch import nn

import hypergrad as hg

RESULTS = Path(__file__).resolve().parent / "results"
CLOCK = time.process_time
LR, MOMENTUM, AUX = 0.05, 0.9, 1e-4


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def data(steps: int, batch: int = 128, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, 784, generator=g)
    y = torch.randint(0, 10, (steps, batch), generator=g)
    return x, y, torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)


def l2(params: Any) -> torch.Tensor:
    return sum((p**2).sum() for p in params)


def run_plain(model: nn.Module, x, y, vx, vy) -> None:
    """K plain training steps with torch.optim: the baseline."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for k in range(x.shape[0]):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[k]), y[k]) + AUX * l2(model.parameters())
        loss.backward()
        opt.step()


def run_hg(model: nn.Module, x, y, vx, vy, method: Any) -> hg.Hypergradient:
    params, _ = hg.split(model)

    def inner(p, a, batch):
        return F.cross_entropy(hg.call(model, p, batch[0]), batch[1]) + a * l2(p.values())

    def outer(p, a, batch):
        return F.cross_entropy(hg.call(model, p, batch[0]), batch[1])

    opt = hg.optim.sgd(lr=LR, momentum=MOMENTUM)
    aux = torch.tensor(AUX)
    return hg.hypergrad(outer, inner, params, opt, (x, y), (vx, vy), aux=aux, method=method)


def run_unroll(model: nn.Module, x, y, vx, vy) -> None:
    """The engine's own plain training (``hg.unroll``): what ``hg.Implicit`` runs before solving."""
    params, _ = hg.split(model)

    def inner(p, a, batch):
        return F.cross_entropy(hg.call(model, p, batch[0]), batch[1]) + a * l2(p.values())

    opt = hg.optim.sgd(lr=LR, momentum=MOMENTUM)
    hg.unroll(inner, params, opt, (x, y), aux=torch.tensor(AUX))


def run_torchopt(model: nn.Module, x, y, vx, vy, maxiter: int) -> torch.Tensor:
    """torchopt's implicit differentiation: the same training, its CG on the same condition."""
    import torchopt

    names = [n for n, _ in model.named_parameters()]
    start = tuple(p.detach() for p in model.parameters())

    def inner(params, aux, xb, yb):
        out = torch.func.functional_call(model, dict(zip(names, params)), (xb,))
        return F.cross_entropy(out, yb) + aux * l2(params)

    def optimality(params, aux):  # torchopt differentiates it with torch.func (its examples')
        return torch.func.grad(lambda p: inner(p, aux, x[-1], y[-1]))(params)

    @torchopt.diff.implicit.custom_root(
        optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=maxiter)
    )
    def solve(params, aux):
        opt = torch.optim.SGD([p.clone().requires_grad_() for p in params], lr=LR,
                              momentum=MOMENTUM)  # fmt: skip
        current = opt.param_groups[0]["params"]
        with torch.enable_grad():  # custom_root runs this inside an autograd.Function's forward
            for k in range(x.shape[0]):
                opt.zero_grad(set_to_none=True)
                inner(current, aux.detach(), x[k], y[k]).backward()
                opt.step()
        return tuple(p.detach() for p in current)

    aux = torch.tensor(AUX, requires_grad=True)
    final = solve(start, aux)
    out = torch.func.functional_call(model, dict(zip(names, final)), (vx,))
    return torch.autograd.grad(F.cross_entropy(out, vy), aux)[0]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def _live_bytes_fn() -> Callable[[], int] | None:
    """glibc's bytes in use (heap + mmapped chunks), or None where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return lambda: libc.mallinfo2().uordblks + libc.mallinfo2().hblkhd


def peak_mb(fn: Callable[[], Any], live: Callable[[], int] | None) -> float:
    """Peak live malloc bytes during ``fn()`` above those before it, in MiB (nan: no mallinfo2)."""
    if live is None:
        fn()
        return math.nan
    gc.collect()
    before = peak = live()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, live())
            time.sleep(5e-3)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    return (max(peak, live()) - before) / 2**20


def contenders(k: int, maxiter: int, reverse_max_k: int) -> dict[str, Callable[..., Any]]:
    s = max(1, round(math.sqrt(k)))
    out: dict[str, Callable[..., Any]] = {
        "hg.unroll (no hypergradient)": run_unroll,
        f"implicit(minres, maxiter={maxiter})": lambda *a: run_hg(
            *a, hg.Implicit("minres", maxiter=maxiter, stationarity=math.inf)
        ),
        f"implicit(minres, maxiter={maxiter}, hvp=forward)": lambda *a: run_hg(
            *a, hg.Implicit("minres", maxiter=maxiter, stationarity=math.inf, hvp="forward")
        ),
        f"checkpointed({s})": lambda *a: run_hg(*a, hg.Checkpointed(s)),
    }
    if k <= reverse_max_k:
        out["reverse"] = lambda *a: run_hg(*a, "reverse")
    if importable("torchopt"):
        out[f"torchopt implicit(cg, maxiter={maxiter})"] = lambda *a: run_torchopt(*a, maxiter)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K = 20 and 100, one repeat")
    parser.add_argument("--ks", type=int, nargs="+", help="the K values (default 100 1000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--maxiter", type=int, default=10, help="CG iterations of Implicit")
    parser.add_argument("--reverse-max-k", type=int, default=100, help="largest K for reverse")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    ks = args.ks or ([20, 100] if args.quick else [100, 1000])
    repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    if not importable("torchopt"):
        print("(torchopt not importable: skipped)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU time, "
          f"MLP 784-256-256-10, batch 128, SGD momentum, median of {repeats}")  # fmt: skip
    live = _live_bytes_fn()
    rows = []
    for k in ks:
        torch.manual_seed(0)
        model = mlp()
        args_k = (model, *data(k))
        fns = {"plain": functools.partial(run_plain, *args_k)}
        for name, fn in contenders(k, args.maxiter, args.reverse_max_k).items():
            fns[name] = functools.partial(fn, *args_k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Implicit: not stationary (see the docstring)
            medians = interleaved_medians(fns, repeats, clock=CLOCK, warm_up=True)
            memory = {name: peak_mb(fn, live) for name, fn in fns.items()}
        plain = medians["plain"]
        row: dict[str, Any] = {"K": k, "plain_s": plain, "plain_peak_mb": memory["plain"]}
        print(f"\nK = {k}: plain training {plain:.2f} s, peak {memory['plain']:.1f} MiB")
        print(f"  {'method':<44} {'time / plain':>12} {'seconds':>9} {'peak MiB':>9}")
        for name in fns:
            if name == "plain":
                continue
            row[name] = {"s": medians[name], "ratio": medians[name] / plain,
                         "peak_mb": memory[name]}  # fmt: skip
            if name.startswith("implicit"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row[name]["iterations"] = fns[name]().solver.iterations
            iterations = row[name].get("iterations")
            print(f"  {name:<44} {medians[name] / plain:>12.2f} {medians[name]:>9.2f} "
                  f"{memory[name]:>9.1f}" + (f"  ({iterations} products)" if iterations else ""),
                  flush=True)  # fmt: skip
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("implicit_quick.json" if args.quick else "implicit.json")
    payload = {"rows": rows, "torch": torch.__version__, "threads": args.threads,
               "clock": "process_time", "maxiter": args.maxiter, "repeats": repeats}  # fmt: skip
    out.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

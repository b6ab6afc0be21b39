"""Benchmark the unroll engine: hypergradient time vs plain training, and peak memory vs K.

Part 1 (time). The hypergradient of a validation loss with respect to an L2 coefficient ``aux``
of the inner loss (``CE + aux * ||params||^2``), through K steps of SGD or Adam, for an MLP
784-256-256-10, a small CNN and a small transformer (the 784 inputs read as 28 rows of 28
pixels; two encoder layers, d 64), batch 128, K in {5, 20, 100}. Each time is divided by the time
of the same K plain training steps with ``torch.optim`` (forward, backward, step; no
meta-graph), measured in the same run. Side by side: ``hg.hypergrad(method="reverse")``, a
hand-written ``torch.autograd.grad(create_graph=True)`` unroll, and ``higher`` / ``torchopt``
when they are importable; for the transformer also plain training with attention through its
math backend (``plain_math_attention``), the backend a hypergradient's steps use: its ratio is
what the math backend costs, and a table of one plain training step of an encoder layer at
sequence lengths 32, 128 and 512, fused kernel against math backend. Median of ``--repeats``
runs after one warm-up.

Part 2 (memory). Peak memory of each method vs K (up to 1000) on a small MLP (100-128-10,
batch 32, SGD with momentum). Each point runs in a fresh subprocess: a warm-up, then a run
during which a thread samples the live malloc bytes (every torch CPU allocation goes through
malloc; tracemalloc does not see them). At the largest K a separate subprocess times
``Checkpointed`` against ``"reverse"`` (interleaved, median of 3, no sampler).

Times are CPU time of the process (``time.process_time``) with one torch thread (``--threads``),
so that other processes on a shared machine do not distort the ratios; memory is the peak of
glibc's live allocated bytes (``mallinfo2``, sampled every 5 ms in a thread, plus the kernel's
peak RSS for reference: RSS also counts memory the allocator keeps after it is freed), above the
live bytes just before the run.

Run: ``python benchmarks/unroll.py`` (several minutes on 2 cores) or ``--quick`` (smoke);
``--models transformer --ks 5 20 --no-memory`` for the transformer rows alone.
Writes ``benchmarks/results/unroll.json`` (``unroll_partial.json`` for a partial run).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _timing import importable, interleaved_medians
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hypergrad as hg

RESULTS = Path(__file__).resolve().parent / "results"
LR = {"sgd": 0.05, "adam": 1e-3}
# CPU time of this process: with one torch thread (the default) it is insensitive to other
# processes' load on a shared machine, which wall-clock time is not.
CLOCK = time.process_time


# ----------------------------------------------------------------------------- models and data


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.c2 = nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(8 * 5 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)
        x = F.max_pool2d(torch.tanh(self.c1(x)), 2)
        x = F.max_pool2d(torch.tanh(self.c2(x)), 2)
        return self.fc(x.flatten(1))


class RowTransformer(nn.Module):
    """A 784-vector read as 28 rows of 28 pixels: row embedding, learned positions, two
    pre-norm encoder layers (d 64, 4 heads, no dropout), mean over rows, linear head."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(28, d)
        self.position = nn.Parameter(0.02 * torch.randn(28, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x.view(-1, 28, 28)) + self.position)
        return self.head(self.norm(h).mean(1))


MODELS = {"mlp": mlp, "cnn": SmallCNN, "transformer": RowTransformer}


def data(steps: int, batch: int, features: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, features, generator=g)
    y = torch.randint(0, 10, (steps, batch), generator=g)
    vx = torch.randn(batch, features, generator=g)
    vy = torch.randint(0, 10, (batch,), generator=g)
    return x, y, vx, vy


def l2(params: Any) -> torch.Tensor:
    return sum((p**2).sum() for p in params)


# ----------------------------------------------------------------------------- contenders


def run_plain(model: nn.Module, family: str, x, y, vx, vy, aux) -> None:
    """K plain training steps with torch.optim: the baseline."""
    opt_cls = torch.optim.SGD if family == "sgd" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=LR[family])
    a = aux.detach()
    for k in range(x.shape[0]):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[k]), y[k]) + a * l2(model.parameters())
        loss.backward()
        opt.step()


@sdpa_kernel([SDPBackend.MATH])
def run_plain_math(model: nn.Module, family: str, x, y, vx, vy, aux) -> None:
    """The baseline with attention through its math backend, as a hypergradient runs it."""
    run_plain(model, family, x, y, vx, vy, aux)


def run_hg(model: nn.Module, family: str, x, y, vx, vy, aux, method="reverse") -> torch.Tensor:
    params, _ = hg.split(model)
    opt = hg.optim.sgd(lr=LR[family]) if family == "sgd" else hg.optim.adam(lr=LR[family])

    def inner(p, a, batch):
        return F.cross_entropy(hg.call(model, p, batch[0]), batch[1]) + a * l2(p.values())

    def outer(p, a, batch):
        return F.cross_entropy(hg.call(model, p, batch[0]), batch[1])

    return hg.hypergrad(outer, inner, params, opt, (x, y), (vx, vy), aux=aux, method=method).aux


# attention's fused kernels have no double backward: the other contenders need its math backend
# too (for the MLP and the CNN it changes nothing)
@sdpa_kernel([SDPBackend.MATH])
def run_hand(model: nn.Module, family: str, x, y, vx, vy, aux) -> torch.Tensor:
    """The hand-written unroll: autograd.grad(create_graph=True) and the update rule inline."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    a = aux.detach().requires_grad_()
    lr, b1, b2, eps = LR[family], 0.9, 0.999, 1e-8
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for k in range(x.shape[0]):
        out = torch.func.functional_call(model, dict(zip(names, params)), (x[k],))
        loss = F.cross_entropy(out, y[k]) + a * l2(params)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        if family == "sgd":
            params = [p - lr * g for p, g in zip(params, grads)]
        else:
            t = k + 1
            m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads)]
            v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grads)]
            c1, c2 = 1 - b1**t, math.sqrt(1 - b2**t)
            params = [
                p - (lr / c1) * mi / (vi.sqrt() / c2 + eps) for p, mi, vi in zip(params, m, v)
            ]
    out = torch.func.functional_call(model, dict(zip(names, params)), (vx,))
    (g,) = torch.autograd.grad(F.cross_entropy(out, vy), a)
    return g


@sdpa_kernel([SDPBackend.MATH])
def run_higher(model: nn.Module, family: str, x, y, vx, vy, aux) -> torch.Tensor:
    import higher

    opt_cls = torch.optim.SGD if family == "sgd" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=LR[family])
    a = aux.detach().requires_grad_()
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for k in range(x.shape[0]):
            loss = F.cross_entropy(fmodel(x[k]), y[k]) + a * l2(fmodel.parameters())
            diffopt.step(loss)
        (g,) = torch.autograd.grad(F.cross_entropy(fmodel(vx), vy), a)
    return g


@sdpa_kernel([SDPBackend.MATH])
def run_torchopt(model: nn.Module, family: str, x, y, vx, vy, aux) -> torch.Tensor:
    import torchopt

    state = torchopt.extract_state_dict(model)
    meta = (torchopt.MetaSGD if family == "sgd" else torchopt.MetaAdam)(model, lr=LR[family])
    a = aux.detach().requires_grad_()
    try:
        for k in range(x.shape[0]):
            meta.step(F.cross_entropy(model(x[k]), y[k]) + a * l2(model.parameters()))
        (g,) = torch.autograd.grad(F.cross_entropy(model(vx), vy), a)
    finally:
        torchopt.recover_state_dict(model, state)
    return g


def time_table(ks: list[int], repeats: int, models: list[str]) -> list[dict[str, Any]]:
    contenders = {"hg_reverse": run_hg, "hand_written": run_hand}
    for name, fn in (("higher", run_higher), ("torchopt", run_torchopt)):
        if importable(name):
            contenders[name] = fn
        else:
            print(f"({name} not importable: skipped)")
    if "transformer" in models:  # what the math backend costs plain training
        contenders["plain_math_attention"] = run_plain_math
    rows = []
    header = f"{'model':>5} {'opt':>4} {'K':>4} {'plain ms':>9} " + " ".join(
        f"{c + ' x':>14}" for c in contenders
    )
    print(header)
    for model_name in models:
        for family in ("sgd", "adam"):
            for k in ks:
                torch.manual_seed(0)
                model = MODELS[model_name]()
                x, y, vx, vy = data(k, 128, 784)
                aux = torch.tensor(1e-4)
                args = (model, family, x, y, vx, vy, aux)
                fns = {"plain": functools.partial(run_plain, *args)}
                for name, fn in contenders.items():
                    if fn is run_plain_math and model_name != "transformer":
                        continue
                    fns[name] = functools.partial(fn, *args)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # warm up once per (model, optimizer): later K reuse the same kernels
                    medians = interleaved_medians(fns, repeats, clock=CLOCK, warm_up=k == ks[0])
                plain = medians["plain"]
                row: dict[str, Any] = {"model": model_name, "opt": family, "K": k,
                                       "plain_s": plain}  # fmt: skip
                for name in fns:
                    row[f"{name}_s"] = medians[name]
                    row[f"{name}_ratio"] = medians[name] / plain
                rows.append(row)
                print(
                    f"{model_name[:5]:>5} {family:>4} {k:>4} {plain * 1e3:>9.1f} "
                    + " ".join(f"{row.get(c + '_ratio', math.nan):>14.2f}" for c in contenders),
                    flush=True,
                )
    return rows


def _encoder_step(length: int) -> Any:
    """One plain training step (forward, backward, Adam) of an encoder layer at length L."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    opt = torch.optim.Adam(layer.parameters())
    x = torch.randn(16, length, 64)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        opt.step()

    return step


def attention_table(lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    """A plain training step of an encoder layer (d 64, 4 heads, batch 16) at sequence length
    L: attention through torch's fused kernel, then through its math backend (what a
    hypergradient's steps use)."""
    print("\nplain training step of an encoder layer, math backend / fused kernel")
    print(f"{'L':>5} {'fused ms':>9} {'math ms':>9} {'math x':>7}")
    rows = []
    for length in lengths:
        step = _encoder_step(length)
        math_step = sdpa_kernel([SDPBackend.MATH])(step)
        medians = interleaved_medians({"fused": step, "math": math_step}, repeats, clock=CLOCK)
        row = {"L": length, "fused_s": medians["fused"], "math_s": medians["math"]}
        row["math_ratio"] = row["math_s"] / row["fused_s"]
        rows.append(row)
        print(f"{length:>5} {row['fused_s'] * 1e3:>9.1f} {row['math_s'] * 1e3:>9.1f} "
              f"{row['math_ratio']:>7.2f}", flush=True)  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- memory


def memory_methods(k: int) -> dict[str, Any]:
    s = max(1, round(math.sqrt(k)))
    return {
        "reverse": "reverse",
        f"checkpointed(sqrt K={s})": hg.Checkpointed(s),
        "truncated(10)": hg.Truncated(10),
        "forward": "forward",
        "first_order": "first_order",
    }


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def _live_bytes_fn():
    """glibc's bytes in use (heap + mmapped chunks), or None where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def live() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return live


class PeakSampler:
    """Sample live malloc bytes every ``interval`` seconds in a thread; keep the maximum."""

    def __init__(self, live, interval: float = 5e-3) -> None:
        self.live, self.interval, self.peak = live, interval, live()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.live())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.live())


def memory_child(method_name: str, k: int, timing: bool = False) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(100, 128), nn.Tanh(), nn.Linear(128, 10))
    x, y, vx, vy = data(k, 32, 100)
    aux = torch.tensor(1e-3)
    method = memory_methods(k)[method_name]
    params, _ = hg.split(model)
    opt = hg.optim.sgd(lr=0.05, momentum=0.9)

    def inner(p, a, batch):
        return F.cross_entropy(hg.call(model, p, batch[0]), batch[1]) + a * l2(p.values())

    def outer(p, a, batch):
        return F.cross_entropy(hg.call(model, p, batch[0]), batch[1])

    def run(steps: int, how: Any = method) -> None:
        hg.hypergrad(outer, inner, params, opt, (x[:steps], y[:steps]), (vx, vy), aux=aux,
                     method=how, steps=steps)  # fmt: skip

    run(min(k, 12))  # warm-up: lazy initialisation
    if timing:  # interleaved with "reverse", median of 3, no sampler thread
        reverse = memory_methods(k)["reverse"]
        fns = {"reverse": lambda: run(k, reverse), method_name: lambda: run(k)}
        print(json.dumps(interleaved_medians(fns, 3, clock=CLOCK, warm_up=False)))
        return
    live = _live_bytes_fn()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM)
    rss_before = _rss_kb("VmRSS")
    live_before = live() if live else 0
    start = CLOCK()
    if live:
        with PeakSampler(live) as sampler:
            run(k)
        peak_live = (sampler.peak - live_before) / 2**20
    else:
        run(k)
        peak_live = float("nan")
    seconds = CLOCK() - start
    rss = (_rss_kb("VmHWM") - rss_before) / 1024
    print(json.dumps({"peak_mb": peak_live, "rss_mb": rss, "seconds": seconds}))


def memory_table(ks: list[int]) -> list[dict[str, Any]]:
    rows = []
    names = list(memory_methods(ks[-1]))
    print("\npeak live memory above baseline (MB) / CPU time (s), MLP 100-128-10 b32, SGD momentum")
    print(f"{'K':>5} " + " ".join(f"{n.split('(')[0]:>22}" for n in names))
    for k in ks:
        row: dict[str, Any] = {"K": k}
        cells = []
        for name in memory_methods(k):
            result = _child(name, k)
            row[name] = result
            cells.append(f"{result['peak_mb']:>10.1f} / {result['seconds']:>8.2f}")
        rows.append(row)
        print(f"{k:>5} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    k = ks[-1]
    name = next(n for n in memory_methods(k) if n.startswith("checkpointed"))
    rows[-1]["time_check"] = _child(name, k, "--timing")
    print(f"time check at K={k} (interleaved, median of 3): {rows[-1]['time_check']}")
    return rows


def _child(name: str, k: int, *flags: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, str(k), *flags],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="the time table's models (default: all)")  # fmt: skip
    parser.add_argument("--ks", nargs="+", type=int, help="the time table's K (default 5 20 100)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--memory-child", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), timing=args.timing)
        return
    ks, mem_ks, repeats = (
        ([5], [10, 50], 1) if args.quick else ([5, 20, 100], [10, 100, 1000], args.repeats)
    )
    ks = args.ks or ks
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU time")
    print("time of one hypergradient / time of the same K plain torch.optim steps")
    rows = time_table(ks, repeats, args.models)
    attention = []
    if "transformer" in args.models:
        attention = attention_table([32] if args.quick else [32, 128, 512], max(repeats, 3))
    memory = [] if args.no_memory else memory_table(mem_ks)
    summary = summarise(rows, memory)
    RESULTS.mkdir(exist_ok=True)
    partial = args.no_memory or args.models != list(MODELS) or args.ks
    name = "unroll_quick" if args.quick else "unroll_partial" if partial else "unroll"
    out = RESULTS / f"{name}.json"
    payload = {"time": rows, "attention": attention, "memory": memory, "summary": summary,
               "torch": torch.__version__,
               "threads": args.threads, "clock": "process_time"}  # fmt: skip
    out.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out}")


def summarise(rows: list[dict[str, Any]], memory: list[dict[str, Any]]) -> dict[str, Any]:
    """Print and return the numbers the targets are stated in."""
    worst = max(r["hg_reverse_ratio"] for r in rows)
    vs_hand = [r["hg_reverse_s"] / r["hand_written_s"] for r in rows]
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        print(f"  {model}: reverse / plain {max(r['hg_reverse_ratio'] for r in mine):.2f}x "
              f"(worst), reverse / hand-written "
              f"{max(r['hg_reverse_s'] / r['hand_written_s'] for r in mine):.2f}x (worst)")  # fmt: skip
    if not memory:
        return {"reverse_over_plain_max": worst, "reverse_over_hand_written_max": max(vs_hand)}
    last, first = memory[-1], memory[0]
    ck = next(n for n in last if n.startswith("checkpointed"))
    summary = {
        "reverse_over_plain_max": worst,
        "reverse_over_hand_written_max": max(vs_hand),
        "reverse_over_hand_written_median": statistics.median(vs_hand),
        "checkpointed_memory_over_reverse": last[ck]["peak_mb"] / last["reverse"]["peak_mb"],
        "checkpointed_time_over_reverse": last["time_check"][ck] / last["time_check"]["reverse"],
        "forward_memory_mb_by_K": {m["K"]: m["forward"]["peak_mb"] for m in memory},
    }
    print("\nsummary (targets: reverse <= 2.0x plain and <= hand-written; checkpointed <= 0.2x")
    print("memory at <= 1.5x time at the largest K; forward memory flat in K)")
    print(f"  reverse / plain, worst case:             {worst:.2f}x")
    print(
        f"  reverse / hand-written, median (worst):  {summary['reverse_over_hand_written_median']:.2f} ({max(vs_hand):.2f})"
    )
    print(
        f"  checkpointed / reverse at K={last['K']}: memory {summary['checkpointed_memory_over_reverse']:.3f}x, time {summary['checkpointed_time_over_reverse']:.2f}x"
    )
    print(
        f"  forward peak MB by K: {summary['forward_memory_mb_by_K']} (K={first['K']}..{last['K']})"
    )
    return summary


if __name__ == "__main__":
    main()

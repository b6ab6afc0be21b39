"""Peak memory and time of every method against plain training, as K grows (issue 21).

Workloads:

- ``mlp``: an MLP 784-512-512-10, batch 128, AdamW; aux: one weight per class;
- ``gpt3m``: a GPT-like transformer (token embedding, learned positions, 4 pre-norm
  ``nn.TransformerEncoderLayer`` with a causal mask, d 256, 4 heads, no dropout, a head;
  3.3M parameters), sequences of 128 bytes, batch 16, AdamW; aux: one weight per data domain
  (4 domains, each sequence drawn from one);
- ``gpt05m``: the same shape with d 128, 2 layers, sequences of 64 (0.5M parameters).

Plain training is ``torch.optim.AdamW`` on the module for the same K steps (forward,
backward, step). Every (workload, method, K) runs in a fresh subprocess: set-up (model, data,
one tiny warm-up of torch.func and autograd so lazy initialisation is not counted), then the
measured call. Memory on the CPU is the peak resident set above the resident set after set-up
(the kernel's high-water mark, reset through ``/proc/self/clear_refs`` after set-up); on CUDA
``torch.cuda.max_memory_allocated`` above the memory allocated after set-up. Time is the CPU
time of the process (one torch thread) on the CPU, wall-clock time after a synchronize on
CUDA. Ratios divide by plain training at the same K, measured in the same run.

``--step`` measures one step's second-order backward four ways on ``gpt3m`` and ``mlp``
(reverse over reverse, forward over reverse with ``torch.func``, the dual-number forward with a
plain backward, and reverse over reverse by 2, 4 and 8 micro-batches): what
``_engine/backward.py`` chose from.

Times are measured for plain training and ``hg.Checkpointed(slots=4)`` (the targets) in a
second process each; the other rows report memory only.

Run: ``python benchmarks/memory.py`` (about an hour on 2 cores), ``--quick`` (a smoke run),
``--step`` (the step backward table only), ``--device cuda`` (the GPU script).
Writes ``benchmarks/results/memory[-cuda].json`` and ``memory[-cuda].png`` (log-log).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad._engine.backward import split_batch

RESULTS = Path(__file__).resolve().parent / "results"

# ----------------------------------------------------------------------------- workloads


class GPT(nn.Module):
    """Token embedding, learned positions, pre-norm encoder layers with a causal mask, head."""

    def __init__(self, d: int, layers: int, seq: int, vocab: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        mask = nn.Transformer.generate_square_subsequent_mask(seq)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


def workload(name: str, steps: int, device: str) -> dict[str, Any]:
    """Model, inner and outer losses, batches (a function of k), outer batch, aux."""
    torch.manual_seed(0)
    if name == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        batch, seq, groups = 128, 0, 10
    else:
        d, layers, seq = {
            "gpt3m": (256, 4, 128),
            "gpt05m": (128, 2, 64),
            "gpt100m": (768, 14, 256),
        }[name]
        model, batch, groups = GPT(d, layers, seq), 16, 4
    model = model.to(device)

    def data(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + k)
        group = torch.randint(0, groups, (batch,), generator=g)
        if seq == 0:
            x = torch.randn(batch, 784, generator=g)
            return x.to(device), group.to(device), group.to(device)
        tokens = torch.randint(0, 256, (batch, seq + 1), generator=g)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device), group.to(device)

    def per_example(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = hg.call(model, params, x) if params is not None else model(x)
        if seq == 0:
            return F.cross_entropy(out, y, reduction="none")
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)

    def inner(params: Any, w: torch.Tensor, b: Any) -> torch.Tensor:
        x, y, group = b
        return (w[group] * per_example(params, x, y)).mean()

    def outer(params: Any, w: torch.Tensor, b: Any) -> torch.Tensor:
        return per_example(params, b[0], b[1]).mean()

    return {"model": model, "inner": inner, "outer": outer, "data": data,
            "outer_batch": data(10**6), "aux": torch.ones(groups, device=device)}  # fmt: skip


METHODS = {
    "plain": None,
    "reverse": "reverse",
    "first_order": "first_order",
    "checkpointed_sqrtK": lambda k: hg.Checkpointed(max(1, round(math.sqrt(k)))),
    "checkpointed_1": lambda k: hg.Checkpointed(1),
    "slots4": lambda k: hg.Checkpointed(slots=4),
    "slots4_micro4": lambda k: hg.Checkpointed(slots=4, micro_batches=4),
    "slots4_micro8": lambda k: hg.Checkpointed(slots=4, micro_batches=8),
}


def run_one(name: str, method: str, steps: int, device: str) -> dict[str, Any]:
    """One configuration in this (fresh) process: peak memory above set-up, and time."""
    torch.set_num_threads(1)
    w = workload(name, steps, device)
    model, inner, data = w["model"], w["inner"], w["data"]
    warm_up()
    if method == "plain":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

        def call() -> None:
            for k in range(steps):
                opt.zero_grad(set_to_none=True)
                inner(dict(model.named_parameters()), w["aux"], data(k)).backward()
                opt.step()

    else:
        params, _ = hg.split(model)
        how = METHODS[method]
        how = how(steps) if callable(how) else how

        def call() -> None:
            hg.hypergrad(w["outer"], inner, params, hg.optim.adamw(lr=1e-3, weight_decay=0.01),
                         data, w["outer_batch"], aux=w["aux"], steps=steps, method=how,
                         seed=0)  # fmt: skip

    base = measure_start(device)
    start = time.perf_counter() if device == "cuda" else time.process_time()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() if device == "cuda" else time.process_time()) - start
    params_count = sum(p.numel() for p in model.parameters())
    return {"workload": name, "method": method, "K": steps, "peak_bytes": measure_peak(device, base),
            "seconds": seconds, "parameters": params_count}  # fmt: skip


def warm_up() -> None:
    """Lazy initialisation of autograd, torch.func and forward AD, outside the measurement."""
    m = nn.Linear(3, 2)
    p = dict(m.named_parameters())
    f = lambda q: (torch.func.functional_call(m, q, torch.ones(4, 3)) ** 2).sum()  # noqa: E731
    torch.func.jvp(torch.func.grad(f), (p,), ({k: torch.ones_like(t) for k, t in p.items()},))
    hg.hypergrad(lambda q, a, b: f(q), lambda q, a, b: f(q) * a, p, hg.optim.adamw(lr=0.1),
                 torch.zeros(2, 1), None, aux=torch.ones(()), method=hg.Checkpointed(slots=2))  # fmt: skip


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"{key}:\s+(\d+) kB", text)
    assert match is not None
    return int(match.group(1)) * 1024


def measure_start(device: str) -> int:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts here
    return _status("VmRSS")


def measure_peak(device: str, base: int) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return _status("VmHWM") - base


# ----------------------------------------------------------------------------- one step's backward

STEP_VARIANTS = ["train", "reverse_over_reverse", "forward_over_reverse", "dual_forward_backward",
                 "micro2", "micro4", "micro8"]  # fmt: skip


def step_one(name: str, variant: str, device: str) -> dict[str, Any]:
    """One step's second-order backward (or a plain training step), in this fresh process."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.set_num_threads(1)
    w = workload(name, 1, device)
    inner, batch, aux = w["inner"], w["data"](0), w["aux"]
    params, _ = hg.split(w["model"])
    v = {k: torch.randn_like(x) for k, x in params.items()}
    warm_up()

    def leaves() -> dict[str, torch.Tensor]:
        return {k: x.detach().requires_grad_() for k, x in params.items()}

    def second(p: dict[str, torch.Tensor], a: torch.Tensor, b: Any, scale: float = 1.0) -> list:
        g = torch.autograd.grad(inner(p, a, b) * scale, list(p.values()), create_graph=True)
        return list(torch.autograd.grad(g, [*p.values(), a], list(v.values())))

    def call() -> None:
        a = aux.clone().requires_grad_()
        if variant == "train":
            p = leaves()
            torch.autograd.grad(inner(p, aux, batch), list(p.values()))
        elif variant == "reverse_over_reverse":
            second(leaves(), a, batch)
        elif variant == "forward_over_reverse":
            f = lambda p, a: torch.func.grad(inner, argnums=(0, 1))(p, a, batch)  # noqa: E731
            torch.func.jvp(f, (params, aux), (v, torch.zeros_like(aux)))
        elif variant == "dual_forward_backward":
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                p = {k: fwAD.make_dual(x, v[k]) for k, x in leaves().items()}
                g = torch.autograd.grad(inner(p, a, batch), [*p.values(), a])
                [fwAD.unpack_dual(x).tangent for x in g]
        else:
            pieces = int(variant[len("micro") :])
            p, total = leaves(), None
            for piece, weight in split_batch(batch, pieces):
                out = second(p, a, piece, weight)
                total = out if total is None else [t + o for t, o in zip(total, out)]

    with sdpa_kernel(SDPBackend.MATH):
        base = measure_start(device)
        start = time.process_time()
        call()
        seconds = time.process_time() - start
        peak = measure_peak(device, base)
    return {"workload": name, "variant": variant, "peak_bytes": peak, "seconds": seconds}


# ----------------------------------------------------------------------------- the grid


def grid(quick: bool, device: str) -> list[tuple[str, str, int]]:
    """(workload, method, K) to run. Reverse stops where its memory would not fit."""
    if quick:
        return [(w, m, k) for w in ("mlp", "gpt05m") for k in (4, 16)
                for m in ("plain", "reverse", "slots4", "slots4_micro4")]  # fmt: skip
    if device == "cuda":  # one short GPU call: the target rows, and a model of 106M parameters
        reverse_up_to = {"gpt3m": 16, "gpt100m": 4}
        return [(w, m, k) for w, ks in (("gpt3m", (16, 64)), ("gpt100m", (4, 16))) for k in ks
                for m in ("plain", "reverse", "slots4", "slots4_micro4")
                if m != "reverse" or k <= reverse_up_to[w]]  # fmt: skip
    # the targets first (issue 21: gpt3m at K = 16, gpt05m at K = 256 and flat from K = 64)
    out = [("gpt3m", m, 16) for m in ("plain", "slots4_micro4", "slots4_micro8", "slots4")]
    out += [("gpt05m", m, k) for k in (256, 64) for m in ("plain", "slots4_micro4", "slots4")]
    out += [("gpt3m", m, 4) for m in ("plain", "reverse", "first_order", "checkpointed_1",
                                      "checkpointed_sqrtK", "slots4", "slots4_micro4")]  # fmt: skip
    out += [("gpt05m", m, k) for k in (4, 16) for m in ("plain", "slots4_micro4", "slots4")]
    out += [("gpt05m", m, k) for k in (4, 16, 64) for m in ("reverse", "checkpointed_sqrtK")]
    for k in (4, 16, 64, 256, 1024):
        for m in (
            "plain",
            "reverse",
            "first_order",
            "checkpointed_sqrtK",
            "slots4",
            "slots4_micro4",
        ):
            if not (m == "reverse" and k > 256):
                out.append(("mlp", m, k))
    return out


TIMED = ("plain", "slots4", "slots4_micro4", "slots4_micro8")


def spawn(args: list[str], *, memory: bool = True) -> dict[str, Any]:
    """Run this script on one configuration in a fresh process; its JSON line.

    For memory, glibc's mmap threshold is fixed at 64 KiB in that process: every tensor larger
    than that is mapped when allocated and unmapped when freed, so the resident set follows
    what is alive rather than what the allocator keeps after a free (with the default dynamic
    threshold, an unroll's freed blocks stay in the heap and the high-water mark measures the
    allocator's history). It slows allocation, so times come from a second process without it.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if memory else None
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: peak and time of each method as ratios to plain training at the same K."""
    plain = {(r["workload"], r["K"]): r for r in rows if r.get("method") == "plain"}
    lines = ["| workload | K | method | peak MB | peak / plain | time / plain |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r or r["method"] == "plain":
            continue
        base = plain.get((r["workload"], r["K"]))
        if base is None:
            continue
        time = "—" if r.get("seconds") is None else f"{r['seconds'] / base['seconds']:.2f}x"
        lines.append(
            f"| {r['workload']} | {r['K']} | {r['method']} | {r['peak_bytes'] / 2**20:.0f} | "
            f"{r['peak_bytes'] / base['peak_bytes']:.2f}x | {time} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Log-log: peak memory against K, one panel per workload, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["mlp", "gpt05m", "gpt3m", "gpt100m"]
    names = [n for n in order if any(r.get("workload") == n for r in rows)]
    methods = [m for m in METHODS if any(r.get("method") == m for r in rows)]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method, every panel
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for m in methods:
            pts = sorted((r["K"], r["peak_bytes"] / 2**20) for r in rows
                         if r.get("workload") == name and r.get("method") == m
                         and "error" not in r)  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, color=colours[m])
        ax.set(xscale="log", yscale="log", xlabel="K (steps)", ylabel="peak memory (MB)",
               title=name)  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--step", action="store_true", help="one step's backward, four ways")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write")
    parser.add_argument("--one", nargs=3, metavar=("WORKLOAD", "METHOD", "K"))
    parser.add_argument("--one-step", nargs=2, metavar=("WORKLOAD", "VARIANT"))
    parser.add_argument("--workloads", nargs="*", help="run only these workloads of the grid")
    parser.add_argument(
        "--report",
        nargs="*",
        metavar="LOG",
        help="no runs: the JSON and plot from the JSON lines of earlier runs",
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]), args.device)))
        return
    if args.one_step:
        print(json.dumps(step_one(*args.one_step, args.device)))
        return
    suffix = "" if args.device == "cpu" else f"-{args.device}"
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    if args.step:
        rows = [spawn(["--one-step", w, v, "--device", args.device])
                for w in ("gpt3m", "mlp") for v in STEP_VARIANTS]  # fmt: skip
        for r in rows:
            print(json.dumps(r), flush=True)
        (results / f"memory-step{suffix}.json").write_text(json.dumps(rows, indent=1) + "\n")
        return
    tag = "-quick" if args.quick else ""
    if args.report:
        rows = [json.loads(line) for log in args.report for line in Path(log).read_text().splitlines()
                if line.startswith("{")]  # fmt: skip
        report(rows, results / f"memory{suffix}{tag}")
        return
    rows = []
    for name, method, k in grid(args.quick, args.device):
        if args.workloads and name not in args.workloads:
            continue
        one = ["--one", name, method, str(k), "--device", args.device]
        row = spawn(one)
        if "error" not in row and args.device == "cpu":  # times from a process of their own
            timed = spawn(one, memory=False) if method in TIMED else {}
            row["seconds"] = timed.get("seconds")
        row.setdefault("workload", name), row.setdefault("method", method), row.setdefault("K", k)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report(rows, results / f"memory{suffix}{tag}")


def report(rows: list[dict[str, Any]], stem: Path) -> None:
    """Write ``stem.json`` and ``stem.png``; print the table."""
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, stem.with_suffix(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()

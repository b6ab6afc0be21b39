"""Benchmark: the seed-5 hypergradient for C clients, vmapped (hg.clients) vs loops over clients.

Workload: C client MLPs (16 -> 64 -> 64 -> 1, tanh), each trained K = 10 SGD steps on its own
batch of 32 with a regulariser from an auxiliary linear model; the server is the clients' mean;
we take the gradient of the server's validation loss with respect to the auxiliary model.

* ``vmap``: ``hg.clients.hypergrad`` (one vectorised unroll, reverse mode);
* ``vmap+compile`` (with ``--compile``): the same with ``compile=True``; the first call
  (compilation) is timed apart and any eager fallback is recorded in the JSON;
* ``vmap chunk_size=32`` (C > 32): the same by chunks of 32 clients: reverse mode one chunk at
  a time, memory bounded by the chunk (see the memory table), at the price of a forward pass;
* ``loop``: a Python loop over clients with hand-written autograd
  (``torch.autograd.grad(create_graph=True)`` and ``p - lr * g``), the baseline;
* ``torch.func prototype``: the issue's reference, plain ``torch.func`` (``vmap`` of a K-step
  ``grad`` loop), no library: what ``hg.clients`` costs over a one-off vectorised script;
* ``higher`` / ``torchopt``: the same loop with ``higher.innerloop_ctx`` / ``torchopt.MetaSGD``
  (skipped when not importable; timed up to ``--peers-up-to`` clients, since they are several
  times slower than the hand-written loop).

Times are the median of ``--repeats`` runs after a warm-up, all in this process, the runners
alternating within each repeat (so a ratio compares runs taken seconds apart on a drifting VM).
Each row also counts the matmul FLOPs of the vmapped hypergradient (``torch.utils.flop_counter``;
the loop executes the same) and measures this machine's matmul rate in the same run (a 1024^2
``mm``, and the workload's main batched product out of cache), giving the GFLOP/s each runner
reaches and the time the matmuls alone would take at the measured rate (``matmul_floor_s``).
Peak memory is
measured in a fresh subprocess per configuration: the kernel's peak-RSS mark (VmHWM) is reset
just before the run (``/proc/self/clear_refs``), and the growth of the peak over the RSS at
that moment is reported. Writes
``benchmarks/results/clients.json`` and a log-log plot ``benchmarks/results/clients.png``.
Targets: vmap >= 10x the loop at C = 32 and >= 20x at C = 128.

Run: ``python benchmarks/clients.py --compile`` (both cores, torch's default here: writes
``clients.json``); ``--threads 1`` writes ``clients-threads1.json``; ``--quick`` for a smoke run;
``--plot-only`` (with the same ``--threads``) redraws the PNG from the committed JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
from _timing import interleaved_medians
from torch import nn

import hypergrad as hg

HERE = os.path.dirname(os.path.abspath(__file__))
K, LR, LAM, BATCH, WIDTH, DIM = 10, 0.05, 0.5, 32, 64, 16


def workload(clients: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(DIM, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1)
    )
    aux_model = nn.Linear(DIM, 1)
    x = torch.randn(K, clients, BATCH, DIM, generator=gen)
    y = x[..., :1] * torch.linspace(0.5, 1.5, clients).view(1, clients, 1, 1)
    val = (torch.randn(128, DIM, generator=gen), torch.randn(128, 1, generator=gen))

    # The losses are built once per workload, as a user defines them once: the compiled step is
    # cached per inner_loss object, so a new closure per call would compile on every call.
    def inner(p, a, batch):
        xb, yb = batch
        return inner_value(hg.call(model, p, xb), hg.call(aux_model, a, xb), yb)

    def outer(p, a, batch):
        return ((hg.call(model, p, batch[0]) - batch[1]) ** 2).mean()

    return {
        "model": model, "aux_model": aux_model, "x": x, "y": y, "val": val,
        "inner": inner, "outer": outer,
    }  # fmt: skip


def inner_value(pred, target, yb):
    return ((pred - yb) ** 2).mean() + LAM * ((pred - target) ** 2).mean()


def run_vmap(w: dict, chunk_size: int | None = None, method="reverse") -> torch.Tensor:
    params, _ = hg.split(w["model"])
    aux, _ = hg.split(w["aux_model"])
    g = hg.clients.hypergrad(
        w["outer"], w["inner"], params, hg.optim.sgd(lr=LR), (w["x"], w["y"]), w["val"], aux=aux,
        in_dims={"params": None}, chunk_size=chunk_size, method=method, seed=0,
    )  # fmt: skip
    return g.aux["weight"]


def run_vmap_compiled(w: dict) -> torch.Tensor:
    """``hg.clients.hypergrad(compile=True)`` with the workload's losses (built once).

    A fallback to eager (``hg.CompileFallbackWarning``) is recorded in ``FALLBACKS``, never hidden.
    """
    params, _ = hg.split(w["model"])
    aux, _ = hg.split(w["aux_model"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", hg.CompileFallbackWarning)
        g = hg.clients.hypergrad(
            w["outer"], w["inner"], params, hg.optim.sgd(lr=LR), (w["x"], w["y"]), w["val"], aux=aux,
            in_dims={"params": None}, seed=0, compile=True,
        )  # fmt: skip
    FALLBACKS.extend(str(c.message) for c in caught)
    return g.aux["weight"]


FALLBACKS: list[str] = []
CHUNK = 32  # the chunk_size of the chunked row (memory bounded by it; see the memory table)
DEFAULT_THREADS = 2  # this 2-core machine's torch default


def run_vmap_chunked(w: dict) -> torch.Tensor:
    """``hg.clients.hypergrad(chunk_size=CHUNK)``: reverse mode chunk by chunk (bounded memory)."""
    return run_vmap(w, chunk_size=CHUNK)


def _server_grad(w: dict, finals: list[list[torch.Tensor]], aux: list[torch.Tensor]):
    server = [torch.stack(ps).mean(0) for ps in zip(*finals)]
    names = [n for n, _ in w["model"].named_parameters()]
    vx, vy = w["val"]
    value = ((hg.call(w["model"], dict(zip(names, server)), vx) - vy) ** 2).mean()
    return torch.autograd.grad(value, aux)[0]


def run_loop(w: dict) -> torch.Tensor:
    """A Python loop over clients, hand-written differentiable SGD (create_graph=True)."""
    model, aux_model = w["model"], w["aux_model"]
    aux = [p.detach().clone().requires_grad_() for p in aux_model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    init = [p.detach() for p in model.parameters()]
    finals = []
    for c in range(w["x"].shape[1]):
        ps = [p.clone().requires_grad_() for p in init]
        for k in range(K):
            xb, yb = w["x"][k, c], w["y"][k, c]
            pred = torch.func.functional_call(model, dict(zip(names, ps)), (xb,))
            target = torch.nn.functional.linear(xb, aux[0], aux[1])
            grads = torch.autograd.grad(inner_value(pred, target, yb), ps, create_graph=True)
            ps = [p - LR * g for p, g in zip(ps, grads)]
        finals.append(ps)
    return _server_grad(w, finals, aux)


def run_higher(w: dict) -> torch.Tensor:
    import higher

    model, aux_model = w["model"], w["aux_model"]
    aux = [p.detach().clone().requires_grad_() for p in aux_model.parameters()]
    finals = []
    for c in range(w["x"].shape[1]):
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for k in range(K):
                xb, yb = w["x"][k, c], w["y"][k, c]
                target = torch.nn.functional.linear(xb, aux[0], aux[1])
                diffopt.step(inner_value(fmodel(xb), target, yb))
            finals.append(list(fmodel.parameters()))
    return _server_grad(w, finals, aux)


def run_torchopt(w: dict) -> torch.Tensor:
    import torchopt

    aux_model = w["aux_model"]
    aux = [p.detach().clone().requires_grad_() for p in aux_model.parameters()]
    finals = []
    for c in range(w["x"].shape[1]):
        net = copy.deepcopy(w["model"])
        opt = torchopt.MetaSGD(net, lr=LR)
        for k in range(K):
            xb, yb = w["x"][k, c], w["y"][k, c]
            target = torch.nn.functional.linear(xb, aux[0], aux[1])
            opt.step(inner_value(net(xb), target, yb))
        finals.append(list(net.parameters()))
    return _server_grad(w, finals, aux)


def run_func_prototype(w: dict) -> torch.Tensor:
    """The issue's reference: plain ``torch.func``, one vmap over a K-step client function.

    Each client takes ``torch.func.grad`` steps inside ``vmap`` (no library); the server's loss
    is differentiated with ``torch.autograd.grad``. It shows what the library costs over a
    hand-written vectorised prototype of this one workload.
    """
    model, aux_model = w["model"], w["aux_model"]
    aux = {k: p.detach().clone().requires_grad_() for k, p in aux_model.named_parameters()}
    init = {k: p.detach() for k, p in model.named_parameters()}

    def inner(p, a, xb, yb):
        target = torch.func.functional_call(aux_model, a, (xb,))
        return inner_value(torch.func.functional_call(model, p, (xb,)), target, yb)

    def client(x, y, a):  # x: (K, B, DIM), one client's batches
        p = init
        for k in range(K):
            g = torch.func.grad(inner)(p, a, x[k], y[k])
            p = {n: p[n] - LR * g[n] for n in p}
        return p

    finals = torch.func.vmap(client, in_dims=(1, 1, None))(w["x"], w["y"], aux)
    server = {n: v.mean(0) for n, v in finals.items()}
    vx, vy = w["val"]
    value = ((torch.func.functional_call(model, server, (vx,)) - vy) ** 2).mean()
    return torch.autograd.grad(value, aux["weight"])[0]


def peers() -> dict:
    out = {"loop": run_loop, "torch.func prototype": run_func_prototype}
    for name, fn in (("higher", run_higher), ("torchopt", run_torchopt)):
        try:
            __import__(name)
            out[name] = fn
        except ImportError:
            print(f"({name} not importable: skipped)")
    return out


def matmul_flops(fn) -> int:
    """The matmul FLOPs ``fn()`` executes (``torch.utils.flop_counter``; sees vmap's bmm)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_gflops(clients: int, repeats: int = 7) -> dict[str, float]:
    """This machine's matmul rate at the current thread count: a large ``mm`` (in cache) and the
    workload's main batched product ``(C, B, W) @ (C, W, W)`` with operands cycled out of cache.
    """

    def rate(pairs, flops: float) -> float:
        for a, b in pairs[:2]:
            torch.matmul(a, b)
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            for a, b in pairs:
                torch.matmul(a, b)
            ts.append((time.perf_counter() - start) / len(pairs))
        return flops / statistics.median(ts) / 1e9

    big = [(torch.randn(1024, 1024), torch.randn(1024, 1024))]
    count = max(2, (64 << 20) // (4 * clients * WIDTH * (BATCH + WIDTH)))  # ~64 MiB of operands
    bmm = [
        (torch.randn(clients, BATCH, WIDTH), torch.randn(clients, WIDTH, WIDTH))
        for _ in range(count)
    ]
    return {
        "mm_1024": rate(big, 2 * 1024**3),
        "bmm_workload_shape": rate(bmm, 2 * clients * BATCH * WIDTH * WIDTH),
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # KiB -> MiB


def memory_probe(mode: str, clients: int, chunk: int | None) -> None:
    """Run one configuration once and print the peak RSS growth in MiB (subprocess entry)."""
    w = workload(clients)
    params, _ = hg.split(w["model"])
    _reset_peak()
    before = _rss_mb()
    if mode == "unroll":  # the K steps alone, no hypergradient graph
        aux, _ = hg.split(w["aux_model"])
        with torch.no_grad():
            hg.clients.unroll(
                w["inner"], params, hg.optim.sgd(lr=LR), (w["x"], w["y"]), aux=aux,
                in_dims={"params": None}, chunk_size=chunk, seed=0,
            )  # fmt: skip
    elif mode == "vmap":
        run_vmap(w, chunk)
    else:
        run_loop(w)
    print(json.dumps({"peak_growth_mib": round(_peak_mb() - before, 1)}))


def measure_memory(mode: str, clients: int, chunk: int | None) -> float:
    cmd = [sys.executable, __file__, "--probe", mode, str(clients), str(chunk or 0)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth_mib"]


def main(
    sizes=(8, 32, 128),
    repeats: int = 3,
    threads: int = DEFAULT_THREADS,
    memory: bool = True,
    peers_up_to=32,
    timing: bool = True,
    compiled: bool = False,
    write: bool = True,
) -> dict:
    torch.set_num_threads(threads)
    rows = []
    runners = {"vmap": run_vmap, **peers()}
    if compiled:
        runners["vmap+compile"] = run_vmap_compiled
    chunked = f"vmap chunk_size={CHUNK}"
    runners[chunked] = run_vmap_chunked
    ours = ("vmap", "vmap+compile", chunked)
    for clients in sizes if timing else ():
        w = workload(clients)
        reference = run_loop(w)
        torch.testing.assert_close(run_vmap(w), reference, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(run_func_prototype(w), reference, rtol=1e-4, atol=1e-6)
        if clients > CHUNK:
            torch.testing.assert_close(run_vmap_chunked(w), reference, rtol=1e-4, atol=1e-6)
        compile_s = None
        FALLBACKS.clear()  # each row records its own fallbacks
        if compiled:  # the first call compiles: timed here, not in the medians below
            start = time.perf_counter()
            torch.testing.assert_close(run_vmap_compiled(w), reference, rtol=1e-4, atol=1e-6)
            compile_s = time.perf_counter() - start
        times = interleaved_medians(
            {
                name: (lambda fn=fn, w=w: fn(w))
                for name, fn in runners.items()
                if name in ("vmap", "loop", "vmap+compile", "torch.func prototype")
                or (name == chunked and clients > CHUNK)
                or (name not in ours and clients <= peers_up_to)
            },
            repeats,
        )
        flops = matmul_flops(lambda w=w: run_vmap(w))
        peak = peak_gflops(clients)
        row = {"clients": clients, "seconds": times}
        row["matmul_gflop"] = flops / 1e9
        row["peak_gflops"] = peak
        row["achieved_matmul_gflops"] = {n: flops / t / 1e9 for n, t in times.items()}
        row["matmul_floor_s"] = flops / (peak["bmm_workload_shape"] * 1e9)
        if compile_s is not None:
            row["compile_and_first_call_s"] = compile_s
            row["compile_fallbacks"] = sorted(set(FALLBACKS))
        baselines = [n for n in times if n not in ours]
        row["speedups"] = {
            mine: {n: times[n] / times[mine] for n in baselines} for mine in ours if mine in times
        }
        rows.append(row)
        print(f"C={clients:4d}  " + "  ".join(f"{n} {t:7.3f}s" for n, t in times.items()))
        for mine, vs in row["speedups"].items():
            speed = "  ".join(f"{n} {x:5.1f}x" for n, x in vs.items())
            print(f"        {mine} speed-up: {speed}")
        if compile_s is not None:
            print(f"        compile + first call {compile_s:.1f} s")
        rates = "  ".join(f"{n} {g:5.1f}" for n, g in row["achieved_matmul_gflops"].items())
        print(
            f"        matmul work {row['matmul_gflop']:.3f} GFLOP; GFLOP/s reached: {rates}; "
            f"machine: mm 1024 {peak['mm_1024']:.0f}, bmm at this shape {peak['bmm_workload_shape']:.0f} "
            f"-> matmul floor {row['matmul_floor_s'] * 1e3:.0f} ms"
        )

    mem = []
    if memory:
        print("\npeak memory growth (MiB, fresh process each; VmHWM over the pre-run RSS)")
        configs = [("vmap", c, None) for c in sizes] + [("loop", c, None) for c in sizes]
        big = max(sizes)
        configs += [("unroll", big, None)] + [("unroll", big, ch) for ch in (8, 32)]
        configs += [("vmap", big, ch) for ch in (8, 32)]
        configs += [("vmap", 4 * big, ch) for ch in (None, 8, 32)]  # bounded by chunk_size
        for mode, clients, chunk in configs:
            mib = measure_memory(mode, clients, chunk)
            mem.append({"mode": mode, "clients": clients, "chunk_size": chunk, "peak_mib": mib})
            print(f"  {mode:7s} C={clients:4d} chunk_size={chunk!s:5s} {mib:8.1f} MiB")

    result = {
        "benchmark": "clients",
        "workload": {"K": K, "width": WIDTH, "in": DIM, "batch": BATCH, "opt": "sgd", "dtype": "float32"},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": threads},
        "repeats": repeats,
        "rows": rows,
        "memory": mem,
        "targets": {"C=32": ">= 10x vs loop", "C=128": ">= 20x vs loop"},
    }  # fmt: skip
    # torch's default on this machine (both cores) writes clients.json; other thread counts
    # write clients-threads<N>.json beside it
    name = "clients" if threads == DEFAULT_THREADS else f"clients-threads{threads}"
    out = os.path.join(HERE, "results", f"{name}.json")
    if not write:  # --quick: a smoke run leaves the committed results alone
        return result
    if not timing:  # --memory-only: keep the timings of the last full run
        with open(out) as f:
            result = {**json.load(f), "memory": mem}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    if timing:
        plot(rows, os.path.join(HERE, "results", f"{name}.png"))
    return result


def plot(rows: list[dict], path: str) -> None:
    """Seconds against clients, log-log, one line per runner (a runner timed at one C is a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name in dict.fromkeys(n for r in rows for n in r["seconds"]):
        pts = [(r["clients"], r["seconds"][name]) for r in rows if name in r["seconds"]]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("clients C")
    ax.set_ylabel(f"seconds per hypergradient (K={K})")
    ax.set_title("seed-5 hypergradient: vmap vs loops over clients")
    # beside the axes: inside, it hides the loop's line, which runs along the top
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument(
        "--quick", action="store_true", help="C in {4, 8}, one repeat, no memory, nothing written"
    )
    parser.add_argument("--peers-up-to", type=int, default=32)
    parser.add_argument("--memory-only", action="store_true", help="rerun the memory probes only")
    parser.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--compile", action="store_true", help="add a vmap + compile=True row (compile timed apart)"
    )
    parser.add_argument(
        "--plot-only",
        action="store_true",
        help="redraw the PNG from the committed JSON of --threads (nothing is measured)",
    )
    args = parser.parse_args()
    if args.plot_only:
        name = "clients" if args.threads == DEFAULT_THREADS else f"clients-threads{args.threads}"
        with open(os.path.join(HERE, "results", f"{name}.json")) as f:
            plot(json.load(f)["rows"], os.path.join(HERE, "results", f"{name}.png"))
    elif args.probe:
        torch.set_num_threads(args.threads)
        mode, c, ch = args.probe
        memory_probe(mode, int(c), int(ch) or None)
    elif args.memory_only:
        main(threads=args.threads, timing=False)
    elif args.quick:
        main(
            sizes=(4, 8), repeats=1, threads=args.threads, memory=False, peers_up_to=4, write=False
        )
    else:
        main(
            repeats=args.repeats,
            threads=args.threads,
            peers_up_to=args.peers_up_to,
            compiled=args.compile,
        )

"""Sweep: norm layers under ``hg.Clients`` against a per-client loop (float64, no silent error).

torch's vmap of the second derivative through its affine norm kernels is wrong (issue 23: a
meta-gradient off by 0.7% with no warning). This sweep finds every such case: each norm layer
(BatchNorm with and without an affine weight, in training mode with batch statistics, with
carried running statistics, and in eval mode; LayerNorm, GroupNorm, InstanceNorm with and
without; RMSNorm) x ``inner_grad`` ``"func"`` / ``"autograd"`` x method ``"reverse"`` /
``"forward"`` / ``hg.Implicit`` x the outer loss ``"server"`` (the clients' mean) / ``"each"``
(tasks), against the same hypergradient computed another way:

* ``"server"``: a hand-written loop over clients (``torch.autograd.grad(create_graph=True)``
  and ``p - lr * g``, torch's own kernels, no vmap), the mean of the finals, then autograd;
* ``"each"``: a loop of single-model ``hg.hypergrad`` calls (no clients vmap), their mean.

Each row is run twice: as hypergrad runs it (``exact``), and with the rewrite of
``hypergrad._clients.norms`` turned off (``torch``), to show what torch's kernels give. The
target: no ``exact`` difference above 1e-8 relative. Writes ``benchmarks/results/vmap_norms.json``.

Run: ``python benchmarks/vmap_norms.py`` (about a minute on one thread).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import hypergrad as hg
from hypergrad._clients import norms

C, K, N, LR = 3, 3, 5, 0.1
F64 = torch.float64
NORMS: dict[str, Callable[[], nn.Module]] = {
    "BatchNorm1d": lambda: nn.BatchNorm1d(4, track_running_stats=False),
    "BatchNorm1d(affine=False)": lambda: nn.BatchNorm1d(4, affine=False, track_running_stats=False),
    "BatchNorm1d(running stats)": lambda: nn.BatchNorm1d(4),
    "BatchNorm1d.eval()": lambda: nn.BatchNorm1d(4).eval(),
    "LayerNorm": lambda: nn.LayerNorm([4, 3]),
    "LayerNorm(affine=False)": lambda: nn.LayerNorm([4, 3], elementwise_affine=False),
    "GroupNorm": lambda: nn.GroupNorm(2, 4),
    "GroupNorm(affine=False)": lambda: nn.GroupNorm(2, 4, affine=False),
    "InstanceNorm1d(affine=True)": lambda: nn.InstanceNorm1d(4, affine=True),
    "InstanceNorm1d": lambda: nn.InstanceNorm1d(4),
    "RMSNorm": lambda: nn.RMSNorm([4, 3]),
}


def model_of(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(4, 4, 1), NORMS[kind](), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1)
    ).double()


@contextlib.contextmanager
def rewrite_off() -> Iterator[None]:
    """torch's own kernels under the clients' vmap (the rewrite turned off)."""
    saved = dict(norms.REWRITTEN)
    norms.REWRITTEN.clear()
    try:
        with warnings.catch_warnings():  # a wrong H v is not symmetric: MINRES may not converge
            warnings.simplefilter("ignore", hg.ImplicitWarning)
            yield
    finally:
        norms.REWRITTEN.update(saved)


def problem(kind: str) -> dict[str, Any]:
    model = model_of(kind)
    g = torch.Generator().manual_seed(1)
    stacked, buffers = hg.stack([model_of(kind) for _ in range(C)])
    stacked = hg.tree.map(lambda x: x + 0.1 * torch.randn(x.shape, generator=g, dtype=F64), stacked)
    has_buffers = bool(buffers) and model.training and kind.endswith("(running stats)")

    def run(p: Any, x: torch.Tensor, b: Any) -> tuple[torch.Tensor, Any]:
        if has_buffers:
            return hg.call(model, p, x, buffers=b, return_buffers=True)
        return hg.call(model, p, x), None

    def inner(p: Any, a: Any, batch: Any, b: Any = None) -> Any:
        out, new = run(p, batch[0], b)
        loss = ((out - batch[1]) ** 2).mean() + a * sum((v**2).sum() for v in p.values())
        return (loss, new) if has_buffers else loss

    def outer(p: Any, a: Any, batch: Any, b: Any = None) -> torch.Tensor:
        return ((run(p, batch[0], b)[0] - batch[1]) ** 2).mean()

    return {
        "inner": inner,
        "outer": outer,
        "params": stacked,
        "buffers": buffers if has_buffers else None,
        "batches": (
            torch.randn(K, C, N, 4, 3, generator=g, dtype=F64),
            torch.randn(K, C, N, 1, generator=g, dtype=F64),
        ),
        "val": (
            torch.randn(C, N, 4, 3, generator=g, dtype=F64),
            torch.randn(C, N, 1, generator=g, dtype=F64),
        ),
        "aux": torch.tensor(0.3, dtype=F64),
    }


def client(tree: Any, c: int) -> Any:
    return None if tree is None else hg.tree.map(lambda x: x[c], tree)


def reference_server(pr: dict[str, Any]) -> torch.Tensor:
    """The server's hypergradient by a hand-written loop over clients (torch's kernels)."""
    a = pr["aux"].clone().requires_grad_()
    X, Y = pr["batches"]
    finals, final_buffers = [], []
    for c in range(C):
        p = hg.tree.map(lambda x: x.clone().requires_grad_(), client(pr["params"], c))
        b = None if pr["buffers"] is None else hg.tree.map(torch.clone, client(pr["buffers"], c))
        for k in range(K):
            out = pr["inner"](p, a, (X[k, c], Y[k, c]), *([b] if b is not None else []))
            loss, b = out if b is not None else (out, None)
            grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {n: v - LR * d for (n, v), d in zip(p.items(), grads)}
        finals.append(p)
        final_buffers.append(b)
    server = hg.tree.mean(finals)
    server_b = None if pr["buffers"] is None else hg.tree.mean(final_buffers)
    val = (pr["val"][0][0], pr["val"][1][0])
    value = pr["outer"](server, a, val, *([server_b] if server_b is not None else []))
    return torch.autograd.grad(value, a)[0]


def reference_each(pr: dict[str, Any], method: Any) -> torch.Tensor:
    """The tasks' hypergradient as the mean of single-model calls (no clients vmap)."""
    X, Y = pr["batches"]
    total = 0
    for c in range(C):
        total = total + hg.hypergrad(
            pr["outer"], pr["inner"], client(pr["params"], c), hg.optim.sgd(lr=LR),
            (X[:, c], Y[:, c]), client(pr["val"], c), aux=pr["aux"], method=method,
            buffers=client(pr["buffers"], c),
        ).aux  # fmt: skip
    return total / C


def ours(pr: dict[str, Any], method: Any, inner_grad: str, outer: str) -> torch.Tensor:
    val = pr["val"] if outer == "each" else (pr["val"][0][0], pr["val"][1][0])
    return hg.hypergrad(
        pr["outer"], pr["inner"], pr["params"], hg.optim.sgd(lr=LR), pr["batches"], val,
        aux=pr["aux"], method=method, inner_grad=inner_grad, buffers=pr["buffers"],
        clients=hg.Clients(outer=outer),
    ).aux  # fmt: skip


METHODS = {
    "reverse": "reverse",
    "forward": "forward",
    "implicit": hg.Implicit("minres", tol=1e-12, maxiter=500, stationarity=float("inf")),
}


def cases() -> Iterator[tuple[str, str, str, str]]:
    for kind, grad, method, outer in itertools.product(
        NORMS, ("func", "autograd"), METHODS, ("server", "each")
    ):
        if method == "forward" and grad == "autograd":
            continue  # forward mode needs inner_grad="func" (refused otherwise)
        if method == "implicit" and outer == "server":
            continue  # the loop reference is an unroll; implicit is compared as tasks
        yield kind, grad, method, outer


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def main(write: bool = True) -> list[dict[str, Any]]:
    """Run the sweep, print a row per case; return the cases above 1e-8 (write the JSON)."""
    torch.set_num_threads(1)
    rows = []
    for kind, grad, method, outer in cases():
        pr = problem(kind)
        how = METHODS[method]
        want = reference_each(pr, how) if outer == "each" else reference_server(pr)
        row: dict[str, Any] = {"norm": kind, "inner_grad": grad, "method": method,
                               "outer": outer}  # fmt: skip
        for label, context in (("exact", contextlib.nullcontext), ("torch", rewrite_off)):
            with context():
                row[label] = relative(ours(pr, how, grad, outer), want)
        rows.append(row)
        flag = "  <- torch wrong" if row["torch"] > 1e-8 else ""
        print(f"{kind:28s} {grad:8s} {method:8s} {outer:6s} exact {row['exact']:.1e}  "
              f"torch {row['torch']:.1e}{flag}", flush=True)  # fmt: skip
    bad = [r for r in rows if r["exact"] > 1e-8]
    print(f"{len(rows)} cases; torch's kernels wrong in {sum(r['torch'] > 1e-8 for r in rows)}; "
          f"hypergrad above 1e-8 in {len(bad)}")  # fmt: skip
    if write:
        out = pathlib.Path(__file__).with_name("results") / "vmap_norms.json"
        out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return bad


if __name__ == "__main__":
    sys.exit(1 if main() else 0)

"""Forward mode on 17k directions inside a 6 GiB address-space limit (issue 23).

Workload: an MLP 64 -> 128 -> 64 -> 10 (tanh; 17,226 params), K = 2 SGD steps (momentum 0.9)
on batches of 32, cross-entropy; the hypergradient with respect to ``aux`` (a weight decay)
and the initial params: D = 17,227 tangent directions. Each configuration runs in a fresh
subprocess under ``resource.setrlimit(RLIMIT_AS, 6 GiB)``:

* ``"forward"``: the default, which measures one step with one and two directions, then pushes
  the directions in chunks that fit half of what the process has left;
* ``hg.Forward(chunk_size=D)``: every direction at once (what ``"forward"`` did before issue
  23; it then failed to allocate after 77 s, peak RSS 5.2 GiB), now refused before the first
  pass with the estimate and the chunk that fits.

Reports, per configuration: the outcome (finished, or the error's first line), the chunk
chosen, the wall time and the peak resident memory. Run: ``python benchmarks/forward_memory.py``
(about two minutes on one thread). Writes ``benchmarks/results/forward_memory.json``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

LIMIT = 6 * 2**30

CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (@LIMIT@, @LIMIT@))
import torch
import hypergrad as hg
import hypergrad.methods.forward as forward
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64),
                            torch.nn.Tanh(), torch.nn.Linear(64, 10))
params, _ = hg.split(model)
X, Y = torch.randn(2, 32, 64), torch.randint(0, 10, (2, 32))
ce = torch.nn.functional.cross_entropy
inner = lambda p, a, b: ce(hg.call(model, p, b[0]), b[1]) + a * hg.tree.vdot(p, p)
outer = lambda p, a, b: ce(hg.call(model, p, b[0]), b[1])
chosen = {}
plan = forward.plan
def spy(*args):
    chosen["chunk"] = plan(*args)
    chosen["estimate_mb_per_direction"] = args[1] / 2**20
    chosen["budget_gib"] = args[2] / 2**30
    return chosen["chunk"]
forward.plan = spy
method = hg.Forward(chunk_size=None if sys.argv[1] == "auto" else 17227)
start = time.perf_counter()
try:
    hg.hypergrad(outer, inner, params, hg.optim.sgd(lr=0.1, momentum=0.9), (X, Y), (X[0], Y[0]),
                 aux=torch.tensor(1e-3), wrt=("aux", "params"), method=method)
    outcome = "finished"
except (MemoryError, RuntimeError) as error:
    outcome = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  **chosen}))
""".replace("@LIMIT@", str(LIMIT))


def run(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=900
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or "").strip().splitlines()[-1:] or [""]
        return {"outcome": f"exit {done.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def main() -> None:
    rows = {"forward (auto chunks)": run("auto"), "hg.Forward(chunk_size=D)": run("all")}
    for name, row in rows.items():
        print(f"{name}: {row}", flush=True)
    out = pathlib.Path(__file__).with_name("results") / "forward_memory.json"
    out.write_text(json.dumps({"limit_gib": LIMIT / 2**30, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

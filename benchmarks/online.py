"""Benchmark the online loop of tutorial 11: one outer step against one ``hg.hypergrad`` call.

An outer step of online hypergradient descent (learning rates adapted every T steps of one
training run) is: the hypergradient over the next T steps, training continued from
``g.trajectory`` (params and optimizer state), and the meta-optimizer's step. Timed side by side,
interleaved, on the same window, params and state:

- ``hypergrad``: one ``hg.hypergrad`` call alone (the baseline);
- ``online``: the whole outer step as tutorial 11 writes it (continue from ``g.trajectory``);
- ``second unroll``: the outer step as it had to be written before ``Hypergradient.trajectory``:
  the same call, then ``hg.unroll`` of the same T steps to get the trained params and state;
- ``rest of online``: what ``online`` adds to the call (reading the trajectory, the meta step),
  timed alone: the two first rows differ by less than the noise of a shared machine, this row
  measures the difference directly (``1 + rest / hypergrad`` is the less noisy ratio).

The problem is tutorial 11's: an MLP 64-32-32-10 on mini-batches of 32 of the digits, Adam, one
learning rate per layer as a log through ``hyperparams=`` a function of ``aux``, reverse mode
through T = 10 steps. Times are CPU time of the process (``time.process_time``) with one torch
thread, median of ``--repeats`` interleaved rounds.

Run: ``python benchmarks/online.py`` (about a minute). Writes ``benchmarks/results/online.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import interleaved_medians

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _digits import digits, mlp
from online_learning_rates import rates

import hypergrad as hg

RESULTS = Path(__file__).resolve().parent / "results"


def main(repeats: int = 40, T: int = 10, batch: int = 32) -> dict:
    torch.set_num_threads(1)
    x, y, _, _ = digits(0)
    model = mlp(seed=0)
    init, _ = hg.split(model)

    def loss(params, aux, data):
        return F.cross_entropy(hg.call(model, params, data[0]), data[1])

    rows = torch.randint(len(x) - 300, (T, batch), generator=torch.Generator().manual_seed(1))
    window = (x[300:][rows], y[300:][rows])
    val = (x[:300], y[:300])
    opt, meta_opt = hg.optim.adam(lr=3e-3), hg.optim.adam(lr=0.1)
    meta = {"log_lr": torch.full((3,), 3e-3).log()}
    # start from a trained point, as an outer step in the middle of the run does
    warm = hg.unroll(loss, init, opt, window, aux=meta, hyperparams=rates, seed=0)
    params, state, meta_state = warm.params, warm.state, meta_opt.init(meta)
    args = (loss, loss, params, opt, window, val)
    kwargs = {"aux": meta, "state": state, "hyperparams": rates, "seed": 0}

    def hypergrad_only():
        return hg.hypergrad(*args, **kwargs)

    def online():
        g = hg.hypergrad(*args, **kwargs)
        trained = (g.trajectory.params, g.trajectory.state)
        return trained, meta_opt.step(meta, g.aux, meta_state)

    def second_unroll():
        g = hg.hypergrad(*args, **kwargs)
        traj = hg.unroll(loss, params, opt, window, aux=meta, state=state, hyperparams=rates,
                         seed=0)  # fmt: skip
        return (traj.params, traj.state), meta_opt.step(meta, g.aux, meta_state)

    g = hypergrad_only()

    def rest_of_online():  # what the online step adds to the call, timed on its own
        trained = (g.trajectory.params, g.trajectory.state)
        return trained, meta_opt.step(meta, g.aux, meta_state)

    medians = interleaved_medians(
        {"hypergrad": hypergrad_only, "online": online, "second unroll": second_unroll,
         "rest of online": rest_of_online},
        repeats,
        clock=time.process_time,
    )  # fmt: skip
    base = medians["hypergrad"]
    result = {
        "machine": platform.machine(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "threads": 1,
        "T": T,
        "repeats": repeats,
        "seconds": medians,
        "ratio": {name: t / base for name, t in medians.items()},
        "online_estimate": 1 + medians["rest of online"] / base,
    }
    print(f"one outer step, T = {T} Adam steps, median of {repeats} (CPU time, one thread)")
    for name, t in medians.items():
        print(f"  {name:14s} {t * 1e3:7.3f} ms   {t / base:5.3f}x hg.hypergrad")
    print(f"  online = hg.hypergrad + rest: {result['online_estimate']:.4f}x")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--T", type=int, default=10)
    cli = parser.parse_args()
    out = main(repeats=cli.repeats, T=cli.T)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "online.json").write_text(json.dumps(out, indent=2) + "\n")

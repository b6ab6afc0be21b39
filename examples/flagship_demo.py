"""Flagship demo: meta-learn per-client proximal regularisation through a whole federated run.

Seed problem 5 on scikit-learn's digits. ``C`` clients each hold a few examples (20) of only
two classes: strong label skew. Every federated round, each client starts from the server model
and takes ``K`` local steps of SGD with momentum on its own data. Many local steps on two
classes drag each client's weights far towards "only my two classes exist" (*client drift*),
and the server's average (FedAvg) suffers.

The regulariser is FedProx-style: client ``c`` adds ``sum_l s_{c,l} * ||w_l - w_server_l||^2``
for each layer ``l``, a pull towards this round's server weights. An *auxiliary model* sets the
strengths from the client's label histogram ``h_c``: ``s_c = max(0, A h_c + b)``, one strength
per layer. ``A`` starts at zero and ``b`` at a tiny positive ``start_strength`` (1e-4), so the
starting point is FedAvg with a negligible pull, off the kink of ``max(0, .)``: the first
hypergradient already says whether a stronger pull would help, on every torch (the derivative
of ``max(0, .)`` exactly at 0 is an implementation detail; torch 2.13 says 1, torch 2.14 says 0).

Meta-learning: ``hg.clients.hypergrad`` differentiates the server's validation loss after all
``R`` rounds with respect to ``(A, b)``, through every client's ``K`` steps of every round and
every aggregation (``R * K`` steps, all clients vmapped). Adam takes one step on ``(A, b)`` per
federated run (a *meta-iteration*). The final table compares plain FedAvg (before) with the
learned regulariser (after) on the validation set the meta-learning optimised and on a held-out
test set it never saw.

How the penalty sees this round's server weights: the inner loss only receives the client's
params, so each client's params carry a copy of the server model under ``anchor.*`` keys, with
learning rate 0 (it never moves during local steps), and the aggregation re-sets the copy to the
new server model every round. The hypergradient flows through the copy exactly.

Run: ``python examples/flagship_demo.py`` (or ``make demo``); ``--seed``, ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from _digits import accuracy, digits
from torch import nn
from tqdm import tqdm

import hypergrad as hg

LAYERS = {"hidden layer": ("0.weight", "0.bias"), "output layer": ("2.weight", "2.bias")}
ANCHOR = "anchor."


def label_skewed_split(x, y, clients: int, classes: int, per_client: int, seed: int) -> list:
    """``clients`` shards of ``per_client`` examples, each from ``classes`` random classes only."""
    gen = torch.Generator().manual_seed(seed)
    pools = [(y == k).nonzero().flatten() for k in range(10)]
    pools = [p[torch.randperm(len(p), generator=gen)] for p in pools]
    used = [0] * 10
    shards = []
    for _ in range(clients):
        picked = []
        for k in torch.randperm(10, generator=gen)[:classes].tolist():
            n = per_client // classes
            if used[k] + n > len(pools[k]):  # a class ran out: start its pool again
                used[k] = 0
            picked.append(pools[k][used[k] : used[k] + n])
            used[k] += n
        idx = torch.cat(picked)
        shards.append((x[idx], y[idx]))
    return shards


def main(
    clients: int = 40,
    classes_per_client: int = 2,
    per_client: int = 20,
    rounds: int = 10,
    local_steps: int = 20,
    meta_iterations: int = 10,
    lr: float = 0.1,
    momentum: float = 0.9,
    meta_lr: float = 0.005,
    hidden: int = 32,
    start_strength: float = 1e-4,
    out: str | None = "demo_output/flagship.png",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    start = time.perf_counter()
    x, y, x_test, y_test = digits(seed)
    val = (x[:300], y[:300])
    shards = label_skewed_split(x[300:], y[300:], clients, classes_per_client, per_client, seed)
    histogram = torch.stack(
        [torch.bincount(s[1], minlength=10).float() / len(s[1]) for s in shards]
    )
    padded = hg.clients.pad(shards)
    steps = rounds * local_steps
    # Full-batch local steps: every client uses all its examples at every step.
    (bx, by), mask = hg.clients.batches(padded, steps)
    batches = ((bx, by, histogram.expand(steps, *histogram.shape)), mask)

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    init, _ = hg.split(model)
    names = list(init)
    params = {**init, **{ANCHOR + k: v for k, v in init.items()}}  # weights + the server copy
    aux_model = nn.Linear(10, len(LAYERS))  # label histogram -> one strength per layer
    aux = {
        "weight": torch.zeros(len(LAYERS), 10),
        "bias": torch.full((len(LAYERS),), start_strength),
    }

    def strengths(aux_params, hist):
        return hg.call(aux_model, aux_params, hist).clamp_min(0)  # max(0, A h + b)

    def client_loss(p, aux_params, batch):  # one client; vmapped over all of them
        (xb, yb, hist), m = batch
        logits = hg.call(model, {k: p[k] for k in names}, xb)
        task = hg.clients.masked_mean(F.cross_entropy(logits, yb, reduction="none"), m)
        s = strengths(aux_params, hist)
        pull = [sum(((p[k] - p[ANCHOR + k]) ** 2).sum() for k in keys) for keys in LAYERS.values()]
        return task + sum(s[i] * d for i, d in enumerate(pull))

    def aggregate(stacked):  # FedAvg, and the new server copy for the next round's penalty
        server = hg.clients.fedavg({k: stacked[k] for k in names}, weights=padded.sizes.float())
        return {**server, **{ANCHOR + k: v for k, v in server.items()}}

    def server_loss(server, aux_params, data):
        return F.cross_entropy(hg.call(model, {k: server[k] for k in names}, data[0]), data[1])

    step_sizes = {k: (0.0 if k.startswith(ANCHOR) else lr) for k in params}
    opt = hg.optim.sgd(lr=step_sizes, momentum=momentum)
    run = {"in_dims": {"params": None}, "rounds": rounds, "aggregate": aggregate}

    def metrics(aux_params) -> dict:
        traj = hg.clients.unroll(client_loss, params, opt, batches, aux=aux_params, **run)
        server = {k: v.detach() for k, v in aggregate(traj.params).items() if k in names}
        logits = hg.call(model, server, x_test)
        return {
            "val_loss": server_loss(server, None, val).item(),
            "test_loss": F.cross_entropy(logits, y_test).item(),
            "test_accuracy": accuracy(logits, y_test),
        }

    meta_opt = hg.optim.adam(lr=meta_lr)
    meta_state = meta_opt.init(aux)
    val_curve = []
    bar = tqdm(range(meta_iterations), desc="meta-learning", unit="run", disable=not progress)
    for _ in bar:
        g = hg.clients.hypergrad(
            server_loss, client_loss, params, opt, batches, val, aux=aux, **run
        )  # through all rounds * local_steps steps of every client
        val_curve.append(g.value.item())
        bar.set_postfix(server_val_loss=f"{val_curve[-1]:.4f}")
        aux, meta_state = meta_opt.step(aux, g.aux, meta_state)

    table = {"FedAvg (before)": metrics({k: torch.zeros_like(v) for k, v in aux.items()})}
    table["learned (after)"] = metrics(aux)
    val_curve.append(table["learned (after)"]["val_loss"])
    learned = strengths(aux, histogram).detach()

    print(
        f"\n{len(shards)} clients x {per_client} examples of {classes_per_client} classes, "
        f"{rounds} rounds x {local_steps} local steps (SGD, momentum {momentum}), "
        f"{meta_iterations} meta-iterations through all {steps} steps"
    )
    print(f"{'server model':18s} {'val loss':>9s} {'test loss':>10s} {'test acc':>9s}")
    for name, m in table.items():
        print(f"{name:18s} {m['val_loss']:9.4f} {m['test_loss']:10.4f} {m['test_accuracy']:9.3f}")
    for i, layer in enumerate(LAYERS):
        s = learned[:, i]
        print(
            f"learned strength, {layer}: mean {s.mean():.4f} (min {s.min():.4f}, "
            f"max {s.max():.4f}); {int((s > 0).sum())} of {len(s)} clients > 0"
        )
    before, after = table["FedAvg (before)"], table["learned (after)"]
    verdict = "beats" if after["test_loss"] < before["test_loss"] else "does NOT beat"
    print(f"on held-out test loss, the learned regulariser {verdict} plain FedAvg")
    result = {"table": table, "val_curve": val_curve, "strengths": learned, "aux": aux}
    result["clients"] = len(shards)
    if out:
        result["plot"] = plot(result, out)
        print(f"plot saved to {result['plot']}")
    result["seconds"] = time.perf_counter() - start
    print(f"total time: {result['seconds']:.1f} s")
    return result


def plot(result: dict, out: str) -> str:
    """Server validation loss over meta-iterations (FedAvg line), and the learned strengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    curve = result["val_curve"]
    left.plot(range(len(curve)), curve, marker="o", label="learned per-client penalty")
    fedavg = result["table"]["FedAvg (before)"]["val_loss"]
    left.axhline(fedavg, color="gray", linestyle="--", label="plain FedAvg (no penalty)")
    left.set_xlabel("meta-iteration")
    left.set_ylabel("server validation loss after all rounds")
    left.legend()
    s = result["strengths"]
    for i, layer in enumerate(LAYERS):
        right.scatter(range(len(s)), s[:, i], label=layer, s=14)
    right.set_xlabel("client")
    right.set_ylabel("learned proximal strength")
    right.legend(ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return os.path.abspath(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--meta-iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_output/flagship.png", help="where to save the plot")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the other cores free
    main(
        clients=args.clients,
        rounds=args.rounds,
        local_steps=args.local_steps,
        meta_iterations=args.meta_iterations,
        seed=args.seed,
        out=args.out,
    )

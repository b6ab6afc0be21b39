"""Learning rates adapted online, during one long training run, from ``Hypergradient.trajectory``.

An MLP trains with Adam on mini-batches of scikit-learn's digits for ``windows * T`` steps, one
run. Its learning rates, one per layer (shared by the layer's weight and bias) and learned as
logs, are adapted every ``T`` steps: ``hg.hypergrad`` differentiates the validation loss after
the next ``T`` steps with respect to the log-rates (``hyperparams=`` a function of ``aux``, so
``g.aux`` is that gradient), and training *continues from the trajectory that same call
returns* (``g.trajectory.params`` and ``.state``): no second unroll. The meta-optimizer (Adam)
then steps the log-rates. This is greedy, online hypergradient descent (Baydin et al., 2018;
Franceschi et al., 2017 "RTHO") with a horizon of T steps.

The baseline trains the same run with every fixed rate of a grid (the initial rate among them).

Run: ``python examples/online_learning_rates.py``
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _digits import accuracy, digits, mlp

import hypergrad as hg

LAYERS = ("0", "2", "4")  # the Linear layers of _digits.mlp


def rates(aux: dict[str, torch.Tensor]) -> dict:
    """The optimizer's hyperparameters from the meta-parameters: one rate per layer, as a log."""
    lr = aux["log_lr"].exp()
    return {"lr": {f"{layer}.{kind}": lr[i] for i, layer in enumerate(LAYERS)
                   for kind in ("weight", "bias")}}  # fmt: skip


def main(
    windows: int = 40,
    T: int = 10,
    batch: int = 32,
    lr: float = 3e-3,
    meta_lr: float = 0.1,
    grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2),
    seed: int = 0,
) -> dict:
    x, y, x_test, y_test = digits(seed)
    n_val = 300
    train, val = (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])
    model = mlp(seed=seed)
    init, _ = hg.split(model)

    def loss(params, aux, data):
        return F.cross_entropy(hg.call(model, params, data[0]), data[1])

    steps = windows * T
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.randint(len(train[0]), (steps, batch), generator=g)
    batches = (train[0][rows], train[1][rows])  # one mini-batch per step, stacked
    opt = hg.optim.adam(lr=lr)

    # The online loop: one hypergradient per window, training continues from its trajectory.
    meta = {"log_lr": torch.full((len(LAYERS),), lr).log()}
    meta_opt = hg.optim.adam(lr=meta_lr)
    meta_state = meta_opt.init(meta)
    params, state = init, None
    history = []
    start = time.perf_counter()
    for w in range(windows):
        window = tuple(b[w * T : (w + 1) * T] for b in batches)
        g = hg.hypergrad(loss, loss, params, opt, window, val, aux=meta, state=state,
                         hyperparams=rates, seed=w)  # fmt: skip
        params, state = g.trajectory.params, g.trajectory.state  # continue: no second unroll
        meta, meta_state = meta_opt.step(meta, g.aux, meta_state)
        history.append((g.value.item(), *meta["log_lr"].exp().tolist()))
    online_seconds = time.perf_counter() - start

    def final_losses(trained):
        logits = hg.call(model, trained, x_test)
        return (
            loss(trained, None, val).item(),
            F.cross_entropy(logits, y_test).item(),
            accuracy(logits, y_test),
        )

    online = final_losses(params)
    fixed = {}
    for rate in grid:  # the same run with a fixed rate: one unroll of all the steps
        trained = hg.unroll(loss, init, opt, batches, hyperparams={"lr": rate}, seed=0).params
        fixed[rate] = final_losses(trained)
    best = min(fixed, key=lambda r: fixed[r][0])  # the best fixed rate, chosen on validation

    print(f"{steps} Adam steps, rates adapted every {T} ({windows} hypergradients, "
          f"{online_seconds:.2f} s)")  # fmt: skip
    print(f"{'':28s} {'val loss':>9s} {'test loss':>9s} {'test acc':>9s}")
    for rate, (v, t, a) in fixed.items():
        print(f"{f'fixed lr {rate:g}':28s} {v:9.4f} {t:9.4f} {a:9.3f}")
    print(f"{'online, per-layer':28s} {online[0]:9.4f} {online[1]:9.4f} {online[2]:9.3f}")
    final = meta["log_lr"].exp().tolist()
    print("learned rates per layer: " + ", ".join(f"{r:.4f}" for r in final))
    return {
        "history": history,  # per window: the validation loss after it, the rates after it
        "online": online,
        "fixed": fixed,
        "initial_rate": lr,
        "best_fixed_rate": best,
        "rates": final,
        "seconds": online_seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--T", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(windows=args.windows, T=args.T)

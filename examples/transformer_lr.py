"""A learned learning rate per block of a small transformer, by hypergradient descent.

scikit-learn's 8x8 digits, each read as a sequence of 8 rows of 8 pixels: a row embedding with
learned positions, one pre-norm encoder layer (multi-head self-attention and a feed-forward
block), a final layer norm, a mean over the rows and a linear head. It trains for ``K`` Adam steps
on a small training split. Each block (the embedding, the attention, the feed-forward block, the
layer norms, the head) has its own learning rate, kept in log space: a per-parameter dict of
learning rates for the optimizer. Each meta-iteration unrolls the K steps from the same initial
weights, takes the gradient of the validation loss with respect to every learning rate
(``wrt="lr"``) through the K steps, attention included, and updates the log learning rates
with Adam. The baseline trains with the initial learning rates kept fixed.

Run: ``python examples/transformer_lr.py``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _digits import accuracy, digits
from torch import nn

import hypergrad as hg

BLOCKS = ("embedding", "attention", "feed-forward", "norms", "head")


class RowTransformer(nn.Module):
    """An 8x8 image as a sequence of 8 rows: embedding, one encoder layer, mean, linear head."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.position = nn.Parameter(0.1 * torch.randn(8, d))
        self.layer = nn.TransformerEncoderLayer(
            d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.view(-1, 8, 8)
        h = self.layer(self.embed(rows) + self.position)
        return self.head(self.norm(h).mean(1))


def block_of(name: str) -> str:
    """Which block a parameter belongs to, by its name."""
    if name.startswith(("embed.", "position")):
        return "embedding"
    if ".self_attn." in name:
        return "attention"
    if ".linear" in name:
        return "feed-forward"
    if "norm" in name:
        return "norms"
    return "head"


def main(
    meta_iterations: int = 12,
    steps: int = 25,
    n_train: int = 300,
    n_val: int = 300,
    lr: float = 3e-3,
    meta_lr: float = 0.2,
    seed: int = 0,
) -> dict:
    x, y, x_test, y_test = digits(seed)
    train = (x[:n_train], y[:n_train])
    val = (x[n_train : n_train + n_val], y[n_train : n_train + n_val])
    torch.manual_seed(seed)
    model = RowTransformer()
    init, _ = hg.split(model)
    names = list(init)
    blocks = {name: BLOCKS.index(block_of(name)) for name in names}

    def loss(params, aux, batch):
        return F.cross_entropy(hg.call(model, params, batch[0]), batch[1])

    def learning_rates(log_lr: torch.Tensor) -> dict:
        """The optimizer's per-parameter learning rates from one log rate per block."""
        return {"lr": {name: log_lr[blocks[name]].exp() for name in names}}

    batches = tuple(t.expand(steps, *t.shape) for t in train)  # full batch at every step
    opt = hg.optim.adam(lr={name: lr for name in names})

    def trained(hyperparams):
        return hg.unroll(loss, init, opt, batches, hyperparams=hyperparams).params

    log_lr = torch.full((len(BLOCKS),), lr).log()
    meta_opt = hg.optim.adam(lr=meta_lr)
    meta_state = meta_opt.init(log_lr)
    val_losses, history = [], [log_lr.exp()]
    for _ in range(meta_iterations):
        # learning_rates is differentiable: pull the hypergradient back to the log rates
        hyperparams, pullback = torch.func.vjp(learning_rates, log_lr)
        g = hg.hypergrad(loss, loss, init, opt, batches, val, hyperparams=hyperparams, wrt="lr")
        val_losses.append(g.value.item())
        (meta_grad,) = pullback(g.hyperparams)
        log_lr, meta_state = meta_opt.step(log_lr, meta_grad, meta_state)
        history.append(log_lr.exp())

    fixed = trained(learning_rates(torch.full((len(BLOCKS),), lr).log()))
    learned = trained(learning_rates(log_lr))
    val_losses.append(loss(learned, None, val).item())
    result = {
        "val_loss": val_losses,  # one per meta-iteration, and the final one
        "lr_history": torch.stack(history),  # (meta-iterations + 1, blocks)
        "learned_lr": dict(zip(BLOCKS, log_lr.exp().tolist())),
    }
    for label, params in (("fixed", fixed), ("learned", learned)):
        result[f"{label}_test_loss"] = loss(params, None, (x_test, y_test)).item()
        result[f"{label}_test_accuracy"] = accuracy(hg.call(model, params, x_test), y_test)

    print(f"{'':16s} {'fixed':>9s} {'learned':>9s}")
    for what in ("test_loss", "test_accuracy"):
        fixed_value, learned_value = result[f"fixed_{what}"], result[f"learned_{what}"]
        print(f"{what.replace('_', ' '):16s} {fixed_value:9.4f} {learned_value:9.4f}")
    for block in BLOCKS:
        print(f"{'lr, ' + block:16s} {lr:9.4f} {result['learned_lr'][block]:9.4f}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-iterations", type=int, default=12)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    main(meta_iterations=args.meta_iterations, steps=args.steps)

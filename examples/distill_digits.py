"""Dataset distillation on the digits: ten learned images that train a fresh network.

The auxiliary is a set of ten 8x8 images, one per class. The inner problem trains a network
from a *random initialisation* on those ten images alone (K SGD steps, full batch); the outer
loss is the trained network's cross-entropy on real training images. The hypergradient with
respect to the images tells how to change each pixel so that training on them works better;
Adam on the pixels learns them (Wang et al., 2018).

Learned for one initialisation, the images would fit that one network. So every meta-step
trains several random initialisations at once, as tasks: ``hg.Clients(outer="each")`` with the
inits stacked (``in_dims={"params": 0}``, fresh ones every meta-step), no batches (the training
data is ``aux``: each step's batch is ``None``, ``in_dims={"batches": None}``), and one shared
batch of real images for every init (``in_dims={"outer_batch": None}``). The meta-loss is the
mean over the inits; its gradient, one call.

At the end, new random initialisations are trained with the same K steps on the ten distilled
images and, as the baseline, on ten random real images (one per class), and both are tested
on held-out digits.

Run: ``python examples/distill_digits.py``
"""

from __future__ import annotations

import argparse

import torch
from _digits import accuracy, digits
from torch import nn

import hypergrad as hg

CLASSES = 10


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, CLASSES))


def main(
    meta_iterations: int = 100,
    inits: int = 4,
    steps: int = 10,
    lr: float = 0.5,
    meta_lr: float = 0.1,
    real_batch: int = 256,
    test_inits: int = 10,
    seed: int = 0,
) -> dict:
    x_train, y_train, x_test, y_test = digits(seed)
    model = make_model(seed)
    labels = torch.arange(CLASSES)  # one distilled image per class, labels fixed
    gen = torch.Generator().manual_seed(seed)

    def inner_loss(params, images, batch):  # batch is None: the data is aux
        return nn.functional.cross_entropy(hg.call(model, params, images), labels)

    def outer_loss(params, images, batch):
        x, y = batch
        return nn.functional.cross_entropy(hg.call(model, params, x), y)

    opt = hg.optim.sgd(lr=lr)
    tasks = hg.Clients(in_dims={"batches": None, "outer_batch": None}, outer="each")

    def fresh_inits(n: int, first_seed: int):
        return hg.stack([make_model(first_seed + i) for i in range(n)])[0]

    def trained(images, params):
        return hg.unroll(inner_loss, params, opt, None, steps=steps, aux=images,
                         clients=tasks).params  # fmt: skip

    images = 0.5 + 0.1 * torch.randn(CLASSES, 64, generator=gen)
    meta_opt = hg.optim.adam(lr=meta_lr)
    meta_state = meta_opt.init(images)
    meta_losses = []
    for it in range(meta_iterations):
        rows = torch.randint(len(x_train), (real_batch,), generator=gen)
        g = hg.hypergrad(
            outer_loss,
            inner_loss,
            fresh_inits(inits, 1000 + it * inits),  # new random inits every meta-step
            opt,
            None,  # no batches: the data is aux
            (x_train[rows], y_train[rows]),
            steps=steps,
            aux=images,
            clients=tasks,
        )
        meta_losses.append(g.value.item())
        images, meta_state = meta_opt.step(images, g.aux, meta_state)

    # Fresh inits, never seen in meta-training: the distilled images against real ones.
    real = torch.stack([x_train[y_train == c][0] for c in range(CLASSES)])
    test = fresh_inits(test_inits, 10**6)
    result: dict = {"meta_loss": meta_losses, "images": images, "real": real}
    for name, data in (("distilled", images), ("real", real)):
        finals = trained(data, test)
        accs = [accuracy(hg.call(model, p, x_test), y_test) for p in hg.unstack(finals)]
        result[f"{name}_accuracy"] = sum(accs) / len(accs)
    print(f"test accuracy of {test_inits} fresh inits after {steps} steps on 10 images")
    print(f"  distilled images   {result['distilled_accuracy']:.3f}")
    print(f"  real images        {result['real_accuracy']:.3f}  (one per class)")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-iterations", type=int, default=100)
    args = parser.parse_args()
    main(meta_iterations=args.meta_iterations)

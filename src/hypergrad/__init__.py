"""hypergrad: functional hypergradients for PyTorch, built on torch.func.

Differentiate through training: the gradient of a loss after K optimizer steps with respect to
another model, learning rates, weight decays, per-example weights or the initial weights.
"""

from hypergrad import nn, optim, tree
from hypergrad.nn import call, load, split, stack, unstack

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "call",
    "load",
    "nn",
    "optim",
    "split",
    "stack",
    "tree",
    "unstack",
]

"""hypergrad: functional hypergradients for PyTorch, built on torch.func.

Differentiate through training: the gradient of a loss after K optimizer steps with respect to
another model, learning rates, weight decays, per-example weights or the initial weights.
"""

from hypergrad import clients, nn, optim, testing, tree
from hypergrad._clients import Clients
from hypergrad._engine.compile import Compile, CompileError, CompileFallbackWarning
from hypergrad.hypergradient import Hypergradient, hypergrad
from hypergrad.methods import (
    Checkpointed,
    Forward,
    Implicit,
    ImplicitReport,
    ImplicitWarning,
    Truncated,
)
from hypergrad.methods._revolve import CheckpointCost, checkpoint_cost
from hypergrad.nn import call, load, split, stack, unstack
from hypergrad.trajectory import Trajectory, unroll

__version__ = "0.1.0"

__all__ = [
    "CheckpointCost",
    "Checkpointed",
    "Clients",
    "Compile",
    "CompileError",
    "CompileFallbackWarning",
    "Forward",
    "Hypergradient",
    "Implicit",
    "ImplicitReport",
    "ImplicitWarning",
    "Trajectory",
    "Truncated",
    "__version__",
    "call",
    "checkpoint_cost",
    "clients",
    "hypergrad",
    "load",
    "nn",
    "optim",
    "split",
    "stack",
    "testing",
    "tree",
    "unroll",
    "unstack",
]

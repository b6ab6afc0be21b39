"""Functional, out-of-place, differentiable optimizers that follow torch.optim exactly."""

from hypergrad.optim._base import Optimizer
from hypergrad.optim.adam import AdamState, adam, adamw
from hypergrad.optim.sgd import SGDState, sgd

__all__ = ["AdamState", "Optimizer", "SGDState", "adam", "adamw", "sgd"]

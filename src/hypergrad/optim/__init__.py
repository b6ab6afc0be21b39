"""Functional, out-of-place, differentiable optimizers that follow torch.optim exactly."""

from hypergrad.optim._base import Optimizer
from hypergrad.optim.adagrad import AdagradState, adagrad
from hypergrad.optim.adam import AdamState, adam, adamw
from hypergrad.optim.rmsprop import RMSpropState, rmsprop
from hypergrad.optim.sgd import SGDState, sgd
from hypergrad.optim.torch import from_torch

__all__ = [
    "AdagradState",
    "AdamState",
    "Optimizer",
    "RMSpropState",
    "SGDState",
    "adagrad",
    "adam",
    "adamw",
    "from_torch",
    "rmsprop",
    "sgd",
]

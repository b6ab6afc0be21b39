"""Functional, out-of-place, differentiable optimizers that follow torch.optim exactly."""

from hypergrad.optim._base import Optimizer

__all__ = ["Optimizer"]

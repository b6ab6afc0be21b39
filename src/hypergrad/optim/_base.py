"""The functional optimizer type shared by every family.

An :class:`Optimizer` is a pair of pure functions, ``init`` and ``step``, plus two dicts:

- ``hyperparams``: the *numbers* (lr, momentum, betas, eps, weight_decay, ...). Each may be a
  Python float, a 0-d tensor, a per-parameter dict keyed like the params, or a per-element tensor
  shaped like the parameter. They are an explicit pytree input of ``step``, so a hypergradient
  with respect to any of them is an ordinary gradient with respect to an input.
- ``options``: static switches (nesterov, maximize, amsgrad, ...) that change the program, not a
  number in it; they are never differentiated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from hypergrad.tree import PyTree

__all__ = ["Optimizer"]


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """A functional, out-of-place, differentiable optimizer.

    Build one with a family constructor such as :func:`hypergrad.optim.sgd`, not directly.

    Attributes:
        name: the family, e.g. ``"sgd"``.
        hyperparams: differentiable hyperparameters (see the module docstring).
        options: static options.
        init_fn: ``init_fn(params, options) -> state``.
        update_fn: ``update_fn(params, grads, state, hyperparams, options) -> (params, state)``.
    """

    name: str
    hyperparams: Mapping[str, Any]
    options: Mapping[str, Any]
    init_fn: Callable[[PyTree, Mapping[str, Any]], PyTree]
    update_fn: Callable[..., tuple[PyTree, PyTree]]

    def init(self, params: PyTree, /) -> PyTree:
        """Create the optimizer state for ``params`` (a pytree; never modifies ``params``)."""
        return self.init_fn(params, self.options)

    def step(
        self,
        params: PyTree,
        grads: PyTree,
        state: PyTree,
        /,
        *,
        hyperparams: Mapping[str, Any] | None = None,
    ) -> tuple[PyTree, PyTree]:
        """One update: return ``(new_params, new_state)``; the inputs are left untouched.

        Args:
            params: the current parameters.
            grads: gradients with the same structure as ``params``.
            state: the state returned by :meth:`init` or a previous :meth:`step`.
            hyperparams: optional replacement for :attr:`hyperparams` (same keys); pass tensors
                here to differentiate with respect to them.
        """
        hp = self.hyperparams if hyperparams is None else hyperparams
        return self.update_fn(params, grads, state, hp, self.options)

    def replace(self, **changes: Any) -> Optimizer:
        """Return a copy with some hyperparameters or options replaced, e.g. ``opt.replace(lr=t)``.

        Raises:
            ValueError: a name that is neither a hyperparameter nor an option of this family.
        """
        hp, opts = dict(self.hyperparams), dict(self.options)
        for key, value in changes.items():
            if key in hp:
                hp[key] = value
            elif key in opts:
                opts[key] = value
            else:
                known = ", ".join(sorted([*hp, *opts]))
                raise ValueError(
                    f"{self.name}.replace: unknown name {key!r}; this optimizer has: {known}."
                )
        return dataclasses.replace(self, hyperparams=hp, options=opts)

    def __repr__(self) -> str:
        items = [*(f"{k}={v!r}" for k, v in self.hyperparams.items())]
        items += [f"{k}={v!r}" for k, v in self.options.items()]
        return f"hg.optim.{self.name}({', '.join(items)})"

"""The functional optimizer type shared by every family.

An [`Optimizer`][hypergrad.optim.Optimizer] is a pair of pure functions, ``init`` and ``step``, plus
two dicts:

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

import torch

from hypergrad._boundary import caller, entered, is_number
from hypergrad.optim._hyper import check_forms
from hypergrad.tree import PyTree

__all__ = ["Optimizer"]


def _numbers(value: Any) -> bool:
    """Whether a hyperparameter holds only Python numbers (no tensor)."""
    if isinstance(value, tuple):
        return all(_numbers(v) for v in value)
    if isinstance(value, Mapping):
        return all(_numbers(v) for v in value.values())
    return is_number(value)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """A functional, out-of-place, differentiable optimizer.

    Build one with a family constructor such as [`hg.optim.sgd`][hypergrad.optim.sgd], not directly.

    Attributes:
        name: the family, e.g. ``"sgd"``.
        hyperparams: differentiable hyperparameters (see the module docstring).
        options: static options.
        init_fn: ``init_fn(params, hyperparams, options) -> state``.
        update_fn: ``update_fn(params, grads, state, hyperparams, options) -> (params, state)``.
        check_fn: optional ``check_fn(hyperparams, options)`` that raises ``ValueError`` for
            invalid values; run by [`replace`][hypergrad.optim.Optimizer.replace].
        elementwise: whether the update is one elementwise formula over the flattened leaves,
            given scalar hyperparameters and a state ``(step, buffers like params)`` (the
            built-in families). Then stacked client models can be updated as one model.

    Examples:
        >>> opt = hg.optim.sgd(lr=0.5)
        >>> params = {"w": torch.tensor([1.0])}
        >>> new, _ = opt.step(params, {"w": torch.tensor([2.0])}, opt.init(params))
        >>> new, params  # out of place: the input is untouched
        ({'w': tensor([0.])}, {'w': tensor([1.])})
        >>> lr = torch.tensor(0.5, requires_grad=True)  # differentiate w.r.t. a hyperparameter
        >>> new, _ = opt.step(params, {"w": torch.tensor([2.0])}, opt.init(params), hyperparams={"lr": lr})
        >>> torch.autograd.grad(new["w"].sum(), lr)
        (tensor(-2.),)
    """

    name: str
    hyperparams: Mapping[str, Any]
    options: Mapping[str, Any]
    init_fn: Callable[[PyTree, Mapping[str, Any], Mapping[str, Any]], PyTree]
    update_fn: Callable[..., tuple[PyTree, PyTree]]
    check_fn: Callable[[Mapping[str, Any], Mapping[str, Any]], None] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )
    elementwise: bool = dataclasses.field(default=False, repr=False, compare=False)

    def init(self, params: PyTree, /, *, hyperparams: Mapping[str, Any] | None = None) -> PyTree:
        """Create the optimizer state for ``params`` (a pytree; never modifies ``params``).

        Args:
            params: the parameters the optimizer will update.
            hyperparams: optional replacements for some of
                [`hyperparams`][hypergrad.optim.Optimizer.hyperparams] (only Adagrad's
                ``initial_accumulator_value`` enters the initial state).

        Examples:
            >>> state = hg.optim.adam(lr=0.1).init({"w": torch.zeros(3)})
            >>> type(state).__name__, state.step
            ('AdamState', tensor(0.))
        """
        with entered(f"hg.optim.{self.name}.init"):
            return self.init_fn(params, self.merged(hyperparams), self.options)

    def merged(self, hyperparams: Mapping[str, Any] | None) -> Mapping[str, Any]:
        """The hyperparameters with ``hyperparams``' replacements, checked as the constructor.

        Replacements that are numbers (floats, tuples or per-parameter dicts of floats) are
        checked as ``hg.optim.<family>(...)`` checks them, so a negative learning rate is refused
        here too. Tensor replacements are checked for their form only: they are differentiable
        inputs, which a finite-difference check or a line search may step just outside the
        range (a learning rate of ``-1e-6`` near 0).

        Raises:
            ValueError: ``hyperparams`` is not a dict, names an unknown hyperparameter, or
                holds a value out of range.

        Examples:
            >>> hg.optim.sgd(lr=0.1).merged({"lr": 0.5})["lr"]
            0.5
            >>> hg.optim.sgd(lr=0.1).merged({"lr": -0.5})
            Traceback (most recent call last):
            ...
            ValueError: hypergrad: invalid lr: -0.5; it must be >= 0.0, as in torch.optim.
        """
        if hyperparams is None:
            return self.hyperparams
        if not isinstance(hyperparams, Mapping):
            raise ValueError(
                f"{caller()}: hyperparams must be a dict such as "
                f"{{'lr': torch.tensor(0.1)}}, got a {type(hyperparams).__name__}."
            )
        unknown = [k for k in hyperparams if k not in self.hyperparams]
        if unknown:
            known = ", ".join(self.hyperparams)
            raise ValueError(
                f"{caller()}: unknown hyperparameter {unknown[0]!r}; this "
                f"optimizer has: {known}. Static options ({', '.join(self.options)}) are changed "
                "with opt.replace(...), not per step."
            )
        merged = {**self.hyperparams, **hyperparams}
        if self.check_fn is not None:
            numbers = {k: v for k, v in hyperparams.items() if _numbers(v)}
            self.check_fn({**self.hyperparams, **numbers}, self.options)
            check_forms({k: v for k, v in hyperparams.items() if k not in numbers})
        return merged

    def tensor_hyperparams(
        self, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> dict[str, Any]:
        """The hyperparameters with every number turned into a 0-d tensor (tensors kept as is).

        The result is the natural input of a function you differentiate with ``torch.func``:
        pass it (or a function of it) as ``hyperparams=`` to
        [`step`][hypergrad.optim.Optimizer.step].

        Args:
            dtype: dtype of the new tensors; use the params' dtype (default: torch's default).
            device: device of the new tensors.

        Examples:
            >>> hg.optim.sgd(lr=0.1, momentum=0.9).tensor_hyperparams(dtype=torch.float64)["lr"]
            tensor(0.1000, dtype=torch.float64)
        """

        def convert(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value
            if isinstance(value, tuple):
                return tuple(convert(v) for v in value)
            if isinstance(value, Mapping):
                return {k: convert(v) for k, v in value.items()}
            return torch.tensor(float(value), dtype=dtype, device=device)

        return {k: convert(v) for k, v in self.hyperparams.items()}

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
            state: the state returned by [`init`][hypergrad.optim.Optimizer.init] or a previous
                [`step`][hypergrad.optim.Optimizer.step].
            hyperparams: optional replacements for some or all of
                [`hyperparams`][hypergrad.optim.Optimizer.hyperparams] (missing names keep their
                value); pass tensors here to differentiate with respect to them.

        Raises:
            ValueError: ``grads`` or the state's buffers are not keyed or shaped like
                ``params``, an unknown hyperparameter name is given, or a given value is out of
                range (as the constructor checks it).
            TypeError: an integer tensor in ``params`` or ``grads``.

        Examples:
            >>> opt = hg.optim.sgd(lr=0.5)
            >>> params = {"w": torch.tensor([1.0, 2.0])}
            >>> new, state = opt.step(params, {"w": torch.tensor([1.0, 1.0])}, opt.init(params))
            >>> new["w"]
            tensor([0.5000, 1.5000])
        """
        with entered(f"hg.optim.{self.name}.step"):
            hp = self.merged(hyperparams)
            return self.update_fn(params, grads, state, hp, self.options)

    def update(
        self, params: PyTree, grads: PyTree, state: PyTree, hyperparams: Mapping[str, Any]
    ) -> tuple[PyTree, PyTree]:
        """[`step`][hypergrad.optim.Optimizer.step] for a loop that checked ``hyperparams`` once.

        The replacements are neither checked nor named in messages: the engine's step runs it
        K times with hyperparameters its front door checked (``merged``), and its messages name
        the public call in progress.
        """
        return self.update_fn(
            params, grads, state, {**self.hyperparams, **hyperparams}, self.options
        )

    def replace(self, **changes: Any) -> Optimizer:
        """Return a copy with some hyperparameters or options replaced, e.g. ``opt.replace(lr=t)``.

        Raises:
            ValueError: a name that is neither a hyperparameter nor an option of this family.
        """
        hp, opts = dict(self.hyperparams), dict(self.options)
        with entered(f"hg.optim.{self.name}.replace"):
            for key, value in changes.items():
                if key in hp:
                    hp[key] = value
                elif key in opts:
                    opts[key] = value
                else:
                    known = ", ".join(sorted([*hp, *opts]))
                    raise ValueError(
                        f"{caller()}: unknown name {key!r}; this optimizer has: {known}."
                    )
            if self.check_fn is not None:
                self.check_fn(hp, opts)
        return dataclasses.replace(self, hyperparams=hp, options=opts)

    def __repr__(self) -> str:
        items = [*(f"{k}={v!r}" for k, v in self.hyperparams.items())]
        items += [f"{k}={v!r}" for k, v in self.options.items()]
        return f"hg.optim.{self.name}({', '.join(items)})"

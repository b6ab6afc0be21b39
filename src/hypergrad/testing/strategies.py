"""Hypothesis strategies for property tests of bilevel code: models, optimizers, K, data.

Importing this module needs ``hypothesis`` (``pip install hypothesis``). Every strategy draws
float64 objects small enough for finite-difference checks, from integer seeds, so hypothesis can
shrink failures to a readable example.

Examples:
    >>> from hypothesis import given, settings
    >>> from hypergrad.testing import strategies as hst
    >>> @settings(max_examples=3, deadline=None)
    ... @given(hst.bilevel_problems(max_steps=2))
    ... def test_reverse_matches_finite_differences(problem):
    ...     hg.testing.check_hypergrad(**problem.kwargs(), method="reverse")
    >>> test_reverse_matches_finite_differences()
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from hypergrad import nn as _nn
from hypergrad import optim as _optim
from hypergrad.optim._base import Optimizer
from hypergrad.tree import PyTree

try:
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - exercised by the import-error test in a subprocess
    raise ImportError(
        "hg.testing.strategies needs hypothesis, which is not installed. Install it with "
        "`pip install hypothesis` (or `pip install torch-hypergrad[test]`)."
    ) from None

__all__ = [
    "FAMILIES",
    "BilevelProblem",
    "bilevel_problems",
    "data",
    "mlps",
    "optimizers",
    "unroll_steps",
]

FAMILIES = ("sgd", "adam", "adamw", "rmsprop", "adagrad")


class BilevelProblem(NamedTuple):
    """A small bilevel problem: regression with per-example weights and an L2 strength as aux.

    ``inner_loss(params, aux, (x, y))`` is the ``aux["weights"]``-weighted squared error plus
    ``aux["l2"]`` times the squared norm of the params; ``outer_loss(params, aux, (x, y))`` is
    the plain squared error on a validation batch.

    Examples:
        >>> from hypothesis import given, settings
        >>> from hypergrad.testing import strategies as hst
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(hst.bilevel_problems(families=("sgd",)))
        ... def test_reverse_is_finite(problem):
        ...     assert isinstance(problem, hst.BilevelProblem)
        ...     g = hg.hypergrad(problem.outer_loss, problem.inner_loss, problem.params,
        ...                      problem.opt, problem.batches, problem.outer_batch, aux=problem.aux)
        ...     assert torch.isfinite(g.value)
        >>> test_reverse_is_finite()
    """

    outer_loss: Callable[..., torch.Tensor]
    inner_loss: Callable[..., torch.Tensor]
    params: PyTree
    opt: Optimizer
    batches: tuple[torch.Tensor, torch.Tensor]
    outer_batch: tuple[torch.Tensor, torch.Tensor]
    aux: PyTree
    model: torch.nn.Module

    def kwargs(self) -> dict[str, Any]:
        """Arguments of [`hg.hypergrad`][hypergrad.hypergrad] / ``check_hypergrad``, as a dict."""
        d = self._asdict()
        del d["model"]
        return d


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def mlps(
    draw: st.DrawFn,
    in_features: int = 3,
    out_features: int = 1,
    max_hidden: int = 4,
    max_layers: int = 2,
) -> torch.nn.Module:
    """A float64 MLP ``in -> [hidden, tanh]* -> out`` with 0 to ``max_layers`` hidden layers.

    Smooth activations only (tanh), so finite differences are meaningful.

    Examples:
        >>> from hypothesis import given, settings
        >>> from hypergrad.testing import strategies as hst
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(hst.mlps(in_features=4, out_features=2))
        ... def test_output_shape(model):
        ...     assert model(torch.zeros(7, 4, dtype=torch.float64)).shape == (7, 2)
        >>> test_output_shape()
    """
    widths = draw(st.lists(st.integers(1, max_hidden), min_size=0, max_size=max_layers))
    seed = draw(st.integers(0, 2**31 - 1))
    sizes = [in_features, *widths, out_features]
    layers: list[torch.nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(torch.nn.Linear(a, b, dtype=torch.float64))
            if i < len(sizes) - 2:
                layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def _ranges(family: str) -> dict[str, tuple[float, float]]:
    if family == "sgd":
        return {"lr": (0.01, 0.2), "momentum": (0.0, 0.9), "dampening": (0.0, 0.5),
                "weight_decay": (0.0, 0.1)}  # fmt: skip
    if family in ("adam", "adamw"):
        return {"lr": (0.001, 0.05), "weight_decay": (0.0, 0.1), "eps": (1e-3, 1e-1)}
    if family == "rmsprop":
        return {"lr": (0.001, 0.02), "alpha": (0.8, 0.99), "eps": (1e-3, 1e-1),
                "weight_decay": (0.0, 0.1), "momentum": (0.0, 0.9)}  # fmt: skip
    return {"lr": (0.01, 0.1), "lr_decay": (0.0, 0.1), "weight_decay": (0.0, 0.1),
            "initial_accumulator_value": (0.01, 0.5), "eps": (1e-3, 1e-1)}  # fmt: skip


@st.composite
def optimizers(draw: st.DrawFn, families: Sequence[str] = FAMILIES) -> Optimizer:
    """An ``hg.optim`` optimizer of one of ``families`` with random, stable hyperparameters.

    Epsilons are drawn from ``[1e-3, 0.1]`` (not 1e-8) so that a finite-difference step on them
    stays meaningful; options (nesterov, amsgrad, centered) are drawn too.

    Examples:
        >>> from hypothesis import given, settings
        >>> from hypergrad.testing import strategies as hst
        >>> @settings(max_examples=5, deadline=None, database=None)
        ... @given(hst.optimizers(families=("adam", "sgd")))
        ... def test_family(opt):
        ...     assert opt.name in ("adam", "sgd")
        >>> test_family()
    """
    family = draw(st.sampled_from(list(families)))
    hp: dict[str, Any] = {
        k: draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))
        for k, (lo, hi) in _ranges(family).items()
    }
    if family in ("adam", "adamw"):
        hp["betas"] = (draw(st.floats(0.5, 0.95)), draw(st.floats(0.9, 0.999)))
        hp["amsgrad"] = draw(st.booleans())
    if family == "sgd" and hp["momentum"] > 0 and draw(st.booleans()):
        hp["nesterov"], hp["dampening"] = True, 0.0
    if family == "rmsprop":
        hp["centered"] = draw(st.booleans())
    return getattr(_optim, family)(**hp)


def unroll_steps(min_value: int = 1, max_value: int = 5) -> st.SearchStrategy[int]:
    """The number of inner steps K.

    Examples:
        >>> from hypothesis import given, settings
        >>> from hypergrad.testing import strategies as hst
        >>> @settings(max_examples=5, deadline=None, database=None)
        ... @given(hst.unroll_steps(2, 4))
        ... def test_range(k):
        ...     assert 2 <= k <= 4
        >>> test_range()
    """
    return st.integers(min_value, max_value)


@st.composite
def data(
    draw: st.DrawFn, steps: int, batch_size: int = 4, in_features: int = 3, out_features: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked float64 regression batches ``(x, y)`` shaped ``(steps, batch_size, ...)``.

    Examples:
        >>> from hypothesis import find
        >>> from hypergrad.testing import strategies as hst
        >>> x, y = find(hst.data(steps=5, batch_size=2), lambda xy: True)
        >>> x.shape, y.shape
        (torch.Size([5, 2, 3]), torch.Size([5, 2, 1]))
    """
    g = _seeded(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(steps, batch_size, in_features, generator=g, dtype=torch.float64)
    y = torch.randn(steps, batch_size, out_features, generator=g, dtype=torch.float64)
    return x, y


@st.composite
def bilevel_problems(
    draw: st.DrawFn,
    families: Sequence[str] = FAMILIES,
    max_steps: int = 4,
    batch_size: int = 4,
) -> BilevelProblem:
    """A complete bilevel problem (model, optimizer, K, data, aux) for property tests.

    Draws a [`BilevelProblem`][hypergrad.testing.strategies.BilevelProblem].

    Examples:
        >>> from hypothesis import given, settings
        >>> from hypergrad.testing import strategies as hst
        >>> @settings(max_examples=3, deadline=None, database=None)
        ... @given(hst.bilevel_problems(max_steps=2))
        ... def test_forward_matches_reverse(pb):
        ...     args = (pb.outer_loss, pb.inner_loss, pb.params, pb.opt, pb.batches, pb.outer_batch)
        ...     rev = hg.hypergrad(*args, aux=pb.aux, method="reverse", seed=0)
        ...     fwd = hg.hypergrad(*args, aux=pb.aux, method="forward", seed=0)
        ...     torch.testing.assert_close(fwd.aux, rev.aux, rtol=1e-8, atol=1e-10)
        >>> test_forward_matches_reverse()
    """
    model = draw(mlps())
    opt = draw(optimizers(families))
    steps = draw(unroll_steps(1, max_steps))
    x, y = draw(data(steps, batch_size))
    vx, vy = draw(data(1, batch_size))
    g = _seeded(draw(st.integers(0, 2**31 - 1)))
    aux = {
        "weights": 0.5 + torch.rand(batch_size, generator=g, dtype=torch.float64),
        "l2": torch.tensor(0.01, dtype=torch.float64),
    }
    params, _ = _nn.split(model)

    def inner_loss(p: PyTree, a: PyTree, batch: Any) -> torch.Tensor:
        xb, yb = batch
        err = ((_nn.call(model, p, xb) - yb) ** 2).sum(-1)
        penalty = sum((w**2).sum() for w in p.values())
        return (a["weights"] * err).mean() + a["l2"] * penalty

    def outer_loss(p: PyTree, a: PyTree, batch: Any) -> torch.Tensor:
        xb, yb = batch
        return ((_nn.call(model, p, xb) - yb) ** 2).mean()

    return BilevelProblem(outer_loss, inner_loss, params, opt, (x, y), (vx[0], vy[0]), aux, model)

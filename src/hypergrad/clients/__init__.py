"""Many models at once: C stacked clients trained with ``torch.func.vmap``, in federated rounds.

A *client* tree is an ordinary tree whose leaves carry a leading client dimension ``C``
([`hg.stack`][hypergrad.stack] builds one from modules). [`unroll`][hypergrad.clients.unroll] and
[`hypergrad`][hypergrad.clients.hypergrad] are [`hg.unroll`][hypergrad.unroll] and
[`hg.hypergrad`][hypergrad.hypergrad] for all clients at once: the same front door, with the
problem transformed by the clients transform (the engine's step vmapped over the clients, never
a Python loop), so every method works unchanged. ``in_dims`` says which inputs have a client
dimension, ``rounds`` and ``aggregate`` make it federated, ``chunk_size`` bounds memory. The
concepts page "Many clients with vmap" explains each, with BatchNorm buffers under vmap and the
cost; [`pad`][hypergrad.clients.pad], [`batches`][hypergrad.clients.batches] and
[`masked_mean`][hypergrad.clients.masked_mean] handle clients with different data sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hypergrad._boundary import entered
from hypergrad._clients import Clients
from hypergrad._clients.aggregation import broadcast, fedavg
from hypergrad.clients.data import Padded, batches, masked_mean, pad
from hypergrad.hypergradient import Hypergradient
from hypergrad.hypergradient import hypergrad as _hypergrad
from hypergrad.optim._base import Optimizer
from hypergrad.trajectory import Trajectory
from hypergrad.trajectory import unroll as _unroll
from hypergrad.tree import PyTree

__all__ = [
    "Padded",
    "batches",
    "broadcast",
    "fedavg",
    "hypergrad",
    "masked_mean",
    "pad",
    "unroll",
]


def unroll(
    inner_loss: Callable[..., Any],
    params: PyTree,
    opt: Optimizer,
    batches: Any,
    *,
    in_dims: Mapping[str, Any] | None = None,
    rounds: int = 1,
    aggregate: Callable[[PyTree], PyTree] | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
    process_group: Any = None,
    **options: Any,
) -> Trajectory:
    """Run K optimizer steps of every client at once (``torch.func.vmap``), for R rounds.

    ``hg.unroll(inner_loss, params, opt, batches, clients=hg.Clients(in_dims, rounds, ...),
    **options)``: the clients options are those of [`hg.Clients`][hypergrad.Clients], every other
    keyword (``aux``, ``state``, ``buffers``, ``steps`` = K per round, ``hyperparams``, ``seed``,
    ``progress``, ``inner_grad``, ``check_finite``, ``compile``) is
    [`hg.unroll`][hypergrad.unroll]'s. ``inner_loss(params, aux, batch)`` sees one client.

    Returns:
        ``Trajectory(params, state, buffers, losses)``: the clients' stacked values after the
        last local step (not aggregated; apply [`fedavg`][hypergrad.clients.fedavg] for the
        server), and ``losses`` of shape ``(rounds * K, C)``.

    Examples:
        >>> loss = lambda p, aux, x: ((p["w"] - x) ** 2).sum()
        >>> params = {"w": torch.zeros(4, 1)}                       # 4 clients
        >>> data = torch.arange(4.0).reshape(1, 4, 1).expand(3, 4, 1)  # 3 steps, one target each
        >>> traj = hg.clients.unroll(loss, params, hg.optim.sgd(lr=0.25), data)
        >>> traj.params["w"].flatten(), traj.losses.shape
        (tensor([0.0000, 0.8750, 1.7500, 2.6250]), torch.Size([3, 4]))
    """
    with entered("hg.clients.unroll", delegating=True):
        clients = Clients(
            in_dims, rounds, aggregate, weights, chunk_size, randomness, process_group
        )
        return _unroll(inner_loss, params, opt, batches, clients=clients, **options)


def hypergrad(
    outer_loss: Callable[..., Any],
    inner_loss: Callable[..., Any],
    params: PyTree,
    opt: Optimizer,
    batches: Any,
    outer_batch: Any,
    *,
    in_dims: Mapping[str, Any] | None = None,
    rounds: int = 1,
    aggregate: Callable[[PyTree], PyTree] | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
    process_group: Any = None,
    outer: str = "server",
    **options: Any,
) -> Hypergradient:
    """The gradient of a server-side outer loss through R rounds of K steps of C clients.

    ``hg.hypergrad(outer_loss, inner_loss, params, opt, batches, outer_batch,
    clients=hg.Clients(in_dims, rounds, ...), **options)``: the clients options are those of
    [`hg.Clients`][hypergrad.Clients], every other keyword (``aux``, ``method``, ``wrt``,
    ``state``, ``buffers``, ``steps`` = K per round, ``hyperparams``, ``seed``, ``progress``,
    ``inner_grad``, ``check_finite``, ``compile``) is [`hg.hypergrad`][hypergrad.hypergrad]'s.
    ``outer_loss(server_params, aux, outer_batch)`` receives the aggregate of the clients' final
    params (with ``outer="each"``, each client's own final params and its slice of
    ``outer_batch``, and the value is the mean over clients: tasks); ``wrt`` may name per-client hyperparameters (their gradient has the client
    dimension) and ``"params"`` (per client, or the one shared tree with
    ``in_dims={"params": None}``).

    Returns:
        ``Hypergradient(value, aux, hyperparams, params, solver, trajectory)``, as
        [`hg.hypergrad`][hypergrad.hypergrad]; ``trajectory`` holds the clients' stacked
        values after the last local step, as [`unroll`][hypergrad.clients.unroll] returns
        them (not aggregated: apply [`fedavg`][hypergrad.clients.fedavg], or your
        ``aggregate``, for the server's).

    Examples:
        Three clients pull their weight towards their own target plus a shared offset ``aux``;
        the server (their mean) should match 1.0. After 5 steps each client has moved
        ``1 - 0.8**5 = 0.672`` of the way, so the server sits at ``0.672 * (1 + aux) = 1.008``:

        >>> inner = lambda p, aux, t: ((p["w"] - t - aux) ** 2).sum()
        >>> outer = lambda server, aux, target: ((server["w"] - target) ** 2).sum()
        >>> targets = torch.tensor([[0.0], [1.0], [2.0]]).expand(5, 3, 1)  # 5 steps, 3 clients
        >>> g = hg.clients.hypergrad(outer, inner, {"w": torch.zeros(1)}, hg.optim.sgd(lr=0.1),
        ...     targets, torch.tensor([1.0]), aux=torch.tensor([0.5]), in_dims={"params": None})
        >>> round(g.value.item(), 4), round(g.aux.item(), 4)
        (0.0001, 0.0114)
    """
    with entered("hg.clients.hypergrad", delegating=True):
        clients = Clients(
            in_dims, rounds, aggregate, weights, chunk_size, randomness, process_group, outer
        )
        return _hypergrad(
            outer_loss, inner_loss, params, opt, batches, outer_batch, clients=clients, **options
        )

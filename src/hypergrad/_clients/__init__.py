"""The clients transform: many stacked models as one problem (``hg.Clients``).

``federated(setup, clients)`` turns the ``Setup`` of one model's call into the ``Problem`` of C
clients (the engine's step vmapped over them, in federated rounds) and, where the hypergradient
is taken chunk by chunk, the runner that does it. Modules: ``vmap`` (vmap over trees with
``None`` leaves), ``dims`` (``in_dims`` and the client count), ``step`` (the stacked step),
``aggregation`` (FedAvg, broadcast), ``federation`` (the transform), ``chunks`` (reverse mode
chunk by chunk).
"""

from __future__ import annotations

from hypergrad._clients.chunks import ByChunks
from hypergrad._clients.federation import Clients, federate
from hypergrad._engine.problem import Problem
from hypergrad._front import Runner, Setup

__all__ = ["Clients", "federated"]


def federated(setup: Setup, clients: Clients) -> tuple[Problem, Runner | None]:
    """The problem of ``setup`` over ``clients``, and the runner for chunks (``None``: the method)."""
    fed = federate(setup, clients)
    chunked = (
        fed.by_chunk and fed.clients.chunk_size is not None and fed.clients.chunk_size < fed.count
    )
    return fed.problem, ByChunks(fed) if chunked else None

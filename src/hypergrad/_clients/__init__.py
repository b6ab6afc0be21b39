"""The clients transform: many stacked models as one problem (``hg.Clients``).

``problem_of(setup)`` turns the ``Setup`` of a call with ``clients=`` into the ``Problem`` of C
clients (the engine's step vmapped over them, in federated rounds) and, where the hypergradient
is taken chunk by chunk, the runner that does it. Modules: ``vmap`` (vmap over trees with
``None`` leaves), ``dims`` (``in_dims`` and the client count), ``step`` (the stacked step),
``aggregation`` (FedAvg, broadcast), ``federation`` (the transform), ``tasks`` (one outer
loss per client, ``outer="each"``), ``norms`` (affine norms as elementary ops under the vmapped
inner gradient, where torch's rule is wrong), ``chunks`` (reverse mode chunk by chunk),
``ranks`` (many processes: collectives, faults).
"""

from __future__ import annotations

import contextlib
from typing import Any

from hypergrad._clients.chunks import ByChunks
from hypergrad._clients.federation import Clients, federate
from hypergrad._clients.ranks import AcrossRanks, RankFailure, spanning
from hypergrad._engine.problem import Problem
from hypergrad._front import Runner, Setup, single_problem

__all__ = ["Clients", "RankFailure", "across_ranks", "problem_of"]


def across_ranks(clients: Any) -> contextlib.AbstractContextManager[None]:
    """Around a public call: with ``clients.process_group``, every rank agrees on its outcome."""
    return spanning(getattr(clients, "process_group", None))


def problem_of(setup: Setup) -> tuple[Problem, Runner | None]:
    """The problem a public call describes, and its runner (``None``: the method itself).

    One model's problem, or with ``setup.clients`` the clients transform of it (and, where the
    hypergradient is taken chunk by chunk, the runner that does it).
    """
    if setup.clients is None:
        return single_problem(setup), None
    fed = federate(setup, setup.clients)
    size = fed.clients.chunk_size
    if fed.by_chunk and (fed.ranks is not None or (size is not None and size < fed.count)):
        return fed.problem, ByChunks(fed)
    how = setup.method
    if fed.ranks is not None and how is not None and how.reverse_mode:
        return fed.problem, AcrossRanks(how, fed.ranks, _grad_dims(fed.dims))
    return fed.problem, None


def _grad_dims(dims: dict) -> dict[str, Any]:
    """The client dim of each gradient's leaves, by key of ``Problem.inputs``."""
    return {"aux": dims["aux"], "hyperparams": dims["hyperparams"], "params": dims["params"]}

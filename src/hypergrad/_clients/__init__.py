"""The clients transform: many stacked models as one problem (``hg.Clients``).

``problem_of(setup)`` turns the ``Setup`` of a call with ``clients=`` into the ``Problem`` of C
clients (the engine's step vmapped over them, in federated rounds) and, where the hypergradient
is taken chunk by chunk, the runner that does it. Modules: ``vmap`` (vmap over trees with
``None`` leaves), ``dims`` (``in_dims`` and the client count), ``step`` (the stacked step),
``aggregation`` (FedAvg, broadcast), ``federation`` (the transform), ``tasks`` (one outer
loss per client, ``outer="each"``), ``norms`` (affine norms as elementary ops under the vmapped
inner gradient, where torch's rule is wrong), ``chunks`` (reverse mode chunk by chunk),
``ranks`` (many processes: collectives, faults), ``parallel`` (one model over many processes:
data parallel, ``process_group=`` without clients).
"""

from __future__ import annotations

import contextlib
from typing import Any

from hypergrad._boundary import caller
from hypergrad._clients.chunks import ByChunks
from hypergrad._clients.federation import Clients, federate
from hypergrad._clients.parallel import data_parallel
from hypergrad._clients.ranks import AcrossRanks, RankFailure, check_process_group, spanning
from hypergrad._engine.problem import Problem
from hypergrad._front import Runner, Setup, single_problem

__all__ = ["Clients", "RankFailure", "across_ranks", "problem_of"]


def across_ranks(
    clients: Any, process_group: Any = None
) -> contextlib.AbstractContextManager[None]:
    """Around a public call: with ``clients.process_group``, or ``process_group`` for one model
    (data parallel), every rank agrees on its outcome."""
    if process_group is None:
        return spanning(getattr(clients, "process_group", None))
    if clients is not None:
        raise ValueError(
            f"{caller()}: process_group= spreads one model's batches over the ranks (data "
            "parallel); with clients= it belongs to the clients: pass "
            "hg.Clients(..., process_group=group) instead, and no process_group= here."
        )
    check_process_group(process_group)
    return spanning(process_group)


def problem_of(setup: Setup) -> tuple[Problem, Runner | None]:
    """The problem a public call describes, and its runner (``None``: the method itself).

    One model's problem, or with ``setup.clients`` the clients transform of it (and, where the
    hypergradient is taken chunk by chunk, the runner that does it).
    """
    if setup.clients is None:
        if setup.process_group is not None:
            return data_parallel(setup)
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

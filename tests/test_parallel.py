"""Data-parallel hypergradients over real processes (one model, torch.distributed, gloo).

Each process group starts once per rank count and runs every check of ``_parallel_worker.py``
(every method equal to one process holding the whole batches, to 1e-10 in float64, with unequal
shards; faults raised on every rank), so the module costs a few process starts, not one per
check. The example runs under ``torchrun``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import hypergrad as hg
from _parallel_worker import CHECKS
from test_ranks import Launch, run_example

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORKER = Path(__file__).with_name("_parallel_worker.py")


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, list[dict[str, str]]]:
    """Every process group of the module, started at once (they run side by side)."""
    tmp = tmp_path_factory.mktemp("parallel")
    groups = {
        "2 ranks": Launch(2, "checks", tmp, timeout=240, worker=WORKER),
        "3 ranks": Launch(3, "checks", tmp, timeout=240, worker=WORKER),
        "dies": Launch(2, "dies", tmp, timeout=120, worker=WORKER),
    }
    return {name: group.results() for name, group in groups.items()}


@pytest.mark.parametrize("world", ["2 ranks", "3 ranks"])
@pytest.mark.parametrize("check", CHECKS)
def test_every_rank(launched, world, check):
    for rank, got in enumerate(launched[world]):
        assert got.get(check) == "ok", f"rank {rank}: {got.get(check, got.get('log'))}"


def test_a_rank_that_dies_is_reported_within_the_timeout(launched):
    alive, dead = launched["dies"]
    assert alive == {"dies": "ok"}
    assert "dies" not in dead  # it exited in its loss


def test_the_example_runs_under_torchrun():
    run_example("data_parallel.py", "--steps", "5")


def _call(**kw):
    loss = lambda p, aux, x: ((p["w"] - x) ** 2).mean()  # noqa: E731
    return hg.hypergrad(
        loss, loss, {"w": torch.zeros(2)}, hg.optim.sgd(lr=0.1), torch.ones(3, 4, 2),
        torch.ones(4, 2), wrt="lr", **kw,
    )  # fmt: skip


def test_process_group_must_be_a_process_group():
    with pytest.raises(TypeError, match=r"hg.hypergrad: process_group must be a torch.distributed"):
        _call(process_group="WORLD")


def test_process_group_with_clients_belongs_to_the_clients():
    with pytest.raises(ValueError, match=r"hg.hypergrad: process_group= spreads one model's.*"):
        _call(clients=hg.Clients(), process_group=object())

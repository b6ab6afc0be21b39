"""Federated hypergradients over real processes (torch.distributed, gloo on 127.0.0.1).

Each process group starts once per rank count and runs every check of ``_ranks_worker.py``
(equality with one process holding every client, to 1e-10 in float64, for every method over
several rounds and unequal shards; faults raised on every rank), so the module costs a few
process starts, not one per check.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from _ranks_worker import CHECKS

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORKER = Path(__file__).with_name("_ranks_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, mode: str, tmp: Path, timeout: float = 60) -> list[dict[str, str]]:
    """Run the worker on ``world`` ranks; every rank's results (``{}`` for a rank that died)."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "HG_TEST_TIMEOUT": str(timeout / 4),
    }
    outs = [tmp / f"{mode}-{world}-{r}.json" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(outs[r]), mode],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = finish(procs, timeout)
    return [json.loads(o.read_text()) if o.exists() else {"log": log} for o, log in zip(outs, logs)]


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Every process's output; none outlives the timeout."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def results(request, tmp_path_factory) -> list[dict[str, str]]:
    return launch(request.param, "checks", tmp_path_factory.mktemp("ranks"), timeout=240)


@pytest.mark.parametrize("check", CHECKS)
def test_every_rank(results, check):
    for rank, got in enumerate(results):
        assert got.get(check) == "ok", f"rank {rank}: {got.get(check, got.get('log'))}"


def test_the_example_runs_under_torchrun():
    example = Path(__file__).parents[1] / "examples" / "federated_distributed.py"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen(
        [*run, str(example), "--clients", "6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    (log,) = finish([proc], timeout=120)
    assert proc.returncode == 0, log
    diff = re.search(r"max \|grad - one process's\| = (\S+)", log)
    assert diff is not None and float(diff.group(1)) < 1e-10, log
    assert "after 5 steps on aux" in log


def test_a_rank_that_dies_is_reported_within_the_timeout(tmp_path):
    alive, dead = launch(2, "dies", tmp_path, timeout=60)
    assert alive == {"dies": "ok"}
    assert dead.get("dies") is None  # it exited in its loss

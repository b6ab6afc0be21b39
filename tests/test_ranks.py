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


class Launch:
    """The worker started on ``world`` ranks (output to files, so no pipe can fill and block)."""

    def __init__(
        self,
        world: int,
        mode: str,
        tmp: Path,
        timeout: float,
        env: dict[str, str] | None = None,
        worker: Path = WORKER,
    ) -> None:
        env = {
            **os.environ,
            **(env or {}),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
            "HG_TEST_TIMEOUT": str(timeout / 4),
        }
        name = f"{worker.stem}-{mode}-{world}"
        self.outs = [tmp / f"{name}-{r}.json" for r in range(world)]
        self.logs = [tmp / f"{name}-{r}.log" for r in range(world)]
        self.timeout = timeout
        self.procs = []
        for r in range(world):
            with open(self.logs[r], "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, str(worker), str(self.outs[r]), mode],
                        env={**env, "RANK": str(r)},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def results(self) -> list[dict[str, str]]:
        """Every rank's results (its log instead, for a rank that wrote none)."""
        finish(self.procs, self.timeout)
        return [
            json.loads(out.read_text()) if out.exists() else {"log": log.read_text()}
            for out, log in zip(self.outs, self.logs)
        ]


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every process (their output, where piped); none outlives the timeout."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, list[dict[str, str]]]:
    """Every process group of the module, started at once (they run side by side)."""
    tmp = tmp_path_factory.mktemp("ranks")
    groups = {
        "2 ranks": Launch(2, "checks", tmp, timeout=240),
        "3 ranks": Launch(3, "checks", tmp, timeout=240),
        "dies": Launch(2, "dies", tmp, timeout=120),
    }
    return {name: group.results() for name, group in groups.items()}


@pytest.mark.parametrize("world", ["2 ranks", "3 ranks"])
@pytest.mark.parametrize("check", CHECKS)
def test_every_rank(launched, world, check):
    for rank, got in enumerate(launched[world]):
        assert got.get(check) == "ok", f"rank {rank}: {got.get(check, got.get('log'))}"


def run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>`` on two ranks under torchrun; its output, once it has succeeded
    and printed a gradient within 1e-10 of one process's."""
    example = Path(__file__).parents[1] / "examples" / name
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen(
        [*run, str(example), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    (log,) = finish([proc], timeout=120)
    assert proc.returncode == 0, log
    diff = re.search(r"max \|grad - one process's\| = (\S+)", log)
    assert diff is not None and float(diff.group(1)) < 1e-10, log
    return log


def test_the_example_runs_under_torchrun():
    assert "after 5 steps on aux" in run_example("federated_distributed.py", "--clients", "6")


def test_a_rank_that_dies_is_reported_within_the_timeout(launched):
    alive, dead = launched["dies"]
    assert alive == {"dies": "ok"}
    assert "dies" not in dead  # it exited in its loss

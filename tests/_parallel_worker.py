"""One rank of the data-parallel checks in ``test_parallel.py`` (run as a script, one per rank).

Like ``_ranks_worker.py``: every rank starts the process group once, runs every check of
``CHECKS`` in the same order and writes ``{check: "ok" or the failure}`` as JSON to ``argv[1]``.
Each rank holds the same model, aux and hyperparameters and its own (unequal) shard of every
inner batch and of the outer batch; every check compares with one process holding the whole
batches (computed on every rank, float64, 1e-10), or provokes a fault and checks that every rank
raises a ``RankFailure`` naming it. After the faults the group is used again.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist

import hypergrad as hg
from _ranks_worker import Counted, close, failing_backward, no_group_reference_kept
from _ranks_worker import main as run_checks
from hypergrad._clients.ranks import RankFailure

K = 3
BACKEND = os.environ.get("HG_TEST_BACKEND", "gloo")
DEVICE = torch.device(os.environ.get("HG_TEST_DEVICE", "cpu"))


def sizes(world: int) -> tuple[list[int], list[int]]:
    """Unequal shards: each rank's examples of every inner batch, and of the outer batch."""
    return ([3, 5], [4, 7]) if world == 2 else ([2, 3, 5][:world], [3, 4, 6][:world])


def data(n: int, m: int) -> dict:
    g = torch.Generator().manual_seed(0)
    d = torch.float64

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=d)

    made = {
        "params": {"w": randn(3), "b": torch.zeros((), dtype=d)},
        "batches": (randn(K, n, 3), randn(K, n)),
        "val": (randn(m, 3), randn(m)),
        "aux": {"s": torch.tensor(0.1, dtype=d), "v": randn(3)},
        # a well-conditioned problem trained to its minimum, for hg.Implicit
        "fixed": (randn(1, n, 3).expand(150, n, 3), randn(1, n).expand(150, n)),
    }
    return hg.tree.map(lambda x: x.to(DEVICE), made)


def inner(p, aux, batch):
    x, y = batch
    fit = ((x @ p["w"] + p["b"] - y) ** 2).mean()
    return fit + aux["s"] * (p["w"] ** 2).sum() + 0.1 * (aux["v"] * p["w"]).sum()


def outer(p, aux, val):
    x, y = val
    return ((x @ p["w"] + p["b"] - y) ** 2).mean() + 0.01 * (aux["v"] ** 2).sum()


def expect_failure(run: Callable[[], object], *needles: str) -> None:
    try:
        run()
    except RankFailure as error:
        missing = [n for n in needles if n not in str(error)]
        if missing:
            raise AssertionError(f"{missing} not in {str(error)!r}") from error
        return
    raise AssertionError("no RankFailure")


def expect_error(run: Callable[[], object], kind: type, *needles: str) -> None:
    try:
        run()
    except kind as error:
        missing = [n for n in needles if n not in str(error)]
        if missing:
            raise AssertionError(f"{missing} not in {str(error)!r}") from error
        return
    raise AssertionError(f"no {kind.__name__}")


class Checks:
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        inner_sizes, outer_sizes = sizes(world)
        self.all = data(sum(inner_sizes), sum(outer_sizes))
        lo, vlo = sum(inner_sizes[:rank]), sum(outer_sizes[:rank])
        self.rows = slice(lo, lo + inner_sizes[rank])
        self.val_rows = slice(vlo, vlo + outer_sizes[rank])
        self.group = dist.group.WORLD

    def shard(self, key: str):
        x = self.all[key]
        if key == "val":
            return tuple(v[self.val_rows] for v in x)
        return tuple(b[:, self.rows] for b in x)

    def both(self, method, opt, wrt=("aux", "lr"), batches="batches", **kw):
        """The hypergradient of one process with every batch whole, and this rank's."""
        a = self.all
        common = dict(aux=a["aux"], method=method, wrt=wrt, seed=0, **kw)
        one = hg.hypergrad(outer, inner, a["params"], opt, a[batches], a["val"], **common)
        ours = hg.hypergrad(
            outer, inner, a["params"], opt, self.shard(batches), self.shard("val"),
            process_group=self.group, **common,
        )  # fmt: skip
        return one, ours

    def compare(self, method, opt, wrt=("aux", "lr"), **kw) -> None:
        one, ours = self.both(method, opt, wrt, **kw)
        close(ours.value, one.value, "value")
        for name in ("aux", "hyperparams", "params"):
            if getattr(one, name) is not None:
                close(getattr(ours, name), getattr(one, name), name)
        # the trajectory: the whole batch's losses and the same final params on every rank
        close(ours.trajectory.losses, one.trajectory.losses, "trajectory.losses")
        close(ours.trajectory.params, one.trajectory.params, "trajectory.params")

    # --- every method: every rank equals one process -----------------------------------------

    def reverse(self):
        self.compare("reverse", hg.optim.sgd(lr=0.1, momentum=0.9))

    def reverse_adam(self):
        self.compare("reverse", hg.optim.adam(lr=0.05), wrt=("aux", "lr", "betas"))

    def reverse_autograd_and_func(self):  # both ways of taking the inner gradient
        self.compare("reverse", hg.optim.sgd(lr=0.1), inner_grad="func")
        self.compare("reverse", hg.optim.sgd(lr=0.1), inner_grad="autograd")

    def truncated(self):
        self.compare(hg.Truncated(2), hg.optim.sgd(lr=0.1, momentum=0.5))

    def checkpointed(self):
        self.compare(hg.Checkpointed(2), hg.optim.adam(lr=0.05))
        self.compare(hg.Checkpointed(slots=2), hg.optim.sgd(lr=0.1, momentum=0.5))

    def forward(self):
        self.compare("forward", hg.optim.sgd(lr=0.1, momentum=0.9))

    def forward_chunked(self):
        self.compare(hg.Forward(chunk_size=2), hg.optim.adam(lr=0.05))

    def first_order(self):
        self.compare("first_order", hg.optim.sgd(lr=0.1), wrt=("lr",))

    def maml(self):  # the initial params, with aux
        self.compare("reverse", hg.optim.sgd(lr=0.1), wrt=("aux", "params"))
        self.compare("forward", hg.optim.sgd(lr=0.1), wrt=("params",))

    def implicit(self):  # trained to the minimum: the Hessian-vector products all-reduced
        for hvp in ("reverse", "forward"):
            method = hg.Implicit(tol=1e-12, hvp=hvp)
            one, ours = self.both(method, hg.optim.sgd(lr=0.2), "aux", batches="fixed")
            close(ours.value, one.value, "value")
            close(ours.aux, one.aux, f"aux ({hvp})")
            if ours.solver.iterations != one.solver.iterations:
                raise AssertionError(f"{ours.solver} != {one.solver}")

    def implicit_weight_decay(self):  # a hyperparameter entering the condition
        method = hg.Implicit(tol=1e-12)
        opt = hg.optim.sgd(lr=0.2, weight_decay=0.05)
        one, ours = self.both(method, opt, ("aux", "weight_decay"), batches="fixed")
        close(ours.aux, one.aux, "aux")
        close(ours.hyperparams, one.hyperparams, "weight_decay")

    def outer_without_data(self):  # no tensor in the outer batch: every rank counts alike
        a, opt = self.all, hg.optim.sgd(lr=0.1)
        on_params = lambda p, aux, val: (p["w"] ** 2).sum() + p["b"]  # noqa: E731
        kw = dict(aux=a["aux"], seed=0, wrt=("aux", "lr"))
        one = hg.hypergrad(on_params, inner, a["params"], opt, a["batches"], None, **kw)
        ours = hg.hypergrad(
            on_params, inner, a["params"], opt, self.shard("batches"), None,
            process_group=self.group, **kw,
        )  # fmt: skip
        close((ours.value, ours.aux, ours.hyperparams), (one.value, one.aux, one.hyperparams), "")

    def unroll(self):
        a, opt = self.all, hg.optim.adam(lr=0.1)
        one = hg.unroll(inner, a["params"], opt, a["batches"], aux=a["aux"])
        ours = hg.unroll(
            inner, a["params"], opt, self.shard("batches"), aux=a["aux"], process_group=self.group
        )
        close((ours.params, ours.state, ours.losses), (one.params, one.state, one.losses), "")

    def buffers_per_rank(self):  # as DistributedDataParallel: each rank's statistics its own
        a, opt = self.all, hg.optim.sgd(lr=0.1)

        def loss(p, aux, batch, b):
            x, _ = batch
            new = {"mean": 0.9 * b["mean"] + 0.1 * x.mean(0), "count": b["count"] + 1}
            return inner(p, aux, batch), new

        b0 = {"mean": torch.zeros(3, dtype=torch.float64, device=DEVICE), "count": torch.tensor(0)}
        whole = hg.unroll(loss, a["params"], opt, a["batches"], aux=a["aux"], buffers=b0)
        alone = hg.unroll(loss, a["params"], opt, self.shard("batches"), aux=a["aux"], buffers=b0)
        ours = hg.unroll(
            loss, a["params"], opt, self.shard("batches"), aux=a["aux"], buffers=b0,
            process_group=self.group,
        )  # fmt: skip
        close(ours.params, whole.params, "params (the whole batch's)")
        close(ours.buffers["mean"], alone.buffers["mean"], "buffers (this rank's shard's)")
        if int(ours.buffers["count"]) != K:
            raise AssertionError(ours.buffers)

    def collectives_per_call(self):  # 4K + 4 all-reduces (an unroll 2K + 4), nothing gathered
        a = self.all
        with Counted() as counted:
            self.both("reverse", hg.optim.sgd(lr=0.1))
        if counted.calls != {"all_reduce": 4 * K + 4}:
            raise AssertionError(f"a hypergradient over {K} steps ran {counted.calls}")
        with Counted() as counted:
            hg.unroll(
                inner, a["params"], hg.optim.sgd(lr=0.1), self.shard("batches"), aux=a["aux"],
                process_group=self.group,
            )  # fmt: skip
        if counted.calls != {"all_reduce": 2 * K + 4}:
            raise AssertionError(f"an unroll over {K} steps ran {counted.calls}")

    def no_reference_kept(self):  # a group freed only at interpreter exit can abort it (gloo)
        def calls():
            self.compare("reverse", hg.optim.sgd(lr=0.1))
            self.compare("forward", hg.optim.sgd(lr=0.1))

        no_group_reference_kept(calls)

    def modules_from_training_code(self):  # DDP-wrapped: its inner module; DTensor: refused
        from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor
        from torch.nn.parallel import DistributedDataParallel

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        model = model.to(torch.float64)
        wrapped = DistributedDataParallel(model)
        params, _ = hg.split(wrapped)
        if list(params) != list(hg.split(model)[0]):
            raise AssertionError(list(params))

        def loss(module):
            return lambda p, aux, b: ((hg.call(module, p, b[0])[:, 0] - b[1]) ** 2).mean()

        a, opt, kw = self.all, hg.optim.sgd(lr=0.1), {"seed": 0, "wrt": "lr"}
        one = hg.hypergrad(loss(model), loss(model), params, opt, a["batches"], a["val"], **kw)
        ours = hg.hypergrad(
            loss(wrapped), loss(wrapped), params, opt, self.shard("batches"), self.shard("val"),
            process_group=self.group, **kw,
        )  # fmt: skip
        close(ours.hyperparams, one.hyperparams, "lr")
        hg.load(wrapped, hg.tree.zeros_like(params))
        if model[0].weight.abs().sum() != 0:
            raise AssertionError("hg.load did not reach the inner module")
        sharded = torch.nn.Linear(3, 2)
        mesh = DeviceMesh("cpu", list(range(self.world)))
        weight = distribute_tensor(sharded.weight.detach(), mesh, [Replicate()])
        sharded.weight = torch.nn.Parameter(weight)
        expect_error(lambda: hg.split(sharded), TypeError, "hg.split", "sharded", "process_group")

    # --- faults: every rank raises, naming the failing rank; none hangs ----------------------

    def call(self, inner_loss=inner, batches=None, params=None, **kw):
        a = self.all
        kw = {"aux": a["aux"], "process_group": self.group, "seed": 0, **kw}
        return hg.hypergrad(
            outer, inner_loss, a["params"] if params is None else params, hg.optim.sgd(lr=0.1),
            batches or self.shard("batches"), self.shard("val"), **kw,
        )  # fmt: skip

    def exception_in_a_loss(self):
        last = self.world - 1

        def loss(p, aux, batch):
            if self.rank == last:
                raise ValueError("boom in the inner loss")
            return inner(p, aux, batch)

        expect_failure(lambda: self.call(loss), f"rank {last} of the {self.world}", "boom")

    def exception_in_a_backward(self):  # raised inside the backward pass, mid-collectives
        rank = self.rank

        fragile = failing_backward(rank == 1)

        def fragile_outer(p, aux, val):
            return outer({"w": fragile(p["w"]), "b": p["b"]}, aux, val)

        a = self.all
        run = lambda: hg.hypergrad(  # noqa: E731
            fragile_outer, inner, a["params"], hg.optim.sgd(lr=0.1), self.shard("batches"),
            self.shard("val"), aux=a["aux"], process_group=self.group,
        )  # fmt: skip
        expect_failure(run, "rank 1:", "boom in a backward pass")

    def nan_in_a_batch(self):
        x, y = self.shard("batches")
        if self.rank == 1:
            x = x.clone()
            x[1] = float("nan")
        expect_failure(lambda: self.call(batches=(x, y)), "rank 1:", "FloatingPointError", "step 1")

    def nan_in_an_unroll(self):
        x, y = self.shard("batches")
        if self.rank == 0:
            x = x.clone()
            x[2] = float("inf")
        run = lambda: hg.unroll(  # noqa: E731
            inner, self.all["params"], hg.optim.sgd(lr=0.1), (x, y), aux=self.all["aux"],
            process_group=self.group,
        )  # fmt: skip
        expect_failure(run, "rank 0:", "step 2")

    def bad_argument_on_one_rank(self):
        wrt = "nonsense" if self.rank == 0 else "aux"
        expect_failure(lambda: self.call(wrt=wrt), "rank 0:", "wrt")

    def different_steps(self):
        steps = K - 1 if self.rank == 1 else K
        expect_failure(lambda: self.call(steps=steps), "different calls", "K (steps)")

    def different_method(self):
        method = "first_order" if self.rank == 0 else "reverse"
        expect_failure(lambda: self.call(method=method), "different calls", "method")

    def different_params(self):  # the same structure, other values
        params = self.all["params"]
        if self.rank == 1:
            params = {"w": params["w"] + 1e-9, "b": params["b"]}
        expect_failure(
            lambda: self.call(params=params), "different calls", "values of params", "shard"
        )

    def different_structure(self):
        x, y = self.shard("batches")
        params = self.all["params"]
        if self.rank == 0:
            params, x = {"w": params["w"][:2], "b": params["b"]}, x[..., :2]
        run = lambda: hg.hypergrad(  # noqa: E731
            lambda p, aux, v: (p["w"] ** 2).sum(), inner, params, hg.optim.sgd(lr=0.1),
            (x, y), None, aux=self.all["aux"], process_group=self.group,
        )  # fmt: skip
        expect_failure(run, "different calls", "params")

    def shard_size_changes(self):
        batches = [(x, y) for x, y in zip(*self.shard("batches"))]
        if self.rank == 1:
            batches[2] = (batches[2][0][:-1], batches[2][1][:-1])
        expect_failure(lambda: self.call(batches=batches), "rank 1:", "step 2's batch has")

    def a_rank_without_examples(self):
        x, y = self.shard("batches")
        if self.rank == 0:
            x, y = x[:, :0], y[:, :0]
        expect_failure(lambda: self.call(batches=(x, y)), "rank 0:", "holds no examples")

    def refused_in_every_rank(self):
        a = self.all
        expect_failure(lambda: self.call(compile=True), "rank 0:", "compile does not run")
        run = lambda: hg.hypergrad(  # noqa: E731
            outer, inner, a["params"], hg.optim.sgd(lr=0.1), self.shard("batches"), a["val"],
            clients=hg.Clients(), process_group=self.group,
        )  # fmt: skip
        expect_error(run, ValueError, "hg.Clients(..., process_group=group)")

    def still_in_step(self):  # after every fault above: the group still works
        self.compare("reverse", hg.optim.sgd(lr=0.1))


CHECKS = [
    "reverse", "reverse_adam", "reverse_autograd_and_func", "truncated", "checkpointed",
    "forward", "forward_chunked", "first_order", "maml", "implicit", "implicit_weight_decay",
    "outer_without_data", "unroll", "buffers_per_rank", "collectives_per_call",
    "no_reference_kept", "modules_from_training_code",
    "exception_in_a_loss", "exception_in_a_backward", "nan_in_a_batch", "nan_in_an_unroll",
    "bad_argument_on_one_rank", "different_steps", "different_method", "different_params",
    "different_structure", "shard_size_changes", "a_rank_without_examples", "refused_in_every_rank", "still_in_step",
]  # fmt: skip


# On a GPU (test_cuda.py): every kind of collective, and the faults that make sense for one rank
# too (NCCL allows one rank per GPU, so its group on one GPU has a single rank).
ON_DEVICE = [
    "reverse", "reverse_adam", "checkpointed", "forward", "implicit", "unroll",
    "buffers_per_rank", "exception_in_a_loss", "nan_in_an_unroll", "bad_argument_on_one_rank",
    "still_in_step",
]  # fmt: skip


def dies(rank: int) -> dict[str, str]:
    """The last rank exits in its inner loss; the others must raise within the timeout."""
    world = dist.get_world_size()
    checks = Checks(rank, world)

    def loss(p, aux, batch):
        if rank == world - 1:
            os._exit(3)
        return inner(p, aux, batch)

    try:
        checks.call(loss)
    except RankFailure as error:
        return {"dies": "ok" if "stopped answering" in str(error) else str(error)}
    return {"dies": "no RankFailure"}


if __name__ == "__main__":
    run_checks(Checks, CHECKS, ON_DEVICE, dies)

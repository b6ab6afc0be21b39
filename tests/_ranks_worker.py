"""One rank of the many-process checks in ``test_ranks.py`` (run as a script, one per rank).

Every rank starts the process group once (gloo, 127.0.0.1, ``MASTER_PORT``/``RANK``/
``WORLD_SIZE`` from the environment), runs every check in ``CHECKS`` in the same order, and
writes ``{check: "ok" or the failure}`` as JSON to ``argv[1]``. Each check compares the
federated hypergradient over the ranks, each holding its own (unequal) share of the clients,
with one process holding them all (computed on every rank), or provokes a fault and checks that
every rank raises a ``RankFailure`` naming the failing rank. After each fault the group is used
again, so a desynchronised rank would fail the next check.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

import hypergrad as hg
from hypergrad._clients.ranks import RankFailure

R, K = 3, 2  # rounds, local steps per round
TOL = 1e-10
# The backend and the device of the tensors: gloo on the CPU unless the launcher says otherwise
# (test_cuda.py: NCCL on one GPU, and gloo with CUDA tensors).
BACKEND = os.environ.get("HG_TEST_BACKEND", "gloo")
DEVICE = torch.device(os.environ.get("HG_TEST_DEVICE", "cpu"))


def shares(world: int) -> list[int]:
    """Unequal client counts per rank: 2 ranks hold 2 + 3, 3 ranks hold 1 + 2 + 3."""
    return [2, 3] if world == 2 else [r + 1 for r in range(world)]


def data(clients: int) -> dict:
    g = torch.Generator().manual_seed(0)
    d = torch.float64

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=d)

    made = {
        "params": {"w": randn(clients, 3), "b": randn(clients)},
        "batches": (randn(R * K, clients, 8, 3), randn(R * K, clients, 8)),
        "val": (randn(16, 3), randn(16)),
        "aux": {"s": torch.tensor(0.1, dtype=d), "v": randn(3)},
        "weights": torch.rand(clients, generator=g, dtype=d) + 0.5,
    }
    return hg.tree.map(lambda x: x.to(DEVICE), made)


def inner(p, aux, batch):
    x, y = batch
    fit = ((x @ p["w"] + p["b"] - y) ** 2).mean()
    return fit + aux["s"] * ((p["w"] - aux["v"]) ** 2).sum()


def outer(server, aux, val):
    x, y = val
    return ((x @ server["w"] + server["b"] - y) ** 2).mean() + 0.01 * (aux["v"] ** 2).sum()


def noisy(server, aux, val):
    """``outer`` times a random factor: the outer loss draws from the seed every rank takes."""
    return outer(server, aux, val) * (1 + 0.1 * torch.rand((), dtype=torch.float64))


def mine(tree, rows: slice, stacked: bool = True):
    return hg.tree.map(lambda x: x[rows], tree) if stacked else tree


def close(got, want, what: str) -> None:
    for a, b in zip(hg.tree.leaves(got), hg.tree.leaves(want)):
        if not torch.allclose(a, b, rtol=TOL, atol=TOL):
            raise AssertionError(f"{what}: {a} != {b} (max diff {(a - b).abs().max()})")


def failing_backward(fails: bool):
    """An identity whose backward raises ("boom in a backward pass") when ``fails``."""

    class Fragile(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            if fails:
                raise ValueError("boom in a backward pass")
            return g

    return Fragile.apply


def no_group_reference_kept(calls: Callable[[], object]) -> None:
    """Raise unless ``calls()`` leaves the default process group's reference count as it was
    (the garbage collector held off, so that only references the calls keep count)."""
    group = dist.distributed_c10d._get_default_group()
    gc.collect()
    gc.disable()
    try:
        before = sys.getrefcount(group)
        calls()
        after = sys.getrefcount(group)
    finally:
        gc.enable()
    if after != before:
        raise AssertionError(f"the call left {after - before} references to the group")


class Counted:
    """The collectives run inside the block, by name (wrapping torch.distributed's functions)."""

    NAMES = ("all_reduce", "all_gather_object", "all_gather", "broadcast", "broadcast_object_list")

    def __enter__(self) -> Counted:
        self.calls: dict[str, int] = {}
        self.saved = {name: getattr(dist, name) for name in self.NAMES}

        def counting(name, fn):
            def wrapper(*args, **kwargs):
                self.calls[name] = self.calls.get(name, 0) + 1
                return fn(*args, **kwargs)

            return wrapper

        for name, fn in self.saved.items():
            setattr(dist, name, counting(name, fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


class Checks:
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        counts = shares(world)
        self.total = sum(counts)
        lo = sum(counts[:rank])
        self.rows = slice(lo, lo + counts[rank])
        self.all = data(self.total)
        self.group = dist.group.WORLD

    def local(self, key: str):
        x = self.all[key]
        if key == "batches":
            return tuple(b[:, self.rows] for b in x)
        return mine(x, self.rows)

    def compare(self, method, opt, wrt=("aux", "lr"), shared_params=False, **clients) -> None:
        a = self.all
        in_dims = {"params": None} if shared_params else None
        params = hg.tree.map(lambda x: x[0], a["params"]) if shared_params else a["params"]
        weights = clients.pop("weights", None)
        common = dict(aux=a["aux"], method=method, wrt=wrt, seed=0, rounds=R, in_dims=in_dims)
        one = hg.clients.hypergrad(
            outer,
            inner,
            params,
            opt,
            a["batches"],
            a["val"],
            weights=None if weights is None else a["weights"],
            **common,
            **clients,
        )
        ours = hg.clients.hypergrad(
            outer,
            inner,
            params if shared_params else self.local("params"),
            opt,
            self.local("batches"),
            a["val"],
            weights=None if weights is None else self.local("weights"),
            process_group=self.group,
            **common,
            **clients,
        )
        close(ours.value, one.value, "value")
        close(ours.aux, one.aux, "aux")
        close(ours.hyperparams, one.hyperparams, "hyperparams")
        # the trajectory: this rank's clients, as hg.clients.unroll over ranks gives them
        close(ours.trajectory.params, mine(one.trajectory.params, self.rows), "trajectory")
        close(ours.trajectory.losses, one.trajectory.losses[:, self.rows], "losses")
        if one.params is not None:
            close(
                ours.params, one.params if shared_params else mine(one.params, self.rows), "params"
            )

    # --- every rank equals one process ------------------------------------------------------

    def reverse(self):
        self.compare("reverse", hg.optim.sgd(lr=0.1, momentum=0.9))

    def reverse_adam_weights(self):
        self.compare("reverse", hg.optim.adam(lr=0.05), weights=True)

    def checkpointed(self):
        self.compare(hg.Checkpointed(2), hg.optim.sgd(lr=0.1))
        self.compare(hg.Checkpointed(slots=2), hg.optim.adam(lr=0.05))

    def truncated(self):
        self.compare(hg.Truncated(3), hg.optim.sgd(lr=0.1))

    def first_order(self):  # aux["s"] enters the inner loss only: wrt the rest
        self.compare("first_order", hg.optim.sgd(lr=0.1), wrt=("lr",))

    def forward_chunked(self):
        self.compare(hg.Forward(chunk_size=2), hg.optim.adam(lr=0.05))

    def chunks(self):
        self.compare("reverse", hg.optim.sgd(lr=0.1), chunk_size=2)

    def forward(self):
        self.compare("forward", hg.optim.sgd(lr=0.1, momentum=0.5), weights=True)

    def params_stacked(self):
        self.compare("reverse", hg.optim.sgd(lr=0.1), wrt=("aux", "params"))

    def params_shared(self):
        self.compare("reverse", hg.optim.adam(lr=0.05), wrt=("params", "lr"), shared_params=True)

    def custom_aggregate(self):
        weights, total = self.local("weights"), float(self.all["weights"].sum())

        def share(stacked):  # this rank's part of the weighted mean over every rank's clients
            return hg.tree.map(
                lambda x: (weights.view(-1, *[1] * (x.dim() - 1)) * x).sum(0) / total, stacked
            )

        a = self.all
        args = (outer, inner)
        one = hg.clients.hypergrad(
            *args,
            a["params"],
            hg.optim.sgd(lr=0.1),
            a["batches"],
            a["val"],
            aux=a["aux"],
            rounds=R,
            weights=a["weights"],
            seed=0,
        )
        ours = hg.clients.hypergrad(
            *args,
            self.local("params"),
            hg.optim.sgd(lr=0.1),
            self.local("batches"),
            a["val"],
            aux=a["aux"],
            rounds=R,
            aggregate=share,
            process_group=self.group,
            seed=0,
        )
        close(ours.aux, one.aux, "aux")

    def per_client_lr(self):  # a gradient with a client dimension stays the rank's own
        a = self.all
        lr = torch.linspace(0.05, 0.15, self.total, dtype=torch.float64, device=DEVICE)
        common = dict(aux=a["aux"], wrt=("aux", "lr"), rounds=R, in_dims={"hyperparams": {"lr": 0}})
        opt = hg.optim.sgd(lr=0.1)
        one = hg.clients.hypergrad(
            outer, inner, a["params"], opt, a["batches"], a["val"], hyperparams={"lr": lr}, **common
        )
        ours = hg.clients.hypergrad(
            outer,
            inner,
            self.local("params"),
            opt,
            self.local("batches"),
            a["val"],
            hyperparams={"lr": lr[self.rows]},
            process_group=self.group,
            **common,
        )
        close(ours.aux, one.aux, "aux")
        close(ours.hyperparams["lr"], one.hyperparams["lr"][self.rows], "lr")

    def buffers(self):  # a float moving average and an integer count, aggregated too
        a = self.all

        def loss(p, aux, batch, b):
            x, _ = batch
            new = {"m": 0.5 * b["m"] + 0.5 * x.mean(0), "n": b["n"] + 1}
            return inner(p, aux, batch) + (p["w"] * b["m"]).sum(), new

        def server_loss(server, aux, val, b):
            return outer(server, aux, val) + (server["w"] * b["m"]).sum() * b["n"]

        def bufs(c):
            return {
                "m": torch.zeros(c, 3, dtype=torch.float64, device=DEVICE),
                "n": torch.arange(c, device=DEVICE),
            }

        opt, kw = hg.optim.adam(lr=0.05), dict(aux=a["aux"], rounds=R, seed=0)
        one = hg.clients.hypergrad(
            server_loss,
            loss,
            a["params"],
            opt,
            a["batches"],
            a["val"],
            buffers=bufs(self.total),
            **kw,
        )
        ours = hg.clients.hypergrad(
            server_loss,
            loss,
            self.local("params"),
            opt,
            self.local("batches"),
            a["val"],
            buffers=mine(bufs(self.total), self.rows),
            process_group=self.group,
            **kw,
        )
        close(ours.value, one.value, "value")
        close(ours.aux, one.aux, "aux")

    def random_outer_loss(self):  # every rank takes rank 0's seed: one outer computation
        from hypergrad._engine.randomness import draw_seed

        a, opt = self.all, hg.optim.sgd(lr=0.1)
        torch.manual_seed(100)
        seed = draw_seed()  # what rank 0 draws below
        one = hg.clients.hypergrad(
            noisy,
            inner,
            a["params"],
            opt,
            a["batches"],
            a["val"],
            aux=a["aux"],
            rounds=R,
            seed=seed,
        )
        torch.manual_seed(100 + self.rank)
        ours = hg.clients.hypergrad(
            noisy,
            inner,
            self.local("params"),
            opt,
            self.local("batches"),
            a["val"],
            aux=a["aux"],
            rounds=R,
            process_group=self.group,
        )
        close(ours.value, one.value, "value")
        close(ours.aux, one.aux, "aux")

    def seed_beyond_int64(self):  # too big for the status row: the fingerprints are gathered
        a, opt, seed = self.all, hg.optim.sgd(lr=0.1), 2**63 + 5
        kw = dict(aux=a["aux"], rounds=R)
        one = hg.clients.hypergrad(
            noisy, inner, a["params"], opt, a["batches"], a["val"], seed=seed, **kw
        )
        ours = hg.clients.hypergrad(
            noisy,
            inner,
            self.local("params"),
            opt,
            self.local("batches"),
            a["val"],
            seed=seed if self.rank == 0 else 0,  # rank 0's is taken
            process_group=self.group,
            **kw,
        )
        close(ours.value, one.value, "value")
        close(ours.aux, one.aux, "aux")

    def collectives_per_call(self):  # 4R + 2 all-reduces (an unroll 2R), nothing gathered
        with Counted() as counted:
            self.call()
        if counted.calls != {"all_reduce": 4 * R + 2}:
            raise AssertionError(f"a hypergradient over {R} rounds ran {counted.calls}")
        with Counted() as counted:
            hg.unroll(
                inner,
                self.local("params"),
                hg.optim.sgd(lr=0.1),
                self.local("batches"),
                aux=self.all["aux"],
                clients=hg.Clients(rounds=R, process_group=self.group),
            )
        if counted.calls != {"all_reduce": 2 * R}:
            raise AssertionError(f"an unroll over {R} rounds ran {counted.calls}")

    def no_reference_kept(self):  # a group freed only at interpreter exit can abort it (gloo)
        def calls():
            self.compare("reverse", hg.optim.sgd(lr=0.1))
            self.compare("forward", hg.optim.sgd(lr=0.1), chunk_size=2)

        no_group_reference_kept(calls)

    def unroll(self):
        a, opt = self.all, hg.optim.sgd(lr=0.1)
        one = hg.unroll(
            inner, a["params"], opt, a["batches"], aux=a["aux"], clients=hg.Clients(rounds=R)
        )
        ours = hg.unroll(
            inner,
            self.local("params"),
            opt,
            self.local("batches"),
            aux=a["aux"],
            clients=hg.Clients(rounds=R, process_group=self.group),
        )
        close(ours.params, mine(one.params, self.rows), "params")
        close(ours.losses, one.losses[:, self.rows], "losses")

    def tasks_against_one_process(self, method, weights=False, **clients) -> None:
        """outer="each": every client's own outer batch; the mean over every rank's clients."""
        a, opt = self.all, hg.optim.sgd(lr=0.1, momentum=0.5)
        g = torch.Generator().manual_seed(1)
        x, y = (torch.randn(self.total, *v.shape, generator=g, dtype=v.dtype) for v in a["val"])
        vals = (x.to(DEVICE), y.to(DEVICE))
        common = dict(aux=a["aux"], method=method, wrt=("aux", "lr"), seed=0, rounds=R,
                      outer="each", **clients)  # fmt: skip
        one = hg.clients.hypergrad(outer, inner, a["params"], opt, a["batches"], vals,
                                   weights=a["weights"] if weights else None, **common)  # fmt: skip
        ours = hg.clients.hypergrad(
            outer, inner, self.local("params"), opt, self.local("batches"),
            mine(vals, self.rows), process_group=self.group,
            weights=self.local("weights") if weights else None, **common,
        )  # fmt: skip
        close(ours.value, one.value, "value")
        close(ours.aux, one.aux, "aux")
        close(ours.hyperparams, one.hyperparams, "hyperparams")

    def tasks(self):
        self.tasks_against_one_process("reverse")

    def tasks_chunks_weights(self):
        self.tasks_against_one_process(hg.Checkpointed(2), weights=True, chunk_size=2)

    def tasks_forward(self):
        self.tasks_against_one_process("forward")

    # --- faults: every rank raises, naming the failing rank; none hangs ----------------------

    def expect_failure(self, run: Callable[[], object], *needles: str) -> None:
        try:
            run()
        except RankFailure as error:
            text = str(error)
            missing = [n for n in needles if n not in text]
            if missing:
                raise AssertionError(f"{missing} not in {text!r}") from error
            return
        raise AssertionError("no RankFailure")

    def call(self, inner_loss=inner, batches=None, **kw):
        a = self.all
        kw = {"aux": a["aux"], "rounds": R, "process_group": self.group, "seed": 0, **kw}
        return hg.clients.hypergrad(
            outer,
            inner_loss,
            self.local("params"),
            hg.optim.sgd(lr=0.1),
            batches or self.local("batches"),
            a["val"],
            **kw,
        )

    def exception_in_a_loss(self):
        last = self.world - 1

        def loss(p, aux, batch):
            if self.rank == last:
                raise ValueError("boom in the inner loss")
            return inner(p, aux, batch)

        self.expect_failure(lambda: self.call(loss), f"rank {last} of the {self.world}", "boom")

    def exception_in_a_backward(self):  # raised inside the backward pass, mid-collectives
        rank = self.rank

        fragile = failing_backward(rank == 1)

        def loss(p, aux, batch):  # its gradient is taken in the forward pass (no error there)
            return inner(p, aux, batch)

        def server_loss(server, aux, val):
            return outer({"w": fragile(server["w"]), "b": server["b"]}, aux, val)

        a = self.all
        run = lambda: hg.clients.hypergrad(  # noqa: E731
            server_loss, loss, self.local("params"), hg.optim.sgd(lr=0.1),
            self.local("batches"), a["val"], aux=a["aux"], rounds=R, process_group=self.group,
        )  # fmt: skip
        self.expect_failure(run, "rank 1:", "boom in a backward pass")

    def nan_in_a_batch(self):
        x, y = self.local("batches")
        if self.rank == 1:
            x = x.clone()
            x[3] = float("nan")  # round 1, step 1
        self.expect_failure(
            lambda: self.call(batches=(x, y)), "rank 1:", "FloatingPointError", "step 3"
        )

    def nan_in_an_unroll(self):
        x, y = self.local("batches")
        if self.rank == 0:
            x = x.clone()
            x[4] = float("inf")
        clients = hg.Clients(rounds=R, process_group=self.group)
        self.expect_failure(
            lambda: hg.unroll(
                inner,
                self.local("params"),
                hg.optim.sgd(lr=0.1),
                (x, y),
                aux=self.all["aux"],
                clients=clients,
            ),
            "rank 0:",
            "step 4",
        )

    def bad_argument_on_one_rank(self):
        wrt = "nonsense" if self.rank == 0 else "aux"
        self.expect_failure(lambda: self.call(wrt=wrt), "rank 0:", "wrt")

    def different_rounds(self):
        rounds = 1 if self.rank == 1 else R
        self.expect_failure(lambda: self.call(rounds=rounds), "different calls", "rounds")

    def different_method(self):
        method = "first_order" if self.rank == 0 else "reverse"
        self.expect_failure(lambda: self.call(method=method), "different calls", "method")

    def different_structure(self):
        x, y = self.local("batches")
        batches = (x[:, :, :, :2], y) if self.rank == 0 else (x, y)
        params = self.local("params")
        if self.rank == 0:
            params = {"w": params["w"][:, :2], "b": params["b"]}
        a = self.all
        run = lambda: hg.clients.hypergrad(  # noqa: E731
            lambda s, aux, v: (s["w"] ** 2).sum(),
            inner,
            params,
            hg.optim.sgd(lr=0.1),
            batches,
            a["val"],
            aux=a["aux"],
            rounds=R,
            process_group=self.group,
        )
        self.expect_failure(run, "different calls", "params")

    def a_rank_without_clients(self):
        params, (x, y) = self.local("params"), self.local("batches")
        if self.rank == 0:
            params = hg.tree.map(lambda p: p[:0], params)
            x, y = x[:, :0], y[:, :0]
        a = self.all
        run = lambda: hg.clients.hypergrad(  # noqa: E731
            outer, inner, params, hg.optim.sgd(lr=0.1), (x, y), a["val"], aux=a["aux"],
            rounds=R, process_group=self.group,
        )  # fmt: skip
        self.expect_failure(run, "rank 0:", "no clients")

    def forward_refuses_stacked_inputs(self):
        self.expect_failure(
            lambda: self.call(method="forward", wrt=("aux", "params")), "forward", "shared"
        )

    def implicit_refused(self):  # each rank would solve for its own clients only
        self.expect_failure(
            lambda: self.call(method=hg.Implicit(), wrt="aux"), "Implicit", "one process"
        )

    def still_in_step(self):  # after every fault above: the group still works
        self.compare("reverse", hg.optim.sgd(lr=0.1))


CHECKS = [
    "reverse", "reverse_adam_weights", "checkpointed", "truncated", "first_order", "chunks",
    "forward", "forward_chunked", "params_stacked", "params_shared", "custom_aggregate",
    "per_client_lr", "buffers", "random_outer_loss", "seed_beyond_int64", "collectives_per_call",
    "no_reference_kept", "unroll", "tasks", "tasks_chunks_weights", "tasks_forward",
    "exception_in_a_loss", "exception_in_a_backward", "nan_in_a_batch", "nan_in_an_unroll",
    "bad_argument_on_one_rank", "different_rounds", "different_method", "different_structure",
    "a_rank_without_clients", "forward_refuses_stacked_inputs", "implicit_refused",
    "still_in_step",
]  # fmt: skip
# On a GPU (test_cuda.py): every method's kind of collective, and the faults that make sense
# for one rank too (NCCL allows one rank per GPU, so its group on one GPU has a single rank).
ON_DEVICE = [
    "reverse", "reverse_adam_weights", "checkpointed", "forward", "params_shared",
    "custom_aggregate", "per_client_lr", "buffers", "unroll", "exception_in_a_loss",
    "nan_in_an_unroll", "bad_argument_on_one_rank", "implicit_refused", "still_in_step",
]  # fmt: skip


def dies(rank: int) -> dict[str, str]:
    """The last rank exits in its inner loss; the others must raise within the timeout."""
    group, world = dist.group.WORLD, dist.get_world_size()
    a = data(world)
    rows = slice(rank, rank + 1)

    def loss(p, aux, batch):
        if rank == world - 1:
            os._exit(3)
        return inner(p, aux, batch)

    try:
        hg.clients.hypergrad(
            outer,
            loss,
            mine(a["params"], rows),
            hg.optim.sgd(lr=0.1),
            tuple(b[:, rows] for b in a["batches"]),
            a["val"],
            aux=a["aux"],
            rounds=R,
            process_group=group,
        )
    except RankFailure as error:
        return {"dies": "ok" if "stopped answering" in str(error) else str(error)}
    return {"dies": "no RankFailure"}


def main(checks_class=Checks, names=CHECKS, on_device=ON_DEVICE, die=dies) -> None:
    """Run the checks named on the command line in this rank (the data-parallel worker
    runs its own checks through here too)."""
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=float(os.environ.get("HG_TEST_TIMEOUT", "60")))
    if DEVICE.type == "cuda":  # NCCL: one device per rank, set before the group starts
        torch.cuda.set_device(int(os.environ["RANK"]) % torch.cuda.device_count())
    dist.init_process_group(BACKEND, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "dies":
        results = die(rank)
    else:
        checks, results = checks_class(rank, world), {}
        for name in on_device if mode == "on_device" else names:
            try:
                getattr(checks, name)()
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(results, f)
    if mode != "dies":
        dist.barrier()  # every rank done before any tears the group down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

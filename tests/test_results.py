"""What ``hg.hypergrad`` returns besides the gradient: the trajectory of the K steps.

Every method computes the final carry on its way; ``Hypergradient.trajectory`` reports it, and
it equals ``hg.unroll``'s (1e-12, float64) for every method, with buffers, with clients and
chunks of clients.
"""

from __future__ import annotations

import optree
import pytest
import torch
from torch import nn

import hypergrad as hg

K = 4
METHODS = [
    pytest.param("reverse", id="reverse"),
    pytest.param(hg.Truncated(2), id="truncated"),
    pytest.param(hg.Checkpointed(1), id="checkpointed-1"),
    pytest.param(hg.Checkpointed(3), id="checkpointed-3"),
    pytest.param(hg.Checkpointed(slots=2), id="revolve-2"),
    pytest.param("first_order", id="first_order"),
    pytest.param("forward", id="forward"),
    pytest.param(hg.Forward(chunk_size=2), id="forward-chunked"),
    pytest.param(hg.Implicit(damping=10.0, stationarity=float("inf")), id="implicit"),
]


def assert_same(got: hg.Trajectory, want: hg.Trajectory) -> None:
    a, b = hg.tree.leaves(tuple(got)), hg.tree.leaves(tuple(want))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert not x.requires_grad
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert optree.tree_structure(tuple(got)) == optree.tree_structure(tuple(want))


def mlp_problem(opt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(K, 6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(K, 6, generator=g, dtype=torch.float64)
    params = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.5,
              "v": torch.randn(4, generator=g, dtype=torch.float64) * 0.5}  # fmt: skip

    def inner(p, a, batch):
        err = (torch.tanh(batch[0] @ p["w"]) @ p["v"] - batch[1]) ** 2
        return (a * err).mean() + 0.01 * (p["w"] ** 2).sum()

    def outer(p, a, batch):
        return ((torch.tanh(batch[0] @ p["w"]) @ p["v"] - batch[1]) ** 2).mean()

    aux = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    return {"outer_loss": outer, "inner_loss": inner, "params": params, "opt": opt,
            "batches": (x, y), "outer_batch": (x[0], y[0]), "aux": aux, "seed": 3}  # fmt: skip


def unrolled(problem, **changes):
    p = {**problem, **changes}
    return hg.unroll(p["inner_loss"], p["params"], p["opt"], p["batches"], aux=p["aux"],
                     seed=p["seed"], **{k: p[k] for k in ("buffers", "hyperparams") if k in p})  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "opt",
    [hg.optim.sgd(lr=0.1, momentum=0.8, weight_decay=0.01), hg.optim.adam(lr=0.02, eps=1e-3)],
    ids=["sgd", "adam"],
)
def test_trajectory_equals_unroll(method, opt):
    problem = mlp_problem(opt)
    wrt = {"implicit": ("aux", "weight_decay"), "first_order": ("lr",)}.get(
        getattr(method, "name", method), ("aux", "lr")
    )
    g = hg.hypergrad(**problem, method=method, wrt=wrt)
    assert_same(g.trajectory, unrolled(problem))
    assert g.trajectory.losses.shape == (K,)


def test_trajectory_with_tensor_hyperparams_and_params_asked():
    problem = mlp_problem(hg.optim.adam(lr=0.02))
    lr = torch.tensor(0.05, dtype=torch.float64)
    for method in ["reverse", hg.Checkpointed(2), "forward"]:
        g = hg.hypergrad(**problem, method=method, wrt=("params", "lr"), hyperparams={"lr": lr})
        assert_same(g.trajectory, unrolled(problem, hyperparams={"lr": lr}))


def test_trajectory_carries_the_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    params, buffers = hg.split(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(K, 8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(K, 8, 1, generator=g, dtype=torch.float64)

    def inner(p, a, batch, bufs):
        out, new = hg.call(model, p, batch[0], buffers=bufs, return_buffers=True)
        return ((out - batch[1]) ** 2).mean() + a * (p["3.weight"] ** 2).sum(), new

    def outer(p, a, batch, bufs):
        return ((hg.call(model, p, batch[0], buffers=bufs) - batch[1]) ** 2).mean()

    problem = {"outer_loss": outer, "inner_loss": inner, "params": params, "seed": 1,
               "opt": hg.optim.adam(lr=0.05, eps=1e-3), "batches": (x, y),
               "outer_batch": (x[0], y[0]), "aux": torch.tensor(0.1, dtype=torch.float64),
               "buffers": buffers}  # fmt: skip
    want = unrolled(problem)
    assert not torch.equal(want.buffers["1.running_mean"], buffers["1.running_mean"])
    methods = ["reverse", hg.Checkpointed(2), hg.Checkpointed(slots=2), "forward", hg.Truncated(1)]
    for method in methods:
        assert_same(hg.hypergrad(**problem, method=method).trajectory, want)


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["vmap", "chunks"])
@pytest.mark.parametrize("method", ["reverse", hg.Checkpointed(2), "forward"])
def test_trajectory_with_clients_equals_clients_unroll(method, chunk_size):
    g = torch.Generator().manual_seed(5)
    C, R = 3, 2
    params = {"w": torch.randn(C, 2, generator=g, dtype=torch.float64)}
    data = torch.randn(R * K, C, 2, generator=g, dtype=torch.float64)

    def inner(p, a, x):
        return ((p["w"] - a * x) ** 2).sum()

    def outer(server, a, t):
        return ((server["w"] - t) ** 2).sum()

    opt = hg.optim.adam(lr=0.1)
    aux = torch.tensor(0.7, dtype=torch.float64)
    options = {"rounds": R, "chunk_size": chunk_size, "steps": K, "aux": aux, "seed": 0}
    want = hg.clients.unroll(inner, params, opt, data, **options)
    got = hg.clients.hypergrad(outer, inner, params, opt, data, torch.ones(2, dtype=torch.float64),
                               method=method, **options)  # fmt: skip
    assert got.trajectory.losses.shape == (R * K, C)
    assert_same(got.trajectory, want)


# ------------------------------------------------------------------ batches=None


def distillation_problem():
    """Learned data in aux, no batches: the inner loss fits a line to ``aux``'s points."""
    g = torch.Generator().manual_seed(2)
    aux = {"x": torch.randn(5, 2, generator=g, dtype=torch.float64),
           "y": torch.randn(5, generator=g, dtype=torch.float64)}  # fmt: skip
    seen = []

    def inner(p, a, batch):
        seen.append(batch)
        return ((a["x"] @ p["w"] - a["y"]) ** 2).mean()

    def outer(p, a, real):
        return ((real[0] @ p["w"] - real[1]) ** 2).mean()

    real = (torch.randn(20, 2, generator=g, dtype=torch.float64),
            torch.randn(20, generator=g, dtype=torch.float64))  # fmt: skip
    params = {"w": torch.zeros(2, dtype=torch.float64)}
    return inner, outer, params, aux, real, seen


def test_batches_none_passes_none_to_the_inner_loss():
    inner, outer, params, aux, real, seen = distillation_problem()
    opt = hg.optim.sgd(lr=0.3)
    traj = hg.unroll(inner, params, opt, None, steps=3, aux=aux)
    assert traj.losses.shape == (3,) and seen == [None] * 3
    want = hg.unroll(inner, params, opt, lambda k: None, steps=3, aux=aux)
    assert_same(traj, want)
    for method in ["reverse", hg.Checkpointed(2), "forward"]:
        g = hg.hypergrad(outer, inner, params, opt, None, real, steps=3, aux=aux, method=method)
        assert_same(g.trajectory, traj)
    hg.testing.check_hypergrad(outer, inner, params, opt, None, real, steps=3, aux=aux)


def test_batches_none_with_clients():
    inner, outer, params, aux, real, _ = distillation_problem()
    stacked = {"w": torch.stack([params["w"], params["w"] + 1, params["w"] - 1])}
    opt = hg.optim.sgd(lr=0.3)
    options = {"steps": 2, "rounds": 2, "aux": aux, "seed": 0}
    traj = hg.clients.unroll(inner, stacked, opt, None, **options)
    assert traj.losses.shape == (4, 3)
    g = hg.clients.hypergrad(outer, inner, stacked, opt, None, real, **options)
    assert_same(g.trajectory, traj)
    # the clients average to one model: the hypergradient of a single model from their mean
    ref = hg.hypergrad(outer, inner, params, opt, None, real, steps=4, aux=aux)
    torch.testing.assert_close(g.aux, ref.aux, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ aux changed in place


@pytest.mark.parametrize(
    "method", [None, "reverse", hg.Checkpointed(2), "forward", "first_order", hg.Implicit()]
)
@pytest.mark.parametrize("asked", [True, False], ids=["wrt-aux", "wrt-lr"])
def test_a_loss_that_changes_aux_in_place_is_refused(method, asked):
    def inner(p, a, x):
        a["scale"].mul_(1.1)  # a running scale kept in aux: every step would see another one
        return ((p["w"] - a["scale"] * x) ** 2).sum()

    def outer(p, a, x):
        return (p["w"] ** 2).sum()

    aux = {"scale": torch.ones(1, dtype=torch.float64)}
    params, opt = {"w": torch.zeros(1, dtype=torch.float64)}, hg.optim.sgd(lr=0.1)
    batches = torch.ones(3, 1, dtype=torch.float64)
    name = "hg.unroll" if method is None else "hg.hypergrad"
    match = rf"^{name}: a loss changed aux\['scale'\] in place\. aux is passed unchanged"
    if method == "forward" or (asked and method not in (None, "first_order")):
        # autograd (torch.func in forward mode) refuses it first: explained
        match = rf"^{name}: (a loss changed aux|inner_loss changed a tensor in place \(mul_\))"
    with pytest.raises(RuntimeError, match=match):
        if method is None:
            hg.unroll(inner, params, opt, batches, aux=aux)
        else:
            wrt = ("aux",) if asked and method != "first_order" else ("lr",)
            if isinstance(method, hg.Implicit):
                wrt = ("aux",) if asked else ("weight_decay",)
            hg.hypergrad(outer, inner, params, opt, batches, None, aux=aux, method=method, wrt=wrt)
    assert torch.equal(aux["scale"], torch.ones(1, dtype=torch.float64))


def test_trajectory_with_micro_batches_equals_unroll():
    problem = mlp_problem(hg.optim.sgd(lr=0.1, momentum=0.5))

    def inner(p, a, batch):  # a mean over the batch: micro-batches are exact
        return ((torch.tanh(batch[0] @ p["w"]) @ p["v"] - batch[1]) ** 2).mean() + a * (
            p["w"] ** 2
        ).sum()

    problem = {**problem, "inner_loss": inner, "aux": torch.tensor(0.01, dtype=torch.float64)}
    g = hg.hypergrad(**problem, method=hg.Checkpointed(2, micro_batches=2))
    assert_same(g.trajectory, unrolled(problem))

"""torch's vmapped second derivative through affine norms is wrong; hg.Clients must not be.

The pins assert torch's raw result is still wrong (when torch fixes it they fail, and the
rewrite in ``hypergrad._clients.norms`` and its notes can go); the others check that
``hg.Clients`` equals a per-client loop where torch's kernels would not. The whole sweep (every
norm x inner_grad x method x server/tasks) is ``benchmarks/vmap_norms.py``, run by the slow
test at the end.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad._clients.norms import exact_norms

F64 = torch.float64
AFFINE = {
    "batch_norm": lambda x, w: F.batch_norm(x, None, None, weight=w, training=True),
    "layer_norm": lambda x, w: F.layer_norm(x, (4,), weight=w),
    "instance_norm": lambda x, w: F.instance_norm(x.view(2, 3, 4).transpose(1, 2), weight=w),
}


def second_order(norm, w, batched):
    """d/dw of the sum of the gradient of a loss through an affine norm (vmapped or not)."""
    x = torch.linspace(-1, 1, 24, dtype=F64).view(6, 4) ** 3

    def f(w):
        return (AFFINE[norm](x * w, w) ** 3).sum()

    grad = torch.func.grad(f)
    if batched:
        return torch.func.grad(lambda w: torch.func.vmap(grad)(w[None]).sum())(w)
    return torch.func.grad(lambda w: grad(w).sum())(w)


@pytest.mark.parametrize("norm", list(AFFINE))
def test_torch_still_gets_the_vmapped_second_derivative_of_an_affine_norm_wrong(norm):
    # When this fails, torch has fixed it: drop hypergrad._clients.norms, its sharp-bits note
    # and the known issue in the changelog.
    w = torch.linspace(0.5, 1.5, 4, dtype=F64)
    one, batched = second_order(norm, w, False), second_order(norm, w, True)
    assert not torch.allclose(one, batched, rtol=1e-6, atol=0), "torch fixed its vmap rule"
    with exact_norms():
        ours = second_order(norm, w, True)
    torch.testing.assert_close(ours, one, rtol=1e-12, atol=1e-14)


def net(norm: str) -> nn.Module:
    torch.manual_seed(0)
    layer = {
        "BatchNorm1d": lambda: nn.BatchNorm1d(4, track_running_stats=False),
        "LayerNorm": lambda: nn.LayerNorm([4, 3]),
        "InstanceNorm1d": lambda: nn.InstanceNorm1d(4, affine=True),
    }[norm]()
    return nn.Sequential(nn.Conv1d(4, 4, 1), layer, nn.Tanh(), nn.Flatten(), nn.Linear(12, 1))


def clients_problem(norm: str, C: int = 2, K: int = 2):
    model = net(norm).double()
    g = torch.Generator().manual_seed(1)
    params, _ = hg.stack([model] * C)
    params = hg.tree.map(lambda x: x + 0.1 * torch.randn(x.shape, generator=g, dtype=F64), params)

    def inner(p, a, b):
        return ((hg.call(model, p, b[0]) - b[1]) ** 2).mean() + a * hg.tree.vdot(p, p)

    def outer(p, a, b):
        return ((hg.call(model, p, b[0]) - b[1]) ** 2).mean()

    batches = (torch.randn(K, C, 5, 4, 3, generator=g, dtype=F64),
               torch.randn(K, C, 5, 1, generator=g, dtype=F64))  # fmt: skip
    val = (torch.randn(5, 4, 3, generator=g, dtype=F64), torch.randn(5, 1, generator=g, dtype=F64))
    return inner, outer, params, batches, val, torch.tensor(0.3, dtype=F64)


def loop_reference(inner, outer, params, batches, val, aux, lr=0.1):
    """The server's hypergradient by a loop over clients: torch's kernels, no vmap."""
    a = aux.clone().requires_grad_()
    finals = []
    for c in range(batches[0].shape[1]):
        p = {k: v[c].clone().requires_grad_() for k, v in params.items()}
        for k in range(batches[0].shape[0]):
            grads = torch.autograd.grad(inner(p, a, (batches[0][k, c], batches[1][k, c])),
                                        list(p.values()), create_graph=True)  # fmt: skip
            p = {n: v - lr * d for (n, v), d in zip(p.items(), grads)}
        finals.append(p)
    return torch.autograd.grad(outer(hg.tree.mean(finals), a, val), a)[0]


@pytest.mark.parametrize(
    ("norm", "method"),
    [("BatchNorm1d", "reverse"), ("LayerNorm", "forward"), ("InstanceNorm1d", "reverse")],
)
def test_clients_through_an_affine_norm_with_func_equal_the_loop(norm, method):
    inner, outer, params, batches, val, aux = clients_problem(norm)
    want = loop_reference(inner, outer, params, batches, val, aux)
    g = hg.clients.hypergrad(outer, inner, params, hg.optim.sgd(lr=0.1), batches, val, aux=aux,
                             method=method, inner_grad="func")  # fmt: skip
    assert abs(float(g.aux - want)) <= 1e-10 * abs(float(want))


def test_running_statistics_carried_through_the_rewrite_equal_per_client_unrolls():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.Linear(4, 1))
    model = model.double()
    params, buffers = hg.stack([model] * 2)

    def inner(p, a, batch, b):
        out, new = hg.call(model, p, batch[0], buffers=b, return_buffers=True)
        return ((out - batch[1]) ** 2).mean(), new

    g = torch.Generator().manual_seed(2)
    data = (torch.randn(3, 2, 6, 3, generator=g, dtype=F64),
            torch.randn(3, 2, 6, 1, generator=g, dtype=F64))  # fmt: skip
    traj = hg.clients.unroll(inner, params, hg.optim.sgd(lr=0.1), data, buffers=buffers,
                             inner_grad="func")  # fmt: skip
    for c in range(2):
        one = hg.unroll(inner, hg.unstack(params)[c], hg.optim.sgd(lr=0.1),
                        (data[0][:, c], data[1][:, c]), buffers=hg.unstack(buffers)[c])  # fmt: skip
        for got, want in zip(
            hg.tree.leaves(hg.unstack(traj.buffers)[c]), hg.tree.leaves(one.buffers)
        ):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        for got, want in zip(
            hg.tree.leaves(hg.unstack(traj.params)[c]), hg.tree.leaves(one.params)
        ):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("HYPOTHESIS_PROFILE") != "thorough",
    reason="the whole norm sweep (88 cases, about a minute) runs in the thorough profile "
    "(make test-thorough); the pins above cover each case torch gets wrong",
)
def test_the_norm_sweep_finds_no_silent_difference():
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    try:
        import vmap_norms
    finally:
        sys.path.pop(0)
    assert vmap_norms.main(write=False) == []

"""Forward mode through every loss of ``torch.nn.functional`` (torch bug pytorch/pytorch#123996).

``method="forward"`` takes a ``jvp`` of an inner gradient (forward over reverse). torch's
forward-mode rule of some double-backward ops writes into the tangent of an input that has none
(a target captured in a closure, or a batch tensor), failing with "ZeroTensors are immutable".
Each case below is a loss as people write it; forward must equal reverse to rounding, with the
data captured in the closure and, separately, passed in through the batch.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg
from hypergrad.methods.forward_safe import REPLACED, _ForwardSafeLosses, forward_safe_losses

K = 2
N, C = 4, 3  # examples, classes / features per head
DT = torch.float64


def make_data() -> dict[str, torch.Tensor]:
    """Targets of every kind the losses take, away from the losses' kinks (see the cases)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=DT)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)

    return {
        "t": randn(N, C),
        "t2": randn(N, C),
        "p01": 0.1 + 0.8 * rand(N, C),
        "logits": randn(N, C),
        "probs": torch.softmax(randn(N, C), -1),
        "logp": torch.log_softmax(randn(N, C), -1),
        "idx": torch.tensor([0, 2, 1, 2]),
        "sign": torch.where(rand(N, C) < 0.5, -1.0, 1.0).to(DT),
        "sign1": torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=DT),
        "counts": torch.tensor([[0.0, 1, 3], [2, 0, 1], [5, 1, 0], [1, 2, 2]], dtype=DT),
        "var": 0.5 + rand(N, C),
        "var1": 0.5 + rand(N, 1),
        "w_class": 0.5 + rand(C),
        "w_full": 0.5 + rand(N, C),
        "w_col": 0.5 + rand(C),
        "ml": torch.tensor([[0, 2, -1], [1, -1, 0], [2, 1, 0], [0, 1, 2]]),
        "feat": randn(N, 5),
        "lin_w": 0.5 * randn(C, 5),
    }


@dataclasses.dataclass(frozen=True)
class Case:
    """One loss as written: ``fn(z, u, data, reduction)``; z and u are the model's two heads."""

    name: str
    fn: Callable[..., torch.Tensor]
    reductions: tuple[str, ...] = ("mean", "sum", "none")


def sig(x):
    return torch.sigmoid(x)


def pos(x):
    return F.softplus(x) + 0.1


_CASES = [
    # regression: both argument orders (the forum writes F.mse_loss(x, pred))
    Case("mse", lambda z, u, d, r: F.mse_loss(z, d["t"], reduction=r)),
    Case("mse-target-first", lambda z, u, d, r: F.mse_loss(d["t"], z, reduction=r)),
    Case("l1", lambda z, u, d, r: F.l1_loss(z, d["t"], reduction=r)),
    Case("l1-target-first", lambda z, u, d, r: F.l1_loss(d["t"], z, reduction=r)),
    Case("smooth_l1", lambda z, u, d, r: F.smooth_l1_loss(z, d["t"], reduction=r)),
    Case("smooth_l1-beta", lambda z, u, d, r: F.smooth_l1_loss(z, d["t"], reduction=r, beta=0.5)),
    Case("smooth_l1-beta0", lambda z, u, d, r: F.smooth_l1_loss(z, d["t"], reduction=r, beta=0.0)),
    Case("smooth_l1-target-first", lambda z, u, d, r: F.smooth_l1_loss(d["t"], z, reduction=r)),
    Case("huber", lambda z, u, d, r: F.huber_loss(z, d["t"], reduction=r)),
    Case("huber-delta", lambda z, u, d, r: F.huber_loss(z, d["t"], reduction=r, delta=0.5)),
    Case("huber-target-first", lambda z, u, d, r: F.huber_loss(d["t"], z, reduction=r, delta=0.7)),
    Case(
        "huber-weight",
        lambda z, u, d, r: F.huber_loss(z, d["t"], reduction=r, delta=0.7, weight=d["w_full"]),
    ),
    Case("mse-weight", lambda z, u, d, r: F.mse_loss(z, d["t"], reduction=r, weight=d["w_full"])),
    Case("gaussian_nll", lambda z, u, d, r: F.gaussian_nll_loss(z, d["t"], d["var"], reduction=r)),
    Case(
        "gaussian_nll-target-first",
        lambda z, u, d, r: F.gaussian_nll_loss(d["t"], z, d["var"], reduction=r),
    ),
    Case(
        "gaussian_nll-var-model",
        lambda z, u, d, r: F.gaussian_nll_loss(z, d["t"], pos(u), reduction=r, full=True),
    ),
    Case(
        "gaussian_nll-var1",
        lambda z, u, d, r: F.gaussian_nll_loss(z, d["t"], d["var1"], reduction=r, eps=1e-3),
    ),
    Case("poisson_nll", lambda z, u, d, r: F.poisson_nll_loss(z, d["counts"], reduction=r)),
    Case(
        "poisson_nll-rate",
        lambda z, u, d, r: F.poisson_nll_loss(
            pos(z), d["counts"], log_input=False, full=True, reduction=r
        ),
    ),
    Case(
        "poisson_nll-target-model",
        lambda z, u, d, r: F.poisson_nll_loss(d["t"], pos(z), reduction=r, full=True),
    ),
    # binary
    Case("bce", lambda z, u, d, r: F.binary_cross_entropy(sig(z), d["p01"], reduction=r)),
    Case(
        "bce-weight",
        lambda z, u, d, r: F.binary_cross_entropy(sig(z), d["p01"], d["w_full"], reduction=r),
    ),
    Case(
        "bce-target-model",
        lambda z, u, d, r: F.binary_cross_entropy(d["p01"], sig(z), reduction=r),
    ),
    Case(
        "bce_logits",
        lambda z, u, d, r: F.binary_cross_entropy_with_logits(z, d["p01"], reduction=r),
    ),
    Case(
        "bce_logits-weights",
        lambda z, u, d, r: F.binary_cross_entropy_with_logits(
            z, d["p01"], d["w_full"], pos_weight=d["w_col"], reduction=r
        ),
    ),
    Case(
        "bce_logits-target-model",
        lambda z, u, d, r: F.binary_cross_entropy_with_logits(d["logits"], sig(z), reduction=r),
    ),
    Case("soft_margin", lambda z, u, d, r: F.soft_margin_loss(z, d["sign"], reduction=r)),
    Case(
        "multilabel_soft_margin",
        lambda z, u, d, r: F.multilabel_soft_margin_loss(z, d["p01"], reduction=r),
    ),
    Case(
        "multilabel_soft_margin-weight",
        lambda z, u, d, r: F.multilabel_soft_margin_loss(z, d["p01"], d["w_col"], reduction=r),
    ),
    # classes
    Case("cross_entropy", lambda z, u, d, r: F.cross_entropy(z, d["idx"], reduction=r)),
    Case(
        "cross_entropy-options",
        lambda z, u, d, r: F.cross_entropy(
            z, d["idx"], d["w_class"], ignore_index=1, label_smoothing=0.1, reduction=r
        ),
    ),
    Case("cross_entropy-probs", lambda z, u, d, r: F.cross_entropy(z, d["probs"], reduction=r)),
    Case(
        "cross_entropy-probs-options",
        lambda z, u, d, r: F.cross_entropy(
            z, d["probs"], d["w_class"], label_smoothing=0.2, reduction=r
        ),
    ),
    Case(
        "cross_entropy-target-model",
        lambda z, u, d, r: F.cross_entropy(d["logits"], torch.softmax(z, -1), reduction=r),
    ),
    Case("nll", lambda z, u, d, r: F.nll_loss(F.log_softmax(z, -1), d["idx"], reduction=r)),
    Case(
        "nll-weight",
        lambda z, u, d, r: F.nll_loss(
            F.log_softmax(z, -1), d["idx"], d["w_class"], ignore_index=2, reduction=r
        ),
    ),
    Case(
        "kl_div",
        lambda z, u, d, r: F.kl_div(F.log_softmax(z, -1), d["probs"], reduction=r),
        ("mean", "sum", "none", "batchmean"),
    ),
    Case(
        "kl_div-log_target",
        lambda z, u, d, r: F.kl_div(F.log_softmax(z, -1), d["logp"], reduction=r, log_target=True),
        ("mean", "sum", "none", "batchmean"),
    ),
    Case(
        "kl_div-target-model",
        lambda z, u, d, r: F.kl_div(d["logp"], torch.softmax(z, -1), reduction=r),
        ("mean", "sum", "none", "batchmean"),
    ),
    Case(
        "kl_div-log_target-target-model",
        lambda z, u, d, r: F.kl_div(d["logp"], F.log_softmax(z, -1), reduction=r, log_target=True),
        ("mean", "sum", "none", "batchmean"),
    ),
    Case(
        "linear_cross_entropy",
        lambda z, u, d, r: F.linear_cross_entropy(
            d["feat"], d["lin_w"] + z[:1].T @ u[:1, :1].expand(1, 5), d["idx"], reduction=r
        ),
    ),
    Case(
        "linear_cross_entropy-input-model",
        lambda z, u, d, r: F.linear_cross_entropy(
            torch.cat([z, u[:, :2]], 1), d["lin_w"], d["idx"], reduction=r
        ),
    ),
    # margins (the data keep every margin well away from its kink)
    Case("hinge_embedding", lambda z, u, d, r: F.hinge_embedding_loss(z, d["sign"], reduction=r)),
    Case(
        "margin_ranking",
        lambda z, u, d, r: F.margin_ranking_loss(
            z[:, 0], d["t"][:, 0], d["sign1"], margin=0.1, reduction=r
        ),
    ),
    Case(
        "margin_ranking-target-first",
        lambda z, u, d, r: F.margin_ranking_loss(
            d["t"][:, 0], z[:, 0], d["sign1"], margin=0.1, reduction=r
        ),
    ),
    Case(
        "cosine_embedding",
        lambda z, u, d, r: F.cosine_embedding_loss(z, d["t"], d["sign1"], margin=0.1, reduction=r),
    ),
    Case(
        "cosine_embedding-target-first",
        lambda z, u, d, r: F.cosine_embedding_loss(d["t"], z, d["sign1"], reduction=r),
    ),
    Case(
        "triplet_margin",
        lambda z, u, d, r: F.triplet_margin_loss(z, d["t"], d["t2"], margin=2.0, reduction=r),
    ),
    Case(
        "triplet_margin-positive-model",
        lambda z, u, d, r: F.triplet_margin_loss(
            d["t"], z, d["t2"], margin=2.0, p=1.0, swap=True, reduction=r
        ),
    ),
    Case(
        "triplet_margin_with_distance",
        lambda z, u, d, r: F.triplet_margin_with_distance_loss(
            z, d["t"], d["t2"], margin=2.0, reduction=r
        ),
    ),
    Case(
        "triplet_margin_with_distance-cosine",
        lambda z, u, d, r: F.triplet_margin_with_distance_loss(
            d["t"],
            z,
            d["t2"],
            distance_function=lambda a, b: 1 - F.cosine_similarity(a, b),
            margin=1.5,
            swap=True,
            reduction=r,
        ),
    ),
    Case("multi_margin", lambda z, u, d, r: F.multi_margin_loss(z, d["idx"], reduction=r)),
    Case(
        "multi_margin-options",
        lambda z, u, d, r: F.multi_margin_loss(
            z, d["idx"], p=2, margin=1.5, weight=d["w_class"], reduction=r
        ),
    ),
    Case("multilabel_margin", lambda z, u, d, r: F.multilabel_margin_loss(z, d["ml"], reduction=r)),
    # the nn modules of the losses forward mode rewrites (they call F.*)
    Case("nn.MSELoss", lambda z, u, d, r: nn.MSELoss(reduction=r)(z, d["t"])),
    Case("nn.MSELoss-target-first", lambda z, u, d, r: nn.MSELoss(reduction=r)(d["t"], z)),
    Case("nn.HuberLoss", lambda z, u, d, r: nn.HuberLoss(reduction=r, delta=0.5)(z, d["t"])),
    Case("nn.SoftMarginLoss", lambda z, u, d, r: nn.SoftMarginLoss(reduction=r)(z, d["sign"])),
]
# torch has no double backward for these at all (reverse mode fails as well), so there is
# nothing for forward mode to equal; see test_an_op_without_a_forward_rule_is_explained.
_NO_DOUBLE_BACKWARD = ("multi_margin", "multi_margin-options", "multilabel_margin")


def _in_this_torch(case: Case) -> bool:
    """F.linear_cross_entropy and the ``weight=`` of mse/huber are recent additions to torch."""
    if case.name.startswith("linear_cross_entropy"):
        return hasattr(F, "linear_cross_entropy")
    if case.name in ("mse-weight", "huber-weight"):
        func = F.mse_loss if case.name == "mse-weight" else F.huber_loss
        return "weight" in inspect.signature(func).parameters
    return True


CASES = [c for c in _CASES if c.name not in _NO_DOUBLE_BACKWARD and _in_this_torch(c)]

SGD = hg.optim.sgd(lr=0.1, momentum=0.5)
ADAM = hg.optim.adam(lr=0.05)
WRT = ("aux", "lr")


def sweep_problem(fit, opt, *, capture):
    """A two-head linear model trained K steps on ``fit(z, u, data)`` plus ``aux * |p|^2``.

    ``capture="closure"``: the data are captured by inner_loss (they carry no tangent);
    ``"batch"``: they come in through the batch, stacked over the K steps.
    """
    g = torch.Generator().manual_seed(1)
    data = make_data()
    x = torch.randn(K, N, 3, generator=g, dtype=DT)
    params = {"w": 0.5 * torch.randn(3, 2 * C, generator=g, dtype=DT),
              "b": 0.1 * torch.randn(2 * C, generator=g, dtype=DT)}  # fmt: skip

    def heads(p, xb):
        out = xb @ p["w"] + p["b"]
        return out[:, :C], out[:, C:]

    if capture == "closure":
        batches = x

        def inner(p, a, xb):
            return fit(*heads(p, xb), data) + a * hg.tree.vdot(p, p)

    else:
        batches = (x, {k: v.expand(K, *v.shape) for k, v in data.items()})

        def inner(p, a, batch):
            xb, d = batch
            return fit(*heads(p, xb), d) + a * hg.tree.vdot(p, p)

    def outer(p, a, xb):
        z, u = heads(p, xb)
        return (z**2).mean() + fit(z, u, data)

    outer_x = torch.randn(N, 3, generator=g, dtype=DT)
    aux = torch.tensor(0.05, dtype=DT)
    return {"outer_loss": outer, "inner_loss": inner, "params": params, "opt": opt,
            "batches": batches, "outer_batch": outer_x, "aux": aux}  # fmt: skip


def all_reductions(case):
    """The case's loss under every reduction it takes, summed (``"none"`` summed first)."""

    def fit(z, u, d):
        total = 0.0
        for i, r in enumerate(case.reductions):
            out = case.fn(z, u, d, r)
            total = total + (out.sum() if r == "none" else out) / (i + 1)
        return total

    return fit


def assert_forward_equals_reverse(problem, rtol=1e-10):
    fwd = hg.hypergrad(**problem, method="forward", wrt=WRT)
    rev = hg.hypergrad(**problem, method="reverse", wrt=WRT)
    torch.testing.assert_close(fwd.value, rev.value, rtol=1e-12, atol=0)
    torch.testing.assert_close(fwd.aux, rev.aux, rtol=rtol, atol=1e-13)
    torch.testing.assert_close(fwd.hyperparams["lr"], rev.hyperparams["lr"], rtol=rtol, atol=1e-13)
    assert rev.aux != 0 and rev.hyperparams["lr"] != 0


# torch's own notice that kl_div's "mean" will change meaning (it says so on every call)
@pytest.mark.filterwarnings("ignore:reduction:UserWarning")
@pytest.mark.parametrize("capture", ["closure", "batch"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_forward_equals_reverse_for_every_loss(case, capture):
    opt = [SGD, ADAM][(CASES.index(case) + (capture == "batch")) % 2]
    assert_forward_equals_reverse(sweep_problem(all_reductions(case), opt, capture=capture))


# ---------------------------------------------------------------- seed problem 5's forum loss


def forum_problem():
    """The forum script: ``F.mse_loss(x, F.tanhshrink(p))`` with the data ``x`` in a closure.

    An auxiliary model (a per-coordinate weight) makes a regulariser; the outer loss is the
    same fit on held-out data.
    """
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, generator=g, dtype=DT)
    vx = torch.randn(6, generator=g, dtype=DT)
    params = {"p": torch.randn(6, generator=g, dtype=DT)}
    aux = {"w": 0.1 * torch.rand(6, generator=g, dtype=DT)}

    def inner_loss(params, aux, step):
        loss = F.mse_loss(x, F.tanhshrink(params["p"]))
        return loss + (aux["w"] * params["p"] ** 2).sum()

    def outer_loss(params, aux, batch):
        return F.mse_loss(vx, F.tanhshrink(params["p"]))

    return {"outer_loss": outer_loss, "inner_loss": inner_loss, "params": params,
            "opt": hg.optim.adam(lr=0.1), "batches": torch.arange(3), "outer_batch": None,
            "aux": aux}  # fmt: skip


def test_forum_loss_forward_matches_finite_differences_and_reverse():
    problem = forum_problem()
    report = hg.testing.check_hypergrad(
        **problem, method="forward", wrt=("aux", "lr"), directions=2
    )
    assert report.passed
    rev = hg.hypergrad(**problem, method="reverse", wrt=("aux", "lr"))
    torch.testing.assert_close(report.hypergradient.aux, rev.aux, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        report.hypergradient.hyperparams["lr"], rev.hyperparams["lr"], rtol=1e-10, atol=1e-14
    )


# ---------------------------------------------------------------- only inside forward's jvp


def _rewriting() -> bool:
    return any(
        isinstance(m, _ForwardSafeLosses)
        for m in torch.overrides._get_current_function_mode_stack()
    )


def test_losses_are_rewritten_only_inside_the_forward_method():
    seen = []
    model, x, y = torch.nn.Linear(3, 1).double(), torch.randn(K, N, 3, dtype=DT), torch.randn(N, 1)

    def inner(p, a, xb):
        seen.append(_rewriting())
        return F.mse_loss(hg.call(model, p, xb), y.double()) + a * hg.tree.vdot(p, p)

    params, _ = hg.split(model)
    args = (lambda p, a, b: hg.tree.vdot(p, p), inner, params, SGD, x, None)
    aux = torch.tensor(0.1, dtype=DT)
    hg.hypergrad(*args, aux=aux, method="forward")
    assert seen == [True] * K
    seen.clear()
    hg.hypergrad(*args, aux=aux, method="reverse")
    hg.unroll(inner, params, SGD, x, aux=aux)
    assert seen == [False] * (2 * K)
    assert not _rewriting()
    pred = torch.zeros(2, requires_grad=True)
    assert type(F.mse_loss(pred, torch.ones(2)).grad_fn).__name__ == "MseLossBackward0"


# ---------------------------------------------------------------- the rewrites themselves

_REWRITE_CALLS = [
    pytest.param(F.mse_loss, {}, id="mse"),
    pytest.param(F.huber_loss, {}, id="huber"),
    pytest.param(F.huber_loss, {"delta": 0.3}, id="huber-delta"),
    pytest.param(
        F.huber_loss,
        {"delta": 0.3, "weight": "w"},
        id="huber-weight",
        marks=pytest.mark.skipif(
            "weight" not in inspect.signature(F.huber_loss).parameters,
            reason="F.huber_loss takes no weight in this torch",
        ),
    ),
    pytest.param(F.soft_margin_loss, {"sign": True}, id="soft_margin"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("func", "options"), _REWRITE_CALLS)
def test_rewrite_equals_torch_with_first_and_second_derivatives(func, options, reduction):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, generator=g, dtype=DT)
    t = torch.randn(5, 2, generator=g, dtype=DT)
    t[0] = x[0]  # an exact fit: huber's quadratic branch must keep its curvature there
    options = dict(options)
    if options.pop("sign", False):
        t = torch.where(t < 0, -1.0, 1.0).to(DT)
    if options.get("weight") == "w":
        options["weight"] = torch.rand(5, 2, generator=g, dtype=DT)
    v = torch.randn(5, 2, generator=g, dtype=DT)

    def derivatives(fn):
        xr = x.clone().requires_grad_()
        out = fn(xr, t, reduction=reduction, **options)
        (gx,) = torch.autograd.grad(out.sum(), xr, create_graph=True)
        (hv,) = torch.autograd.grad((gx * v).sum(), xr)
        return out, gx, hv

    for ours, theirs in zip(derivatives(REPLACED[func]), derivatives(func)):
        torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    ("func", "kwargs"),
    [
        (F.mse_loss, {"size_average": False}),
        (F.mse_loss, {"target": torch.zeros(3, 1)}),
        (F.mse_loss, {"reduction": "batchmean"}),
        (F.mse_loss, {"target": torch.zeros(3, 2, dtype=torch.float32)}),
        (F.huber_loss, {"delta": 0.0}),
        (F.huber_loss, {"weight": torch.ones(2)}),
        (F.soft_margin_loss, {"reduce": False}),
    ],
)
def test_arguments_the_rewrites_do_not_cover_go_to_torch(func, kwargs):
    kwargs = {"input": torch.zeros(3, 2, dtype=DT), "target": torch.ones(3, 2, dtype=DT), **kwargs}
    assert REPLACED[func](**kwargs) is None


def test_a_target_shaped_unlike_the_input_keeps_torchs_warning():
    with forward_safe_losses(), pytest.warns(UserWarning, match="different to the input size"):
        out = F.mse_loss(torch.zeros(3), torch.ones(3, 1))
    assert out.item() == 1.0


# ---------------------------------------------------------------- what is left: explained


def _linear_problem(fit):
    model = torch.nn.Linear(3, C).double()
    x = torch.randn(K, N, 3, dtype=DT)
    params, _ = hg.split(model)

    def inner(p, a, xb):
        return fit(hg.call(model, p, xb)) + a * hg.tree.vdot(p, p)

    return (lambda p, a, b: hg.tree.vdot(p, p), inner, params, SGD, x, None)


def test_the_zero_tensor_bug_in_an_op_not_rewritten_is_explained():
    y = torch.randn(N, C, dtype=DT)  # captured: no tangent
    args = _linear_problem(lambda pred: torch.ops.aten.mse_loss(pred, y))  # not F.mse_loss
    with pytest.raises(
        RuntimeError,
        match=r"torch bug \(pytorch/pytorch#123996\).*rewrites F\.mse_loss, F\.huber_loss, "
        r"F\.soft_margin_loss .*Fixes: write that op with elementary ops",
    ):
        hg.hypergrad(*args, aux=torch.tensor(0.1, dtype=DT), method="forward")


def test_an_op_without_a_forward_rule_is_explained():
    idx = torch.tensor([0, 2, 1, 2])
    args = _linear_problem(lambda pred: F.multi_margin_loss(pred, idx))
    with pytest.raises(
        NotImplementedError,
        match=r"method='forward'\): torch has no forward-mode rule .*multi_margin_loss.*"
        r"Fixes: write that part of the loss with elementary ops",
    ):
        hg.hypergrad(*args, aux=torch.tensor(0.1, dtype=DT), method="forward")


# ---------------------------------------------------------------- torch's notices about itself


def test_torchs_deprecation_notices_are_hidden_and_the_users_warnings_kept():
    def fit(pred):
        for category in (DeprecationWarning, FutureWarning):
            warnings.warn_explicit("torch's", category, "_script.py", 1, module="torch.jit._script")
        warnings.warn_explicit("the user's", FutureWarning, "user.py", 1, module="user")
        return (pred**2).mean()

    args = _linear_problem(fit)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        hg.hypergrad(*args, aux=torch.tensor(0.1, dtype=DT), method="forward")
    assert {str(w.message) for w in seen} == {"the user's"}

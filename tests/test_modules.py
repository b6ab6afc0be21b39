"""torch's own modules through every method: each works, or fails with an error that names the fix.

The sweep: a tiny float64 model per module of ``torch.nn`` (in training mode unless the name
says otherwise), K = 2 Adam steps, the hypergradient with respect to an L2 strength (``aux``)
and the learning rate. Every exact method agrees with ``"reverse"`` to 1e-8; ``hg.Truncated(1)``
and ``"first_order"`` (biased by design) run and are finite. A model without parameters of its
own gets two: a scale on its input and a gain on its output.

Attention (``nn.MultiheadAttention``, the ``nn.Transformer*`` layers, anything on
``F.scaled_dot_product_attention``) runs through the math backend in the steps that need it
(``hypergrad._engine.kernels``); a small transformer matches central finite differences, and
clients (vmap) on it equal a loop. Modules torch has no rule for raise an error naming the
replacement, and the replacement works.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypergrad as hg

DT = torch.float64
K = 2


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT)


@dataclasses.dataclass(frozen=True)
class Case:
    """A module and the inputs of one call: ``module(*inputs(), **kwargs)``."""

    module: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def one(*shape: int) -> Callable[[], tuple[torch.Tensor]]:
    return lambda: (randn(*shape),)


def ids() -> tuple[torch.Tensor]:
    return (torch.tensor([[0, 2, 4], [1, 1, 3]]),)


def qkv() -> tuple[torch.Tensor, ...]:
    x = randn(2, 3, 4)
    return (x, x, x)


def pair() -> tuple[torch.Tensor, ...]:
    x = randn(2, 3, 4)
    return (x, randn(2, 2, 4))


def encoder_layer(**kw: Any) -> nn.Module:
    return nn.TransformerEncoderLayer(4, 2, 8, batch_first=True, **kw)


CAUSAL = {"is_causal": True, "src_mask": nn.Transformer.generate_square_subsequent_mask(3)}

SWEEP: dict[str, Case] = {
    "Linear": Case(lambda: nn.Linear(3, 2), one(4, 3)),
    "Bilinear": Case(lambda: nn.Bilinear(3, 3, 2), lambda: (randn(4, 3), randn(4, 3))),
    "Conv1d": Case(lambda: nn.Conv1d(2, 3, 3), one(2, 2, 6)),
    "Conv2d": Case(lambda: nn.Conv2d(2, 3, 3, padding=1), one(2, 2, 5, 5)),
    "Conv3d": Case(lambda: nn.Conv3d(1, 2, 2), one(1, 1, 3, 3, 3)),
    "ConvTranspose1d": Case(lambda: nn.ConvTranspose1d(2, 2, 3, stride=2), one(2, 2, 4)),
    "ConvTranspose2d": Case(lambda: nn.ConvTranspose2d(2, 2, 3, stride=2), one(1, 2, 3, 3)),
    "BatchNorm2d(eval)": Case(lambda: nn.BatchNorm2d(2).eval(), one(2, 2, 3, 3)),
    "LayerNorm": Case(lambda: nn.LayerNorm(4), one(3, 4)),
    "RMSNorm": Case(lambda: nn.RMSNorm(4), one(3, 4)),
    "GroupNorm": Case(lambda: nn.GroupNorm(2, 4), one(2, 4, 3)),
    "InstanceNorm1d": Case(lambda: nn.InstanceNorm1d(2, affine=True), one(2, 2, 5)),
    "LocalResponseNorm": Case(lambda: nn.LocalResponseNorm(2), one(2, 3, 4)),
    "Embedding": Case(lambda: nn.Embedding(5, 3), ids),
    "RNN": Case(lambda: nn.RNN(3, 4, batch_first=True), one(2, 3, 3)),
    "LSTM": Case(lambda: nn.LSTM(3, 4, batch_first=True), one(2, 3, 3)),
    "GRU": Case(lambda: nn.GRU(3, 4, batch_first=True), one(2, 3, 3)),
    "GRUCell": Case(lambda: nn.GRUCell(3, 4), one(2, 3)),
    "MultiheadAttention": Case(lambda: nn.MultiheadAttention(4, 2, batch_first=True), qkv),
    "MultiheadAttention(need_weights=False)": Case(
        lambda: nn.MultiheadAttention(4, 2, batch_first=True), qkv, {"need_weights": False}
    ),
    "TransformerEncoderLayer": Case(lambda: encoder_layer(dropout=0.0), one(2, 3, 4)),
    "TransformerEncoderLayer(norm_first,gelu)": Case(
        lambda: encoder_layer(dropout=0.0, norm_first=True, activation="gelu"), one(2, 3, 4)
    ),
    "TransformerEncoderLayer(causal)": Case(
        lambda: encoder_layer(dropout=0.0), one(2, 3, 4), CAUSAL
    ),
    "TransformerEncoderLayer(dropout,eval)": Case(lambda: encoder_layer().eval(), one(2, 3, 4)),
    "TransformerEncoderLayer(dropout,seq-first)": Case(
        lambda: nn.TransformerEncoderLayer(4, 2, 8, dropout=0.2), one(3, 2, 4)
    ),
    "TransformerDecoderLayer": Case(
        lambda: nn.TransformerDecoderLayer(4, 2, 8, dropout=0.0, batch_first=True), pair
    ),
    "Transformer": Case(lambda: nn.Transformer(4, 2, 1, 1, 8, dropout=0.0, batch_first=True), pair),
    "TransformerEncoder(padding mask)": Case(
        lambda: nn.TransformerEncoder(encoder_layer(dropout=0.0), 2, enable_nested_tensor=False),
        one(2, 3, 4),
        {"src_key_padding_mask": torch.tensor([[False, False, True], [False, False, False]])},
    ),
    "MaxPool2d": Case(lambda: nn.MaxPool2d(2), one(1, 2, 4, 4)),
    "AvgPool1d": Case(lambda: nn.AvgPool1d(2), one(1, 2, 4)),
    "AdaptiveAvgPool2d": Case(lambda: nn.AdaptiveAvgPool2d(2), one(1, 2, 5, 5)),
    "AdaptiveMaxPool1d": Case(lambda: nn.AdaptiveMaxPool1d(2), one(1, 2, 5)),
    "LPPool1d": Case(lambda: nn.LPPool1d(2, 2), one(1, 2, 4)),
    "FractionalMaxPool2d": Case(lambda: nn.FractionalMaxPool2d(2, output_size=2), one(1, 2, 5, 5)),
    "Upsample(nearest)": Case(lambda: nn.Upsample(scale_factor=2), one(1, 2, 3, 3)),
    "Upsample(bilinear)": Case(
        lambda: nn.Upsample(scale_factor=2, mode="bilinear"), one(1, 2, 3, 3)
    ),
    "Upsample(bicubic)": Case(lambda: nn.Upsample(scale_factor=2, mode="bicubic"), one(1, 2, 3, 3)),
    "PixelShuffle": Case(lambda: nn.PixelShuffle(2), one(1, 4, 2, 2)),
    "Fold": Case(lambda: nn.Fold((3, 3), 2), one(1, 8, 4)),
    "ReflectionPad2d": Case(lambda: nn.ReflectionPad2d(1), one(1, 1, 3, 3)),
    "Dropout": Case(lambda: nn.Dropout(0.3), one(3, 4)),
    "Dropout2d": Case(lambda: nn.Dropout2d(0.3), one(2, 3, 4, 4)),
    "AlphaDropout": Case(lambda: nn.AlphaDropout(0.3), one(3, 4)),
    "PReLU": Case(lambda: nn.PReLU(), one(3, 4)),
    "GELU(tanh)": Case(lambda: nn.GELU("tanh"), one(3, 4)),
    "SiLU": Case(lambda: nn.SiLU(), one(3, 4)),
    "Mish": Case(lambda: nn.Mish(), one(3, 4)),
    "ELU": Case(lambda: nn.ELU(), one(3, 4)),
    "SELU": Case(lambda: nn.SELU(), one(3, 4)),
    "Softplus": Case(lambda: nn.Softplus(), one(3, 4)),
    "Hardswish": Case(lambda: nn.Hardswish(), one(3, 4)),
    "ReLU6": Case(lambda: nn.ReLU6(), one(3, 4)),
    "LogSigmoid": Case(lambda: nn.LogSigmoid(), one(3, 4)),
    "LogSoftmax": Case(lambda: nn.LogSoftmax(-1), one(3, 4)),
    "Softshrink": Case(lambda: nn.Softshrink(), one(3, 4)),
    "GLU": Case(lambda: nn.GLU(), one(3, 4)),
    "CosineSimilarity": Case(lambda: nn.CosineSimilarity(), lambda: (randn(4, 3), randn(4, 3))),
    "AdaptiveLogSoftmaxWithLoss": Case(
        lambda: nn.AdaptiveLogSoftmaxWithLoss(4, 6, [2]),
        lambda: (randn(3, 4), torch.tensor([0, 3, 5])),
    ),
}

# torch has no rule: hypergrad's error names the module and the replacement (see _engine.kernels)
NO_RULE: dict[str, tuple[Case, tuple[str, ...], str]] = {
    "EmbeddingBag": (
        Case(lambda: nn.EmbeddingBag(5, 3), ids),
        ("reverse", "checkpointed", "truncated", "forward"),
        r"nn\.EmbeddingBag .*cannot differentiate it twice.*nn\.Embedding followed by a mean",
    ),
    "Hardsigmoid": (
        Case(lambda: nn.Hardsigmoid(), one(3, 4)),
        ("reverse", "checkpointed", "truncated", "forward"),
        r"nn\.Hardsigmoid .*cannot differentiate it twice.*F\.relu6\(x \+ 3\) / 6",
    ),
    "RReLU": (
        Case(lambda: nn.RReLU(), one(3, 4)),
        ("forward",),
        r"nn\.RReLU .*vmap has no rule for it.*nn\.LeakyReLU\(\(lower \+ upper\) / 2\)",
    ),
}

METHODS: dict[str, Any] = {
    "reverse": "reverse",
    "checkpointed": hg.Checkpointed(1),
    "truncated": hg.Truncated(K),
    "forward": "forward",
}


def problem(case: Case) -> dict[str, Any]:
    """Params, losses, batches and options of a K-step Adam problem around ``case``'s module."""
    torch.manual_seed(0)
    module = case.module().to(DT)
    params, _ = hg.split(module)
    params = {**params, "scale": torch.tensor(1.1, dtype=DT), "gain": torch.tensor(0.9, dtype=DT)}
    batch = case.inputs()

    def model(p: dict[str, torch.Tensor], inputs: tuple[Any, ...]) -> torch.Tensor:
        own = {k: v for k, v in p.items() if k not in ("scale", "gain")}
        first, *rest = inputs
        if first.is_floating_point():
            first = first * p["scale"]
            out = hg.call(module, own, first, *rest, **case.kwargs)
        else:
            out = hg.call(module, own, first, *rest, **case.kwargs) * p["scale"]
        if isinstance(out, tuple):  # (output, state) of RNNs, (output, weights) of attention
            out = out[0]
        return out * p["gain"]

    def inner(p, strength, inputs):
        l2 = sum((v**2).sum() for v in p.values())
        return ((model(p, inputs) - 0.3) ** 2).mean() + strength * l2

    def outer(p, strength, inputs):
        return torch.sin(model(p, inputs)).mean()

    return {
        "args": (outer, inner, params, hg.optim.adam(lr=0.05), [batch] * K, batch),
        "kw": {"aux": torch.tensor(0.01, dtype=DT), "wrt": ("aux", "lr"), "seed": 0},
    }


def flat(g: hg.Hypergradient) -> torch.Tensor:
    return torch.stack([g.aux, g.hyperparams["lr"]])


# functorch's notes about its own fallbacks (nn.Bilinear's _trilinear under forward mode's vmap)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("name", list(SWEEP))
def test_every_method_agrees_on_torch_modules(name):
    prob = problem(SWEEP[name])
    reference = flat(hg.hypergrad(*prob["args"], method="reverse", **prob["kw"]))
    assert reference.abs().max() > 1e-6, "a degenerate case: the hypergradient is zero"
    for method in list(METHODS.values())[1:]:
        g = flat(hg.hypergrad(*prob["args"], method=method, **prob["kw"]))
        torch.testing.assert_close(g, reference, rtol=1e-8, atol=1e-12, msg=f"{name}: {method!r}")
    # biased by design: they run, and finite
    truncated = hg.hypergrad(*prob["args"], method=hg.Truncated(1), **prob["kw"])
    first_order = hg.hypergrad(*prob["args"], method="first_order", **{**prob["kw"], "wrt": "lr"})
    assert torch.isfinite(flat(truncated)).all() and torch.isfinite(first_order.hyperparams["lr"])


@pytest.mark.parametrize("name", list(NO_RULE))
def test_modules_without_a_rule_raise_an_error_that_names_the_fix(name):
    case, methods, message = NO_RULE[name]
    prob = problem(case)
    for method in methods:
        with pytest.raises(NotImplementedError, match=rf"^hg\.hypergrad\(method=.*{message}"):
            hg.hypergrad(*prob["args"], method=METHODS[method], **prob["kw"])
    # what the message offers instead: first order (no double backward needed)
    g = hg.hypergrad(*prob["args"], method="first_order", **{**prob["kw"], "wrt": "lr"})
    assert torch.isfinite(g.hyperparams["lr"])


class Bag(nn.Module):
    """The replacement the EmbeddingBag message names: nn.Embedding and a mean over the bag."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids).mean(dim=1)


class HardSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3) / 6


class RandomLeakyReLU(nn.Module):
    """RReLU in training mode with the slopes drawn by hand, as the RReLU message says."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, x, x * torch.empty_like(x).uniform_(1 / 8, 1 / 3))


@pytest.mark.parametrize(
    ("original", "replacement", "inputs"),
    [
        (lambda: nn.EmbeddingBag(5, 3), Bag, ids),
        (nn.Hardsigmoid, HardSigmoid, one(3, 4)),
        (lambda: nn.RReLU().eval(), lambda: nn.LeakyReLU((1 / 8 + 1 / 3) / 2), one(3, 4)),
    ],
    ids=["EmbeddingBag", "Hardsigmoid", "RReLU(eval)"],
)
def test_the_replacements_the_errors_name_compute_the_same_and_work(original, replacement, inputs):
    torch.manual_seed(0)
    a, b = original().to(DT), replacement().to(DT)
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            pb.copy_(pa)
    x = torch.randint(0, 5, (2, 3)) if inputs is ids else randn(3, 4)
    torch.testing.assert_close(b(x), a(x))
    prob = problem(Case(replacement, inputs))
    reference = flat(hg.hypergrad(*prob["args"], method="reverse", **prob["kw"]))
    forward = flat(hg.hypergrad(*prob["args"], method="forward", **prob["kw"]))
    torch.testing.assert_close(forward, reference, rtol=1e-8, atol=1e-12)


def test_rrelu_in_training_drawn_by_hand_works_in_forward_mode():
    prob = problem(Case(RandomLeakyReLU, one(3, 4)))
    reference = flat(hg.hypergrad(*prob["args"], method="reverse", **prob["kw"]))
    forward = flat(hg.hypergrad(*prob["args"], method="forward", **prob["kw"]))
    torch.testing.assert_close(forward, reference, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- a small transformer


class TinyTransformer(nn.Module):
    """Token embedding, learned positions, one encoder layer, layer norm, tied output weights."""

    def __init__(self, vocab: int = 7, d: int = 8, length: int = 5, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(0.1 * torch.randn(length, d))
        # No biases (as in most recent language models): attention's key bias gets a gradient
        # that is zero in exact arithmetic, which Adam turns into rounding noise
        self.layer = nn.TransformerEncoderLayer(
            d, 2, 16, dropout=dropout, batch_first=True, norm_first=True, bias=False
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.embed(tokens) + self.position[: tokens.shape[1]])
        return F.linear(self.norm(h), self.embed.weight)  # tied: logits over the vocabulary


def lm_problem(
    dropout: float = 0.0, clients: int = 0, dtype: torch.dtype = DT, device: str = "cpu"
) -> dict[str, Any]:
    """Next-token prediction, per-example weights (aux) on the inner loss; outer: clean loss."""
    torch.manual_seed(0)
    model = TinyTransformer(dropout=dropout).to(dtype)
    if clients:
        params, _ = hg.stack([TinyTransformer(dropout=dropout).to(dtype) for _ in range(clients)])
    else:
        params, _ = hg.split(model)
    params = hg.tree.map(lambda x: x.to(device), params)
    tokens = (
        torch.randint(0, 7, (K, clients or 1, 4, 6)) if clients else torch.randint(0, 7, (K, 4, 6))
    ).to(device)
    held_out = torch.randint(0, 7, (4, 6)).to(device)

    def loss(p, x, weights=None):
        logits = hg.call(model, p, x[:, :-1])
        per = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(-1)
        return per.mean() if weights is None else (torch.sigmoid(weights) * per).mean()

    def inner(p, weights, x):
        return loss(p, x, weights)

    def outer(p, weights, x):
        return loss(p, x)

    return {
        "args": (outer, inner, params, hg.optim.adam(lr=0.05), tokens, held_out),
        "kw": {"aux": torch.zeros(4, dtype=dtype, device=device), "wrt": ("aux", "lr"), "seed": 0},
    }


@pytest.mark.parametrize("method", ["reverse", "forward", hg.Checkpointed(1)], ids=repr)
def test_a_small_transformer_matches_finite_differences(method):
    prob = lm_problem()
    hg.testing.check_hypergrad(*prob["args"], method=method, **prob["kw"], rtol=1e-6)


def test_attention_dropout_draws_the_same_masks_in_every_method_and_the_check():
    # dropout inside attention (math backend) and after it: Checkpointed recomputes the steps,
    # and the finite differences of check_hypergrad unroll again; all must see the same masks
    prob = lm_problem(dropout=0.2)
    for method in ("reverse", hg.Checkpointed(1)):
        hg.testing.check_hypergrad(*prob["args"], method=method, **prob["kw"], rtol=1e-6)


def test_clients_on_a_transformer_equal_a_loop_over_clients():
    clients = 3
    prob = lm_problem(clients=clients)
    outer, inner, params, opt, tokens, held_out = prob["args"]
    g = hg.clients.hypergrad(*prob["args"], **prob["kw"], in_dims={"aux": None})

    weights = prob["kw"]["aux"].clone().requires_grad_()
    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    finals = [
        hg.unroll(inner, hg.tree.map(lambda x, c=c: x[c], params), opt, tokens[:, c],
                  aux=weights, hyperparams={"lr": lr}, seed=0).params
        for c in range(clients)
    ]  # fmt: skip
    server = hg.tree.map(lambda *xs: torch.stack(xs).mean(0), *finals)
    value = outer(server, weights, held_out)
    d_weights, d_lr = torch.autograd.grad(value, (weights, lr))
    torch.testing.assert_close(g.value, value.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g.aux, d_weights, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(g.hyperparams["lr"], d_lr, rtol=1e-8, atol=1e-12)


def test_plain_training_and_user_code_keep_the_fused_attention_kernels():
    # The math backend is selected inside the steps that differentiate inner gradients only.
    seen: list[bool] = []
    prob = lm_problem()
    outer, inner, params, opt, tokens, held_out = prob["args"]

    def watched(p, weights, x):
        seen.append(torch.backends.cuda.flash_sdp_enabled())  # the global switch, CPU included
        return inner(p, weights, x)

    args = (outer, watched, params, opt, tokens, held_out)
    assert torch.backends.cuda.flash_sdp_enabled()
    hg.unroll(watched, params, opt, tokens, aux=prob["kw"]["aux"])
    hg.hypergrad(*args, method="first_order", **{**prob["kw"], "wrt": "lr"})
    assert seen == [True] * 2 * K
    seen.clear()
    hg.hypergrad(*args, method=hg.Checkpointed(1), **prob["kw"])
    assert seen == [False] * 2 * K  # the first pass too: the same dropout masks as its recompute
    assert torch.backends.cuda.flash_sdp_enabled()  # restored for the user's own code


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("HYPOTHESIS_PROFILE") != "thorough",
    reason="compiling a transformer takes minutes on a small CPU: this runs in the thorough "
    "profile (make test-thorough)",
)
@pytest.mark.parametrize("method", ["reverse", hg.Checkpointed(1), "first_order"], ids=repr)
def test_a_compiled_transformer_equals_eager(method):
    prob = lm_problem()
    kw = {**prob["kw"], "wrt": "lr"} if method == "first_order" else prob["kw"]
    eager = hg.hypergrad(*prob["args"], method=method, **kw)
    compiled = hg.hypergrad(*prob["args"], method=method, compile="strict", **kw)
    torch.testing.assert_close(compiled.hyperparams, eager.hyperparams, rtol=1e-8, atol=1e-12)


def test_clients_in_forward_mode_through_a_layer_norm_equal_reverse():
    # torch's vmapped second derivative through an affine layer norm is wrong (pinned in
    # tests/test_vmap_norms.py); the clients' step computes it with elementary ops instead.
    prob = lm_problem(clients=2)
    reverse = hg.clients.hypergrad(*prob["args"], **prob["kw"], in_dims={"aux": None})
    forward = hg.clients.hypergrad(
        *prob["args"], **prob["kw"], in_dims={"aux": None}, method="forward"
    )
    torch.testing.assert_close(forward.hyperparams, reverse.hyperparams, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- torch's limits, pinned
# Documented in Sharp bits ("Attention and transformers"); when torch changes, these strict
# xfails start passing and tell us to drop the notes.


@pytest.mark.xfail(strict=True, reason="torch: forward mode draws dropout masks in another order")
def test_torch_forward_mode_dropout_after_a_transposed_attention_output():
    case = Case(lambda: encoder_layer(dropout=0.2), one(2, 3, 4))  # batch_first: transposed
    prob = problem(case)
    reverse = flat(hg.hypergrad(*prob["args"], method="reverse", **prob["kw"]))
    forward = flat(hg.hypergrad(*prob["args"], method="forward", **prob["kw"]))
    torch.testing.assert_close(forward, reverse, rtol=1e-8, atol=1e-12)

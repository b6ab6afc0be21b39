"""Ops that lack a derivative rule a hypergradient needs: routed around, or named in the error.

A hypergradient differentiates the inner gradient once more: reverse mode needs each op's
double backward, forward mode a forward-mode rule for each op and for its backward.

**Attention.** ``F.scaled_dot_product_attention`` (which ``nn.MultiheadAttention`` and the
``nn.Transformer*`` layers call) dispatches to a fused kernel where one applies (flash attention
on CPU; flash, memory-efficient or cuDNN attention on CUDA). None of the fused kernels has a
double backward or a forward-mode rule. Its math backend is written with matmul, softmax and
dropout, which have both, so `math_attention` selects it, through torch's public
``torch.nn.attention.sdpa_kernel``, for the steps whose inner gradient is differentiated (and
for every step and the outer loss of a call that differentiates any, see
``hypergrad._front.Setup.math_attention``). Plain training keeps torch's choice of kernel.

**No rule at all.** ``nn.EmbeddingBag`` and ``nn.Hardsigmoid`` have no double backward, and
their backward no forward-mode rule; ``nn.RReLU`` has no vmap rule (forward mode and clients
vmap the step). `explain_missing_rule` recognises torch's error and names the module and its
replacement (the sweep in ``tests/test_modules.py`` found these three among ``torch.nn``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

from torch.nn.attention import SDPBackend, sdpa_kernel

from hypergrad._boundary import caller

__all__ = ["explain_missing_rule", "math_attention"]


@contextlib.contextmanager
def math_attention(enabled: bool = True) -> Iterator[None]:
    """Within the block (if ``enabled``), scaled-dot-product attention uses its math backend.

    Traceable by ``torch.compile`` (dynamo records the backend switch in the graph).

    Examples:
        >>> import torch.nn.functional as F
        >>> q = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
        >>> def attention_grad(q):
        ...     (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q,
        ...                                create_graph=True)
        ...     return g
        >>> with math_attention():
        ...     hvp = torch.autograd.grad(attention_grad(q).sum(), q)  # a double backward
        >>> hvp[0].shape
        torch.Size([1, 3, 4])
    """
    if not enabled:
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


_TWICE = (
    "torch cannot differentiate it twice (no double backward, and no forward-mode rule for its "
    "backward), and every method but 'first_order' differentiates the inner gradient"
)


class _NoRule(NamedTuple):
    """An op torch has no rule for: how its error names it, the module, why, the fix."""

    needle: str
    module: str
    why: str
    fix: str


_NO_RULE = (
    _NoRule(
        "_embedding_bag",
        "nn.EmbeddingBag (F.embedding_bag)",
        _TWICE,
        "Use nn.Embedding followed by a mean or a sum over each bag, e.g. "
        "embedding(ids).mean(dim=1) for bags of one length (pad shorter bags and average with "
        "a mask); or method='first_order', which drops the second-order terms (biased)",
    ),
    _NoRule(
        "hardsigmoid",
        "nn.Hardsigmoid (F.hardsigmoid; MobileNetV3's squeeze-excitation uses it)",
        _TWICE,
        "Write it as F.relu6(x + 3) / 6, the same function with rules for both; or "
        "method='first_order', which drops the second-order terms (biased)",
    ),
    _NoRule(
        "rrelu_with_noise",
        "nn.RReLU (F.rrelu, in training and in eval mode)",
        "torch.func.vmap has no rule for it, and method='forward' and hg.Clients vmap the step",
        "In eval mode use nn.LeakyReLU((lower + upper) / 2), the same function; in training "
        "draw the slopes yourself, torch.where(x >= 0, x, x * torch.empty_like(x).uniform_("
        "lower, upper)); or a reverse-mode method without clients",
    ),
)


def explain_missing_rule(error: BaseException, method: str) -> BaseException | None:
    """The error to raise instead of torch's, when ``error`` names an op listed here.

    ``None``: the error is about something else (raise it as it is).

    Examples:
        >>> torch_error = NotImplementedError(
        ...     "the derivative for '_embedding_bag_backward' is not implemented.")
        >>> print(explain_missing_rule(torch_error, "'reverse'"))  # doctest: +ELLIPSIS
        hypergrad(method='reverse'): the model uses nn.EmbeddingBag (F.embedding_bag): torch ...
        >>> explain_missing_rule(RuntimeError("something else"), "'reverse'") is None
        True
    """
    text = str(error)
    for rule in _NO_RULE:
        if rule.needle in text:
            return NotImplementedError(
                f"{caller()}(method={method}): the model uses {rule.module}: {rule.why}. "
                f"{rule.fix}. torch said: {text.splitlines()[0]}"
            )
    return None

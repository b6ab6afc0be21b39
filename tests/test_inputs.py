"""Every public function, odd and wrong inputs: one row each, a clear answer and no change to them.

A row is the call (built afresh), and either the refusal it must meet (the exception or warning
type and a regex that names the function, the argument or key path, and the fix) or a check of
the result for an input that is odd but legitimate. Every row also asserts purity: each tensor
reachable from the arguments (dicts, lists, modules with their buffers, optimizers, the closures
of the losses) is bit-identical afterwards, keeps ``requires_grad`` and gets no ``.grad``.

``python tests/test_inputs.py`` prints the rows by outcome: clear (a refusal as expected),
legitimate (an odd input handled right), unclear (an error that misses the point), silent (a
wrong input accepted, or a wrong result), impure (a tensor the caller passed changed). The rows
with a ``doc`` phrase are the refusals listed in docs/sharp-bits.md ("What hypergrad refuses and
why"); a test keeps the two in step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import pathlib
import re
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg

# --------------------------------------------------------------------------- the table's types


class C:
    """A call: ``fn(*args, **kwargs)``; ``changes`` names the one argument it may change."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.fn, self.args, self.kwargs, self.changes = fn, args, kwargs, None

    def changing(self, arg: Any) -> C:
        self.changes = arg
        return self

    def run(self) -> Any:
        return self.fn(*self.args, **self.kwargs)


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    make: Callable[[], C]
    error: type[BaseException] | None = None  # an exception or warning type; None: legitimate
    match: str = ""  # a regex the message must match (re.DOTALL)
    check: Callable[[Any], Any] | None = (
        None  # for a legitimate input: a truthy check of the result
    )
    doc: str = ""  # the refusal's phrase in docs/sharp-bits.md


def bad(id, make, error, match, doc=""):
    return Row(id, make, error, match, doc=doc)


def ok(id, make, check=None):
    return Row(id, make, check=check)


# --------------------------------------------------------------------------- purity


def _reachable(obj: Any, out: dict[int, torch.Tensor], seen: set[int], depth: int = 0) -> None:
    """Every tensor reachable from ``obj`` (containers, modules, optimizers, closures)."""
    if depth > 8 or id(obj) in seen:
        return
    seen.add(id(obj))
    walk = lambda x: _reachable(x, out, seen, depth + 1)  # noqa: E731
    if isinstance(obj, torch.Tensor):
        out[id(obj)] = obj
    elif isinstance(obj, nn.Module):
        for t in itertools.chain(obj.parameters(), obj.buffers()):
            walk(t)
    elif isinstance(obj, dict):
        for v in obj.values():
            walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            walk(v)
    elif isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            with contextlib.suppress(ValueError):  # an empty cell
                walk(cell.cell_contents)
        walk(obj.__defaults__)
    elif isinstance(obj, hg.optim.Optimizer):
        walk(dict(obj.hyperparams))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            walk(getattr(obj, f.name))
    elif isinstance(obj, torch.optim.Optimizer):
        for group in obj.param_groups:
            walk(group["params"])


def snapshot(call: C) -> list[tuple[torch.Tensor, torch.Tensor | None, bool, bool]]:
    out: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    if call.changes is not None:
        _reachable(call.changes, {}, seen)  # skip what the call is meant to change
    _reachable((call.args, call.kwargs), out, seen)
    return [
        (t, None if t.is_meta else t.detach().clone(), t.requires_grad, t.grad is None)
        for t in out.values()
    ]


def impurities(before: list) -> list[str]:
    problems = []
    for t, value, requires_grad, no_grad in before:
        where = f"a tensor of shape {tuple(t.shape)}"
        if value is not None and not (
            value.shape == t.shape
            and value.dtype == t.dtype
            and torch.equal(
                torch.nan_to_num(value.detach(), 7.0), torch.nan_to_num(t.detach(), 7.0)
            )
        ):
            problems.append(f"{where} changed value")
        if t.requires_grad != requires_grad:
            problems.append(f"{where} changed requires_grad")
        if no_grad and t.grad is not None:
            problems.append(f"{where} got a .grad")
    return problems


def outcome(row: Row) -> tuple[str, str]:
    """``(outcome, detail)`` of one row: clear, legitimate, unclear, silent or impure."""
    call = row.make()
    before = snapshot(call)
    error: BaseException | None = None
    result = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning is an answer too
        try:
            result = call.run()
        except (Exception, Warning) as exc:  # classifying any answer
            error = exc
    changed = impurities(before)
    if changed:
        return "impure", "; ".join(changed)
    message = "" if error is None else f"{type(error).__name__}: {error}"
    if row.error is not None:
        if error is None:
            return "silent", f"returned {result!r:.200}"
        if isinstance(error, row.error) and re.search(row.match, str(error), re.DOTALL):
            return "clear", message
        return "unclear", message
    if error is not None:
        return "unclear", message
    if row.check is not None and not row.check(result):
        return "silent", f"wrong result {result!r:.300}"
    return "legitimate", ""


# --------------------------------------------------------------------------- building blocks


def lin() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(2, 1)


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))


def P(*shape: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {"w": torch.ones(*(shape or (2,)), dtype=dtype)}


def X() -> torch.Tensor:
    return torch.tensor([[1.0, 2.0], [3.0, -1.0]])


def B(steps: int = 3) -> torch.Tensor:
    return torch.linspace(-1, 1, steps * 2).reshape(steps, 2)


def inner(p, aux, x):
    return ((p["w"] - x) ** 2).sum()


def inner_aux(p, aux, x):
    return ((p["w"] - x) ** 2).sum() + (aux * p["w"] ** 2).sum()


def outer(p, aux, x):
    return (p["w"] ** 2).sum()


def sgd(**kw) -> hg.optim.Optimizer:
    return hg.optim.sgd(**{"lr": 0.1, **kw})


def close(a, b) -> bool:
    return torch.allclose(a, b, atol=1e-6)


def unroll(**kw) -> C:
    args = {"params": P(), "opt": sgd(), "batches": B(), **kw}
    loss = args.pop("inner_loss", inner)
    return C(hg.unroll, loss, args.pop("params"), args.pop("opt"), args.pop("batches"), **args)


def hyper(**kw) -> C:
    args = {"params": P(), "opt": sgd(), "batches": B(), "outer_batch": None, "aux": torch.ones(2)}
    args.update(kw)
    o, i = args.pop("outer_loss", outer), args.pop("inner_loss", inner_aux)
    p, opt, b, ob = (args.pop(k) for k in ("params", "opt", "batches", "outer_batch"))
    return C(hg.hypergrad, o, i, p, opt, b, ob, **args)


def clients(fn=hg.clients.unroll, **kw) -> C:
    args = {"params": {"w": torch.ones(3, 2)}, "batches": torch.ones(2, 3, 2), **kw}
    p, b = args.pop("params"), args.pop("batches")
    if fn is hg.clients.hypergrad:
        return C(fn, outer, inner_aux, p, sgd(), b, None, aux=torch.ones(2), **args)
    return C(fn, inner, p, sgd(), b, **args)


def step(opt=None, params=None, grads=None, state=None, **kw) -> C:
    opt = opt or sgd(momentum=0.9)
    params = P() if params is None else params
    grads = P() if grads is None else grads
    state = opt.init(params) if state is None else state
    return C(opt.step, params, grads, state, **kw)


def in_place_loss(p, aux, x):
    w = p["w"]
    w.mul_(2)
    return ((w - x) ** 2).sum()


def data_loss(p, aux, x):
    p["w"].data.add_(1.0)
    return ((p["w"] - x) ** 2).sum()


def aux_mul_loss(p, aux, x):
    aux.mul_(2)
    return ((p["w"] - x * aux) ** 2).sum()


def batch_mul_loss(p, aux, x):
    x.mul_(2)
    return ((p["w"] - x) ** 2).sum()


def direct_loss_of(model):
    def loss(p, aux, x):  # calls the module itself: its own tensors, not the params
        return ((model(x) - 1) ** 2).mean() * aux

    return loss


def bn_loss_of(model):
    def loss(p, aux, x, buffers):
        out, new = hg.call(model, p, x, buffers=buffers, return_buffers=True)
        return (out**2).mean() + aux * 0, new

    return loss


def torch_opt() -> torch.optim.Optimizer:
    return torch.optim.SGD(lin().parameters(), lr=0.1)


def gen(n: int):
    return (torch.ones(2) for _ in range(n))


def meta_params() -> dict[str, torch.Tensor]:
    return {"w": torch.ones(2, device="meta")}


def stacked_mean(tree) -> bool:
    return close(tree["w"], torch.ones(3))


# --------------------------------------------------------------------------- the table

# One row, one call: laid out by hand, a row to a line or three.
# fmt: off
ROWS: list[Row] = [
    # ---- hg.split
    ok("split/linear", lambda: C(hg.split, lin()), lambda r: list(r[0]) == ["weight", "bias"]),
    ok("split/no-params", lambda: C(hg.split, nn.ReLU()), lambda r: r == ({}, {})),
    ok("split/batchnorm", lambda: C(hg.split, bn_net()), lambda r: len(r[1]) == 3),
    bad("split/dict", lambda: C(hg.split, P()), TypeError,
        r"^hg\.split: module must be a torch\.nn\.Module, got a dict.*hg\.split\(model\)",
        doc="a module argument that is not a module"),
    bad("split/list", lambda: C(hg.split, [lin()]), TypeError,
        r"^hg\.split: module must be .*got a list.*hg\.stack"),
    bad("split/none", lambda: C(hg.split, None), TypeError, r"^hg\.split: module .*NoneType"),
    # ---- hg.call
    ok("call/plain", lambda: C(hg.call, lin(), hg.split(lin())[0], X()),
       lambda r: r.shape == (2, 1)),
    ok("call/some-keys", lambda: C(hg.call, lin(), {"bias": torch.zeros(1)}, X()),
       lambda r: r.shape == (2, 1)),
    ok("call/view", lambda: C(hg.call, lin(), {"weight": torch.ones(3, 2)[:1], "bias":
                                               torch.zeros(1)}, X()),
       lambda r: close(r[:, 0], torch.tensor([3.0, 2.0]))),
    ok("call/float64", lambda: C(hg.call, lin(), hg.tree.map(torch.Tensor.double,
                                                              hg.split(lin())[0]), X().double()),
       lambda r: r.dtype == torch.float64),
    ok("call/requires-grad", lambda: C(hg.call, lin(), {"weight": torch.ones(1, 2,
                                                         requires_grad=True)}, X()),
       lambda r: r.requires_grad),
    ok("call/bn-train", lambda: C(hg.call, bn_net(), hg.split(bn_net())[0], X(),
                                  buffers=hg.split(bn_net())[1], return_buffers=True),
       lambda r: r[1]["1.num_batches_tracked"] == 1),
    ok("call/bn-own-buffers", lambda: C(hg.call, bn_net(), hg.split(bn_net())[0], X()),
       lambda r: r.shape == (2, 1)),
    bad("call/misshaped", lambda: C(hg.call, lin(), {"weight": torch.ones(3, 3)}, X()),
        ValueError, r"^hg\.call: params\['weight'\] has shape \(3, 3\) but Linear's weight has "
        r"shape \(1, 2\).*hg\.split", doc="a key with the wrong shape"),
    bad("call/int", lambda: C(hg.call, lin(), {"weight": torch.ones(1, 2, dtype=torch.long)}, X()),
        TypeError, r"^hg\.call: params\['weight'\] is torch\.int64.*floating-point"),
    bad("call/list-value", lambda: C(hg.call, lin(), {"weight": [[1.0, 2.0]]}, X()), TypeError,
        r"^hg\.call: params\['weight'\] is a list, not a tensor.*hg\.split"),
    bad("call/unknown-key", lambda: C(hg.call, lin(), {"w": torch.ones(1, 2)}, X()), ValueError,
        r"^hg\.call: params has key\(s\) 'w'.*hg\.split\(module\)"),
    bad("call/buffers-unknown", lambda: C(hg.call, bn_net(), {}, X(), buffers={"x": torch.ones(1)}),
        ValueError, r"^hg\.call: buffers has key\(s\) 'x'"),
    bad("call/buffers-misshaped", lambda: C(hg.call, bn_net(), {}, X(),
                                            buffers={"1.running_mean": torch.ones(5)}),
        ValueError, r"^hg\.call: buffers\['1\.running_mean'\] has shape \(5,\) but"),
    bad("call/params-list", lambda: C(hg.call, lin(), [torch.ones(1, 2)], X()), TypeError,
        r"^hg\.call: params must be a dict .*got a list.*hg\.split"),
    bad("call/swapped", lambda: C(hg.call, hg.split(lin())[0], lin(), X()), TypeError,
        r"^hg\.call: module must be a torch\.nn\.Module, got a dict.*hg\.call\(model, params"),
    # ---- hg.load
    ok("load/plain", lambda: (lambda m: C(hg.load, m, hg.tree.zeros_like(hg.split(m)[0]))
                              .changing(m))(lin()),
       lambda m: float(m.weight.detach().abs().sum()) == 0),
    ok("load/buffers", lambda: (lambda m: C(hg.load, m, *hg.split(m)).changing(m))(bn_net())),
    ok("load/requires-grad", lambda: (lambda m: C(hg.load, m, hg.tree.map(
        lambda t: t.clone().requires_grad_(), hg.split(m)[0])).changing(m))(lin()),
       lambda m: m.weight.grad is None),
    bad("load/missing", lambda: (lambda m: C(hg.load, m, {"weight": torch.ones(1, 2)})
                                 .changing(m))(lin()),
        ValueError, r"^hg\.load: .*missing params key 'bias'.*hg\.split"),
    bad("load/misshaped", lambda: (lambda m: C(hg.load, m, {"weight": torch.ones(2, 2),
                                                           "bias": torch.ones(1)}).changing(m))(lin()),
        ValueError, r"^hg\.load: .*'weight': expected shape \(1, 2\).*got shape \(2, 2\)"),
    bad("load/list", lambda: (lambda m: C(hg.load, m, [torch.ones(1, 2)]).changing(m))(lin()),
        TypeError, r"^hg\.load: params must be a dict .*got a list.*hg\.split"),
    bad("load/not-module", lambda: C(hg.load, P(), P()), TypeError,
        r"^hg\.load: module must be a torch\.nn\.Module, got a dict"),
    # ---- hg.stack / hg.unstack
    ok("stack/two", lambda: C(hg.stack, [lin(), lin()]), lambda r: r[0]["weight"].shape == (2, 1, 2)),
    ok("stack/tuple", lambda: C(hg.stack, (bn_net(), bn_net())),
       lambda r: r[1]["1.running_var"].shape == (2, 3)),
    bad("stack/empty", lambda: C(hg.stack, []), ValueError, r"^hg\.stack: got no modules"),
    bad("stack/different", lambda: C(hg.stack, [lin(), nn.Linear(3, 1)]), ValueError,
        r"^hg\.stack: module 1 .*'weight'.*copy\.deepcopy"),
    bad("stack/one-module", lambda: C(hg.stack, lin()), TypeError,
        r"^hg\.stack: modules must be a list of modules, got a Linear.*hg\.stack\(\[model"),
    bad("stack/not-module", lambda: C(hg.stack, [lin(), P()]), TypeError,
        r"^hg\.stack: modules\[1\] is a dict, not a torch\.nn\.Module"),
    ok("unstack/plain", lambda: C(hg.unstack, {"w": torch.ones(3, 2)}), lambda r: len(r) == 3),
    ok("unstack/pair", lambda: C(hg.unstack, hg.stack([lin(), lin()])), lambda r: len(r) == 2),
    bad("unstack/empty", lambda: C(hg.unstack, {}), ValueError, r"^hg\.unstack: .*no leaves.*hg\.stack"),
    bad("unstack/0d", lambda: C(hg.unstack, {"w": torch.tensor(1.0)}), ValueError,
        r"^hg\.unstack: every leaf needs the same leading .*\['w'\]: \(\)"),
    bad("unstack/sizes", lambda: C(hg.unstack, {"a": torch.ones(2), "b": torch.ones(3)}),
        ValueError, r"^hg\.unstack: .*\['a'\]: \(2,\), \['b'\]: \(3,\)"),
    # ---- hg.tree: leaf-wise maths
    ok("tree.add/plain", lambda: C(hg.tree.add, P(), P()), lambda r: close(r["w"], 2 * torch.ones(2))),
    ok("tree.add/0d", lambda: C(hg.tree.add, {"w": torch.tensor(1.0)}, {"w": torch.tensor(2.0)}),
       lambda r: float(r["w"]) == 3.0),
    ok("tree.add/empty", lambda: C(hg.tree.add, {}, {}), lambda r: r == {}),
    ok("tree.add/mixed-leaves", lambda: C(hg.tree.add, {"a": torch.ones(1), "b": torch.ones(1,
                                                      dtype=torch.float64)},
                                          {"a": torch.ones(1), "b": torch.ones(1, dtype=torch.float64)}),
       lambda r: r["b"].dtype == torch.float64 and r["a"].dtype == torch.float32),
    ok("tree.add/view", lambda: C(hg.tree.add, {"w": torch.ones(4)[::2]}, P()),
       lambda r: close(r["w"], 2 * torch.ones(2))),
    bad("tree.add/keys", lambda: C(hg.tree.add, P(), {"v": torch.ones(2)}), ValueError,
        r"^hg\.tree\.add: the trees have different structure: key \['w'\]"),
    bad("tree.add/shapes", lambda: C(hg.tree.add, P(3), P(1)), ValueError,
        r"^hg\.tree\.add: leaf \['w'\] has shape \(3,\) in the first tree but \(1,\) in the "
        r"second.*same shapes", doc="leaves of different shapes (no broadcasting)"),
    bad("tree.add/scalar-vs-vector", lambda: C(hg.tree.add, {"w": torch.tensor(1.0)}, P()),
        ValueError, r"^hg\.tree\.add: leaf \['w'\] has shape \(\) in the first tree"),
    bad("tree.sub/shapes", lambda: C(hg.tree.sub, P(2, 1), P(1, 2)), ValueError,
        r"^hg\.tree\.sub: leaf \['w'\] has shape \(2, 1\)"),
    bad("tree.map/keys", lambda: C(hg.tree.map, torch.add, P(), {"v": torch.ones(2)}), ValueError,
        r"^hg\.tree\.map: the trees have different structure"),
    ok("tree.map/broadcast-is-fn", lambda: C(hg.tree.map, torch.add, P(3), P(1)),
       lambda r: r["w"].shape == (3,)),
    ok("tree.scale/number", lambda: C(hg.tree.scale, P(), 0.5), lambda r: close(r["w"], torch.full((2,), 0.5))),
    ok("tree.scale/0d", lambda: C(hg.tree.scale, P(), torch.tensor(2.0, requires_grad=True)),
       lambda r: r["w"].requires_grad),
    bad("tree.scale/vector", lambda: C(hg.tree.scale, P(), torch.ones(3)), ValueError,
        r"^hg\.tree\.scale: factor must be a number or a 0-d tensor, got shape \(3,\).*hg\.tree\.map"),
    bad("tree.scale/str", lambda: C(hg.tree.scale, P(), "2"), TypeError,
        r"^hg\.tree\.scale: factor must be a number or a 0-d tensor, got a str"),
    ok("tree.lerp/plain", lambda: C(hg.tree.lerp, P(), hg.tree.zeros_like(P()), 0.5),
       lambda r: close(r["w"], torch.full((2,), 0.5))),
    ok("tree.lerp/float64-weight", lambda: C(hg.tree.lerp, P(), P(), torch.tensor(0.5, dtype=torch.float64)),
       lambda r: r["w"].dtype == torch.float32),
    bad("tree.lerp/shapes", lambda: C(hg.tree.lerp, P(2), P(1), 0.5), ValueError,
        r"^hg\.tree\.lerp: leaf \['w'\] has shape \(2,\)"),
    bad("tree.lerp/weight-vector", lambda: C(hg.tree.lerp, P(), P(), torch.ones(2)), ValueError,
        r"^hg\.tree\.lerp: weight must be a number or a 0-d tensor, got shape \(2,\)"),
    ok("tree.vdot/plain", lambda: C(hg.tree.vdot, P(), P()), lambda r: float(r) == 2.0),
    ok("tree.vdot/empty", lambda: C(hg.tree.vdot, {}, {}), lambda r: float(r) == 0.0),
    ok("tree.vdot/mixed", lambda: C(hg.tree.vdot, P(dtype=torch.float64), P()),
       lambda r: r.dtype == torch.float64),
    bad("tree.vdot/shapes", lambda: C(hg.tree.vdot, P(3), P(1)), ValueError,
        r"^hg\.tree\.vdot: leaf \['w'\] has shape \(3,\) in the first tree but \(1,\)",
        doc="leaves of different shapes (no broadcasting)"),
    bad("tree.vdot/keys", lambda: C(hg.tree.vdot, P(), {"v": torch.ones(2)}), ValueError,
        r"^hg\.tree\.vdot: the trees have different structure"),
    bad("tree.cosine/shapes", lambda: C(hg.tree.cosine, P(3), P(1)), ValueError,
        r"^hg\.tree\.cosine: leaf \['w'\] has shape"),
    bad("tree.distance/shapes", lambda: C(hg.tree.distance, P(3), P(1)), ValueError,
        r"^hg\.tree\.distance: leaf \['w'\] has shape"),
    ok("tree.distance/plain", lambda: C(hg.tree.distance, P(), hg.tree.zeros_like(P())),
       lambda r: close(r, torch.tensor(2.0).sqrt())),
    bad("tree.distance/ord", lambda: C(hg.tree.distance, P(), P(), 3), ValueError,
        r"^hg\.tree\.distance: ord must be 1, 2 or math\.inf"),
    ok("tree.cosine/zero", lambda: C(hg.tree.cosine, hg.tree.zeros_like(P()), P()),
       lambda r: float(r) == 0.0),
    # ---- hg.tree: reductions, ravel, mean
    ok("tree.norm/0d", lambda: C(hg.tree.norm, {"w": torch.tensor(-3.0)}), lambda r: float(r) == 3.0),
    ok("tree.norm/empty", lambda: C(hg.tree.norm, {}), lambda r: float(r) == 0.0),
    ok("tree.norm/empty-leaf", lambda: C(hg.tree.norm, {"w": torch.ones(0)}), lambda r: float(r) == 0.0),
    ok("tree.norm/mixed", lambda: C(hg.tree.norm, {"a": torch.ones(1), "b": torch.ones(1, dtype=torch.float64)}),
       lambda r: r.dtype == torch.float64),
    bad("tree.norm/ord", lambda: C(hg.tree.norm, P(), 3), ValueError,
        r"^hg\.tree\.norm: ord must be 1, 2 or math\.inf"),
    bad("tree.norm/int", lambda: C(hg.tree.norm, {"n": torch.ones(2, dtype=torch.long)}), ValueError,
        r"^hg\.tree\.norm: leaf \['n'\] has dtype torch\.int64.*hg\.tree\.select"),
    ok("tree.ravel/empty", lambda: C(hg.tree.ravel, {}), lambda r: r[0].numel() == 0),
    ok("tree.ravel/0d", lambda: C(hg.tree.ravel, {"a": torch.tensor(1.0), "b": torch.ones(2)}),
       lambda r: r[0].shape == (3,)),
    bad("tree.ravel/mixed", lambda: C(hg.tree.ravel, {"a": torch.ones(1), "b": torch.ones(1, dtype=torch.float64)}),
        ValueError, r"^hg\.tree\.ravel: leaf \['b'\] is torch\.float64.*Cast the tree"),
    bad("tree.ravel/non-tensor", lambda: C(hg.tree.ravel, {"a": 1.0}), ValueError,
        r"^hg\.tree\.ravel: leaf \['a'\] is a float"),
    bad("tree.unravel/length", lambda: C(hg.tree.ravel(P())[1], torch.ones(3)), ValueError,
        r"^hg\.tree\.unravel: expected a vector of length 2"),
    ok("tree.mean/plain", lambda: C(hg.tree.mean, [P(), hg.tree.zeros_like(P())]),
       lambda r: close(r["w"], torch.full((2,), 0.5))),
    ok("tree.mean/weights-tensor", lambda: C(hg.tree.mean, [P(), P()], torch.tensor([1.0, 3.0])),
       lambda r: close(r["w"], torch.ones(2))),
    ok("tree.mean/stacked", lambda: C(hg.tree.mean, {"w": torch.ones(2, 3)}, stacked=True), stacked_mean),
    ok("tree.mean/stacked-empty", lambda: C(hg.tree.mean, {}, stacked=True), lambda r: r == {}),
    bad("tree.mean/empty", lambda: C(hg.tree.mean, []), ValueError, r"^hg\.tree\.mean: got an empty list"),
    bad("tree.mean/dict", lambda: C(hg.tree.mean, P()), ValueError,
        r"^hg\.tree\.mean: expected a list of trees, got a dict.*stacked=True"),
    bad("tree.mean/count", lambda: C(hg.tree.mean, [P(), P()], [1.0]), ValueError,
        r"^hg\.tree\.mean: expected 2 weights"),
    bad("tree.mean/zero-sum", lambda: C(hg.tree.mean, [P(), P()], [0.0, 0.0]), ValueError,
        r"^hg\.tree\.mean: the weights sum to zero"),
    bad("tree.mean/negative", lambda: C(hg.tree.mean, [P(), P()], [1.0, -2.0]), ValueError,
        r"^hg\.tree\.mean: weight 1 is -2\.0; weights must be non-negative",
        doc="negative averaging weights"),
    bad("tree.mean/negative-tensor", lambda: C(hg.tree.mean, [P(), P()], torch.tensor([1.0, -2.0])),
        ValueError, r"^hg\.tree\.mean: weight 1 is -2\.0"),
    bad("tree.mean/shapes", lambda: C(hg.tree.mean, [P(3), P(1)]), ValueError,
        r"^hg\.tree\.mean: leaf \['w'\] has shape \(3,\) in the first tree but \(1,\) in the second"),
    bad("tree.mean/stacked-0d", lambda: C(hg.tree.mean, {"w": torch.tensor(1.0)}, stacked=True),
        ValueError, r"^hg\.tree\.mean: with stacked=True every leaf needs the same leading"),
    # ---- hg.tree: names
    ok("tree.select/glob", lambda: C(hg.tree.select, hg.split(lin())[0], "*.weight|weight"),
       lambda r: isinstance(r, dict)),
    ok("tree.partition/empty-part", lambda: C(hg.tree.partition, P(), "nothing"),
       lambda r: r[0] == {} and "w" in r[1]),
    ok("tree.combine/parts", lambda: C(hg.tree.combine, *hg.tree.partition({"a": torch.ones(1),
                                                                             "b": torch.ones(1)}, "a")),
       lambda r: sorted(r) == ["a", "b"]),
    bad("tree.select/int", lambda: C(hg.tree.select, P(), 3), TypeError,
        r"^hg\.tree\.(select|partition): pattern must be .*got a int"),
    bad("tree.combine/overlap", lambda: C(hg.tree.combine, P(), P()), ValueError,
        r"^hg\.tree\.combine: 2 trees hold a value at \['w'\]"),
    ok("tree.layer_names/plain", lambda: C(hg.tree.layer_names, hg.split(bn_net())[0]),
       lambda r: r == ["0", "1", "2"]),
    ok("tree.zeros_like/0d", lambda: C(hg.tree.zeros_like, {"w": torch.tensor(3.0)}),
       lambda r: float(r["w"]) == 0.0),
    ok("tree.detach/requires-grad", lambda: C(hg.tree.detach, {"w": torch.ones(1, requires_grad=True)}),
       lambda r: not r["w"].requires_grad),
    ok("tree.key_paths/nested", lambda: C(hg.tree.key_paths, {"a": (torch.ones(1), torch.ones(1))}),
       lambda r: r == ["['a'][0]", "['a'][1]"]),
    ok("tree.dotted_paths/nested", lambda: C(hg.tree.dotted_paths, {"fc": {"weight": torch.ones(1)}}),
       lambda r: r == ["fc.weight"]),
    # ---- hg.optim: constructors and replace
    bad("optim.sgd/negative-lr", lambda: C(hg.optim.sgd, lr=-0.1), ValueError,
        r"^hg\.optim\.sgd: invalid lr: -0\.1; it must be >= 0"),
    bad("optim.sgd/str-lr", lambda: C(hg.optim.sgd, lr="0.1"), ValueError,
        r"^hg\.optim\.sgd: lr is a str; expected a float"),
    bad("optim.sgd/negative-tensor-lr", lambda: C(hg.optim.sgd, lr=torch.tensor(-0.1)), ValueError,
        r"^hg\.optim\.sgd: invalid lr: -0\.1"),
    bad("optim.sgd/nesterov", lambda: C(hg.optim.sgd, lr=0.1, nesterov=True), ValueError,
        r"^hg\.optim\.sgd: nesterov=True requires a momentum > 0"),
    bad("optim.adam/beta", lambda: C(hg.optim.adam, betas=(1.0, 0.9)), ValueError,
        r"^hg\.optim\.adam: invalid betas\[0\]: 1\.0; it must be \[0\.0, 1\.0\)"),
    bad("optim.adam/betas-length", lambda: C(hg.optim.adam, betas=(0.9,)), ValueError,
        r"^hg\.optim\.adam: betas must be a tuple of two values"),
    bad("optim.adam/negative-eps", lambda: C(hg.optim.adam, eps=-1e-8), ValueError,
        r"^hg\.optim\.adam: invalid eps"),
    bad("optim.rmsprop/alpha", lambda: C(hg.optim.rmsprop, alpha=-0.5), ValueError,
        r"^hg\.optim\.rmsprop: invalid alpha"),
    bad("optim.adagrad/lr_decay", lambda: C(hg.optim.adagrad, lr_decay=-1.0), ValueError,
        r"^hg\.optim\.adagrad: invalid lr_decay"),
    bad("optim.adamw/dict-entry", lambda: C(hg.optim.adamw, lr={"w": "x"}), ValueError,
        r"^hg\.optim\.adamw: lr\['w'\] is a str"),
    ok("optim.sgd/tensor-lr", lambda: C(hg.optim.sgd, lr=torch.tensor(0.1, requires_grad=True)),
       lambda r: r.hyperparams["lr"].requires_grad),
    bad("optim.replace/unknown", lambda: C(sgd().replace, bogus=1), ValueError,
        r"^hg\.optim\.sgd\.replace: unknown name 'bogus'; this optimizer has: .*lr"),
    bad("optim.replace/negative", lambda: C(sgd().replace, lr=-1.0), ValueError,
        r"^hg\.optim\.sgd(\.replace)?: invalid lr: -1\.0"),
    bad("optim.replace/nesterov", lambda: C(sgd().replace, nesterov=True), ValueError,
        r"^hg\.optim\.sgd(\.replace)?: nesterov=True requires"),
    ok("optim.replace/tensor", lambda: C(sgd().replace, lr=torch.tensor(0.2)),
       lambda r: close(r.hyperparams["lr"], torch.tensor(0.2))),
    ok("optim.tensor_hyperparams/f64", lambda: C(sgd().tensor_hyperparams, dtype=torch.float64),
       lambda r: r["lr"].dtype == torch.float64),
    # ---- hg.optim: init and step
    ok("optim.init/empty", lambda: C(hg.optim.adam().init, {}), lambda r: r.exp_avg == {}),
    ok("optim.init/0d", lambda: C(sgd(momentum=0.9).init, {"w": torch.tensor(1.0)}),
       lambda r: r.momentum_buffer["w"].shape == ()),
    bad("optim.init/non-tensor", lambda: C(sgd().init, {"w": 1.0}), ValueError,
        r"^hg\.optim\.sgd\.init: parameter \['w'\] is a float, not a tensor"),
    bad("optim.init/int", lambda: C(sgd().init, {"w": torch.ones(2, dtype=torch.long)}), TypeError,
        r"^hg\.optim\.sgd\.init: params leaf \['w'\] is torch\.int64; only floating-point"),
    ok("optim.step/plain", lambda: step(), lambda r: close(r[0]["w"], torch.full((2,), 0.9))),
    ok("optim.step/0d", lambda: step(params={"w": torch.tensor(1.0)}, grads={"w": torch.tensor(1.0)}),
       lambda r: close(r[0]["w"], torch.tensor(0.9))),
    ok("optim.step/empty", lambda: step(opt=hg.optim.adam(), params={}, grads={}),
       lambda r: r[0] == {}),
    ok("optim.step/mixed-dtypes", lambda: step(params={"a": torch.ones(1), "b": torch.ones(1, dtype=torch.float64)},
                                               grads={"a": torch.ones(1), "b": torch.ones(1, dtype=torch.float64)}),
       lambda r: r[0]["b"].dtype == torch.float64 and r[0]["a"].dtype == torch.float32),
    ok("optim.step/view-params", lambda: step(params={"w": torch.ones(4)[::2]}),
       lambda r: close(r[0]["w"], torch.full((2,), 0.9))),
    ok("optim.step/requires-grad", lambda: step(params={"w": torch.ones(2, requires_grad=True)}),
       lambda r: r[0]["w"].requires_grad),
    ok("optim.step/hp-tensor", lambda: step(hyperparams={"lr": torch.tensor(0.5, requires_grad=True)}),
       lambda r: r[0]["w"].requires_grad),
    ok("optim.step/adam-state", lambda: step(opt=hg.optim.adam(lr=0.1)),
       lambda r: float(r[1].step) == 1),
    bad("optim.step/negative-lr", lambda: step(hyperparams={"lr": -0.1}), ValueError,
        r"^hg\.optim\.sgd\.step: invalid lr: -0\.1; it must be >= 0",
        doc="a hyperparameter out of range"),
    ok("optim.step/perturbed-tensor-lr",  # a differentiable input: finite differences step past 0
       lambda: step(hyperparams={"lr": torch.tensor(-1e-6)}), lambda r: r[0]["w"].shape == (2,)),
    bad("optim.step/beta-one", lambda: step(opt=hg.optim.adam(), hyperparams={"betas": (0.9, 1.0)}),
        ValueError, r"^hg\.optim\.adam\.step: invalid betas\[1\]: 1\.0"),
    bad("optim.step/str-lr", lambda: step(hyperparams={"lr": "x"}), ValueError,
        r"^hg\.optim\.sgd\.step: lr is a str"),
    bad("optim.step/unknown-hp", lambda: step(hyperparams={"bogus": 1}), ValueError,
        r"^hg\.optim\.sgd\.step: unknown hyperparameter 'bogus'.*opt\.replace"),
    bad("optim.step/hp-list", lambda: step(hyperparams=[0.1]), ValueError,
        r"^hg\.optim\.sgd\.step: hyperparams must be a dict"),
    bad("optim.step/grads-keys", lambda: step(grads={"v": torch.ones(2)}), ValueError,
        r"^hg\.optim\.sgd\.step: grads does not have the structure of params: key \['w'\]"),
    bad("optim.step/grads-shape", lambda: step(grads=P(3)), ValueError,
        r"^hg\.optim\.sgd\.step: grads\['w'\] has shape \(3,\) but params\['w'\] has shape \(2,\)",
        doc="gradients or optimizer state of other shapes"),
    bad("optim.step/grads-broadcast", lambda: step(grads=P(1)), ValueError,
        r"^hg\.optim\.sgd\.step: grads\['w'\] has shape \(1,\) but params\['w'\] has shape \(2,\)"),
    bad("optim.step/state-shapes", lambda: step(params=P(3), grads=P(3), state=sgd(momentum=0.9).init(P(1))),
        ValueError, r"^hg\.optim\.sgd\.step: state\.momentum_buffer\['w'\] has shape \(1,\) but "
        r"params\['w'\] has shape \(3,\).*opt\.init\(params\)",
        doc="gradients or optimizer state of other shapes"),
    bad("optim.step/adam-state-shapes", lambda: step(opt=hg.optim.adam(), params=P(3), grads=P(3),
                                                     state=hg.optim.adam().init(P(2))),
        ValueError, r"^hg\.optim\.adam\.step: state\.exp_avg\['w'\] has shape \(2,\)"),
    bad("optim.step/state-type", lambda: step(state=hg.optim.adam().init(P())), ValueError,
        r"^hg\.optim\.sgd\.step: state is a AdamState; expected the SGDState"),
    bad("optim.step/int-params", lambda: step(params=P(dtype=torch.long), grads=P(dtype=torch.long),
                                              state=sgd(momentum=0.9).init(P())),
        TypeError, r"^hg\.optim\.sgd\.step: params leaf \['w'\] is torch\.int64; only floating-point",
        doc="integer params"),
    bad("optim.step/int-grads", lambda: step(grads=P(dtype=torch.long)), TypeError,
        r"^hg\.optim\.sgd\.step: grads leaf \['w'\] is torch\.int64"),
    bad("optim.step/hp-shape", lambda: step(hyperparams={"lr": torch.ones(3)}), ValueError,
        r"^hg\.optim\.sgd\.step: lr has shape \(3,\) but parameter \['w'\] has shape \(2,\)"),
    bad("optim.step/hp-dict-missing", lambda: step(params={"a": torch.ones(1), "b": torch.ones(1)},
                                                   grads={"a": torch.ones(1), "b": torch.ones(1)},
                                                   hyperparams={"lr": {"a": 0.1}}),
        ValueError, r"^hg\.optim\.sgd\.step: the per-parameter dict lr has no entry for parameter \['b'\]"),
    # ---- hg.optim.from_torch
    ok("from_torch/sgd", lambda: (lambda m: C(hg.optim.from_torch, torch.optim.SGD(m.parameters(), lr=0.1), m))(lin()),
       lambda r: r.name == "sgd"),
    ok("from_torch/names", lambda: (lambda m: C(hg.optim.from_torch, torch.optim.Adam(m.parameters()), ["weight", "bias"]))(lin()),
       lambda r: r.name == "adam"),
    bad("from_torch/no-module", lambda: C(hg.optim.from_torch, torch_opt()), TypeError,
        r"^hg\.optim\.from_torch: .*needs the module.*from_torch\(torch_optimizer, model\)",
        doc="a torch.optim optimizer where a hypergrad one is expected"),
    bad("from_torch/swapped", lambda: (lambda m: C(hg.optim.from_torch, m, torch.optim.SGD(m.parameters(), lr=0.1)))(lin()),
        TypeError, r"^hg\.optim\.from_torch: torch_optimizer must be a torch\.optim optimizer, got a "
        r"Linear.*from_torch\(torch_optimizer, model\)"),
    bad("from_torch/hypergrad-opt", lambda: C(hg.optim.from_torch, sgd(), lin()), TypeError,
        r"^hg\.optim\.from_torch: torch_optimizer is already a hypergrad optimizer.*use it as it is"),
    bad("from_torch/lbfgs", lambda: (lambda m: C(hg.optim.from_torch, torch.optim.LBFGS(m.parameters()), m))(lin()),
        ValueError, r"^hg\.optim\.from_torch: unsupported optimizer class .*LBFGS"),
    bad("from_torch/other-module", lambda: C(hg.optim.from_torch, torch_opt(), nn.Linear(2, 1)), ValueError,
        r"^hg\.optim\.from_torch: the optimizer's parameter number 0 .*not a parameter of the module"),
    bad("from_torch/names-count", lambda: C(hg.optim.from_torch, torch_opt(), ["weight"]), ValueError,
        r"^hg\.optim\.from_torch: got 1 names for the optimizer's 2 parameters"),
    # ---- hg.unroll: arguments
    ok("unroll/plain", lambda: unroll(), lambda r: r.losses.shape == (3,)),
    ok("unroll/0d-params", lambda: unroll(params={"w": torch.tensor(0.0)}, batches=torch.ones(3)),
       lambda r: r.params["w"].shape == ()),
    ok("unroll/view-params", lambda: unroll(params={"w": torch.zeros(4)[::2]}),
       lambda r: r.params["w"].shape == (2,)),
    ok("unroll/requires-grad", lambda: unroll(params={"w": torch.zeros(2, requires_grad=True)}),
       lambda r: r.params["w"].requires_grad),
    ok("unroll/float64-params", lambda: unroll(params=P(dtype=torch.float64)),
       lambda r: r.params["w"].dtype == torch.float64),
    ok("unroll/list-batches", lambda: unroll(batches=[torch.ones(2)] * 2), lambda r: r.losses.shape == (2,)),
    ok("unroll/generator", lambda: unroll(batches=gen(2), steps=2), lambda r: r.losses.shape == (2,)),
    ok("unroll/batch-fn", lambda: unroll(batches=lambda k: torch.ones(2) * k, steps=2),
       lambda r: r.losses.shape == (2,)),
    ok("unroll/fewer-steps", lambda: unroll(steps=2), lambda r: r.losses.shape == (2,)),
    ok("unroll/tensor-hp", lambda: unroll(hyperparams={"lr": torch.tensor(0.1, requires_grad=True)}),
       lambda r: r.params["w"].requires_grad),
    ok("unroll/state", lambda: unroll(opt=sgd(momentum=0.9), state=sgd(momentum=0.9).init(P())),
       lambda r: r.state.momentum_buffer is not None),
    ok("unroll/adam", lambda: unroll(opt=hg.optim.adam(lr=0.1)), lambda r: float(r.state.step) == 3),
    ok("unroll/bn-buffers", lambda: (lambda m: unroll(inner_loss=bn_loss_of(m), params=hg.split(m)[0],
                                                        buffers=hg.split(m)[1], batches=torch.ones(2, 4, 2),
                                                        aux=torch.tensor(1.0)))(bn_net()),
       lambda r: int(r.buffers["1.num_batches_tracked"]) == 2),
    bad("unroll/torch-optim", lambda: unroll(opt=torch_opt()), TypeError,
        r"^hg\.unroll: opt must be a hypergrad optimizer .*got SGD.*from_torch\(torch_optimizer, model\)",
        doc="a torch.optim optimizer where a hypergrad one is expected"),
    bad("unroll/module-params", lambda: unroll(params=lin()), TypeError,
        r"^hg\.unroll: params must be a tree of tensors .*got a Linear.*hg\.split"),
    bad("unroll/empty-params", lambda: unroll(params={}), ValueError, r"^hg\.unroll: params has no tensors"),
    bad("unroll/int-params", lambda: unroll(params=P(dtype=torch.long)), TypeError,
        r"^hg\.unroll: params leaf \['w'\] is torch\.int64"),
    bad("unroll/meta-params", lambda: unroll(params=meta_params(), batches=B().to("meta")), ValueError,
        r"^hg\.unroll: params leaf \['w'\] is on the meta device.*to_empty",
        doc="params on the meta device"),
    bad("unroll/zero-steps", lambda: unroll(batches=torch.ones(0, 2)), ValueError,
        r"^hg\.unroll: the stacked batches hold 0 steps.*at least one",
        doc="no steps to run"),
    bad("unroll/zero-steps-tuple", lambda: unroll(batches=(torch.ones(0, 2), torch.ones(0))), ValueError,
        r"^hg\.unroll: the stacked batches hold 0 steps"),
    bad("unroll/empty-list", lambda: unroll(batches=[]), ValueError, r"^hg\.unroll: batches is empty"),
    bad("unroll/steps-zero", lambda: unroll(steps=0), ValueError, r"^hg\.unroll: steps must be a positive int"),
    bad("unroll/steps-float", lambda: unroll(steps=2.0), ValueError, r"^hg\.unroll: steps must be a positive int"),
    bad("unroll/too-many-steps", lambda: unroll(steps=5), ValueError,
        r"^hg\.unroll: batches ran out at step 3.*steps=3"),
    bad("unroll/exhausted", lambda: unroll(batches=gen(0), steps=2), ValueError,
        r"^hg\.unroll: batches ran out at step 0 of 2: the iterable yielded no batches.*"
        r"(?!steps=0)fresh", doc="batches that run out"),
    bad("unroll/short-generator", lambda: unroll(batches=gen(1), steps=3), ValueError,
        r"^hg\.unroll: batches ran out at step 1 of 3.*steps=1"),
    bad("unroll/generator-no-steps", lambda: unroll(batches=gen(2)), ValueError,
        r"^hg\.unroll: batches is an iterable without a length; pass steps=K"),
    bad("unroll/fn-no-steps", lambda: unroll(batches=lambda k: torch.ones(2)), ValueError,
        r"^hg\.unroll: batches is a function .*pass steps=K"),
    bad("unroll/batches-int", lambda: unroll(batches=3), TypeError, r"^hg\.unroll: batches must be a tensor"),
    bad("unroll/batches-sizes", lambda: unroll(batches=(torch.ones(3, 2), torch.ones(2))), ValueError,
        r"^hg\.unroll: stacked batches must all have the same leading"),
    bad("unroll/negative-lr", lambda: unroll(hyperparams={"lr": -0.1}), ValueError,
        r"^hg\.unroll: invalid lr: -0\.1; it must be >= 0", doc="a hyperparameter out of range"),
    bad("unroll/negative-tensor-lr", lambda: unroll(hyperparams={"lr": torch.tensor(-0.1)}), ValueError,
        r"^hg\.unroll: invalid lr: -0\.1.*; it must be >= 0", doc="a hyperparameter out of range"),
    bad("unroll/negative-momentum", lambda: unroll(opt=sgd(momentum=0.9), hyperparams={"momentum": -1.0}),
        ValueError, r"^hg\.unroll: invalid momentum: -1\.0"),
    bad("unroll/unknown-hp", lambda: unroll(hyperparams={"bogus": 1.0}), ValueError,
        r"^hg\.unroll: unknown hyperparameter 'bogus'"),
    bad("unroll/state-shapes", lambda: unroll(opt=sgd(momentum=0.9), state=sgd(momentum=0.9).init(P(5))),
        ValueError, r"^hg\.unroll: state\.momentum_buffer\['w'\] has shape \(5,\) but params\['w'\] "
        r"has shape \(2,\)", doc="gradients or optimizer state of other shapes"),
    bad("unroll/state-keys", lambda: unroll(opt=sgd(momentum=0.9), state=sgd(momentum=0.9).init({"v": torch.ones(2)})),
        ValueError, r"^hg\.unroll: state\.momentum_buffer does not have the structure of params"),
    bad("unroll/state-type", lambda: unroll(state=hg.optim.adam().init(P())), ValueError,
        r"^hg\.unroll: state is a AdamState; expected the SGDState"),
    bad("unroll/loss-vector", lambda: unroll(inner_loss=lambda p, a, x: p["w"] - x), ValueError,
        r"^hg\.unroll: inner_loss must return a scalar .*shape \(2,\).*loss\.mean\(\)"),
    bad("unroll/loss-tuple", lambda: unroll(inner_loss=lambda p, a, x: (inner(p, a, x), 1)), TypeError,
        r"^hg\.unroll: inner_loss\(params, aux, batch\) returned a tuple"),
    bad("unroll/loss-float", lambda: unroll(inner_loss=lambda p, a, x: 1.0), ValueError,
        r"^hg\.unroll: inner_loss must return a scalar \(0-d\) tensor, got float"),
    bad("unroll/not-callable", lambda: unroll(inner_loss="loss"), TypeError,
        r"^hg\.unroll: inner_loss must be a function"),
    bad("unroll/buffers-no-tuple", lambda: unroll(buffers={"b": torch.ones(1)},
                                                  inner_loss=lambda p, a, x, b: inner(p, a, x)),
        TypeError, r"^hg\.unroll: buffers are carried, so inner_loss.*must return \(loss, new_buffers\)"),
    bad("unroll/inner_grad", lambda: unroll(inner_grad="fast"), ValueError,
        r"^hg\.unroll: inner_grad must be 'auto', 'func' or 'autograd'"),
    bad("unroll/compile", lambda: unroll(compile="yes"), ValueError, r"^hg\.unroll: compile must be False, True"),
    bad("unroll/seed", lambda: unroll(seed="1"), TypeError, r"^hg\.unroll: seed must be an int or None, got '1'"),
    bad("unroll/clients-type", lambda: unroll(clients=3), TypeError, r"^hg\.unroll: clients must be hg\.Clients"),
    bad("unroll/nan", lambda: unroll(batches=torch.full((3, 2), float("nan"))), FloatingPointError,
        r"^hg\.unroll: the inner loss is \[?nan\]? at step 0"),
    # ---- hg.unroll: what the inner loss does
    bad("unroll/in-place", lambda: unroll(inner_loss=in_place_loss), RuntimeError,
        r"^hg\.unroll: inner_loss changed a tensor in place \(mul_\).*w = w \* 2",
        doc="an in-place operation in a loss"),
    ok("unroll/data-add", lambda: unroll(inner_loss=data_loss), lambda r: r.losses.shape == (3,)),
    ok("unroll/batch-mul", lambda: unroll(inner_loss=batch_mul_loss), lambda r: r.losses.shape == (3,)),
    ok("unroll/batch-list-mul", lambda: unroll(inner_loss=batch_mul_loss, batches=[torch.ones(2)] * 2),
       lambda r: r.losses.shape == (2,)),
    bad("unroll/aux-mul", lambda: unroll(inner_loss=aux_mul_loss, aux=torch.ones(2)), RuntimeError,
        r"^hg\.unroll: a loss changed aux in place\. .*Write the op out of place",
        doc="a loss that changes aux in place"),
    bad("unroll/direct-module", lambda: unroll(inner_loss=direct_loss_of(lin()), batches=torch.ones(3, 1, 2),
                                               aux=torch.tensor(1.0)),
        UserWarning, r"^hg\.unroll: inner_loss does not depend on params.*hg\.call\(model, params, x\)",
        doc="an inner loss that ignores params"),
    # ---- hg.hypergrad
    ok("hypergrad/plain", lambda: hyper(), lambda r: r.aux.shape == (2,)),
    ok("hypergrad/0d-aux", lambda: hyper(aux=torch.tensor(0.5)), lambda r: r.aux.shape == ()),
    ok("hypergrad/aux-requires-grad", lambda: hyper(aux=torch.ones(2, requires_grad=True)),
       lambda r: not r.aux.requires_grad),
    ok("hypergrad/view-aux", lambda: hyper(aux=torch.ones(4)[::2]), lambda r: r.aux.shape == (2,)),
    ok("hypergrad/float64-aux", lambda: hyper(aux=torch.ones(2, dtype=torch.float64)),
       lambda r: r.aux.dtype == torch.float64),
    ok("hypergrad/lr", lambda: hyper(wrt="lr"), lambda r: r.hyperparams["lr"].shape == ()),
    ok("hypergrad/params", lambda: hyper(wrt="params"), lambda r: r.params["w"].shape == (2,)),
    ok("hypergrad/forward", lambda: hyper(method="forward"), lambda r: r.aux.shape == (2,)),
    ok("hypergrad/checkpointed", lambda: hyper(method=hg.Checkpointed(2)), lambda r: r.aux.shape == (2,)),
    ok("hypergrad/first-order-params", lambda: hyper(method="first_order", wrt="params"),
       lambda r: r.params["w"].shape == (2,)),
    bad("hypergrad/aux-mul", lambda: hyper(inner_loss=aux_mul_loss, wrt="lr"), RuntimeError,
        r"^hg\.hypergrad: a loss changed aux in place\. aux is passed unchanged to inner_loss at "
        r"every step"),
    ok("hypergrad/data-add", lambda: hyper(inner_loss=data_loss, wrt="lr"),
       lambda r: r.hyperparams["lr"].shape == ()),
    ok("hypergrad/outer-batch-mul", lambda: hyper(outer_loss=lambda p, a, y: (p["w"] * y.mul_(2)).sum(),
                                                  outer_batch=torch.ones(2)),
       lambda r: r.aux.shape == (2,)),
    ok("hypergrad/bn-buffers", lambda: (lambda m: hyper(
        inner_loss=bn_loss_of(m), params=hg.split(m)[0], buffers=hg.split(m)[1],
        batches=torch.ones(2, 4, 2), aux=torch.tensor(1.0), wrt="params",
        outer_loss=lambda p, a, x, b: hg.call(m, p, x, buffers=b).sum(), outer_batch=torch.ones(4, 2)))(bn_net()),
       lambda r: r.params["0.weight"].shape == (3, 2)),
    bad("hypergrad/torch-optim", lambda: hyper(opt=torch_opt()), TypeError,
        r"^hg\.hypergrad: opt must be a hypergrad optimizer.*from_torch\(torch_optimizer, model\)"),
    bad("hypergrad/swapped-losses", lambda: hyper(outer_loss=None), TypeError,
        r"^hg\.hypergrad: outer_loss must be a function"),
    bad("hypergrad/wrt", lambda: hyper(wrt="bogus"), ValueError, r"^hg\.hypergrad: wrt entry 'bogus'"),
    bad("hypergrad/wrt-empty", lambda: hyper(wrt=()), ValueError, r"^hg\.hypergrad: wrt is empty"),
    bad("hypergrad/no-aux", lambda: hyper(aux=None), ValueError, r"^hg\.hypergrad: wrt asks for 'aux' but aux"),
    bad("hypergrad/int-aux", lambda: hyper(aux=torch.ones(2, dtype=torch.long)), TypeError,
        r"^hg\.hypergrad: aux leaf <root> is torch\.int64"),
    bad("hypergrad/method", lambda: hyper(method="backward"), ValueError, r"^hg\.hypergrad: .*method"),
    bad("hypergrad/zero-steps", lambda: hyper(batches=torch.ones(0, 2)), ValueError,
        r"^hg\.hypergrad: the stacked batches hold 0 steps"),
    bad("hypergrad/negative-lr", lambda: hyper(hyperparams={"lr": -0.5}), ValueError,
        r"^hg\.hypergrad: invalid lr: -0\.5"),
    bad("hypergrad/negative-lr-wrt", lambda: hyper(hyperparams={"lr": -0.5}, wrt="lr"), ValueError,
        r"^hg\.hypergrad: invalid lr: -0\.5"),
    bad("hypergrad/hp-fn-list", lambda: hyper(hyperparams=lambda a: [a.sum()]), TypeError,
        r"^hg\.hypergrad: hyperparams is a function, so it must return a dict .* returned a list"),
    bad("hypergrad/hp-fn-unknown", lambda: hyper(hyperparams=lambda a: {"rate": a.sum()}), ValueError,
        r"^hg\.hypergrad: the hyperparams function returned the unknown name 'rate'"),
    bad("hypergrad/hp-fn-negative", lambda: hyper(hyperparams=lambda a: {"lr": -a.sum()}), ValueError,
        r"^hg\.hypergrad: invalid lr: -2\.0; it must be >= 0"),
    ok("hypergrad/hp-fn", lambda: hyper(hyperparams=lambda a: {"lr": 0.05 * a.sum()}),
       lambda r: r.aux.shape == (2,) and r.hyperparams is None),
    bad("unroll/batches-none-no-steps", lambda: unroll(batches=None), ValueError,
        r"^hg\.unroll: batches=None runs steps without a batch .*pass steps=K"),
    ok("unroll/batches-none", lambda: unroll(batches=None, steps=2, inner_loss=lambda p, a, x: (p["w"] ** 2).sum()),
       lambda r: r.losses.shape == (2,)),
    bad("hypergrad/negative-tensor-lr", lambda: hyper(hyperparams={"lr": torch.tensor(-0.5)}, wrt="lr"),
        ValueError, r"^hg\.hypergrad: invalid lr: -0\.5; it must be >= 0"),
    bad("hypergrad/negative-tensor-lr-per-param", lambda: hyper(hyperparams={"lr": {"w": torch.tensor([0.1, -0.5])}}),
        ValueError, r"^hg\.hypergrad: invalid lr\['w'\]: -0\.5; it must be >= 0"),
    bad("hypergrad/negative-tensor-momentum", lambda: hyper(opt=sgd(momentum=0.5),
        hyperparams={"momentum": torch.tensor(-0.1, requires_grad=True)}), ValueError,
        r"^hg\.hypergrad: invalid momentum: -0\.1"),
    bad("hypergrad/state-shapes", lambda: hyper(opt=hg.optim.adam(), state=hg.optim.adam().init(P(3))),
        ValueError, r"^hg\.hypergrad: state\.exp_avg\['w'\] has shape \(3,\)"),
    bad("hypergrad/outer-vector", lambda: hyper(outer_loss=lambda p, a, x: p["w"]), ValueError,
        r"^hg\.hypergrad: outer_loss must return a scalar"),
    bad("hypergrad/in-place", lambda: hyper(inner_loss=in_place_loss), RuntimeError,
        r"^hg\.hypergrad: inner_loss changed a tensor in place \(mul_\)"),
    bad("hypergrad/in-place-aux", lambda: hyper(inner_loss=aux_mul_loss), RuntimeError,
        r"^hg\.hypergrad: inner_loss changed a tensor in place \(mul_\)"),
    ok("hypergrad/in-place-outer-params",  # params_K is the engine's own tensor: allowed
       lambda: hyper(outer_loss=lambda p, a, x: (p["w"].mul_(2) ** 2).sum()), lambda r: r.aux.shape == (2,)),
    bad("hypergrad/in-place-outer", lambda: hyper(outer_loss=lambda p, a, x: (p["w"] * a.mul_(2)).sum()),
        RuntimeError, r"^hg\.hypergrad: outer_loss changed a tensor in place \(mul_\)"),
    bad("hypergrad/direct-module", lambda: (lambda m: hyper(
        inner_loss=direct_loss_of(m), params=hg.split(m)[0], batches=torch.ones(3, 1, 2),
        aux=torch.tensor(1.0), outer_loss=lambda p, a, x: hg.call(m, p, x).sum(),
        outer_batch=torch.ones(1, 2)))(lin()),
        UserWarning, r"^hg\.hypergrad: inner_loss does not depend on params.*hg\.call\(model, params, x\)"),
    bad("hypergrad/unused-aux", lambda: hyper(inner_loss=inner), UserWarning,
        r"^hg\.hypergrad: aux does not affect the outer loss"),
    bad("hypergrad/truncated-params", lambda: hyper(method=hg.Truncated(1), wrt="params"), ValueError,
        r"^hg\.hypergrad: .*Truncated"),
    bad("hypergrad/checkpointed-0", lambda: C(hg.Checkpointed, 0), ValueError,
        r"^hg\.Checkpointed: segment must be a positive int"),
    # ---- hg.clients and hg.Clients
    ok("clients.unroll/plain", lambda: clients(), lambda r: r.params["w"].shape == (3, 2)),
    ok("clients.hypergrad/plain", lambda: clients(hg.clients.hypergrad), lambda r: r.aux.shape == (2,)),
    ok("clients.unroll/weights", lambda: clients(weights=[1.0, 2.0, 3.0], rounds=2, steps=1),
       lambda r: r.params["w"].shape == (3, 2)),
    bad("clients.unroll/negative-weights", lambda: clients(weights=[1.0, -1.0, 3.0], rounds=2, steps=1),
        ValueError, r"^hg\.clients\.unroll: weight 1 is -1\.0; weights must be non-negative",
        doc="negative averaging weights"),
    bad("Clients/negative-weights", lambda: C(hg.Clients, weights=[1.0, -1.0]), ValueError,
        r"^hg\.Clients: weight 1 is -1\.0; weights must be non-negative"),
    bad("clients.unroll/process-group", lambda: clients(process_group="world"), TypeError,
        r"^hg\.clients\.unroll: process_group must be a torch\.distributed process group"),
    bad("clients.unroll/rounds", lambda: clients(rounds=0), ValueError, r"^hg\.clients\.unroll: rounds must be a positive int"),
    bad("clients.unroll/randomness", lambda: clients(randomness="any"), ValueError,
        r"^hg\.clients\.unroll: randomness must be 'error', 'different' or 'same'"),
    bad("clients.unroll/chunk", lambda: clients(chunk_size=0), ValueError,
        r"^hg\.clients\.unroll: chunk_size must be a positive int"),
    bad("clients.unroll/both", lambda: clients(weights=[1.0] * 3, aggregate=lambda t: t), ValueError,
        r"^hg\.clients\.unroll: pass either weights="),
    bad("clients.unroll/sizes", lambda: clients(params={"w": torch.ones(4, 2)}), ValueError,
        r"^hg\.clients\.unroll: .*client"),
    bad("clients.unroll/zero-steps", lambda: clients(batches=torch.ones(0, 3, 2)), ValueError,
        r"^hg\.clients\.unroll: the stacked batches hold 0 steps"),
    bad("clients.unroll/negative-lr", lambda: clients(hyperparams={"lr": -1.0}), ValueError,
        r"^hg\.clients\.unroll: invalid lr: -1\.0"),
    bad("clients.unroll/negative-tensor-lr", lambda: clients(hyperparams={"lr": torch.tensor([0.1, -1.0, 0.2])},
        in_dims={"hyperparams": {"lr": 0}}), ValueError, r"^hg\.clients\.unroll: invalid lr: -1\.0"),
    bad("clients.fedavg/negative", lambda: C(hg.clients.fedavg, {"w": torch.ones(2, 3)}, [1.0, -0.5]),
        ValueError, r"^hg\.clients\.fedavg: weight 1 is -0\.5; weights must be non-negative",
        doc="negative averaging weights"),
    ok("clients.fedavg/int-leaf", lambda: C(hg.clients.fedavg, {"w": torch.ones(2, 3), "n": torch.tensor([3, 3])}),
       lambda r: int(r["n"]) == 3),
    bad("clients.fedavg/count", lambda: C(hg.clients.fedavg, {"w": torch.ones(2, 3)}, [1.0]), ValueError,
        r"^hg\.clients\.fedavg: expected 2 weights"),
    ok("clients.broadcast/plain", lambda: C(hg.clients.broadcast, P(), 3), lambda r: r["w"].shape == (3, 2)),
    bad("clients.broadcast/zero", lambda: C(hg.clients.broadcast, P(), 0), ValueError,
        r"^hg\.clients\.broadcast: clients must be a positive int"),
    ok("clients.pad/plain", lambda: C(hg.clients.pad, [torch.ones(2), torch.ones(3)]),
       lambda r: r.data.shape == (2, 3)),
    ok("clients.pad/view", lambda: C(hg.clients.pad, [torch.ones(4)[::2], torch.ones(1)]),
       lambda r: r.sizes.tolist() == [2, 1]),
    bad("clients.pad/empty", lambda: C(hg.clients.pad, []), ValueError, r"^hg\.clients\.pad: got no datasets"),
    bad("clients.pad/0d", lambda: C(hg.clients.pad, [torch.tensor(1.0)]), ValueError,
        r"^hg\.clients\.pad: dataset 0 needs tensors sharing one leading"),
    bad("clients.pad/trailing", lambda: C(hg.clients.pad, [torch.ones(2, 3), torch.ones(2, 4)]), ValueError,
        r"^hg\.clients\.pad: the tensor of dataset 1 has example shape \(4,\)"),
    ok("clients.batches/full", lambda: C(hg.clients.batches, hg.clients.pad([torch.ones(2)]), 3),
       lambda r: r[0].shape == (3, 1, 2)),
    bad("clients.batches/steps", lambda: C(hg.clients.batches, hg.clients.pad([torch.ones(2)]), 0),
        ValueError, r"^hg\.clients\.batches: steps must be a positive int"),
    bad("clients.batches/size", lambda: C(hg.clients.batches, hg.clients.pad([torch.ones(2)]), 3, 5),
        ValueError, r"^hg\.clients\.batches: batch_size must be an int in \[1, 2\]"),
    bad("clients.batches/not-padded", lambda: C(hg.clients.batches, torch.ones(2, 3), 3), TypeError,
        r"^hg\.clients\.batches: padded must be the result of hg\.clients\.pad"),
    ok("clients.masked_mean/plain", lambda: C(hg.clients.masked_mean, torch.tensor([1.0, 3.0]),
                                              torch.tensor([True, False])),
       lambda r: float(r) == 1.0),
    ok("clients.masked_mean/rows", lambda: C(hg.clients.masked_mean, torch.ones(2, 3), torch.tensor([True, False])),
       lambda r: float(r) == 1.0),
    bad("clients.masked_mean/float-mask", lambda: C(hg.clients.masked_mean, torch.ones(2), torch.ones(2)),
        TypeError, r"^hg\.clients\.masked_mean: mask must be a bool tensor, got torch\.float32.*mask > 0"),
    bad("clients.masked_mean/shape", lambda: C(hg.clients.masked_mean, torch.ones(3), torch.ones(2, dtype=torch.bool)),
        ValueError, r"^hg\.clients\.masked_mean: mask has shape \(2,\) but values has shape \(3,\)"),
    # ---- hg.testing
    ok("testing.finite_difference/plain", lambda: C(hg.testing.finite_difference, lambda x: (x**2).sum(),
                                                    torch.ones(2, dtype=torch.float64),
                                                    torch.ones(2, dtype=torch.float64)),
       lambda r: abs(float(r.value) - 4.0) < 1e-6),
    bad("testing.finite_difference/shapes", lambda: C(hg.testing.finite_difference, lambda x: x.sum(),
                                                      torch.ones(2), torch.ones(3)),
        ValueError, r"^hg\.testing\.finite_difference: leaf <root> has shape \(2,\) in the first tree but \(3,\)"),
    bad("testing.finite_difference/keys", lambda: C(hg.testing.finite_difference, lambda x: x["w"].sum(),
                                                    P(), {"v": torch.ones(2)}),
        ValueError, r"^hg\.testing\.finite_difference: .*different structure"),
    ok("testing.check_hypergrad/plain", lambda: C(hg.testing.check_hypergrad, outer, inner_aux, P(), sgd(),
                                                  B(), None, aux=torch.ones(2), directions=1),
       lambda r: r.ok),
    bad("testing.check_hypergrad/directions", lambda: C(hg.testing.check_hypergrad, outer, inner_aux, P(),
                                                        sgd(), B(), None, aux=torch.ones(2), directions=0),
        ValueError, r"^hg\.testing\.check_hypergrad: directions must be"),
    bad("testing.check_hypergrad/torch-optim", lambda: C(hg.testing.check_hypergrad, outer, inner_aux, P(),
                                                         torch_opt(), B(), None, aux=torch.ones(2)),
        TypeError, r"^hg\.testing\.check_hypergrad: opt must be a hypergrad optimizer"),
    bad("testing.check_hypergrad/zero-steps", lambda: C(hg.testing.check_hypergrad, outer, inner_aux, P(),
                                                        sgd(), torch.ones(0, 2), None, aux=torch.ones(2)),
        ValueError, r"^hg\.testing\.check_hypergrad: the stacked batches hold 0 steps"),
    bad("testing.check_hypergrad/eps", lambda: C(hg.testing.check_hypergrad, outer, inner_aux, P(),
                                                 sgd(), B(), None, aux=torch.ones(2), eps=-1.0),
        ValueError, r"^hg\.testing\.check_hypergrad: eps must be"),
]
# fmt: on


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_input(row: Row) -> None:
    got, detail = outcome(row)
    want = "legitimate" if row.error is None else "clear"
    assert got == want, f"{row.id}: {got}: {detail}"


def test_table_is_wide() -> None:
    assert len(ROWS) >= 150
    assert len({r.id for r in ROWS}) == len(ROWS), "row ids must be unique"


def _refusals_section() -> str:
    text = (pathlib.Path(__file__).parents[1] / "docs" / "sharp-bits.md").read_text()
    start = text.index("## What hypergrad refuses and why")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_refusals_are_documented() -> None:
    section = _refusals_section()
    phrases = {r.doc for r in ROWS if r.doc}
    missing = sorted(p for p in phrases if p not in section)
    assert not missing, f"docs/sharp-bits.md lacks: {missing}"


# ---- batches: the caller's own slices once the loss is known to leave its batch alone


def _seen_batches(mutate_from: int | None = None):
    """An inner loss that records each batch it gets (and changes it in place from a step on)."""
    seen: list[torch.Tensor] = []

    def loss(p, aux, x):
        seen.append(x)
        if mutate_from is not None and len(seen) > mutate_from:
            x.mul_(2)
        return ((p["w"] - x) ** 2).sum()

    return loss, seen


def test_batches_after_the_first_are_the_callers_slices():
    # No copy per step (a copy would also be kept by the backward pass: K more batches).
    batches = torch.arange(6.0).reshape(3, 2)
    loss, seen = _seen_batches()
    hg.hypergrad(outer, loss, P(), sgd(), batches, None, wrt="lr")
    assert seen[0].data_ptr() != batches[0].data_ptr()  # the first: a copy, to learn
    assert [x.data_ptr() for x in seen[1:]] == [batches[k].data_ptr() for k in (1, 2)]


def test_a_loss_that_changes_every_batch_gets_copies():
    batches = torch.arange(6.0).reshape(3, 2)
    loss, seen = _seen_batches(mutate_from=0)
    hg.unroll(loss, P(), sgd(), batches)
    assert torch.equal(batches, torch.arange(6.0).reshape(3, 2))
    assert all(x.data_ptr() != batches[k].data_ptr() for k, x in enumerate(seen))


LATER_BATCH = r"^hg\.(unroll|hypergrad): inner_loss changed its batch in place at a later step"


@pytest.mark.parametrize("entry", ["unroll", "hypergrad"])
def test_a_loss_that_changes_a_later_batch_is_refused(entry):
    loss, _ = _seen_batches(mutate_from=1)
    batches = torch.arange(6.0).reshape(3, 2)
    with pytest.raises(RuntimeError, match=LATER_BATCH + r".*x = x \* 2"):
        if entry == "unroll":
            hg.unroll(loss, P(), sgd(), batches)
        else:
            hg.hypergrad(outer, loss, P(), sgd(), batches, None, wrt="lr")


def tally() -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for row in ROWS:
        got, detail = outcome(row)
        counts[got] += 1
        if got not in ("clear", "legitimate"):
            print(f"{got:8} {row.id}: {detail[:160]}")
    return counts


if __name__ == "__main__":
    print(dict(tally()), "of", len(ROWS), "rows", file=sys.stderr)

"""Tests for hypergrad.tree: properties over random trees, gradients, vmap, every error message."""

from __future__ import annotations

import collections
import math
import re

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hypergrad as hg
from hypergrad import tree as T
from strategies import like, tensor_from, trees

MIXED = (torch.float32, torch.float64)
ORDS = st.sampled_from([1, 2, math.inf])


def flat64(tree):
    """All leaves as one float64 vector (reference for reductions)."""
    xs = [x.double().reshape(-1) for x in T.leaves(tree)]
    return torch.cat(xs) if xs else torch.zeros(0, dtype=torch.float64)


def assert_trees_equal(a, b):
    assert optree.tree_structure(a, namespace="hypergrad") == optree.tree_structure(
        b, namespace="hypergrad"
    )
    for x, y in zip(T.leaves(a), T.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------- properties


@given(trees())
def test_ravel_unravel_round_trip(tree):
    flat, unravel_fn = T.ravel(tree)
    assert flat.dim() == 1 and flat.numel() == sum(x.numel() for x in T.leaves(tree))
    assert_trees_equal(unravel_fn(flat), tree)
    # and the other way round
    v = torch.arange(flat.numel(), dtype=flat.dtype)
    assert torch.equal(T.ravel(unravel_fn(v))[0], v)


@given(trees(dtypes=MIXED), st.integers(0, 1000))
def test_lerp_endpoints_are_exact(a, seed):
    b = like(a, seed)
    assert_trees_equal(T.lerp(a, b, 0.0), a)
    assert_trees_equal(T.lerp(a, b, 1.0), b)
    assert_trees_equal(T.lerp(a, b, torch.tensor(1.0, dtype=torch.float64)), b)
    mid = T.lerp(a, b, 0.5)
    for m, x, y in zip(T.leaves(mid), T.leaves(a), T.leaves(b)):
        assert m.dtype == x.dtype
        torch.testing.assert_close(m, (x + y) / 2)


@given(trees(dtypes=MIXED), st.integers(0, 1000), ORDS)
def test_distance_symmetry_and_triangle_inequality(a, seed, ord):
    b, c = like(a, seed), like(a, seed + 500)
    dab, dba = T.distance(a, b, ord), T.distance(b, a, ord)
    assert dab.dim() == 0
    assert torch.equal(dab, dba)
    assert T.distance(a, a, ord) == 0
    assert dab <= T.distance(a, c, ord) + T.distance(c, b, ord) + 1e-4


@given(trees(dtypes=MIXED), ORDS, st.floats(-5, 5))
def test_norm_matches_flat_vector_and_is_homogeneous(tree, ord, c):
    n = T.norm(tree, ord)
    ref = torch.linalg.vector_norm(flat64(tree), ord) if flat64(tree).numel() else torch.tensor(0.0)
    torch.testing.assert_close(n.double(), ref.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        T.norm(T.scale(tree, c), ord).double(), abs(c) * n.double(), rtol=1e-5, atol=1e-5
    )
    per = T.norm(tree, ord, per_leaf=True)
    assert T.key_paths(per) == T.key_paths(tree)
    assert all(x.dim() == 0 for x in T.leaves(per))
    # the global norm is the norm of the per-leaf norms
    per_flat = torch.stack([x.double() for x in T.leaves(per)]) if T.leaves(per) else None
    if per_flat is not None:
        torch.testing.assert_close(
            n.double(), torch.linalg.vector_norm(per_flat, ord), rtol=1e-6, atol=1e-7
        )


def ulps(*trees):
    """A few ulps of the least precise leaf: mixed float32/float64 trees round like float32."""
    dtypes = [leaf.dtype for t in trees for leaf in T.leaves(t) if leaf.is_floating_point()]
    return 8 * max((torch.finfo(d).eps for d in dtypes), default=torch.finfo(torch.float64).eps)


@given(trees(dtypes=MIXED))
def test_norm_squared_is_vdot_and_cosine_of_self_is_one(tree):
    torch.testing.assert_close(
        T.norm(tree).double() ** 2, T.vdot(tree, tree).double(), rtol=1e-5, atol=1e-6
    )
    c = T.cosine(tree, tree)
    if flat64(tree).abs().sum() > 0:
        tol = ulps(tree)
        torch.testing.assert_close(
            c.double(), torch.tensor(1.0, dtype=torch.float64), rtol=tol, atol=tol
        )
    else:
        assert c == 0  # zero or empty tree: 0, not NaN


@given(trees(), st.integers(0, 1000))
def test_cosine_is_bounded_and_symmetric(a, seed):
    b = like(a, seed)
    c = T.cosine(a, b)
    tol = ulps(a, b)  # rounding may step an ulp past +-1, never further
    assert -1 - tol <= c <= 1 + tol
    torch.testing.assert_close(c, T.cosine(b, a))
    torch.testing.assert_close(T.cosine(a, T.scale(b, 3.0)), c)


@given(trees(), st.integers(0, 1000), st.lists(st.floats(0.1, 10), min_size=1, max_size=4))
def test_mean_weighted_list_and_stacked_agree(a, seed, weights):
    ts = [like(a, seed + 17 * i) for i in range(len(weights))]
    m = T.mean(ts, weights)
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    for i, leaf in enumerate(T.leaves(m)):
        ref = sum(w[j] * T.leaves(ts[j])[i] for j in range(len(ts)))
        torch.testing.assert_close(leaf, ref)
    stacked = (
        T.map(lambda *xs: torch.stack(xs), *ts) if len(ts) > 1 else T.map(lambda x: x[None], ts[0])
    )
    torch.testing.assert_close(T.mean(stacked, weights, stacked=True), m)
    torch.testing.assert_close(T.mean(ts, torch.tensor(weights, dtype=torch.float64)), m)
    torch.testing.assert_close(T.mean([a, a, a]), a)


@given(trees(dtypes=MIXED), st.data())
def test_partition_combine_round_trip(tree, data):
    names = T.dotted_paths(tree)
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True) if names else st.just([]))
    pattern = data.draw(
        st.sampled_from(
            [
                lambda path, leaf: path in chosen,
                [re.compile("^" + re.escape(n) + "$") for n in chosen],
                list(chosen),  # globs without wildcards match exactly
                "*.weight",
                "fc*",
            ]
        )
    )
    selected, rest = T.partition(tree, pattern)
    assert_trees_equal(T.combine(selected, rest), tree)
    assert_trees_equal(T.combine(rest, selected), tree)
    assert set(T.dotted_paths(selected)).isdisjoint(T.dotted_paths(rest))
    assert sorted(T.dotted_paths(selected) + T.dotted_paths(rest)) == sorted(names)
    assert_trees_equal(T.select(tree, pattern), selected)


def test_dotted_paths_and_patterns_on_nested_trees():
    State = collections.namedtuple("State", "exp_avg exp_avg_sq")
    w = torch.ones(2)
    tree = {"enc": {"weight": w, "bias": w}, "fc1.weight": w, "layers": [w, w], "s": State(w, w)}
    assert T.dotted_paths(tree) == [
        "enc.weight",
        "enc.bias",
        "fc1.weight",
        "layers.0",
        "layers.1",
        "s.exp_avg",
        "s.exp_avg_sq",
    ]
    sel, rest = T.partition(tree, "*.weight")
    assert sel == {
        "enc": {"weight": w},
        "fc1.weight": w,
        "layers": [None, None],
        "s": State(None, None),
    }
    assert T.dotted_paths(rest) == ["enc.bias", "layers.0", "layers.1", "s.exp_avg", "s.exp_avg_sq"]
    assert T.dotted_paths(T.select(tree, re.compile(r"\.1$"))) == ["layers.1"]
    assert T.dotted_paths(T.select(tree, ["layers.*", "s.exp_avg"])) == [
        "layers.0",
        "layers.1",
        "s.exp_avg",
    ]
    # None placeholders are empty subtrees for the rest of hg.tree
    assert T.norm(sel) == T.norm({"a": w, "b": w})
    assert T.select({}, "*") == {}


def test_layer_names_and_all_but_last_layer_follow_module_order():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(12)])
    params, _ = hg.split(model)
    names = T.layer_names(params)
    assert names == [str(i) for i in range(12)]  # "10" after "9", not sorted as strings
    body = T.select(params, T.all_but_last_layer(params))
    assert "11.weight" not in body and "11.bias" not in body and len(body) == 22
    assert T.layer_names({"weight": torch.ones(1), "bias": torch.ones(1)}) == [""]


# ----------------------------------------------------------------------- 0-d, empty, dtypes


def test_zero_dim_and_empty_trees():
    t = {"s": torch.tensor(-3.0), "e": torch.zeros(0)}
    assert T.norm(t) == 3 and T.norm(t, 1) == 3 and T.norm(t, math.inf) == 3
    assert T.norm({"e": torch.zeros(0)}, math.inf) == 0
    for ord in (1, 2, math.inf):
        assert T.norm({}, ord) == 0 and T.distance({}, {}, ord) == 0
    assert T.norm({}, per_leaf=True) == {}
    assert T.cosine({}, {}) == 0
    assert T.lerp({}, {}, 0.3) == {}
    assert T.mean([{}, {}]) == {}
    flat, unravel_fn = T.ravel({})
    assert flat.shape == (0,) and unravel_fn(flat) == {}
    flat, unravel_fn = T.ravel(t)
    assert flat.tolist() == [-3.0] and unravel_fn(flat)["s"].shape == ()


def test_mixed_dtypes_keep_leaf_dtypes_and_promote_reductions():
    a = {"h": torch.ones(2, dtype=torch.float32), "d": torch.ones(2, dtype=torch.float64)}
    w = torch.tensor(0.25, dtype=torch.float64)
    out = T.lerp(a, T.scale(a, 3.0), w)
    assert out["h"].dtype == torch.float32 and out["d"].dtype == torch.float64
    assert torch.equal(out["h"], torch.full((2,), 1.5))
    assert T.norm(a).dtype == torch.float64 and T.vdot(a, a).dtype == torch.float64
    assert T.mean([a, a], weights=torch.tensor([1.0, 1.0]))["d"].dtype == torch.float64


# -------------------------------------------------------------------------- grad and vmap


def _double_tree(seed=0):
    return {
        "w": tensor_from(seed, (2, 3), torch.float64),
        "b": tensor_from(seed + 1, (3,), torch.float64),
        "s": tensor_from(seed + 2, (), torch.float64),
    }


@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_norm_distance_cosine_gradients_match_finite_differences(ord):
    a, b = _double_tree(0), _double_tree(10)
    keys = list(a)

    def as_args(tree):
        return tuple(tree[k].clone().requires_grad_() for k in keys)

    def f_norm(*xs):
        return T.norm(dict(zip(keys, xs)), ord)

    def f_dist(*xs):
        return T.distance(dict(zip(keys, xs)), b, ord)

    def f_cos(*xs):
        return T.cosine(dict(zip(keys, xs)), b)

    for f in (f_norm, f_dist, f_cos):
        assert torch.autograd.gradcheck(f, as_args(a))


def test_lerp_and_mean_gradients_match_finite_differences():
    a, b = _double_tree(0), _double_tree(10)
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: T.vdot(T.lerp(a, b, w), b), (w,))
    ws = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    ts = [a, b, _double_tree(20)]
    assert torch.autograd.gradcheck(lambda ws: T.norm(T.mean(ts, ws)), (ws,))
    stacked = T.map(lambda *xs: torch.stack(xs), *ts)
    assert torch.autograd.gradcheck(lambda ws: T.norm(T.mean(stacked, ws, stacked=True)), (ws,))


def test_torch_func_grad_and_vmap():
    a, b = _double_tree(0), _double_tree(10)
    # grad of a tree function w.r.t. a tree: d/da 0.5 |a - b|^2 = a - b
    g = torch.func.grad(lambda t: 0.5 * T.distance(t, b) ** 2)(a)
    torch.testing.assert_close(g, T.sub(a, b))
    # d/dw lerp(a, b, w) = b - a, so d/dw <lerp, b - a> = |b - a|^2
    gw = torch.func.grad(lambda w: T.vdot(T.lerp(a, b, w), T.sub(b, a)))(
        torch.tensor(0.2, dtype=torch.float64)
    )
    torch.testing.assert_close(gw, T.vdot(T.sub(b, a), T.sub(b, a)))
    # vmap over interpolation weights: a whole path at once
    ws = torch.linspace(0, 1, 5, dtype=torch.float64)
    path = torch.func.vmap(lambda w: T.lerp(a, b, w))(ws)
    assert path["w"].shape == (5, 2, 3)
    torch.testing.assert_close(path["w"][3], T.lerp(a, b, 0.75)["w"])
    # vmap over a stacked tree: per-client norms, distances, cosines, ravel
    stacked = T.map(lambda *xs: torch.stack(xs), a, b, _double_tree(20))
    for ord in (1, 2, math.inf):
        norms = torch.func.vmap(lambda t, o=ord: T.norm(t, o))(stacked)
        torch.testing.assert_close(norms[1], T.norm(b, ord))
    dists = torch.func.vmap(lambda t: T.distance(t, a))(stacked)
    torch.testing.assert_close(dists[1], T.distance(b, a))
    coss = torch.func.vmap(lambda t: T.cosine(t, a))(stacked)
    torch.testing.assert_close(coss[1], T.cosine(b, a))
    flats = torch.func.vmap(lambda t: T.ravel(t)[0])(stacked)
    torch.testing.assert_close(flats[1], T.ravel(b)[0])
    sel = torch.func.vmap(lambda t: T.norm(T.select(t, "w")))(stacked)
    torch.testing.assert_close(sel[1], T.norm({"w": b["w"]}))


# ----------------------------------------------------------------------------- error messages


def test_structure_mismatch_errors_name_the_key_path():
    a, b = {"w": torch.ones(1), "v": torch.ones(1)}, {"w": torch.ones(1)}
    for call, name in [
        (lambda: T.lerp(a, b, 0.5), "lerp"),
        (lambda: T.distance(a, b), "distance"),
        (lambda: T.cosine(a, b), "cosine"),
        (lambda: T.mean([a, b]), "mean"),
        (lambda: T.add(a, b), "add"),
        (lambda: T.vdot(a, b), "vdot"),
    ]:
        with pytest.raises(
            ValueError,
            match=rf"^hg\.tree\.{name}: the trees have different structure: key \['v'\] is in "
            r"the first tree but not in the second tree\. Pass trees with the same keys",
        ):
            call()
    with pytest.raises(
        ValueError, match=r"hg\.tree\.mean: .*key \['x'\] is in tree number 3 but not"
    ):
        T.mean([b, b, {"w": torch.ones(1), "x": torch.ones(1)}])
    with pytest.raises(ValueError, match=r"same keys but different containers"):
        T.add({"w": [torch.ones(1)]}, {"w": (torch.ones(1),)})


def test_norm_errors():
    with pytest.raises(ValueError, match=r"^hg\.tree\.norm: ord must be 1, 2 or math\.inf .*got 3"):
        T.norm({"w": torch.ones(1)}, 3)
    with pytest.raises(ValueError, match=r"^hg\.tree\.distance: ord must be 1, 2 or math\.inf"):
        T.distance({}, {}, "fro")
    with pytest.raises(
        ValueError,
        match=r"^hg\.tree\.norm: leaf \['step'\] has dtype torch\.int64; norms need floating-point "
        r"leaves\. Select the floating leaves first",
    ):
        T.norm({"w": torch.ones(1), "step": torch.tensor(3)})


def test_mean_errors():
    t = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match=r"^hg\.tree\.mean: got an empty list of trees"):
        T.mean([])
    with pytest.raises(ValueError, match=r"^hg\.tree\.mean: expected a list of trees, got a dict"):
        T.mean(t)
    with pytest.raises(
        ValueError, match=r"^hg\.tree\.mean: expected 2 weights \(one per tree\), got 3 items"
    ):
        T.mean([t, t], [1, 2, 3])
    with pytest.raises(ValueError, match=r"^hg\.tree\.mean: expected 2 weights .*got \(2, 1\)"):
        T.mean([t, t], torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"^hg\.tree\.mean: the weights sum to zero"):
        T.mean([t, t], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"^hg\.tree\.mean: weight 1 is -1\.0; weights must be"):
        T.mean([t, t], [1.0, -1.0])
    with pytest.raises(
        ValueError,
        match=r"^hg\.tree\.mean: with stacked=True every leaf needs the same leading dimension .*"
        r"got leaf shapes \(2, 3\), \(4,\)",
    ):
        T.mean({"a": torch.ones(4), "b": torch.ones(2, 3)}, stacked=True)
    with pytest.raises(ValueError, match=r"leading dimension .*got leaf shapes \(\)"):
        T.mean({"a": torch.tensor(1.0)}, stacked=True)


def test_pattern_and_combine_errors():
    t = {"a": torch.ones(1), "b": [torch.ones(1)]}
    with pytest.raises(
        TypeError, match=r"^hg\.tree\.partition: pattern must be a glob string, .*got a int"
    ):
        T.select(t, 3)
    with pytest.raises(
        ValueError,
        match=r"^hg\.tree\.combine: 2 trees hold a value at \['a'\]; the parts must be disjoint",
    ):
        T.combine(t, {"a": torch.ones(1)})
    with pytest.raises(
        ValueError,
        match=r"^hg\.tree\.combine: at \['b'\] the trees hold lists of different lengths \[1, 2\]",
    ):
        T.combine({"b": [None]}, {"b": [None, torch.ones(1)]})
    with pytest.raises(
        ValueError,
        match=r"^hg\.tree\.combine: at \['b'\] the trees hold different containers \(list, tuple\)",
    ):
        T.combine({"b": [None]}, {"b": (torch.ones(1),)})
    with pytest.raises(ValueError, match=r"^hg\.tree\.combine: pass at least one tree"):
        T.combine()
    with pytest.raises(ValueError, match=r"^hg\.tree\.all_but_last_layer: the tree has no leaves"):
        T.all_but_last_layer({})


def test_ravel_and_unravel_errors():
    with pytest.raises(
        ValueError,
        match=r"^hg\.tree\.ravel: leaf \['b'\] is torch\.float64 on cpu but leaf \['a'\] is "
        r"torch\.float32 on cpu; one vector needs one dtype and device\. Cast the tree first",
    ):
        T.ravel({"a": torch.ones(1), "b": torch.ones(1, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"^hg\.tree\.ravel: leaf \['n'\] is a int, not a tensor"):
        T.ravel({"a": torch.ones(1), "n": 3})
    _, unravel_fn = T.ravel({"a": torch.ones(3)})
    with pytest.raises(
        ValueError, match=r"^hg\.tree\.unravel: expected a vector of length 3 .*got shape \(2,\)"
    ):
        unravel_fn(torch.ones(2))

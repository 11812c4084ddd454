"""The block-sparse op's ``return_lse``: every impl returns the row logsumexp of its softmax and
differentiates it, and ``core.merge_softmax_passes`` merges passes over disjoint key sets into
the single pass exactly.

The oracle is written here from the definition, in float64 NumPy: row ``(b, t, n)`` reads key
``s`` iff the block selection, key validity, causal / window / sink-key rules and the segment
rule hold; ``lse = log(sum_s exp(scale * q.k_s) [+ exp(sink_n)])``, ``-inf`` for a row that reads
nothing and has no sink. Gradients of a loss that uses both the output and the lse are compared
with autodiff through the dense reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnhut_jax import core
from pallas_kernels.block_sparse import (
    BlockSizes,
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_attention_tpu,
    block_sparse_attention_xla,
)

B, T, N, KG, H, V, BK = 2, 22, 4, 2, 8, 6, 4
J = -(-T // BK)
# row 0: segments 1 and 2 then padding; row 1: one segment then padding (segments not aligned
# to the key blocks or query tiles)
SEG = np.array([[1] * 7 + [2] * 9 + [0] * 6, [3] * 19 + [0] * 3], np.int32)
K_SINK = np.zeros((B, T), bool)
K_SINK[0, [0, 7]] = K_SINK[1, 0] = True  # each segment's first token exempt from the window

# impl -> fn(q, k, v, keep, **rules) returning (out, lse); small tiles so that several query
# tiles and key blocks are walked
IMPLS = {
    "reference": lambda *a, **kw: core.block_sparse_attention(*a, impl="reference", **kw),
    "xla": lambda *a, **kw: block_sparse_attention_xla(*a, block_q=8, **kw),
    "pallas": lambda *a, **kw: block_sparse_attention(*a, block_sizes=BlockSizes(8), **kw),
    "tpu": lambda *a, **kw: block_sparse_attention_tpu(*a, block_sizes=BlockSizes(32), **kw),
}
# (name, rules, with a sink logit): a causal GQA window with sink keys and a sink logit, and
# packed sequences (padding rows) without a sink (rows that read nothing: lse -inf)
CASES = {
    "causal_window_sink": (dict(causal=True, window=5, num_sink_keys=2), True),
    "segments_padding": (dict(causal=False, window=6, q_seg_BT=jnp.asarray(SEG),
                              k_seg_BS=jnp.asarray(SEG), k_sink_BS=jnp.asarray(K_SINK)), False),
}


def _operands(seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, T, KG, H))
    v = jax.random.normal(ks[2], (B, T, KG, V))
    keep = jax.random.bernoulli(ks[3], 0.6, (B, KG, T, J))
    keep = keep.at[:, :, 3].set(False)  # a query row that reads nothing
    sink = jax.random.normal(ks[4], (N,))
    valid = jax.random.bernoulli(ks[5], 0.85, (B, T))
    g_out = jax.random.normal(ks[6], (B, T, N, V))
    g_lse = jax.random.normal(ks[7], (B, T, N))
    return q, k, v, keep, sink, valid, g_out, g_lse


def _oracle(q, k, v, keep, valid, sink, causal, window=None, num_sink_keys=0, q_seg_BT=None,
            k_seg_BS=None, k_sink_BS=None):
    """(out (B, T, N, V), lse (B, T, N)) in float64 from the definition, loop over the rules."""
    q, k, v, keep, valid = (np.asarray(a, np.float64 if a.dtype != bool else bool)
                            for a in (q, k, v, keep, valid))
    g = N // KG
    member = np.zeros((B, KG, T, T), bool)
    for b in range(B):
        for kg in range(KG):
            for t in range(T):
                for s in range(T):
                    ok = keep[b, kg, t, s // BK] and valid[b, s]
                    ok = ok and (not causal or s <= t)
                    if window is not None:
                        is_sink = s < num_sink_keys or (k_sink_BS is not None
                                                        and bool(k_sink_BS[b, s]))
                        ok = ok and (is_sink or s > t - window)
                    if q_seg_BT is not None:
                        ok = ok and int(k_seg_BS[b, s]) == int(q_seg_BT[b, t]) != 0
                    member[b, kg, t, s] = ok
    out = np.zeros((B, T, N, V))
    lse = np.full((B, T, N), -np.inf)
    for b in range(B):
        for n in range(N):
            logits = q[b, :, n] @ k[b, :, n // g].T * H ** -0.5  # (T, S)
            for t in range(T):
                x = logits[t][member[b, n // g, t]]
                if sink is not None:
                    x = np.append(x, float(sink[n]))
                if x.size == 0:
                    continue
                lse[b, t, n] = np.log(np.exp(x - x.max()).sum()) + x.max()
                p = np.exp(logits[t] - lse[b, t, n]) * member[b, n // g, t]
                out[b, t, n] = p @ v[b, :, n // g]
    return out, lse


def _value_and_vjp(fn, keep, valid, rules, g_out, g_lse):
    """Jitted (q, k, v, sink) -> ((out, lse), gradients) with the cotangent (g_out, g_lse): a
    loss that uses both outputs, its lse cotangent non-zero on the rows whose lse is -inf too
    (which must then reach no gradient)."""
    def run(q, k, v, sink):
        (out, lse), vjp = jax.vjp(lambda *a: fn(*a[:3], keep, block_k=BK, sink=a[3],
                                                key_valid_BS=valid, return_lse=True, **rules),
                                  q, k, v, sink)
        return (out, lse), vjp((g_out, g_lse))
    return jax.jit(run)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """The case's operands, oracle and reference gradients (autodiff through the dense
    reference), computed once per case."""
    rules, with_sink = CASES[request.param]
    q, k, v, keep, sink, valid, g_out, g_lse = _operands()
    sink = sink if with_sink else None
    want_out, want_lse = _oracle(q, k, v, keep, valid, sink, **rules)
    ref = _value_and_vjp(block_sparse_attention_reference, keep, valid, rules, g_out, g_lse)
    (ref_out, ref_lse), ref_grads = ref(q, k, v, sink)
    np.testing.assert_allclose(ref_out, want_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ref_lse, want_lse, atol=1e-5, rtol=1e-5)
    return dict(name=request.param, ops=(q, k, v, sink), keep=keep, valid=valid, rules=rules,
                g=(g_out, g_lse), want=(want_out, want_lse), grads=ref_grads)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_out_lse_and_gradients_match_the_oracle(case, impl):
    q, k, v, sink = case["ops"]
    run = _value_and_vjp(IMPLS[impl], case["keep"], case["valid"], case["rules"], *case["g"])
    (out, lse), grads = run(q, k, v, sink)
    want_out, want_lse = case["want"]
    assert lse.dtype == jnp.float32 and lse.shape == (B, T, N)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5, err_msg=impl)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse), err_msg=impl)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5, err_msg=impl)
    if case["rules"].get("q_seg_BT") is None:
        assert np.all(np.isfinite(lse))  # a sink logit: no row is empty
    else:
        assert np.all(np.isneginf(np.asarray(lse))[SEG == 0])  # padding rows read nothing
        assert np.isneginf(np.asarray(lse)[:, 3]).all()  # the row whose blocks are all dropped
    for name, a, r in zip(("dq", "dk", "dv", "dsink"), grads, case["grads"], strict=True):
        if r is None:
            assert a is None
            continue
        assert np.all(np.isfinite(a)), f"{impl} {name}"
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(a, r, atol=1e-4 * scale, rtol=1e-4, err_msg=f"{impl} {name}")


def test_without_return_lse_the_output_alone():
    q, k, v, keep, sink, valid, *_ = _operands()
    for impl, fn in IMPLS.items():
        if impl == "tpu":  # same wrapper code as pallas; its interpret mode is the slowest
            continue
        kw = dict(block_k=BK, causal=True, sink=sink, key_valid_BS=valid)
        out, (out2, _) = jax.jit(lambda q, k, v, fn=fn, kw=kw: (
            fn(q, k, v, keep, **kw), fn(q, k, v, keep, return_lse=True, **kw)))(q, k, v)
        assert isinstance(out, jax.Array) and out.shape == (B, T, N, V), impl
        np.testing.assert_array_equal(out, out2, err_msg=impl)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_two_disjoint_passes_merged_equal_the_single_pass(impl):
    """A selection split into two disjoint block sets (the sink logit in the first pass only):
    the passes merged by ``merge_softmax_passes`` equal the single pass, outputs, lse and
    gradients in q, k, v and the sink; rows that every pass leaves empty stay finite."""
    q, k, v, keep, sink, valid, g_out, g_lse = _operands(1)
    split = jax.random.bernoulli(jax.random.key(7), 0.5, keep.shape)
    run = lambda keep_, sink_, q, k, v: core.block_sparse_attention(  # noqa: E731
        q, k, v, keep_, block_k=BK, causal=True, impl=impl, sink=sink_, key_valid_BS=valid,
        return_lse=True)

    def single(q, k, v, sink):
        return run(keep, sink, q, k, v)

    def merged(q, k, v, sink):
        o1, l1 = run(keep & split, sink, q, k, v)
        o2, l2 = run(keep & ~split, None, q, k, v)
        return core.merge_softmax_passes([o1, o2], [l1, l2])

    def merged_no_sink(q, k, v, sink):  # rows 3 read nothing in both passes: lse -inf
        o1, l1 = run(keep & split, None, q, k, v)
        o2, l2 = run(keep & ~split, None, q, k, v)
        return core.merge_softmax_passes([o1, o2], [l1, l2])

    def loss(fn):
        def f(q, k, v, sink):
            out, lse = fn(q, k, v, sink)
            return (out * g_out).sum() + (jnp.where(jnp.isfinite(lse), lse, 0.0) * g_lse).sum(), (
                out, lse)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    (g1, (o1, l1)), (g2, (o2, l2)) = (loss(fn)(q, k, v, sink) for fn in (single, merged))
    np.testing.assert_allclose(o2, o1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(l2, l1, atol=1e-5, rtol=1e-5)
    for name, a, r in zip(("dq", "dk", "dv", "dsink"), g2, g1, strict=True):
        np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4, err_msg=name)
    g3, (o3, l3) = loss(merged_no_sink)(q, k, v, sink)
    assert np.isneginf(np.asarray(l3)[:, 3]).all() and np.all(np.asarray(o3)[:, 3] == 0.0)
    assert all(np.all(np.isfinite(a)) for a in g3[:3])


def test_merge_softmax_passes_empty_rows_dtype_and_checks():
    """Rows empty in every pass: out 0, lse -inf, zero gradients (even with a loss that reads
    the -inf lse), no NaN; bf16 outputs stay bf16 with a float32 lse; mismatched passes are
    refused by name."""
    o1 = jnp.arange(12.0).reshape(1, 3, 1, 4) / 10
    o2 = -o1
    l1 = jnp.asarray([[[0.5], [-jnp.inf], [-jnp.inf]]])
    l2 = jnp.asarray([[[-1.0], [2.0], [-jnp.inf]]])
    out, lse = core.merge_softmax_passes([o1, o2], [l1, l2])
    w1 = np.exp(0.5) / (np.exp(0.5) + np.exp(-1.0))
    np.testing.assert_allclose(out[0, 0, 0], w1 * o1[0, 0, 0] + (1 - w1) * o2[0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], o2[0, 1], rtol=1e-6)
    np.testing.assert_allclose(lse[0, :2, 0], [np.logaddexp(0.5, -1.0), 2.0], rtol=1e-6)
    assert np.isneginf(lse[0, 2, 0]) and np.all(out[0, 2] == 0.0)

    def f(o1, o2, l1, l2):
        out, lse = core.merge_softmax_passes([o1, o2], [l1, l2])
        return out.sum() + lse.sum()  # -inf on the empty row: its cotangent is still 1

    grads = jax.grad(f, argnums=(0, 1, 2, 3))(o1, o2, l1, l2)
    assert all(np.all(np.isfinite(a)) for a in grads)
    assert all(np.all(np.asarray(a)[0, 2] == 0.0) for a in grads)
    out16, lse16 = core.merge_softmax_passes([o1.astype(jnp.bfloat16)] * 2, [l1, l2])
    assert out16.dtype == jnp.bfloat16 and lse16.dtype == jnp.float32
    with pytest.raises(ValueError, match="lses\\[1\\] must have shape"):
        core.merge_softmax_passes([o1, o2], [l1, l2[..., 0]])
    with pytest.raises(ValueError, match="one lse per output"):
        core.merge_softmax_passes([o1, o2], [l1])

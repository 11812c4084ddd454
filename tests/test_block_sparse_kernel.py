"""The block-sparse Pallas kernels (GPU-style and TPU, interpret mode) and the XLA block-gather
path equal the jnp reference: outputs and gradients, under jit and eagerly. (Lowering for the
accelerators: ``test_kernel_lowering.py``.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxpr_walk import jaxpr_shapes

from pallas_kernels.block_sparse import (
    BlockSizes,
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_attention_xla,
    build_tables,
    segment_block_keep,
    tile_visits,
)
from pallas_kernels.block_sparse.kernel import block_config, block_tables, checked_operands
from pallas_kernels.block_sparse.tpu import block_sparse_attention_tpu

# per-dtype tolerances: (output atol, gradient atol), relative to unit-scale inputs
TOL = {jnp.float32: (2e-5, 5e-5), jnp.bfloat16: (3e-2, 6e-2)}
HYPOTHESIS_EXAMPLES = 5  # derandomised: the same 5 examples on every run


def _inputs(b, t, s, n, kg, h, vw, bk, p, seed, dtype=jnp.float32, sink=False, valid=False):
    ks = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    k = jax.random.normal(ks[1], (b, s, kg, h), dtype)
    v = jax.random.normal(ks[2], (b, s, kg, vw), dtype)
    keep = jax.random.bernoulli(ks[3], p, (b, kg, t, -(-s // bk)))
    keep = keep.at[:, :, 0].set(False)  # a query row with no visible key
    sk = jax.random.normal(ks[4], (n,)) if sink else None
    kv = jax.random.bernoulli(ks[5], 0.8, (b, s)) if valid else None
    g = jax.random.normal(ks[6], (b, t, n, vw), dtype)
    return q, k, v, keep, sk, kv, g


def _check(b, t, s, n, kg, h, bk, bq, causal, p, seed, dtype=jnp.float32, sink=False,
           valid=False, impls=("pallas", "xla"), eager=False, **rules):
    """Every impl's output and gradients equal the reference's. ``eager``: the impls run op by
    op (no jit around them), as a user's first call does."""
    q, k, v, keep, sk, kv, g = _inputs(b, t, s, n, kg, h, h + 2, bk, p, seed, dtype, sink, valid)

    def run(fn, jit=True):
        def loss(q, k, v, sk):
            out = fn(q, k, v, keep, block_k=bk, causal=causal, sink=sk, key_valid_BS=kv, **rules)
            return (out.astype(jnp.float32) * g.astype(jnp.float32)).sum(), out
        argn = (0, 1, 2, 3) if sink else (0, 1, 2)
        # one jit per impl by default: op-by-op (eager) dispatch compiles every primitive
        # separately and is several times slower on CPU
        grad = jax.value_and_grad(loss, argnums=argn, has_aux=True)
        (_, out), grads = (jax.jit(grad) if jit else grad)(q, k, v, sk)
        return out, grads

    kern = lambda *a, **kw: block_sparse_attention(*a, block_sizes=BlockSizes(bq), **kw)  # noqa: E731
    xla = lambda *a, **kw: block_sparse_attention_xla(*a, block_q=bq, **kw)  # noqa: E731
    tpu = lambda *a, **kw: block_sparse_attention_tpu(*a, block_sizes=BlockSizes(bq), **kw)  # noqa: E731
    fns = {"pallas": kern, "xla": xla, "tpu": tpu}
    ref_out, ref_grads = run(block_sparse_attention_reference)
    atol, gtol = TOL[dtype]
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    for impl in impls:
        out, grads = run(fns[impl], jit=not eager)
        np.testing.assert_allclose(f32(out), f32(ref_out), atol=atol, rtol=atol, err_msg=impl)
        assert np.all(f32(out)[:, 0] == 0.0)  # the empty row
        for name, a, r in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads, strict=False):
            scale = max(1.0, float(np.abs(f32(r)).max()))
            np.testing.assert_allclose(f32(a), f32(r), atol=gtol * scale, err_msg=f"{impl} {name}")


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_reference_gqa_sink_padding(causal):
    _check(2, 37, 37, 4, 2, 8, 8, 16, causal, 0.4, 0, sink=True, valid=True)


def test_kernel_short_query_over_longer_keys_and_tiny_lengths():
    _check(1, 20, 33, 2, 1, 8, 8, 16, True, 0.5, 1, sink=True)  # causal offset S - T
    _check(1, 3, 3, 2, 2, 8, 8, 16, True, 1.0, 2)  # T smaller than one block / tile


def test_kernel_window_sink_keys_and_explicit_positions():
    # sliding window with sink keys (Delta's base) on a causal square problem
    _check(1, 29, 29, 4, 2, 8, 4, 8, True, 1.0, 4, window=5, num_sink_keys=3)
    # HCA's layout: 6 pooled entries (position (c + 1) * rate) before 24 raw tokens, a window on
    # the raw part only (the entries are the "sink" keys), one query per raw token
    rate, c, t = 4, 6, 24
    k_pos = jnp.concatenate([(jnp.arange(c) + 1) * rate, jnp.arange(t)])
    _check(1, t, c + t, 2, 1, 8, 4, 8, True, 1.0, 5, sink=True, q_pos_T=jnp.arange(t),
           k_pos_S=k_pos, window=3, num_sink_keys=c)


def test_tpu_kernel_matches_reference_in_interpret_mode():
    """The Mosaic variant under ``pltpu.InterpretParams()`` (which also checks its DMAs): GQA,
    sink, key validity, an empty row, T not a multiple of the tile; then the window rules."""
    _check(1, 40, 40, 4, 2, 8, 8, 32, True, 0.4, 0, sink=True, valid=True, impls=("tpu",))


@pytest.mark.parametrize("impl", ["pallas", "tpu"])
def test_kernels_run_eagerly_in_interpret_mode(impl):
    """Forward and backward called op by op, outside any jit: GQA, sink, key validity, an empty
    row, T not a multiple of the tile."""
    _check(1, 19, 19, 4, 2, 8, 8, 8 if impl == "pallas" else 32, True, 0.5, 12, sink=True,
           valid=True, impls=(impl,), eager=True)


def test_tpu_kernel_window_rules_bidirectional_bfloat16():
    _check(1, 29, 29, 2, 1, 8, 8, 32, False, 1.0, 4, dtype=jnp.bfloat16, window=5,
           num_sink_keys=3, impls=("tpu",))


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_check_grads_against_finite_differences(impl):
    """``jax.test_util.check_grads``: the custom VJPs agree with numerical derivatives."""
    from jax.test_util import check_grads

    q, k, v, keep, sk, kv, _ = _inputs(1, 11, 11, 2, 1, 4, 4, 4, 0.6, 7, sink=True, valid=True)
    fn = dict(pallas=lambda *a, **kw: block_sparse_attention(*a, block_sizes=BlockSizes(8), **kw),
              xla=lambda *a, **kw: block_sparse_attention_xla(*a, block_q=8, **kw))[impl]
    check_grads(jax.jit(lambda q, k, v, sk: fn(q, k, v, keep, block_k=4, causal=True, sink=sk,
                                               key_valid_BS=kv)),
                (q, k, v, sk), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_kernel_bfloat16():
    _check(1, 24, 24, 4, 2, 16, 8, 8, True, 0.5, 3, dtype=jnp.bfloat16)


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True)
@given(t=st.integers(1, 40), kv_ratio=st.sampled_from([1, 2, 4]), bk=st.sampled_from([4, 8]),
       causal=st.booleans(), p=st.sampled_from([0.2, 0.6, 1.0]), seed=st.integers(0, 99))
def test_kernel_matches_reference_hypothesis(t, kv_ratio, bk, causal, p, seed):
    _check(1, t, t, 4, 4 // kv_ratio, 8, bk, 8, causal, p, seed)


def test_tables_list_exactly_the_visited_blocks():
    keep = jax.random.bernoulli(jax.random.key(0), 0.3, (2, 2, 21, 6))
    fwd, bwd = build_tables(keep, block_q=8, block_k=4, causal=True)
    visit = np.asarray(tile_visits(keep, block_q=8, block_k=4, causal=True))
    ref = np.pad(np.asarray(keep), ((0, 0), (0, 0), (0, 3), (0, 0))).reshape(2, 2, 3, 8, 6).any(3)
    last_q = np.minimum((np.arange(3) + 1) * 8, 21) - 1
    ref &= np.arange(6)[None, :] * 4 <= last_q[:, None]
    np.testing.assert_array_equal(visit, ref)
    fwd, bwd = np.asarray(fwd), np.asarray(bwd)
    for idx in np.ndindex(2, 2, 3):
        count, row = fwd[idx][0], fwd[idx][1:]
        np.testing.assert_array_equal(row[:count], np.flatnonzero(ref[idx]))
        if count:
            assert np.all(row[count:] == row[count - 1])  # padding repeats the last block
    for idx in np.ndindex(2, 2, 6):
        count, row = bwd[idx][0], bwd[idx][1:]
        np.testing.assert_array_equal(row[:count], np.flatnonzero(ref[idx[0], idx[1], :, idx[2]]))


def test_selection_shape_is_checked():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"block_keep must have shape .*\(1, 1, 8, 2\)"):
        block_sparse_attention(q, jnp.zeros((1, 8, 1, 4)), jnp.zeros((1, 8, 1, 4)),
                               jnp.ones((1, 1, 8, 3), bool), block_k=4, causal=True)


# ----------------------------------------------------------------------------- packed sequences
# Three rows of 22 tokens: segments not aligned to the key blocks (4) or query tiles (8) with
# padding (id 0) at the end; padding in the middle; a row that is padding only. Sink flags on
# each segment's first token (DeltaAttention's per-segment sinks).
SEG = np.array([[1] * 7 + [2] * 9 + [0] * 6,
                [3] * 5 + [0] * 3 + [4] * 10 + [5] * 4,
                [0] * 22], np.int32)
SINK_KEYS = np.zeros(SEG.shape, bool)
SINK_KEYS[0, [0, 7]] = SINK_KEYS[1, [0, 8, 18]] = True


def _oracle(q, k, v, keep, bk, causal, sink, valid, seg, window=None, num_sink_keys=0,
            k_sink=None):
    """Masked dense softmax attention written out with numpy loops: the block-sparse rules plus
    the packed-sequence rule, on float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, h = q.shape
    s, kg = k.shape[1], k.shape[2]
    out = np.zeros((b, t, n, v.shape[-1]))
    for bi, ti, ni in np.ndindex(b, t, n):
        ki = ni // (n // kg)
        allowed = []
        for si in range(s):
            ok = bool(keep[bi, ki, ti, si // bk]) and (valid is None or bool(valid[bi, si]))
            ok = ok and seg[bi, si] == seg[bi, ti] and seg[bi, si] != 0
            if causal:
                ok = ok and si <= ti + s - t
            if window is not None:
                is_sink = si < num_sink_keys or (k_sink is not None and k_sink[bi, si])
                ok = ok and (is_sink or si > ti + s - t - window)
            if ok:
                allowed.append(si)
        logits = np.array([q[bi, ti, ni] @ k[bi, si, ki] * h ** -0.5 for si in allowed])
        extra = [] if sink is None else [float(sink[ni])]
        top = max([*logits, *extra]) if len(logits) or extra else 0.0
        e = np.exp(logits - top)
        den = e.sum() + sum(np.exp(x - top) for x in extra)
        if len(allowed):
            out[bi, ti, ni] = (e[:, None] * v[bi, allowed, ki]).sum(0) / den
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_reference_with_segments_equals_a_hand_written_oracle(causal):
    q, k, v, keep, sk, kv, _ = _inputs(3, 22, 22, 4, 2, 8, 6, 4, 0.7, 21, sink=True, valid=True)
    rules = {} if causal else dict(window=5, num_sink_keys=1, k_sink_BS=jnp.asarray(SINK_KEYS))
    out = block_sparse_attention_reference(q, k, v, keep, block_k=4, causal=causal, sink=sk,
                                           key_valid_BS=kv, q_seg_BT=jnp.asarray(SEG),
                                           k_seg_BS=jnp.asarray(SEG), **rules)
    want = _oracle(q, k, v, keep, 4, causal, sk, kv, SEG, rules.get("window"),
                   rules.get("num_sink_keys", 0), SINK_KEYS if rules else None)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(out)[SEG == 0] == 0.0)  # padding queries read nothing


def _packed_check(impls, causal, seed, **rules):
    """Every impl equals the reference with segments: outputs, and gradients in q, k, v and the
    sink logit; NaN in padding queries and keys (id 0) reaches nothing."""
    bq, bk = 8, 4
    q, k, v, keep, sk, kv, g = _inputs(3, 22, 22, 4, 2, 8, 6, bk, 0.7, seed, sink=True,
                                       valid=True)
    pad = jnp.asarray(SEG == 0)[:, :, None, None]
    q, k, v = (jnp.where(pad, jnp.nan, a) for a in (q, k, v))
    seg = dict(q_seg_BT=jnp.asarray(SEG), k_seg_BS=jnp.asarray(SEG), **rules)
    fns = {"reference": block_sparse_attention_reference,
           "pallas": lambda *a, **kw: block_sparse_attention(*a, block_sizes=BlockSizes(bq), **kw),
           "xla": lambda *a, **kw: block_sparse_attention_xla(*a, block_q=bq, **kw),
           "tpu": lambda *a, **kw: block_sparse_attention_tpu(*a, block_sizes=BlockSizes(32),
                                                              **kw)}

    def run(name):
        def loss(q, k, v, sk):
            out = fns[name](q, k, v, keep, block_k=bk, causal=causal, sink=sk, key_valid_BS=kv,
                            **seg)
            return (out * g).sum(), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
            q, k, v, sk)
        return np.asarray(out), [np.asarray(a) for a in grads]

    ref_out, ref_grads = run("reference")
    assert np.all(np.isfinite(ref_out)) and np.all(ref_out[SEG == 0] == 0.0)
    for name in impls:
        out, grads = run(name)
        np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5, err_msg=name)
        for what, a, r in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads, strict=True):
            assert np.all(np.isfinite(a)), f"{name} {what}"
            np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4, err_msg=f"{name} {what}")
        for a in grads[:3]:
            assert np.all(a[SEG == 0] == 0.0)  # padding inputs: exactly zero gradient


def test_impls_match_reference_with_segments_causal():
    _packed_check(("xla", "pallas", "tpu"), True, 22)


def test_impls_match_reference_with_segments_window_and_segment_sinks():
    _packed_check(("xla", "pallas", "tpu"), False, 23, window=5, num_sink_keys=1,
                  k_sink_BS=jnp.asarray(SINK_KEYS))


def test_tables_skip_the_key_blocks_of_other_segments():
    """The op removes from the selection every key block without a key of the query's segment
    (exactly, for ids that do not decrease; a superset otherwise), so its tables visit fewer
    blocks: checked on the selection and tables every impl builds (``checked_operands``)."""
    keep = jnp.ones((3, 2, 22, 6), bool)  # everything selected
    q = k = jnp.zeros((3, 22, 2, 4))
    seg = jnp.asarray(SEG)
    has = np.zeros((3, 22, 6), bool)  # token-level truth: block j holds a key of t's segment
    for bi, ti, si in np.ndindex(3, 22, 22):
        has[bi, ti, si // 4] |= SEG[bi, ti] != 0 and SEG[bi, si] == SEG[bi, ti]
    plain = checked_operands(q, k, keep, None, None, None, block_k=4)
    packed = checked_operands(q, k, keep, None, None, None, block_k=4, q_seg_BT=seg,
                              k_seg_BS=seg)
    np.testing.assert_array_equal(np.asarray(packed.keep), np.asarray(keep) & has[:, None])
    cfg = block_config(q, k, block_q=8, block_k=4, causal=True, scale=None, interpret=True,
                       window=None, num_sink_keys=0, precision=None, segments=True)
    (fwd0, _), (fwd1, bwd1) = block_tables(plain, cfg), block_tables(packed, cfg)
    visits0, visits1 = np.asarray(fwd0[..., 0]), np.asarray(fwd1[..., 0])
    assert visits1.sum() < visits0.sum() and np.all(visits1 <= visits0)
    assert np.all(visits1[2] == 0) and np.all(np.asarray(bwd1[2, ..., 0]) == 0)  # padding row
    # row 0, tile 0 (tokens 0-7, segments 1 and 2): blocks 0-1 hold segment 1 and blocks 1-3
    # segment 2; causal cuts blocks after token 7: blocks 0 and 1 only
    np.testing.assert_array_equal(np.asarray(fwd1[0, 0, 0, :3]), [2, 0, 1])
    # ids that decrease (3 after 4) keep a superset, never dropping a block a query reads
    shuffled = jnp.asarray([[4, 4, 3, 0, 3, 4, 1, 1]], jnp.int32)
    got = np.asarray(segment_block_keep(jnp.ones((1, 1, 8, 2), bool), shuffled, shuffled,
                                        block_k=4))[0, 0]
    truth = np.array([[(np.asarray(shuffled[0, j * 4:(j + 1) * 4]) == x).any() and x != 0
                       for j in range(2)] for x in np.asarray(shuffled[0])])
    assert np.all(got >= truth) and not got[3].any()  # the padding query reads nothing


def test_no_sequence_by_sequence_array_with_segments():
    """With segments and per-key sinks, the xla and Pallas paths (forward and backward, kernel
    bodies included) hold no array with two sequence axes; the reference does (check can fail)."""
    t, s, bk = 64, 72, 8
    q = jnp.zeros((1, t, 2, 4))
    k = v = jnp.zeros((1, s, 1, 4))
    keep = jnp.ones((1, 1, t, s // bk), bool)
    seg_q = jnp.ones((1, t), jnp.int32)
    seg_k, sinks = jnp.ones((1, s), jnp.int32), jnp.zeros((1, s), bool)
    fns = {"xla": lambda *a, **kw: block_sparse_attention_xla(*a, block_q=8, **kw),
           "pallas": lambda *a, **kw: block_sparse_attention(*a, block_sizes=BlockSizes(8), **kw),
           "tpu": lambda *a, **kw: block_sparse_attention_tpu(*a, block_sizes=BlockSizes(32),
                                                              **kw),
           "reference": block_sparse_attention_reference}
    for name, fn in fns.items():
        def loss(q, k, v, fn=fn):
            return fn(q, k, v, keep, block_k=bk, causal=True, window=16, q_seg_BT=seg_q,
                      k_seg_BS=seg_k, k_sink_BS=sinks).sum()
        shapes = list(jaxpr_shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
                                   .jaxpr))
        bad = [x for x in shapes if sum(d >= t for d in x) >= 2]
        assert shapes and (bool(bad) == (name == "reference")), (name, bad)


def test_segment_arguments_are_checked():
    q = jnp.zeros((2, 8, 2, 4))
    k = jnp.zeros((2, 12, 1, 4))
    keep = jnp.ones((2, 1, 8, 3), bool)
    seg_q, seg_k = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 12), jnp.int32)
    for fn in (block_sparse_attention, block_sparse_attention_reference,
               block_sparse_attention_xla, block_sparse_attention_tpu):
        call = lambda fn=fn, **kw: fn(q, k, k, keep, block_k=4, causal=True, **kw)  # noqa: E731
        with pytest.raises(ValueError, match="both or neither.*k_seg_BS=None"):
            call(q_seg_BT=seg_q)
        with pytest.raises(ValueError, match=r"k_seg_BS must have shape \(2, 12\).*\(2, 8\)"):
            call(q_seg_BT=seg_q, k_seg_BS=seg_q)
        with pytest.raises(ValueError, match=r"q_seg_BT must have shape \(2, 8\).*\(1, 8\)"):
            call(q_seg_BT=seg_q[:1], k_seg_BS=seg_k)
        with pytest.raises(TypeError, match="q_seg_BT must be an integer array, got dtype float32"):
            call(q_seg_BT=seg_q.astype(jnp.float32), k_seg_BS=seg_k)
        with pytest.raises(ValueError, match=r"k_sink_BS must have shape \(2, 12\)"):
            call(k_sink_BS=jnp.zeros((2, 8), bool), window=2)


def test_core_op_hands_segments_to_every_impl():
    """``core.block_sparse_attention`` passes the packed-sequence arguments through the registry:
    its own reference (``dot_product_attention`` on the token membership) and the xla impl
    equal this package's reference; a lone segment argument is refused."""
    from attnhut_jax import core

    q, k, v, keep, sk, kv, _ = _inputs(3, 22, 22, 4, 2, 8, 6, 4, 0.7, 24, sink=True, valid=True)
    kw = dict(block_k=4, causal=True, sink=sk, key_valid_BS=kv, window=5, num_sink_keys=1,
              q_seg_BT=jnp.asarray(SEG), k_seg_BS=jnp.asarray(SEG),
              k_sink_BS=jnp.asarray(SINK_KEYS))
    want = np.asarray(block_sparse_attention_reference(q, k, v, keep, **kw))
    for impl in ("reference", "xla"):
        got = jax.jit(lambda q, k, v, impl=impl: core.block_sparse_attention(
            q, k, v, keep, impl=impl, **kw))(q, k, v)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=impl)
    with pytest.raises(ValueError, match="both or neither"):
        core.block_sparse_attention(q, k, v, keep, block_k=4, causal=True, impl="reference",
                                    q_seg_BT=jnp.asarray(SEG))

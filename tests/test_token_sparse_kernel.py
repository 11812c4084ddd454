"""Token-sparse attention (Pallas GPU and TPU kernels in interpret mode, XLA path) equals the
jnp reference in outputs and gradients, under jit and eagerly; every indexer top-k (the XLA
running top-k, the Pallas radix select) selects the keys of ``lax.top_k`` on the full float32
scores, ties included, in float32 and bfloat16, also at XLA's default optimisation level.
(Lowering for the accelerators: ``test_kernel_lowering.py``.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxpr_walk import jaxpr_shapes

from pallas_kernels.token_sparse import (
    IndexerBlocks,
    indexer_topk,
    indexer_topk_reference,
    token_keep,
    token_sparse_attention_reference,
    token_sparse_attention_xla,
)
from pallas_kernels.token_sparse.indexer_kernel import IndexerKernelBlocks, indexer_topk_pallas
from pallas_kernels.token_sparse.kernel import BlockSizes, token_sparse_attention
from pallas_kernels.token_sparse.kernel_tpu import TpuBlockSizes, token_sparse_attention_tpu
from pallas_kernels.token_sparse.tables import build_tables, key_bitmask, tile_visits

# per-dtype tolerances: (output atol, gradient atol), relative to unit-scale inputs
TOL = {jnp.float32: (2e-5, 5e-5), jnp.bfloat16: (3e-2, 6e-2)}
HYPOTHESIS_EXAMPLES = 5  # derandomised: the same 5 examples on every run

IMPLS = {
    "pallas": lambda *a, **kw: token_sparse_attention(*a, block_sizes=BlockSizes(8, 1), **kw),
    # two key prefixes, and a prefix only while it is at most 4 * M keys: tiles whose
    # selections reach past it take the row-gather branch, so one run covers both branches
    "xla": lambda *a, **kw: token_sparse_attention_xla(*a, block_q=8, num_ranges=2, min_range=1,
                                                       dense_factor=4, **kw),
}


def _selection(key, b, t, s, m, p_empty=0.2, causal=False):
    """(B, T, M) distinct indices per row (a random subset of the allowed keys), some -1."""
    k1, k2 = jax.random.split(key)
    scores = jax.random.uniform(k1, (b, t, s))
    if causal:
        scores = jnp.where(jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t), scores, -1)
    vals, idx = jax.lax.top_k(scores, min(m, s))
    idx = jnp.where((vals < 0) | jax.random.bernoulli(k2, p_empty, idx.shape), -1, idx)
    return idx.astype(jnp.int32)


def _inputs(b, t, s, n, kg, h, m, seed, dtype=jnp.float32, shared=False, causal=False,
            p_empty=0.2):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    k = jax.random.normal(ks[1], (b, s, kg, h), dtype)
    v = None if shared else jax.random.normal(ks[2], (b, s, kg, h + 2), dtype)
    idx = _selection(ks[3], b, t, s, m, p_empty, causal)
    sink = jax.random.normal(ks[4], (n,))
    g = jax.random.normal(ks[5], (b, t, n, h if shared else h + 2), dtype)
    return q, k, v, idx, sink, g


def _run(fn, q, k, v, idx, sink, g, jit=True, **kw):
    """Output and gradients (q, k, v, sink where given) of <out, g>, in one jit (or op by op)."""
    def loss(q, k, v, sk):
        out = fn(q, k, v, idx, sink=sk, **kw)
        return (out.astype(jnp.float32) * g.astype(jnp.float32)).sum(), out

    argnums = tuple(i for i, a in enumerate((q, k, v, sink)) if a is not None)
    grad = jax.value_and_grad(loss, argnums=argnums, has_aux=True)
    (_, out), grads = (jax.jit(grad) if jit else grad)(q, k, v, sink)
    return out, grads


def _check(b, t, s, n, kg, h, m, seed, *, dtype=jnp.float32, shared=False, sink=True,
           impls=tuple(IMPLS), causal=False, p_empty=0.2, empty_row=None, eager=False,
           zero_rows=None, cotangent_rows=None, foreign_keys=None, **rules):
    """Every impl's output and gradients equal the reference's; ``empty_row``: that query
    reads nothing (no selection, no window) and must come out exactly zero (``zero_rows``:
    a (B, T) bool mask of such queries); ``eager``: the impls run op by op, outside any jit.
    ``cotangent_rows`` (B, T) bool: the output cotangent is zero elsewhere, and the keys of
    ``foreign_keys`` (B, S) bool (which those rows may not read) get exactly zero dK, dV."""
    q, k, v, idx, sk, g = _inputs(b, t, s, n, kg, h, m, seed, dtype, shared, causal, p_empty)
    if cotangent_rows is not None:
        g = jnp.where(jnp.asarray(cotangent_rows)[:, :, None, None], g, 0)
    if empty_row is not None:
        idx = idx.at[:, empty_row].set(-1)
    sk = sk if sink else None
    ref_out, ref_grads = _run(token_sparse_attention_reference, q, k, v, idx, sk, g, **rules)
    atol, gtol = TOL[dtype]
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    for name in impls:
        fn = IMPLS[name] if isinstance(name, str) else name
        out, grads = _run(fn, q, k, v, idx, sk, g, jit=not eager, **rules)
        np.testing.assert_allclose(f32(out), f32(ref_out), atol=atol, rtol=atol, err_msg=str(name))
        if empty_row is not None:
            assert np.all(f32(out)[:, empty_row] == 0.0), name
        if zero_rows is not None:
            assert np.all(f32(out)[zero_rows] == 0.0), name
        if foreign_keys is not None:
            for d in grads[1:3 - shared]:  # dK (and dV)
                assert np.all(f32(d)[foreign_keys] == 0.0), name
        for a, r in zip(grads, ref_grads, strict=True):
            assert np.all(np.isfinite(f32(a))), name
            scale = max(1.0, float(np.abs(f32(r)).max()))
            np.testing.assert_allclose(f32(a), f32(r), atol=gtol * scale, err_msg=str(name))
    return ref_out


def test_gqa_sink_padding_and_an_empty_row():
    # T = 37 is not a multiple of the 8-query tile or of the key blocks; row 3 reads nothing
    _check(2, 37, 37, 4, 2, 8, 5, 0, sink=False, empty_row=3)
    _check(1, 37, 37, 4, 2, 8, 5, 11, impls=("pallas",))  # with the sink


def test_top_k_at_least_t_and_top_k_one():
    _check(1, 13, 13, 4, 1, 8, 40, 2, causal=False, p_empty=0.0)  # M > S: every key (bidir)
    _check(1, 19, 19, 2, 2, 8, 1, 3, causal=True, sink=False)


def test_csa_layout_window_longer_than_sequence_and_empty_prefix():
    # keys = [C compressed entries | T raw tokens], values are the keys, a window on the raw part
    c, t = 5, 21
    rules = dict(window=4, window_start=c)
    _check(1, t, c + t, 4, 1, 8, 3, 4, shared=True, **rules)
    # window >= T, and no compressed entry selected at all (as before the first is visible)
    _check(1, 7, 1 + 7, 2, 1, 8, 1, 6, shared=True, p_empty=1.0, window=100, window_start=1)


def test_selected_keys_inside_the_window_are_read_once():
    c, t = 0, 12
    q, k, v, _, sk, g = _inputs(1, t, c + t, 2, 1, 8, 3, 7, shared=True)
    idx = jnp.broadcast_to(jnp.maximum(jnp.arange(t)[:, None] - jnp.arange(3)[None, :], -1),
                           (1, t, 3)).astype(jnp.int32)  # the 3 latest keys: all in the window
    ref = token_sparse_attention_reference(q, k, None, idx, sink=sk, window=4)
    win_only = token_sparse_attention_reference(q, k, None, jnp.full_like(idx, -1), sink=sk,
                                                window=4)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(win_only), atol=1e-6)
    for fn in IMPLS.values():
        out = jax.jit(lambda q, k, sk, fn=fn: fn(q, k, None, idx, sink=sk, window=4))(q, k, sk)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)


def test_bfloat16():
    # (the XLA path computes in float32 whatever the input dtype)
    _check(1, 24, 24, 4, 2, 16, 6, 8, dtype=jnp.bfloat16, impls=("pallas",))


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True)
@given(t=st.integers(1, 40), m_rel=st.sampled_from([1, 3, "T", "T+5"]),
       kv_ratio=st.sampled_from([1, 2, 4]), causal=st.booleans(),
       window=st.sampled_from([None, 1, 5, 64]), seed=st.integers(0, 99))
def test_kernels_match_reference_hypothesis(t, m_rel, kv_ratio, causal, window, seed):
    m = {"T": t, "T+5": t + 5}.get(m_rel, m_rel)
    if window is None:
        _check(1, t, t, 4, 4 // kv_ratio, 8, m, seed, causal=causal)
    else:  # CSA layout: 3 entries before the raw tokens, shared K/V, one kv head
        _check(1, t, 3 + t, 4, 1, 8, min(m, 3), seed, shared=True, window=window, window_start=3)


def test_tpu_kernel_interpret_matches_reference():
    """The Mosaic kernel under ``pltpu.InterpretParams`` (TPU semantics simulated on CPU)."""
    # GQA, separate V, sink, a window after 4 leading keys, T not a multiple of the tile
    _check(1, 19, 4 + 19, 4, 2, 8, 3, 9, window=5, window_start=4, impls=(TPU_KERNEL,))


TPU_KERNEL = lambda *a, **kw: token_sparse_attention_tpu(  # noqa: E731
    *a, block_sizes=TpuBlockSizes(16, 1), **kw)


@pytest.mark.parametrize("impl", ["pallas", "tpu"])
def test_kernels_run_eagerly_in_interpret_mode(impl):
    """Forward and backward op by op, outside any jit: GQA, sink, a window after 4 leading keys,
    T not a multiple of the tile."""
    _check(1, 11, 4 + 11, 4, 2, 8, 3, 13, window=3, window_start=4,
           impls=(IMPLS["pallas"] if impl == "pallas" else TPU_KERNEL,), eager=True)


# ----------------------------------------------------------------------------- tables


def test_bitmask_and_tables_list_exactly_the_read_blocks():
    b, t, s, m, bq, wpb = 2, 21, 150, 7, 8, 1
    idx = _selection(jax.random.key(0), b, t, s, m)
    bits = np.asarray(key_bitmask(idx, s))
    assert bits.shape == (b, t, 5)
    dense = np.zeros((b, t, s), bool)
    for bi, ti, mi in np.ndindex(*idx.shape):
        if idx[bi, ti, mi] >= 0:
            dense[bi, ti, idx[bi, ti, mi]] = True
    unpacked = ((bits[..., None] >> np.arange(32)) & 1).astype(bool).reshape(b, t, -1)[..., :s]
    np.testing.assert_array_equal(unpacked, dense)
    window, start = 3, 100
    visit = np.asarray(tile_visits(jnp.asarray(bits), t=t, s=s, block_q=bq, words_per_block=wpb,
                                   window=window, window_start=start))
    raw = np.arange(s)[None, :] - start
    win = (raw >= 0) & (raw <= np.arange(t)[:, None]) & (raw > np.arange(t)[:, None] - window)
    read = np.pad(dense | win[None], ((0, 0), (0, 3), (0, 10))).reshape(b, 3, bq, 5, 32)
    np.testing.assert_array_equal(visit, read.any(axis=(2, 4)))
    fwd, bwd = (np.asarray(a) for a in build_tables(jnp.asarray(bits), t=t, s=s, block_q=bq,
                                                   words_per_block=wpb, window=window,
                                                   window_start=start))
    for bi, qi in np.ndindex(b, 3):
        count, row = fwd[bi, qi, 0], fwd[bi, qi, 1:]
        np.testing.assert_array_equal(row[:count], np.flatnonzero(visit[bi, qi]))
    for bi, ji in np.ndindex(b, 5):
        count, row = bwd[bi, ji, 0], bwd[bi, ji, 1:]
        np.testing.assert_array_equal(row[:count], np.flatnonzero(visit[bi, :, ji]))


def test_tables_skip_window_blocks_of_other_segments():
    """With segment ids a window block is listed only for tiles whose segments it holds keys
    of: here exactly the (tile, block) pairs that some query reads (segments aligned to the
    tiles), all-padding tiles and blocks listed nowhere; selections of other segments are
    dropped by ``segment_indices`` before the bitmask."""
    from pallas_kernels.token_sparse.tables import segment_indices

    t, bq, window = 64, 8, 8
    seg = np.array([[1] * 32 + [2] * 24 + [0] * 8, [3] * 16 + [0] * 16 + [4] * 32], np.int32)
    idx = _selection(jax.random.key(3), 2, t, t, 4, p_empty=0.0)
    q_seg = k_seg = jnp.asarray(seg)
    kept = segment_indices(idx, q_seg, k_seg)
    assert np.any(np.asarray(kept) == -1) and np.any(np.asarray(kept) >= 0)
    bits = key_bitmask(kept, t)
    visit = np.asarray(tile_visits(bits, t=t, s=t, block_q=bq, words_per_block=1, window=window,
                                   q_seg_BT=q_seg, k_seg_BS=k_seg))
    keep = np.asarray(token_keep(idx, t, window=window, q_seg_BT=q_seg, k_seg_BS=k_seg))
    np.testing.assert_array_equal(visit, keep.reshape(2, 8, bq, 2, 32).any(axis=(2, 4)))
    assert not visit[0, 7].any() and not visit[1, 2:4].any()  # padding tiles
    assert visit[0, 4, 1] and not visit[0, 4, 0]  # segment 2's window stops at its start


def test_selection_shape_is_checked():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"indices must have shape \(B, T, M\)"):
        token_sparse_attention(q, jnp.zeros((1, 8, 1, 4)), None, jnp.zeros((1, 7, 2), jnp.int32))


# ----------------------------------------------------------------------------- fused top-k


def _int_indexer(seed, b, t, s, ni, e, lo=-2, hi=3):
    """Integer-valued operands: every score is an exact small integer, so any summation order
    gives the same bits, ReLU zeros and repeated values make many exact ties."""
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.randint(ks[0], (b, t, ni, e), lo, hi).astype(jnp.float32)
    k = jax.random.randint(ks[1], (b, s, e), lo, hi).astype(jnp.float32)
    w = jax.random.randint(ks[2], (b, t, ni), lo, hi).astype(jnp.float32)
    return q, k, w


@pytest.mark.parametrize("causal", [True, False])
def test_fused_topk_equals_lax_top_k_on_full_scores_with_ties(causal):
    q, k, w = _int_indexer(0, 2, 45, 45, 3, 4)
    blocks = IndexerBlocks(block_q=8, block_k=16, num_ranges=3, min_range=1)  # tiles, prefixes
    for top_k in (1, 5, 100):
        ref_i, ref_v = indexer_topk_reference(q, k, w, top_k, causal=causal)
        got_i, got_v = indexer_topk(q, k, w, top_k, causal=causal, blocks=blocks)
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(ref_i), err_msg=str(top_k))
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(ref_v))
    # the k-th score is really tied in many rows, so the tie rule decides
    s = np.asarray(jax.jit(lambda: indexer_topk_reference(q, k, w, 45, causal=causal)[1])())
    assert (s[..., 4:5] == s[..., 5:6]).mean() > 0.3


def test_fused_topk_tie_rule_lower_index_first_and_invalid_picks():
    # one query head, one key width: scores = w * relu(q * k); keys 1..4 tie at 2, key 0 wins
    k = jnp.asarray([[[3.0], [2.0], [2.0], [2.0], [2.0], [-1.0]]])
    q = jnp.ones((1, 6, 1, 1))
    w = jnp.ones((1, 6, 1))
    idx, vals = indexer_topk(q, k, w, 3, causal=True, blocks=IndexerBlocks(2, 2, 2, 1))
    np.testing.assert_array_equal(np.asarray(idx)[0], [[0, -1, -1], [0, 1, -1], [0, 1, 2],
                                                       [0, 1, 2], [0, 1, 2], [0, 1, 2]])
    fill = np.finfo(np.float32).min
    np.testing.assert_array_equal(np.asarray(vals)[0, 0], [3.0, fill, fill])


def test_fused_topk_with_compressed_entry_positions():
    # CSA: entry c is at position (c + 1) * rate and valid for query t once that is <= t
    q, k, w = _int_indexer(1, 1, 30, 8, 2, 4)
    rate = 4
    kw = dict(causal=True, q_pos_T=jnp.arange(30), k_pos_S=(jnp.arange(8) + 1) * rate)
    ref_i, _ = indexer_topk_reference(q, k, w, 3, **kw)
    got_i, _ = indexer_topk(q, k, w, 3, blocks=IndexerBlocks(8, 4, 2, 1), **kw)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(ref_i))
    assert np.all(np.asarray(ref_i)[0, :rate] == -1)  # nothing visible yet: the empty prefix


def test_pallas_indexer_kernel_selects_the_same_sets():
    """Radix-select kernel (interpret mode): the set of ``lax.top_k`` (in key order)."""
    q, k, w = _int_indexer(2, 1, 37, 37, 3, 4)
    blocks = IndexerKernelBlocks(block_q=8, block_k=16)
    # causal: early rows have fewer valid keys than top_k; many rows tie at the k-th score
    ref_i, ref_v = indexer_topk_reference(q, k, w, 5, causal=True)
    got_i, got_v = jax.jit(lambda q, k, w: indexer_topk_pallas(q, k, w, 5, causal=True,
                                                               blocks=blocks))(q, k, w)
    _assert_same_sets(got_i, got_v, ref_i, ref_v)
    ok = np.asarray(got_i) >= 0
    assert np.all(np.diff(np.where(ok, np.asarray(got_i), 10 ** 6), axis=-1) >= 0)  # key order
    s = np.asarray(ref_v)
    assert (s[..., 4] == s[..., 3]).mean() > 0.3  # the tie rule is exercised


@pytest.mark.parametrize("causal", [True, False])
def test_stored_scores_select_what_the_fused_kernel_selects(causal):
    """The two-kernel path (scores stored once per chunk of query tiles, the radix passes read
    them) gives the fused kernel's indices and scores exactly: packed rows with padding, a
    last chunk padded with tiles that walk nothing, one chunk and several."""
    q, k, w = _int_indexer(7, 2, 45, 45, 4, 8)
    seg = jnp.asarray([[1] * 20 + [2] * 22 + [0] * 3, [3] * 45], jnp.int32)
    kw = dict(causal=causal, q_seg_BT=seg, k_seg_BS=seg)
    want = indexer_topk_pallas(q, k, w, 7, blocks=IndexerKernelBlocks(8, 16), **kw)
    ref_i, ref_v = indexer_topk_reference(q, k, w, 7, **kw)
    _assert_same_sets(*want, ref_i, ref_v)
    for mib in (1.0, 8 / 1024, 1 / 1024):  # 1 chunk; 2 tiles (2 x 8 rows x 48 keys x 4 B x B)
        got = jax.jit(lambda q, k, w, mib=mib: indexer_topk_pallas(
            q, k, w, 7, blocks=IndexerKernelBlocks(8, 16, score_buffer_mib=mib), **kw))(q, k, w)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{mib} MiB")


def test_pallas_indexer_kernel_runs_eagerly():
    """The radix-select kernel called op by op (no jit), bidirectional: the reference's sets."""
    q, k, w = _int_indexer(4, 1, 21, 21, 2, 4)
    got_i, got_v = indexer_topk_pallas(q, k, w, 4, causal=False,
                                       blocks=IndexerKernelBlocks(block_q=8, block_k=16))
    _assert_same_sets(got_i, got_v, *indexer_topk_reference(q, k, w, 4, causal=False))


def _assert_same_sets(got_i, got_v, ref_i, ref_v, msg="", score_rtol=0.0):
    """Each row selects the same keys (in any column order), with the same scores (bit for bit
    unless ``score_rtol``)."""
    np.testing.assert_array_equal(np.sort(np.asarray(got_i), -1), np.sort(np.asarray(ref_i), -1),
                                  err_msg=msg)
    np.testing.assert_allclose(np.sort(np.asarray(got_v), -1), np.sort(np.asarray(ref_v), -1),
                               rtol=score_rtol, atol=0, err_msg=msg)


INDEXERS = {
    "xla": lambda *a, **kw: indexer_topk(*a, blocks=IndexerBlocks(8, 16, 3, 1), **kw),
    "pallas": lambda *a, **kw: indexer_topk_pallas(*a, blocks=IndexerKernelBlocks(8, 16), **kw),
    # scores stored once, in chunks of 2 query tiles (a 4 KiB buffer): the selection passes
    # read them instead of recomputing
    "pallas_stored": lambda *a, **kw: indexer_topk_pallas(
        *a, blocks=IndexerKernelBlocks(8, 16, score_buffer_mib=4 / 1024), **kw),
}


def indexers_select_the_same_keys(seed: int = 5) -> None:
    """Every indexer impl selects the reference's keys, for float32 and bfloat16 operands.

    Integer-valued operands: every score is exact in float32 whatever the order of the sums, and
    many rows tie at the k-th place, so the tie rule decides; the scores must agree bit for bit.
    Random normal operands: all impls rank float32 scores (bf16 operands are upcast, or
    multiplied exactly with float32 accumulation in the Pallas kernel), which may differ in the
    last bit with the order of a product's sums; the selections agree, the scores to 1e-6.
    Runs in this process and, by ``test_selections_agree_at_default_xla_optimisation``, in one
    at XLA's default optimisation level.
    """
    ks = jax.random.split(jax.random.key(seed), 3)
    normal = tuple(jax.random.normal(kk, shape) for kk, shape in
                   zip(ks, ((1, 37, 3, 8), (1, 37, 8), (1, 37, 3)), strict=True))
    cases = (("normal", normal, 1e-6), ("ties", _int_indexer(seed, 1, 37, 37, 3, 8), 0.0))
    for dtype in (jnp.float32, jnp.bfloat16):
        for kind, ops, rtol in cases:
            q, k, w = (a.astype(dtype) for a in ops)
            ref_i, ref_v = indexer_topk_reference(q, k, w, 6, causal=True)
            assert ref_v.dtype == jnp.float32  # ranked in float32 whatever the inputs
            if kind == "ties":
                assert (np.asarray(ref_v)[..., 5] == np.asarray(ref_v)[..., 4]).mean() > 0.2
            for name, fn in INDEXERS.items():
                got = jax.jit(lambda q, k, w, fn=fn: fn(q, k, w, 6, causal=True))(q, k, w)
                assert got[1].dtype == jnp.float32, name
                _assert_same_sets(*got, ref_i, ref_v, f"{name} {jnp.dtype(dtype).name} {kind}",
                                  rtol)


@pytest.mark.selections
def test_every_indexer_selects_the_same_keys_in_float32_and_bfloat16():
    indexers_select_the_same_keys()


# ----------------------------------------------------------------------------- packed sequences
#
# Segment ids: query t reads key s (selected or in the window) and the indexer may pick s only
# if k_seg[b, s] == q_seg[b, t] != 0. Three rows: padding at the end; padding at the start and
# in the middle; a fully padded row. CSA layout: keys = [C entries | T raw tokens], the entries
# carrying their own ids.

SEG_T, SEG_C = 19, 4
Q_SEG = np.array([[1] * 7 + [2] * 9 + [0] * 3,
                  [0] * 2 + [1] * 5 + [0] * 3 + [3] * 9,
                  [0] * 19], np.int32)
ENTRY_SEG = np.array([[1, 1, 2, 2], [1, 0, 3, 3], [0, 0, 0, 0]], np.int32)
CSA_K_SEG = np.concatenate([ENTRY_SEG, Q_SEG], axis=1)
SEG_IMPLS = {"xla": IMPLS["xla"], "pallas": IMPLS["pallas"], "tpu": lambda *a, **kw: TPU_KERNEL(*a, **kw)}


def _oracle_attention(q, k, v, idx, sink, *, window, window_start, q_seg, k_seg):
    """Loops in numpy: each (b, t, n) softmax over exactly the keys the rules let it read."""
    q, k, idx = np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(idx)
    v = k if v is None else np.asarray(v, np.float64)
    b, t, n, h = q.shape
    s, kg = k.shape[1], k.shape[2]
    out = np.zeros((b, t, n, v.shape[-1]))
    for bi, ti, ni in np.ndindex(b, t, n):
        read = {int(x) for x in idx[bi, ti] if 0 <= x < s}
        if window is not None:
            read |= {window_start + r for r in range(max(ti - window + 1, 0), ti + 1)
                     if window_start + r < s}
        read = sorted(x for x in read if k_seg[bi, x] == q_seg[bi, ti] != 0)
        logits = [q[bi, ti, ni] @ k[bi, x, ni // (n // kg)] * h ** -0.5 for x in read]
        extra = [] if sink is None else [float(sink[ni])]
        if not logits:
            continue  # reads nothing: zeros (a sink alone reads no value)
        mx = max(logits + extra)
        e = np.exp(np.array(logits) - mx)
        den = e.sum() + sum(np.exp(x - mx) for x in extra)
        out[bi, ti, ni] = (e[:, None] * v[bi, read, ni // (n // kg)]).sum(0) / den
    return out


def test_reference_with_segments_equals_a_hand_written_oracle():
    b, t, c, n = 3, SEG_T, SEG_C, 2
    q, k, v, idx, sk, _ = _inputs(b, t, c + t, n, 1, 4, 5, 21, p_empty=0.1)
    rules = dict(window=3, window_start=c, q_seg_BT=jnp.asarray(Q_SEG),
                 k_seg_BS=jnp.asarray(CSA_K_SEG))
    for vv, sink in ((v, sk), (None, None)):
        got = token_sparse_attention_reference(q, k, vv, idx, sink=sink, **rules)
        want = _oracle_attention(q, k, vv, idx, sink, window=3, window_start=c, q_seg=Q_SEG,
                                 k_seg=CSA_K_SEG)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    assert np.any(want[Q_SEG != 0] != 0)  # the rows that may read do read


def _oracle_topk(scores, top_k, valid):
    """Per row: the valid keys by (score descending, key ascending), the first top_k, -1 after."""
    b, t, s = scores.shape
    out = np.full((b, t, min(top_k, s)), -1, np.int32)
    for bi, ti in np.ndindex(b, t):
        keys = sorted((x for x in range(s) if valid[bi, ti, x]),
                      key=lambda x: (-scores[bi, ti, x], x))[:top_k]
        out[bi, ti, :len(keys)] = keys
    return out


def test_indexer_reference_with_segments_equals_a_hand_written_oracle():
    q, k, w = _int_indexer(7, 3, SEG_T, SEG_T, 2, 4)
    scores = np.asarray(jax.vmap(lambda q, k, w: jnp.einsum(
        "TI,TIS->TS", w, jax.nn.relu(jnp.einsum("TIE,SE->TIS", q, k))))(q, k, w))
    same = (Q_SEG[:, :, None] == Q_SEG[:, None, :]) & (Q_SEG[:, None, :] != 0)
    for causal in (True, False):
        valid = same & (np.tril(np.ones((SEG_T, SEG_T), bool)) if causal else True)
        for top_k in (1, 4, 30):
            got, _ = indexer_topk_reference(q, k, w, top_k, causal=causal,
                                            q_seg_BT=jnp.asarray(Q_SEG), k_seg_BS=jnp.asarray(Q_SEG))
            np.testing.assert_array_equal(np.asarray(got), _oracle_topk(scores, top_k, valid))
    assert np.all(np.asarray(got)[Q_SEG == 0] == -1)


def _check_packed(impl, b, t, s, n, kg, h, m, seed, k_seg, **kw):
    """``_check`` with segment ids, for one impl; padding queries must come out exactly 0."""
    ref = _check(b, t, s, n, kg, h, m, seed, impls=(SEG_IMPLS[impl],), p_empty=0.1,
                 q_seg_BT=jnp.asarray(Q_SEG[:b]), k_seg_BS=jnp.asarray(k_seg[:b]),
                 zero_rows=Q_SEG[:b] == 0, **kw)
    assert np.any(np.asarray(ref)[Q_SEG[:b] != 0] != 0)


@pytest.mark.parametrize("impl", list(SEG_IMPLS))
def test_kernels_with_segments_csa_layout_window_and_sink(impl):
    # shared K/V, one kv head, the raw window after 4 entries; selections cross segments freely
    _check_packed(impl, 3, SEG_T, SEG_C + SEG_T, 4, 1, 8, 3, 31, CSA_K_SEG, shared=True,
                  window=4, window_start=SEG_C)


@pytest.mark.parametrize("impl", list(SEG_IMPLS))
def test_kernels_with_segments_gqa_without_window(impl):
    # GQA, separate V, no sink: padding queries read nothing and give zeros; with the cotangent
    # on segment 1's outputs only, every other key gets exactly zero dK and dV
    _check_packed(impl, 3, SEG_T, SEG_T, 4, 2, 8, 6, 32, Q_SEG, sink=False,
                  cotangent_rows=Q_SEG == 1, foreign_keys=Q_SEG != 1)


def _indexer_case(kind):
    """(q, k, w, keyword arguments) of a packed indexer call: DSA (keys are the tokens, default
    positions) or CSA (keys are C entries, entry c at position 4 c + 3 with its own id)."""
    q_seg = jnp.asarray(Q_SEG)
    if kind == "dsa":
        return (*_int_indexer(8, 3, SEG_T, SEG_T, 3, 4), dict(q_seg_BT=q_seg, k_seg_BS=q_seg))
    return (*_int_indexer(9, 3, SEG_T, SEG_C, 3, 4),
            dict(q_pos_T=jnp.arange(SEG_T), k_pos_S=4 * jnp.arange(SEG_C) + 3, q_seg_BT=q_seg,
                 k_seg_BS=jnp.asarray(ENTRY_SEG)))


@pytest.mark.parametrize("kind,causal", [("dsa", True), ("dsa", False), ("csa", True)])
def test_indexers_with_segments_select_the_reference_keys(kind, causal):
    """Integer-valued operands (exact scores, many ties): the XLA running top-k equals the
    reference column for column, the radix-select kernel selects the same sets (one top_k:
    its interpret-mode compile is slow); padding queries select nothing. Both skip the key
    tiles outside a tile's segments (XLA: ranges of 7, 14 or 19 keys from the tile's first
    key of its segments, clamped at the end)."""
    q, k, w, kw = _indexer_case(kind)
    for top_k in (1, 3, 30):
        ref_i, ref_v = indexer_topk_reference(q, k, w, top_k, causal=causal, **kw)
        assert np.all(np.asarray(ref_i)[Q_SEG == 0] == -1)
        assert np.any(np.asarray(ref_i) >= 0)
        got_i, got_v = jax.jit(lambda q, k, w, top_k=top_k: INDEXERS["xla"](
            q, k, w, top_k, causal=causal, **kw))(q, k, w)
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(ref_i), err_msg=str(top_k))
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(ref_v))
        if top_k == (3 if causal else 30):  # causal: short rows; bidirectional: whole segments
            # key tiles of 8: some query tiles start past tile 0 (row 1's third) or end early
            got = jax.jit(lambda q, k, w, top_k=top_k: indexer_topk_pallas(
                q, k, w, top_k, causal=causal, blocks=IndexerKernelBlocks(8, 8), **kw))(q, k, w)
            _assert_same_sets(*got, ref_i, ref_v, f"pallas {top_k}")


def test_segment_arguments_are_checked():
    q, k = jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 10, 1, 4))
    idx = jnp.zeros((1, 8, 2), jnp.int32)
    qi, ki, wi = jnp.zeros((1, 8, 1, 4)), jnp.zeros((1, 10, 4)), jnp.zeros((1, 8, 1))
    seg_t, seg_s = jnp.ones((1, 8), jnp.int32), jnp.ones((1, 10), jnp.int32)
    attention = [token_sparse_attention_reference, *SEG_IMPLS.values()]
    indexers = [indexer_topk_reference, *INDEXERS.values()]
    calls = ([lambda f=f, **kw: f(q, k, None, idx, **kw) for f in attention]
             + [lambda f=f, **kw: f(qi, ki, wi, 2, causal=True, **kw) for f in indexers])
    for call in calls:
        with pytest.raises(ValueError, match="q_seg_BT was given without k_seg_BS"):
            call(q_seg_BT=seg_t)
        with pytest.raises(ValueError, match="k_seg_BS was given without q_seg_BT"):
            call(k_seg_BS=seg_s)
        with pytest.raises(ValueError, match=r"k_seg_BS must have shape \(1, 10\)"):
            call(q_seg_BT=seg_t, k_seg_BS=seg_t)
        with pytest.raises(TypeError, match="q_seg_BT must be an integer array"):
            call(q_seg_BT=seg_t.astype(jnp.float32), k_seg_BS=seg_s)


def _long_axes(fn, *args, t):
    """Shapes in the jaxpr of ``fn`` with two axes of at least T / 2 (T x T, T x S, T x C)."""
    return [s for s in jaxpr_shapes(jax.make_jaxpr(fn)(*args).jaxpr)
            if sum(d >= t // 2 for d in s) >= 2]


def test_no_t_by_s_array_with_segments():
    """Forward and backward of the xla, pallas and TPU token-sparse paths and both fused
    indexers, packed, CSA-sized (C = T / 2 entries before T raw keys): no (T, S) array, kernel
    bodies and custom-vjp rules included; the reference has one, so the check can fail."""
    b, t, c, n, m = 1, 300, 150, 2, 8
    q, k = jnp.zeros((b, t, n, 16)), jnp.zeros((b, c + t, 1, 16))
    idx = jnp.zeros((b, t, m), jnp.int32)
    q_seg, k_seg = jnp.ones((b, t), jnp.int32), jnp.ones((b, c + t), jnp.int32)
    impls = {"reference": token_sparse_attention_reference, "xla": token_sparse_attention_xla,
             "pallas": token_sparse_attention, "tpu": token_sparse_attention_tpu}
    for name, fn in impls.items():
        def loss(q, k, sink, fn=fn):
            return fn(q, k, None, idx, sink=sink, window=16, window_start=c, q_seg_BT=q_seg,
                      k_seg_BS=k_seg).sum()
        bad = _long_axes(jax.grad(loss, argnums=(0, 1, 2)), q, k, jnp.zeros((n,)), t=t)
        assert bool(bad) == (name == "reference"), (name, bad)
    qi, ki, wi = jnp.zeros((b, t, 2, 8)), jnp.zeros((b, c, 8)), jnp.zeros((b, t, 2))
    kw = dict(causal=True, q_pos_T=jnp.arange(t), k_pos_S=2 * jnp.arange(c) + 1,
              q_seg_BT=q_seg, k_seg_BS=k_seg[:, :c])
    for name, fn in {"reference": indexer_topk_reference, "xla": indexer_topk,
                     "pallas": indexer_topk_pallas}.items():
        bad = _long_axes(lambda q, k, w, fn=fn: fn(q, k, w, 32, **kw), qi, ki, wi, t=t)
        assert bool(bad) == (name == "reference"), (name, bad)


def test_core_wrappers_pass_the_segment_ids_on():
    """``core.token_sparse_attention`` / ``core.indexer_topk`` under the registry's impls give
    the packed results (which differ from the unpacked ones)."""
    from attnhut_jax import core

    c, t = SEG_C, SEG_T
    q, k, _, idx, sink, _ = _inputs(3, t, c + t, 4, 1, 8, 3, 33, shared=True)
    segs = dict(q_seg_BT=jnp.asarray(Q_SEG), k_seg_BS=jnp.asarray(CSA_K_SEG))
    rules = dict(sink=sink, window=4, window_start=c)
    want = token_sparse_attention_reference(q, k, None, idx, **rules, **segs)
    assert not np.allclose(want, token_sparse_attention_reference(q, k, None, idx, **rules))
    for impl in ("reference", "xla", "pallas"):
        got = jax.jit(lambda q, k, impl=impl: core.token_sparse_attention(
            q, k, None, idx, impl=impl, **rules, **segs))(q, k)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, err_msg=impl)
    qi, ki, wi, kw = _indexer_case("csa")
    ref_i, _ = indexer_topk_reference(qi, ki, wi, 2, causal=True, **kw)
    for impl in ("reference", "xla"):
        got_i, _ = jax.jit(lambda qi, impl=impl: core.indexer_topk(
            qi, ki, wi, 2, causal=True, impl=impl, **kw))(qi)
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(ref_i), err_msg=impl)


# ----------------------------------------------------------------------------- exact at any -O


def _dsa_indexer_operands():
    """The lightning-indexer operands of a small DSA layer (dim 32, 4 heads, 2 index heads of
    width 8) on normal inputs (2, 13, 32), the setting of tests/test_dsa_training.py. Several
    rows' k-th scores (e.g. row (0, 2), top_k 5) round differently with and without a fused
    multiply-add, so a compiler that contracts one recomputation of a score and not another
    moves that key by one ulp."""
    import flax.linen as nn

    import attnhut_jax as ah

    x = jax.random.normal(jax.random.key(0), (2, 13, 32))
    m = ah.DeepSeekSparseAttention(32, 4, top_k=5, num_index_heads=2, index_head_dim=8, causal=False)
    p = nn.unbox(jax.jit(m.init)(jax.random.key(1), x))
    return m.apply(p, x, method=lambda mod, x: mod.indexer.project(x))


@pytest.mark.selections
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_radix_select_keeps_the_kth_key_whatever_the_compiler_rounds(causal):
    """Regression: the radix select recomputes every score tile in each of its 9 passes. With one
    loop per pass, XLA CPU at optimisation level 0 (this suite's setting) compiled the score
    tile of the last pass differently from the counting passes' (an FMA contracted in one body
    and not in the other), so the key at a row's k-th score came out one ulp below the
    ``theta`` the counts had found, was dropped, and its slot stayed -1. All passes now run in
    one loop, so every pass compares the same bits. DSA (keys = tokens, default and explicit
    positions) and CSA-like (keys = compressed entries at positions (c + 1) * rate) cases, one
    key tile and several, the indices alone as the program's output (the failing program) and
    with the scores."""
    q, k, w = _dsa_indexer_operands()
    t, rate, nc = q.shape[1], 2, 6
    cases = [("dsa", k, {}, (3, 5)),
             ("dsa positions", k, dict(q_pos_T=jnp.arange(t), k_pos_S=jnp.arange(t)), (5,)),
             ("csa", k[:, :nc], dict(q_pos_T=jnp.arange(t), k_pos_S=(jnp.arange(nc) + 1) * rate), (3,))]
    for name, kk, kw, top_ks in cases:
        for top_k in top_ks:
            ref_i, ref_v = indexer_topk_reference(q, kk, w, top_k, causal=causal, **kw)
            # one key tile and several for the first case, several for the others
            tilings = (IndexerKernelBlocks(), IndexerKernelBlocks(8, 4)) if top_k == 3 and \
                name == "dsa" else (IndexerKernelBlocks(8, 4),)
            for blocks in tilings:
                msg = f"{name} top_k={top_k} {blocks}"
                def fn(q, k, w, top_k=top_k, blocks=blocks, kw=kw):
                    return indexer_topk_pallas(q, k, w, top_k, causal=causal, blocks=blocks, **kw)
                alone = jax.jit(lambda q, k, w, fn=fn: fn(q, k, w)[0])(q, kk, w)
                np.testing.assert_array_equal(np.sort(np.asarray(alone), -1),
                                              np.sort(np.asarray(ref_i), -1), err_msg=msg)
                got_i, got_v = jax.jit(fn)(q, kk, w)
                np.testing.assert_array_equal(np.sort(np.asarray(got_i), -1),
                                              np.sort(np.asarray(ref_i), -1), err_msg=msg)
                # scores as summed by two programs: small ones are differences of larger terms
                np.testing.assert_allclose(np.sort(np.asarray(got_v), -1), np.sort(np.asarray(ref_v), -1),
                                           rtol=1e-6, atol=1e-6, err_msg=msg)

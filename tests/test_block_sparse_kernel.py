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

from pallas_kernels.block_sparse import (
    BlockSizes,
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_attention_xla,
    build_tables,
    tile_visits,
)
from pallas_kernels.block_sparse.tpu import block_sparse_attention_tpu

# per-dtype tolerances: (output atol, gradient atol), relative to unit-scale inputs
TOL = {jnp.float32: (2e-5, 5e-5), jnp.bfloat16: (3e-2, 6e-2)}
HYPOTHESIS_EXAMPLES = 20  # derandomised: the same 20 examples on every run


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

"""The shared core: masks, RoPE, RMSNorm and the attention function against direct formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnhut_jax import core


def test_causal_mask_offset_rule():
    m = np.asarray(core.causal_mask(2, 5))
    i, j = np.arange(2)[:, None], np.arange(5)[None, :]
    np.testing.assert_array_equal(m, j <= i + 3)
    np.testing.assert_array_equal(np.asarray(core.causal_mask(4, 4)), np.tril(np.ones((4, 4), bool)))


def _naive(q, k, v, keep, scale):
    """Loop-free but per-head attention with repeat-kv, computed in float64 numpy."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    keep = np.broadcast_to(keep, logits.shape)
    logits = np.where(keep, logits, -np.inf)
    mx = np.max(logits, -1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    p = np.exp(logits - mx) * keep
    den = p.sum(-1, keepdims=True)
    p = np.where(den > 0, p / np.where(den > 0, den, 1), 0)
    return np.einsum("bnts,bsnv->btnv", p, v)


@pytest.mark.parametrize("n,k", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_dot_product_attention_matches_repeat_kv_formula(n, k):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2, 5, n, 8))
    kk = jax.random.normal(ks[1], (2, 6, k, 8))
    v = jax.random.normal(ks[2], (2, 6, k, 3))
    keep = jax.random.bernoulli(ks[3], 0.6, (2, n, 5, 6)).at[:, :, 1].set(False)
    out = core.dot_product_attention(q, kk, v, keep=keep, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), _naive(q, kk, v, np.asarray(keep), 0.3),
                               atol=1e-5)
    assert np.all(np.asarray(out[:, 1]) == 0.0)


def test_softmax_runs_in_float32_for_half_inputs():
    q = jnp.full((1, 1, 1, 4), 60.0, jnp.bfloat16)
    k = jnp.stack([jnp.full((4,), 60.0), jnp.full((4,), 59.0)])[None, :, None, :].astype(
        jnp.bfloat16)
    v = jnp.asarray([[1.0], [0.0]], jnp.bfloat16)[None, :, None, :]
    out = core.dot_product_attention(q, k, v, scale=1.0)
    # logits 14400 vs 14160: a bf16 softmax would see equal logits and give 0.5
    assert out.dtype == jnp.bfloat16 and float(out[0, 0, 0, 0]) == 1.0


def test_rope_is_relative_and_partial_passes_the_rest_through():
    x = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
    cos, sin = core.rope_tables(jnp.arange(6), 8)
    r = core.apply_rope(x, cos, sin)
    # the score of a rotated pair depends only on the offset
    q0 = core.apply_rope(jnp.broadcast_to(x[:, :1], x.shape), cos, sin)
    k0 = core.apply_rope(jnp.broadcast_to(x[:, 1:2], x.shape), cos, sin)
    s = jnp.einsum("bnh,bnh->bn", q0[:, 1], k0[:, 3])
    s2 = jnp.einsum("bnh,bnh->bn", q0[:, 2], k0[:, 4])
    np.testing.assert_allclose(np.asarray(s), np.asarray(s2), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(r), axis=-1),
                               np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5)
    c4, s4 = core.rope_tables(jnp.arange(6), 4)
    p = core.apply_rope(x, c4, s4)
    np.testing.assert_array_equal(np.asarray(p[..., 4:]), np.asarray(x[..., 4:]))
    np.testing.assert_allclose(np.asarray(p[..., :4]),
                               np.asarray(core.apply_rope(x[..., :4], c4, s4)))
    # per-sample positions (B, T)
    cb, sb = core.rope_tables(jnp.arange(6)[None], 8)
    np.testing.assert_allclose(np.asarray(core.apply_rope(x, cb, sb)), np.asarray(r))


@pytest.mark.parametrize("dim", [3, 0, -2])
def test_rope_rejects_odd_or_empty_dims(dim):
    with pytest.raises(ValueError, match=f"got {dim}"):
        core.rope_tables(jnp.arange(4), dim)


def test_apply_rope_rejects_tables_wider_than_heads():
    c, s = core.rope_tables(jnp.arange(3), 8)
    with pytest.raises(ValueError, match="rope width 8 .* head width 4"):
        core.apply_rope(jnp.zeros((1, 3, 2, 4)), c, s)


@pytest.mark.parametrize("shape", [(3, 5, 5), (2, 1, 5, 4), (5, 5, 5, 5, 5), (2, 4, 5, 2)])
def test_mask_shape_errors_name_the_shapes(shape):
    with pytest.raises(ValueError, match=r"attn_mask of shape .* \(batch, heads, q_len, k_len\)"):
        core.split_attn_mask(jnp.ones(shape, bool), (2, 4, 5, 5), "X")


def test_mask_dtype_errors():
    with pytest.raises(TypeError, match="boolean or floating point, got int32"):
        core.split_attn_mask(jnp.ones((5, 5), jnp.int32), (2, 4, 5, 5), "X")
    with pytest.raises(TypeError, match="must be an array"):
        core.split_attn_mask([[True]], (1, 1, 1, 1), "X")


def test_sink_joins_the_denominator_only():
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (1, 3, 2, 4))
    k = jax.random.normal(ks[1], (1, 5, 1, 4))
    v = jax.random.normal(ks[2], (1, 5, 1, 4))
    sink = jnp.asarray([0.5, -1.0])
    keep = jnp.ones((3, 5), bool).at[1].set(False)
    out = core.dot_product_attention(q, k, v, keep=keep, sink=sink)
    logits = np.einsum("btnh,bsh->bnts", np.asarray(q, np.float64), np.asarray(k[:, :, 0])) / 2
    e = np.exp(logits) * np.asarray(keep)
    den = e.sum(-1, keepdims=True) + np.exp(np.asarray(sink, np.float64))[None, :, None, None]
    ref = np.einsum("bnts,bsv->btnv", e / den, np.asarray(v[:, :, 0], np.float64))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6)
    assert np.all(np.asarray(out[:, 1]) == 0.0)
    g = jax.grad(lambda s: core.dot_product_attention(q, k, v, keep=keep, sink=s).sum())(sink)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g) != 0)


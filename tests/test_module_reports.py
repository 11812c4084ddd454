"""What the modules report about themselves: DSA's and CSA's main-branch weights in the aux dict
(the target of their indexer loss), and every sequence mechanism's KV-cache bytes per token."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah
from attnhut_jax import compressed as ah_compressed

B, T, D, N = 2, 13, 32, 4  # T not a multiple of the compression rate: a partial last run


def _x(seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


def _softmax_rows(logits: np.ndarray, keep: np.ndarray, sink: np.ndarray | None = None) -> np.ndarray:
    """float64 softmax over the last axis of the kept entries; ``sink`` (per row) joins only the
    denominator; a row with nothing kept is zeros."""
    masked = np.where(keep, logits, -np.inf)
    top = masked.max(-1, keepdims=True)
    if sink is not None:
        top = np.maximum(top, sink[..., None])
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(keep, np.exp(masked - top), 0.0)
    den = e.sum(-1, keepdims=True)
    if sink is not None:
        den = den + np.exp(sink[..., None] - top)
    return e / np.where(den == 0.0, 1.0, den)


def _index_loss(scores: np.ndarray, weights: np.ndarray) -> float:
    """``dsa_index_aux_loss`` by hand: cross-entropy of log_softmax(scores) against the
    head-summed weights normalised per query, averaged over queries."""
    target = weights.sum(1)
    target = target / np.maximum(target.sum(-1, keepdims=True), 1e-9)
    s = scores.astype(np.float64)
    log_p = s - s.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    return float(-(target * log_p).sum(-1).mean())


def _same_output(attn: nn.Module, params, x: jax.Array, out_with_aux: jax.Array) -> None:
    """Asking for the aux dict does not change the output."""
    out = jax.jit(lambda p, x: attn.apply({"params": p}, x))(params, x)
    np.testing.assert_allclose(np.asarray(out_with_aux), np.asarray(out), rtol=1e-5, atol=1e-6)


def _kernel(params, *path) -> np.ndarray:
    for p in path:
        params = params[p]
    return np.asarray(params["kernel"], np.float64)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("causal", [True, False])
def test_dsa_dense_weights_are_the_main_attention_without_top_k(impl, causal):
    attn = ah.DeepSeekSparseAttention(D, N, top_k=3, num_index_heads=2, index_head_dim=8,
                                      causal=causal, impl=impl)
    x = _x()
    params = nn.meta.unbox(jax.jit(attn.init)(jax.random.key(1), x)["params"])
    out, aux = jax.jit(lambda p, x: attn.apply({"params": p}, x, return_aux=True))(params, x)
    _same_output(attn, params, x, out)

    # by hand: q, k from the fused qkv projection, softmax over every visible key, no top-k
    h = D // N
    qkv = np.asarray(x, np.float64) @ _kernel(params, "qkv")
    q_BTNH, k_BTNH = qkv[..., :D].reshape(B, T, N, h), qkv[..., D:2 * D].reshape(B, T, N, h)
    logits_BNTS = np.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BTNH) * h ** -0.5
    keep_TS = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)
    want = _softmax_rows(logits_BNTS, keep_TS)

    got = np.asarray(aux["dense_weights"])
    assert got.shape == (B, N, T, T) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
    if causal:
        assert np.all(got[..., ~keep_TS] == 0)
    # more keys than the top-k keep: the dense weights are not the sparse ones
    assert np.any((got > 0) & ~np.asarray(aux["selected"])[:, None])

    scores = np.asarray(aux["index_scores"])
    loss = float(ah.dsa_index_aux_loss(aux["index_scores"], aux["dense_weights"]))
    np.testing.assert_allclose(loss, _index_loss(scores, want), rtol=1e-5)
    np.testing.assert_allclose(loss, float(ah.dsa_index_aux_loss(aux["index_scores"],
                                                                 jnp.asarray(want, jnp.float32))),
                               rtol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_csa_dense_weights_are_the_main_branch_over_every_visible_entry(impl):
    r = 4
    attn = ah.CompressedSparseAttention(D, N, compression_rate=r, top_k=1, num_index_heads=2,
                                        index_dim=8, window=4, impl=impl)
    x = _x(2)
    params = nn.meta.unbox(jax.jit(attn.init)(jax.random.key(3), x)["params"])
    # a non-zero sink per head, so that leaving it out of the denominator would show
    params["sink"] = jnp.linspace(-1.0, 1.5, N, dtype=jnp.float32)
    out, aux = jax.jit(lambda p, x: attn.apply({"params": p}, x, return_aux=True))(params, x)
    _same_output(attn, params, x, out)

    # by hand: the pooled entries (the module's public pooling function), RMS-normalised; queries
    # from the low-rank path, RMS-normalised per head; softmax over the visible entries + sink
    x64 = np.asarray(x, np.float64)
    proj = {name: jnp.asarray(x64 @ _kernel(params, name), jnp.float32)
            for name in ("kv_a", "kv_b", "z_a", "z_b")}
    comp_BCH = np.asarray(ah_compressed.compress_overlap(
        proj["kv_a"], proj["kv_b"], proj["z_a"], proj["z_b"], params["bias_a"], params["bias_b"],
        r), np.float64)
    nc = comp_BCH.shape[1]
    assert nc == -(-T // r)

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-6) * np.asarray(w, np.float64)

    comp_BCH = rms(comp_BCH, params["kv_norm"])
    h = D // N
    q_BTNH = rms(((x64 @ _kernel(params, "q_down")) @ _kernel(params, "q_up")).reshape(B, T, N, h),
                 params["q_norm"])
    logits_BNTC = np.einsum("BTNH,BCH->BNTC", q_BTNH, comp_BCH) * h ** -0.5
    visible_TC = (np.arange(nc)[None, :] + 1) * r <= np.arange(T)[:, None]
    sink_BNT = np.broadcast_to(np.asarray(params["sink"], np.float64)[None, :, None], (B, N, T))
    want = _softmax_rows(logits_BNTC, visible_TC, sink_BNT)

    got = np.asarray(aux["dense_weights"])
    assert got.shape == (B, N, T, nc)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[:, :, :r] == 0)  # the first run's queries see no complete entry
    assert np.all(got.sum(-1)[:, :, r:] < 1.0)  # the sink takes its share
    assert np.any((got > 0) & ~np.asarray(aux["selected"])[:, None])  # top_k=1 keeps fewer

    scores = np.asarray(aux["index_scores"])
    loss = float(ah.dsa_index_aux_loss(aux["index_scores"], aux["dense_weights"]))
    np.testing.assert_allclose(loss, _index_loss(scores, want), rtol=1e-5)


def test_dense_weights_follow_the_module_dtype_rules():
    """bf16 modules: the weights come out of the same float32 softmax as the attention's."""
    attn = ah.DeepSeekSparseAttention(D, N, top_k=3, num_index_heads=2, index_head_dim=8,
                                      dtype=jnp.bfloat16)
    x = _x().astype(jnp.bfloat16)
    params = jax.jit(attn.init)(jax.random.key(1), x)
    _, aux = attn.apply(params, x, return_aux=True)
    w = np.asarray(aux["dense_weights"])
    assert w.dtype == np.float32 and np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


# (module, bytes per token in bf16, what the number is made of)
KV_BYTES = [
    (ah.StandardAttention(64, 4), 2 * 64 * 2),
    (ah.StandardAttention(96, 3), 2 * 96 * 2),
    (ah.MultiQueryAttention(64, 4), 2 * 16 * 2),
    (ah.MultiQueryAttention(64, 8), 2 * 8 * 2),
    (ah.GroupedQueryAttention(64, 4, 2), 2 * 2 * 16 * 2),
    (ah.GroupedQueryAttention(128, 8, 4), 2 * 4 * 16 * 2),
    (ah.MultiHeadLatentAttention(64, 4), (64 // 4 + 16 // 2) * 2),  # latent + rope key
    (ah.MultiHeadLatentAttention(64, 4, kv_lora_rank=40, qk_rope_head_dim=4), (40 + 4) * 2),
    (ah.DifferentialAttention(64, 2), 2 * 64 * 2),
    (ah.DeltaAttention(64, 4), 2 * 64 * 2),
    (ah.BigBirdAttention(64, 4), 2 * 64 * 2),
    (ah.SinkhornAttention(64, 4, 8), 2 * 64 * 2),
    (ah.MiniMaxSparseAttention(64, 4, 2, index_dim=8), (2 * 2 * 16 + 8) * 2),
    (ah.MiniMaxSparseAttention(128, 4, 1), (2 * 1 * 32 + 32) * 2),  # index_dim: head_dim
    (ah.DeepSeekSparseAttention(64, 4, index_head_dim=16), (2 * 64 + 16) * 2),
    (ah.DeepSeekSparseAttention(64, 4), (2 * 64 + 64) * 2),
    (ah.HeavilyCompressedAttention(64, 4, compression_rate=4), 16 / 4 * 2),
    (ah.HeavilyCompressedAttention(64, 4, compression_rate=16, kv_dim=24), 24 / 16 * 2),
    (ah.CompressedSparseAttention(64, 4, compression_rate=4, index_dim=16), (16 + 16) / 4 * 2),
    (ah.CompressedSparseAttention(64, 4, compression_rate=8, kv_dim=32), (32 + 64) / 8 * 2),
    (ah.SparkAttention(64, 4, top_k=8, predictor_dim=4), 2 * 64 * 2),  # K and V of every head
    # Child et al.'s sets reach back to the first token: K and V of every head and position
    (ah.StridedSparseAttention(64, 4, stride=8), 2 * 64 * 2),
    (ah.FixedSparseAttention(64, 4, block_size=8, num_summary=2), 2 * 64 * 2),
    # a recurrent state of a fixed size: nothing per token (cache_bytes counts the state)
    (ah.KimiDeltaAttention(64, 4, 16), 0.0),
    (ah.LinearAttention(64, 4), 0.0),
]


@pytest.mark.parametrize("module, want", KV_BYTES, ids=lambda v: type(v).__name__ if
                         isinstance(v, nn.Module) else str(v))
def test_kv_cache_bytes_per_token(module, want):
    got = module.kv_cache_bytes_per_token()
    assert isinstance(got, float) and got == want
    assert module.kv_cache_bytes_per_token(jnp.float32) == 2 * want
    assert module.kv_cache_bytes_per_token(np.dtype("float16")) == want


def test_every_sequence_mechanism_reports_its_kv_cache():
    reported = {type(m) for m, _ in KV_BYTES}
    sequence_mechanisms = {getattr(ah, name) for name in ah.__all__
                           if name.endswith("Attention") and name not in
                           ("SlotAttention", "CausalJEPAAttention")}
    assert sequence_mechanisms == reported, sequence_mechanisms ^ reported

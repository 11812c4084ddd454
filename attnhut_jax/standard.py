"""Standard multi-head attention (Vaswani et al., 2017)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from . import cache, core, registry
from .core import Array, Dtype


class StandardAttention(cache.ReadsEveryToken, nn.Module):
    """Plain multi-head scaled dot-product attention, one fused ``qkv`` projection.

    Args mirror ``attnhut.StandardAttention``: ``dim`` (divisible by ``num_heads``), ``num_heads``,
    ``causal``, ``dropout`` (on attention weights, when ``deterministic=False``), ``bias``.

    ``impl`` (``auto`` | ``xla`` | ``cudnn``; no variable depends on it) picks the registry's
    ``dense`` op, ``core.cudnn_unsupported`` says when cuDNN can run; ``precision`` reaches every
    matmul (Flax's convention).

    ``decode=True`` (causal only) decodes incrementally with a K/V cache (``attnhut_jax.cache``;
    ``key`` / ``value`` (B, N, max_len, H), head-major so that a step reads each head's rows
    contiguously):
    ``init`` on a (B, max_len, D) input sizes the cache, each ``apply(..., mutable=["cache"])``
    appends a chunk and attends it over every cached key at or before it (XLA, whatever
    ``impl``). The ``params`` are those of ``decode=False``.
    """

    dim: int
    num_heads: int
    causal: bool = False
    dropout: float = 0.0
    bias: bool = False
    impl: registry.DenseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every head."""
        return float(2 * self.dim * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: K and V of every head in ``dtype``, and the index."""
        return cache.dense_cache_bytes(batch, max_len, self.num_heads, self.head_dim,
                                       self.head_dim, dtype)

    def setup(self) -> None:
        core.check_positive("StandardAttention", dim=self.dim, num_heads=self.num_heads)
        registry.check("StandardAttention", "dense", self.impl)
        core.check_divisible("StandardAttention", ("dim", self.dim), ("num_heads", self.num_heads))
        cache.check_causal("StandardAttention", self.decode, self.causal)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.qkv = core.Linear(3 * self.dim, axes=("embed", "qkv"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, attn_mask: Array | None = None, deterministic: bool = True, *,
                 segment_ids: Array | None = None, positions: Array | None = None,
                 lengths: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D). ``attn_mask``: boolean or additive, broadcastable to (B, N, T, T).

        ``segment_ids`` (B, T) int: packed sequences (``core.check_packing``); token t reads key s
        only when both carry the same nonzero id, id 0 is padding (zeroed on input, read by no
        token; its own output is finite). Segments AND with the causal rule and with
        ``attn_mask`` (which, as in attnhut, replaces the causal rule). ``positions`` (B, T) int
        is validated and otherwise unused: this module has no RoPE, the only reader of positions.

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``attn_mask``, ``segment_ids`` and ``positions`` are
        refused, and dropout is off.
        """
        core.check_input(x, self.dim, "StandardAttention")
        cache.check_options("StandardAttention", decode=self.decode, lengths=lengths,
                            attn_mask=attn_mask, segment_ids=segment_ids, positions=positions)
        if self.decode:
            step = cache.begin(self, "StandardAttention", x, lengths, sized_by="key", axis=2)
            b, n, _ = step.x.shape
            q, k, v = jnp.split(self.qkv(step.x), 3, axis=-1)
            shape = (b, n, self.num_heads, self.head_dim)
            out = cache.attend_cache(step, q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                     precision=self.precision)
            return step.finish(self.proj(out.reshape(b, n, self.dim)))
        seg, _ = core.check_packing("StandardAttention", x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        rate, rng = core.attention_dropout(self, self.dropout, deterministic)
        out = core.sdpa(q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=attn_mask,
                        causal=self.causal, owner="StandardAttention",
                        dropout_rate=rate, dropout_rng=rng, impl=self.impl,
                        precision=self.precision, q_seg_BT=seg, k_seg_BS=seg)
        return self.proj(out.reshape(b, t, self.dim))

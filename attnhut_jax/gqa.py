"""Grouped-query attention (Ainslie et al., 2023)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from . import cache, core, registry
from .core import Array, Dtype


class GroupedQueryAttention(cache.ReadsEveryToken, nn.Module):
    """Query heads share key/value heads in contiguous groups of ``num_heads // num_kv_heads``.

    ``num_kv_heads == num_heads`` is MHA, ``num_kv_heads == 1`` is MQA. Args mirror
    ``attnhut.GroupedQueryAttention``: ``dim``, ``num_heads``, ``num_kv_heads``, ``causal``,
    ``dropout``, ``bias``. Parameters: ``q``, ``k``, ``v``, ``proj``.

    ``impl`` (``auto`` | ``xla`` | ``cudnn``; no variable depends on it) picks the registry's
    ``dense`` op, ``core.cudnn_unsupported`` says when cuDNN can run; ``precision`` reaches every
    matmul (Flax's convention).

    ``decode=True`` (causal only): incremental decoding with a cache of K and V per kv head, as
    ``StandardAttention`` (``attnhut_jax.cache``).
    """

    dim: int
    num_heads: int
    num_kv_heads: int
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
        """Bytes a decoder caches per token in ``dtype``: K and V of every kv head."""
        return float(2 * self.num_kv_heads * self.head_dim * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: K and V of every kv head in ``dtype``, and the
        index."""
        return cache.dense_cache_bytes(batch, max_len, self.num_kv_heads, self.head_dim,
                                       self.head_dim, dtype)

    def setup(self) -> None:
        owner = "GroupedQueryAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads,
                            num_kv_heads=self.num_kv_heads)
        registry.check(owner, "dense", self.impl)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        core.check_divisible(owner, ("num_heads", self.num_heads),
                             ("num_kv_heads", self.num_kv_heads))
        cache.check_causal(owner, self.decode, self.causal)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        kv_dim = self.num_kv_heads * self.head_dim
        self.q = core.Linear(self.dim, axes=("embed", "heads"), **kw)
        self.k = core.Linear(kv_dim, axes=("embed", "kv_heads"), **kw)
        self.v = core.Linear(kv_dim, axes=("embed", "kv_heads"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, attn_mask: Array | None = None, deterministic: bool = True, *,
                 segment_ids: Array | None = None, positions: Array | None = None,
                 lengths: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D). ``attn_mask``: boolean or additive, broadcastable to (B, N, T, T).

        ``segment_ids`` / ``positions``: packed sequences, as ``StandardAttention`` takes them
        (segments AND with the causal rule and with ``attn_mask``; ``positions`` is validated and
        otherwise unused, this module has no RoPE).

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``attn_mask``, ``segment_ids`` and ``positions`` are
        refused, and dropout is off.
        """
        owner = "GroupedQueryAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, attn_mask=attn_mask,
                            segment_ids=segment_ids, positions=positions)
        h = self.head_dim
        if self.decode:
            step = cache.begin(self, owner, x, lengths, sized_by="key", axis=2)
            b, n, _ = step.x.shape
            out = cache.attend_cache(
                step, self.q(step.x).reshape(b, n, self.num_heads, h),
                self.k(step.x).reshape(b, n, self.num_kv_heads, h),
                self.v(step.x).reshape(b, n, self.num_kv_heads, h), precision=self.precision)
            return step.finish(self.proj(out.reshape(b, n, self.dim)))
        seg, _ = core.check_packing("GroupedQueryAttention", x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        q_BTNH = self.q(x).reshape(b, t, self.num_heads, h)
        k_BSKH = self.k(x).reshape(b, t, self.num_kv_heads, h)
        v_BSKV = self.v(x).reshape(b, t, self.num_kv_heads, h)
        rate, rng = core.attention_dropout(self, self.dropout, deterministic)
        out = core.sdpa(q_BTNH, k_BSKH, v_BSKV, attn_mask=attn_mask, causal=self.causal,
                        owner="GroupedQueryAttention", dropout_rate=rate, dropout_rng=rng,
                        impl=self.impl, precision=self.precision, q_seg_BT=seg, k_seg_BS=seg)
        return self.proj(out.reshape(b, t, self.dim))

"""Standard multi-head attention (Vaswani et al., 2017)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from . import cache, core, registry
from .core import Array, Dtype
from .dense_options import DenseOptions


class StandardAttention(DenseOptions, cache.ReadsEveryToken, nn.Module):
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

    The options of ``GroupedQueryAttention`` (``head_dim``, ``qk_norm`` / ``qk_norm_eps`` /
    ``qk_norm_zero_centered``, ``output_gate``, ``rope_theta`` / ``rope_dim`` / ``rope_style`` /
    ``rope_scaling``, ``window``, ``num_sink_logits``, ``num_sink_tokens``; see its docstring and
    ``attnhut_jax.dense_options``), with the same defaults: attnhut's layer.
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
    def kv_heads(self) -> int:
        return self.num_heads

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every head."""
        return float(2 * self.num_heads * self.width * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: K and V of every head in ``dtype``, and the index."""
        return cache.dense_cache_bytes(batch, max_len, self.num_heads, self.width, self.width,
                                       dtype)

    def setup(self) -> None:
        core.check_positive("StandardAttention", dim=self.dim, num_heads=self.num_heads)
        registry.check("StandardAttention", "dense", self.impl)
        if self.head_dim is None:
            core.check_divisible("StandardAttention", ("dim", self.dim),
                                 ("num_heads", self.num_heads))
        cache.check_causal("StandardAttention", self.decode, self.causal)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.qkv = core.Linear(3 * self.num_heads * self.width, axes=("embed", "qkv"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)
        self._setup_options(kw)

    def _split(self, x: Array) -> tuple[Array, Array, Array]:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.width)
        return tuple(a.reshape(shape) for a in jnp.split(self.qkv(x), 3, axis=-1))

    def _kv_of(self, x: Array) -> tuple[Array, Array]:
        return self._split(x)[1:]

    def __call__(self, x: Array, attn_mask: Array | None = None, deterministic: bool = True, *,
                 segment_ids: Array | None = None, positions: Array | None = None,
                 lengths: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D). ``attn_mask``: boolean or additive, broadcastable to (B, N, T, T).

        ``segment_ids`` (B, T) int: packed sequences (``core.check_packing``); token t reads key s
        only when both carry the same nonzero id, id 0 is padding (zeroed on input, read by no
        token; its own output is finite). Segments AND with the causal rule and with
        ``attn_mask`` (which, as in attnhut, replaces the causal rule). ``positions`` (B, T) int
        feeds RoPE (``rope_theta``) and is otherwise validated and unused.

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``attn_mask``, ``segment_ids`` and ``positions`` are
        refused, and dropout is off.
        """
        core.check_input(x, self.dim, "StandardAttention")
        cache.check_options("StandardAttention", decode=self.decode, lengths=lengths,
                            attn_mask=attn_mask, segment_ids=segment_ids, positions=positions)
        if self.decode:
            step = cache.begin(self, "StandardAttention", x, lengths, sized_by="key", axis=2)
            out = self._attend_decode(step, *self._split(step.x))
            return step.finish(self._finish(step.x, out))
        seg, pos = core.check_packing("StandardAttention", x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        out = self._attend(*self._split(x), seg, pos, attn_mask, deterministic,
                           "StandardAttention")
        return self._finish(x, out)

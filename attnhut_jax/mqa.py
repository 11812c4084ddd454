"""Multi-query attention (Shazeer, 2019)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from . import cache, core, registry
from .core import Array, Dtype
from .dense_options import DenseOptions


class MultiQueryAttention(DenseOptions, cache.ReadsEveryToken, nn.Module):
    """All query heads share one key/value head: the smallest KV cache.

    Args mirror ``attnhut.MultiQueryAttention``: ``dim`` (divisible by ``num_heads``),
    ``num_heads``, ``causal``, ``dropout``, ``bias``. Parameters: ``q``, ``kv`` (2 * head width),
    ``proj``.

    ``impl`` (``auto`` | ``xla`` | ``cudnn``; no variable depends on it) picks the registry's
    ``dense`` op, ``core.cudnn_unsupported`` says when cuDNN can run; ``precision`` reaches every
    matmul (Flax's convention).

    ``decode=True`` (causal only): incremental decoding (``attnhut_jax.cache``) with a cache of
    the one shared K and V head; each step appends the chunk's K and V and attends every query
    head over all cached keys at or before it (XLA, whatever ``impl``). The ``params`` are those
    of ``decode=False``.

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
        return 1

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: one K and one V head shared by all query
        heads."""
        return float(2 * self.width * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: K and V of the one shared head in ``dtype``, and
        the index."""
        return cache.dense_cache_bytes(batch, max_len, 1, self.width, self.width, dtype)

    def setup(self) -> None:
        core.check_positive("MultiQueryAttention", dim=self.dim, num_heads=self.num_heads)
        registry.check("MultiQueryAttention", "dense", self.impl)
        if self.head_dim is None:
            core.check_divisible("MultiQueryAttention", ("dim", self.dim),
                                 ("num_heads", self.num_heads))
        cache.check_causal("MultiQueryAttention", self.decode, self.causal)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.q = core.Linear(self.num_heads * self.width, axes=("embed", "heads"), **kw)
        self.kv = core.Linear(2 * self.width, axes=("embed", "kv_heads"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)
        self._setup_options(kw)

    def _kv_of(self, x: Array) -> tuple[Array, Array]:
        """The shared key and value head (B, T, 1, H) each."""
        return tuple(a[:, :, None, :] for a in jnp.split(self.kv(x), 2, axis=-1))

    def _q(self, x: Array) -> Array:
        b, t, _ = x.shape
        return self.q(x).reshape(b, t, self.num_heads, self.width)

    def __call__(self, x: Array, attn_mask: Array | None = None, deterministic: bool = True, *,
                 segment_ids: Array | None = None, positions: Array | None = None,
                 lengths: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D). ``attn_mask``: boolean or additive, broadcastable to (B, N, T, T).

        ``segment_ids`` / ``positions``: packed sequences, as ``StandardAttention`` takes them
        (segments AND with the causal rule and with ``attn_mask``; ``positions`` feed RoPE, and
        are otherwise validated and unused).

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``attn_mask``, ``segment_ids`` and ``positions`` are
        refused, and dropout is off.
        """
        core.check_input(x, self.dim, "MultiQueryAttention")
        cache.check_options("MultiQueryAttention", decode=self.decode, lengths=lengths,
                            attn_mask=attn_mask, segment_ids=segment_ids, positions=positions)
        if self.decode:
            step = cache.begin(self, "MultiQueryAttention", x, lengths, sized_by="key", axis=2)
            out = self._attend_decode(step, self._q(step.x), *self._kv_of(step.x))
            return step.finish(self._finish(step.x, out))
        seg, pos = core.check_packing("MultiQueryAttention", x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        out = self._attend(self._q(x), *self._kv_of(x), seg, pos, attn_mask, deterministic,
                           "MultiQueryAttention")
        return self._finish(x, out)

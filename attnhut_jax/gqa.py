"""Grouped-query attention (Ainslie et al., 2023), with the options of current open models."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from . import cache, core, registry
from .core import Array, Dtype
from .dense_options import DenseOptions


class GroupedQueryAttention(DenseOptions, cache.ReadsEveryToken, nn.Module):
    """Query heads share key/value heads in contiguous groups of ``num_heads // num_kv_heads``.

    ``num_kv_heads == num_heads`` is MHA, ``num_kv_heads == 1`` is MQA. Args mirror
    ``attnhut.GroupedQueryAttention``: ``dim``, ``num_heads``, ``num_kv_heads``, ``causal``,
    ``dropout``, ``bias``. Parameters: ``q``, ``k``, ``v``, ``proj``.

    ``impl`` (``auto`` | ``xla`` | ``cudnn``; no variable depends on it) picks the registry's
    ``dense`` op, ``core.cudnn_unsupported`` says when cuDNN can run; ``precision`` reaches every
    matmul (Flax's convention).

    The options of d9d's and modern_llm's attention (and of Llama, Qwen3, gpt-oss; the defaults
    are attnhut's layer):

    * ``head_dim``: head width H apart from ``dim // num_heads`` (q is ``num_heads * H`` wide).
    * ``qk_norm``: RMSNorm over each head's q and k before RoPE (``q_norm`` / ``k_norm``, (H,)),
      eps ``qk_norm_eps``; ``qk_norm_zero_centered``: the scale is ``1 + weight``, weight
      initialised to zeros.
    * ``output_gate``: the heads' output times ``sigmoid(gate(x))`` before ``proj`` (Qwen3-Next /
      Qwen3.5; parameter ``gate``).
    * ``rope_theta``: RoPE with this base on q and k (None: no RoPE, attnhut's layer);
      ``rope_dim``: rotate the leading ``rope_dim`` channels only (default H); ``rope_style``
      ``"half"`` | ``"interleaved"``; ``rope_scaling``: a ``core.RopeScaling`` (linear, dynamic
      NTK, YaRN with its attention factor, Llama 3). Positions: ``positions`` or 0..T-1.
    * ``window``: sliding window. Causal: W (an int) keys, the query's own and the W - 1 before
      it (Hugging Face's ``sliding_window``), or ``(W, 0)``; bidirectional: ``(left, right)``,
      ``left`` keys up to and including the query, ``right`` after it. The default path runs on
      the block-sparse seam (``core.block_sparse_attention``, O(T x window), no (T, T) array);
      ``impl="cudnn"`` uses cuDNN's local window where cuDNN can run the call.
    * ``num_sink_logits``: 0 or ``num_heads``: a learnable logit per head (``sinks``, (N,))
      that joins every softmax denominator and reads no value (gpt-oss, d9d).
    * ``num_sink_tokens``: learnable tokens (``sink_tokens``, (P, dim)) projected by ``k`` and
      ``v`` (no RoPE: they have no position) and prepended to the keys; every query reads them,
      whatever the causal rule and the window (modern_llm).

    ``decode=True`` (causal only): incremental decoding with a cache of K (after norm and RoPE)
    and V per kv head, as ``StandardAttention`` (``attnhut_jax.cache``); the window masks the
    cache, sinks join each step's softmax.
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
    def kv_heads(self) -> int:
        return self.num_kv_heads

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every kv head."""
        return float(2 * self.num_kv_heads * self.width * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: K and V of every kv head in ``dtype``, and the
        index."""
        return cache.dense_cache_bytes(batch, max_len, self.num_kv_heads, self.width,
                                       self.width, dtype)

    def setup(self) -> None:
        owner = "GroupedQueryAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads,
                            num_kv_heads=self.num_kv_heads)
        registry.check(owner, "dense", self.impl)
        if self.head_dim is None:
            core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        core.check_divisible(owner, ("num_heads", self.num_heads),
                             ("num_kv_heads", self.num_kv_heads))
        cache.check_causal(owner, self.decode, self.causal)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        h = self.width
        kv_dim = self.num_kv_heads * h
        self.q = core.Linear(self.num_heads * h, axes=("embed", "heads"), **kw)
        self.k = core.Linear(kv_dim, axes=("embed", "kv_heads"), **kw)
        self.v = core.Linear(kv_dim, axes=("embed", "kv_heads"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)
        self._setup_options(kw)

    def _kv_of(self, x: Array) -> tuple[Array, Array]:
        b, t, _ = x.shape
        h = self.width
        return (self.k(x).reshape(b, t, self.num_kv_heads, h),
                self.v(x).reshape(b, t, self.num_kv_heads, h))

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
        owner = "GroupedQueryAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, attn_mask=attn_mask,
                            segment_ids=segment_ids, positions=positions)
        if self.decode:
            step = cache.begin(self, owner, x, lengths, sized_by="key", axis=2)
            b, n, _ = step.x.shape
            q = self.q(step.x).reshape(b, n, self.num_heads, self.width)
            out = self._attend_decode(step, q, *self._kv_of(step.x))
            return step.finish(self._finish(step.x, out))
        seg, pos = core.check_packing(owner, x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.num_heads, self.width)
        out = self._attend(q, *self._kv_of(x), seg, pos, attn_mask, deterministic, owner)
        return self._finish(x, out)

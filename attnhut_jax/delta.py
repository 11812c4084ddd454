"""Delta Attention (Willette et al., NeurIPS 2025).

A sliding-window + sink base shifts each row's output away from full attention because every
row renormalises over a different key set. Every ``stride``-th query also gets full causal
attention; the gap between dense and sparse at that anchor is added to the ``stride`` rows it
starts. Training free: it corrects a sparse model at inference.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from . import core, registry
from .core import Array, Dtype

_BLOCK_K = 64  # key block of the block-sparse core; the window rule is exact at any size


class DeltaAttention(nn.Module):
    """Sliding-window + sink attention with the delta correction (always causal).

    Args mirror ``attnhut.DeltaAttention``: ``dim``, ``num_heads``, ``window`` (256), ``sink``
    (4), ``stride`` (16; 1 recovers full causal attention), ``bias``. Parameters: ``qkv``,
    ``proj``.
    ``impl`` picks the registry's ``block_sparse`` op (``auto``/``reference``/``xla``/``pallas``;
    changes no variable); ``precision`` reaches every matmul.
    """

    dim: int
    num_heads: int
    window: int = 256
    sink: int = 4
    stride: int = 16
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every head (the dense
        correction reads every past key)."""
        return float(2 * self.dim * jnp.dtype(dtype).itemsize)

    def setup(self) -> None:
        owner = "DeltaAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads, window=self.window,
                            stride=self.stride)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        if self.sink < 0:
            raise ValueError(f"{owner}: sink={self.sink} must be >= 0")
        registry.check(owner, "block_sparse", self.impl)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.qkv = core.Linear(3 * self.dim, axes=("embed", "qkv"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        """(B, T, D) -> (B, T, D)."""
        core.check_input(x, self.dim, "DeltaAttention")
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        scale = self.head_dim ** -0.5
        n, bk = self.num_heads, _BLOCK_K
        pos = jnp.arange(t)
        keep_TJ = core.window_block_keep(pos, pos, bk, window=self.window, num_sink_keys=self.sink)
        sparse = core.block_sparse_attention(
            q, k, v, jnp.broadcast_to(keep_TJ, (b, n, *keep_TJ.shape)), block_k=bk, causal=True,
            impl=self.impl, scale=scale, window=self.window, num_sink_keys=self.sink,
            precision=self.precision, owner="DeltaAttention")
        anchors = jnp.arange(0, t, self.stride)
        every_block = jnp.ones((b, n, anchors.shape[0], keep_TJ.shape[1]), bool)
        dense = core.block_sparse_attention(q[:, anchors], k, v, every_block, block_k=bk,
                                            causal=True, impl=self.impl, scale=scale,
                                            q_pos_T=anchors, precision=self.precision,
                                            owner="DeltaAttention")
        delta = dense - sparse[:, anchors]
        out = sparse + jnp.repeat(delta, self.stride, axis=1)[:, :t]
        return self.proj(out.reshape(b, t, self.dim))

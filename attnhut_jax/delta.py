"""Delta Attention (Willette et al., NeurIPS 2025).

A sliding-window + sink base shifts each row's output away from full attention because every
row renormalises over a different key set. Every ``stride``-th query also gets full causal
attention; the gap between dense and sparse at that anchor is added to the ``stride`` rows it
starts. Training free: it corrects a sparse model at inference.
"""

from __future__ import annotations

import flax.linen as nn
import jax
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

    def __call__(self, x: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D).

        ``segment_ids`` (B, T) int packs several sequences in a row (id 0: padding; see
        ``core``'s packed-sequence rule): each segment's first ``sink`` tokens are its sinks, and
        the window and the anchors' full causal attention read the query's own segment only.
        Anchors stay every ``stride``-th row; a row whose anchor lies in another segment gets no
        correction. A packed row equals each segment run alone when every segment starts at a
        multiple of ``stride`` (the sinks are counted per segment and need no alignment).
        ``positions`` (B, T) int is validated and unused: only RoPE would read it, and Delta
        Attention has none.
        """
        owner = "DeltaAttention"
        core.check_input(x, self.dim, owner)
        seg, _ = core.check_packing(owner, x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        scale = self.head_dim ** -0.5
        n, bk = self.num_heads, _BLOCK_K
        pos = jnp.arange(t)
        anchors = jnp.arange(0, t, self.stride)
        if seg is None:
            keep_TJ = core.window_block_keep(pos, pos, bk, window=self.window,
                                             num_sink_keys=self.sink)
            keep_BNTJ = jnp.broadcast_to(keep_TJ, (b, n, *keep_TJ.shape))
            num_sink, sparse_kw, dense_kw = self.sink, {}, {}
        else:
            sink_BS = position_in_segment(seg) < self.sink
            keep_BNTJ = jnp.broadcast_to(_window_sink_block_keep(pos, sink_BS, bk, self.window)[:, None],
                                         (b, n, t, -(-t // bk)))
            num_sink = 0
            sparse_kw = {"q_seg_BT": seg, "k_seg_BS": seg, "k_sink_BS": sink_BS}
            dense_kw = {"q_seg_BT": seg[:, anchors], "k_seg_BS": seg}
        sparse = core.block_sparse_attention(
            q, k, v, keep_BNTJ, block_k=bk, causal=True, impl=self.impl, scale=scale,
            window=self.window, num_sink_keys=num_sink, precision=self.precision, owner=owner,
            **sparse_kw)
        every_block = jnp.ones((b, n, anchors.shape[0], keep_BNTJ.shape[-1]), bool)
        dense = core.block_sparse_attention(q[:, anchors], k, v, every_block, block_k=bk,
                                            causal=True, impl=self.impl, scale=scale,
                                            q_pos_T=anchors, precision=self.precision,
                                            owner=owner, **dense_kw)
        delta = jnp.repeat(dense - sparse[:, anchors], self.stride, axis=1)[:, :t]
        if seg is not None:  # the anchor of row t is row t - t % stride
            same_BT = seg == jnp.repeat(seg[:, anchors], self.stride, axis=1)[:, :t]
            delta = jnp.where(same_BT[:, :, None, None], delta, jnp.zeros((), delta.dtype))
        out = sparse + delta
        return self.proj(out.reshape(b, t, self.dim))


def position_in_segment(seg_BT: Array) -> Array:
    """(B, T) int32: how many earlier tokens of the row carry the same segment id (a token's
    position in its segment, also when a segment's tokens are not contiguous). A stable sort of
    the ids, O(T log T) time and O(T) memory, no (T, T) array."""
    b, t = seg_BT.shape
    order_BT = jnp.argsort(seg_BT, axis=1, stable=True)
    sorted_BT = jnp.take_along_axis(seg_BT, order_BT, axis=1)
    i_T = jnp.arange(t, dtype=jnp.int32)
    starts_BT = jnp.concatenate([jnp.ones((b, 1), bool), sorted_BT[:, 1:] != sorted_BT[:, :-1]],
                                axis=1)
    first_BT = jax.lax.cummax(jnp.where(starts_BT, i_T, 0), axis=1)
    rank_BT = jnp.zeros((b, t), jnp.int32)
    return jax.vmap(lambda r, o, v: r.at[o].set(v))(rank_BT, order_BT, i_T - first_BT)


def _window_sink_block_keep(pos_T: Array, sink_BS: Array, block_k: int, window: int) -> Array:
    """(B, T, J) bool: key blocks holding a key of the causal ``window`` or a sink key
    (``sink_BS``) at or before the query. O(T * J)."""
    b, s = sink_BS.shape
    j = -(-s // block_k)
    window_TJ = core.window_block_keep(pos_T, pos_T, block_k, window=window)
    sink_BJK = jnp.pad(sink_BS, ((0, 0), (0, j * block_k - s))).reshape(b, j, block_k)
    first_sink_BJ = jnp.where(sink_BJK, jnp.arange(j * block_k).reshape(j, block_k), s).min(axis=2)
    return window_TJ[None] | (first_sink_BJ[:, None, :] <= pos_T[None, :, None])

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

from . import cache, core, registry
from .core import Array, Dtype

_BLOCK_K = 64  # key block of the block-sparse core; the window rule is exact at any size


class DeltaAttention(nn.Module):
    """Sliding-window + sink attention with the delta correction (always causal).

    Args mirror ``attnhut.DeltaAttention``: ``dim``, ``num_heads``, ``window`` (256), ``sink``
    (4), ``stride`` (16; 1 recovers full causal attention), ``bias``. Parameters: ``qkv``,
    ``proj``.
    ``impl`` picks the registry's ``block_sparse`` op (``auto``/``reference``/``xla``/``pallas``;
    changes no variable); ``precision`` reaches every matmul.

    ``decode=True`` decodes incrementally (``attnhut_jax.cache``; XLA whatever ``impl``). The
    cache holds K and V of every token (an anchor's full causal attention reads all of them) and,
    per row, the correction ``dense - sparse`` of the row's latest anchor (B, N, H). A step's
    query at position p reads its window keys ``max(0, p - window + 1) .. p`` and the sink keys
    ``0 .. sink - 1`` not already in the window, gathered from the cache (a chunk of n queries
    gathers the n + window - 1 positions their windows cover and the sinks once; no masked pass
    over the cache); the anchors inside the chunk (at most ``ceil(n / stride)``) attend the whole
    cache causally and give their corrections, a query whose anchor precedes the chunk adds the
    cached one. A step without an anchor in any row skips the dense pass (``lax.cond``), so it
    reads only window and sink keys. The ``params`` are those of ``decode=False``.
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
    decode: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every head (the dense
        correction reads every past key)."""
        return float(2 * self.dim * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: K and V of every head and token in ``dtype``, the
        latest anchor's correction (B, N, H) in ``dtype``, and the index."""
        return (cache.dense_cache_bytes(batch, max_len, self.num_heads, self.head_dim,
                                        self.head_dim, dtype)
                + cache.nbytes((batch, self.num_heads, self.head_dim), dtype))

    def decode_reads(self, n: int) -> float:
        """Cached tokens whose keys and values one decode query reads at cache length ``n``, on
        average: its ``min(n, window + sink)`` window and sink keys, plus the anchor's dense read
        of ``n`` keys amortised over the ``stride`` rows it corrects (``n / stride``; a float)."""
        return float(min(n, self.window + self.sink)) + n / self.stride

    def decode_scored(self, n: int) -> int:
        """Index keys a selector scores per decode query: none (no selector)."""
        del n
        return 0

    def setup(self) -> None:
        owner = "DeltaAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads, window=self.window,
                            stride=self.stride)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        if self.sink < 0:
            raise ValueError(f"{owner}: sink={self.sink} must be >= 0")
        registry.check(owner, "block_sparse", self.impl)
        # always causal: no causal field to check
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.qkv = core.Linear(3 * self.dim, axes=("embed", "qkv"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, lengths: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D).

        ``segment_ids`` (B, T) int packs several sequences in a row (id 0: padding; see
        ``core``'s packed-sequence rule): each segment's first ``sink`` tokens are its sinks, and
        the window and the anchors' full causal attention read the query's own segment only.
        Anchors stay every ``stride``-th row; a row whose anchor lies in another segment gets no
        correction. A packed row equals each segment run alone when every segment starts at a
        multiple of ``stride`` (the sinks are counted per segment and need no alignment).
        ``positions`` (B, T) int is validated and unused: only RoPE would read it, and Delta
        Attention has none.

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``segment_ids`` and ``positions`` are refused.
        """
        owner = "DeltaAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, segment_ids=segment_ids,
                            positions=positions)
        if self.decode:
            return self._decode(cache.begin(self, owner, x, lengths, sized_by="key"))
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

    def _decode(self, step: cache.Step) -> Array:
        """One decode call: the sparse base over gathered window + sink keys, the corrections of
        the chunk's anchors (dense pass only when a row appends an anchor), the cached one for
        queries whose anchor precedes the chunk."""
        b, n, _ = step.x.shape
        nh, h, stride = self.num_heads, self.head_dim, self.stride
        q, k, v = jnp.split(self.qkv(step.x), 3, axis=-1)
        q_BTNH = q.reshape(b, n, nh, h)
        k_BSNH = step.append("key", k.reshape(b, n, nh, h))
        v_BSNH = step.append("value", v.reshape(b, n, nh, h))
        if step.initializing:  # size the cache and create the params; no attention to run
            step.state("correction", (b, nh, h), v.dtype)
            return step.finish(self.proj(jnp.zeros_like(q)))
        # the attention reads the written cache as it is (XLA would otherwise fuse a second copy
        # of the write into its readers and copy the whole cache for it)
        k_BSNH, v_BSNH = jax.lax.optimization_barrier((k_BSNH, v_BSNH))
        scale = h ** -0.5
        sparse_BTNH = window_sink_attention(q_BTNH, k_BSNH, v_BSNH, step.start_B, step.ok_BT,
                                            window=self.window, sink=self.sink, scale=scale,
                                            precision=self.precision)
        # the anchors a = first + i * stride (i < A) that this chunk appends, per row
        a_max = -(-n // stride)
        first_B = -(-step.start_B // stride) * stride
        anchor_BA = first_B[:, None] + stride * jnp.arange(a_max, dtype=jnp.int32)[None, :]
        has_BA = anchor_BA < step.end_B[:, None]
        j_BA = jnp.clip(anchor_BA - step.start_B[:, None], 0, n - 1)
        take = jax.vmap(lambda a, i: a[i])
        q_BANH, sparse_BANH = take(q_BTNH, j_BA), take(sparse_BTNH, j_BA)

        def corrections(_):
            keep_BAS = ((jnp.arange(step.max_len)[None, None, :] <= anchor_BA[:, :, None])
                        & has_BA[:, :, None])
            dense_BANH = core.dot_product_attention(q_BANH, k_BSNH, v_BSNH, keep=keep_BAS[:, None],
                                                    scale=scale, precision=self.precision)
            return (dense_BANH - sparse_BANH).astype(sparse_BTNH.dtype)

        corr_BANH = jax.lax.cond(jnp.any(has_BA), corrections,
                                 lambda _: jnp.zeros(sparse_BANH.shape, sparse_BTNH.dtype), None)
        cached_BNH = step.state("correction", (b, nh, h), sparse_BTNH.dtype)
        anchor_BT = step.pos_BT - step.pos_BT % stride
        in_chunk_BT = anchor_BT >= step.start_B[:, None]
        i_BT = jnp.clip((anchor_BT - first_B[:, None]) // stride, 0, a_max - 1)
        delta_BTNH = jnp.where(in_chunk_BT[:, :, None, None], take(corr_BANH, i_BT),
                               cached_BNH[:, None])
        # keep the correction of each row's latest anchor for the next call
        last_B = step.end_B - 1
        last_anchor_B = last_B - last_B % stride
        renew_B = (step.end_B > step.start_B) & (last_anchor_B >= step.start_B)
        i_B = jnp.clip((last_anchor_B - first_B) // stride, 0, a_max - 1)
        latest_BNH = take(corr_BANH, i_B[:, None])[:, 0]
        step.put("correction", jnp.where(renew_B[:, None, None], latest_BNH, cached_BNH))
        out_BTNH = sparse_BTNH + delta_BTNH
        return step.finish(self.proj(out_BTNH.reshape(b, n, self.dim)))


def window_sink_attention(q_BTNH: Array, k_BSNH: Array, v_BSNH: Array, start_B: Array,
                          ok_BT: Array, *, window: int, sink: int, scale: float,
                          precision: core.Precision = None) -> Array:
    """The sparse base of a chunk: query j of row b, at position ``p = start_B[b] + j``, attends
    the keys of its causal ``window`` (``max(0, p - window + 1) .. p``) and the first ``sink``
    keys of the cache (B, S, N, H), never a masked pass over S.

    The chunk's n queries share one gather per row: the ``n + window - 1`` positions
    ``start - window + 1 .. start + n - 1`` that their windows cover, then the ``sink`` sink
    positions (a sink key inside the query's window is masked in its sink slot, so no key
    counts twice). A single query (n = 1) so reads exactly ``window + sink`` keys; a chunk holds
    (n, n + window - 1 + sink) scores per head instead of gathering ``window + sink`` keys for
    each query. Queries not ``ok_BT`` read nothing (zeros). Returns (B, T, N, H)."""
    n = q_BTNH.shape[1]
    span = n + window - 1
    win_BM = start_B[:, None] - (window - 1) + jnp.arange(span, dtype=jnp.int32)[None, :]
    sink_BM = jnp.broadcast_to(jnp.arange(sink, dtype=jnp.int32), (start_B.shape[0], sink))
    pos_BT1 = start_B[:, None, None] + jnp.arange(n, dtype=jnp.int32)[None, :, None]
    in_window_BTM = ((win_BM[:, None, :] >= 0) & (win_BM[:, None, :] <= pos_BT1)
                     & (win_BM[:, None, :] > pos_BT1 - window))
    sink_BTM = sink_BM[:, None, :] <= pos_BT1 - window
    keep_BTM = jnp.concatenate([in_window_BTM, sink_BTM], axis=2) & ok_BT[:, :, None]
    idx_B1M = jnp.concatenate([win_BM, sink_BM], axis=1)[:, None, :]
    k_BMNH = cache.gather_rows(k_BSNH, idx_B1M)[:, 0]
    v_BMNH = cache.gather_rows(v_BSNH, idx_B1M)[:, 0]
    return core.dot_product_attention(q_BTNH, k_BMNH, v_BMNH, keep=keep_BTM[:, None],
                                      scale=scale, precision=precision)


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

"""MiniMax Sparse Attention (MiniMax, 2026), attnhut 0.5.0 semantics: top-k blocks on GQA.

A cheap index branch (one index query per kv group, one index key shared by all groups) scores
every token, max-pools the scores into key blocks, and keeps each query's ``top_k`` blocks per
group; the group's query heads attend only there. The index branch reads a stop-gradient of
``x`` and is trained only by ``msa_index_aux_loss``. Both branches get QK-RMSNorm and partial
RoPE on their first ``rope_dim`` channels. A query's own block is always kept
(``force_current_block``), so no softmax row is empty.

Training (issue 12): ``index_loss="sparse"`` returns that loss with the output, computed over
each query's picked blocks in query tiles (``sparse_index_loss``), so neither pass builds a
(T, T) array; ``segment_ids`` / ``positions`` pack several sequences in a row (``core``'s
packed-sequence contract): block scores, picks, the block-sparse op, the aux arrays and the loss
all see same-segment keys only.

Incremental decoding (``decode=True``, ``attnhut_jax.cache``): each step scores every cached
index key with the chunk's index queries (the selector's dense pass, ``decode_scored``),
max-pools them into key blocks, picks blocks as ``block_picks`` does at the queries' positions,
gathers the picked blocks' cached keys and values per group and attends over them only
(``attend_blocks``); the partly filled last block is read up to the query.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import block_sparse

from . import cache, core, registry
from .core import Array, Dtype


def _index_logits(qi_BTKE: Array, ki_BSE: Array, causal: bool, s_offset: int = 0,
                  precision: core.Precision = None) -> Array:
    """Index scores (B, K, T, S) of the queries against keys ``s_offset + [0, S)``, in float32
    (or the operands' dtype when wider), with the finite fill on keys after the query when
    causal."""
    t, e = qi_BTKE.shape[1], qi_BTKE.shape[-1]
    dtype = jnp.promote_types(qi_BTKE.dtype, jnp.float32)
    scores_BKTS = jnp.einsum("BTKE,BSE->BKTS", qi_BTKE.astype(dtype), ki_BSE.astype(dtype),
                             precision=precision) * e ** -0.5
    if causal:
        pos_S = s_offset + jnp.arange(ki_BSE.shape[1])
        scores_BKTS = jnp.where(pos_S[None, :] <= jnp.arange(t)[:, None], scores_BKTS,
                                core.mask_value(dtype))
    return scores_BKTS


def cached_block_scores(qi_BTKE: Array, ki_BSE: Array, keep_BTS: Array, *, block_size: int,
                        precision: core.Precision = None) -> Array:
    """A decode chunk's max-pooled index scores (B, K, T, J) against the cached index keys
    (B, S, E), ``J = ceil(S / block_size)``: ``_index_logits`` with the fill where ``keep_BTS``
    is False, max-pooled over each block. The cache is read once in its own (S, E) row layout
    (``cache.row_dots``), never transposed; the (S, T, K) scores are pooled in that layout and
    only the (J, T, K) block scores are rearranged."""
    b, t, kg, e = qi_BTKE.shape
    s = ki_BSE.shape[1]
    dtype = jnp.promote_types(qi_BTKE.dtype, jnp.float32)
    dots_BSX = cache.row_dots(ki_BSE.astype(dtype), qi_BTKE.reshape(b, t * kg, e).astype(dtype),
                              precision)
    fill = core.mask_value(dtype)
    scores_BSTK = jnp.where(keep_BTS.swapaxes(1, 2)[..., None],
                            (dots_BSX * e ** -0.5).reshape(b, s, t, kg), fill)
    nb = -(-s // block_size)
    scores_BSTK = jnp.pad(scores_BSTK, ((0, 0), (0, nb * block_size - s), (0, 0), (0, 0)),
                          constant_values=fill)
    pooled_BJTK = scores_BSTK.reshape(b, nb, block_size, t, kg).max(axis=2)
    return pooled_BJTK.transpose(0, 3, 2, 1)


def block_scores(qi_BTKE: Array, ki_BSE: Array, *, block_size: int, causal: bool,
                 tile: int = 512, precision: core.Precision = None,
                 q_seg_BT: Array | None = None, k_seg_BS: Array | None = None) -> Array:
    """Max-pooled index scores (B, K, T, J), computed tile by tile.

    Never materialises the (T, S) token scores: queries go in tiles of ``tile`` tokens (whole
    key blocks, at most a quarter of the sequence) and each tile walks key chunks of the same
    size, so only (tile, tile) scores are alive and memory is O(T * J). When causal, a query
    tile visits only the chunks at or before it, which halves the work; the scores themselves
    are dense over the visible triangle, as the mechanism defines them. With segment ids
    (``q_seg_BT``, ``k_seg_BS``, both or neither) a key counts only for queries of its own
    segment and padding keys (id 0) for none; a block without such a key scores the fill.
    """
    b, t, kg, _ = qi_BTKE.shape
    s = ki_BSE.shape[1]
    q_seg_BT, k_seg_BS, _ = block_sparse.check_segments("block_scores", b, t, s, q_seg_BT,
                                                         k_seg_BS)
    nb = -(-s // block_size)
    cb = max(1, min(tile // block_size, nb // 4))  # key blocks per chunk; >= 4 chunks
    ck = cb * block_size  # keys per chunk = queries per tile
    nq, nk = -(-t // ck), -(-nb // cb)
    dtype = jnp.promote_types(qi_BTKE.dtype, jnp.float32)
    fill = core.mask_value(dtype)
    qi_BTKE = jnp.pad(qi_BTKE, ((0, 0), (0, nq * ck - t), (0, 0), (0, 0)))
    qi_tiles = qi_BTKE.reshape(b, nq, ck, kg, -1).swapaxes(0, 1)  # nq tiles of (B, ck, K, E)
    ki_BSE = jnp.pad(ki_BSE, ((0, 0), (0, nk * ck - s), (0, 0)))
    segments = q_seg_BT is not None
    if segments:
        q_seg_tiles = jnp.pad(q_seg_BT, ((0, 0), (0, nq * ck - t))).reshape(b, nq, ck).swapaxes(0, 1)
        k_seg_BS = jnp.pad(k_seg_BS, ((0, 0), (0, nk * ck - s)))  # padding keys: id 0
    else:
        q_seg_tiles = jnp.zeros((nq, 0), jnp.int32)  # unused placeholder for lax.map

    def query_tile(xs):
        i, qi_tile_BTKE, q_seg_tile_BT = xs

        def chunk(jc, out_BKTJ):
            ki_chunk_BSE = jax.lax.dynamic_slice_in_dim(ki_BSE, jc * ck, ck, axis=1)
            s_BKTS = _index_logits(qi_tile_BTKE, ki_chunk_BSE, False, precision=precision)
            k_pos_S = jc * ck + jnp.arange(ck)
            ok_BTS = (k_pos_S < s)[None, None, :]
            if causal:
                ok_BTS = ok_BTS & (k_pos_S[None, :] <= i * ck + jnp.arange(ck)[:, None])[None]
            if segments:
                k_seg_chunk_BS = jax.lax.dynamic_slice_in_dim(k_seg_BS, jc * ck, ck, axis=1)
                ok_BTS = ok_BTS & (q_seg_tile_BT[:, :, None] == k_seg_chunk_BS[:, None, :]) & (
                    k_seg_chunk_BS != 0)[:, None, :]
            pooled_BKTJ = jnp.where(ok_BTS[:, None], s_BKTS, fill).reshape(
                b, kg, ck, cb, block_size).max(-1)
            return jax.lax.dynamic_update_slice_in_dim(out_BKTJ, pooled_BKTJ, jc * cb, axis=3)

        init_BKTJ = jnp.full((b, kg, ck, nk * cb), fill, dtype)
        return jax.lax.fori_loop(0, jnp.minimum(i + 1, nk) if causal else nk, chunk, init_BKTJ)

    tiles = jax.lax.map(query_tile, (jnp.arange(nq), qi_tiles, q_seg_tiles))  # (nq, B, K, ck, nk*cb)
    out_BKTJ = jnp.moveaxis(tiles, 0, 2).reshape(b, kg, nq * ck, nk * cb)
    return out_BKTJ[:, :, :t, :nb]


def block_picks(block_scores_BKTJ: Array, *, t: int, block_size: int, top_k: int, causal: bool,
                force_current_block: bool) -> tuple[Array, Array]:
    """Each query's picked blocks as indices ``(B, K, T, M)`` int32 and their validity (bool,
    same shape): the ``min(top_k, J)`` best blocks, valid unless after the query (causal) or
    holding no key the query may read (their score is the fill), then, with
    ``force_current_block``, the query's own block, valid unless already among the valid picks.
    No block is valid twice. Query t sits at position t (``block_picks_at`` takes positions)."""
    return block_picks_at(block_scores_BKTJ, jnp.arange(t)[None], block_size=block_size,
                          top_k=top_k, causal=causal, force_current_block=force_current_block)


def block_picks_at(block_scores_BKTJ: Array, pos_BT: Array, *, block_size: int, top_k: int,
                   causal: bool, force_current_block: bool) -> tuple[Array, Array]:
    """``block_picks`` for queries at positions ``pos_BT`` ((B, T) or (1, T) int): the causal
    rule and the forced block (``pos // block_size``) read each query's own position (a decode
    step's chunk sits at the cache's index, per row)."""
    nb = block_scores_BKTJ.shape[-1]
    top_BKTM = jax.lax.top_k(block_scores_BKTJ, max(1, min(top_k, nb)))[1].astype(jnp.int32)
    fill = core.mask_value(block_scores_BKTJ.dtype)
    ok_BKTM = jnp.take_along_axis(block_scores_BKTJ, top_BKTM, axis=-1) > fill
    pos_B1T1 = jnp.asarray(pos_BT)[:, None, :, None]
    if causal:
        ok_BKTM = ok_BKTM & (top_BKTM * block_size <= pos_B1T1)
    if not force_current_block:
        return top_BKTM, ok_BKTM
    cur_B1T1 = jnp.minimum(pos_B1T1 // block_size, nb - 1).astype(jnp.int32)
    seen_BKT1 = jnp.any(ok_BKTM & (top_BKTM == cur_B1T1), axis=-1, keepdims=True)
    cur_BKT1 = jnp.broadcast_to(cur_B1T1, seen_BKT1.shape)
    return (jnp.concatenate([top_BKTM, cur_BKT1], axis=-1),
            jnp.concatenate([ok_BKTM, ~seen_BKT1], axis=-1))


def attend_blocks(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, idx_BKTM: Array, ok_BKTM: Array,
                  pos_BT: Array, *, block_size: int, scale: float,
                  precision: core.Precision = None) -> Array:
    """Attention of each query over the tokens of its picked key blocks only: ``idx_BKTM`` /
    ``ok_BKTM`` are ``block_picks_at``'s picks per kv group, ``pos_BT`` (B, T) the queries'
    positions. Gathers the M * block_size keys and values (B, K, T, M * block_size, H) of each
    query's picks (no (T, S) array) and reads a key when its pick is valid and its position is
    at or before the query's (so a partly filled block is read up to the query, and a block
    past the keys' end not at all). Masked softmax in float32 for half operands; a query
    reading nothing returns zeros. Returns (B, T, N, V)."""
    b, t, n, h = q_BTNH.shape
    s, kg = k_BSKH.shape[1], k_BSKH.shape[2]
    m = idx_BKTM.shape[-1]
    tok_BKTMP = idx_BKTM[..., None] * block_size + jnp.arange(block_size, dtype=idx_BKTM.dtype)
    read_BKTMP = ok_BKTM[..., None] & (tok_BKTMP <= pos_BT[:, None, :, None, None]) & (
        tok_BKTMP < s)
    tok_BKTS = jnp.clip(tok_BKTMP, 0, s - 1).reshape(b, kg, t, m * block_size)
    read_BKTS = read_BKTMP.reshape(b, kg, t, m * block_size)
    b_ix = jnp.arange(b)[:, None, None, None]
    k_ix = jnp.arange(kg)[None, :, None, None]
    # keys not read are zeroed, so that nothing there (not even a NaN) reaches the output
    k_BKTSH = jnp.where(read_BKTS[..., None], k_BSKH[b_ix, tok_BKTS, k_ix],
                        jnp.zeros((), k_BSKH.dtype))
    v_BKTSV = jnp.where(read_BKTS[..., None], v_BSKV[b_ix, tok_BKTS, k_ix],
                        jnp.zeros((), v_BSKV.dtype))
    q_BTKGH = q_BTNH.reshape(b, t, kg, n // kg, h)
    logits_BKGTS = jnp.einsum("BTKGH,BKTSH->BKGTS", q_BTKGH, k_BKTSH, precision=precision)
    logits_BKGTS = logits_BKGTS.astype(core.softmax_dtype(q_BTNH.dtype)) * scale
    probs_BKGTS = core.masked_softmax(logits_BKGTS, read_BKTS[:, :, None])
    out_BTKGV = jnp.einsum("BKGTS,BKTSV->BTKGV", probs_BKGTS.astype(v_BSKV.dtype), v_BKTSV,
                           precision=precision)
    return out_BTKGV.reshape(b, t, n, v_BSKV.shape[-1])


def keep_from_picks(idx_BKTM: Array, ok_BKTM: Array, num_blocks: int) -> Array:
    """(B, K, T, J) bool: the valid picks of ``block_picks`` as a block mask."""
    target_BKTM = jnp.where(ok_BKTM, idx_BKTM, num_blocks)  # invalid picks land in a spare column
    keep = jnp.put_along_axis(jnp.zeros((*idx_BKTM.shape[:-1], num_blocks + 1), bool),
                              target_BKTM, True, axis=-1, inplace=False)
    return keep[..., :num_blocks]


def select_blocks(block_scores_BKTJ: Array, *, t: int, block_size: int, top_k: int,
                  causal: bool, force_current_block: bool) -> Array:
    """(B, K, T, J) bool: each query's top-k blocks per group, minus blocks after the query or
    without a key the query may read, plus the query's own block when ``force_current_block``."""
    idx_BKTM, ok_BKTM = block_picks(block_scores_BKTJ, t=t, block_size=block_size, top_k=top_k,
                                    causal=causal, force_current_block=force_current_block)
    return keep_from_picks(idx_BKTM, ok_BKTM, block_scores_BKTJ.shape[-1])


# keys (picked blocks x block size) a query tile of the tiled index loss gathers at most
_LOSS_TILE_KEYS = 1 << 15


def sparse_index_loss(q_BTNH: Array, k_BSKH: Array, qi_BTKE: Array, ki_BSE: Array,
                      idx_BKTM: Array, ok_BKTM: Array, *, block_size: int, causal: bool,
                      scale: float, q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                      precision: core.Precision = None, eps: float = 1e-9,
                      tile: int | None = None) -> Array:
    """``msa_index_aux_loss`` over each query's picked blocks only, in memory O(T).

    The picks (``block_picks``'s indices and validity) define the support; a key of a valid
    pick counts when it exists (< S), is not after the query (causal) and, with segment ids, is
    of the query's segment and not padding. The teacher is the main attention over that support
    (softmax of ``q . k * scale``, the weights the output uses) averaged over each group's heads,
    a constant; the student ``softmax`` of the index scores over the same support. The KL is
    summed over keys and averaged over (query, group) pairs, padding queries left out.

    Queries go in tiles (``tile``, default about ``_LOSS_TILE_KEYS`` gathered keys per tile)
    through ``lax.map`` with a rematerialised body: each tile gathers its picked key blocks,
    recomputes both logits and returns its KL sum, so neither pass keeps a (tile, picked keys)
    array per tile. Work O(T * M * block_size); gradient reaches ``qi_BTKE`` and ``ki_BSE`` only.
    """
    b, t, n, h = q_BTNH.shape
    s, kg = k_BSKH.shape[1], k_BSKH.shape[2]
    q_seg_BT, k_seg_BS, _ = block_sparse.check_segments("sparse_index_loss", b, t, s, q_seg_BT,
                                                         k_seg_BS)
    if idx_BKTM.ndim != 4 or idx_BKTM.shape[:3] != (b, kg, t) or ok_BKTM.shape != idx_BKTM.shape:
        raise ValueError(f"sparse_index_loss: picks must be (B, K, T, M)=({b}, {kg}, {t}, M) "
                         f"indices and validity of one shape, got {tuple(idx_BKTM.shape)} and "
                         f"{tuple(ok_BKTM.shape)}")
    g, m, e = n // kg, idx_BKTM.shape[-1], qi_BTKE.shape[-1]
    nb = -(-s // block_size)
    tq = tile or max(1, min(t, _LOSS_TILE_KEYS // (m * block_size)))
    nq = -(-t // tq)
    segments = q_seg_BT is not None
    w_BT = core.query_weights(q_seg_BT, b, t)
    dtype_main = core.softmax_dtype(q_BTNH.dtype)
    dtype_index = jnp.promote_types(qi_BTKE.dtype, jnp.float32)
    fill = core.mask_value(jnp.float32)

    # the teacher is a constant: its operands get no gradient
    q_BTNH, k_BSKH = jax.lax.stop_gradient(q_BTNH), jax.lax.stop_gradient(k_BSKH)
    pad_s = ((0, 0), (0, nb * block_size - s))
    k_BKJSH = jnp.pad(k_BSKH, (*pad_s, (0, 0), (0, 0))).reshape(
        b, nb, block_size, kg, h).transpose(0, 3, 1, 2, 4)
    ki_BJSE = jnp.pad(ki_BSE, (*pad_s, (0, 0))).reshape(b, nb, block_size, e)
    k_seg_BJS = jnp.pad(k_seg_BS, pad_s).reshape(b, nb, block_size) if segments else None

    def tiles(a: Array, axis: int) -> Array:  # (.., T, ..) -> (nq, .., tq, ..), zero-padded
        a = jnp.pad(a, [(0, nq * tq - t if d == axis else 0) for d in range(a.ndim)])
        a = a.reshape(*a.shape[:axis], nq, tq, *a.shape[axis + 1:])
        return jnp.moveaxis(a, axis, 0)

    xs = (jnp.arange(nq), tiles(q_BTNH, 1), tiles(qi_BTKE, 1), tiles(idx_BKTM, 2),
          tiles(ok_BKTM, 2), tiles(w_BT, 1),
          tiles(q_seg_BT, 1) if segments else jnp.zeros((nq, 0), jnp.int32))
    b_ix = jnp.arange(b)[:, None, None, None]
    k_ix = jnp.arange(kg)[None, :, None, None]

    @jax.checkpoint
    def tile_kl(xs):
        i, q_tile_BTNH, qi_tile_BTKE, idx_tile_BKTM, ok_tile_BKTM, w_tile_BT, q_seg_tile_BT = xs
        k_pos_BKTMS = idx_tile_BKTM[..., None] * block_size + jnp.arange(block_size)
        valid_BKTMS = ok_tile_BKTM[..., None] & (k_pos_BKTMS < s)
        if causal:
            q_pos_T = i * tq + jnp.arange(tq)
            valid_BKTMS = valid_BKTMS & (k_pos_BKTMS <= q_pos_T[:, None, None])
        if segments:
            k_seg_BKTMS = k_seg_BJS[b_ix, idx_tile_BKTM]
            valid_BKTMS = valid_BKTMS & (k_seg_BKTMS == q_seg_tile_BT[:, None, :, None, None]) & (
                k_seg_BKTMS != 0)
        valid_BKTS = valid_BKTMS.reshape(b, kg, tq, m * block_size)
        # teacher: the main attention of the group's heads over the support, averaged over heads
        k_BKTSH = k_BKJSH[b_ix, k_ix, idx_tile_BKTM].reshape(b, kg, tq, m * block_size, h)
        q_BKGTH = q_tile_BTNH.reshape(b, tq, kg, g, h).transpose(0, 2, 3, 1, 4)
        logits_BKGTS = jnp.einsum("BKGTH,BKTSH->BKGTS", q_BKGTH, k_BKTSH, precision=precision)
        probs_BKGTS = core.masked_softmax(logits_BKGTS.astype(dtype_main) * scale,
                                          valid_BKTS[:, :, None])
        teacher_BKTS = jax.lax.stop_gradient(
            probs_BKGTS.astype(q_BTNH.dtype).astype(jnp.float32).mean(axis=2))
        # student: the index distribution over the same support
        ki_BKTSE = ki_BJSE[b_ix, idx_tile_BKTM].reshape(b, kg, tq, m * block_size, e)
        index_BKTS = jnp.einsum("BTKE,BKTSE->BKTS", qi_tile_BTKE.astype(dtype_index),
                                ki_BKTSE.astype(dtype_index), precision=precision) * e ** -0.5
        index_BKTS = jnp.where(valid_BKTS, index_BKTS.astype(jnp.float32), fill)
        log_student_BKTS = jax.nn.log_softmax(index_BKTS, axis=-1)
        kl_BKTS = teacher_BKTS * (jnp.log(jnp.maximum(teacher_BKTS, eps)) - log_student_BKTS)
        kl_BKT = jnp.where(teacher_BKTS > 0, kl_BKTS, 0.0).sum(axis=-1)
        return (kl_BKT * w_tile_BT[:, None, :]).sum()

    total = jax.lax.map(tile_kl, xs).sum()
    return total / jnp.maximum(kg * w_BT.sum(), 1.0)


class MiniMaxSparseAttention(nn.Module):
    """Top-k block selection on a GQA backbone.

    Args mirror ``attnhut.MiniMaxSparseAttention`` 0.5.0: ``dim``, ``num_heads``,
    ``num_kv_groups`` (dividing num_heads), ``block_size`` (128), ``top_k`` (16), ``index_dim``
    (head_dim), ``rope_dim`` (min(head_dim, index_dim)), ``causal`` (True), ``use_rope`` (True),
    ``rope_theta``, ``force_current_block`` (True), ``bias``. Parameters: ``q``, ``k``, ``v``,
    ``idx_q``, ``idx_k``, ``q_norm``, ``k_norm``, ``idx_q_norm``, ``idx_k_norm``, ``proj``.

    Beyond attnhut's: ``impl`` (the registry's ``block_sparse`` op: ``auto``/``reference``/
    ``xla``/``pallas``; changes no variable), ``dtype``/``param_dtype``, ``precision`` (of every
    matmul), and ``selector_dtype`` (default float32): the dtype of the index branch (its
    projections, norms, RoPE and block scores), so that a ``dtype=jnp.bfloat16`` module keeps its
    block selection in float32. The block scores are ranked in float32 (or wider) always.

    ``decode=True`` (causal only): incremental decoding (``attnhut_jax.cache``). The cache holds
    K and V per kv group as attention reads them (after QK-RMSNorm and RoPE at the tokens'
    positions; ``key``, ``value``, in the computation dtype) and the shared index key (after its
    norm and RoPE; ``index_key``, in ``selector_dtype``). A step scores every cached index key
    with the chunk's index queries, max-pools the scores into ``ceil(max_len / block_size)``
    blocks (blocks without a key at or before the query score the fill), picks blocks as
    ``block_picks`` (``top_k`` best, then the query's own block) and attends over the picked
    blocks' tokens only, gathered per group, in XLA whatever ``impl``. The ``params`` are those
    of ``decode=False``.
    """

    dim: int
    num_heads: int
    num_kv_groups: int
    block_size: int = 128
    top_k: int = 16
    index_dim: int | None = None
    rope_dim: int | None = None
    causal: bool = True
    use_rope: bool = True
    rope_theta: float = 10000.0
    force_current_block: bool = True
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    selector_dtype: Dtype = jnp.float32
    decode: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def resolved_dims(self) -> tuple[int, int]:
        """(index_dim, rope_dim) with attnhut's defaults applied."""
        di = self.index_dim or self.head_dim
        return di, (self.rope_dim if self.rope_dim is not None else min(self.head_dim, di))

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every kv group, plus the index
        key shared by all groups."""
        index_dim, _ = self.resolved_dims()
        return float((2 * self.num_kv_groups * self.head_dim + index_dim) * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: K and V of every kv group in ``dtype``, the shared
        index key in ``selector_dtype`` (when None: ``dtype`` promoted with ``param_dtype``, what
        the selector computes in) and the index."""
        index_dim, _ = self.resolved_dims()
        return (cache.dense_cache_bytes(batch, max_len, self.num_kv_groups, self.head_dim,
                                        self.head_dim, dtype)
                + cache.nbytes((batch, max_len, index_dim), cache.selector_dtype(
                    self.selector_dtype, dtype, self.param_dtype)))

    def decode_reads(self, n: int) -> int:
        """Cached tokens whose keys and values one decode query reads at cache length ``n``, in
        the worst case: the tokens of its picked blocks, ``top_k`` blocks plus its own
        (``force_current_block``), at most ``min(n, (top_k + force_current_block) *
        block_size)`` (fewer when the picks hold the partly filled last block)."""
        return min(int(n), (self.top_k + int(self.force_current_block)) * self.block_size)

    def decode_scored(self, n: int) -> int:
        """Index keys the index branch scores per decode query at cache length ``n``: all ``n``
        (for each kv group's index query)."""
        return int(n)

    def setup(self) -> None:
        owner = "MiniMaxSparseAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads,
                            num_kv_groups=self.num_kv_groups, block_size=self.block_size,
                            top_k=self.top_k)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        core.check_divisible(owner, ("num_heads", self.num_heads),
                             ("num_kv_groups", self.num_kv_groups))
        registry.check(owner, "block_sparse", self.impl)
        cache.check_causal(owner, self.decode, self.causal)
        d, (di, rd) = self.head_dim, self.resolved_dims()
        if self.use_rope and (rd % 2 or rd < 2 or rd > d or rd > di):
            raise ValueError(f"{owner}: rope_dim={rd} must be even, >= 2 and <= head_dim={d} "
                             f"and <= index_dim={di}")
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        kv = self.num_kv_groups * d
        self.q = core.Linear(self.dim, axes=("embed", "heads"), **kw)
        self.k = core.Linear(kv, axes=("embed", "kv_heads"), **kw)
        self.v = core.Linear(kv, axes=("embed", "kv_heads"), **kw)
        kw_index = dict(kw, dtype=self.selector_dtype)
        self.idx_q = core.Linear(self.num_kv_groups * di, axes=("embed", "kv_heads"), **kw_index)
        self.idx_k = core.Linear(di, axes=("embed", "index"), **kw_index)
        pd = self.param_dtype
        self.q_norm = core.ones_param(self, "q_norm", d, "head_dim", pd)
        self.k_norm = core.ones_param(self, "k_norm", d, "head_dim", pd)
        self.idx_q_norm = core.ones_param(self, "idx_q_norm", di, "index", pd)
        self.idx_k_norm = core.ones_param(self, "idx_k_norm", di, "index", pd)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, return_aux: bool = False, *, segment_ids: Array | None = None,
                 positions: Array | None = None, index_loss: str | None = None,
                 lengths: Array | None = None):
        """(B, T, D) -> (B, T, D); ``(out, aux)`` with ``return_aux=True``; ``(out, loss)`` with
        ``index_loss``; ``(out, aux, loss)`` with both.

        aux: ``index_scores`` (B, K, T, T) float32 (or wider), ``attn_weights`` (B, N, T, T), ``keep``
        (B, K, T, T) bool: what ``msa_index_aux_loss`` takes.

        ``segment_ids`` (B, T) int, ``positions`` (B, T) int: packed sequences (see ``core``): a
        token reads only keys of its own segment, id 0 is padding (read by none, its inputs
        zeroed first), and RoPE of both branches reads ``positions`` (default ``arange(T)``).

        ``index_loss="sparse"``: also return attnhut's ``msa_index_aux_loss``, computed over each
        query's picked blocks only (``sparse_index_loss``: memory O(T), no (T, T) array); with
        ``impl="reference"`` or ``return_aux`` it is computed from the materialised arrays, as
        attnhut does. With segments the KL sees same-segment keys only and the mean runs over
        non-padding (query, group) pairs. Only the index branch receives its gradient.

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``; RoPE reads the tokens' positions in the cache);
        ``return_aux``, ``segment_ids``, ``positions`` and ``index_loss`` are refused.
        """
        owner = "MiniMaxSparseAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, return_aux=return_aux,
                            segment_ids=segment_ids, positions=positions, index_loss=index_loss)
        if self.decode:
            return self._decode_step(x, lengths)
        if index_loss == "dense":
            raise ValueError(f"{owner}: index_loss='dense' is not defined for MSA (attnhut's "
                             f"msa_index_aux_loss is over the selected blocks); use 'sparse' or None")
        if index_loss not in (None, "sparse"):
            raise ValueError(f"{owner}: index_loss={index_loss!r} is not one of None, 'sparse'")
        seg_BT, pos_BT = core.check_packing(owner, x, segment_ids, positions)
        x = core.mask_padding(x, seg_BT)
        b, t, _ = x.shape
        kg, d = self.num_kv_groups, self.head_dim
        q_BTNH, k_BSKH, v_BSKV, qi_BTKE, ki_BSE = self._branches(
            x, core.rope_positions(pos_BT, t))

        sel = dict(t=t, block_size=self.block_size, top_k=self.top_k, causal=self.causal,
                   force_current_block=self.force_current_block)
        nb = -(-t // self.block_size)
        if not return_aux:
            # default path: block scores from a scan over key blocks, then the block-sparse core;
            # no (T, T) array is built (nor by the tiled index loss).
            scores_BKTJ = block_scores(qi_BTKE, ki_BSE, block_size=self.block_size,
                                       causal=self.causal, precision=self.precision,
                                       q_seg_BT=seg_BT, k_seg_BS=seg_BT)
            idx_BKTM, ok_BKTM = block_picks(scores_BKTJ, **sel)
            block_keep_BKTJ = keep_from_picks(idx_BKTM, ok_BKTM, nb)
            seg_kw = {} if seg_BT is None else dict(q_seg_BT=seg_BT, k_seg_BS=seg_BT)
            out = core.block_sparse_attention(q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ,
                                              block_k=self.block_size, causal=self.causal,
                                              impl=self.impl, scale=d ** -0.5,
                                              precision=self.precision, owner=owner, **seg_kw)
            out = self.proj(out.reshape(b, t, self.dim))
            if index_loss is None:
                return out
            loss = registry.call(owner, "msa_index_loss", self.impl, q_BTNH, k_BSKH, qi_BTKE,
                                 ki_BSE, idx_BKTM, ok_BKTM, block_size=self.block_size,
                                 causal=self.causal, scale=d ** -0.5, q_seg_BT=seg_BT,
                                 k_seg_BS=seg_BT, precision=self.precision)
            return out, loss

        # aux path: the aux loss needs token-level scores and weights, so they are materialised
        index_scores = _index_logits(qi_BTKE, ki_BSE, self.causal, precision=self.precision)
        if seg_BT is not None:
            index_scores = jnp.where(core.segment_keep(seg_BT, seg_BT), index_scores,
                                     core.mask_value(index_scores.dtype))
        padded = jnp.pad(index_scores, ((0, 0), (0, 0), (0, 0), (0, nb * self.block_size - t)),
                         constant_values=core.mask_value(index_scores.dtype))
        block_keep_BKTJ = select_blocks(
            padded.reshape(b, kg, t, nb, self.block_size).max(axis=-1), **sel)
        probs, aux = materialised_aux(q_BTNH, k_BSKH, qi_BTKE, ki_BSE, block_keep_BKTJ, seg_BT,
                                      block_size=self.block_size, causal=self.causal,
                                      scale=d ** -0.5, precision=self.precision,
                                      index_scores=index_scores)
        # the weights are materialised for the aux loss anyway, so the output reuses them (every
        # impl computes the same numbers; the default path above is where impls differ)
        out = self.proj(core.attend(probs, v_BSKV, precision=self.precision).reshape(
            b, t, self.dim))
        if index_loss is None:
            return out, aux
        return out, aux, _masked_mean_loss(aux, seg_BT)

    def _branches(self, x: Array, pos: Array) -> tuple[Array, Array, Array, Array, Array]:
        """Both branches at RoPE positions ``pos`` ((T,) or (B, T)): queries (B, T, N, H), keys
        (B, T, K, H), values (B, T, K, V), index queries (B, T, K, E), index keys (B, T, E)."""
        b, t, _ = x.shape
        kg, d = self.num_kv_groups, self.head_dim
        di, rd = self.resolved_dims()
        xd = jax.lax.stop_gradient(x)  # the index branch is trained only by the aux loss
        q_BTNH = core.rms_norm(self.q(x).reshape(b, t, self.num_heads, d), self.q_norm)
        k_BTKH = core.rms_norm(self.k(x).reshape(b, t, kg, d), self.k_norm)
        v_BTKV = self.v(x).reshape(b, t, kg, d)
        qi_BTKE = core.rms_norm(self.idx_q(xd).reshape(b, t, kg, di), self.idx_q_norm)
        ki_BT1E = core.rms_norm(self.idx_k(xd).reshape(b, t, 1, di), self.idx_k_norm)
        if self.use_rope:
            cos, sin = core.rope_tables(pos, rd, self.rope_theta, q_BTNH.dtype)
            q_BTNH, k_BTKH = (core.apply_rope(a, cos, sin) for a in (q_BTNH, k_BTKH))
            cos, sin = core.rope_tables(pos, rd, self.rope_theta, qi_BTKE.dtype)
            qi_BTKE, ki_BT1E = (core.apply_rope(a, cos, sin) for a in (qi_BTKE, ki_BT1E))
        return q_BTNH, k_BTKH, v_BTKV, qi_BTKE, ki_BT1E[:, :, 0]

    def _decode_step(self, x: Array, lengths: Array | None) -> Array:
        """One decode call: append the chunk's keys, values and index key, pick each query's
        blocks from the cached index keys and attend over the picked blocks' tokens only."""
        step = cache.begin(self, "MiniMaxSparseAttention", x, lengths, sized_by="key")
        b, n, _ = step.x.shape
        q_BTNH, k_BTKH, v_BTKV, qi_BTKE, ki_BTE = self._branches(step.x, step.pos_BT)
        k_BSKH = step.append("key", k_BTKH)
        v_BSKV = step.append("value", v_BTKV)
        ki_BSE = step.append("index_key", ki_BTE.astype(self.selector_dtype))
        if step.initializing:  # the cache and the parameters exist; init returns zeros
            return step.finish(self.proj(jnp.zeros((b, n, self.dim), q_BTNH.dtype)))
        # the scoring reads the written cache as it is (XLA would otherwise fuse a second copy
        # of the write into the matmul's operand, and copy the whole cache to make room for it)
        ki_BSE = jax.lax.optimization_barrier(ki_BSE)
        # the selector's dense pass: the chunk's index queries against every cached index key,
        # max-pooled into blocks (positions not yet written, or after the query, score the fill)
        bs = self.block_size
        scores_BKTJ = cached_block_scores(qi_BTKE, ki_BSE, step.keep(), block_size=bs,
                                          precision=self.precision)
        idx_BKTM, ok_BKTM = block_picks_at(scores_BKTJ, step.pos_BT, block_size=bs,
                                           top_k=self.top_k, causal=True,
                                           force_current_block=self.force_current_block)
        ok_BKTM = ok_BKTM & step.ok_BT[:, None, :, None]  # tokens not appended read nothing
        out = attend_blocks(q_BTNH, k_BSKH, v_BSKV, idx_BKTM, ok_BKTM, step.pos_BT,
                            block_size=bs, scale=self.head_dim ** -0.5, precision=self.precision)
        return step.finish(self.proj(out.reshape(b, n, self.dim)))


def materialised_aux(q_BTNH: Array, k_BSKH: Array, qi_BTKE: Array, ki_BSE: Array,
                     block_keep_BKTJ: Array, seg_BT: Array | None, *, block_size: int,
                     causal: bool, scale: float, precision: core.Precision = None,
                     index_scores: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The materialised (T, T) arrays of a selection, as attnhut builds them: the main weights
    (B, K, G, T, S) and the aux dict ``msa_index_aux_loss`` takes, with the causal and segment
    rules."""
    b, t, n = q_BTNH.shape[:3]
    if index_scores is None:
        index_scores = _index_logits(qi_BTKE, ki_BSE, causal, precision=precision)
        if seg_BT is not None:
            index_scores = jnp.where(core.segment_keep(seg_BT, seg_BT), index_scores,
                                     core.mask_value(index_scores.dtype))
    keep_BKTS = jnp.repeat(block_keep_BKTJ, block_size, axis=-1)[..., :t]
    if causal:
        keep_BKTS = keep_BKTS & core.causal_mask(t, t)
    if seg_BT is not None:
        keep_BKTS = keep_BKTS & core.segment_keep(seg_BT, seg_BT)
    probs = core.attention_weights(q_BTNH, k_BSKH, keep=keep_BKTS, scale=scale,
                                   precision=precision)
    aux = {"index_scores": index_scores,
           "attn_weights": probs.astype(q_BTNH.dtype).reshape(b, n, t, t),
           "keep": keep_BKTS}
    return probs, aux


# The registry's ``msa_index_loss`` op: (q_BTNH, k_BSKH, qi_BTKE, ki_BSE, idx_BKTM, ok_BKTM, *,
# block_size, causal, scale, q_seg_BT, k_seg_BS, precision) -> scalar. ``reference`` builds
# attnhut's (T, T) arrays; ``xla`` and ``pallas`` run ``sparse_index_loss`` (the picks' gathers
# and small matmuls are XLA either way; the output's kernels are the block-sparse op's).


@registry.register("msa_index_loss", "reference")
def _index_loss_reference(q_BTNH, k_BSKH, qi_BTKE, ki_BSE, idx_BKTM, ok_BKTM, *, block_size,
                          causal, scale, q_seg_BT=None, k_seg_BS=None, precision=None):
    del k_seg_BS  # one row: the keys' segments are the queries'
    keep_BKTJ = keep_from_picks(idx_BKTM, ok_BKTM, -(-ki_BSE.shape[1] // block_size))
    _, aux = materialised_aux(q_BTNH, k_BSKH, qi_BTKE, ki_BSE, keep_BKTJ, q_seg_BT,
                              block_size=block_size, causal=causal, scale=scale,
                              precision=precision)
    return _masked_mean_loss(aux, q_seg_BT)


registry.register("msa_index_loss", "xla")(sparse_index_loss)
registry.register("msa_index_loss", "pallas")(sparse_index_loss)


def _msa_kl_BKT(index_scores: Array, attn_weights: Array, keep: Array, eps: float) -> Array:
    """The KL of ``msa_index_aux_loss`` per query and group, (B, K, T)."""
    b, n, t, s = attn_weights.shape
    groups = index_scores.shape[1]
    if n % groups != 0:
        raise ValueError(f"msa_index_aux_loss: attn_weights heads {n} not divisible by index "
                         f"groups {groups}")
    teacher = jax.lax.stop_gradient(attn_weights).astype(jnp.float32)
    teacher = teacher.reshape(b, groups, n // groups, t, s).mean(axis=2)
    scores = jnp.where(keep, index_scores.astype(jnp.float32), core.mask_value(jnp.float32))
    log_student = jax.nn.log_softmax(scores, axis=-1)
    kl = teacher * (jnp.log(jnp.maximum(teacher, eps)) - log_student)
    kl = jnp.where(teacher > 0, kl, 0.0)
    return kl.sum(axis=-1)


def _masked_mean_loss(aux: dict[str, Array], seg_BT: Array | None) -> Array:
    """``msa_index_aux_loss`` of the materialised arrays, the mean over non-padding (query,
    group) pairs when packed."""
    if seg_BT is None:
        return msa_index_aux_loss(**aux)
    kl_BKT = _msa_kl_BKT(aux["index_scores"], aux["attn_weights"], aux["keep"], 1e-9)
    w_BT = core.query_weights(seg_BT, *seg_BT.shape)
    return (kl_BKT * w_BT[:, None]).sum() / jnp.maximum(kl_BKT.shape[1] * w_BT.sum(), 1.0)


def msa_index_aux_loss(index_scores: Array, attn_weights: Array, keep: Array,
                       eps: float = 1e-9) -> Array:
    """KL(teacher || student) aligning the index branch with the main branch (attnhut 0.5.0).

    teacher: the main attention (a constant) averaged over each group's heads, (B, K, T, S);
    student: ``softmax(index_scores)`` over the same selected support ``keep``. Summed over keys,
    averaged over queries and groups. Only the index branch receives gradient.
    """
    return _msa_kl_BKT(index_scores, attn_weights, keep, eps).mean()

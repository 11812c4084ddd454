"""On-device metadata for the token-sparse kernels: selection bitmask and tile visit tables.

Everything is jnp (no host round trip): the selection comes from the indexer inside the traced
program.

*Bitmask* ``bits`` (B, T, Z) int32, ``Z = ceil(S / 32)`` words: bit ``s % 32`` of word ``s // 32``
says query ``t`` selected key ``s``. Built by one scatter-add of ``1 << (s % 32)`` per selected
(query, key): the entries of a row are distinct, so adding powers of two is or-ing them.
Auxiliary memory: B * T * S / 32 words (plus the tables below), e.g. 128 MiB at T = S = 32768.
It turns "is key s in query t's set" into one word load and a shift, for a whole (query tile,
key block) at once, which is what lets a tile share its key loads (see ``kernel.py``).

*Key blocks* are ``block_k = 32 * words_per_block`` consecutive keys. A *forward table* lists,
per (batch, query tile of ``block_q``), the key blocks that any query of the tile reads: a
selected key, or (with a window) a key of the tile's window range; a *backward table* lists,
per key block, the query tiles that read it. Rows are ``[count, idx_0, ..., idx_{M-1}]``,
indices ascending, the tail padded by repeating the last valid index (a TPU pipeline then skips
the copy), compacted by ``common.compact`` as the block-sparse tables are. ``membership``
decodes a block's words inside the kernels.

*Packed sequences* (segment ids ``q_seg_BT``, ``k_seg_BS``): ``segment_indices`` first drops
every selected key of another segment or of padding (O(T * M) gathers), so the bitmask and the
tables hold only readable selections; a window block enters a tile's row only if its keys' ids
can meet the tile's (``tile_visits``), so blocks of other segments are skipped; the kernels
then and each block's membership with ``common.same_segment`` on the tile's query ids and the block's
key ids, which keeps the window (positional, not in the bitmask) exactly inside each query's
segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import compact, same_segment

Array = jax.Array
WORD = 32
_LOG2_WORD = WORD.bit_length() - 1


def key_bitmask(indices_BTM: Array, s: int) -> Array:
    """(B, T, Z = ceil(S / 32)) int32 selection bitmask; entries outside [0, S) are ignored."""
    b, t, _ = indices_BTM.shape
    nw = -(-s // WORD)
    idx = indices_BTM.astype(jnp.int32)
    ok = (idx >= 0) & (idx < s)
    word = jnp.where(ok, idx // WORD, nw)  # invalid entries land in a dropped extra word
    bit = jnp.where(ok, jnp.left_shift(jnp.int32(1), idx % WORD), 0)
    bits = jnp.zeros((b, t, nw + 1), jnp.int32)
    bits = bits.at[jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], word].add(bit)
    return bits[..., :nw]


def segment_indices(indices_BTM: Array, q_seg_BT: Array, k_seg_BS: Array) -> Array:
    """``indices_BTM`` with every entry that is not a key of its query's segment set to -1 (empty
    slots stay empty)."""
    b, t, m = indices_BTM.shape
    s = k_seg_BS.shape[1]
    idx = indices_BTM.astype(jnp.int32)
    ok = (idx >= 0) & (idx < s)
    k_seg_BTM = jnp.take_along_axis(k_seg_BS, jnp.where(ok, idx, 0).reshape(b, t * m),
                                    axis=1).reshape(b, t, m)
    return jnp.where(ok & same_segment(q_seg_BT[:, :, None], k_seg_BTM), idx, -1)


def tiled_segments(q_seg_BT: Array | None, k_seg_BS: Array | None, b: int, qt: int,
                   bq: int) -> tuple[Array, Array]:
    """The segment ids a map over (batch, query tile) carries: queries as (B, QT, bq), padded
    queries in segment 0 (they read and select nothing), and the keys (B, S). Without segment
    ids, (B, QT, 1) and (B, 1) placeholders that no step reads."""
    if q_seg_BT is None:
        return jnp.zeros((b, qt, 1), jnp.int32), jnp.zeros((b, 1), jnp.int32)
    pad = qt * bq - q_seg_BT.shape[1]
    return jnp.pad(q_seg_BT, ((0, 0), (0, pad))).reshape(b, qt, bq), k_seg_BS


def membership(words, q_idx: Array, col: Array, start, *, s_len: int, t_len: int,
               window: int | None, window_start: int) -> Array:
    """Bool, shaped as ``q_idx`` broadcast against ``col``: query ``q_idx`` reads key
    ``start + col`` of a key block (``col`` the offset inside the block, int32).

    ``words[w]``: the bitmask word of keys ``start + 32 w ...`` for each query, shaped to
    broadcast the same way. A key is read if its bit is set, or if it lies in the query's raw
    window. Lane and slot come from bit operations (``col % 32`` and ``col // 32`` lower through
    ``sign`` in Mosaic, per TPU generation, so they would not export without a device).
    """
    lane = col & (WORD - 1)
    slot = jax.lax.shift_right_logical(col, jnp.int32(_LOG2_WORD))
    hit = jnp.zeros(jnp.broadcast_shapes(q_idx.shape, col.shape), jnp.bool_)
    for w, word in enumerate(words):
        bit = jax.lax.shift_right_logical(word, lane) & 1
        hit = hit | ((slot == w) & (bit != 0))
    k_idx = start + col
    if window is not None:
        raw = k_idx - window_start
        hit = hit | ((raw >= 0) & (raw <= q_idx) & (raw > q_idx - window) & (q_idx < t_len))
    return hit & (k_idx < s_len)


def id_ranges(seg_BX: Array, size: int) -> tuple[Array, Array]:
    """Per group of ``size`` consecutive positions, (min, max) of the non-padding segment ids,
    (B, X / size) each; an all-padding group gets the empty range (max int, min int)."""
    b, x = seg_BX.shape
    seg = jnp.pad(seg_BX, ((0, 0), (0, -(-x // size) * size - x))).reshape(b, -1, size)
    info = jnp.iinfo(jnp.int32)
    return (jnp.where(seg != 0, seg, info.max).min(axis=-1),
            jnp.where(seg != 0, seg, info.min).max(axis=-1))


def tile_visits(bits_BTZ: Array, *, t: int, s: int, block_q: int, words_per_block: int,
                window: int | None = None, window_start: int = 0,
                q_seg_BT: Array | None = None, k_seg_BS: Array | None = None) -> Array:
    """(B, Q, J) bool: does any query of tile ``i`` read a key of block ``j``. With segment ids
    (the bitmask then holds same-segment selections only) a window block is visited only if the
    range of its keys' ids meets the range of the tile's query ids (padding ignored): blocks of
    other segments and all-padding tiles or blocks are skipped; O(B * Q * J)."""
    b, _, nw = bits_BTZ.shape
    bk = WORD * words_per_block
    qt, j = -(-t // block_q), -(-s // bk)
    bits = jnp.pad(bits_BTZ, ((0, 0), (0, qt * block_q - t), (0, j * words_per_block - nw)))
    visit = (bits != 0).reshape(b, qt, block_q, j, words_per_block).any(axis=(2, 4))
    if window is not None:
        lo_q = jnp.arange(qt) * block_q
        hi_q = jnp.minimum(lo_q + block_q, t) - 1
        lo = window_start + jnp.maximum(lo_q - window + 1, 0)
        hi = jnp.minimum(window_start + hi_q, s - 1)
        blk = jnp.arange(j)[None, :]
        win = ((blk >= (lo // bk)[:, None]) & (blk <= (hi // bk)[:, None])
               & (lo <= hi)[:, None])[None]
        if q_seg_BT is not None:
            q_lo, q_hi = id_ranges(q_seg_BT, block_q)  # (B, Q)
            k_lo, k_hi = id_ranges(k_seg_BS, bk)  # (B, J)
            win = win & (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
        visit = visit | win
    return visit


def build_tables(bits_BTZ: Array, *, t: int, s: int, block_q: int, words_per_block: int,
                 window: int | None = None, window_start: int = 0,
                 q_seg_BT: Array | None = None,
                 k_seg_BS: Array | None = None) -> tuple[Array, Array]:
    """(forward table (B, Q, J + 1), backward table (B, J, Q + 1)), int32."""
    visit = tile_visits(bits_BTZ, t=t, s=s, block_q=block_q, words_per_block=words_per_block,
                        window=window, window_start=window_start, q_seg_BT=q_seg_BT,
                        k_seg_BS=k_seg_BS)
    return compact(visit), compact(jnp.swapaxes(visit, -1, -2))

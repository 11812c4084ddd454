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
tables hold only readable selections; the kernels then and each block's membership with
``same_segment`` on the tile's query ids and the block's key ids, which is what keeps the
window (positional, not in the bitmask) inside each query's segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import compact

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


def same_segment(q_seg: Array, k_seg: Array) -> Array:
    """Bool, ``q_seg`` broadcast against ``k_seg``: the key is of the query's segment and is not
    padding (id 0)."""
    return (k_seg == q_seg) & (k_seg != 0)


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


def tile_visits(bits_BTZ: Array, *, t: int, s: int, block_q: int, words_per_block: int,
                window: int | None = None, window_start: int = 0) -> Array:
    """(B, Q, J) bool: does any query of tile ``i`` read a key of block ``j``."""
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
        win = (blk >= (lo // bk)[:, None]) & (blk <= (hi // bk)[:, None]) & (lo <= hi)[:, None]
        visit = visit | win[None]
    return visit


def build_tables(bits_BTZ: Array, *, t: int, s: int, block_q: int, words_per_block: int,
                 window: int | None = None, window_start: int = 0) -> tuple[Array, Array]:
    """(forward table (B, Q, J + 1), backward table (B, J, Q + 1)), int32."""
    visit = tile_visits(bits_BTZ, t=t, s=s, block_q=block_q, words_per_block=words_per_block,
                        window=window, window_start=window_start)
    return compact(visit), compact(jnp.swapaxes(visit, -1, -2))

"""On-device builders: selections -> block tables the kernels walk.

Everything here is jnp (no host round trip): MiniMax's selection depends on the input, so the
tables must be computed inside the traced program.

Terms: a *selection* ``block_keep`` (B, K, T, J) bool says which key blocks (``block_k`` keys
each) query token ``t`` of kv group ``k`` may read; the kernels add token-level rules (causality,
key validity) inside the visited blocks. A *forward table* lists, per (batch, group, query tile
of ``block_q`` tokens), the key blocks that any token of the tile reads; a *backward table* lists,
per key block, the query tiles that read it. Row layout: ``[count, idx_0, ..., idx_{M-1}]`` with
indices ascending and the tail padded by repeating the last valid index (a repeated block index
makes a TPU pipeline skip the copy), so one int32 row carries both (``common.compact``).

Packed sequences: ``segment_block_keep`` removes from a selection the key blocks that hold no key
of the query's segment (per-block min/max of the key segment ids, O(T * J)); every impl calls it
once on its operands (``kernel.checked_operands``), so the tables never list those blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import compact

Array = jax.Array


def segment_block_keep(block_keep_BKTJ: Array, q_seg_BT: Array, k_seg_BS: Array, *,
                       block_k: int) -> Array:
    """``block_keep`` without the key blocks that hold no key of the query's segment.

    Per key block the smallest and largest non-zero key id (id 0 is padding, read by no one; a
    block of padding only has an empty range); query ``t`` keeps block ``j`` only if its id is
    non-zero and inside that range. Exact (the block holds a key of the query's segment) when
    the non-zero key ids do not decrease along the sequence; for any other layout a superset,
    which the kernels' token rule then refines. O(B * K * T * J), no (T, S) array.
    """
    b, j = block_keep_BKTJ.shape[0], block_keep_BKTJ.shape[-1]
    big = jnp.iinfo(jnp.int32).max
    seg = _pad_keys(k_seg_BS.astype(jnp.int32), j * block_k).reshape(b, j, block_k)
    lo_BJ = jnp.where(seg != 0, seg, big).min(axis=-1)
    hi_BJ = jnp.where(seg != 0, seg, -big).max(axis=-1)
    q_BT1 = q_seg_BT.astype(jnp.int32)[:, :, None]
    has_BTJ = (q_BT1 != 0) & (lo_BJ[:, None, :] <= q_BT1) & (q_BT1 <= hi_BJ[:, None, :])
    return block_keep_BKTJ & has_BTJ[:, None]


def _pad_keys(x_BS: Array, length: int) -> Array:
    """(B, S) -> (B, length): the key axis padded with zeros (padding id, no sink)."""
    return jnp.pad(x_BS, ((0, 0), (0, length - x_BS.shape[1])))


def tile_visits(block_keep_BKTJ: Array, *, block_q: int, block_k: int, causal: bool,
                q_pos: Array | None = None, k_pos: Array | None = None, window: int | None = None,
                num_sink_keys: int = 0, k_sink_BS: Array | None = None) -> Array:
    """(B, K, Q, J) bool: does any token of query tile ``i`` read key block ``j``.

    Blocks that the token rules exclude for the whole tile are dropped too, so a selection that
    names them costs nothing: when ``causal``, blocks whose first key position is after the
    tile's last query position; with a ``window``, blocks wholly before every query's window
    that hold no sink key (one of the first ``num_sink_keys``, or flagged in ``k_sink_BS``
    (B, S) for that batch row). Positions default to ``arange(T)`` and ``arange(J * block_k)``
    (the kernels always pass their own).
    """
    b, k, t, j = block_keep_BKTJ.shape
    s = j * block_k if k_pos is None else k_pos.shape[0]
    qt = -(-t // block_q)
    keep = jnp.pad(block_keep_BKTJ, ((0, 0), (0, 0), (0, qt * block_q - t), (0, 0)))
    visit = keep.reshape(b, k, qt, block_q, j).any(axis=3)
    if not causal and window is None:
        return visit
    q_pos = jnp.arange(t) if q_pos is None else q_pos
    k_pos = jnp.arange(s) if k_pos is None else k_pos
    big = jnp.iinfo(jnp.int32).max
    qp = jnp.pad(q_pos.astype(jnp.int32), (0, qt * block_q - t), mode="edge")
    kp = jnp.pad(k_pos.astype(jnp.int32), (0, j * block_k - s), mode="edge").reshape(j, block_k)
    q_hi = qp.reshape(qt, block_q).max(axis=1)
    q_lo = qp.reshape(qt, block_q).min(axis=1)
    if causal:
        visit = visit & (kp.min(axis=1)[None, :] <= q_hi[:, None])
    if window is not None:
        has_sink_BJ = (jnp.arange(j) * block_k < num_sink_keys)[None, :]
        if k_sink_BS is not None:
            flags = _pad_keys(k_sink_BS.astype(jnp.int32), j * block_k)
            has_sink_BJ = has_sink_BJ | (flags.reshape(b, j, block_k).max(axis=-1) != 0)
        in_window = kp.max(axis=1)[None, :] > jnp.where(q_lo > -big + window, q_lo - window,
                                                         -big)[:, None]
        visit = visit & (in_window[None, None] | has_sink_BJ[:, None, None, :])
    return visit


def build_tables(block_keep_BKTJ: Array, *, block_q: int, block_k: int, causal: bool,
                 q_pos: Array | None = None, k_pos: Array | None = None,
                 window: int | None = None, num_sink_keys: int = 0,
                 k_sink_BS: Array | None = None) -> tuple[Array, Array]:
    """(forward table (B, K, Q, J + 1), backward table (B, K, J, Q + 1)), int32."""
    visit = tile_visits(block_keep_BKTJ, block_q=block_q, block_k=block_k, causal=causal,
                        q_pos=q_pos, k_pos=k_pos, window=window, num_sink_keys=num_sink_keys,
                        k_sink_BS=k_sink_BS)
    return compact(visit), compact(jnp.swapaxes(visit, -1, -2))


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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import compact

Array = jax.Array


def tile_visits(block_keep_BKTJ: Array, *, block_q: int, block_k: int, causal: bool,
                q_pos: Array | None = None, k_pos: Array | None = None, window: int | None = None,
                num_sink_keys: int = 0) -> Array:
    """(B, K, Q, J) bool: does any token of query tile ``i`` read key block ``j``.

    Blocks that the token rules exclude for the whole tile are dropped too, so a selection that
    names them costs nothing: when ``causal``, blocks whose first key position is after the
    tile's last query position; with a ``window``, blocks wholly before every query's window
    that hold no sink key. Positions default to ``arange(T)`` and ``arange(J * block_k)`` (the
    kernels always pass their own).
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
        has_sink = jnp.arange(j) * block_k < num_sink_keys
        in_window = kp.max(axis=1)[None, :] > jnp.where(q_lo > -big + window, q_lo - window,
                                                         -big)[:, None]
        visit = visit & (in_window | has_sink[None, :])
    return visit


def build_tables(block_keep_BKTJ: Array, *, block_q: int, block_k: int, causal: bool,
                 q_pos: Array | None = None, k_pos: Array | None = None,
                 window: int | None = None, num_sink_keys: int = 0) -> tuple[Array, Array]:
    """(forward table (B, K, Q, J + 1), backward table (B, K, J, Q + 1)), int32."""
    visit = tile_visits(block_keep_BKTJ, block_q=block_q, block_k=block_k, causal=causal,
                        q_pos=q_pos, k_pos=k_pos, window=window, num_sink_keys=num_sink_keys)
    return compact(visit), compact(jnp.swapaxes(visit, -1, -2))


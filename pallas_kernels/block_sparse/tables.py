"""On-device builders: selections -> block tables the kernels walk.

Everything here is jnp (no host round trip): MiniMax's selection depends on the input, so the
tables must be computed inside the traced program.

Terms: a *selection* ``block_keep`` (B, K, T, J) bool says which key blocks (``block_k`` keys
each) query token ``t`` of kv group ``k`` may read; the kernels add token-level rules (causality,
key validity) inside the visited blocks. A *forward table* lists, per (batch, group, query tile
of ``block_q`` tokens), the key blocks that any token of the tile reads; a *backward table* lists,
per key block, the query tiles that read it. Row layout: ``[count, idx_0, ..., idx_{M-1}]`` with
indices ascending and the tail padded by repeating the last valid index (a repeated block index
makes a TPU pipeline skip the copy), so one int32 row carries both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _compact(visit: Array) -> Array:
    """(..., M) bool -> (..., M + 1) int32 rows ``[count, visited indices ascending, padding]``."""
    m = visit.shape[-1]
    count = visit.sum(axis=-1, dtype=jnp.int32)
    order = jnp.argsort(~visit, axis=-1, stable=True).astype(jnp.int32)  # visited first, in order
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    pos = jnp.arange(m, dtype=jnp.int32)
    order = jnp.where(pos < count[..., None], order, last)
    return jnp.concatenate([count[..., None], order], axis=-1)


def tile_visits(block_keep_BKTJ: Array, *, block_q: int, block_k: int, causal: bool,
                q_offset: int = 0) -> Array:
    """(B, K, Qt, J) bool: does any token of query tile ``i`` read key block ``j``.

    ``causal`` also drops blocks that lie wholly after the tile's last query (query ``t`` sees
    keys ``<= t + q_offset``), so a selection that names future blocks costs nothing.
    """
    b, k, t, j = block_keep_BKTJ.shape
    qt = -(-t // block_q)
    keep = jnp.pad(block_keep_BKTJ, ((0, 0), (0, 0), (0, qt * block_q - t), (0, 0)))
    visit = keep.reshape(b, k, qt, block_q, j).any(axis=3)
    if causal:
        last_q = jnp.minimum((jnp.arange(qt) + 1) * block_q, t) - 1 + q_offset
        visit = visit & (jnp.arange(j)[None, :] * block_k <= last_q[:, None])
    return visit


def build_tables(block_keep_BKTJ: Array, *, block_q: int, block_k: int, causal: bool,
                 q_offset: int = 0) -> tuple[Array, Array]:
    """(forward table (B, K, Qt, J + 1), backward table (B, K, J, Qt + 1)), int32."""
    visit = tile_visits(block_keep_BKTJ, block_q=block_q, block_k=block_k, causal=causal,
                        q_offset=q_offset)
    return _compact(visit), _compact(jnp.swapaxes(visit, -1, -2))


def blocks_from_token_mask(keep_BKTS: Array, block_k: int) -> Array:
    """(B, K, T, J) block selection covering a token-level keep mask (any key of the block)."""
    b, k, t, s = keep_BKTS.shape
    j = -(-s // block_k)
    keep = jnp.pad(keep_BKTS, ((0, 0), (0, 0), (0, 0), (0, j * block_k - s)))
    return keep.reshape(b, k, t, j, block_k).any(axis=-1)

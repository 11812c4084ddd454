"""Lightning indexer fused with its top-k: each query's ``top_k`` keys without a (T, S) array.

``I[t, s] = sum_i w[t, i] * ReLU(q[t, i] . k[s])``. A sequential ``lax.map`` over (batch, query
tile). For each query tile we walk its key tiles in ascending order, score a tile in float32,
give invalid keys (causal rule on positions, padding, the segment rule) the fill value and
merge with a running (tile, top_k) buffer: ``lax.top_k(concat([running, new]))``. Equal values
come out lower position first, and the running buffer holds lower key indices than the new tile
while itself being ordered (value descending, index ascending), so the merge keeps exactly the
order of one ``lax.top_k`` over the whole row: the selection equals
``reference.indexer_topk_reference`` bit for bit whenever the scores are equal bit for bit
(tested on integer-valued inputs, where they are exact), ties included.

Causal skipping: keys after the last index any query of the tile may select are never scored.
The tile picks (``lax.switch``, only the taken branch runs) the shortest of ``num_ranges``
static key-range lengths (steps of at least ``min_range`` keys) that holds every valid key of
the tile, and walks that range in key tiles of ``block_k``. Packed sequences skip from the
front too: the range then starts at the tile's first key whose segment id lies within the
range of the tile's query ids (O(S) per tile to find), so a tile walks about its own
segments' keys instead of the whole causal prefix. Keys outside the range are invalid for the
whole tile, and the walk stays in ascending key order; a row with fewer than ``top_k`` valid
keys marks its extra picks ``-1`` either way, so skipping changes nothing.
Working memory is O(block_q * (block_k + top_k)) per step; the outputs are O(T * top_k).

Valid scores are assumed finite and above the fill value (``finfo(float32).min``); a valid key
scoring exactly the fill would rank like an invalid one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..common import F32, FILL, check_segments, same_segment
from .reference import positions
from .tables import tiled_segments

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class IndexerBlocks:
    """Tiling of the fused top-k. Each key tile costs one ``lax.top_k`` over ``top_k + block_k``
    columns; on CPU that is a partial sort whose fixed cost (sorting the ``top_k`` survivors)
    dominates, so few wide key tiles are fastest there."""

    block_q: int = 64
    block_k: int = 8192
    num_ranges: int = 16
    min_range: int = 512  # shorter key sequences get one prefix (fewer branches to compile)


def _tile_scores(q_TIE: Array, k_SE: Array, w_TI: Array, precision) -> Array:
    """(block_q, block_k) float32 scores (operands upcast: scores are ranked in float32, as by
    ``indexer_scores_reference``)."""
    relu_TIS = jax.nn.relu(jnp.einsum("TIE,SE->TIS", q_TIE.astype(F32), k_SE.astype(F32),
                                      precision=precision))
    return jnp.einsum("TI,TIS->TS", w_TI.astype(F32), relu_TIS, precision=precision)


def indexer_topk(q_BTIE: Array, k_BSE: Array, w_BTI: Array, top_k: int, *, causal: bool,
                 q_pos_T: Array | None = None, k_pos_S: Array | None = None,
                 q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                 blocks: IndexerBlocks = IndexerBlocks(),
                 precision: jax.lax.PrecisionLike = None) -> tuple[Array, Array]:
    """(indices (B, T, min(top_k, S)) int32, -1 for picks that are not valid keys; their scores).

    Equals ``indexer_topk_reference`` (columns in descending score order, ties towards the
    lower key index; invalid picks ``-1`` with the fill score). Positions default to
    ``arange(T) + S - T`` and ``arange(S)``; ``causal`` keeps ``k_pos <= q_pos``; segment ids
    ``q_seg_BT`` (B, T), ``k_seg_BS`` (B, S) (both or neither) keep ``k_seg == q_seg != 0``
    (a padding query selects nothing). No gradient flows through a selection; the scores are
    returned for inspection only. Scores are float32 whatever the input dtype; ``precision``
    reaches their matrix products.
    """
    q_BTIE, k_BSE, w_BTI = (jax.lax.stop_gradient(a) for a in (q_BTIE, k_BSE, w_BTI))
    b, t, ni, e = q_BTIE.shape
    s = k_BSE.shape[1]
    m = min(top_k, s)
    bq = min(blocks.block_q, t)
    qt = -(-t // bq)
    tp = qt * bq
    q_seg_BT, k_seg_BS, _ = check_segments("indexer_topk", b, t, s, q_seg_BT, k_seg_BS)
    packed = q_seg_BT is not None
    qseg_BQT, kseg_BS = tiled_segments(q_seg_BT, k_seg_BS, b, qt, bq)
    q_pos, k_pos = positions(t, s, q_pos_T, k_pos_S)
    qp_QT = jnp.pad(q_pos, (0, tp - t), mode="edge").reshape(qt, bq)
    q_BQTIE = jnp.pad(q_BTIE, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, qt, bq, ni, e)
    w_BQTI = jnp.pad(w_BTI, ((0, 0), (0, tp - t), (0, 0))).reshape(b, qt, bq, ni)
    step = max(-(-s // blocks.num_ranges), blocks.min_range)
    skip = causal or packed  # the tile's valid keys may be a strict sub-range of [0, S)
    ranges = sorted({min(s, step * i) for i in range(1, blocks.num_ranges + 1)}) if skip else [s]
    s_idx = jnp.arange(s, dtype=jnp.int32)

    def batch(xs):
        q_QTIE, w_QTI, k_SE, qseg_QT, kseg_S = xs

        def tile(ys):
            q_TIE, w_TI, qp_T, qseg_T = ys

            def merge(carry, start, size):
                vals_TM, idx_TM = carry
                sc_TS = _tile_scores(q_TIE, jax.lax.dynamic_slice_in_dim(k_SE, start, size), w_TI,
                                     precision)
                cols_S = start + jnp.arange(size, dtype=jnp.int32)
                if causal:
                    ok_TS = (jax.lax.dynamic_slice_in_dim(k_pos, start, size)[None, :]
                             <= qp_T[:, None])
                    sc_TS = jnp.where(ok_TS, sc_TS, FILL)
                if packed:
                    kseg_S1 = jax.lax.dynamic_slice_in_dim(kseg_S, start, size)
                    ok_TS = same_segment(qseg_T[:, None], kseg_S1[None, :])
                    sc_TS = jnp.where(ok_TS, sc_TS, FILL)
                vals_TM, pick_TM = jax.lax.top_k(jnp.concatenate([vals_TM, sc_TS], axis=1), m)
                cat_i = jnp.concatenate([idx_TM, jnp.broadcast_to(cols_S, sc_TS.shape)], axis=1)
                return vals_TM, jnp.take_along_axis(cat_i, pick_TM, axis=1)

            def prefix(r):
                def walk(carry, lo):  # r keys in ascending order from min(lo, S - r)
                    base = jnp.minimum(lo, s - r)
                    bk = min(blocks.block_k, r)
                    full, rem = divmod(r, bk)
                    carry, _ = jax.lax.scan(lambda c, j: (merge(c, base + j * bk, bk), None),
                                            carry, jnp.arange(full, dtype=jnp.int32))
                    return merge(carry, base + full * bk, rem) if rem else carry
                return walk

            init = (jnp.full((bq, m), -jnp.inf, F32), jnp.full((bq, m), -1, jnp.int32))
            if skip:  # [lo, hi): the keys some query of the tile may select
                ok_S = jnp.ones((s,), bool)
                if causal:
                    ok_S = k_pos <= qp_T.max()
                lo = jnp.int32(0)
                if packed:  # keys whose id lies in the range of the tile's (non-padding) ids
                    info = jnp.iinfo(jnp.int32)
                    q_lo = jnp.where(qseg_T != 0, qseg_T, info.max).min()
                    q_hi = jnp.where(qseg_T != 0, qseg_T, info.min).max()
                    ok_S = ok_S & (kseg_S >= q_lo) & (kseg_S <= q_hi) & (kseg_S != 0)
                    lo = jnp.where(ok_S, s_idx, s).min()
                hi = jnp.where(ok_S, s_idx + 1, 0).max()
                branch = jnp.searchsorted(jnp.asarray(ranges, jnp.int32), jnp.maximum(hi - lo, 0))
                vals_TM, idx_TM = jax.lax.switch(branch, [prefix(r) for r in ranges], init, lo)
            else:
                vals_TM, idx_TM = prefix(s)(init, jnp.int32(0))
            ok_TM = idx_TM >= 0
            if causal:
                ok_TM = ok_TM & (jnp.take(k_pos, jnp.maximum(idx_TM, 0)) <= qp_T[:, None])
            if packed:
                kseg_TM = jnp.take(kseg_S, jnp.maximum(idx_TM, 0))
                ok_TM = ok_TM & same_segment(qseg_T[:, None], kseg_TM)
            return jnp.where(ok_TM, idx_TM, -1), jnp.where(ok_TM, vals_TM, FILL)

        return jax.lax.map(tile, (q_QTIE, w_QTI, qp_QT, qseg_QT))

    idx_BQTM, vals_BQTM = jax.lax.map(batch, (q_BQTIE, w_BQTI, k_BSE, qseg_BQT, kseg_BS))
    return idx_BQTM.reshape(b, tp, m)[:, :t], vals_BQTM.reshape(b, tp, m)[:, :t]

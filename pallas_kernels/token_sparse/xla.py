"""Token-gather attention in plain XLA: the fast exact path where no Pallas kernel runs natively.

A sequential ``lax.map`` over (batch, query tile of ``block_q``). Per tile, with M selected keys
per query and the raw window (if any) as one contiguous slab:

* logits of the selected keys, one of two ways, picked per tile by ``lax.switch`` (only the
  taken branch runs on CPU):
  - *prefix GEMM*: when every selected index of the tile is below a static bound R (R one of
    ``num_ranges`` steps of at least ``min_range`` keys, up to ``dense_factor * M``), one
    (G * bq, H) x (H, R) matmul per kv group over the key prefix, then the M logits per query
    are picked out of it (``take_along_axis``). On CPU a matmul streams K at full speed while
    gathering 2 KB rows per (query, key) pair is bound by scattered reads, so below about
    64 * M keys the wasted products are cheaper than the gather (measured: 0.33 s against
    0.9 s for the logits at T = 8192, M = 256, 8 heads of 64); causal selections make early
    tiles use short prefixes.
  - *row gather*: the (bq, M, K * H) selected rows of K, then a batched matmul.
* the window logits: one (bq + window - 1)-key ``dynamic_slice`` slab, masked per query.
* packed sequences (``q_seg_BT``, ``k_seg_BS``): the segment ids of the selected keys are
  gathered (bq, M) and those of the window slab sliced with it, and a key of another segment or
  of padding is masked out of both parts, as a key outside the selection is.
* one float32 softmax over selected keys, window keys and the sink (a selected key inside its
  query's window is dropped from the selected part, so the union is read once);
* the values of the selected keys: with one query head per kv head, a fused gather-and-reduce
  over M (XLA reads each selected V row once and never writes the gathered (bq, M, K * V)
  block); with grouped heads, a batched matmul on the gathered rows; plus the window slab's
  matmul.

Working memory per step is O(block_q * (M * K * V + N * R)); outputs O(T * M); nothing is
(T, S). Rows that neighbouring queries share are served from cache on CPU, which is this
path's form of load sharing (the Pallas kernels share explicitly, see ``kernel.py``).
Gradients are reverse mode through the map with each tile recomputed (``jax.checkpoint``), so
residuals stay O(tile); dK and dV accumulate as scatter-adds of the selected rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import F32, FILL, check_segments, default_scale, same_segment
from .tables import tiled_segments

Array = jax.Array


def _prefix_ranges(s: int, m: int, num_ranges: int, dense_factor: int,
                   min_range: int) -> list[int]:
    """Static key-prefix lengths for the prefix-GEMM branch: multiples of
    ``max(ceil(S / num_ranges), min_range)`` (short sequences get one branch, which keeps
    compile times down), at most ``dense_factor * M``."""
    step = max(-(-s // num_ranges), min_range)
    return [r for r in sorted({min(s, step * i) for i in range(1, num_ranges + 1)})
            if r <= dense_factor * m]


def token_sparse_attention_xla(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array | None,
                               indices_BTM: Array, *, scale: float | None = None,
                               sink: Array | None = None, window: int | None = None,
                               window_start: int = 0, q_seg_BT: Array | None = None,
                               k_seg_BS: Array | None = None, block_q: int = 128,
                               num_ranges: int = 8, dense_factor: int = 64, min_range: int = 512,
                               precision: jax.lax.PrecisionLike = None) -> Array:
    """Equals ``token_sparse_attention_reference`` (see ``reference.py`` for the semantics,
    segment ids included). ``precision`` reaches every matrix product (all in float32, see
    below)."""
    b, t, n, h = q_BTNH.shape
    s, kg = k_BSKH.shape[1], k_BSKH.shape[2]
    q_seg_BT, k_seg_BS, _ = check_segments("token_sparse_attention_xla", b, t, s, q_seg_BT, k_seg_BS)
    packed = q_seg_BT is not None
    shared = v_BSKV is None
    vw = h if shared else v_BSKV.shape[-1]
    g, m = n // kg, indices_BTM.shape[-1]
    scale = default_scale(h, scale)
    bq = min(block_q, t)
    qt = -(-t // bq)
    tp = qt * bq
    q_BQTKGH = jnp.pad(q_BTNH, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, qt, bq, kg, g, h)
    # float32 math throughout (XLA:CPU has no bf16 x bf16 -> f32 dot; a no-op for f32 inputs)
    q_BQKGTH = q_BQTKGH.transpose(0, 1, 3, 4, 2, 5).astype(F32)
    idx_BQTM = jnp.pad(indices_BTM.astype(jnp.int32), ((0, 0), (0, tp - t), (0, 0)),
                       constant_values=-1).reshape(b, qt, bq, m)
    k_rows = k_BSKH.reshape(b, s, kg * h).astype(F32)  # (B, S, K * H): one row per key
    k_BKSH = k_BSKH.transpose(0, 2, 1, 3).astype(F32)  # for the prefix GEMM
    v_rows = k_rows if shared else v_BSKV.reshape(b, s, kg * vw).astype(F32)
    lw = 0 if window is None else min(window + bq - 1, s)  # keys in a tile's window slab
    ranges = _prefix_ranges(s, m, num_ranges, dense_factor, min_range)
    sink_KG = None if sink is None else sink.astype(F32).reshape(kg, g)
    qseg_BQT, kseg_BS = tiled_segments(q_seg_BT, k_seg_BS, b, qt, bq)

    def batch(xs):
        q_QKGTH, idx_QTM, krows_b, k_KSH, vrows_b, qseg_QT, kseg_S = xs

        def tile(ys):
            q_KGTH, idx_TM, t0, qseg_T = ys
            t_T = t0 + jnp.arange(bq, dtype=jnp.int32)
            sel_TM = (idx_TM >= 0) & (idx_TM < s)
            if packed:  # the segment rule on the selected keys
                kseg_TM = jnp.take(kseg_S, jnp.clip(idx_TM, 0, s - 1), axis=0)
                sel_TM = sel_TM & same_segment(qseg_T[:, None], kseg_TM)
            if window is not None:  # selected keys inside the window are read there
                raw_TM = idx_TM - window_start
                sel_TM = sel_TM & ~((raw_TM >= 0) & (raw_TM <= t_T[:, None])
                                    & (raw_TM > t_T[:, None] - window))
            rows_TM = jnp.where(sel_TM, idx_TM, 0)

            def prefix(r):
                def logits(q_KGTH, rows_TM):
                    s_KGTS = jnp.einsum("KGTH,KSH->KGTS", q_KGTH, k_KSH[:, :r],
                                        precision=precision)
                    pick_KGTM = jnp.broadcast_to(rows_TM[None, None], (kg, g, bq, m))
                    return jnp.take_along_axis(s_KGTS, pick_KGTM, axis=-1)
                return logits

            def gathered(q_KGTH, rows_TM):
                k_KTMH = jnp.take(krows_b, rows_TM, axis=0).reshape(bq, m, kg, h).transpose(
                    2, 0, 1, 3)
                return jnp.einsum("KGTH,KTMH->KGTM", q_KGTH, k_KTMH, precision=precision)

            hi = jnp.where(sel_TM, idx_TM + 1, 0).max()
            branch = jnp.searchsorted(jnp.asarray(ranges + [s + 1], jnp.int32), hi)
            s_KGTM = jax.lax.switch(branch, [prefix(r) for r in ranges] + [gathered], q_KGTH,
                                    rows_TM)
            s_KGTM = jnp.where(sel_TM[None, None], s_KGTM * scale, FILL)
            mx_KGT = s_KGTM.max(axis=-1)
            if window is not None:
                start = jnp.clip(window_start + t0 - window + 1, 0, s - lw)
                kwin_WKH = jax.lax.dynamic_slice_in_dim(krows_b, start, lw).reshape(lw, kg, h)
                raw_W = start + jnp.arange(lw, dtype=jnp.int32) - window_start
                win_TW = ((raw_W[None, :] >= 0) & (raw_W[None, :] <= t_T[:, None])
                          & (raw_W[None, :] > t_T[:, None] - window) & (t_T[:, None] < t))
                if packed:  # and on the window slab
                    kseg_W = jax.lax.dynamic_slice_in_dim(kseg_S, start, lw)
                    win_TW = win_TW & same_segment(qseg_T[:, None], kseg_W[None, :])
                s_KGTW = jnp.einsum("KGTH,WKH->KGTW", q_KGTH, kwin_WKH, precision=precision)
                s_KGTW = jnp.where(win_TW[None, None], s_KGTW * scale, FILL)
                mx_KGT = jnp.maximum(mx_KGT, s_KGTW.max(axis=-1))
            if sink_KG is not None:
                mx_KGT = jnp.maximum(mx_KGT, sink_KG[:, :, None])
            mx_KGT = jax.lax.stop_gradient(mx_KGT)
            p_KGTM = jnp.where(sel_TM[None, None], jnp.exp(s_KGTM - mx_KGT[..., None]), 0.0)
            den_KGT = p_KGTM.sum(axis=-1)
            v_TMKV = jnp.take(vrows_b, rows_TM, axis=0).reshape(bq, m, kg, vw)
            if g == 1:  # fused gather-and-reduce over M (XLA:CPU keeps it one loop only
                # without a broadcast head axis; with one it is 50x slower)
                p_TMK = p_KGTM[:, 0].transpose(1, 2, 0)
                out_TKV = (p_TMK[..., None] * v_TMKV).sum(axis=1)
                out_KGTV = out_TKV[None].transpose(2, 0, 1, 3)  # G = 1
            else:  # heads of a group share each row: a batched matmul on the gathered rows
                out_KGTV = jnp.einsum("KGTM,KTMV->KGTV", p_KGTM, v_TMKV.transpose(2, 0, 1, 3),
                                      precision=precision)
            if window is not None:
                p_KGTW = jnp.where(win_TW[None, None], jnp.exp(s_KGTW - mx_KGT[..., None]), 0.0)
                den_KGT = den_KGT + p_KGTW.sum(axis=-1)
                vwin_WKV = jax.lax.dynamic_slice_in_dim(vrows_b, start, lw).reshape(lw, kg, vw)
                out_KGTV = out_KGTV + jnp.einsum("KGTW,WKV->KGTV", p_KGTW, vwin_WKV,
                                                 precision=precision)
            if sink_KG is not None:
                den_KGT = den_KGT + jnp.exp(sink_KG[:, :, None] - mx_KGT)
            return out_KGTV / jnp.where(den_KGT == 0, 1.0, den_KGT)[..., None]

        starts = jnp.arange(qt, dtype=jnp.int32) * bq
        return jax.lax.map(jax.checkpoint(tile), (q_QKGTH, idx_QTM, starts, qseg_QT))

    out_BQKGTV = jax.lax.map(batch, (q_BQKGTH, idx_BQTM, k_rows, k_BKSH, v_rows, qseg_BQT,
                                     kseg_BS))
    out_BTNV = out_BQKGTV.transpose(0, 1, 4, 2, 3, 5).reshape(b, tp, n, vw)
    return out_BTNV[:, :t].astype(q_BTNH.dtype)

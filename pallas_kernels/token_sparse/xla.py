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

from .reference import FILL

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
                               window_start: int = 0, block_q: int = 128, num_ranges: int = 8,
                               dense_factor: int = 64, min_range: int = 512) -> Array:
    """Equals ``token_sparse_attention_reference`` (see ``reference.py`` for the semantics)."""
    b, t, n, h = q_BTNH.shape
    s, kg = k_BSKH.shape[1], k_BSKH.shape[2]
    shared = v_BSKV is None
    vw = h if shared else v_BSKV.shape[-1]
    g, m = n // kg, indices_BTM.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    bq = min(block_q, t)
    qt = -(-t // bq)
    tp = qt * bq
    q = jnp.pad(q_BTNH, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q = q.reshape(b, qt, bq, kg, g, h).transpose(0, 1, 3, 4, 2, 5)  # B Qt K G bq H
    # float32 math throughout (XLA:CPU has no bf16 x bf16 -> f32 dot; a no-op for f32 inputs)
    q = q.astype(jnp.float32)
    idx = jnp.pad(indices_BTM.astype(jnp.int32), ((0, 0), (0, tp - t), (0, 0)),
                  constant_values=-1).reshape(b, qt, bq, m)
    k = k_BSKH.reshape(b, s, kg * h).astype(jnp.float32)
    k_head = k_BSKH.transpose(0, 2, 1, 3).astype(jnp.float32)  # B K S H, for the prefix GEMM
    v = k if shared else v_BSKV.reshape(b, s, kg * vw).astype(jnp.float32)
    lw = 0 if window is None else min(window + bq - 1, s)
    ranges = _prefix_ranges(s, m, num_ranges, dense_factor, min_range)
    sink_KG = None if sink is None else sink.astype(jnp.float32).reshape(kg, g)

    def batch(xs):
        q_b, idx_b, k_b, kh_b, v_b = xs

        def tile(ys):
            q_KGQH, idx_QM, t0 = ys
            t_Q = t0 + jnp.arange(bq)
            sel = (idx_QM >= 0) & (idx_QM < s)
            if window is not None:  # selected keys inside the window are read there
                raw = idx_QM - window_start
                sel = sel & ~((raw >= 0) & (raw <= t_Q[:, None]) & (raw > t_Q[:, None] - window))
            rows = jnp.where(sel, idx_QM, 0)

            def prefix(r):
                def logits(q_KGQH, rows):
                    full = jnp.einsum("KGQH,KSH->KGQS", q_KGQH, kh_b[:, :r])
                    pick = jnp.broadcast_to(rows[None, None], (kg, g, bq, m))
                    return jnp.take_along_axis(full, pick, axis=-1)
                return logits

            def gathered(q_KGQH, rows):
                k_KQMH = jnp.take(k_b, rows, axis=0).reshape(bq, m, kg, h).transpose(2, 0, 1, 3)
                return jnp.einsum("KGQH,KQMH->KGQM", q_KGQH, k_KQMH)

            hi = jnp.where(sel, idx_QM + 1, 0).max()
            branch = jnp.searchsorted(jnp.asarray(ranges + [s + 1], jnp.int32), hi)
            logit = jax.lax.switch(branch, [prefix(r) for r in ranges] + [gathered], q_KGQH, rows)
            logit = jnp.where(sel[None, None], logit * scale, FILL)
            mx = logit.max(axis=-1)
            if window is not None:
                start = jnp.clip(window_start + t0 - window + 1, 0, s - lw)
                kw_LKH = jax.lax.dynamic_slice_in_dim(k_b, start, lw).reshape(lw, kg, h)
                raw = start + jnp.arange(lw) - window_start
                win = ((raw[None, :] >= 0) & (raw[None, :] <= t_Q[:, None])
                       & (raw[None, :] > t_Q[:, None] - window) & (t_Q[:, None] < t))
                wl = jnp.einsum("KGQH,LKH->KGQL", q_KGQH, kw_LKH)
                wl = jnp.where(win[None, None], wl * scale, FILL)
                mx = jnp.maximum(mx, wl.max(axis=-1))
            if sink_KG is not None:
                mx = jnp.maximum(mx, sink_KG[:, :, None])
            mx = jax.lax.stop_gradient(mx)
            p = jnp.where(sel[None, None], jnp.exp(logit - mx[..., None]), 0.0)
            den = p.sum(axis=-1)
            v_QMKV = jnp.take(v_b, rows, axis=0).reshape(bq, m, kg, vw)
            if g == 1:  # fused gather-and-reduce over M (XLA:CPU keeps it one loop only
                # without a broadcast head axis; with one it is 50x slower)
                p_QMK = p[:, 0].transpose(1, 2, 0)
                out = (p_QMK[..., None] * v_QMKV).sum(axis=1)[None]  # 1 Q K V
                out = out.transpose(2, 0, 1, 3)  # K G=1 Q V
            else:  # heads of a group share each row: a batched matmul on the gathered rows
                out = jnp.einsum("KGQM,KQMV->KGQV", p, v_QMKV.transpose(2, 0, 1, 3))
            if window is not None:
                pw = jnp.where(win[None, None], jnp.exp(wl - mx[..., None]), 0.0)
                den = den + pw.sum(axis=-1)
                vw_LKV = jax.lax.dynamic_slice_in_dim(v_b, start, lw).reshape(lw, kg, vw)
                out = out + jnp.einsum("KGQL,LKV->KGQV", pw, vw_LKV)
            if sink_KG is not None:
                den = den + jnp.exp(sink_KG[:, :, None] - mx)
            return out / jnp.where(den == 0, 1.0, den)[..., None]

        starts = jnp.arange(qt) * bq
        return jax.lax.map(jax.checkpoint(tile), (q_b, idx_b, starts))

    out = jax.lax.map(batch, (q, idx, k, k_head, v))  # B Qt K G bq V
    out = out.transpose(0, 1, 4, 2, 3, 5).reshape(b, tp, n, vw)
    return out[:, :t].astype(q_BTNH.dtype)

"""Block-gather formulation in plain XLA: the fast exact path where no Pallas kernel runs natively.

Same algorithm and semantics as ``kernel.py`` (flash-style online softmax over the blocks of
the forward table, per-token membership, positional token rules, sink), written as a
sequential ``lax.map`` over (batch, kv group, query tile) with a scan over table slots whose
body is a ``lax.cond``: on CPU a false ``cond`` skips its branch, so the work grows with the
number of visited blocks rather than with T x S. Nothing is vmapped (a vmapped ``cond`` would
run both branches). Gradients come from reverse-mode through the scan, with each tile's
forward recomputed (``jax.checkpoint``) so residuals stay O(tile) instead of O(T x S).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .tables import build_tables

Array = jax.Array
_MIN = float(jnp.finfo(jnp.float32).min)


def block_sparse_attention_xla(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array,
                               block_keep_BKTJ: Array, *, block_k: int, causal: bool,
                               scale: float | None = None, sink: Array | None = None,
                               key_valid_BS: Array | None = None, q_pos_T: Array | None = None,
                               k_pos_S: Array | None = None, window: int | None = None,
                               num_sink_keys: int = 0, block_q: int = 64) -> Array:
    """Equals ``block_sparse_attention_reference`` (see ``kernel.block_sparse_attention``)."""
    b, t, n, h = q_BTNH.shape
    s, kg = k_BSKH.shape[1], k_BSKH.shape[2]
    g, vw = n // kg, v_BSKV.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    qt, j = -(-t // block_q), -(-s // block_k)
    tp, sp = qt * block_q, j * block_k
    q_pos = jnp.arange(t, dtype=jnp.int32) + (s - t) if q_pos_T is None else q_pos_T
    k_pos = jnp.arange(s, dtype=jnp.int32) if k_pos_S is None else k_pos_S
    fwd_table, _ = build_tables(block_keep_BKTJ, block_q=block_q, block_k=block_k, q_pos=q_pos,
                                k_pos=k_pos, causal=causal, window=window,
                                num_sink_keys=num_sink_keys)
    q = jnp.pad(q_BTNH, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q = q.reshape(b, qt, block_q, kg, g, h).transpose(0, 3, 1, 4, 2, 5)  # B K Qt G bq H
    k = jnp.pad(k_BSKH, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # B K Sp H
    v = jnp.pad(v_BSKV, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    keep = jnp.pad(block_keep_BKTJ, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    keep = keep.reshape(b, kg, qt, block_q, j)
    valid = jnp.ones((b, s), bool) if key_valid_BS is None else key_valid_BS.astype(bool)
    valid = jnp.pad(valid, ((0, 0), (0, sp - s)))
    qp = jnp.pad(q_pos.astype(jnp.int32), (0, tp - t), mode="edge").reshape(qt, block_q)
    kp = jnp.pad(k_pos.astype(jnp.int32), (0, sp - s), mode="edge")
    sink_KG = (None if sink is None else sink.astype(jnp.float32).reshape(kg, g))

    def group(xs):
        """One (batch, kv group): a sequential map over its query tiles. Each group's K/V are
        mapped inputs, so the backward accumulates dK/dV in a (S, H) buffer per group rather than
        in the full (B, K, S, H) tensor."""
        q_QGBH, k_SH, v_SV, keep_QBJ, table_QM, valid_S, sink_G = xs

        def tile(ys):
            q_GQH, keep_QJ, row, q_pos_Q = ys
            q_GQH = q_GQH.astype(jnp.float32) * scale

            def visit(carry, m):
                def step(carry):
                    acc, mx, l = carry
                    jb = row[m + 1]
                    start = jb * block_k
                    kb = jax.lax.dynamic_slice_in_dim(k_SH, start, block_k).astype(jnp.float32)
                    vb = jax.lax.dynamic_slice_in_dim(v_SV, start, block_k)
                    k_idx = start + jnp.arange(block_k)
                    k_pos_K = jax.lax.dynamic_slice_in_dim(kp, start, block_k)
                    mask = (jax.lax.dynamic_index_in_dim(keep_QJ, jb, axis=1)
                            & jax.lax.dynamic_slice_in_dim(valid_S, start, block_k)[None, :]
                            & (k_idx < s)[None, :])
                    if causal:
                        mask = mask & (k_pos_K[None, :] <= q_pos_Q[:, None])
                    if window is not None:
                        mask = mask & ((k_idx < num_sink_keys)[None, :]
                                       | (k_pos_K[None, :] > q_pos_Q[:, None] - window))
                    sc = jnp.where(mask, jnp.einsum("GQH,KH->GQK", q_GQH, kb), _MIN)
                    m_new = jnp.maximum(mx, sc.max(axis=-1))
                    corr = jnp.exp(mx - m_new)
                    p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
                    acc = acc * corr[..., None] + jnp.einsum(
                        "GQK,KV->GQV", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
                    return acc, m_new, l * corr + p.sum(axis=-1)

                return jax.lax.cond(m < row[0], step, lambda c: c, carry), None

            init = (jnp.zeros((g, block_q, vw), jnp.float32), jnp.full((g, block_q), _MIN),
                    jnp.zeros((g, block_q), jnp.float32))
            (acc, mx, l), _ = jax.lax.scan(visit, init, jnp.arange(j))
            if sink_G is not None:
                sk = sink_G[:, None]
                m_fin = jnp.maximum(mx, sk)
                l = l * jnp.exp(mx - m_fin) + jnp.exp(sk - m_fin)
                acc = acc * jnp.exp(mx - m_fin)[..., None]
            return acc / jnp.where(l > 0, l, 1.0)[..., None]

        return jax.lax.map(jax.checkpoint(tile), (q_QGBH, keep_QBJ, table_QM, qp))

    flat = lambda a: a.reshape(b * kg, *a.shape[2:])  # noqa: E731
    sinks = None if sink_KG is None else jnp.broadcast_to(sink_KG, (b, kg, g)).reshape(b * kg, g)
    xs = (flat(q), flat(k), flat(v), flat(keep), flat(fwd_table),
          jnp.repeat(valid, kg, axis=0), sinks)
    out = jax.lax.map(group, xs)  # (B K) Qt G bq V
    out = out.reshape(b, kg, qt, g, block_q, vw).transpose(0, 2, 4, 1, 3, 5)
    return out.reshape(b, tp, n, vw)[:, :t].astype(q_BTNH.dtype)

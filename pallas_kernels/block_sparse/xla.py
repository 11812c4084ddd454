"""Block-gather formulation in plain XLA: the fast exact path where no Pallas kernel runs natively.

Same algorithm, semantics and tables as ``kernel.py``, written with ``lax`` control flow so XLA
compiles it for any backend (it is ``impl="auto"`` on CPU):

- forward: a sequential ``lax.map`` over (batch, kv group), then over query tiles; each tile
  walks its row of the forward table with a ``fori_loop`` whose trip count is the row's count,
  so the work grows with the number of visited blocks, never with T x S. Online softmax in
  float32; all query heads of the group share each K/V block.
- backward: fused and explicit under ``jax.custom_vjp``, as in the kernel: dq walks the forward
  table, dk/dv walk the backward table (per key block, the query tiles that read it), both
  recomputing probabilities from the saved log-sum-exp. Nothing is differentiated through a
  loop, so the backward costs about twice the forward and keeps O(tile) live state.

Nothing is vmapped: a vmapped loop would run every instance to the longest trip count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..flash import BIG as _BIG
from ..flash import MIN as _MIN
from .kernel import _Static, checked_operands, sink_grad, sparse_attention_vjp, token_mask
from .tables import build_tables

Array = jax.Array
_F32 = jnp.float32


def _block(x_S, start, size):
    return jax.lax.dynamic_slice_in_dim(x_S, start, size)


def _prepare(q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S, st: _Static):
    """Group-major operands: one leading (B * K) axis that the outer map walks."""
    b, t, n, h = q_BTNH.shape
    kg = k_BSKH.shape[2]
    g = n // kg
    qt, j = -(-t // st.block_q), -(-st.s // st.block_k)
    tp, sp = qt * st.block_q, j * st.block_k
    fwd_table, bwd_table = build_tables(block_keep_BKTJ, block_q=st.block_q, block_k=st.block_k,
                                        q_pos=q_pos_T, k_pos=k_pos_S, causal=st.causal,
                                        window=st.window, num_sink_keys=st.num_sink_keys)
    flat = lambda a: a.reshape(b * kg, *a.shape[2:])  # noqa: E731
    q = jnp.pad(q_BTNH, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q = flat(q.reshape(b, qt, st.block_q, kg, g, h).transpose(0, 3, 1, 4, 2, 5))  # BK Qt G bq H
    k = flat(jnp.pad(k_BSKH, ((0, 0), (0, sp - st.s), (0, 0), (0, 0))).transpose(0, 2, 1, 3))
    v = flat(jnp.pad(v_BSKV, ((0, 0), (0, sp - st.s), (0, 0), (0, 0))).transpose(0, 2, 1, 3))
    keep = jnp.pad(block_keep_BKTJ, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    keep = flat(keep.reshape(b, kg, qt, st.block_q, j))  # BK Qt bq J
    valid = jnp.ones((b, st.s), bool) if key_valid_BS is None else key_valid_BS
    valid = jnp.repeat(jnp.pad(valid, ((0, 0), (0, sp - st.s))), kg, axis=0)  # BK Sp
    # padded query rows sit at the last real position (their output is dropped); padded keys
    # are removed by the ``k_idx < S`` rule
    q_pos = jnp.pad(q_pos_T, (0, tp - t), mode="edge").reshape(qt, st.block_q)
    k_pos = jnp.pad(k_pos_S, (0, sp - st.s), mode="edge")
    return dict(q=q, k=k, v=v, keep=keep, valid=valid, fwd=flat(fwd_table), bwd=flat(bwd_table),
                q_pos=q_pos, k_pos=k_pos, dims=(b, n, kg, g, qt, j, tp, sp))


def _scores(q_GQH, kb_KH, mask_QK, scale):
    s = jnp.einsum("GQH,KH->GQK", q_GQH, kb_KH, preferred_element_type=_F32) * scale
    return jnp.where(mask_QK, s, _MIN)


def _forward(q_BTNH, k_BSKH, v_BSKV, block_keep, key_valid, q_pos_T, k_pos_S, sink_N,
             st: _Static):
    p = _prepare(q_BTNH, k_BSKH, v_BSKV, block_keep, key_valid, q_pos_T, k_pos_S, st)
    b, n, kg, g, qt, j, tp, sp = p["dims"]
    bk, vw, k_pos = st.block_k, p["v"].shape[-1], p["k_pos"]
    sink_KG = None if sink_N is None else jnp.asarray(sink_N, _F32).reshape(kg, g)

    def group(xs):
        q_QGBH, k_SH, v_SV, keep_QBJ, table_QM, valid_S, ki = xs

        def tile(ys):
            q_GBH, keep_BJ, row, q_pos_B = ys
            q_GBH = q_GBH.astype(_F32)

            def body(i, carry):
                acc, mx, l = carry
                jb = row[i + 1]
                start = jb * bk
                kb, vb = _block(k_SH, start, bk).astype(_F32), _block(v_SV, start, bk)
                mask = token_mask(jax.lax.dynamic_slice_in_dim(keep_BJ, jb, 1, axis=1),
                                  _block(valid_S, start, bk), q_pos_B, _block(k_pos, start, bk),
                                  start + jnp.arange(bk), **st.rules)
                sc = _scores(q_GBH, kb, mask, st.scale)
                m_new = jnp.maximum(mx, sc.max(axis=-1))
                corr = jnp.exp(mx - m_new)
                pr = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
                acc = acc * corr[..., None] + jnp.einsum(
                    "GQK,KV->GQV", pr.astype(vb.dtype), vb, preferred_element_type=_F32)
                return acc, m_new, l * corr + pr.sum(axis=-1)

            init = (jnp.zeros((g, st.block_q, vw), _F32), jnp.full((g, st.block_q), _MIN, _F32),
                    jnp.zeros((g, st.block_q), _F32))
            acc, mx, l = jax.lax.fori_loop(0, row[0], body, init)
            if sink_KG is not None:
                sk = sink_KG[ki][:, None]
                m_fin = jnp.maximum(mx, sk)
                l = l * jnp.exp(mx - m_fin) + jnp.exp(sk - m_fin)
                acc = acc * jnp.exp(mx - m_fin)[..., None]
                mx = m_fin
            safe = jnp.where(l > 0, l, 1.0)
            return (acc / safe[..., None]).astype(q_BTNH.dtype), jnp.where(l > 0, mx + jnp.log(safe),
                                                                           _BIG)

        return jax.lax.map(tile, (q_QGBH, keep_QBJ, table_QM, p["q_pos"]))

    kidx = jnp.tile(jnp.arange(kg), b)
    o, lse = jax.lax.map(group, (p["q"], p["k"], p["v"], p["keep"], p["fwd"], p["valid"], kidx))
    out = o.reshape(b, kg, qt, g, st.block_q, vw).transpose(0, 2, 4, 1, 3, 5)
    out = out.reshape(b, tp, n, vw)[:, : st.t]
    return out, (p, o, lse, kidx)


def _backward(res, do_BTNV, sink_N, st: _Static):
    p, o, lse, kidx = res
    b, n, kg, g, qt, j, tp, sp = p["dims"]
    bk, bq, k_pos, q_pos = st.block_k, st.block_q, p["k_pos"], p["q_pos"]
    do = jnp.pad(do_BTNV, ((0, 0), (0, tp - st.t), (0, 0), (0, 0)))
    do = do.reshape(b, qt, bq, kg, g, -1).transpose(0, 3, 1, 4, 2, 5).reshape(o.shape)
    delta = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1)  # BK Qt G bq
    q_dtype, k_dtype, v_dtype = p["q"].dtype, p["k"].dtype, p["v"].dtype

    def probs(q_GBH, kb, keep_col, valid_K, q_pos_B, start, lse_GB):
        mask = token_mask(keep_col, valid_K, q_pos_B, _block(k_pos, start, bk),
                          start + jnp.arange(bk), **st.rules)
        return jnp.where(mask, jnp.exp(_scores(q_GBH, kb, mask, st.scale) - lse_GB[..., None]), 0.0)

    def dq_group(xs):
        q_QGBH, k_SH, v_SV, keep_QBJ, table_QM, valid_S, do_QGBV, lse_QGB, delta_QGB = xs

        def tile(ys):
            q_GBH, keep_BJ, row, q_pos_B, do_GBV, lse_GB, delta_GB = ys
            q_GBH, do_GBV = q_GBH.astype(_F32), do_GBV.astype(_F32)

            def body(i, dq):
                start = row[i + 1] * bk
                kb, vb = _block(k_SH, start, bk).astype(_F32), _block(v_SV, start, bk).astype(_F32)
                pr = probs(q_GBH, kb, jax.lax.dynamic_slice_in_dim(keep_BJ, row[i + 1], 1, axis=1),
                           _block(valid_S, start, bk), q_pos_B, start, lse_GB)
                ds = pr * (jnp.einsum("GQV,KV->GQK", do_GBV, vb) - delta_GB[..., None])
                return dq + jnp.einsum("GQK,KH->GQH", ds, kb) * st.scale

            dq = jax.lax.fori_loop(0, row[0], body, jnp.zeros(q_GBH.shape, _F32))
            return dq.astype(q_dtype)

        return jax.lax.map(tile, (q_QGBH, keep_QBJ, table_QM, q_pos, do_QGBV, lse_QGB, delta_QGB))

    def dkv_group(xs):
        q_QGBH, k_SH, v_SV, keep_QBJ, table_JM, valid_S, do_QGBV, lse_QGB, delta_QGB = xs

        def kblock(ys):
            jb, row = ys
            start = jb * bk
            kb, vb = _block(k_SH, start, bk).astype(_F32), _block(v_SV, start, bk).astype(_F32)
            valid_K = _block(valid_S, start, bk)

            def body(i, carry):
                dk, dv = carry
                qi = row[i + 1]
                q_GBH = q_QGBH[qi].astype(_F32)
                do_GBV = do_QGBV[qi].astype(_F32)
                keep_col = jax.lax.dynamic_slice_in_dim(keep_QBJ[qi], jb, 1, axis=1)
                pr = probs(q_GBH, kb, keep_col, valid_K, q_pos[qi], start, lse_QGB[qi])
                dv = dv + jnp.einsum("GQK,GQV->KV", pr, do_GBV)
                ds = pr * (jnp.einsum("GQV,KV->GQK", do_GBV, vb) - delta_QGB[qi][..., None])
                return dk + jnp.einsum("GQK,GQH->KH", ds, q_GBH) * st.scale, dv

            dk, dv = jax.lax.fori_loop(0, row[0], body, (jnp.zeros(kb.shape, _F32),
                                                          jnp.zeros(vb.shape, _F32)))
            return dk.astype(k_dtype), dv.astype(v_dtype)

        return jax.lax.map(kblock, (jnp.arange(j), table_JM))

    common = (p["q"], p["k"], p["v"], p["keep"])
    tail = (p["valid"], do, lse, delta)
    dq = jax.lax.map(dq_group, (*common, p["fwd"], *tail))  # BK Qt G bq H
    dk, dv = jax.lax.map(dkv_group, (*common, p["bwd"], *tail))  # BK J bk H
    dq = dq.reshape(b, kg, qt, g, bq, -1).transpose(0, 2, 4, 1, 3, 5).reshape(b, tp, n, -1)
    dk = dk.reshape(b, kg, sp, -1).transpose(0, 2, 1, 3)
    dv = dv.reshape(b, kg, sp, -1).transpose(0, 2, 1, 3)
    dsink = None
    if sink_N is not None:
        head_major = lambda a: a.reshape(b, kg, qt, g, bq).transpose(0, 1, 3, 2, 4).reshape(b, n, tp)  # noqa: E731
        dsink = sink_grad(sink_N, head_major(lse), head_major(delta), st.t)
    return dq[:, : st.t], dk[:, : st.s], dv[:, : st.s], dsink


_attention = sparse_attention_vjp(_forward, _backward)


def block_sparse_attention_xla(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array,
                               block_keep_BKTJ: Array, *, block_k: int, causal: bool,
                               scale: float | None = None, sink: Array | None = None,
                               key_valid_BS: Array | None = None, q_pos_T: Array | None = None,
                               k_pos_S: Array | None = None, window: int | None = None,
                               num_sink_keys: int = 0, block_q: int = 64) -> Array:
    """Equals ``block_sparse_attention_reference`` (arguments as ``kernel.block_sparse_attention``);
    differentiable in q, k, v and ``sink`` through the fused backward above."""
    keep, valid, q_pos, k_pos = checked_operands(q_BTNH, k_BSKH, block_keep_BKTJ, key_valid_BS,
                                                 q_pos_T, k_pos_S, block_k=block_k)
    h = q_BTNH.shape[-1]
    st = _Static(block_q, block_k, causal, h ** -0.5 if scale is None else scale, q_BTNH.shape[1],
                 k_BSKH.shape[1], False, window, num_sink_keys)
    return _attention(q_BTNH, k_BSKH, v_BSKV, keep, valid, q_pos, k_pos, sink, st=st)

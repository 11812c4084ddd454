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

from .. import common
from ..common import F32, FILL, KernelConfig
from .kernel import (
    Selection,
    block_config,
    block_tables,
    checked_operands,
    key_inputs,
    token_mask,
    zero_padding_rows,
    zero_unread,
)

Array = jax.Array


def _block(x_S, start, size):
    return jax.lax.dynamic_slice_in_dim(x_S, start, size)


def _prepare(q_BTNH, k_BSKH, v_BSKV, sel: Selection, cfg: KernelConfig):
    """Group-major operands: one leading (B * K) axis that the outer map walks."""
    b, t, n, h = q_BTNH.shape
    kg = k_BSKH.shape[2]
    g = n // kg
    qt, j = common.cdiv(t, cfg.block_q), common.cdiv(cfg.s, cfg.block_k)
    tp, sp = qt * cfg.block_q, j * cfg.block_k
    fwd_table, bwd_table = block_tables(sel, cfg)
    q_BTNH, k_BSKH, v_BSKV = zero_unread(q_BTNH, k_BSKH, v_BSKV, sel, cfg)
    q_seg, k_seg, k_sink = key_inputs(sel, tp, sp)
    flat = lambda a: a.reshape(b * kg, *a.shape[2:])  # noqa: E731
    per_group = lambda a: jnp.repeat(a, kg, axis=0)  # noqa: E731 - (B, X) -> (B * K, X)
    q_BQTKGH = common.pad_axis(q_BTNH, 1, tp).reshape(b, qt, cfg.block_q, kg, g, h)
    keep_BKQTJ = common.pad_axis(sel.keep, 2, tp).reshape(b, kg, qt, cfg.block_q, j)
    # padded query rows sit at the last real position (their output is dropped); padded keys
    # are removed by the ``k_idx < S`` rule
    return dict(q=flat(q_BQTKGH.transpose(0, 3, 1, 4, 2, 5)),  # BK Q G T H
                k=flat(common.pad_axis(k_BSKH, 1, sp).transpose(0, 2, 1, 3)),  # BK S H
                v=flat(common.pad_axis(v_BSKV, 1, sp).transpose(0, 2, 1, 3)),  # BK S V
                keep=flat(keep_BKQTJ),  # BK Q T J
                k_seg=per_group(k_seg), k_sink=per_group(k_sink),  # BK S
                q_seg=per_group(q_seg).reshape(b * kg, qt, cfg.block_q),  # BK Q T
                fwd=flat(fwd_table), bwd=flat(bwd_table), q_seg_BT=sel.q_seg,
                q_pos=common.pad_axis(sel.q_pos, 0, tp, mode="edge").reshape(qt, cfg.block_q),
                k_pos=common.pad_axis(sel.k_pos, 0, sp, mode="edge"), dims=(b, n, kg, g, qt, j, tp, sp))


def _mask(keep_col, keys, q_seg_T, q_pos_T, start, cfg: KernelConfig):
    """(block_q, block_k) membership of the key block at ``start``; ``keys`` = (k_seg_S,
    k_sink_S, k_pos_S) of the whole (padded) key axis."""
    k_seg_S, k_sink_S, k_pos_S = keys
    bk = cfg.block_k
    return token_mask(keep_col, _block(k_seg_S, start, bk), _block(k_sink_S, start, bk), q_seg_T,
                      q_pos_T, _block(k_pos_S, start, bk), start + jnp.arange(bk, dtype=jnp.int32),
                      **cfg.rule)


def _forward(q_BTNH, k_BSKH, v_BSKV, sink_N, selection, cfg: KernelConfig):
    p = _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg)
    b, n, kg, g, qt, j, tp, sp = p["dims"]
    bk, vw, k_pos_S, prec = cfg.block_k, p["v"].shape[-1], p["k_pos"], cfg.precision
    sink_KG = None if sink_N is None else jnp.asarray(sink_N, F32).reshape(kg, g)

    def group(xs):
        q_QGTH, k_SH, v_SV, keep_QTJ, table_QJ, k_seg_S, k_sink_S, q_seg_QT, ki = xs
        keys = (k_seg_S, k_sink_S, k_pos_S)

        def tile(ys):
            q_GTH, keep_TJ, row, q_pos_T, q_seg_T = ys
            q_GTH = q_GTH.astype(F32)

            def body(i, carry):
                jb = row[i + 1]
                start = jb * bk
                kb_SH, vb_SV = _block(k_SH, start, bk).astype(F32), _block(v_SV, start, bk)
                mask_TS = _mask(jax.lax.dynamic_slice_in_dim(keep_TJ, jb, 1, axis=1), keys,
                                q_seg_T, q_pos_T, start, cfg)
                s_GTS = jnp.einsum("GTH,SH->GTS", q_GTH, kb_SH, precision=prec,
                                   preferred_element_type=F32) * cfg.scale
                s_GTS = jnp.where(mask_TS, s_GTS, FILL)
                return common.online_softmax_step(carry, s_GTS, mask_TS, lambda p_GTS: jnp.einsum(
                    "GTS,SV->GTV", p_GTS.astype(vb_SV.dtype), vb_SV, precision=prec,
                    preferred_element_type=F32))

            init = (jnp.zeros((g, cfg.block_q, vw), F32), jnp.full((g, cfg.block_q), FILL, F32),
                    jnp.zeros((g, cfg.block_q), F32))
            acc_GTV, m_GT, l_GT = jax.lax.fori_loop(0, row[0], body, init)
            out_GTV, lse_GT = common.finish_softmax(acc_GTV, m_GT, l_GT,
                                             None if sink_KG is None else sink_KG[ki][:, None],
                                             lambda x: x[..., None])
            return out_GTV.astype(q_BTNH.dtype), lse_GT

        return jax.lax.map(tile, (q_QGTH, keep_QTJ, table_QJ, p["q_pos"], q_seg_QT))

    kidx = jnp.tile(jnp.arange(kg), b)
    o, lse = jax.lax.map(group, (p["q"], p["k"], p["v"], p["keep"], p["fwd"], p["k_seg"],
                                 p["k_sink"], p["q_seg"], kidx))
    out = o.reshape(b, kg, qt, g, cfg.block_q, vw).transpose(0, 2, 4, 1, 3, 5)
    out = out.reshape(b, tp, n, vw)[:, : cfg.t]
    lse_BTN = common.lse_out(_by_token(lse, p["dims"])[:, : cfg.t])
    return (out, lse_BTN), (p, o, lse)


def _by_token(x, dims):
    """A per-row statistic in the group-major layout (B * K, Q, G, T) -> (B, Tp, N)."""
    b, n, kg, g, qt, j, tp, sp = dims
    return x.reshape(b, kg, qt, g, -1).transpose(0, 2, 4, 1, 3).reshape(b, tp, n)


def _by_group(x_BTN, dims):
    """``_by_token``'s inverse, the token axis zero-padded to whole tiles."""
    b, n, kg, g, qt, j, tp, sp = dims
    x = common.pad_axis(x_BTN, 1, tp).reshape(b, qt, -1, kg, g)
    return x.transpose(0, 3, 1, 4, 2).reshape(b * kg, qt, g, -1)


def _backward(res, cotangents, sink_N, cfg: KernelConfig):
    p, o, lse = res
    do_BTNV, dlse_BTN = cotangents
    b, n, kg, g, qt, j, tp, sp = p["dims"]
    bk, bq, k_pos_S, q_pos_QT = cfg.block_k, cfg.block_q, p["k_pos"], p["q_pos"]
    prec = cfg.precision
    do = common.pad_axis(zero_padding_rows(do_BTNV, p["q_seg_BT"], cfg), 1, tp)
    do = do.reshape(b, qt, bq, kg, g, -1).transpose(0, 3, 1, 4, 2, 5).reshape(o.shape)
    delta = common.row_delta(do, o, lse=lse, dlse=_by_group(dlse_BTN, p["dims"]))  # BK Q G T
    q_dtype, k_dtype, v_dtype = p["q"].dtype, p["k"].dtype, p["v"].dtype

    def probs(q_GTH, kb_SH, keep_col, keys, q_seg_T, q_pos_T, start, lse_GT):
        mask_TS = _mask(keep_col, keys, q_seg_T, q_pos_T, start, cfg)
        s_GTS = jnp.einsum("GTH,SH->GTS", q_GTH, kb_SH, precision=prec,
                           preferred_element_type=F32) * cfg.scale
        s_GTS = jnp.where(mask_TS, s_GTS, FILL)
        return jnp.where(mask_TS, jnp.exp(s_GTS - lse_GT[..., None]), 0.0)

    def dq_group(xs):
        (q_QGTH, k_SH, v_SV, keep_QTJ, table_QJ, k_seg_S, k_sink_S, q_seg_QT, do_QGTV, lse_QGT,
         delta_QGT) = xs
        keys = (k_seg_S, k_sink_S, k_pos_S)

        def tile(ys):
            q_GTH, keep_TJ, row, q_pos_T, q_seg_T, do_GTV, lse_GT, delta_GT = ys
            q_GTH, do_GTV = q_GTH.astype(F32), do_GTV.astype(F32)

            def body(i, dq_GTH):
                start = row[i + 1] * bk
                kb_SH = _block(k_SH, start, bk).astype(F32)
                vb_SV = _block(v_SV, start, bk).astype(F32)
                p_GTS = probs(q_GTH, kb_SH,
                              jax.lax.dynamic_slice_in_dim(keep_TJ, row[i + 1], 1, axis=1),
                              keys, q_seg_T, q_pos_T, start, lse_GT)
                ds_GTS = p_GTS * (jnp.einsum("GTV,SV->GTS", do_GTV, vb_SV, precision=prec)
                                  - delta_GT[..., None])
                return dq_GTH + jnp.einsum("GTS,SH->GTH", ds_GTS, kb_SH,
                                           precision=prec) * cfg.scale

            dq_GTH = jax.lax.fori_loop(0, row[0], body, jnp.zeros(q_GTH.shape, F32))
            return dq_GTH.astype(q_dtype)

        return jax.lax.map(tile, (q_QGTH, keep_QTJ, table_QJ, q_pos_QT, q_seg_QT, do_QGTV,
                                  lse_QGT, delta_QGT))

    def dkv_group(xs):
        (q_QGTH, k_SH, v_SV, keep_QTJ, table_JQ, k_seg_S, k_sink_S, q_seg_QT, do_QGTV, lse_QGT,
         delta_QGT) = xs
        keys = (k_seg_S, k_sink_S, k_pos_S)

        def kblock(ys):
            jb, row = ys
            start = jb * bk
            kb_SH = _block(k_SH, start, bk).astype(F32)
            vb_SV = _block(v_SV, start, bk).astype(F32)

            def body(i, carry):
                dk_SH, dv_SV = carry
                qi = row[i + 1]
                q_GTH = q_QGTH[qi].astype(F32)
                do_GTV = do_QGTV[qi].astype(F32)
                keep_col = jax.lax.dynamic_slice_in_dim(keep_QTJ[qi], jb, 1, axis=1)
                p_GTS = probs(q_GTH, kb_SH, keep_col, keys, q_seg_QT[qi], q_pos_QT[qi], start,
                              lse_QGT[qi])
                dv_SV = dv_SV + jnp.einsum("GTS,GTV->SV", p_GTS, do_GTV, precision=prec)
                ds_GTS = p_GTS * (jnp.einsum("GTV,SV->GTS", do_GTV, vb_SV, precision=prec)
                                  - delta_QGT[qi][..., None])
                return dk_SH + jnp.einsum("GTS,GTH->SH", ds_GTS, q_GTH,
                                          precision=prec) * cfg.scale, dv_SV

            dk_SH, dv_SV = jax.lax.fori_loop(0, row[0], body, (jnp.zeros(kb_SH.shape, F32),
                                                                jnp.zeros(vb_SV.shape, F32)))
            return dk_SH.astype(k_dtype), dv_SV.astype(v_dtype)

        return jax.lax.map(kblock, (jnp.arange(j), table_JQ))

    operands = (p["q"], p["k"], p["v"], p["keep"])
    tail = (p["k_seg"], p["k_sink"], p["q_seg"], do, lse, delta)
    dq = jax.lax.map(dq_group, (*operands, p["fwd"], *tail))  # BK Q G T H
    dk, dv = jax.lax.map(dkv_group, (*operands, p["bwd"], *tail))  # BK J S H
    dq = dq.reshape(b, kg, qt, g, bq, -1).transpose(0, 2, 4, 1, 3, 5).reshape(b, tp, n, -1)
    dk = dk.reshape(b, kg, sp, -1).transpose(0, 2, 1, 3)
    dv = dv.reshape(b, kg, sp, -1).transpose(0, 2, 1, 3)
    dsink = None
    if sink_N is not None:
        by_head = lambda a: _by_token(a, p["dims"]).transpose(0, 2, 1)  # noqa: E731
        dsink = common.sink_grad(sink_N, by_head(lse), by_head(delta), cfg.t)
    return dq[:, : cfg.t], dk[:, : cfg.s], dv[:, : cfg.s], dsink


_attention = common.sparse_attention_vjp(_forward, _backward)


def block_sparse_attention_xla(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array,
                               block_keep_BKTJ: Array, *, block_k: int, block_q: int = 64,
                               causal: bool, scale: float | None = None,
                               sink: Array | None = None, key_valid_BS: Array | None = None,
                               q_pos_T: Array | None = None, k_pos_S: Array | None = None,
                               window: int | None = None, num_sink_keys: int = 0,
                               precision: jax.lax.PrecisionLike = None,
                               q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                               k_sink_BS: Array | None = None,
                               return_lse: bool = False) -> Array | tuple[Array, Array]:
    """Equals ``block_sparse_attention_reference`` (arguments as ``kernel.block_sparse_attention``,
    packed-sequence ones and ``return_lse`` included; ``block_q`` the query tile);
    differentiable in q, k, v and ``sink`` (through the output and the logsumexp) by the fused
    backward above."""
    selection = checked_operands(q_BTNH, k_BSKH, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S,
                                 block_k=block_k, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS,
                                 k_sink_BS=k_sink_BS)
    cfg = block_config(q_BTNH, k_BSKH, block_q=block_q, block_k=block_k, causal=causal,
                       scale=scale, interpret=False, window=window, num_sink_keys=num_sink_keys,
                       precision=precision, segments=q_seg_BT is not None,
                       key_sinks=k_sink_BS is not None)
    out, lse_BTN = _attention(q_BTNH, k_BSKH, v_BSKV, sink, selection, cfg=cfg)
    return (out, lse_BTN) if return_lse else out

"""TPU (Mosaic) variant of the block-sparse kernel: selected blocks streamed by scalar prefetch.

Same semantics, tables and fused backward as ``kernel.py``; what differs is how blocks reach the
core. On TPU a kernel instance cannot chase pointers into HBM cheaply, so the tables are
*scalar-prefetched* into SMEM (``pltpu.PrefetchScalarGridSpec``) and the block index maps read
them: the grid gets one trailing ``arbitrary`` axis over table slots, slot ``m`` of a query tile
DMAs key block ``table[.., m + 1]`` into VMEM while slot ``m - 1`` computes (Pallas' pipeline
double-buffers it). Slots past the row's count repeat the last index, which the pipeline
recognises as "same block, no copy", and their compute is skipped with ``pl.when``; so HBM
traffic is exactly the selected blocks. Online-softmax state lives in VMEM scratch across the
slot axis.

Layouts follow Mosaic's tiling rule (the last two block dims divisible by (8, 128) or equal to
the array's): per-query vectors are (T, 1) columns ((B, T, 1) for the segment ids), per-key
vectors (J, 1, block_k) rows ((B, J, 1, block_k) for key ids and sink flags, int32), and the
per-token selection is stored key-block-major, (B, K, J, T, 1) int8, so that one slot reads the
(block_q, 1) membership column of its block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import common
from ..common import F32, FILL, KernelConfig
from .kernel import (
    BlockSizes,
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
TPU_BLOCK_SIZES = BlockSizes(block_q=128)


def _prepare(q_BTNH, k_BSKH, v_BSKV, sel: Selection, cfg: KernelConfig):
    b, t, n, _ = q_BTNH.shape
    kg = k_BSKH.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    qt, j = common.cdiv(t, bq), common.cdiv(cfg.s, bk)
    tp, sp = qt * bq, j * bk
    keep = common.pad_axis(sel.keep.astype(jnp.int8), 2, tp)
    keep = jnp.swapaxes(keep, 2, 3)[..., None]  # B K J Tp 1
    fwd_table, bwd_table = block_tables(sel, cfg)
    q_BTNH, k_BSKH, v_BSKV = zero_unread(q_BTNH, k_BSKH, v_BSKV, sel, cfg)
    q_seg, k_seg, k_sink = key_inputs(sel, tp, sp, jnp.int32)
    return dict(q=common.head_major(q_BTNH, tp), k=common.head_major(k_BSKH, sp),
                v=common.head_major(v_BSKV, sp), keep=keep,
                k_seg=k_seg.reshape(b, j, 1, bk), k_sink=k_sink.reshape(b, j, 1, bk),
                q_seg=q_seg.reshape(b, tp, 1),
                q_pos=common.pad_axis(sel.q_pos, 0, tp, mode="edge").reshape(tp, 1),
                k_pos=common.pad_axis(sel.k_pos, 0, sp, mode="edge").reshape(j, 1, bk),
                fwd=fwd_table, bwd=bwd_table, q_seg_BT=sel.q_seg, dims=(b, n, kg, n // kg, qt, j, tp, sp))


def _token_specs(bq: int, bk: int, q_row, kv_row):
    """Block specs of the per-token operands (``_masks`` order: selection column, key ids, key
    sink flags, query ids, query and key positions) given the query-tile and key-block index
    functions of the grid (b, k, a, m) and the prefetched table."""
    def key(bi, ki, a, m, tb):
        return (bi, kv_row(bi, ki, a, m, tb), 0, 0)

    return [
        pl.BlockSpec((None, None, None, bq, 1), lambda bi, ki, a, m, tb: (
            bi, ki, kv_row(bi, ki, a, m, tb), q_row(bi, ki, a, m, tb), 0)),
        pl.BlockSpec((None, None, 1, bk), key),
        pl.BlockSpec((None, None, 1, bk), key),
        pl.BlockSpec((None, bq, 1), lambda bi, ki, a, m, tb: (bi, q_row(bi, ki, a, m, tb), 0)),
        pl.BlockSpec((bq, 1), lambda bi, ki, a, m, tb: (q_row(bi, ki, a, m, tb), 0)),
        pl.BlockSpec((None, 1, bk), lambda bi, ki, a, m, tb: (kv_row(bi, ki, a, m, tb), 0, 0)),
    ]


def _own(bi, ki, a, m, tb):
    """Index function: the grid's own query tile / key block."""
    return a


def _listed(bi, ki, a, m, tb):
    """Index function: the block or tile in slot ``m`` of the grid row's table."""
    return tb[bi, ki, a, m + 1]


def _masks(p):
    return p["keep"], p["k_seg"], p["k_sink"], p["q_seg"], p["q_pos"], p["k_pos"]


def _mask(keep_ref, kseg_ref, ksink_ref, qseg_ref, qpos_ref, kpos_ref, jb, cfg: KernelConfig):
    rule = cfg.rule
    k_idx = jb * cfg.block_k + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
    return token_mask(keep_ref[...], kseg_ref[...], ksink_ref[...] if rule["key_sinks"] else None,
                      qseg_ref[...] if rule["segments"] else None, qpos_ref[...], kpos_ref[...],
                      k_idx, **rule)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(table_ref, q_ref, k_ref, v_ref, keep_ref, kseg_ref, ksink_ref, qseg_ref,
                qpos_ref, kpos_ref, sink_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref, *,
                cfg: KernelConfig, groups: int, has_sink: bool):
    bi, ki, qi, m = (pl.program_id(a) for a in range(4))
    prec = cfg.precision

    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)
        m_ref[...] = jnp.full(m_ref.shape, FILL, F32)
        l_ref[...] = jnp.zeros(l_ref.shape, F32)

    def _visit():
        mask = _mask(keep_ref, kseg_ref, ksink_ref, qseg_ref, qpos_ref, kpos_ref,
                     table_ref[bi, ki, qi, m + 1], cfg)
        kb = k_ref[...].astype(F32)
        vb = v_ref[...]
        for g in range(groups):  # the group's heads share the K/V block in VMEM
            s = jnp.where(mask, common.dot_t(q_ref[g].astype(F32) * cfg.scale, kb, prec), FILL)
            acc_ref[g], m_ref[g], l_ref[g] = common.online_softmax_step(
                (acc_ref[g], m_ref[g], l_ref[g]), s, mask,
                lambda p: common.dot(p.astype(vb.dtype), vb, prec), keepdims=True)

    def _finish():
        for g in range(groups):
            out, lse = common.finish_softmax(acc_ref[g], m_ref[g], l_ref[g],
                                      sink_ref[g] if has_sink else None)
            o_ref[g] = out.astype(o_ref.dtype)
            lse_ref[g] = lse

    common.table_walk(table_ref[bi, ki, qi, 0], _init, _visit, _finish)


def _forward(q_BTNH, k_BSKH, v_BSKV, sink_N, selection, cfg: KernelConfig):
    p = _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg)
    b, n, kg, g, qt, j, tp, sp = p["dims"]
    bq, bk, h, vw = cfg.block_q, cfg.block_k, p["q"].shape[-1], p["v"].shape[-1]
    sink = (jnp.zeros((kg, g, 1, 1), F32) if sink_N is None
            else sink_N.astype(F32).reshape(kg, g, 1, 1))
    kv_row = lambda bi, ki, qi, m, tb: (bi, ki, tb[bi, ki, qi, m + 1], 0)  # noqa: E731
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kg, qt, j),
        in_specs=[
            pl.BlockSpec((None, g, bq, h), lambda bi, ki, qi, m, tb: (bi, ki, qi, 0)),
            pl.BlockSpec((None, None, bk, h), kv_row),
            pl.BlockSpec((None, None, bk, vw), kv_row),
            *_token_specs(bq, bk, _own, _listed),
            pl.BlockSpec((None, g, 1, 1), lambda bi, ki, qi, m, tb: (ki, 0, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, g, bq, vw), lambda bi, ki, qi, m, tb: (bi, ki, qi, 0)),
            pl.BlockSpec((None, g, bq, 1), lambda bi, ki, qi, m, tb: (bi, ki, qi, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((g, bq, vw), F32), pltpu.VMEM((g, bq, 1), F32),
                        pltpu.VMEM((g, bq, 1), F32)],
    )
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, groups=g, has_sink=sink_N is not None),
        grid_spec=spec,
        out_shape=[jax.ShapeDtypeStruct((b, n, tp, vw), q_BTNH.dtype),
                   jax.ShapeDtypeStruct((b, n, tp, 1), F32)],
        name="block_sparse_attention_tpu_fwd",
        **cfg.mosaic_params,
    )(p["fwd"], p["q"], p["k"], p["v"], *_masks(p), sink)
    lse_BTN = common.lse_out(lse[..., 0].transpose(0, 2, 1)[:, : cfg.t])
    return (o.transpose(0, 2, 1, 3)[:, : cfg.t], lse_BTN), (p, o, lse)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, keep_ref, kseg_ref,
               ksink_ref, qseg_ref, qpos_ref, kpos_ref, dq_ref, acc_ref, *, cfg: KernelConfig,
               groups: int):
    bi, ki, qi, m = (pl.program_id(a) for a in range(4))
    prec = cfg.precision

    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    def _visit():
        mask = _mask(keep_ref, kseg_ref, ksink_ref, qseg_ref, qpos_ref, kpos_ref,
                     table_ref[bi, ki, qi, m + 1], cfg)
        kb, vb = k_ref[...].astype(F32), v_ref[...].astype(F32)
        for g in range(groups):
            s = common.dot_t(q_ref[g].astype(F32), kb, prec) * cfg.scale
            p = jnp.where(mask, jnp.exp(s - lse_ref[g]), 0.0)
            ds = p * (common.dot_t(do_ref[g].astype(F32), vb, prec) - delta_ref[g])
            acc_ref[g] = acc_ref[g] + common.dot(ds, kb, prec) * cfg.scale

    def _finish():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)

    common.table_walk(table_ref[bi, ki, qi, 0], _init, _visit, _finish)


def _dkv_kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, keep_ref, kseg_ref,
                ksink_ref, qseg_ref, qpos_ref, kpos_ref, dk_ref, dv_ref, dk_acc, dv_acc, *,
                cfg: KernelConfig, groups: int):
    bi, ki, jb, m = (pl.program_id(a) for a in range(4))
    prec = cfg.precision

    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, F32)

    def _visit():
        mask = _mask(keep_ref, kseg_ref, ksink_ref, qseg_ref, qpos_ref, kpos_ref, jb, cfg)
        kb, vb = k_ref[...].astype(F32), v_ref[...].astype(F32)
        for g in range(groups):  # every head of the group accumulates into the shared dK, dV
            qg, dog = q_ref[g].astype(F32), do_ref[g].astype(F32)
            p = jnp.where(mask, jnp.exp(common.dot_t(qg, kb, prec) * cfg.scale - lse_ref[g]), 0.0)
            dv_acc[...] += common.tn_dot(p, dog, prec)
            ds = p * (common.dot_t(dog, vb, prec) - delta_ref[g])
            dk_acc[...] += common.tn_dot(ds, qg, prec) * cfg.scale

    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

    common.table_walk(table_ref[bi, ki, jb, 0], _init, _visit, _finish)


def _backward(res, cotangents, sink_N, cfg: KernelConfig):
    p, o, lse = res
    do_BTNV, dlse_BTN = cotangents
    b, n, kg, g, qt, j, tp, sp = p["dims"]
    bq, bk, h, vw = cfg.block_q, cfg.block_k, p["q"].shape[-1], p["v"].shape[-1]
    do = common.head_major(zero_padding_rows(do_BTNV, p["q_seg_BT"], cfg), tp)
    dlse = common.pad_axis(dlse_BTN, 1, tp).transpose(0, 2, 1)[..., None]
    delta = common.row_delta(do, o, keepdims=True, lse=lse, dlse=dlse)  # B N Tp 1
    operands = (p["q"], p["k"], p["v"], do, lse, delta, *_masks(p))

    def specs(q_row, kv_row):
        """Block specs of ``operands`` given the query-tile and key-block index functions."""
        def tile(bi, ki, a, m, tb):
            return (bi, ki, q_row(bi, ki, a, m, tb), 0)

        def block(bi, ki, a, m, tb):
            return (bi, ki, kv_row(bi, ki, a, m, tb), 0)

        return [
            pl.BlockSpec((None, g, bq, h), tile),
            pl.BlockSpec((None, None, bk, h), block),
            pl.BlockSpec((None, None, bk, vw), block),
            pl.BlockSpec((None, g, bq, vw), tile),
            pl.BlockSpec((None, g, bq, 1), tile),
            pl.BlockSpec((None, g, bq, 1), tile),
            *_token_specs(bq, bk, q_row, kv_row),
        ]

    own, listed = _own, _listed
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, groups=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kg, qt, j), in_specs=specs(own, listed),
            out_specs=pl.BlockSpec((None, g, bq, h), lambda bi, ki, a, m, tb: (bi, ki, a, 0)),
            scratch_shapes=[pltpu.VMEM((g, bq, h), F32)]),
        out_shape=jax.ShapeDtypeStruct(p["q"].shape, p["q"].dtype),
        name="block_sparse_attention_tpu_dq",
        **cfg.mosaic_params,
    )(p["fwd"], *operands)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, groups=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kg, j, qt), in_specs=specs(listed, own),
            out_specs=[pl.BlockSpec((None, None, bk, h), lambda bi, ki, a, m, tb: (bi, ki, a, 0)),
                       pl.BlockSpec((None, None, bk, vw), lambda bi, ki, a, m, tb: (bi, ki, a, 0))],
            scratch_shapes=[pltpu.VMEM((bk, h), F32), pltpu.VMEM((bk, vw), F32)]),
        out_shape=[jax.ShapeDtypeStruct(p["k"].shape, p["k"].dtype),
                   jax.ShapeDtypeStruct(p["v"].shape, p["v"].dtype)],
        name="block_sparse_attention_tpu_dkv",
        **cfg.mosaic_params,
    )(p["bwd"], *operands)
    dsink = None if sink_N is None else common.sink_grad(sink_N, lse[..., 0], delta[..., 0], cfg.t)
    return (dq.transpose(0, 2, 1, 3)[:, : cfg.t], dk.transpose(0, 2, 1, 3)[:, : cfg.s],
            dv.transpose(0, 2, 1, 3)[:, : cfg.s], dsink)


_attention = common.sparse_attention_vjp(_forward, _backward)


def block_sparse_attention_tpu(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array,
                               block_keep_BKTJ: Array, *, block_k: int, causal: bool,
                               scale: float | None = None, sink: Array | None = None,
                               key_valid_BS: Array | None = None, q_pos_T: Array | None = None,
                               k_pos_S: Array | None = None, window: int | None = None,
                               num_sink_keys: int = 0,
                               block_sizes: BlockSizes = TPU_BLOCK_SIZES,
                               interpret: bool | None = None,
                               precision: jax.lax.PrecisionLike = None,
                               q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                               k_sink_BS: Array | None = None,
                               return_lse: bool = False) -> Array | tuple[Array, Array]:
    """The TPU kernel; arguments and semantics (``return_lse`` included) as
    ``kernel.block_sparse_attention``.

    ``interpret`` defaults to True off TPU (``pltpu.InterpretParams()``, which also checks DMA
    and scratch use). Mosaic wants ``block_q`` a multiple of 32 (the int8 selection column) and
    ``block_k`` a multiple of 8. float64 operands (under ``jax_enable_x64``) are computed in
    float32, as a TPU must.
    """
    selection = checked_operands(q_BTNH, k_BSKH, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S,
                                 block_k=block_k, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS,
                                 k_sink_BS=k_sink_BS)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    cfg = block_config(q_BTNH, k_BSKH, block_q=block_sizes.block_q, block_k=block_k,
                       causal=causal, scale=scale, interpret=interpret, window=window,
                       num_sink_keys=num_sink_keys, precision=precision,
                       segments=q_seg_BT is not None, key_sinks=k_sink_BS is not None)
    out, lse_BTN = _attention(*common.at_most_f32(q_BTNH, k_BSKH, v_BSKV, sink), selection,
                              cfg=cfg)
    out = out.astype(q_BTNH.dtype)
    return (out, lse_BTN) if return_lse else out

"""Token-gather flash attention for TPU (Mosaic), forward and fused backward.

The algorithm of ``kernel.py`` (a query tile walks the union of key blocks its queries read,
loading each K/V block once for the tile and all heads of its kv group; exact per-query
membership from the selection bitmask, or'ed with the positional window rule), written the way
Mosaic pipelines it:

* ``pltpu.PrefetchScalarGridSpec``: the visit tables (``tables.py``) are scalar-prefetched
  into SMEM and drive the ``BlockSpec`` index maps. The grid is (B, K, query tiles, table
  slots) for the forward and dq passes and (B, K, key blocks, table slots) for dk/dv; slot
  ``m`` of a tile maps to block ``table[m + 1]``. Slots past the row's count repeat the last
  block index, so the pipeline issues no copy for them, and their compute is skipped
  (``pl.when``). Accumulators live in VMEM scratch across the slot axis ("arbitrary").
* Transposed orientation: logits are (block_k, block_q), keys on sublanes and queries on
  lanes. Per-query statistics (max, sum, logsumexp, delta) are then (1, block_q) rows and the
  bitmask is stored as (B, W, T), so a block's membership is ``words_per_block`` (1, block_q)
  rows of words expanded along sublanes with a shift: no lane gathers, no relayouts. The dk/dv
  pass needs no transposes at all ((block_k, block_q) @ (block_q, H)).

Packed sequences: as in ``kernel.py`` (other segments' selections dropped before the bitmask,
each block's membership and'ed with the segment rule); the query ids are a (B, 1, Tp) row
operand ((1, block_q) per tile, queries on lanes) and the key ids a (B, Sp, 1) column operand
((block_k, 1) per block, keys on sublanes), so the rule is one broadcast compare.

Key blocks are 128 keys (4 words) and query tiles 128 queries by default (the TPU lane width).
Interpret mode (``pltpu.InterpretParams``) runs it on CPU in the tests; lowering for TPU is
checked with ``jax.export``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import common
from ..common import F32, FILL, KernelConfig, check_segments, same_segment
from .kernel import check_shapes, token_config, token_tables
from .tables import WORD, key_bitmask, membership, segment_indices

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    block_q: int = 128
    words_per_block: int = 4


def _membership_t(bits_ref, segs, j, i, cfg: KernelConfig):
    """(block_k, block_q) bool: key ``j * block_k + r`` is read by query ``i * block_q + c``;
    each bitmask row (1, block_q) holds the words of 32 keys for the tile's queries. ``segs``:
    the tile's query segment ids (1, block_q) and the block's key ids (block_k, 1) refs, or
    None."""
    shape = (cfg.block_k, cfg.block_q)
    r = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    c = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    wpb = cfg.block_k // WORD
    words = [bits_ref[pl.ds(j * wpb + w, 1), :] for w in range(wpb)]
    hit = membership(words, i * cfg.block_q + c, r, j * cfg.block_k, **cfg.rule)
    if segs is None:
        return hit
    qseg_ref, kseg_ref = segs
    return hit & same_segment(qseg_ref[...], kseg_ref[...])


def _split_segments(refs, packed: bool):
    """((q_seg_ref, k_seg_ref) or None, remaining refs)."""
    return (tuple(refs[:2]), refs[2:]) if packed else (None, refs)


def _kv_refs(k_ref, rest, shared: bool):
    """(v_ref, outputs and scratch): with shared K/V the keys are the values."""
    return (k_ref, rest) if shared else (rest[0], rest[1:])


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(table_ref, sink_ref, bits_ref, *refs, cfg: KernelConfig, has_sink: bool,
                groups: int, packed: bool):
    segs, (q_ref, k_ref, *rest) = _split_segments(refs, packed)
    v_ref, (o_ref, lse_ref, acc_scr, m_scr, l_scr) = _kv_refs(k_ref, rest, cfg.shared_kv)
    b, kg, i, m = (pl.program_id(a) for a in range(4))
    prec = cfg.precision

    def _init():
        acc_scr[...] = jnp.zeros_like(acc_scr)
        m_scr[...] = jnp.full_like(m_scr, FILL)
        l_scr[...] = jnp.zeros_like(l_scr)

    def _visit():
        mask = _membership_t(bits_ref, segs, table_ref[b, i, m + 1], i, cfg)
        kb = k_ref[...]
        vb = kb if cfg.shared_kv else v_ref[...]
        for g in range(groups):  # all heads of the group reuse the K/V block
            s = jnp.where(mask, common.dot_t(kb, q_ref[g], prec) * cfg.scale, FILL)  # (block_k, block_q)
            acc_scr[g], m_scr[g], l_scr[g] = common.online_softmax_step(
                (acc_scr[g], m_scr[g], l_scr[g]), s, mask,
                lambda p: common.tn_dot(vb, p.astype(vb.dtype), prec), axis=0, keepdims=True)

    def _finish():
        for g in range(groups):
            out, lse = common.finish_softmax(acc_scr[g], m_scr[g], l_scr[g],
                                      sink_ref[kg, g] if has_sink else None)
            o_ref[g] = out.astype(o_ref.dtype)
            lse_ref[pl.ds(g, 1), :] = lse

    common.table_walk(table_ref[b, i, 0], _init, _visit, _finish)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(table_ref, bits_ref, *refs, cfg: KernelConfig, groups: int, packed: bool):
    segs, (q_ref, k_ref, *rest) = _split_segments(refs, packed)
    v_ref, (do_ref, lse_ref, delta_ref, dq_ref, dq_scr) = _kv_refs(k_ref, rest, cfg.shared_kv)
    b, i, m = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    prec = cfg.precision

    def _init():
        dq_scr[...] = jnp.zeros_like(dq_scr)

    def _visit():
        mask = _membership_t(bits_ref, segs, table_ref[b, i, m + 1], i, cfg)
        kb = k_ref[...]
        vb = kb if cfg.shared_kv else v_ref[...]
        for g in range(groups):
            s = common.dot_t(kb, q_ref[g], prec) * cfg.scale
            p = jnp.where(mask, jnp.exp(s - lse_ref[pl.ds(g, 1), :]), 0.0)
            dp = common.dot_t(vb, do_ref[g], prec)
            ds = p * (dp - delta_ref[pl.ds(g, 1), :])
            dq_scr[g] = dq_scr[g] + common.tn_dot(ds, kb.astype(F32), prec) * cfg.scale

    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)

    common.table_walk(table_ref[b, i, 0], _init, _visit, _finish)


def _dkv_kernel(table_ref, bits_ref, *refs, cfg: KernelConfig, groups: int, packed: bool):
    segs, (q_ref, k_ref, *rest) = _split_segments(refs, packed)
    if cfg.shared_kv:
        do_ref, lse_ref, delta_ref, dk_ref, dk_scr, dv_scr = rest
        v_ref, dv_ref = k_ref, None
    else:
        v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
    b, j, m = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    prec = cfg.precision

    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    def _visit():
        mask = _membership_t(bits_ref, segs, j, table_ref[b, j, m + 1], cfg)
        kb = k_ref[...]
        vb = kb if cfg.shared_kv else v_ref[...]
        for g in range(groups):  # all heads of the group accumulate into the shared dK, dV
            qg, dog = q_ref[g], do_ref[g]
            s = common.dot_t(kb, qg, prec) * cfg.scale
            p = jnp.where(mask, jnp.exp(s - lse_ref[pl.ds(g, 1), :]), 0.0)
            dv_scr[...] += common.dot(p, dog.astype(F32), prec)
            ds = p * (common.dot_t(vb, dog, prec) - delta_ref[pl.ds(g, 1), :])
            dk_scr[...] += common.dot(ds, qg.astype(F32), prec) * cfg.scale

    def _finish():
        if cfg.shared_kv:
            dk_ref[...] = (dk_scr[...] + dv_scr[...]).astype(dk_ref.dtype)
        else:
            dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
            dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)

    common.table_walk(table_ref[b, j, 0], _init, _visit, _finish)


# ----------------------------------------------------------------------------- wrappers


def _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg: KernelConfig):
    indices_BTM, q_seg_BT, k_seg_BS = selection
    b, t, n, h = q_BTNH.shape
    kg = k_BSKH.shape[2]
    g = n // kg
    qt, j = common.cdiv(t, cfg.block_q), common.cdiv(cfg.s, cfg.block_k)
    tp, sp = qt * cfg.block_q, j * cfg.block_k
    segs = ()
    if q_seg_BT is not None:  # (B, 1, Tp) query ids, (B, Sp, 1) key ids, padding 0
        indices_BTM = segment_indices(indices_BTM, q_seg_BT, k_seg_BS)
        segs = (common.pad_axis(q_seg_BT, 1, tp)[:, None, :],
                common.pad_axis(k_seg_BS, 1, sp)[:, :, None])
    k_BKSH = common.pad_axis(k_BSKH, 1, sp).transpose(0, 2, 1, 3)
    v_BKSV = None if cfg.shared_kv else common.pad_axis(v_BSKV, 1, sp).transpose(0, 2, 1, 3)
    bits = key_bitmask(indices_BTM, cfg.s)
    fwd_table, bwd_table = token_tables(bits, cfg, q_seg_BT, k_seg_BS)
    wp = j * (cfg.block_k // WORD)
    bits_BZT = common.pad_axis(common.pad_axis(bits, 1, tp), 2, wp).transpose(0, 2, 1)
    q_BKGTH = common.pad_axis(q_BTNH, 1, tp).reshape(b, tp, kg, g, h).transpose(0, 2, 3, 1, 4)
    return dict(q=q_BKGTH, k=k_BKSH, v=v_BKSV, bits=bits_BZT, fwd=fwd_table, bwd=bwd_table,
                segs=segs, dims=(b, n, kg, g, qt, j, tp, sp, wp))


def _seg_specs(p, bq: int, bk: int, q_row, kv_row):
    """Block specs of the segment ids (none without them), given the grid's query-tile and
    key-block index functions ``(bi, a, m, tb) -> index``."""
    if not p["segs"]:
        return []
    return [pl.BlockSpec((None, 1, bq), lambda bi, ki, a, m, tb: (bi, 0, q_row(bi, a, m, tb))),
            pl.BlockSpec((None, bk, 1), lambda bi, ki, a, m, tb: (bi, kv_row(bi, a, m, tb), 0))]


def _kv(p, shared):
    return (p["k"],) if shared else (p["k"], p["v"])


def _forward(q_BTNH, k_BSKH, v_BSKV, sink_N, selection, cfg: KernelConfig):
    p = _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg)
    b, n, kg, g, qt, j, tp, sp, wp = p["dims"]
    h = p["q"].shape[-1]
    vw = h if cfg.shared_kv else p["v"].shape[-1]
    bq, bk = cfg.block_q, cfg.block_k
    sink = (jnp.zeros((kg, g), F32) if sink_N is None else sink_N.astype(F32).reshape(kg, g))
    kv_row = lambda bi, ki, qi, m, tb: (bi, ki, tb[bi, qi, m + 1], 0)  # noqa: E731
    kv_specs = [pl.BlockSpec((None, None, bk, h), kv_row)]
    if not cfg.shared_kv:
        kv_specs.append(pl.BlockSpec((None, None, bk, vw), kv_row))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kg, qt, j),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            pl.BlockSpec((None, wp, bq), lambda bi, ki, qi, m, tb: (bi, 0, qi)),
            *_seg_specs(p, bq, bk, lambda bi, a, m, tb: a, lambda bi, a, m, tb: tb[bi, a, m + 1]),
            pl.BlockSpec((None, None, g, bq, h), lambda bi, ki, qi, m, tb: (bi, ki, 0, qi, 0)),
            *kv_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, g, vw, bq), lambda bi, ki, qi, m, tb: (bi, ki, 0, 0, qi)),
            pl.BlockSpec((None, None, g, bq), lambda bi, ki, qi, m, tb: (bi, ki, 0, qi)),
        ],
        scratch_shapes=[pltpu.VMEM((g, vw, bq), F32), pltpu.VMEM((g, 1, bq), F32),
                        pltpu.VMEM((g, 1, bq), F32)],
    )
    o_BKGVT, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, has_sink=sink_N is not None, groups=g,
                          packed=bool(p["segs"])),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, kg, g, vw, tp), q_BTNH.dtype),
                   jax.ShapeDtypeStruct((b, kg, g, tp), F32)],
        name="token_sparse_attention_fwd_tpu",
        **cfg.mosaic_params,
    )(p["fwd"], sink, p["bits"], *p["segs"], p["q"], *_kv(p, cfg.shared_kv))
    o_BKGTV = o_BKGVT.transpose(0, 1, 2, 4, 3)
    out = o_BKGTV.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, vw)[:, : cfg.t]
    return out, (p, o_BKGTV, lse)


def _backward(res, do_BTNV, sink_N, cfg: KernelConfig):
    p, o_BKGTV, lse = res
    b, n, kg, g, qt, j, tp, sp, wp = p["dims"]
    h = p["q"].shape[-1]
    vw = h if cfg.shared_kv else p["v"].shape[-1]
    bq, bk = cfg.block_q, cfg.block_k
    do_BKGTV = common.pad_axis(do_BTNV, 1, tp).reshape(b, tp, kg, g, vw).transpose(0, 2, 3, 1, 4)
    delta = common.row_delta(do_BKGTV, o_BKGTV)  # B K G Tp
    operands = (p["bits"], *p["segs"], p["q"], *_kv(p, cfg.shared_kv), do_BKGTV, lse, delta)
    packed = bool(p["segs"])

    def specs(q_row, kv_row):
        """Block specs of ``operands`` given the query-tile and key-block index functions."""
        def tile(bi, ki, a, m, tb):
            return (bi, ki, 0, q_row(bi, a, m, tb), 0)

        def stat(bi, ki, a, m, tb):
            return (bi, ki, 0, q_row(bi, a, m, tb))

        def block(bi, ki, a, m, tb):
            return (bi, ki, kv_row(bi, a, m, tb), 0)

        kv = [pl.BlockSpec((None, None, bk, h), block)]
        if not cfg.shared_kv:
            kv.append(pl.BlockSpec((None, None, bk, vw), block))
        return [pl.BlockSpec((None, wp, bq), lambda bi, ki, a, m, tb: (bi, 0, q_row(bi, a, m, tb))),
                *_seg_specs(p, bq, bk, q_row, kv_row),
                pl.BlockSpec((None, None, g, bq, h), tile), *kv,
                pl.BlockSpec((None, None, g, bq, vw), tile),
                pl.BlockSpec((None, None, g, bq), stat), pl.BlockSpec((None, None, g, bq), stat)]

    own = lambda bi, a, m, tb: a  # noqa: E731 - the grid's own tile / block
    listed = lambda bi, a, m, tb: tb[bi, a, m + 1]  # noqa: E731 - from the table
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, groups=g, packed=packed),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kg, qt, j), in_specs=specs(own, listed),
            out_specs=pl.BlockSpec((None, None, g, bq, h),
                                   lambda bi, ki, a, m, tb: (bi, ki, 0, a, 0)),
            scratch_shapes=[pltpu.VMEM((g, bq, h), F32)]),
        out_shape=jax.ShapeDtypeStruct(p["q"].shape, p["q"].dtype),
        name="token_sparse_attention_dq_tpu",
        **cfg.mosaic_params,
    )(p["fwd"], *operands)
    kblk = lambda bi, ki, a, m, tb: (bi, ki, a, 0)  # noqa: E731
    out_specs = [pl.BlockSpec((None, None, bk, h), kblk)]
    out_shape = [jax.ShapeDtypeStruct(p["k"].shape, p["k"].dtype)]
    if not cfg.shared_kv:
        out_specs.append(pl.BlockSpec((None, None, bk, vw), kblk))
        out_shape.append(jax.ShapeDtypeStruct(p["v"].shape, p["v"].dtype))
    dkv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, groups=g, packed=packed),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, kg, j, qt), in_specs=specs(listed, own),
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bk, h), F32), pltpu.VMEM((bk, vw), F32)]),
        out_shape=out_shape,
        name="token_sparse_attention_dkv_tpu",
        **cfg.mosaic_params,
    )(p["bwd"], *operands)
    dsink = None if sink_N is None else common.sink_grad(sink_N, lse.reshape(b, n, -1),
                                                  delta.reshape(b, n, -1), cfg.t)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, : cfg.t]
    dk = dkv[0].transpose(0, 2, 1, 3)[:, : cfg.s]
    dv = None if cfg.shared_kv else dkv[1].transpose(0, 2, 1, 3)[:, : cfg.s]
    return dq, dk, dv, dsink


_attention = common.sparse_attention_vjp(_forward, _backward)


def token_sparse_attention_tpu(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array | None,
                               indices_BTM: Array, *, scale: float | None = None,
                               sink: Array | None = None, window: int | None = None,
                               window_start: int = 0, q_seg_BT: Array | None = None,
                               k_seg_BS: Array | None = None,
                               block_sizes: TpuBlockSizes = TpuBlockSizes(),
                               interpret: bool | None = None,
                               precision: jax.lax.PrecisionLike = None) -> Array:
    """The TPU kernel; same contract as ``kernel.token_sparse_attention``. ``interpret``
    defaults to True off TPU (``pltpu.InterpretParams``). float64 operands (under
    ``jax_enable_x64``) are computed in float32, as a TPU must."""
    check_shapes(q_BTNH, k_BSKH, v_BSKV, indices_BTM)
    segs = check_segments("token_sparse_attention_tpu", q_BTNH.shape[0], q_BTNH.shape[1], k_BSKH.shape[1],
                          q_seg_BT, k_seg_BS)[:2]
    t = q_BTNH.shape[1]
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    # a single tile covers short sequences (the block then equals the array dimension)
    bq = block_sizes.block_q if t > block_sizes.block_q else -(-t // 8) * 8
    cfg = token_config(q_BTNH, k_BSKH, v_BSKV, block_q=bq,
                       words_per_block=block_sizes.words_per_block, scale=scale,
                       interpret=interpret, window=window, window_start=window_start,
                       precision=precision)
    out = _attention(*common.at_most_f32(q_BTNH, k_BSKH, v_BSKV, sink),
                     (indices_BTM.astype(jnp.int32), *segs), cfg=cfg)
    return out.astype(q_BTNH.dtype)

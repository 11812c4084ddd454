"""Block-sparse flash attention in Pallas (Triton on GPU; interpret mode on CPU).

Forward and fused backward (dq; dk/dv) with online softmax in float32 (the tile loops of
``pallas_kernels/flash.py``), per-token membership inside visited blocks, causal masking inside
partially visible blocks, key validity, packed sequences (per-batch segment ids of the query
tile and key block, per-key window sinks), GQA and an optional per-head sink logit. Exactness for
any selection is tested against ``reference.block_sparse_attention_reference`` in interpret
mode, the three kernels are lowered for CUDA with ``jax.export`` in the tests, and
``benchmarks/gpu_check.py`` compares them compiled on a GPU. The TPU variant is ``tpu.py``;
the XLA path for CPU is ``xla.py``; all three share the masking rule and operand checks defined
here, the tables of ``tables.py`` and the contract of ``pallas_kernels/common.py``.

Layout: operands are transposed to head-major (B, N, T, H) so that a kernel instance reads
contiguous (tokens, width) tiles, widths zero-padded to a power of two (``common.pad_lanes``). Grid
(B, N, query tiles) for the forward and dq passes, (B, N, key blocks) for dk/dv, one query head
per instance: query head ``n`` reads the K/V, tables and selection of kv group ``n // G``
through the index maps. (An instance holding all G heads of a group would load each K/V block
once, but its G accumulators overflow the H100's 227 KiB of shared memory at head width 128;
the repeated loads hit L2.) dK/dV are accumulated per query head and summed over the group.
Each instance walks its row of the block table (``tables.py``): a dynamic trip count, so only
selected blocks are read.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import common
from ..common import F32, KernelConfig, check_segments
from ..flash import dkv_call, dkv_tile, dq_call, dq_tile, forward_call, forward_tile
from .reference import zero_padding
from .tables import build_tables, segment_block_keep

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query tile size (the key block size is the selection's granularity, ``block_k``) and,
    for Triton, warps per instance and software-pipelining stages.

    Measured on an H100 (bf16, 16 x 128 heads, T = 32768, key blocks of 128, 1/16 selected;
    ``benchmarks/gpu_session.sh sweep``, docs/performance.md): the defaults run forward and backward;
    ``BlockSizes(128, 8, 3)`` makes the forward 1.6x faster (3.45 against 5.65 ms) but its
    backward kernels ask for 257 KiB of shared memory (the H100 has 227), so it suits
    inference only."""

    block_q: int = 64
    num_warps: int = 4
    num_stages: int = 2


def _row(x):
    return x if x.ndim == 2 else x[None, :]


def _col(x):
    return x if x.ndim == 2 else x[:, None]


def token_mask(keep_col, k_seg, k_sink, q_seg, q_pos, k_pos, k_idx, *, s_len: int, causal: bool,
               window: int | None, num_sink_keys: int, segments: bool, key_sinks: bool):
    """(block_q, block_k) membership: selected block, a readable key in range (``k_seg != 0``:
    ``Selection.k_seg``), with ``segments`` the query's own segment (``k_seg == q_seg``), and the
    token rules on positions: causal ``k_pos <= q_pos``; window ``k_pos > q_pos - window``
    unless the key is a sink (one of the first ``num_sink_keys`` keys or, with ``key_sinks``,
    flagged in ``k_sink``). Query vectors may come as (block_q,) or (block_q, 1), key vectors
    as (block_k,) or (1, block_k) (the TPU layout); ``q_seg`` / ``k_sink`` are not read when
    their flag is off."""
    k_idx, k_pos, q_pos, k_seg = _row(k_idx), _row(k_pos), _col(q_pos), _row(k_seg)
    m = (keep_col != 0) & (k_seg != 0) & (k_idx < s_len)
    if segments:
        m = m & (k_seg == _col(q_seg))
    if causal:
        m = m & (k_pos <= q_pos)
    if window is not None:
        sink = k_idx < num_sink_keys
        if key_sinks:
            sink = sink | (_row(k_sink) != 0)
        m = m & (sink | (k_pos > q_pos - window))
    return m


class Selection(NamedTuple):
    """Everything an impl reads besides q, k, v and the sink logit; never differentiated.

    ``keep`` (B, K, T, J) bool, already without the key blocks of other segments
    (``tables.segment_block_keep``); ``q_pos`` (T,), ``k_pos`` (S,) int32; ``q_seg`` (B, T)
    int32 (ones without segments); ``k_seg`` (B, S) int32, the key's segment id and 0 where no
    query may read it (padding, ``key_valid`` False; without segments ``key_valid`` as 0/1);
    ``k_sink`` (B, S) bool or None: keys the window rule exempts.
    """

    keep: Array
    q_pos: Array
    k_pos: Array
    q_seg: Array
    k_seg: Array
    k_sink: Array | None


def block_tables(sel: Selection, cfg: KernelConfig):
    """The forward and backward tables of this call (``tables.build_tables``)."""
    rule = cfg.rule
    return build_tables(sel.keep, block_q=cfg.block_q, block_k=cfg.block_k,
                        q_pos=sel.q_pos, k_pos=sel.k_pos, causal=rule["causal"],
                        window=rule["window"], num_sink_keys=rule["num_sink_keys"],
                        k_sink_BS=sel.k_sink)


def key_inputs(sel: Selection, tp: int, sp: int, sink_dtype=jnp.int8):
    """Per-batch token vectors padded to whole tiles: (q_seg (B, Tp) int32, k_seg (B, Sp) int32,
    k_sink (B, Sp) ``sink_dtype``), padding rows and keys with id 0 / no sink."""
    b, s = sel.k_seg.shape
    k_sink = jnp.zeros((b, s), sink_dtype) if sel.k_sink is None else sel.k_sink.astype(sink_dtype)
    return (common.pad_axis(sel.q_seg, 1, tp), common.pad_axis(sel.k_seg, 1, sp),
            common.pad_axis(k_sink, 1, sp))


def zero_unread(q_BTNH, k_BSKH, v_BSKV, sel: Selection, cfg: KernelConfig):
    """With segments, padding queries and unreadable keys zeroed (``reference.zero_padding``):
    NaN or inf there then reaches no output or gradient. Identity otherwise."""
    if not cfg.rule["segments"]:
        return q_BTNH, k_BSKH, v_BSKV
    return zero_padding(q_BTNH, k_BSKH, v_BSKV, sel.q_seg, sel.k_seg)


def zero_padding_rows(do_BTNV, q_seg_BT, cfg: KernelConfig):
    """The output gradient with its padding-query rows zeroed (their outputs are constant 0)."""
    if not cfg.rule["segments"]:
        return do_BTNV
    return jnp.where((q_seg_BT != 0)[:, :, None, None], do_BTNV, jnp.zeros((), do_BTNV.dtype))


# ----------------------------------------------------------------------------- kernels
# One instance per (batch, query head, tile); K/V, the tables and the selection of query head
# ``n`` are those of its kv group ``n // G`` (index maps below), so GQA costs no copies.


def _mask_fn(keep_ref, kseg_ref, ksink_ref, qseg_ref, qpos_ref, k_pos_ref, *, block_k: int,
             rules: dict):
    """mask_fn for the forward and dq loops: membership of key block ``j`` for this tile."""
    q_seg = qseg_ref[...] if rules["segments"] else None
    q_pos = qpos_ref[...]

    def mask(j, start):
        keys = pl.ds(start, block_k)
        return token_mask(keep_ref[:, pl.ds(j, 1)], kseg_ref[keys],
                          ksink_ref[keys] if rules["key_sinks"] else None, q_seg, q_pos,
                          k_pos_ref[keys], start + jnp.arange(block_k, dtype=jnp.int32), **rules)

    return mask


def _fwd_kernel(table_ref, keep_ref, kseg_ref, ksink_ref, qseg_ref, qpos_ref, kpos_ref, sink_ref,
                q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: KernelConfig, has_sink: bool):
    mask = _mask_fn(keep_ref, kseg_ref, ksink_ref, qseg_ref, qpos_ref, kpos_ref,
                    block_k=cfg.block_k, rules=cfg.rule)
    sink = sink_ref[0] if has_sink else None
    out, lse = forward_tile(table_ref, q_ref[...], k_ref, v_ref, sink, mask, scale=cfg.scale,
                            block_k=cfg.block_k, precision=cfg.precision)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(table_ref, keep_ref, kseg_ref, ksink_ref, qseg_ref, qpos_ref, kpos_ref, q_ref,
               k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: KernelConfig):
    mask = _mask_fn(keep_ref, kseg_ref, ksink_ref, qseg_ref, qpos_ref, kpos_ref,
                    block_k=cfg.block_k, rules=cfg.rule)
    dq = dq_tile(table_ref, q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], k_ref, v_ref,
                 mask, scale=cfg.scale, block_k=cfg.block_k, precision=cfg.precision)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(table_ref, keep_ref, kseg_ref, ksink_ref, qseg_ref, qpos_ref, kpos_ref, q_ref,
                k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: KernelConfig):
    k_idx = pl.program_id(2) * cfg.block_k + jnp.arange(cfg.block_k, dtype=jnp.int32)
    rule = cfg.rule
    k_pos, k_seg = kpos_ref[...], kseg_ref[...]
    k_sink = ksink_ref[...] if rule["key_sinks"] else None

    def mask(i, rows):
        q_seg = qseg_ref[rows] if rule["segments"] else None
        return token_mask(keep_ref[rows, :], k_seg, k_sink, q_seg, qpos_ref[rows], k_pos, k_idx,
                          **rule)

    dk, dv = dkv_tile(table_ref, k_ref[...], v_ref[...], q_ref, do_ref, lse_ref, delta_ref, mask,
                      scale=cfg.scale, block_q=cfg.block_q, precision=cfg.precision)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers


def _prepare(q_BTNH, k_BSKH, v_BSKV, sel: Selection, cfg: KernelConfig):
    """Pad to whole tiles, go head-major, build the tables and the int8 masks."""
    b, t, n, _ = q_BTNH.shape
    kg = k_BSKH.shape[2]
    qt, j = common.cdiv(t, cfg.block_q), common.cdiv(cfg.s, cfg.block_k)
    tp, sp = qt * cfg.block_q, j * cfg.block_k
    keep = common.pad_axis(sel.keep.astype(jnp.int8), 2, tp)
    fwd_table, bwd_table = block_tables(sel, cfg)
    q_BTNH, k_BSKH, v_BSKV = zero_unread(q_BTNH, k_BSKH, v_BSKV, sel, cfg)
    q_seg, k_seg, k_sink = key_inputs(sel, tp, sp)
    # padded query rows sit at the last real position (their output is dropped); padded keys
    # are removed by the ``k_idx < S`` rule
    return dict(q=common.head_major(q_BTNH, tp), k=common.head_major(k_BSKH, sp),
                v=common.head_major(v_BSKV, sp), keep=keep, k_seg=k_seg, k_sink=k_sink,
                q_seg=q_seg, fwd=fwd_table, bwd=bwd_table, q_seg_BT=sel.q_seg,
                q_pos=common.pad_axis(sel.q_pos, 0, tp, mode="edge"),
                k_pos=common.pad_axis(sel.k_pos, 0, sp, mode="edge"),
                dims=(b, n, kg, qt, j, tp, sp))


def _masks(p):
    """The per-token operands after the table row: selection, key ids and sinks, query ids,
    query and key positions (``_selection_specs`` order)."""
    return p["keep"], p["k_seg"], p["k_sink"], p["q_seg"], p["q_pos"], p["k_pos"]


def _selection_specs(g: int, j: int, bq: int, sp: int):
    """Forward / dq specs of (table row, ``_masks``)."""
    return [pl.BlockSpec((None, None, None, j + 1), lambda bi, ni, qi: (bi, ni // g, qi, 0)),
            pl.BlockSpec((None, None, bq, j), lambda bi, ni, qi: (bi, ni // g, qi, 0)),
            pl.BlockSpec((None, sp), lambda bi, ni, qi: (bi, 0)),
            pl.BlockSpec((None, sp), lambda bi, ni, qi: (bi, 0)),
            pl.BlockSpec((None, bq), lambda bi, ni, qi: (bi, qi)),
            pl.BlockSpec((bq,), lambda bi, ni, qi: (qi,)),
            pl.BlockSpec((sp,), lambda bi, ni, qi: (0,))]


def _forward(q_BTNH, k_BSKH, v_BSKV, sink_N, selection, cfg: KernelConfig):
    p = _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg)
    b, n, kg, qt, j, tp, sp = p["dims"]
    sink = jnp.zeros((n,), F32) if sink_N is None else sink_N.astype(F32)
    specs = [*_selection_specs(n // kg, j, cfg.block_q, sp),
             pl.BlockSpec((1,), lambda bi, ni, qi: (ni,))]
    o, lse = forward_call(
        functools.partial(_fwd_kernel, cfg=cfg, has_sink=sink_N is not None), cfg,
        "block_sparse_attention_fwd", specs,
        (p["fwd"], *_masks(p), sink), p["q"], (p["k"], p["v"]))
    lse_BTN = common.lse_out(lse.transpose(0, 2, 1)[:, : cfg.t])
    return (o.transpose(0, 2, 1, 3)[:, : cfg.t], lse_BTN), (p, o, lse)


def _backward(res, cotangents, sink_N, cfg: KernelConfig):
    p, o, lse = res
    do_BTNV, dlse_BTN = cotangents
    b, n, kg, qt, j, tp, sp = p["dims"]
    g, bk = n // kg, cfg.block_k
    do = common.head_major(zero_padding_rows(do_BTNV, p["q_seg_BT"], cfg), tp)
    dlse = common.pad_axis(dlse_BTN, 1, tp).transpose(0, 2, 1)
    delta = common.row_delta(do, o, lse=lse, dlse=dlse)  # (B, N, Tp)
    masks = _masks(p)
    tensors = (p["q"], (p["k"], p["v"]), do, lse, delta)
    dq = dq_call(functools.partial(_dq_kernel, cfg=cfg), cfg, "block_sparse_attention_dq",
                 _selection_specs(g, j, cfg.block_q, sp), (p["fwd"], *masks), *tensors)
    dkv_specs = [
        pl.BlockSpec((None, None, None, qt + 1), lambda bi, ni, ji: (bi, ni // g, ji, 0)),
        pl.BlockSpec((None, None, tp, 1), lambda bi, ni, ji: (bi, ni // g, 0, ji)),
        pl.BlockSpec((None, bk), lambda bi, ni, ji: (bi, ji)),
        pl.BlockSpec((None, bk), lambda bi, ni, ji: (bi, ji)),
        pl.BlockSpec((None, tp), lambda bi, ni, ji: (bi, 0)),
        pl.BlockSpec((tp,), lambda bi, ni, ji: (0,)),
        pl.BlockSpec((bk,), lambda bi, ni, ji: (ji,)),
    ]
    dk, dv = dkv_call(functools.partial(_dkv_kernel, cfg=cfg), cfg, "block_sparse_attention_dkv",
                      dkv_specs, (p["bwd"], *masks), *tensors)
    # dK, dV were per query head: summed over each kv head's group
    dk, dv = (common.group_sum(a, kg, p["k"].dtype) for a in (dk, dv))
    dsink = None if sink_N is None else common.sink_grad(sink_N, lse, delta, cfg.t)
    return (dq.transpose(0, 2, 1, 3)[:, : cfg.t], dk.transpose(0, 2, 1, 3)[:, : cfg.s],
            dv.transpose(0, 2, 1, 3)[:, : cfg.s], dsink)


def checked_operands(q_BTNH, k_BSKH, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S, *,
                     block_k: int, q_seg_BT=None, k_seg_BS=None, k_sink_BS=None) -> Selection:
    """Validate shapes; return the ``Selection`` every impl reads. With segments, the key blocks
    that hold no key of the query's segment leave ``keep`` here, once for every impl
    (``tables.segment_block_keep``), so no table lists them."""
    b, t, n, _ = q_BTNH.shape
    s, kg = k_BSKH.shape[1], k_BSKH.shape[2]
    common.check_heads(n, kg)
    j = common.cdiv(s, block_k)
    if block_keep_BKTJ.shape != (b, kg, t, j):
        raise ValueError(f"block_keep must have shape (B, K, T, ceil(S / block_k))={(b, kg, t, j)}, "
                         f"got {tuple(block_keep_BKTJ.shape)}")
    if key_valid_BS is not None and tuple(key_valid_BS.shape) != (b, s):
        raise ValueError(f"key_valid_BS must have shape (B, S)={(b, s)}, "
                         f"got {tuple(key_valid_BS.shape)}")
    q_seg, k_seg, k_sink = check_segments("block_sparse_attention", b, t, s, q_seg_BT, k_seg_BS,
                                          k_sink_BS)
    keep = block_keep_BKTJ.astype(bool)
    valid = jnp.ones((b, s), bool) if key_valid_BS is None else key_valid_BS.astype(bool)
    if q_seg is None:
        q_seg, k_seg = jnp.ones((b, t), jnp.int32), valid.astype(jnp.int32)
    else:
        k_seg = jnp.where(valid, k_seg, 0)
        keep = segment_block_keep(keep, q_seg, k_seg, block_k=block_k)
    q_pos = jnp.arange(t, dtype=jnp.int32) + (s - t) if q_pos_T is None else q_pos_T
    k_pos = jnp.arange(s, dtype=jnp.int32) if k_pos_S is None else k_pos_S
    return Selection(keep, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32), q_seg, k_seg,
                     k_sink)


def block_config(q_BTNH, k_BSKH, *, block_q: int, block_k: int, causal: bool,
                 scale: float | None, interpret: bool, window: int | None, num_sink_keys: int,
                 precision: jax.lax.PrecisionLike, num_warps: int = 4,
                 num_stages: int = 2, segments: bool = False,
                 key_sinks: bool = False) -> KernelConfig:
    """The ``KernelConfig`` of a block-sparse call (its rule: causal, window, sink keys, and
    whether segment ids and per-key sink flags are given)."""
    s = k_BSKH.shape[1]
    return KernelConfig(block_q, block_k, common.default_scale(q_BTNH.shape[-1], scale), q_BTNH.shape[1],
                        s, interpret, common.rules(s_len=s, causal=causal, window=window,
                                                   num_sink_keys=num_sink_keys, segments=segments,
                                                   key_sinks=key_sinks),
                        num_warps=num_warps, num_stages=num_stages, precision=precision)


_attention = common.sparse_attention_vjp(_forward, _backward)


def block_sparse_attention(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, block_keep_BKTJ: Array,
                           *, block_k: int, causal: bool, scale: float | None = None,
                           sink: Array | None = None, key_valid_BS: Array | None = None,
                           q_pos_T: Array | None = None, k_pos_S: Array | None = None,
                           window: int | None = None, num_sink_keys: int = 0,
                           block_sizes: BlockSizes = BlockSizes(),
                           interpret: bool | None = None,
                           precision: jax.lax.PrecisionLike = None,
                           q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                           k_sink_BS: Array | None = None,
                           return_lse: bool = False) -> Array | tuple[Array, Array]:
    """Attention over the selected key blocks only; equals ``block_sparse_attention_reference``.

    ``block_keep_BKTJ`` (B, K, T, ceil(S / block_k)) bool: key blocks each query token of each
    kv group may read (per token, so any selection is exact). Token rules inside the blocks use
    positions (``q_pos_T`` default ``arange(T) + S - T``, ``k_pos_S`` default ``arange(S)``):
    causal keeps ``k_pos <= q_pos``; ``window`` keeps ``k_pos > q_pos - window`` except for the
    first ``num_sink_keys`` keys. ``interpret`` defaults to True off GPU/TPU. Differentiable in
    q, k, v and ``sink``. Any head width: widths are zero-padded to ``lane_width`` for Triton.
    ``precision`` reaches every in-kernel matrix product.

    Packed sequences: ``q_seg_BT`` (B, T) and ``k_seg_BS`` (B, S) integer segment ids (both or
    neither) add the rule ``k_seg[b, s] == q_seg[b, t] != 0`` (id 0: padding, read by no one;
    key blocks without a key of the query's segment are never visited); ``k_sink_BS`` (B, S)
    bool exempts keys from the ``window`` rule besides the first ``num_sink_keys``. With
    segments, padding queries and unreadable keys are zeroed first, so NaN or inf there reaches
    no output or gradient.

    ``return_lse``: also return the row logsumexp (B, T, N) float32, ``log(sum exp(scale *
    q.k))`` over the keys the row reads plus ``exp(sink)``, ``-inf`` for a row that reads nothing
    and has no sink; differentiable (its cotangent joins the backward's ``delta``), so that
    disjoint passes over one softmax merge exactly.
    """
    selection = checked_operands(q_BTNH, k_BSKH, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S,
                                 block_k=block_k, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS,
                                 k_sink_BS=k_sink_BS)
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "tpu")
    cfg = block_config(q_BTNH, k_BSKH, block_q=block_sizes.block_q, block_k=block_k,
                       causal=causal, scale=scale, interpret=interpret, window=window,
                       num_sink_keys=num_sink_keys, precision=precision,
                       num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages,
                       segments=q_seg_BT is not None, key_sinks=k_sink_BS is not None)
    out, lse_BTN = _attention(common.pad_lanes(q_BTNH), common.pad_lanes(k_BSKH),
                              common.pad_lanes(v_BSKV), sink, selection, cfg=cfg)
    out = out[..., : v_BSKV.shape[-1]]
    return (out, lse_BTN) if return_lse else out

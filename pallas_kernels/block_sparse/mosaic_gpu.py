"""Mosaic GPU (Hopper) variant of the block-sparse kernel: warp-specialised, TMA-fed, wgmma.

Same semantics, tables and fused backward as ``kernel.py`` (the Triton variant); the passes are
``pallas_kernels/mgpu_flash.py``'s (a producer warpgroup TMA-copies each listed block through a
ring of shared-memory stages, a consumer warpgroup runs the ``wgmma`` products). What this file
adds is the block-sparse membership as the kernels read it:

- per (query tile, key block) pair, the tile's selection column of the block (``keepT``
  (B, K, J, Tp) int32, one 256-byte TMA copy);
- per key block, the keys' positions, segment ids (0: unreadable, padding included) and window
  sink flags (the first ``num_sink_keys`` keys folded in), (B, J, 3, block_k) int32;
- per query tile, the queries' positions and segment ids, (B, Q, 2, BLOCK_Q) int32;

and the rule itself is ``kernel.token_mask``, the one every impl shares, on those vectors
broadcast into the wgmma layout. Full-block flags (``full_flags``): every token of the tile
selects the block, its keys are readable and of the tile's one segment, and the causal / window
rules hold at the extreme positions; such blocks skip the mask.

Verified on CPU in GPU interpret mode against ``reference.block_sparse_attention_reference``
(``tests/mgpu_cases.py``) and lowered for an abstract H100 with ``jax.export`` in the tests;
compiled runs and timings on a Hopper GPU are ``benchmarks/gpu_check.py --sections mgpu`` and
``benchmarks/block_sparse_gpu.py --kernel mosaic_gpu``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import common, mgpu_flash
from ..common import KernelConfig
from ..mgpu_flash import BLOCK_Q, MaskSpec, Source, along, iota
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


def _sources(bk: int) -> tuple[Source, ...]:
    """The selection column of a (tile, block) pair, the block's key vectors, the tile's query
    vectors (``_prepare``'s ``srcs``)."""
    return (Source("pair", (BLOCK_Q,), jnp.int32,
                   lambda r, b, k, i, j: r.at[b, k, j, pl.ds(i * BLOCK_Q, BLOCK_Q)]),
            Source("block", (3, bk), jnp.int32, lambda r, b, k, i, j: r.at[b, j]),
            Source("tile", (2, BLOCK_Q), jnp.int32, lambda r, b, k, i, j: r.at[b, i]))


def _mask_spec(cfg: KernelConfig) -> MaskSpec:
    rule = cfg.rule
    # the key rules folded into the key vectors: padding keys have id 0 and the first
    # ``num_sink_keys`` keys are flagged sinks, so token_mask needs no key index
    folded = dict(rule, s_len=jnp.iinfo(jnp.int32).max, num_sink_keys=0,
                  key_sinks=rule["window"] is not None)

    def mask(refs, shape, key_dim, i, j):
        (keep,), (kvec,), (qvec,) = refs["pair"], refs["block"], refs["tile"]

        def key(r):
            return along(kvec.at[r], shape, key_dim, keys=True)

        def query(r):
            return along(qvec.at[r], shape, key_dim, keys=False)

        zeros = iota(shape, 0) * 0
        return token_mask(along(keep, shape, key_dim, keys=False), key(1),
                          key(2) if folded["key_sinks"] else None,
                          query(1) if rule["segments"] else None, query(0), key(0), zeros,
                          **folded)

    return MaskSpec(_sources(cfg.block_k), mask, row=lambda table, b, k, x: table.at[b, k, x])


def smem_plan(dtype, h: int, hv: int, block_k: int) -> dict[str, int]:
    """Pipeline stages per pass (``mgpu_flash.smem_plan``) of a block-sparse call."""
    return mgpu_flash.smem_plan(dtype, h, hv, block_k, _sources(block_k))


def mosaic_gpu_unsupported(q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ, *, block_k: int,
                           interpret: bool | None = None, **kwargs) -> str | None:
    """Why this call cannot run on the Mosaic GPU kernels (None when it can): the registry's
    ``supports`` check of the ``mosaic_gpu`` impl."""
    return mgpu_flash.unsupported(q_BTNH, k_BSKH, v_BSKV, block_k, _sources(block_k), interpret)


# ----------------------------------------------------------------------------- operands


def full_flags(sel: Selection, cfg: KernelConfig, tp: int, sp: int) -> Array:
    """(B, K, Q, J) bool: every token of query tile ``i`` reads every key of block ``j`` (so the
    kernels may skip the per-token mask). Conservative: a ``False`` only costs the mask."""
    rule, bq, bk = cfg.rule, cfg.block_q, cfg.block_k
    b, kg, t, j = sel.keep.shape
    qt = tp // bq
    keep = common.pad_axis(sel.keep, 2, tp)  # padded rows read nothing: not full
    full = keep.reshape(b, kg, qt, bq, j).all(axis=3)
    k_seg = common.pad_axis(sel.k_seg, 1, sp).reshape(b, j, bk)
    q_seg = common.pad_axis(sel.q_seg, 1, tp).reshape(b, qt, bq)
    readable = (k_seg != 0).all(axis=-1)[:, None, :]  # B 1 J
    if rule["segments"]:
        one_k = (k_seg == k_seg[..., :1]).all(-1)[:, None, :]
        one_q = (q_seg == q_seg[..., :1]).all(-1)[:, :, None]
        readable = readable & one_k & one_q & (q_seg[:, :, :1] == k_seg[:, None, :, 0])
    full = full & readable[:, None]
    q_pos = common.pad_axis(sel.q_pos, 0, tp, mode="edge").reshape(qt, bq)
    k_pos = common.pad_axis(sel.k_pos, 0, sp, mode="edge").reshape(j, bk)
    if rule["causal"]:
        full = full & (k_pos.max(1)[None, :] <= q_pos.min(1)[:, None])
    if rule["window"] is not None:
        full = full & (k_pos.min(1)[None, :] > q_pos.max(1)[:, None] - rule["window"])
    return full


def _prepare(q_BTNH, k_BSKH, v_BSKV, sel: Selection, cfg: KernelConfig):
    b, t, n, _ = q_BTNH.shape
    kg = k_BSKH.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    qt, j = common.cdiv(t, bq), common.cdiv(cfg.s, bk)
    tp, sp = qt * bq, j * bk
    fwd, bwd = block_tables(sel, cfg)
    flags = full_flags(sel, cfg, tp, sp)  # B K Q J
    keep = common.pad_axis(sel.keep.astype(jnp.int32), 2, tp)
    q_BTNH, k_BSKH, v_BSKV = zero_unread(q_BTNH, k_BSKH, v_BSKV, sel, cfg)
    q_seg, k_seg, k_sink = key_inputs(sel, tp, sp, jnp.int32)
    k_sink = k_sink | (jnp.arange(sp) < cfg.rule["num_sink_keys"]).astype(jnp.int32)[None]
    k_pos = jnp.broadcast_to(common.pad_axis(sel.k_pos, 0, sp, mode="edge"), (b, sp))
    q_pos = jnp.broadcast_to(common.pad_axis(sel.q_pos, 0, tp, mode="edge"), (b, tp))
    kvec = jnp.stack([k_pos, k_seg, k_sink], 1).reshape(b, 3, j, bk).transpose(0, 2, 1, 3)
    qvec = jnp.stack([q_pos, q_seg], 1).reshape(b, 2, qt, bq).transpose(0, 2, 1, 3)
    dt = q_BTNH.dtype
    return dict(q=mgpu_flash.head_major(q_BTNH, tp, dt), k=mgpu_flash.head_major(k_BSKH, sp, dt),
                v=mgpu_flash.head_major(v_BSKV, sp, dt),
                srcs=(jnp.swapaxes(keep, 2, 3), kvec, qvec),  # keepT B K J Tp
                fwd=mgpu_flash.coded(fwd, flags),
                bwd=mgpu_flash.coded(bwd, jnp.swapaxes(flags, -1, -2)),
                q_seg_BT=sel.q_seg, g=n // kg, kg=kg, tp=tp,
                widths=(q_BTNH.shape[-1], v_BSKV.shape[-1]))


def _forward(q_BTNH, k_BSKH, v_BSKV, sink_N, selection, cfg: KernelConfig):
    p = _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg)
    o, lse = mgpu_flash.forward(p["q"], p["k"], p["v"], p["fwd"], p["srcs"], cfg, _mask_spec(cfg),
                                g=p["g"], sink_N=sink_N)
    out = o.transpose(0, 2, 1, 3)[:, : cfg.t, :, : p["widths"][1]]
    return (out, common.lse_out(lse.transpose(0, 2, 1)[:, : cfg.t])), (p, o, lse)


def _backward(res, cotangents, sink_N, cfg: KernelConfig):
    p, o, lse = res
    do_BTNV, dlse_BTN = cotangents
    tp, (h, hv) = p["tp"], p["widths"]
    do = mgpu_flash.head_major(zero_padding_rows(do_BTNV, p["q_seg_BT"], cfg), tp, o.dtype)
    dlse = common.pad_axis(dlse_BTN, 1, tp).transpose(0, 2, 1)
    dq, dk, dv, delta = mgpu_flash.backward(p["q"], p["k"], p["v"], do, o, lse, dlse, p["fwd"],
                                            p["bwd"], p["srcs"], cfg, _mask_spec(cfg), g=p["g"])
    dk, dv = (common.group_sum(a, p["kg"], p["k"].dtype) for a in (dk, dv))
    dsink = None if sink_N is None else common.sink_grad(sink_N, lse, delta, cfg.t)
    return (dq.transpose(0, 2, 1, 3)[:, : cfg.t, :, :h], dk.transpose(0, 2, 1, 3)[:, : cfg.s, :, :h],
            dv.transpose(0, 2, 1, 3)[:, : cfg.s, :, :hv], dsink)


_attention = common.sparse_attention_vjp(_forward, _backward)


def block_sparse_attention_mgpu(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array,
                                block_keep_BKTJ: Array, *, block_k: int, causal: bool,
                                scale: float | None = None, sink: Array | None = None,
                                key_valid_BS: Array | None = None, q_pos_T: Array | None = None,
                                k_pos_S: Array | None = None, window: int | None = None,
                                num_sink_keys: int = 0, interpret: bool | None = None,
                                precision: jax.lax.PrecisionLike = None,
                                q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                                k_sink_BS: Array | None = None,
                                return_lse: bool = False) -> Array | tuple[Array, Array]:
    """The Mosaic GPU kernels; arguments and semantics (``return_lse`` included) as
    ``kernel.block_sparse_attention``, without ``block_sizes`` (query tiles are one warpgroup's
    64 rows).

    Needs ``block_k`` a multiple of 64 and q, k, v of one dtype among float32 (TF32 products),
    bfloat16 and float16, with shared memory for at least one pipeline stage
    (``mosaic_gpu_unsupported`` names what fails; this function raises ``ValueError`` with
    it). ``interpret`` defaults to True off GPU (``plgpu.InterpretGPUParams``). ``precision``
    is accepted for a common signature: the tensor cores fix it (TF32 for float32).
    Interpret mode on a CPU with few cores needs ``PJRT_NPROC=8`` set before JAX starts, or
    it can hang (``mgpu_flash._warn_small_pool`` warns).
    """
    why = mosaic_gpu_unsupported(q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ, block_k=block_k,
                                 interpret=interpret)
    if why is not None:
        raise ValueError(f"block_sparse_attention_mgpu: {why}")
    selection = checked_operands(q_BTNH, k_BSKH, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S,
                                 block_k=block_k, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS,
                                 k_sink_BS=k_sink_BS)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    cfg = block_config(q_BTNH, k_BSKH, block_q=BLOCK_Q, block_k=block_k, causal=causal,
                       scale=scale, interpret=interpret, window=window,
                       num_sink_keys=num_sink_keys, precision=precision,
                       segments=q_seg_BT is not None, key_sinks=k_sink_BS is not None)
    out, lse_BTN = _attention(q_BTNH, k_BSKH, v_BSKV, sink, selection, cfg=cfg)
    return (out, lse_BTN) if return_lse else out

"""Mosaic GPU (Hopper) variant of the token-sparse kernel: warp-specialised, TMA-fed, wgmma.

Same semantics, bitmask and tables as ``kernel.py`` (the Triton variant): a query tile walks the
union of the key blocks its queries read, each K/V block loaded once for the whole tile, and
each query's exact membership comes from the selection bitmask. Hopper's TMA copies boxes, not
row gathers, and this design needs none: the passes are ``pallas_kernels/mgpu_flash.py``'s
(producer warpgroup, shared-memory ring, consumer ``wgmma``), and this file adds the membership
as they read it:

- per (query tile, key block) pair, the block's ``words_per_block`` bitmask words of each query
  of the tile (the bitmask stored word-major, (B, Z, Tp), so that one TMA copy is a
  (words, BLOCK_Q) box);
- with segment ids, the tile's query ids and the block's key ids;

decoded by ``tables.membership`` (bit test, raw causal window, key range), the rule the Triton
and TPU kernels share, and and'ed with ``common.same_segment``. Full-block flags
(``full_flags``): every query of the tile selected every key of the block, or the block lies
in every query's window, with real keys of the tile's one segment; such blocks skip the mask.

Keys that are the values (CSA's shared K/V) are passed as both operands and their two
gradients summed. Verified in GPU interpret mode against ``token_sparse_attention_reference``
(``tests/mgpu_cases.py``) and lowered for an abstract H100 in the tests; compiled runs on a GPU
are ``benchmarks/gpu_check.py --sections mgpu``'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import common, mgpu_flash
from ..common import F32, KernelConfig, check_segments, same_segment
from ..mgpu_flash import BLOCK_Q, MaskSpec, Source, along, iota
from .kernel import check_shapes, token_config
from .tables import WORD, build_tables, key_bitmask, membership, segment_indices

Array = jax.Array


def _sources(bk: int, packed: bool) -> tuple[Source, ...]:
    """The bitmask words of a (tile, block) pair; with segments the tile's query ids and the
    block's key ids (``_prepare``'s ``srcs``)."""
    wpb = bk // WORD
    words = Source("pair", (wpb, BLOCK_Q), jnp.int32,
                   lambda r, b, k, i, j: r.at[b, pl.ds(j * wpb, wpb), pl.ds(i * BLOCK_Q, BLOCK_Q)])
    if not packed:
        return (words,)
    return (words, Source("tile", (BLOCK_Q,), jnp.int32, lambda r, b, k, i, j: r.at[b, i]),
            Source("block", (bk,), jnp.int32, lambda r, b, k, i, j: r.at[b, j]))


def _mask_spec(cfg: KernelConfig, packed: bool) -> MaskSpec:
    bq, bk = cfg.block_q, cfg.block_k

    def mask(refs, shape, key_dim, i, j):
        (words,) = refs["pair"]
        q_dim = 1 - key_dim
        hit = membership([along(words.at[w], shape, key_dim, keys=False)
                          for w in range(bk // WORD)],
                         iota(shape, q_dim) + i * bq, iota(shape, key_dim), j * bk, **cfg.rule)
        if not packed:
            return hit
        (q_seg,), (k_seg,) = refs["tile"], refs["block"]
        return hit & same_segment(along(q_seg, shape, key_dim, keys=False),
                                  along(k_seg, shape, key_dim, keys=True))

    return MaskSpec(_sources(bk, packed), mask, row=lambda table, b, k, x: table.at[b, x])


def mosaic_gpu_unsupported(q_BTNH, k_BSKH, v_BSKV, indices_BTM, *, words_per_block: int = 2,
                           interpret: bool | None = None, q_seg_BT=None,
                           **kwargs) -> str | None:
    """Why this call cannot run on the Mosaic GPU kernels (None when it can): the registry's
    ``supports`` check of the ``mosaic_gpu`` impl."""
    bk = WORD * words_per_block
    return mgpu_flash.unsupported(q_BTNH, k_BSKH, k_BSKH if v_BSKV is None else v_BSKV, bk,
                                  _sources(bk, q_seg_BT is not None), interpret)


def full_flags(bits_BTW: Array, cfg: KernelConfig, tp: int, sp: int, segs) -> Array:
    """(B, Q, J) bool: every query of tile ``i`` reads every key of block ``j``: all their bits
    set, or the whole block inside every query's raw window; real queries and keys only, of one
    segment. Conservative: a ``False`` only costs the mask. ``bits_BTW`` padded to (B, Tp, Z)."""
    rule, bq, bk = cfg.rule, cfg.block_q, cfg.block_k
    b = bits_BTW.shape[0]
    qt, j, wpb = tp // bq, sp // bk, bk // WORD
    full = (bits_BTW == -1).reshape(b, qt, bq, j, wpb).all(axis=(2, 4))
    q_lo = jnp.arange(qt) * bq
    q_hi = q_lo + bq - 1
    k_lo = jnp.arange(j) * bk
    if rule["window"] is not None:  # raw key r = k - window_start, read if q - window < r <= q
        r_lo, r_hi = k_lo - rule["window_start"], k_lo + bk - 1 - rule["window_start"]
        full = full | ((r_lo[None, :] >= 0) & (r_hi[None, :] <= q_lo[:, None])
                       & (r_lo[None, :] > q_hi[:, None] - rule["window"]))[None]
    full = full & ((q_hi < rule["t_len"])[:, None] & (k_lo + bk <= rule["s_len"])[None, :])[None]
    if segs is not None:
        q_seg = segs[0].reshape(b, qt, bq)
        k_seg = segs[1].reshape(b, j, bk)
        one_q = (q_seg == q_seg[..., :1]).all(-1) & (q_seg[..., 0] != 0)
        one_k = (k_seg == k_seg[..., :1]).all(-1)
        full = full & one_q[:, :, None] & one_k[:, None, :] & (
            q_seg[:, :, None, 0] == k_seg[:, None, :, 0])
    return full


def _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg: KernelConfig):
    indices_BTM, q_seg_BT, k_seg_BS = selection
    b, t, n, _ = q_BTNH.shape
    kg = k_BSKH.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    qt, j = common.cdiv(t, bq), common.cdiv(cfg.s, bk)
    tp, sp = qt * bq, j * bk
    segs = None
    if q_seg_BT is not None:
        indices_BTM = segment_indices(indices_BTM, q_seg_BT, k_seg_BS)
        segs = (common.pad_axis(q_seg_BT, 1, tp), common.pad_axis(k_seg_BS, 1, sp))
    bits = key_bitmask(indices_BTM, cfg.s)
    rule = cfg.rule
    fwd, bwd = build_tables(bits, t=cfg.t, s=cfg.s, block_q=bq, words_per_block=bk // WORD,
                            window=rule["window"], window_start=rule["window_start"],
                            q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS)
    bits = common.pad_axis(common.pad_axis(bits, 1, tp), 2, j * (bk // WORD))
    flags = full_flags(bits, cfg, tp, sp, segs)  # B Q J
    srcs = (jnp.swapaxes(bits, 1, 2),)  # B Z Tp
    if segs is not None:
        srcs += (segs[0].reshape(b, qt, bq), segs[1].reshape(b, j, bk))
    dt = q_BTNH.dtype
    v = k_BSKH if v_BSKV is None else v_BSKV
    return dict(q=mgpu_flash.head_major(q_BTNH, tp, dt), k=mgpu_flash.head_major(k_BSKH, sp, dt),
                v=mgpu_flash.head_major(v, sp, dt), srcs=srcs, packed=segs is not None,
                fwd=mgpu_flash.coded(fwd, flags), bwd=mgpu_flash.coded(bwd, jnp.swapaxes(flags, 1, 2)),
                g=n // kg, kg=kg, tp=tp, widths=(q_BTNH.shape[-1], v.shape[-1]))


def _forward(q_BTNH, k_BSKH, v_BSKV, sink_N, selection, cfg: KernelConfig):
    p = _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg)
    o, lse = mgpu_flash.forward(p["q"], p["k"], p["v"], p["fwd"], p["srcs"], cfg,
                                _mask_spec(cfg, p["packed"]), g=p["g"], sink_N=sink_N)
    return o.transpose(0, 2, 1, 3)[:, : cfg.t, :, : p["widths"][1]], (p, o, lse)


def _backward(res, do_BTNV, sink_N, cfg: KernelConfig):
    p, o, lse = res
    h, hv = p["widths"]
    do = mgpu_flash.head_major(do_BTNV, p["tp"], o.dtype)
    dq, dk, dv, delta = mgpu_flash.backward(p["q"], p["k"], p["v"], do, o, lse, None, p["fwd"],
                                            p["bwd"], p["srcs"], cfg,
                                            _mask_spec(cfg, p["packed"]), g=p["g"])
    if cfg.shared_kv:  # keys are the values: one gradient, summed before the group's rounding
        dk, dv = dk.astype(F32) + dv.astype(F32), None
    dk, dv = (None if a is None else
              common.group_sum(a, p["kg"], p["k"].dtype).transpose(0, 2, 1, 3)[:, : cfg.s]
              for a in (dk, dv))
    dsink = None if sink_N is None else common.sink_grad(sink_N, lse, delta, cfg.t)
    dq = dq.transpose(0, 2, 1, 3)[:, : cfg.t, :, :h]
    return dq, dk[..., :h], None if dv is None else dv[..., :hv], dsink


_attention = common.sparse_attention_vjp(_forward, _backward)


def token_sparse_attention_mgpu(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array | None,
                                indices_BTM: Array, *, scale: float | None = None,
                                sink: Array | None = None, window: int | None = None,
                                window_start: int = 0, q_seg_BT: Array | None = None,
                                k_seg_BS: Array | None = None, words_per_block: int = 2,
                                interpret: bool | None = None,
                                precision: jax.lax.PrecisionLike = None) -> Array:
    """The Mosaic GPU kernels; arguments and semantics as ``kernel.token_sparse_attention``,
    with key blocks of ``32 * words_per_block`` keys (2 or 4 words: a multiple of 64) and query
    tiles of one warpgroup's 64 rows.

    Needs q, k, v of one dtype among float32 (TF32 products), bfloat16 and float16, with shared
    memory for at least one pipeline stage (``mosaic_gpu_unsupported`` names what fails; this
    function raises ``ValueError`` with it). ``interpret`` defaults to True off GPU
    (``plgpu.InterpretGPUParams``). ``precision`` is accepted for a common signature.
    Interpret mode on a CPU with few cores needs ``PJRT_NPROC=8`` set before JAX starts, or
    it can hang (``mgpu_flash._warn_small_pool`` warns).
    """
    check_shapes(q_BTNH, k_BSKH, v_BSKV, indices_BTM)
    why = mosaic_gpu_unsupported(q_BTNH, k_BSKH, v_BSKV, indices_BTM,
                                 words_per_block=words_per_block, interpret=interpret,
                                 q_seg_BT=q_seg_BT)
    if why is not None:
        raise ValueError(f"token_sparse_attention_mgpu: {why}")
    segs = check_segments("token_sparse_attention", q_BTNH.shape[0], q_BTNH.shape[1],
                          k_BSKH.shape[1], q_seg_BT, k_seg_BS)[:2]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    cfg = token_config(q_BTNH, k_BSKH, v_BSKV, block_q=BLOCK_Q, words_per_block=words_per_block,
                       scale=scale, interpret=interpret, window=window, window_start=window_start,
                       precision=precision)
    return _attention(q_BTNH, k_BSKH, v_BSKV, sink, (indices_BTM.astype(jnp.int32), *segs),
                      cfg=cfg)

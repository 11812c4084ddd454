"""Token-gather flash attention in Pallas (GPU-style grid, Triton lowering; interpret mode on CPU).

Forward and fused backward (dq; dk/dv) under ``jax.custom_vjp``: for each query, attention over
exactly its selected keys (``reference.py`` semantics: one selection shared by all heads,
optional raw causal window, per-head sink, keys and values possibly one tensor). Online softmax
in float32; exact for any selection.

How a tile shares its loads. Neighbouring queries mostly select the same keys, so the kernel
does not gather per query. On device we build (``tables.py``) a selection bitmask (one bit per
(query, key), B * T * S / 32 int32 words) and, per query tile of ``block_q`` queries, the union
of the ``block_k``-key blocks any of its queries reads (selected keys and window keys). The
forward and dq programs walk that union once: each K/V block is loaded once for the whole tile
and for all G query heads of its kv group (GQA), the (block_q, block_k) logits come from one
matmul, and each query's exact membership inside the block is read from the bitmask: one
(block_q, 1) word column per 32 keys, expanded with a shift and a mask, or'ed with the
positional window rule. The dk/dv program walks, per key block, the query tiles that read it.
So a key shared by the queries of a tile costs one load instead of one per query, and the
matmuls run on (block_q x block_k) tiles instead of per-query vectors; the price is the dead
lanes of visited blocks (keys of a visited block that a query did not select are masked).
Auxiliary memory: the bitmask (B * T * S / 32 words) plus O(B * T * S / (block_q * block_k))
for the tables; the backward keeps only the output and its logsumexp (B, N, T) besides the
inputs, the bitmask and the tables.

Packed sequences (segment ids): selected keys of another segment are dropped before the
bitmask is built and window blocks holding no key of a tile's segments leave its table row
(``tables.tile_visits``), so the tables skip both; every kernel ands a block's membership with
the segment rule on the tile's query ids and the block's key ids (``common.same_segment``),
which keeps the window inside each query's segment; the ids are (B, Tp) and (B, Sp) int32
operands, 0 on the padded rows and keys.

Layout: operands head-major (B, N, T, H), widths zero-padded to a power of two; grid (B, N,
query tiles) for forward and dq, (B, N, key blocks) for dk/dv (per query head, summed over
the GQA group); a data-dependent trip count over the table row, so only visited blocks are
read. The tile loops are ``pallas_kernels/flash.py``'s, shared with the block-sparse kernel,
and the configuration, padding, softmax pieces and VJP are ``pallas_kernels/common.py``'s.
``kernel_tpu.py`` is the Mosaic (TPU) variant of the same algorithm.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import common
from ..common import F32, KernelConfig, check_segments, same_segment
from ..flash import dkv_call, dkv_tile, dq_call, dq_tile, forward_call, forward_tile
from .tables import WORD, build_tables, key_bitmask, membership, segment_indices

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query tile and key block (``32 * words_per_block`` keys) of the kernels. Small key blocks
    waste fewer lanes on scattered selections; the tile is what shares the loads."""

    block_q: int = 64
    words_per_block: int = 2
    num_warps: int = 4
    num_stages: int = 2


def token_config(q_BTNH, k_BSKH, v_BSKV, *, block_q: int, words_per_block: int,
                 scale: float | None, interpret: bool, window: int | None, window_start: int,
                 precision: jax.lax.PrecisionLike, num_warps: int = 4,
                 num_stages: int = 2) -> KernelConfig:
    """The ``KernelConfig`` of a token-sparse call (its rule: the raw window)."""
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    return KernelConfig(block_q, WORD * words_per_block, common.default_scale(q_BTNH.shape[-1], scale),
                        t, s, interpret, common.rules(s_len=s, t_len=t, window=window,
                                               window_start=window_start),
                        shared_kv=v_BSKV is None, num_warps=num_warps, num_stages=num_stages,
                        precision=precision)


def token_tables(bits_BTZ, cfg: KernelConfig, q_seg_BT=None, k_seg_BS=None):
    """The bitmask's forward and backward tables for this call (``tables.build_tables``)."""
    rule = cfg.rule
    return build_tables(bits_BTZ, t=cfg.t, s=cfg.s, block_q=cfg.block_q,
                        words_per_block=cfg.block_k // WORD, window=rule["window"],
                        window_start=rule["window_start"], q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS)


def _block_words(bits_ref, rows, j, wpb):
    return [bits_ref[rows, pl.ds(j * wpb + w, 1)] for w in range(wpb)]


# ----------------------------------------------------------------------------- kernels
# One instance per (batch, query head, tile); K/V of query head ``n`` are those of kv group
# ``n // G`` (index maps), the bitmask and the tables are shared by all heads.


def _split_segments(refs, packed: bool):
    """((q_seg_ref, k_seg_ref) or None, remaining refs)."""
    return (tuple(refs[:2]), refs[2:]) if packed else (None, refs)


def _tile_mask(bits_ref, segs, cfg: KernelConfig):
    """mask_fn for the forward and dq loops: this query tile's membership in key block ``j``
    (``segs``: this tile's query segment ids and all key segment ids, or None)."""
    q_idx = pl.program_id(2) * cfg.block_q + jnp.arange(cfg.block_q, dtype=jnp.int32)
    col = jnp.arange(cfg.block_k, dtype=jnp.int32)[None, :]
    wpb = cfg.block_k // WORD

    def mask(j, start):
        hit = membership(_block_words(bits_ref, slice(None), j, wpb), q_idx[:, None], col, start,
                         **cfg.rule)
        if segs is None:
            return hit
        qseg_ref, kseg_ref = segs
        return hit & same_segment(qseg_ref[...][:, None],
                                  kseg_ref[pl.ds(start, cfg.block_k)][None, :])

    return mask


def _split_refs(rest, shared: bool):
    """(v_ref, remaining refs): with shared K/V there is no value ref."""
    return (None, rest) if shared else (rest[0], rest[1:])


def _fwd_kernel(table_ref, bits_ref, sink_ref, *refs, cfg: KernelConfig, has_sink: bool,
                packed: bool):
    segs, (q_ref, k_ref, *rest) = _split_segments(refs, packed)
    v_ref, (o_ref, lse_ref) = _split_refs(rest, cfg.shared_kv)
    out, lse = forward_tile(table_ref, q_ref[...], k_ref, k_ref if cfg.shared_kv else v_ref,
                            sink_ref[0] if has_sink else None, _tile_mask(bits_ref, segs, cfg),
                            scale=cfg.scale, block_k=cfg.block_k, precision=cfg.precision)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(table_ref, bits_ref, *refs, cfg: KernelConfig, packed: bool):
    segs, (q_ref, k_ref, *rest) = _split_segments(refs, packed)
    v_ref, (do_ref, lse_ref, delta_ref, dq_ref) = _split_refs(rest, cfg.shared_kv)
    dq = dq_tile(table_ref, q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], k_ref,
                 k_ref if cfg.shared_kv else v_ref, _tile_mask(bits_ref, segs, cfg), scale=cfg.scale,
                 block_k=cfg.block_k, precision=cfg.precision)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(table_ref, bits_ref, *refs, cfg: KernelConfig, packed: bool):
    segs, (q_ref, k_ref, *rest) = _split_segments(refs, packed)
    if cfg.shared_kv:
        do_ref, lse_ref, delta_ref, dk_ref = rest
        v_ref = dv_ref = None
    else:
        v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
    j = pl.program_id(2)
    kb = k_ref[...]
    col = jnp.arange(cfg.block_k, dtype=jnp.int32)[None, :]
    wpb = cfg.block_k // WORD

    def mask(i, rows):
        q_idx = i * cfg.block_q + jnp.arange(cfg.block_q, dtype=jnp.int32)
        hit = membership(_block_words(bits_ref, rows, j, wpb), q_idx[:, None], col,
                         j * cfg.block_k, **cfg.rule)
        if segs is None:
            return hit
        qseg_ref, kseg_ref = segs  # all query ids of the row, this block's key ids
        return hit & same_segment(qseg_ref[rows][:, None], kseg_ref[...][None, :])

    dk, dv = dkv_tile(table_ref, kb, kb if cfg.shared_kv else v_ref[...], q_ref, do_ref, lse_ref,
                      delta_ref, mask, scale=cfg.scale, block_q=cfg.block_q,
                      precision=cfg.precision)
    if cfg.shared_kv:  # keys are the values: one gradient
        dk_ref[...] = (dk + dv).astype(dk_ref.dtype)
    else:
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers


def _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg: KernelConfig):
    """Pad to whole tiles, go head-major, build the bitmask and the tables; segment ids (when
    given) drop the other segments' selected keys and are padded with 0."""
    indices_BTM, q_seg_BT, k_seg_BS = selection
    b, t, n, _ = q_BTNH.shape
    kg = k_BSKH.shape[2]
    qt, j = common.cdiv(t, cfg.block_q), common.cdiv(cfg.s, cfg.block_k)
    tp, sp = qt * cfg.block_q, j * cfg.block_k
    segs = None
    if q_seg_BT is not None:
        indices_BTM = segment_indices(indices_BTM, q_seg_BT, k_seg_BS)
        segs = (common.pad_axis(q_seg_BT, 1, tp), common.pad_axis(k_seg_BS, 1, sp))
    bits = key_bitmask(indices_BTM, cfg.s)
    fwd_table, bwd_table = token_tables(bits, cfg, q_seg_BT, k_seg_BS)
    bits = common.pad_axis(common.pad_axis(bits, 1, tp), 2, j * (cfg.block_k // WORD))
    return dict(q=common.head_major(q_BTNH, tp), k=common.head_major(k_BSKH, sp),
                v=None if cfg.shared_kv else common.head_major(v_BSKV, sp), bits=bits, fwd=fwd_table,
                bwd=bwd_table, segs=segs, dims=(b, n, kg, qt, j, tp, sp))


def _kv(p, cfg: KernelConfig):
    return (p["k"],) if cfg.shared_kv else (p["k"], p["v"])


def _seg_specs(p, cfg: KernelConfig, per_key_block: bool):
    """Block specs and operands of the segment ids (none without them): grid (B, N, Q) takes
    the tile's query ids and all key ids, grid (B, N, J) all query ids and the block's key ids."""
    if p["segs"] is None:
        return [], ()
    tp, sp = p["dims"][5:]
    if per_key_block:
        specs = [pl.BlockSpec((None, tp), lambda bi, ni, ji: (bi, 0)),
                 pl.BlockSpec((None, cfg.block_k), lambda bi, ni, ji: (bi, ji))]
    else:
        specs = [pl.BlockSpec((None, cfg.block_q), lambda bi, ni, qi: (bi, qi)),
                 pl.BlockSpec((None, sp), lambda bi, ni, qi: (bi, 0))]
    return specs, p["segs"]


def _forward(q_BTNH, k_BSKH, v_BSKV, sink_N, selection, cfg: KernelConfig):
    p = _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg)
    b, n, kg, qt, j, tp, sp = p["dims"]
    sink = jnp.zeros((n,), F32) if sink_N is None else sink_N.astype(F32)
    seg_specs, segs = _seg_specs(p, cfg, per_key_block=False)
    specs = [pl.BlockSpec((None, None, j + 1), lambda bi, ni, qi: (bi, qi, 0)),
             pl.BlockSpec((None, cfg.block_q, p["bits"].shape[-1]), lambda bi, ni, qi: (bi, qi, 0)),
             pl.BlockSpec((1,), lambda bi, ni, qi: (ni,)), *seg_specs]
    o, lse = forward_call(
        functools.partial(_fwd_kernel, cfg=cfg, has_sink=sink_N is not None,
                          packed=p["segs"] is not None), cfg,
        "token_sparse_attention_fwd", specs, (p["fwd"], p["bits"], sink, *segs), p["q"],
        _kv(p, cfg))
    return o.transpose(0, 2, 1, 3)[:, : cfg.t], (p, o, lse)


def _backward(res, do_BTNV, sink_N, cfg: KernelConfig):
    p, o, lse = res
    b, n, kg, qt, j, tp, sp = p["dims"]
    wp = p["bits"].shape[-1]
    do = common.head_major(do_BTNV, tp)
    delta = common.row_delta(do, o)  # (B, N, Tp)
    tensors = (p["q"], _kv(p, cfg), do, lse, delta)
    packed = p["segs"] is not None
    q_specs, q_segs = _seg_specs(p, cfg, per_key_block=False)
    k_specs, k_segs = _seg_specs(p, cfg, per_key_block=True)
    dq = dq_call(functools.partial(_dq_kernel, cfg=cfg, packed=packed), cfg,
                 "token_sparse_attention_dq",
                 [pl.BlockSpec((None, None, j + 1), lambda bi, ni, qi: (bi, qi, 0)),
                  pl.BlockSpec((None, cfg.block_q, wp), lambda bi, ni, qi: (bi, qi, 0)), *q_specs],
                 (p["fwd"], p["bits"], *q_segs), *tensors)
    dkv = dkv_call(functools.partial(_dkv_kernel, cfg=cfg, packed=packed), cfg,
                   "token_sparse_attention_dkv",
                   [pl.BlockSpec((None, None, qt + 1), lambda bi, ni, ji: (bi, ji, 0)),
                    pl.BlockSpec((None, tp, wp), lambda bi, ni, ji: (bi, 0, 0)), *k_specs],
                   (p["bwd"], p["bits"], *k_segs), *tensors)
    # dK, dV were per query head: summed over each kv head's group
    dkv = [common.group_sum(a, kg, p["k"].dtype).transpose(0, 2, 1, 3)[:, : cfg.s] for a in dkv]
    dsink = None if sink_N is None else common.sink_grad(sink_N, lse, delta, cfg.t)
    dq = dq.transpose(0, 2, 1, 3)[:, : cfg.t]
    return dq, dkv[0], None if cfg.shared_kv else dkv[1], dsink


_attention = common.sparse_attention_vjp(_forward, _backward)


def check_shapes(q_BTNH, k_BSKH, v_BSKV, indices_BTM) -> None:
    b, t, n, _ = q_BTNH.shape
    common.check_heads(n, k_BSKH.shape[2])
    if indices_BTM.ndim != 3 or indices_BTM.shape[:2] != (b, t):
        raise ValueError(f"indices must have shape (B, T, M) with (B, T)={(b, t)}, "
                         f"got {tuple(indices_BTM.shape)}")
    if v_BSKV is not None and v_BSKV.shape[:3] != k_BSKH.shape[:3]:
        raise ValueError(f"v {tuple(v_BSKV.shape)} and k {tuple(k_BSKH.shape)} must agree on "
                         "(B, S, K)")


def token_sparse_attention(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array | None,
                           indices_BTM: Array, *, scale: float | None = None,
                           sink: Array | None = None, window: int | None = None,
                           window_start: int = 0, q_seg_BT: Array | None = None,
                           k_seg_BS: Array | None = None,
                           block_sizes: BlockSizes = BlockSizes(),
                           interpret: bool | None = None,
                           precision: jax.lax.PrecisionLike = None) -> Array:
    """Attention over each query's selected keys; equals ``token_sparse_attention_reference``.

    ``indices_BTM`` (B, T, M) int32: distinct key indices per query, ``-1`` (or any value
    outside ``[0, S)``) for an empty slot; shared by all heads. ``v_BSKV=None``: the keys are
    the values. ``window``/``window_start``: also read the raw keys
    ``window_start + (t - window, t]``. ``q_seg_BT`` (B, T), ``k_seg_BS`` (B, S) int segment
    ids (both or neither): query ``t`` reads key ``s`` only if ``k_seg == q_seg != 0``.
    ``interpret`` defaults to True off GPU. Differentiable in q, k, v and ``sink``.
    ``precision`` reaches every in-kernel matrix product.
    """
    check_shapes(q_BTNH, k_BSKH, v_BSKV, indices_BTM)
    segs = check_segments("token_sparse_attention", q_BTNH.shape[0], q_BTNH.shape[1], k_BSKH.shape[1],
                          q_seg_BT, k_seg_BS)[:2]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    cfg = token_config(q_BTNH, k_BSKH, v_BSKV, block_q=block_sizes.block_q,
                       words_per_block=block_sizes.words_per_block, scale=scale,
                       interpret=interpret, window=window, window_start=window_start,
                       precision=precision, num_warps=block_sizes.num_warps,
                       num_stages=block_sizes.num_stages)
    out = _attention(common.pad_lanes(q_BTNH), common.pad_lanes(k_BSKH), common.pad_lanes(v_BSKV), sink,
                     (indices_BTM.astype(jnp.int32), *segs), cfg=cfg)
    return out[..., : (k_BSKH if v_BSKV is None else v_BSKV).shape[-1]]

"""Block-sparse flash attention in Pallas (Triton on GPU; interpret mode on CPU).

Forward and fused backward (dq; dk/dv) with online softmax in float32 (the tile loops of
``pallas_kernels/flash.py``), per-token membership inside visited blocks, causal masking inside
partially visible blocks, key validity, GQA and an optional per-head sink logit. Exactness for
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

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import common
from ..common import F32, KernelConfig
from ..flash import dkv_call, dkv_tile, dq_call, dq_tile, forward_call, forward_tile
from .tables import build_tables

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


def token_mask(keep_col, valid_row, q_pos, k_pos, k_idx, *, s_len: int, causal: bool,
               window: int | None, num_sink_keys: int):
    """(block_q, block_k) membership: selected block, valid key in range, and the token common.rules
    on positions: causal ``k_pos <= q_pos``; window ``k_pos > q_pos - window`` unless the key is
    one of the first ``num_sink_keys`` keys. Query vectors may come as (block_q,) or
    (block_q, 1), key vectors as (block_k,) or (1, block_k) (the TPU layout)."""
    k_idx, k_pos, q_pos = _row(k_idx), _row(k_pos), _col(q_pos)
    m = (keep_col != 0) & (_row(valid_row) != 0) & (k_idx < s_len)
    if causal:
        m = m & (k_pos <= q_pos)
    if window is not None:
        m = m & ((k_idx < num_sink_keys) | (k_pos > q_pos - window))
    return m


def block_tables(block_keep_BKTJ, q_pos_T, k_pos_S, cfg: KernelConfig):
    """The forward and backward tables of this call (``tables.build_tables``)."""
    rule = cfg.rule
    return build_tables(block_keep_BKTJ, block_q=cfg.block_q, block_k=cfg.block_k,
                        q_pos=q_pos_T, k_pos=k_pos_S, causal=rule["causal"],
                        window=rule["window"], num_sink_keys=rule["num_sink_keys"])


# ----------------------------------------------------------------------------- kernels
# One instance per (batch, query head, tile); K/V, the tables and the selection of query head
# ``n`` are those of its kv group ``n // G`` (index maps below), so GQA costs no copies.


def _mask_fn(keep_ref, valid_ref, k_pos_ref, q_pos, *, block_k: int, rules: dict):
    """mask_fn for the forward and dq loops: membership of key block ``j`` for this tile."""

    def mask(j, start):
        return token_mask(keep_ref[:, pl.ds(j, 1)], valid_ref[pl.ds(start, block_k)], q_pos,
                          k_pos_ref[pl.ds(start, block_k)],
                          start + jnp.arange(block_k, dtype=jnp.int32), **rules)

    return mask


def _fwd_kernel(table_ref, keep_ref, valid_ref, qpos_ref, kpos_ref, sink_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *, cfg: KernelConfig, has_sink: bool):
    mask = _mask_fn(keep_ref, valid_ref, kpos_ref, qpos_ref[...], block_k=cfg.block_k,
                    rules=cfg.rule)
    sink = sink_ref[0] if has_sink else None
    out, lse = forward_tile(table_ref, q_ref[...], k_ref, v_ref, sink, mask, scale=cfg.scale,
                            block_k=cfg.block_k, precision=cfg.precision)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(table_ref, keep_ref, valid_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, cfg: KernelConfig):
    mask = _mask_fn(keep_ref, valid_ref, kpos_ref, qpos_ref[...], block_k=cfg.block_k,
                    rules=cfg.rule)
    dq = dq_tile(table_ref, q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], k_ref, v_ref,
                 mask, scale=cfg.scale, block_k=cfg.block_k, precision=cfg.precision)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(table_ref, keep_ref, valid_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: KernelConfig):
    k_idx = pl.program_id(2) * cfg.block_k + jnp.arange(cfg.block_k, dtype=jnp.int32)
    k_pos, valid, rule = kpos_ref[...], valid_ref[...], cfg.rule

    def mask(i, rows):
        return token_mask(keep_ref[rows, :], valid, qpos_ref[rows], k_pos, k_idx, **rule)

    dk, dv = dkv_tile(table_ref, k_ref[...], v_ref[...], q_ref, do_ref, lse_ref, delta_ref, mask,
                      scale=cfg.scale, block_q=cfg.block_q, precision=cfg.precision)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers


def _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg: KernelConfig):
    """Pad to whole tiles, go head-major, build the tables and the int8 masks."""
    block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S = selection
    b, t, n, _ = q_BTNH.shape
    kg = k_BSKH.shape[2]
    qt, j = common.cdiv(t, cfg.block_q), common.cdiv(cfg.s, cfg.block_k)
    tp, sp = qt * cfg.block_q, j * cfg.block_k
    keep = common.pad_axis(block_keep_BKTJ.astype(jnp.int8), 2, tp)
    valid = (jnp.ones((b, cfg.s), jnp.int8) if key_valid_BS is None
             else key_valid_BS.astype(jnp.int8))
    fwd_table, bwd_table = block_tables(block_keep_BKTJ, q_pos_T, k_pos_S, cfg)
    # padded query rows sit at the last real position (their output is dropped); padded keys
    # are removed by the ``k_idx < S`` rule
    return dict(q=common.head_major(q_BTNH, tp), k=common.head_major(k_BSKH, sp),
                v=common.head_major(v_BSKV, sp), keep=keep, valid=common.pad_axis(valid, 1, sp),
                fwd=fwd_table, bwd=bwd_table,
                q_pos=common.pad_axis(q_pos_T.astype(jnp.int32), 0, tp, mode="edge"),
                k_pos=common.pad_axis(k_pos_S.astype(jnp.int32), 0, sp, mode="edge"),
                dims=(b, n, kg, qt, j, tp, sp))


def _selection_specs(g: int, j: int, bq: int, sp: int):
    """Forward / dq specs of (table row, selection, key validity, query and key positions)."""
    return [pl.BlockSpec((None, None, None, j + 1), lambda bi, ni, qi: (bi, ni // g, qi, 0)),
            pl.BlockSpec((None, None, bq, j), lambda bi, ni, qi: (bi, ni // g, qi, 0)),
            pl.BlockSpec((None, sp), lambda bi, ni, qi: (bi, 0)),
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
        (p["fwd"], p["keep"], p["valid"], p["q_pos"], p["k_pos"], sink), p["q"], (p["k"], p["v"]))
    return o.transpose(0, 2, 1, 3)[:, : cfg.t], (p, o, lse)


def _backward(res, do_BTNV, sink_N, cfg: KernelConfig):
    p, o, lse = res
    b, n, kg, qt, j, tp, sp = p["dims"]
    g, bk = n // kg, cfg.block_k
    do = common.head_major(do_BTNV, tp)
    delta = common.row_delta(do, o)  # (B, N, Tp)
    masks = (p["keep"], p["valid"], p["q_pos"], p["k_pos"])
    tensors = (p["q"], (p["k"], p["v"]), do, lse, delta)
    dq = dq_call(functools.partial(_dq_kernel, cfg=cfg), cfg, "block_sparse_attention_dq",
                 _selection_specs(g, j, cfg.block_q, sp), (p["fwd"], *masks), *tensors)
    dkv_specs = [
        pl.BlockSpec((None, None, None, qt + 1), lambda bi, ni, ji: (bi, ni // g, ji, 0)),
        pl.BlockSpec((None, None, tp, 1), lambda bi, ni, ji: (bi, ni // g, 0, ji)),
        pl.BlockSpec((None, bk), lambda bi, ni, ji: (bi, ji)),
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
                     block_k: int):
    """Validate shapes; return the selection (keep bool, key_valid bool or None, q_pos int32,
    k_pos int32)."""
    b, t, n, _ = q_BTNH.shape
    s, kg = k_BSKH.shape[1], k_BSKH.shape[2]
    common.check_heads(n, kg)
    j = common.cdiv(s, block_k)
    if block_keep_BKTJ.shape != (b, kg, t, j):
        raise ValueError(f"block_keep must have shape (B, K, T, ceil(S / block_k))={(b, kg, t, j)}, "
                         f"got {tuple(block_keep_BKTJ.shape)}")
    valid = None if key_valid_BS is None else key_valid_BS.astype(bool)
    q_pos = jnp.arange(t, dtype=jnp.int32) + (s - t) if q_pos_T is None else q_pos_T
    k_pos = jnp.arange(s, dtype=jnp.int32) if k_pos_S is None else k_pos_S
    return block_keep_BKTJ.astype(bool), valid, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32)


def block_config(q_BTNH, k_BSKH, *, block_q: int, block_k: int, causal: bool,
                 scale: float | None, interpret: bool, window: int | None, num_sink_keys: int,
                 precision: jax.lax.PrecisionLike, num_warps: int = 4,
                 num_stages: int = 2) -> KernelConfig:
    """The ``KernelConfig`` of a block-sparse call (its rule: causal, window, sink keys)."""
    s = k_BSKH.shape[1]
    return KernelConfig(block_q, block_k, common.default_scale(q_BTNH.shape[-1], scale), q_BTNH.shape[1],
                        s, interpret, common.rules(s_len=s, causal=causal, window=window,
                                            num_sink_keys=num_sink_keys),
                        num_warps=num_warps, num_stages=num_stages, precision=precision)


_attention = common.sparse_attention_vjp(_forward, _backward)


def block_sparse_attention(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, block_keep_BKTJ: Array,
                           *, block_k: int, causal: bool, scale: float | None = None,
                           sink: Array | None = None, key_valid_BS: Array | None = None,
                           q_pos_T: Array | None = None, k_pos_S: Array | None = None,
                           window: int | None = None, num_sink_keys: int = 0,
                           block_sizes: BlockSizes = BlockSizes(),
                           interpret: bool | None = None,
                           precision: jax.lax.PrecisionLike = None) -> Array:
    """Attention over the selected key blocks only; equals ``block_sparse_attention_reference``.

    ``block_keep_BKTJ`` (B, K, T, ceil(S / block_k)) bool: key blocks each query token of each
    kv group may read (per token, so any selection is exact). Token rules inside the blocks use
    positions (``q_pos_T`` default ``arange(T) + S - T``, ``k_pos_S`` default ``arange(S)``):
    causal keeps ``k_pos <= q_pos``; ``window`` keeps ``k_pos > q_pos - window`` except for the
    first ``num_sink_keys`` keys. ``interpret`` defaults to True off GPU/TPU. Differentiable in
    q, k, v and ``sink``. Any head width: widths are zero-padded to ``lane_width`` for Triton.
    ``precision`` reaches every in-kernel matrix product.
    """
    selection = checked_operands(q_BTNH, k_BSKH, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S,
                                 block_k=block_k)
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "tpu")
    cfg = block_config(q_BTNH, k_BSKH, block_q=block_sizes.block_q, block_k=block_k,
                       causal=causal, scale=scale, interpret=interpret, window=window,
                       num_sink_keys=num_sink_keys, precision=precision,
                       num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages)
    out = _attention(common.pad_lanes(q_BTNH), common.pad_lanes(k_BSKH), common.pad_lanes(v_BSKV), sink,
                     selection, cfg=cfg)
    return out[..., : v_BSKV.shape[-1]]

"""Block-sparse flash attention in Pallas (Triton on GPU; interpret mode on CPU).

Forward and fused backward (dq; dk/dv) with online softmax in float32 (the tile loops of
``pallas_kernels/flash.py``), per-token membership inside visited blocks, causal masking inside
partially visible blocks, key validity, GQA and an optional per-head sink logit. Exactness for
any selection is tested against ``reference.block_sparse_attention_reference`` in interpret
mode, the three kernels are lowered for CUDA with ``jax.export`` in the tests, and
``benchmarks/gpu_check.py`` compares them compiled on a GPU. The TPU variant is ``tpu.py``;
the XLA path for CPU is ``xla.py``; all three share the masking rule, the tables and the
``custom_vjp`` defined here.

Layout: operands are transposed to head-major (B, N, T, H) so that a kernel instance reads
contiguous (tokens, width) tiles, widths zero-padded to a power of two (``pad_lanes``). Grid
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
from jax.experimental.pallas import triton as pl_triton

from ..flash import dkv_tile, dq_tile, forward_tile
from .tables import build_tables

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query tile size (the key block size is the selection's granularity, ``block_k``) and,
    for Triton, warps per instance and software-pipelining stages.

    Measured on an H100 (bf16, 16 x 128 heads, T = 32768, key blocks of 128, 1/16 selected;
    ``benchmarks/gpu_session.sh sweep``, docs/gpu.md): the defaults run forward and backward;
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
    """(block_q, block_k) membership: selected block, valid key in range, and the token rules
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


def lane_width(w: int) -> int:
    """Width a Triton tile needs: a power of two (its tensors' sizes must be) and at least 16
    (the matrix units' smallest K and N)."""
    return max(16, 1 << (w - 1).bit_length())


def pad_lanes(x: Array | None) -> Array | None:
    """Zero-pad the last axis to ``lane_width``: zero query/key columns leave every logit
    unchanged and zero value columns give zero outputs, which the callers slice off."""
    if x is None or x.shape[-1] == lane_width(x.shape[-1]):
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, lane_width(x.shape[-1]) - x.shape[-1])])


def sink_grad(sink_N: Array, lse_BNT: Array, delta_BNT: Array, t: int) -> Array:
    """d/d sink of a denominator-only logit: ``-sum_t p_sink(t) * delta(t)`` over real rows."""
    p_sink = jnp.exp(sink_N.astype(jnp.float32)[None, :, None] - lse_BNT)[:, :, :t]
    return -(p_sink * delta_BNT[:, :, :t]).sum(axis=(0, 2)).astype(sink_N.dtype)



# ----------------------------------------------------------------------------- kernels
# One instance per (batch, query head, tile); K/V, the tables and the selection of query head
# ``n`` are those of its kv group ``n // G`` (index maps below), so GQA costs no copies.


def _mask_fn(keep_ref, valid_ref, k_pos_ref, q_pos, *, block_k: int, rules: dict):
    """mask_fn for the forward and dq loops: membership of key block ``j`` for this tile."""

    def mask(j, start):
        return token_mask(keep_ref[:, pl.ds(j, 1)], valid_ref[pl.ds(start, block_k)], q_pos,
                          k_pos_ref[pl.ds(start, block_k)], start + jnp.arange(block_k), **rules)

    return mask


def _fwd_kernel(table_ref, keep_ref, valid_ref, qpos_ref, kpos_ref, sink_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *, scale: float, has_sink: bool, block_k: int, **rules):
    mask = _mask_fn(keep_ref, valid_ref, kpos_ref, qpos_ref[...], block_k=block_k, rules=rules)
    sink = sink_ref[0] if has_sink else None
    out, lse = forward_tile(table_ref, q_ref[...], k_ref, v_ref, sink, mask, scale=scale,
                            block_k=block_k)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(table_ref, keep_ref, valid_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, scale: float, block_k: int, **rules):
    mask = _mask_fn(keep_ref, valid_ref, kpos_ref, qpos_ref[...], block_k=block_k, rules=rules)
    dq = dq_tile(table_ref, q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], k_ref, v_ref,
                 mask, scale=scale, block_k=block_k)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(table_ref, keep_ref, valid_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, scale: float, block_q: int, block_k: int,
                **rules):
    k_idx = pl.program_id(2) * block_k + jnp.arange(block_k)
    k_pos, valid = kpos_ref[...], valid_ref[...]

    def mask(i, rows):
        return token_mask(keep_ref[rows, :], valid, qpos_ref[rows], k_pos, k_idx, **rules)

    dk, dv = dkv_tile(table_ref, k_ref[...], v_ref[...], q_ref, do_ref, lse_ref, delta_ref, mask,
                      scale=scale, block_q=block_q)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers


@dataclasses.dataclass(frozen=True)
class _Static:
    block_q: int
    block_k: int
    causal: bool
    scale: float
    t: int
    s: int
    interpret: bool
    window: int | None = None
    num_sink_keys: int = 0
    num_warps: int = 4
    num_stages: int = 2

    @property
    def compiler_params(self):
        # GPU lowering: Triton, chosen deliberately. The kernel is a tile program with a
        # data-dependent trip count and data-dependent block offsets (the block table), which
        # Triton's SIMT model expresses directly and which lowers unchanged under jax 0.10 and
        # 0.11. ``pl.pallas_call`` with Mosaic GPU is itself deprecated in favour of
        # ``plgpu.kernel`` with explicit warpgroup/TMA pipelines, a Hopper-only rewrite that is
        # the follow-up for peak H100 throughput once the semantics here are settled.
        return pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def rules(self) -> dict:
        return dict(s_len=self.s, causal=self.causal, window=self.window,
                    num_sink_keys=self.num_sink_keys)


def _prepare(q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S,
             st: _Static):
    """Pad to whole tiles, go head-major, build the tables and the int8 masks."""
    b, t, n, h = q_BTNH.shape
    kg = k_BSKH.shape[2]
    qt, j = -(-t // st.block_q), -(-st.s // st.block_k)
    tp, sp = qt * st.block_q, j * st.block_k
    q = jnp.pad(q_BTNH, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    k = jnp.pad(k_BSKH, ((0, 0), (0, sp - st.s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v = jnp.pad(v_BSKV, ((0, 0), (0, sp - st.s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    keep = jnp.pad(block_keep_BKTJ.astype(jnp.int8), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    valid = (jnp.ones((b, st.s), jnp.int8) if key_valid_BS is None
             else key_valid_BS.astype(jnp.int8))
    valid = jnp.pad(valid, ((0, 0), (0, sp - st.s)))
    fwd_table, bwd_table = build_tables(block_keep_BKTJ, block_q=st.block_q, block_k=st.block_k,
                                        q_pos=q_pos_T, k_pos=k_pos_S, causal=st.causal,
                                        window=st.window, num_sink_keys=st.num_sink_keys)
    # padded query rows sit at the last real position (their output is dropped); padded keys
    # are removed by the ``k_idx < S`` rule
    q_pos = jnp.pad(q_pos_T.astype(jnp.int32), (0, tp - t), mode="edge")
    k_pos = jnp.pad(k_pos_S.astype(jnp.int32), (0, sp - st.s), mode="edge")
    return q, k, v, keep, valid, q_pos, k_pos, fwd_table, bwd_table, (b, n, kg, qt, j, tp, sp)




def _forward(q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S, sink_N,
             st: _Static):
    q, k, v, keep, valid, q_pos, k_pos, fwd_table, bwd_table, dims = _prepare(
        q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S, st)
    b, n, kg, qt, j, tp, sp = dims
    g, h, vw, bq = n // kg, q.shape[-1], v.shape[-1], st.block_q
    sink = jnp.zeros((n,), jnp.float32) if sink_N is None else sink_N.astype(jnp.float32)
    kernel = functools.partial(_fwd_kernel, scale=st.scale, has_sink=sink_N is not None,
                               block_k=st.block_k, **st.rules)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, n, qt),
        in_specs=[
            pl.BlockSpec((None, None, None, j + 1), lambda bi, ni, qi: (bi, ni // g, qi, 0)),
            pl.BlockSpec((None, None, bq, j), lambda bi, ni, qi: (bi, ni // g, qi, 0)),
            pl.BlockSpec((None, sp), lambda bi, ni, qi: (bi, 0)),
            pl.BlockSpec((bq,), lambda bi, ni, qi: (qi,)),
            pl.BlockSpec((sp,), lambda bi, ni, qi: (0,)),
            pl.BlockSpec((1,), lambda bi, ni, qi: (ni,)),
            pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, sp, h), lambda bi, ni, qi: (bi, ni // g, 0, 0)),
            pl.BlockSpec((None, None, sp, vw), lambda bi, ni, qi: (bi, ni // g, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, vw), lambda bi, ni, qi: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, ni, qi: (bi, ni, qi)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, n, tp, vw), q_BTNH.dtype),
                   jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        interpret=st.interpret,
        compiler_params=st.compiler_params,
        name="block_sparse_attention_fwd",
    )(fwd_table, keep, valid, q_pos, k_pos, sink, q, k, v)
    out = o.transpose(0, 2, 1, 3)[:, : st.t]
    return out, (q, k, v, keep, valid, q_pos, k_pos, fwd_table, bwd_table, o, lse, dims)


def _backward(res, do_BTNV, sink_N, st: _Static):
    q, k, v, keep, valid, q_pos, k_pos, fwd_table, bwd_table, o, lse, dims = res
    b, n, kg, qt, j, tp, sp = dims
    g, h, vw, bq, bk = n // kg, q.shape[-1], v.shape[-1], st.block_q, st.block_k
    do = jnp.pad(do_BTNV, ((0, 0), (0, tp - st.t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # (B, N, Tp)
    rows = lambda bi, ni, qi: (bi, ni, qi)  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=st.scale, block_k=bk, **st.rules),
        grid=(b, n, qt),
        in_specs=[
            pl.BlockSpec((None, None, None, j + 1), lambda bi, ni, qi: (bi, ni // g, qi, 0)),
            pl.BlockSpec((None, None, bq, j), lambda bi, ni, qi: (bi, ni // g, qi, 0)),
            pl.BlockSpec((None, sp), lambda bi, ni, qi: (bi, 0)),
            pl.BlockSpec((bq,), lambda bi, ni, qi: (qi,)),
            pl.BlockSpec((sp,), lambda bi, ni, qi: (0,)),
            pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, sp, h), lambda bi, ni, qi: (bi, ni // g, 0, 0)),
            pl.BlockSpec((None, None, sp, vw), lambda bi, ni, qi: (bi, ni // g, 0, 0)),
            pl.BlockSpec((None, None, bq, vw), lambda bi, ni, qi: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, bq), rows),
            pl.BlockSpec((None, None, bq), rows),
        ],
        out_specs=pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi: (bi, ni, qi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=st.interpret,
        compiler_params=st.compiler_params,
        name="block_sparse_attention_dq",
    )(fwd_table, keep, valid, q_pos, k_pos, q, k, v, do, lse, delta)
    # dK, dV per query head (float32 when a group sums several), then summed over the group
    acc = jnp.float32 if g > 1 else k.dtype
    whole = lambda bi, ni, ji: (bi, ni, 0)  # noqa: E731
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=st.scale, block_q=bq, block_k=bk, **st.rules),
        grid=(b, n, j),
        in_specs=[
            pl.BlockSpec((None, None, None, qt + 1), lambda bi, ni, ji: (bi, ni // g, ji, 0)),
            pl.BlockSpec((None, None, tp, 1), lambda bi, ni, ji: (bi, ni // g, 0, ji)),
            pl.BlockSpec((None, bk), lambda bi, ni, ji: (bi, ji)),
            pl.BlockSpec((tp,), lambda bi, ni, ji: (0,)),
            pl.BlockSpec((bk,), lambda bi, ni, ji: (ji,)),
            pl.BlockSpec((None, None, tp, h), lambda bi, ni, ji: (bi, ni, 0, 0)),
            pl.BlockSpec((None, None, bk, h), lambda bi, ni, ji: (bi, ni // g, ji, 0)),
            pl.BlockSpec((None, None, bk, vw), lambda bi, ni, ji: (bi, ni // g, ji, 0)),
            pl.BlockSpec((None, None, tp, vw), lambda bi, ni, ji: (bi, ni, 0, 0)),
            pl.BlockSpec((None, None, tp), whole),
            pl.BlockSpec((None, None, tp), whole),
        ],
        out_specs=[pl.BlockSpec((None, None, bk, h), lambda bi, ni, ji: (bi, ni, ji, 0)),
                   pl.BlockSpec((None, None, bk, vw), lambda bi, ni, ji: (bi, ni, ji, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, n, sp, h), acc),
                   jax.ShapeDtypeStruct((b, n, sp, vw), acc)],
        interpret=st.interpret,
        compiler_params=st.compiler_params,
        name="block_sparse_attention_dkv",
    )(bwd_table, keep, valid, q_pos, k_pos, q, k, v, do, lse, delta)
    dk, dv = (a.reshape(b, kg, g, sp, a.shape[-1]).sum(axis=2).astype(k.dtype) for a in (dk, dv))
    dsink = None if sink_N is None else sink_grad(sink_N, lse, delta, st.t)
    dq = dq.transpose(0, 2, 1, 3)[:, : st.t]
    dk = dk.transpose(0, 2, 1, 3)[:, : st.s]
    dv = dv.transpose(0, 2, 1, 3)[:, : st.s]
    return dq, dk, dv, dsink


def sparse_attention_vjp(forward, backward):
    """The differentiable entry point shared by every implementation of these semantics.

    ``forward(q, k, v, block_keep, key_valid, q_pos, k_pos, sink, st) -> (out, residuals)`` and
    ``backward(residuals, d_out, sink, st) -> (dq, dk, dv, dsink)``. The selection, key validity
    and positions are not differentiated (as in attnhut): they get float0 zeros.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnames=("st",))
    def attention(q, k, v, block_keep, key_valid, q_pos, k_pos, sink, st: _Static):
        return forward(q, k, v, block_keep, key_valid, q_pos, k_pos, sink, st)[0]

    def fwd(q, k, v, block_keep, key_valid, q_pos, k_pos, sink, st: _Static):
        out, res = forward(q, k, v, block_keep, key_valid, q_pos, k_pos, sink, st)
        return out, (res, sink, (block_keep, key_valid, q_pos, k_pos))

    def bwd(st: _Static, saved, do):
        res, sink, selection = saved
        dq, dk, dv, dsink = backward(res, do, sink, st)
        zeros = tuple(None if a is None else jnp.zeros(a.shape, jax.dtypes.float0)
                      for a in selection)
        return (dq, dk, dv, *zeros, dsink)

    attention.defvjp(fwd, bwd)
    return attention


def checked_operands(q_BTNH, k_BSKH, block_keep_BKTJ, key_valid_BS, q_pos_T, k_pos_S, *,
                     block_k: int):
    """Validate shapes; return (keep bool, key_valid bool or None, q_pos int32, k_pos int32)."""
    b, t, n, _ = q_BTNH.shape
    s, kg = k_BSKH.shape[1], k_BSKH.shape[2]
    if n % kg:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kg}")
    j = -(-s // block_k)
    if block_keep_BKTJ.shape != (b, kg, t, j):
        raise ValueError(f"block_keep must have shape (B, K, T, ceil(S / block_k))={(b, kg, t, j)}, "
                         f"got {tuple(block_keep_BKTJ.shape)}")
    valid = None if key_valid_BS is None else key_valid_BS.astype(bool)
    q_pos = jnp.arange(t, dtype=jnp.int32) + (s - t) if q_pos_T is None else q_pos_T
    k_pos = jnp.arange(s, dtype=jnp.int32) if k_pos_S is None else k_pos_S
    return block_keep_BKTJ.astype(bool), valid, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32)


_attention = sparse_attention_vjp(_forward, _backward)


def block_sparse_attention(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, block_keep_BKTJ: Array,
                           *, block_k: int, causal: bool, scale: float | None = None,
                           sink: Array | None = None, key_valid_BS: Array | None = None,
                           q_pos_T: Array | None = None, k_pos_S: Array | None = None,
                           window: int | None = None, num_sink_keys: int = 0,
                           block_sizes: BlockSizes = BlockSizes(),
                           interpret: bool | None = None) -> Array:
    """Attention over the selected key blocks only; equals ``block_sparse_attention_reference``.

    ``block_keep_BKTJ`` (B, K, T, ceil(S / block_k)) bool: key blocks each query token of each
    kv group may read (per token, so any selection is exact). Token rules inside the blocks use
    positions (``q_pos_T`` default ``arange(T) + S - T``, ``k_pos_S`` default ``arange(S)``):
    causal keeps ``k_pos <= q_pos``; ``window`` keeps ``k_pos > q_pos - window`` except for the
    first ``num_sink_keys`` keys. ``interpret`` defaults to True off GPU/TPU. Differentiable in
    q, k, v and ``sink``. Any head width: widths are zero-padded to ``lane_width`` for Triton.
    """
    keep, valid, q_pos, k_pos = checked_operands(q_BTNH, k_BSKH, block_keep_BKTJ, key_valid_BS,
                                                 q_pos_T, k_pos_S, block_k=block_k)
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "tpu")
    h = q_BTNH.shape[-1]
    st = _Static(block_sizes.block_q, block_k, causal, h ** -0.5 if scale is None else scale,
                 q_BTNH.shape[1], k_BSKH.shape[1], interpret, window, num_sink_keys,
                 block_sizes.num_warps, block_sizes.num_stages)
    out = _attention(pad_lanes(q_BTNH), pad_lanes(k_BSKH), pad_lanes(v_BSKV), keep, valid, q_pos,
                     k_pos, sink, st=st)
    return out[..., : v_BSKV.shape[-1]]

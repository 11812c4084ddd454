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

Layout: operands head-major (B, N, T, H), widths zero-padded to a power of two; grid (B, N,
query tiles) for forward and dq, (B, N, key blocks) for dk/dv (per query head, summed over
the GQA group); a data-dependent trip count over the table row, so only visited blocks are
read. The tile loops are ``pallas_kernels/flash.py``'s, shared with the block-sparse kernel.
``kernel_tpu.py`` is the Mosaic (TPU) variant of the same algorithm.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from ..block_sparse.kernel import pad_lanes, sink_grad
from ..flash import dkv_tile, dq_tile, forward_tile
from .tables import WORD, build_tables, key_bitmask

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query tile and key block (``32 * words_per_block`` keys) of the kernels. Small key blocks
    waste fewer lanes on scattered selections; the tile is what shares the loads."""

    block_q: int = 64
    words_per_block: int = 2
    num_warps: int = 4
    num_stages: int = 2


def membership(words, q_idx, start, block_k: int, *, s_len: int, t_len: int,
               window: int | None, window_start: int):
    """(block_q, block_k) bool: query ``q_idx`` reads key ``start + c``.

    ``words``: the block's bitmask word columns, each (block_q, 1) int32 (32 keys per word).
    A key is read if its bit is set, or if it lies in the query's raw window.
    """
    col_idx = jnp.arange(block_k)
    k_idx = start + col_idx
    lane = (col_idx % WORD)[None, :]
    slot = (col_idx // WORD)[None, :]
    hit = jnp.zeros((q_idx.shape[0], block_k), jnp.bool_)
    for w, col in enumerate(words):
        bit = jax.lax.shift_right_logical(col, lane) & 1
        hit = hit | ((slot == w) & (bit != 0))
    if window is not None:
        raw = k_idx[None, :] - window_start
        q = q_idx[:, None]
        hit = hit | ((raw >= 0) & (raw <= q) & (raw > q - window) & (q < t_len))
    return hit & (k_idx[None, :] < s_len)


def _block_words(bits_ref, rows, j, wpb):
    return [bits_ref[rows, pl.ds(j * wpb + w, 1)] for w in range(wpb)]


# ----------------------------------------------------------------------------- kernels
# One instance per (batch, query head, tile); K/V of query head ``n`` are those of kv group
# ``n // G`` (index maps), the bitmask and the tables are shared by all heads.


def _tile_mask(bits_ref, *, block_q: int, block_k: int, wpb: int, rules: dict):
    """mask_fn for the forward and dq loops: this query tile's membership in key block ``j``."""
    q_idx = pl.program_id(2) * block_q + jnp.arange(block_q)

    def mask(j, start):
        return membership(_block_words(bits_ref, slice(None), j, wpb), q_idx, start, block_k,
                          **rules)

    return mask


def _split_refs(rest, shared: bool):
    """(v_ref, remaining refs): with shared K/V there is no value ref."""
    return (None, rest) if shared else (rest[0], rest[1:])


def _fwd_kernel(table_ref, bits_ref, sink_ref, q_ref, k_ref, *rest, scale: float,
                has_sink: bool, shared: bool, block_q: int, block_k: int, wpb: int, **rules):
    v_ref, (o_ref, lse_ref) = _split_refs(rest, shared)
    mask = _tile_mask(bits_ref, block_q=block_q, block_k=block_k, wpb=wpb, rules=rules)

    out, lse = forward_tile(table_ref, q_ref[...], k_ref, k_ref if shared else v_ref,
                            sink_ref[0] if has_sink else None, mask, scale=scale,
                            block_k=block_k)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(table_ref, bits_ref, q_ref, k_ref, *rest, scale: float, shared: bool,
               block_q: int, block_k: int, wpb: int, **rules):
    v_ref, (do_ref, lse_ref, delta_ref, dq_ref) = _split_refs(rest, shared)
    mask = _tile_mask(bits_ref, block_q=block_q, block_k=block_k, wpb=wpb, rules=rules)

    dq = dq_tile(table_ref, q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], k_ref,
                 k_ref if shared else v_ref, mask, scale=scale, block_k=block_k)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(table_ref, bits_ref, q_ref, k_ref, *rest, scale: float, shared: bool,
                block_q: int, block_k: int, wpb: int, **rules):
    if shared:
        do_ref, lse_ref, delta_ref, dk_ref = rest
        v_ref = dv_ref = None
    else:
        v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
    j = pl.program_id(2)
    kb = k_ref[...]

    def mask(i, rows):
        return membership(_block_words(bits_ref, rows, j, wpb), i * block_q + jnp.arange(block_q),
                          j * block_k, block_k, **rules)

    dk, dv = dkv_tile(table_ref, kb, kb if shared else v_ref[...], q_ref, do_ref, lse_ref,
                      delta_ref, mask, scale=scale, block_q=block_q)
    if shared:  # keys are the values: one gradient
        dk_ref[...] = (dk + dv).astype(dk_ref.dtype)
    else:
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers


@dataclasses.dataclass(frozen=True)
class _Static:
    block_q: int
    words_per_block: int
    scale: float
    t: int
    s: int
    shared: bool
    interpret: bool
    window: int | None = None
    window_start: int = 0
    num_warps: int = 4
    num_stages: int = 2

    @property
    def block_k(self) -> int:
        return WORD * self.words_per_block

    @property
    def compiler_params(self):
        # GPU lowering: Triton, as for the block-sparse kernel (a data-dependent trip count and
        # data-dependent block offsets, which Triton's tile model expresses directly and which
        # lowers unchanged under jax 0.10 and 0.11; jax 0.10's default Mosaic GPU lowering of
        # ``pl.pallas_call`` rejects such kernels).
        return pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def rules(self) -> dict:
        return dict(s_len=self.s, t_len=self.t, window=self.window,
                    window_start=self.window_start)

    @property
    def kernel_args(self) -> dict:
        return dict(shared=self.shared, block_q=self.block_q, block_k=self.block_k,
                    wpb=self.words_per_block, **self.rules)


def _prepare(q_BTNH, k_BSKH, v_BSKV, indices_BTM, st: _Static):
    """Pad to whole tiles, go head-major, build the bitmask and the tables."""
    b, t, n, h = q_BTNH.shape
    kg = k_BSKH.shape[2]
    qt, j = -(-t // st.block_q), -(-st.s // st.block_k)
    tp, sp = qt * st.block_q, j * st.block_k
    q = jnp.pad(q_BTNH, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    k = jnp.pad(k_BSKH, ((0, 0), (0, sp - st.s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v = None if st.shared else jnp.pad(
        v_BSKV, ((0, 0), (0, sp - st.s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    bits = key_bitmask(indices_BTM, st.s)
    fwd_table, bwd_table = build_tables(bits, t=t, s=st.s, block_q=st.block_q,
                                        words_per_block=st.words_per_block, window=st.window,
                                        window_start=st.window_start)
    bits = jnp.pad(bits, ((0, 0), (0, tp - t), (0, j * st.words_per_block - bits.shape[-1])))
    return q, k, v, bits, fwd_table, bwd_table, (b, n, kg, qt, j, tp, sp)


def _kv(k, v, shared):
    return (k,) if shared else (k, v)


def _forward(q_BTNH, k_BSKH, v_BSKV, indices_BTM, sink_N, st: _Static):
    q, k, v, bits, fwd_table, bwd_table, dims = _prepare(q_BTNH, k_BSKH, v_BSKV, indices_BTM, st)
    b, n, kg, qt, j, tp, sp = dims
    g, h, bq = n // kg, q.shape[-1], st.block_q
    vw = h if st.shared else v.shape[-1]
    wp = bits.shape[-1]
    sink = jnp.zeros((n,), jnp.float32) if sink_N is None else sink_N.astype(jnp.float32)
    kernel = functools.partial(_fwd_kernel, scale=st.scale, has_sink=sink_N is not None,
                               **st.kernel_args)
    kv_specs = [pl.BlockSpec((None, None, sp, h), lambda bi, ni, qi: (bi, ni // g, 0, 0))]
    if not st.shared:
        kv_specs.append(pl.BlockSpec((None, None, sp, vw), lambda bi, ni, qi: (bi, ni // g, 0, 0)))
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, n, qt),
        in_specs=[
            pl.BlockSpec((None, None, j + 1), lambda bi, ni, qi: (bi, qi, 0)),
            pl.BlockSpec((None, bq, wp), lambda bi, ni, qi: (bi, qi, 0)),
            pl.BlockSpec((1,), lambda bi, ni, qi: (ni,)),
            pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi: (bi, ni, qi, 0)),
            *kv_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, vw), lambda bi, ni, qi: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, ni, qi: (bi, ni, qi)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, n, tp, vw), q_BTNH.dtype),
                   jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        interpret=st.interpret,
        compiler_params=st.compiler_params,
        name="token_sparse_attention_fwd",
    )(fwd_table, bits, sink, q, *_kv(k, v, st.shared))
    out = o.transpose(0, 2, 1, 3)[:, : st.t]
    return out, (q, k, v, bits, fwd_table, bwd_table, o, lse, dims)


def _backward(res, do_BTNV, sink_N, st: _Static):
    q, k, v, bits, fwd_table, bwd_table, o, lse, dims = res
    b, n, kg, qt, j, tp, sp = dims
    g, h, bq, bk = n // kg, q.shape[-1], st.block_q, st.block_k
    vw = h if st.shared else v.shape[-1]
    wp = bits.shape[-1]
    do = jnp.pad(do_BTNV, ((0, 0), (0, tp - st.t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # (B, N, Tp)
    common = dict(scale=st.scale, **st.kernel_args)
    rows = lambda bi, ni, qi: (bi, ni, qi)  # noqa: E731
    kv_full = [pl.BlockSpec((None, None, sp, h), lambda bi, ni, qi: (bi, ni // g, 0, 0))]
    kv_block = [pl.BlockSpec((None, None, bk, h), lambda bi, ni, ji: (bi, ni // g, ji, 0))]
    if not st.shared:
        kv_full.append(pl.BlockSpec((None, None, sp, vw), lambda bi, ni, qi: (bi, ni // g, 0, 0)))
        kv_block.append(pl.BlockSpec((None, None, bk, vw), lambda bi, ni, ji: (bi, ni // g, ji, 0)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(b, n, qt),
        in_specs=[
            pl.BlockSpec((None, None, j + 1), lambda bi, ni, qi: (bi, qi, 0)),
            pl.BlockSpec((None, bq, wp), lambda bi, ni, qi: (bi, qi, 0)),
            pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi: (bi, ni, qi, 0)),
            *kv_full,
            pl.BlockSpec((None, None, bq, vw), lambda bi, ni, qi: (bi, ni, qi, 0)),
            pl.BlockSpec((None, None, bq), rows),
            pl.BlockSpec((None, None, bq), rows),
        ],
        out_specs=pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi: (bi, ni, qi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=st.interpret,
        compiler_params=st.compiler_params,
        name="token_sparse_attention_dq",
    )(fwd_table, bits, q, *_kv(k, v, st.shared), do, lse, delta)
    # dK, dV per query head (float32 when a group sums several), then summed over the group
    acc = jnp.float32 if g > 1 else k.dtype
    whole = lambda bi, ni, ji: (bi, ni, 0)  # noqa: E731
    dkv_shapes = [jax.ShapeDtypeStruct((b, n, sp, h), acc)]
    dkv_specs = [pl.BlockSpec((None, None, bk, h), lambda bi, ni, ji: (bi, ni, ji, 0))]
    if not st.shared:
        dkv_shapes.append(jax.ShapeDtypeStruct((b, n, sp, vw), acc))
        dkv_specs.append(pl.BlockSpec((None, None, bk, vw), lambda bi, ni, ji: (bi, ni, ji, 0)))
    dkv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common),
        grid=(b, n, j),
        in_specs=[
            pl.BlockSpec((None, None, qt + 1), lambda bi, ni, ji: (bi, ji, 0)),
            pl.BlockSpec((None, tp, wp), lambda bi, ni, ji: (bi, 0, 0)),
            pl.BlockSpec((None, None, tp, h), lambda bi, ni, ji: (bi, ni, 0, 0)),
            *kv_block,
            pl.BlockSpec((None, None, tp, vw), lambda bi, ni, ji: (bi, ni, 0, 0)),
            pl.BlockSpec((None, None, tp), whole),
            pl.BlockSpec((None, None, tp), whole),
        ],
        out_specs=dkv_specs,
        out_shape=dkv_shapes,
        interpret=st.interpret,
        compiler_params=st.compiler_params,
        name="token_sparse_attention_dkv",
    )(bwd_table, bits, q, *_kv(k, v, st.shared), do, lse, delta)
    dkv = [a.reshape(b, kg, g, sp, a.shape[-1]).sum(axis=2).astype(k.dtype) for a in dkv]
    dsink = None if sink_N is None else sink_grad(sink_N, lse, delta, st.t)
    dq = dq.transpose(0, 2, 1, 3)[:, : st.t]
    dk = dkv[0].transpose(0, 2, 1, 3)[:, : st.s]
    dv = None if st.shared else dkv[1].transpose(0, 2, 1, 3)[:, : st.s]
    return dq, dk, dv, dsink


def token_sparse_vjp(forward, backward):
    """The differentiable entry point shared by the GPU and TPU kernels:
    ``forward(q, k, v, indices, sink, st) -> (out, residuals)``,
    ``backward(residuals, d_out, sink, st) -> (dq, dk, dv, dsink)``. The selection is not
    differentiated (as in attnhut): it gets float0 zeros."""

    @functools.partial(jax.custom_vjp, nondiff_argnames=("st",))
    def attention(q, k, v, indices, sink, st):
        return forward(q, k, v, indices, sink, st)[0]

    def fwd(q, k, v, indices, sink, st):
        out, res = forward(q, k, v, indices, sink, st)
        return out, (res, sink, indices)

    def bwd(st, saved, do):
        res, sink, indices = saved
        dq, dk, dv, dsink = backward(res, do, sink, st)
        return dq, dk, dv, jnp.zeros(indices.shape, jax.dtypes.float0), dsink

    attention.defvjp(fwd, bwd)
    return attention


_attention = token_sparse_vjp(_forward, _backward)


def check_shapes(q_BTNH, k_BSKH, v_BSKV, indices_BTM) -> None:
    b, t, n, _ = q_BTNH.shape
    kg = k_BSKH.shape[2]
    if n % kg:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kg}")
    if indices_BTM.ndim != 3 or indices_BTM.shape[:2] != (b, t):
        raise ValueError(f"indices must have shape (B, T, M) with (B, T)={(b, t)}, "
                         f"got {tuple(indices_BTM.shape)}")
    if v_BSKV is not None and v_BSKV.shape[:3] != k_BSKH.shape[:3]:
        raise ValueError(f"v {tuple(v_BSKV.shape)} and k {tuple(k_BSKH.shape)} must agree on "
                         "(B, S, K)")


def token_sparse_attention(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array | None,
                           indices_BTM: Array, *, scale: float | None = None,
                           sink: Array | None = None, window: int | None = None,
                           window_start: int = 0, block_sizes: BlockSizes = BlockSizes(),
                           interpret: bool | None = None) -> Array:
    """Attention over each query's selected keys; equals ``token_sparse_attention_reference``.

    ``indices_BTM`` (B, T, M) int32: distinct key indices per query, ``-1`` (or any value
    outside ``[0, S)``) for an empty slot; shared by all heads. ``v_BSKV=None``: the keys are
    the values. ``window``/``window_start``: also read the raw keys
    ``window_start + (t - window, t]``. ``interpret`` defaults to True off GPU. Differentiable
    in q, k, v and ``sink``.
    """
    check_shapes(q_BTNH, k_BSKH, v_BSKV, indices_BTM)
    h = q_BTNH.shape[-1]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    st = _Static(block_sizes.block_q, block_sizes.words_per_block,
                 h ** -0.5 if scale is None else scale, q_BTNH.shape[1], k_BSKH.shape[1],
                 v_BSKV is None, interpret, window, window_start, block_sizes.num_warps,
                 block_sizes.num_stages)
    out = _attention(pad_lanes(q_BTNH), pad_lanes(k_BSKH), pad_lanes(v_BSKV),
                     indices_BTM.astype(jnp.int32), sink, st=st)
    return out[..., : (k_BSKH if v_BSKV is None else v_BSKV).shape[-1]]

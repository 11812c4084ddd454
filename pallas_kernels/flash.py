"""Flash-attention tile loops shared by the Triton kernels (block-sparse and token-sparse).

Each kernel instance owns one query head and one tile: the forward and dq loops walk the key
blocks listed in the tile's table row (``[count, block, block, ...]``, see the ``tables.py``
beside each kernel), the dk/dv loop walks the query tiles listed for one key block. Which
(query, key) pairs inside a visited block count is the kernel's own business, passed in as
``mask_fn``: positions and the block selection for block-sparse, bitmask words for
token-sparse. Softmax statistics are float32; the matrix products take the operands in their
input dtype with float32 accumulation (bf16 inputs run on the tensor cores; float32 inputs run
at the ``precision`` passed in, by default JAX's default matmul precision, which on NVIDIA GPUs
is TF32 unless ``jax.default_matmul_precision("highest")`` is in effect, as for XLA's own dots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .common import (
    F32,
    FILL,
    KernelConfig,
    dot,
    dot_t,
    finish_softmax,
    head_grad_dtype,
    online_softmax_step,
    tn_dot,
)

Array = jax.Array


def _kv_block(k_ref, v_ref, start, block_k: int):
    kb = k_ref[pl.ds(start, block_k), :]
    return kb, (kb if v_ref is k_ref else v_ref[pl.ds(start, block_k), :])


def forward_tile(table_ref, q, k_ref, v_ref, sink, mask_fn, *, scale: float, block_k: int,
                 precision=None):
    """Online softmax of one query tile ``q`` (block_q, H) over the blocks of ``table_ref``.

    ``mask_fn(j, start) -> (block_q, block_k) bool`` for key block ``j`` (first key ``start``);
    ``sink`` a float32 scalar logit that joins the denominator only, or None. Returns the
    normalised output (block_q, V) float32 and the logsumexp (block_q,): ``BIG`` for a row that
    sees no key and no sink, whose output is 0.
    """
    bq, vw = q.shape[0], v_ref.shape[-1]

    def body(idx, carry):
        j = table_ref[idx + 1]
        start = j * block_k
        kb, vb = _kv_block(k_ref, v_ref, start, block_k)
        mask = mask_fn(j, start)
        s = jnp.where(mask, dot_t(q, kb, precision) * scale, FILL)
        return online_softmax_step(carry, s, mask, lambda p: dot(p.astype(vb.dtype), vb, precision))

    init = (jnp.zeros((bq, vw), F32), jnp.full((bq,), FILL, F32), jnp.zeros((bq,), F32))
    acc, m, l = jax.lax.fori_loop(0, table_ref[0], body, init)
    return finish_softmax(acc, m, l, sink, lambda x: x[:, None])


def dq_tile(table_ref, q, do, lse, delta, k_ref, v_ref, mask_fn, *, scale: float, block_k: int,
            precision=None):
    """dQ of one query tile: the forward's blocks again, probabilities from the saved
    logsumexp. ``delta`` is rowsum(dO * O)."""

    def body(idx, dq):
        j = table_ref[idx + 1]
        start = j * block_k
        kb, vb = _kv_block(k_ref, v_ref, start, block_k)
        p = jnp.where(mask_fn(j, start), jnp.exp(dot_t(q, kb, precision) * scale - lse[:, None]),
                      0.0)
        ds = p * (dot_t(do, vb, precision) - delta[:, None])
        return dq + dot(ds.astype(kb.dtype), kb, precision) * scale

    return jax.lax.fori_loop(0, table_ref[0], body, jnp.zeros(q.shape, F32))


def dkv_tile(table_ref, kb, vb, q_ref, do_ref, lse_ref, delta_ref, mask_fn, *, scale: float,
             block_q: int, precision=None):
    """dK, dV of one key block ``kb``/``vb`` from the query tiles of ``table_ref``;
    ``mask_fn(i, rows) -> (block_q, block_k) bool`` for query tile ``i`` (rows ``rows``)."""

    def body(idx, carry):
        dk, dv = carry
        i = table_ref[idx + 1]
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = dot_t(q, kb, precision) * scale
        p = jnp.where(mask_fn(i, rows), jnp.exp(s - lse_ref[rows][:, None]), 0.0)
        dv = dv + tn_dot(p.astype(do.dtype), do, precision)
        ds = p * (dot_t(do, vb, precision) - delta_ref[rows][:, None])
        return dk + tn_dot(ds.astype(q.dtype), q, precision) * scale, dv

    init = (jnp.zeros(kb.shape, F32), jnp.zeros(vb.shape, F32))
    return jax.lax.fori_loop(0, table_ref[0], body, init)


# ----------------------------------------------------------------------------- pallas calls
# The three passes' ``pl.pallas_call``s. Operands are head-major (B, N, Tp, width) for queries and
# per-query-head results, (B, K, Sp, width) for keys and values (query head ``ni`` reads kv head
# ``ni // G``). Each kernel family passes its own leading operands (tables, selection or
# bitmask, positions, sink) with their block specs; the query/key/value operands follow in a
# fixed order: forward ``q, *kv``; dq and dk/dv ``q, *kv, do, lse, delta`` (``kv`` is ``(k,)``
# when the keys are the values).


def _rows_spec(bq: int, width: int | None = None):
    """This instance's query tile of a (B, N, Tp[, width]) array; grid (B, N, Q)."""
    if width is None:
        return pl.BlockSpec((None, None, bq), lambda bi, ni, qi: (bi, ni, qi))
    return pl.BlockSpec((None, None, bq, width), lambda bi, ni, qi: (bi, ni, qi, 0))


def _all_rows_spec(tp: int, width: int | None = None):
    """All query rows of this instance's head; grid (B, N, J)."""
    if width is None:
        return pl.BlockSpec((None, None, tp), lambda bi, ni, ji: (bi, ni, 0))
    return pl.BlockSpec((None, None, tp, width), lambda bi, ni, ji: (bi, ni, 0, 0))


def _keys_spec(x, g: int):
    """All keys of the instance's kv head; grid (B, N, Q)."""
    sp, width = x.shape[2:]
    return pl.BlockSpec((None, None, sp, width), lambda bi, ni, qi: (bi, ni // g, 0, 0))


def _key_block_spec(bk: int, width: int, g: int | None = None):
    """This instance's key block (of its kv head, or with ``g=None`` of its own query head's
    per-head gradient); grid (B, N, J)."""
    if g is None:
        return pl.BlockSpec((None, None, bk, width), lambda bi, ni, ji: (bi, ni, ji, 0))
    return pl.BlockSpec((None, None, bk, width), lambda bi, ni, ji: (bi, ni // g, ji, 0))


def _call(kernel, cfg: KernelConfig, name: str, grid, in_specs, out_specs, out_shape):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=cfg.interpret,
                          compiler_params=cfg.triton_params, name=name)


def forward_call(kernel, cfg: KernelConfig, name: str, specs, operands, q, kv):
    """Forward pass over grid (B, N, Q): (output (B, N, Tp, V) in q's dtype, logsumexp
    (B, N, Tp) float32)."""
    b, n, tp, h = q.shape
    g, vw, bq = n // kv[0].shape[1], kv[-1].shape[-1], cfg.block_q
    in_specs = [*specs, _rows_spec(bq, h), *(_keys_spec(a, g) for a in kv)]
    out_shape = [jax.ShapeDtypeStruct((b, n, tp, vw), q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp), F32)]
    return _call(kernel, cfg, name, (b, n, tp // bq), in_specs, [_rows_spec(bq, vw), _rows_spec(bq)],
                 out_shape)(*operands, q, *kv)


def dq_call(kernel, cfg: KernelConfig, name: str, specs, operands, q, kv, do, lse, delta):
    """dQ over grid (B, N, Q), in q's shape and dtype."""
    b, n, tp, h = q.shape
    g, bq = n // kv[0].shape[1], cfg.block_q
    in_specs = [*specs, _rows_spec(bq, h), *(_keys_spec(a, g) for a in kv), _rows_spec(bq, do.shape[-1]),
                _rows_spec(bq), _rows_spec(bq)]
    return _call(kernel, cfg, name, (b, n, tp // bq), in_specs, _rows_spec(bq, h),
                 jax.ShapeDtypeStruct(q.shape, q.dtype))(*operands, q, *kv, do, lse, delta)


def dkv_call(kernel, cfg: KernelConfig, name: str, specs, operands, q, kv, do, lse, delta):
    """Per-query-head dK (and dV unless ``kv`` is only the keys) over grid (B, N, J), each
    (B, N, Sp, width), float32 when a kv head's group sums several query heads."""
    b, n, tp, h = q.shape
    kg, sp = kv[0].shape[1:3]
    g, bk = n // kg, cfg.block_k
    in_specs = [*specs, _all_rows_spec(tp, h), *(_key_block_spec(bk, a.shape[-1], g) for a in kv),
                _all_rows_spec(tp, do.shape[-1]), _all_rows_spec(tp), _all_rows_spec(tp)]
    dtype = head_grad_dtype(g, kv[0].dtype)
    return _call(kernel, cfg, name, (b, n, sp // bk), in_specs,
                 [_key_block_spec(bk, a.shape[-1]) for a in kv],
                 [jax.ShapeDtypeStruct((b, n, sp, a.shape[-1]), dtype) for a in kv],
                 )(*operands, q, *kv, do, lse, delta)

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

Layout: operands head-major (B, N, T, H); grid (B, K, query tiles) for forward and dq, (B, K,
key blocks) for dk/dv; a data-dependent trip count over the table row, so only visited blocks
are read. ``kernel_tpu.py`` is the Mosaic (TPU) variant of the same algorithm.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from .tables import WORD, build_tables, key_bitmask

Array = jax.Array
_MIN = float(jnp.finfo(jnp.float32).min)
_BIG = float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query tile and key block (``32 * words_per_block`` keys) of the kernels. Small key blocks
    waste fewer lanes on scattered selections; the tile is what shares the loads."""

    block_q: int = 64
    words_per_block: int = 2
    num_warps: int = 4
    num_stages: int = 2


def _dot_t(a: Array, b: Array) -> Array:
    """a @ b.T in float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: Array, b: Array) -> Array:
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _tn_dot(a: Array, b: Array) -> Array:
    """a.T @ b in float32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


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


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(table_ref, bits_ref, sink_ref, q_ref, k_ref, *rest, scale: float,
                has_sink: bool, shared: bool, block_q: int, block_k: int, wpb: int,
                groups: int, **rules):
    if shared:
        o_ref, lse_ref = rest
        v_ref = k_ref
    else:
        v_ref, o_ref, lse_ref = rest
    q_idx = pl.program_id(2) * block_q + jnp.arange(block_q)
    qs = [q_ref[g].astype(jnp.float32) * scale for g in range(groups)]
    vw = v_ref.shape[-1]
    init = tuple((jnp.zeros((block_q, vw), jnp.float32), jnp.full((block_q,), _MIN, jnp.float32),
                  jnp.zeros((block_q,), jnp.float32)) for _ in range(groups))

    def body(idx, carry):
        j = table_ref[idx + 1]
        start = j * block_k
        kb = k_ref[pl.ds(start, block_k), :]
        vb = kb if shared else v_ref[pl.ds(start, block_k), :]
        kb = kb.astype(jnp.float32)
        mask = membership(_block_words(bits_ref, slice(None), j, wpb), q_idx, start, block_k,
                          **rules)
        out = []
        for g in range(groups):  # every head of the group reuses the K/V block just loaded
            acc, m, l = carry[g]
            s = jnp.where(mask, _dot_t(qs[g], kb), _MIN)
            m_new = jnp.maximum(m, s.max(axis=-1))
            corr = jnp.exp(m - m_new)
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            l = l * corr + p.sum(axis=-1)
            acc = acc * corr[:, None] + _dot(p.astype(vb.dtype), vb)
            out.append((acc, m_new, l))
        return tuple(out)

    carry = jax.lax.fori_loop(0, table_ref[0], body, init)
    for g in range(groups):
        acc, m, l = carry[g]
        if has_sink:
            sk = sink_ref[g].astype(jnp.float32)
            m_fin = jnp.maximum(m, sk)
            l_fin = l * jnp.exp(m - m_fin) + jnp.exp(sk - m_fin)
            acc = acc * jnp.exp(m - m_fin)[:, None]
        else:
            m_fin, l_fin = m, l
        safe = jnp.where(l_fin > 0, l_fin, 1.0)
        o_ref[g] = (acc / safe[:, None]).astype(o_ref.dtype)
        lse_ref[g] = jnp.where(l_fin > 0, m_fin + jnp.log(safe), _BIG)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(table_ref, bits_ref, q_ref, k_ref, *rest, scale: float, shared: bool,
               block_q: int, block_k: int, wpb: int, groups: int, **rules):
    if shared:
        do_ref, lse_ref, delta_ref, dq_ref = rest
        v_ref = k_ref
    else:
        v_ref, do_ref, lse_ref, delta_ref, dq_ref = rest
    q_idx = pl.program_id(2) * block_q + jnp.arange(block_q)
    qs = [q_ref[g].astype(jnp.float32) for g in range(groups)]
    dos = [do_ref[g].astype(jnp.float32) for g in range(groups)]

    def body(idx, dqs):
        j = table_ref[idx + 1]
        start = j * block_k
        kb = k_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        vb = kb if shared else v_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        mask = membership(_block_words(bits_ref, slice(None), j, wpb), q_idx, start, block_k,
                          **rules)
        out = []
        for g in range(groups):
            s = _dot_t(qs[g], kb) * scale
            p = jnp.where(mask, jnp.exp(s - lse_ref[g][:, None]), 0.0)
            ds = p * (_dot_t(dos[g], vb) - delta_ref[g][:, None])
            out.append(dqs[g] + _dot(ds, kb) * scale)
        return tuple(out)

    init = tuple(jnp.zeros(q_ref.shape[1:], jnp.float32) for _ in range(groups))
    dqs = jax.lax.fori_loop(0, table_ref[0], body, init)
    for g in range(groups):
        dq_ref[g] = dqs[g].astype(dq_ref.dtype)


def _dkv_kernel(table_ref, bits_ref, q_ref, k_ref, *rest, scale: float, shared: bool,
                block_q: int, block_k: int, wpb: int, groups: int, **rules):
    if shared:
        do_ref, lse_ref, delta_ref, dk_ref = rest
        v_ref, dv_ref = k_ref, None
    else:
        v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
    j = pl.program_id(2)
    kb = k_ref[...].astype(jnp.float32)
    vb = kb if shared else v_ref[...].astype(jnp.float32)

    def body(idx, carry):
        dk, dv = carry
        i = table_ref[idx + 1]
        rows = pl.ds(i * block_q, block_q)
        q_idx = i * block_q + jnp.arange(block_q)
        mask = membership(_block_words(bits_ref, rows, j, wpb), q_idx, j * block_k, block_k,
                          **rules)
        for g in range(groups):  # all heads of the group accumulate into the shared dK, dV
            qg = q_ref[g, rows, :].astype(jnp.float32)
            dog = do_ref[g, rows, :].astype(jnp.float32)
            s = _dot_t(qg, kb) * scale
            p = jnp.where(mask, jnp.exp(s - lse_ref[g, rows][:, None]), 0.0)
            dv = dv + _tn_dot(p, dog)
            ds = p * (_dot_t(dog, vb) - delta_ref[g, rows][:, None])
            dk = dk + _tn_dot(ds, qg) * scale
        return dk, dv

    init = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, table_ref[0], body, init)
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
    g, h = n // kg, q.shape[-1]
    vw = h if st.shared else v.shape[-1]
    wp = bits.shape[-1]
    sink = (jnp.zeros((kg, g), jnp.float32) if sink_N is None
            else sink_N.astype(jnp.float32).reshape(kg, g))
    kernel = functools.partial(_fwd_kernel, scale=st.scale, has_sink=sink_N is not None,
                               groups=g, **st.kernel_args)
    kv_specs = [pl.BlockSpec((None, None, sp, h), lambda bi, ki, qi: (bi, ki, 0, 0))]
    if not st.shared:
        kv_specs.append(pl.BlockSpec((None, None, sp, vw), lambda bi, ki, qi: (bi, ki, 0, 0)))
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kg, qt),
        in_specs=[
            pl.BlockSpec((None, None, j + 1), lambda bi, ki, qi: (bi, qi, 0)),
            pl.BlockSpec((None, st.block_q, wp), lambda bi, ki, qi: (bi, qi, 0)),
            pl.BlockSpec((None, g), lambda bi, ki, qi: (ki, 0)),
            pl.BlockSpec((None, g, st.block_q, h), lambda bi, ki, qi: (bi, ki, qi, 0)),
            *kv_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, g, st.block_q, vw), lambda bi, ki, qi: (bi, ki, qi, 0)),
            pl.BlockSpec((None, g, st.block_q), lambda bi, ki, qi: (bi, ki, qi)),
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
    g, h = n // kg, q.shape[-1]
    vw = h if st.shared else v.shape[-1]
    wp = bits.shape[-1]
    do = jnp.pad(do_BTNV, ((0, 0), (0, tp - st.t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # (B, N, Tp)
    common = dict(scale=st.scale, groups=g, **st.kernel_args)
    kv_full = [pl.BlockSpec((None, None, sp, h), lambda bi, ki, qi: (bi, ki, 0, 0))]
    kv_block = [pl.BlockSpec((None, None, st.block_k, h), lambda bi, ki, ji: (bi, ki, ji, 0))]
    if not st.shared:
        kv_full.append(pl.BlockSpec((None, None, sp, vw), lambda bi, ki, qi: (bi, ki, 0, 0)))
        kv_block.append(pl.BlockSpec((None, None, st.block_k, vw),
                                     lambda bi, ki, ji: (bi, ki, ji, 0)))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(b, kg, qt),
        in_specs=[
            pl.BlockSpec((None, None, j + 1), lambda bi, ki, qi: (bi, qi, 0)),
            pl.BlockSpec((None, st.block_q, wp), lambda bi, ki, qi: (bi, qi, 0)),
            pl.BlockSpec((None, g, st.block_q, h), lambda bi, ki, qi: (bi, ki, qi, 0)),
            *kv_full,
            pl.BlockSpec((None, g, st.block_q, vw), lambda bi, ki, qi: (bi, ki, qi, 0)),
            pl.BlockSpec((None, g, st.block_q), lambda bi, ki, qi: (bi, ki, qi)),
            pl.BlockSpec((None, g, st.block_q), lambda bi, ki, qi: (bi, ki, qi)),
        ],
        out_specs=pl.BlockSpec((None, g, st.block_q, h), lambda bi, ki, qi: (bi, ki, qi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=st.interpret,
        compiler_params=st.compiler_params,
        name="token_sparse_attention_dq",
    )(fwd_table, bits, q, *_kv(k, v, st.shared), do, lse, delta)
    dkv_shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype)]
    dkv_specs = [pl.BlockSpec((None, None, st.block_k, h), lambda bi, ki, ji: (bi, ki, ji, 0))]
    if not st.shared:
        dkv_shapes.append(jax.ShapeDtypeStruct(v.shape, v.dtype))
        dkv_specs.append(pl.BlockSpec((None, None, st.block_k, vw),
                                      lambda bi, ki, ji: (bi, ki, ji, 0)))
    dkv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common),
        grid=(b, kg, j),
        in_specs=[
            pl.BlockSpec((None, None, qt + 1), lambda bi, ki, ji: (bi, ji, 0)),
            pl.BlockSpec((None, tp, wp), lambda bi, ki, ji: (bi, 0, 0)),
            pl.BlockSpec((None, g, tp, h), lambda bi, ki, ji: (bi, ki, 0, 0)),
            *kv_block,
            pl.BlockSpec((None, g, tp, vw), lambda bi, ki, ji: (bi, ki, 0, 0)),
            pl.BlockSpec((None, g, tp), lambda bi, ki, ji: (bi, ki, 0)),
            pl.BlockSpec((None, g, tp), lambda bi, ki, ji: (bi, ki, 0)),
        ],
        out_specs=dkv_specs,
        out_shape=dkv_shapes,
        interpret=st.interpret,
        compiler_params=st.compiler_params,
        name="token_sparse_attention_dkv",
    )(bwd_table, bits, q, *_kv(k, v, st.shared), do, lse, delta)
    dsink = None
    if sink_N is not None:  # d/ds of a denominator-only logit: -sum_t p_sink(t) * delta(t)
        p_sink = jnp.exp(sink_N.astype(jnp.float32)[None, :, None] - lse)[:, :, : st.t]
        dsink = -(p_sink * delta[:, :, : st.t]).sum(axis=(0, 2)).astype(sink_N.dtype)
    dq = dq.transpose(0, 2, 1, 3)[:, : st.t]
    dk = dkv[0].transpose(0, 2, 1, 3)[:, : st.s]
    dv = None if st.shared else dkv[1].transpose(0, 2, 1, 3)[:, : st.s]
    return dq, dk, dv, dsink


@functools.partial(jax.custom_vjp, nondiff_argnames=("st",))
def _attention(q, k, v, indices, sink, st: _Static):
    return _forward(q, k, v, indices, sink, st)[0]


def _attention_fwd(q, k, v, indices, sink, st: _Static):
    out, res = _forward(q, k, v, indices, sink, st)
    return out, (res, sink, indices)


def _attention_bwd(st: _Static, saved, do):
    res, sink, indices = saved
    dq, dk, dv, dsink = _backward(res, do, sink, st)
    # the selection is not differentiated (as in attnhut)
    return dq, dk, dv, jnp.zeros(indices.shape, jax.dtypes.float0), dsink


_attention.defvjp(_attention_fwd, _attention_bwd)


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
    return _attention(q_BTNH, k_BSKH, v_BSKV, indices_BTM.astype(jnp.int32), sink, st=st)

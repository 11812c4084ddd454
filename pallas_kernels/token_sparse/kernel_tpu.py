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

from ..block_sparse.kernel import sink_grad
from .kernel import check_shapes, token_sparse_vjp
from .tables import WORD, build_tables, key_bitmask

Array = jax.Array
_MIN = float(jnp.finfo(jnp.float32).min)
_BIG = float(jnp.finfo(jnp.float32).max)
_LOG2_WORD = WORD.bit_length() - 1


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    block_q: int = 128
    words_per_block: int = 4


def _nt(a, b):
    """a @ b.T in float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _nn(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _tn(a, b):
    """a.T @ b in float32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _membership_t(bits_ref, j, i, *, block_q: int, block_k: int, wpb: int, s_len: int,
                  t_len: int, window: int | None, window_start: int):
    """(block_k, block_q) bool: key ``j * block_k + r`` is read by query ``i * block_q + c``."""
    r = jax.lax.broadcasted_iota(jnp.int32, (block_k, block_q), 0)
    c = jax.lax.broadcasted_iota(jnp.int32, (block_k, block_q), 1)
    hit = jnp.zeros((block_k, block_q), jnp.bool_)
    for w in range(wpb):
        row = bits_ref[pl.ds(j * wpb + w, 1), :]  # (1, block_q) words of 32 keys
        # r % 32 and r // 32 as bit operations: jnp's integer floor division lowers through
        # ``sign``, which Mosaic lowers per TPU generation (not exportable without a device)
        bit = jax.lax.shift_right_logical(row, r & (WORD - 1)) & 1
        hit = hit | ((jax.lax.shift_right_logical(r, _LOG2_WORD) == w) & (bit != 0))
    k_idx = j * block_k + r
    if window is not None:
        raw = k_idx - window_start
        q = i * block_q + c
        hit = hit | ((raw >= 0) & (raw <= q) & (raw > q - window) & (q < t_len))
    return hit & (k_idx < s_len)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(table_ref, sink_ref, bits_ref, q_ref, k_ref, *rest, scale, has_sink, shared,
                groups, **rules):
    if shared:
        o_ref, lse_ref, acc_scr, m_scr, l_scr = rest
        v_ref = k_ref
    else:
        v_ref, o_ref, lse_ref, acc_scr, m_scr, l_scr = rest
    b, kg, i, m = (pl.program_id(a) for a in range(4))

    @pl.when(m == 0)
    def _init():
        acc_scr[...] = jnp.zeros_like(acc_scr)
        m_scr[...] = jnp.full_like(m_scr, _MIN)
        l_scr[...] = jnp.zeros_like(l_scr)

    @pl.when(m < table_ref[b, i, 0])
    def _visit():
        j = table_ref[b, i, m + 1]
        mask = _membership_t(bits_ref, j, i, **rules)
        kb = k_ref[...]
        vb = kb if shared else v_ref[...]
        for g in range(groups):  # all heads of the group reuse the K/V block
            s = jnp.where(mask, _nt(kb, q_ref[g]) * scale, _MIN)  # (block_k, block_q)
            m_prev = m_scr[g]
            m_new = jnp.maximum(m_prev, s.max(axis=0, keepdims=True))
            corr = jnp.exp(m_prev - m_new)
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            l_scr[g] = l_scr[g] * corr + p.sum(axis=0, keepdims=True)
            acc_scr[g] = acc_scr[g] * corr + _tn(vb, p.astype(vb.dtype))  # (V, block_q)
            m_scr[g] = m_new

    @pl.when(m == pl.num_programs(3) - 1)
    def _finish():
        for g in range(groups):
            mx, l, acc = m_scr[g], l_scr[g], acc_scr[g]
            if has_sink:
                sk = sink_ref[kg, g]
                m_fin = jnp.maximum(mx, sk)
                l = l * jnp.exp(mx - m_fin) + jnp.exp(sk - m_fin)
                acc = acc * jnp.exp(mx - m_fin)
            else:
                m_fin = mx
            safe = jnp.where(l > 0, l, 1.0)
            o_ref[g] = (acc / safe).astype(o_ref.dtype)
            lse_ref[pl.ds(g, 1), :] = jnp.where(l > 0, m_fin + jnp.log(safe), _BIG)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(table_ref, bits_ref, q_ref, k_ref, *rest, scale, shared, groups, **rules):
    if shared:
        do_ref, lse_ref, delta_ref, dq_ref, dq_scr = rest
        v_ref = k_ref
    else:
        v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr = rest
    b, i, m = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(m == 0)
    def _init():
        dq_scr[...] = jnp.zeros_like(dq_scr)

    @pl.when(m < table_ref[b, i, 0])
    def _visit():
        j = table_ref[b, i, m + 1]
        mask = _membership_t(bits_ref, j, i, **rules)
        kb = k_ref[...]
        vb = kb if shared else v_ref[...]
        for g in range(groups):
            s = _nt(kb, q_ref[g]) * scale
            p = jnp.where(mask, jnp.exp(s - lse_ref[pl.ds(g, 1), :]), 0.0)
            dp = _nt(vb, do_ref[g])
            ds = p * (dp - delta_ref[pl.ds(g, 1), :])
            dq_scr[g] = dq_scr[g] + _tn(ds, kb.astype(jnp.float32)) * scale

    @pl.when(m == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(table_ref, bits_ref, q_ref, k_ref, *rest, scale, shared, groups, **rules):
    if shared:
        do_ref, lse_ref, delta_ref, dk_ref, dk_scr, dv_scr = rest
        v_ref, dv_ref = k_ref, None
    else:
        v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
    b, j, m = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(m == 0)
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    @pl.when(m < table_ref[b, j, 0])
    def _visit():
        i = table_ref[b, j, m + 1]
        mask = _membership_t(bits_ref, j, i, **rules)
        kb = k_ref[...]
        vb = kb if shared else v_ref[...]
        for g in range(groups):  # all heads of the group accumulate into the shared dK, dV
            qg, dog = q_ref[g], do_ref[g]
            s = _nt(kb, qg) * scale
            p = jnp.where(mask, jnp.exp(s - lse_ref[pl.ds(g, 1), :]), 0.0)
            dv_scr[...] += _nn(p, dog.astype(jnp.float32))
            ds = p * (_nt(vb, dog) - delta_ref[pl.ds(g, 1), :])
            dk_scr[...] += _nn(ds, qg.astype(jnp.float32)) * scale

    @pl.when(m == pl.num_programs(3) - 1)
    def _finish():
        if shared:
            dk_ref[...] = (dk_scr[...] + dv_scr[...]).astype(dk_ref.dtype)
        else:
            dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
            dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


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

    @property
    def block_k(self) -> int:
        return WORD * self.words_per_block

    @property
    def rules(self) -> dict:
        return dict(block_q=self.block_q, block_k=self.block_k, wpb=self.words_per_block,
                    s_len=self.s, t_len=self.t, window=self.window,
                    window_start=self.window_start)

    def call_kwargs(self, name: str) -> dict:
        sem = ("parallel", "parallel", "parallel", "arbitrary")
        return dict(interpret=pltpu.InterpretParams() if self.interpret else False,
                    compiler_params=pltpu.CompilerParams(dimension_semantics=sem), name=name)


def _prepare(q_BTNH, k_BSKH, v_BSKV, indices_BTM, st: _Static):
    b, t, n, h = q_BTNH.shape
    kg = k_BSKH.shape[2]
    g = n // kg
    qt, j = -(-t // st.block_q), -(-st.s // st.block_k)
    tp, sp = qt * st.block_q, j * st.block_k
    q = jnp.pad(q_BTNH, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q = q.reshape(b, tp, kg, g, h).transpose(0, 2, 3, 1, 4)  # B K G Tp H
    k = jnp.pad(k_BSKH, ((0, 0), (0, sp - st.s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v = None if st.shared else jnp.pad(
        v_BSKV, ((0, 0), (0, sp - st.s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    bits = key_bitmask(indices_BTM, st.s)
    fwd_table, bwd_table = build_tables(bits, t=t, s=st.s, block_q=st.block_q,
                                        words_per_block=st.words_per_block, window=st.window,
                                        window_start=st.window_start)
    wp = j * st.words_per_block
    bits = jnp.pad(bits, ((0, 0), (0, tp - t), (0, wp - bits.shape[-1]))).transpose(0, 2, 1)
    return q, k, v, bits, fwd_table, bwd_table, (b, n, kg, g, qt, j, tp, sp, wp)


def _forward(q_BTNH, k_BSKH, v_BSKV, indices_BTM, sink_N, st: _Static):
    q, k, v, bits, fwd_table, bwd_table, dims = _prepare(q_BTNH, k_BSKH, v_BSKV, indices_BTM, st)
    b, n, kg, g, qt, j, tp, sp, wp = dims
    h = q.shape[-1]
    vw = h if st.shared else v.shape[-1]
    bq, bk = st.block_q, st.block_k
    sink = (jnp.zeros((kg, g), jnp.float32) if sink_N is None
            else sink_N.astype(jnp.float32).reshape(kg, g))
    kv_specs = [pl.BlockSpec((None, None, bk, h), lambda bi, ki, qi, m, tb: (bi, ki, tb[bi, qi, m + 1], 0))]
    if not st.shared:
        kv_specs.append(pl.BlockSpec((None, None, bk, vw),
                                     lambda bi, ki, qi, m, tb: (bi, ki, tb[bi, qi, m + 1], 0)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kg, qt, j),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            pl.BlockSpec((None, wp, bq), lambda bi, ki, qi, m, tb: (bi, 0, qi)),
            pl.BlockSpec((None, None, g, bq, h), lambda bi, ki, qi, m, tb: (bi, ki, 0, qi, 0)),
            *kv_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, g, vw, bq), lambda bi, ki, qi, m, tb: (bi, ki, 0, 0, qi)),
            pl.BlockSpec((None, None, g, bq), lambda bi, ki, qi, m, tb: (bi, ki, 0, qi)),
        ],
        scratch_shapes=[pltpu.VMEM((g, vw, bq), jnp.float32), pltpu.VMEM((g, 1, bq), jnp.float32),
                        pltpu.VMEM((g, 1, bq), jnp.float32)],
    )
    kernel = functools.partial(_fwd_kernel, scale=st.scale, has_sink=sink_N is not None,
                               shared=st.shared, groups=g, **st.rules)
    o_t, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, kg, g, vw, tp), q_BTNH.dtype),
                   jax.ShapeDtypeStruct((b, kg, g, tp), jnp.float32)],
        **st.call_kwargs("token_sparse_attention_fwd_tpu"),
    )(fwd_table, sink, bits, q, k, *(() if st.shared else (v,)))
    o = o_t.transpose(0, 1, 2, 4, 3)  # B K G Tp V
    out = o.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, vw)[:, : st.t]
    return out, (q, k, v, bits, fwd_table, bwd_table, o, lse, dims)


def _backward(res, do_BTNV, sink_N, st: _Static):
    q, k, v, bits, fwd_table, bwd_table, o, lse, dims = res
    b, n, kg, g, qt, j, tp, sp, wp = dims
    h = q.shape[-1]
    vw = h if st.shared else v.shape[-1]
    bq, bk = st.block_q, st.block_k
    do = jnp.pad(do_BTNV, ((0, 0), (0, tp - st.t), (0, 0), (0, 0)))
    do = do.reshape(b, tp, kg, g, vw).transpose(0, 2, 3, 1, 4)  # B K G Tp V
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # B K G Tp
    common = dict(scale=st.scale, shared=st.shared, groups=g, **st.rules)
    kv = (k,) if st.shared else (k, v)

    # dq: same walk as the forward
    kv_specs = [pl.BlockSpec((None, None, bk, h), lambda bi, ki, qi, m, tb: (bi, ki, tb[bi, qi, m + 1], 0))]
    if not st.shared:
        kv_specs.append(pl.BlockSpec((None, None, bk, vw),
                                     lambda bi, ki, qi, m, tb: (bi, ki, tb[bi, qi, m + 1], 0)))
    row = lambda bi, ki, qi, m, tb: (bi, ki, 0, qi, 0)  # noqa: E731
    stat = lambda bi, ki, qi, m, tb: (bi, ki, 0, qi)  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kg, qt, j),
            in_specs=[
                pl.BlockSpec((None, wp, bq), lambda bi, ki, qi, m, tb: (bi, 0, qi)),
                pl.BlockSpec((None, None, g, bq, h), row),
                *kv_specs,
                pl.BlockSpec((None, None, g, bq, vw), row),
                pl.BlockSpec((None, None, g, bq), stat),
                pl.BlockSpec((None, None, g, bq), stat),
            ],
            out_specs=pl.BlockSpec((None, None, g, bq, h), row),
            scratch_shapes=[pltpu.VMEM((g, bq, h), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **st.call_kwargs("token_sparse_attention_dq_tpu"),
    )(fwd_table, bits, q, *kv, do, lse, delta)

    # dk, dv: per key block, the query tiles of the backward table
    qrow = lambda bi, ki, ji, m, tb: (bi, ki, 0, tb[bi, ji, m + 1], 0)  # noqa: E731
    qstat = lambda bi, ki, ji, m, tb: (bi, ki, 0, tb[bi, ji, m + 1])  # noqa: E731
    kblk = lambda bi, ki, ji, m, tb: (bi, ki, ji, 0)  # noqa: E731
    kv_specs = [pl.BlockSpec((None, None, bk, h), kblk)]
    out_specs = [pl.BlockSpec((None, None, bk, h), kblk)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype)]
    if not st.shared:
        kv_specs.append(pl.BlockSpec((None, None, bk, vw), kblk))
        out_specs.append(pl.BlockSpec((None, None, bk, vw), kblk))
        out_shape.append(jax.ShapeDtypeStruct(v.shape, v.dtype))
    dkv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kg, j, qt),
            in_specs=[
                pl.BlockSpec((None, wp, bq), lambda bi, ki, ji, m, tb: (bi, 0, tb[bi, ji, m + 1])),
                pl.BlockSpec((None, None, g, bq, h), qrow),
                *kv_specs,
                pl.BlockSpec((None, None, g, bq, vw), qrow),
                pl.BlockSpec((None, None, g, bq), qstat),
                pl.BlockSpec((None, None, g, bq), qstat),
            ],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, vw), jnp.float32)],
        ),
        out_shape=out_shape,
        **st.call_kwargs("token_sparse_attention_dkv_tpu"),
    )(bwd_table, bits, q, *kv, do, lse, delta)
    dsink = None if sink_N is None else sink_grad(sink_N, lse.reshape(b, n, -1),
                                                  delta.reshape(b, n, -1), st.t)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, : st.t]
    dk = dkv[0].transpose(0, 2, 1, 3)[:, : st.s]
    dv = None if st.shared else dkv[1].transpose(0, 2, 1, 3)[:, : st.s]
    return dq, dk, dv, dsink


_attention = token_sparse_vjp(_forward, _backward)


def token_sparse_attention_tpu(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array | None,
                               indices_BTM: Array, *, scale: float | None = None,
                               sink: Array | None = None, window: int | None = None,
                               window_start: int = 0,
                               block_sizes: TpuBlockSizes = TpuBlockSizes(),
                               interpret: bool | None = None) -> Array:
    """The TPU kernel; same contract as ``kernel.token_sparse_attention``. ``interpret``
    defaults to True off TPU (``pltpu.InterpretParams``)."""
    check_shapes(q_BTNH, k_BSKH, v_BSKV, indices_BTM)
    t, h = q_BTNH.shape[1], q_BTNH.shape[-1]
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    # a single tile covers short sequences (the block then equals the array dimension)
    bq = block_sizes.block_q if t > block_sizes.block_q else -(-t // 8) * 8
    st = _Static(bq, block_sizes.words_per_block, h ** -0.5 if scale is None else scale, t,
                 k_BSKH.shape[1], v_BSKV is None, interpret, window, window_start)
    return _attention(q_BTNH, k_BSKH, v_BSKV, indices_BTM.astype(jnp.int32), sink, st=st)

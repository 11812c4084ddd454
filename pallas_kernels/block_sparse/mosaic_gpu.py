"""Mosaic GPU (Hopper) variant of the block-sparse kernel: warp-specialised, TMA-fed, wgmma.

Same semantics, tables and fused backward as ``kernel.py`` (the Triton variant); what differs is
how blocks reach the tensor cores. Each kernel instance (one query head and query tile for the
forward and dQ passes, one query head and key block for dK/dV) runs two warpgroups:

- the *producer* (warpgroup 1) walks the instance's row of the block table in global memory and
  TMA-copies every listed block (K and V tiles, the selection column of the tile for that
  block, the block's key positions / segment ids / sink flags) into a ring of ``stages``
  shared-memory slots, each guarded by a "loaded" barrier, and waits on a "consumed" barrier
  before reusing a slot;
- the *consumer* (warpgroup 0) runs the warpgroup matrix products (``plgpu.wgmma``) of the
  online softmax (forward) or of the fused backward, float32 accumulation, on whatever slot is
  ready.

Full-block flags: the table entries are ``2 * index + full``, where ``full`` says that every
token of the tile reads every key of the block (whole-tile selection, readable keys of the
tile's one segment, causal and window rules satisfied by the block's extreme positions,
``full_flags``); the consumer skips the per-token mask on those blocks (``lax.cond``), which on
a long causal or windowed selection is most of them. Other blocks use ``kernel.token_mask``,
the rule every impl shares.

The probabilities ``P`` (and ``dS``) go through shared memory as the left operand of the second
product. Float32 operands run in TF32 on the tensor cores (as XLA's default precision does on
GPU); a TF32 product needs its right operand K-major, so for float32 the passes also get
transposed copies of the operands read as right operands in their natural layout (V for the
forward, K for dQ, Q and dO for dK/dV). Head widths are zero-padded to the 128-byte swizzle
(64 lanes of bf16/f16, 32 of f32). dK/dV are computed per query head and summed over a GQA
group outside the kernel (float32 when a group has several heads), as in the Triton variant.

Shared memory decides the pipeline depth: ``smem_plan`` gives each pass the most stages (up
to ``MAX_STAGES``) that fit the H100's 227 KiB; a call where not even one fits is refused by
``mosaic_gpu_unsupported`` (the registry's ``supports`` check) with the sizes that overflow.

Verified on CPU in GPU interpret mode (``plgpu.InterpretGPUParams``, which simulates shared
memory, barriers and TMA) against ``reference.block_sparse_attention_reference`` and lowered for
an abstract H100 with ``jax.export`` in the tests; compiled runs and timings on a Hopper GPU are
``benchmarks/gpu_check.py`` / ``gpu_session.sh``'s job.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .. import common
from ..common import BIG, F32, FILL, KernelConfig
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
BLOCK_Q = 64  # one warpgroup's wgmma M
MAX_STAGES = 2
SMEM_BYTES = 227 * 1024 - 2048  # the H100's per-block shared memory, less barriers and slack
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SWIZZLE = 128


def padded_width(w: int, dtype) -> int:
    """Head width in shared memory: a power of two of at least one 128-byte swizzle row."""
    return max(common.lane_width(w), SWIZZLE // jnp.dtype(dtype).itemsize)


def _transforms(dtype):
    item = jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, SWIZZLE // item)), plgpu.SwizzleTransform(SWIZZLE))


def _tile(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=_transforms(dtype))


def _pass_bytes(kind: str, dtype, h: int, hv: int, bk: int) -> tuple[int, int]:
    """(fixed, per-stage) shared-memory bytes of one pass (widths already padded)."""
    it, bq, i4 = jnp.dtype(dtype).itemsize, BLOCK_Q, 4
    if kind == "fwd":  # q, o, P, lse, query vectors | K, V, selection column, key vectors
        return (bq * (h + hv + bk) * it + 3 * bq * i4,
                bk * (h + hv) * it + bq * i4 + 3 * bk * i4)
    if kind == "dq":  # q (dQ out), dO, dS, lse, delta, query vectors | as the forward
        return (bq * (h + hv + bk) * it + 4 * bq * i4,
                bk * (h + hv) * it + bq * i4 + 3 * bk * i4)
    # dkv: K, V (dK/dV out), key vectors, P^T/dS^T | Q, dO, lse, delta, selection column,
    # query vectors
    return (bk * (h + hv) * it + bk * bq * it + 3 * bk * i4,
            bq * (h + hv) * it + 5 * bq * i4)


def smem_plan(dtype, h: int, hv: int, block_k: int) -> dict[str, int]:
    """Stages per pass (``fwd``, ``dq``, ``dkv``) that fit ``SMEM_BYTES``; 0 where none does.
    Float32 passes also hold the transposed copies of their TF32 right operands."""
    h, hv = padded_width(h, dtype), padded_width(hv, dtype)
    plan = {}
    for kind in ("fwd", "dq", "dkv"):
        fixed, per = _pass_bytes(kind, dtype, h, hv, block_k)
        if jnp.dtype(dtype) == jnp.float32:  # TF32: dq's K^T, dkv's Q^T and dO^T
            per += {"fwd": 0, "dq": block_k * h * 4, "dkv": BLOCK_Q * (h + hv) * 4}[kind]
        plan[kind] = max(0, min(MAX_STAGES, (SMEM_BYTES - fixed) // per))
    return plan


def mosaic_gpu_unsupported(q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ, *, block_k: int,
                           interpret: bool | None = None, **kwargs) -> str | None:
    """Why this call cannot run on the Mosaic GPU kernels (None when it can)."""
    if (interpret or (interpret is None and jax.default_backend() != "gpu")) and not hasattr(
            plgpu, "InterpretGPUParams"):
        return (f"off GPU the Mosaic GPU kernels run in GPU interpret mode, which jax "
                f"{jax.__version__} lacks (plgpu.InterpretGPUParams)")
    dtypes = {jnp.dtype(x.dtype) for x in (q_BTNH, k_BSKH, v_BSKV)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in map(jnp.dtype, DTYPES):
        return (f"the Mosaic GPU kernels take q, k, v of one dtype among float32, bfloat16, "
                f"float16, got {sorted(str(d) for d in dtypes)}")
    if block_k % 64:
        return f"the Mosaic GPU kernels need block_k a multiple of 64 (wgmma tiles), got {block_k}"
    dtype = next(iter(dtypes))
    plan = smem_plan(dtype, q_BTNH.shape[-1], v_BSKV.shape[-1], block_k)
    short = [k for k, v in plan.items() if v == 0]
    if short:
        return (f"the Mosaic GPU {'/'.join(short)} pass(es) do not fit {SMEM_BYTES} bytes of shared "
                f"memory at head widths {q_BTNH.shape[-1]}/{v_BSKV.shape[-1]}, block_k={block_k}, "
                f"{dtype}")
    return None


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
    readable = (k_seg != 0).all(axis=-1)  # B J
    if rule["segments"]:
        one = (k_seg == k_seg[..., :1]).all(-1)[:, None, :] & (q_seg == q_seg[..., :1]).all(-1)[:, :, None]
        readable = readable[:, None, :] & one & (q_seg[..., :1] == k_seg[:, None, :, 0])
    else:
        readable = readable[:, None, :] & jnp.ones((b, qt, 1), bool)
    full = full & readable[:, None]
    q_pos = common.pad_axis(sel.q_pos, 0, tp, mode="edge").reshape(qt, bq)
    k_pos = common.pad_axis(sel.k_pos, 0, sp, mode="edge").reshape(j, bk)
    if rule["causal"]:
        full = full & (k_pos.max(1)[None, :] <= q_pos.min(1)[:, None])
    if rule["window"] is not None:
        full = full & (k_pos.min(1)[None, :] > q_pos.max(1)[:, None] - rule["window"])
    return full


def _coded(table: Array, flags: Array) -> Array:
    """Table entries as ``2 * index + full`` (the count stays), rows padded to 16 bytes."""
    idx = table[..., 1:]
    flag = jnp.take_along_axis(flags.astype(jnp.int32), idx, axis=-1)
    out = jnp.concatenate([table[..., :1], 2 * idx + flag], axis=-1)
    return common.pad_axis(out, out.ndim - 1, 4 * common.cdiv(out.shape[-1], 4))


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
    rule = cfg.rule
    # the key rules folded into the key vectors: padding keys have id 0; the first
    # ``num_sink_keys`` keys are sinks like the flagged ones
    k_sink = k_sink | (jnp.arange(sp) < rule["num_sink_keys"]).astype(jnp.int32)[None]
    k_pos = common.pad_axis(sel.k_pos, 0, sp, mode="edge")
    q_pos = common.pad_axis(sel.q_pos, 0, tp, mode="edge")
    kvec = jnp.stack([jnp.broadcast_to(k_pos, (b, sp)), k_seg, k_sink], 1)  # B 3 Sp
    qvec = jnp.stack([jnp.broadcast_to(q_pos, (b, tp)), q_seg], 1)  # B 2 Tp
    wd = padded_width(q_BTNH.shape[-1], q_BTNH.dtype)
    wv = padded_width(v_BSKV.shape[-1], v_BSKV.dtype)

    def major(x, length, w):
        return common.pad_axis(common.head_major(x, length), 3, w)

    return dict(q=major(q_BTNH, tp, wd), k=major(k_BSKH, sp, wd), v=major(v_BSKV, sp, wv),
                keepT=jnp.swapaxes(keep, 2, 3),  # B K J Tp
                kvec=kvec.reshape(b, 3, j, bk).transpose(0, 2, 1, 3),  # B J 3 bk
                qvec=qvec.reshape(b, 2, qt, bq).transpose(0, 2, 1, 3),  # B Q 2 bq
                fwd=_coded(fwd, flags), bwd=_coded(bwd, jnp.swapaxes(flags, -1, -2)),
                q_seg_BT=sel.q_seg, dims=(b, n, kg, n // kg, qt, j, tp, sp),
                widths=(q_BTNH.shape[-1], v_BSKV.shape[-1]))


def _params(cfg: KernelConfig):
    return dict(interpret=plgpu.InterpretGPUParams() if cfg.interpret else False,
                compiler_params=plgpu.CompilerParams(approx_math=False))


def _tf32(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.float32


# ----------------------------------------------------------------------------- in-kernel helpers

_ROWS = plgpu.Layout.WGMMA.reduce(1)  # a vector along the rows of a wgmma result
_COLS = plgpu.Layout.WGMMA.reduce(0)  # a vector along its columns


def _vec(ref, layout):
    return plgpu.load(ref, layout=layout)


def _bcast(x, shape, dim):
    return lax.broadcast_in_dim(x, shape, [dim])


def _product(a, b, shape):
    """``a @ b`` (shared-memory operands) as a fresh float32 wgmma accumulator."""
    def body(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]
    return pl.run_scoped(body, plgpu.ACC(shape, F32))


def _right(ref, tf32: bool):
    """The right operand ``X`` of ``A @ X`` held in ``ref``: ``X`` itself (rows = the
    contraction), or for TF32 its transposed copy, viewed transposed (K-major)."""
    return ref.transpose((1, 0)) if tf32 else ref


def _rows(ref, rows, tf32: bool):
    """Rows ``rows`` of a (length, width) operand, or for TF32 the columns of its transposed
    copy (width, length)."""
    return ref.at[:, rows] if tf32 else ref.at[rows]


def _store_tile(smem, gmem, x):
    smem[...] = x.astype(smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, gmem)
    plgpu.wait_smem_to_gmem(0)


def _masked(s, full, mask_fn):
    """``s`` with the per-token mask applied unless the block is full."""
    return lax.cond(full, lambda s: s, lambda s: jnp.where(mask_fn(), s, FILL), s)


def _mask(rule, keep, kvec, qvec, shape, key_dim: int):
    """The token mask of one (tile, block) pair in a wgmma layout: ``key_dim`` is the axis of
    the keys (1 for S = Q K^T, 0 for S^T). ``kvec`` / ``qvec`` are shared-memory rows (pos, seg,
    sink) / (pos, seg); ``keep`` the selection column of the tile for the block."""
    q_dim = 1 - key_dim
    k_layout = _COLS if key_dim == 1 else _ROWS
    q_layout = _ROWS if key_dim == 1 else _COLS

    def kb(r):
        return _bcast(_vec(kvec.at[r], k_layout), shape, key_dim)

    def qb(r):
        return _bcast(_vec(qvec.at[r], q_layout), shape, q_dim)

    big = jnp.iinfo(jnp.int32).max
    zeros = plgpu.layout_cast(jnp.zeros(shape, jnp.int32), plgpu.Layout.WGMMA)
    r = dict(rule, s_len=big, num_sink_keys=0, key_sinks=rule["window"] is not None)
    return token_mask(_bcast(_vec(keep, q_layout), shape, q_dim), kb(1),
                      kb(2) if r["key_sinks"] else None, qb(1) if rule["segments"] else None,
                      qb(0), kb(0), zeros, **r)


def _load_once(pairs, bars):
    """One-shot TMA copies ``(gmem, smem)`` (barrier ``bars.at[i]`` each), then wait for all."""
    for i, (src, dst) in enumerate(pairs):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[i])
    for i in range(len(pairs)):
        plgpu.barrier_wait(bars.at[i])


def _produce(row, stages: int, sources, rings, loaded, consumed):
    """The producer warpgroup: for each entry ``m`` of the table ``row`` (``[count, 2 * idx +
    full, ...]``), copy ``source(idx)`` into slot ``m % stages`` of its ring, once the consumer
    has released that slot."""
    @pl.loop(0, row[0])
    def _(m):
        slot = lax.rem(m, stages)
        idx = row[m + 1] // 2

        @pl.when(m >= stages)
        def _():
            plgpu.barrier_wait(consumed.at[slot])

        for source, ring, bar in zip(sources, rings, loaded, strict=True):
            plgpu.copy_gmem_to_smem(source(idx), ring.at[slot], bar.at[slot])


def _consume(row, stages: int, loaded, consumed, body, carry):
    """The consumer's walk: ``body(slot, full, carry)`` on each listed block once every copy
    of its slot has landed; the slot is released after."""
    def step(m, carry):
        slot = lax.rem(m, stages)
        for bar in loaded:
            plgpu.barrier_wait(bar.at[slot])
        carry = body(slot, lax.rem(row[m + 1], 2) == 1, carry)
        plgpu.barrier_arrive(consumed.at[slot])
        return carry

    return lax.fori_loop(0, row[0], step, carry)


def _ring_barriers(stages: int, count: int):
    """``count`` "loaded" barrier arrays and one "consumed" array, ``stages`` each."""
    return ([plgpu.Barrier(num_arrivals=1, num_barriers=stages) for _ in range(count)],
            plgpu.Barrier(num_arrivals=1, num_barriers=stages))


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, F32), plgpu.Layout.WGMMA)


LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(table, q_ref, k_ref, v_ref, keep_ref, kvec_ref, qvec_ref, o_ref, lse_ref,
                q_s, o_s, p_s, lse_s, qvec_s, k_s, v_s, keep_s, kvec_s, once, loaded, consumed,
                *, cfg: KernelConfig, g: int, stages: int, tf32: bool):
    bi, ni, qi = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("q")
    ki = ni // g
    bq, bk = cfg.block_q, cfg.block_k
    hv = o_s.shape[-1]
    row = table.at[bi, ki, qi]
    tile = pl.ds(qi * bq, bq)

    @pl.when(lax.axis_index("wg") == 1)
    def _producer():
        _produce(row, stages, [
            lambda jb: k_ref.at[bi, ki, pl.ds(jb * bk, bk)],
            lambda jb: _rows(v_ref.at[bi, ki], pl.ds(jb * bk, bk), tf32),
            lambda jb: keep_ref.at[bi, ki, jb, tile],
            lambda jb: kvec_ref.at[bi, jb],
        ], [k_s, v_s, keep_s, kvec_s], loaded, consumed)

    @pl.when(lax.axis_index("wg") == 0)
    def _consumer():
        _load_once([(q_ref.at[bi, ni, tile], q_s), (qvec_ref.at[bi, qi], qvec_s)], once)

        def visit(slot, full, carry):
            acc, m_i, l_i = carry
            s = _product(q_s, k_s.at[slot].transpose((1, 0)), (bq, bk)) * (cfg.scale * LOG2E)
            s = _masked(s, full, lambda: _mask(cfg.rule, keep_s.at[slot], kvec_s.at[slot], qvec_s,
                                               (bq, bk), key_dim=1))
            m_new = jnp.maximum(m_i, s.max(axis=1))
            corr = jnp.exp2(m_i - m_new)
            p = jnp.where(s == FILL, 0.0, jnp.exp2(s - _bcast(m_new, (bq, bk), 0)))
            p_s[...] = p.astype(p_s.dtype)
            plgpu.commit_smem()
            pv = _product(p_s, _right(v_s.at[slot], tf32), (bq, hv))
            return acc * _bcast(corr, (bq, hv), 0) + pv, m_new, l_i * corr + p.sum(axis=1)

        init = (_zeros((bq, hv)), plgpu.layout_cast(jnp.full((bq,), FILL, F32), _ROWS),
                plgpu.layout_cast(jnp.zeros((bq,), F32), _ROWS))
        acc, m_i, l_i = _consume(row, stages, loaded, consumed, visit, init)
        safe = jnp.where(l_i > 0, l_i, 1.0)
        lse_s[...] = jnp.where(l_i > 0, (m_i + jnp.log2(safe)) / LOG2E, BIG)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_s, lse_ref.at[bi, ni, tile])
        _store_tile(o_s, o_ref.at[bi, ni, tile], acc / _bcast(safe, (bq, hv), 0))


def _forward(q_BTNH, k_BSKH, v_BSKV, sink_N, selection, cfg: KernelConfig):
    p = _prepare(q_BTNH, k_BSKH, v_BSKV, selection, cfg)
    b, n, kg, g, qt, j, tp, sp = p["dims"]
    bq, bk = cfg.block_q, cfg.block_k
    dt = p["q"].dtype
    wd, wv = p["q"].shape[-1], p["v"].shape[-1]
    tf32 = _tf32(dt)
    st = smem_plan(dt, wd, wv, bk)["fwd"]
    scratch = [
        _tile((bq, wd), dt), _tile((bq, wv), dt), _tile((bq, bk), dt),
        plgpu.SMEM((bq,), F32), plgpu.SMEM((2, bq), jnp.int32),
        _tile((st, bk, wd), dt), _tile((st, wv, bk) if tf32 else (st, bk, wv), dt),
        plgpu.SMEM((st, bq), jnp.int32), plgpu.SMEM((st, 3, bk), jnp.int32),
        plgpu.Barrier(num_arrivals=1, num_barriers=2), *_ring_barriers(st, 4),
    ]
    o, lse = plgpu.kernel(
        functools.partial(_fwd_kernel, cfg=cfg, g=g, stages=st, tf32=tf32),
        out_type=[jax.ShapeDtypeStruct((b, n, tp, wv), dt), jax.ShapeDtypeStruct((b, n, tp), F32)],
        scratch_types=scratch, grid=(b, n, qt), grid_names=("b", "n", "q"), num_threads=2,
        thread_name="wg", **_params(cfg),
    )(p["fwd"], p["q"], p["k"], _t(p["v"], tf32), p["keepT"], p["kvec"], p["qvec"])
    if sink_N is not None:  # the sink joins the denominator only: rescale by the new lse
        sink = sink_N.astype(F32)[None, :, None]
        lse_k = jnp.where(lse == BIG, -jnp.inf, lse)
        new = jnp.logaddexp(lse_k, sink)
        o = (o.astype(F32) * jnp.exp(lse_k - new)[..., None]).astype(dt)
        lse = new
    lse_BTN = common.lse_out(lse.transpose(0, 2, 1)[:, : cfg.t])
    out = o.transpose(0, 2, 1, 3)[:, : cfg.t, :, : p["widths"][1]]
    return (out, lse_BTN), (p, o, lse)


def _t(x, tf32: bool):
    """A head-major operand read as a TF32 right operand: its (width, length) transpose."""
    return jnp.swapaxes(x, 2, 3) if tf32 else x


# ----------------------------------------------------------------------------- backward


def _dq_kernel(table, q_ref, do_ref, lse_ref, delta_ref, qvec_ref, k_ref, v_ref, keep_ref,
               kvec_ref, *refs, cfg: KernelConfig, g: int, stages: int, tf32: bool):
    kt_ref, refs = (refs[0], refs[1:]) if tf32 else (None, refs)
    dq_ref, q_s, do_s, ds_s, lse_s, delta_s, qvec_s, rings, once, loaded, consumed = refs
    k_s, v_s, keep_s, kvec_s, *kt_s = rings
    bi, ni, qi = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("q")
    ki = ni // g
    bq, bk = cfg.block_q, cfg.block_k
    row = table.at[bi, ki, qi]
    tile = pl.ds(qi * bq, bq)

    @pl.when(lax.axis_index("wg") == 1)
    def _producer():
        sources = [lambda jb: k_ref.at[bi, ki, pl.ds(jb * bk, bk)],
                   lambda jb: v_ref.at[bi, ki, pl.ds(jb * bk, bk)],
                   lambda jb: keep_ref.at[bi, ki, jb, tile],
                   lambda jb: kvec_ref.at[bi, jb]]
        if tf32:
            sources.append(lambda jb: kt_ref.at[bi, ki, :, pl.ds(jb * bk, bk)])
        _produce(row, stages, sources, rings, loaded, consumed)

    @pl.when(lax.axis_index("wg") == 0)
    def _consumer():
        _load_once([(q_ref.at[bi, ni, tile], q_s), (do_ref.at[bi, ni, tile], do_s),
                    (lse_ref.at[bi, ni, tile], lse_s), (delta_ref.at[bi, ni, tile], delta_s),
                    (qvec_ref.at[bi, qi], qvec_s)], once)
        shape = (bq, bk)
        lse = _bcast(_vec(lse_s, _ROWS) * LOG2E, shape, 0)
        delta = _bcast(_vec(delta_s, _ROWS), shape, 0)

        def visit(slot, full, dq):
            s = _product(q_s, k_s.at[slot].transpose((1, 0)), shape) * (cfg.scale * LOG2E)
            s = _masked(s, full, lambda: _mask(cfg.rule, keep_s.at[slot], kvec_s.at[slot], qvec_s,
                                               shape, key_dim=1))
            p = jnp.exp2(s - lse)
            dp = _product(do_s, v_s.at[slot].transpose((1, 0)), shape)
            ds_s[...] = (p * (dp - delta)).astype(ds_s.dtype)
            plgpu.commit_smem()
            k_right = _right(kt_s[0].at[slot], True) if tf32 else k_s.at[slot]
            return dq + _product(ds_s, k_right, (bq, q_s.shape[-1]))

        dq = _consume(row, stages, loaded, consumed, visit, _zeros((bq, q_s.shape[-1])))
        _store_tile(q_s, dq_ref.at[bi, ni, tile], dq * cfg.scale)


def _dkv_kernel(table, k_ref, v_ref, kvec_ref, q_ref, do_ref, lse_ref, delta_ref, keep_ref,
                qvec_ref, *refs, cfg: KernelConfig, g: int, stages: int, tf32: bool):
    (qt_ref, dot_ref), refs = (refs[:2], refs[2:]) if tf32 else ((None, None), refs)
    dk_ref, dv_ref, k_s, v_s, kvec_s, pt_s, rings, once, loaded, consumed = refs
    q_s, do_s, lse_s, delta_s, keep_s, qvec_s, *t_s = rings
    bi, ni, jb = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("j")
    ki = ni // g
    bq, bk = cfg.block_q, cfg.block_k
    row = table.at[bi, ki, jb]
    keys = pl.ds(jb * bk, bk)

    @pl.when(lax.axis_index("wg") == 1)
    def _producer():
        sources = [lambda qi: q_ref.at[bi, ni, pl.ds(qi * bq, bq)],
                   lambda qi: do_ref.at[bi, ni, pl.ds(qi * bq, bq)],
                   lambda qi: lse_ref.at[bi, ni, pl.ds(qi * bq, bq)],
                   lambda qi: delta_ref.at[bi, ni, pl.ds(qi * bq, bq)],
                   lambda qi: keep_ref.at[bi, ki, jb, pl.ds(qi * bq, bq)],
                   lambda qi: qvec_ref.at[bi, qi]]
        if tf32:
            sources += [lambda qi: qt_ref.at[bi, ni, :, pl.ds(qi * bq, bq)],
                        lambda qi: dot_ref.at[bi, ni, :, pl.ds(qi * bq, bq)]]
        _produce(row, stages, sources, rings, loaded, consumed)

    @pl.when(lax.axis_index("wg") == 0)
    def _consumer():
        _load_once([(k_ref.at[bi, ki, keys], k_s), (v_ref.at[bi, ki, keys], v_s),
                    (kvec_ref.at[bi, jb], kvec_s)], once)
        shape = (bk, bq)
        wd, wv = k_s.shape[-1], v_s.shape[-1]

        def visit(slot, full, carry):
            dk, dv = carry
            st = _product(k_s, q_s.at[slot].transpose((1, 0)), shape) * (cfg.scale * LOG2E)
            st = _masked(st, full, lambda: _mask(cfg.rule, keep_s.at[slot], kvec_s, qvec_s.at[slot],
                                                 shape, key_dim=0))
            pt = jnp.exp2(st - _bcast(_vec(lse_s.at[slot], _COLS) * LOG2E, shape, 1))
            pt_s[...] = pt.astype(pt_s.dtype)
            plgpu.commit_smem()
            do_right = _right(t_s[1].at[slot], True) if tf32 else do_s.at[slot]
            dv = dv + _product(pt_s, do_right, (bk, wv))
            dpt = _product(v_s, do_s.at[slot].transpose((1, 0)), shape)
            pt_s[...] = (pt * (dpt - _bcast(_vec(delta_s.at[slot], _COLS), shape, 1))
                         ).astype(pt_s.dtype)
            plgpu.commit_smem()
            q_right = _right(t_s[0].at[slot], True) if tf32 else q_s.at[slot]
            return dk + _product(pt_s, q_right, (bk, wd)), dv

        dk, dv = _consume(row, stages, loaded, consumed, visit, (_zeros((bk, wd)), _zeros((bk, wv))))
        dk = dk * cfg.scale
        if dk_ref.dtype == k_s.dtype:  # staged through the K/V tiles, which are read no more
            k_s[...] = dk.astype(k_s.dtype)
            v_s[...] = dv.astype(v_s.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_s, dk_ref.at[bi, ni, keys])
            plgpu.copy_smem_to_gmem(v_s, dv_ref.at[bi, ni, keys])
            plgpu.wait_smem_to_gmem(0)
        else:  # float32 per-head gradients of a GQA group: stored from registers
            dk_ref.at[bi, ni, keys][...] = dk
            dv_ref.at[bi, ni, keys][...] = dv


def _backward(res, cotangents, sink_N, cfg: KernelConfig):
    p, o, lse = res
    do_BTNV, dlse_BTN = cotangents
    b, n, kg, g, qt, j, tp, sp = p["dims"]
    bq, bk = cfg.block_q, cfg.block_k
    dt = p["q"].dtype
    wd, wv = p["q"].shape[-1], p["v"].shape[-1]
    tf32 = _tf32(dt)
    plan = smem_plan(dt, wd, wv, bk)
    do = common.pad_axis(common.head_major(zero_padding_rows(do_BTNV, p["q_seg_BT"], cfg), tp),
                         3, wv).astype(dt)
    dlse = common.pad_axis(dlse_BTN, 1, tp).transpose(0, 2, 1)
    delta = common.row_delta(do, o, lse=lse, dlse=dlse)  # B N Tp
    grid_kw = dict(num_threads=2, thread_name="wg", **_params(cfg))
    ring_k = [_tile((st_q := plan["dq"], bk, wd), dt), _tile((st_q, bk, wv), dt),
              plgpu.SMEM((st_q, bq), jnp.int32), plgpu.SMEM((st_q, 3, bk), jnp.int32)]
    if tf32:
        ring_k.append(_tile((st_q, wd, bk), dt))
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, cfg=cfg, g=g, stages=st_q, tf32=tf32),
        out_type=jax.ShapeDtypeStruct(p["q"].shape, dt),
        scratch_types=[
            _tile((bq, wd), dt), _tile((bq, wv), dt), _tile((bq, bk), dt),
            plgpu.SMEM((bq,), F32), plgpu.SMEM((bq,), F32), plgpu.SMEM((2, bq), jnp.int32),
            ring_k, plgpu.Barrier(num_arrivals=1, num_barriers=5),
            *_ring_barriers(st_q, len(ring_k))],
        grid=(b, n, qt), grid_names=("b", "n", "q"), **grid_kw,
    )(p["fwd"], p["q"], do, lse, delta, p["qvec"], p["k"], p["v"], p["keepT"], p["kvec"],
      *([_t(p["k"], True)] if tf32 else []))
    if cfg.interpret:  # the interpreter runs one kernel at a time
        dq, do = lax.optimization_barrier((dq, do))
    st = plan["dkv"]
    ring_q = [_tile((st, bq, wd), dt), _tile((st, bq, wv), dt), plgpu.SMEM((st, bq), F32),
              plgpu.SMEM((st, bq), F32), plgpu.SMEM((st, bq), jnp.int32),
              plgpu.SMEM((st, 2, bq), jnp.int32)]
    if tf32:
        ring_q += [_tile((st, wd, bq), dt), _tile((st, wv, bq), dt)]
    gdt = common.head_grad_dtype(g, dt)
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, cfg=cfg, g=g, stages=st, tf32=tf32),
        out_type=[jax.ShapeDtypeStruct((b, n, sp, wd), gdt),
                  jax.ShapeDtypeStruct((b, n, sp, wv), gdt)],
        scratch_types=[
            _tile((bk, wd), dt), _tile((bk, wv), dt), plgpu.SMEM((3, bk), jnp.int32),
            _tile((bk, bq), dt), ring_q,
            plgpu.Barrier(num_arrivals=1, num_barriers=3), *_ring_barriers(st, len(ring_q))],
        grid=(b, n, j), grid_names=("b", "n", "j"), **grid_kw,
    )(p["bwd"], p["k"], p["v"], p["kvec"], p["q"], do, lse, delta, p["keepT"], p["qvec"],
      *([_t(p["q"], True), _t(do, True)] if tf32 else []))
    dk, dv = (common.group_sum(a, kg, p["k"].dtype) for a in (dk, dv))
    dsink = None if sink_N is None else common.sink_grad(sink_N, lse, delta, cfg.t)
    h, hv = p["widths"]
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

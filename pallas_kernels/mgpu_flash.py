"""Warp-specialised flash-attention passes on Mosaic GPU (Hopper): forward, dQ and dK/dV over
on-device tables, shared by the block-sparse and the token-sparse kernels (as ``flash.py``'s
tile loops are shared by their Triton kernels).

Each kernel instance runs a producer warpgroup and one or two consumer warpgroups. An instance
is one or two query heads of a GQA group and one tile of ``BLOCK_Q`` queries (forward, dQ:
``heads_per_instance``), or one query head and one key block (dK/dV).

- The *producer* (the last warpgroup) walks the instance's table row in global memory. For every
  listed block (or query tile, for dK/dV) it TMA-copies the operand tiles and the mask operands
  of that step into a ring of ``stages`` shared-memory slots, each guarded by "loaded" barriers,
  and waits on the slot's "consumed" barrier (every consumer arrives) before reusing it.
- Each *consumer* runs the warpgroup matrix products (``plgpu.wgmma``, float32 accumulation) of
  its head on whatever slot is ready.

Table rows are ``[count, 2 * index + full, ...]``. ``full`` says every token of the tile reads
every key of the block; the consumer then skips the per-token mask (``lax.cond``), which is most
blocks of a long causal or windowed selection. Callers compute the flags conservatively.

The mask itself is the caller's: a ``MaskSpec`` names the mask operands (``Source``: per query
tile, per key block, or per (tile, block) pair; each a TMA copy of a slice of a global array)
and a function that turns their shared-memory copies into the (tile, block) membership in the
wgmma register layout.

Layout and precision: operands head-major (B, heads, length, width), widths zero-padded to one
128-byte swizzle row. The probabilities P (and dS) go through shared memory as the left operand
of the second product. Float32 runs in TF32 on the tensor cores; a TF32 product needs its right
operand K-major, so float32 passes also get transposed copies of the operands that are right
operands in their natural layout (V for the forward, K for dQ, Q and dO for dK/dV).
``smem_plan`` gives each pass the most stages (up to ``MAX_STAGES``) that fit the H100's shared
memory; a pass where none fits is refused by the callers' ``supports`` checks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import common
from .common import BIG, F32, FILL, KernelConfig

Array = jax.Array
BLOCK_Q = 64  # one warpgroup's wgmma M
MAX_STAGES = 2
SMEM_BYTES = 227 * 1024 - 2048  # the H100's per-block shared memory, less barriers and slack
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SWIZZLE = 128
LOG2E = math.log2(math.e)
_ROWS = plgpu.Layout.WGMMA.reduce(1)  # a vector along the rows of a wgmma result
_COLS = plgpu.Layout.WGMMA.reduce(0)  # a vector along its columns


@dataclasses.dataclass(frozen=True)
class Source:
    """A mask operand: ``at(ref, b, k, i, j)`` is the slice of its global array one step copies
    (batch ``b``, kv group ``k``, query tile ``i``, key block ``j``), of ``shape`` and ``dtype``
    in shared memory. ``kind``: ``"tile"`` (depends on the query tile only), ``"block"`` (on the
    key block only) or ``"pair"``."""

    kind: str
    shape: tuple[int, ...]
    dtype: object
    at: Callable


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """How the kernels read a family's membership rule. ``sources`` in the order their arrays
    are passed; ``mask(refs, shape, key_dim, i, j)`` -> bool array of ``shape`` in the wgmma
    layout, keys along ``key_dim`` (1 for S = Q K^T, 0 for S^T), from ``refs`` (kind -> list of
    this step's shared-memory refs, in ``sources`` order); ``row(table, b, k, x)`` the table
    row of tile or block ``x``."""

    sources: tuple[Source, ...]
    mask: Callable
    row: Callable

    def of(self, kind: str) -> list[int]:
        return [i for i, s in enumerate(self.sources) if s.kind == kind]


def padded_width(w: int, dtype) -> int:
    """Head width in shared memory: a power of two of at least one 128-byte swizzle row."""
    return max(common.lane_width(w), SWIZZLE // jnp.dtype(dtype).itemsize)


def tf32(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.float32


def _nbytes(sources) -> int:
    return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in sources)


def smem_plan(dtype, h: int, hv: int, block_k: int, sources: tuple[Source, ...],
              heads: int = 1) -> dict[str, int]:
    """Stages per pass (``fwd``, ``dq``, ``dkv``) that fit ``SMEM_BYTES``; 0 where none does.
    ``h``, ``hv``: head widths before padding; ``sources``: the mask operands
    (``MaskSpec.sources``); ``heads``: query heads per forward / dQ instance (each with its own
    tiles, sharing the K/V stages)."""
    h, hv = padded_width(h, dtype), padded_width(hv, dtype)
    it, bq, bk, i4 = jnp.dtype(dtype).itemsize, BLOCK_Q, block_k, 4
    src = {kind: _nbytes(s for s in sources if s.kind == kind)
           for kind in ("tile", "block", "pair")}
    t32 = tf32(dtype)
    # (fixed, per stage): fwd q, o, P, lse | K, V; dq q (dQ out), dO, dS, lse, delta | K, V, K^T;
    # dkv K, V (dK/dV out), P^T / dS^T | Q, dO, lse, delta, Q^T, dO^T
    kv = bk * (h + hv) * it
    o_width = 0 if hv == h else hv  # the output reuses the query tile when widths agree
    passes = {
        "fwd": (heads * (bq * (h + o_width + bk) * it + bq * i4 + src["tile"]),
                kv + src["pair"] + src["block"]),
        "dq": (heads * (bq * (h + hv + bk) * it + 2 * bq * i4 + src["tile"]),
               kv + (bk * h * it if t32 else 0) + src["pair"] + src["block"]),
        "dkv": (kv + bk * bq * it + src["block"],
                bq * (h + hv) * it * (2 if t32 else 1) + 2 * bq * i4 + src["pair"] + src["tile"]),
    }
    return {k: max(0, min(MAX_STAGES, (SMEM_BYTES - fixed) // per))
            for k, (fixed, per) in passes.items()}


def unsupported(q, k, v, block_k: int, sources: tuple[Source, ...],
                interpret: bool | None) -> str | None:
    """Why a call cannot run on these kernels (None when it can); ``sources``: the call's mask
    operands (``MaskSpec.sources``)."""
    if (interpret or (interpret is None and jax.default_backend() != "gpu")) and not hasattr(
            plgpu, "InterpretGPUParams"):
        return (f"off GPU the Mosaic GPU kernels run in GPU interpret mode, which jax "
                f"{jax.__version__} lacks (plgpu.InterpretGPUParams)")
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in map(jnp.dtype, DTYPES):
        return (f"the Mosaic GPU kernels take q, k, v of one dtype among float32, bfloat16, "
                f"float16, got {sorted(str(d) for d in dtypes)}")
    if block_k % 64:
        return f"the Mosaic GPU kernels need key blocks of a multiple of 64 keys, got {block_k}"
    dtype = next(iter(dtypes))
    plan = smem_plan(dtype, q.shape[-1], v.shape[-1], block_k, sources)
    if short := [name for name, n in plan.items() if n == 0]:
        return (f"the Mosaic GPU {'/'.join(short)} pass(es) do not fit {SMEM_BYTES} bytes of "
                f"shared memory at head widths {q.shape[-1]}/{v.shape[-1]}, "
                f"block_k={block_k}, {dtype}")
    return None


def coded(table: Array, flags: Array) -> Array:
    """Table entries as ``2 * index + full`` (``flags`` (..., rows, X) bool, indexed by the
    entries; the count stays), rows padded to whole 16 bytes."""
    idx = table[..., 1:]
    flag = jnp.take_along_axis(flags.astype(jnp.int32), idx, axis=-1)
    out = jnp.concatenate([table[..., :1], 2 * idx + flag], axis=-1)
    return common.pad_axis(out, out.ndim - 1, 4 * common.cdiv(out.shape[-1], 4))


def head_major(x_BSKH: Array, length: int, dtype) -> Array:
    """(B, S, K, H) -> (B, K, length, padded width)."""
    x = common.head_major(x_BSKH, length)
    return common.pad_axis(x, 3, padded_width(x.shape[-1], dtype))


def _t(x, on: bool):
    """A head-major operand read as a TF32 right operand: its (width, length) transpose."""
    return jnp.swapaxes(x, 2, 3) if on else x


def params(cfg: KernelConfig) -> dict:
    if cfg.interpret:
        _warn_small_pool()
    return dict(num_threads=2, thread_name="wg",
                interpret=plgpu.InterpretGPUParams() if cfg.interpret else False,
                compiler_params=plgpu.CompilerParams(approx_math=False))


def _warn_small_pool() -> None:
    """GPU interpret mode runs every simulated warpgroup as its own XLA program whose barrier
    callbacks block threads of XLA:CPU's client pool, one thread per core unless ``PJRT_NPROC``
    says otherwise; with few threads the warpgroup a barrier waits for may never get one, and
    the call hangs (seen on 2 cores: ``tests/mgpu_cases.py``)."""
    size = os.environ.get("PJRT_NPROC") or os.environ.get("NPROC")
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    threads = int(size) if size and size.isdigit() else cores
    if threads < 6:
        warnings.warn(f"GPU interpret mode with XLA:CPU's pool of {threads} threads can deadlock "
                      "(simulated warpgroups block pool threads at barriers); set PJRT_NPROC=8 in "
                      "the environment before JAX starts", RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------- in-kernel pieces


def vec(ref, layout):
    return plgpu.load(ref, layout=layout)


def bcast(x, shape, dim):
    return lax.broadcast_in_dim(x, shape, [dim])


def along(ref, shape, key_dim: int, keys: bool):
    """A shared-memory vector broadcast over a wgmma-shaped array: a key vector along the keys'
    axis ``key_dim``, a query vector along the other."""
    dim = key_dim if keys else 1 - key_dim
    return bcast(vec(ref, _COLS if dim == 1 else _ROWS), shape, dim)


def iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _tile(shape, dtype):
    item = jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, SWIZZLE // item)),
                                                plgpu.SwizzleTransform(SWIZZLE)))


def _product(a, b, shape):
    """``a @ b`` (shared-memory operands) as a fresh float32 wgmma accumulator."""
    def body(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]
    return pl.run_scoped(body, plgpu.ACC(shape, F32))


def _right(ref, t32: bool):
    """The right operand ``X`` of ``A @ X`` held in ``ref``: ``X`` itself, or for TF32 its
    transposed copy viewed transposed (K-major)."""
    return ref.transpose((1, 0)) if t32 else ref


def _rows(ref, rows, t32: bool):
    """Rows of a (length, width) operand, or for TF32 the columns of its (width, length)
    transposed copy."""
    return ref.at[:, rows] if t32 else ref.at[rows]


def _masked(s, full, mask_fn):
    """``s`` with the per-token mask applied unless the block is full."""
    return lax.cond(full, lambda s: s, lambda s: jnp.where(mask_fn(), s, FILL), s)


def _load_once(pairs, bars, base=0):
    """One-shot TMA copies ``(gmem, smem)`` (barrier ``bars.at[base + i]`` each), then wait for
    all."""
    for i, (src, dst) in enumerate(pairs):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[base + i])
    for i in range(len(pairs)):
        plgpu.barrier_wait(bars.at[base + i])


def _produce(row, stages: int, sources, rings, loaded, consumed):
    """The producer warpgroup: for each entry ``m`` of the table ``row``, copy
    ``source(idx)`` into slot ``m % stages`` of its ring once the consumer released it."""
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
    """The consumer's walk: ``body(slot, idx, full, carry)`` on each listed entry once every
    copy of its slot has landed; the slot is released after."""
    def step(m, carry):
        slot = lax.rem(m, stages)
        for bar in loaded:
            plgpu.barrier_wait(bar.at[slot])
        code = row[m + 1]
        carry = body(slot, code // 2, lax.rem(code, 2) == 1, carry)
        plgpu.barrier_arrive(consumed.at[slot])
        return carry

    return lax.fori_loop(0, row[0], step, carry)


def _rings(stages: int, shapes, consumers: int = 1):
    """Shared-memory rings (``(shape, dtype, tiled)`` each) and their barriers: one "loaded"
    array per ring and one "consumed" array, which every consumer warpgroup arrives on."""
    rings = [_tile((stages, *s), d) if tiled else plgpu.SMEM((stages, *s), d)
             for s, d, tiled in shapes]
    return [rings, [plgpu.Barrier(num_arrivals=1, num_barriers=stages) for _ in shapes],
            plgpu.Barrier(num_arrivals=consumers, num_barriers=stages)]


def _step_types(spec: MaskSpec, idx):
    return [(spec.sources[i].shape, spec.sources[i].dtype, False) for i in idx]


def _fixed(spec: MaskSpec, idx, heads: int | None = None):
    """Shared memory for the mask operands ``idx`` loaded once, one copy per consumer head
    (a leading ``heads`` axis) when ``heads`` is given."""
    lead = () if heads is None else (heads,)
    return [plgpu.SMEM((*lead, *spec.sources[i].shape), spec.sources[i].dtype) for i in idx]


def _mask_sources(spec: MaskSpec, src_refs, idx, b, k, *, tile=None, block=None):
    """Producer sources (step index -> global slice) of the mask operands ``idx``: the step
    walks key blocks for a fixed query ``tile``, or query tiles for a fixed key ``block``."""
    def source(i):
        at, ref = spec.sources[i].at, src_refs[i]
        if block is None:
            return lambda j: at(ref, b, k, tile, j)
        return lambda t: at(ref, b, k, t, block)
    return [source(i) for i in idx]


def heads_per_instance(g: int, plan) -> int:
    """Query heads of one GQA group that a forward / dQ instance computes together, sharing
    each K/V load: two (two consumer warpgroups, as FlashAttention-3 runs) when the group has
    an even size and shared memory keeps the pipeline as deep as with one, else one.
    ``plan(heads)`` is the pass's stage count."""
    return 2 if g % 2 == 0 and plan(2) >= plan(1) > 0 else 1


def _ordered(spec, fixed_idx, fixed_refs, step_idx, step_refs, slot):
    """kind -> refs of this step, in ``sources`` order: the fixed ones as loaded once, the
    per-step ones at ``slot`` of their rings."""
    by_index = dict(zip(fixed_idx, fixed_refs, strict=True))
    by_index.update((i, r.at[slot]) for i, r in zip(step_idx, step_refs, strict=True))
    out = {"tile": [], "block": [], "pair": []}
    for i, s in enumerate(spec.sources):
        out[s.kind].append(by_index[i])
    return out


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, F32), plgpu.Layout.WGMMA)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(table, q_ref, k_ref, v_ref, *refs, cfg: KernelConfig, spec: MaskSpec, g: int,
                hg: int, stages: int, t32: bool):
    n_src = len(spec.sources)
    src_refs = refs[:n_src]
    o_ref, lse_ref, qo_s, p_s, lse_s, tile_s, rings, loaded, consumed, once = refs[n_src:]
    k_s, v_s, *step_s = rings
    bi, nb, qi = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("q")
    wg = lax.axis_index("wg")
    ki = nb * hg // g
    bq, bk, hv = cfg.block_q, cfg.block_k, o_ref.shape[-1]
    row = spec.row(table, bi, ki, qi)
    tile = pl.ds(qi * bq, bq)
    tiles, per_step = spec.of("tile"), spec.of("pair") + spec.of("block")

    @pl.when(wg == hg)
    def _producer():
        _produce(row, stages, [
            lambda jb: k_ref.at[bi, ki, pl.ds(jb * bk, bk)],
            lambda jb: _rows(v_ref.at[bi, ki], pl.ds(jb * bk, bk), t32),
            *_mask_sources(spec, src_refs, per_step, bi, ki, tile=qi),
        ], rings, loaded, consumed)

    @pl.when(wg < hg)
    def _consumer():  # query head nb * hg + wg
        ni = nb * hg + wg
        q_s, o_s, p_c, lse_c = qo_s[0].at[wg], qo_s[-1].at[wg], p_s.at[wg], lse_s.at[wg]
        tile_c = [r.at[wg] for r in tile_s]
        _load_once([(q_ref.at[bi, ni, tile], q_s)]
                   + [(spec.sources[i].at(src_refs[i], bi, ki, qi, 0), r)
                      for i, r in zip(tiles, tile_c, strict=True)], once, wg * (1 + len(tiles)))
        shape = (bq, bk)

        def visit(slot, jb, full, carry):
            acc, m_i, l_i = carry
            s = _product(q_s, k_s.at[slot].transpose((1, 0)), shape) * (cfg.scale * LOG2E)
            mrefs = _ordered(spec, tiles, tile_c, per_step, step_s, slot)
            s = _masked(s, full, lambda: spec.mask(mrefs, shape, 1, qi, jb))
            m_new = jnp.maximum(m_i, s.max(axis=1))
            corr = jnp.exp2(m_i - m_new)
            p = jnp.where(s == FILL, 0.0, jnp.exp2(s - bcast(m_new, shape, 0)))
            p_c[...] = p.astype(p_c.dtype)
            plgpu.commit_smem()
            pv = _product(p_c, _right(v_s.at[slot], t32), (bq, hv))
            return acc * bcast(corr, (bq, hv), 0) + pv, m_new, l_i * corr + p.sum(axis=1)

        init = (_zeros((bq, hv)), plgpu.layout_cast(jnp.full((bq,), FILL, F32), _ROWS),
                plgpu.layout_cast(jnp.zeros((bq,), F32), _ROWS))
        acc, m_i, l_i = _consume(row, stages, loaded, consumed, visit, init)
        safe = jnp.where(l_i > 0, l_i, 1.0)
        lse_c[...] = jnp.where(l_i > 0, (m_i + jnp.log2(safe)) / LOG2E, BIG)
        o_s[...] = (acc / bcast(safe, (bq, hv), 0)).astype(o_s.dtype)  # may be q's tile
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_c, lse_ref.at[bi, ni, tile])
        plgpu.copy_smem_to_gmem(o_s, o_ref.at[bi, ni, tile])
        plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, table, srcs, cfg: KernelConfig, spec: MaskSpec, *, g: int, sink_N=None):
    """(o (B, N, Tp, Wv), lse (B, N, Tp)) from head-major padded q (B, N, Tp, W), k, v
    (B, K, Sp, W / Wv), the coded forward table and the mask-operand arrays ``srcs``
    (``spec.sources`` order). ``sink_N`` joins the softmax denominator (applied to the kernel's
    output and logsumexp); rows that read nothing get lse ``BIG`` (no sink) and output 0."""
    b, n, tp, wd = q.shape
    wv, bq, bk, dt = v.shape[-1], cfg.block_q, cfg.block_k, q.dtype
    t32 = tf32(dt)
    hg = heads_per_instance(g, lambda h: smem_plan(dt, wd, wv, bk, spec.sources, h)["fwd"])
    st = smem_plan(dt, wd, wv, bk, spec.sources, hg)["fwd"]
    tiles, per_step = spec.of("tile"), spec.of("pair") + spec.of("block")
    qo = [_tile((hg, bq, wd), dt)] + ([] if wv == wd else [_tile((hg, bq, wv), dt)])
    scratch = [qo, _tile((hg, bq, bk), dt), plgpu.SMEM((hg, bq), F32), _fixed(spec, tiles, hg),
               *_rings(st, [((bk, wd), dt, True), ((wv, bk) if t32 else (bk, wv), dt, True),
                            *_step_types(spec, per_step)], hg),
               plgpu.Barrier(num_arrivals=1, num_barriers=hg * (1 + len(tiles)))]
    kw = params(cfg) | dict(num_threads=hg + 1)
    o, lse = plgpu.kernel(
        functools.partial(_fwd_kernel, cfg=cfg, spec=spec, g=g, hg=hg, stages=st, t32=t32),
        out_type=[jax.ShapeDtypeStruct((b, n, tp, wv), dt), jax.ShapeDtypeStruct((b, n, tp), F32)],
        scratch_types=scratch, grid=(b, n // hg, tp // bq), grid_names=("b", "n", "q"), **kw,
    )(table, q, k, _t(v, t32), *srcs)
    if sink_N is not None:  # the sink joins the denominator only: rescale by the new lse
        lse_k = jnp.where(lse == BIG, -jnp.inf, lse)
        new = jnp.logaddexp(lse_k, sink_N.astype(F32)[None, :, None])
        o = (o.astype(F32) * jnp.exp(lse_k - new)[..., None]).astype(dt)
        lse = new
    return o, lse


# ----------------------------------------------------------------------------- backward


def _dq_kernel(table, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, *refs, cfg: KernelConfig,
               spec: MaskSpec, g: int, hg: int, stages: int, t32: bool):
    kt_ref, refs = (refs[0], refs[1:]) if t32 else (None, refs)
    n_src = len(spec.sources)
    src_refs = refs[:n_src]
    dq_ref, q_s, do_s, ds_s, lse_s, delta_s, tile_s, rings, loaded, consumed, once = refs[n_src:]
    k_s, v_s, *step_s = rings
    kt_s, step_s = (step_s[-1], step_s[:-1]) if t32 else (None, step_s)
    bi, nb, qi = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("q")
    wg = lax.axis_index("wg")
    ki = nb * hg // g
    bq, bk, wd = cfg.block_q, cfg.block_k, q_s.shape[-1]
    row = spec.row(table, bi, ki, qi)
    tile = pl.ds(qi * bq, bq)
    tiles, per_step = spec.of("tile"), spec.of("pair") + spec.of("block")

    @pl.when(wg == hg)
    def _producer():
        sources = [lambda jb: k_ref.at[bi, ki, pl.ds(jb * bk, bk)],
                   lambda jb: v_ref.at[bi, ki, pl.ds(jb * bk, bk)],
                   *_mask_sources(spec, src_refs, per_step, bi, ki, tile=qi)]
        if t32:
            sources.append(lambda jb: kt_ref.at[bi, ki, :, pl.ds(jb * bk, bk)])
        _produce(row, stages, sources, rings, loaded, consumed)

    @pl.when(wg < hg)
    def _consumer():  # query head nb * hg + wg
        ni = nb * hg + wg
        q_c, do_c, ds_c, lse_c, delta_c = (r.at[wg] for r in (q_s, do_s, ds_s, lse_s, delta_s))
        tile_c = [r.at[wg] for r in tile_s]
        _load_once([(q_ref.at[bi, ni, tile], q_c), (do_ref.at[bi, ni, tile], do_c),
                    (lse_ref.at[bi, ni, tile], lse_c), (delta_ref.at[bi, ni, tile], delta_c)]
                   + [(spec.sources[i].at(src_refs[i], bi, ki, qi, 0), r)
                      for i, r in zip(tiles, tile_c, strict=True)], once, wg * (4 + len(tiles)))
        shape = (bq, bk)
        lse = bcast(vec(lse_c, _ROWS) * LOG2E, shape, 0)
        delta = bcast(vec(delta_c, _ROWS), shape, 0)

        def visit(slot, jb, full, dq):
            s = _product(q_c, k_s.at[slot].transpose((1, 0)), shape) * (cfg.scale * LOG2E)
            mrefs = _ordered(spec, tiles, tile_c, per_step, step_s, slot)
            s = _masked(s, full, lambda: spec.mask(mrefs, shape, 1, qi, jb))
            p = jnp.exp2(s - lse)
            dp = _product(do_c, v_s.at[slot].transpose((1, 0)), shape)
            ds_c[...] = (p * (dp - delta)).astype(ds_c.dtype)
            plgpu.commit_smem()
            k_right = _right(kt_s.at[slot], True) if t32 else k_s.at[slot]
            return dq + _product(ds_c, k_right, (bq, wd))

        dq = _consume(row, stages, loaded, consumed, visit, _zeros((bq, wd)))
        q_c[...] = (dq * cfg.scale).astype(q_c.dtype)  # q is read no more
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_c, dq_ref.at[bi, ni, tile])
        plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(table, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, cfg: KernelConfig,
                spec: MaskSpec, g: int, stages: int, t32: bool):
    (qt_ref, dot_ref), refs = (refs[:2], refs[2:]) if t32 else ((None, None), refs)
    n_src = len(spec.sources)
    src_refs = refs[:n_src]
    dk_ref, dv_ref, k_s, v_s, pt_s, block_s, rings, loaded, consumed, once = refs[n_src:]
    q_s, do_s, lse_s, delta_s, *step_s = rings
    (qt_s, dot_s), step_s = (step_s[-2:], step_s[:-2]) if t32 else ((None, None), step_s)
    bi, ni, jb = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("j")
    ki = ni // g
    bq, bk = cfg.block_q, cfg.block_k
    wd, wv = k_s.shape[-1], v_s.shape[-1]
    row = spec.row(table, bi, ki, jb)
    keys = pl.ds(jb * bk, bk)
    blocks, per_step = spec.of("block"), spec.of("pair") + spec.of("tile")

    @pl.when(lax.axis_index("wg") == 1)
    def _producer():
        sources = [lambda qi: q_ref.at[bi, ni, pl.ds(qi * bq, bq)],
                   lambda qi: do_ref.at[bi, ni, pl.ds(qi * bq, bq)],
                   lambda qi: lse_ref.at[bi, ni, pl.ds(qi * bq, bq)],
                   lambda qi: delta_ref.at[bi, ni, pl.ds(qi * bq, bq)],
                   *_mask_sources(spec, src_refs, per_step, bi, ki, block=jb)]
        if t32:
            sources += [lambda qi: qt_ref.at[bi, ni, :, pl.ds(qi * bq, bq)],
                        lambda qi: dot_ref.at[bi, ni, :, pl.ds(qi * bq, bq)]]
        _produce(row, stages, sources, rings, loaded, consumed)

    @pl.when(lax.axis_index("wg") == 0)
    def _consumer():
        _load_once([(k_ref.at[bi, ki, keys], k_s), (v_ref.at[bi, ki, keys], v_s)]
                   + [(spec.sources[i].at(src_refs[i], bi, ki, 0, jb), r)
                      for i, r in zip(blocks, block_s, strict=True)], once)
        shape = (bk, bq)

        def visit(slot, qi, full, carry):
            dk, dv = carry
            st = _product(k_s, q_s.at[slot].transpose((1, 0)), shape) * (cfg.scale * LOG2E)
            mrefs = _ordered(spec, blocks, block_s, per_step, step_s, slot)
            st = _masked(st, full, lambda: spec.mask(mrefs, shape, 0, qi, jb))
            pt = jnp.exp2(st - bcast(vec(lse_s.at[slot], _COLS) * LOG2E, shape, 1))
            pt_s[...] = pt.astype(pt_s.dtype)
            plgpu.commit_smem()
            do_right = _right(dot_s.at[slot], True) if t32 else do_s.at[slot]
            dv = dv + _product(pt_s, do_right, (bk, wv))
            dpt = _product(v_s, do_s.at[slot].transpose((1, 0)), shape)
            pt_s[...] = (pt * (dpt - bcast(vec(delta_s.at[slot], _COLS), shape, 1))
                         ).astype(pt_s.dtype)
            plgpu.commit_smem()
            q_right = _right(qt_s.at[slot], True) if t32 else q_s.at[slot]
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


def backward(q, k, v, do, o, lse, dlse, fwd_table, bwd_table, srcs, cfg: KernelConfig,
             spec: MaskSpec, *, g: int):
    """(dq (B, N, Tp, W), dk, dv per query head (B, N, Sp, W / Wv), delta (B, N, Tp)): the
    fused backward from the forward's ``o`` and ``lse`` (sink included) and the padded
    head-major output gradient ``do``; ``dlse`` (B, N, Tp) the logsumexp's cotangent or None.
    dK/dV are float32 when a group has several heads (``common.head_grad_dtype``)."""
    b, n, tp, wd = q.shape
    sp, wv = k.shape[2], v.shape[-1]
    bq, bk, dt = cfg.block_q, cfg.block_k, q.dtype
    t32 = tf32(dt)
    do = do.astype(dt)
    delta = common.row_delta(do, o, lse=lse, dlse=dlse)
    tiles, blocks = spec.of("tile"), spec.of("block")
    per_q = spec.of("pair") + blocks
    hg = heads_per_instance(g, lambda h: smem_plan(dt, wd, wv, bk, spec.sources, h)["dq"])
    st = smem_plan(dt, wd, wv, bk, spec.sources, hg)["dq"]
    ring_k = [((bk, wd), dt, True), ((bk, wv), dt, True), *_step_types(spec, per_q)]
    if t32:
        ring_k.append(((wd, bk), dt, True))
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, cfg=cfg, spec=spec, g=g, hg=hg, stages=st, t32=t32),
        out_type=jax.ShapeDtypeStruct(q.shape, dt),
        scratch_types=[_tile((hg, bq, wd), dt), _tile((hg, bq, wv), dt), _tile((hg, bq, bk), dt),
                       plgpu.SMEM((hg, bq), F32), plgpu.SMEM((hg, bq), F32),
                       _fixed(spec, tiles, hg), *_rings(st, ring_k, hg),
                       plgpu.Barrier(num_arrivals=1, num_barriers=hg * (4 + len(tiles)))],
        grid=(b, n // hg, tp // bq), grid_names=("b", "n", "q"),
        **(params(cfg) | dict(num_threads=hg + 1)),
    )(fwd_table, q, do, lse, delta, k, v, *([_t(k, True)] if t32 else []), *srcs)
    if cfg.interpret:  # dK/dV after dQ: two interpreted kernels at once would block twice the
        dq, do = lax.optimization_barrier((dq, do))  # XLA:CPU pool threads (_warn_small_pool)
    st = smem_plan(dt, wd, wv, bk, spec.sources)["dkv"]
    per_k = spec.of("pair") + tiles
    ring_q = [((bq, wd), dt, True), ((bq, wv), dt, True), ((bq,), F32, False),
              ((bq,), F32, False), *_step_types(spec, per_k)]
    if t32:
        ring_q += [((wd, bq), dt, True), ((wv, bq), dt, True)]
    gdt = common.head_grad_dtype(g, dt)
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, cfg=cfg, spec=spec, g=g, stages=st, t32=t32),
        out_type=[jax.ShapeDtypeStruct((b, n, sp, wd), gdt),
                  jax.ShapeDtypeStruct((b, n, sp, wv), gdt)],
        scratch_types=[_tile((bk, wd), dt), _tile((bk, wv), dt), _tile((bk, bq), dt),
                       _fixed(spec, blocks), *_rings(st, ring_q),
                       plgpu.Barrier(num_arrivals=1, num_barriers=2 + len(blocks))],
        grid=(b, n, sp // bk), grid_names=("b", "n", "j"), **params(cfg),
    )(bwd_table, k, v, q, do, lse, delta, *([_t(q, True), _t(do, True)] if t32 else []), *srcs)
    return dq, dk, dv, delta

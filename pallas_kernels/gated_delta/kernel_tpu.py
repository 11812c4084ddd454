"""The chunk scan of the gated delta rule for TPU (Mosaic): ``scan_fwd_tpu`` and ``scan_bwd_tpu``,
equal to ``scan_fwd_reference`` / ``scan_bwd_reference``, the algorithm of ``kernel.py`` written
the way Mosaic pipelines it:

* grid (B, N, value tiles, X chunks), the chunk axis last and "arbitrary": each grid step gets
  one chunk's operands as VMEM blocks (the pipeline prefetches the next chunk's while this one
  computes), and the (H, block_v) float32 state (dS in the backward) lives in a VMEM scratch
  across the chunk steps: set from s0 (ds_final) at the first step, written out as the final
  state (ds0) at the last. The backward's index maps walk the chunks in reverse (X - 1 - x).
  So VMEM holds one chunk of every operand (double-buffered) and one state tile, whatever X.
* per step the forward writes the chunk's output and its entry state; the backward recomputes
  ``vn = u - w @ S`` from the stored entry state and writes du, and its value tile's partials of
  dqg, dkd, dw, da and de (sums over value columns), which the wrapper sums over tiles.
* the decay ``e`` enters as an (H, 1) column per chunk (keys on sublanes, as in the state), so
  ``e * S`` and de = rowsum(S * dS) need no relayout.

Matrix products: operands in the input dtype, float32 accumulation, at ``precision``; state,
``e`` and every output float32 (float64 inputs run in float32).

Padding (zeros, sliced off): H and V to multiples of 128 (the lane width; value tiles of
``block_v``, a multiple of 128), T to a multiple of 16 (sublanes, bf16 packing); the (T, T)
intra-chunk blocks then have the full array's last dimension. Interpret mode
(``pltpu.InterpretParams``) runs it on CPU in the tests; lowering for TPU is checked with
``jax.export``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import common
from ..common import F32, dot, dot_t, tn_dot
from .kernel import Layout, _pad, _pad_inputs, check_scan, compute_dtype, finish_bwd

Array = jax.Array
LANE = 128
SUBLANE = 16


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Value columns per grid step, forward and backward (multiples of 128)."""

    block_v: int = 128
    block_v_bwd: int = 128


def _round(x: int, m: int) -> int:
    return common.cdiv(x, m) * m


def _layout(t: int, h: int, vw: int, block_v: int) -> Layout:
    if block_v % LANE:
        raise ValueError(f"TPU value tiles must be a multiple of {LANE} columns, got block_v={block_v}")
    bv = min(block_v, _round(vw, LANE))
    return Layout(_round(t, SUBLANE), _round(h, LANE), bv, _round(vw, bv))


def _params(interpret: bool) -> dict:
    sem = ("parallel", "parallel", "parallel", "arbitrary")
    return dict(interpret=pltpu.InterpretParams() if interpret else False,
                compiler_params=pltpu.CompilerParams(dimension_semantics=sem))


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(qg_ref, kd_ref, *refs, has_w: bool, with_states: bool, precision):
    w_ref, refs = (refs[0], refs[1:]) if has_w else (None, refs)
    u_ref, a_ref, e_ref, s0_ref, o_ref, *state_ref, sf_ref, s_scr = refs
    x = pl.program_id(3)

    @pl.when(x == 0)
    def _init():
        s_scr[...] = s0_ref[...]

    s = s_scr[...]
    if with_states:
        state_ref[0][...] = s
    qg = qg_ref[...]
    sd = s.astype(qg.dtype)
    vn = u_ref[...].astype(F32)
    if has_w:
        vn = vn - dot(w_ref[...], sd, precision)
    vnd = vn.astype(qg.dtype)
    o_ref[...] = dot(qg, sd, precision) + dot(a_ref[...], vnd, precision)
    s_next = e_ref[...] * s + tn_dot(kd_ref[...], vnd, precision)
    s_scr[...] = s_next

    @pl.when(x == pl.num_programs(3) - 1)
    def _finish():
        sf_ref[...] = s_next


def _bwd_kernel(qg_ref, kd_ref, *refs, has_w: bool, precision):
    w_ref, refs = (refs[0], refs[1:]) if has_w else (None, refs)
    u_ref, a_ref, e_ref, st_ref, do_ref, dsf_ref, *outs, ds_scr = refs
    dw_ref, outs = (outs[0], outs[1:]) if has_w else (None, outs)
    dqg_ref, dkd_ref, du_ref, da_ref, de_ref, ds0_ref = outs
    i = pl.program_id(3)  # chunk X - 1 - i

    @pl.when(i == 0)
    def _init():
        ds_scr[...] = dsf_ref[...]

    ds = ds_scr[...]
    s = st_ref[...]
    qg = qg_ref[...]
    dt = qg.dtype
    sd, dsd, dod = s.astype(dt), ds.astype(dt), do_ref[...].astype(dt)
    vn = u_ref[...].astype(F32)
    if has_w:
        w = w_ref[...]
        vn = vn - dot(w, sd, precision)
    vnd = vn.astype(dt)
    kd = kd_ref[...]
    dvn = tn_dot(a_ref[...], dod, precision) + dot(kd, dsd, precision)
    du_ref[...] = dvn
    dqg_ref[...] = dot_t(dod, sd, precision)
    da_ref[...] = dot_t(dod, vnd, precision)
    dkd_ref[...] = dot_t(vnd, dsd, precision)
    de_ref[...] = jnp.sum(s * ds, axis=1, keepdims=True)
    ds_prev = e_ref[...] * ds + tn_dot(qg, dod, precision)
    if has_w:
        dvnd = dvn.astype(dt)
        dw_ref[...] = -dot_t(dvnd, sd, precision)
        ds_prev = ds_prev - tn_dot(w, dvnd, precision)
    ds_scr[...] = ds_prev

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        ds0_ref[...] = ds_prev


# ----------------------------------------------------------------------------- specs
# grid (B, N, value tiles, chunk steps); ``chunk(xi)`` maps the step to its chunk (the backward
# walks them in reverse).


def _specs(chunk):
    def mat(*block):  # one chunk of a (B, N, X, ...) array
        zeros = (0,) * len(block)
        return pl.BlockSpec((None, None, None, *block),
                            lambda bi, ni, vi, xi: (bi, ni, chunk(xi), *zeros))

    def tile(*block):  # one chunk's value tile of a (B, N, X, ..., V) array
        zeros = (0,) * (len(block) - 1)
        return pl.BlockSpec((None, None, None, *block),
                            lambda bi, ni, vi, xi: (bi, ni, chunk(xi), *zeros, vi))

    def part(*block):  # one chunk of this value tile's partial, (B, N, tiles, X, ...)
        zeros = (0,) * len(block)
        return pl.BlockSpec((None, None, None, None, *block),
                            lambda bi, ni, vi, xi: (bi, ni, vi, chunk(xi), *zeros))

    def state(hp, bv):  # a (B, N, H, V) array's value tile, the same block at every step
        return pl.BlockSpec((None, None, hp, bv), lambda bi, ni, vi, xi: (bi, ni, 0, vi))

    return mat, tile, part, state


# ----------------------------------------------------------------------------- wrappers


def _prepare(qg, kd, w, u, a, e, block_v: int):
    b, n, nx, t, h = qg.shape
    lay = _layout(t, h, u.shape[-1], block_v)
    dt = compute_dtype(qg, kd, w, u, a)
    padded = _pad_inputs(qg, kd, w, u, a, e, lay, dt)
    return lay, (*padded[:5], padded[5][..., None])  # e as (B, N, X, H, 1) columns


def scan_fwd_tpu(qg_BNXTH: Array, kd_BNXTH: Array, w_BNXTH: Array | None, u_BNXTV: Array,
                 a_BNXTS: Array, e_BNXH: Array, s0_BNHV: Array, *, interpret: bool = False,
                 precision: jax.lax.PrecisionLike = None,
                 block_sizes: TpuBlockSizes = TpuBlockSizes(),
                 with_states: bool = True) -> tuple[Array, Array | None, Array]:
    """The TPU kernel; same contract as ``kernel.scan_fwd`` (``scan_fwd_reference``;
    ``with_states=False``: no chunk-entry states written, None returned in their place)."""
    check_scan("scan_fwd_tpu", qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS, e_BNXH, s0_BNHV)
    b, n, nx, t, h = qg_BNXTH.shape
    vw = u_BNXTV.shape[-1]
    lay, (qg, kd, w, u, a, e) = _prepare(qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS, e_BNXH,
                                         block_sizes.block_v)
    tp, hp, bv, vp = lay.tp, lay.hp, lay.bv, lay.vp
    s0 = _pad(s0_BNHV.astype(F32), hp, vp)
    has_w = w is not None
    mat, tile, _, state = _specs(lambda xi: xi)
    st_spec, st_shape = (([tile(hp, bv)], [jax.ShapeDtypeStruct((b, n, nx, hp, vp), F32)])
                         if with_states else ([], []))
    o, *states, s_final = pl.pallas_call(
        functools.partial(_fwd_kernel, has_w=has_w, with_states=with_states, precision=precision),
        grid=(b, n, lay.nv, nx),
        in_specs=[*[mat(tp, hp)] * (3 if has_w else 2), tile(tp, bv), mat(tp, tp), mat(hp, 1),
                  state(hp, bv)],
        out_specs=[tile(tp, bv), *st_spec, state(hp, bv)],
        out_shape=[jax.ShapeDtypeStruct((b, n, nx, tp, vp), F32), *st_shape,
                   jax.ShapeDtypeStruct((b, n, hp, vp), F32)],
        scratch_shapes=[pltpu.VMEM((hp, bv), F32)],
        name="gated_delta_scan_fwd_tpu",
        **_params(interpret),
    )(qg, kd, *([w] if has_w else []), u, a, e, s0)
    states = states[0][..., :h, :vw] if with_states else None
    return o[..., :t, :vw], states, s_final[..., :h, :vw]


def scan_bwd_tpu(qg_BNXTH: Array, kd_BNXTH: Array, w_BNXTH: Array | None, u_BNXTV: Array,
                 a_BNXTS: Array, e_BNXH: Array, states_BNXHV: Array, do_BNXTV: Array,
                 ds_final_BNHV: Array, *, interpret: bool = False,
                 precision: jax.lax.PrecisionLike = None,
                 block_sizes: TpuBlockSizes = TpuBlockSizes()):
    """The TPU kernel; same contract as ``kernel.scan_bwd`` (``scan_bwd_reference``)."""
    check_scan("scan_bwd_tpu", qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS, e_BNXH,
               ds_final_BNHV, states=states_BNXHV, do=do_BNXTV)
    b, n, nx, t, h = qg_BNXTH.shape
    vw = u_BNXTV.shape[-1]
    lay, (qg, kd, w, u, a, e) = _prepare(qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS, e_BNXH,
                                         block_sizes.block_v_bwd)
    tp, hp, bv, vp, nv = lay.tp, lay.hp, lay.bv, lay.vp, lay.nv
    states = _pad(states_BNXHV.astype(F32), hp, vp)
    do = _pad(do_BNXTV.astype(F32), tp, vp)
    dsf = _pad(ds_final_BNHV.astype(F32), hp, vp)
    has_w = w is not None
    nmat = 3 if has_w else 2
    mat, tile, part, state = _specs(lambda xi: nx - 1 - xi)
    partial = lambda *s: jax.ShapeDtypeStruct((b, n, nv, nx, *s), F32)  # noqa: E731
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, has_w=has_w, precision=precision),
        grid=(b, n, nv, nx),
        in_specs=[*[mat(tp, hp)] * nmat, tile(tp, bv), mat(tp, tp), mat(hp, 1), tile(hp, bv),
                  tile(tp, bv), state(hp, bv)],
        out_specs=[*[part(tp, hp)] * nmat, tile(tp, bv), part(tp, tp), part(hp, 1),
                   state(hp, bv)],
        out_shape=[*[partial(tp, hp)] * nmat, jax.ShapeDtypeStruct((b, n, nx, tp, vp), F32),
                   partial(tp, tp), partial(hp, 1), jax.ShapeDtypeStruct((b, n, hp, vp), F32)],
        scratch_shapes=[pltpu.VMEM((hp, bv), F32)],
        name="gated_delta_scan_bwd_tpu",
        **_params(interpret),
    )(qg, kd, *([w] if has_w else []), u, a, e, states, do, dsf)
    return finish_bwd(outs, has_w, t, h, vw)

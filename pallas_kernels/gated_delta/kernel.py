"""The chunk scan of the gated delta rule in Pallas (GPU-style grid, Triton lowering; interpret
mode on CPU): ``scan_fwd`` and ``scan_bwd``, equal to ``scan_fwd_reference`` /
``scan_bwd_reference`` (``reference.py`` states the contract: per (batch, head), over X chunks,
``vn = u - w @ S``, ``o = qg @ S + a @ vn``, ``S <- e * S + kd^T @ vn``).

The scan is separable over value columns, so one program owns one (batch, head, value tile of
``block_v`` columns) and walks all X chunks in a ``lax.fori_loop`` carrying its (H, block_v)
slice of the state in float32 registers; the chunk operands are read from global memory one
chunk at a time (``ref[x]``). The forward writes each chunk's output, the state entering each
chunk (``states``, the backward's input) and the final state. The backward walks the chunks in
reverse carrying dS, recomputes ``vn`` from the stored entry state, and writes du (= dvn), ds0 and
this tile's share of dqg, dkd, dw, da and de, which sum over value columns: the programs write
per-tile partials (B, N, value tiles, ...) that the wrapper sums (one tile: nothing to sum).

Matrix products take their operands in the input dtype (the state and ``vn`` are cast to it;
bf16 inputs run on the tensor cores) with float32 accumulation, at ``precision`` (JAX's default:
TF32 for float32 on NVIDIA GPUs unless ``jax.default_matmul_precision("highest")``); the state,
dS, ``e`` and every output are float32. ``w=None`` (gated / plain linear attention) is a static
flag: no ``w @ S`` product, no dw.

Memory besides the contract's arrays: the padded copies of the operands, and in the backward
the per-tile partials, (value tiles) x the size of dqg, dkd, dw, da and de, summed at once.

Padding (zeros, sliced off the results): T and H to a power of two >= 16 (Triton's tensors and
its matrix units); V to a whole number of value tiles, ``block_v`` itself at most the power-of-
two width of V. Zero rows / columns stay zero through the recurrence, so they change nothing.
``kernel_tpu.py`` is the Mosaic (TPU) variant.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from .. import common
from ..common import F32, dot, dot_t, tn_dot

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Value columns per program in the forward (``block_v``) and backward (``block_v_bwd``, which
    carries dS and reloads S: two state tiles live at once), for key widths up to 128; a wider
    (padded) key width H scales them by 128 / H (at least 16), so the (H, block_v) float32 state
    tile keeps its register size. Then the Triton launch knobs."""

    block_v: int = 64
    block_v_bwd: int = 32
    num_warps: int = 4
    num_stages: int = 2


# ----------------------------------------------------------------------------- checks


def compute_dtype(*xs) -> jnp.dtype:
    """The dtype of the in-kernel matrix operands: the inputs' common float type, at most 32 bits
    (float64 under ``jax_enable_x64`` runs in float32)."""
    dts = [x.dtype for x in xs if x is not None]
    if not all(jnp.issubdtype(d, jnp.floating) for d in dts):
        raise TypeError(f"the scan's qg, kd, w, u, a must be floating point, got dtypes "
                        f"{[str(d) for d in dts]}")
    dt = jnp.result_type(*dts)
    return jnp.dtype(F32) if jnp.finfo(dt).bits > 32 else jnp.dtype(dt)


def check_scan(owner: str, qg, kd, w, u, a, e, state, *, states=None, do=None) -> None:
    """Raise ``ValueError`` naming the shapes unless they follow the scan contract: qg, kd, w
    (B, N, X, T, H), u (B, N, X, T, V), a (B, N, X, T, T), e (B, N, X, H), ``state`` (s0 or
    ds_final) (B, N, H, V); backward: states (B, N, X, H, V), do (B, N, X, T, V)."""
    for name, arr in (("qg", qg), ("u", u)):
        if arr.ndim != 5:
            raise ValueError(f"{owner}: {name} must be 5-D, (B, N, X chunks, T, "
                             f"{'H' if name == 'qg' else 'V'}), got shape {arr.shape}")
    b, n, x, t, h = qg.shape
    vw = u.shape[-1]
    want = dict(kd=(qg.shape, kd), w=(qg.shape, w), u=((b, n, x, t, vw), u),
                a=((b, n, x, t, t), a), e=((b, n, x, h), e), state=((b, n, h, vw), state),
                states=((b, n, x, h, vw), states), do=((b, n, x, t, vw), do))
    for name, (shape, arr) in want.items():
        if arr is not None and tuple(arr.shape) != tuple(shape):
            raise ValueError(f"{owner}: {name} must have shape {shape} (qg is (B, N, X, T, H)="
                             f"{qg.shape}, u is (B, N, X, T, V)={u.shape}), got {arr.shape}")


def _pad(x: Array | None, *sizes: int) -> Array | None:
    """Zero-pad the trailing ``len(sizes)`` axes of ``x`` to ``sizes``."""
    if x is None:
        return None
    lead = x.ndim - len(sizes)
    widths = [(0, 0)] * lead + [(0, s - d) for s, d in zip(sizes, x.shape[lead:], strict=True)]
    return jnp.pad(x, widths) if any(hi for _, hi in widths) else x


@dataclasses.dataclass(frozen=True)
class Layout:
    """Padded sizes of one call: chunk positions ``tp``, key width ``hp``, value tile ``bv``,
    value width ``vp`` (a whole number ``nv`` of tiles)."""

    tp: int
    hp: int
    bv: int
    vp: int

    @property
    def nv(self) -> int:
        return self.vp // self.bv


def _layout(t: int, h: int, vw: int, block_v: int) -> Layout:
    hp = common.lane_width(h)
    bv = min(common.lane_width(max(16, block_v * 128 // max(hp, 128))), common.lane_width(vw))
    return Layout(common.lane_width(t), hp, bv, common.cdiv(vw, bv) * bv)


def _pad_inputs(qg, kd, w, u, a, e, lay: Layout, dt):
    """The chunk operands padded (zeros) to ``lay`` and cast: matrices to ``dt``, e float32."""
    cast = lambda z, *s: None if z is None else _pad(z.astype(dt), *s)  # noqa: E731
    return (cast(qg, lay.tp, lay.hp), cast(kd, lay.tp, lay.hp), cast(w, lay.tp, lay.hp),
            cast(u, lay.tp, lay.vp), cast(a, lay.tp, lay.tp), _pad(e.astype(F32), lay.hp))


# ----------------------------------------------------------------------------- kernels
# One program per (batch, head, value tile); every ref holds this (b, n)'s chunks, (X, ...), and
# the value-width ones this tile's columns.


def _fwd_kernel(qg_ref, kd_ref, *refs, has_w: bool, with_states: bool, precision):
    w_ref, refs = (refs[0], refs[1:]) if has_w else (None, refs)
    u_ref, a_ref, e_ref, s0_ref, o_ref, *states_ref, sf_ref = refs

    def chunk(x, s):
        if with_states:
            states_ref[0][x] = s
        qg = qg_ref[x]
        sd = s.astype(qg.dtype)
        vn = u_ref[x].astype(F32)
        if has_w:
            vn = vn - dot(w_ref[x], sd, precision)
        vnd = vn.astype(qg.dtype)
        o_ref[x] = dot(qg, sd, precision) + dot(a_ref[x], vnd, precision)
        return e_ref[x][:, None] * s + tn_dot(kd_ref[x], vnd, precision)

    sf_ref[...] = jax.lax.fori_loop(0, qg_ref.shape[0], chunk, s0_ref[...])


def _bwd_kernel(qg_ref, kd_ref, *refs, has_w: bool, precision):
    w_ref, refs = (refs[0], refs[1:]) if has_w else (None, refs)
    u_ref, a_ref, e_ref, st_ref, do_ref, dsf_ref, *outs = refs
    dw_ref, outs = (outs[0], outs[1:]) if has_w else (None, outs)
    dqg_ref, dkd_ref, du_ref, da_ref, de_ref, ds0_ref = outs
    nx = qg_ref.shape[0]

    def chunk(i, ds):
        x = nx - 1 - i
        s = st_ref[x]
        qg, kd = qg_ref[x], kd_ref[x]
        dt = qg.dtype
        sd, dsd, dod = s.astype(dt), ds.astype(dt), do_ref[x].astype(dt)
        vn = u_ref[x].astype(F32)
        if has_w:
            w = w_ref[x]
            vn = vn - dot(w, sd, precision)
        vnd = vn.astype(dt)
        dvn = tn_dot(a_ref[x], dod, precision) + dot(kd, dsd, precision)
        du_ref[x] = dvn
        dqg_ref[x] = dot_t(dod, sd, precision)
        da_ref[x] = dot_t(dod, vnd, precision)
        dkd_ref[x] = dot_t(vnd, dsd, precision)
        de_ref[x] = jnp.sum(s * ds, axis=1)
        ds_prev = e_ref[x][:, None] * ds + tn_dot(qg, dod, precision)
        if has_w:
            dvnd = dvn.astype(dt)
            dw_ref[x] = -dot_t(dvnd, sd, precision)
            ds_prev = ds_prev - tn_dot(w, dvnd, precision)
        return ds_prev

    ds0_ref[...] = jax.lax.fori_loop(0, nx, chunk, dsf_ref[...])


# ----------------------------------------------------------------------------- specs


def _whole(*block):
    """This (b, n)'s every chunk of a (B, N, X, ...) array; grid (B, N, value tiles)."""
    zeros = (0,) * len(block)
    return pl.BlockSpec((None, None, *block), lambda bi, ni, vi: (bi, ni, *zeros))


def _tile(*block):
    """This (b, n)'s value tile (last axis) of a (B, N, ..., V) array."""
    zeros = (0,) * (len(block) - 1)
    return pl.BlockSpec((None, None, *block), lambda bi, ni, vi: (bi, ni, *zeros, vi))


def _partial(*block):
    """This program's partial of a (B, N, value tiles, X, ...) array."""
    zeros = (0,) * len(block)
    return pl.BlockSpec((None, None, None, *block), lambda bi, ni, vi: (bi, ni, vi, *zeros))


def _params(bs: BlockSizes, interpret: bool) -> dict:
    return dict(interpret=interpret,
                compiler_params=pl_triton.CompilerParams(num_warps=bs.num_warps,
                                                         num_stages=bs.num_stages))


# ----------------------------------------------------------------------------- wrappers


def scan_fwd(qg_BNXTH: Array, kd_BNXTH: Array, w_BNXTH: Array | None, u_BNXTV: Array,
             a_BNXTS: Array, e_BNXH: Array, s0_BNHV: Array, *, interpret: bool = False,
             precision: jax.lax.PrecisionLike = None, block_sizes: BlockSizes = BlockSizes(),
             with_states: bool = True) -> tuple[Array, Array | None, Array]:
    """``scan_fwd_reference`` as a Pallas kernel: ``(o_BNXTV, states_BNXHV, s_final_BNHV)``,
    float32. ``interpret``: run on the Pallas interpreter (CPU). ``with_states=False``: the
    chunk-entry states are not written (None in their place; a forward without a backward then
    writes about half the bytes)."""
    check_scan("scan_fwd", qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS, e_BNXH, s0_BNHV)
    b, n, nx, t, h = qg_BNXTH.shape
    vw = u_BNXTV.shape[-1]
    dt = compute_dtype(qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS)
    lay = _layout(t, h, vw, block_sizes.block_v)
    tp, hp, bv = lay.tp, lay.hp, lay.bv
    qg, kd, w, u, a, e = _pad_inputs(qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS, e_BNXH, lay, dt)
    s0 = _pad(s0_BNHV.astype(F32), hp, lay.vp)
    has_w = w is not None
    mats = [_whole(nx, tp, hp)] * (3 if has_w else 2)
    st_spec, st_shape = (([_tile(nx, hp, bv)], [jax.ShapeDtypeStruct((b, n, nx, hp, lay.vp), F32)])
                         if with_states else ([], []))
    o, *states, s_final = pl.pallas_call(
        functools.partial(_fwd_kernel, has_w=has_w, with_states=with_states, precision=precision),
        grid=(b, n, lay.nv),
        in_specs=[*mats, _tile(nx, tp, bv), _whole(nx, tp, tp), _whole(nx, hp), _tile(hp, bv)],
        out_specs=[_tile(nx, tp, bv), *st_spec, _tile(hp, bv)],
        out_shape=[jax.ShapeDtypeStruct((b, n, nx, tp, lay.vp), F32), *st_shape,
                   jax.ShapeDtypeStruct((b, n, hp, lay.vp), F32)],
        name="gated_delta_scan_fwd",
        **_params(block_sizes, interpret),
    )(qg, kd, *([w] if has_w else []), u, a, e, s0)
    states = states[0][..., :h, :vw] if with_states else None
    return o[..., :t, :vw], states, s_final[..., :h, :vw]


def scan_bwd(qg_BNXTH: Array, kd_BNXTH: Array, w_BNXTH: Array | None, u_BNXTV: Array,
             a_BNXTS: Array, e_BNXH: Array, states_BNXHV: Array, do_BNXTV: Array,
             ds_final_BNHV: Array, *, interpret: bool = False,
             precision: jax.lax.PrecisionLike = None, block_sizes: BlockSizes = BlockSizes()):
    """``scan_bwd_reference`` as a Pallas kernel: ``(dqg, dkd, dw, du, da, de, ds0)``, float32,
    each shaped as its primal (``dw`` None when ``w`` is)."""
    check_scan("scan_bwd", qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS, e_BNXH, ds_final_BNHV,
               states=states_BNXHV, do=do_BNXTV)
    b, n, nx, t, h = qg_BNXTH.shape
    vw = u_BNXTV.shape[-1]
    dt = compute_dtype(qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS)
    lay = _layout(t, h, vw, block_sizes.block_v_bwd)
    tp, hp, bv, nv = lay.tp, lay.hp, lay.bv, lay.nv
    qg, kd, w, u, a, e = _pad_inputs(qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS, e_BNXH, lay, dt)
    states = _pad(states_BNXHV.astype(F32), hp, lay.vp)
    do = _pad(do_BNXTV.astype(F32), tp, lay.vp)
    dsf = _pad(ds_final_BNHV.astype(F32), hp, lay.vp)
    has_w = w is not None
    mats = [_whole(nx, tp, hp)] * (3 if has_w else 2)
    part = lambda *s: jax.ShapeDtypeStruct((b, n, nv, nx, *s), F32)  # noqa: E731
    out_specs = [_partial(nx, tp, hp)] * (3 if has_w else 2) + [
        _tile(nx, tp, bv), _partial(nx, tp, tp), _partial(nx, hp), _tile(hp, bv)]
    out_shape = [part(tp, hp)] * (3 if has_w else 2) + [
        jax.ShapeDtypeStruct((b, n, nx, tp, lay.vp), F32), part(tp, tp), part(hp),
        jax.ShapeDtypeStruct((b, n, hp, lay.vp), F32)]
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, has_w=has_w, precision=precision),
        grid=(b, n, nv),
        in_specs=[*mats, _tile(nx, tp, bv), _whole(nx, tp, tp), _whole(nx, hp),
                  _tile(nx, hp, bv), _tile(nx, tp, bv), _tile(hp, bv)],
        out_specs=out_specs,
        out_shape=out_shape,
        name="gated_delta_scan_bwd",
        **_params(block_sizes, interpret),
    )(qg, kd, *([w] if has_w else []), u, a, e, states, do, dsf)
    return finish_bwd(outs, has_w, t, h, vw)


def finish_bwd(outs, has_w: bool, t: int, h: int, vw: int):
    """The kernels' backward outputs ``(dw?, dqg, dkd, du, da, de, ds0)``, the column sums
    partials (B, N, tiles, X, ...) summed over tiles and every result sliced to its primal's
    shape, in the contract's order ``(dqg, dkd, dw, du, da, de, ds0)``."""
    dw, outs = (outs[0], outs[1:]) if has_w else (None, outs)
    dqg, dkd, du, da, de, ds0 = outs
    total = lambda z: z[:, :, 0] if z.shape[2] == 1 else z.sum(axis=2)  # noqa: E731
    dqg, dkd, da, de = (total(z) for z in (dqg, dkd, da, de))
    if dw is not None:
        dw = total(dw)[..., :t, :h]
    return (dqg[..., :t, :h], dkd[..., :t, :h], dw, du[..., :t, :vw], da[..., :t, :t],
            de.reshape(de.shape[:4])[..., :h], ds0[..., :h, :vw])

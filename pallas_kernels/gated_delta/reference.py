"""The pure-jnp references every gated-delta-rule path must equal.

The recurrence (per batch row and head; ``S`` is the (H, V) state, ``H`` the key width, ``V``
the value width; the layout of ``initial_state`` / the final state is HF's and fla's,
(B, N, H, V))::

    S <- 0                                   if token t starts a new segment (``segment_ids``)
    S <- exp(g_t) * S                        g_t (N,) per head (GDN) or (N, H) per key channel (KDA)
    S <- S + beta_t k_t (v_t - S^T k_t)^T    the delta rule; with ``beta=None``: S + k_t v_t^T
    o_t = S^T (scale q_t)                    (linear attention, gated or not)

``segment_ids`` (B, T) int: id 0 marks a token that is skipped (the state passes it unchanged,
its output is zero); a nonzero token whose id differs from the previous nonzero token's starts a
new segment, whose state starts at zero. ``initial_state`` is the state entering the first
segment; the final state is the state after the last nonzero token.

The chunked form splits T into X chunks of ``chunk`` positions (a chunk position is a slice of T,
still T; its key position S). The parallel part (``prepare``, per chunk) turns the inputs into
the six arrays of the *scan contract* below; the sequential part (``scan_fwd_reference`` /
``scan_bwd_reference``, or the Pallas kernels beside them) runs over chunks, per (B, N), and is
separable over value columns::

    vn  = u - w @ S              (T, V)   the values still to be written (delta rule)
    o   = qg @ S + a @ vn        (T, V)   the chunk's output
    S   = e[:, None] * S + kd^T @ vn      the state entering the next chunk

with ``qg`` (T, H), ``kd`` (T, H), ``w`` (T, H) (``None``: no delta correction, ``vn = u``),
``u`` (T, V), ``a`` (T, S) (lower triangular, the intra-chunk read weights) and ``e`` (H,) the
carried state's decay across the chunk. Array names follow the dimension key of
``pallas_kernels/__init__.py`` plus ``X`` chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
F32 = jnp.float32


def segment_flags(segment_ids_BT: Array | None, b: int, t: int) -> tuple[Array, Array]:
    """(valid, reset), each (B, T) bool: ``valid`` is id != 0; ``reset`` marks a valid token whose
    id differs from the previous valid token's (the first valid token of a row never resets)."""
    if segment_ids_BT is None:
        return jnp.ones((b, t), bool), jnp.zeros((b, t), bool)
    seg = segment_ids_BT.astype(jnp.int32)
    valid = seg != 0
    idx = jnp.where(valid, jnp.arange(t, dtype=jnp.int32)[None, :], -1)
    last = lax.cummax(idx, axis=1)
    prev = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), last[:, :-1]], axis=1)
    prev_seg = jnp.take_along_axis(seg, jnp.maximum(prev, 0), axis=1)
    return valid, valid & (prev >= 0) & (seg != prev_seg)


def recurrent_reference(q_BTNH: Array, k_BTNH: Array, v_BTNV: Array, g: Array,
                        beta_BTN: Array | None, *, scale: float | None = None,
                        initial_state: Array | None = None,
                        segment_ids: Array | None = None) -> tuple[Array, Array]:
    """The token-by-token recurrence (the oracle). ``g`` is (B, T, N) or (B, T, N, H).

    Returns ``(o (B, T, N, V) in v's dtype, final_state (B, N, H, V) float32)``; all arithmetic
    is float32."""
    b, t, n, h = q_BTNH.shape
    v_width = v_BTNV.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    valid, reset = segment_flags(segment_ids, b, t)
    g_BTNH = g.astype(F32) if g.ndim == 4 else jnp.broadcast_to(g.astype(F32)[..., None],
                                                               (b, t, n, h))
    s0 = (jnp.zeros((b, n, h, v_width), F32) if initial_state is None
          else initial_state.astype(F32))

    def step(s_BNHV, xs):
        q, k, v, gt, bt, ok, rs = xs
        s = jnp.where(rs[:, None, None, None], 0.0, s_BNHV)
        s = s * jnp.exp(gt)[..., None]
        if bt is None:
            s_new = s + k[..., :, None] * v[..., None, :]
        else:
            pred = jnp.einsum("BNHV,BNH->BNV", s, k)
            s_new = s + k[..., :, None] * (bt[..., None] * (v - pred))[..., None, :]
        o = jnp.einsum("BNHV,BNH->BNV", s_new, q * scale)
        keep = ok[:, None, None, None]
        return jnp.where(keep, s_new, s_BNHV), jnp.where(ok[:, None, None], o, 0.0)

    tmajor = lambda a: None if a is None else jnp.moveaxis(a.astype(F32), 1, 0)  # noqa: E731
    xs = (tmajor(q_BTNH), tmajor(k_BTNH), tmajor(v_BTNV), tmajor(g_BTNH), tmajor(beta_BTN),
          jnp.moveaxis(valid, 1, 0), jnp.moveaxis(reset, 1, 0))
    s_final, o_TBNV = lax.scan(step, s0, xs)
    return jnp.moveaxis(o_TBNV, 0, 1).astype(v_BTNV.dtype), s_final


def scan_fwd_reference(qg_BNXTH: Array, kd_BNXTH: Array, w_BNXTH: Array | None,
                       u_BNXTV: Array, a_BNXTS: Array, e_BNXH: Array,
                       s0_BNHV: Array) -> tuple[Array, Array, Array]:
    """The sequential part of the chunked form (module docstring), float32.

    Returns ``(o_BNXTV, states_BNXHV, s_final_BNHV)``: ``states[:, :, x]`` is the state entering
    chunk ``x`` (what the backward pass needs)."""
    def step(s, xs):
        qg, kd, w, u, a, e = xs
        vn = u if w is None else u - jnp.einsum("BNTH,BNHV->BNTV", w, s)
        o = jnp.einsum("BNTH,BNHV->BNTV", qg, s) + jnp.einsum("BNTS,BNSV->BNTV", a, vn)
        s_next = e[..., None] * s + jnp.einsum("BNTH,BNTV->BNHV", kd, vn)
        return s_next, (o, s)

    xmajor = lambda a: None if a is None else jnp.moveaxis(a.astype(F32), 2, 0)  # noqa: E731
    xs = tuple(xmajor(a) for a in (qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS, e_BNXH))
    s_final, (o, states) = lax.scan(step, s0_BNHV.astype(F32), xs)
    return jnp.moveaxis(o, 0, 2), jnp.moveaxis(states, 0, 2), s_final


def scan_bwd_reference(qg_BNXTH: Array, kd_BNXTH: Array, w_BNXTH: Array | None,
                       u_BNXTV: Array, a_BNXTS: Array, e_BNXH: Array, states_BNXHV: Array,
                       do_BNXTV: Array, ds_final_BNHV: Array):
    """The backward of ``scan_fwd_reference`` given the states it returned: a reverse pass over
    chunks carrying dS. Returns ``(dqg, dkd, dw, du, da, de, ds0)`` (``dw`` is None when ``w``
    is), float32, each shaped as its primal."""
    def step(ds_next, xs):
        qg, kd, w, u, a, e, s, do = xs
        vn = u if w is None else u - jnp.einsum("BNTH,BNHV->BNTV", w, s)
        dvn = (jnp.einsum("BNTS,BNTV->BNSV", a, do)
               + jnp.einsum("BNTH,BNHV->BNTV", kd, ds_next))
        dqg = jnp.einsum("BNTV,BNHV->BNTH", do, s)
        da = jnp.einsum("BNTV,BNSV->BNTS", do, vn)
        dkd = jnp.einsum("BNTV,BNHV->BNTH", vn, ds_next)
        de = jnp.sum(s * ds_next, axis=-1)
        ds = e[..., None] * ds_next + jnp.einsum("BNTH,BNTV->BNHV", qg, do)
        dw = None
        if w is not None:
            dw = -jnp.einsum("BNTV,BNHV->BNTH", dvn, s)
            ds = ds - jnp.einsum("BNTH,BNTV->BNHV", w, dvn)
        return ds, (dqg, dkd, dw, dvn, da, de)

    xmajor = lambda a: None if a is None else jnp.moveaxis(a.astype(F32), 2, 0)  # noqa: E731
    xs = tuple(xmajor(a) for a in (qg_BNXTH, kd_BNXTH, w_BNXTH, u_BNXTV, a_BNXTS, e_BNXH,
                                    states_BNXHV, do_BNXTV))
    ds0, grads = lax.scan(step, ds_final_BNHV.astype(F32), xs, reverse=True)
    return (*(None if d is None else jnp.moveaxis(d, 0, 2) for d in grads), ds0)

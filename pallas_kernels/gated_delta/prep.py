"""The parallel part of the chunked form: ``prepare`` turns the op's inputs into the six arrays of
the scan contract (``reference.py``), per chunk, in float32.

Within a chunk (``gc`` the cumulative log decay from the chunk's start, ``g = 0`` at skipped
tokens; ``run`` the segment count ``cumsum(reset)`` along the row; ``run_prev`` the run of the
token before the chunk, ``run_last`` the run of its last position)::

    D_ij    = exp(gc_i - gc_j)           j <= i, same run, both valid (per key channel for KDA)
    L_ij    = beta_i k_i . (D_ij k_j)    j < i     the delta rule's intra-chunk coupling
    Tmat    = (I + L)^-1                           unit lower triangular (a triangular solve)
    u       = Tmat (beta v)                        w = Tmat (beta k exp(gc)) on the first run
    qg_i    = scale q_i exp(gc_i)        i in the run that continues from before the chunk
    a_ij    = scale q_i . (D_ij k_j)
    kd_j    = k_j exp(gc_last - gc_j)    j in the chunk's last run
    e       = exp(gc_last)               0 when a reset inside the chunk drops the carried state

With ``beta=None`` (linear attention) ``w`` is None and ``u = v``. Every exponent is <= 0 for
``g <= 0`` (masked positions are ``-inf`` before the exponential, never after), so a chunk whose
decay reaches -1e4 stays finite. Per-head decay builds ``D`` as a (T, S) matrix for all chunks at
once; per-channel decay needs a (T, S, H) product, built one chunk at a time inside ``lax.map``
under ``jax.checkpoint`` (bounded memory: one chunk's product at a time, forward and backward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .reference import segment_flags

Array = jax.Array
F32 = jnp.float32


def to_chunks(x_BT: Array, chunk_size: int) -> Array:
    """(B, T, N, ...) -> (B, N, X, chunk, ...), T zero-padded to whole chunks."""
    b, t = x_BT.shape[:2]
    pad = -t % chunk_size
    x_BT = jnp.pad(x_BT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BT.ndim - 2))
    x_BXT = x_BT.reshape(b, (t + pad) // chunk_size, chunk_size, *x_BT.shape[2:])
    return jnp.moveaxis(x_BXT, 3, 1)


def from_chunks(x_BNXT: Array, t: int) -> Array:
    """(B, N, X, chunk, ...) -> (B, T, N, ...), the padding stripped."""
    b, n, x, c = x_BNXT.shape[:4]
    x_BNT = x_BNXT.reshape(b, n, x * c, *x_BNXT.shape[4:])[:, :, :t]
    return jnp.moveaxis(x_BNT, 1, 2)


def chunk_masks(segment_ids_BT: Array | None, b: int, t: int, chunk_size: int) -> dict:
    """The run bookkeeping of the module docstring, (B, 1, X, chunk[, chunk]) bool (the 1
    broadcasts over heads): ``valid``, ``first`` (in the run entering the chunk), ``last`` (in the
    chunk's last run), ``same`` (j <= i, same run, both valid) and ``carry`` (B, 1, X)."""
    c = chunk_size
    tp = t + (-t % c)
    if segment_ids_BT is None:
        valid = jnp.broadcast_to(jnp.arange(tp) < t, (b, tp))
        reset = jnp.zeros((b, tp), bool)
    else:
        valid, reset = segment_flags(jnp.pad(segment_ids_BT, ((0, 0), (0, tp - t))), b, tp)
    x = tp // c
    run_BXT = jnp.cumsum(reset, axis=1, dtype=jnp.int32).reshape(b, x, c)
    valid_BXT = valid.reshape(b, x, c)
    run_last_BX = run_BXT[..., -1]
    run_prev_BX = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), run_last_BX[:, :-1]], axis=1)
    causal_TS = jnp.tril(jnp.ones((c, c), bool))
    same = ((run_BXT[..., :, None] == run_BXT[..., None, :]) & valid_BXT[..., :, None]
            & valid_BXT[..., None, :] & causal_TS)
    masks = dict(valid=valid_BXT, first=valid_BXT & (run_BXT == run_prev_BX[..., None]),
                 last=valid_BXT & (run_BXT == run_last_BX[..., None]), same=same,
                 carry=run_last_BX == run_prev_BX)
    return {name: m[:, None] for name, m in masks.items()}


def _chunk_arrays(q, k, v, g, beta, masks, *, scale, precision):
    """The scan-contract arrays of whole chunks: q, k (..., T, H), v (..., T, V), g (..., T) or
    (..., T, H), beta (..., T) or None, float32; ``masks`` as ``chunk_masks`` (broadcastable)."""
    valid, first, last, same, carry = (masks[n] for n in ("valid", "first", "last", "same",
                                                          "carry"))
    per_channel = g.ndim == q.ndim
    c, h = q.shape[-2], q.shape[-1]
    if per_channel:
        gc = jnp.cumsum(jnp.where(valid[..., None], g, 0.0), axis=-2)       # (..., T, H)
        gl = gc[..., -1:, :]                                                # (..., 1, H)
        causal = jnp.tril(jnp.ones((c, c), bool))[..., None]
        decay_TSH = jnp.exp(jnp.where(causal, gc[..., :, None, :] - gc[..., None, :, :], -jnp.inf))

        def product(x_TH, y_SH):                  # sum_h x_ih y_jh D_ijh on the same-run pairs
            xd_TSH = x_TH[..., :, None, :] * decay_TSH
            return jnp.where(same, jnp.einsum("...TSH,...SH->...TS", xd_TSH, y_SH,
                                              precision=precision), 0.0)
        eg_TH = jnp.exp(gc)
        kdec_TH = jnp.exp(jnp.where(last[..., None], gl - gc, -jnp.inf))
        e_H = jnp.where(carry[..., None], jnp.exp(gl[..., 0, :]), 0.0)
    else:
        gc = jnp.cumsum(jnp.where(valid, g, 0.0), axis=-1)                  # (..., T)
        gl = gc[..., -1:]
        decay_TS = jnp.exp(jnp.where(same, gc[..., :, None] - gc[..., None, :], -jnp.inf))

        def product(x_TH, y_SH):
            return jnp.einsum("...TH,...SH->...TS", x_TH, y_SH, precision=precision) * decay_TS
        eg_TH = jnp.exp(gc)[..., None]
        kdec_TH = jnp.exp(jnp.where(last, gl - gc, -jnp.inf))[..., None]
        e_H = jnp.broadcast_to(jnp.where(carry, jnp.exp(gl[..., 0]), 0.0)[..., None],
                               (*gl.shape[:-1], h))
    qs = q * scale
    qg = jnp.where(first[..., None], qs * eg_TH, 0.0)
    a = product(qs, k)
    kd = k * kdec_TH
    if beta is None:
        return qg, kd, None, jnp.where(valid[..., None], v, 0.0), a, e_H
    bt = jnp.where(valid, beta, 0.0)
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    l_TS = jnp.where(strict, bt[..., None] * product(k, k), 0.0)
    rhs = jnp.concatenate([bt[..., None] * v,
                           jnp.where(first, bt, 0.0)[..., None] * k * eg_TH], axis=-1)
    l_TS = jnp.broadcast_to(l_TS, (*rhs.shape[:-2], c, c))
    sol = lax.linalg.triangular_solve(l_TS, rhs, left_side=True, lower=True, unit_diagonal=True)
    u, w = sol[..., :v.shape[-1]], sol[..., v.shape[-1]:]
    return qg, kd, w, u, a, e_H


def prepare(q_BTNH: Array, k_BTNH: Array, v_BTNV: Array, g: Array, beta_BTN: Array | None, *,
            scale: float, segment_ids: Array | None, chunk_size: int,
            precision: jax.lax.PrecisionLike = None):
    """The scan-contract arrays ``(qg, kd, w, u, a, e)`` (module docstring) in the chunked layout
    (B, N, X, T, ...), float32, T padded to whole chunks with skipped tokens. ``w`` is None when
    ``beta`` is (linear attention)."""
    b, t = q_BTNH.shape[:2]
    c = chunk_size
    masks = chunk_masks(segment_ids, b, t, c)
    chunks = lambda x: None if x is None else to_chunks(x.astype(F32), c)  # noqa: E731
    q, k, v, gx, beta = (chunks(x) for x in (q_BTNH, k_BTNH, v_BTNV, g, beta_BTN))
    if g.ndim == 3:
        return _chunk_arrays(q, k, v, gx, beta, masks, scale=scale, precision=precision)

    # per channel: one chunk's (T, S, H) decay at a time, recomputed in the backward pass
    def one_chunk(xs):
        *data, ms = xs
        return _chunk_arrays(*data, ms, scale=scale, precision=precision)

    xmajor = lambda x: None if x is None else jnp.moveaxis(x, 2, 0)  # noqa: E731
    xs = (*(xmajor(x) for x in (q, k, v, gx, beta)),
          {name: xmajor(m) for name, m in masks.items()})
    out = lax.map(jax.checkpoint(one_chunk), xs)
    return tuple(None if x is None else jnp.moveaxis(x, 0, 2) for x in out)

"""The parallel part of the chunked form: ``prepare`` turns the op's inputs into the six arrays of
the scan contract (``reference.py``), per chunk, in float32.

Within a chunk (``gc`` the cumulative log decay from the chunk's start, ``g = 0`` at skipped
tokens; ``run`` the segment count ``cumsum(reset)`` along the row; ``run_prev`` the run of the
token before the chunk, ``run_last`` the run of its last position)::

    D_ij    = exp(gc_i - gc_j)           j <= i, same run, both valid (per key channel for KDA)
    L_ij    = beta_i k_i . (D_ij k_j)    j < i     the delta rule's intra-chunk coupling
    Tmat    = (I + L)^-1                           unit lower triangular (block inversion)
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

import functools

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


def unit_lower_inverse(l_TS: Array, leaf: int = 4,
                       precision: jax.lax.PrecisionLike = None) -> Array:
    """``(I + L)^-1`` for a strictly lower triangular ``L`` (..., T, T) (its upper part and
    diagonal are ignored), by recursive 2 x 2 block inversion::

        [[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]

    down to blocks of <= ``leaf`` (<= 4) rows, where ``L^4 = 0`` makes the inverse the finite
    series ``(I - L)(I + L^2)``: products of inverses and of at most the third power of a 4 x 4
    block, so no large power of L (stable where L's powers are not: repeated keys). Matrix
    products only: no LAPACK triangular solve, which is slower on CPU (about 9x for one batched
    solve of a whole chunk) and which deadlocked jax 0.10.2's CPU thread pool on a 2-core
    machine in the backward pass."""
    if not 1 <= leaf <= 4:
        raise ValueError(f"unit_lower_inverse: leaf={leaf} must lie in [1, 4] (L^4 = 0 there)")
    t = l_TS.shape[-1]
    dot = functools.partial(jnp.einsum, "...TS,...SV->...TV", precision=precision)
    if t <= leaf:
        l_TS = jnp.where(jnp.tril(jnp.ones((t, t), bool), -1), l_TS, 0.0)
        eye = jnp.eye(t, dtype=l_TS.dtype)
        return dot(eye - l_TS, eye + dot(l_TS, l_TS)) if t > 1 else jnp.ones_like(l_TS)
    h = t // 2
    a = unit_lower_inverse(l_TS[..., :h, :h], leaf, precision)
    b = unit_lower_inverse(l_TS[..., h:, h:], leaf, precision)
    c = -dot(dot(b, l_TS[..., h:, :h]), a)
    return jnp.concatenate([jnp.concatenate([a, jnp.zeros((*a.shape[:-1], t - h), a.dtype)], -1),
                            jnp.concatenate([c, b], -1)], -2)


def _sub_chunk(c: int) -> int:
    """The sub-chunk of the per-channel products: the largest divisor of ``c`` <= sqrt(c)."""
    return max(d for d in range(1, int(c ** 0.5) + 1) if c % d == 0)


def _channel_pairs(gc_TH: Array):
    """``pair(x, y)[i, j] = sum_h x_ih y_jh exp(gc_ih - gc_jh)`` for j <= i (0 above), x, y
    (..., T, H), with every exponent <= 0 (gc non-increasing along T). The chunk is cut into P
    sub-chunks of c positions; across sub-chunks the decay factors through the first position r
    of i's sub-chunk p and the last position e of j's sub-chunk s (j <= e < r <= i)::

        exp(gc_i - gc_j) = exp(gc_i - gc_r) exp(gc_r - gc_e) exp(gc_e - gc_j)

    three factors <= 1 ((T, H), (P, P, H), (T, H)) and a matrix product; only the diagonal
    sub-blocks build the (c, c, H) decay explicitly: T x (P + c) x H work instead of T x T x H."""
    t = gc_TH.shape[-2]
    c = _sub_chunk(t)
    p = t // c
    gc_PcH = gc_TH.reshape(*gc_TH.shape[:-2], p, c, gc_TH.shape[-1])
    first_PH, end_PH = gc_PcH[..., 0, :], gc_PcH[..., -1, :]
    to_first_PcH = jnp.exp(gc_PcH - first_PH[..., None, :])
    from_end_PcH = jnp.exp(end_PH[..., None, :] - gc_PcH)
    below_PP = jnp.tril(jnp.ones((p, p), bool), -1)[..., None]
    across_PPH = jnp.exp(jnp.where(below_PP, first_PH[..., :, None, :] - end_PH[..., None, :, :],
                                   -jnp.inf))
    causal_cc = jnp.tril(jnp.ones((c, c), bool))[..., None]
    within_PccH = jnp.exp(jnp.where(causal_cc, gc_PcH[..., :, None, :] - gc_PcH[..., None, :, :],
                                    -jnp.inf))
    same_block_PP = jnp.eye(p, dtype=bool)[:, None, :, None]

    def pair(x_TH, y_SH, precision):
        x_PcH = x_TH.reshape(gc_PcH.shape)
        y_PcH = y_SH.reshape(gc_PcH.shape)
        xa_PcPH = (x_PcH * to_first_PcH)[..., :, :, None, :] * across_PPH[..., :, None, :, :]
        off_PcPc = jnp.einsum("...PiQH,...QjH->...PiQj", xa_PcPH, y_PcH * from_end_PcH,
                              precision=precision)
        diag_Pcc = jnp.einsum("...PijH,...PjH->...Pij", x_PcH[..., :, :, None, :] * within_PccH,
                              y_PcH, precision=precision)
        full_PcPc = jnp.where(same_block_PP, diag_Pcc[..., :, :, None, :], off_PcPc)
        return full_PcPc.reshape(*x_TH.shape[:-2], t, t)
    return pair


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
        pair = _channel_pairs(gc)

        def product(x_TH, y_SH):                  # sum_h x_ih y_jh D_ijh on the same-run pairs
            return jnp.where(same, pair(x_TH, y_SH, precision), 0.0)
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
    sol = jnp.einsum("...TS,...SV->...TV", unit_lower_inverse(l_TS, precision=precision), rhs,
                     precision=precision)
    u, w = sol[..., :v.shape[-1]], sol[..., v.shape[-1]:]
    return qg, kd, w, u, a, e_H


def prepare_chunks(q, k, v, g, beta, masks, *, scale: float,
                   precision: jax.lax.PrecisionLike = None):
    """The scan-contract arrays ``(qg, kd, w, u, a, e)`` of inputs already in the chunked layout
    (B, N, X, T, ...) and float32 (``to_chunks``), ``masks`` those of ``chunk_masks`` for the same
    chunks. Every chunk is independent of the others: any run of whole chunks can be prepared
    alone, given its slice of the masks."""
    if g.ndim == q.ndim - 1:   # per head: all chunks at once
        return _chunk_arrays(q, k, v, g, beta, masks, scale=scale, precision=precision)

    # per channel: one chunk's (T, S, H) decay at a time, recomputed in the backward pass
    def one_chunk(xs):
        *data, ms = xs
        return _chunk_arrays(*data, ms, scale=scale, precision=precision)

    xmajor = lambda x: None if x is None else jnp.moveaxis(x, 2, 0)  # noqa: E731
    xs = (*(xmajor(x) for x in (q, k, v, g, beta)),
          {name: xmajor(m) for name, m in masks.items()})
    out = lax.map(jax.checkpoint(one_chunk), xs)
    return tuple(None if x is None else jnp.moveaxis(x, 0, 2) for x in out)


def prepare(q_BTNH: Array, k_BTNH: Array, v_BTNV: Array, g: Array, beta_BTN: Array | None, *,
            scale: float, segment_ids: Array | None, chunk_size: int,
            precision: jax.lax.PrecisionLike = None, masks: dict | None = None):
    """The scan-contract arrays ``(qg, kd, w, u, a, e)`` (module docstring) in the chunked layout
    (B, N, X, T, ...), float32, T padded to whole chunks with skipped tokens. ``w`` is None when
    ``beta`` is (linear attention). ``masks``: the chunks' ``chunk_masks`` when the caller has
    them already (a run of whole chunks cut from a longer row, whose masks depend on the tokens
    before it); then ``segment_ids`` is not read."""
    b, t = q_BTNH.shape[:2]
    c = chunk_size
    if masks is None:
        masks = chunk_masks(segment_ids, b, t, c)
    chunks = lambda x: None if x is None else to_chunks(x.astype(F32), c)  # noqa: E731
    return prepare_chunks(*(chunks(x) for x in (q_BTNH, k_BTNH, v_BTNV, g, beta_BTN)), masks,
                          scale=scale, precision=precision)

"""Spark attention (You et al., 2025, *Spark Transformer: Reactivating Sparsity in FFN and
Attention*, arXiv 2506.06644, NeurIPS 2025): a predictor on a low-dimensional slice of the query
and key picks each query's keys with the statistical top-k, and only those keys are attended.

The paper (Section 2: Spark Attention, written in the key-value form of its Spark FFN; its
text was not reachable from here, so the form below follows the abstract and published
summaries, and no equation numbers are quoted: ``docs/mechanisms.md``) splits each head's
query and key into the first ``r = predictor_dim`` coordinates (the predictor) and the rest,
and writes one query's output as

    Spark-Attention(q; K, V) = V . ( sigma1(Top_k(K1^T q[:r])) (.) sigma2(K2^T q[r:]) )

with ``sigma1`` the softmax and ``sigma2`` the softplus (its empirical choice). ``Top_k`` keeps the
selected entries and sends the others to minus infinity, so the softmax runs over the selected
keys only and every other key has weight exactly 0. The selection is the statistical top-k
(Section 3): with ``x`` the query's predictor scores over the keys it may see (``n`` of them),

    theta(x, k) = mean(x) + std(x) * Phi^{-1}(1 - k / n),      key j selected iff x_j >= theta

(``Phi^{-1}``: the standard normal quantile), which keeps about ``k`` keys when the scores are
roughly Gaussian, in linear time and without sorting. The paper soft-thresholds (``x - theta``)
before its nonlinearity; under the softmax this shift cancels, so the hard and the soft forms
are the same attention.

Choices the paper leaves open, made here (``docs/mechanisms.md``, section Spark):

* the statistics are over the keys the query may see (causal: keys at or before it; packed
  sequences: its own segment), ``std`` is the population one (divide by ``n``), and a query
  that sees ``n <= top_k`` keys selects all of them (``Phi^{-1}`` of a non-positive fraction);
  there is no cap: a query reads however many keys pass the threshold;
* the query is scaled by ``head_dim ** -0.5`` before the split (both parts, as a standard head);
* the threshold has no gradient (the selection is piecewise constant in the scores); gradients
  flow through the softmax of the selected predictor scores, the softplus and the values.

Implementations (the registry's ``spark`` op): ``reference`` builds the (T, S) scores, threshold
and mask (the masked-dense computation of the same pattern); ``xla`` (``auto``) runs in query
tiles against key tiles of ``block_k``: per query tile, one pass over the key tiles merges each
query's count, mean and squared deviations of the visible predictor scores (Chan's update), a
second is an online softmax over the selected keys; causal key tiles after every query of a
tile are skipped (``lax.cond``). The backward is a ``jax.custom_vjp`` that recomputes the tiles
from the saved threshold, row max and row sum (flash attention's rule: ``dS1 = P (dP - dout .
out)``). No (T, S) array is built, forward or backward; the predictor still scores every
visible (query, key) pair, O(T S r) work, which the definition needs (a threshold from
statistics of the whole row).

Incremental decoding (``decode=True``): the cache holds each head's K and V (and the float32
predictor key slices under a half-precision module). A chunk of at most ``GATHER_ROWS`` tokens
scores every cached predictor key (``decode_scored``), thresholds with the statistics of the
visible ones, compacts each query's selection into ``slots`` slots without sorting and
gathers only those keys and values (``decode_reads``); if some query selected more than the
slots hold, the step reads the whole cache masked instead (``lax.cond``, exact either way).
A longer chunk runs the streamed op over the cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cache, core, registry
from .core import Array, Dtype

OWNER = "SparkAttention"
BLOCK_K = 512  # keys per tile of the streamed (xla) path
GATHER_ROWS = 8  # decode chunks of at most this many tokens gather their selection
# the streamed path gathers the selection when the keys outnumber the slots this many times
# (XLA:CPU, T = 2048, top_k = 64: the masked path 3x faster; T = 16384, top_k = 64: the gathered
# 1.3x; T = 16384, top_k = 256 (512 slots): the masked 1.5 s, the gathered 15.4 s, its per-slot
# searches dominate)
GATHER_RATIO = 256


# ----------------------------------------------------------------------------- threshold


def threshold(count: Array, mean: Array, m2: Array, top_k: int) -> Array:
    """The statistical top-k threshold from a row's moments: ``count`` keys, their ``mean`` and
    ``m2`` (sum of squared deviations from the mean). ``mean + std * Phi^{-1}(1 - k/n)`` with the
    population std where ``n > top_k``; ``-inf`` (every visible key) where ``n <= top_k``."""
    n = count.astype(jnp.float32)
    more = n > top_k
    std = jnp.sqrt(jnp.maximum(m2, 0.0) / jnp.maximum(n, 1.0))
    z = jax.scipy.special.ndtri(jnp.where(more, 1.0 - top_k / jnp.maximum(n, 1.0), 0.5))
    return jnp.where(more, mean + std * z, -jnp.inf)


def _valid(q_pos_BT: Array, k_pos_S: Array, s_len: int, causal: bool, q_seg_BT: Array | None,
           k_seg_BS: Array | None) -> Array:
    """(B, 1, T, S) bool: query t may see key s (in range, causal rule on positions, segment)."""
    ok = (k_pos_S < s_len)[None, None, :]
    if causal:
        ok = ok & (k_pos_S[None, None, :] <= q_pos_BT[:, :, None])
    else:
        ok = jnp.broadcast_to(ok, (q_pos_BT.shape[0], q_pos_BT.shape[1], k_pos_S.shape[0]))
    ok = ok[:, None]
    return ok if q_seg_BT is None else ok & core.segment_keep(q_seg_BT, k_seg_BS)


def _split(q_BTNH: Array, k_BSNH: Array, v_BSNH: Array, r: int, scale: float,
           q_pred_BTNR: Array | None = None, k_pred_BSNR: Array | None = None):
    """Heads-first float32 (or wider) predictor / rest parts: q1, q2 (scaled), k1, k2, v.
    ``q_pred`` / ``k_pred`` (B, T|S, N, r), when given, replace the predictor slices (the
    module's float32 predictor projections under a half-precision module)."""
    f = core.softmax_dtype(q_BTNH.dtype)
    q = q_BTNH.astype(f).transpose(0, 2, 1, 3) * scale
    k = k_BSNH.astype(f).transpose(0, 2, 1, 3)
    v = v_BSNH.astype(core.softmax_dtype(v_BSNH.dtype)).transpose(0, 2, 1, 3)
    q1, k1 = q[..., :r], k[..., :r]
    if q_pred_BTNR is not None:
        f = jnp.promote_types(f, q_pred_BTNR.dtype)
        q1 = q_pred_BTNR.astype(f).transpose(0, 2, 1, 3) * scale
        k1 = k_pred_BSNR.astype(f).transpose(0, 2, 1, 3)
    return q1, q[..., r:], k1, k[..., r:], v


def _positions(q_pos_BT: Array | None, b: int, t: int, s: int) -> Array:
    """Query positions (B, T): given (decode), or the last T of S (``j <= i + S - T``)."""
    if q_pos_BT is not None:
        return q_pos_BT.astype(jnp.int32)
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))


# ----------------------------------------------------------------------------- reference


def spark_scores(q_BTNH: Array, k_BSNH: Array, *, predictor_dim: int, scale: float,
                 precision: core.Precision = None, q_pred_BTNR: Array | None = None,
                 k_pred_BSNR: Array | None = None) -> tuple[Array, Array]:
    """The (B, N, T, S) predictor scores ``q[:r] . k[:r]`` and the rest ``q[r:] . k[r:]`` (both
    times ``scale``), float32: the reference path's and ``spark_pattern``'s (T, S) arrays."""
    q1, q2, k1, k2, _ = _split(q_BTNH, k_BSNH, k_BSNH, predictor_dim, scale, q_pred_BTNR,
                               k_pred_BSNR)
    s1 = jnp.einsum("BNTR,BNSR->BNTS", q1, k1, precision=precision)
    s2 = jnp.einsum("BNTJ,BNSJ->BNTS", q2, k2, precision=precision)
    return s1, s2


def selection_from_scores(s1_BNTS: Array, valid: Array, top_k: int) -> Array:
    """(B, N, T, S) bool: the statistical top-k of the predictor scores over the ``valid`` keys
    (broadcastable (B, 1, T, S)) of each row."""
    valid = jnp.broadcast_to(valid, s1_BNTS.shape)
    count = valid.sum(-1)
    mean = jnp.where(valid, s1_BNTS, 0.0).sum(-1) / jnp.maximum(count, 1)
    m2 = jnp.where(valid, (s1_BNTS - mean[..., None]) ** 2, 0.0).sum(-1)
    theta = jax.lax.stop_gradient(threshold(count, mean, m2, top_k))
    return valid & (s1_BNTS >= theta[..., None])


@registry.register("spark", "reference")
def spark_reference(q_BTNH, k_BSNH, v_BSNH, *, top_k, predictor_dim, scale, causal,
                    q_pos_BT=None, q_seg_BT=None, k_seg_BS=None, block_k=BLOCK_K,
                    precision=None, q_pred_BTNR=None, k_pred_BSNR=None, slots=None):
    """The masked-dense path: (T, S) scores, statistics, threshold and mask, then
    ``softmax(s1 over the selection) * softplus(s2)`` times V. Returns (B, T, N, H)."""
    del block_k, slots
    b, t, _, _ = q_BTNH.shape
    s = k_BSNH.shape[1]
    s1, s2 = spark_scores(q_BTNH, k_BSNH, predictor_dim=predictor_dim, scale=scale,
                          precision=precision, q_pred_BTNR=q_pred_BTNR, k_pred_BSNR=k_pred_BSNR)
    valid = _valid(_positions(q_pos_BT, b, t, s), jnp.arange(s), s, causal, q_seg_BT, k_seg_BS)
    sel = selection_from_scores(s1, valid, top_k)
    w = core.masked_softmax(s1, sel) * jax.nn.softplus(s2)
    v = v_BSNH.astype(w.dtype)
    out = jnp.einsum("BNTS,BSNH->BTNH", w, v, precision=precision)
    return out.astype(v_BSNH.dtype)


# ----------------------------------------------------------------------------- streamed


@dataclasses.dataclass(frozen=True)
class _Cfg:
    top_k: int
    causal: bool
    block_q: int
    block_k: int
    s_len: int
    precision: object = None


def _tiles(a_BNSX: Array, bk: int) -> Array:
    """(B, N, S, X) -> (nt, B, N, bk, X), zero-padded to whole tiles."""
    b, n, s, x = a_BNSX.shape
    nt = -(-s // bk)
    a = jnp.pad(a_BNSX, ((0, 0), (0, 0), (0, nt * bk - s), (0, 0)))
    return a.reshape(b, n, nt, bk, x).transpose(2, 0, 1, 3, 4)


def _untile(a_tBNKX: Array, s: int) -> Array:
    """(nt, B, N, bk, ...) -> (B, N, S, ...)."""
    nt, b, n, bk = a_tBNKX.shape[:4]
    a = jnp.moveaxis(a_tBNKX, 0, 2)
    return a.reshape(b, n, nt * bk, *a_tBNKX.shape[4:])[:, :, :s]


def _row_tiles(a_BT: Array | None, bt: int, fill: int) -> Array | None:
    """(B, T) int -> (nt, B, bt), padded with ``fill``."""
    if a_BT is None:
        return None
    b, t = a_BT.shape
    nt = -(-t // bt)
    return jnp.pad(a_BT, ((0, 0), (0, nt * bt - t)), constant_values=fill).reshape(
        b, nt, bt).swapaxes(0, 1)


def _live(cfg: _Cfg, q_pos_BT: Array, k_pos: Array) -> Array | None:
    """Whether a (query tile, key tile) pair has a visible key (None: always, bidirectional):
    a causal tile entirely after every query is skipped (``lax.cond``)."""
    return k_pos[0] <= jnp.max(q_pos_BT) if cfg.causal else None


def _maybe(live: Array | None, fn, skip, operand):
    return fn(operand) if live is None else jax.lax.cond(live, fn, skip, operand)


def _tile_scores(cfg: _Cfg, q1, q2, k1t, k2t, kpos, kseg, q_pos_BT, q_seg_BT):
    """One (query tile, key tile): predictor and rest scores (B, N, bq, bk), visibility."""
    p = cfg.precision
    s1 = jnp.einsum("BNTR,BNSR->BNTS", q1, k1t, precision=p)
    s2 = jnp.einsum("BNTJ,BNSJ->BNTS", q2, k2t, precision=p)
    valid = _valid(q_pos_BT, kpos, cfg.s_len, cfg.causal, q_seg_BT, kseg)
    return s1, s2, valid


def _query_tile_threshold(cfg: _Cfg, q1, q_pos, q_seg, keys):
    """One query tile's thresholds (B, N, bq): the visible predictor scores' count, mean and
    squared deviations merged key tile by key tile (Chan et al.'s pairwise update)."""
    k1t, _, _, kpos, kseg = keys
    zero = jnp.zeros(q1.shape[:3], q1.dtype)

    def moments(carry, xs):
        k1_t, pos_t, seg_t = xs

        def add(c):
            n_a, mean_a, m2_a = c
            s1 = jnp.einsum("BNTR,BNSR->BNTS", q1, k1_t, precision=cfg.precision)
            valid = jnp.broadcast_to(
                _valid(q_pos, pos_t, cfg.s_len, cfg.causal, q_seg, seg_t), s1.shape)
            n_b = valid.sum(-1).astype(q1.dtype)
            mean_b = jnp.where(valid, s1, 0.0).sum(-1) / jnp.maximum(n_b, 1.0)
            m2_b = jnp.where(valid, (s1 - mean_b[..., None]) ** 2, 0.0).sum(-1)
            n = n_a + n_b
            delta = mean_b - mean_a
            frac = n_b / jnp.maximum(n, 1.0)
            return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac

        return _maybe(_live(cfg, q_pos, pos_t), add, lambda c: c, carry), None

    (count, mean, m2), _ = jax.lax.scan(moments, (zero, zero, zero), (k1t, kpos, kseg))
    return threshold(count, mean, m2, cfg.top_k)


def _query_tile_forward(cfg: _Cfg, q1, q2, q_pos, q_seg, keys):
    """One query tile against every key tile, masked: (out (B, N, bq, H), theta, row max, row
    sum). After the threshold, an online softmax over the keys at or above it."""
    k1t, k2t, vt, kpos, kseg = keys
    shape = q1.shape[:3]
    zero = jnp.zeros(shape, q1.dtype)
    theta = _query_tile_threshold(cfg, q1, q_pos, q_seg, keys)
    fill = core.mask_value(q1.dtype)

    def attend(carry, xs):
        k1_t, k2_t, v_t, pos_t, seg_t = xs

        def add(c):
            m_a, l_a, acc_a = c
            s1, s2, valid = _tile_scores(cfg, q1, q2, k1_t, k2_t, pos_t, seg_t, q_pos, q_seg)
            sel = valid & (s1 >= theta[..., None])
            m = jnp.maximum(m_a, jnp.max(jnp.where(sel, s1, fill), axis=-1))
            p = jnp.where(sel, jnp.exp(s1 - m[..., None]), 0.0)
            corr = jnp.exp(m_a - m)
            w = p * jax.nn.softplus(s2)
            acc = acc_a * corr[..., None] + jnp.einsum("BNTS,BNSH->BNTH", w, v_t,
                                                        precision=cfg.precision)
            return m, l_a * corr + p.sum(-1), acc

        return _maybe(_live(cfg, q_pos, pos_t), add, lambda c: c, carry), None

    init = (jnp.full(shape, fill, q1.dtype), zero, jnp.zeros((*shape, vt.shape[-1]), vt.dtype))
    (m, l, acc), _ = jax.lax.scan(attend, init, (k1t, k2t, vt, kpos, kseg))
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
    return out, theta, m, l


def _query_tile_backward(cfg: _Cfg, q1, q2, q_pos, q_seg, out, theta, m, l, dout, keys):
    """Gradients of one query tile: (dq1, dq2) and per key tile (dk1, dk2, dv), recomputing the
    tiles from the saved threshold, row max and row sum (flash attention's rule:
    ``dS1 = P (dP - dout . out)``, here ``dP = g dW`` and ``dS2 = P dW sigmoid(s2)``)."""
    k1t, k2t, vt, kpos, kseg = keys
    d_row = (dout * out).sum(-1)  # sum_l P_l dP_l = dout . out
    inv_l = 1.0 / jnp.where(l == 0.0, 1.0, l)
    p_ = cfg.precision

    def body(carry, xs):
        k1_t, k2_t, v_t, pos_t, seg_t = xs

        def grads(c):
            dq1, dq2 = c
            s1, s2, valid = _tile_scores(cfg, q1, q2, k1_t, k2_t, pos_t, seg_t, q_pos, q_seg)
            sel = valid & (s1 >= theta[..., None])
            p = jnp.where(sel, jnp.exp(s1 - m[..., None]) * inv_l[..., None], 0.0)
            g = jax.nn.softplus(s2)
            dv_t = jnp.einsum("BNTS,BNTH->BNSH", p * g, dout, precision=p_)
            dw = jnp.einsum("BNTH,BNSH->BNTS", dout, v_t, precision=p_)
            ds1 = p * (dw * g - d_row[..., None])
            ds2 = dw * p * jax.nn.sigmoid(s2)
            dq1 = dq1 + jnp.einsum("BNTS,BNSR->BNTR", ds1, k1_t, precision=p_)
            dq2 = dq2 + jnp.einsum("BNTS,BNSJ->BNTJ", ds2, k2_t, precision=p_)
            dk1_t = jnp.einsum("BNTS,BNTR->BNSR", ds1, q1, precision=p_)
            dk2_t = jnp.einsum("BNTS,BNTJ->BNSJ", ds2, q2, precision=p_)
            return (dq1, dq2), (dk1_t, dk2_t, dv_t)

        def skip(c):
            return c, (jnp.zeros_like(k1_t), jnp.zeros_like(k2_t), jnp.zeros_like(v_t))

        return _maybe(_live(cfg, q_pos, pos_t), grads, skip, carry)

    return jax.lax.scan(body, (jnp.zeros_like(q1), jnp.zeros_like(q2)),
                        (k1t, k2t, vt, kpos, kseg))


def _keys(cfg: _Cfg, k1, k2, v, k_seg_BS):
    """Key tiles: k1, k2, v (nt, B, N, bk, .), positions (nt, bk), segment ids (nt, B, bk)."""
    bk = cfg.block_k
    nt = -(-k1.shape[2] // bk)
    pos = jnp.arange(nt * bk, dtype=jnp.int32).reshape(nt, bk)
    return (_tiles(k1, bk), _tiles(k2, bk), _tiles(v, bk), pos, _row_tiles(k_seg_BS, bk, 0))


def _queries(cfg: _Cfg, q1, q2, q_pos_BT, q_seg_BT):
    """Query tiles (nq, B, N, bq, .), positions (padded queries at -1: they see no key when
    causal) and segment ids (padded 0: padding, which sees no key)."""
    bq = cfg.block_q
    return (_tiles(q1, bq), _tiles(q2, bq), _row_tiles(q_pos_BT, bq, -1),
            _row_tiles(q_seg_BT, bq, 0))


def _forward(cfg: _Cfg, q1, q2, k1, k2, v, q_pos_BT, q_seg_BT, k_seg_BS):
    keys = _keys(cfg, k1, k2, v, k_seg_BS)

    def tile(_, xs):
        return None, _query_tile_forward(cfg, *xs, keys)

    _, res = jax.lax.scan(tile, None, _queries(cfg, q1, q2, q_pos_BT, q_seg_BT))
    return res  # (out, theta, m, l), each in query tiles (nq, B, N, bq, ...)


@functools.partial(jax.custom_vjp, nondiff_argnames=("cfg",))
def _spark_streamed(q1, q2, k1, k2, v, q_pos_BT, q_seg_BT, k_seg_BS, cfg):
    out = _forward(cfg, q1, q2, k1, k2, v, q_pos_BT, q_seg_BT, k_seg_BS)[0]
    return _untile(out, q1.shape[2])


def _spark_fwd(q1, q2, k1, k2, v, q_pos_BT, q_seg_BT, k_seg_BS, cfg):
    res = _forward(cfg, q1, q2, k1, k2, v, q_pos_BT, q_seg_BT, k_seg_BS)
    return (_untile(res[0], q1.shape[2]),
            (q1, q2, k1, k2, v, q_pos_BT, q_seg_BT, k_seg_BS, res))


def _spark_bwd(cfg, res, dout):
    q1, q2, k1, k2, v, q_pos_BT, q_seg_BT, k_seg_BS, (out, theta, m, l) = res
    keys = _keys(cfg, k1, k2, v, k_seg_BS)
    qs = _queries(cfg, q1, q2, q_pos_BT, q_seg_BT)

    def tile(acc, xs):
        q1_t, q2_t, pos_t, seg_t, out_t, theta_t, m_t, l_t, dout_t = xs
        (dq1, dq2), (dk1, dk2, dv) = _query_tile_backward(
            cfg, q1_t, q2_t, pos_t, seg_t, out_t, theta_t, m_t, l_t, dout_t, keys)
        return (acc[0] + dk1, acc[1] + dk2, acc[2] + dv), (dq1, dq2)

    zeros = tuple(jnp.zeros_like(a) for a in keys[:3])
    (dk1, dk2, dv), (dq1, dq2) = jax.lax.scan(
        tile, zeros, (*qs, out, theta, m, l, _tiles(dout, cfg.block_q)))
    t, s = q1.shape[2], k1.shape[2]
    return (_untile(dq1, t), _untile(dq2, t), _untile(dk1, s), _untile(dk2, s), _untile(dv, s),
            None, None, None)


_spark_streamed.defvjp(_spark_fwd, _spark_bwd)


def _query_tile_collect(cfg: _Cfg, q1, q_pos, q_seg, theta, keys, slots: int):
    """One query tile's selection, compacted: (count (B, N, bq) int32, keys (B, N, bq, slots)
    int32, -1 in empty slots), key tile by key tile with a running count (no sort); keys past
    ``slots`` are counted and dropped (the caller falls back when any count exceeds it)."""
    k1t, _, _, kpos, kseg = keys

    def body(carry, xs):
        k1_t, pos_t, seg_t = xs

        def add(c):
            cnt, idx = c
            s1 = jnp.einsum("BNTR,BNSR->BNTS", q1, k1_t, precision=cfg.precision)
            sel = _valid(q_pos, pos_t, cfg.s_len, cfg.causal, q_seg, seg_t) & (
                s1 >= theta[..., None])
            # slot m takes the tile's (m - cnt + 1)-th selected key: the first position where
            # the tile's running count reaches that rank (a binary search per slot, no scatter)
            run = jnp.cumsum(sel, axis=-1, dtype=jnp.int32)
            rank = jnp.arange(1, slots + 1, dtype=jnp.int32) - cnt[..., None]
            at = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="left"))(
                run.reshape(-1, run.shape[-1]), rank.reshape(-1, slots)).reshape(rank.shape)
            here = (rank >= 1) & (rank <= run[..., -1:])
            idx = jnp.where(here, pos_t[0] + at.astype(jnp.int32), idx)
            return cnt + run[..., -1], idx

        return _maybe(_live(cfg, q_pos, pos_t), add, lambda c: c, carry), None

    init = (jnp.zeros(q1.shape[:3], jnp.int32), jnp.full((*q1.shape[:3], slots), -1, jnp.int32))
    return jax.lax.scan(body, init, (k1t, kpos, kseg))[0]


def _take(a_BNSX: Array, idx_BNTM: Array) -> Array:
    """Rows of (B, N, S, X) at (B, N, T, M) -> (B, N, T, M, X) (only those rows are read)."""
    return jax.vmap(jax.vmap(lambda a, i: a[i]))(a_BNSX, idx_BNTM)


def _attend_slots(q1, q2, k1, k2, v, idx, precision):
    """One query tile over its gathered selection ``idx`` (B, N, bq, M), -1 empty: softmax of
    the predictor scores over the slots times softplus of the rest, times the values."""
    ok = idx >= 0
    safe = jnp.maximum(idx, 0)
    s1 = jnp.einsum("BNTR,BNTMR->BNTM", q1, _take(k1, safe), precision=precision)
    s2 = jnp.einsum("BNTJ,BNTMJ->BNTM", q2, _take(k2, safe), precision=precision)
    w = jnp.where(ok, core.masked_softmax(s1, ok) * jax.nn.softplus(s2), 0.0)
    return jnp.einsum("BNTM,BNTMH->BNTH", w, _take(v, safe), precision=precision)


def _spark_gathered(cfg: _Cfg, slots: int, q1, q2, k1, k2, v, q_pos_BT, q_seg_BT, k_seg_BS):
    """The selection compacted into ``slots`` keys per query, then attention over the gathered
    keys only (O(T slots H) for the softplus factor and the values instead of O(T S H));
    gradients by autodiff through the gathers, each query tile rematerialised. A call where
    some query selects more than ``slots`` keys runs the masked streamed path instead."""
    sg = jax.lax.stop_gradient
    keys = _keys(cfg, sg(k1), sg(k2[..., :0]), sg(v[..., :0]), k_seg_BS)

    def select(_, xs):
        q1_t, _, pos_t, seg_t = xs
        theta = _query_tile_threshold(cfg, q1_t, pos_t, seg_t, keys)
        return None, _query_tile_collect(cfg, q1_t, pos_t, seg_t, theta, keys, slots)

    qs = _queries(cfg, sg(q1), sg(q2[..., :0]), q_pos_BT, q_seg_BT)
    _, (count, idx) = jax.lax.scan(select, None, qs)

    def gathered(args):
        q1_, q2_, k1_, k2_, v_ = args
        attend = jax.checkpoint(functools.partial(_attend_slots, precision=cfg.precision))

        def tile(_, xs):
            return None, attend(xs[0], xs[1], k1_, k2_, v_, xs[2])

        bq = cfg.block_q
        _, out = jax.lax.scan(tile, None, (_tiles(q1_, bq), _tiles(q2_, bq), idx))
        return _untile(out, q1_.shape[2])

    def masked(args):
        return _spark_streamed(*args, q_pos_BT, q_seg_BT, k_seg_BS, cfg=cfg)

    return jax.lax.cond(jnp.any(count > slots), masked, gathered, (q1, q2, k1, k2, v))


@registry.register("spark", "xla")
def spark_xla(q_BTNH, k_BSNH, v_BSNH, *, top_k, predictor_dim, scale, causal, q_pos_BT=None,
              q_seg_BT=None, k_seg_BS=None, block_k=BLOCK_K, precision=None, q_pred_BTNR=None,
              k_pred_BSNR=None, slots=None):
    """The streamed path: query tiles against key tiles of ``block_k`` (no (T, S) array,
    forward or backward; causal tiles after every query of a tile are skipped). With ``slots``
    and at least ``GATHER_RATIO`` times more keys, each query's selection is compacted into
    that many slots and only those keys are read for the softplus factor and the values
    (``_spark_gathered``); otherwise the masked online softmax. Returns (B, T, N, H)."""
    b, t, _, _ = q_BTNH.shape
    s = k_BSNH.shape[1]
    q1, q2, k1, k2, v = _split(q_BTNH, k_BSNH, v_BSNH, predictor_dim, scale, q_pred_BTNR,
                               k_pred_BSNR)
    f = jnp.promote_types(q1.dtype, v.dtype)
    q1, q2, k1, k2, v = (a.astype(f) for a in (q1, q2, k1, k2, v))
    cfg = _Cfg(top_k, causal, min(block_k, t), min(block_k, s), s, precision)
    q_pos_BT = _positions(q_pos_BT, b, t, s)
    if slots is not None and s >= GATHER_RATIO * slots:
        out = _spark_gathered(cfg, slots, q1, q2, k1, k2, v, q_pos_BT, q_seg_BT, k_seg_BS)
    else:
        out = _spark_streamed(q1, q2, k1, k2, v, q_pos_BT, q_seg_BT, k_seg_BS, cfg=cfg)
    return out.transpose(0, 2, 1, 3).astype(v_BSNH.dtype)


# ----------------------------------------------------------------------------- pattern


def spark_pattern(q_BTNH: Array, k_BSNH: Array, *, top_k: int, predictor_dim: int,
                  causal: bool = True, scale: float | None = None,
                  segment_ids: Array | None = None) -> Array:
    """(B, N, T, S) bool: the keys each head's queries read (the statistical top-k of the
    predictor scores over the visible keys), from projected (B, T, N, H) queries and
    (B, S, N, H) keys; ``scale`` defaults to ``head_dim ** -0.5``. Builds (T, S) arrays: for
    inspection and figures (``SparkAttention.selection`` takes the module's input)."""
    b, t, _, h = q_BTNH.shape
    s = k_BSNH.shape[1]
    scale = h ** -0.5 if scale is None else scale
    s1, _ = spark_scores(q_BTNH, k_BSNH, predictor_dim=predictor_dim, scale=scale)
    valid = _valid(_positions(None, b, t, s), jnp.arange(s), s, causal, segment_ids, segment_ids)
    return selection_from_scores(s1, valid, top_k)


# ----------------------------------------------------------------------------- decode


def compact(sel_XS: Array, slots: int) -> Array:
    """(..., slots) int32: the positions of each row's selected keys (``sel_XS`` (..., S) bool),
    in key order, without sorting (a running count places each); -1 in unused slots, and a row
    with more than ``slots`` keys keeps its first ``slots`` (the caller checks the counts)."""
    s = sel_XS.shape[-1]
    rows = sel_XS.reshape(-1, s)
    place = jnp.where(rows, jnp.cumsum(rows, axis=-1, dtype=jnp.int32) - 1, slots)

    def one(place_S):
        return jnp.full((slots,), -1, jnp.int32).at[place_S].set(
            jnp.arange(s, dtype=jnp.int32), mode="drop")

    return jax.vmap(one)(place).reshape(*sel_XS.shape[:-1], slots)


def attend_gathered(q2_BNTJ: Array, s1_BNTS: Array, k_BSNH: Array, v_BSNH: Array,
                    idx_BNTM: Array, r: int, scale: float, precision=None) -> Array:
    """One decode chunk over its gathered selection: ``idx_BNTM`` (-1: empty slot) indexes the
    cached keys and values (B, S, N, H) of each head; the predictor scores come from ``s1``
    (already computed), the rest ``q2 . k2`` from the gathered keys. Returns (B, N, T, H)."""
    b, n = idx_BNTM.shape[:2]
    ok = idx_BNTM >= 0
    safe = jnp.maximum(idx_BNTM, 0)
    bi = jnp.arange(b)[:, None, None, None]
    ni = jnp.arange(n)[None, :, None, None]
    k_g = k_BSNH[bi, safe, ni]  # (B, N, T, M, H): only the selected rows are read
    v_g = v_BSNH[bi, safe, ni]
    f = s1_BNTS.dtype
    s1 = jnp.take_along_axis(s1_BNTS, safe, axis=-1)
    s2 = jnp.einsum("BNTJ,BNTMJ->BNTM", q2_BNTJ, k_g[..., r:].astype(f),
                    precision=precision) * scale
    w = core.masked_softmax(s1, ok) * jax.nn.softplus(s2)
    w = jnp.where(ok, w, 0.0)
    v_g = jnp.where(ok[..., None], v_g.astype(f), 0.0)
    return jnp.einsum("BNTM,BNTMH->BNTH", w, v_g, precision=precision)


# ----------------------------------------------------------------------------- module

SparkImpl = Literal["auto", "reference", "xla"]


class SparkAttention(nn.Module):
    """Spark attention (You et al., 2025, arXiv 2506.06644, Section 2's Spark Attention and
    Section 3's statistical top-k): each head's query and key are split into a predictor slice
    (the first ``predictor_dim`` coordinates) and the rest; the predictor scores ``q1 . k1``
    select the keys above ``mean + std * Phi^{-1}(1 - top_k / n)`` of the query's ``n`` visible
    keys (all of them when ``n <= top_k``), and the output is
    ``sum_j softmax_j(q1 . k1_j) * softplus(q2 . k2_j) * v_j`` over the selected keys.

    Args: ``dim``, ``num_heads``, ``top_k`` (the k of the statistical top-k: about that many keys
    per query), ``predictor_dim`` (r, 1 <= r < head_dim), ``causal`` (True); ``bias`` of the
    projections; ``impl`` (``auto``/``reference``/``xla``: the registry's ``spark`` op; changes
    no variable); ``block_k`` (keys per tile of the streamed path); ``dtype``/``param_dtype``;
    ``precision``; ``selector_dtype`` (default float32: under a narrower (half-precision)
    module the predictor slices of q and k are recomputed from the same weights in it, so the selection
    and the softmax logits are float32's, as DSA's selector; None: the module's dtype);
    ``decode``; ``slots`` (default 2 top_k): the keys a query's selection is gathered into
    (the streamed path and a decode step read only those for the softplus factor and the
    values; a call in which some query selects more runs the masked path, exactly the same
    attention). Parameters: ``qkv`` (dim -> 3 dim, heads contiguous: q, k, v)
    and ``proj``, as ``StandardAttention``.

    ``decode=True`` (causal only): the cache holds every head's K and V (``key``, ``value``); a
    step scores the chunk's predictor queries against all cached keys, takes the statistics of
    the visible ones and attends over the selected keys (every cached key is scored and read;
    the weights outside the selection are exactly 0).
    """

    dim: int
    num_heads: int
    top_k: int
    predictor_dim: int
    causal: bool = True
    bias: bool = False
    impl: SparkImpl = "auto"
    block_k: int = BLOCK_K
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    selector_dtype: Dtype | None = jnp.float32
    decode: bool = False
    slots: int | None = None

    @property
    def num_slots(self) -> int:
        """Keys a query's selection is gathered into (``slots``, default 2 top_k)."""
        return 2 * self.top_k if self.slots is None else self.slots

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def _selector(self, dtype: Dtype) -> Dtype | None:
        """The predictor's own dtype when it is wider than the computation's (``dtype``)."""
        if self.selector_dtype is None or (jnp.promote_types(self.selector_dtype, dtype)
                                           == jnp.dtype(dtype)):
            return None
        return self.selector_dtype

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every head (the predictor
        reads the first ``predictor_dim`` coordinates of K; the float32 copy of those that a
        half-precision module keeps, ``num_heads * predictor_dim`` floats, is a precision
        option that ``cache_bytes`` counts)."""
        return float(2 * self.dim * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache: K and V of every head in ``dtype``, the index and, when
        ``selector_dtype`` differs from ``dtype``, the predictor key slices in it."""
        sel = self._selector(dtype)
        extra = 0 if sel is None else cache.nbytes(
            (batch, max_len, self.num_heads, self.predictor_dim), sel)
        return cache.dense_cache_bytes(batch, max_len, self.num_heads, self.head_dim,
                                       self.head_dim, dtype) + extra

    def decode_reads(self, n: int) -> int:
        """Cached tokens whose keys and values one decode query reads at cache length ``n``:
        its selection, about ``min(top_k, n)`` (the statistical top-k's target; a step where
        some query selects more than ``num_slots`` keys reads every cached key, masked)."""
        return min(self.top_k, int(n))

    def decode_scored(self, n: int) -> int:
        """Predictor keys scored per decode query at cache length ``n``: all ``n`` (the
        statistics and the threshold need every visible score)."""
        return int(n)

    def setup(self) -> None:
        registry.check(OWNER, "spark", self.impl)
        core.check_positive(OWNER, dim=self.dim, num_heads=self.num_heads, top_k=self.top_k,
                            predictor_dim=self.predictor_dim, block_k=self.block_k,
                            slots=self.num_slots)
        core.check_divisible(OWNER, ("dim", self.dim), ("num_heads", self.num_heads))
        if self.predictor_dim >= self.head_dim:
            raise ValueError(f"{OWNER}: predictor_dim={self.predictor_dim} must be < head_dim="
                             f"{self.head_dim} (dim={self.dim} // num_heads={self.num_heads}): "
                             f"the rest of the query and key forms the softplus factor")
        cache.check_causal(OWNER, self.decode, self.causal)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.qkv = core.Linear(3 * self.dim, axes=("embed", "qkv"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def _qkv(self, x: Array) -> tuple[Array, ...]:
        """q, k, v (B, T, N, H) in the computation dtype, and the predictor slices of q and k
        (B, T, N, r) recomputed in ``selector_dtype`` (None when that is the computation dtype:
        the op slices q and k)."""
        b, t, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        sel = self._selector(qkv.dtype)
        if sel is None:
            return q.reshape(shape), k.reshape(shape), v.reshape(shape), None, None
        params = nn.unbox(self.qkv.variables["params"])
        r, hd = self.predictor_dim, self.head_dim
        w = params["kernel"].reshape(self.dim, 3, self.num_heads, hd)[:, :2, :, :r]
        pred = jnp.einsum("BTD,DCNR->BTCNR", x.astype(sel), w.astype(sel),
                          precision=self.precision)
        if self.bias:
            pred = pred + params["bias"].reshape(3, self.num_heads, hd)[:2, :, :r].astype(sel)
        return (q.reshape(shape), k.reshape(shape), v.reshape(shape), pred[:, :, 0],
                pred[:, :, 1])

    def _op(self, q, k, v, **kw) -> Array:
        return registry.call(OWNER, "spark", self.impl, q, k, v, top_k=self.top_k,
                             predictor_dim=self.predictor_dim, scale=self.head_dim ** -0.5,
                             causal=self.causal, block_k=self.block_k, precision=self.precision,
                             slots=self.num_slots, **kw)

    def __call__(self, x: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, lengths: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D).

        ``segment_ids`` (B, T) int: packed sequences (a token's statistics, selection and
        attention run over its own segment's visible keys; id 0 is padding, read by no token,
        its inputs zeroed first). ``positions`` is validated and unused (no RoPE). With
        ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``segment_ids`` and ``positions`` are refused.
        """
        core.check_input(x, self.dim, OWNER)
        cache.check_options(OWNER, decode=self.decode, lengths=lengths, segment_ids=segment_ids,
                            positions=positions)
        if self.decode:
            return self._decode_step(x, lengths)
        seg, _ = core.check_packing(OWNER, x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        q, k, v, q1, k1 = self._qkv(x)
        out = self._op(q, k, v, q_seg_BT=seg, k_seg_BS=seg, q_pred_BTNR=q1, k_pred_BSNR=k1)
        return self.proj(out.reshape(b, t, self.dim))

    def selection(self, x: Array, *, segment_ids: Array | None = None) -> Array:
        """(B, N, T, T) bool: the keys each head's queries read for input ``x`` (call with
        ``m.apply(variables, x, method="selection")``). Builds (T, T) arrays."""
        core.check_input(x, self.dim, OWNER)
        seg, _ = core.check_packing(OWNER, x, segment_ids, None)
        q, k, _, q1, k1 = self._qkv(core.mask_padding(x, seg))
        if q1 is not None:
            q, k = q1, k1
        return spark_pattern(q, k, top_k=self.top_k, predictor_dim=self.predictor_dim,
                             causal=self.causal, scale=self.head_dim ** -0.5, segment_ids=seg)

    def _decode_step(self, x: Array, lengths: Array | None) -> Array:
        """Append the chunk's K and V; each chunk query thresholds its predictor scores over
        the visible cached keys and attends over the selected ones."""
        step = cache.begin(self, OWNER, x, lengths, sized_by="key")
        b, n, _ = step.x.shape
        q, k, v, q1, k1 = self._qkv(step.x)
        k_BSNH = step.append("key", k)
        v_BSNH = step.append("value", v)
        k1_BSNR = None if k1 is None else step.append("predictor_key", k1)
        if step.initializing:
            return step.finish(self.proj(jnp.zeros((b, n, self.dim), q.dtype)))
        if n > GATHER_ROWS:
            # a long chunk (a prompt): the streamed op over the cache's key tiles; positions
            # past a row's end are not visible (the causal rule on the chunk's positions)
            out = self._op(q, k_BSNH, v_BSNH, q_pos_BT=step.pos_BT, q_pred_BTNR=q1,
                           k_pred_BSNR=k1_BSNR)
            return step.finish(self.proj(out.reshape(b, n, self.dim)))
        # a short chunk: score every cached predictor key (decode_scored), threshold with the
        # statistics of the visible ones, then read the selected keys and values only
        k_BSNH, v_BSNH = jax.lax.optimization_barrier((k_BSNH, v_BSNH))
        scale, r = self.head_dim ** -0.5, self.predictor_dim
        q1_, q2_, _, _, _ = _split(q, q, q, r, scale, q1, q1)
        k1_src = k_BSNH[..., :r] if k1_BSNR is None else k1_BSNR
        f = jnp.promote_types(q1_.dtype, k1_src.dtype)
        s1 = jnp.einsum("BNTR,BSNR->BNTS", q1_.astype(f), k1_src.astype(f),
                        precision=self.precision)
        sel = selection_from_scores(s1, step.keep()[:, None], self.top_k)
        slots = min(self.num_slots, step.max_len)
        idx = compact(sel, slots)

        def gathered(_):
            return attend_gathered(q2_, s1, k_BSNH, v_BSNH, idx, r, 1.0, self.precision)

        def masked(_):  # some query selected more than the slots hold: read every key, masked
            k2 = k_BSNH[..., r:].astype(f)
            s2 = jnp.einsum("BNTJ,BSNJ->BNTS", q2_.astype(f), k2, precision=self.precision)
            w = core.masked_softmax(s1, sel) * jax.nn.softplus(s2)
            return jnp.einsum("BNTS,BSNH->BNTH", w, v_BSNH.astype(f), precision=self.precision)

        out = jax.lax.cond(jnp.any(sel.sum(-1) > slots), masked, gathered, None)
        out = out.transpose(0, 2, 1, 3).astype(v.dtype)
        return step.finish(self.proj(out.reshape(b, n, self.dim)))

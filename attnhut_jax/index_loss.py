"""Token-level index losses in memory linear in T: the losses that train a lightning indexer
(DeepSeekSparseAttention, CompressedSparseAttention) without a (T, S) array.

Both fit the indexer scores ``I[t, s] = sum_i w[t, i] * ReLU(qi[t, i] . ki[s])`` to the main
attention, a constant target (only ``qi``, ``ki`` and ``w`` receive gradient; the main ``q``,
``k`` and ``sink`` get zero cotangents, as attnhut's ``stop_gradient``):

* ``dense_index_loss``: attnhut's ``dsa_index_aux_loss(masked index scores, dense weights)``.
  The keys of the main attention are exactly the keys the indexer scores (DSA: every token; CSA:
  the C compressed entries, the raw window excluded). Key ``s`` is visible to query ``t`` iff
  ``k_pos[s] <= q_pos[t]`` (with ``causal``) and ``k_seg[s] == q_seg[t] != 0`` (with segments).
  target = the head-summed main softmax over the visible keys (a per-head sink logit joins the
  denominator), divided per query by ``max(sum, 1e-9)``; loss = ``-sum_s target *
  log_softmax(I over the visible keys)``. Computed flash-style over (query tile, key tile)
  blocks: one pass keeps, per query, the running max and sum of every head's main logits and
  the running sum of ``exp(logit) * I`` (rescaled as the max moves), and the running logsumexp
  of ``I``; with those, ``loss[t] = (D[t] * lse[t] - X[t]) / max(D[t], 1e-9)`` where ``D`` is
  the target's mass and ``X`` the head-summed probability-weighted score (both kept relative to
  the running max of ``I``, so that large scores cancel nothing). A ``jax.custom_vjp``
  backward recomputes the tiles from the saved O(T) statistics: ``dL/dI[t, s] = c[t] *
  (sum(target[t]) * softmax(I[t])[s] - target[t, s])``, pulled back through the scorer tile by
  tile. Work O(T * S), memory O(T + S).
* ``sparse_index_loss``: the DeepSeek-V3.2 sparse-stage loss over each query's selected keys:
  teacher = the main attention's probabilities on the selected keys (the softmax the output
  uses: over the selection, the raw ``window`` and the sink), summed over heads and normalised
  over the selection (L1, by ``max(sum, 1e-9)``); student = ``softmax(I)`` over the selection;
  loss = ``KL(teacher || student)`` summed over the selection. Work O(T * (M + W)); query tiles
  under ``jax.checkpoint``, so the backward keeps only the tiles' inputs.

Both average over queries: every one of the B * T queries without segments (a row with no
visible key, or an empty selection, adds 0), the non-padding queries with segments.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from . import core
from .core import Array

F32 = jnp.float32
FILL = core.mask_value(jnp.float32)
EPS = 1e-9  # attnhut's floor on the target's mass


# ----------------------------------------------------------------------------- shared checks


def _check(owner: str, q_BTNH, k_BSKH, qi_BTIE, ki_BSE, w_BTI, sink_N, q_seg_BT, k_seg_BS,
           s_main: int | None = None) -> None:
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4:
        raise ValueError(f"{owner}: q (B, T, N, H) and k (B, S, K, H) must have rank 4, got "
                         f"{tuple(q_BTNH.shape)} and {tuple(k_BSKH.shape)}")
    b, t, n, h = q_BTNH.shape
    kb, s, kh, kd = k_BSKH.shape
    if kb != b or kd != h or kh < 1 or n % kh != 0:
        raise ValueError(f"{owner}: k {tuple(k_BSKH.shape)} does not fit q {tuple(q_BTNH.shape)} "
                         f"(same batch and head width, kv heads dividing N={n})")
    if qi_BTIE.ndim != 4 or qi_BTIE.shape[:2] != (b, t):
        raise ValueError(f"{owner}: qi must be (B, T, I, E)=({b}, {t}, I, E), got "
                         f"{tuple(qi_BTIE.shape)}")
    i, e = qi_BTIE.shape[2:]
    if ki_BSE.ndim != 3 or ki_BSE.shape[0] != b or ki_BSE.shape[2] != e:
        raise ValueError(f"{owner}: ki must be (B, S, E)=({b}, S, {e}), got {tuple(ki_BSE.shape)}")
    if s_main is None and ki_BSE.shape[1] != s:
        raise ValueError(f"{owner}: ki scores S={ki_BSE.shape[1]} keys but k has S={s}: the "
                         f"dense loss needs the main keys to be the scored keys")
    if tuple(w_BTI.shape) != (b, t, i):
        raise ValueError(f"{owner}: w must be (B, T, I)=({b}, {t}, {i}), got {tuple(w_BTI.shape)}")
    if sink_N is not None and tuple(sink_N.shape) != (n,):
        raise ValueError(f"{owner}: sink must be (N,)=({n},), got {tuple(sink_N.shape)}")
    if (q_seg_BT is None) != (k_seg_BS is None):
        raise ValueError(f"{owner}: give both q_seg_BT and k_seg_BS or neither")
    if q_seg_BT is not None and (tuple(q_seg_BT.shape) != (b, t)
                                 or tuple(k_seg_BS.shape) != (b, s)):
        raise ValueError(f"{owner}: q_seg_BT must be (B, T)=({b}, {t}) and k_seg_BS (B, S)=({b}, "
                         f"{s}), got {tuple(q_seg_BT.shape)} and {tuple(k_seg_BS.shape)}")
    if q_seg_BT is not None and not (jnp.issubdtype(q_seg_BT.dtype, jnp.integer)
                                     and jnp.issubdtype(k_seg_BS.dtype, jnp.integer)):
        raise TypeError(f"{owner}: segment ids must be integer arrays, got {q_seg_BT.dtype} and "
                        f"{k_seg_BS.dtype}")


def _segments(q_seg_BT, k_seg_BS, b: int, t: int, s: int) -> tuple[Array, Array, Array]:
    """(q_seg, k_seg, per-query weights summing to 1): one segment when none are given."""
    if q_seg_BT is None:
        q_seg_BT, k_seg_BS = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
    q_seg_BT, k_seg_BS = q_seg_BT.astype(jnp.int32), k_seg_BS.astype(jnp.int32)
    count_BT = (q_seg_BT != 0).astype(F32)
    return q_seg_BT, k_seg_BS, count_BT / jnp.maximum(count_BT.sum(), 1.0)


def _pad(a: Array, axis: int, size: int, value=0) -> Array:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, pad, constant_values=value)


def _tiles(a: Array, axis: int, block: int) -> Array:
    """Split ``axis`` (a multiple of ``block``) into (tiles, block) and move tiles to the front."""
    shape = a.shape[:axis] + (a.shape[axis] // block, block) + a.shape[axis + 1:]
    return jnp.moveaxis(a.reshape(shape), axis, 0)


def _seg_visible(qseg_BT: Array, kseg_BS: Array) -> Array:
    """(B, T, S) bool: the segment rule (same id, key not padding)."""
    return (qseg_BT[:, :, None] == kseg_BS[:, None, :]) & (kseg_BS != 0)[:, None, :]


def _main_logits(q_BTKGH: Array, k_BSKH: Array, scale: float, precision) -> Array:
    """(B, K, G, T, S) float32 main logits of a (query tile, key tile)."""
    return jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH.astype(F32), k_BSKH.astype(F32),
                      precision=precision) * scale


# ----------------------------------------------------------------------------- dense loss


@dataclasses.dataclass(frozen=True)
class _DenseConfig:
    scale: float
    causal: bool
    block_q: int
    block_k: int
    precision: jax.lax.PrecisionLike


def _dense_tile_visible(sel_q, sel_k, causal: bool) -> Array:
    qpos_T, qseg_BT = sel_q
    kpos_S, kseg_BS = sel_k
    vis_BTS = _seg_visible(qseg_BT, kseg_BS)
    if causal:
        vis_BTS = vis_BTS & (kpos_S[None, :] <= qpos_T[:, None])[None]
    return vis_BTS


def _dense_forward(q, k, qi, ki, w, sink, sel, cfg: _DenseConfig):
    """Tiled operands in, (loss, per-query statistics) out."""
    q_QBTKGH, k_JBSKH, qi_QBTIE, ki_JBSE, w_QBTI = q, k, qi, ki, w
    qpos_QT, qseg_QBT, weight_QBT, kpos_JS, kseg_JBS = sel
    _, b, bq, kh, g, _ = q_QBTKGH.shape
    sink_KG = None if sink is None else sink.astype(F32).reshape(kh, g)

    def query_tile(xs):
        q_BTKGH, qi_BTIE, w_BTI, qpos_T, qseg_BT, weight_BT = xs

        def key_tile(carry, ys):
            k_BSKH, ki_BSE, kpos_S, kseg_BS = ys
            vis_BTS = _dense_tile_visible((qpos_T, qseg_BT), (kpos_S, kseg_BS), cfg.causal)

            def update(carry):
                m_BKGT, zk_BKGT, x_BKGT, im_BT, isum_BT = carry
                vis_B11TS = vis_BTS[:, None, None]
                l_BKGTS = _main_logits(q_BTKGH, k_BSKH, cfg.scale, cfg.precision)
                m_new = jnp.maximum(m_BKGT, jnp.where(vis_B11TS, l_BKGTS, FILL).max(-1))
                e_BKGTS = jnp.exp(jnp.where(vis_B11TS, l_BKGTS - m_new[..., None], -jnp.inf))
                alpha = jnp.exp(m_BKGT - m_new)
                i_BTS = core.lightning_scores(qi_BTIE, ki_BSE, w_BTI, cfg.precision)
                im_new = jnp.maximum(im_BT, jnp.where(vis_BTS, i_BTS, FILL).max(-1))
                # x holds sum exp(logit - m) * (I - im): scores relative to their running max,
                # so that the final D * lse - X cancels nothing large
                shift_BKGT = jnp.where(zk_BKGT > 0, (im_BT - im_new)[:, None, None] * zk_BKGT, 0.0)
                rel_BTS = jnp.where(vis_BTS, i_BTS - im_new[..., None], 0.0)
                x_new = (x_BKGT + shift_BKGT) * alpha + jnp.einsum(
                    "BKGTS,BTS->BKGT", e_BKGTS, rel_BTS, precision=cfg.precision)
                isum_new = isum_BT * jnp.exp(im_BT - im_new) + jnp.exp(
                    jnp.where(vis_BTS, i_BTS - im_new[..., None], -jnp.inf)).sum(-1)
                return m_new, zk_BKGT * alpha + e_BKGTS.sum(-1), x_new, im_new, isum_new

            return jax.lax.cond(jnp.any(vis_BTS), update, lambda c: c, carry), None

        m0 = (jnp.full((b, kh, g, bq), FILL, F32) if sink_KG is None
              else jnp.broadcast_to(sink_KG[None, :, :, None], (b, kh, g, bq)))
        zero_BKGT = jnp.zeros((b, kh, g, bq), F32)
        init = (m0, zero_BKGT, zero_BKGT, jnp.full((b, bq), FILL, F32), jnp.zeros((b, bq), F32))
        (m_BKGT, zk_BKGT, x_BKGT, im_BT, isum_BT), _ = jax.lax.scan(
            key_tile, init, (k_JBSKH, ki_JBSE, kpos_JS, kseg_JBS))
        z_BKGT = zk_BKGT if sink_KG is None else zk_BKGT + jnp.exp(
            sink_KG[None, :, :, None] - m_BKGT)
        z_BKGT = jnp.where(z_BKGT > 0, z_BKGT, 1.0)
        d_BT = (zk_BKGT / z_BKGT).sum((1, 2))  # the target's mass before normalising
        x_BT = (x_BKGT / z_BKGT).sum((1, 2))
        log_isum_BT = jnp.log(jnp.where(isum_BT > 0, isum_BT, 1.0))  # lse - im
        lse_BT = jnp.where(isum_BT > 0, im_BT + log_isum_BT, 0.0)
        dm_BT = jnp.maximum(d_BT, EPS)
        loss = jnp.sum(weight_BT * (d_BT * log_isum_BT - x_BT) / dm_BT)
        return loss, (m_BKGT, z_BKGT, lse_BT, d_BT / dm_BT, dm_BT)

    losses_Q, stats = jax.lax.map(query_tile, (q_QBTKGH, qi_QBTIE, w_QBTI, qpos_QT, qseg_QBT,
                                               weight_QBT))
    return losses_Q.sum(), stats


@functools.partial(jax.custom_vjp, nondiff_argnames=("cfg",))
def _dense_loss(q, k, qi, ki, w, sink, sel, cfg: _DenseConfig):
    return _dense_forward(q, k, qi, ki, w, sink, sel, cfg)[0]


def _dense_loss_fwd(q, k, qi, ki, w, sink, sel, cfg: _DenseConfig):
    loss, stats = _dense_forward(q, k, qi, ki, w, sink, sel, cfg)
    return loss, (q, k, qi, ki, w, sink, sel, stats)


def _dense_loss_bwd(cfg: _DenseConfig, saved, g):
    q_QBTKGH, k_JBSKH, qi_QBTIE, ki_JBSE, w_QBTI, sink, sel, stats = saved
    qpos_QT, qseg_QBT, weight_QBT, kpos_JS, kseg_JBS = sel
    scores = functools.partial(core.lightning_scores, precision=cfg.precision)

    def query_tile(dki_JBSE, xs):
        (q_BTKGH, qi_BTIE, w_BTI, qpos_T, qseg_BT, weight_BT,
         (m_BKGT, z_BKGT, lse_BT, mass_BT, dm_BT)) = xs
        c_BT = g * weight_BT

        def key_tile(carry, ys):
            k_BSKH, ki_BSE, kpos_S, kseg_BS = ys
            vis_BTS = _dense_tile_visible((qpos_T, qseg_BT), (kpos_S, kseg_BS), cfg.causal)

            def grads(carry):
                dqi_BTIE, dw_BTI = carry
                l_BKGTS = _main_logits(q_BTKGH, k_BSKH, cfg.scale, cfg.precision)
                p_BKGTS = jnp.exp(jnp.where(vis_BTS[:, None, None], l_BKGTS - m_BKGT[..., None],
                                            -jnp.inf)) / z_BKGT[..., None]
                target_BTS = p_BKGTS.sum((1, 2)) / dm_BT[..., None]
                i_BTS, pullback = jax.vjp(scores, qi_BTIE, ki_BSE, w_BTI)
                soft_BTS = jnp.exp(jnp.where(vis_BTS, i_BTS - lse_BT[..., None], -jnp.inf))
                di_BTS = c_BT[..., None] * (mass_BT[..., None] * soft_BTS - target_BTS)
                dqi, dki, dw = pullback(di_BTS)
                return (dqi_BTIE + dqi.astype(F32), dw_BTI + dw.astype(F32)), dki.astype(F32)

            def skip(carry):
                return carry, jnp.zeros(ki_BSE.shape, F32)

            return jax.lax.cond(jnp.any(vis_BTS), grads, skip, carry)

        init = (jnp.zeros(qi_BTIE.shape, F32), jnp.zeros(w_BTI.shape, F32))
        (dqi_BTIE, dw_BTI), dki_tiles = jax.lax.scan(
            key_tile, init, (k_JBSKH, ki_JBSE, kpos_JS, kseg_JBS))
        return dki_JBSE + dki_tiles, (dqi_BTIE, dw_BTI)

    dki_JBSE, (dqi_QBTIE, dw_QBTI) = jax.lax.scan(
        query_tile, jnp.zeros(ki_JBSE.shape, F32),
        (q_QBTKGH, qi_QBTIE, w_QBTI, qpos_QT, qseg_QBT, weight_QBT, stats))
    sel_ct = jax.tree.map(lambda a: jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.floating)
                          else jnp.zeros(a.shape, jax.dtypes.float0), sel)
    # the target is a constant: the main q, k and sink get zero cotangents
    return (jnp.zeros_like(q_QBTKGH), jnp.zeros_like(k_JBSKH), dqi_QBTIE.astype(qi_QBTIE.dtype),
            dki_JBSE.astype(ki_JBSE.dtype), dw_QBTI.astype(w_QBTI.dtype),
            None if sink is None else jnp.zeros_like(sink), sel_ct)


_dense_loss.defvjp(_dense_loss_fwd, _dense_loss_bwd)


def dense_index_loss(q_BTNH: Array, k_BSKH: Array, qi_BTIE: Array, ki_BSE: Array, w_BTI: Array,
                     *, scale: float, causal: bool, q_pos_T: Array | None = None,
                     k_pos_S: Array | None = None, sink_N: Array | None = None,
                     q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                     precision: jax.lax.PrecisionLike = None, block_q: int = 128,
                     block_k: int = 512) -> Array:
    """attnhut's ``dsa_index_aux_loss`` without the (T, S) arrays (see the module docstring).

    Args:
      q_BTNH, k_BSKH: the main attention's queries and keys (query head n reads kv head
        n // (N // K)); a constant target: they get zero gradient.
      qi_BTIE, ki_BSE, w_BTI: the indexer's queries, shared keys (the same S keys) and gates.
      scale: the main logits' scale. causal: key s is visible to query t only if
        ``k_pos[s] <= q_pos[t]``; positions default to ``arange(T) + S - T`` and ``arange(S)``.
      sink_N: optional per-head logit in the main softmax denominator (zero gradient).
      q_seg_BT, k_seg_BS: segment ids (both or neither): visible only within one segment, id 0
        (padding) never; the mean then runs over the non-padding queries.
      precision: of every matrix product. block_q, block_k: tile sizes (any T, S work).

    Returns a float32 scalar.
    """
    owner = "dense_index_loss"
    _check(owner, q_BTNH, k_BSKH, qi_BTIE, ki_BSE, w_BTI, sink_N, q_seg_BT, k_seg_BS)
    core.check_positive(owner, block_q=block_q, block_k=block_k)
    b, t, n, h = q_BTNH.shape
    s, kh = k_BSKH.shape[1], k_BSKH.shape[2]
    if q_pos_T is not None and tuple(q_pos_T.shape) != (t,):
        raise ValueError(f"{owner}: q_pos_T must be (T,)=({t},), got {tuple(q_pos_T.shape)}")
    if k_pos_S is not None and tuple(k_pos_S.shape) != (s,):
        raise ValueError(f"{owner}: k_pos_S must be (S,)=({s},), got {tuple(k_pos_S.shape)}")
    q_pos_T = (jnp.arange(t) + (s - t) if q_pos_T is None else q_pos_T).astype(jnp.int32)
    k_pos_S = (jnp.arange(s) if k_pos_S is None else k_pos_S).astype(jnp.int32)
    q_seg_BT, k_seg_BS, weight_BT = _segments(q_seg_BT, k_seg_BS, b, t, s)
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    g = n // kh
    q_QBTKGH = _tiles(_pad(q_BTNH, 1, tp).reshape(b, tp, kh, g, h), 1, bq)
    tiles_q = lambda a: _tiles(_pad(a, 1, tp), 1, bq)  # noqa: E731
    tiles_k = lambda a: _tiles(_pad(a, 1, sp), 1, bk)  # noqa: E731
    sel = (_tiles(_pad(q_pos_T, 0, tp), 0, bq), tiles_q(q_seg_BT), tiles_q(weight_BT),
           _tiles(_pad(k_pos_S, 0, sp), 0, bk), tiles_k(k_seg_BS))  # padding: segment 0
    cfg = _DenseConfig(scale=float(scale), causal=bool(causal), block_q=bq, block_k=bk,
                       precision=precision)
    return _dense_loss(q_QBTKGH, tiles_k(k_BSKH), tiles_q(qi_BTIE), tiles_k(ki_BSE),
                       tiles_q(w_BTI), sink_N, sel, cfg)


# ----------------------------------------------------------------------------- sparse loss


def _gather_rows(a_BS_: Array, idx_BTM: Array) -> Array:
    """``a[b, idx[b, t, m]]`` for every (b, t, m): (B, T, M, ...)."""
    return jax.vmap(lambda a, i: a[i])(a_BS_, idx_BTM)


def _sparse_tile(xs, k_BSKH, ki_BSE, kseg_BS, sink_N, *, scale: float, window: int | None,
                 window_start: int, precision) -> Array:
    """The weighted sum of one query tile's losses."""
    q_BTNH, qi_BTIE, w_BTI, idx_BTM, qseg_BT, weight_BT, row_T = xs
    b, bq, n, h = q_BTNH.shape
    s, kh, s_i = k_BSKH.shape[1], k_BSKH.shape[2], ki_BSE.shape[1]
    g = n // kh
    # selected keys: valid slots that the segment rule lets the query read
    inside_BTM = (idx_BTM >= 0) & (idx_BTM < s_i)
    safe_BTM = jnp.where(inside_BTM, idx_BTM, 0)
    sel_BTM = inside_BTM & (_gather_rows(kseg_BS, safe_BTM) == qseg_BT[..., None]) & (
        qseg_BT != 0)[..., None]
    # teacher: the main softmax (selection + window + sink), a constant
    q_BTKGH = jax.lax.stop_gradient(q_BTNH).reshape(b, bq, kh, g, h).astype(F32)
    k_BSKH = jax.lax.stop_gradient(k_BSKH)
    ksel_BTMKH = _gather_rows(k_BSKH, safe_BTM).astype(F32)
    lsel_BKGTM = jnp.einsum("BTKGH,BTMKH->BKGTM", q_BTKGH, ksel_BTMKH, precision=precision) * scale
    vsel_B11TM = sel_BTM[:, None, None]
    m_BKGT = jnp.where(vsel_B11TM, lsel_BKGTM, FILL).max(-1)
    if window is not None:
        span = min(window + bq - 1, s)
        start = jnp.clip(window_start + row_T[0] - window + 1, 0, s - span)
        key_L = start + jnp.arange(span)
        kwin_BLKH = jax.lax.dynamic_slice_in_dim(k_BSKH, start, span, axis=1)
        raw_TL = key_L[None, :] - window_start
        win_BTL = ((raw_TL >= 0) & (raw_TL <= row_T[:, None]) & (raw_TL > row_T[:, None] - window))[None]
        win_BTL = win_BTL & _seg_visible(qseg_BT, jax.lax.dynamic_slice_in_dim(kseg_BS, start, span, 1))
        if window_start < s_i:  # a key both selected and in the window is read once
            picked_BTM = jnp.where(sel_BTM, idx_BTM, -1)
            win_BTL = win_BTL & ~(key_L[None, None, :, None] == picked_BTM[:, :, None, :]).any(-1)
        lwin_BKGTL = _main_logits(q_BTKGH, kwin_BLKH, scale, precision)
        vwin_B11TL = win_BTL[:, None, None]
        m_BKGT = jnp.maximum(m_BKGT, jnp.where(vwin_B11TL, lwin_BKGTL, FILL).max(-1))
    sink_KG = None if sink_N is None else jax.lax.stop_gradient(sink_N).astype(F32).reshape(kh, g)
    if sink_KG is not None:
        m_BKGT = jnp.maximum(m_BKGT, sink_KG[None, :, :, None])
    esel_BKGTM = jnp.exp(jnp.where(vsel_B11TM, lsel_BKGTM - m_BKGT[..., None], -jnp.inf))
    z_BKGT = esel_BKGTM.sum(-1)
    if window is not None:
        z_BKGT = z_BKGT + jnp.exp(
            jnp.where(vwin_B11TL, lwin_BKGTL - m_BKGT[..., None], -jnp.inf)).sum(-1)
    if sink_KG is not None:
        z_BKGT = z_BKGT + jnp.exp(sink_KG[None, :, :, None] - m_BKGT)
    p_BTM = (esel_BKGTM / jnp.where(z_BKGT > 0, z_BKGT, 1.0)[..., None]).sum((1, 2))
    teacher_BTM = p_BTM / jnp.maximum(p_BTM.sum(-1, keepdims=True), EPS)
    # student: softmax of the index scores over the selection
    kisel_BTME = _gather_rows(ki_BSE, safe_BTM).astype(F32)
    relu_BTIM = jax.nn.relu(jnp.einsum("BTIE,BTME->BTIM", qi_BTIE.astype(F32), kisel_BTME,
                                       precision=precision))
    i_BTM = jnp.einsum("BTI,BTIM->BTM", w_BTI.astype(F32), relu_BTIM, precision=precision)
    top_BT = jax.lax.stop_gradient(jnp.where(sel_BTM, i_BTM, FILL).max(-1))
    sum_BT = jnp.exp(jnp.where(sel_BTM, i_BTM - top_BT[..., None], -jnp.inf)).sum(-1)
    log_student_BTM = i_BTM - (top_BT + jnp.log(jnp.where(sum_BT > 0, sum_BT, 1.0)))[..., None]
    kl_BTM = jnp.where(teacher_BTM > 0, teacher_BTM * (
        jnp.log(jnp.maximum(teacher_BTM, EPS)) - log_student_BTM), 0.0)
    return jnp.sum(weight_BT * kl_BTM.sum(-1))


def sparse_index_loss(q_BTNH: Array, k_BSKH: Array, qi_BTIE: Array, ki_BSE: Array, w_BTI: Array,
                      indices_BTM: Array, *, scale: float, sink_N: Array | None = None,
                      window: int | None = None, window_start: int = 0,
                      q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                      precision: jax.lax.PrecisionLike = None, block_q: int = 64) -> Array:
    """DeepSeek-V3.2's sparse-stage indexer loss, KL(main attention || index softmax) over each
    query's selected keys (see the module docstring).

    Args:
      q_BTNH, k_BSKH: the main attention's queries and keys (zero gradient). The main softmax
        runs over the selected keys, the raw ``window`` (query t also reads key
        ``window_start + r`` for ``t - window < r <= t``, as the ``token_sparse`` op; a key both
        selected and in the window counts once) and the per-head ``sink_N`` logit.
      qi_BTIE, ki_BSE, w_BTI: the indexer's queries, keys and gates; ki's S_i keys are the first
        S_i of k's keys (DSA: the same keys; CSA: k is [C entries | T raw], ki the C entries).
      indices_BTM: each query's selection, indices into ki (and k); -1 (or any index outside
        [0, S_i)) is an empty slot. A row is a set (distinct entries).
      q_seg_BT, k_seg_BS: segment ids of the queries and of k's keys (both or neither): a selected
        or window key counts only within the query's segment; the mean runs over non-padding
        queries. precision: of every product. block_q: the query tile (any T works).

    Returns a float32 scalar.
    """
    owner = "sparse_index_loss"
    _check(owner, q_BTNH, k_BSKH, qi_BTIE, ki_BSE, w_BTI, sink_N, q_seg_BT, k_seg_BS,
           s_main=k_BSKH.shape[1])
    core.check_positive(owner, block_q=block_q)
    b, t = q_BTNH.shape[:2]
    s, s_i = k_BSKH.shape[1], ki_BSE.shape[1]
    if s_i > s:
        raise ValueError(f"{owner}: ki scores S_i={s_i} keys, more than k's S={s}")
    if indices_BTM.ndim != 3 or indices_BTM.shape[:2] != (b, t):
        raise ValueError(f"{owner}: indices must be (B, T, M)=({b}, {t}, M), got "
                         f"{tuple(indices_BTM.shape)}")
    if window is not None:
        core.check_positive(owner, window=window)
        if not 0 <= window_start <= s:
            raise ValueError(f"{owner}: window_start={window_start} must lie in [0, S={s}]")
    q_seg_BT, k_seg_BS, weight_BT = _segments(q_seg_BT, k_seg_BS, b, t, s)
    bq = min(block_q, t)
    tp = -(-t // bq) * bq
    tiles = lambda a, value=0: _tiles(_pad(a, 1, tp, value), 1, bq)  # noqa: E731
    xs = (tiles(q_BTNH), tiles(qi_BTIE), tiles(w_BTI), tiles(indices_BTM.astype(jnp.int32), -1),
          tiles(q_seg_BT), tiles(weight_BT), jnp.arange(tp).reshape(tp // bq, bq))
    tile = jax.checkpoint(functools.partial(
        _sparse_tile, k_BSKH=k_BSKH, ki_BSE=ki_BSE, kseg_BS=k_seg_BS, sink_N=sink_N,
        scale=float(scale), window=window, window_start=int(window_start), precision=precision))
    return jax.lax.map(tile, xs).sum()

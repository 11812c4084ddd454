"""DeepSeek-V4's compressed attention: Heavily Compressed (HCA) and Compressed Sparse (CSA).

Both pool runs of ``compression_rate`` tokens into single KV entries (a softmax over the run's
positions with a learned per-position bias), then let every head of the query attend one shared
KV sequence (MQA): the compressed entries whose whole run lies strictly in the past, plus the
last ``window`` raw tokens. A per-head sink logit joins the softmax denominator. HCA keeps every
visible entry; CSA pools with a one-block overlap and keeps only the ``top_k`` entries a
lightning indexer scores highest. RoPE is left out, as in attnhut.

Array names follow the project's dimension key (``pallas_kernels/__init__.py``): C compressed
entries, P positions pooled into one entry, I indexer heads, E indexer width, M selected entries
per query, A output-projection groups, Y / O per-group input / output width. H is both the
query head width and the shared entry width (``kv_dim``).

CSA's selector (indexer projections and scores) runs in its own ``selector_dtype``, float32 by
default, and every impl ranks in float32 (or wider).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cache, core, registry
from . import index_loss as index_losses
from .core import Array, Dtype

IndexLoss = Literal["dense", "sparse"]

# ----------------------------------------------------------------------------- pure functions


def _blocks(x_BTH: Array, rate: int, fill: float) -> Array:
    """(B, T, H) -> (B, C, P=rate, H), the tail padded with ``fill`` up to a multiple of rate."""
    b, t, h = x_BTH.shape
    pad = (-t) % rate
    if pad:
        x_BTH = jnp.pad(x_BTH, ((0, 0), (0, pad), (0, 0)), constant_values=fill)
    return x_BTH.reshape(b, (t + pad) // rate, rate, h)


def _pool(c_BCPH: Array, z_BCPH: Array) -> Array:
    """Softmax over the P pooled positions (in float32), then the weighted sum of values."""
    s_BCPH = jax.nn.softmax(z_BCPH.astype(jnp.promote_types(z_BCPH.dtype, jnp.float32)), axis=2)
    return jnp.sum(s_BCPH.astype(c_BCPH.dtype) * c_BCPH, axis=2)


def entry_segments(seg_BT: Array, rate: int) -> Array:
    """(B, C) int32: an entry's segment is the segment of the first token of its run (an entry
    whose run starts on padding is padding, id 0)."""
    return seg_BT[:, ::rate]


def _same_segment(seg_BT: Array, eseg_BC: Array, rate: int) -> Array:
    """(B, C, P, 1) bool: the run's token belongs to the entry's segment (tail positions past T,
    which hold no token, never do)."""
    b, t = seg_BT.shape
    c = eseg_BC.shape[1]
    in_range_CP = (jnp.arange(c * rate) < t).reshape(c, rate)
    seg_BCP = _blocks(seg_BT[..., None], rate, 0)[..., 0]
    return ((seg_BCP == eseg_BC[:, :, None]) & in_range_CP)[..., None]


@functools.partial(jax.jit, static_argnames=("rate",))
def compress(c_BTH: Array, z_BTH: Array, bias_PH: Array, rate: int,
             seg_BT: Array | None = None) -> Array:
    """Non-overlapped pooling: entry i pools tokens [i*rate, (i+1)*rate). Returns (B, C, H).

    C = ceil(T / rate); the missing tail positions of the last run carry value 0 and the finite
    fill logit (plus their bias), so they get zero weight. With ``seg_BT`` (B, T) segment ids, a
    token of another segment than the entry's (``entry_segments``) is left out the same way
    (value 0, bare fill logit, no gradient), so an entry never mixes segments.
    """
    fill = core.mask_value(z_BTH.dtype)
    z_BCPH = _blocks(z_BTH, rate, fill) + bias_PH.astype(z_BTH.dtype)
    c_BCPH = _blocks(c_BTH, rate, 0.0)
    if seg_BT is not None:
        same_BCP1 = _same_segment(seg_BT, entry_segments(seg_BT, rate), rate)
        z_BCPH = jnp.where(same_BCP1, z_BCPH, fill)
        c_BCPH = jnp.where(same_BCP1, c_BCPH, jnp.zeros((), c_BCPH.dtype))
    return _pool(c_BCPH, z_BCPH)


@functools.partial(jax.jit, static_argnames=("rate",))
def compress_overlap(ca_BTH: Array, cb_BTH: Array, za_BTH: Array, zb_BTH: Array, ba_PH: Array,
                     bb_PH: Array, rate: int, seg_BT: Array | None = None) -> Array:
    """Overlapped pooling: entry i pools its own run (``a`` projections, bias ``ba``) and the
    previous run (``b`` projections, bias ``bb``) in one softmax over 2*rate positions.

    Entry 0 has no previous run: that half has value 0 and the bare fill logit. Returns (B, C, H).
    With ``seg_BT``, a token of either half whose segment is not the entry's is left out the same
    way, so the previous run drops out across a segment boundary, as entry 0's does.
    """
    dtype = za_BTH.dtype
    fill = core.mask_value(dtype)
    a_c = _blocks(ca_BTH, rate, 0.0)
    a_z = _blocks(za_BTH, rate, fill) + ba_PH.astype(dtype)
    b, _, p, h = a_c.shape
    prev_c = _blocks(cb_BTH, rate, 0.0)[:, :-1]
    prev_z = _blocks(zb_BTH, rate, fill)[:, :-1] + bb_PH.astype(dtype)
    b_c = jnp.concatenate([jnp.zeros((b, 1, p, h), a_c.dtype), prev_c], axis=1)
    b_z = jnp.concatenate([jnp.full((b, 1, p, h), fill, dtype), prev_z], axis=1)
    if seg_BT is not None:
        eseg_BC = entry_segments(seg_BT, rate)
        a_same = _same_segment(seg_BT, eseg_BC, rate)
        # run i - 1 read against entry i's segment; entry 0 has none
        prev_same = _same_segment(seg_BT, jnp.pad(eseg_BC[:, 1:], ((0, 0), (0, 1))), rate)
        b_same = jnp.concatenate([jnp.zeros((b, 1, p, 1), bool), prev_same[:, :-1]], axis=1)
        zero = jnp.zeros((), a_c.dtype)
        a_c, a_z = jnp.where(a_same, a_c, zero), jnp.where(a_same, a_z, fill)
        b_c, b_z = jnp.where(b_same, b_c, zero), jnp.where(b_same, b_z, fill)
    return _pool(jnp.concatenate([a_c, b_c], axis=2), jnp.concatenate([a_z, b_z], axis=2))


def compressed_visible(t: int, c: int, rate: int) -> Array:
    """Boolean (T, C): entry c is visible to query t once its whole run is in the past."""
    return (jnp.arange(c)[None, :] + 1) * rate <= jnp.arange(t)[:, None]


def entry_keep(t: int, c: int, rate: int, q_seg_BT: Array | None = None,
               e_seg_BC: Array | None = None) -> Array:
    """(T, C), or (B, T, C) with segments: ``compressed_visible`` and, given the query and entry
    segment ids, the segment rule (same segment, entry not padding). Dense paths only."""
    visible_TC = compressed_visible(t, c, rate)
    if q_seg_BT is None:
        return visible_TC
    return visible_TC[None] & core.segment_keep(q_seg_BT, e_seg_BC)[:, 0]


@functools.partial(jax.jit, static_argnames=("scale", "precision"))
def shared_kv_attention(q_BTNH: Array, kv_BSH: Array, keep: Array, sink_N: Array,
                        scale: float, precision: core.Precision = None) -> Array:
    """Every head reads one shared sequence as both keys and values, with a per-head sink.

    ``keep`` broadcasts to (B, N, T, S). Returns (B, T, N, H); a row with no visible entry is
    zeros (only the sink is left in its softmax).
    """
    kv_BS1H = kv_BSH[:, :, None, :]
    return core.dot_product_attention(q_BTNH, kv_BS1H, kv_BS1H, keep=keep, scale=scale,
                                      sink=sink_N, precision=precision)


# The registry's ``csa`` op: (q_BTNH, kv_BSH, sink_N, qi_BTIE, ki_BCE, w_BTI, *, top_k, rate,
# window, scale, index_scores_BTC, q_seg_BT, k_seg_BS, precision) -> (B, T, N, H). Keys are
# [C pooled entries | T raw tokens]; entry c sits at position (c + 1) * rate and is visible once
# that is <= t. ``index_scores_BTC`` (already masked) is given when built for ``return_aux``: the
# impl then selects from them, so the selection returned is the one attended. ``q_seg_BT`` (B, T)
# and ``k_seg_BS`` (B, C + T: entry segments, then the tokens') add the segment rule to the
# selection and the raw window.


@registry.register("csa", "reference")
def csa_reference(q_BTNH, kv_BSH, sink_N, qi_BTIE, ki_BCE, w_BTI, *, top_k, rate, window, scale,
                  index_scores_BTC=None, q_seg_BT=None, k_seg_BS=None, index_loss=None,
                  precision=None):
    """attnhut's path: score every (query, entry) pair, attend through a dense (T, C + T) mask.
    With ``index_loss`` returns ``(out, loss)``, the loss materialised from (T, C) arrays."""
    b, t = q_BTNH.shape[:2]
    nc = ki_BCE.shape[1]
    seg = q_seg_BT is not None
    visible = entry_keep(t, nc, rate, q_seg_BT, k_seg_BS[:, :nc] if seg else None)
    if index_scores_BTC is None:
        index_scores_BTC = core.masked_lightning_scores(qi_BTIE, ki_BCE, w_BTI, visible, precision)
    selected_BTC = core.topk_keep(index_scores_BTC, visible, top_k)
    raw_BTT = jnp.broadcast_to(core.sliding_window_mask(t, window), (b, t, t))
    if seg:
        raw_BTT = raw_BTT & core.segment_keep(q_seg_BT, k_seg_BS[:, nc:])[:, 0]
    keep_BTS = jnp.concatenate([selected_BTC, raw_BTT], axis=2)
    out_BTNH = shared_kv_attention(q_BTNH, kv_BSH, keep_BTS[:, None], sink_N, scale, precision)
    if index_loss is None:
        return out_BTNH
    if index_loss == "dense":  # every visible entry, the raw window left out
        support_BTC, kv_used, keep_used = jnp.broadcast_to(visible, (b, t, nc)), kv_BSH[:, :nc], visible
    else:  # the attention the output uses, restricted to the selection
        support_BTC, kv_used, keep_used = selected_BTC, kv_BSH, keep_BTS
    keep_used = keep_used if keep_used.ndim == 2 else keep_used[:, None]
    probs_BKGTS = core.attention_weights(q_BTNH, kv_used[:, :, None, :], keep=keep_used,
                                         scale=scale, sink=sink_N, precision=precision)
    teacher_BTC = jax.lax.stop_gradient(probs_BKGTS[..., :nc]).astype(jnp.float32).sum(axis=(1, 2))
    loss_BT = index_loss_rows(index_loss, index_scores_BTC, teacher_BTC, support_BTC)
    weights_BT = core.query_weights(q_seg_BT, b, t)
    return out_BTNH, (loss_BT * weights_BT).sum() / jnp.maximum(weights_BT.sum(), 1.0)


def index_loss_rows(kind: IndexLoss, scores_BTC: Array, teacher_BTC: Array,
                    support_BTC: Array) -> Array:
    """(B, T) per-query index loss, the teacher normalised over the support, the student the
    softmax of the indexer scores over the same support: ``"dense"`` the cross-entropy
    (``dsa_index_aux_loss``'s rows), ``"sparse"`` the KL divergence (attnhut's MSA loss); a query
    with an empty support adds 0."""
    fill = core.mask_value(jnp.float32)
    teacher = jnp.where(support_BTC, teacher_BTC, 0.0)
    teacher = teacher / jnp.maximum(teacher.sum(axis=-1, keepdims=True), 1e-9)
    log_p = jax.nn.log_softmax(jnp.where(support_BTC, scores_BTC.astype(jnp.float32), fill), axis=-1)
    if kind == "dense":
        return -(teacher * log_p).sum(axis=-1)
    kl = teacher * (jnp.log(jnp.maximum(teacher, 1e-9)) - log_p)
    return jnp.where(teacher > 0, kl, 0.0).sum(axis=-1)


def _segment_kwargs(q_seg_BT, k_seg_BS) -> dict:
    """The kernel ops' segment arguments, left out without segments (calls stay as they were)."""
    return {} if q_seg_BT is None else {"q_seg_BT": q_seg_BT, "k_seg_BS": k_seg_BS}


def _csa_token_sparse(q_BTNH, kv_BSH, sink_N, qi_BTIE, ki_BCE, w_BTI, *, top_k, rate, window,
                      scale, index_scores_BTC=None, q_seg_BT=None, k_seg_BS=None, index_loss=None,
                      precision=None, impl):
    """Fused indexer top-k over the entries, then attention over the selected entries, the raw
    window and the sink only (``token_sparse_attention`` with ``window_start = C``). With
    ``index_loss`` returns ``(out, loss)``, the loss computed in tiles (``index_loss.py``)."""
    t, nc = q_BTNH.shape[1], ki_BCE.shape[1]
    seg = q_seg_BT is not None
    e_seg = k_seg_BS[:, :nc] if seg else None
    e_pos = (jnp.arange(nc) + 1) * rate
    if index_scores_BTC is not None:
        indices_BTM = core.indices_from_scores(index_scores_BTC,
                                               entry_keep(t, nc, rate, q_seg_BT, e_seg), top_k)
    else:
        indices_BTM, _ = core.indexer_topk(
            qi_BTIE, ki_BCE, w_BTI, top_k, causal=True, impl=impl, q_pos_T=jnp.arange(t),
            k_pos_S=e_pos, precision=precision, **_segment_kwargs(q_seg_BT, e_seg))
    kv_BS1H = kv_BSH[:, :, None, :]
    out_BTNH = core.token_sparse_attention(q_BTNH, kv_BS1H, None, indices_BTM, impl=impl,
                                           scale=scale, sink=sink_N, window=window,
                                           window_start=nc, precision=precision,
                                           **_segment_kwargs(q_seg_BT, k_seg_BS))
    if index_loss is None:
        return out_BTNH
    if index_loss == "dense":  # every visible entry, the raw window left out
        loss = index_losses.dense_index_loss(
            q_BTNH, kv_BS1H[:, :nc], qi_BTIE, ki_BCE, w_BTI, scale=scale, causal=True,
            q_pos_T=jnp.arange(t), k_pos_S=e_pos, sink_N=sink_N, q_seg_BT=q_seg_BT,
            k_seg_BS=e_seg, precision=precision)
    else:
        loss = index_losses.sparse_index_loss(
            q_BTNH, kv_BS1H, qi_BTIE, ki_BCE, w_BTI, indices_BTM, scale=scale, sink_N=sink_N,
            window=window, window_start=nc, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS,
            precision=precision)
    return out_BTNH, loss


registry.register("csa", "xla")(functools.partial(_csa_token_sparse, impl="xla"))
registry.register("csa", "pallas")(functools.partial(_csa_token_sparse, impl="pallas"))


# ----------------------------------------------------------------------------- decoding
# A decode cache (``decode=True``) holds, per row: the rms-normalised entries of the completed
# runs, rings of the projections that the next entries still pool (the current partial run and,
# for CSA's overlap, the run before it) and a ring of the last ``window`` raw keys. A ring of size
# S keeps position p at slot p % S; after ``end`` tokens it holds positions [end - S, end).


def _ring_positions(end_B: Array, size: int) -> Array:
    """(B, S) int32: the position a ring of ``size`` slots holds at each slot after ``end_B``
    tokens (the latest p < end with p % size == slot), -1 where none."""
    slot_S = jnp.arange(size, dtype=jnp.int32)
    last_B1 = end_B[:, None].astype(jnp.int32) - 1
    pos_BS = last_B1 - jnp.mod(last_B1 - slot_S[None, :], size)
    return jnp.where(pos_BS >= 0, pos_BS, -1)


def _ring_write(ring_BSX: Array, pos_BT: Array, value_BTX: Array, ok_BT: Array,
               end_B: Array) -> Array:
    """``ring_BSX`` after appending the chunk's tokens (B, n, ...) at positions ``pos_BT``: only
    the tokens among the last S (``pos >= end - S``) are written, so no two share a slot."""
    size = ring_BSX.shape[1]
    last_BT = ok_BT & (pos_BT >= end_B[:, None] - size)
    return cache.write_rows(ring_BSX, jnp.mod(pos_BT, size), value_BTX.astype(ring_BSX.dtype),
                            last_BT)


def _run_values(chunk_BTX: Array, ring_BSX: Array, pos_BCP: Array, start_B: Array) -> Array:
    """(B, C, P, ...): the values at positions ``pos_BCP``, from the chunk (B, n, ...) where the
    position is at or after the row's ``start`` (the chunk's first position), from the ring
    otherwise (it must still hold it). Positions past the chunk read its last token (the
    caller writes no entry that pools them)."""
    n = chunk_BTX.shape[1]
    rel_BCP = pos_BCP - start_B[:, None, None]
    from_chunk = cache.gather_rows(chunk_BTX, jnp.clip(rel_BCP, 0, n - 1))
    from_ring = cache.gather_rows(ring_BSX, jnp.mod(pos_BCP, ring_BSX.shape[1]))
    in_chunk = (rel_BCP >= 0).reshape(*rel_BCP.shape, *(1,) * (chunk_BTX.ndim - 2))
    return jnp.where(in_chunk, from_chunk, from_ring)


def _chunk_runs(start_B: Array, end_B: Array, n: int, rate: int) -> tuple[Array, Array, Array]:
    """The runs a chunk of ``n`` tokens from ``start`` to ``end`` may complete: (B, C) run
    indices ``start // rate + i`` for i < C = n // rate + 1 (a static bound), their (B, C, P)
    token positions, and (B, C) bool: the run is complete after the chunk (its entry is
    written)."""
    c = n // rate + 1
    run_BC = start_B[:, None] // rate + jnp.arange(c, dtype=jnp.int32)[None, :]
    pos_BCP = run_BC[..., None] * rate + jnp.arange(rate, dtype=jnp.int32)
    return run_BC, pos_BCP, (run_BC + 1) * rate <= end_B[:, None]


def _raw_window_keep(step: cache.Step, window: int) -> Array:
    """(B, n, W + n) bool: the raw keys [the ring before the chunk | the chunk's own] that each
    chunk token reads: positions p - window < s <= p."""
    ring_pos_BW = _ring_positions(step.start_B, window)
    pos_BT = step.pos_BT
    lo_BT1 = pos_BT[:, :, None] - window
    ring_BTW = (ring_pos_BW[:, None, :] >= 0) & (ring_pos_BW[:, None, :] > lo_BT1)
    own_BTT = ((pos_BT[:, None, :] <= pos_BT[:, :, None]) & (pos_BT[:, None, :] > lo_BT1)
               & step.ok_BT[:, None, :])
    return jnp.concatenate([ring_BTW, own_BTT], axis=2) & step.ok_BT[:, :, None]


def _entry_visible(pos_BT: Array, c: int, rate: int) -> Array:
    """(B, n, C) bool: entry c is visible at position p once its run is past, (c + 1) * rate <= p."""
    return (jnp.arange(c, dtype=jnp.int32) + 1)[None, None, :] * rate <= pos_BT[:, :, None]


def _selected_attention(q_BTNH: Array, sel_BTMH: Array, sel_keep_BTM: Array, kv_BSH: Array,
                       keep_BTS: Array, sink_N: Array, scale: float,
                       precision: core.Precision = None) -> Array:
    """One softmax (with the per-head sink) over each query's own ``M`` gathered keys
    ``sel_BTMH`` (keys and values) and the keys ``kv_BSH`` shared by the chunk; ``*_keep`` say
    which it reads. The math of ``dot_product_attention`` (logits in the softmax dtype, rows
    that read nothing give zeros) without a (T, C) array. Returns (B, T, N, H)."""
    dt = core.softmax_dtype(q_BTNH.dtype)
    m = sel_BTMH.shape[2]
    sel_BNTM = jnp.einsum("BTNH,BTMH->BNTM", q_BTNH, sel_BTMH, precision=precision)
    own_BNTS = jnp.einsum("BTNH,BSH->BNTS", q_BTNH, kv_BSH, precision=precision)
    logits = jnp.concatenate([sel_BNTM.astype(dt), own_BNTS.astype(dt)], axis=-1) * scale
    keep_B1TX = jnp.concatenate([sel_keep_BTM, keep_BTS], axis=-1)[:, None]
    probs = core.masked_softmax(logits, keep_B1TX, sink_N.astype(dt)[None, :, None, None])
    out = jnp.einsum("BNTM,BTMH->BTNH", probs[..., :m].astype(sel_BTMH.dtype), sel_BTMH,
                     precision=precision)
    return out + jnp.einsum("BNTS,BSH->BTNH", probs[..., m:].astype(kv_BSH.dtype), kv_BSH,
                            precision=precision)


# ----------------------------------------------------------------------------- modules


def _xavier_uniform_grouped(key, shape, dtype=jnp.float32):
    """``nn.init.xavier_uniform_`` on an (A, Y, O) tensor: fan_in = Y * O, fan_out = A * O."""
    a, y, o = shape
    bound = math.sqrt(6.0 / (y * o + a * o))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class GroupedOutputProjection(nn.Module):
    """Heads split into ``num_groups`` groups, each projected to ``group_dim``; then one Linear.

    Args mirror ``attnhut.compressed.GroupedOutputProjection``: ``num_heads``, ``head_dim``,
    ``num_groups`` (divides num_heads), ``dim``, ``group_dim`` (falsy: head_dim), ``bias``;
    ``precision`` of both matmuls.
    Parameters: ``w`` (A, Y, O) with Y = (num_heads // num_groups) * head_dim, ``out``.
    """

    num_heads: int
    head_dim: int
    num_groups: int
    dim: int
    group_dim: int | None = None
    bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    def setup(self) -> None:
        owner = "GroupedOutputProjection"
        gd = self.group_dim or self.head_dim
        core.check_positive(owner, num_heads=self.num_heads, head_dim=self.head_dim,
                            num_groups=self.num_groups, dim=self.dim, group_dim=gd)
        core.check_divisible(owner, ("num_heads", self.num_heads), ("num_groups", self.num_groups))
        in_g = (self.num_heads // self.num_groups) * self.head_dim
        self.w = core.param(self, "w", _xavier_uniform_grouped, (self.num_groups, in_g, gd),
                            ("heads", None, None), self.param_dtype)
        self.out = core.Linear(self.dim, use_bias=self.bias, axes=("heads", "embed"),
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               precision=self.precision)

    def __call__(self, o_BTNH: Array) -> Array:
        """(B, T, N, H) head outputs -> (B, T, D)."""
        b, t, _, _ = o_BTNH.shape
        o_BTAY = o_BTNH.reshape(b, t, self.num_groups, -1)
        o_BTAY, w_AYO = nn.dtypes.promote_dtype(o_BTAY, self.w, dtype=self.dtype)
        o_BTAO = jnp.einsum("BTAY,AYO->BTAO", o_BTAY, w_AYO, precision=self.precision)
        return self.out(o_BTAO.reshape(b, t, -1))


def _resolved(owner: str, dim: int, num_heads: int, kv_dim: int | None, q_lora_rank: int | None,
              num_groups: int | None, rate: int, window: int, **more: int) -> tuple[int, int, int]:
    """Validate the shared fields; (kv_dim, q_lora_rank, num_groups) with attnhut's defaults."""
    core.check_positive(owner, dim=dim, num_heads=num_heads, compression_rate=rate,
                        window=window, **more)
    c = kv_dim or dim // num_heads
    ql = q_lora_rank or dim // 2
    g = num_groups or num_heads
    core.check_positive(owner, kv_dim=c, q_lora_rank=ql, num_groups=g)
    core.check_divisible(owner, ("num_heads", num_heads), ("num_groups", g))
    return c, ql, g


def _queries(mod: nn.Module, x: Array, c_q: Array) -> Array:
    """(B, T, N, H) queries from the query latent, RMS-normalised per head."""
    b, t, _ = x.shape
    q_BTNH = mod.q_up(c_q).reshape(b, t, mod.num_heads, -1)
    return core.rms_norm(q_BTNH, mod.q_norm)


_BLOCK_K = 64  # key block of HCA's block-sparse core; the token rules are exact at any size


class HeavilyCompressedAttention(nn.Module):
    """HCA: heavy non-overlapped KV compression, every visible entry kept, plus a raw window.

    Args mirror ``attnhut.HeavilyCompressedAttention``: ``dim``, ``num_heads``,
    ``compression_rate`` (16), ``kv_dim`` (dim // num_heads), ``q_lora_rank`` (dim // 2),
    ``num_groups`` (num_heads), ``window`` (64), ``bias``; a falsy kv_dim / q_lora_rank /
    num_groups selects the default, as in attnhut. Parameters: ``kv``, ``z``, ``pos_bias``,
    ``q_down``, ``q_up``, ``q_norm``, ``kv_norm``, ``sink``, ``proj/w``, ``proj/out``.
    ``impl`` picks the registry's ``block_sparse`` op (``auto``/``reference``/``xla``/``pallas``;
    changes no variable); ``precision`` reaches every matmul.

    ``decode=True`` decodes incrementally (``attnhut_jax.cache``; ``init`` on (B, max_len, D),
    the cache holds max_len rounded up to whole runs): the cache holds the rms-normalised entry
    of every completed run (appended when a run of ``compression_rate`` tokens completes), the
    ``kv`` / ``z`` projections of the current partial run and the last ``window`` raw keys, never
    the raw K/V of every token. A step pools the runs its chunk completes exactly as the forward
    does and attends each token over the visible entries, its raw window and the sink (XLA,
    whatever ``impl``). The ``params`` are those of ``decode=False``.
    """

    dim: int
    num_heads: int
    compression_rate: int = 16
    kv_dim: int | None = None
    q_lora_rank: int | None = None
    num_groups: int | None = None
    window: int = 64
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``, amortised at long context: one shared
        ``kv_dim`` entry per ``compression_rate`` tokens (the raw window is a constant ``window``
        tokens, not a per-token cost)."""
        kv_dim = self.kv_dim or self.dim // self.num_heads
        return float(kv_dim / self.compression_rate * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays, all in ``dtype`` but the index: the entries
        (ceil(max_len / compression_rate), kv_dim), the current run's ``kv`` and ``z``
        projections (compression_rate, kv_dim) each, the raw-key ring (window, kv_dim), and the
        index."""
        r, h = self.compression_rate, self.kv_dim or self.dim // self.num_heads
        nc = -(-max_len // r)
        return (cache.nbytes((batch, nc, h), dtype) + 2 * cache.nbytes((batch, r, h), dtype)
                + cache.nbytes((batch, self.window, h), dtype) + cache.index_bytes(batch))

    def decode_reads(self, n: int) -> int:
        """Cache entries one decode query reads at cache length ``n`` (the query being the n-th
        token, position n - 1): every entry whose run lies before it, (n - 1) // compression_rate,
        and its raw window, min(window, n) tokens."""
        n = int(n)
        return (n - 1) // self.compression_rate + min(self.window, n) if n > 0 else 0

    def decode_scored(self, n: int) -> int:
        """Index keys a selector scores per decode query: none (HCA keeps every entry)."""
        del n
        return 0

    def setup(self) -> None:
        registry.check("HeavilyCompressedAttention", "block_sparse", self.impl)
        c, ql, g = _resolved("HeavilyCompressedAttention", self.dim, self.num_heads, self.kv_dim,
                             self.q_lora_rank, self.num_groups, self.compression_rate, self.window)
        n, pd = self.num_heads, self.param_dtype
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=pd, precision=self.precision)
        zeros = nn.initializers.zeros_init()
        self.kv = core.Linear(c, axes=("embed", "kv"), **kw)
        self.z = core.Linear(c, axes=("embed", "kv"), **kw)
        self.pos_bias = core.param(self, "pos_bias", zeros, (self.compression_rate, c),
                                   (None, "kv"), pd)
        self.q_down = core.Linear(ql, axes=("embed", "latent"), **kw)
        self.q_up = core.Linear(n * c, axes=("latent", "heads"), **kw)
        self.q_norm = core.ones_param(self, "q_norm", c, "kv", pd)
        self.kv_norm = core.ones_param(self, "kv_norm", c, "kv", pd)
        self.sink = core.param(self, "sink", zeros, (n,), ("heads",), pd)
        self.proj = GroupedOutputProjection(n, c, g, self.dim, bias=self.bias, dtype=self.dtype,
                                            param_dtype=pd, precision=self.precision)

    def __call__(self, x: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, lengths: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D), causal.

        ``segment_ids`` (B, T) int packs several sequences in a row (id 0: padding; see
        ``core``'s packed-sequence rule): an entry pools only the tokens of the segment of its
        run's first token, and a token reads the entries and raw tokens of its own segment only.
        A packed row equals each segment run alone when every segment starts at a multiple of
        ``compression_rate``. ``positions`` (B, T) int is validated and unused: only RoPE would
        read it, and HCA has none.

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``segment_ids`` and ``positions`` are refused.
        """
        owner = "HeavilyCompressedAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, segment_ids=segment_ids,
                            positions=positions)
        if self.decode:
            return self._decode(x, lengths)
        seg, _ = core.check_packing(owner, x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        t, r = x.shape[1], self.compression_rate
        kv_BTH = self.kv(x)
        comp_BCH = compress(kv_BTH, self.z(x), self.pos_bias, r, seg)
        kv_BSH = core.rms_norm(jnp.concatenate([comp_BCH, kv_BTH], axis=1), self.kv_norm)
        q_BTNH = _queries(self, x, self.q_down(x))
        # Keys are [pooled entries | raw tokens]. Entry c sits at position (c + 1) * rate, so the
        # causal rule shows it once its whole run is past; the entries are exempt from the window
        # (they are the first C keys), the raw tokens are windowed.
        nc, b = comp_BCH.shape[1], x.shape[0]
        q_pos = jnp.arange(t)
        k_pos = jnp.concatenate([(jnp.arange(nc) + 1) * r, q_pos])
        keep_TJ = core.window_block_keep(q_pos, k_pos, _BLOCK_K, window=self.window,
                                         num_sink_keys=nc)
        # With segments the op also drops the key blocks that hold no key of the query's segment.
        k_seg = None if seg is None else jnp.concatenate([entry_segments(seg, r), seg], axis=1)
        keep_B1TJ = jnp.broadcast_to(keep_TJ, (b, 1, *keep_TJ.shape))
        kv_BS1H = kv_BSH[:, :, None, :]
        out_BTNH = core.block_sparse_attention(
            q_BTNH, kv_BS1H, kv_BS1H, keep_B1TJ, block_k=_BLOCK_K, causal=True, impl=self.impl,
            scale=q_BTNH.shape[-1] ** -0.5, sink=self.sink, q_pos_T=q_pos, k_pos_S=k_pos,
            window=self.window, num_sink_keys=nc, precision=self.precision, owner=owner,
            **_segment_kwargs(seg, k_seg))
        return self.proj(out_BTNH)

    def _decode(self, x: Array, lengths: Array | None) -> Array:
        """One decode step: pool the runs the chunk completes into the entries, attend every
        chunk token over the visible entries, its raw window and the sink."""
        r, w = self.compression_rate, self.window
        step = cache.begin(self, "HeavilyCompressedAttention", x, lengths, sized_by="entries",
                           per_slot=r)
        b, n, _ = step.x.shape
        kv_BTH, z_BTH = self.kv(step.x), self.z(step.x)
        h, dt = kv_BTH.shape[-1], kv_BTH.dtype
        nc = -(-step.max_len // r)
        entries_BCH = step.state("entries", (b, nc, h), dt)
        run_kv_BPH = step.state("run_kv", (b, r, h), dt)
        run_z_BPH = step.state("run_z", (b, r, h), dt)
        raw_BWH = step.state("raw", (b, w, h), dt)
        if step.initializing:  # the parameters and the empty cache; nothing is attended
            return step.finish(self.proj(_queries(self, step.x, self.q_down(step.x))))
        start_B, end_B = step.start_B, step.end_B

        # the entries of the runs the chunk completes, pooled as ``compress`` pools them
        run_BC, pos_BCP, done_BC = _chunk_runs(start_B, end_B, n, r)
        c_BCPH = _run_values(kv_BTH, run_kv_BPH, pos_BCP, start_B)
        z_BCPH = _run_values(z_BTH, run_z_BPH, pos_BCP, start_B) + self.pos_bias.astype(dt)
        new_BCH = core.rms_norm(_pool(c_BCPH, z_BCPH), self.kv_norm)
        entries_BCH = cache.write_rows(entries_BCH, run_BC, new_BCH.astype(dt), done_BC)

        # keys [entries | raw ring before the chunk | the chunk's raw keys], as the forward's
        # block-sparse core reads them: entry c once (c + 1) * r <= p, raw s once p - W < s <= p
        raw_BTH = core.rms_norm(kv_BTH, self.kv_norm)
        kv_BSH = jnp.concatenate([entries_BCH, raw_BWH, raw_BTH.astype(dt)], axis=1)
        keep_BTS = jnp.concatenate([_entry_visible(step.pos_BT, nc, r) & step.ok_BT[:, :, None],
                                    _raw_window_keep(step, w)], axis=2)
        q_BTNH = _queries(self, step.x, self.q_down(step.x))
        kv_BS1H = kv_BSH[:, :, None, :]
        out_BTNH = core.dot_product_attention(q_BTNH, kv_BS1H, kv_BS1H, keep=keep_BTS[:, None],
                                              scale=q_BTNH.shape[-1] ** -0.5, sink=self.sink,
                                              precision=self.precision)

        step.put("entries", entries_BCH)
        step.put("run_kv", _ring_write(run_kv_BPH, step.pos_BT, kv_BTH, step.ok_BT, end_B))
        step.put("run_z", _ring_write(run_z_BPH, step.pos_BT, z_BTH, step.ok_BT, end_B))
        step.put("raw", _ring_write(raw_BWH, step.pos_BT, raw_BTH, step.ok_BT, end_B))
        return step.finish(self.proj(out_BTNH))


class CompressedSparseAttention(nn.Module):
    """CSA: light overlapped compression, top-k entries per query from a lightning indexer.

    Args mirror ``attnhut.CompressedSparseAttention``: ``dim``, ``num_heads``,
    ``compression_rate`` (4), ``top_k`` (16), ``kv_dim`` (dim // num_heads), ``q_lora_rank``
    (dim // 2), ``num_index_heads`` (4), ``index_dim`` (64), ``num_groups`` (num_heads),
    ``window`` (64), ``bias``; plus ``impl`` (the registry's ``csa`` op:
    ``auto``/``reference``/``xla``/``pallas``), which changes no variable, ``precision`` (every
    matmul) and ``selector_dtype`` (default float32: the indexer's projections and scores,
    whatever ``dtype``) and ``detach_index_input`` (default False, attnhut's: the indexer reads
    the query latent, the compressed entries and ``x`` themselves, so ``index_loss`` also trains
    what produces them; True: it reads them through ``stop_gradient``, as DeepSeek-V3.2 trains
    its indexer). Parameters: ``kv_a``, ``kv_b``, ``z_a``, ``z_b``, ``bias_a``,
    ``bias_b``, ``q_down``, ``q_up``, ``q_norm``, ``kv_norm``, ``sink``, ``idx_q``, ``idx_k``,
    ``idx_w``, ``proj/w``, ``proj/out``.

    ``reference`` scores every (query, entry) pair and attends through a dense
    (T, C + T) mask, as attnhut does. ``xla`` / ``pallas`` (``auto``: the fastest for the
    backend) select with the fused indexer top-k (entry ``c`` sits at position
    ``(c + 1) * rate`` and is valid once that is ``<= t``) and attend over the selected entries,
    the raw window and the sink only (``token_sparse_attention`` with ``window_start = C``),
    building no (T, T) array. ``return_aux=True`` builds the (T, C) scores and selects from
    them, so the returned selection is the one attended.

    ``decode=True`` decodes incrementally (``attnhut_jax.cache``; ``init`` on (B, max_len, D),
    the cache holds max_len rounded up to whole runs): the cache holds the rms-normalised entry
    of every completed run and its indexer key (``selector_dtype``), the ``kv_a`` / ``z_a``
    projections of the current partial run, the ``kv_b`` / ``z_b`` projections of it and of the
    run before (an entry pools both), and the last ``window`` raw keys, never the raw K/V of
    every token. A step pools the runs its chunk completes exactly as the forward does; each
    chunk token scores the cached indexer keys of its visible entries (float32), gathers its
    ``top_k`` entries (ties to the lower index) and attends over them, its raw window and the
    sink only (XLA, whatever ``impl``). The ``params`` are those of ``decode=False``.
    """

    dim: int
    num_heads: int
    compression_rate: int = 4
    top_k: int = 16
    kv_dim: int | None = None
    q_lora_rank: int | None = None
    num_index_heads: int = 4
    index_dim: int = 64
    num_groups: int | None = None
    window: int = 64
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    selector_dtype: Dtype = jnp.float32
    detach_index_input: bool = False
    decode: bool = False

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``, amortised at long context: per
        ``compression_rate`` tokens one shared ``kv_dim`` entry and its indexer key (``index_dim``);
        the raw window is a constant ``window`` tokens, not counted."""
        kv_dim = self.kv_dim or self.dim // self.num_heads
        return float((kv_dim + self.index_dim) / self.compression_rate * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: the entries (ceil(max_len / compression_rate),
        kv_dim) in ``dtype`` and their indexer keys (same count, index_dim) in ``selector_dtype``
        (when None: ``dtype`` promoted with ``param_dtype``), the current run's ``kv_a`` /
        ``z_a`` projections (compression_rate, kv_dim) each, the ``kv_b`` / ``z_b`` projections
        of the current and previous runs (2 * compression_rate, kv_dim) each and the raw-key ring
        (window, kv_dim), in ``dtype``, and the index."""
        r, h = self.compression_rate, self.kv_dim or self.dim // self.num_heads
        nc = -(-max_len // r)
        sel = cache.selector_dtype(self.selector_dtype, dtype, self.param_dtype)
        return (cache.nbytes((batch, nc, h), dtype) + cache.nbytes((batch, nc, self.index_dim), sel)
                + 2 * cache.nbytes((batch, r, h), dtype) + 2 * cache.nbytes((batch, 2 * r, h), dtype)
                + cache.nbytes((batch, self.window, h), dtype) + cache.index_bytes(batch))

    def decode_reads(self, n: int) -> int:
        """Cache entries one decode query reads at cache length ``n`` (the query being the n-th
        token, position n - 1): its selected entries, min(top_k, (n - 1) // compression_rate),
        and its raw window, min(window, n) tokens."""
        n = int(n)
        return min(self.top_k, self.decode_scored(n)) + min(self.window, n) if n > 0 else 0

    def decode_scored(self, n: int) -> int:
        """Indexer keys one decode query scores at cache length ``n``: those of the entries
        whose run lies before it, (n - 1) // compression_rate."""
        n = int(n)
        return (n - 1) // self.compression_rate if n > 0 else 0

    def setup(self) -> None:
        registry.check("CompressedSparseAttention", "csa", self.impl)
        c, ql, g = _resolved("CompressedSparseAttention", self.dim, self.num_heads, self.kv_dim,
                             self.q_lora_rank, self.num_groups, self.compression_rate, self.window,
                             top_k=self.top_k, num_index_heads=self.num_index_heads,
                             index_dim=self.index_dim)
        n, r, pd = self.num_heads, self.compression_rate, self.param_dtype
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=pd, precision=self.precision)
        zeros = nn.initializers.zeros_init()
        self.kv_a = core.Linear(c, axes=("embed", "kv"), **kw)
        self.kv_b = core.Linear(c, axes=("embed", "kv"), **kw)
        self.z_a = core.Linear(c, axes=("embed", "kv"), **kw)
        self.z_b = core.Linear(c, axes=("embed", "kv"), **kw)
        self.bias_a = core.param(self, "bias_a", zeros, (r, c), (None, "kv"), pd)
        self.bias_b = core.param(self, "bias_b", zeros, (r, c), (None, "kv"), pd)
        self.q_down = core.Linear(ql, axes=("embed", "latent"), **kw)
        self.q_up = core.Linear(n * c, axes=("latent", "heads"), **kw)
        self.q_norm = core.ones_param(self, "q_norm", c, "kv", pd)
        self.kv_norm = core.ones_param(self, "kv_norm", c, "kv", pd)
        self.sink = core.param(self, "sink", zeros, (n,), ("heads",), pd)
        kw_index = dict(kw, dtype=self.selector_dtype)
        self.idx_q = core.Linear(self.num_index_heads * self.index_dim, axes=("latent", "index"),
                                 **kw_index)
        self.idx_k = core.Linear(self.index_dim, axes=("kv", "index"), **kw_index)
        self.idx_w = core.Linear(self.num_index_heads, axes=("embed", "index_heads"), **kw_index)
        self.proj = GroupedOutputProjection(n, c, g, self.dim, bias=self.bias, dtype=self.dtype,
                                            param_dtype=pd, precision=self.precision)

    def __call__(self, x: Array, return_aux: bool = False, *, segment_ids: Array | None = None,
                 positions: Array | None = None, index_loss: IndexLoss | None = None,
                 lengths: Array | None = None):
        """(B, T, D) -> (B, T, D), causal.

        With ``return_aux`` also returns ``{"index_scores": (B, T, C), "selected": (B, T, C),
        "dense_weights": (B, N, T, C)}``: the indexer scores (fill value where the entry is not
        visible), the kept entries, and the main branch's attention over *every* visible entry
        (no top-k; the sink logit in the denominator, the raw window left out), the target of
        ``dsa_index_aux_loss(aux["index_scores"], aux["dense_weights"])``.

        ``segment_ids`` (B, T) int packs several sequences in a row (id 0: padding; see
        ``core``'s packed-sequence rule): an entry pools only the tokens of the segment of its
        run's first token (the previous-run half drops out across a segment boundary), a token
        selects among and reads the entries of its own segment only, and its raw window holds
        its own segment's tokens only; the aux arrays follow the same rule. A packed row equals
        each segment run alone when every segment starts at a multiple of ``compression_rate``.
        ``positions`` (B, T) int is validated and unused: only RoPE would read it, and CSA has
        none.

        ``index_loss`` adds the indexer's training loss, a scalar, to the returned values
        (``(out, loss)``, or ``(out, aux, loss)`` with ``return_aux``); the loss trains only
        through the indexer's scores (the attention it fits is a constant), and its mean runs
        over the non-padding queries:

        * ``"dense"``: attnhut's ``dsa_index_aux_loss`` target, the head-summed main branch over
          every visible entry (sink in the denominator, raw window excluded) against the softmax
          of the indexer scores over the visible entries;
        * ``"sparse"``: over each query's selected entries only: KL from the attention the
          output uses (softmax over the selected entries, the raw window and the sink),
          restricted to the selection, summed over heads and normalised, to the softmax of the
          indexer scores over the same selection.

        ``reference`` materialises the (T, C) scores and weights; ``xla`` / ``pallas`` compute
        the loss in tiles (``attnhut_jax.index_loss``), without a (T, C) array.

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``return_aux``, ``segment_ids``, ``positions`` and
        ``index_loss`` are refused.
        """
        owner = "CompressedSparseAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, return_aux=return_aux,
                            segment_ids=segment_ids, positions=positions, index_loss=index_loss)
        if self.decode:
            return self._decode(x, lengths)
        if index_loss not in (None, "dense", "sparse"):
            raise ValueError(f"{owner}: index_loss={index_loss!r} must be None, 'dense' or "
                             f"'sparse'")
        seg, _ = core.check_packing(owner, x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        r = self.compression_rate
        kv_a_BTH = self.kv_a(x)
        comp_BCH = compress_overlap(kv_a_BTH, self.kv_b(x), self.z_a(x), self.z_b(x), self.bias_a,
                                    self.bias_b, r, seg)
        nc = comp_BCH.shape[1]
        e_seg = None if seg is None else entry_segments(seg, r)
        k_seg = None if seg is None else jnp.concatenate([e_seg, seg], axis=1)
        kv_BSH = core.rms_norm(jnp.concatenate([comp_BCH, kv_a_BTH], axis=1), self.kv_norm)
        c_q = self.q_down(x)
        q_BTNH = _queries(self, x, c_q)

        # Lightning indexer: sum over indexer heads of w * relu(q . k), no scale.
        idx_in = (c_q, comp_BCH, x)
        if self.detach_index_input:
            idx_in = tuple(jax.lax.stop_gradient(a) for a in idx_in)
        qi_BTIE = self.idx_q(idx_in[0]).reshape(b, t, self.num_index_heads, self.index_dim)
        ki_BCE = self.idx_k(idx_in[1])
        w_BTI = self.idx_w(idx_in[2])
        scale = q_BTNH.shape[-1] ** -0.5
        aux = None
        if return_aux:
            visible = entry_keep(t, nc, r, seg, e_seg)
            scores_BTC = core.masked_lightning_scores(qi_BTIE, ki_BCE, w_BTI, visible, self.precision)
            selected_BTC = core.topk_keep(scores_BTC, visible, self.top_k)
            aux = {"index_scores": scores_BTC, "selected": selected_BTC}
        res = registry.call(
            owner, "csa", self.impl, q_BTNH, kv_BSH, self.sink, qi_BTIE, ki_BCE, w_BTI,
            top_k=self.top_k, rate=r, window=self.window, scale=scale,
            index_scores_BTC=None if aux is None else scores_BTC, precision=self.precision,
            **_segment_kwargs(seg, k_seg), **({} if index_loss is None else {"index_loss": index_loss}))
        out_BTNH, loss = (res, None) if index_loss is None else res
        out = self.proj(out_BTNH)
        if return_aux:
            probs_BKGTC = core.attention_weights(
                q_BTNH, kv_BSH[:, :nc, None, :], keep=visible if seg is None else visible[:, None],
                scale=scale, sink=self.sink, precision=self.precision)
            aux["dense_weights"] = probs_BKGTC.reshape(b, self.num_heads, t, nc)
        if aux is None and loss is None:
            return out
        return (out, *(a for a in (aux, loss) if a is not None))

    def _decode(self, x: Array, lengths: Array | None) -> Array:
        """One decode step: pool the runs the chunk completes into the entries and their indexer
        keys, select each chunk token's top-k visible entries and attend over those, its raw
        window and the sink."""
        r, w = self.compression_rate, self.window
        step = cache.begin(self, "CompressedSparseAttention", x, lengths, sized_by="entries",
                           per_slot=r)
        xc = step.x
        b, n, _ = xc.shape
        ca_BTH, cb_BTH, za_BTH, zb_BTH = self.kv_a(xc), self.kv_b(xc), self.z_a(xc), self.z_b(xc)
        h, dt = ca_BTH.shape[-1], ca_BTH.dtype
        nc = -(-step.max_len // r)
        c_q = self.q_down(xc)
        idx_in = (c_q, xc)
        if self.detach_index_input:
            idx_in = tuple(jax.lax.stop_gradient(a) for a in idx_in)
        qi_BTIE = self.idx_q(idx_in[0]).reshape(b, n, self.num_index_heads, self.index_dim)
        w_BTI = self.idx_w(idx_in[1])

        # the entries of the runs the chunk completes, pooled as ``compress_overlap`` pools them:
        # run c with the a-projections and bias, run c - 1 with the b ones (entry 0: none)
        entries_BCH = step.state("entries", (b, nc, h), dt)
        run = {name: step.state(name, (b, size, h), dt) for name, size in
               (("run_kv_a", r), ("run_z_a", r), ("run_kv_b", 2 * r), ("run_z_b", 2 * r))}
        raw_BWH = step.state("raw", (b, w, h), dt)
        if step.initializing:  # the parameters and the empty cache; nothing is attended
            ki_BTE = self.idx_k(ca_BTH)
            step.state("index_key", (b, nc, ki_BTE.shape[-1]), ki_BTE.dtype)
            return step.finish(self.proj(_queries(self, xc, c_q)))
        start_B, end_B = step.start_B, step.end_B
        run_BC, pos_BCP, done_BC = _chunk_runs(start_B, end_B, n, r)
        fill = core.mask_value(dt)
        a_c = _run_values(ca_BTH, run["run_kv_a"], pos_BCP, start_B)
        a_z = _run_values(za_BTH, run["run_z_a"], pos_BCP, start_B) + self.bias_a.astype(dt)
        first_BC11 = (run_BC == 0)[:, :, None, None]
        b_c = jnp.where(first_BC11, jnp.zeros((), dt),
                        _run_values(cb_BTH, run["run_kv_b"], pos_BCP - r, start_B))
        b_z = jnp.where(first_BC11, jnp.asarray(fill, dt),
                        _run_values(zb_BTH, run["run_z_b"], pos_BCP - r, start_B)
                        + self.bias_b.astype(dt))
        comp_BCH = _pool(jnp.concatenate([a_c, b_c], axis=2), jnp.concatenate([a_z, b_z], axis=2))
        ki_in = jax.lax.stop_gradient(comp_BCH) if self.detach_index_input else comp_BCH
        ki_BCE = self.idx_k(ki_in)
        index_key_BCE = step.state("index_key", (b, nc, ki_BCE.shape[-1]), ki_BCE.dtype)
        index_key_BCE = cache.write_rows(index_key_BCE, run_BC, ki_BCE, done_BC)
        new_BCH = core.rms_norm(comp_BCH, self.kv_norm)
        entries_BCH = cache.write_rows(entries_BCH, run_BC, new_BCH.astype(dt), done_BC)

        # selection: the lightning scores of every visible entry (float32; the fill elsewhere),
        # then top_k (ties to the lower index); the selected entries are gathered
        visible_BTC = _entry_visible(step.pos_BT, nc, r) & step.ok_BT[:, :, None]
        scores_BTC = core.masked_lightning_scores(qi_BTIE, index_key_BCE, w_BTI, visible_BTC,
                                                  self.precision)
        idx_BTM = core.indices_from_scores(scores_BTC, visible_BTC, self.top_k)
        sel_BTMH = cache.gather_rows(entries_BCH, idx_BTM)

        raw_BTH = core.rms_norm(ca_BTH, self.kv_norm).astype(dt)
        q_BTNH = _queries(self, xc, c_q)
        out_BTNH = _selected_attention(
            q_BTNH, sel_BTMH, idx_BTM >= 0, jnp.concatenate([raw_BWH, raw_BTH], axis=1),
            _raw_window_keep(step, w), self.sink, q_BTNH.shape[-1] ** -0.5, self.precision)

        step.put("entries", entries_BCH)
        step.put("index_key", index_key_BCE)
        for name, value in (("run_kv_a", ca_BTH), ("run_z_a", za_BTH), ("run_kv_b", cb_BTH),
                            ("run_z_b", zb_BTH), ("raw", raw_BTH)):
            ring = raw_BWH if name == "raw" else run[name]
            step.put(name, _ring_write(ring, step.pos_BT, value, step.ok_BT, end_B))
        return step.finish(self.proj(out_BTNH))

"""Sparse Sinkhorn attention (Tay, Bahri, Yang, Metzler, Juan, *Sparse Sinkhorn Attention*,
ICML 2020, arXiv 2002.11296).

The sequence is cut into blocks of ``block_size`` tokens. A sorting network reads one summary per
block and scores every block against every block (the paper's SortNet, Section 3.2: R = P(X'),
P a ReLU layer over the pooled blocks X'); Sinkhorn normalisation in log space for a fixed number
of iterations (Section 3.3, the Sinkhorn operator S^k with temperature and optional Gumbel noise,
after Mena et al.) turns R into a soft permutation P of blocks. The sorted keys and values are P
applied to the blocks (Section 3.4: psi_S(K) = U(P B(K))), and query block i attends, in one
softmax, its own block of keys and sorted block i (Section 3.4, sorted plus local attention), so a
query reads 2 x block_size keys. Causal Sinkhorn balancing (Section 3.5) keeps the causal variant
strictly causal; SortCut (Section 3.6, Y = Softmax(Q psi_S(K)[:n]^T) psi_S(V)[:n]) truncates the
sorted sequence to its first ``sortcut_k`` blocks, which every query attends.

Where the paper leaves a choice open (see ``docs/mechanisms.md``, "Sparse Sinkhorn attention"):

* the block summary is the mean of the block's keys (per head); causal: the mean of every key of
  the segment *before* the block, so row i of R depends only on earlier inputs;
* the sorting network is one ``Linear(head_dim -> ceil(max_len / block_size))`` shared by the
  heads, then ReLU; column j of row i scores block j of the row's segment;
* each Sinkhorn iteration normalises columns, then rows (log space), so every sorted block is a
  convex combination of blocks; causal: entry (i, j) is allowed only for j < i, and the column
  step divides by the column's sum over rows <= i only (a prefix), so row i never reads a later
  row;
* Gumbel noise (``deterministic=False``, rng stream ``"gumbel"``) is added to R before the
  division by the temperature: S((R + eps) / tau);
* a sequence whose length is no multiple of ``block_size`` is padded; padded keys are zeros in
  the mixtures and unreadable, padded queries are dropped.

Decoding (``decode=True``, causal only; ``attnhut_jax.cache``): row i of the causal Sinkhorn
matrix depends only on blocks before i, so when block i's first token arrives the step forms its
sorting row from the cached running key sum, its Sinkhorn row from the cached column prefixes of
the earlier rows (``causal_sinkhorn_row``: Section 3.5's prefix column step, one row at a time)
and its sorted block from the cached keys and values, and caches that sorted block; every query
of the block then reads its block up to itself and the cached sorted block. Bidirectional and
SortCut decoding are refused (their sorting reads later blocks).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import cache, core, registry
from .core import Array, Dtype

GUMBEL_RNG = "gumbel"

_DECODE_REFUSED = ("with causal=False every block's sorted keys depend on the whole sequence (the "
                   "Sinkhorn columns sum over every block; SortCut's first sorted blocks mix every "
                   "block), so a prefix's outputs change as it grows; decode the causal variant")


# ----------------------------------------------------------------------------- block layout


def sinkhorn_block_pattern(num_blocks: int, *, causal: bool = False,
                           sortcut_k: int | None = None, sort_matrix=None,
                           threshold: float = 0.0) -> np.ndarray:
    """(num_blocks, num_blocks) bool on the host: the key blocks query block i reads (one
    sequence, no packing), for the patterns figure.

    Without ``sort_matrix``: the support, what any sort can make it read. Without SortCut: block
    i itself (local) and every block sorted block i may mix (all blocks; causal: blocks before
    i); with SortCut: the blocks the first ``sortcut_k`` sorted blocks may mix (all). With
    ``sort_matrix`` (J, J), one head's Sinkhorn matrix (``return_aux=True`` gives them as
    ``aux["sort_matrix"]``, (B, N, J, J)): the blocks whose weight in the sorted block(s) read is
    above ``threshold`` (0: every block that contributes at all), plus the own block.
    """
    n = int(num_blocks)
    if sort_matrix is None:
        mixed = np.tril(np.ones((n, n), bool), -1) if causal else np.ones((n, n), bool)
    else:
        mixed = np.asarray(sort_matrix, np.float64) > threshold
        if mixed.shape != (n, n):
            raise ValueError(f"sinkhorn_block_pattern: sort_matrix of shape {mixed.shape} is not "
                             f"(num_blocks, num_blocks)=({n}, {n})")
    if sortcut_k is not None:
        return np.broadcast_to(mixed[:min(sortcut_k, n)].any(0), (n, n)).copy()
    return mixed | np.eye(n, dtype=bool)


def _layout(segment_ids_BT: Array | None, b: int, t: int, block_size: int):
    """Padded-token validity, run ids and block tables.

    A segment is a run of one non-zero id; its first token must sit at a multiple of
    ``block_size`` (``bad_B`` marks the rows where one does not). Returns ``rid_BT`` (padded length,
    0 = padding, else the run's number), ``rid_BJ`` (each block's run), ``start_BJ`` (the run's
    first block), ``bad_B``.
    """
    nb = -(-t // block_size)
    tp = nb * block_size
    if segment_ids_BT is None:
        seg = jnp.ones((b, t), jnp.int32)
    else:
        seg = segment_ids_BT
    seg = jnp.pad(seg, ((0, 0), (0, tp - t)))
    prev = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
    starts = (seg != 0) & (seg != prev)
    bad_B = jnp.any(starts & (jnp.arange(tp) % block_size != 0)[None], axis=1)
    rid_BT = jnp.where(seg != 0, jnp.cumsum(starts, axis=1), 0).astype(jnp.int32)
    rid_BJ = jnp.max(rid_BT.reshape(b, nb, block_size), axis=-1)
    prev_j = jnp.pad(rid_BJ[:, :-1], ((0, 0), (1, 0)))
    first = (rid_BJ != 0) & (rid_BJ != prev_j)
    start_BJ = jax.lax.cummax(jnp.where(first, jnp.arange(nb)[None], 0), axis=1)
    return rid_BT, rid_BJ, start_BJ, bad_B


# ----------------------------------------------------------------------------- Sinkhorn


def _masked_lse(x: Array, keep: Array, axis: int) -> Array:
    """logsumexp over ``axis`` of the kept entries; 0 where none is kept."""
    xm = jnp.where(keep, x, core.mask_value(x.dtype))
    m = jax.lax.stop_gradient(jnp.max(xm, axis=axis, keepdims=True))
    s = jnp.sum(jnp.where(keep, jnp.exp(xm - m), 0.0), axis=axis, keepdims=True)
    return jnp.where(s > 0, m + jnp.log(jnp.where(s > 0, s, 1.0)), 0.0)


def _prefix_lse(x: Array, keep: Array, axis: int) -> Array:
    """logsumexp over entries 0..i of ``axis`` (kept only), for every i; 0 where none is kept."""
    xm = jnp.where(keep, x, core.mask_value(x.dtype))
    out = jax.lax.cumlogsumexp(xm, axis=axis % xm.ndim)
    any_kept = jnp.cumsum(jnp.broadcast_to(keep, xm.shape).astype(jnp.int32), axis=axis) > 0
    return jnp.where(any_kept, out, 0.0)


def sinkhorn(log_alpha: Array, keep: Array, iters: int, *, causal: bool) -> Array:
    """The Sinkhorn operator in log space over the last two axes (rows Q, columns J).

    ``iters`` times: the column step, then the row step, each over the ``keep`` entries only
    (masked entries stay unreadable, an empty row or column stays empty). Causal: the column
    step at (i, j) divides by the sum over rows <= i of column j, so row i depends on rows
    <= i only. Returns the matrix (not its log): masked entries are exactly 0.
    """
    fill = core.mask_value(log_alpha.dtype)

    def step(x, _):
        col = _prefix_lse(x, keep, axis=-2) if causal else _masked_lse(x, keep, axis=-2)
        x = jnp.where(keep, x - col, fill)
        return jnp.where(keep, x - _masked_lse(x, keep, axis=-1), fill), None

    # one compiled iteration body (a scan), however many iterations
    x, _ = jax.lax.scan(step, jnp.where(keep, log_alpha, fill), None, length=iters)
    return jnp.where(keep, jnp.exp(x), 0.0)


def causal_sinkhorn_row(log_alpha_BNJ: Array, keep_BJ: Array, prefix_BNIJ: Array
                        ) -> tuple[Array, Array]:
    """Row i of the causal Sinkhorn matrix, given what rows < i left: the decode form of
    ``sinkhorn(..., causal=True)``.

    ``log_alpha_BNJ``: row i of the (tempered) sorting logits; ``keep_BJ``: its allowed entries
    (j < i); ``prefix_BNIJ``: for each iteration (axis I, ``iters`` long) the logsumexp of
    column j over the earlier rows' entries as that iteration's column step read them (-inf
    where no earlier row has entry j). Iteration t's column step at (i, j) is then
    ``logaddexp(prefix[t, j], x[j])``, the causal prefix over rows <= i, and the row step is the
    full forward's. Returns (row i of P (B, N, J), the prefixes including row i).
    """
    fill = core.mask_value(log_alpha_BNJ.dtype)
    keep = keep_BJ[:, None, :]

    def step(x, pre_BNJ):
        col = jnp.logaddexp(pre_BNJ, jnp.where(keep, x, -jnp.inf))
        x = jnp.where(keep, x - col, fill)
        x = jnp.where(keep, x - _masked_lse(x, keep, axis=-1), fill)
        return x, jnp.where(keep, col, pre_BNJ)

    x, pre_IBNJ = jax.lax.scan(step, jnp.where(keep, log_alpha_BNJ, fill),
                               jnp.moveaxis(prefix_BNIJ, 2, 0))
    return jnp.where(keep, jnp.exp(x), 0.0), jnp.moveaxis(pre_IBNJ, 0, 2)


# ----------------------------------------------------------------------------- the pure core


def sort_keep(rid_BJ: Array, causal: bool) -> Array:
    """(B, Q, J) bool: block j may be sorted into block i (same run; causal: j < i)."""
    same = (rid_BJ[:, :, None] == rid_BJ[:, None, :]) & (rid_BJ != 0)[:, :, None]
    if causal:
        nb = rid_BJ.shape[1]
        same = same & (jnp.arange(nb)[None, :, None] > jnp.arange(nb)[None, None, :])
    return same


def block_summaries(k_BTNH: Array, rid_BT: Array, rid_BJ: Array, start_BJ: Array,
                    block_size: int, causal: bool) -> Array:
    """(B, N, J, H) float32: the mean of each block's keys; causal: the mean of every key of the
    run before the block (0 for a run's first block)."""
    b, tp, n, h = k_BTNH.shape
    nb = tp // block_size
    ft = jnp.promote_types(k_BTNH.dtype, jnp.float32)
    valid = (rid_BT != 0).astype(ft)
    k32 = k_BTNH.astype(ft) * valid[..., None, None]
    sums = k32.reshape(b, nb, block_size, n, h).sum(2)  # (B, J, N, H)
    counts = valid.reshape(b, nb, block_size).sum(2)  # (B, J)
    if causal:
        csum = jnp.cumsum(sums, axis=1) - sums  # exclusive
        ccnt = jnp.cumsum(counts, axis=1) - counts
        at_start = jnp.take_along_axis(csum, start_BJ[:, :, None, None], axis=1)
        sums = csum - at_start
        counts = ccnt - jnp.take_along_axis(ccnt, start_BJ, axis=1)
        same_run = rid_BJ != 0
        counts = jnp.where(same_run, counts, 0.0)
    mean = sums / jnp.maximum(counts, 1.0)[..., None, None]
    return mean.transpose(0, 2, 1, 3)


def gather_sort_logits(logits_BNQW: Array, start_BJ: Array) -> Array:
    """(B, N, Q, J): column j of row i is the sorting network's output ``j - start(i)`` (the
    block's index within the row's segment)."""
    nb, w = start_BJ.shape[1], logits_BNQW.shape[-1]
    idx = jnp.clip(jnp.arange(nb)[None, None, :] - start_BJ[:, :, None], 0, w - 1)
    return jnp.take_along_axis(logits_BNQW, idx[:, None], axis=-1)


def _sortcut_rows(start_BJ: Array, rid_BJ: Array, k: int) -> tuple[Array, Array]:
    """(B, Q, C) row indices of the first ``k`` sorted blocks of each query block's run and
    whether each exists (same run)."""
    nb = start_BJ.shape[1]
    rows = start_BJ[:, :, None] + jnp.arange(k)[None, None, :]
    ok = rows < nb
    rows = jnp.minimum(rows, nb - 1)
    rid_rows = jnp.take_along_axis(rid_BJ[:, :, None], rows.reshape(rows.shape[0], -1, 1),
                                   axis=1).reshape(rows.shape)
    ok = ok & (rid_rows == rid_BJ[:, :, None]) & (rid_BJ != 0)[:, :, None]
    return rows, ok


def _slot_readable(sort_BNQJ: Array, valid_BT: Array, nb: int, bs: int,
                   precision: core.Precision = None) -> Array:
    """(B, N, Q, S) bool: slot s of sorted block i holds some real token (a block with non-zero
    weight in row i has a real token at s); the others (padding, empty rows) are unreadable."""
    b = valid_BT.shape[0]
    mass = jnp.einsum("BNQJ,BJS->BNQS", sort_BNQJ.astype(jnp.float32),
                      valid_BT.reshape(b, nb, bs).astype(jnp.float32), precision=precision)
    return mass > 0


def local_sorted_attention(q_BNQTH: Array, k_BNQSH: Array, v_BNQSH: Array, ks_BNQSH: Array,
                           vs_BNQSH: Array, local_BQTS: Array, srt_BNQTS: Array, *, scale: float,
                           precision: core.Precision = None) -> Array:
    """Query block q attends its own block of keys (``local_BQTS``) and its sorted block
    (``srt_BNQTS``) in one softmax over 2 x block_size keys (Section 3.4); shared by the full
    forward and the decode step. Returns (B, N, Q, T, H)."""
    bs = k_BNQSH.shape[3]
    keep = jnp.concatenate([jnp.broadcast_to(local_BQTS[:, None], srt_BNQTS.shape), srt_BNQTS],
                           axis=-1)
    l_loc = jnp.einsum("BNQTH,BNQSH->BNQTS", q_BNQTH, k_BNQSH, precision=precision)
    l_srt = jnp.einsum("BNQTH,BNQSH->BNQTS", q_BNQTH, ks_BNQSH, precision=precision)
    sm = core.softmax_dtype(q_BNQTH.dtype)
    logits = jnp.concatenate([l_loc, l_srt], axis=-1).astype(sm) * scale
    probs = core.masked_softmax(logits, keep).astype(v_BNQSH.dtype)
    return (jnp.einsum("BNQTS,BNQSH->BNQTH", probs[..., :bs], v_BNQSH, precision=precision)
            + jnp.einsum("BNQTS,BNQSH->BNQTH", probs[..., bs:], vs_BNQSH, precision=precision))


def _common(q_BTNH: Array, k_BTNH: Array, v_BTNH: Array, rid_BT: Array, scale: float | None):
    """(scale, real-token mask (B, T), keys and values with padding zeroed): what the block path
    and the dense reference both start from."""
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
    valid_BT = rid_BT != 0
    zero = jnp.zeros((), k_BTNH.dtype)
    return (scale, valid_BT, jnp.where(valid_BT[..., None, None], k_BTNH, zero),
            jnp.where(valid_BT[..., None, None], v_BTNH, zero))


@registry.register("sinkhorn", "xla")
def sinkhorn_block_attention(q_BTNH: Array, k_BTNH: Array, v_BTNH: Array, sort_BNQJ: Array,
                             rid_BT: Array, rid_BJ: Array, start_BJ: Array, *, block_size: int,
                             causal: bool, sortcut_k: int | None = None,
                             scale: float | None = None, precision: core.Precision = None
                             ) -> Array:
    """Sorted + local block attention given the Sinkhorn matrix; O(T x block_size) logits.

    Shapes are padded to a multiple of ``block_size`` (T = J x block_size). ``sort_BNQJ`` is the
    (masked) Sinkhorn matrix; ``rid_BT`` / ``rid_BJ`` / ``start_BJ`` as ``_layout`` returns them.
    Without SortCut, query block i reads its own block (causal: keys at or before the query)
    and sorted block i = sum_j P_ij block_j, in one softmax; with SortCut (bidirectional only)
    it reads the first ``sortcut_k`` sorted blocks of its segment. A sorted key slot is readable
    when some block with non-zero weight in its row holds a real token there (padding mixes in
    as zeros). Returns (B, T, N, H).
    """
    b, tp, n, h = q_BTNH.shape
    nb, bs = tp // block_size, block_size
    scale, valid_BT, k_BTNH, v_BTNH = _common(q_BTNH, k_BTNH, v_BTNH, rid_BT, scale)
    q_BNQTH = q_BTNH.reshape(b, nb, bs, n, h).transpose(0, 3, 1, 2, 4)
    k_BNJSH = k_BTNH.reshape(b, nb, bs, n, h).transpose(0, 3, 1, 2, 4)
    v_BNJSH = v_BTNH.reshape(b, nb, bs, n, h).transpose(0, 3, 1, 2, 4)
    p = sort_BNQJ.astype(k_BTNH.dtype)
    ks_BNQSH = jnp.einsum("BNQJ,BNJSH->BNQSH", p, k_BNJSH, precision=precision)
    vs_BNQSH = jnp.einsum("BNQJ,BNJSH->BNQSH", p, v_BNJSH, precision=precision)
    slot_BNQS = _slot_readable(sort_BNQJ, valid_BT, nb, bs, precision)
    rid_BQT = rid_BT.reshape(b, nb, bs)
    q_ok_BQT = rid_BQT != 0
    if sortcut_k is not None:
        rows, ok = _sortcut_rows(start_BJ, rid_BJ, sortcut_k)  # (B, Q, C)
        c = sortcut_k
        flat = rows.reshape(b, nb * c)
        ks = jnp.take_along_axis(ks_BNQSH, flat[:, None, :, None, None], axis=2)
        vs = jnp.take_along_axis(vs_BNQSH, flat[:, None, :, None, None], axis=2)
        ks = ks.reshape(b, n, nb, c * bs, h)
        vs = vs.reshape(b, n, nb, c * bs, h)
        slot = jnp.take_along_axis(slot_BNQS, flat[:, None, :, None], axis=2)
        keep_BNQS = (slot.reshape(b, n, nb, c, bs) & ok[:, None, :, :, None]).reshape(
            b, n, nb, c * bs)
        keep = keep_BNQS[:, :, :, None, :] & q_ok_BQT[:, None, :, :, None]
        logits = jnp.einsum("BNQTH,BNQSH->BNQTS", q_BNQTH, ks, precision=precision)
        sm = core.softmax_dtype(q_BTNH.dtype)
        probs = core.masked_softmax(logits.astype(sm) * scale, keep)
        out = jnp.einsum("BNQTS,BNQSH->BNQTH", probs.astype(vs.dtype), vs, precision=precision)
    else:
        same = rid_BQT[:, :, :, None] == rid_BQT[:, :, None, :]
        local = same & q_ok_BQT[:, :, :, None]
        if causal:
            local = local & jnp.tril(jnp.ones((bs, bs), bool))
        srt = slot_BNQS[:, :, :, None, :] & q_ok_BQT[:, None, :, :, None]
        out = local_sorted_attention(q_BNQTH, k_BNJSH, v_BNJSH, ks_BNQSH, vs_BNQSH, local, srt,
                                     scale=scale, precision=precision)
    return out.transpose(0, 2, 3, 1, 4).reshape(b, tp, n, h)


@registry.register("sinkhorn", "reference")
def sinkhorn_dense_reference(q_BTNH: Array, k_BTNH: Array, v_BTNH: Array, sort_BNQJ: Array,
                             rid_BT: Array, rid_BJ: Array, start_BJ: Array, *, block_size: int,
                             causal: bool, sortcut_k: int | None = None,
                             scale: float | None = None, precision: core.Precision = None
                             ) -> Array:
    """The same pattern as ``sinkhorn_block_attention`` computed densely (the benchmark's
    masked-dense baseline): (T, T) logits against the keys and (T, T) logits against the sorted
    keys (every sorted block, flattened), with a (T, 2T) mask that keeps what the block path
    reads. Equal to it up to rounding."""
    b, tp, n, h = q_BTNH.shape
    nb, bs = tp // block_size, block_size
    scale, valid_BT, k_BTNH, v_BTNH = _common(q_BTNH, k_BTNH, v_BTNH, rid_BT, scale)
    p = sort_BNQJ.astype(k_BTNH.dtype)
    kb = k_BTNH.reshape(b, nb, bs, n, h)
    vb = v_BTNH.reshape(b, nb, bs, n, h)
    ks_BTNH = jnp.einsum("BNQJ,BJSNH->BQSNH", p, kb, precision=precision).reshape(b, tp, n, h)
    vs_BTNH = jnp.einsum("BNQJ,BJSNH->BQSNH", p, vb, precision=precision).reshape(b, tp, n, h)
    slot_BNT = _slot_readable(sort_BNQJ, valid_BT, nb, bs, precision).reshape(b, n, tp)
    blk = jnp.arange(tp) // bs
    q_ok = valid_BT[:, :, None]
    if sortcut_k is not None:
        rows, ok = _sortcut_rows(start_BJ, rid_BJ, sortcut_k)  # (B, Q, C)
        reads_BQJ = jnp.any((rows[..., None] == jnp.arange(nb)) & ok[..., None], axis=2)
        keep_srt = ((reads_BQJ[:, blk][:, :, blk] & q_ok)[:, None]
                    & slot_BNT[:, :, None, :])
        keep = jnp.concatenate([jnp.zeros_like(keep_srt), keep_srt], axis=-1)
    else:
        local = ((blk[:, None] == blk[None, :])[None] & (rid_BT[:, :, None] == rid_BT[:, None, :])
                 & q_ok)
        if causal:
            local = local & core.causal_mask(tp, tp)
        keep_srt = (((blk[:, None] == blk[None, :])[None] & q_ok)[:, None]
                    & slot_BNT[:, :, None, :])
        keep = jnp.concatenate([jnp.broadcast_to(local[:, None], keep_srt.shape), keep_srt],
                               axis=-1)
    kk = jnp.concatenate([k_BTNH, ks_BTNH], axis=1)
    vv = jnp.concatenate([v_BTNH, vs_BTNH], axis=1)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, kk, precision=precision)
    probs = core.masked_softmax(logits.astype(core.softmax_dtype(q_BTNH.dtype)) * scale, keep)
    return jnp.einsum("BNTS,BSNH->BTNH", probs.astype(vv.dtype), vv, precision=precision)


# ----------------------------------------------------------------------------- the module


class SinkhornAttention(nn.Module):
    """Sparse Sinkhorn attention: a learned soft block permutation plus local block attention.

    Fields: ``dim``, ``num_heads``, ``block_size``, ``sinkhorn_iters`` (8), ``temperature``
    (0.75), ``causal`` (False), ``sortcut_k`` (None: no SortCut; k: every query attends the first
    k sorted blocks only, bidirectional only), ``max_len`` (4096: the sorting network scores
    ceil(max_len / block_size) blocks, so longer inputs are refused), ``bias``, ``impl`` (the
    registry's ``sinkhorn`` op: ``auto`` = ``xla``, the block path; ``reference``: the masked
    dense (T, 2T) computation of the same pattern, for benchmarks), ``dtype`` / ``param_dtype``
    / ``precision``, ``decode`` (causal only: incremental decoding through
    ``attnhut_jax.cache``, see ``docs/mechanisms.md``). Parameters: ``qkv``, ``sort`` (the sorting
    network), ``proj``.
    """

    dim: int
    num_heads: int
    block_size: int
    sinkhorn_iters: int = 8
    temperature: float = 0.75
    causal: bool = False
    sortcut_k: int | None = None
    max_len: int = 4096
    bias: bool = False
    impl: registry.SinkhornImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes the decoder caches per token in ``dtype``: K and V of every head (sorted blocks
        mix every earlier block); the per-row arrays (the current sorted block, the running key
        sum, the Sinkhorn prefixes) are in ``cache_bytes``."""
        return float(2 * self.dim * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays (``dtype``: the keys' and values'): ``key`` and
        ``value`` (B, max_len, N, H); ``sorted_key`` and ``sorted_value`` (B, block_size, N, H),
        the current block's sorted block; ``key_sum`` (B, N, H) float32, the sum of every key
        so far; ``sort_prefix`` (B, N, sinkhorn_iters, ceil(max_len / block_size)) float32, the
        causal Sinkhorn's column prefixes; and the index."""
        b, n, h, bs = int(batch), self.num_heads, self.head_dim, self.block_size
        sums = jnp.promote_types(dtype, jnp.float32)
        return (2 * cache.nbytes((b, max_len, n, h), dtype) + 2 * cache.nbytes((b, bs, n, h), dtype)
                + cache.nbytes((b, n, h), sums)
                + cache.nbytes((b, n, self.sinkhorn_iters, -(-int(max_len) // bs)), jnp.float32)
                + cache.index_bytes(b))

    def decode_reads(self, n: int) -> int:
        """Cached keys and values one decode query at cache length ``n`` (position p = n - 1,
        block i = p // block_size) reads: its block up to p (``p mod block_size + 1``), the
        ``block_size`` rows of its sorted block (cached, from block 1 on), and the mixture that
        formed that sorted block amortised over the block: the block's first token reads the
        ``i x block_size`` earlier keys and values once, with the Sinkhorn weights, ``i`` rows
        per query (as Delta counts its anchor rows' dense reads)."""
        if n <= 0:
            return 0
        p, bs = int(n) - 1, self.block_size
        return p % bs + 1 + (bs if p >= bs else 0) + p // bs

    def decode_scored(self, n: int) -> int:
        """Index keys a selector scores per decode query: none (the sorting row of a block is
        the sorting network on the running key mean, no cached key is scored)."""
        del n
        return 0

    @property
    def max_blocks(self) -> int:
        return -(-self.max_len // self.block_size)

    def setup(self) -> None:
        owner = "SinkhornAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads,
                            block_size=self.block_size, max_len=self.max_len)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        if isinstance(self.sinkhorn_iters, bool) or not isinstance(self.sinkhorn_iters, int) \
                or self.sinkhorn_iters < 0:
            raise ValueError(f"{owner}: sinkhorn_iters={self.sinkhorn_iters!r} must be an int >= 0")
        if not self.temperature > 0:
            raise ValueError(f"{owner}: temperature={self.temperature!r} must be > 0")
        if self.sortcut_k is not None:
            if isinstance(self.sortcut_k, bool) or not isinstance(self.sortcut_k, int) \
                    or self.sortcut_k < 1:
                raise ValueError(f"{owner}: sortcut_k={self.sortcut_k!r} must be None or an "
                                 f"int >= 1")
            if self.causal:
                raise ValueError(f"{owner}: sortcut_k={self.sortcut_k} with causal=True: every "
                                 f"query reads the first sorted blocks, which mix every block "
                                 f"(SortCut is an encoder's truncation)")
        registry.check(owner, "sinkhorn", self.impl)
        cache.refuse_decode(owner, self.decode and not self.causal, _DECODE_REFUSED)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.qkv = core.Linear(3 * self.dim, use_bias=self.bias, axes=("embed", "qkv"), **kw)
        # the sorting network runs in float32 (at least) whatever ``dtype``: it decides what is read
        self.sort = core.Linear(self.max_blocks, use_bias=True, axes=("kv", "blocks"),
                                dtype=None if self.dtype is None else
                                jnp.promote_types(self.dtype, jnp.float32),
                                param_dtype=self.param_dtype, precision=self.precision)
        self.proj = core.Linear(self.dim, use_bias=self.bias, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, *, segment_ids: Array | None = None,
                 deterministic: bool = True, return_aux: bool = False,
                 lengths: Array | None = None):
        """(B, T, D) -> (B, T, D); with ``return_aux``: (out, aux), aux = {"sort_matrix":
        (B, N, J, J) float32 Sinkhorn matrices, "block_reads": (B, N, J, J) bool, the key blocks
        each query block reads (its own and those with non-zero sorting weight; SortCut: those
        of its first k sorted blocks)}, J = ceil(T / block_size).

        ``segment_ids`` (B, T) int: packed sequences, 0 = padding. A segment is a run of one
        id and must start at a multiple of ``block_size`` (pad each segment to whole blocks):
        blocks, summaries and sorting then never mix segments and a packed row computes what
        its segments compute alone. A segment starting mid-block raises ``ValueError`` when
        called eagerly; under ``jit`` that row's outputs are NaN.

        ``deterministic=False`` adds Gumbel noise to the sorting logits, drawn from the
        ``"gumbel"`` rng stream (``apply(..., rngs={"gumbel": key})``).

        With ``decode=True`` (causal): ``x`` is the chunk to append and ``lengths`` (B,) the
        tokens each row appends (``attnhut_jax.cache``); ``segment_ids``, ``return_aux`` and
        ``deterministic=False`` are refused.
        """
        owner = "SinkhornAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, segment_ids=segment_ids,
                            return_aux=return_aux)
        if self.decode:
            if not deterministic:
                raise ValueError(f"{owner}: deterministic=False cannot be used with decode=True "
                                 f"(the Gumbel noise is drawn for the whole sorting matrix at "
                                 f"once, so a decoder cannot draw a row's share of it)")
            return self._decode(cache.begin(self, owner, x, lengths, sized_by="key"))
        seg, _ = core.check_packing(owner, x, segment_ids, None)
        b, t, _ = x.shape
        if t > self.max_len:
            raise ValueError(f"{owner}: sequence length {t} > max_len={self.max_len} (the sorting "
                             f"network scores {self.max_blocks} blocks)")
        bs, n, h = self.block_size, self.num_heads, self.head_dim
        nb = -(-t // bs)
        tp = nb * bs
        rid_BT, rid_BJ, start_BJ, bad_B = _layout(seg, b, t, bs)
        if seg is not None and not isinstance(bad_B, jax.core.Tracer) and bool(jnp.any(bad_B)):
            rows = np.flatnonzero(np.asarray(bad_B)).tolist()
            raise ValueError(f"{owner}: segment_ids rows {rows} have a segment starting inside a "
                             f"block (block_size={bs}); start every segment at a multiple of "
                             f"block_size")
        x = core.mask_padding(x, seg)
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        pad = ((0, 0), (0, tp - t), (0, 0))
        q, k, v = (jnp.pad(a, pad).reshape(b, tp, n, h) for a in (q, k, v))
        summ_BNJH = block_summaries(k, rid_BT, rid_BJ, start_BJ, bs, self.causal)
        logits_BNQW = jax.nn.relu(self.sort(summ_BNJH))
        logits_BNQW = logits_BNQW.astype(jnp.promote_types(logits_BNQW.dtype, jnp.float32))
        r_BNQJ = gather_sort_logits(logits_BNQW, start_BJ)
        if not deterministic:
            if not self.has_rng(GUMBEL_RNG):
                raise ValueError(f"{owner}: deterministic=False draws Gumbel noise from the "
                                 f"{GUMBEL_RNG!r} rng stream; pass rngs={{'{GUMBEL_RNG}': key}}")
            u = jax.random.uniform(self.make_rng(GUMBEL_RNG), r_BNQJ.shape, r_BNQJ.dtype,
                                   minval=jnp.finfo(r_BNQJ.dtype).tiny, maxval=1.0)
            r_BNQJ = r_BNQJ - jnp.log(-jnp.log(u))
        keep_BQJ = sort_keep(rid_BJ, self.causal)
        p_BNQJ = sinkhorn(r_BNQJ / self.temperature, keep_BQJ[:, None], self.sinkhorn_iters,
                          causal=self.causal)
        out = registry.call(owner, "sinkhorn", self.impl, q, k, v, p_BNQJ, rid_BT, rid_BJ,
                            start_BJ, block_size=bs, causal=self.causal,
                            sortcut_k=self.sortcut_k, scale=h ** -0.5, precision=self.precision)
        out = out[:, :t].reshape(b, t, self.dim)
        if seg is not None:
            out = jnp.where(bad_B[:, None, None], jnp.nan, out)
        y = self.proj(out)
        if not return_aux:
            return y
        return y, {"sort_matrix": p_BNQJ, "block_reads": self._block_reads(p_BNQJ, rid_BJ,
                                                                           start_BJ)}

    def _decode(self, step: cache.Step) -> Array:
        """One decode call (causal): append the chunk; for every block whose first token it
        appends, the block's sorting row (the sorting network on the running key mean), its
        row of the causal Sinkhorn matrix (``causal_sinkhorn_row``, from the cached column
        prefixes) and its sorted block (read once from the cache with those weights, then
        cached); then each query attends its block up to itself and its block's sorted block,
        as the full forward does.

        The chunk's queries are laid out on the grid of the blocks they touch (at most
        ``(n + block_size - 2) // block_size + 1``), so a chunk costs O(n x block_size) logits.
        """
        owner = "SinkhornAttention"
        b, n, _ = step.x.shape
        bs, nh, h, iters = self.block_size, self.num_heads, self.head_dim, self.sinkhorn_iters
        length = step.max_len
        if length > self.max_len:
            raise ValueError(f"{owner}: a decode cache of max_len={length} is longer than "
                             f"max_len={self.max_len} (the sorting network scores "
                             f"{self.max_blocks} blocks)")
        nb = -(-length // bs)
        q, k, v = jnp.split(self.qkv(step.x), 3, axis=-1)
        q, k, v = (a.reshape(b, n, nh, h) for a in (q, k, v))
        k_BSNH = step.append("key", k)
        v_BSNH = step.append("value", v)
        ft = jnp.promote_types(k.dtype, jnp.float32)
        ksum_BNH = step.state("key_sum", (b, nh, h), ft)
        prefix_BNIJ = step.state("sort_prefix", (b, nh, iters, nb), jnp.float32, fill=-jnp.inf)
        sk_BONH = step.state("sorted_key", (b, bs, nh, h), k.dtype)
        sv_BONH = step.state("sorted_value", (b, bs, nh, h), v.dtype)
        if step.initializing:  # create the sorting network's parameters, write nothing
            self.sort(jnp.zeros((b, nh, 1, h), ft))
            return step.finish(self.proj(jnp.zeros((b, n, self.dim), q.dtype)))
        k_BSNH, v_BSNH = jax.lax.optimization_barrier((k_BSNH, v_BSNH))

        # the blocks the chunk touches (slot c: block first + c) and those it starts
        start_B, end_B = step.start_B, step.end_B
        first_B = start_B // bs
        nc = (n + bs - 2) // bs + 1
        blk_BC = first_B[:, None] + jnp.arange(nc)[None, :]
        bstart_BC = blk_BC * bs
        new_BC = (bstart_BC >= start_B[:, None]) & (bstart_BC < end_B[:, None])

        # block summaries: the mean of every key before the block (the cached running sum plus
        # the chunk's keys before the block's first position)
        k32_BTNH = jnp.where(step.ok_BT[..., None, None], k.astype(ft), 0)
        csum_BTNH = jnp.pad(jnp.cumsum(k32_BTNH, axis=1), ((0, 0), (1, 0), (0, 0), (0, 0)))
        upto_BC = jnp.clip(bstart_BC - start_B[:, None], 0, n)
        sums_BCNH = ksum_BNH[:, None] + jnp.take_along_axis(csum_BTNH, upto_BC[..., None, None],
                                                            axis=1)
        summ_BNCH = (sums_BCNH / jnp.maximum(bstart_BC, 1).astype(ft)[..., None, None]
                     ).transpose(0, 2, 1, 3)
        logits_BNCW = jax.nn.relu(self.sort(summ_BNCH))
        logits_BNCW = logits_BNCW.astype(jnp.promote_types(logits_BNCW.dtype, jnp.float32))
        la_BNCJ = logits_BNCW[..., :nb] / self.temperature
        keep_BCJ = jnp.arange(nb)[None, None, :] < blk_BC[:, :, None]

        # the Sinkhorn rows of the started blocks, in order (row i reads rows < i's prefixes)
        def row(pre_BNIJ, xs):
            la_BNJ, keep_BJ, new_B = xs
            p_BNJ, pre_new = causal_sinkhorn_row(la_BNJ, keep_BJ, pre_BNIJ)
            return jnp.where(new_B[:, None, None, None], pre_new, pre_BNIJ), p_BNJ

        prefix_BNIJ, p_CBNJ = jax.lax.scan(row, prefix_BNIJ.astype(la_BNCJ.dtype), (
            jnp.moveaxis(la_BNCJ, 2, 0), jnp.moveaxis(keep_BCJ, 1, 0), new_BC.T))

        # sorted blocks: a started block mixes the cached blocks with its row's weights (read
        # only when some row starts a block); a block started earlier reuses the cached one
        full = length // bs  # blocks j < i lie in the cache's whole blocks

        def mix(_):
            p = jnp.moveaxis(p_CBNJ[..., :full], 0, 1).astype(k_BSNH.dtype)
            kb = k_BSNH[:, :full * bs].reshape(b, full, bs, nh, h)
            vb = v_BSNH[:, :full * bs].reshape(b, full, bs, nh, h)
            return (jnp.einsum("BCNJ,BJONH->BCONH", p, kb, precision=self.precision),
                    jnp.einsum("BCNJ,BJONH->BCONH", p, vb, precision=self.precision))

        def cached(_):
            return (jnp.broadcast_to(sk_BONH[:, None], (b, nc, bs, nh, h)),
                    jnp.broadcast_to(sv_BONH[:, None], (b, nc, bs, nh, h)))

        ks_BCONH, vs_BCONH = jax.lax.cond(jnp.any(new_BC), mix, cached, None)
        ks_BCONH = jnp.where(new_BC[..., None, None, None], ks_BCONH, sk_BONH[:, None])
        vs_BCONH = jnp.where(new_BC[..., None, None, None], vs_BCONH, sv_BONH[:, None])

        # the chunk's queries on the grid of its blocks; each reads its block's keys up to
        # itself and its block's sorted block (from block 1 on)
        rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
        at_BT = jnp.where(step.ok_BT, step.pos_BT - first_B[:, None] * bs, nc * bs)
        q_BXNH = jnp.zeros((b, nc * bs, nh, h), q.dtype).at[rows_BT, at_BT].set(q, mode="drop")
        kpos_BCO = bstart_BC[:, :, None] + jnp.arange(bs)[None, None, :]
        q_ok_BCO = (kpos_BCO >= start_B[:, None, None]) & (kpos_BCO < end_B[:, None, None])
        local_BCTS = (jnp.tril(jnp.ones((bs, bs), bool))[None, None]
                      & q_ok_BCO[..., :, None])
        srt_BNCTS = jnp.broadcast_to((q_ok_BCO & (blk_BC >= 1)[..., None])[:, None, :, :, None],
                                     (b, nh, nc, bs, bs))
        written = (kpos_BCO < end_B[:, None, None])[..., None, None]  # the rest is never read
        kl_BCONH = jnp.where(written, cache.gather_rows(k_BSNH, kpos_BCO), 0)
        vl_BCONH = jnp.where(written, cache.gather_rows(v_BSNH, kpos_BCO), 0)
        heads = lambda a: a.reshape(b, nc, bs, nh, -1).transpose(0, 3, 1, 2, 4)  # noqa: E731
        out_BNCOH = local_sorted_attention(
            heads(q_BXNH), heads(kl_BCONH), heads(vl_BCONH), heads(ks_BCONH), heads(vs_BCONH),
            local_BCTS, srt_BNCTS, scale=h ** -0.5, precision=self.precision)
        out_BXNH = out_BNCOH.transpose(0, 2, 3, 1, 4).reshape(b, nc * bs, nh, h)
        out_BTNH = jnp.take_along_axis(out_BXNH, jnp.minimum(at_BT, nc * bs - 1)[..., None, None],
                                       axis=1)

        # the cache after the chunk: the running key sum, the prefixes, the sorted block of the
        # block holding each row's last token
        last_B = jnp.maximum(end_B - 1, start_B) // bs - first_B
        pick = lambda a: jnp.take_along_axis(a, last_B[:, None, None, None, None], axis=1)[:, 0]  # noqa: E731
        step.put("key_sum", ksum_BNH + csum_BTNH[:, -1])
        step.put("sort_prefix", prefix_BNIJ.astype(jnp.float32))
        step.put("sorted_key", pick(ks_BCONH))
        step.put("sorted_value", pick(vs_BCONH))
        return step.finish(self.proj(out_BTNH.reshape(b, n, self.dim)))

    def _block_reads(self, p_BNQJ: Array, rid_BJ: Array, start_BJ: Array) -> Array:
        nb = rid_BJ.shape[1]
        mixed = p_BNQJ > 0
        if self.sortcut_k is None:
            own = jnp.eye(nb, dtype=bool)[None, None] & (rid_BJ != 0)[:, None, :, None]
            return mixed | own
        rows, ok = _sortcut_rows(start_BJ, rid_BJ, self.sortcut_k)  # (B, Q, C)
        sel = (rows[..., None] == jnp.arange(nb)) & ok[..., None]  # (B, Q, C, R)
        return jnp.einsum("BQCR,BNRJ->BNQJ", sel.astype(jnp.float32),
                          mixed.astype(jnp.float32), precision=self.precision) > 0

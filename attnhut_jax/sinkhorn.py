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
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import cache, core, registry
from .core import Array, Dtype

GUMBEL_RNG = "gumbel"

_DECODE_REFUSED = {
    False: "with causal=False every block's sorted keys depend on the whole sequence (the "
           "Sinkhorn columns sum over every block), so a prefix's outputs change as it grows",
    True: "not implemented for causal=True: row i of the causal Sinkhorn matrix depends only on "
          "blocks before block i, so a decoder could cache K, V and the block summaries and "
          "recompute row i at each block start, but no decode step is written; run the full "
          "causal forward",
}


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
    sm = core.softmax_dtype(q_BTNH.dtype)
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
        probs = core.masked_softmax(logits.astype(sm) * scale, keep)
        out = jnp.einsum("BNQTS,BNQSH->BNQTH", probs.astype(vs.dtype), vs, precision=precision)
    else:
        same = rid_BQT[:, :, :, None] == rid_BQT[:, :, None, :]
        local = same & q_ok_BQT[:, :, :, None]
        if causal:
            local = local & jnp.tril(jnp.ones((bs, bs), bool))
        srt = slot_BNQS[:, :, :, None, :] & q_ok_BQT[:, None, :, :, None]
        keep = jnp.concatenate([jnp.broadcast_to(local[:, None], srt.shape), srt], axis=-1)
        l_loc = jnp.einsum("BNQTH,BNQSH->BNQTS", q_BNQTH, k_BNJSH, precision=precision)
        l_srt = jnp.einsum("BNQTH,BNQSH->BNQTS", q_BNQTH, ks_BNQSH, precision=precision)
        logits = jnp.concatenate([l_loc, l_srt], axis=-1).astype(sm) * scale
        probs = core.masked_softmax(logits, keep).astype(v_BTNH.dtype)
        out = (jnp.einsum("BNQTS,BNQSH->BNQTH", probs[..., :bs], v_BNJSH, precision=precision)
               + jnp.einsum("BNQTS,BNQSH->BNQTH", probs[..., bs:], vs_BNQSH,
                            precision=precision))
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
    / ``precision``, ``decode`` (refused: see ``docs/mechanisms.md``). Parameters: ``qkv``,
    ``sort`` (the sorting network), ``proj``.
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
        """Bytes a decoder would cache per token in ``dtype``: K and V of every head (sorted blocks
        mix every earlier block; the running key sum per row is not per token). No decode step is
        written (``decode=True`` is refused)."""
        return float(2 * self.dim * jnp.dtype(dtype).itemsize)

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
        cache.refuse_decode(owner, self.decode, _DECODE_REFUSED[self.causal])
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.qkv = core.Linear(3 * self.dim, use_bias=self.bias, axes=("embed", "qkv"), **kw)
        # the sorting network runs in float32 (at least) whatever ``dtype``: it decides what is read
        self.sort = core.Linear(self.max_blocks, use_bias=True, axes=("kv", "blocks"),
                                dtype=None if self.dtype is None else
                                jnp.promote_types(self.dtype, jnp.float32),
                                param_dtype=self.param_dtype, precision=self.precision)
        self.proj = core.Linear(self.dim, use_bias=self.bias, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, *, segment_ids: Array | None = None,
                 deterministic: bool = True, return_aux: bool = False):
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
        """
        owner = "SinkhornAttention"
        core.check_input(x, self.dim, owner)
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

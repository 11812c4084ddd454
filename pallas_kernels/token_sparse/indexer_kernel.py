"""Lightning indexer + exact top-k as one Pallas kernel (GPU-style grid, Triton lowering).

Pallas has no sort or top-k inside kernels, so the running ``lax.top_k`` merge of
``indexer.py`` is replaced by an exact *radix select* that streams the key tiles: per query
tile (grid (B, query tiles)), scores are computed tile by tile in float32 and never stored;

1. each score becomes an order-preserving 32-bit key (float bits, negative values with their
   low 31 bits flipped, then the sign bit flipped, so unsigned key order is float order);
2. eight passes over the key tiles each fix 4 more bits of the k-th largest key of every row:
   a 16-bin histogram of the next digit among the valid keys that match the prefix found so
   far, then the digit where the remaining rank falls (pass 0 also counts the valid keys,
   ``k = min(top_k, valid)``). After the passes each row knows its exact k-th key ``theta``
   and how many keys equal to it it still needs;
3. a last pass keeps the keys ``> theta`` and, among the keys ``== theta``, the first ones in
   key order (a running count plus an in-tile ``cumsum``): exactly the lower-index-first tie
   rule of ``lax.top_k``. Kept keys are written compacted in ascending key order with masked
   scatter stores at ``count + cumsum``.

All nine passes run in ONE loop over (pass, key tile), so the score tile is computed by a
single piece of compiled code and every pass sees the same bits: the count that found
``theta`` and the compares of the last pass agree exactly, whatever the compiler contracts or
reorders (with one loop per pass, XLA CPU at optimisation level 0 rounded a score one ulp
differently in the last pass and left a slot at -1).

So the selected *set* equals ``indexer_topk_reference`` (whose columns come in score order;
here they come in key order, which is all attention needs), with no (T, S) array and O(1)
state per row; the price is recomputing the scores in 9 passes. ``IndexerKernelBlocks(
score_buffer_mib=...)`` trades that for memory: ``_score_kernel`` computes each score once into
a float32 buffer of a chunk of query tiles, and the same passes (``_kernel(scored=True)``) read
it, chunk after chunk: the same bits in every pass, O(chunk x S) memory. On an H100 that price is
high: 104 ms at T = 32768, top_k 2048, 4 x 64 index heads, where the attention itself takes
~5 ms (docs/performance.md; measured with float32 score products, one per index head; the
products now take the input dtype and all heads are one product, unmeasured). On CPU the XLA
path of ``indexer.py`` is used. Key tiles after a query tile's last valid key are not visited,
nor, with segment ids, the key tiles before the first (after the last) one whose ids' range
meets the range of the query tile's ids.
``-0.0`` ranks below ``+0.0`` (the total order of the float bits).

There is no Mosaic (TPU) variant: Mosaic lowers neither ``cumsum`` nor scatter stores, which
the compaction needs; on TPU the fused top-k runs as ``indexer.indexer_topk`` (XLA's native
``TopK`` inside the same tiled loop).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from ..common import F32, FILL, cdiv, check_segments, same_segment
from .reference import positions
from .tables import id_ranges

Array = jax.Array
_SIGN = -(2 ** 31)  # int32 with only the sign bit set
_LOW31 = 2 ** 31 - 1
_PASSES, _DIGIT = 8, 4


@dataclasses.dataclass(frozen=True)
class IndexerKernelBlocks:
    """Query tile, key tile and warps of the kernels. ``score_buffer_mib``: None runs the one
    fused kernel, which recomputes the scores in each of its 9 passes; a number scores every
    (query, key) pair once into a float32 buffer of at most that many MiB (chunks of query
    tiles, one after the other) and runs the same passes on the stored scores (``_score_kernel``
    then ``_kernel(scored=True)``): O(chunk x S) memory, never (T, S). Not yet timed on a GPU,
    so not the default."""

    block_q: int = 32
    block_k: int = 64
    num_warps: int = 4
    score_buffer_mib: float | None = None


def _ukey(sc: Array) -> Array:
    """float32 -> int32 whose *unsigned* order is the float order."""
    f = jax.lax.bitcast_convert_type(sc, jnp.int32)
    signed = f ^ (jax.lax.shift_right_arithmetic(f, jnp.int32(31)) & _LOW31)  # signed order == float order
    return signed ^ _SIGN


def score_dtype(*dtypes):
    """dtype of the in-kernel score products: the inputs' (float32 accumulation, so bf16
    products are exact and the scores ranked are float32), at most float32."""
    dt = jnp.promote_types(*dtypes)
    return F32 if jnp.finfo(dt).bits > 32 else dt


def _head_rows(q_ref, w_ref, k_dtype):
    """The tile's queries x index heads as (bq * heads) rows (row ``t * heads + h``) in the
    product dtype, and their weights as a column: every index head in ONE product, so the
    tensor cores see an M of bq * heads instead of ``heads`` products of M = bq."""
    bq, heads, e = q_ref.shape
    # products in the input dtype, float32 accumulation: exact products for bf16 inputs on the
    # tensor cores; float32 inputs follow ``precision`` (default: JAX's default matmul
    # precision, like the XLA paths)
    dt = score_dtype(q_ref.dtype, k_dtype)
    return (q_ref[...].astype(dt).reshape(bq * heads, e),
            w_ref[...].astype(F32).reshape(bq * heads, 1))


def _scores(q_all, w_all, k_ref, start, block_k: int, heads: int, precision):
    """(bq, block_k) float32 scores of keys ``start ...``: the weighted ReLU sum over heads is a
    reduction of the one product's reshaped result."""
    kb = k_ref[pl.ds(start, block_k), :].astype(q_all.dtype)
    dots = jax.lax.dot_general(q_all, kb, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=F32)  # (bq * heads, block_k)
    return (w_all * jnp.maximum(dots, 0.0)).reshape(-1, heads, block_k).sum(axis=1)


def _score_kernel(first_ref, end_ref, q_ref, w_ref, k_ref, sc_ref, *, heads: int, block_k: int,
                  precision):
    """Grid (B, query tiles, key tiles): the scores of one (query tile, key tile), computed
    once and stored, for the key tiles the selection walks (the others are never read)."""
    jt = pl.program_id(2)

    @pl.when((jt >= first_ref[0]) & (jt < end_ref[0]))
    def _():
        q_all, w_all = _head_rows(q_ref, w_ref, k_ref.dtype)
        sc_ref[...] = _scores(q_all, w_all, k_ref, 0, block_k, heads, precision)


def _kernel(first_ref, end_ref, qpos_ref, kpos_ref, *refs, heads: int, block_k: int, s_len: int, m: int,
            causal: bool, packed: bool, precision, scored: bool = False):
    """The radix select over a query tile's key tiles. ``scored``: the scores come from a
    stored (bq, Sp) buffer (``_score_kernel``) instead of being computed in every pass."""
    segs, refs = (refs[:2], refs[2:]) if packed else (None, refs)
    if scored:
        sc_ref, idx_ref, val_ref = refs
    else:
        q_ref, w_ref, k_ref, idx_ref, val_ref = refs
        q_all, w_all = _head_rows(q_ref, w_ref, k_ref.dtype)
    bq = idx_ref.shape[0]
    q_pos = qpos_ref[...]
    q_seg = segs[0][...] if packed else None  # the tile's query ids (bq,), all key ids (Sp,)
    kseg_ref = segs[1] if packed else None
    first, end = first_ref[0], end_ref[0]  # the key tiles this query tile walks

    def tile(jt):
        start = jt * block_k
        if scored:
            sc_TS = sc_ref[:, pl.ds(start, block_k)]
        else:
            sc_TS = _scores(q_all, w_all, k_ref, start, block_k, heads, precision)
        cols = start + jnp.arange(block_k, dtype=jnp.int32)
        valid_TS = jnp.broadcast_to((cols < s_len)[None, :], (bq, block_k))
        if causal:
            valid_TS = valid_TS & (kpos_ref[pl.ds(start, block_k)][None, :] <= q_pos[:, None])
        if packed:  # same segment, key not padding
            k_seg = kseg_ref[pl.ds(start, block_k)][None, :]
            valid_TS = valid_TS & same_segment(q_seg[:, None], k_seg)
        return sc_TS, _ukey(sc_TS), valid_TS, cols

    # One loop runs all the passes (8 counting passes, then the selecting one) over the key
    # tiles, so the score tile above is built by ONE piece of compiled code: the selection
    # compares keys with a ``theta`` counted from the very same bits. Separate loops compile
    # ``tile`` separately, and a compiler may round them differently (an FMA contracted in one
    # body and not in another: XLA CPU at optimisation level 0 did), so a key equal to the
    # k-th one could come out one ulp below ``theta`` in the last pass and its slot stay -1.
    nd = 2 ** _DIGIT
    idx_ref[...] = jnp.full(idx_ref.shape, -1, jnp.int32)
    val_ref[...] = jnp.full(val_ref.shape, FILL, jnp.float32)
    rows = jnp.broadcast_to(jnp.arange(bq, dtype=jnp.int32)[:, None], (bq, block_k))

    def count(p, last, u, valid, hist, prefix, rem, fixed):
        """Counting pass ``p`` over one tile: the 16-bin histogram of the next digit (bits
        ``shift`` .. ``shift + 3``) among the valid keys whose bits fixed so far (mask ``fixed``)
        match ``prefix``; after the pass's last tile, the digit where the remaining rank falls
        (pass 0 also counts the valid keys: ``rem = min(valid, m)``)."""
        shift = jnp.int32(32 - _DIGIT) - p * _DIGIT
        match = valid & (((u ^ prefix[:, None]) & fixed) == 0)
        digit = jax.lax.shift_right_logical(u, jnp.broadcast_to(shift, u.shape)) & (nd - 1)
        hist = tuple(hist[d] + jnp.sum(match & (digit == d), axis=1, dtype=jnp.int32) for d in range(nd))
        total = hist[0]
        for d in range(1, nd):
            total = total + hist[d]
        need = jnp.where(p == 0, jnp.minimum(total, m), rem)
        above = jnp.zeros((bq,), jnp.int32)
        chosen = jnp.full((bq,), -1, jnp.int32)
        new_rem = need
        for d in reversed(range(nd)):
            hit = (chosen < 0) & (above + hist[d] >= need)
            chosen = jnp.where(hit, d, chosen)
            new_rem = jnp.where(hit, need - above, new_rem)
            above = above + hist[d]
        digit_bits = jax.lax.shift_left(jnp.maximum(chosen, 0), jnp.broadcast_to(shift, chosen.shape))
        return (tuple(jnp.where(last, 0, h) for h in hist),
                jnp.where(last, prefix | digit_bits, prefix),
                jnp.where(last, new_rem, rem),
                jnp.where(last, fixed | jax.lax.shift_left(jnp.int32(nd - 1), shift), fixed))

    def select(sc_TS, u, valid_TS, cols, prefix, rem, taken, ties):
        """The last pass over one tile: keep the keys above the k-th key ``theta`` and the first
        ``rem`` keys equal to it (in key order), written compacted at ``taken + cumsum``."""
        theta = prefix ^ _SIGN  # signed form: signed compares of keys ^ SIGN are unsigned compares
        key = u ^ _SIGN
        eq = valid_TS & (key == theta[:, None])
        eq_i = eq.astype(jnp.int32)
        tie_rank = ties[:, None] + jnp.cumsum(eq_i, axis=1, dtype=jnp.int32) - eq_i
        keep = (valid_TS & (key > theta[:, None])) | (eq & (tie_rank < rem[:, None]))
        keep_i = keep.astype(jnp.int32)
        pos = taken[:, None] + jnp.cumsum(keep_i, axis=1, dtype=jnp.int32) - keep_i
        # masked lanes get distinct dump slots past the row's m (never read): a masked store
        # must not share an address with a kept one (interpret mode writes masked lanes back)
        pos = jnp.where(keep, pos, m + jnp.arange(block_k, dtype=jnp.int32)[None, :])
        pl_triton.store(idx_ref.at[rows, pos], jnp.broadcast_to(cols[None, :], (bq, block_k)),
                        mask=keep)
        pl_triton.store(val_ref.at[rows, pos], sc_TS, mask=keep)
        return (taken + keep_i.sum(axis=1, dtype=jnp.int32),
                ties + eq_i.sum(axis=1, dtype=jnp.int32))

    def body(_, carry):
        p, jt, hist, prefix, rem, fixed, taken, ties = carry
        sc_TS, u, valid_TS, cols = tile(jt)  # the only place scores are computed
        last = jt == end - 1

        def counting(hist, prefix, rem, fixed, taken, ties):
            return (*count(p, last, u, valid_TS, hist, prefix, rem, fixed), taken, ties)

        def selecting(hist, prefix, rem, fixed, taken, ties):
            return (hist, prefix, rem, fixed, *select(sc_TS, u, valid_TS, cols, prefix, rem, taken, ties))

        hist, prefix, rem, fixed, taken, ties = jax.lax.cond(
            p < _PASSES, counting, selecting, hist, prefix, rem, fixed, taken, ties)
        return (p + last.astype(jnp.int32), jnp.where(last, first, jt + 1), hist, prefix, rem, fixed,
                taken, ties)

    zeros = jnp.zeros((bq,), jnp.int32)
    init = (jnp.int32(0), first, tuple(zeros for _ in range(nd)), zeros, zeros, jnp.int32(0), zeros, zeros)
    jax.lax.fori_loop(0, (_PASSES + 1) * (end - first), body, init)


def indexer_topk_pallas(q_BTIE: Array, k_BSE: Array, w_BTI: Array, top_k: int, *, causal: bool,
                        q_pos_T: Array | None = None, k_pos_S: Array | None = None,
                        q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                        blocks: IndexerKernelBlocks = IndexerKernelBlocks(),
                        interpret: bool | None = None,
                        precision: jax.lax.PrecisionLike = None) -> tuple[Array, Array]:
    """(indices (B, T, min(top_k, S)) int32, scores): the set of ``indexer_topk_reference``,
    in ascending key order, ``-1`` / fill in the unused slots. ``interpret`` defaults to True
    off GPU. Scores are float32 (``score_dtype``); ``precision`` reaches their products.
    Segment ids ``q_seg_BT`` (B, T), ``k_seg_BS`` (B, S) (both or neither): a key is a
    candidate only if ``k_seg == q_seg != 0`` (padding queries select nothing)."""
    # a selection has no gradient: cut the tape before the kernel (which has no VJP)
    q_BTIE, k_BSE, w_BTI = (jax.lax.stop_gradient(a) for a in (q_BTIE, k_BSE, w_BTI))
    b, t, ni, e = q_BTIE.shape
    s = k_BSE.shape[1]
    m = min(top_k, s)
    q_seg_BT, k_seg_BS, _ = check_segments("indexer_topk_pallas", b, t, s, q_seg_BT, k_seg_BS)
    packed = q_seg_BT is not None
    mp = pl.next_power_of_2(m + blocks.block_k)  # m slots, then the dump slots
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    bq, bk = blocks.block_q, blocks.block_k
    qt, j = cdiv(t, bq), cdiv(s, bk)
    tp, sp = qt * bq, j * bk
    q_pos, k_pos = positions(t, s, q_pos_T, k_pos_S)
    qp = jnp.pad(q_pos, (0, tp - t), mode="edge")
    kp = jnp.pad(k_pos, (0, sp - s), constant_values=jnp.iinfo(jnp.int32).max)
    if causal:  # key tiles up to the last one holding a key valid for some query of the tile
        q_max = qp.reshape(qt, bq).max(axis=1)
        hi = jnp.where(kp[None, :] <= q_max[:, None], jnp.arange(sp, dtype=jnp.int32)[None, :] + 1,
                       0).max(axis=1)
        ntiles = (-(-hi // bk)).astype(jnp.int32)
    else:
        ntiles = jnp.full((qt,), j, jnp.int32)
    first, end = jnp.zeros((b, qt), jnp.int32), jnp.broadcast_to(ntiles, (b, qt))
    if packed:  # only the key tiles whose ids' range meets the query tile's (padding ignored)
        q_lo, q_hi = id_ranges(q_seg_BT, bq)  # (B, Q)
        k_lo, k_hi = id_ranges(k_seg_BS, bk)  # (B, J)
        meet_BQJ = ((q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
                    & (jnp.arange(j)[None, None, :] < end[:, :, None]))
        tiles = jnp.arange(j, dtype=jnp.int32)
        first = jnp.where(meet_BQJ, tiles, j).min(axis=-1)
        end = jnp.maximum(jnp.where(meet_BQJ, tiles + 1, 0).max(axis=-1), first)
    q = jnp.pad(q_BTIE, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    w = jnp.pad(w_BTI, ((0, 0), (0, tp - t), (0, 0)))
    k = jnp.pad(k_BSE, ((0, 0), (0, sp - s), (0, 0)))
    q_seg = jnp.pad(q_seg_BT, ((0, 0), (0, tp - t))) if packed else None
    k_seg = jnp.pad(k_seg_BS, ((0, 0), (0, sp - s))) if packed else None  # padding: id 0
    cfg = dict(heads=ni, block_k=bk, s_len=s, m=m, causal=causal, packed=packed,
               precision=precision)
    params = dict(interpret=interpret,
                  compiler_params=pl_triton.CompilerParams(num_warps=blocks.num_warps,
                                                           num_stages=1))

    def select(first, end, qp, q, w, q_seg, scores=None):
        """The radix-select kernel over the query tiles of ``q`` (rows ``qp``), scoring in
        every pass, or reading ``scores`` (B, rows, Sp) when given."""
        rows = qp.shape[0]
        tile = lambda bi, qi: (bi, qi, 0)  # noqa: E731
        seg_specs = ([pl.BlockSpec((None, bq), lambda bi, qi: (bi, qi)),
                      pl.BlockSpec((None, sp), lambda bi, qi: (bi, 0))] if packed else [])
        if scores is None:
            specs = [pl.BlockSpec((None, bq, ni, e), lambda bi, qi: (bi, qi, 0, 0)),
                     pl.BlockSpec((None, bq, ni), tile),
                     pl.BlockSpec((None, sp, e), lambda bi, qi: (bi, 0, 0))]
            operands = (q, w, k)
        else:
            specs, operands = [pl.BlockSpec((None, bq, sp), tile)], (scores,)
        return pl.pallas_call(
            functools.partial(_kernel, **cfg, scored=scores is not None),
            grid=(b, rows // bq),
            in_specs=[pl.BlockSpec((None, 1), lambda bi, qi: (bi, qi)),
                      pl.BlockSpec((None, 1), lambda bi, qi: (bi, qi)),
                      pl.BlockSpec((bq,), lambda bi, qi: (qi,)),
                      pl.BlockSpec((sp,), lambda bi, qi: (0,)), *seg_specs, *specs],
            out_specs=[pl.BlockSpec((None, bq, mp), tile), pl.BlockSpec((None, bq, mp), tile)],
            out_shape=[jax.ShapeDtypeStruct((b, rows, mp), jnp.int32),
                       jax.ShapeDtypeStruct((b, rows, mp), F32)],
            name="lightning_indexer_topk" if scores is None else "lightning_indexer_select",
            **params,
        )(first, end, qp, kp, *((q_seg, k_seg) if packed else ()), *operands)

    def score(first, end, q, w):
        """Every (query, key) score of the walked key tiles, once: (B, rows, Sp) float32."""
        rows = q.shape[1]
        return pl.pallas_call(
            functools.partial(_score_kernel, heads=ni, block_k=bk, precision=precision),
            grid=(b, rows // bq, j),
            in_specs=[pl.BlockSpec((None, 1), lambda bi, qi, jt: (bi, qi)),
                      pl.BlockSpec((None, 1), lambda bi, qi, jt: (bi, qi)),
                      pl.BlockSpec((None, bq, ni, e), lambda bi, qi, jt: (bi, qi, 0, 0)),
                      pl.BlockSpec((None, bq, ni), lambda bi, qi, jt: (bi, qi, 0)),
                      pl.BlockSpec((None, bk, e), lambda bi, qi, jt: (bi, jt, 0))],
            out_specs=pl.BlockSpec((None, bq, bk), lambda bi, qi, jt: (bi, qi, jt)),
            out_shape=jax.ShapeDtypeStruct((b, rows, sp), F32),
            name="lightning_indexer_scores", **params,
        )(first, end, q, w, k)

    if blocks.score_buffer_mib is None:
        idx, vals = select(first, end, qp, q, w, q_seg)
    else:
        # chunks of query tiles whose scores fit the buffer, one after the other; the padding
        # tiles of the last chunk walk no key tile (first = end = 0)
        per_tile = b * bq * sp * 4
        ct = max(1, min(qt, int(blocks.score_buffer_mib * 2 ** 20) // per_tile))
        nc = cdiv(qt, ct)
        pad_t = nc * ct - qt

        def chunked(x, axis):  # (..., qt * bq or qt, ...) on ``axis`` -> (nc, ...)
            x = jnp.pad(x, [(0, 0)] * axis + [(0, pad_t * (x.shape[axis] // qt))]
                        + [(0, 0)] * (x.ndim - axis - 1))
            x = x.reshape(*x.shape[:axis], nc, -1, *x.shape[axis + 1:])
            return jnp.moveaxis(x, axis, 0)

        def run(args):
            f, n_, qp_, q_, w_, qs_ = args
            return select(f, n_, qp_, q_, w_, qs_, scores=score(f, n_, q_, w_))

        xs = (chunked(first, 1), chunked(end, 1), chunked(qp, 0), chunked(q, 1), chunked(w, 1),
              chunked(q_seg, 1) if packed else jnp.zeros((nc,), jnp.int32))
        idx, vals = jax.lax.map(run, xs)  # (nc, B, ct * bq, mp)
        idx, vals = (jnp.moveaxis(a, 0, 1).reshape(b, nc * ct * bq, mp) for a in (idx, vals))
    return jax.lax.stop_gradient(idx[:, :t, :m]), jax.lax.stop_gradient(vals[:, :t, :m])

"""Sparse Transformer attention (Child, Gray, Radford and Sutskever, 2019, "Generating Long
Sequences with Sparse Transformers", arXiv:1904.10509): strided and fixed factorised patterns.

Section 4.2 ("Factorized self-attention") gives each output position i index sets and attends
over them (eqs. 2-4: ``attend(X, S) = (a(x_i, S_i))_i``, ``a(x_i, S_i) = softmax((W_q x_i)
K_{S_i}^T / sqrt(d)) V_{S_i}``, ``K_{S_i} = (W_k x_j)_{j in S_i}``, ``V_{S_i}`` alike). With
``l`` the stride (``stride`` / ``block_size``) and ``c`` the summary width (``num_summary``),
Section 4.3 defines p = 2 sets:

* strided: ``A(1)_i = {t, t+1, ..., i}`` with ``t = max(0, i - l)`` and
  ``A(2)_i = {j : (i - j) mod l = 0}``;
* fixed: ``A(1)_i = {j : floor(j / l) = floor(i / l)}`` and
  ``A(2)_i = {j : j mod l in {l - c, ..., l - 1}}``;
* causal (the paper's autoregressive case): only ``j <= i``. Bidirectional: strided reads
  ``|i - j| <= l`` and every key with ``(i - j) mod l = 0`` on either side; fixed reads its own
  block and the summary positions of every block.

Section 5.2 ("Factorized attention heads") combines the sets: ``combine="merged"`` is the merged
head (eq. 7, ``attention(X) = W_p . attend(X, union_m A(m))``: every head reads the union);
``combine="interleaved"`` gives the two types to alternating heads (even heads ``A(1)``, odd
heads ``A(2)``): the paper's interleaving ``A^(r mod p)`` (eq. 6) taken over the heads of one
layer instead of over residual blocks, i.e. its multi-head form (eq. 8) with heads of both types.
A query always reads itself (the fixed pattern's ``A(2)`` holds position
i only when i is a summary position; the interleaved odd heads of ``FixedSparseAttention`` read
``A(2)_i`` plus i). Packed sequences (``segment_ids``, id 0 = padding): every maximal run of one
non-zero id is one sequence; positions, blocks and residues restart at its first token.

Where it runs (``impl``, the registry's ``sparse_transformer`` op): the default path runs disjoint
passes of the block-sparse op (under the same impl name) and merges them exactly by their log-sum-exps
(``core.merge_softmax_passes``), building no (T, T) array. A single pass cannot be sparse for the
strided set: a tile of consecutive queries holds every residue class, so the union of their
"every l-th key" blocks is the whole sequence. So the strided pattern runs a window pass in the
natural order and a *class pass* in residue-class order (queries and keys permuted by
``(pos mod l, pos)``, the class as segment id: each class is a contiguous causal run), and the
fixed pattern runs an own-block pass (block as segment id) and a pass over the summary keys
gathered into a compact (c * T / l) array. For ``l ~ sqrt(T)`` every pass is O(T * sqrt(T)).
``impl="reference"`` is the masked dense computation of the same pattern (``strided_pattern`` /
``fixed_pattern`` build the (T, T) mask), for comparison and benchmarks.

Decoding (``decode=True``, causal only; ``attnhut_jax.cache``): the cache holds K and V of every
position; a step's query at position p gathers exactly its set (a static-size index list: the
window and the class positions, or the own block and the earlier summaries) from the cache.
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import cache, core, registry
from .core import Array, Dtype

Combine = Literal["merged", "interleaved"]
COMBINES: tuple[str, ...] = get_args(Combine)

_BLOCK_K = 64  # key block of the block-sparse passes (the token rules are exact at any size)
_DECODE_TILE = 64  # queries of a decode chunk that gather their keys at once


# ----------------------------------------------------------------------------- positions


def run_positions(segment_ids_BT: Array | None, t: int) -> tuple[Array, Array]:
    """(positions (B|1, T), runs (B|1, T)) int32: each token's position in its sequence and the
    sequence's id, 1, 2, ... for the maximal runs of one non-zero segment id, 0 for padding.
    Without segments: ``arange(T)`` and ones. O(T), no (T, T) array."""
    i_T = jnp.arange(t, dtype=jnp.int32)
    if segment_ids_BT is None:
        return i_T[None], jnp.ones((1, t), jnp.int32)
    seg = jnp.asarray(segment_ids_BT, jnp.int32)
    start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(start, i_T, 0), axis=1)
    run = jnp.where(seg != 0, jnp.cumsum(start, axis=1, dtype=jnp.int32), 0)
    return i_T - first, run


def _run_ids(change_BT: Array, keep_BT: Array) -> Array:
    """1, 2, ... starting a new id where ``change`` (and at the first token), 0 where not
    ``keep``: ids that never decrease along the row."""
    change = change_BT.at[:, 0].set(True)
    return jnp.where(keep_BT, jnp.cumsum(change, axis=1, dtype=jnp.int32), 0)


# ----------------------------------------------------------------------------- the sets


def _check_pattern(owner: str, l_name: str, l: int, combine: str, num_summary: int = 1,
                   num_heads: int = 1) -> None:
    core.check_positive(owner, **{l_name: l}, num_summary=num_summary, num_heads=num_heads)
    if num_summary > l:
        raise ValueError(f"{owner}: num_summary={num_summary} must be <= {l_name}={l}")
    if combine not in COMBINES:
        raise ValueError(f"{owner}: combine={combine!r} is not one of {COMBINES}")


def _pattern(kind: str, t: int, l: int, c: int, causal: bool, combine: str, num_heads: int,
             segment_ids: Array | None) -> Array:
    """(B|1, N, T, T) bool from the paper's set definitions on positions (a dense array)."""
    pos, run = run_positions(segment_ids, t)
    pi, pj = pos[:, :, None], pos[:, None, :]
    same = (run[:, :, None] == run[:, None, :]) & (run[:, None, :] != 0)
    d = pi - pj  # i - j within the sequence
    if kind == "strided":
        a1 = (d >= 0) & (d <= l) if causal else jnp.abs(d) <= l
        a2 = d % l == 0
    else:
        a1 = pi // l == pj // l
        a2 = pj % l >= l - c
    if causal:
        a1, a2 = a1 & (d >= 0), a2 & (d >= 0)
    a2 = a2 | (d == 0)  # a query always reads itself (only the fixed A(2) lacks it)
    a1, a2 = a1 & same, a2 & same
    if combine == "merged":
        return jnp.broadcast_to((a1 | a2)[:, None], (a1.shape[0], num_heads, t, t))
    odd = (jnp.arange(num_heads) % 2 == 1)[None, :, None, None]
    return jnp.where(odd, a2[:, None], a1[:, None])


def strided_pattern(length: int, stride: int, *, causal: bool = True,
                    combine: Combine = "merged", num_heads: int = 1,
                    segment_ids: Array | None = None) -> Array:
    """(B|1, num_heads, T, T) bool: the keys each query of each head of
    ``StridedSparseAttention`` reads (B = 1 without ``segment_ids``). A dense array, built from
    the set definitions: for the selection tests, the pattern figures and ``impl="reference"``.
    """
    _check_pattern("strided_pattern", "stride", stride, combine, num_heads=num_heads)
    return _pattern("strided", length, stride, 1, causal, combine, num_heads, segment_ids)


def fixed_pattern(length: int, block_size: int, num_summary: int = 1, *, causal: bool = True,
                  combine: Combine = "merged", num_heads: int = 1,
                  segment_ids: Array | None = None) -> Array:
    """(B|1, num_heads, T, T) bool: the keys each query of each head of ``FixedSparseAttention``
    reads (as ``strided_pattern``)."""
    _check_pattern("fixed_pattern", "block_size", block_size, combine, num_summary, num_heads)
    return _pattern("fixed", length, block_size, num_summary, causal, combine, num_heads,
                    segment_ids)


# ----------------------------------------------------------------------------- passes


class _Op:
    """The block-sparse op with this call's fixed arguments; every pass returns (out, lse)."""

    def __init__(self, impl: str, scale: float, precision, owner: str):
        self.impl, self.scale, self.precision, self.owner = impl, scale, precision, owner

    def __call__(self, q, k, v, *, causal: bool, block_keep=None, **rules):
        b, t, n, _ = q.shape
        if block_keep is None:  # every key block; the segment rule drops the foreign ones
            block_keep = jnp.ones((b, n, t, -(-k.shape[1] // _BLOCK_K)), bool)
        return core.block_sparse_attention(
            q, k, v, block_keep, block_k=_BLOCK_K, causal=causal, impl=self.impl,
            scale=self.scale, precision=self.precision, owner=self.owner, return_lse=True,
            **rules)


def _window_pass(op: _Op, q, k, v, *, q_pos, k_pos, window: int, run_BT, k_run_BS=None):
    """Keys with ``q_pos - window < k_pos <= q_pos`` (positions on the row index)."""
    b, t, n, _ = q.shape
    keep = core.window_block_keep(q_pos, k_pos, _BLOCK_K, window=window)
    segs = {} if run_BT is None else dict(q_seg_BT=run_BT, k_seg_BS=(
        run_BT if k_run_BS is None else k_run_BS))
    return op(q, k, v, causal=True, block_keep=jnp.broadcast_to(keep, (b, n, *keep.shape)),
              q_pos_T=q_pos, k_pos_S=k_pos, window=window, **segs)


def _class_pass(op: _Op, q, k, v, *, pos_BT, run_BT, stride: int, causal: bool):
    """``A(2)``: the keys of the query's residue class ``pos mod stride`` in its sequence (and
    only earlier ones when causal). Runs in class order: queries and keys sorted by (sequence,
    class, position), the (sequence, class) pair as segment id, so each class is one contiguous
    run whose positions increase; the causal rule then reads the sorted index."""
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(pos_BT, (b, t))
    run = jnp.broadcast_to(run_BT, (b, t))
    cls = pos % stride
    i_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    perm = jnp.lexsort((i_BT, cls, run), axis=-1)
    run_p = jnp.take_along_axis(run, perm, axis=1)
    cls_p = jnp.take_along_axis(cls, perm, axis=1)
    change = jnp.concatenate([jnp.ones((b, 1), bool), (run_p[:, 1:] != run_p[:, :-1])
                              | (cls_p[:, 1:] != cls_p[:, :-1])], axis=1)
    ids = _run_ids(change, run_p != 0)
    take = lambda a: jnp.take_along_axis(a, perm[:, :, None, None], axis=1)  # noqa: E731
    out_p, lse_p = op(take(q), take(k), take(v), causal=causal, q_seg_BT=ids, k_seg_BS=ids)
    inv = jnp.argsort(perm, axis=1)
    return (jnp.take_along_axis(out_p, inv[:, :, None, None], axis=1),
            jnp.take_along_axis(lse_p, inv[:, :, None], axis=1))


def _block_pass(op: _Op, q, k, v, *, pos_BT, run_BT, block: int, causal: bool,
                key_valid_BS=None):
    """``A(1)`` of the fixed pattern: the query's own block of its sequence (the (sequence,
    block) pair as segment id), without the keys ``key_valid_BS`` marks False."""
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(pos_BT, (b, t))
    run = jnp.broadcast_to(run_BT, (b, t))
    blk = pos // block
    change = jnp.concatenate([jnp.ones((b, 1), bool), (run[:, 1:] != run[:, :-1])
                              | (blk[:, 1:] != blk[:, :-1])], axis=1)
    ids = _run_ids(change, run != 0)
    return op(q, k, v, causal=causal, q_seg_BT=ids, k_seg_BS=ids, key_valid_BS=key_valid_BS)


def _summary_pass(op: _Op, q, k, v, *, pos_BT, run_BT, block: int, num_summary: int,
                  causal: bool, packed: bool):
    """The summary keys (``pos mod block >= block - num_summary``) of the query's sequence (only
    earlier ones when causal), gathered into a compact array: at most ``c * T // l`` of them.
    None when there are none. Packed rows place their summaries per row, so a causal pass runs
    row by row there (the op's positions are shared by the batch)."""
    b, t = q.shape[:2]
    if not packed:
        idx = np.flatnonzero(np.arange(t) % block >= block - num_summary)
        if idx.size == 0:
            return None
        k_pos = jnp.asarray(idx, jnp.int32)
        return op(q, k[:, idx], v[:, idx], causal=causal, q_pos_T=jnp.arange(t, dtype=jnp.int32),
                  k_pos_S=k_pos)
    m = num_summary * t // block
    if m == 0:
        return None
    is_sum = (pos_BT % block >= block - num_summary) & (run_BT != 0)
    idx_BM = jax.vmap(lambda s: jnp.nonzero(s, size=m, fill_value=t)[0])(is_sum)
    ok_BM = idx_BM < t
    idx_BM = jnp.minimum(idx_BM, t - 1).astype(jnp.int32)
    take = lambda a: jnp.take_along_axis(a, idx_BM[:, :, None, None], axis=1)  # noqa: E731
    k_c, v_c = take(k), take(v)
    k_run = jnp.where(ok_BM, jnp.take_along_axis(run_BT, idx_BM, axis=1), 0)
    if not causal:
        return op(q, k_c, v_c, causal=False, q_seg_BT=run_BT, k_seg_BS=k_run)

    def row(xs):
        q1, k1, v1, qr, kr, kp = xs
        return op(q1[None], k1[None], v1[None], causal=True, q_pos_T=jnp.arange(t, dtype=jnp.int32),
                  k_pos_S=kp, q_seg_BT=qr[None], k_seg_BS=kr[None])

    out, lse = jax.lax.map(row, (q, k_c, v_c, run_BT, k_run, idx_BM))
    return out[:, 0], lse[:, 0]


def _merge(passes):
    passes = [p for p in passes if p is not None]
    if len(passes) == 1:
        return passes[0][0]
    out, _ = core.merge_softmax_passes([p[0] for p in passes], [p[1] for p in passes])
    return out


def _strided_sets(op: _Op, q, k, v, *, stride: int, causal: bool, pos_BT, run_BT, packed,
                  which: str):
    """The strided heads' output: ``which`` is "merged", "a1" or "a2"."""
    t = q.shape[1]
    i = jnp.arange(t, dtype=jnp.int32)
    segs_run = run_BT if packed else None
    if which == "a2":
        return _class_pass(op, q, k, v, pos_BT=pos_BT, run_BT=run_BT, stride=stride,
                           causal=causal)[0]
    if which == "a1":
        if causal:  # [i - l, i]
            return _window_pass(op, q, k, v, q_pos=i, k_pos=i, window=stride + 1,
                                run_BT=segs_run)[0]
        # |i - j| <= l: the query moved l ahead, a causal window of 2l + 1
        return _window_pass(op, q, k, v, q_pos=i + stride, k_pos=i, window=2 * stride + 1,
                            run_BT=segs_run)[0]
    passes = [_class_pass(op, q, k, v, pos_BT=pos_BT, run_BT=run_BT, stride=stride,
                          causal=causal)]
    if stride > 1:  # the window without the class's own keys i, i - l (and i + l)
        if causal:  # [i - l + 1, i - 1]: keys moved one ahead
            passes.append(_window_pass(op, q, k, v, q_pos=i, k_pos=i + 1, window=stride - 1,
                                       run_BT=segs_run))
        else:  # and [i + 1, i + l - 1] from a second copy of the keys moved l - 1 back
            k2, v2 = (jnp.concatenate([a, a], axis=1) for a in (k, v))
            k_pos = jnp.concatenate([i + 1, i - (stride - 1)])
            k_run = None if segs_run is None else jnp.concatenate([run_BT, run_BT], axis=1)
            passes.append(_window_pass(op, q, k2, v2, q_pos=i, k_pos=k_pos, window=stride - 1,
                                       run_BT=segs_run, k_run_BS=k_run))
    return _merge(passes)


def _fixed_sets(op: _Op, q, k, v, *, block: int, num_summary: int, causal: bool, pos_BT,
                run_BT, packed, which: str):
    """The fixed heads' output: ``which`` is "merged", "a1" or "a2" (A(2) plus the query)."""
    b, t = q.shape[:2]
    sets = dict(pos_BT=pos_BT, run_BT=run_BT)
    if which == "a1":
        return _block_pass(op, q, k, v, block=block, causal=causal, **sets)[0]
    summaries = _summary_pass(op, q, k, v, block=block, num_summary=num_summary, causal=causal,
                              packed=packed, **sets)
    is_sum = jnp.broadcast_to(pos_BT % block >= block - num_summary, (b, t))
    if which == "merged":  # the own block without its summaries, which the summary pass reads
        own = _block_pass(op, q, k, v, block=block, causal=causal, key_valid_BS=~is_sum, **sets)
        return _merge([own, summaries])
    # A(2) plus the query itself where it is no summary: a window of 1 over the natural keys
    i = jnp.arange(t, dtype=jnp.int32)
    keep = core.window_block_keep(i, i, _BLOCK_K, window=1)
    itself = op(q, k, v, causal=True, block_keep=jnp.broadcast_to(keep, (b, q.shape[2],
                                                                          *keep.shape)),
                window=1, key_valid_BS=~is_sum,
                **({} if not packed else dict(q_seg_BT=run_BT, k_seg_BS=run_BT)))
    return _merge([itself, summaries])


@functools.partial(jax.jit, static_argnames=("kind", "l", "num_summary", "causal", "combine",
                                             "impl", "scale", "precision", "owner"))
def sparse_transformer_attention(q_BTNH: Array, k_BTNH: Array, v_BTNV: Array, *, kind: str,
                                 l: int, num_summary: int = 1, causal: bool, combine: str,
                                 segment_ids_BT: Array | None = None, impl: str = "auto",
                                 scale: float | None = None, precision: core.Precision = None,
                                 owner: str = "sparse_transformer_attention") -> Array:
    """The attention core of both modules: (B, T, N, H) queries, keys, values -> (B, T, N, V).

    ``kind`` "strided" (``l`` = stride) or "fixed" (``l`` = block size, ``num_summary`` = c);
    ``combine`` "merged" (every head reads the union of the two sets) or "interleaved" (even
    heads ``A(1)``, odd heads ``A(2)``). ``impl="reference"`` masks the dense (T, T) logits
    with the pattern; the others run the disjoint block-sparse passes and merge them. Jitted
    (the sizes static), so that an eager call compiles its passes once.
    """
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
    return registry.call(owner, "sparse_transformer", impl, q_BTNH, k_BTNH, v_BTNV, kind=kind,
                         l=l, num_summary=num_summary, causal=causal, combine=combine,
                         segment_ids_BT=segment_ids_BT, scale=scale, precision=precision,
                         name=owner)


@registry.register("sparse_transformer", "reference")
def _masked_dense(q_BTNH, k_BTNH, v_BTNV, *, kind, l, num_summary, causal, combine,
                  segment_ids_BT, scale, precision, name):
    """The dense (T, T) logits masked with the pattern: the selection tests' and benchmarks'
    reference."""
    del name
    pattern = _pattern(kind, q_BTNH.shape[1], l, num_summary, causal, combine, q_BTNH.shape[2],
                       segment_ids_BT)
    return core.dot_product_attention(q_BTNH, k_BTNH, v_BTNV, keep=pattern, scale=scale,
                                      precision=precision)


def _passes(q_BTNH, k_BTNH, v_BTNV, *, kind, l, num_summary, causal, combine, segment_ids_BT,
            scale, precision, name, block_impl: str):
    """The disjoint block-sparse passes (under the block-sparse op's ``block_impl``), merged by
    log-sum-exp; interleaved heads as two head subsets."""
    t, n = q_BTNH.shape[1:3]
    packed = segment_ids_BT is not None
    pos_BT, run_BT = run_positions(segment_ids_BT, t)
    if packed:  # padding and its keys zeroed: nothing there reaches an output or gradient
        ok = (run_BT != 0)[:, :, None, None]
        q_BTNH, k_BTNH, v_BTNV = (jnp.where(ok, a, jnp.zeros((), a.dtype))
                                  for a in (q_BTNH, k_BTNH, v_BTNV))
    op = _Op(block_impl, scale, precision, name)
    sets = _strided_sets if kind == "strided" else _fixed_sets
    kw = dict(causal=causal, pos_BT=pos_BT, run_BT=run_BT, packed=packed)
    kw.update(stride=l) if kind == "strided" else kw.update(block=l, num_summary=num_summary)
    if combine == "merged" or n == 1:
        return sets(op, q_BTNH, k_BTNH, v_BTNV, which="merged" if combine == "merged" else "a1",
                    **kw)
    even = sets(op, q_BTNH[:, :, 0::2], k_BTNH[:, :, 0::2], v_BTNV[:, :, 0::2], which="a1", **kw)
    odd = sets(op, q_BTNH[:, :, 1::2], k_BTNH[:, :, 1::2], v_BTNV[:, :, 1::2], which="a2", **kw)
    order = np.argsort(np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)]), kind="stable")
    return jnp.concatenate([even, odd], axis=2)[:, :, order]


# ``xla`` / ``pallas``: the passes on the block-sparse op's impl of that name (whose ``pallas``
# is the Mosaic kernel on TPU and the Triton-style one elsewhere).
registry.register("sparse_transformer", "xla")(functools.partial(_passes, block_impl="xla"))
registry.register("sparse_transformer", "pallas")(functools.partial(_passes, block_impl="pallas"))


# ----------------------------------------------------------------------------- decoding


def decode_indices(kind: str, pos_BT: Array, *, l: int, num_summary: int, max_len: int,
                   which: str) -> Array:
    """(B, n, M) int32: the cache positions the query at ``pos_BT`` reads (-1: none), a static
    M per set: strided "merged" ``l + (max_len - 1) // l`` (window ``[p - l + 1, p]`` and the
    class ``p - l, p - 2l, ...``), "a1" ``l + 1``, "a2" ``(max_len - 1) // l + 1``; fixed
    "merged" ``l + c * (ceil(max_len / l) - 1)`` (own block up to p and the earlier blocks'
    summaries), "a1" ``l``, "a2" ``c * ceil(max_len / l) + 1`` (summaries up to p, and p)."""
    p = pos_BT[..., None]
    nb = -(-max_len // l)
    c = num_summary
    if kind == "strided":
        window = p - jnp.arange(l if which == "merged" else l + 1)
        cls = p - l * jnp.arange(1 if which == "merged" else 0, (max_len - 1) // l + 1)
        idx = {"merged": jnp.concatenate([window, cls], -1), "a1": window, "a2": cls}[which]
        ok = idx >= 0
    else:
        start = p - p % l
        own = start + jnp.arange(l)
        sums = (jnp.arange(nb)[:, None] * l + (l - c) + jnp.arange(c)[None, :]).reshape(-1)
        sums = jnp.broadcast_to(sums, p.shape[:-1] + sums.shape)
        if which == "a1":
            idx, ok = own, own <= p
        elif which == "merged":
            earlier = sums[..., :c * (nb - 1)]
            idx = jnp.concatenate([own, earlier], -1)
            ok = jnp.concatenate([own <= p, earlier < start], -1)
        else:
            idx = jnp.concatenate([sums, p], -1)
            ok = jnp.concatenate([sums <= p, p % l < l - c], -1)
    ok = ok & (idx < max_len)
    return jnp.where(ok, idx, -1).astype(jnp.int32)


def attend_gathered(q_BTNH: Array, k_BSNH: Array, v_BSNV: Array, idx_BTM: Array, *,
                    scale: float, precision: core.Precision = None) -> Array:
    """Each query over the cache rows ``idx_BTM`` (B, T, M) (-1: none), shared by the heads of
    ``q``; gathered in tiles of ``_DECODE_TILE`` queries (a long chunk never gathers more).
    Float32 softmax for half operands; a query without keys gives zeros. (B, T, N, V)."""
    b, t, n, h = q_BTNH.shape

    def tile(q_, idx_):
        ok = idx_ >= 0
        k_ = jnp.where(ok[..., None, None], cache.gather_rows(k_BSNH, idx_), 0).astype(q_.dtype)
        v_ = jnp.where(ok[..., None, None], cache.gather_rows(v_BSNV, idx_), 0)
        logits = jnp.einsum("BTNH,BTMNH->BTNM", q_, k_, precision=precision)
        logits = logits.astype(core.softmax_dtype(q_.dtype)) * scale
        probs = core.masked_softmax(logits, ok[:, :, None, :])
        return jnp.einsum("BTNM,BTMNV->BTNV", probs.astype(v_.dtype), v_, precision=precision)

    if t <= _DECODE_TILE:
        return tile(q_BTNH, idx_BTM)
    nt = -(-t // _DECODE_TILE)
    pad = nt * _DECODE_TILE - t
    tiles = lambda a, fill: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2),  # noqa: E731
                                    constant_values=fill).reshape(
        b, nt, _DECODE_TILE, *a.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(lambda xs: tile(*xs), (tiles(q_BTNH, 0), tiles(idx_BTM, -1)))
    return out.swapaxes(0, 1).reshape(b, nt * _DECODE_TILE, n, -1)[:, :t]


# ----------------------------------------------------------------------------- modules


class _SparseTransformer:
    """What both modules share (fields are each module's own: the constructors differ)."""

    _KIND = ""
    _OWNER = ""

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def _l(self) -> int:
        raise NotImplementedError

    @property
    def _c(self) -> int:
        return 1

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every head (the class
        positions / summaries reach back to the first token)."""
        return float(2 * self.dim * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: K and V of every head and token, and the index."""
        return cache.dense_cache_bytes(batch, max_len, self.num_heads, self.head_dim,
                                       self.head_dim, dtype)

    def decode_scored(self, n: int) -> int:
        """Index keys a selector scores per decode query: none (a fixed pattern)."""
        del n
        return 0

    def _setup(self, **sizes) -> None:
        owner = self._OWNER
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads, **sizes)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        if self.combine not in COMBINES:
            raise ValueError(f"{owner}: combine={self.combine!r} is not one of {COMBINES}")
        registry.check(owner, "sparse_transformer", self.impl)
        cache.check_causal(owner, self.decode, self.causal)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.qkv = core.Linear(3 * self.dim, axes=("embed", "qkv"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def pattern(self, length: int, segment_ids: Array | None = None) -> Array:
        """(B|1, num_heads, T, T) bool: the keys each query of each head reads."""
        return _pattern(self._KIND, length, self._l, self._c, self.causal, self.combine,
                        self.num_heads, segment_ids)

    def _forward(self, x: Array, segment_ids: Array | None, lengths: Array | None) -> Array:
        owner = self._OWNER
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, segment_ids=segment_ids)
        if self.decode:
            return self._decode(cache.begin(self, owner, x, lengths, sized_by="key"))
        seg, _ = core.check_packing(owner, x, segment_ids, None)
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = (a.reshape(shape) for a in jnp.split(self.qkv(x), 3, axis=-1))
        out = sparse_transformer_attention(
            q, k, v, kind=self._KIND, l=self._l, num_summary=self._c, causal=self.causal,
            combine=self.combine, segment_ids_BT=seg, impl=self.impl, precision=self.precision,
            owner=owner)
        return self.proj(out.reshape(b, t, self.dim))

    def _decode(self, step: cache.Step) -> Array:
        """One decode call: append K and V, gather each query's set from the cache, attend."""
        b, n, _ = step.x.shape
        nh, h = self.num_heads, self.head_dim
        q, k, v = jnp.split(self.qkv(step.x), 3, axis=-1)
        q_BTNH = q.reshape(b, n, nh, h)
        k_BSNH = step.append("key", k.reshape(b, n, nh, h))
        v_BSNH = step.append("value", v.reshape(b, n, nh, h))
        if step.initializing:
            return step.finish(self.proj(jnp.zeros_like(q)))
        k_BSNH, v_BSNH = jax.lax.optimization_barrier((k_BSNH, v_BSNH))
        pos = jnp.where(step.ok_BT, step.pos_BT, -1)

        def heads(which, sl):
            idx = decode_indices(self._KIND, pos, l=self._l, num_summary=self._c,
                                 max_len=step.max_len, which=which)
            idx = jnp.where(step.ok_BT[..., None], idx, -1)
            return attend_gathered(q_BTNH[:, :, sl], k_BSNH[:, :, sl], v_BSNH[:, :, sl], idx,
                                   scale=h ** -0.5, precision=self.precision)

        if self.combine == "merged" or nh == 1:
            out = heads("merged" if self.combine == "merged" else "a1", slice(None))
        else:
            even, odd = heads("a1", slice(0, None, 2)), heads("a2", slice(1, None, 2))
            order = np.argsort(np.concatenate([np.arange(0, nh, 2), np.arange(1, nh, 2)]),
                               kind="stable")
            out = jnp.concatenate([even, odd], axis=2)[:, :, order]
        return step.finish(self.proj(out.reshape(b, n, self.dim)))


_CALL_DOC = """(B, T, D) -> (B, T, D).

        ``segment_ids`` (B, T) int: packed sequences, each maximal run of one non-zero id one
        sequence (id 0: padding, read by none, its inputs zeroed first); positions, blocks and
        residue classes restart at a run's first token, so a packed row equals its sequences
        run alone.

        With ``decode=True``: ``x`` is the chunk to append and ``lengths`` (B,) the tokens each
        row appends (``attnhut_jax.cache``); ``segment_ids`` is refused.
        """


class StridedSparseAttention(_SparseTransformer, nn.Module):
    """Strided sparse attention (Child et al., 2019, Sections 4.3 and 5.2).

    Query i reads ``A(1)_i = {max(0, i - l), ..., i}`` and ``A(2)_i = {j : (i - j) mod l = 0}``
    (``l = stride``; causal: ``j <= i``; bidirectional: ``|i - j| <= l`` and the class on both
    sides); ``combine="merged"`` (every head reads the union, eq. 7) or ``"interleaved"`` (even
    heads ``A(1)``, odd heads ``A(2)``). Parameters ``qkv`` and ``proj`` (``bias``
    adds biases). ``impl`` picks the block-sparse op (``auto``/``xla``/``pallas``: the window
    and class passes; ``reference``: the masked dense (T, T) computation); ``precision``
    reaches every matmul. ``decode=True`` (causal only) gathers each step's
    ``min(p + 1, l) + floor(p / l)`` keys from the cache.
    """

    dim: int
    num_heads: int
    stride: int
    causal: bool = True
    combine: Combine = "merged"
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    _KIND = "strided"
    _OWNER = "StridedSparseAttention"

    @property
    def _l(self) -> int:
        return self.stride

    def decode_reads(self, n: int) -> int:
        """Cached tokens one decode query at cache length ``n`` (position p = n - 1) reads, over
        all its heads: ``min(n, l) + (n - 1) // l`` (the window and the earlier class keys;
        interleaved heads read a part each, together the same union)."""
        if n <= 0:
            return 0
        return min(int(n), self.stride) + (int(n) - 1) // self.stride

    def setup(self) -> None:
        self._setup(stride=self.stride)

    def __call__(self, x: Array, *, segment_ids: Array | None = None,
                 lengths: Array | None = None) -> Array:
        return self._forward(x, segment_ids, lengths)

    __call__.__doc__ = _CALL_DOC


class FixedSparseAttention(_SparseTransformer, nn.Module):
    """Fixed sparse attention (Child et al., 2019, Sections 4.3 and 5.2).

    Query i reads ``A(1)_i = {j : floor(j / l) = floor(i / l)}`` (its block of ``l =
    block_size``) and ``A(2)_i = {j : j mod l in {l - c, ..., l - 1}}`` (the last
    ``c = num_summary`` positions of every block); causal: ``j <= i``. ``combine="merged"``
    (the union, eq. 7) or ``"interleaved"`` (even heads ``A(1)``, odd heads ``A(2)`` and the
    query itself). Parameters ``qkv`` and ``proj``. ``impl`` as
    ``StridedSparseAttention``. ``decode=True`` (causal only) gathers each step's own block up
    to p and the ``c`` summaries of every earlier block from the cache.
    """

    dim: int
    num_heads: int
    block_size: int
    num_summary: int = 1
    causal: bool = True
    combine: Combine = "merged"
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    _KIND = "fixed"
    _OWNER = "FixedSparseAttention"

    @property
    def _l(self) -> int:
        return self.block_size

    @property
    def _c(self) -> int:
        return self.num_summary

    def decode_reads(self, n: int) -> int:
        """Cached tokens one decode query at cache length ``n`` (position p = n - 1) reads, over
        all its heads: ``p mod l + 1 + c * floor(p / l)`` (its block up to p and the earlier
        blocks' summaries)."""
        if n <= 0:
            return 0
        p, l = int(n) - 1, self.block_size
        return p % l + 1 + self.num_summary * (p // l)

    def setup(self) -> None:
        self._setup(block_size=self.block_size, num_summary=self.num_summary)
        if self.num_summary > self.block_size:
            raise ValueError(f"FixedSparseAttention: num_summary={self.num_summary} must be <= "
                             f"block_size={self.block_size}")

    def __call__(self, x: Array, *, segment_ids: Array | None = None,
                 lengths: Array | None = None) -> Array:
        return self._forward(x, segment_ids, lengths)

    __call__.__doc__ = _CALL_DOC

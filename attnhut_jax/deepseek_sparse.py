"""DeepSeek Sparse Attention (DeepSeek-V3.2): lightning-indexer top-k token selection.

A light indexer scores every (query, key) pair with gated ReLU,
``I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])``, and each query keeps its ``top_k`` keys for
the main attention. Selection is per token and shared by all heads.

Ties at the k-th score (ReLU zeros make them common) are broken towards the lower key index,
which is what ``jax.lax.top_k`` does. torch leaves the choice among tied keys unspecified, so
parity compares selections modulo such ties (see ``parity/compare.py``).

``impl`` picks how selection and attention run (the registry's ``dsa`` op, defined below):
``reference`` scores every (query, key) pair and attends through a dense (T, T) mask, as attnhut
does; ``xla`` and ``pallas`` (and ``auto``, the fastest of them for the backend) select with the
fused indexer top-k and attend over the selected tokens only, building no (T, T) array.
``return_aux=True`` builds the (T, T) scores for the aux dict whatever the impl, and then selects
from them, so the returned selection is the one attended.

The selector (indexer projections and scores) runs in its own ``selector_dtype``, float32 by
default, so a ``dtype=jnp.bfloat16`` module keeps its selection in float32; every impl and the
aux path rank the scores in float32 (or wider).

Index losses (``index_loss="sparse"|"dense"`` at call time) are computed inside the module, by
the same ``impl``: ``reference`` from the materialised (T, T) weights as attnhut does, the other
impls with ``attnhut_jax.index_loss`` in memory linear in T. Packed sequences
(``segment_ids``) restrict selection, attention and both losses to a token's own segment; DSA
has no RoPE, so ``positions`` is validated and not read.

Incremental decoding (``decode=True``, ``attnhut_jax.cache``): each step scores the whole cached
index key with the chunk's indexer queries (the selector's dense pass, ``decode_scored``), picks
each query's ``top_k`` valid keys as every impl does, gathers their cached K and V and attends
over those ``top_k`` only (``attend_selected``); no (n, max_len) attention is built. A chunk of
several tokens gathers in query tiles of bounded memory (``attend_tiled``), or reads the
selection through the token-sparse Pallas kernel where ``impl`` resolves to it (GPU, TPU).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cache, core, registry
from .core import Array, Dtype
from .index_loss import dense_index_loss, sparse_index_loss

INDEX_LOSSES = ("sparse", "dense")


def _valid(t: int, s: int, causal: bool, q_seg_BT: Array | None = None,
           k_seg_BS: Array | None = None) -> Array:
    """(T, S) bool (or (B, T, S) with segments): the keys each query may select and read."""
    valid_TS = core.causal_mask(t, s) if causal else jnp.ones((t, s), bool)
    if q_seg_BT is None:
        return valid_TS
    return valid_TS[None] & core.segment_keep(q_seg_BT, k_seg_BS)[:, 0]


def _per_query_mean(per_BT: Array, q_seg_BT: Array | None) -> Array:
    """Mean over the queries that count (all, or the non-padding ones with segments)."""
    weight_BT = core.query_weights(q_seg_BT, *per_BT.shape)
    return (per_BT * weight_BT).sum() / jnp.maximum(weight_BT.sum(), 1.0)


def dense_loss_reference(index_scores_BTS: Array, dense_weights_BNTS: Array,
                         q_seg_BT: Array | None = None) -> Array:
    """``dsa_index_aux_loss`` with the mean over non-padding queries when segments are given
    (the same value without them): the materialised "dense" index loss."""
    target_BTS = jax.lax.stop_gradient(dense_weights_BNTS).astype(jnp.float32).sum(axis=1)
    target_BTS = target_BTS / jnp.maximum(target_BTS.sum(axis=-1, keepdims=True), 1e-9)
    log_p_BTS = jax.nn.log_softmax(index_scores_BTS.astype(jnp.float32), axis=-1)
    return _per_query_mean(-(target_BTS * log_p_BTS).sum(axis=-1), q_seg_BT)


def sparse_loss_reference(index_scores_BTS: Array, sparse_weights_BNTS: Array, selected_BTS: Array,
                          q_seg_BT: Array | None = None, eps: float = 1e-9) -> Array:
    """The materialised "sparse" index loss (DeepSeek-V3.2's sparse stage): KL(teacher ||
    student) over each query's selection ``selected_BTS``. teacher = the main attention the
    output uses (``sparse_weights_BNTS``, a constant) summed over heads on the selection and
    normalised over it (by ``max(sum, eps)``); student = softmax of the index scores over the
    selection. Averaged over queries (non-padding ones with segments); empty rows add 0."""
    p_BTS = jnp.where(selected_BTS, jax.lax.stop_gradient(sparse_weights_BNTS).astype(
        jnp.float32).sum(axis=1), 0.0)
    teacher_BTS = p_BTS / jnp.maximum(p_BTS.sum(axis=-1, keepdims=True), eps)
    scores_BTS = jnp.where(selected_BTS, index_scores_BTS.astype(jnp.float32),
                           core.mask_value(jnp.float32))
    log_student_BTS = jax.nn.log_softmax(scores_BTS, axis=-1)
    kl_BTS = jnp.where(teacher_BTS > 0, teacher_BTS * (jnp.log(jnp.maximum(teacher_BTS, eps))
                                                       - log_student_BTS), 0.0)
    return _per_query_mean(kl_BTS.sum(axis=-1), q_seg_BT)


# The registry's ``dsa`` op: (q_BTNH, k_BSNH, v_BSNH, qi_BTIE, ki_BSE, w_BTI, *, top_k, causal,
# scale, index_scores_BTS, q_seg_BT, k_seg_BS, index_loss, precision) -> (B, T, N, H), or
# ``(out, loss)`` when ``index_loss`` is "sparse" or "dense". ``index_scores_BTS`` (already
# masked, as ``core.masked_lightning_scores``) is given when the caller built them for
# ``return_aux``: the impl then selects from them, so the selection returned is the one attended.
# ``q_seg_BT`` / ``k_seg_BS``: packed-sequence segment ids (both or neither, see ``core``).


@registry.register("dsa", "reference")
def dsa_reference(q_BTNH, k_BSNH, v_BSNH, qi_BTIE, ki_BSE, w_BTI, *, top_k, causal, scale,
                  index_scores_BTS=None, q_seg_BT=None, k_seg_BS=None, index_loss=None,
                  precision=None):
    """attnhut's path: score every (query, key) pair, attend through a dense (T, S) mask; the
    index losses from the materialised (T, S) weights."""
    valid = _valid(q_BTNH.shape[1], k_BSNH.shape[1], causal, q_seg_BT, k_seg_BS)
    if index_scores_BTS is None:
        index_scores_BTS = core.masked_lightning_scores(qi_BTIE, ki_BSE, w_BTI, valid, precision)
    selected_BTS = core.topk_keep(index_scores_BTS, valid, top_k)
    probs_BKGTS = core.attention_weights(q_BTNH, k_BSNH, keep=selected_BTS[:, None], scale=scale,
                                         precision=precision)
    out = core.attend(probs_BKGTS, v_BSNH, precision=precision)
    if index_loss is None:
        return out
    b, t, n, _ = q_BTNH.shape
    if index_loss == "dense":
        dense_BKGTS = core.attention_weights(q_BTNH, k_BSNH, keep=valid[..., None, :, :],
                                             scale=scale, precision=precision)
        return out, dense_loss_reference(index_scores_BTS, dense_BKGTS.reshape(b, n, t, -1),
                                         q_seg_BT)
    return out, sparse_loss_reference(index_scores_BTS, probs_BKGTS.reshape(b, n, t, -1),
                                      selected_BTS, q_seg_BT)


def _dsa_token_sparse(q_BTNH, k_BSNH, v_BSNH, qi_BTIE, ki_BSE, w_BTI, *, top_k, causal, scale,
                      index_scores_BTS=None, q_seg_BT=None, k_seg_BS=None, index_loss=None,
                      precision=None, impl):
    """Fused indexer top-k, then attention over the selected tokens only (``impl``'s kernels);
    the index losses of ``index_loss.py`` (no (T, S) array)."""
    if index_scores_BTS is not None:
        valid = _valid(q_BTNH.shape[1], k_BSNH.shape[1], causal, q_seg_BT, k_seg_BS)
        indices_BTM = core.indices_from_scores(index_scores_BTS, valid, top_k)
    else:
        indices_BTM, _ = core.indexer_topk(qi_BTIE, ki_BSE, w_BTI, top_k, causal=causal,
                                           impl=impl, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS,
                                           precision=precision)
    out = core.token_sparse_attention(q_BTNH, k_BSNH, v_BSNH, indices_BTM, impl=impl,
                                      scale=scale, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS,
                                      precision=precision)
    if index_loss is None:
        return out
    segments = dict(q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS, precision=precision)
    if index_loss == "dense":
        return out, dense_index_loss(q_BTNH, k_BSNH, qi_BTIE, ki_BSE, w_BTI, scale=scale,
                                     causal=causal, **segments)
    return out, sparse_index_loss(q_BTNH, k_BSNH, qi_BTIE, ki_BSE, w_BTI, indices_BTM,
                                  scale=scale, **segments)


registry.register("dsa", "xla")(functools.partial(_dsa_token_sparse, impl="xla"))
registry.register("dsa", "pallas")(functools.partial(_dsa_token_sparse, impl="pallas"))


def attend_selected(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, idx_BTM: Array, *, scale: float,
                    precision: core.Precision = None) -> Array:
    """Attention of each query over its selected keys only: ``idx_BTM`` (B, T, M) indexes the
    keys (B, S, K, H) and values (B, S, K, V) of the query's row (one selection for all heads,
    query head n reads kv head n // (N // K)); entries < 0 are empty slots. Gathers the (B, T, M)
    keys and values (no (T, S) array), masked softmax over M in float32 for half operands; a
    query without a selected key returns zeros. Returns (B, T, N, V)."""
    b, t, n, h = q_BTNH.shape
    kg = k_BSKH.shape[2]
    ok_BTM = idx_BTM >= 0
    zero = jnp.zeros((), k_BSKH.dtype)
    # empty slots read slot 0: zero it, so that nothing there (not even a NaN) reaches the output
    k_BTMKH = jnp.where(ok_BTM[..., None, None], cache.gather_rows(k_BSKH, idx_BTM), zero)
    v_BTMKV = jnp.where(ok_BTM[..., None, None], cache.gather_rows(v_BSKV, idx_BTM),
                        jnp.zeros((), v_BSKV.dtype))
    q_BTKGH = q_BTNH.reshape(b, t, kg, n // kg, h)
    logits_BKGTM = jnp.einsum("BTKGH,BTMKH->BKGTM", q_BTKGH, k_BTMKH, precision=precision)
    logits_BKGTM = logits_BKGTM.astype(core.softmax_dtype(q_BTNH.dtype)) * scale
    probs_BKGTM = core.masked_softmax(logits_BKGTM, ok_BTM[:, None, None])
    out_BTKGV = jnp.einsum("BKGTM,BTMKV->BTKGV", probs_BKGTM.astype(v_BSKV.dtype), v_BTMKV,
                           precision=precision)
    return out_BTKGV.reshape(b, t, n, v_BSKV.shape[-1])


def cached_index_scores(qi_BTIE: Array, ki_BSE: Array, w_BTI: Array, keep_BTS: Array,
                        precision: core.Precision = None) -> Array:
    """``core.masked_lightning_scores`` of a decode chunk's indexer queries against the cached
    index keys (B, S, E): float32 scores (B, T, S), the fill where ``keep_BTS`` is False. The
    cache is read once in its own (S, E) row layout (``cache.row_dots``: a single-token step's
    few products are one fused multiply-and-sum pass), never transposed: the queries and the
    (S, T) scores are what get rearranged."""
    b, t, i, e = qi_BTIE.shape
    f32 = jnp.float32
    dots_BSX = cache.row_dots(ki_BSE.astype(f32), qi_BTIE.reshape(b, t * i, e).astype(f32),
                              precision)
    relu_BSTI = jax.nn.relu(dots_BSX).reshape(b, -1, t, i)
    # the gates' sum over I in the same layout, written out head by head: one elementwise pass
    # over the (S, T, I) products (XLA's reduce over a minor axis of I = 4 runs 2-3x slower)
    w_BTI = w_BTI.astype(f32)[:, None]
    scores_BST = relu_BSTI[..., 0] * w_BTI[..., 0]
    for j in range(1, i):
        scores_BST = scores_BST + relu_BSTI[..., j] * w_BTI[..., j]
    return jnp.where(keep_BTS, scores_BST.swapaxes(1, 2), core.mask_value(f32))


# bytes of gathered keys and values a decode chunk's query tile holds at most (attend_tiled)
DECODE_TILE_BYTES = 1 << 26


def attend_tiled(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, idx_BTM: Array, *, scale: float,
                 precision: core.Precision = None, block_q: int | None = None) -> Array:
    """``attend_selected`` in query tiles of ``block_q`` queries (``jax.lax.map``), so that a
    long chunk gathers at most one tile's (block_q, M) keys and values at a time; ``block_q``
    defaults to the most queries whose gathered keys and values fit ``DECODE_TILE_BYTES``. One
    tile (the whole chunk, or a single token) is ``attend_selected`` itself. Returns
    (B, T, N, V)."""
    b, t, n, h = q_BTNH.shape
    m, kg, vw = idx_BTM.shape[-1], k_BSKH.shape[2], v_BSKV.shape[-1]
    if block_q is None:
        per_query = b * m * kg * (h * k_BSKH.dtype.itemsize + vw * v_BSKV.dtype.itemsize)
        block_q = max(1, DECODE_TILE_BYTES // max(per_query, 1))
    if block_q >= t:
        return attend_selected(q_BTNH, k_BSKH, v_BSKV, idx_BTM, scale=scale, precision=precision)
    nt = -(-t // block_q)
    pad = nt * block_q - t
    # tiles first: (nt, B, block_q, ...); padded queries select nothing (-1) and are dropped
    q_tiles = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
        b, nt, block_q, n, h).swapaxes(0, 1)
    idx_tiles = jnp.pad(idx_BTM, ((0, 0), (0, pad), (0, 0)), constant_values=-1).reshape(
        b, nt, block_q, m).swapaxes(0, 1)
    out_tiles = jax.lax.map(
        lambda qi: attend_selected(qi[0], k_BSKH, v_BSKV, qi[1], scale=scale,
                                   precision=precision), (q_tiles, idx_tiles))
    return out_tiles.swapaxes(0, 1).reshape(b, nt * block_q, n, vw)[:, :t]


class LightningIndexer(nn.Module):
    """The scorer ``I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])``, unmasked, (B, T, S).

    Args mirror ``attnhut.LightningIndexer``: ``dim``, ``num_heads`` (4), ``head_dim`` (64),
    ``bias``. Parameters: ``wq``, ``wk`` (one shared key head), ``ww`` (per-head gates).
    ``dtype`` is the selector's dtype and defaults to float32 (not to the input's), so that a
    selector inside a bfloat16 model still ranks float32 scores; ``precision`` is the matmuls'.
    The scores are float32 whatever the dtype (the score products upcast their operands, as every
    selector impl does), so all impls rank the same numbers.
    """

    dim: int
    num_heads: int = 4
    head_dim: int = 64
    bias: bool = False
    dtype: Dtype | None = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    def setup(self) -> None:
        core.check_positive("LightningIndexer", dim=self.dim, num_heads=self.num_heads,
                            head_dim=self.head_dim)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.wq = core.Linear(self.num_heads * self.head_dim, axes=("embed", "index"), **kw)
        self.wk = core.Linear(self.head_dim, axes=("embed", "index"), **kw)
        self.ww = core.Linear(self.num_heads, axes=("embed", "index_heads"), **kw)

    def project(self, x: Array) -> tuple[Array, Array, Array]:
        """The indexer's queries (B, T, I, E), shared key (B, S, E) and gates (B, T, I)."""
        b, t, _ = x.shape
        return (self.wq(x).reshape(b, t, self.num_heads, self.head_dim), self.wk(x), self.ww(x))

    def __call__(self, x: Array) -> Array:
        core.check_input(x, self.dim, "LightningIndexer")
        return core.lightning_scores(*self.project(x), precision=self.precision)


class DeepSeekSparseAttention(nn.Module):
    """Lightning-indexer top-k token selection on a multi-head backbone.

    Args mirror ``attnhut.DeepSeekSparseAttention``: ``dim``, ``num_heads``, ``top_k`` (64),
    ``num_index_heads`` (4), ``index_head_dim`` (64), ``causal`` (True), ``bias``; plus
    ``impl`` (``auto``/``reference``/``xla``/``pallas``, see the module docstring), which
    changes no variable, ``dtype``/``param_dtype``, ``precision`` (of every matmul) and
    ``selector_dtype`` (default float32: the indexer's projections and scores, whatever
    ``dtype``). Parameters: ``qkv``, ``proj``, ``indexer/{wq,wk,ww}``.

    The indexer is not trained by the output (hard top-k has no gradient); train it with the
    call's ``index_loss`` (or ``dsa_index_aux_loss`` on the aux dict). ``detach_index_input``
    (default False, attnhut's) makes the indexer read ``stop_gradient(x)``, as DeepSeek-V3.2
    trains it, so the index loss reaches the indexer's parameters only, not the input.

    ``decode=True`` (causal only): incremental decoding (``attnhut_jax.cache``). The cache holds
    K and V of every head (``key``, ``value``, in the computation dtype) and the indexer's key
    (``index_key``, in ``selector_dtype``). A step scores every cached index key with the chunk's
    indexer queries (float32, as ``core.lightning_scores``), keeps each query's
    ``min(top_k, max_len)`` best keys at or before it (ties to the lower position, as every impl)
    and attends over the gathered ``top_k`` keys and values only, in XLA (a chunk of several
    tokens in query tiles of at most ``DECODE_TILE_BYTES`` gathered, or through the token-sparse
    Pallas kernel where ``impl`` resolves to ``pallas``: GPU and TPU). The cached index keys are
    scored in their (S, E) layout (``cached_index_scores``). The ``params`` are those of
    ``decode=False``.
    """

    dim: int
    num_heads: int
    top_k: int = 64
    num_index_heads: int = 4
    index_head_dim: int = 64
    causal: bool = True
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    selector_dtype: Dtype = jnp.float32
    detach_index_input: bool = False
    decode: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every head, plus the lightning
        indexer's key (``index_head_dim``)."""
        return float((2 * self.dim + self.index_head_dim) * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: K and V of every head in ``dtype``, the indexer's
        key in ``selector_dtype`` (when None: ``dtype`` promoted with ``param_dtype``, what
        the selector computes in) and the index."""
        return (cache.dense_cache_bytes(batch, max_len, self.num_heads, self.head_dim,
                                        self.head_dim, dtype)
                + cache.nbytes((batch, max_len, self.index_head_dim), cache.selector_dtype(
                    self.selector_dtype, dtype, self.param_dtype)))

    def decode_reads(self, n: int) -> int:
        """Cached tokens whose keys and values one decode query reads at cache length ``n``: its
        selection, ``min(top_k, n)``."""
        return min(self.top_k, int(n))

    def decode_scored(self, n: int) -> int:
        """Index keys the lightning indexer scores per decode query at cache length ``n``: all
        ``n``."""
        return int(n)

    def setup(self) -> None:
        owner = "DeepSeekSparseAttention"
        registry.check(owner, "dsa", self.impl)
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads, top_k=self.top_k,
                            num_index_heads=self.num_index_heads,
                            index_head_dim=self.index_head_dim)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        cache.check_causal(owner, self.decode, self.causal)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.qkv = core.Linear(3 * self.dim, axes=("embed", "qkv"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)
        self.indexer = LightningIndexer(self.dim, self.num_index_heads, self.index_head_dim,
                                        self.bias, dtype=self.selector_dtype,
                                        param_dtype=self.param_dtype, precision=self.precision)

    def __call__(self, x: Array, return_aux: bool = False, *, segment_ids: Array | None = None,
                 positions: Array | None = None, index_loss: str | None = None,
                 lengths: Array | None = None):
        """(B, T, D) -> (B, T, D); ``(out, aux)`` with ``return_aux=True``; ``(out, loss)`` with
        ``index_loss``; ``(out, aux, loss)`` with both.

        ``aux['index_scores']`` (B, T, T): indexer scores in float32 (or wider), invalid
        (future, or other segments') keys at the fill value; ``aux['selected']`` (B, T, T) bool:
        the keys each query attends; ``aux['dense_weights']`` (B, N, T, T): the main attention
        over every visible key (no top-k), the target of
        ``dsa_index_aux_loss(aux['index_scores'], aux['dense_weights'])``.

        ``segment_ids`` (B, T) int: packed sequences (a token selects and reads only keys of its
        own segment; id 0 is padding, read by no token, its inputs zeroed first). ``positions``
        (B, T) int is validated and otherwise unused: DSA has no RoPE, and causality runs on the
        index in the row.

        ``index_loss`` trains the indexer inside the module, a scalar float32:
        ``"dense"``: attnhut's ``dsa_index_aux_loss`` (the head-summed main attention over all
        visible keys as the target); ``"sparse"``: DeepSeek-V3.2's sparse stage, KL from the
        main attention on each query's selection to the index softmax over it. Both average over
        the (non-padding) queries and train only the indexer (and, unless
        ``detach_index_input``, the input through it). ``impl="reference"`` computes them from
        (T, T) arrays; the other impls in memory linear in T (``attnhut_jax.index_loss``).

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``return_aux``, ``segment_ids``, ``positions`` and
        ``index_loss`` are refused (training and inspection arguments of a whole sequence).
        """
        owner = "DeepSeekSparseAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, return_aux=return_aux,
                            segment_ids=segment_ids, positions=positions, index_loss=index_loss)
        if self.decode:
            return self._decode_step(x, lengths)
        if index_loss is not None and index_loss not in INDEX_LOSSES:
            raise ValueError(f"{owner}: index_loss={index_loss!r} must be None, 'sparse' or "
                             f"'dense'")
        seg, _ = core.check_packing(owner, x, segment_ids, positions)  # positions: no RoPE here
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        scale = self.head_dim ** -0.5
        index_qkw = self.indexer.project(jax.lax.stop_gradient(x) if self.detach_index_input
                                         else x)
        aux = None
        if return_aux:
            valid = _valid(t, t, self.causal, seg, seg)
            scores = core.masked_lightning_scores(*index_qkw, valid, self.precision)
            selected = core.topk_keep(scores, valid, self.top_k)
            aux = {"index_scores": scores, "selected": selected}
        out = registry.call(owner, "dsa", self.impl, q, k, v,
                            *index_qkw, top_k=self.top_k, causal=self.causal,
                            scale=scale, index_scores_BTS=None if aux is None else scores,
                            q_seg_BT=seg, k_seg_BS=seg, index_loss=index_loss,
                            precision=self.precision)
        out, loss = out if index_loss is not None else (out, None)
        out = self.proj(out.reshape(b, t, self.dim))
        if return_aux:
            keep = valid if seg is not None else (core.causal_mask(t, t) if self.causal else None)
            probs_BKGTS = core.attention_weights(q, k, keep=None if keep is None else
                                                 keep[..., None, :, :], scale=scale,
                                                 precision=self.precision)
            aux["dense_weights"] = probs_BKGTS.reshape(b, self.num_heads, t, t)
        if return_aux and loss is not None:
            return out, aux, loss
        if return_aux:
            return out, aux
        if loss is not None:
            return out, loss
        return out

    def _decode_step(self, x: Array, lengths: Array | None) -> Array:
        """One decode call: append the chunk's K, V and index key, select each query's top-k
        cached keys with the indexer and attend over them only."""
        step = cache.begin(self, "DeepSeekSparseAttention", x, lengths, sized_by="key")
        b, n, _ = step.x.shape
        q, k, v = jnp.split(self.qkv(step.x), 3, axis=-1)
        shape = (b, n, self.num_heads, self.head_dim)
        qi_BTIE, ki_BTE, w_BTI = self.indexer.project(
            jax.lax.stop_gradient(step.x) if self.detach_index_input else step.x)
        k_BSNH = step.append("key", k.reshape(shape))
        v_BSNH = step.append("value", v.reshape(shape))
        ki_BSE = step.append("index_key", ki_BTE.astype(self.selector_dtype))
        if step.initializing:  # the cache and the parameters exist; init returns zeros
            return step.finish(self.proj(jnp.zeros((b, n, self.dim), q.dtype)))
        # the scoring reads the written cache as it is (XLA would otherwise fuse a second copy
        # of the write into the matmul's operand, and copy the whole cache to make room for it)
        ki_BSE, k_BSNH, v_BSNH = jax.lax.optimization_barrier((ki_BSE, k_BSNH, v_BSNH))
        # the selector's dense pass: the chunk's queries against every cached index key
        keep_BTS = step.keep()
        scores_BTS = cached_index_scores(qi_BTIE, ki_BSE, w_BTI, keep_BTS, self.precision)
        idx_BTM = core.indices_from_scores(scores_BTS, keep_BTS, self.top_k)
        scale = self.head_dim ** -0.5
        if n > 1 and registry.resolve("token_sparse", self.impl) == "pallas":
            # a chunk where the token-sparse Pallas kernel runs: it reads each query's selected
            # cached keys in tiles (the same attention as attend_selected); ``auto`` falls back
            # to the op's XLA path where the kernel cannot run the call
            out = core.token_sparse_attention(q.reshape(shape), k_BSNH, v_BSNH, idx_BTM,
                                              impl=self.impl, scale=scale,
                                              precision=self.precision,
                                              owner="DeepSeekSparseAttention")
        else:  # XLA: the selected keys gathered, a long chunk in query tiles
            out = attend_tiled(q.reshape(shape), k_BSNH, v_BSNH, idx_BTM, scale=scale,
                               precision=self.precision)
        return step.finish(self.proj(out.reshape(b, n, self.dim)))


def dsa_index_aux_loss(index_scores: Array, attn_weights: Array) -> Array:
    """KL warm-up loss fitting the indexer to the dense attention's spread.

    ``index_scores`` (B, T, S) from the aux dict; ``attn_weights`` (B, N, T, S) dense attention
    (a constant here). The target is the head-summed attention normalised per query; the loss
    is the cross-entropy of ``log_softmax(index_scores)`` against it, averaged over queries.
    """
    target = jax.lax.stop_gradient(attn_weights).astype(jnp.float32).sum(axis=1)
    target = target / jnp.maximum(target.sum(axis=-1, keepdims=True), 1e-9)
    log_p = jax.nn.log_softmax(index_scores.astype(jnp.float32), axis=-1)
    return -(target * log_p).sum(axis=-1).mean()

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
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import core, registry
from .core import Array, Dtype


def _valid(t: int, s: int, causal: bool) -> Array:
    return core.causal_mask(t, s) if causal else jnp.ones((t, s), bool)


# The registry's ``dsa`` op: (q_BTNH, k_BSNH, v_BSNH, qi_BTIE, ki_BSE, w_BTI, *, top_k, causal,
# scale, index_scores_BTS, precision) -> (B, T, N, H). ``index_scores_BTS`` (already masked, as
# ``core.masked_lightning_scores``) is given when the caller built them for ``return_aux``: the impl then
# selects from them, so the selection returned is the one attended.


@registry.register("dsa", "reference")
def dsa_reference(q_BTNH, k_BSNH, v_BSNH, qi_BTIE, ki_BSE, w_BTI, *, top_k, causal, scale,
                  index_scores_BTS=None, precision=None):
    """attnhut's path: score every (query, key) pair, attend through a dense (T, S) mask."""
    valid_TS = _valid(q_BTNH.shape[1], k_BSNH.shape[1], causal)
    if index_scores_BTS is None:
        index_scores_BTS = core.masked_lightning_scores(qi_BTIE, ki_BSE, w_BTI, valid_TS, precision)
    selected_BTS = core.topk_keep(index_scores_BTS, valid_TS, top_k)
    return core.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, keep=selected_BTS[:, None],
                                      scale=scale, precision=precision)


def _dsa_token_sparse(q_BTNH, k_BSNH, v_BSNH, qi_BTIE, ki_BSE, w_BTI, *, top_k, causal, scale,
                      index_scores_BTS=None, precision=None, impl):
    """Fused indexer top-k, then attention over the selected tokens only (``impl``'s kernels)."""
    if index_scores_BTS is not None:
        valid_TS = _valid(q_BTNH.shape[1], k_BSNH.shape[1], causal)
        indices_BTM = core.indices_from_scores(index_scores_BTS, valid_TS, top_k)
    else:
        indices_BTM, _ = core.indexer_topk(qi_BTIE, ki_BSE, w_BTI, top_k, causal=causal,
                                           impl=impl, precision=precision)
    return core.token_sparse_attention(q_BTNH, k_BSNH, v_BSNH, indices_BTM, impl=impl,
                                       scale=scale, precision=precision)


registry.register("dsa", "xla")(functools.partial(_dsa_token_sparse, impl="xla"))
registry.register("dsa", "pallas")(functools.partial(_dsa_token_sparse, impl="pallas"))


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

    The indexer is not trained by the output (hard top-k has no gradient); train it with
    ``dsa_index_aux_loss``.
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every head, plus the lightning
        indexer's key (``index_head_dim``)."""
        return float((2 * self.dim + self.index_head_dim) * jnp.dtype(dtype).itemsize)

    def setup(self) -> None:
        owner = "DeepSeekSparseAttention"
        registry.check(owner, "dsa", self.impl)
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads, top_k=self.top_k,
                            num_index_heads=self.num_index_heads,
                            index_head_dim=self.index_head_dim)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.qkv = core.Linear(3 * self.dim, axes=("embed", "qkv"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)
        self.indexer = LightningIndexer(self.dim, self.num_index_heads, self.index_head_dim,
                                        self.bias, dtype=self.selector_dtype,
                                        param_dtype=self.param_dtype, precision=self.precision)

    def __call__(self, x: Array, return_aux: bool = False):
        """(B, T, D) -> (B, T, D), or ``(out, aux)`` with ``return_aux=True``.

        ``aux['index_scores']`` (B, T, T): indexer scores in float32 (or wider), invalid
        (future) keys at the fill value; ``aux['selected']`` (B, T, T) bool: the keys each query
        attends; ``aux['dense_weights']`` (B, N, T, T): the main attention over every visible key
        (no top-k), the target of ``dsa_index_aux_loss(aux['index_scores'], aux['dense_weights'])``.
        """
        core.check_input(x, self.dim, "DeepSeekSparseAttention")
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        scale = self.head_dim ** -0.5
        index_qkw = self.indexer.project(x)
        aux = None
        if return_aux:
            valid = _valid(t, t, self.causal)
            scores = core.masked_lightning_scores(*index_qkw, valid, self.precision)
            selected = core.topk_keep(scores, valid, self.top_k)
            aux = {"index_scores": scores, "selected": selected}
        out = registry.call("DeepSeekSparseAttention", "dsa", self.impl, q, k, v,
                            *index_qkw, top_k=self.top_k, causal=self.causal,
                            scale=scale, index_scores_BTS=None if aux is None else scores,
                            precision=self.precision)
        out = self.proj(out.reshape(b, t, self.dim))
        if return_aux:
            keep = core.causal_mask(t, t) if self.causal else None
            probs_BKGTS = core.attention_weights(q, k, keep=keep, scale=scale,
                                                  precision=self.precision)
            aux["dense_weights"] = probs_BKGTS.reshape(b, self.num_heads, t, t)
            return out, aux
        return out


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

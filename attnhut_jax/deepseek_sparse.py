"""DeepSeek Sparse Attention (DeepSeek-V3.2): lightning-indexer top-k token selection.

A light indexer scores every (query, key) pair with gated ReLU,
``I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])``, and each query keeps its ``top_k`` keys for
the main attention. Selection is per token and shared by all heads.

Ties at the k-th score (ReLU zeros make them common) are broken towards the lower key index,
which is what ``jax.lax.top_k`` does. torch leaves the choice among tied keys unspecified, so
parity compares selections modulo such ties (see ``parity/compare.py``).

``impl`` picks how selection and attention run (``core``'s token-sparse seam):
``reference`` scores every (query, key) pair and attends through a dense (T, T) mask, as attnhut
does; ``xla`` and ``pallas`` (and ``auto``, the fastest of them for the backend) select with the
fused indexer top-k and attend over the selected tokens only, building no (T, T) array.
``return_aux=True`` builds the (T, T) scores for the aux dict whatever the impl, and then selects
from them, so the returned selection is the one attended.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import core
from .core import Array, Dtype


class LightningIndexer(nn.Module):
    """The scorer ``I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])``, unmasked, (B, T, S).

    Args mirror ``attnhut.LightningIndexer``: ``dim``, ``num_heads`` (4), ``head_dim`` (64),
    ``bias``. Parameters: ``wq``, ``wk`` (one shared key head), ``ww`` (per-head gates).
    """

    dim: int
    num_heads: int = 4
    head_dim: int = 64
    bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        core.check_positive("LightningIndexer", dim=self.dim, num_heads=self.num_heads,
                            head_dim=self.head_dim)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype)
        self.wq = core.Linear(self.num_heads * self.head_dim, axes=("embed", "index"), **kw)
        self.wk = core.Linear(self.head_dim, axes=("embed", "index"), **kw)
        self.ww = core.Linear(self.num_heads, axes=("embed", "index_heads"), **kw)

    def project(self, x: Array) -> tuple[Array, Array, Array]:
        """The indexer's queries (B, T, I, H), shared key (B, S, H) and gates (B, T, I)."""
        b, t, _ = x.shape
        return (self.wq(x).reshape(b, t, self.num_heads, self.head_dim), self.wk(x), self.ww(x))

    def __call__(self, x: Array) -> Array:
        core.check_input(x, self.dim, "LightningIndexer")
        return core.lightning_scores(*self.project(x))


class DeepSeekSparseAttention(nn.Module):
    """Lightning-indexer top-k token selection on a multi-head backbone.

    Args mirror ``attnhut.DeepSeekSparseAttention``: ``dim``, ``num_heads``, ``top_k`` (64),
    ``num_index_heads`` (4), ``index_head_dim`` (64), ``causal`` (True), ``bias``; plus
    ``impl`` (``auto``/``reference``/``xla``/``pallas``, see the module docstring), which
    changes no variable. Parameters: ``qkv``, ``proj``, ``indexer/{wq,wk,ww}``.

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
    impl: core.Impl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every head, plus the lightning
        indexer's key (``index_head_dim``)."""
        return float((2 * self.dim + self.index_head_dim) * jnp.dtype(dtype).itemsize)

    def setup(self) -> None:
        owner = "DeepSeekSparseAttention"
        core.check_impl(owner, self.impl)
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads, top_k=self.top_k,
                            num_index_heads=self.num_index_heads,
                            index_head_dim=self.index_head_dim)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype)
        self.qkv = core.Linear(3 * self.dim, axes=("embed", "qkv"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)
        self.indexer = LightningIndexer(self.dim, self.num_index_heads, self.index_head_dim,
                                        self.bias, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: Array, return_aux: bool = False):
        """(B, T, D) -> (B, T, D), or ``(out, aux)`` with ``return_aux=True``.

        ``aux['index_scores']`` (B, T, T): indexer scores, invalid (future) keys at the fill
        value; ``aux['selected']`` (B, T, T) bool: the keys each query attends;
        ``aux['dense_weights']`` (B, N, T, T): the main attention over every visible key (no
        top-k), the target of ``dsa_index_aux_loss(aux['index_scores'], aux['dense_weights'])``.
        """
        core.check_input(x, self.dim, "DeepSeekSparseAttention")
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        scale = self.head_dim ** -0.5
        impl = core.resolve_impl(self.impl)
        aux = None
        if impl == "reference" or return_aux:
            valid = core.causal_mask(t, t) if self.causal else jnp.ones((t, t), bool)
            scores = self.indexer(x)
            scores = jnp.where(valid, scores, core.mask_value(scores.dtype))
            selected = core.topk_keep(scores, valid, self.top_k)
            aux = {"index_scores": scores, "selected": selected}
        if impl == "reference":
            out = core.dot_product_attention(q, k, v, keep=selected[:, None], scale=scale)
        else:
            if aux is not None:  # attend exactly the selection returned in aux
                indices = core.indices_from_scores(scores, valid, self.top_k)
            else:
                indices, _ = core.indexer_topk(*self.indexer.project(x), self.top_k,
                                               causal=self.causal, impl=impl)
            out = core.token_sparse_attention(q, k, v, indices, impl=impl, scale=scale)
        out = self.proj(out.reshape(b, t, self.dim))
        if return_aux:
            keep = core.causal_mask(t, t) if self.causal else None
            probs_BKGTS = core.attention_weights(q, k, keep=keep, scale=scale)
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

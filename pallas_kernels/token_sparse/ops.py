"""One entry point per op with an ``impl`` switch: the seam DSA and CSA call.

``impl``: ``reference`` (masked dense, builds (T, S)), ``xla`` (token gather and the fused
top-k in plain XLA), ``pallas`` (the Pallas kernels: Triton on GPU, Mosaic on TPU, the GPU
kernels in interpret mode elsewhere; on TPU the top-k is ``indexer.py``'s, see
``indexer_kernel.py``), ``auto`` (``pallas`` on GPU and TPU, ``xla`` elsewhere: the fastest
exact path on CPU). Every impl computes the same selection (under the tie rule of
``reference.py``) and the same outputs and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import kernel, kernel_tpu
from .indexer import indexer_topk as _indexer_topk_xla
from .indexer_kernel import indexer_topk_pallas
from .reference import (
    FILL,
    indexer_topk_reference,
    token_sparse_attention_reference,
)
from .xla import token_sparse_attention_xla

Array = jax.Array
IMPLS = ("auto", "reference", "xla", "pallas")


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``pallas`` where the kernels compile natively (GPU, TPU), else ``xla``."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    if impl != "auto":
        return impl
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"


def token_sparse_attention(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array | None,
                           indices_BTM: Array, *, impl: str = "auto",
                           scale: float | None = None, sink: Array | None = None,
                           window: int | None = None, window_start: int = 0) -> Array:
    """Attention over each query's selected keys (+ optional raw window and sink), any impl."""
    kw = dict(scale=scale, sink=sink, window=window, window_start=window_start)
    impl = resolve_impl(impl)
    if impl == "reference":
        return token_sparse_attention_reference(q_BTNH, k_BSKH, v_BSKV, indices_BTM, **kw)
    if impl == "xla":
        return token_sparse_attention_xla(q_BTNH, k_BSKH, v_BSKV, indices_BTM, **kw)
    if jax.default_backend() == "tpu":
        return kernel_tpu.token_sparse_attention_tpu(q_BTNH, k_BSKH, v_BSKV, indices_BTM, **kw)
    return kernel.token_sparse_attention(q_BTNH, k_BSKH, v_BSKV, indices_BTM, **kw)


def indexer_topk(q_BTIE: Array, k_BSE: Array, w_BTI: Array, top_k: int, *, causal: bool,
                 impl: str = "auto", q_pos_T: Array | None = None,
                 k_pos_S: Array | None = None) -> tuple[Array, Array]:
    """(indices (B, T, min(top_k, S)), scores): see ``reference.indexer_topk_reference``."""
    kw = dict(causal=causal, q_pos_T=q_pos_T, k_pos_S=k_pos_S)
    impl = resolve_impl(impl)
    if impl == "reference":
        return indexer_topk_reference(q_BTIE, k_BSE, w_BTI, top_k, **kw)
    if impl == "pallas" and jax.default_backend() != "tpu":
        return indexer_topk_pallas(q_BTIE, k_BSE, w_BTI, top_k, **kw)
    return _indexer_topk_xla(q_BTIE, k_BSE, w_BTI, top_k, **kw)


def indices_from_scores(scores_BTS: Array, valid: Array, top_k: int) -> Array:
    """Indices of ``jax.lax.top_k`` on already-masked scores (B, T, S), invalid picks -1:
    the selection ``core.topk_keep`` marks, as indices (used when the scores are built anyway,
    e.g. for ``return_aux``)."""
    _, idx = jax.lax.top_k(scores_BTS, min(top_k, scores_BTS.shape[-1]))
    ok = jnp.take_along_axis(jnp.broadcast_to(valid, scores_BTS.shape), idx, axis=-1)
    return jnp.where(ok, idx, -1).astype(jnp.int32)


__all__ = ["FILL", "IMPLS", "resolve_impl", "token_sparse_attention", "indexer_topk",
           "indices_from_scores"]

"""The pure-jnp reference every block-sparse kernel must equal.

Semantics (shared with ``attnhut_jax.core``): query token ``t`` of query head ``n`` (kv group
``n // G``) reads key ``s`` iff ``block_keep[b, n // G, t, s // block_k]`` and, when given,
``key_valid[b, s]`` and, when causal, ``s <= t + (S - T)``. Masked logits never contribute; a
row with nothing visible returns zeros; an optional per-head ``sink`` logit joins the softmax
denominator and reads no value. Softmax statistics are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import default_scale, masked_attention_reference

Array = jax.Array


def token_keep(block_keep_BKTJ: Array, s: int, block_k: int, *, causal: bool,
               key_valid_BS: Array | None = None, q_pos_T: Array | None = None,
               k_pos_S: Array | None = None, window: int | None = None,
               num_sink_keys: int = 0) -> Array:
    """(B, K, T, S) bool token-level membership implied by a block selection and the rules."""
    t = block_keep_BKTJ.shape[2]
    keep = jnp.repeat(block_keep_BKTJ, block_k, axis=-1)[..., :s]
    q_pos = jnp.arange(t) + (s - t) if q_pos_T is None else q_pos_T
    k_pos = jnp.arange(s) if k_pos_S is None else k_pos_S
    if causal:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
        keep = keep & ((jnp.arange(s) < num_sink_keys)[None, :]
                       | (k_pos[None, :] > q_pos[:, None] - window))
    if key_valid_BS is not None:
        keep = keep & key_valid_BS[:, None, None, :]
    return keep


def block_sparse_attention_reference(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array,
                                     block_keep_BKTJ: Array, *, block_k: int, causal: bool,
                                     scale: float | None = None, sink: Array | None = None,
                                     key_valid_BS: Array | None = None,
                                     q_pos_T: Array | None = None, k_pos_S: Array | None = None,
                                     window: int | None = None,
                                     num_sink_keys: int = 0,
                                     precision: jax.lax.PrecisionLike = None) -> Array:
    """Masked dense attention with the block-sparse semantics; returns (B, T, N, V)."""
    s = k_BSKH.shape[1]
    keep = token_keep(block_keep_BKTJ, s, block_k, causal=causal, key_valid_BS=key_valid_BS,
                      q_pos_T=q_pos_T, k_pos_S=k_pos_S, window=window,
                      num_sink_keys=num_sink_keys)
    return masked_attention_reference(q_BTNH, k_BSKH, v_BSKV, keep[:, :, None],
                                      scale=default_scale(q_BTNH.shape[-1], scale), sink=sink,
                                      precision=precision)

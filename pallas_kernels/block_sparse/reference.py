"""The pure-jnp reference every block-sparse kernel must equal.

Semantics (shared with ``attnhut_jax.core``): query token ``t`` of query head ``n`` (kv group
``n // G``) reads key ``s`` iff ``block_keep[b, n // G, t, s // block_k]`` and, when given,
``key_valid[b, s]`` and, when causal, ``s <= t + (S - T)``. Masked logits never contribute; a
row with nothing visible returns zeros; an optional per-head ``sink`` logit joins the softmax
denominator and reads no value. Softmax statistics are float32.

Packed sequences: with segment ids ``q_seg[b, t]`` / ``k_seg[b, s]`` the query also needs
``k_seg[b, s] == q_seg[b, t] != 0`` (id 0 is padding); ``k_sink[b, s]`` exempts a key from the
``window`` rule, like the first ``num_sink_keys`` keys. Keys no query can read (id 0) and
padding queries are zeroed before use, so NaN or inf there reaches no output or gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import check_segments, default_scale, masked_attention_reference, same_segment

Array = jax.Array


def token_keep(block_keep_BKTJ: Array, s: int, block_k: int, *, causal: bool,
               key_valid_BS: Array | None = None, q_pos_T: Array | None = None,
               k_pos_S: Array | None = None, window: int | None = None,
               num_sink_keys: int = 0, q_seg_BT: Array | None = None,
               k_seg_BS: Array | None = None, k_sink_BS: Array | None = None) -> Array:
    """(B, K, T, S) bool token-level membership implied by a block selection and the rules
    (a dense (T, S) array: references only)."""
    b, _, t, _ = block_keep_BKTJ.shape
    q_seg_BT, k_seg_BS, k_sink_BS = check_segments("token_keep", b, t, s, q_seg_BT, k_seg_BS,
                                                    k_sink_BS)
    keep = jnp.repeat(block_keep_BKTJ, block_k, axis=-1)[..., :s]
    q_pos = jnp.arange(t) + (s - t) if q_pos_T is None else q_pos_T
    k_pos = jnp.arange(s) if k_pos_S is None else k_pos_S
    if causal:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
        sink_BS = (jnp.arange(s) < num_sink_keys)[None, :]
        if k_sink_BS is not None:
            sink_BS = sink_BS | k_sink_BS
        keep = keep & (sink_BS[:, None, None, :] | (k_pos[None, :] > q_pos[:, None] - window))
    if key_valid_BS is not None:
        keep = keep & key_valid_BS[:, None, None, :]
    if q_seg_BT is not None:
        keep = keep & same_segment(q_seg_BT[:, :, None], k_seg_BS[:, None, :])[:, None]
    return keep


def zero_padding(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array | None, q_seg_BT: Array | None,
                 k_seg_BS: Array | None) -> tuple[Array, Array, Array | None]:
    """Padding queries (``q_seg == 0``) and keys no query reads (``k_seg == 0``) replaced by
    zeros, so that a NaN or inf there reaches nothing (their own rows of the result are 0 or
    unread anyway, and their gradients are 0). Identity without segments."""
    if q_seg_BT is None:
        return q_BTNH, k_BSKH, v_BSKV
    zero = lambda x, seg: jnp.where((seg != 0)[:, :, None, None], x, jnp.zeros((), x.dtype))  # noqa: E731
    return (zero(q_BTNH, q_seg_BT), zero(k_BSKH, k_seg_BS),
            None if v_BSKV is None else zero(v_BSKV, k_seg_BS))


def block_sparse_attention_reference(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array,
                                     block_keep_BKTJ: Array, *, block_k: int, causal: bool,
                                     scale: float | None = None, sink: Array | None = None,
                                     key_valid_BS: Array | None = None,
                                     q_pos_T: Array | None = None, k_pos_S: Array | None = None,
                                     window: int | None = None,
                                     num_sink_keys: int = 0,
                                     precision: jax.lax.PrecisionLike = None,
                                     q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                                     k_sink_BS: Array | None = None,
                                     return_lse: bool = False) -> Array | tuple[Array, Array]:
    """Masked dense attention with the block-sparse semantics; returns (B, T, N, V), and with
    ``return_lse`` also the row logsumexp (B, T, N) float32 over the keys read and the sink
    (``-inf`` for a row that reads nothing and has no sink; ``common.masked_logsumexp``)."""
    b, t = q_BTNH.shape[:2]
    s = k_BSKH.shape[1]
    q_seg_BT, k_seg_BS, k_sink_BS = check_segments("block_sparse_attention_reference", b, t, s,
                                                    q_seg_BT, k_seg_BS, k_sink_BS)
    keep = token_keep(block_keep_BKTJ, s, block_k, causal=causal, key_valid_BS=key_valid_BS,
                      q_pos_T=q_pos_T, k_pos_S=k_pos_S, window=window,
                      num_sink_keys=num_sink_keys, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS,
                      k_sink_BS=k_sink_BS)
    if k_seg_BS is not None and key_valid_BS is not None:  # invalid keys: read by no one either
        k_seg_BS = jnp.where(key_valid_BS, k_seg_BS, 0)
    q_BTNH, k_BSKH, v_BSKV = zero_padding(q_BTNH, k_BSKH, v_BSKV, q_seg_BT, k_seg_BS)
    return masked_attention_reference(q_BTNH, k_BSKH, v_BSKV, keep[:, :, None],
                                      scale=default_scale(q_BTNH.shape[-1], scale), sink=sink,
                                      precision=precision, return_lse=return_lse)

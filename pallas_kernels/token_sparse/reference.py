"""The pure-jnp references every token-sparse path must equal (they build (T, S) arrays).

Array names follow the dimension key of ``pallas_kernels/__init__.py`` (M selected keys per
query, I indexer heads, E indexer head width, Z bitmask words).

Selection semantics, shared by every path in this package:

* ``indices_BTM`` (B, T, M) int32 lists, for query ``t``, the keys it reads; one selection for
  all heads (attnhut's DSA and CSA). A row is a *set*: its entries must be distinct (a top-k
  gives distinct indices); entries outside ``[0, S)`` (``-1`` by convention) are empty slots.
* ``window`` (optional) adds a contiguous causal window of raw keys: query ``t`` also reads key
  ``s`` when ``window_start <= s <= window_start + t`` and ``s > window_start + t - window``
  (CSA's keys are ``[C compressed entries | T raw tokens]``, so ``window_start = C``). A key that
  is both selected and in the window is read once.
* ``sink`` (optional, one logit per query head) joins every row's softmax denominator and reads
  no value. Softmax statistics are float32; masked logits never contribute; a row that reads
  nothing returns zeros.
* ``v_BSKV=None`` means keys and values are one shared tensor (CSA's MQA over one KV sequence).
* packed sequences (optional, both or neither): ``q_seg_BT`` (B, T) and ``k_seg_BS`` (B, S) int
  segment ids. Query ``t`` reads key ``s`` (selected or in the window) only if
  ``k_seg[b, s] == q_seg[b, t]`` and ``k_seg[b, s] != 0`` (id 0 is padding, read by no query;
  a padding query reads nothing and returns zeros). With CSA's layout ``k_seg_BS`` covers the
  C entries and the T raw tokens.

Lightning indexer: ``I[t, s] = sum_i w[t, i] * ReLU(q[t, i] . k[s])``; with ``causal`` the keys
whose position is after the query's (``k_pos[s] > q_pos[t]``) are invalid, and with segment ids
the keys of another segment or of padding (the rule above). Selection: each
row's ``min(top_k, S)`` best keys under the order (score descending, key index ascending), which
is ``jax.lax.top_k``'s order (on equal values the lower index comes first), then invalid keys
are dropped (set to ``-1``): attnhut's ``topk`` + ``& valid`` with ties broken deterministically.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..common import (
    F32,
    FILL,
    check_segments,
    default_scale,
    masked_attention_reference,
    same_segment,
)

Array = jax.Array


def positions(t: int, s: int, q_pos_T: Array | None, k_pos_S: Array | None) -> tuple[Array, Array]:
    """Default positions: queries ``arange(T) + S - T`` (the last query sees every key), keys
    ``arange(S)``."""
    q_pos = jnp.arange(t, dtype=jnp.int32) + (s - t) if q_pos_T is None else q_pos_T
    k_pos = jnp.arange(s, dtype=jnp.int32) if k_pos_S is None else k_pos_S
    return q_pos.astype(jnp.int32), k_pos.astype(jnp.int32)


def segment_keep(q_seg_BT: Array, k_seg_BS: Array) -> Array:
    """(B, T, S) bool: the packed-sequence rule ``k_seg == q_seg != 0`` (reference only)."""
    return same_segment(q_seg_BT[:, :, None], k_seg_BS[:, None, :])


def window_keep(t: int, s: int, window: int | None, window_start: int = 0) -> Array:
    """(T, S) bool: the raw-key window of each query (all False without a window)."""
    if window is None:
        return jnp.zeros((t, s), bool)
    raw = jnp.arange(s)[None, :] - window_start
    q = jnp.arange(t)[:, None]
    return (raw >= 0) & (raw <= q) & (raw > q - window)


def token_keep(indices_BTM: Array, s: int, *, window: int | None = None,
               window_start: int = 0, q_seg_BT: Array | None = None,
               k_seg_BS: Array | None = None) -> Array:
    """(B, T, S) bool: selected keys (empty slots ignored) or'ed with the window, and'ed with the
    segment rule when segment ids are given."""
    b, t, _ = indices_BTM.shape
    q_seg_BT, k_seg_BS, _ = check_segments("token_keep", b, t, s, q_seg_BT, k_seg_BS)
    idx = jnp.where((indices_BTM >= 0) & (indices_BTM < s), indices_BTM, s)
    hit = jnp.zeros((b, t, s + 1), bool)
    hit = jnp.put_along_axis(hit, idx, True, axis=-1, inplace=False)[..., :s]
    keep = hit | window_keep(t, s, window, window_start)[None]
    return keep if q_seg_BT is None else keep & segment_keep(q_seg_BT, k_seg_BS)


def token_sparse_attention_reference(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array | None,
                                     indices_BTM: Array, *, scale: float | None = None,
                                     sink: Array | None = None, window: int | None = None,
                                     window_start: int = 0,
                                     q_seg_BT: Array | None = None,
                                     k_seg_BS: Array | None = None,
                                     precision: jax.lax.PrecisionLike = None) -> Array:
    """Masked dense attention with the token-sparse semantics; returns (B, T, N, V)."""
    check_segments("token_sparse_attention_reference", q_BTNH.shape[0], q_BTNH.shape[1],
                   k_BSKH.shape[1], q_seg_BT, k_seg_BS)
    v_BSKV = k_BSKH if v_BSKV is None else v_BSKV
    keep_BTS = token_keep(indices_BTM, k_BSKH.shape[1], window=window, window_start=window_start,
                          q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS)
    return masked_attention_reference(q_BTNH, k_BSKH, v_BSKV, keep_BTS[:, None, None],
                                      scale=default_scale(q_BTNH.shape[-1], scale), sink=sink,
                                      precision=precision)


def indexer_scores_reference(q_BTIE: Array, k_BSE: Array, w_BTI: Array, *,
                             precision: jax.lax.PrecisionLike = None) -> Array:
    """Lightning-indexer scores (B, T, S), always float32 whatever the input dtype (operands
    upcast first): every selector ranks float32 scores, so all impls pick the same keys."""
    relu_BTIS = jax.nn.relu(jnp.einsum("BTIE,BSE->BTIS", q_BTIE.astype(F32), k_BSE.astype(F32),
                                       precision=precision))
    return jnp.einsum("BTI,BTIS->BTS", w_BTI.astype(F32), relu_BTIS, precision=precision)


def indexer_valid(t: int, s: int, *, causal: bool, q_pos_T: Array | None = None,
                  k_pos_S: Array | None = None) -> Array:
    """(T, S) bool: keys a query may select."""
    if not causal:
        return jnp.ones((t, s), bool)
    q_pos, k_pos = positions(t, s, q_pos_T, k_pos_S)
    return k_pos[None, :] <= q_pos[:, None]


def indexer_topk_reference(q_BTIE: Array, k_BSE: Array, w_BTI: Array, top_k: int, *,
                           causal: bool, q_pos_T: Array | None = None,
                           k_pos_S: Array | None = None, q_seg_BT: Array | None = None,
                           k_seg_BS: Array | None = None,
                           precision: jax.lax.PrecisionLike = None) -> tuple[Array, Array]:
    """(indices (B, T, min(top_k, S)) int32 with -1 for invalid picks, their scores float32).

    Full (T, S) float32 scores, invalid keys (causal rule, segment rule) at the fill value,
    ``jax.lax.top_k``: columns come in descending score order, ties towards the lower key index.
    """
    b, t, s = q_BTIE.shape[0], q_BTIE.shape[1], k_BSE.shape[1]
    q_seg_BT, k_seg_BS, _ = check_segments("indexer_topk", b, t, s, q_seg_BT, k_seg_BS)
    valid_BTS = indexer_valid(t, s, causal=causal, q_pos_T=q_pos_T, k_pos_S=k_pos_S)[None]
    if q_seg_BT is not None:
        valid_BTS = valid_BTS & segment_keep(q_seg_BT, k_seg_BS)
    scores_BTS = jnp.where(valid_BTS, indexer_scores_reference(q_BTIE, k_BSE, w_BTI,
                                                               precision=precision), FILL)
    vals_BTM, idx_BTM = jax.lax.top_k(scores_BTS, min(top_k, s))
    ok_BTM = jnp.take_along_axis(jnp.broadcast_to(valid_BTS, scores_BTS.shape), idx_BTM, axis=-1)
    return jnp.where(ok_BTM, idx_BTM, -1).astype(jnp.int32), vals_BTM

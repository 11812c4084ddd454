"""The model: token + learned position embeddings, ``depth`` pre-norm blocks of attention and a
GELU MLP, a final LayerNorm and a head tied to the embedding (``tied_head=False`` for a separate
one).

Each block feeds its attention a per-channel mix of the normalised input and that of the previous
position (RWKV's token shift, ``token_shift=False`` to drop it): it hands every layer the
previous-token feature that an induction head otherwise needs a whole layer to build, and makes
recall learnable in a few hundred steps on a CPU.

The index branches of ``minimax_sparse``, ``deepseek_sparse`` and ``compressed_sparse`` get no
gradient from the task loss (hard top-k); with ``with_aux=True`` the model also returns their
index losses, computed inside each module (``index_loss=``, memory linear in T), which train them
to predict where the main attention looks. ``record_selection=True`` takes the modules'
``return_aux`` path instead, which builds (T, T) arrays, to record each layer's selection for the
pictures.

Packed rows (``segment_ids``, ``positions``): the position embedding reads ``positions``, the
token shift does not reach across documents, and every layer gets both.

``LM(cfg, decode=True)`` decodes incrementally (``attnhut_jax.cache``): every layer's attention is
built with ``decode=True`` (the same parameters), and the ``'cache'`` collection also holds the
model's own position counter ``index`` (B,) (the position embedding reads ``index + j`` for chunk
token j) and each block's ``prev`` (B, D), the last appended token's normalised input that the
token shift mixes into the next chunk's first token. ``generation.py`` drives it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import attnhut_jax as ah
from attnhut_jax import cache, core, registry

from .config import (
    DEFAULT_INDEX_LOSS,
    NO_POSITIONS,
    WITH_AUX_LOSS,
    WITH_LINEAR_CORE,
    WITH_SPARSE_CORE,
    Config,
)

Array = jax.Array


def make_attention(cfg: Config, layer: int, name: str = "attn", decode: bool = False) -> nn.Module:
    """The mechanism ``cfg.attn`` as a causal attention layer of width ``cfg.dim`` (``decode``:
    built with ``decode=True``, same parameters)."""
    d, n, a, k = cfg.dim, cfg.heads, cfg.attn, cfg.resolved_top_k()
    hd = d // n
    cls, args, kw = {
        "standard": (ah.StandardAttention, (d, n), dict(causal=True)),
        "gqa": (ah.GroupedQueryAttention, (d, n, cfg.kv_heads), dict(causal=True)),
        "mqa": (ah.MultiQueryAttention, (d, n), dict(causal=True)),
        "mla": (ah.MultiHeadLatentAttention, (d, n), dict(causal=True)),
        # Ye et al. halve the head count so that each (two-map) head keeps a normal head's width.
        "differential": (ah.DifferentialAttention, (d, max(1, n // 2)),
                         dict(depth=layer, causal=True)),
        "delta": (ah.DeltaAttention, (d, n), dict(window=cfg.window)),
        "bigbird": (ah.BigBirdAttention, (d, n),
                    dict(block_size=cfg.block_size, causal=True, seed=layer)),
        "minimax_sparse": (ah.MiniMaxSparseAttention, (d, n, cfg.kv_heads),
                           dict(block_size=cfg.block_size, top_k=k, index_dim=cfg.index_dim,
                                causal=True)),
        "deepseek_sparse": (ah.DeepSeekSparseAttention, (d, n),
                            dict(top_k=k, index_head_dim=cfg.index_dim, causal=True)),
        "heavily_compressed": (ah.HeavilyCompressedAttention, (d, n),
                               dict(compression_rate=cfg.compression_rate, window=cfg.window)),
        "compressed_sparse": (ah.CompressedSparseAttention, (d, n),
                              dict(compression_rate=cfg.compression_rate, top_k=k,
                                   window=cfg.window, index_dim=cfg.index_dim)),
        # Qwen3.5's layout: fewer query/key heads than value heads (``kv_heads`` of them, shared
        # by groups of value heads as GQA shares its keys), every head ``dim / heads`` wide.
        "gated_deltanet": (ah.GatedDeltaNet, (), dict(
            hidden_size=d, num_query_key_heads=cfg.kv_heads, num_value_heads=n, head_qk_dim=hd,
            head_v_dim=hd)),
        "kimi_delta": (ah.KimiDeltaAttention, (), dict(hidden_size=d, num_heads=n, head_dim=hd)),
        "linear": (ah.LinearAttention, (d, n), dict(causal=True)),
        # Child et al.'s patterns (the stride / block is ``block_size``) and Tay et al.'s causal
        # Sinkhorn (its sorting network is sized for ``seq_len``).
        "strided_sparse": (ah.StridedSparseAttention, (d, n),
                           dict(stride=cfg.block_size, causal=True)),
        "fixed_sparse": (ah.FixedSparseAttention, (d, n),
                         dict(block_size=cfg.block_size, causal=True)),
        "sinkhorn": (ah.SinkhornAttention, (d, n),
                     dict(block_size=cfg.block_size, causal=True, max_len=cfg.seq_len)),
        # Spark: the statistical top-k of a predictor slice of each head (``index_dim`` wide, at
        # most half the head: the rest forms the softplus factor)
        "spark": (ah.SparkAttention, (d, n),
                  dict(top_k=k, predictor_dim=max(1, min(cfg.index_dim, hd // 2)), causal=True)),
    }[a]
    if cfg.impl != "auto" and ((a in WITH_SPARSE_CORE and cfg.impl in registry.SPARSE_IMPLS) or
                               (a in WITH_LINEAR_CORE and cfg.impl in registry.LINEAR_IMPLS)):
        kw["impl"] = cfg.impl
    if decode:
        kw["decode"] = True
    return cls(*args, **kw, dtype=cfg.compute_dtype, name=name)


def attention_with_aux(attn: nn.Module, kind: str, h: Array, with_aux: bool, *,
                       index_loss: str = "auto", record_selection: bool = False,
                       segment_ids: Array | None = None, positions: Array | None = None
                       ) -> tuple[Array, Array, Array | None]:
    """(output, index loss, selection) of one attention layer.

    ``index_loss`` (``auto``/``sparse``/``dense``, see ``config.INDEX_LOSSES``) is computed by the
    module itself. ``record_selection`` takes the materialised ``return_aux`` path (attnhut's,
    (T, T) arrays) and returns what the selector keeps: (B, K, T, T) for minimax_sparse, (B, T, T)
    for deepseek_sparse, (B, T, C) for compressed_sparse; None elsewhere.
    """
    packing = {} if segment_ids is None and positions is None else dict(
        segment_ids=segment_ids, positions=positions)
    if kind in NO_POSITIONS:  # positions come from the segment starts (see config.NO_POSITIONS)
        packing.pop("positions", None)
    zero = jnp.zeros((), jnp.float32)
    if kind == "spark" and record_selection:  # its selection is (B, N, T, T): head 0 kept
        return attn(h, **packing), zero, attn.selection(
            h, segment_ids=packing.get("segment_ids"))[:, 0]
    if kind not in WITH_AUX_LOSS or not (with_aux or record_selection):
        return attn(h, **packing), zero, None
    if not record_selection:
        mode = index_loss if index_loss != "auto" else DEFAULT_INDEX_LOSS[kind]
        out, loss = attn(h, index_loss=mode, **packing)
        return out, loss, None
    out, aux = attn(h, return_aux=True, **packing)
    if kind == "minimax_sparse":
        loss = ah.msa_index_aux_loss(aux["index_scores"], aux["attn_weights"], aux["keep"])
        selection = aux["keep"]
    else:  # DSA and CSA: the indexer fits the main branch's attention over every visible key
        loss = ah.dsa_index_aux_loss(aux["index_scores"], aux["dense_weights"])
        selection = aux["selected"]
    return out, loss if with_aux else zero, selection


class Block(nn.Module):
    """Pre-norm residual block: x + attn(shift(LN(x))), then x + MLP(LN(x)).

    ``shift(h)[t] = mu * h[t] + (1 - mu) * h[t - 1]`` with a learned per-channel ``mu`` (init 0.5)
    when ``cfg.token_shift``; causal, since position t mixes in only t - 1.

    ``decode=True``: x is a chunk appended to the cache; ``lengths`` (B,) the tokens each row
    appends (default all). The chunk's first token mixes in the cached ``prev`` (the row's last
    appended token; zeros before the first), which the chunk's last appended token replaces.
    """

    cfg: Config
    layer: int
    decode: bool = False

    @nn.compact
    def __call__(self, x: Array, with_aux: bool = False, *, segment_ids: Array | None = None,
                 positions: Array | None = None, record_selection: bool = False,
                 lengths: Array | None = None) -> tuple[Array, Array]:
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h = core.layer_norm("ln_attn", dt, jnp.float32)(x)
        if cfg.token_shift:
            mu = self.param("shift", nn.with_logical_partitioning(
                nn.initializers.constant(0.5), ("embed",)), (cfg.dim,))
            if self.decode:
                prev = self._cached_prev(h, lengths)
            else:
                prev = jnp.pad(h, ((0, 0), (1, 0), (0, 0)))[:, :-1]
            if segment_ids is not None:  # a document's first token has no predecessor
                same = segment_ids == jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
                prev = jnp.where(same[..., None], prev, jnp.zeros((), prev.dtype))
            h = h * mu.astype(h.dtype) + prev * (1 - mu).astype(h.dtype)
        attn = make_attention(cfg, self.layer, decode=self.decode)
        if self.decode:
            a, aux, selection = attn(h, lengths=lengths), jnp.zeros((), jnp.float32), None
        else:
            a, aux, selection = attention_with_aux(
                attn, cfg.attn, h, with_aux, index_loss=cfg.index_loss,
                record_selection=record_selection, segment_ids=segment_ids, positions=positions)
        if selection is not None:
            self.sow("intermediates", "selection", selection)
        x = x + a
        h = core.layer_norm("ln_mlp", dt, jnp.float32)(x)
        h = core.Linear(cfg.mlp_ratio * cfg.dim, use_bias=True, axes=("embed", "mlp"), dtype=dt,
                        name="fc")(h)
        h = core.Linear(cfg.dim, use_bias=True, axes=("mlp", "embed"), dtype=dt,
                        name="proj")(nn.gelu(h))
        return x + h, aux

    def _cached_prev(self, h_BTD: Array, lengths: Array | None) -> Array:
        """(B, T, D) predecessors of the chunk's tokens: the cached ``prev``, then the chunk's own;
        ``prev`` becomes the last appended token of each row that appends any."""
        b, n, d = h_BTD.shape
        prev = self.variable(cache.COLLECTION, "prev", jnp.zeros, (b, d), h_BTD.dtype)
        out = jnp.concatenate([prev.value[:, None].astype(h_BTD.dtype), h_BTD[:, :-1]], axis=1)
        if not self.is_initializing():
            len_B = _chunk_lengths(lengths, b, n)
            last_BD = h_BTD[jnp.arange(b), jnp.clip(len_B - 1, 0, n - 1)]
            prev.value = jnp.where((len_B > 0)[:, None], last_BD, prev.value)
        return out


def _chunk_lengths(lengths: Array | None, b: int, n: int) -> Array:
    """(B,) int32 tokens each row of a chunk of n appends (``lengths``, default n)."""
    if lengths is None:
        return jnp.full((b,), n, jnp.int32)
    return jnp.clip(jnp.asarray(lengths, jnp.int32), 0, n)


class LM(nn.Module):
    """Decoder-only LM: tokens (B, T) -> float32 logits (B, T, vocab) and the mean index aux loss.

    ``decode=True``: incremental decoding (see the module docstring). ``init`` on a (B, max_len)
    token array (max_len <= seq_len) sizes the cache; each ``apply(..., mutable=["cache"])``
    appends a chunk (B, n) and returns its logits, the first chunk may take ``lengths`` (B,) for
    prompts of different lengths (logits past a row's length are meaningless). The parameters are
    those of ``decode=False``. The attention layers keep the cache's rules (a chunk that does not
    fit raises, or under jit gives NaN); the model's own counter then runs past the cache's
    length and the row is spent.
    """

    cfg: Config
    decode: bool = False

    @nn.compact
    def __call__(self, tokens_BT: Array, with_aux: bool = False, *,
                 segment_ids: Array | None = None, positions: Array | None = None,
                 record_selection: bool = False, lengths: Array | None = None
                 ) -> tuple[Array, Array]:
        """``segment_ids`` / ``positions`` (B, T) for packed rows (``data.packed_batch``).

        With ``decode=True``: ``tokens_BT`` is the chunk to append, ``lengths`` (B,) the tokens
        each row appends; ``with_aux``, ``segment_ids``, ``positions`` and ``record_selection``
        are refused.
        """
        cfg, dt = self.cfg, self.cfg.compute_dtype
        cache.check_options("LM", decode=self.decode, lengths=lengths, with_aux=with_aux,
                            segment_ids=segment_ids, positions=positions,
                            record_selection=record_selection)
        b, t = tokens_BT.shape
        if t > cfg.seq_len:
            what = "a decode cache" if self.decode and self.is_initializing() else "sequence"
            raise ValueError(f"{what} of length {t} is longer than seq_len={cfg.seq_len}")
        init = nn.initializers.normal(0.02)
        embed = nn.Embed(cfg.vocab, cfg.dim, dtype=dt, name="embed",
                         embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")))
        pos = self.param("pos_embed", nn.with_logical_partitioning(init, (None, "embed")),
                         (cfg.seq_len, cfg.dim))
        if self.decode:  # chunk token j of row b sits at position index[b] + j
            index = self.variable(cache.COLLECTION, cache.INDEX, jnp.zeros, (b,), jnp.int32)
            positions_BT = index.value[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
            x = embed(tokens_BT) + jnp.take(pos, positions_BT, axis=0, mode="clip").astype(dt)
            if not self.is_initializing():
                index.value = index.value + _chunk_lengths(lengths, b, t)
            positions = None
        else:
            x = embed(tokens_BT) + (pos[:t] if positions is None else pos[positions]).astype(dt)
        aux = jnp.zeros((), jnp.float32)
        for i in range(cfg.depth):
            x, a = Block(cfg, i, decode=self.decode, name=f"block_{i}")(
                x, with_aux, segment_ids=segment_ids, positions=positions,
                record_selection=record_selection, lengths=lengths)
            aux = aux + a
        x = core.layer_norm("ln_out", dt, jnp.float32)(x)
        if cfg.tied_head:
            logits = embed.attend(x)
        else:
            logits = core.Linear(cfg.vocab, axes=("embed", "vocab"), dtype=dt, name="head")(x)
        return logits.astype(jnp.float32), aux / cfg.depth


def kv_cache_bytes_per_token(cfg: Config, dtype=jnp.bfloat16) -> float:
    """Bytes a decoder caches per generated token, summed over layers (bf16 by default).

    Each layer's attention reports its own ``kv_cache_bytes_per_token``: K and V per kv head (MLA:
    its latent and shared RoPE key), the index keys a selector caches (MSA, DSA, CSA) included,
    and the compressed mechanisms at their amortised cost at long context (one entry per
    ``compression_rate`` tokens; their raw window is a constant ``window`` tokens, not counted).
    """
    return sum(make_attention(cfg, layer).kv_cache_bytes_per_token(dtype)
               for layer in range(cfg.depth))

"""Multi-head Latent Attention (DeepSeek-V2/V3), the readable non-absorbed form.

Keys and values are cached as one low-rank latent per token (plus a small RoPE key shared by all
heads) instead of full per-head K and V.

The full forward expands the latent into per-head keys and values. A decode step may instead
read the cached latent directly (the *absorbed* form, ``absorbed_attention``): the key
up-projection folds into the query and the value up-projection into the output, so each step
costs O(cache length x latent width) per head instead of expanding the whole cache.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from flax.linen import dtypes

from . import cache, core, registry
from .core import Array, Dtype, Precision


def absorbed_attention(q_nope_BTNH: Array, q_rope_BTNR: Array, latent_BSL: Array,
                       k_rope_BSR: Array, w_uk_LNH: Array, w_uv_LNV: Array,
                       b_uv_NV: Array | None, keep_BTS: Array, *, scale: float,
                       precision: Precision = None) -> Array:
    """MLA's attention read straight from the latent cache; returns (B, T, N, V).

    Equal to expanding keys ``k_nope = latent @ w_uk (+ key bias)`` and values ``v = latent @
    w_uv + b_uv`` per head and attending with the logits ``(q_nope . k_nope + q_rope . k_rope) *
    scale``, masked by ``keep_BTS`` (True where query t may read cached token s): the key part
    is folded into the query (``q_nope @ w_uk^T``, L wide), the value part applied once to the
    latent the weights read. The key bias adds ``q_nope . b_uk`` to every logit of a query, a
    per-query constant that the softmax removes, so it takes no part here. A row without any
    visible key returns zeros (the value bias is scaled by the weights' total, 1 or 0).
    """
    q_lat_BTNL = jnp.einsum("BTNH,LNH->BTNL", q_nope_BTNH, w_uk_LNH, precision=precision)
    logits_BNTS = (jnp.einsum("BTNL,BSL->BNTS", q_lat_BTNL, latent_BSL, precision=precision)
                   + jnp.einsum("BTNR,BSR->BNTS", q_rope_BTNR, k_rope_BSR, precision=precision))
    logits_BNTS = logits_BNTS.astype(core.softmax_dtype(q_nope_BTNH.dtype)) * scale
    probs_BNTS = core.masked_softmax(logits_BNTS, keep_BTS[:, None])
    # the read as one (N * T, S) x (S, L) product: the latent cache stays the right operand in
    # its own layout (as BNTS,BSL->BTNL XLA transposed the whole latent every step)
    b, n, t, s = probs_BNTS.shape
    read_BXL = jax.lax.dot_general(probs_BNTS.reshape(b, n * t, s).astype(latent_BSL.dtype),
                                   latent_BSL, (((2,), (1,)), ((0,), (0,))), precision=precision)
    read_BTNL = read_BXL.reshape(b, n, t, -1).transpose(0, 2, 1, 3)
    out_BTNV = jnp.einsum("BTNL,LNV->BTNV", read_BTNL, w_uv_LNV, precision=precision)
    if b_uv_NV is None:
        return out_BTNV
    total_BTN1 = jnp.sum(probs_BNTS, axis=-1).transpose(0, 2, 1)[..., None]
    return out_BTNV + (total_BTN1 * b_uv_NV).astype(out_BTNV.dtype)


class LatentIndexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer on MLA: queries from the query latent (``wq_b``), one
    shared key ``LayerNorm(wk(x))`` (``k_norm``, eps 1e-6), per-head gates ``weights_proj(x)``;
    RoPE (half layout, whatever the main attention's) on the leading ``rope`` channels of both.
    Scores ``I[t, s] = sum_i w[t, i] I^-1/2 E^-1/2 ReLU(q[t, i] . k[s])`` (the scales folded into
    the gates: ReLU commutes with a positive factor). Its projections run in float32."""

    dim: int
    q_lora_rank: int
    num_heads: int
    head_dim: int
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    def setup(self) -> None:
        kw = dict(use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.wq_b = core.Linear(self.num_heads * self.head_dim, axes=("latent", "index"), **kw)
        self.wk = core.Linear(self.head_dim, axes=("embed", "index"), **kw)
        self.k_norm = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32,
                                   param_dtype=self.param_dtype,
                                   scale_init=core.logical(nn.initializers.ones_init(), ("index",)),
                                   bias_init=core.logical(nn.initializers.zeros_init(), ("index",)))
        self.weights_proj = core.Linear(self.num_heads, axes=("embed", "index_heads"), **kw)

    def __call__(self, x: Array, q_latent: Array, cos: Array, sin: Array
                 ) -> tuple[Array, Array, Array]:
        """Queries (B, T, I, E), keys (B, T, E), gates (B, T, I), all float32, from detached
        inputs (the output's gradient never reaches the selector, as in DeepSeek-V3.2)."""
        x, q_latent = jax.lax.stop_gradient((x, q_latent))
        b, t, _ = x.shape
        q_BTIE = self.wq_b(q_latent).reshape(b, t, self.num_heads, self.head_dim)
        k_BT1E = self.k_norm(self.wk(x))[:, :, None, :]
        q_BTIE = core.apply_rope(q_BTIE, cos, sin)
        k_BTE = core.apply_rope(k_BT1E, cos, sin)[:, :, 0]
        w_BTI = self.weights_proj(x) * (self.num_heads * self.head_dim) ** -0.5
        return q_BTIE, k_BTE, w_BTI


class MultiHeadLatentAttention(cache.ReadsEveryToken, nn.Module):
    """MLA with a decoupled RoPE key head.

    Args mirror ``attnhut.MultiHeadLatentAttention``: ``dim``, ``num_heads``, ``q_lora_rank``
    (default dim // 2), ``kv_lora_rank`` (dim // 4), ``qk_nope_head_dim`` (head_dim // 2),
    ``qk_rope_head_dim`` (head_dim // 2, even), ``v_head_dim`` (head_dim), ``causal`` (True),
    ``rope_theta``, ``bias``; ``head_dim = dim // num_heads``. As in attnhut, a rank or width of
    0 (or None, except ``q_lora_rank``) selects the default. Parameters: ``q_down``, ``q_norm``,
    ``q_up``, ``kv_down``, ``kv_norm``, ``kv_up``, ``proj``.

    The DeepSeek-V2/V3 layout (d9d's ``MultiHeadLatentAttention``, Hugging Face's
    ``DeepseekV3Attention``): ``q_lora_rank=None`` projects the query at full rank (parameter
    ``q`` instead of ``q_down`` / ``q_norm`` / ``q_up``, as DeepSeek-V2-Lite); ``norm_eps`` of
    the latent RMSNorms; ``rope_style`` (``"interleaved"`` is DeepSeek's ``rope_interleave``);
    ``rope_scaling`` (``core.RopeScaling``): with YaRN and ``mscale_all_dim`` the softmax scale
    is multiplied by ``(0.1 mscale_all_dim ln(factor) + 1) ** 2``, as DeepSeek-V3 does.

    DeepSeek-V3.2's sparse attention (DSA on MLA, Hugging Face's ``DeepseekV32Attention``):
    ``index_top_k > 0`` adds a ``LatentIndexer`` (``indexer``: ``index_num_heads`` heads of
    ``index_head_dim``, reading the query latent, so ``q_lora_rank`` must not be None) and each
    query reads only its ``index_top_k`` best-scored keys at or before it (the registry's ``dsa``
    op under ``index_impl``: ``reference`` masks a dense (T, T) computation, ``xla`` / ``pallas``
    select with the fused indexer top-k and attend over the selected tokens only). The indexer
    reads detached inputs, so only ``index_loss="sparse"|"dense"`` (call argument; the call then
    returns ``(out, loss)``) trains it. FP8 scoring and the Hadamard rotation of DeepSeek's
    release are out of scope (the rotation is orthogonal: it does not change the scores).
    Decoding caches the indexer's keys too and masks the step's latent read to the selection.

    ``impl`` (``auto`` | ``xla`` | ``cudnn``; no variable depends on it) picks the registry's
    ``dense`` op, ``core.cudnn_unsupported`` says when cuDNN can run; ``precision`` reaches every
    matmul (Flax's convention).
    With the defaults V == H (= head_dim); ``cudnn`` needs ``v_head_dim == qk_nope_head_dim +
    qk_rope_head_dim``.

    ``decode=True`` (causal only): incremental decoding (``attnhut_jax.cache``) with a cache of
    what the paper promises, ``kv_lora_rank + qk_rope_head_dim`` values per token: ``latent``
    (B, max_len, kv_lora_rank), the RMS-normalised latent that ``kv_up`` reads, and
    ``rope_key`` (B, max_len, qk_rope_head_dim), the shared key head already rotated at its
    position (RoPE positions continue from the cache). With ``absorb=True`` (default) a step
    reads the cached latent in the absorbed form (``absorbed_attention``: ``kv_up``'s key part
    folded into the query, its value part into the output); ``absorb=False`` expands the cached
    latent with ``kv_up`` at every step and attends as the full forward does (same cache, same
    outputs up to rounding). XLA whatever ``impl``; the ``params`` are those of ``decode=False``.
    """

    dim: int
    num_heads: int
    q_lora_rank: int | None = 0
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    causal: bool = True
    rope_theta: float = 10000.0
    bias: bool = False
    impl: registry.DenseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False
    absorb: bool = True
    norm_eps: float = 1e-6
    rope_style: core.RopeStyle = "half"
    rope_scaling: core.RopeScaling | None = None
    index_top_k: int = 0
    index_num_heads: int = 64
    index_head_dim: int = 128
    index_impl: registry.SparseImpl = "auto"

    def dims(self) -> tuple[int | None, int, int, int, int]:
        """Resolved (q_lora_rank, kv_lora_rank, nope, rope, v_head_dim), attnhut's defaults applied
        (q_lora_rank None: a full-rank query)."""
        head_dim = self.dim // self.num_heads if self.num_heads > 0 else 0
        ql = None if self.q_lora_rank is None else (self.q_lora_rank or self.dim // 2)
        return (ql, self.kv_lora_rank or self.dim // 4,
                self.qk_nope_head_dim or head_dim // 2, self.qk_rope_head_dim or head_dim // 2,
                self.v_head_dim or head_dim)

    def decode_scored(self, n: int) -> int:
        """Index keys the indexer scores per decode query: every cached one (none without an
        indexer). The step still reads the whole latent, masked to the selection."""
        return int(n) if self.index_top_k else 0

    def softmax_scale(self) -> float:
        """(nope + rope) ** -0.5, times DeepSeek's YaRN ``mscale_all_dim`` factor squared."""
        _, _, nope, rope, _ = self.dims()
        scale = (nope + rope) ** -0.5
        sc = self.rope_scaling
        if sc is not None and sc.type == "yarn" and sc.mscale_all_dim and sc.factor > 1:
            scale *= (0.1 * sc.mscale_all_dim * math.log(sc.factor) + 1.0) ** 2
        return scale

    def _rope_tables(self, pos: Array, dtype) -> tuple[Array, Array]:
        rope = self.dims()[3]
        return core.rope_tables(pos, rope, self.rope_theta, dtype, scaling=self.rope_scaling,
                                style=self.rope_style)

    def _rope(self, a: Array, cos: Array, sin: Array) -> Array:
        return core.apply_rope(a, cos, sin, self.rope_style)

    def _query(self, x: Array) -> tuple[Array, Array | None]:
        """The query (B, T, N * (nope + rope)) and the normalised query latent (None at full
        rank)."""
        if self.q_lora_rank is None:
            return self.q(x), None
        latent = core.rms_norm(self.q_down(x), self.q_norm, self.norm_eps)
        return self.q_up(latent), latent

    def _index(self, x: Array, q_latent: Array, pos: Array):
        """The indexer's (queries, keys, gates) at positions ``pos``."""
        rope = self.dims()[3]
        cos, sin = core.rope_tables(pos, rope, self.rope_theta, jnp.float32,
                                    scaling=self.rope_scaling, style="half")
        return self.indexer(x, q_latent, cos, sin)

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: the latent (``kv_lora_rank``) and the rope
        key shared by all heads."""
        _, kv_lora_rank, _, rope_dim, _ = self.dims()
        index_key = self.index_head_dim * 4 if self.index_top_k else 0  # float32 index keys
        return float((kv_lora_rank + rope_dim) * jnp.dtype(dtype).itemsize + index_key)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays in ``dtype``: the latent (``kv_lora_rank``) and the
        rotated rope key (``qk_rope_head_dim``) per token, and the index."""
        _, kvl, _, rope, _ = self.dims()
        index_keys = (cache.nbytes((batch, max_len, self.index_head_dim), jnp.float32)
                      if self.index_top_k else 0)
        return (cache.nbytes((batch, max_len, kvl), dtype) + cache.nbytes((batch, max_len, rope), dtype)
                + index_keys + cache.index_bytes(batch))

    def setup(self) -> None:
        owner = "MultiHeadLatentAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads)
        registry.check(owner, "dense", self.impl)
        ql, kvl, nope, rope, vd = self.dims()
        core.check_positive(owner, kv_lora_rank=kvl, qk_nope_head_dim=nope,
                            qk_rope_head_dim=rope, v_head_dim=vd)
        if not self.norm_eps > 0:
            raise ValueError(f"{owner}: norm_eps={self.norm_eps} must be > 0")
        if ql is not None:
            core.check_positive(owner, q_lora_rank=ql)
        if rope % 2 != 0:
            raise ValueError(f"{owner}: qk_rope_head_dim={rope} must be even")
        core.check_rope_options(owner, self.rope_style, self.rope_scaling)
        if self.index_top_k < 0:
            raise ValueError(f"{owner}: index_top_k={self.index_top_k} must be >= 0 (0: dense)")
        if self.index_top_k:
            if ql is None:
                raise ValueError(f"{owner}: index_top_k={self.index_top_k} needs a query latent "
                                 f"(the indexer reads it): q_lora_rank must not be None")
            core.check_positive(owner, index_num_heads=self.index_num_heads,
                                index_head_dim=self.index_head_dim)
            if self.index_head_dim < rope:
                raise ValueError(f"{owner}: index_head_dim={self.index_head_dim} must be >= "
                                 f"qk_rope_head_dim={rope} (the indexer rotates that many)")
            cache.check_causal(owner + " with an indexer", True, self.causal)
            registry.check(owner, "dsa", self.index_impl)
            self.indexer = LatentIndexer(self.dim, ql, self.index_num_heads, self.index_head_dim,
                                         self.param_dtype, self.precision)
        cache.check_causal(owner, self.decode, self.causal)
        n = self.num_heads
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        if ql is None:
            self.q = core.Linear(n * (nope + rope), axes=("embed", "heads"), **kw)
        else:
            self.q_down = core.Linear(ql, axes=("embed", "latent"), **kw)
            self.q_up = core.Linear(n * (nope + rope), axes=("latent", "heads"), **kw)
            self.q_norm = core.ones_param(self, "q_norm", ql, "latent", self.param_dtype)
        self.kv_down = core.Linear(kvl + rope, axes=("embed", "latent"), **kw)
        self.kv_up = core.Linear(n * (nope + vd), axes=("latent", "heads"), **kw)
        self.kv_norm = core.ones_param(self, "kv_norm", kvl, "latent", self.param_dtype)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, attn_mask: Array | None = None, *,
                 segment_ids: Array | None = None, positions: Array | None = None,
                 lengths: Array | None = None, index_loss: str | None = None):
        """(B, T, D) -> (B, T, D). ``attn_mask``: boolean or additive, broadcastable to (B, N, T, T).

        ``segment_ids`` (B, T) int: packed sequences, as ``StandardAttention`` takes them
        (segments AND with the causal rule and with ``attn_mask``). ``positions`` (B, T) int: the
        positions the decoupled RoPE query and key heads rotate by (default ``arange(T)``), one
        table per row. Positions restarting at 0 in each segment make a packed row compute what
        its segments compute alone; as RoPE scores depend only on position differences and no
        score crosses a segment, any per-segment offset gives the same up to float rounding.

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``attn_mask``, ``segment_ids`` and ``positions`` are
        refused (positions continue from the cache).

        With an indexer (``index_top_k > 0``): ``attn_mask`` is refused; ``index_loss``
        ``"sparse"`` | ``"dense"`` returns ``(out, loss)`` (DSA's index losses, computed by the
        ``dsa`` op without a (T, T) array off the ``reference`` impl).
        """
        core.check_input(x, self.dim, "MultiHeadLatentAttention")
        cache.check_options("MultiHeadLatentAttention", decode=self.decode, lengths=lengths,
                            attn_mask=attn_mask, segment_ids=segment_ids, positions=positions)
        if index_loss is not None and (not self.index_top_k or index_loss not in (
                "sparse", "dense")):
            raise ValueError(f"MultiHeadLatentAttention: index_loss={index_loss!r} needs an "
                             f"indexer (index_top_k > 0) and is 'sparse' or 'dense'")
        if self.index_top_k and attn_mask is not None:
            raise ValueError("MultiHeadLatentAttention: attn_mask is refused with an indexer "
                             "(index_top_k > 0); give segment_ids for packing")
        if self.decode:
            if index_loss is not None:
                raise ValueError("MultiHeadLatentAttention: index_loss is a training loss; "
                                 "decode=True refuses it")
            return self._decode(x, lengths)
        seg, pos = core.check_packing("MultiHeadLatentAttention", x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        n = self.num_heads
        _, kvl, nope, rope, vd = self.dims()

        q, q_latent = self._query(x)
        q_BTNH = q.reshape(b, t, n, nope + rope)
        c_BSL, k_rope_BSR = jnp.split(self.kv_down(x), [kvl], axis=-1)
        kv = self.kv_up(core.rms_norm(c_BSL, self.kv_norm, self.norm_eps)).reshape(
            b, t, n, nope + vd)
        k_nope_BSNH, v_BSNV = jnp.split(kv, [nope], axis=-1)

        cos, sin = self._rope_tables(core.rope_positions(pos, t), q_BTNH.dtype)
        q_BTNH = jnp.concatenate(
            [q_BTNH[..., :nope], self._rope(q_BTNH[..., nope:], cos, sin)], axis=-1)
        k_rope_BS1R = self._rope(k_rope_BSR[:, :, None, :], cos, sin)
        k_BSNH = jnp.concatenate(
            [k_nope_BSNH, jnp.broadcast_to(k_rope_BS1R, (b, t, n, rope))], axis=-1)
        if self.index_top_k:
            index_qkw = self._index(x, q_latent, core.rope_positions(pos, t))
            out = registry.call("MultiHeadLatentAttention", "dsa", self.index_impl, q_BTNH,
                                k_BSNH, v_BSNV, *index_qkw, top_k=self.index_top_k, causal=True,
                                scale=self.softmax_scale(), q_seg_BT=seg, k_seg_BS=seg,
                                index_loss=index_loss, precision=self.precision)
            out, loss = out if index_loss is not None else (out, None)
            out = self.proj(out.reshape(b, t, n * vd))
            return out if loss is None else (out, loss)
        out = core.sdpa(q_BTNH, k_BSNH, v_BSNV, attn_mask=attn_mask, causal=self.causal,
                        owner="MultiHeadLatentAttention", impl=self.impl,
                        scale=self.softmax_scale(), precision=self.precision, q_seg_BT=seg,
                        k_seg_BS=seg)
        return self.proj(out.reshape(b, t, n * vd))

    def _decode(self, x: Array, lengths: Array | None) -> Array:
        """One decode call (see the class docstring): append the chunk's latent and rotated rope
        key, attend over the cache in the absorbed or the expanded form."""
        step = cache.begin(self, "MultiHeadLatentAttention", x, lengths, sized_by="latent")
        b, t, _ = step.x.shape
        n = self.num_heads
        _, kvl, nope, rope, vd = self.dims()
        q, q_latent = self._query(step.x)
        q_BTNH = q.reshape(b, t, n, nope + rope)
        c_BTL, k_rope_BTR = jnp.split(self.kv_down(step.x), [kvl], axis=-1)
        cos, sin = self._rope_tables(step.pos_BT, q_BTNH.dtype)
        q_nope_BTNH = q_BTNH[..., :nope]
        q_rope_BTNR = self._rope(q_BTNH[..., nope:], cos, sin)
        latent_BSL = step.append("latent", core.rms_norm(c_BTL, self.kv_norm, self.norm_eps))
        k_rope_BSR = step.append("rope_key",
                                 self._rope(k_rope_BTR[:, :, None, :], cos, sin)[:, :, 0])
        keep_BTS = step.keep()
        if self.index_top_k:
            qi_BTIE, ki_BTE, w_BTI = self._index(step.x, q_latent, step.pos_BT)
            ki_BSE = step.append("index_key", ki_BTE)
            if not step.initializing:
                ki_BSE = jax.lax.optimization_barrier(ki_BSE)
            scores_BTS = core.masked_lightning_scores(qi_BTIE, ki_BSE, w_BTI, keep_BTS,
                                                      self.precision)
            keep_BTS = core.topk_keep(scores_BTS, keep_BTS, self.index_top_k)
        if not step.initializing:
            # the attention reads the written cache as it is (XLA would otherwise fuse a second
            # copy of the write into each matmul's operand and copy the whole cache for it)
            latent_BSL, k_rope_BSR = jax.lax.optimization_barrier((latent_BSL, k_rope_BSR))
        if self.absorb:
            if self.is_initializing():
                self.kv_up(latent_BSL[:, :1])  # creates kv_up's parameters, which are read below
            w_uk_LNH, w_uv_LNV, b_uv_NV = self._kv_up_weights(q_nope_BTNH)
            out_BTNV = absorbed_attention(q_nope_BTNH, q_rope_BTNR, latent_BSL, k_rope_BSR, w_uk_LNH,
                                          w_uv_LNV, b_uv_NV, keep_BTS, scale=self.softmax_scale(),
                                          precision=self.precision)
        else:
            s = latent_BSL.shape[1]
            kv = self.kv_up(latent_BSL).reshape(b, s, n, nope + vd)
            k_nope_BSNH, v_BSNV = jnp.split(kv, [nope], axis=-1)
            k_rope_BSNR = jnp.broadcast_to(k_rope_BSR[:, :, None, :], (b, s, n, rope))
            k_BSNH = jnp.concatenate([k_nope_BSNH, k_rope_BSNR.astype(k_nope_BSNH.dtype)], axis=-1)
            q_BTNH = jnp.concatenate([q_nope_BTNH, q_rope_BTNR], axis=-1)
            out_BTNV = core.dot_product_attention(q_BTNH, k_BSNH, v_BSNV, keep=keep_BTS[:, None],
                                                  scale=self.softmax_scale(),
                                                  precision=self.precision)
        return step.finish(self.proj(out_BTNV.reshape(b, t, n * vd)))

    def _kv_up_weights(self, like: Array) -> tuple[Array, Array, Array | None]:
        """``kv_up``'s kernel split per head into the key part (L, N, nope) and the value part
        (L, N, V), and its value bias (N, V) or None, promoted with ``like`` to the compute dtype
        as ``core.Linear`` promotes them."""
        _, kvl, nope, _, vd = self.dims()
        params = meta.unbox(self.kv_up.variables["params"])
        _, kernel, bias = dtypes.promote_dtype(like, params["kernel"], params.get("bias"),
                                               dtype=self.dtype)
        w_LNH = kernel.reshape(kvl, self.num_heads, nope + vd)
        b_uv_NV = None if bias is None else bias.reshape(self.num_heads, nope + vd)[:, nope:]
        return w_LNH[..., :nope], w_LNH[..., nope:], b_uv_NV

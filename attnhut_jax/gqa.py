"""Grouped-query attention (Ainslie et al., 2023), with the options of current open models."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cache, core, registry
from .core import Array, Dtype

_BLOCK_K = 64  # key block of the block-sparse seam a sliding window runs on


class GroupedQueryAttention(cache.ReadsEveryToken, nn.Module):
    """Query heads share key/value heads in contiguous groups of ``num_heads // num_kv_heads``.

    ``num_kv_heads == num_heads`` is MHA, ``num_kv_heads == 1`` is MQA. Args mirror
    ``attnhut.GroupedQueryAttention``: ``dim``, ``num_heads``, ``num_kv_heads``, ``causal``,
    ``dropout``, ``bias``. Parameters: ``q``, ``k``, ``v``, ``proj``.

    ``impl`` (``auto`` | ``xla`` | ``cudnn``; no variable depends on it) picks the registry's
    ``dense`` op, ``core.cudnn_unsupported`` says when cuDNN can run; ``precision`` reaches every
    matmul (Flax's convention).

    The options of d9d's and modern_llm's attention (and of Llama, Qwen3, gpt-oss; the defaults
    are attnhut's layer):

    * ``head_dim``: head width H apart from ``dim // num_heads`` (q is ``num_heads * H`` wide).
    * ``qk_norm``: RMSNorm over each head's q and k before RoPE (``q_norm`` / ``k_norm``, (H,)),
      eps ``qk_norm_eps``; ``qk_norm_zero_centered``: the scale is ``1 + weight``, weight
      initialised to zeros.
    * ``output_gate``: the heads' output times ``sigmoid(gate(x))`` before ``proj`` (Qwen3-Next /
      Qwen3.5; parameter ``gate``).
    * ``rope_theta``: RoPE with this base on q and k (None: no RoPE, attnhut's layer);
      ``rope_dim``: rotate the leading ``rope_dim`` channels only (default H); ``rope_style``
      ``"half"`` | ``"interleaved"``; ``rope_scaling``: a ``core.RopeScaling`` (linear, dynamic
      NTK, YaRN with its attention factor, Llama 3). Positions: ``positions`` or 0..T-1.
    * ``window``: sliding window. Causal: W (an int) keys, the query's own and the W - 1 before
      it (Hugging Face's ``sliding_window``), or ``(W, 0)``; bidirectional: ``(left, right)``,
      ``left`` keys up to and including the query, ``right`` after it. The default path runs on
      the block-sparse seam (``core.block_sparse_attention``, O(T x window), no (T, T) array);
      ``impl="cudnn"`` uses cuDNN's local window where cuDNN can run the call.
    * ``num_sink_logits``: 0 or ``num_heads``: a learnable logit per head (``sinks``, (N,))
      that joins every softmax denominator and reads no value (gpt-oss, d9d).
    * ``num_sink_tokens``: learnable tokens (``sink_tokens``, (P, dim)) projected by ``k`` and
      ``v`` (no RoPE: they have no position) and prepended to the keys; every query reads them,
      whatever the causal rule and the window (modern_llm).

    ``decode=True`` (causal only): incremental decoding with a cache of K (after norm and RoPE)
    and V per kv head, as ``StandardAttention`` (``attnhut_jax.cache``); the window masks the
    cache, sinks join each step's softmax.
    """

    dim: int
    num_heads: int
    num_kv_heads: int
    causal: bool = False
    dropout: float = 0.0
    bias: bool = False
    impl: registry.DenseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False
    head_dim: int | None = None
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    qk_norm_zero_centered: bool = False
    output_gate: bool = False
    rope_theta: float | None = None
    rope_dim: int | None = None
    rope_style: core.RopeStyle = "half"
    rope_scaling: core.RopeScaling | None = None
    window: int | tuple[int, int] | None = None
    num_sink_logits: int = 0
    num_sink_tokens: int = 0

    @property
    def width(self) -> int:
        """H: ``head_dim``, or ``dim // num_heads`` when it is None."""
        return self.dim // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def window_extent(self) -> tuple[int, int] | None:
        """``window`` as (left, right) (see the class docstring), or None."""
        if self.window is None:
            return None
        if isinstance(self.window, int):
            return (self.window, 0)
        return tuple(self.window)

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every kv head."""
        return float(2 * self.num_kv_heads * self.width * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays: K and V of every kv head in ``dtype``, and the
        index."""
        return cache.dense_cache_bytes(batch, max_len, self.num_kv_heads, self.width,
                                       self.width, dtype)

    def _check_options(self, owner: str) -> None:
        h = self.width
        if self.rope_theta is None:
            for name in ("rope_dim", "rope_scaling"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{owner}: {name}={getattr(self, name)!r} needs RoPE: set "
                                     f"rope_theta (None means no RoPE)")
        else:
            if not self.rope_theta > 0:
                raise ValueError(f"{owner}: rope_theta={self.rope_theta} must be > 0")
            r = h if self.rope_dim is None else self.rope_dim
            if r < 2 or r % 2 or r > h:
                raise ValueError(f"{owner}: rope_dim={r} must be even, >= 2 and <= head_dim={h}")
        if self.rope_style not in core.ROPE_STYLES:
            raise ValueError(f"{owner}: rope_style={self.rope_style!r} is not one of "
                             f"{core.ROPE_STYLES}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, core.RopeScaling):
            raise TypeError(f"{owner}: rope_scaling must be a core.RopeScaling (build one from "
                            f"a Hugging Face dict with RopeScaling.from_hf), got "
                            f"{type(self.rope_scaling).__name__}")
        if self.qk_norm and not self.qk_norm_eps > 0:
            raise ValueError(f"{owner}: qk_norm_eps={self.qk_norm_eps} must be > 0")
        if self.num_sink_logits not in (0, self.num_heads):
            raise ValueError(f"{owner}: num_sink_logits={self.num_sink_logits} must be 0 or "
                             f"num_heads={self.num_heads} (one sink logit per query head)")
        if self.num_sink_tokens < 0:
            raise ValueError(f"{owner}: num_sink_tokens={self.num_sink_tokens} must be >= 0")
        w = self.window
        if w is None:
            return
        if self.causal:
            ok = (isinstance(w, int) and w >= 1) or (
                isinstance(w, tuple) and len(w) == 2 and all(isinstance(a, int) for a in w)
                and w[0] >= 1 and w[1] == 0)
            if not ok:
                raise ValueError(f"{owner}: window={w!r}: a causal module takes an int >= 1 "
                                 f"(keys up to and including the query) or (left >= 1, 0)")
        elif not (isinstance(w, tuple) and len(w) == 2 and all(isinstance(a, int) for a in w)
                  and w[0] >= 1 and w[1] >= 0):
            raise ValueError(f"{owner}: window={w!r}: a bidirectional module takes (left >= 1, "
                             f"right >= 0): left keys up to and including the query, right "
                             f"after it")

    def setup(self) -> None:
        owner = "GroupedQueryAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads,
                            num_kv_heads=self.num_kv_heads)
        registry.check(owner, "dense", self.impl)
        if self.head_dim is None:
            core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        else:
            core.check_positive(owner, head_dim=self.head_dim)
        core.check_divisible(owner, ("num_heads", self.num_heads),
                             ("num_kv_heads", self.num_kv_heads))
        cache.check_causal(owner, self.decode, self.causal)
        self._check_options(owner)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        h, pd = self.width, self.param_dtype
        kv_dim = self.num_kv_heads * h
        self.q = core.Linear(self.num_heads * h, axes=("embed", "heads"), **kw)
        self.k = core.Linear(kv_dim, axes=("embed", "kv_heads"), **kw)
        self.v = core.Linear(kv_dim, axes=("embed", "kv_heads"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)
        if self.qk_norm:
            init = nn.initializers.zeros_init() if self.qk_norm_zero_centered else (
                nn.initializers.ones_init())
            self.q_norm = core.param(self, "q_norm", init, (h,), ("head_dim",), pd)
            self.k_norm = core.param(self, "k_norm", init, (h,), ("head_dim",), pd)
        if self.output_gate:
            self.gate = core.Linear(self.num_heads * h, axes=("embed", "heads"), **kw)
        if self.num_sink_logits:
            self.sinks = core.param(self, "sinks", nn.initializers.zeros_init(),
                                    (self.num_heads,), ("heads",), pd)
        if self.num_sink_tokens:
            self.sink_tokens = core.param(self, "sink_tokens", nn.initializers.normal(0.02),
                                          (self.num_sink_tokens, self.dim), (None, "embed"), pd)

    # ------------------------------------------------------------------ pieces
    def _norm(self, a_BTNH: Array, weight: Array) -> Array:
        scale = weight + 1 if self.qk_norm_zero_centered else weight
        return core.rms_norm(a_BTNH, scale, self.qk_norm_eps)

    def _rope(self, a_BTNH: Array, pos: Array) -> Array:
        if self.rope_theta is None:
            return a_BTNH
        r = self.width if self.rope_dim is None else self.rope_dim
        cos, sin = core.rope_tables(pos, r, self.rope_theta, jnp.float32,
                                    scaling=self.rope_scaling, style=self.rope_style)
        out = core.apply_rope(a_BTNH.astype(jnp.promote_types(a_BTNH.dtype, jnp.float32)),
                              cos, sin, self.rope_style)
        return out.astype(a_BTNH.dtype)

    def _qkv(self, x: Array, pos: Array) -> tuple[Array, Array, Array]:
        """q (B, T, N, H), k (B, T, K, H), v (B, T, K, H): projected, normed, rotated."""
        b, t, _ = x.shape
        h = self.width
        q = self.q(x).reshape(b, t, self.num_heads, h)
        k = self.k(x).reshape(b, t, self.num_kv_heads, h)
        v = self.v(x).reshape(b, t, self.num_kv_heads, h)
        if self.qk_norm:
            q, k = self._norm(q, self.q_norm), self._norm(k, self.k_norm)
        return self._rope(q, pos), self._rope(k, pos), v

    def _sink_kv(self) -> tuple[Array, Array] | None:
        """The sink tokens' keys and values (P, K, H) (normed, not rotated), or None."""
        if not self.num_sink_tokens:
            return None
        p, h = self.num_sink_tokens, self.width
        tokens = self.sink_tokens[None]
        if self.dtype is not None:
            tokens = tokens.astype(self.dtype)
        sk = self.k(tokens).reshape(p, self.num_kv_heads, h)
        sv = self.v(tokens).reshape(p, self.num_kv_heads, h)
        if self.qk_norm:
            sk = self._norm(sk, self.k_norm)
        return sk, sv

    def _sinks(self) -> Array | None:
        return self.sinks if self.num_sink_logits else None

    def _finish(self, x: Array, out_BTNH: Array) -> Array:
        b, t = out_BTNH.shape[:2]
        out = out_BTNH.reshape(b, t, -1)
        if self.output_gate:
            out = out * jax.nn.sigmoid(self.gate(x)).astype(out.dtype)
        return self.proj(out)

    # ------------------------------------------------------------------ call
    def __call__(self, x: Array, attn_mask: Array | None = None, deterministic: bool = True, *,
                 segment_ids: Array | None = None, positions: Array | None = None,
                 lengths: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D). ``attn_mask``: boolean or additive, broadcastable to (B, N, T, T).

        ``segment_ids`` / ``positions``: packed sequences, as ``StandardAttention`` takes them
        (segments AND with the causal rule and with ``attn_mask``; ``positions`` feed RoPE, and
        are otherwise validated and unused).

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``attn_mask``, ``segment_ids`` and ``positions`` are
        refused, and dropout is off.
        """
        owner = "GroupedQueryAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, attn_mask=attn_mask,
                            segment_ids=segment_ids, positions=positions)
        if self.decode:
            step = cache.begin(self, owner, x, lengths, sized_by="key", axis=2)
            q, k, v = self._qkv(step.x, step.pos_BT)
            window = self.window_extent
            out = cache.attend_cache(step, q, k, v, precision=self.precision,
                                     window=None if window is None else window[0],
                                     sink=self._sinks(), prefix=self._sink_kv())
            return step.finish(self._finish(step.x, out))
        seg, pos = core.check_packing(owner, x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        q, k, v = self._qkv(x, core.rope_positions(pos, t))
        rate, rng = core.attention_dropout(self, self.dropout, deterministic)
        extra = (attn_mask is not None, self.window is not None, self.num_sink_tokens > 0)
        if extra[0] and any(extra[1:]):
            raise ValueError(f"{owner}: attn_mask cannot be combined with window={self.window} "
                             f"or num_sink_tokens={self.num_sink_tokens} (the mask replaces the "
                             f"causal rule; give segment_ids for packing)")
        if self.window is not None:
            out = self._windowed(q, k, v, seg, rate, owner)
        elif self.num_sink_tokens:
            out = self._with_sink_tokens(q, k, v, seg, rate, rng, owner)
        else:
            out = core.sdpa(q, k, v, attn_mask=attn_mask, causal=self.causal, owner=owner,
                            dropout_rate=rate, dropout_rng=rng, impl=self.impl,
                            precision=self.precision, q_seg_BT=seg, k_seg_BS=seg,
                            sink=self._sinks())
        return self._finish(x, out)

    def _prepend_sinks(self, k: Array, v: Array) -> tuple[Array, Array]:
        sk, sv = self._sink_kv()
        b = k.shape[0]
        k = jnp.concatenate([jnp.broadcast_to(sk, (b, *sk.shape)).astype(k.dtype), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(sv, (b, *sv.shape)).astype(v.dtype), v], axis=1)
        return k, v

    def _with_sink_tokens(self, q, k, v, seg, rate, rng, owner):
        """Dense attention over [sink tokens; keys]: every (non-padding) query reads the sinks."""
        b, t = q.shape[:2]
        p = self.num_sink_tokens
        k, v = self._prepend_sinks(k, v)
        keep = jnp.ones((1, 1, t, t), bool)
        if self.causal:
            keep = keep & core.causal_mask(t, t)
        sinks_keep = jnp.ones((1, 1, t, p), bool)
        if seg is not None:
            keep = keep & core.segment_keep(seg, seg)
            sinks_keep = sinks_keep & (seg != 0)[:, None, :, None]
        lead = jnp.broadcast_shapes(sinks_keep.shape[:2], keep.shape[:2])
        keep = jnp.concatenate([jnp.broadcast_to(sinks_keep, (*lead, t, p)),
                                jnp.broadcast_to(keep, (*lead, t, t))], axis=-1)
        return core.sdpa(q, k, v, attn_mask=keep, causal=False, owner=owner, dropout_rate=rate,
                         dropout_rng=rng, impl=self.impl, precision=self.precision,
                         sink=self._sinks())

    def _windowed(self, q, k, v, seg, rate, owner):
        """The sliding window: cuDNN's local window under ``impl="cudnn"``, else the block-sparse
        op (a causal window of ``left + right`` keys over query positions shifted by ``right``;
        sink tokens are the first keys, exempt from the window)."""
        if rate > 0.0:
            raise ValueError(f"{owner}: attention dropout (rate {self.dropout}) is not available "
                             f"with a sliding window; pass deterministic=True or dropout=0")
        left, right = self.window_extent
        b, t = q.shape[:2]
        op, impl = registry.window_route(self.impl)
        if op == "dense":
            if self.num_sink_tokens:
                raise ValueError(f"{owner}: impl='cudnn' cannot combine a window with sink "
                                 f"tokens (cuDNN's local window would hide them); use "
                                 f"impl='auto'")
            return core.sdpa(q, k, v, attn_mask=None, causal=self.causal, owner=owner,
                             impl=impl, precision=self.precision, q_seg_BT=seg, k_seg_BS=seg,
                             sink=self._sinks(), window=(left, right))
        p = self.num_sink_tokens
        if p and seg is not None:
            raise ValueError(f"{owner}: sink tokens with a window and segment_ids is not "
                             f"supported (the block-sparse op's segment rule would hide the "
                             f"sinks from every segment); drop the window or the packing")
        if p:
            k, v = self._prepend_sinks(k, v)
        q_pos = jnp.arange(t) + right
        k_pos = jnp.concatenate([jnp.zeros((p,), jnp.int32), jnp.arange(t, dtype=jnp.int32)])
        keep_TJ = core.window_block_keep(q_pos, k_pos, _BLOCK_K, window=left + right,
                                         num_sink_keys=p)
        keep_BKTJ = jnp.broadcast_to(keep_TJ, (b, self.num_kv_heads, *keep_TJ.shape))
        seg_kw = {} if seg is None else {"q_seg_BT": seg, "k_seg_BS": seg}
        return core.block_sparse_attention(
            q, k, v, keep_BKTJ, block_k=_BLOCK_K, causal=True,
            impl=impl, sink=self._sinks(), q_pos_T=q_pos,
            k_pos_S=k_pos, window=left + right, num_sink_keys=p, precision=self.precision,
            owner=owner, **seg_kw)

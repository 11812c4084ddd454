"""The options of current open models' softmax attention (d9d, modern_llm, Llama, Qwen3,
gpt-oss), shared by ``StandardAttention``, ``MultiQueryAttention`` and
``GroupedQueryAttention``: ``head_dim``, QK RMSNorm, the sigmoid output gate, RoPE (partial,
half or interleaved, scaled), the sliding window, sink logits and sink tokens.

``DenseOptions`` is a base module holding the option fields, keyword-only (so a module's own
positional fields, attnhut's order, come first); a module that derives from it gives
``kv_heads`` and ``_kv_of(tokens)`` (its key and value projection of the sink tokens). It
validates the options, creates their parameters and runs the attention each combination needs
(the dense op, the block-sparse op for a window, cuDNN's local window, the decode cache).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cache, core, registry
from .core import Array

_BLOCK_K = 64  # key block of the block-sparse seam a sliding window runs on


def _option(default):
    return dataclasses.field(default=default, kw_only=True)


class DenseOptions(nn.Module):
    """The option fields (keyword-only; the defaults are attnhut's layers) and their behaviour.
    See ``GroupedQueryAttention``'s docstring for what each does."""

    head_dim: int | None = _option(None)
    qk_norm: bool = _option(False)
    qk_norm_eps: float = _option(1e-6)
    qk_norm_zero_centered: bool = _option(False)
    output_gate: bool = _option(False)
    rope_theta: float | None = _option(None)
    rope_dim: int | None = _option(None)
    rope_style: core.RopeStyle = _option("half")
    rope_scaling: core.RopeScaling | None = _option(None)
    window: int | tuple[int, int] | None = _option(None)
    num_sink_logits: int = _option(0)
    num_sink_tokens: int = _option(0)

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

    def _check_options(self, owner: str) -> None:
        h = self.width
        if self.rope_theta is None:
            if self.rope_style != "half":
                raise ValueError(f"{owner}: rope_style={self.rope_style!r} needs RoPE: set "
                                 f"rope_theta (None means no RoPE)")
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
        core.check_rope_options(owner, self.rope_style, self.rope_scaling)
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
        if isinstance(w, bool) or (isinstance(w, tuple) and any(isinstance(a, bool) for a in w)):
            raise ValueError(f"{owner}: window={w!r} must be an int or a tuple of ints, not bool")
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

    def _setup_options(self, kw: dict) -> None:
        """Validate the options and create their parameters (call in ``setup``)."""
        owner = type(self).__name__
        if self.head_dim is not None:
            core.check_positive(owner, head_dim=self.head_dim)
        self._check_options(owner)
        h, pd = self.width, self.param_dtype
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
        scale = weight.astype(jnp.float32) + 1 if self.qk_norm_zero_centered else weight
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

    def _sink_kv(self) -> tuple[Array, Array] | None:
        """The sink tokens' keys and values (P, K, H) (normed, not rotated), or None."""
        if not self.num_sink_tokens:
            return None
        tokens = self.sink_tokens[None]
        if self.dtype is not None:
            tokens = tokens.astype(self.dtype)
        sk, sv = self._kv_of(tokens)  # (1, P, K, H) each
        sk, sv = sk[0], sv[0]
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

    def _prepare(self, q: Array, k: Array, pos: Array) -> tuple[Array, Array]:
        """q (B, T, N, H) and k (B, T, K, H) normed and rotated at positions ``pos``."""
        if self.qk_norm:
            q, k = self._norm(q, self.q_norm), self._norm(k, self.k_norm)
        return self._rope(q, pos), self._rope(k, pos)

    def _attend_decode(self, step: cache.Step, q: Array, k: Array, v: Array) -> Array:
        """A decode step's attention with the options (the cache masked to the window, sinks
        and sink tokens in its softmax)."""
        # slots the chunk does not append (past a row's length) take position 0: the dynamic
        # NTK length is then the largest position written
        q, k = self._prepare(q, k, jnp.where(step.ok_BT, step.pos_BT, 0))
        window = self.window_extent
        return cache.attend_cache(step, q, k, v, precision=self.precision,
                                  window=None if window is None else window[0],
                                  sink=self._sinks(), prefix=self._sink_kv())

    def _attend(self, q: Array, k: Array, v: Array, seg: Array | None, pos: Array | None,
                attn_mask: Array | None, deterministic: bool, owner: str) -> Array:
        """The attention of a full call with the options: (B, T, N, H) out."""
        t = q.shape[1]
        q, k = self._prepare(q, k, core.rope_positions(pos, t))
        rate, rng = core.attention_dropout(self, self.dropout, deterministic)
        if attn_mask is not None and (self.window is not None or self.num_sink_tokens):
            raise ValueError(f"{owner}: attn_mask cannot be combined with window={self.window} "
                             f"or num_sink_tokens={self.num_sink_tokens} (the mask replaces the "
                             f"causal rule; give segment_ids for packing)")
        if self.window is not None:
            return self._windowed(q, k, v, seg, rate, owner)
        if self.num_sink_tokens:
            return self._with_sink_tokens(q, k, v, seg, rate, rng, owner)
        return core.sdpa(q, k, v, attn_mask=attn_mask, causal=self.causal, owner=owner,
                         dropout_rate=rate, dropout_rng=rng, impl=self.impl,
                         precision=self.precision, q_seg_BT=seg, k_seg_BS=seg,
                         sink=self._sinks())

    def _prepend_sinks(self, k: Array, v: Array) -> tuple[Array, Array]:
        sk, sv = self._sink_kv()
        b = k.shape[0]
        k = jnp.concatenate([jnp.broadcast_to(sk, (b, *sk.shape)).astype(k.dtype), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(sv, (b, *sv.shape)).astype(v.dtype), v], axis=1)
        return k, v

    def _with_sink_tokens(self, q, k, v, seg, rate, rng, owner):
        """Dense attention over [sink tokens; keys]: every (non-padding) query reads the sinks
        (and, with a window, the keys within it)."""
        b, t = q.shape[:2]
        p = self.num_sink_tokens
        k, v = self._prepend_sinks(k, v)
        keep = jnp.ones((1, 1, t, t), bool)
        if self.causal:
            keep = keep & core.causal_mask(t, t)
        if self.window is not None:
            keep = keep & core.window_keep(jnp.arange(t), jnp.arange(t), self.window_extent)
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
            # keys every segment reads are beyond the block-sparse op's segment rule (a key
            # reads for its own segment only): this one combination runs dense, (T, P + T)
            return self._with_sink_tokens(q, k, v, seg, rate, None, owner)
        if p:
            k, v = self._prepend_sinks(k, v)
        q_pos = jnp.arange(t) + right
        k_pos = jnp.concatenate([jnp.zeros((p,), jnp.int32), jnp.arange(t, dtype=jnp.int32)])
        keep_TJ = core.window_block_keep(q_pos, k_pos, _BLOCK_K, window=left + right,
                                         num_sink_keys=p)
        keep_BKTJ = jnp.broadcast_to(keep_TJ, (b, self.kv_heads, *keep_TJ.shape))
        seg_kw = {} if seg is None else {"q_seg_BT": seg, "k_seg_BS": seg}
        return core.block_sparse_attention(
            q, k, v, keep_BKTJ, block_k=_BLOCK_K, causal=True,
            impl=impl, sink=self._sinks(), q_pos_T=q_pos,
            k_pos_S=k_pos, window=left + right, num_sink_keys=p, precision=self.precision,
            owner=owner, **seg_kw)

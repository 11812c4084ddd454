"""Multi-head Latent Attention (DeepSeek-V2/V3), the readable non-absorbed form.

Keys and values are cached as one low-rank latent per token (plus a small RoPE key shared by all
heads) instead of full per-head K and V.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from . import core, registry
from .core import Array, Dtype


class MultiHeadLatentAttention(nn.Module):
    """MLA with a decoupled RoPE key head.

    Args mirror ``attnhut.MultiHeadLatentAttention``: ``dim``, ``num_heads``, ``q_lora_rank``
    (default dim // 2), ``kv_lora_rank`` (dim // 4), ``qk_nope_head_dim`` (head_dim // 2),
    ``qk_rope_head_dim`` (head_dim // 2, even), ``v_head_dim`` (head_dim), ``causal`` (True),
    ``rope_theta``, ``bias``; ``head_dim = dim // num_heads``. As in attnhut, a falsy rank
    (None or 0) selects the default. Parameters: ``q_down``, ``q_norm``, ``q_up``, ``kv_down``,
    ``kv_norm``, ``kv_up``, ``proj``.

    ``impl`` (``auto`` | ``xla`` | ``cudnn``; no variable depends on it) picks the registry's
    ``dense`` op, ``core.cudnn_unsupported`` says when cuDNN can run; ``precision`` reaches every
    matmul (Flax's convention).
    With the defaults V == H (= head_dim); ``cudnn`` needs ``v_head_dim == qk_nope_head_dim +
    qk_rope_head_dim``.
    """

    dim: int
    num_heads: int
    q_lora_rank: int | None = None
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

    def dims(self) -> tuple[int, int, int, int, int]:
        """Resolved (q_lora_rank, kv_lora_rank, nope, rope, v_head_dim), attnhut's defaults applied."""
        head_dim = self.dim // self.num_heads if self.num_heads > 0 else 0
        return (self.q_lora_rank or self.dim // 2, self.kv_lora_rank or self.dim // 4,
                self.qk_nope_head_dim or head_dim // 2, self.qk_rope_head_dim or head_dim // 2,
                self.v_head_dim or head_dim)

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: the latent (``kv_lora_rank``) and the rope
        key shared by all heads."""
        _, kv_lora_rank, _, rope_dim, _ = self.dims()
        return float((kv_lora_rank + rope_dim) * jnp.dtype(dtype).itemsize)

    def setup(self) -> None:
        owner = "MultiHeadLatentAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads)
        registry.check(owner, "dense", self.impl)
        ql, kvl, nope, rope, vd = self.dims()
        core.check_positive(owner, q_lora_rank=ql, kv_lora_rank=kvl, qk_nope_head_dim=nope,
                            qk_rope_head_dim=rope, v_head_dim=vd)
        if rope % 2 != 0:
            raise ValueError(f"{owner}: qk_rope_head_dim={rope} must be even")
        n = self.num_heads
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.q_down = core.Linear(ql, axes=("embed", "latent"), **kw)
        self.q_up = core.Linear(n * (nope + rope), axes=("latent", "heads"), **kw)
        self.kv_down = core.Linear(kvl + rope, axes=("embed", "latent"), **kw)
        self.kv_up = core.Linear(n * (nope + vd), axes=("latent", "heads"), **kw)
        self.q_norm = core.ones_param(self, "q_norm", ql, "latent", self.param_dtype)
        self.kv_norm = core.ones_param(self, "kv_norm", kvl, "latent", self.param_dtype)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, attn_mask: Array | None = None, *,
                 segment_ids: Array | None = None, positions: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D). ``attn_mask``: boolean or additive, broadcastable to (B, N, T, T).

        ``segment_ids`` (B, T) int: packed sequences, as ``StandardAttention`` takes them
        (segments AND with the causal rule and with ``attn_mask``). ``positions`` (B, T) int: the
        positions the decoupled RoPE query and key heads rotate by (default ``arange(T)``), one
        table per row. Positions restarting at 0 in each segment make a packed row compute what
        its segments compute alone; as RoPE scores depend only on position differences and no
        score crosses a segment, any per-segment offset gives the same up to float rounding.
        """
        core.check_input(x, self.dim, "MultiHeadLatentAttention")
        seg, pos = core.check_packing("MultiHeadLatentAttention", x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        b, t, _ = x.shape
        n = self.num_heads
        _, kvl, nope, rope, vd = self.dims()

        q = self.q_up(core.rms_norm(self.q_down(x), self.q_norm))
        q_BTNH = q.reshape(b, t, n, nope + rope)
        c_BSL, k_rope_BSR = jnp.split(self.kv_down(x), [kvl], axis=-1)
        kv = self.kv_up(core.rms_norm(c_BSL, self.kv_norm)).reshape(b, t, n, nope + vd)
        k_nope_BSNH, v_BSNV = jnp.split(kv, [nope], axis=-1)

        cos, sin = core.rope_tables(core.rope_positions(pos, t), rope, self.rope_theta,
                                    q_BTNH.dtype)
        q_BTNH = jnp.concatenate(
            [q_BTNH[..., :nope], core.apply_rope(q_BTNH[..., nope:], cos, sin)], axis=-1)
        k_rope_BS1R = core.apply_rope(k_rope_BSR[:, :, None, :], cos, sin)
        k_BSNH = jnp.concatenate(
            [k_nope_BSNH, jnp.broadcast_to(k_rope_BS1R, (b, t, n, rope))], axis=-1)
        out = core.sdpa(q_BTNH, k_BSNH, v_BSNV, attn_mask=attn_mask, causal=self.causal,
                        owner="MultiHeadLatentAttention", impl=self.impl,
                        precision=self.precision, q_seg_BT=seg, k_seg_BS=seg)
        return self.proj(out.reshape(b, t, n * vd))

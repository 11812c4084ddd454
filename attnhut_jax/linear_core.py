"""Shared pieces of the linear-attention modules (``GatedDeltaNet``, ``KimiDeltaAttention``,
``LinearAttention``): the short causal depthwise convolution that does not reach across
segments, with its decode tail; the L2 norms and gated RMSNorms of the Hugging Face layers; the
softplus of torch; the decode step through the recurrent state.

Packed sequences follow the ``gated_delta`` op's rule (``pallas_kernels/gated_delta/reference.py``):
id 0 is padding, skipped (the state passes it unchanged); a segment is a run of tokens of one
nonzero id, padding between them ignored, and a new id starts a new segment. The short
convolution reads the same tokens: tap ``j`` of token t reads the ``K - 1 - j``-th valid token
before t when it lies in t's segment, else zero (as at the start of a sequence). A packed row so
equals each segment run alone, padding anywhere.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes

from pallas_kernels.gated_delta import reference as gd_reference

from . import cache, core
from .core import Array, Dtype, Precision

F32 = jnp.float32


def at_least_f32(x: Array) -> Array:
    """``x`` in float32, or in its own dtype when wider (float64 under ``jax_enable_x64``)."""
    return x.astype(jnp.promote_types(x.dtype, F32))


# ----------------------------------------------------------------------------- elementwise


def softplus(x: Array) -> Array:
    """``torch.nn.functional.softplus`` (beta 1, threshold 20): ``x`` above 20, else
    ``log(1 + exp(x))`` (Kimi's forget gate writes the same)."""
    safe = jnp.minimum(x, 20.0)
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(safe)))


def l2norm(x: Array, eps: float = 1e-6, *, divide: bool = False) -> Array:
    """L2 norm over the last axis in float32, as the HF layers: ``x * rsqrt(sum x^2 + eps)``
    (Qwen3.5's ``l2norm``) or, ``divide=True``, ``x / sqrt(sum x^2 + eps)`` (Kimi Linear's)."""
    x = at_least_f32(x)
    ss = jnp.sum(x * x, axis=-1, keepdims=True) + eps
    return x / jnp.sqrt(ss) if divide else x * jax.lax.rsqrt(ss)


def gated_rms_norm(x: Array, weight: Array, gate: Array, eps: float, *, kind: str) -> Array:
    """RMSNorm over the last axis of ``x``, then times an activation of ``gate``, returned in
    ``x``'s dtype.

    ``kind="silu"`` is ``Qwen3_5RMSNormGated``: normalise in float32, back to ``x``'s dtype,
    times ``weight`` (promoting), times ``silu(gate)`` in float32. ``kind="sigmoid"`` is
    ``KimiLinearRMSNormGated``: all in float32 (``weight`` upcast), times ``sigmoid(gate)``.
    """
    in_dtype = x.dtype
    x32 = at_least_f32(x)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if kind == "silu":
        y = weight * y.astype(in_dtype)
        y = y * jax.nn.silu(at_least_f32(gate))
    elif kind == "sigmoid":
        y = at_least_f32(weight) * y * jax.nn.sigmoid(at_least_f32(gate))
    else:
        raise ValueError(f"gated_rms_norm: kind={kind!r}; allowed: 'silu', 'sigmoid'")
    return y.astype(in_dtype)


class GatedNorm(nn.Module):
    """``gated_rms_norm`` as a module: parameter ``weight`` (width,) (ones, logical axis
    ``head_dim``), called as ``norm(x, gate)``."""

    width: int
    eps: float
    kind: str
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, gate: Array) -> Array:
        weight = core.ones_param(self, "weight", self.width, "head_dim", self.param_dtype)
        return gated_rms_norm(x, weight, gate, self.eps, kind=self.kind)


# ----------------------------------------------------------------------------- segments


def segment_runs(segment_ids_BT: Array | None, b: int, t: int) -> tuple[Array, Array]:
    """(valid (B, T) bool, run (B, T) int32): ``valid`` is id != 0; ``run`` numbers the segments
    of a row in order (the op's rule: a valid token whose id differs from the previous valid
    token's starts the next one); padding carries the run of the last segment before it."""
    valid, reset = gd_reference.segment_flags(segment_ids_BT, b, t)
    return valid, jnp.cumsum(reset.astype(jnp.int32), axis=1)


# ----------------------------------------------------------------------------- short conv


def _tap_masks(run_BT: Array | None, k: int) -> list[Array | None]:
    """Per tap j, (B, T) bool: tap j of token t reads a token of t's run (None: every tap)."""
    if run_BT is None:
        return [None] * k
    t = run_BT.shape[1]
    rp_BT = jnp.pad(run_BT, ((0, 0), (k - 1, 0)), constant_values=-1)
    return [None if j == k - 1 else rp_BT[:, j:j + t] == run_BT for j in range(k)]


def _masked(a_BTC: Array, m_BT: Array | None) -> Array:
    return a_BTC if m_BT is None else jnp.where(m_BT[..., None], a_BTC, jnp.zeros((), a_BTC.dtype))


@jax.custom_vjp
def _causal_conv(x_BTC: Array, kernel_KC: Array, run_BT: Array | None) -> Array:
    k, t = kernel_KC.shape[0], x_BTC.shape[1]
    xp_BTC = jnp.pad(x_BTC, ((0, 0), (k - 1, 0), (0, 0)))
    y = None
    for j, m_BT in enumerate(_tap_masks(run_BT, k)):
        term = _masked(xp_BTC[:, j:j + t], m_BT) * kernel_KC[j]
        y = term if y is None else y + term
    return y


def _causal_conv_fwd(x_BTC, kernel_KC, run_BT):
    return _causal_conv(x_BTC, kernel_KC, run_BT), (x_BTC, kernel_KC, run_BT)


def _causal_conv_bwd(res, dy_BTC):
    """The transposed convolution, of the cotangent: x[u] feeds y[u + s] through tap
    j = K - 1 - s, so dx[u] = sum_j kernel[j] dy[u + s] (one fused sum of shifted slices) and
    dkernel[j] = sum_u x[u] dy[u + s] (masked alike), one tap at a time (``lax.map``): a shifted
    slice read by both would be materialised, K (B, T, C) arrays at once (autodiff's transpose
    holds K padded ones)."""
    x_BTC, kernel_KC, run_BT = res
    k, t = kernel_KC.shape[0], x_BTC.shape[1]
    dyp_BTC = jnp.pad(dy_BTC, ((0, 0), (0, k - 1), (0, 0)))
    masks = [None if m_BT is None else jnp.pad(m_BT, ((0, 0), (0, k - 1)))[:, k - 1 - j:][:, :t]
             for j, m_BT in enumerate(_tap_masks(run_BT, k))]  # tap j's mask at u + s
    dx = sum(_masked(dyp_BTC[:, k - 1 - j:k - 1 - j + t], m_BT) * kernel_KC[j]
             for j, m_BT in enumerate(masks))
    f32 = jnp.promote_types(dy_BTC.dtype, jnp.float32)
    mask_KBT = None if run_BT is None else jnp.stack(
        [jnp.ones_like(run_BT, bool) if m is None else m for m in masks])

    def tap(j):
        dy_s = jax.lax.dynamic_slice_in_dim(dyp_BTC, k - 1 - j, t, axis=1)
        dy_s = dy_s if mask_KBT is None else _masked(dy_s, mask_KBT[j])
        return jnp.sum((x_BTC * dy_s).astype(f32), axis=(0, 1))
    dk_KC = jax.lax.map(tap, jnp.arange(k))
    return dx.astype(x_BTC.dtype), dk_KC.astype(kernel_KC.dtype), None


_causal_conv.defvjp(_causal_conv_fwd, _causal_conv_bwd)


def causal_conv(x_BTC: Array, kernel_KC: Array, run_BT: Array | None = None) -> Array:
    """Depthwise causal convolution ``y[t] = sum_j kernel[j] * x[t - (K - 1) + j]`` (tap K - 1
    multiplies token t itself; positions before 0 read zero), as torch's ``Conv1d(groups=C,
    padding=K - 1)`` cut to T. With ``run_BT``, a tap reads only a token of t's run (same label).
    Its VJP is written out (``_causal_conv_bwd``), so the backward holds no per-tap copies."""
    return _causal_conv(x_BTC, kernel_KC, run_BT)


def segmented_conv(x_BTC: Array, kernel_KC: Array, valid_BT: Array, run_BT: Array) -> Array:
    """``causal_conv`` over the valid tokens only (padding removed, each row's valid tokens
    moved to its front in order, a stable sort), taps kept within a run; padding outputs zero."""
    order_BT = jnp.argsort(~valid_BT, axis=1, stable=True)
    take = jax.vmap(lambda a, i: a[i])
    xc_BTC = take(x_BTC, order_BT)
    rc_BT = jnp.where(take(valid_BT, order_BT), take(run_BT, order_BT), -1)
    yc_BTC = causal_conv(xc_BTC, kernel_KC, rc_BT)
    back_BT = jnp.argsort(order_BT, axis=1)
    y_BTC = take(yc_BTC, back_BT)
    return jnp.where(valid_BT[..., None], y_BTC, jnp.zeros((), y_BTC.dtype))


class ShortConv(nn.Module):
    """Causal depthwise convolution over ``channels`` with window ``conv_size`` and no bias, then
    SiLU: torch's ``Conv1d(C, C, K, groups=C, padding=K - 1, bias=False)`` as the HF layers use
    it. Parameter ``kernel`` (K, C) is torch's ``weight`` (C, 1, K) with the middle axis dropped,
    transposed (tap K - 1 multiplies the current token); torch's init, U(+-1/sqrt(K))."""

    channels: int
    conv_size: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Precision = None  # unused (no matrix product); kept for the shared keywords

    @nn.compact
    def __call__(self, x_BTC: Array, *, valid_BT: Array | None = None, run_BT: Array | None = None,
                 tail_BKC: Array | None = None) -> Array:
        """(B, T, C) -> (B, T, C). ``valid_BT`` / ``run_BT``: packed sequences
        (``segment_runs``); ``tail_BKC`` (B, K - 1, C): the conv inputs before the chunk (decode;
        one segment per row)."""
        kernel = core.param(self, "kernel", core.torch_linear_init(self.conv_size),
                            (self.conv_size, self.channels), (None, "qkv"), self.param_dtype)
        x_BTC, kernel = dtypes.promote_dtype(x_BTC, kernel, dtype=self.dtype)
        if tail_BKC is not None:
            k1 = self.conv_size - 1
            xx_BTC = jnp.concatenate([tail_BKC.astype(x_BTC.dtype), x_BTC], axis=1)
            return jax.nn.silu(causal_conv(xx_BTC, kernel)[:, k1:])
        return _conv_silu(x_BTC, kernel, valid_BT, run_BT)


@jax.checkpoint
def _conv_silu(x_BTC: Array, kernel_KC: Array, valid_BT: Array | None,
               run_BT: Array | None) -> Array:
    """SiLU of the (segmented) causal conv, rematerialised: the backward keeps only the conv's
    input and recomputes the rest, so a (B, T, C) pre-activation is not saved beside the
    projection that feeds it (C = 6144 for Qwen3.5-like sizes: 1.5 GiB at T = 65536)."""
    if valid_BT is not None:
        return jax.nn.silu(segmented_conv(x_BTC, kernel_KC, valid_BT, run_BT))
    return jax.nn.silu(causal_conv(x_BTC, kernel_KC))


def next_tail(tail_BKC: Array, x_BTC: Array, len_B: Array) -> Array:
    """The conv tail after a decode chunk: the last K - 1 inputs of ``[tail, chunk[:len]]`` per
    row (a row that appends nothing keeps its tail)."""
    k1 = tail_BKC.shape[1]
    xx_BTC = jnp.concatenate([tail_BKC, x_BTC.astype(tail_BKC.dtype)], axis=1)
    idx_BK = len_B[:, None] + jnp.arange(k1, dtype=jnp.int32)[None, :]
    return jnp.take_along_axis(xx_BTC, idx_BK[..., None], axis=1)


# ----------------------------------------------------------------------------- decode


def decode_conv(step: cache.Step, conv: ShortConv, x_BTC: Array, name: str = "conv") -> Array:
    """The short convolution of a decode chunk: reads the cached tail ``name`` (B, K - 1, C)
    (zeros before the first token: no token), writes the new one; returns the conv's output."""
    b, _, c = x_BTC.shape
    k1 = conv.conv_size - 1
    tail_BKC = step.state(name, (b, k1, c), x_BTC.dtype)
    y = conv(x_BTC, tail_BKC=tail_BKC)
    step.put(name, next_tail(tail_BKC, x_BTC, step.len_B))
    return y


def decode_recurrence(step: cache.Step, q_BTNH: Array, k_BTNH: Array, v_BTNV: Array, g: Array,
                      beta_BTN: Array | None, *, impl: str, scale: float | None,
                      chunk_size: int, precision: Precision, owner: str,
                      name: str = "state") -> Array:
    """The recurrence of a decode chunk from the cached state ``name`` (B, N, H, V) float32,
    which it replaces by the state after the row's appended tokens. Tokens past a row's length
    are skipped (segment id 0: state unchanged, output zero). A one-token chunk runs the
    ``recurrent`` impl (the step itself); a longer one the module's ``impl``."""
    b, n, nh, h = q_BTNH.shape
    state_BNHV = step.state(name, (b, nh, h, v_BTNV.shape[-1]), F32)
    seg_BT = step.ok_BT.astype(jnp.int32)
    o_BTNV, s_BNHV = core.gated_delta_rule(
        q_BTNH, k_BTNH, v_BTNV, g, beta_BTN, impl="recurrent" if n == 1 else impl, scale=scale,
        initial_state=state_BNHV, segment_ids=seg_BT, chunk_size=chunk_size,
        precision=precision, owner=owner)
    step.put(name, s_BNHV)
    return o_BTNV


def state_bytes(batch: int, heads: int, key_width: int, value_width: int) -> int:
    """Bytes of a float32 recurrent state (B, N, H, V)."""
    return cache.nbytes((batch, heads, key_width, value_width), F32)


class FixedStateCache:
    """The decode accounting of a module whose cache does not grow: a float32 recurrent state
    (``state_shape(batch)``), the short convolution's tail (``conv_tail()``: (tokens, channels),
    (0, 0) without a convolution) and the index. Nothing is cached per token; a decode query
    reads the tail's tokens (the state summarises the rest) and scores none."""

    def conv_tail(self) -> tuple[int, int]:
        """(tokens, channels) of the cached convolution tail: none here."""
        return (0, 0)

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token: none (``cache_bytes`` has a fixed size)."""
        del dtype
        return 0.0

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays, whatever ``max_len``: the float32 state, the conv
        tail (B, tokens, channels) in ``dtype``, the index."""
        del max_len
        tokens, channels = self.conv_tail()
        tail = cache.nbytes((batch, tokens, channels), dtype) if tokens else 0
        return state_bytes(*self.state_shape(batch)) + tail + cache.index_bytes(batch)

    def decode_reads(self, n: int) -> int:
        """Cached tokens one decode query reads at cache length ``n``: the conv tail's, whatever
        ``n``."""
        del n
        return self.conv_tail()[0]

    def decode_scored(self, n: int) -> int:
        """Index keys a selector scores per decode query: none (no selector)."""
        del n
        return 0


def check_state(owner: str, state: Array | None, shape: tuple[int, ...]) -> None:
    """Raise unless ``state`` is None or a floating array of ``shape`` (B, heads, key width,
    value width)."""
    if state is None:
        return
    if not hasattr(state, "shape") or not hasattr(state, "dtype"):
        raise TypeError(f"{owner}: initial_state must be an array of shape (batch, heads, key "
                        f"width, value width)={shape}, got {type(state)!r}")
    if tuple(state.shape) != tuple(shape):
        raise ValueError(f"{owner}: initial_state must have shape (batch, heads, key width, value "
                         f"width)={shape}, got {tuple(state.shape)}")
    if not jnp.issubdtype(state.dtype, jnp.floating):
        raise TypeError(f"{owner}: initial_state must be floating point, got dtype {state.dtype}")


def zero_padding_outputs(out_BTD: Array, valid_BT: Array | None) -> Array:
    """``out`` with padding tokens' rows set to zero."""
    if valid_BT is None:
        return out_BTD
    return jnp.where(valid_BT[..., None], out_BTD, jnp.zeros((), out_BTD.dtype))

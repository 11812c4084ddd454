"""Kimi Delta Attention (Kimi Team, 2025): the gated delta rule with a per-channel (fine-grained)
decay, the linear-attention layer of Kimi Linear, with the parameters of transformers'
``KimiLinearDeltaAttention``."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cache, core, linear_core, registry
from .core import Array, Dtype


def _a_log_init(key, shape, dtype=jnp.float32):
    """log U(1, 16): HF's (fla's) ``A_log``."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def _dt_bias_init(key, shape, dtype=jnp.float32):
    """HF's (fla's) ``dt_bias``: dt = exp(U(log 1e-3, log 1e-1)) clamped at >= 1e-4, then the
    inverse softplus ``dt + log(-expm1(-dt))``."""
    u = jax.random.uniform(key, shape, jnp.float32, math.log(1e-3), math.log(1e-1))
    dt = jnp.maximum(jnp.exp(u), 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class KimiForgetGate(nn.Module):
    """``KimiLinearForgetGate``: the per-channel log decay
    ``g = -exp(A_log[n]) * softplus(f_b_proj(f_a_proj(x)) + dt_bias)`` (B, T, N, H) in float32
    (softplus as torch's, threshold 20). Parameters ``f_a_proj`` (D, H), ``f_b_proj`` (H, N H),
    ``dt_bias`` (N H,), ``A_log`` (N,) (HF stores (1, 1, N, 1); the converter reshapes)."""

    num_heads: int
    head_dim: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        nh, h = self.num_heads, self.head_dim
        f = core.Linear(nh * h, axes=("latent", "heads"), name="f_b_proj", **kw)(
            core.Linear(h, axes=("embed", "latent"), name="f_a_proj", **kw)(x))
        dt_bias = core.param(self, "dt_bias", _dt_bias_init, (nh * h,), ("heads",),
                             self.param_dtype)
        a_log = core.param(self, "A_log", _a_log_init, (nh,), ("heads",), self.param_dtype)
        f32 = linear_core.at_least_f32
        gate = (f32(f) + f32(dt_bias)).reshape(*x.shape[:2], nh, h)
        return -jnp.exp(f32(a_log))[:, None] * linear_core.softplus(gate)


class KimiDeltaAttention(linear_core.FixedStateCache, nn.Module):
    """Kimi Delta Attention: short causal conv + SiLU on q, k, v, L2-normalised q and k, the
    gated delta rule with a per-key-channel decay (``KimiForgetGate``) and a per-head write
    strength ``beta = sigmoid(b_proj(x))``, an RMSNorm of each head's output gated by the sigmoid
    of a low-rank projection, the output projection.

    Args: ``hidden_size`` (D), ``num_heads`` (N), ``head_dim`` (H: the key and value width of a
    head), ``conv_size``, ``norm_eps`` (the output norm's). q and k are L2-normalised in float32
    as Kimi Linear does (``x / sqrt(sum x^2 + 1e-6)``), q scaled by H**-0.5 in the op.

    Parameters (names and math of ``KimiLinearDeltaAttention``; every kernel is torch's weight
    transposed): ``q_proj``, ``k_proj``, ``v_proj`` (D, N H), ``conv1d/kernel`` (conv_size, 3 N H)
    over q | k | v, ``forget_gate`` (``f_a_proj`` (D, H), ``f_b_proj`` (H, N H), ``dt_bias``
    (N H,), ``A_log`` (N,); HF's ``_init_weights``: log U(1, 16) and the inverse softplus of
    dt in [1e-3, 1e-1]), ``b_proj`` (D, N), ``g_a_proj`` (D, H), ``g_b_proj`` (H, N H) (the
    low-rank output gate), ``o_norm/weight`` (H,) (``KimiLinearRMSNormGated``: RMSNorm in
    float32, times the weight, times sigmoid(gate)), ``o_proj`` (N H, D).

    ``impl``, ``chunk_size``, ``precision`` and ``decode=True`` as ``GatedDeltaNet``: the cache
    holds ``state`` (B, N, H, H) float32, the conv tail ``conv`` (B, conv_size - 1, 3 N H) and
    ``index``; its room is unbounded.
    """

    hidden_size: int
    num_heads: int
    head_dim: int
    conv_size: int = 4
    norm_eps: float = 1e-6
    impl: registry.LinearImpl = "auto"
    chunk_size: int = 64
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    @property
    def qkv_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def dim(self) -> int:
        """The model width (``hidden_size``), under the name the other mechanisms use."""
        return self.hidden_size

    def conv_tail(self) -> tuple[int, int]:
        """(tokens, channels) of the cached conv tail: (conv_size - 1, 3 N H)."""
        return (self.conv_size - 1, 3 * self.qkv_dim)

    def state_shape(self, batch: int) -> tuple[int, int, int, int]:
        """The recurrent state's shape (B, N, H, H): ``initial_state`` and the returned one."""
        return (batch, self.num_heads, self.head_dim, self.head_dim)

    def setup(self) -> None:
        owner = "KimiDeltaAttention"
        core.check_positive(owner, hidden_size=self.hidden_size, num_heads=self.num_heads,
                            head_dim=self.head_dim, conv_size=self.conv_size,
                            chunk_size=self.chunk_size)
        if not self.norm_eps > 0:
            raise ValueError(f"{owner}: norm_eps={self.norm_eps} must be > 0")
        registry.check(owner, "gated_delta", self.impl)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        d, nh, h = self.qkv_dim, self.num_heads, self.head_dim
        self.q_proj = core.Linear(d, axes=("embed", "heads"), **kw)
        self.k_proj = core.Linear(d, axes=("embed", "heads"), **kw)
        self.v_proj = core.Linear(d, axes=("embed", "heads"), **kw)
        self.conv1d = linear_core.ShortConv(3 * d, self.conv_size, **kw)
        self.forget_gate = KimiForgetGate(nh, h, **kw)
        self.b_proj = core.Linear(nh, axes=("embed", "heads"), **kw)
        self.g_a_proj = core.Linear(h, axes=("embed", "latent"), **kw)
        self.g_b_proj = core.Linear(d, axes=("latent", "heads"), **kw)
        self.o_norm = linear_core.GatedNorm(h, self.norm_eps, "sigmoid", self.param_dtype)
        self.o_proj = core.Linear(self.hidden_size, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, *, initial_state: Array | None = None,
                 return_state: bool = False, segment_ids: Array | None = None,
                 lengths: Array | None = None):
        """(B, T, D) -> (B, T, D), or ``(out, final_state)`` with ``return_state=True``; the
        arguments as ``GatedDeltaNet``'s (``initial_state`` / the returned state (B, N, H, H);
        the conv starts from zeros; ``segment_ids`` restart the state and the conv)."""
        owner = "KimiDeltaAttention"
        core.check_input(x, self.hidden_size, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths,
                            initial_state=initial_state, return_state=return_state,
                            segment_ids=segment_ids)
        if self.decode:
            step = cache.begin(self, owner, x, lengths, sized_by="state", bounded=False)
            conv = linear_core.decode_conv(step, self.conv1d, self._qkv(step.x))
            q, k, v, g, beta = self._mix(step.x, conv)
            o = linear_core.decode_recurrence(step, q, k, v, g, beta, impl=self.impl, scale=None,
                                              chunk_size=self.chunk_size,
                                              precision=self.precision, owner=owner)
            return step.finish(self._out(step.x, o))
        b, t, _ = x.shape
        linear_core.check_state(owner, initial_state, self.state_shape(b))
        seg, _ = core.check_packing(owner, x, segment_ids, None)
        x = core.mask_padding(x, seg)
        if seg is None:
            valid = None
            conv = self.conv1d(self._qkv(x))
        else:
            valid, run = linear_core.segment_runs(seg, b, t)
            conv = self.conv1d(self._qkv(x), valid_BT=valid, run_BT=run)
        q, k, v, g, beta = self._mix(x, conv)
        o, state = core.gated_delta_rule(q, k, v, g, beta, impl=self.impl, scale=None,
                                         initial_state=initial_state, segment_ids=seg,
                                         chunk_size=self.chunk_size, precision=self.precision,
                                         owner=owner)
        out = linear_core.zero_padding_outputs(self._out(x, o), valid)
        return (out, state) if return_state else out

    def _qkv(self, x: Array) -> Array:
        return jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

    def _mix(self, x: Array, conv: Array):
        """q, k (B, T, N, H) float32 (L2-normalised), v (B, T, N, H), g (B, T, N, H) float32,
        beta (B, T, N)."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        d = self.qkv_dim
        q = linear_core.l2norm(conv[..., :d].reshape(shape), divide=True)
        k = linear_core.l2norm(conv[..., d:2 * d].reshape(shape), divide=True)
        v = conv[..., 2 * d:].reshape(shape)
        g = self.forget_gate(x)
        beta = jax.nn.sigmoid(self.b_proj(x))
        return q, k, v, g, beta

    def _out(self, x: Array, o_BTNH: Array) -> Array:
        b, t = x.shape[:2]
        gate = self.g_b_proj(self.g_a_proj(x)).reshape(o_BTNH.shape)
        y = self.o_norm(o_BTNH, gate)
        return self.o_proj(y.reshape(b, t, self.qkv_dim))

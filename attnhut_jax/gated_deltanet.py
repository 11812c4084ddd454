"""Gated DeltaNet (Yang, Kautz and Hatamizadeh, 2025): the linear-attention layer of Qwen3-Next
and Qwen3.5, with d9d's constructor and the parameters of transformers' ``Qwen3_5GatedDeltaNet``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cache, core, linear_core, registry
from .core import Array, Dtype

DECAY_GATES = ("mamba", "logsigmoid")


def _log_uniform(lo: float, hi: float):
    """log(U(lo, hi)): HF's ``A_log`` initialisation."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)

    return init


class GatedDeltaNet(linear_core.FixedStateCache, nn.Module):
    """Gated DeltaNet: short causal conv + SiLU on q, k, v, L2-normalised q and k, the gated delta
    rule with a per-head decay and write strength, a per-head RMSNorm gated by SiLU(z), the output
    projection.

    Constructor as d9d's ``GatedDeltaNet``: ``hidden_size`` (D), ``num_query_key_heads`` (Hk),
    ``num_value_heads`` (Hv, a multiple of Hk: query/key head i serves the Hv / Hk consecutive
    value heads ``i * Hv / Hk ...``, HF's ``repeat_interleave``), ``head_qk_dim`` (K),
    ``head_v_dim`` (V), ``norm_eps`` (the output RMSNorm's), ``conv_size``, ``decay_gate``,
    ``use_qk_l2norm``. Per token, per value head::

        beta = sigmoid(b)                    b = in_proj_b(x)
        g    = -exp(A_log) * softplus(a + dt_bias)         decay_gate="mamba" (Qwen3.5)
        g    = log_sigmoid(a) / gate_normalizer            decay_gate="logsigmoid" (d9d's
                                                           LogSigmoidDecayGate; no A_log, dt_bias)

    with ``a = in_proj_a(x)`` and g the log decay of the state (``softplus`` is torch's, threshold
    20; g in float32). q and k are L2-normalised (``x * rsqrt(sum x^2 + 1e-6)`` in float32, HF's
    ``l2norm``) when ``use_qk_l2norm``, and q is scaled by K**-0.5 in the op.

    Parameters (names and math of ``Qwen3_5GatedDeltaNet``; every kernel is torch's weight
    transposed): ``in_proj_qkv`` (D, 2 Hk K + Hv V) (q of every head, then k, then v),
    ``in_proj_z`` (D, Hv V), ``in_proj_b`` (D, Hv), ``in_proj_a`` (D, Hv), ``conv1d/kernel``
    (conv_size, 2 Hk K + Hv V), with ``decay_gate="mamba"`` ``dt_bias`` (Hv,) (ones) and
    ``A_log`` (Hv,) (log U(0.01, 16), HF's init), ``norm/weight`` (V,) (``Qwen3_5RMSNormGated``:
    RMSNorm in float32, back to the input dtype, times the weight, times SiLU(z) in float32),
    ``out_proj`` (Hv V, D).

    ``impl`` picks the registry's ``gated_delta`` op (``auto`` | ``chunk`` | ``recurrent`` |
    ``pallas``; no variable depends on it); ``chunk_size`` is the chunked forms' chunk;
    ``precision`` reaches every matrix product.

    ``decode=True`` decodes incrementally through ``attnhut_jax.cache``: the cache holds the
    recurrent state ``state`` (B, Hv, K, V) float32, the conv's tail ``conv`` (B, conv_size - 1,
    2 Hk K + Hv V) (the last conv inputs of the row, in the compute dtype) and ``index``; neither
    grows with the tokens, so the room is unbounded (``cache.begin(bounded=False)``: the
    ``max_len`` of ``init`` sizes nothing). A one-token step runs the ``recurrent`` impl, a chunk
    the module's ``impl``. The ``params`` are those of ``decode=False``.
    """

    hidden_size: int
    num_query_key_heads: int
    num_value_heads: int
    head_qk_dim: int
    head_v_dim: int
    norm_eps: float = 1e-6
    conv_size: int = 4
    decay_gate: str = "mamba"
    use_qk_l2norm: bool = True
    gate_normalizer: float = 16.0
    impl: registry.LinearImpl = "auto"
    chunk_size: int = 64
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    # ------------------------------------------------------------------ sizes and reports
    @property
    def key_dim(self) -> int:
        return self.num_query_key_heads * self.head_qk_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def dim(self) -> int:
        """The model width (``hidden_size``), under the name the other mechanisms use."""
        return self.hidden_size

    def conv_tail(self) -> tuple[int, int]:
        """(tokens, channels) of the cached conv tail: (conv_size - 1, 2 Hk K + Hv V)."""
        return (self.conv_size - 1, self.conv_dim)

    def state_shape(self, batch: int) -> tuple[int, int, int, int]:
        """The recurrent state's shape (B, Hv, K, V): ``initial_state`` and the returned one."""
        return (batch, self.num_value_heads, self.head_qk_dim, self.head_v_dim)

    # ------------------------------------------------------------------ layers
    def setup(self) -> None:
        owner = "GatedDeltaNet"
        core.check_positive(owner, hidden_size=self.hidden_size,
                            num_query_key_heads=self.num_query_key_heads,
                            num_value_heads=self.num_value_heads, head_qk_dim=self.head_qk_dim,
                            head_v_dim=self.head_v_dim, conv_size=self.conv_size,
                            chunk_size=self.chunk_size)
        if self.num_value_heads % self.num_query_key_heads:
            raise ValueError(f"{owner}: num_value_heads={self.num_value_heads} must be a multiple "
                             f"of num_query_key_heads={self.num_query_key_heads}")
        if self.decay_gate not in DECAY_GATES:
            raise ValueError(f"{owner}: decay_gate={self.decay_gate!r}; allowed: {DECAY_GATES}")
        if not self.norm_eps > 0 or not self.gate_normalizer > 0:
            raise ValueError(f"{owner}: norm_eps={self.norm_eps} and gate_normalizer="
                             f"{self.gate_normalizer} must be > 0")
        registry.check(owner, "gated_delta", self.impl)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        hv = self.num_value_heads
        self.in_proj_qkv = core.Linear(self.conv_dim, axes=("embed", "qkv"), **kw)
        self.in_proj_z = core.Linear(self.value_dim, axes=("embed", "heads"), **kw)
        self.in_proj_b = core.Linear(hv, axes=("embed", "heads"), **kw)
        self.in_proj_a = core.Linear(hv, axes=("embed", "heads"), **kw)
        self.conv1d = linear_core.ShortConv(self.conv_dim, self.conv_size, **kw)
        if self.decay_gate == "mamba":
            self.dt_bias = core.param(self, "dt_bias", nn.initializers.ones_init(), (hv,),
                                      ("heads",), self.param_dtype)
            self.A_log = core.param(self, "A_log", _log_uniform(0.01, 16.0), (hv,), ("heads",),
                                    self.param_dtype)
        self.norm = linear_core.GatedNorm(self.head_v_dim, self.norm_eps, "silu",
                                          self.param_dtype)
        self.out_proj = core.Linear(self.hidden_size, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, *, initial_state: Array | None = None,
                 return_state: bool = False, segment_ids: Array | None = None,
                 lengths: Array | None = None):
        """(B, T, D) -> (B, T, D), or ``(out, final_state)`` with ``return_state=True``.

        ``initial_state`` (B, Hv, K, V): the recurrent state entering the first segment (HF /
        fla layout; float32 inside); the short convolution starts from zeros whatever it is (its
        tail is not part of the state), so running [0, a) then [a, T) from the returned state
        equals running [0, T) when ``conv_size`` is 1 (or the conv's earlier taps are zero); the
        decode cache carries the tail as well. ``return_state``: also return the state after the
        row's last non-padding token (float32, same layout).

        ``segment_ids`` (B, T) int: packed sequences (``core.check_packing``): id 0 is padding
        (input zeroed, skipped by the recurrence and the conv, output zero); a new id restarts
        the state at zero and the conv reads no token of another segment (``linear_core``).

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``initial_state``, ``return_state`` and
        ``segment_ids`` are refused (the cache is the state).
        """
        owner = "GatedDeltaNet"
        core.check_input(x, self.hidden_size, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths,
                            initial_state=initial_state, return_state=return_state,
                            segment_ids=segment_ids)
        if self.decode:
            step = cache.begin(self, owner, x, lengths, sized_by="state", bounded=False)
            qkv = self.in_proj_qkv(step.x)
            conv = linear_core.decode_conv(step, self.conv1d, qkv)
            q, k, v, g, beta, z = self._mix(step.x, conv)
            o = linear_core.decode_recurrence(step, q, k, v, g, beta, impl=self.impl, scale=None,
                                              chunk_size=self.chunk_size,
                                              precision=self.precision, owner=owner)
            return step.finish(self._out(o, z))
        b, t, _ = x.shape
        linear_core.check_state(owner, initial_state, self.state_shape(b))
        seg, _ = core.check_packing(owner, x, segment_ids, None)
        x = core.mask_padding(x, seg)
        qkv = self.in_proj_qkv(x)
        if seg is None:
            valid = None
            conv = self.conv1d(qkv)
        else:
            valid, run = linear_core.segment_runs(seg, b, t)
            conv = self.conv1d(qkv, valid_BT=valid, run_BT=run)
        q, k, v, g, beta, z = self._mix(x, conv)
        o, state = core.gated_delta_rule(q, k, v, g, beta, impl=self.impl, scale=None,
                                         initial_state=initial_state, segment_ids=seg,
                                         chunk_size=self.chunk_size, precision=self.precision,
                                         owner=owner)
        out = linear_core.zero_padding_outputs(self._out(o, z), valid)
        return (out, state) if return_state else out

    def _mix(self, x: Array, conv: Array):
        """q, k (B, T, Hv, K) float32, v (B, T, Hv, V), g (B, T, Hv) float32, beta (B, T, Hv),
        z (B, T, Hv, V) from the input and the conv's output."""
        b, t, _ = x.shape
        hk, hv, kd, vd = (self.num_query_key_heads, self.num_value_heads, self.head_qk_dim,
                          self.head_v_dim)
        q = conv[..., :self.key_dim].reshape(b, t, hk, kd)
        k = conv[..., self.key_dim:2 * self.key_dim].reshape(b, t, hk, kd)
        v = conv[..., 2 * self.key_dim:].reshape(b, t, hv, vd)
        if self.use_qk_l2norm:
            q, k = linear_core.l2norm(q), linear_core.l2norm(k)
        else:
            q, k = linear_core.at_least_f32(q), linear_core.at_least_f32(k)
        if hv != hk:
            q, k = jnp.repeat(q, hv // hk, axis=2), jnp.repeat(k, hv // hk, axis=2)
        f32 = linear_core.at_least_f32
        a = f32(self.in_proj_a(x))
        if self.decay_gate == "mamba":
            g = -jnp.exp(f32(self.A_log)) * linear_core.softplus(a + f32(self.dt_bias))
        else:
            g = jax.nn.log_sigmoid(a) / self.gate_normalizer
        beta = jax.nn.sigmoid(self.in_proj_b(x))
        z = self.in_proj_z(x).reshape(b, t, hv, vd)
        return q, k, v, g, beta, z

    def _out(self, o_BTNV: Array, z_BTNV: Array) -> Array:
        b, t = o_BTNV.shape[:2]
        # the gated norm's output is written out before the output projection: XLA:CPU otherwise
        # fuses the z projection, the norm and the output projection into one call whose time
        # grew 7.4x from T = 8192 to 32768 (profiled; split, the two calls grow 4.2x)
        y = jax.lax.optimization_barrier(self.norm(o_BTNV, z_BTNV))
        return self.out_proj(y.reshape(b, t, self.value_dim))


"""Slot Attention (Locatello et al., 2020).

A small set of slots compete to explain the inputs: the softmax runs over the *slots*, so each
input is softly assigned to one, then each slot takes the weighted mean of its inputs and is
refined by a GRU and a residual MLP. The output is the set of slots, (B, num_slots, D).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cache, core
from .core import Array, Dtype


class GRUCell(nn.Module):
    """``torch.nn.GRUCell(dim, dim)``: gates (r, z, n) stacked in ``kernel_ih``/``kernel_hh`` (D, 3D)."""

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    @nn.compact
    def __call__(self, x: Array, h: Array) -> Array:
        d = self.features
        init = core.torch_linear_init(d)
        p = {name: core.param(self, name, init, shape, axes, self.param_dtype)
             for name, shape, axes in (("kernel_ih", (x.shape[-1], 3 * d), ("embed", "gru")),
                                       ("kernel_hh", (d, 3 * d), ("embed", "gru")),
                                       ("bias_ih", (3 * d,), ("gru",)),
                                       ("bias_hh", (3 * d,), ("gru",)))}
        x, h, *vals = nn.dtypes.promote_dtype(x, h, *p.values(), dtype=self.dtype)
        w_ih, w_hh, b_ih, b_hh = vals
        gi = jnp.split(jnp.matmul(x, w_ih, precision=self.precision) + b_ih, 3, axis=-1)
        gh = jnp.split(jnp.matmul(h, w_hh, precision=self.precision) + b_hh, 3, axis=-1)
        r = jax.nn.sigmoid(gi[0] + gh[0])
        z = jax.nn.sigmoid(gi[1] + gh[1])
        n = jnp.tanh(gi[2] + r * gh[2])
        return (1.0 - z) * n + z * h


class _MLP(nn.Module):
    """``nn.Sequential(Linear, ReLU, Linear)``; submodules keep torch's indices ``0`` and ``2``."""

    hidden: int
    out: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        x = core.Linear(self.hidden, axes=("embed", "mlp"), name="0", **kw)(x)
        return core.Linear(self.out, axes=("mlp", "embed"), name="2", **kw)(nn.relu(x))


def _xavier_uniform_111(key, shape, dtype=jnp.float32):
    """``nn.init.xavier_uniform_`` on a (1, 1, D) tensor: fan_in = fan_out = D."""
    bound = math.sqrt(6.0 / (2 * shape[-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class SlotAttention(nn.Module):
    """Iterative slot attention with GRU refinement.

    Args mirror ``attnhut.SlotAttention``: ``dim``, ``num_slots``, ``num_iters`` (3),
    ``hidden_dim`` (128; the MLP is ``max(dim, hidden_dim)`` wide), ``eps`` (1e-8). Parameters:
    ``slot_mu`` (1, 1, D) ~ N(0, 1), ``slot_log_sigma`` (1, 1, D) xavier-uniform, ``to_q``,
    ``to_k``, ``to_v`` (with bias), ``gru``, ``mlp/0``, ``mlp/2``, ``norm_input``, ``norm_slots``,
    ``norm_pre_mlp``. ``precision`` reaches every matmul (Flax's convention).

    ``decode=True`` raises ``ValueError``: the output is ``num_slots`` slots, not one output
    per input, and the slots compete for all inputs at once over ``num_iters`` iterations, so
    there is no causal order and nothing to append.
    """

    dim: int
    num_slots: int
    num_iters: int = 3
    hidden_dim: int = 128
    eps: float = 1e-8
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    def setup(self) -> None:
        owner = "SlotAttention"
        core.check_positive(owner, dim=self.dim, num_slots=self.num_slots,
                            hidden_dim=self.hidden_dim)
        if self.num_iters < 0:
            raise ValueError(f"{owner}: num_iters={self.num_iters} must be >= 0")
        cache.refuse_decode(owner, self.decode,
                            "its output is num_slots slots, not one output per input token: the "
                            "slots compete for all inputs at once (a softmax over the slots, "
                            "iterated num_iters times with a GRU), so the inputs are an unordered "
                            "set with no causal order, and one more input changes every slot")
        d, pd = self.dim, self.param_dtype
        self.slot_mu = core.param(self, "slot_mu", nn.initializers.normal(1.0), (1, 1, d),
                                  (None, None, "embed"), pd)
        self.slot_log_sigma = core.param(self, "slot_log_sigma", _xavier_uniform_111, (1, 1, d),
                                         (None, None, "embed"), pd)
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=pd, precision=self.precision)
        self.to_q = core.Linear(d, axes=("embed", "heads"), **kw)
        self.to_k = core.Linear(d, axes=("embed", "heads"), **kw)
        self.to_v = core.Linear(d, axes=("embed", "heads"), **kw)
        self.gru = GRUCell(d, dtype=self.dtype, param_dtype=pd, precision=self.precision)
        self.mlp = _MLP(max(d, self.hidden_dim), d, dtype=self.dtype, param_dtype=pd,
                        precision=self.precision)
        self.norm_input = core.layer_norm("norm_input", self.dtype, pd)
        self.norm_slots = core.layer_norm("norm_slots", self.dtype, pd)
        self.norm_pre_mlp = core.layer_norm("norm_pre_mlp", self.dtype, pd)

    def __call__(self, inputs: Array, noise: Array | None = None, *,
                 segment_ids: Array | None = None) -> Array:
        """(B, S, D) inputs -> (B, num_slots, D) slots.

        ``noise`` is the standard-normal draw (B, num_slots, D) that attnhut takes with
        ``randn_like``; when None it is drawn from the ``'slots'`` rng stream.

        Packed sequences are refused: ``segment_ids`` other than None raises ``ValueError``. The
        slots of a sample compete for all of its inputs (the softmax runs over slots, the
        update averages over every input), and the inputs are a set with no sequence order to
        split; packing would make slots of one sample explain another's inputs.
        """
        core.reject_packing("SlotAttention", segment_ids,
                            "the slots of a sample compete for all of its inputs, which are a set "
                            "with no sequence order to split into segments; give one sample per "
                            "batch row")
        core.check_input(inputs, self.dim, "SlotAttention")
        b, _, d = inputs.shape
        shape = (b, self.num_slots, d)
        if noise is None:
            noise = jax.random.normal(self.make_rng("slots"), shape, jnp.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(
                f"SlotAttention: noise must have shape (batch, num_slots, dim)={shape}, "
                f"got {tuple(noise.shape)}")
        slots = self.slot_mu + jnp.exp(self.slot_log_sigma) * noise.astype(self.slot_mu.dtype)
        slots = slots.astype(self.dtype or inputs.dtype)

        inputs = self.norm_input(inputs)
        k_BSD, v_BSD = self.to_k(inputs), self.to_v(inputs)
        scale = d ** -0.5
        for _ in range(self.num_iters):
            prev = slots
            q_BUD = self.to_q(self.norm_slots(slots)) * scale
            logits_BUS = jnp.einsum("BUD,BSD->BUS", q_BUD, k_BSD, precision=self.precision)
            # Slots compete for each input (softmax over U), then each slot averages its inputs.
            attn_BUS = jax.nn.softmax(logits_BUS.astype(core.softmax_dtype(logits_BUS.dtype)),
                                      axis=1)
            attn_BUS = attn_BUS + self.eps
            attn_BUS = (attn_BUS / jnp.sum(attn_BUS, axis=-1, keepdims=True)).astype(v_BSD.dtype)
            updates_BUD = jnp.einsum("BUS,BSD->BUD", attn_BUS, v_BSD, precision=self.precision)
            slots = self.gru(updates_BUD.reshape(-1, d), prev.reshape(-1, d)).reshape(shape)
            slots = slots + self.mlp(self.norm_pre_mlp(slots))
        return slots

"""Linear attention (Katharopoulos, Vyas, Pappas and Fleuret, 2020): softmax replaced by the
kernel ``phi(q) . phi(k)`` with ``phi(x) = elu(x) + 1``, so that causal attention is a recurrence
over a (H, V) state."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cache, core, linear_core, registry
from .core import Array, Dtype


def feature_map(x: Array) -> Array:
    """``phi(x) = elu(x) + 1`` (positive), in float32 (or wider)."""
    return jax.nn.elu(linear_core.at_least_f32(x)) + 1.0


class LinearAttention(linear_core.FixedStateCache, nn.Module):
    """Multi-head linear attention with the ``elu + 1`` feature map and the normaliser.

    Args: ``dim`` (divisible by ``num_heads``), ``num_heads``, ``causal``, ``eps`` (added to the
    normaliser), ``bias`` (on every projection). Parameters ``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj`` (D, D) (``core.Linear``). Per head, with H = D / N::

        causal:  out_t = phi(q_t)^T S_t / (phi(q_t) . z_t + eps),
                 S_t = sum_{s <= t} phi(k_s) v_s^T,   z_t = sum_{s <= t} phi(k_s)
        not:     the same with both sums over the whole sequence (segment)

    The causal form runs the registry's ``gated_delta`` op (``impl``) with no decay (g = 0),
    no delta correction (beta = None), scale 1 and v extended by a column of ones, so the state's
    last column is z: the state (``initial_state``, the returned one, the decode cache's
    ``state``) is (B, N, H, H + 1) float32, ``[..., :H]`` = S and ``[..., H]`` = z. The
    bidirectional form is two einsums (O(T)); with ``segment_ids`` it masks a (T, T) product per
    head (O(T^2)).

    ``decode=True`` (causal only) decodes through ``attnhut_jax.cache`` with the state alone
    (``state`` and ``index``; unbounded room; the ``params`` are those of ``decode=False``).
    """

    dim: int
    num_heads: int
    causal: bool = True
    eps: float = 1e-6
    bias: bool = False
    impl: registry.LinearImpl = "auto"
    chunk_size: int = 64
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def state_shape(self, batch: int) -> tuple[int, int, int, int]:
        """The state's shape (B, N, H, H + 1): S and, in the last column, z."""
        return (batch, self.num_heads, self.head_dim, self.head_dim + 1)

    def setup(self) -> None:
        owner = "LinearAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads,
                            chunk_size=self.chunk_size)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        if not self.eps >= 0:
            raise ValueError(f"{owner}: eps={self.eps} must be >= 0")
        registry.check(owner, "gated_delta", self.impl)
        cache.check_causal(owner, self.decode, self.causal)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.q_proj = core.Linear(self.dim, axes=("embed", "heads"), **kw)
        self.k_proj = core.Linear(self.dim, axes=("embed", "heads"), **kw)
        self.v_proj = core.Linear(self.dim, axes=("embed", "heads"), **kw)
        self.o_proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, *, initial_state: Array | None = None,
                 return_state: bool = False, segment_ids: Array | None = None,
                 lengths: Array | None = None):
        """(B, T, D) -> (B, T, D), or ``(out, final_state)`` with ``return_state=True`` (causal
        only, as ``initial_state``: the state (B, N, H, H + 1) entering the first segment /
        after the last non-padding token; running [0, a) then [a, T) from the returned state
        equals running [0, T)).

        ``segment_ids`` (B, T) int: packed sequences; id 0 is padding (input zeroed, skipped,
        output zero), a segment is a run of one nonzero id (the ``gated_delta`` op's rule), and
        a token reads only its own segment, causal or not.

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends; ``initial_state``, ``return_state`` and ``segment_ids`` are refused.
        """
        owner = "LinearAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths,
                            initial_state=initial_state, return_state=return_state,
                            segment_ids=segment_ids)
        if self.decode:
            step = cache.begin(self, owner, x, lengths, sized_by="state", bounded=False)
            q, k, v = self._qkv(step.x)
            o = linear_core.decode_recurrence(
                step, q, k, v, jnp.zeros(q.shape[:3], jnp.float32), None, impl=self.impl,
                scale=1.0, chunk_size=self.chunk_size, precision=self.precision, owner=owner)
            return step.finish(self._out(o, step.x.dtype))
        b, t, _ = x.shape
        if not self.causal and (initial_state is not None or return_state):
            raise ValueError(f"{owner}: initial_state and return_state need causal=True (a "
                             f"bidirectional module has no recurrent state to carry)")
        linear_core.check_state(owner, initial_state, self.state_shape(b))
        seg, _ = core.check_packing(owner, x, segment_ids, None)
        x = core.mask_padding(x, seg)
        q, k, v = self._qkv(x)
        valid = None if seg is None else seg != 0
        if self.causal:
            o, state = core.gated_delta_rule(
                q, k, v, jnp.zeros(q.shape[:3], jnp.float32), None, impl=self.impl, scale=1.0,
                initial_state=initial_state, segment_ids=seg, chunk_size=self.chunk_size,
                precision=self.precision, owner=owner)
        else:
            o, state = self._bidirectional(q, k, v, seg), None
        out = linear_core.zero_padding_outputs(self._out(o, x.dtype), valid)
        return (out, state) if return_state else out

    def _qkv(self, x: Array):
        """phi(q), phi(k) (B, T, N, H) float32 and v extended by a column of ones (B, T, N, H + 1)
        float32."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = feature_map(self.q_proj(x).reshape(shape))
        k = feature_map(self.k_proj(x).reshape(shape))
        v = linear_core.at_least_f32(self.v_proj(x).reshape(shape))
        ones = jnp.ones((*shape[:3], 1), v.dtype)
        return q, k, jnp.concatenate([v, ones], axis=-1)

    def _bidirectional(self, q: Array, k: Array, v: Array, seg: Array | None) -> Array:
        """Numerator and normaliser (B, T, N, H + 1) over every key of the token's segment."""
        p = self.precision
        if seg is None:
            s_BNHV = jnp.einsum("BTNH,BTNV->BNHV", k, v, precision=p)
            return jnp.einsum("BTNH,BNHV->BTNV", q, s_BNHV, precision=p)
        b, t = seg.shape
        valid, run = linear_core.segment_runs(seg, b, t)
        keep_BTS = (run[:, :, None] == run[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        a_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q, k, precision=p)
        a_BNTS = jnp.where(keep_BTS[:, None], a_BNTS, 0.0)
        return jnp.einsum("BNTS,BSNV->BTNV", a_BNTS, v, precision=p)

    def _out(self, o_BTNV: Array, dtype) -> Array:
        """Numerator / (normaliser + eps), heads merged, through ``o_proj``. A token that reads
        no key (padding: numerator and normaliser 0) divides by 1 instead, so ``eps=0`` gives
        it a zero output and finite gradients rather than 0 / 0."""
        b, t = o_BTNV.shape[:2]
        den = o_BTNV[..., -1:] + self.eps
        o = o_BTNV[..., :-1] / jnp.where(den == 0, 1.0, den)
        return self.o_proj(o.reshape(b, t, self.dim).astype(dtype))

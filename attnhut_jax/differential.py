"""Differential Transformer attention (Ye et al., 2024).

Each head computes two softmax maps and subtracts the second, scaled by a learned lambda, so that
common-mode attention noise cancels. A per-head RMSNorm and a (1 - lambda_init) scale keep the
output magnitude close to a normal head. As in attnhut, the paper's RoPE is omitted.

Because ``(A1 - lam * A2) V = A1 V - lam * (A2 V)``, the core here is two calls of the shared
attention function rather than a materialised difference of maps: the form flash kernels need.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import cache, core, registry
from .core import Array, Dtype


def lambda_init(depth: int) -> float:
    """Starting lambda for the layer at zero-based ``depth``: ``0.8 - 0.6 * exp(-0.3 * depth)``."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def _normal01(key, shape, dtype=jnp.float32):
    return 0.1 * nn.initializers.normal(1.0)(key, shape, dtype)


class DifferentialAttention(cache.ReadsEveryToken, nn.Module):
    """Two-softmax differential attention.

    Args mirror ``attnhut.DifferentialAttention``: ``dim`` (divisible by 2 * num_heads),
    ``num_heads``, ``depth`` (sets lambda_init), ``causal`` (True), ``bias``. Parameters: ``q``,
    ``k``, ``v``, ``proj``, ``head_norm`` (2 * head_dim), ``lambda_q1``, ``lambda_k1``,
    ``lambda_q2``, ``lambda_k2`` (head_dim each, N(0, 0.1)).

    ``impl`` (``auto`` | ``xla`` | ``cudnn``; no variable depends on it) picks the registry's
    ``dense`` op, ``core.cudnn_unsupported`` says when cuDNN can run; ``precision`` reaches every
    matmul (Flax's convention).
    Each map reads values twice as wide as its queries (V = 2H), which cuDNN's call does not take:
    ``cudnn`` always says so, and ``auto`` is ``xla``.

    ``decode=True`` (causal only): incremental decoding (``attnhut_jax.cache``) with a cache of
    the keys of both maps of every head (``key`` (B, 2N, max_len, H), head-major: map i of head j
    is row i * N + j) and the values (``value`` (B, N, max_len, 2H)); each step appends the
    chunk's keys and values, runs both softmax maps over every cached key at or before each
    query, and combines them with lambda and the head norm as the full forward does (XLA,
    whatever ``impl``). The ``params`` are those of ``decode=False``.
    """

    dim: int
    num_heads: int
    depth: int = 0
    causal: bool = True
    bias: bool = False
    impl: registry.DenseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads // 2

    @property
    def lambda_init(self) -> float:
        return lambda_init(self.depth)

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K (two maps per head) and V of every head,
        ``dim`` wide each."""
        return float(2 * self.dim * jnp.dtype(dtype).itemsize)

    def cache_bytes(self, batch: int, max_len: int, dtype: Dtype = jnp.bfloat16) -> int:
        """Bytes of the decode cache's arrays in ``dtype``: the keys of both maps of every head
        (``dim`` wide) and the values (``dim`` wide) per token, and the index."""
        return cache.dense_cache_bytes(batch, max_len, self.num_heads, 2 * self.head_dim,
                                       2 * self.head_dim, dtype)

    def setup(self) -> None:
        owner = "DifferentialAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads)
        core.check_divisible(owner, ("dim", self.dim), ("2 * num_heads", 2 * self.num_heads))
        if self.depth < 0:
            raise ValueError(f"{owner}: depth={self.depth} must be >= 0")
        registry.check(owner, "dense", self.impl)
        cache.check_causal(owner, self.decode, self.causal)
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.q = core.Linear(self.dim, axes=("embed", "heads"), **kw)
        self.k = core.Linear(self.dim, axes=("embed", "heads"), **kw)
        self.v = core.Linear(self.dim, axes=("embed", "heads"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)
        hd = self.head_dim
        self.head_norm = core.ones_param(self, "head_norm", 2 * hd, "head_dim", self.param_dtype)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, core.param(self, name, _normal01, (hd,), ("head_dim",),
                                           self.param_dtype))

    def lambda_value(self) -> Array:
        """lambda = exp(q1 . k1) - exp(q2 . k2) + lambda_init (a scalar)."""
        l1 = jnp.exp(jnp.sum(self.lambda_q1 * self.lambda_k1))
        l2 = jnp.exp(jnp.sum(self.lambda_q2 * self.lambda_k2))
        return l1 - l2 + self.lambda_init

    def __call__(self, x: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, lengths: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D).

        ``segment_ids`` (B, T) int: packed sequences (``core.check_packing``); both softmax maps
        read only keys of the query's own segment (and, when ``causal``, not later ones); id 0 is
        padding, zeroed on input and read by no token. ``positions`` (B, T) int is validated and
        otherwise unused: as in attnhut the paper's RoPE is omitted, and only RoPE reads positions.

        With ``decode=True``: ``x`` is the chunk to append, ``lengths`` (B,) the tokens each row
        appends (``attnhut_jax.cache``); ``segment_ids`` and ``positions`` are refused.
        """
        owner = "DifferentialAttention"
        core.check_input(x, self.dim, owner)
        cache.check_options(owner, decode=self.decode, lengths=lengths, segment_ids=segment_ids,
                            positions=positions)
        n, hd = self.num_heads, self.head_dim
        if self.decode:
            step = cache.begin(self, owner, x, lengths, sized_by="key", axis=2)
            b, t, _ = step.x.shape
            q_BTN2H = self.q(step.x).reshape(b, t, n, 2, hd)
            # head-major cache: the keys of map i of every head are rows [i * N, (i + 1) * N)
            k_BT2NH = self.k(step.x).reshape(b, t, n, 2, hd).swapaxes(2, 3)
            k_B2NSH = step.append("key", k_BT2NH.reshape(b, t, 2 * n, hd), heads_first=True)
            v_BNSV = step.append("value", self.v(step.x).reshape(b, t, n, 2 * hd),
                                 heads_first=True)
            keep = step.keep()
            if not step.initializing:  # read the written cache as it is (XLA would otherwise
                # fuse a second copy of each write into its readers and copy the whole cache)
                k_B2NSH, v_BNSV = jax.lax.optimization_barrier((k_B2NSH, v_BNSV))
            a1, a2 = _cached_maps(q_BTN2H, k_B2NSH, v_BNSV, keep, hd ** -0.5, self.precision)
            return step.finish(self._combine(a1, a2))
        seg, _ = core.check_packing(owner, x, segment_ids, positions)
        x = core.mask_padding(x, seg)
        keep = None if seg is None else core.segment_keep(seg, seg)
        b, t, _ = x.shape
        # Query/key head 2i and 2i + 1 form the pair of maps of differential head i.
        q_BTN2H = self.q(x).reshape(b, t, n, 2, hd)
        k_BSN2H = self.k(x).reshape(b, t, n, 2, hd)
        v_BSNV = self.v(x).reshape(b, t, n, 2 * hd)
        a1, a2 = (registry.call(owner, "dense", self.impl, q_BTN2H[:, :, :, i], k_BSN2H[:, :, :, i],
                                v_BSNV, keep=keep, causal=self.causal, scale=hd ** -0.5,
                                precision=self.precision) for i in (0, 1))
        return self._combine(a1, a2)

    def _combine(self, a1_BTNV: Array, a2_BTNV: Array) -> Array:
        """The two maps' outputs (B, T, N, 2H) -> (B, T, D): difference, head norm, projection."""
        b, t = a1_BTNV.shape[:2]
        out = a1_BTNV - self.lambda_value().astype(a2_BTNV.dtype) * a2_BTNV
        out = core.rms_norm(out, self.head_norm, eps=1e-5) * (1 - self.lambda_init)
        return self.proj(out.reshape(b, t, self.dim))


def _cached_maps(q_BTN2H: Array, k_B2NSH: Array, v_BNSV: Array, keep_BTS: Array, scale: float,
                 precision: core.Precision) -> tuple[Array, Array]:
    """The two softmax maps of a decode chunk over the head-major cache, (B, T, N, 2H) each.
    Both maps' logits come from one product with the cache as its left operand (no slice or
    transpose of the cache), and both read the values in one pass (``cache.read_values``: V read once)."""
    b, t, n, _, h = q_BTN2H.shape
    s = k_B2NSH.shape[2]
    q_B2NTH = q_BTN2H.transpose(0, 3, 2, 1, 4).reshape(b, 2 * n, t, h)  # row i * N + j
    logits_B2NST = jax.lax.dot_general(k_B2NSH, q_B2NTH, (((3,), (3,)), ((0, 1), (0, 1))),
                                       precision=precision)
    logits = logits_B2NST.reshape(b, 2, n, s, t).swapaxes(3, 4)
    logits = logits.astype(core.softmax_dtype(q_BTN2H.dtype)) * scale
    probs_B2NTS = core.masked_softmax(logits, keep_BTS[:, None, None])
    probs_BNXS = probs_B2NTS.transpose(0, 2, 1, 3, 4).reshape(b, n, 2 * t, s)
    out_BN2TV = cache.read_values(probs_BNXS, v_BNSV, precision).reshape(b, n, 2, t, -1)
    out_B2TNV = out_BN2TV.transpose(0, 2, 3, 1, 4)
    return out_B2TNV[:, 0], out_B2TNV[:, 1]

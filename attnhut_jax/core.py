"""Shared building blocks: every mechanism imports this module and nothing else of its siblings.

Array names and einsum strings follow the project's one dimension key, written in
``pallas_kernels/__init__.py`` (B batch, T query length, S key length, N query heads, K kv heads,
G heads per kv head, H query/key head width, V value head width, ...).

Semantics follow attnhut 0.5.0 (``attnhut/utils.py``, ``attnhut/rope.py``):

* masked logits are filled with the dtype's most negative *finite* value, never ``-inf``;
* a query row with no visible key returns zeros (torch's SDPA does the same for such rows);
* the softmax runs in float32 when the operands are half precision;
* query head ``n`` reads kv head ``n // G`` (contiguous grouping, as ``repeat_kv``);
* the causal rule lets query ``i`` see key ``j`` when ``j <= i + (S - T)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes

from pallas_kernels import block_sparse, gated_delta, token_sparse

from . import registry

Array = jax.Array
Dtype = Any
Precision = jax.lax.PrecisionLike

# ----------------------------------------------------------------------------- validation


def check_input(x: Array, dim: int, owner: str) -> None:
    """Raise if ``x`` is not a (batch, seq, dim) array."""
    if not hasattr(x, "ndim") or not hasattr(x, "shape"):
        raise TypeError(f"{owner}: expected an array of shape (batch, seq, {dim}), got {type(x)!r}")
    if x.ndim != 3:
        raise ValueError(
            f"{owner}: expected input of rank 3 (batch, seq, dim={dim}), got shape {tuple(x.shape)}"
        )
    if x.shape[-1] != dim:
        raise ValueError(f"{owner}: input width {x.shape[-1]} != dim={dim} (shape {tuple(x.shape)})")
    if x.shape[1] < 1:
        raise ValueError(f"{owner}: sequence length must be >= 1, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{owner}: input must be floating point, got dtype {x.dtype}")


def check_positive(owner: str, **values: int) -> None:
    """Raise ``TypeError`` naming every value that is not an integer (a size: Python or NumPy
    int, not bool), then ``ValueError`` naming every one that is not >= 1."""
    wrong = {k: v for k, v in values.items() if v is not None
             and (isinstance(v, bool) or not isinstance(v, (int, np.integer)))}
    if wrong:
        named = ", ".join(f"{k}={v!r} ({type(v).__name__})" for k, v in wrong.items())
        raise TypeError(f"{owner}: {named} must be an integer")
    bad = {k: v for k, v in values.items() if v is None or v < 1}
    if bad:
        named = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise ValueError(f"{owner}: {named} must be >= 1")


def check_divisible(owner: str, num: tuple[str, int], den: tuple[str, int]) -> None:
    """Raise ``ValueError`` unless ``num`` is divisible by ``den`` (both given as (name, value))."""
    (nn_, nv), (dn, dv) = num, den
    if dv < 1 or nv % dv != 0:
        raise ValueError(f"{owner}: {nn_}={nv} must be divisible by {dn}={dv}")


# ----------------------------------------------------------------------------- packed sequences
#
# ``segment_ids`` (B, T) int: token t reads key s only when both carry the same id and that id
# is not 0; id 0 marks padding, which no token reads. ``positions`` (B, T) int: the positions
# RoPE reads (default ``arange(T)``). Both are call arguments, default None (one segment, no
# padding). Causality stays on the index in the row, which within a segment is the same order.


def check_packing(owner: str, x: Array, segment_ids: Array | None,
                  positions: Array | None) -> tuple[Array | None, Array | None]:
    """Validate ``segment_ids`` / ``positions`` against ``x`` (B, T, D); returns them as int32."""
    b, t = x.shape[0], x.shape[1]
    out = []
    for name, a in (("segment_ids", segment_ids), ("positions", positions)):
        if a is None:
            out.append(None)
            continue
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{owner}: {name} must be an integer array of shape (batch, seq)=({b}, "
                            f"{t}), got {type(a)!r}")
        if tuple(a.shape) != (b, t):
            raise ValueError(f"{owner}: {name} must have shape (batch, seq)=({b}, {t}) like the "
                             f"input {tuple(x.shape)}, got {tuple(a.shape)}")
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise TypeError(f"{owner}: {name} must be an integer array, got dtype {a.dtype}")
        out.append(jnp.asarray(a, jnp.int32))
    return out[0], out[1]


def reject_packing(owner: str, segment_ids: Array | None, why: str) -> None:
    """Raise for a module that cannot take packed sequences, saying why."""
    if segment_ids is not None:
        raise ValueError(f"{owner} cannot take segment_ids: {why}")


def mask_padding(x_BTD: Array, segment_ids_BT: Array | None) -> Array:
    """``x`` with its padding tokens (segment id 0) replaced by zeros, so that a NaN or inf there
    reaches no output and padding inputs get exactly zero gradient."""
    if segment_ids_BT is None:
        return x_BTD
    return jnp.where(segment_ids_BT[..., None] != 0, x_BTD, jnp.zeros((), x_BTD.dtype))


def segment_keep(q_seg_BT: Array, k_seg_BS: Array) -> Array:
    """(B, 1, T, S) bool: query t may read key s (same segment, key not padding). Dense paths
    only: it is a (T, S) array."""
    same = q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    return (same & (k_seg_BS != 0)[:, None, :])[:, None]


def rope_positions(positions_BT: Array | None, t: int) -> Array:
    """The positions RoPE reads: ``positions`` (B, T) when given, else ``arange(T)``."""
    return jnp.arange(t) if positions_BT is None else positions_BT


def query_weights(segment_ids_BT: Array | None, b: int, t: int) -> Array:
    """(B, T) float32: 1 for queries that count in a per-query mean (not padding), else 0."""
    if segment_ids_BT is None:
        return jnp.ones((b, t), jnp.float32)
    return (segment_ids_BT != 0).astype(jnp.float32)


# ----------------------------------------------------------------------------- parameters


def torch_linear_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default for Linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LogicalAxes(nn.LogicallyPartitioned):
    """``nn.LogicallyPartitioned`` whose names stay *logical* when Flax NNX wraps the module.

    The names (``embed``, ``heads``, ...) are logical axes that a user maps onto a mesh with
    ``nn.logical_axis_rules``, not mesh axes. ``nnx.bridge.ToNNX`` would otherwise shard each
    variable eagerly at creation, reading the logical names as mesh axes, which fails without a
    mesh; here the NNX variable keeps the names as ``out_sharding`` metadata and is created
    unsharded, as in linen (shard it with the rules, e.g. ``nnx.get_partition_spec``).
    """

    def _get_partition_name(self, params: dict[Any, Any]) -> str | None:
        """The name of an axis that ``nn.scan`` / ``nn.vmap`` adds (stacked layers): the one given
        as ``metadata_params={nn.PARTITION_NAME: ...}``, else None (an unnamed, replicated axis),
        so the usual ``nn.scan(..., variable_axes={"params": 0})`` works as it is."""
        return params.get(nn.PARTITION_NAME)

    def to_nnx_metadata(self) -> dict[str, Any]:
        metadata = dict(vars(self))
        metadata["out_sharding"] = metadata.pop("names")
        metadata["sharding_rules"] = metadata.pop("rules")
        metadata["eager_sharding"] = False
        return metadata


def logical(init, axes: Sequence[str | None]):
    """``nn.with_logical_partitioning(init, axes)`` boxing the value as ``LogicalAxes``."""
    names = tuple(axes)

    def boxed(*args, **kwargs):
        return LogicalAxes(init(*args, **kwargs), names)

    return boxed


def param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str | None],
          dtype: Dtype) -> Array:
    """Declare a parameter whose value carries logical axis names (``LogicalAxes``)."""
    return module.param(name, logical(init, axes), tuple(shape), dtype)


def ones_param(module: nn.Module, name: str, size: int, axis: str | None, dtype: Dtype) -> Array:
    """A norm weight initialised to one, as ``nn.Parameter(torch.ones(size))``."""
    return param(module, name, nn.initializers.ones_init(), (size,), (axis,), dtype)


class Linear(nn.Module):
    """``torch.nn.Linear`` as a Flax module: parameters ``kernel`` (in, out) and ``bias`` (out,).

    ``axes`` names the logical axes of the kernel (input axis, output axis); ``precision`` is
    the matmul's (``jax.lax.PrecisionLike``, Flax's convention).
    """

    features: int
    use_bias: bool = False
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Precision = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fan_in = x.shape[-1]
        init = torch_linear_init(fan_in)
        kernel = param(self, "kernel", init, (fan_in, self.features), self.axes, self.param_dtype)
        bias = (param(self, "bias", init, (self.features,), self.axes[1:], self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        # the leading axes flattened into one: the kernel's gradient is then one product
        # contracting the tokens, (Y, B*T) x (B*T, O). Contracting (B, T) as two axes, XLA:CPU
        # copies the (B, T, O) cotangent into an (O, B, T) layout first, fused into whatever
        # produced it (1.3 s of Gated DeltaNet's 4.8 s forward + backward at T = 8192).
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, fan_in), kernel, precision=self.precision)
        y = y.reshape(*lead, self.features)
        return y + bias if bias is not None else y


# ----------------------------------------------------------------------------- norms


def layer_norm(name: str, dtype: Dtype | None, param_dtype: Dtype) -> nn.LayerNorm:
    """``torch.nn.LayerNorm(dim)``: eps 1e-5, two-pass variance, ``scale``/``bias`` on ``embed``."""
    return nn.LayerNorm(
        epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=logical(nn.initializers.ones_init(), ("embed",)),
        bias_init=logical(nn.initializers.zeros_init(), ("embed",)))


def rms_norm(x: Array, weight: Array, eps: float = 1e-6) -> Array:
    """RMSNorm over the last axis, as ``torch.nn.functional.rms_norm`` (statistics in float32)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * weight.astype(y.dtype)).astype(x.dtype)


# ----------------------------------------------------------------------------- rope


RopeStyle = Literal["half", "interleaved"]
ROPE_STYLES: tuple[str, ...] = get_args(RopeStyle)
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A RoPE frequency scaling, as Hugging Face's ``rope_parameters`` name them.

    ``type``:

    * ``"linear"`` (position interpolation): every inverse frequency divided by ``factor``.
    * ``"dynamic"`` (dynamic NTK): the base grows with the call's length L = max(position) + 1
      once L exceeds ``original_max_position_embeddings`` (HF's ``max_position_embeddings``):
      base * ((factor * L / original) - (factor - 1)) ** (R / (R - 2)). A decode step's L is
      its own largest position, so the cached keys keep the frequencies of the call that wrote
      them (what HF's cached generation computes).
    * ``"yarn"`` (Peng et al., 2023): frequencies blended between interpolated and extrapolated
      by a linear ramp over the dimensions whose wavelengths lie between ``beta_fast`` and
      ``beta_slow`` rotations of ``original_max_position_embeddings``; cos and sin are scaled
      by ``attention_factor`` (default 0.1 ln(factor) + 1, or the ratio of the ``mscale`` /
      ``mscale_all_dim`` terms when both are given).
    * ``"llama3"``: Llama 3.1's per-band rule: wavelengths above ``original / low_freq_factor``
      divided by ``factor``, below ``original / high_freq_factor`` kept, a smooth blend between.

    ``RopeScaling.from_hf(rope_parameters, max_position_embeddings)`` reads a Hugging Face config
    entry and refuses the types it does not implement by name.
    """

    type: str
    factor: float
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(f"RopeScaling: type={self.type!r} is not one of {ROPE_SCALING_TYPES}")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling: factor={self.factor} must be > 0")
        if self.type != "linear" and not (self.original_max_position_embeddings or 0) > 0:
            raise ValueError(f"RopeScaling: type={self.type!r} needs a positive "
                             f"original_max_position_embeddings, got "
                             f"{self.original_max_position_embeddings}")
        if self.type != "yarn":
            for name in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self, name) is not None:
                    raise ValueError(f"RopeScaling: {name}={getattr(self, name)} is YaRN's; "
                                     f"type={self.type!r} does not read it")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"RopeScaling: llama3 needs high_freq_factor={self.high_freq_factor}"
                             f" > low_freq_factor={self.low_freq_factor} > 0")

    @classmethod
    def from_hf(cls, params: dict | None, max_position_embeddings: int | None = None
                ) -> RopeScaling | None:
        """The scaling of a Hugging Face ``rope_parameters`` / ``rope_scaling`` dict (None for
        ``default`` or no dict). Unknown types (``longrope``, ...) and keys this class does not
        read are refused by name."""
        if not params:
            return None
        p = dict(params)
        kind = p.pop("rope_type", p.pop("type", "default"))
        p.pop("rope_theta", None)
        p.pop("partial_rotary_factor", None)
        if kind == "default":
            return None
        if kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"RoPE scaling type {kind!r} is not implemented (known: "
                             f"{ROPE_SCALING_TYPES})")
        known = {f.name for f in dataclasses.fields(cls)} - {"type"}
        unknown = sorted(set(p) - known)
        if unknown:
            raise ValueError(f"RoPE scaling {kind!r}: unknown parameters {unknown}")
        factor = p.pop("factor", None)
        original = p.pop("original_max_position_embeddings", None)
        if kind == "dynamic":
            original = max_position_embeddings  # HF's dynamic NTK grows past this one
        elif original is None:
            original = max_position_embeddings
        if factor is None and kind == "yarn" and original and max_position_embeddings:
            factor = max_position_embeddings / original
        if factor is None:
            raise ValueError(f"RoPE scaling {kind!r} needs a factor")
        kw = {k: v for k, v in p.items() if v is not None}
        for name in ("beta_fast", "beta_slow"):  # HF: ``get(name) or default``
            if name in kw and not kw[name]:
                del kw[name]
        return cls(kind, float(factor), original, **kw)

    def attention_scale(self) -> float:
        """The factor cos and sin are multiplied by (1.0 except for YaRN)."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
        return mscale(self.factor)


def check_rope_options(owner: str, style: str, scaling: object) -> None:
    """A module's ``rope_style`` and ``rope_scaling`` fields: a known style, a ``RopeScaling``."""
    if style not in ROPE_STYLES:
        raise ValueError(f"{owner}: rope_style={style!r} is not one of {ROPE_STYLES}")
    if scaling is not None and not isinstance(scaling, RopeScaling):
        raise TypeError(f"{owner}: rope_scaling must be a core.RopeScaling (build one from a "
                        f"Hugging Face dict with RopeScaling.from_hf), got "
                        f"{type(scaling).__name__}")


def rope_inverse_frequencies(dim: int, theta: float, scaling: RopeScaling | None = None
                             ) -> np.ndarray:
    """(dim // 2,) float64 inverse frequencies of a RoPE of width ``dim`` (static scalings only:
    ``dynamic`` depends on the positions, see ``rope_tables``)."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if scaling is None or scaling.type == "dynamic":
        return inv
    f = scaling.factor
    if scaling.type == "linear":
        return inv / f
    orig = scaling.original_max_position_embeddings
    if scaling.type == "llama3":
        low_wl, high_wl = orig / scaling.low_freq_factor, orig / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / f, inv)
        smooth = (orig / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blend = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, blend, scaled)
    # yarn

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    return inv / f * (1 - extrapolate) + inv * extrapolate


def rope_tables(positions: Array, dim: int, theta: float = 10000.0,
                dtype: Dtype = jnp.float32, *, scaling: RopeScaling | None = None,
                style: RopeStyle = "half") -> tuple[Array, Array]:
    """cos/sin tables of shape ``positions.shape + (dim,)`` for ``apply_rope``.

    ``positions`` is (T,) for positions shared by the batch or (B, T) per sample. ``style``
    ``"half"`` pairs channel i with i + dim / 2 (GPT-NeoX / Llama layout), ``"interleaved"``
    pairs 2i with 2i + 1 (GPT-J / the original RoFormer / DeepSeek's layout); ``scaling`` as
    ``RopeScaling``.
    """
    if dim <= 0 or dim % 2 != 0:
        raise ValueError(f"RoPE dim must be a positive even number, got {dim}")
    if style not in ROPE_STYLES:
        raise ValueError(f"RoPE style {style!r} is not one of {ROPE_STYLES}")
    pos = jnp.asarray(positions).astype(jnp.float32)
    if scaling is not None and scaling.type == "dynamic":
        if dim < 4:
            raise ValueError(f"dynamic NTK RoPE needs dim >= 4, got {dim}")
        orig = scaling.original_max_position_embeddings
        length = jnp.maximum(jnp.max(pos) + 1.0, float(orig))
        base = theta * ((scaling.factor * length / orig) - (scaling.factor - 1)) ** (
            dim / (dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    elif scaling is None:  # float32, as attnhut and transformers compute it
        inv = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    else:
        inv = jnp.asarray(rope_inverse_frequencies(dim, theta, scaling), jnp.float32)
    freqs = pos[..., None] * inv
    emb = (jnp.concatenate([freqs, freqs], axis=-1) if style == "half"
           else jnp.repeat(freqs, 2, axis=-1))
    scale = 1.0 if scaling is None else scaling.attention_scale()
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def _rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _rotate_pairs(x: Array) -> Array:
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x_BTNH: Array, cos: Array, sin: Array, style: RopeStyle = "half") -> Array:
    """Rotate the leading ``R = cos.shape[-1]`` channels of every head; pass the rest through.

    ``x`` is (B, T, N, H) with ``H >= R``; ``cos``/``sin`` are (T, R) or (B, T, R) from
    ``rope_tables`` with the same ``style``. ``R == H`` is full RoPE, ``R < H`` partial RoPE
    (MiniMax's ``rope_dim``). The interleaved style rotates the pairs in place (HF's DeepSeek
    code permutes them to the half layout first; q . k is the same).
    """
    r, h = cos.shape[-1], x_BTNH.shape[-1]
    if r % 2 != 0 or r > h:
        raise ValueError(f"rope width {r} must be even and <= head width {h}")
    if cos.ndim == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot, rest = x_BTNH[..., :r], x_BTNH[..., r:]
    rotate = _rotate_half if style == "half" else _rotate_pairs
    rot = rot * cos + rotate(rot) * sin
    return rot if r == h else jnp.concatenate([rot, rest], axis=-1)


# ----------------------------------------------------------------------------- masks


def causal_mask(q_len: int, k_len: int) -> Array:
    """Boolean (q_len, k_len), True where query ``i`` may read key ``j``: ``j <= i + k_len - q_len``."""
    i = jnp.arange(q_len)[:, None]
    j = jnp.arange(k_len)[None, :]
    return j <= i + (k_len - q_len)


def sliding_window_mask(t: int, window: int, sink: int = 0) -> Array:
    """(T, T) bool: causal, and key ``j`` among the ``window`` latest keys (``j > i - window``) or
    among the first ``sink`` keys."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    return (j <= i) & ((j > i - window) | (j < sink))


def topk_keep(scores: Array, valid: Array, top_k: int) -> Array:
    """Bool like ``scores`` (..., S): each row's ``min(top_k, S)`` best keys, then ``& valid``.

    Ties at the k-th score go to the lower key index (``jax.lax.top_k``'s order). Invalid keys
    should carry the fill value: they are picked only when a row has fewer than ``top_k`` valid
    keys and are then removed by ``& valid`` (attnhut's rule).
    """
    _, idx = jax.lax.top_k(scores, min(top_k, scores.shape[-1]))
    hit = jnp.put_along_axis(jnp.zeros(scores.shape, bool), idx, True, axis=-1, inplace=False)
    return hit & valid


def lightning_scores(q_BTIE: Array, k_BSE: Array, w_BTI: Array,
                     precision: Precision = None) -> Array:
    """Lightning-indexer scores ``I[t, s] = sum_i w[t, i] * ReLU(q[t, i] . k[s])``, (B, T, S),
    always in float32 with the operands upcast first: the one scoring that every selector impl
    (reference, xla, pallas, ``return_aux``) ranks, so all pick the same keys whatever the
    selector dtype."""
    return token_sparse.indexer_scores_reference(q_BTIE, k_BSE, w_BTI, precision=precision)


def masked_lightning_scores(q_BTIE: Array, k_BSE: Array, w_BTI: Array, valid_TS: Array,
                            precision: Precision = None) -> Array:
    """``lightning_scores`` with the fill value where ``valid_TS`` is False: what DSA's and CSA's
    selections rank (S is CSA's compressed entries)."""
    scores_BTS = lightning_scores(q_BTIE, k_BSE, w_BTI, precision)
    return jnp.where(valid_TS, scores_BTS, mask_value(scores_BTS.dtype))


def mask_value(dtype: Dtype) -> float:
    """The single fill value used for masked logits: the dtype's most negative finite number."""
    return float(jnp.finfo(dtype).min)


def split_attn_mask(attn_mask: Array | None, shape_BNTS: tuple[int, int, int, int],
                    owner: str) -> tuple[Array | None, Array | None]:
    """Validate a user ``attn_mask`` as torch's SDPA reads it and split it into (keep, bias).

    A boolean mask is ``keep`` (True = may attend). A floating mask is an additive ``bias``;
    its ``-inf`` entries are also turned into ``keep=False`` so that no row can go NaN.
    Either must broadcast to (B, N, T, S).
    """
    if attn_mask is None:
        return None, None
    if not hasattr(attn_mask, "shape") or not hasattr(attn_mask, "dtype"):
        raise TypeError(f"{owner}: attn_mask must be an array, got {type(attn_mask)!r}")
    mshape = tuple(attn_mask.shape)
    ok = len(mshape) <= 4 and all(
        m in (1, t) for m, t in zip(mshape[::-1], shape_BNTS[::-1], strict=False))
    if not ok:
        raise ValueError(
            f"{owner}: attn_mask of shape {mshape} does not broadcast to "
            f"(batch, heads, q_len, k_len)={shape_BNTS}")
    if attn_mask.dtype == jnp.bool_:
        return attn_mask, None
    if jnp.issubdtype(attn_mask.dtype, jnp.floating):
        return ~jnp.isneginf(attn_mask), attn_mask
    raise TypeError(f"{owner}: attn_mask must be boolean or floating point, got {attn_mask.dtype}")


# ----------------------------------------------------------------------------- attention core


def softmax_dtype(dtype: Dtype) -> Dtype:
    """float32 for half-precision operands, the operand dtype otherwise."""
    return jnp.promote_types(dtype, jnp.float32)


def attention_weights(
    q_BTNH: Array,
    k_BSKH: Array,
    *,
    keep: Array | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    sink: Array | None = None,
    precision: Precision = None,
) -> Array:
    """The attention probabilities of ``dot_product_attention``, as (B, K, G, T, S).

    Args:
      q_BTNH: queries (B, T, N, H).
      k_BSKH: keys (B, S, K, H), K dividing N; query head n reads kv head n // (N // K).
      keep: boolean, broadcastable to (B, N, T, S) or, per kv group, (B, K, T, S);
        True where a query may read a key.
      bias: additive logits, broadcastable like ``keep``.
      scale: logit scale, default ``H ** -0.5``.
      sink: optional per-head logit (N,) that joins every row's softmax denominator and reads
        no value (an attention sink, as in DeepSeek-V4's compressed attention).
      precision: of the logits' matmul (``jax.lax.PrecisionLike``).

    The probabilities are in float32 for half-precision operands; rows with no visible key
    are zeros.
    """
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    if k < 1 or n % k != 0:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k}")
    g = n // k
    scale = h ** -0.5 if scale is None else scale
    # Head-major operands: XLA:CPU runs these batched matmuls about 2x faster than the same
    # einsums written on (B, T, N, H) operands.
    q_BKGTH = q_BTNH.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)
    k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH, precision=precision)
    logits = logits.astype(softmax_dtype(q_BTNH.dtype)) * scale
    if bias is not None:
        logits = logits + _group_heads(bias, n, k).astype(logits.dtype)
    sink_KG = None if sink is None else sink.reshape(k, g).astype(logits.dtype)
    return masked_softmax(logits, None if keep is None else _group_heads(keep, n, k),
                          None if sink_KG is None else sink_KG[None, :, :, None, None])


def dot_product_attention(
    q_BTNH: Array,
    k_BSKH: Array,
    v_BSKV: Array,
    *,
    keep: Array | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    sink: Array | None = None,
    precision: Precision = None,
) -> Array:
    """Masked-softmax attention with GQA grouping; a pure function of arrays.

    ``v_BSKV`` is (B, S, K, V) (V may differ from H, as in MLA); the other arguments are those
    of ``attention_weights``. ``dropout_rate`` drops attention weights (inverted scaling) with
    ``dropout_rng``. Returns (B, T, N, V); rows with no visible key are zeros.

    Non-finite inputs: a row depends only on what it reads. NaN or inf in a key or value that
    ``keep`` hides from a row (a later token under the causal rule, another segment, padding)
    changes neither that row's output nor any gradient that flows through it; plain masked
    attention would still multiply the hidden value by its zero weight (``0 * nan = nan``) and
    turn the row NaN (and, backwards, every row's query gradient). A row that reads a non-finite
    query, key or value (``keep`` True for it, or no ``keep``) is NaN in every channel, so
    nothing non-finite is hidden in the output; no gradient flows back through such a row (its
    cotangent, NaN or not, reaches no input), so a NaN there cannot spread to the inputs of
    other rows either. An additive ``bias`` is not screened (it is the caller's). On finite
    inputs the result is bit for bit the plain computation: the screening costs one ``isfinite``
    pass over q, k, v and one reduction over ``keep``, no matmul.
    """
    q_BTNH, k_BSKH, v_BSKV, bad_BTN1 = _screen_nonfinite(q_BTNH, k_BSKH, v_BSKV, keep)
    probs = attention_weights(q_BTNH, k_BSKH, keep=keep, bias=bias, scale=scale, sink=sink,
                              precision=precision)
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 needs a dropout_rng")
        keep_drop = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep_drop, probs / (1.0 - dropout_rate), 0.0)
    out_BTNV = attend(probs, v_BSKV, precision=precision)
    return jnp.where(bad_BTN1, jnp.asarray(jnp.nan, out_BTNV.dtype), out_BTNV)


def _screen_nonfinite(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array,
                      keep: Array | None) -> tuple[Array, Array, Array, Array]:
    """(q, k, v) with every head row holding a non-finite entry replaced by zeros, and (B, T, N, 1)
    bool: the rows that read a non-finite query, key or value, which ``dot_product_attention``
    sets to NaN (see there)."""
    b, t, n, _ = q_BTNH.shape
    kv = k_BSKH.shape[2]
    ok_q_BTN = jnp.all(jnp.isfinite(q_BTNH), axis=-1)
    ok_k_BSK = jnp.all(jnp.isfinite(k_BSKH), axis=-1)
    ok_v_BSK = jnp.all(jnp.isfinite(v_BSKV), axis=-1)
    q_BTNH = jnp.where(ok_q_BTN[..., None], q_BTNH, jnp.zeros((), q_BTNH.dtype))
    k_BSKH = jnp.where(ok_k_BSK[..., None], k_BSKH, jnp.zeros((), k_BSKH.dtype))
    v_BSKV = jnp.where(ok_v_BSK[..., None], v_BSKV, jnp.zeros((), v_BSKV.dtype))
    bad_q_BKGT = ~ok_q_BTN.reshape(b, t, kv, n // kv).transpose(0, 2, 3, 1)
    bad_kv_BK11S = ~(ok_k_BSK & ok_v_BSK).transpose(0, 2, 1)[:, :, None, None, :]
    if keep is None:
        reads_any_BKGT = jnp.asarray(k_BSKH.shape[1] > 0)
        reads_bad_BKGT = jnp.any(bad_kv_BK11S, axis=-1)
    else:
        keep_BKGTS = _group_heads(keep, n, kv)
        reads_any_BKGT = jnp.any(keep_BKGTS, axis=-1)
        reads_bad_BKGT = jnp.any(keep_BKGTS & bad_kv_BK11S, axis=-1)
    bad_BKGT = jnp.broadcast_to((bad_q_BKGT & reads_any_BKGT) | reads_bad_BKGT, (b, kv, n // kv, t))
    bad_BTN1 = bad_BKGT.transpose(0, 3, 1, 2).reshape(b, t, n, 1)
    return q_BTNH, k_BSKH, v_BSKV, bad_BTN1


def attend(probs_BKGTS: Array, v_BSKV: Array, precision: Precision = None) -> Array:
    """Weights (B, K, G, T, S) times values (B, S, K, V) -> (B, T, N, V)."""
    b, k, g, t, _ = probs_BKGTS.shape
    v_BKSV = v_BSKV.transpose(0, 2, 1, 3)
    out = jnp.einsum("BKGTS,BKSV->BKGTV", probs_BKGTS.astype(v_BSKV.dtype), v_BKSV,
                     precision=precision)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, v_BSKV.shape[-1])


def _group_heads(a: Array, n: int, k: int) -> Array:
    """A mask or bias broadcastable to (B, N, T, S) or (B, K, T, S), as (B, K|1, G|1, T, S)."""
    a = a.reshape((1,) * (4 - a.ndim) + tuple(a.shape))
    if a.shape[1] == n and n != k:
        return a.reshape(a.shape[0], k, n // k, *a.shape[2:])
    if a.shape[1] not in (1, k):
        raise ValueError(f"mask head axis {a.shape[1]} is neither 1, N={n} nor K={k}")
    return a[:, :, None]


def masked_softmax(logits: Array, keep: Array | None, sink: Array | None = None) -> Array:
    """Softmax over the last axis with attnhut's rule: finite fill, rows without a key give zeros.

    Written as one max / exp / sum pass (the max is a constant for the gradient) so that XLA
    fuses it; masked entries are exactly zero and an empty row divides 0 by 1. ``sink``
    (broadcastable to ``logits.shape[:-1] + (1,)``) is an extra logit in the denominator only.
    """
    if keep is None and sink is None:
        return jax.nn.softmax(logits, axis=-1)
    if keep is not None:
        keep = jnp.broadcast_to(keep, logits.shape)
        logits = jnp.where(keep, logits, mask_value(logits.dtype))
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if sink is not None:
        row_max = jnp.maximum(row_max, sink)
    row_max = jax.lax.stop_gradient(row_max)
    e = jnp.exp(logits - row_max)
    if keep is not None:
        e = jnp.where(keep, e, 0.0)
    den = jnp.sum(e, axis=-1, keepdims=True)
    if sink is not None:
        den = den + jnp.exp(sink - row_max)
    return e / jnp.where(den == 0.0, 1.0, den)


def attention_dropout(module: nn.Module, rate: float, deterministic: bool) -> tuple[float, Array | None]:
    """(rate, rng) for ``dot_product_attention``: the ``'dropout'`` stream when training."""
    if deterministic or rate == 0.0:
        return 0.0, None
    return rate, module.make_rng("dropout")


# ----------------------------------------------------------------------------- dense core
#
# The ``dense`` operation of the registry: (B, T, N, H) queries against (B, S, K, H) keys and
# (B, S, K, V) values, with an optional boolean ``keep``, additive ``bias``, the ``causal`` rule
# (added to ``keep``) and attention dropout. ``xla`` is ``dot_product_attention``; ``cudnn`` is
# ``jax.nn.dot_product_attention(implementation="cudnn")`` where cuDNN can run the call.


@registry.register("dense", "xla")
def dense_attention_xla(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, *, keep: Array | None = None,
                        bias: Array | None = None, causal: bool = False,
                        scale: float | None = None, dropout_rate: float = 0.0,
                        dropout_rng: Array | None = None, precision: Precision = None,
                        sink: Array | None = None, window: tuple[int, int] | None = None) -> Array:
    """The dense core in XLA: ``dot_product_attention`` with ``causal`` and ``window`` folded
    into ``keep``."""
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    if causal:
        rule = causal_mask(t, s)
        keep = rule if keep is None else keep & rule
    if window is not None:
        rule = window_keep(jnp.arange(t) + s - t, jnp.arange(s), window)
        keep = rule if keep is None else keep & rule
    return dot_product_attention(q_BTNH, k_BSKH, v_BSKV, keep=keep, bias=bias, scale=scale,
                                 dropout_rate=dropout_rate, dropout_rng=dropout_rng, sink=sink,
                                 precision=precision)


def window_keep(q_pos_T: Array, k_pos_S: Array, window: tuple[int, int]) -> Array:
    """(T, S) bool: key position k within ``window = (left, right)`` of query position q:
    ``q - left < k <= q + right`` (``left`` keys up to and including the query's own position,
    ``right`` after it; a causal sliding window of W keys is (W, 0))."""
    left, right = window
    d = k_pos_S[None, :] - q_pos_T[:, None]
    return (d > -left) & (d <= right)


_CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def cudnn_unsupported(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, *, keep: Array | None = None,
                      bias: Array | None = None, causal: bool = False, dropout_rate: float = 0.0,
                      backend: str | None = None, sink: Array | None = None,
                      window: tuple[int, int] | None = None, **_) -> str | None:
    """Why ``jax.nn.dot_product_attention(implementation="cudnn")`` cannot run this call, or
    None. Mirrors jax's own checks (``jax._src.cudnn.fused_attention_stablehlo``): a GPU backend,
    float16/bfloat16 operands of one dtype, V == H, a head width that is a multiple of 8 up to 128
    (256 from Hopper on), no attention dropout, causal only with T == S, masks and biases of
    supported shapes. The dense modules' ``impl="cudnn"`` raises a ``ValueError`` with this
    sentence; ``auto`` takes cuDNN only where this returns None."""
    backend = backend or jax.default_backend()
    if backend != "gpu":
        return (f"cuDNN attention needs an NVIDIA GPU, and JAX's default backend is "
                f"{backend!r}")
    dtypes_ = {jnp.dtype(a.dtype) for a in (q_BTNH, k_BSKH, v_BSKV)}
    if len(dtypes_) != 1 or next(iter(dtypes_)) not in _CUDNN_DTYPES:
        return (f"cuDNN attention takes float16 or bfloat16 operands of one dtype, got "
                f"q/k/v {q_BTNH.dtype}/{k_BSKH.dtype}/{v_BSKV.dtype} (set dtype=jnp.bfloat16)")
    t, h, s, v = q_BTNH.shape[1], q_BTNH.shape[-1], k_BSKH.shape[1], v_BSKV.shape[-1]
    if v != h:
        return (f"value head width V={v} differs from query/key head width H={h}; "
                f"jax.nn.dot_product_attention needs V == H")
    major = int(str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0])
    h_max = 256 if major >= 9 else 128
    if h % 8 != 0 or h > h_max:
        return f"head width H={h} must be a multiple of 8 and <= {h_max} on this GPU"
    if dropout_rate > 0.0:
        return (f"attention dropout (rate {dropout_rate}) is not offered by "
                f"jax.nn.dot_product_attention; use deterministic=True or impl='xla'")
    if causal and t != s:
        return f"the causal rule with T={t} != S={s} is bottom-right aligned here, not in cuDNN"
    if sink is not None:
        return "per-head sink logits are not offered by jax.nn.dot_product_attention"
    if window is not None and t != s:
        return f"a sliding window with T={t} != S={s} (cuDNN aligns windows top-left)"
    if window is not None and not causal:
        return (f"a bidirectional window {tuple(window)}: jax's cuDNN local window needs the "
                f"causal mask (impl='auto' runs it on the block-sparse op)")
    if (keep is not None or bias is not None) and (t % 2 or s % 2):
        return f"a mask or bias needs even lengths for cuDNN's backward, got T={t}, S={s}"
    return None


def _full_ts(a: Array, t: int, s: int) -> Array:
    """A (.., T|1, S|1) mask or bias as rank 4 with full (T, S) axes, as cuDNN's bias needs."""
    a = a.reshape((1,) * (4 - a.ndim) + tuple(a.shape))
    return jnp.broadcast_to(a, (*a.shape[:2], t, s))


@registry.register("dense", "cudnn", supports=cudnn_unsupported)
def dense_attention_cudnn(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, *,
                          keep: Array | None = None, bias: Array | None = None,
                          causal: bool = False, scale: float | None = None,
                          dropout_rate: float = 0.0, dropout_rng: Array | None = None,
                          precision: Precision = None, sink: Array | None = None,
                          window: tuple[int, int] | None = None) -> Array:
    """The dense core on cuDNN's fused attention (a ``window`` is cuDNN's local window); same
    numbers as ``dense_attention_xla`` up to the kernel's accumulation order."""
    del dropout_rate, dropout_rng, precision, sink  # rejected / not applicable (half precision)
    return jax_nn_attention(q_BTNH, k_BSKH, v_BSKV, keep=keep, bias=bias, causal=causal,
                            scale=scale, implementation="cudnn",
                            local_window=None if window is None else (window[0] - 1, window[1]))


def jax_nn_attention(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, *, keep: Array | None,
                     bias: Array | None, causal: bool, scale: float | None,
                     implementation: str, local_window: tuple[int, int] | None = None) -> Array:
    """The dense core through ``jax.nn.dot_product_attention(implementation=...)``, with
    attnhut's rules: ``keep`` as its boolean mask (an additive ``bias`` is zeroed where ``keep``
    is False, so ``-inf`` entries become masked keys) and a row with no visible key returns
    zeros (``jax.nn`` would average it uniformly)."""
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    mask = None if keep is None else _full_ts(keep, t, s)
    if bias is not None:
        bias = _full_ts(bias, t, s)
        bias = bias.astype(q_BTNH.dtype) if mask is None else jnp.where(mask, bias, 0).astype(
            q_BTNH.dtype)  # -inf entries are already False in ``keep``
    out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKV, bias, mask, scale=scale,
                                            is_causal=causal, implementation=implementation,
                                            local_window_size=local_window)
    if mask is None:
        return out_BTNH
    seen_BNT = jnp.any(mask, axis=-1)  # (B|1, N|K|1, T)
    n, k = q_BTNH.shape[2], k_BSKH.shape[2]
    if seen_BNT.shape[1] == k and k not in (1, n):
        seen_BNT = jnp.repeat(seen_BNT, n // k, axis=1)
    return jnp.where(seen_BNT.transpose(0, 2, 1)[..., None], out_BTNH, 0).astype(out_BTNH.dtype)


def sdpa(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, *, attn_mask: Array | None, causal: bool,
         owner: str, scale: float | None = None, dropout_rate: float = 0.0,
         dropout_rng: Array | None = None, impl: str = "xla",
         precision: Precision = None, q_seg_BT: Array | None = None,
         k_seg_BS: Array | None = None, sink: Array | None = None,
         window: tuple[int, int] | None = None) -> Array:
    """``torch.nn.functional.scaled_dot_product_attention`` as attnhut calls it, on the registry's
    ``dense`` op under ``impl``.

    attnhut passes ``is_causal=self.causal and attn_mask is None``: a user mask *replaces* the
    causal rule rather than adding to it. We keep that rule so that outputs match.

    ``q_seg_BT`` / ``k_seg_BS`` (both or neither, int32 segment ids, 0 = padding) add the
    packed-sequence rule (``segment_keep``) to the keep mask. Segments always AND in: with the
    causal rule when there is no ``attn_mask``, with ``attn_mask`` (which still replaces the
    causal rule) when there is one. Every impl receives the rule as its boolean ``keep``, cuDNN
    included (``jax.nn.dot_product_attention``'s mask, turned into its additive bias).

    ``sink``: per-head logits (N,) joining every softmax denominator (not on cuDNN);
    ``window``: (left, right) as ``window_keep`` (cuDNN's local window; XLA masks the (T, S)
    logits, the block-sparse op is the O(T x window) path).
    """
    b, t, n, _ = q_BTNH.shape
    s = k_BSKH.shape[1]
    keep, bias = split_attn_mask(attn_mask, (b, n, t, s), owner)
    if (q_seg_BT is None) != (k_seg_BS is None):
        raise ValueError(f"{owner}: give both query and key segment ids or neither")
    if q_seg_BT is not None:
        seg_B1TS = segment_keep(q_seg_BT, k_seg_BS)
        keep = seg_B1TS if keep is None else keep & seg_B1TS
    return registry.call(owner, "dense", impl, q_BTNH, k_BSKH, v_BSKV, keep=keep, bias=bias,
                         causal=causal and attn_mask is None, scale=scale,
                         dropout_rate=dropout_rate, dropout_rng=dropout_rng, precision=precision,
                         **({} if sink is None else {"sink": sink}),
                         **({} if window is None else {"window": window}))


# ----------------------------------------------------------------------------- sparse cores
#
# The registry's ``block_sparse``, ``token_sparse`` and ``indexer_topk`` operations:
# ``reference`` (attnhut's masked dense computation, builds (T, S)), ``xla`` (the same algorithm
# as the kernels in plain XLA, the fastest exact path on CPU), ``pallas`` (the Pallas kernels:
# Mosaic on TPU, the Triton-style ones elsewhere, in interpret mode off GPU). ``auto`` is
# ``pallas`` on GPU and TPU, ``xla`` elsewhere. Every impl computes the same selection, outputs
# and gradients.

# block-sparse: query token t of kv group k reads key s iff block_keep[b, k, t, s // block_k],
# key_valid[b, s] and the token rules on positions hold (causal: k_pos <= q_pos; ``window``:
# k_pos > q_pos - window unless s < num_sink_keys or k_sink[b, s]; positions default to
# arange(T) + S - T and arange(S)) and, for packed sequences, the segment rule k_seg[b, s] ==
# q_seg[b, t] != 0 (id 0: padding). The op drops the key blocks without a key of the query's
# segment from block_keep before building its tables (O(T * J), no (T, S) array). Arguments:
# (q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ, *, block_k, causal, scale, sink, key_valid_BS,
# q_pos_T, k_pos_S, window, num_sink_keys, precision, q_seg_BT, k_seg_BS, k_sink_BS,
# return_lse): q_seg_BT (B, T) and k_seg_BS (B, S) int segment ids, both or neither; k_sink_BS
# (B, S) bool, keys the window rule exempts (per-segment sinks). With segments, padding queries
# and unreadable keys are zeroed first: NaN there reaches no output or gradient. return_lse:
# every impl returns (out, lse_BTN), the differentiable row logsumexp (-inf on empty rows).


@registry.register("block_sparse", "reference")
def _block_sparse_reference(q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ, *, block_k, causal, scale=None,
                            sink=None, precision=None, key_valid_BS=None, q_seg_BT=None,
                            k_seg_BS=None, k_sink_BS=None, return_lse=False, **rules):
    b, t = q_BTNH.shape[:2]
    s = k_BSKH.shape[1]
    q_seg_BT, k_seg_BS, k_sink_BS = block_sparse.check_segments(
        "block_sparse_attention", b, t, s, q_seg_BT, k_seg_BS, k_sink_BS)
    keep = block_sparse.token_keep(block_keep_BKTJ, s, block_k, causal=causal,
                                   key_valid_BS=key_valid_BS, q_seg_BT=q_seg_BT,
                                   k_seg_BS=k_seg_BS, k_sink_BS=k_sink_BS, **rules)
    if k_seg_BS is not None and key_valid_BS is not None:
        k_seg_BS = jnp.where(key_valid_BS, k_seg_BS, 0)
    q_BTNH, k_BSKH, v_BSKV = block_sparse.zero_padding(q_BTNH, k_BSKH, v_BSKV, q_seg_BT, k_seg_BS)
    out = dot_product_attention(q_BTNH, k_BSKH, v_BSKV, keep=keep, scale=scale, sink=sink,
                                precision=precision)
    if not return_lse:
        return out
    lse_BTN = block_sparse.masked_logsumexp(
        q_BTNH, k_BSKH, keep[:, :, None], scale=q_BTNH.shape[-1] ** -0.5 if scale is None else scale,
        sink=sink, precision=precision)
    return out, lse_BTN


# ``pallas``: the Mosaic kernels on TPU, the GPU-style (Triton) ones elsewhere (interpret mode
# off GPU); the registry picks the backend's entry.
registry.register("block_sparse", "pallas")(block_sparse.block_sparse_attention)
registry.register("block_sparse", "pallas", backend="tpu")(block_sparse.block_sparse_attention_tpu)
registry.register("block_sparse", "xla")(block_sparse.block_sparse_attention_xla)
# ``mosaic_gpu``: the warp-specialised Hopper kernels (TMA pipeline, wgmma, full-block flags);
# interpret mode off GPU. Its ``supports`` refuses dtypes, block sizes and shared-memory overflows.
registry.register("block_sparse", "mosaic_gpu", supports=block_sparse.mosaic_gpu_unsupported)(
    block_sparse.block_sparse_attention_mgpu)


def block_sparse_attention(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, block_keep_BKTJ: Array,
                           *, block_k: int, causal: bool, impl: str = "auto",
                           scale: float | None = None, sink: Array | None = None,
                           key_valid_BS: Array | None = None, q_pos_T: Array | None = None,
                           k_pos_S: Array | None = None, window: int | None = None,
                           num_sink_keys: int = 0, precision: Precision = None,
                           owner: str = "block_sparse_attention",
                           q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                           k_sink_BS: Array | None = None,
                           return_lse: bool = False) -> Array | tuple[Array, Array]:
    """The registry's ``block_sparse`` op under ``impl``, all rule arguments spelled out
    (packed sequences: ``q_seg_BT`` / ``k_seg_BS`` segment ids, ``k_sink_BS`` per-key window
    sinks; see the comment above).

    ``return_lse``: return ``(out_BTNV, lse_BTN)``, ``lse_BTN`` float32 (B, T, N) =
    ``log(sum over the keys the row reads of exp(scale * q.k) [+ exp(sink_n)])``, ``-inf`` for a
    row that reads nothing and has no sink. Every impl returns the same lse and differentiates
    it (its cotangent enters the fused backward as ``delta = rowsum(dO * O) - dlse``), so
    disjoint passes over one softmax merge exactly with ``merge_softmax_passes``.
    """
    return registry.call(owner, "block_sparse", impl, q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ,
                         block_k=block_k, causal=causal, scale=scale, sink=sink,
                         key_valid_BS=key_valid_BS, q_pos_T=q_pos_T, k_pos_S=k_pos_S,
                         window=window, num_sink_keys=num_sink_keys, precision=precision,
                         q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS, k_sink_BS=k_sink_BS,
                         return_lse=return_lse)


def merge_softmax_passes(outs: Sequence[Array], lses: Sequence[Array],
                         owner: str = "merge_softmax_passes") -> tuple[Array, Array]:
    """Merge passes of one softmax over disjoint key sets into the single pass over their union.

    ``outs[p]`` (B, T, N, V) are the passes' normalised outputs and ``lses[p]`` (B, T, N) their
    row logsumexps (``block_sparse_attention(..., return_lse=True)``; ``-inf`` for a row the
    pass leaves empty). Returns ``(out, lse)`` with ``lse = logaddexp_p lse_p`` and
    ``out = sum_p exp(lse_p - lse) * out_p``: exact when the key sets are disjoint (a sink logit
    belongs in one pass only). Math in float32, ``out`` in the outs' dtype, ``lse`` float32. A
    row that every pass leaves empty gives out 0 and lse ``-inf``, with zero (finite)
    gradients; no NaN anywhere, forward or backward.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"{owner}: needs one lse per output and at least one pass, got "
                         f"{len(outs)} outputs and {len(lses)} lses")
    shape = tuple(outs[0].shape)
    for i, (o, lse) in enumerate(zip(outs, lses, strict=True)):
        if tuple(o.shape) != shape or o.dtype != outs[0].dtype:
            raise ValueError(f"{owner}: outs[{i}] has shape {tuple(o.shape)} and dtype {o.dtype}, "
                             f"outs[0] {shape} and {outs[0].dtype}: the passes must agree")
        if tuple(lse.shape) != shape[:-1]:
            raise ValueError(f"{owner}: lses[{i}] must have shape {shape[:-1]} (the outputs' "
                             f"shape without the value axis), got {tuple(lse.shape)}")
    lse_PBTN = jnp.stack([jnp.asarray(lse, jnp.float32) for lse in lses])
    top = jax.lax.stop_gradient(jnp.max(lse_PBTN, axis=0))  # the exact lse needs no gradient here
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # all passes empty: -inf, any finite shift
    w_PBTN = jnp.exp(lse_PBTN - top)  # 0 for an empty pass, gradient 0 there too
    den = w_PBTN.sum(axis=0)
    some = den > 0
    safe = jnp.where(some, den, 1.0)
    lse = jnp.where(some, top + jnp.log(safe), -jnp.inf)
    out = sum((w / safe)[..., None] * o.astype(jnp.float32) for w, o in zip(w_PBTN, outs, strict=True))
    return out.astype(outs[0].dtype), lse


def window_block_keep(q_pos_T: Array, k_pos_S: Array, block_k: int, *, window: int,
                      num_sink_keys: int = 0) -> Array:
    """(T, J) bool: key blocks holding a key that a causal ``window`` (plus the first
    ``num_sink_keys`` keys) lets each query read. O(T * J), no (T, S) array."""
    s = k_pos_S.shape[0]
    j = -(-s // block_k)
    k_pos_JS = jnp.pad(k_pos_S, (0, j * block_k - s), mode="edge").reshape(j, block_k)
    lo_J, hi_J = k_pos_JS.min(axis=1), k_pos_JS.max(axis=1)
    q_T1 = q_pos_T[:, None]
    sink_1J = (jnp.arange(j) * block_k < num_sink_keys)[None, :]
    return (sink_1J & (lo_J[None, :] <= q_T1)) | ((lo_J[None, :] <= q_T1) & (hi_J[None, :] > q_T1 - window))


# token-sparse: each query token reads its own selected keys (indices_BTM, -1: none), shared by
# all heads, plus an optional raw ``window`` over the keys s >= window_start and a per-head sink;
# v_BSKV=None reads values from k_BSKH (CSA's shared KV). Packed sequences: ``q_seg_BT`` (B, T)
# and ``k_seg_BS`` (B, S) int segment ids (both or neither); query t reads key s, selected or in
# the window, only if k_seg[b, s] == q_seg[b, t] != 0 (CSA: k_seg_BS covers the C entries and
# the T raw tokens). A row that reads nothing returns zeros. Arguments: (q_BTNH, k_BSKH,
# v_BSKV, indices_BTM, *, scale, sink, window, window_start, q_seg_BT, k_seg_BS, precision).

registry.register("token_sparse", "reference")(token_sparse.token_sparse_attention_reference)
registry.register("token_sparse", "xla")(token_sparse.token_sparse_attention_xla)


registry.register("token_sparse", "pallas")(token_sparse.token_sparse_attention)
registry.register("token_sparse", "pallas", backend="tpu")(token_sparse.token_sparse_attention_tpu)
# ``mosaic_gpu``: the Hopper kernels over the same bitmask and tables (interpret mode off GPU)
registry.register("token_sparse", "mosaic_gpu", supports=token_sparse.mosaic_gpu_unsupported)(
    token_sparse.token_sparse_attention_mgpu)


def token_sparse_attention(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array | None,
                           indices_BTM: Array, *, impl: str = "auto",
                           scale: float | None = None, sink: Array | None = None,
                           window: int | None = None, window_start: int = 0,
                           q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                           precision: Precision = None,
                           owner: str = "token_sparse_attention") -> Array:
    """The registry's ``token_sparse`` op under ``impl`` (segment ids: see above)."""
    return registry.call(owner, "token_sparse", impl, q_BTNH, k_BSKH, v_BSKV, indices_BTM,
                         scale=scale, sink=sink, window=window, window_start=window_start,
                         q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS, precision=precision)


# indexer top-k: (indices (B, T, min(top_k, S)), scores), invalid picks -1; see
# ``pallas_kernels.token_sparse.reference.indexer_topk_reference``. ``reference`` scores every
# (query, key) pair, ``xla`` is the fused running top-k over key tiles, ``pallas`` the
# radix-select kernel except on TPU, where it is the XLA one. All select the same keys (ties to
# the lower key index). Packed sequences: ``q_seg_BT`` (B, T), ``k_seg_BS`` (B, S) (both or
# neither): a key is a candidate only if the causal/position rule holds and k_seg == q_seg != 0,
# so a padding query selects nothing (all -1). Arguments: (q_BTIE, k_BSE, w_BTI, top_k, *,
# causal, q_pos_T, k_pos_S, q_seg_BT, k_seg_BS, precision).

registry.register("indexer_topk", "reference")(token_sparse.indexer_topk_reference)
registry.register("indexer_topk", "xla")(token_sparse.indexer_topk)


registry.register("indexer_topk", "pallas")(token_sparse.indexer_topk_pallas)
# on TPU the radix-select kernel gives way to the XLA running top-k
registry.register("indexer_topk", "pallas", backend="tpu")(token_sparse.indexer_topk)


def indexer_topk(q_BTIE: Array, k_BSE: Array, w_BTI: Array, top_k: int, *, causal: bool,
                 impl: str = "auto", q_pos_T: Array | None = None, k_pos_S: Array | None = None,
                 q_seg_BT: Array | None = None, k_seg_BS: Array | None = None,
                 precision: Precision = None,
                 owner: str = "indexer_topk") -> tuple[Array, Array]:
    """The registry's ``indexer_topk`` op under ``impl`` (segment ids: see above)."""
    return registry.call(owner, "indexer_topk", impl, q_BTIE, k_BSE, w_BTI, top_k, causal=causal,
                         q_pos_T=q_pos_T, k_pos_S=k_pos_S, q_seg_BT=q_seg_BT, k_seg_BS=k_seg_BS,
                         precision=precision)


def indices_from_scores(scores_BTS: Array, valid: Array, top_k: int) -> Array:
    """Indices of ``jax.lax.top_k`` on already-masked scores (B, T, S), invalid picks -1: the
    selection ``topk_keep`` marks, as indices (used when the scores are built anyway, e.g. for
    ``return_aux``). ``valid`` broadcasts to the scores: (T, S), or (B, T, S) with the segment
    rule folded in, as ``indexer_topk_reference`` does with segment ids."""
    _, idx_BTM = jax.lax.top_k(scores_BTS, min(top_k, scores_BTS.shape[-1]))
    ok_BTM = jnp.take_along_axis(jnp.broadcast_to(valid, scores_BTS.shape), idx_BTM, axis=-1)
    return jnp.where(ok_BTM, idx_BTM, -1).astype(jnp.int32)


# ----------------------------------------------------------------------------- gated delta rule
#
# The registry's ``gated_delta`` operation (``pallas_kernels.gated_delta``): the gated delta rule
# (Gated DeltaNet's per-head decay, Kimi Delta's per-channel decay) and, with ``beta=None``,
# gated / plain linear attention. ``recurrent`` runs token by token, ``chunk`` the chunked WY/UT
# form in XLA, ``pallas`` the chunked form with its scan in Pallas kernels (Mosaic on TPU, the
# GPU-style ones elsewhere, in interpret mode off GPU). Arguments: (q_BTNH, k_BTNH, v_BTNV, g,
# beta_BTN, *, scale, initial_state, segment_ids, chunk_size, precision); returns
# ``(o_BTNV, final_state_BNHV)``.

registry.register("gated_delta", "recurrent")(functools.partial(gated_delta.gated_delta_rule,
                                                                impl="recurrent"))
registry.register("gated_delta", "chunk")(functools.partial(gated_delta.gated_delta_rule,
                                                            impl="chunk"))
registry.register("gated_delta", "pallas")(functools.partial(gated_delta.gated_delta_rule,
                                                             impl="pallas"))
registry.register("gated_delta", "pallas", backend="tpu")(
    functools.partial(gated_delta.gated_delta_rule, impl="pallas_tpu"))


def gated_delta_rule(q_BTNH: Array, k_BTNH: Array, v_BTNV: Array, g: Array,
                     beta_BTN: Array | None, *, impl: str = "auto", scale: float | None = None,
                     initial_state: Array | None = None, segment_ids: Array | None = None,
                     chunk_size: int = 64, precision: Precision = None,
                     owner: str = "gated_delta_rule") -> tuple[Array, Array]:
    """The registry's ``gated_delta`` op under ``impl`` (see the comment above)."""
    return registry.call(owner, "gated_delta", impl, q_BTNH, k_BTNH, v_BTNV, g, beta_BTN,
                         scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                         chunk_size=chunk_size, precision=precision)

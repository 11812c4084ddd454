"""Causal-JEPA object-level masked attention (Nam et al., 2026).

Object slots over time form a (frames, objects) grid that is flattened into one sequence for a
stack of bidirectional transformer blocks. Some objects are hidden over the whole history window,
every object is hidden in the future, and the blocks fill the hidden cells back in. A hidden cell
starts as ``mask_token + time_pos[f] + id_proj(slots[:, 0])``: the projection of the object's own
first frame is what tells the predictor *which* object to rebuild. No embedding marks the object
index, so permuting the objects permutes the prediction.

Grid names follow the project's dimension key (``pallas_kernels/__init__.py``): F frames (history
+ future), U objects (slots); inside the transformer the flattened grid is a sequence of
T = F * U tokens. Cells that are real inputs: frame 0 (every object) and history frames ``1..t-1`` of the
objects that are not hidden.
"""

from __future__ import annotations

import operator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import cache, core, registry
from .core import Array, Dtype
from .standard import StandardAttention

_OWNER = "CausalJEPAAttention"


def _trunc_normal_002(key, shape, dtype=jnp.float32):
    """``nn.init.trunc_normal_(std=0.02)``: torch cuts at the absolute values +-2, i.e. +-100 std."""
    return 0.02 * jax.random.truncated_normal(key, -100.0, 100.0, shape, dtype)


def hidden_objects(mask_slots: Array, num_slots: int, owner: str = _OWNER) -> Array:
    """Boolean (U,) that is True for the objects named by ``mask_slots``.

    ``mask_slots`` is an integer index array of rank 0 or 1 (values in ``[-S, S)``, negatives
    count from the end, repeats allowed, as torch indexing reads them) or a boolean (U,) array.
    Concrete out-of-range indices raise ``ValueError``; under ``jit`` they cannot be checked and
    are dropped.
    """
    m = jnp.asarray(mask_slots)
    if m.size == 0 and m.dtype != jnp.bool_:
        m = m.astype(jnp.int32)  # jnp.asarray([]) is float32
    if m.dtype == jnp.bool_:
        if m.shape != (num_slots,):
            raise ValueError(f"{owner}: a boolean mask_slots must have shape (num_slots,)="
                             f"({num_slots},), got {tuple(m.shape)}")
        return m
    if not jnp.issubdtype(m.dtype, jnp.integer):
        raise TypeError(f"{owner}: mask_slots must hold integer object indices, got dtype {m.dtype}")
    if m.ndim > 1:
        raise ValueError(f"{owner}: mask_slots must have rank 0 or 1, got shape {tuple(m.shape)}")
    try:  # concrete indices can be checked; traced ones (under jit) cannot
        values = np.asarray(m).reshape(-1)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        values = None
    if values is not None:
        bad = values[(values < -num_slots) | (values >= num_slots)]
        if bad.size:
            raise ValueError(f"{owner}: mask_slots values {bad.tolist()} are out of range for "
                             f"num_slots={num_slots} (valid: {-num_slots}..{num_slots - 1})")
    return jnp.zeros((num_slots,), jnp.bool_).at[m].set(True, mode="drop")


class _MLP(nn.Module):
    """``nn.Sequential(LayerNorm, Linear, GELU, Dropout, Linear, Dropout)``: children "0", "1", "4"."""

    dim: int
    hidden: int
    dropout: float
    bias: bool
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        h = core.layer_norm("0", self.dtype, self.param_dtype)(x)
        h = core.Linear(self.hidden, axes=("embed", "mlp"), name="1", **kw)(h)
        h = nn.Dropout(self.dropout)(jax.nn.gelu(h, approximate=False), deterministic)
        h = core.Linear(self.dim, axes=("mlp", "embed"), name="4", **kw)(h)
        return nn.Dropout(self.dropout)(h, deterministic)


class _Block(nn.Module):
    """Residual full (bidirectional) attention, then a residual pre-LayerNorm MLP."""

    dim: int
    num_heads: int
    mlp_dim: int
    dropout: float
    bias: bool
    impl: registry.DenseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.attn = StandardAttention(self.dim, self.num_heads, causal=False, dropout=self.dropout,
                                      bias=self.bias, impl=self.impl, **kw)
        self.mlp = _MLP(self.dim, self.mlp_dim, self.dropout, self.bias, **kw)

    def __call__(self, x_BTD: Array, deterministic: bool) -> Array:
        x_BTD = x_BTD + self.attn(x_BTD, deterministic=deterministic)
        return x_BTD + self.mlp(x_BTD, deterministic)


class _Blocks(nn.Module):
    """``nn.ModuleList`` of ``_Block``: children named "0", "1", ... as torch's indices."""

    depth: int
    dim: int
    num_heads: int
    mlp_dim: int
    dropout: float
    bias: bool
    impl: registry.DenseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool) -> Array:
        for i in range(self.depth):
            x_BTD = _Block(self.dim, self.num_heads, self.mlp_dim, self.dropout, self.bias,
                           impl=self.impl, dtype=self.dtype, param_dtype=self.param_dtype,
                           precision=self.precision, name=str(i))(x_BTD, deterministic)
        return x_BTD


class CausalJEPAAttention(nn.Module):
    """Masked-object predictor over a (frames, objects) grid of slots.

    Args mirror ``attnhut.CausalJEPAAttention``: ``dim`` (divisible by ``num_heads``),
    ``num_heads``, ``num_slots`` (objects per frame), ``history_frames``, ``pred_frames`` (1),
    ``num_masked_slots`` (2, objects hidden over the history), ``depth`` (6 blocks), ``mlp_dim``
    (``None`` or 0 means ``4 * dim``), ``dropout`` (attention weights and MLP, when
    ``deterministic=False``, from the ``'dropout'`` stream), ``bias``; plus ``impl`` (every
    block's ``StandardAttention``: ``auto``/``xla``/``cudnn``, see there) and ``precision`` (every
    matmul).

    Parameters: ``mask_token`` (1, 1, 1, D), ``time_pos`` (1, F, 1, D), ``id_proj``,
    ``blocks/<i>/attn/{qkv,proj}``, ``blocks/<i>/mlp/{0 (LayerNorm), 1, 4}``, ``norm``, ``to_out``.

    ``__call__(slots, mask_slots=None)`` returns ``(pred, mask_slots)`` with ``pred`` of shape
    (B, F, U, D), F = history_frames + pred_frames. ``predict(slots)`` returns the future frames
    from a fully visible history. ``slots`` is (B, t, U, D) with ``1 <= t <= history_frames``;
    as in attnhut, a shorter history leaves frames ``t..history_frames-1`` hidden too (and
    ``predict`` then returns the ``F - t`` frames after the history).

    ``decode=True`` raises ``ValueError``: "causal" names the object-level (counterfactual)
    objective, not a causal mask. Every block attends bidirectionally over the whole fixed
    (F, U) grid, history and hidden future cells alike, so no cell's output is final before the
    whole grid is in, and the future is predicted in one pass over the grid, not token by token.
    """

    dim: int
    num_heads: int
    num_slots: int
    history_frames: int
    pred_frames: int = 1
    num_masked_slots: int = 2
    depth: int = 6
    mlp_dim: int | None = None
    dropout: float = 0.0
    bias: bool = True
    impl: registry.DenseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    @property
    def total_frames(self) -> int:
        return self.history_frames + self.pred_frames

    def setup(self) -> None:
        core.check_positive(_OWNER, dim=self.dim, num_heads=self.num_heads,
                            num_slots=self.num_slots, history_frames=self.history_frames)
        negative = {k: v for k, v in dict(pred_frames=self.pred_frames, depth=self.depth,
                                          mlp_dim=self.mlp_dim or 0).items() if v < 0}
        if negative:
            named = ", ".join(f"{k}={v}" for k, v in negative.items())
            raise ValueError(f"{_OWNER}: {named} must be >= 0")
        if self.num_masked_slots < 0:
            raise ValueError(f"{_OWNER}: num_masked_slots={self.num_masked_slots} must be >= 0")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"{_OWNER}: dropout={self.dropout} must be in [0, 1]")
        core.check_divisible(_OWNER, ("dim", self.dim), ("num_heads", self.num_heads))
        registry.check(_OWNER, "dense", self.impl)
        cache.refuse_decode(_OWNER, self.decode,
                            "its 'causal' is the object-level (counterfactual) objective, not a "
                            "causal mask: every block attends bidirectionally over the whole "
                            "(history_frames + pred_frames, num_slots) grid, hidden future cells "
                            "included, so no cell's output is final until the whole grid is in; "
                            "it predicts the future in one pass over the grid (predict), not token "
                            "by token")

        d, pd = self.dim, self.param_dtype
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=pd, precision=self.precision)
        self.mask_token = core.param(self, "mask_token", _trunc_normal_002, (1, 1, 1, d),
                                     (None, None, None, "embed"), pd)
        self.time_pos = core.param(self, "time_pos", _trunc_normal_002,
                                   (1, self.total_frames, 1, d), (None, None, None, "embed"), pd)
        self.id_proj = core.Linear(d, axes=("embed", "mlp"), **kw)
        self.blocks = _Blocks(self.depth, d, self.num_heads, self.mlp_dim or 4 * d, self.dropout,
                              self.bias, impl=self.impl, dtype=self.dtype, param_dtype=pd,
                              precision=self.precision)
        self.norm = core.layer_norm("norm", self.dtype, pd)
        self.to_out = core.Linear(d, axes=("mlp", "embed"), **kw)

    def _check_slots(self, slots: Array) -> None:
        want = f"(batch, history_frames={self.history_frames}, num_slots={self.num_slots}, " \
               f"dim={self.dim})"
        if not hasattr(slots, "ndim") or not hasattr(slots, "shape"):
            raise TypeError(f"{_OWNER}: expected an array of shape {want}, got {type(slots)!r}")
        shape = tuple(slots.shape)
        if slots.ndim != 4:
            raise ValueError(f"{_OWNER}: expected slots of rank 4 {want}, got shape {shape}")
        _, t, s, d = shape
        if d != self.dim:
            raise ValueError(f"{_OWNER}: slot width {d} != dim={self.dim} (shape {shape})")
        if s != self.num_slots:
            raise ValueError(f"{_OWNER}: {s} objects per frame != num_slots={self.num_slots} "
                             f"(shape {shape})")
        if not 1 <= t <= self.history_frames:
            raise ValueError(f"{_OWNER}: {t} history frames, expected 1..history_frames="
                             f"{self.history_frames} (shape {shape})")
        if not jnp.issubdtype(slots.dtype, jnp.floating):
            raise TypeError(f"{_OWNER}: slots must be floating point, got dtype {slots.dtype}")

    def _grid(self, slots_BFUD: Array, hidden_U: Array) -> Array:
        """The (B, F, U, D) input grid: real cells carry the slot, hidden cells the query."""
        t = slots_BFUD.shape[1]
        f = self.total_frames
        anchor_B1UD = self.id_proj(slots_BFUD[:, 0])[:, None]
        slots_BFUD, mask_token, time_pos, anchor_B1UD = nn.dtypes.promote_dtype(
            slots_BFUD, self.mask_token, self.time_pos, anchor_B1UD, dtype=self.dtype)
        query_BFUD = mask_token + time_pos + anchor_B1UD
        real_BFUD = jnp.pad(slots_BFUD, ((0, 0), (0, f - t), (0, 0), (0, 0))) + time_pos
        frame_F1 = jnp.arange(f)[:, None]
        real_FU = (frame_F1 == 0) | ((frame_F1 < t) & ~hidden_U[None, :])
        return jnp.where(real_FU[None, :, :, None], real_BFUD, query_BFUD)

    def _predict_grid(self, x_BFUD: Array, deterministic: bool) -> Array:
        b, f, s, d = x_BFUD.shape
        x_BTD = self.blocks(x_BFUD.reshape(b, f * s, d), deterministic)
        return self.to_out(self.norm(x_BTD).reshape(b, f, s, d))

    def __call__(self, slots: Array, mask_slots: Array | None = None,
                 deterministic: bool = True, *,
                 segment_ids: Array | None = None) -> tuple[Array, Array]:
        """(B, t, U, D) slots -> ((B, F, U, D) prediction, the hidden object indices).

        ``mask_slots``: indices of the objects hidden over the history (a traced int array is
        fine under ``jit``), or a boolean (U,) array. When None, ``num_masked_slots`` distinct
        indices are drawn from the ``'mask'`` rng stream, shared by the whole batch.

        Packed sequences are refused: ``segment_ids`` other than None raises ``ValueError``. The
        token sequence is the fixed (frames, objects) grid of one video, whose cells all attend
        each other; there is no variable-length sequence to pack.
        """
        core.reject_packing(_OWNER, segment_ids,
                            "its tokens are the fixed (frames, objects) grid of one video, every "
                            "cell attending every other; there are no variable-length sequences "
                            "to pack (give one video per batch row)")
        self._check_slots(slots)
        if mask_slots is None:
            order = jax.random.permutation(self.make_rng("mask"), self.num_slots)
            # as attnhut: more masked slots than objects hides every object
            mask_slots = order[: min(self.num_masked_slots, self.num_slots)]
        else:
            mask_slots = jnp.asarray(mask_slots)
        hidden_U = hidden_objects(mask_slots, self.num_slots)
        return self._predict_grid(self._grid(slots, hidden_U), deterministic), mask_slots

    def predict(self, slots: Array, deterministic: bool = True) -> Array:
        """(B, t, U, D) fully visible history -> (B, F - t, U, D) predicted future frames."""
        self._check_slots(slots)
        t = slots.shape[1]
        grid = self._grid(slots, jnp.zeros((self.num_slots,), jnp.bool_))
        return self._predict_grid(grid, deterministic)[:, t:]


def cjepa_masked_loss(pred: Array, target: Array, mask_slots: Array, history_frames: int) -> Array:
    """Mean squared error over the cells the predictor had to infer, as attnhut's loss.

    Scored cells of the (F, U) grid: history frames ``1..history_frames-1`` of the hidden
    objects, and every object in frames ``>= history_frames``; frame 0 never. The per-cell error
    is the mean over D of the squared difference; the loss is its mean over the batch and the
    scored cells (a weighted sum, so ``mask_slots`` may be traced). With no scored cell the loss
    is NaN (torch's mean of nothing) and its gradient zero.
    """
    owner = "cjepa_masked_loss"
    history_frames = operator.index(history_frames)
    if pred.ndim != 4 or tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"{owner}: pred and target must both be (batch, frames, num_slots, dim), "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    if history_frames < 1:
        raise ValueError(f"{owner}: history_frames={history_frames} must be >= 1")
    b, f, s, _ = pred.shape
    hidden_U = hidden_objects(mask_slots, s, owner)
    frame_F1 = jnp.arange(f)[:, None]
    scored_FU = (frame_F1 >= history_frames) | ((frame_F1 >= 1) & hidden_U[None, :])
    out_dtype = jnp.result_type(pred, target)
    acc = jnp.promote_types(out_dtype, jnp.float32)
    err_BFU = jnp.mean(jnp.square(pred.astype(acc) - target.astype(acc)), axis=-1)
    total = jnp.sum(jnp.where(scored_FU[None], err_BFU, 0.0))
    count = b * jnp.sum(scored_FU)
    loss = jnp.where(count > 0, total / jnp.maximum(count, 1).astype(acc), jnp.nan)
    return loss.astype(out_dtype)

"""The contract every sparse attention kernel of this package keeps, written once.

Block-sparse and token-sparse attention are one computation with two membership rules: flash
attention of each query over its own key set, an optional per-head sink logit in the softmax
denominator, operands zero-padded to whole tiles, visit tables that list which (query tile, key
block) pairs to compute, a fused backward that recomputes probabilities from the saved
logsumexp, all under one ``jax.custom_vjp``. Here:

* fill constants: ``FILL``, a masked logit or an invalid score (finite, so an empty row gives
  zeros, never NaN); ``BIG``, the logsumexp saved for a row that sees no key and no sink;
* ``KernelConfig``: the static (hashable) configuration a wrapper hands its kernels, with the
  Triton and Mosaic compiler parameters it implies; ``table_walk``, the TPU kernels' walk over
  table slots;
* layout: ``lane_width`` / ``pad_lanes`` (Triton tiles need power-of-two widths),
  ``head_major`` (pad the sequence to whole tiles, (B, S, K, H) -> (B, K, S, H)),
  ``at_most_f32`` (the TPU kernels compute float64 operands in float32);
* the float32-accumulating products ``dot_t`` / ``dot`` / ``tn_dot``, each with ``precision``;
* the softmax pieces: ``online_softmax_step``, ``finish_softmax`` (the sink joins here),
  ``row_delta`` (rowsum(dO * O), less the cotangent of a returned logsumexp), ``lse_out`` /
  ``lse_cotangent`` (a returned logsumexp is ``-inf``, not ``BIG``, on empty rows, whose
  cotangent is dropped), ``sink_grad``, ``group_sum`` (per-query-head dK/dV summed over the
  group of a kv head); ``masked_attention_reference``, the dense softmax that both families'
  references reduce to, and ``masked_logsumexp``, its row logsumexp;
* ``compact``: a visit matrix -> table rows ``[count, indices ascending, padding]``;
* ``sparse_attention_vjp``: the differentiable entry point, selections not differentiated.

The Triton passes' ``pl.pallas_call``s and tile loops are ``flash.py``'s.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

Array = jax.Array
F32 = jnp.float32
FILL = float(jnp.finfo(jnp.float32).min)
BIG = float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one sparse attention call (a ``nondiff`` argument of the VJP).

    ``rules``: the family's membership rule as sorted ``(name, value)`` pairs (hashable; read
    as a dict through ``rule``). ``shared_kv``: the keys are the values (one tensor, one
    gradient). ``precision`` reaches every matrix product (``jax.lax.PrecisionLike``).
    """

    block_q: int
    block_k: int
    scale: float
    t: int
    s: int
    interpret: bool
    rules: tuple = ()
    shared_kv: bool = False
    num_warps: int = 4
    num_stages: int = 2
    precision: jax.lax.PrecisionLike = None

    @property
    def rule(self) -> dict:
        return dict(self.rules)

    @property
    def triton_params(self):
        # GPU lowering: Triton, chosen deliberately. The kernels are tile programs with a
        # data-dependent trip count and data-dependent block offsets (the tables), which
        # Triton's SIMT model expresses directly and which lowers unchanged under jax 0.10 to
        # 0.12 (jax 0.10's default Mosaic GPU lowering of ``pl.pallas_call`` rejects them).
        # The Hopper-only ``plgpu.kernel`` variants with explicit warpgroup / TMA pipelines are
        # ``mgpu_flash.py`` (impl ``mosaic_gpu``).
        return pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def mosaic_params(self) -> dict:
        """``pl.pallas_call`` keywords of the TPU kernels: grids (B, K, tile, table slot), the
        slot axis carrying the accumulators; interpret mode is ``pltpu.InterpretParams``."""
        sem = ("parallel", "parallel", "parallel", "arbitrary")
        return dict(interpret=pltpu.InterpretParams() if self.interpret else False,
                    compiler_params=pltpu.CompilerParams(dimension_semantics=sem))


def rules(**kw) -> tuple:
    """A membership rule as ``KernelConfig.rules`` stores it."""
    return tuple(sorted(kw.items()))


def check_segments(owner: str, b: int, t: int, s: int, q_seg_BT: Array | None,
                   k_seg_BS: Array | None, k_sink_BS: Array | None = None
                   ) -> tuple[Array | None, Array | None, Array | None]:
    """Validate the packed-sequence operands of a (B, T) query / (B, S) key call; returns
    (q_seg int32, k_seg int32, k_sink bool), each None when not given. Segment ids come both or
    neither, integer arrays; ``k_sink_BS`` (block-sparse only) is a bool or integer array
    (non-zero: a sink key)."""
    if (q_seg_BT is None) != (k_seg_BS is None):
        given, missing = ("q_seg_BT", "k_seg_BS") if k_seg_BS is None else ("k_seg_BS", "q_seg_BT")
        raise ValueError(f"{owner}: {given} was given without {missing}: segment ids come both or "
                         f"neither, got q_seg_BT={'None' if q_seg_BT is None else 'an array'} and "
                         f"k_seg_BS={'None' if k_seg_BS is None else 'an array'}")
    out = []
    for name, a, shape in (("q_seg_BT", q_seg_BT, (b, t)), ("k_seg_BS", k_seg_BS, (b, s)),
                           ("k_sink_BS", k_sink_BS, (b, s))):
        if a is None:
            out.append(None)
            continue
        kind = "a bool or integer array" if name == "k_sink_BS" else "an integer array"
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{owner}: {name} must be {kind} of shape {shape}, got {type(a)!r}")
        if tuple(a.shape) != shape:
            raise ValueError(f"{owner}: {name} must have shape {shape} (batch, "
                             f"{'query' if name == 'q_seg_BT' else 'key'} length), "
                             f"got {tuple(a.shape)}")
        sink_ok = name == "k_sink_BS" and a.dtype == jnp.bool_
        if not (jnp.issubdtype(a.dtype, jnp.integer) or sink_ok):
            raise TypeError(f"{owner}: {name} must be {kind}, got dtype {a.dtype}")
        out.append(jnp.asarray(a, bool if name == "k_sink_BS" else jnp.int32))
    return out[0], out[1], out[2]


def same_segment(q_seg: Array, k_seg: Array) -> Array:
    """Bool, ``q_seg`` broadcast against ``k_seg``: the key is of the query's segment and is not
    padding (id 0)."""
    return (k_seg == q_seg) & (k_seg != 0)


def default_scale(h: int, scale: float | None) -> float:
    return h ** -0.5 if scale is None else scale


def check_heads(n: int, kg: int) -> None:
    if n % kg:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kg}")


def at_most_f32(*xs):
    """Wider floats (float64 under ``jax_enable_x64``) cast to float32, others (and None)
    unchanged: for the TPU kernels, whose hardware and Mosaic lowering have no float64."""
    return tuple(x if x is None or jnp.finfo(x.dtype).bits <= 32 else x.astype(F32) for x in xs)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def table_walk(count, init, visit, finish) -> None:
    """The TPU kernels' walk over table slots, the last grid axis: ``init()`` the VMEM
    accumulators at the first slot, ``visit()`` each of the row's ``count`` listed blocks (the
    slots past it repeat the last block, which the pipeline does not copy again), ``finish()``
    (normalise, store) at the last slot."""
    m = pl.program_id(3)
    pl.when(m == 0)(init)
    pl.when(m < count)(visit)
    pl.when(m == pl.num_programs(3) - 1)(finish)


# ----------------------------------------------------------------------------- layout


def lane_width(w: int) -> int:
    """Width a Triton tile needs: a power of two (its tensors' sizes must be) and at least 16
    (the matrix units' smallest K and N)."""
    return max(16, 1 << (w - 1).bit_length())


def pad_lanes(x: Array | None) -> Array | None:
    """Zero-pad the last axis to ``lane_width``: zero query/key columns leave every logit
    unchanged and zero value columns give zero outputs, which the callers slice off."""
    if x is None or x.shape[-1] == lane_width(x.shape[-1]):
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, lane_width(x.shape[-1]) - x.shape[-1])])


def pad_axis(x: Array, axis: int, size: int, **kw) -> Array:
    """Pad ``axis`` at the end to ``size`` (``jnp.pad`` keywords, zeros by default)."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, **kw)


def head_major(x_BSKH: Array, length: int) -> Array:
    """(B, S, K, H) -> (B, K, length, H), the sequence zero-padded to ``length``."""
    return pad_axis(x_BSKH, 1, length).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------- products
# Operands in their input dtype, float32 accumulation (bf16 inputs run on the matrix units);
# ``precision=None`` is JAX's default matmul precision, as for XLA's own dots.


def dot_t(a: Array, b: Array, precision: jax.lax.PrecisionLike = None) -> Array:
    """a @ b.T"""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=F32)


def dot(a: Array, b: Array, precision: jax.lax.PrecisionLike = None) -> Array:
    """a @ b"""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=F32)


def tn_dot(a: Array, b: Array, precision: jax.lax.PrecisionLike = None) -> Array:
    """a.T @ b"""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=F32)


# ----------------------------------------------------------------------------- softmax


def online_softmax_step(carry, s: Array, mask: Array, pv: Callable[[Array], Array], *,
                        axis: int = -1, keepdims: bool = False):
    """One key block of the online softmax: ``carry = (acc, m, l)``; ``s`` the masked logits
    (keys along ``axis``), ``pv(p)`` the product of the block's probabilities with its values.
    ``keepdims``: the statistics keep the key axis (TPU layouts) instead of dropping it."""
    acc, m, l = carry
    grow = (lambda x: x) if keepdims else (lambda x: jnp.expand_dims(x, axis))
    m_new = jnp.maximum(m, s.max(axis=axis, keepdims=keepdims))
    corr = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - grow(m_new)), 0.0)
    return acc * grow(corr) + pv(p), m_new, l * corr + p.sum(axis=axis, keepdims=keepdims)


def finish_softmax(acc: Array, m: Array, l: Array, sink: Array | None,
                   grow: Callable[[Array], Array] = lambda x: x) -> tuple[Array, Array]:
    """Normalise an online softmax: (output float32, logsumexp). ``sink`` (float32, or None) is
    a logit that joins the denominator only; ``grow`` broadcasts a statistic against ``acc``.
    A row that sees no key and no sink gives output 0 and logsumexp ``BIG``."""
    if sink is not None:
        m_fin = jnp.maximum(m, sink)
        acc = acc * grow(jnp.exp(m - m_fin))
        l = l * jnp.exp(m - m_fin) + jnp.exp(sink - m_fin)
        m = m_fin
    safe = jnp.where(l > 0, l, 1.0)
    return acc / grow(safe), jnp.where(l > 0, m + jnp.log(safe), BIG)


def row_delta(do: Array, o: Array, keepdims: bool = False, lse: Array | None = None,
              dlse: Array | None = None) -> Array:
    """The backward's correction term ``delta = rowsum(dO * O) - dlse`` in float32
    (``ds = p * (dP - delta)``): d out / d s_ij brings the first part, d lse / d s_ij = p_ij the
    second. ``dlse`` (the cotangent of the returned logsumexp, in the layout of the saved
    ``lse``, which ``lse_cotangent`` needs to drop empty rows) is optional."""
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1, keepdims=keepdims)
    return delta if dlse is None else delta - lse_cotangent(dlse, lse)


def lse_out(lse: Array) -> Array:
    """The saved logsumexp as the ops return it: ``-inf`` for a row that reads no key and has no
    sink (``BIG`` inside the kernels)."""
    return jnp.where(lse == BIG, -jnp.inf, lse)


def lse_cotangent(dlse: Array, lse: Array) -> Array:
    """The returned logsumexp's cotangent, float32, zero on the rows that read nothing (saved
    ``lse == BIG``): their probabilities are all 0 and their logsumexp is a constant ``-inf``,
    so a non-finite cotangent there must reach no gradient."""
    return jnp.where(lse == BIG, 0.0, dlse.astype(F32))


def sink_grad(sink_N: Array, lse_BNT: Array, delta_BNT: Array, t: int) -> Array:
    """d/d sink of a denominator-only logit: ``-sum_t p_sink(t) * delta(t)`` over real rows."""
    p_sink = jnp.exp(sink_N.astype(F32)[None, :, None] - lse_BNT)[:, :, :t]
    return -(p_sink * delta_BNT[:, :, :t]).sum(axis=(0, 2)).astype(sink_N.dtype)


def head_grad_dtype(g: int, dtype):
    """dtype of per-query-head dK/dV: float32 when a group sums several heads."""
    return F32 if g > 1 else dtype


def group_sum(d: Array, kg: int, dtype) -> Array:
    """Per-query-head gradients (B, N, S, width) summed over each kv head's group: (B, K, S, width)."""
    b, n, s, x = d.shape
    return d.reshape(b, kg, n // kg, s, x).sum(axis=2).astype(dtype)


# ----------------------------------------------------------------------------- reference


def _masked_softmax_terms(q_BTNH: Array, k_BSKH: Array, keep: Array, scale: float,
                          sink: Array | None, precision: jax.lax.PrecisionLike):
    """The float32 pieces of a masked dense softmax with an optional denominator-only sink:
    (exp(s - m) on the kept logits (B, K, G, T, S), its row shift m and denominator den
    (B, K, G, T, 1), sink included). ``m`` carries no gradient (any shift gives the same
    softmax)."""
    b, t, n, h = q_BTNH.shape
    kg = k_BSKH.shape[2]
    g = n // kg
    q_BTKGH = q_BTNH.reshape(b, t, kg, g, h).astype(F32)
    s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH.astype(F32),
                         precision=precision) * scale
    s_BKGTS = jnp.where(keep, s_BKGTS, FILL)
    m = jnp.max(s_BKGTS, axis=-1, keepdims=True)
    sink_KG = None if sink is None else sink.reshape(1, kg, g, 1, 1).astype(F32)
    if sink_KG is not None:
        m = jnp.maximum(m, sink_KG)
    m = jax.lax.stop_gradient(m)
    e_BKGTS = jnp.where(keep, jnp.exp(s_BKGTS - m), 0.0)
    den = e_BKGTS.sum(axis=-1, keepdims=True)
    if sink_KG is not None:
        den = den + jnp.exp(sink_KG - m)
    return e_BKGTS, m, den


def masked_attention_reference(q_BTNH: Array, k_BSKH: Array, v_BSKV: Array, keep: Array, *,
                               scale: float, sink: Array | None = None,
                               precision: jax.lax.PrecisionLike = None,
                               return_lse: bool = False) -> Array | tuple[Array, Array]:
    """The dense softmax every sparse reference reduces to: ``keep`` broadcastable to
    (B, K, G, T, S); masked logits (``FILL``) never contribute, empty rows give zeros, an
    optional per-head ``sink`` logit joins the denominator; float32 statistics. Returns
    (B, T, N, V), and with ``return_lse`` also the row logsumexp (B, T, N) float32
    (``masked_logsumexp``)."""
    b, t, n, _ = q_BTNH.shape
    e_BKGTS, m, den = _masked_softmax_terms(q_BTNH, k_BSKH, keep, scale, sink, precision)
    p_BKGTS = e_BKGTS / jnp.where(den == 0, 1.0, den)
    out = jnp.einsum("BKGTS,BSKV->BTKGV", p_BKGTS, v_BSKV.astype(F32), precision=precision)
    out = out.reshape(b, t, n, v_BSKV.shape[-1]).astype(q_BTNH.dtype)
    if not return_lse:
        return out
    return out, _lse_by_token(m, den, b, t, n)


def _lse_by_token(m: Array, den: Array, b: int, t: int, n: int) -> Array:
    """(B, K, G, T, 1) shift and denominator -> the row logsumexp (B, T, N), ``-inf`` where the
    denominator is 0 (with a finite zero gradient there)."""
    lse = jnp.where(den > 0, m + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)[..., 0]
    return lse.transpose(0, 3, 1, 2).reshape(b, t, n)


def masked_logsumexp(q_BTNH: Array, k_BSKH: Array, keep: Array, *, scale: float,
                     sink: Array | None = None, precision: jax.lax.PrecisionLike = None) -> Array:
    """(B, T, N) float32: ``log(sum_{s kept} exp(scale * q.k_s) [+ exp(sink_n)])`` over the keys
    ``keep`` (broadcastable to (B, K, G, T, S)) lets each row read, ``-inf`` for a row that
    reads nothing and has no sink. Differentiable (d lse / d logit = the probability) with
    finite zero gradients on empty rows: the dense reference of the ops' ``return_lse``."""
    b, t, n, _ = q_BTNH.shape
    _, m, den = _masked_softmax_terms(q_BTNH, k_BSKH, keep, scale, sink, precision)
    return _lse_by_token(m, den, b, t, n)


# ----------------------------------------------------------------------------- tables


def compact(visit: Array) -> Array:
    """(..., M) bool -> (..., M + 1) int32 rows ``[count, visited indices ascending, padding]``;
    the padding repeats the last visited index (a TPU pipeline then skips the copy)."""
    m = visit.shape[-1]
    count = visit.sum(axis=-1, dtype=jnp.int32)
    order = jnp.argsort(~visit, axis=-1, stable=True).astype(jnp.int32)  # visited first, in order
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    pos = jnp.arange(m, dtype=jnp.int32)
    order = jnp.where(pos < count[..., None], order, last)
    return jnp.concatenate([count[..., None], order], axis=-1)


# ----------------------------------------------------------------------------- VJP


def sparse_attention_vjp(forward, backward):
    """The differentiable entry point shared by every implementation of these semantics.

    ``forward(q, k, v, sink, selection, cfg) -> (out, residuals)`` and
    ``backward(residuals, d_out, sink, cfg) -> (dq, dk, dv, dsink)``; ``out`` may be a pytree
    (block-sparse returns ``(out, lse)``, and its backward gets ``(d_out, d_lse)``).
    ``selection`` is any pytree of arrays (block selection, key validity, positions, indices),
    never differentiated (as in attnhut): it gets float0 zeros. ``cfg`` is static.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnames=("cfg",))
    def attention(q, k, v, sink, selection, cfg: KernelConfig):
        return forward(q, k, v, sink, selection, cfg)[0]

    def fwd(q, k, v, sink, selection, cfg: KernelConfig):
        out, res = forward(q, k, v, sink, selection, cfg)
        return out, (res, sink, selection)

    def bwd(cfg: KernelConfig, saved, do):
        res, sink, selection = saved
        dq, dk, dv, dsink = backward(res, do, sink, cfg)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0), selection)
        return dq, dk, dv, dsink, zeros

    attention.defvjp(fwd, bwd)
    return attention

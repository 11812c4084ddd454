"""The gated delta rule (and gated / plain linear attention, ``beta=None``) as one op with three
exact implementations: ``recurrent`` (token by token), ``chunk`` (the chunked WY/UT form in XLA)
and the chunked form with its scan in Pallas kernels, ``pallas`` (GPU-style, Triton) or
``pallas_tpu`` (Mosaic TPU), each in interpret mode off its backend unless ``interpret`` says
otherwise. ``reference.py`` states the recurrence and the scan contract the implementations share.

The chunked forms share one ``jax.custom_vjp``: the forward runs ``prep.prepare`` (the parallel,
per-chunk part) then the scan over chunks, and saves only the inputs and the X = T / chunk
chunk-entry states (B, N, X, H, V); the backward recomputes ``prepare`` under ``jax.vjp``, runs the
reverse scan from the saved states, and pulls the scan's cotangents back through ``prepare``.

Memory (per batch row and head, T the padded length, C the chunk size): the saved residuals are
O(T x (H + V) + (T / C) x H x V): never a per-token state, which the recurrent form's autodiff
keeps (T x H x V). The transient working set of either pass adds O(T x (H + V + C)) for the
chunk-contract arrays and the (T, C) intra-chunk matrices; per-channel decay (KDA) adds one
chunk's (C, C, H) decay product at a time. Measured by ``tests/test_gated_delta_op.py``
(residuals) and, for grad at T = 8192, by XLA's compiled memory analysis (see the report in
``docs`` / the test's comment).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp

from .prep import from_chunks, prepare, to_chunks
from .reference import recurrent_reference, scan_bwd_reference, scan_fwd_reference

Array = jax.Array
IMPLS = ("recurrent", "chunk", "pallas", "pallas_tpu")
_PRECISION_NAMES = {jax.lax.Precision.DEFAULT: "default", jax.lax.Precision.HIGH: "high",
                    jax.lax.Precision.HIGHEST: "highest"}


def check_inputs(q_BTNH: Array, k_BTNH: Array, v_BTNV: Array, g: Array, beta_BTN: Array | None,
                 initial_state: Array | None, segment_ids: Array | None, chunk_size: int,
                 impl: str) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming the offending values."""
    if impl not in IMPLS:
        raise ValueError(f"gated_delta_rule: impl={impl!r}; allowed: {IMPLS}")
    if q_BTNH.ndim != 4 or k_BTNH.shape != q_BTNH.shape:
        raise ValueError(f"gated_delta_rule: q and k must be (B, T, N, H) and equal, got "
                         f"{q_BTNH.shape} and {k_BTNH.shape}")
    b, t, n, h = q_BTNH.shape
    if v_BTNV.ndim != 4 or v_BTNV.shape[:3] != (b, t, n):
        raise ValueError(f"gated_delta_rule: v must be (B, T, N, V)=({b}, {t}, {n}, V), got "
                         f"{v_BTNV.shape}")
    if g.shape not in ((b, t, n), (b, t, n, h)):
        raise ValueError(f"gated_delta_rule: g must be (B, T, N)=({b}, {t}, {n}) or (B, T, N, H)="
                         f"({b}, {t}, {n}, {h}), got {g.shape}")
    if beta_BTN is not None and beta_BTN.shape != (b, t, n):
        raise ValueError(f"gated_delta_rule: beta must be (B, T, N)=({b}, {t}, {n}) or None, got "
                         f"{beta_BTN.shape}")
    if initial_state is not None and initial_state.shape != (b, n, h, v_BTNV.shape[-1]):
        raise ValueError(f"gated_delta_rule: initial_state must be (B, N, H, V)=({b}, {n}, {h}, "
                         f"{v_BTNV.shape[-1]}), got {initial_state.shape}")
    if segment_ids is not None:
        if segment_ids.shape != (b, t):
            raise ValueError(f"gated_delta_rule: segment_ids must be (B, T)=({b}, {t}), got "
                             f"{segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"gated_delta_rule: segment_ids must be integers, got "
                            f"{segment_ids.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"gated_delta_rule: chunk_size must be a positive int, got {chunk_size!r}")


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """The static (hashable) configuration of the chunked op."""
    scale: float
    chunk_size: int
    impl: str                       # "chunk", "pallas" or "pallas_tpu"
    interpret: bool
    precision: jax.lax.PrecisionLike = None


def _precision_context(precision):
    """The scan references take no ``precision``: it reaches their products through
    ``jax.default_matmul_precision`` (read when a product is traced), where it has a name."""
    if isinstance(precision, tuple) and len(set(precision)) == 1:
        precision = precision[0]
    name = _PRECISION_NAMES.get(precision, precision) if not isinstance(precision, str) else precision
    if name is None or not isinstance(name, str):
        return contextlib.nullcontext()
    return jax.default_matmul_precision(name)


def _scans(cfg: ChunkConfig):
    """``(scan_fwd, scan_bwd)`` of ``cfg.impl``, each with the reference's signature."""
    if cfg.impl == "chunk":
        def fwd(*args):
            with _precision_context(cfg.precision):
                return scan_fwd_reference(*args)

        def bwd(*args):
            with _precision_context(cfg.precision):
                return scan_bwd_reference(*args)
        return fwd, bwd
    if cfg.impl == "pallas":
        from .kernel import scan_bwd, scan_fwd
    else:
        from .kernel_tpu import scan_bwd_tpu as scan_bwd
        from .kernel_tpu import scan_fwd_tpu as scan_fwd
    return (functools.partial(scan_fwd, interpret=cfg.interpret),
            functools.partial(scan_bwd, interpret=cfg.interpret))


def _prepare(q, k, v, g, beta, segment_ids, cfg: ChunkConfig):
    return prepare(q, k, v, g, beta, scale=cfg.scale, segment_ids=segment_ids,
                   chunk_size=cfg.chunk_size, precision=cfg.precision)


def _forward(q, k, v, g, beta, s0, segment_ids, cfg: ChunkConfig):
    o_BNXTV, states_BNXHV, s_final = _scans(cfg)[0](*_prepare(q, k, v, g, beta, segment_ids, cfg),
                                                      s0.astype(jnp.float32))
    return (from_chunks(o_BNXTV, q.shape[1]).astype(v.dtype), s_final), states_BNXHV


@functools.partial(jax.custom_vjp, nondiff_argnames=("cfg",))
def chunked_gated_delta(q, k, v, g, beta, s0, segment_ids, cfg: ChunkConfig):
    """The chunked op: ``(o (B, T, N, V) in v's dtype, final_state (B, N, H, V) float32)``; s0 the
    initial state (zeros when there is none). Differentiable in q, k, v, g, beta and s0."""
    return _forward(q, k, v, g, beta, s0, segment_ids, cfg)[0]


def _chunked_fwd(q, k, v, g, beta, s0, segment_ids, cfg: ChunkConfig):
    out, states_BNXHV = _forward(q, k, v, g, beta, s0, segment_ids, cfg)
    return out, (q, k, v, g, beta, s0, segment_ids, states_BNXHV)


def _chunked_bwd(cfg: ChunkConfig, res, cotangents):
    q, k, v, g, beta, s0, segment_ids, states_BNXHV = res
    do_BTNV, ds_final = cotangents
    arrays, pull_back = jax.vjp(
        lambda q, k, v, g, beta: _prepare(q, k, v, g, beta, segment_ids, cfg), q, k, v, g, beta)
    do_BNXTV = to_chunks(do_BTNV.astype(jnp.float32), cfg.chunk_size)
    *d_arrays, ds0 = _scans(cfg)[1](*arrays, states_BNXHV, do_BNXTV,
                                    ds_final.astype(jnp.float32))
    dq, dk, dv, dg, dbeta = pull_back(tuple(d_arrays))
    no_grad = jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0), segment_ids)
    return dq, dk, dv, dg, dbeta, ds0.astype(s0.dtype), no_grad


chunked_gated_delta.defvjp(_chunked_fwd, _chunked_bwd)


def gated_delta_rule(q_BTNH: Array, k_BTNH: Array, v_BTNV: Array, g: Array,
                     beta_BTN: Array | None, *, scale: float | None = None,
                     initial_state: Array | None = None, segment_ids: Array | None = None,
                     chunk_size: int = 64, impl: str = "chunk", interpret: bool | None = None,
                     precision: jax.lax.PrecisionLike = None) -> tuple[Array, Array]:
    """``(o (B, T, N, V) in v's dtype, final_state (B, N, H, V) float32)``.

    q, k (B, T, N, H) (already feature-mapped / L2-normalised: the op only scales q by ``scale``,
    default H**-0.5); v (B, T, N, V); ``g`` the log decay, <= 0, (B, T, N) per head or
    (B, T, N, H) per key channel; ``beta`` (B, T, N) the write strength, or None for linear
    attention (no delta correction); ``initial_state`` (B, N, H, V); ``segment_ids`` (B, T) int
    (``reference.py``: 0 skips a token, a new id resets the state). Differentiable in every float
    argument; ``chunk`` and ``pallas`` share one ``jax.custom_vjp`` whose backward recomputes
    chunk-local quantities from the stored chunk-entry states. All arithmetic is float32 whatever
    the input dtype. ``interpret=None``: interpret mode unless the default backend is the kernel's
    (GPU for ``pallas``, TPU for ``pallas_tpu``). ``precision`` reaches every matrix product of
    ``chunk``.
    """
    check_inputs(q_BTNH, k_BTNH, v_BTNV, g, beta_BTN, initial_state, segment_ids, chunk_size,
                 impl)
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl == "recurrent":
        return recurrent_reference(q_BTNH, k_BTNH, v_BTNV, g, beta_BTN, scale=scale,
                                   initial_state=initial_state, segment_ids=segment_ids)
    if interpret is None:
        interpret = jax.default_backend() != {"pallas": "gpu", "pallas_tpu": "tpu"}.get(impl)
    b, _, n, h = q_BTNH.shape
    s0 = (jnp.zeros((b, n, h, v_BTNV.shape[-1]), jnp.float32) if initial_state is None
          else initial_state)
    cfg = ChunkConfig(scale=scale, chunk_size=chunk_size, impl=impl, interpret=bool(interpret),
                      precision=precision)
    return chunked_gated_delta(q_BTNH, k_BTNH, v_BTNV, g, beta_BTN, s0, segment_ids, cfg=cfg)

"""The gated delta rule (and gated / plain linear attention, ``beta=None``) as one op with three
exact implementations: ``recurrent`` (token by token), ``chunk`` (the chunked WY/UT form in XLA)
and the chunked form with its scan in Pallas kernels, ``pallas`` (GPU-style, Triton) or
``pallas_tpu`` (Mosaic TPU), each in interpret mode off its backend unless ``interpret`` says
otherwise. ``reference.py`` states the recurrence and the scan contract the implementations share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .reference import recurrent_reference

Array = jax.Array
IMPLS = ("recurrent", "chunk", "pallas", "pallas_tpu")


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
    chunk-local quantities from the stored chunk-entry states.
    """
    check_inputs(q_BTNH, k_BTNH, v_BTNV, g, beta_BTN, initial_state, segment_ids, chunk_size,
                 impl)
    if impl == "recurrent":
        return recurrent_reference(q_BTNH, k_BTNH, v_BTNV, g, beta_BTN, scale=scale,
                                   initial_state=initial_state, segment_ids=segment_ids)
    raise NotImplementedError(f"gated_delta_rule: impl={impl!r} is being written")

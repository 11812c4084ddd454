"""The gated delta rule (and gated / plain linear attention, ``beta=None``) as one op with three
exact implementations: ``recurrent`` (token by token), ``chunk`` (the chunked WY/UT form in XLA)
and the chunked form with its scan in Pallas kernels, ``pallas`` (GPU-style, Triton) or
``pallas_tpu`` (Mosaic TPU), each in interpret mode off its backend unless ``interpret`` says
otherwise. ``reference.py`` states the recurrence and the scan contract the implementations share.

The chunked forms share one ``jax.custom_vjp``: the forward runs group by group (``lax.scan``
over groups of whole chunks, carrying the state): ``prep.prepare`` (the parallel,
per-chunk part) of the group, then the scan over its chunks; it saves only the inputs and the
X = T / chunk chunk-entry states. The backward runs the groups in reverse, carrying the state's
cotangent: it recomputes the group's ``prepare`` under ``jax.vjp``, runs the reverse scan
from the saved states, and pulls the scan's cotangents back to the group's inputs. A group holds
``group_chunks`` chunks (default: q, k and v of one group within ``GROUP_BYTES``).

Memory (per batch row and head; T the length padded to whole chunks, C the chunk size, G C the
tokens of a group): the saved residuals are the inputs and the chunk-entry states,
O(T x (H + V) + (T / C) x H x V), never a per-token state (the recurrent form's autodiff keeps
T x H x V). Each pass adds a transient of one group, O(G C x (H + V + C)): its contract arrays
and (C, C) intra-chunk matrices (and in the backward their cotangents); per-channel decay builds
its decay products one chunk at a time (``lax.map``), (C / c + c) x H per position of that chunk
(``prep._channel_pairs``, c ~ sqrt(C)). Tested: ``tests/test_gated_delta_op.py`` checks the
saved residuals; measured with XLA's compiled memory analysis on CPU
(``jax.jit(...).lower(...).compile().memory_analysis()``, temp bytes, batch 1, N = 16 heads,
H = V = 128, C = 64, default groups, float32; the inputs alone are 193 MiB per-head / 257 MiB
per-channel at T = 8192)::

                                  forward     grad (all inputs)
    T = 8192   chunk, per head     139 MiB       603 MiB
    T = 8192   chunk, per channel  175 MiB       553 MiB
    T = 8192   recurrent            65 MiB      28.6 GiB   (a state per token)
    T = 65536  chunk, per head     143 MiB       2.0 GiB
    T = 65536  chunk, per channel  179 MiB       2.0 GiB

(before the grouped passes: 3.8 / 11.2 GiB per head at T = 65536). The grad's remaining growth
is the saved chunk-entry states and the outputs' transposes, linear in T.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp

from .prep import chunk_masks, from_chunks, prepare, to_chunks
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
    group_chunks: int | None = None  # chunks per group of the grouped passes (None: GROUP_BYTES)


# float32 bytes of q, k and v one group of chunks holds at most (``group_chunks``): the forward
# and backward passes run group by group, so their transients are one group's, whatever T
GROUP_BYTES = 1 << 26


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
    """``(scan_fwd, scan_bwd)`` of ``cfg.impl``, each with the reference's signature (the
    kernels' modules are imported here, when first used); ``scan_fwd`` also takes ``with_states``
    (False: the kernels skip writing the chunk-entry states, which only the backward reads)."""
    if cfg.impl == "chunk":
        def fwd(*args, with_states=True):   # XLA drops the unused states itself
            del with_states
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
    kw = dict(interpret=cfg.interpret, precision=cfg.precision)
    return functools.partial(scan_fwd, **kw), functools.partial(scan_bwd, **kw)


def group_chunks(cfg: ChunkConfig, b: int, t: int, n: int, h: int, vw: int) -> int:
    """Chunks per group of the grouped passes: ``cfg.group_chunks``, else about the most chunks
    whose float32 q, k and v stay within ``GROUP_BYTES`` (at least one, at most all of them): a
    divisor of the chunk count down to half that many, so that no padding is needed, else the
    size that pads the fewest chunks."""
    x = -(-t // cfg.chunk_size)
    if cfg.group_chunks is not None:
        return max(1, min(cfg.group_chunks, x))
    most = max(1, min(x, GROUP_BYTES // (b * n * cfg.chunk_size * (2 * h + vw) * 4)))
    # a divisor of X near the most (no padded copy of the inputs), else groups as even as can be
    near = [d for d in range(most, (most + 1) // 2 - 1, -1) if x % d == 0]
    return near[0] if near else -(-x // -(-x // most))


class _Groups:
    """The row cut into Y groups of G whole chunks (T zero-padded to Y G C tokens, the padding
    skipped): ``take(a, y)`` is group y's (B, G C, ...) slice of a padded input, ``prepare`` its
    scan-contract arrays. A padded chunk passes the state unchanged (every contract array is zero
    there and ``e`` is one), so the padding changes no output, state or gradient."""

    def __init__(self, cfg: ChunkConfig, q: Array, v: Array, segment_ids: Array | None):
        b, t, n, h = q.shape
        self.cfg, self.t, c = cfg, t, cfg.chunk_size
        self.g = group_chunks(cfg, b, t, n, h, v.shape[-1])
        self.y = -(-t // (self.g * c))
        self.tp = self.y * self.g * c
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        self.masks = chunk_masks(jnp.pad(seg, ((0, 0), (0, self.tp - t))), b, self.tp, c)

    def pad(self, a: Array | None) -> Array | None:
        return None if a is None else jnp.pad(a, [(0, 0), (0, self.tp - self.t)]
                                               + [(0, 0)] * (a.ndim - 2))

    def take(self, a: Array | None, y: Array) -> Array | None:
        gc = self.g * self.cfg.chunk_size
        return None if a is None else jax.lax.dynamic_slice_in_dim(a, y * gc, gc, axis=1)

    def prepare(self, y: Array, q, k, v, g, beta):
        masks = {name: jax.lax.dynamic_slice_in_dim(m, y * self.g, self.g, axis=2)
                 for name, m in self.masks.items()}
        return prepare(q, k, v, g, beta, scale=self.cfg.scale, segment_ids=None,
                       chunk_size=self.cfg.chunk_size, precision=self.cfg.precision, masks=masks)

    def untake(self, a_Y: Array | None) -> Array | None:
        """Stacked per-group (Y, B, G C, ...) -> (B, T, ...), the padding dropped."""
        if a_Y is None:
            return None
        a = jnp.moveaxis(a_Y, 0, 1)
        return a.reshape(a.shape[0], self.tp, *a.shape[3:])[:, :self.t]


def _forward(q, k, v, g, beta, s0, segment_ids, cfg: ChunkConfig, with_states: bool = True):
    """Group by group (``lax.scan`` carrying the state): prepare the group's chunks, scan them.
    Returns ``((o, final_state), states_Y)``, the chunk-entry states stacked per group
    (Y, B, N, G, H, V) (None without ``with_states``)."""
    grp = _Groups(cfg, q, v, segment_ids)
    scan_fwd = _scans(cfg)[0]
    ins = [grp.pad(a) for a in (q, k, v, g, beta)]

    def body(s, y):
        o_BNXTV, states, s_next = scan_fwd(*grp.prepare(y, *(grp.take(a, y) for a in ins)), s,
                                           with_states=with_states)
        return s_next, (from_chunks(o_BNXTV, o_BNXTV.shape[2] * o_BNXTV.shape[3]), states)

    s_final, (o_Y, states_Y) = jax.lax.scan(body, s0.astype(jnp.float32), jnp.arange(grp.y))
    return (grp.untake(o_Y).astype(v.dtype), s_final), states_Y


@functools.partial(jax.custom_vjp, nondiff_argnames=("cfg",))
def chunked_gated_delta(q, k, v, g, beta, s0, segment_ids, cfg: ChunkConfig):
    """The chunked op: ``(o (B, T, N, V) in v's dtype, final_state (B, N, H, V) float32)``; s0 the
    initial state (zeros when there is none). Differentiable in q, k, v, g, beta and s0."""
    return _forward(q, k, v, g, beta, s0, segment_ids, cfg, with_states=False)[0]


def _chunked_fwd(q, k, v, g, beta, s0, segment_ids, cfg: ChunkConfig):
    out, states_Y = _forward(q, k, v, g, beta, s0, segment_ids, cfg)
    return out, (q, k, v, g, beta, s0, segment_ids, states_Y)


def _chunked_bwd(cfg: ChunkConfig, res, cotangents):
    """Group by group from the last (a reverse ``lax.scan`` carrying the state's cotangent):
    recompute the group's ``prepare`` under ``jax.vjp``, run the scan backward from its saved
    chunk-entry states, pull the cotangents back to the group's inputs."""
    q, k, v, g, beta, s0, segment_ids, states_Y = res
    do_BTNV, ds_final = cotangents
    grp = _Groups(cfg, q, v, segment_ids)
    scan_bwd = _scans(cfg)[1]
    ins = [grp.pad(a) for a in (q, k, v, g, beta)]
    do_p = grp.pad(do_BTNV)

    def body(ds, xs):
        y, states = xs
        arrays, pull_back = jax.vjp(functools.partial(grp.prepare, y),
                                    *(grp.take(a, y) for a in ins))
        do_BNXTV = to_chunks(grp.take(do_p, y).astype(jnp.float32), cfg.chunk_size)
        *d_arrays, ds_prev = scan_bwd(*arrays, states, do_BNXTV, ds)
        return ds_prev, pull_back(tuple(d_arrays))

    ds0, grads_Y = jax.lax.scan(body, ds_final.astype(jnp.float32),
                                (jnp.arange(grp.y), states_Y), reverse=True)
    dq, dk, dv, dg, dbeta = (grp.untake(a) for a in grads_Y)
    no_grad = jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0), segment_ids)
    return dq, dk, dv, dg, dbeta, ds0.astype(s0.dtype), no_grad


chunked_gated_delta.defvjp(_chunked_fwd, _chunked_bwd)


def zero_skipped(segment_ids: Array, *arrays: Array | None) -> tuple[Array | None, ...]:
    """``arrays`` (each (B, T, ...)) with the tokens whose ``segment_ids`` is 0 set to zero."""
    skip = segment_ids == 0
    return tuple(None if a is None else
                 jnp.where(skip.reshape(skip.shape + (1,) * (a.ndim - 2)), jnp.zeros((), a.dtype), a)
                 for a in arrays)


def gated_delta_rule(q_BTNH: Array, k_BTNH: Array, v_BTNV: Array, g: Array,
                     beta_BTN: Array | None, *, scale: float | None = None,
                     initial_state: Array | None = None, segment_ids: Array | None = None,
                     chunk_size: int = 64, impl: str = "chunk", interpret: bool | None = None,
                     precision: jax.lax.PrecisionLike = None,
                     group_chunks: int | None = None) -> tuple[Array, Array]:
    """``(o (B, T, N, V) in v's dtype, final_state (B, N, H, V) float32)``.

    q, k (B, T, N, H) (already feature-mapped / L2-normalised: the op only scales q by ``scale``,
    default H**-0.5); v (B, T, N, V); ``g`` the log decay, <= 0, (B, T, N) per head or
    (B, T, N, H) per key channel; ``beta`` (B, T, N) the write strength, or None for linear
    attention (no delta correction); ``initial_state`` (B, N, H, V); ``segment_ids`` (B, T) int
    (``reference.py``: 0 skips a token, a new id resets the state). Differentiable in every float
    argument; ``chunk`` and ``pallas`` share one ``jax.custom_vjp`` whose backward recomputes
    chunk-local quantities from the stored chunk-entry states (memory: the module docstring). All
    arithmetic is float32 whatever the input dtype. ``chunk_size`` is a tuning knob (every size
    gives the same result): a sequence shorter than it is one chunk of its own length.
    ``interpret=None``: interpret mode unless the default backend is the kernel's (GPU for
    ``pallas``, TPU for ``pallas_tpu``). ``precision`` reaches every matrix product.
    ``group_chunks``: the chunked forms run forward and backward in groups of this many chunks
    (default: as many as keep one group's float32 q, k and v within ``GROUP_BYTES``), so that
    every transient is one group's whatever T; any value gives the same result.
    """
    if group_chunks is not None and (not isinstance(group_chunks, int) or group_chunks < 1):
        raise ValueError(f"gated_delta_rule: group_chunks must be a positive int or None, got "
                         f"{group_chunks!r}")
    check_inputs(q_BTNH, k_BTNH, v_BTNV, g, beta_BTN, initial_state, segment_ids, chunk_size,
                 impl)
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl == "recurrent":
        return recurrent_reference(q_BTNH, k_BTNH, v_BTNV, g, beta_BTN, scale=scale,
                                   initial_state=initial_state, segment_ids=segment_ids)
    if interpret is None:
        interpret = jax.default_backend() != {"pallas": "gpu", "pallas_tpu": "tpu"}.get(impl)
    if segment_ids is not None:
        # a skipped token must not reach the chunk arithmetic at all: its q, k, v, g, beta
        # enter products that the masks zero afterwards, and 0 * NaN is NaN (decode steps
        # pass whatever the caller put past a row's length)
        q_BTNH, k_BTNH, v_BTNV, g, beta_BTN = zero_skipped(
            segment_ids, q_BTNH, k_BTNH, v_BTNV, g, beta_BTN)
    b, t, n, h = q_BTNH.shape
    s0 = (jnp.zeros((b, n, h, v_BTNV.shape[-1]), jnp.float32) if initial_state is None
          else initial_state)
    cfg = ChunkConfig(scale=scale, chunk_size=min(chunk_size, max(t, 1)), impl=impl,
                      interpret=bool(interpret), precision=precision,
                      group_chunks=group_chunks)
    return chunked_gated_delta(q_BTNH, k_BTNH, v_BTNV, g, beta_BTN, s0, segment_ids, cfg=cfg)

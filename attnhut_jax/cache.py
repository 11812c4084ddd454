"""Incremental decoding: the ``'cache'`` collection every decoding module shares.

The Flax convention of ``nn.MultiHeadDotProductAttention``: a module built with ``decode=True``
is initialised on a (B, max_len, D) input, which sizes an empty cache (and creates the same
``params`` as ``decode=False``; ``init`` runs no attention over that input and returns zeros);
every later ``apply(..., mutable=["cache"])`` appends a chunk of n >= 1 tokens per row and
returns the chunk's outputs::

    m = GroupedQueryAttention(dim, num_heads, num_kv_heads, causal=True, decode=True)
    variables = m.init(key, jnp.zeros((batch, max_len, dim)))
    out, state = m.apply({"params": params, "cache": variables["cache"]}, x_chunk,
                         mutable=["cache"], lengths=prompt_lengths)   # lengths: first chunk only

Rules every decoding module keeps (``Step`` implements them):

* ``index`` (B,) int32 in the cache: how many tokens each row holds. A chunk's token j of row b
  sits at position ``index[b] + j``; RoPE reads that position, the causal rule lets it read the
  keys at or before it.
* ``lengths`` (B,) int (optional, any call; default n): row b appends only its first
  ``lengths[b]`` tokens. Tokens past a row's length are neither written nor read and their
  outputs are zeros. Rows of a batch may so hold prompts of different lengths; each later step
  appends one token per row at that row's own position.
* Room: when called eagerly (outside every JAX transformation) a chunk that does not fit
  (``index + lengths > max_len`` in some row) raises ``ValueError``, and so do ``lengths``
  outside ``[0, n]``; under ``jit`` (or any tracing transformation, ``nn.scan`` over layers
  included) the index is not known on the host, so only a chunk longer than the whole cache
  raises, ``lengths`` are clipped to ``[0, n]``, and the tokens that do not fit are not written,
  the index stops at ``max_len`` and their outputs are NaN (an overflow never passes for a
  result). A cache that does not grow with its tokens (the linear-attention modules' recurrent
  state, ``begin(..., bounded=False)``) has no room limit.
* ``decode=True`` on a non-causal module raises ``ValueError`` (a decoder only appends).
* The step is a pure function of the cache arrays: a jit-compiled step for a fixed chunk size
  compiles once, whatever the positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import core
from .core import Array, Precision

COLLECTION = "cache"
INDEX = "index"
# the room of a cache that does not grow with its tokens (``begin(..., bounded=False)``): within
# the int32 index's range, with headroom for a chunk's positions. Such a step never calls
# ``Step.keep`` / ``Step.append`` (which would span max_len positions).
UNBOUNDED = 2 ** 30


class ReadsEveryToken:
    """Accounting of a decoding module without a selector whose decode query reads every cached
    token (Standard, MQA, GQA, MLA, Differential): mixed into the module's class."""

    def decode_reads(self, n: int) -> int:
        """Cached tokens whose keys and values (MLA: latent and RoPE key) one decode query reads
        at cache length ``n``: all of them."""
        return int(n)

    def decode_scored(self, n: int) -> int:
        """Index keys a selector scores per decode query: none (no selector)."""
        del n
        return 0


def check_options(owner: str, *, decode: bool, lengths: Array | None = None, **given) -> None:
    """Raise for call arguments a decode step cannot take (``given``: name -> value, rejected
    when not None), and for ``lengths`` without ``decode``."""
    if not decode:
        if lengths is not None:
            raise ValueError(f"{owner}: lengths is a decode argument (prompt lengths of the first "
                             f"chunk); build the module with decode=True")
        return
    bad = [k for k, v in given.items() if v is not None and v is not False]
    if bad:
        raise ValueError(f"{owner}: {', '.join(bad)} cannot be used with decode=True (a decode step "
                         f"appends one sequence per row to the cache: positions continue from the "
                         f"cache, rows of different lengths take lengths=)")


def check_causal(owner: str, decode: bool, causal: bool) -> None:
    """``decode=True`` needs a causal module."""
    if decode and not causal:
        raise ValueError(f"{owner}: decode=True needs causal=True (a bidirectional module reads "
                         f"tokens that a decoder has not generated yet)")


def refuse_decode(owner: str, decode: bool, why: str) -> None:
    """Raise for a module that cannot decode incrementally, saying why."""
    if decode:
        raise ValueError(f"{owner} cannot decode incrementally (decode=True): {why}")


def _is_tracer(a) -> bool:
    return isinstance(a, jax.core.Tracer)


@dataclass
class Step:
    """One decode call of ``module``: the chunk, its positions and the cache writes.

    Attributes:
      x: the chunk (B, n, D) to compute (at ``init``: the first token of the sizing input).
      start_B: (B,) int32 tokens in each row before the chunk.
      len_B: (B,) int32 tokens the chunk appends per row (<= n).
      pos_BT: (B, n) int32 position of each chunk token (``start + j``).
      ok_BT: (B, n) bool: token j is appended (j < len, and it fits).
      max_len: the cache's length (static).
      initializing: True inside ``init``: arrays are created empty and nothing is written.
    """

    module: nn.Module
    owner: str
    x: Array
    start_B: Array
    len_B: Array
    pos_BT: Array
    ok_BT: Array
    max_len: int
    initializing: bool
    _out_shape: tuple[int, ...]

    # ------------------------------------------------------------------ arrays
    def state(self, name: str, shape: tuple[int, ...], dtype, fill=0) -> Array:
        """The cache array ``name``: created as ``full(shape, fill, dtype)`` at init, read
        otherwise (its shape is checked against ``shape``; values written to it are cast to
        its dtype)."""
        m = self.module
        if self.initializing or not m.has_variable(COLLECTION, name):
            if not self.initializing:
                raise ValueError(f"{self.owner}: the cache has no array {name!r}; initialise the "
                                 f"module with decode=True and pass its 'cache' collection")
            value = jnp.full(shape, fill, dtype)
            m.put_variable(COLLECTION, name, value)
            return value
        value = m.get_variable(COLLECTION, name)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{self.owner}: cache array {name!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(shape)} (was the cache initialised for this module "
                             f"and batch?)")
        return value

    def put(self, name: str, value: Array) -> None:
        """Store ``value`` as cache array ``name`` (nothing is stored at init)."""
        if not self.initializing:
            self.module.put_variable(COLLECTION, name, value)

    def append(self, name: str, value_BT: Array, *, heads_first: bool = False) -> Array:
        """Write the chunk's appended tokens of ``value_BT`` (B, n, ...) into cache array
        ``name`` at their positions; returns the array after the write. The array is
        (B, max_len, ...), or with ``heads_first`` (B, K, max_len, ...) for a (B, n, K, ...)
        value: the head-major layout whose rows a dense decode step reads contiguously."""
        b, rest = value_BT.shape[0], value_BT.shape[2:]
        shape = (b, rest[0], self.max_len, *rest[1:]) if heads_first else (b, self.max_len, *rest)
        cache = self.state(name, shape, value_BT.dtype)
        new = write_rows(cache, self.pos_BT, value_BT.astype(cache.dtype), self.ok_BT,
                         axis=2 if heads_first else 1)
        self.put(name, new)
        return new

    # ------------------------------------------------------------------ rules
    def keep(self, length: int | None = None) -> Array:
        """(B, n, S) bool, S = ``length`` (default max_len): chunk token j may read cache
        position s (the causal rule ``s <= pos``, for appended tokens only)."""
        s = self.max_len if length is None else length
        return (jnp.arange(s)[None, None, :] <= self.pos_BT[:, :, None]) & self.ok_BT[:, :, None]

    @property
    def end_B(self) -> Array:
        """(B,) int32: tokens in each row after the chunk."""
        return jnp.minimum(self.start_B + self.len_B, self.max_len)

    def finish(self, out_BTD: Array) -> Array:
        """Advance the index and return the chunk's outputs: zeros past a row's length, NaN for
        tokens that did not fit (under jit); at init, zeros of the sizing input's shape."""
        if self.initializing:
            return jnp.zeros(self._out_shape, out_BTD.dtype)
        self.module.put_variable(COLLECTION, INDEX, self.end_B)
        n = out_BTD.shape[1]
        asked_BT = jnp.arange(n)[None, :] < self.len_B[:, None]
        out_BTD = jnp.where(self.ok_BT[..., None], out_BTD, jnp.zeros((), out_BTD.dtype))
        overflow_BT = asked_BT & ~self.ok_BT
        return jnp.where(overflow_BT[..., None], jnp.asarray(jnp.nan, out_BTD.dtype), out_BTD)


def begin(module: nn.Module, owner: str, x: Array, lengths: Array | None, *,
          sized_by: str, per_slot: int = 1, axis: int = 1, bounded: bool = True) -> Step:
    """Start a decode call of ``module`` on the (already validated) input ``x``.

    At init ``x`` is the (B, max_len, D) sizing input: the index is created and the step
    computes its first token only (to create the parameters), writing nothing. Otherwise the
    cache's ``max_len`` is axis ``axis`` (1, or 2 for a head-major array) of cache array
    ``sized_by`` times ``per_slot`` (e.g. HCA's entries hold ``compression_rate`` tokens each),
    and ``lengths`` / the room are checked.

    ``bounded=False``: a cache whose arrays do not grow with the tokens (a recurrent state, the
    linear-attention modules): ``sized_by`` is only checked to exist, and the room is
    ``UNBOUNDED`` tokens per row (the int32 index's range), whatever ``max_len`` sized ``init``.
    """
    b, n = x.shape[0], x.shape[1]
    if module.is_initializing():
        module.put_variable(COLLECTION, INDEX, jnp.zeros((b,), jnp.int32))
        zero = jnp.zeros((b,), jnp.int32)
        return Step(module, owner, x[:, :1], zero, zero + 1, zero[:, None],
                    jnp.ones((b, 1), bool), n, True, tuple(x.shape))
    if not module.has_variable(COLLECTION, INDEX):
        raise ValueError(f"{owner}: decode=True needs the 'cache' collection: initialise with "
                         f"m.init(key, jnp.zeros((batch, max_len, dim))) and call m.apply("
                         f"{{'params': ..., 'cache': ...}}, x, mutable=['cache'])")
    if not module.has_variable(COLLECTION, sized_by):
        raise ValueError(f"{owner}: the cache given has no array {sized_by!r}: it was not "
                         f"initialised for this module (initialise with decode=True on this "
                         f"module and pass that 'cache' collection)")
    if not module.is_mutable_collection(COLLECTION):
        raise ValueError(f"{owner}: a decode step writes the cache: call m.apply(..., "
                         f"mutable=['cache']) and keep the returned state['cache']")
    start_B = module.get_variable(COLLECTION, INDEX)
    if tuple(start_B.shape) != (b,):
        raise ValueError(f"{owner}: the cache holds {start_B.shape[0]} rows, the input "
                         f"{tuple(x.shape)} has batch {b}")
    max_len = (module.get_variable(COLLECTION, sized_by).shape[axis] * per_slot if bounded
               else UNBOUNDED)
    if n > max_len:
        raise ValueError(f"{owner}: a chunk of {n} tokens is longer than the cache (max_len="
                         f"{max_len})")
    if lengths is None:
        len_B = jnp.full((b,), n, jnp.int32)
    else:
        if not hasattr(lengths, "shape") or not hasattr(lengths, "dtype"):
            raise TypeError(f"{owner}: lengths must be an integer array of shape ({b},), got "
                            f"{type(lengths)!r}")
        if tuple(lengths.shape) != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"{owner}: lengths must be an integer array of shape (batch,)=({b},),"
                             f" got shape {tuple(lengths.shape)} dtype {lengths.dtype}")
        if not _is_tracer(lengths) and (jnp.any(lengths < 0) or jnp.any(lengths > n)):
            raise ValueError(f"{owner}: lengths {lengths.tolist()} must lie in [0, {n}] (the "
                             f"chunk's length)")
        len_B = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, n)
    start_B = start_B.astype(jnp.int32)
    if not _is_tracer(start_B) and not _is_tracer(len_B):
        over = jnp.nonzero(start_B + len_B > max_len)[0].tolist()
        if over:
            r = over[0]
            raise ValueError(f"{owner}: the chunk does not fit the cache: row {r} holds "
                             f"{int(start_B[r])} of max_len={max_len} tokens and appends "
                             f"{int(len_B[r])} (rows that overflow: {over})")
    pos_BT = start_B[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    ok_BT = (jnp.arange(n)[None, :] < len_B[:, None]) & (pos_BT < max_len)
    return Step(module, owner, x, start_B, len_B, pos_BT, ok_BT, max_len, False, tuple(x.shape))


def write_rows(cache_BL: Array, idx_BT: Array, value_BT: Array, ok_BT: Array,
               axis: int = 1) -> Array:
    """``cache_BL`` (B, L, ...) with ``value_BT[b, j]`` written at ``[b, idx_BT[b, j]]`` where
    ``ok_BT`` (and the index is in range); other writes are dropped. ``axis=2``: the cache is
    (B, K, L, ...) and ``value_BT`` (B, n, K, ...) is written at ``[b, :, idx_BT[b, j]]``."""
    b, slots = cache_BL.shape[0], cache_BL.shape[axis]
    idx_BT = jnp.where(ok_BT & (idx_BT >= 0) & (idx_BT < slots), idx_BT, slots)
    rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], idx_BT.shape)
    if axis == 1:
        return cache_BL.at[rows_BT, idx_BT].set(value_BT, mode="drop")
    if axis != 2:
        raise ValueError(f"write_rows: axis must be 1 or 2, got {axis}")
    return cache_BL.at[rows_BT, :, idx_BT].set(value_BT, mode="drop")


def gather_rows(cache_BL: Array, idx_BTM: Array) -> Array:
    """``cache_BL`` (B, L, ...) read at ``idx_BTM`` (B, T, M) per row -> (B, T, M, ...);
    out-of-range indices (e.g. -1 for "none") read slot 0 (mask them)."""
    slots = cache_BL.shape[1]
    safe = jnp.clip(idx_BTM, 0, slots - 1)
    return jax.vmap(lambda c, i: c[i])(cache_BL, safe)


def attend_cache(step: Step, q_BTNH: Array, k_BTKH: Array, v_BTKV: Array, *,
                 scale: float | None = None, precision: Precision = None,
                 names: tuple[str, str] = ("key", "value"), window: int | None = None,
                 sink: Array | None = None, prefix: tuple[Array, Array] | None = None) -> Array:
    """The dense decode step: append the chunk's keys and values (B, n, K, H|V) to the
    head-major cache arrays ``names`` (B, K, max_len, H|V) and attend the chunk's queries
    (B, n, N, H) over every cached key at or before them (and, with ``window``, within the
    ``window`` latest positions). ``sink`` and ``prefix`` as ``cached_attention``. Returns
    (B, n, N, V)."""
    k_BKSH = step.append(names[0], k_BTKH, heads_first=True)
    v_BKSV = step.append(names[1], v_BTKV, heads_first=True)
    if not step.initializing:  # read the written cache as it is (XLA would otherwise fuse a
        # second copy of each write into its readers and copy the whole cache for it)
        k_BKSH, v_BKSV = jax.lax.optimization_barrier((k_BKSH, v_BKSV))
    keep_BTS = step.keep()
    if window is not None:
        keep_BTS = keep_BTS & (jnp.arange(step.max_len)[None, None, :]
                               > step.pos_BT[:, :, None] - window)
    return cached_attention(q_BTNH, k_BKSH, v_BKSV, keep_BTS, scale=scale,
                            precision=precision, sink=sink, prefix=prefix)


def cached_attention(q_BTNH: Array, k_BKSH: Array, v_BKSV: Array, keep_BTS: Array, *,
                     scale: float | None = None, precision: Precision = None,
                     sink: Array | None = None,
                     prefix: tuple[Array, Array] | None = None) -> Array:
    """Dense attention of (B, T, N, H) queries over a head-major cache (B, K, S, H|V), query
    head n reading kv head n // (N // K), key s where ``keep_BTS``; core's masked softmax
    (float32 for half precision, a row without keys gives zeros). The cache is read in its own
    layout (no transpose of the cache per step). Returns (B, T, N, V).

    ``sink``: per-head logits (N,) in every row's denominator. ``prefix``: keys and values
    (P, K, H|V) every query reads besides the cache (learnable sink tokens), in the same
    softmax; the cache is not copied for them."""
    b, t, n, h = q_BTNH.shape
    k = k_BKSH.shape[1]
    g = n // k
    q_BKGTH = q_BTNH.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)
    # the cache is the product's left operand in its own (S, H) rows (as BKGTH,BKSH->BKGTS XLA
    # transposed every key of the cache each step); the (S, G * T) logits are rearranged
    logits_BKSX = jax.lax.dot_general(k_BKSH, q_BKGTH.reshape(b, k, -1, h),
                                      (((3,), (3,)), ((0, 1), (0, 1))), precision=precision)
    logits = logits_BKSX.reshape(b, k, -1, g, t).transpose(0, 1, 3, 4, 2)
    scale = h ** -0.5 if scale is None else scale
    logits = logits.astype(core.softmax_dtype(q_BTNH.dtype)) * scale
    keep = keep_BTS[:, None, None]
    s = logits.shape[-1]
    if prefix is not None:
        pk_PKH, pv_PKV = prefix
        plogits = jnp.einsum("BKGTH,PKH->BKGTP", q_BKGTH, pk_PKH.astype(q_BTNH.dtype),
                             precision=precision).astype(logits.dtype) * scale
        logits = jnp.concatenate([logits, plogits], axis=-1)
        keep = jnp.concatenate([jnp.broadcast_to(keep, logits.shape[:-1] + (s,)),
                                jnp.ones(plogits.shape, bool)], axis=-1)
    sink_BKGT1 = None if sink is None else sink.reshape(1, k, g, 1, 1).astype(logits.dtype)
    probs = core.masked_softmax(logits, keep, sink_BKGT1)
    out = read_values(probs[..., :s].reshape(b, k, -1, s), v_BKSV, precision=precision)
    if prefix is not None:
        out = out + jnp.einsum("BKXP,PKV->BKXV", probs[..., s:].reshape(b, k, g * t, -1),
                               pv_PKV.astype(probs.dtype), precision=precision).astype(out.dtype)
    return out.reshape(b, k, g, t, -1).transpose(0, 3, 1, 2, 4).reshape(b, t, n, -1)


# a read of the value cache by at most this many rows per kv head (a decode step's queries times
# the heads sharing the kv head) is a weighted sum of the cache rows (``read_values``)
WEIGHTED_SUM_ROWS = 4


def read_values(probs_BKXS: Array, v_BKSV: Array, precision: Precision = None) -> Array:
    """Probabilities (B, K, X, S) times the head-major values (B, K, S, V) -> (B, K, X, V) in
    v's dtype. For X <= ``WEIGHTED_SUM_ROWS`` (a decode step) a weighted sum over the cache rows
    in their own (S, V) layout, accumulated in float32: as a matrix product, XLA:CPU can pick a
    (V, S) layout for the values and transpose the whole value cache each step (measured:
    Differential's step at 128k spent 70 of its 100 ms on that copy). Longer chunks use the
    product (``precision`` reaches it)."""
    if probs_BKXS.shape[2] <= WEIGHTED_SUM_ROWS:
        acc = jnp.promote_types(v_BKSV.dtype, jnp.float32)
        out = jnp.sum(probs_BKXS.astype(acc)[..., None] * v_BKSV.astype(acc)[:, :, None], axis=3)
        return out.astype(v_BKSV.dtype)
    return jnp.einsum("BKXS,BKSV->BKXV", probs_BKXS.astype(v_BKSV.dtype), v_BKSV,
                      precision=precision)


def row_dots(rows_BSE: Array, q_BXE: Array, precision: Precision = None) -> Array:
    """Products (B, S, X) of cached rows (B, S, E), e.g. a selector's index keys, with X query
    rows (B, X, E), in float32 (or wider) and read in the rows' own (S, E) layout, once. For
    X <= ``WEIGHTED_SUM_ROWS`` (a decode step's few queries) one fused multiply-and-sum pass over
    the rows: XLA:CPU's product of a (S, 64) cache with 2 or 4 rows runs 1.2-1.6x slower
    (measured at S = 128k). Longer chunks use the product (``precision`` reaches it)."""
    acc = jnp.promote_types(jnp.result_type(rows_BSE, q_BXE), jnp.float32)
    rows_BSE, q_BXE = rows_BSE.astype(acc), q_BXE.astype(acc)
    if q_BXE.shape[1] <= WEIGHTED_SUM_ROWS:
        return jnp.sum(rows_BSE[:, :, None, :] * q_BXE[:, None], axis=-1)
    return jax.lax.dot_general(rows_BSE, q_BXE, (((2,), (2,)), ((0,), (0,))), precision=precision)


def dense_cache_bytes(batch: int, max_len: int, kv_heads: int, key_width: int, value_width: int,
                      dtype) -> int:
    """``cache_bytes`` of a dense K/V cache: keys and values of every kv head, and the index."""
    return (nbytes((batch, max_len, kv_heads, key_width), dtype)
            + nbytes((batch, max_len, kv_heads, value_width), dtype) + index_bytes(batch))


def selector_dtype(selector: object, dtype: object, param_dtype: object) -> object:
    """The dtype of a selector's cached index keys: ``selector`` (a module's ``selector_dtype``)
    when set; when None, the selector's projections promote their input (the main branch's
    ``dtype``) with the ``param_dtype`` parameters, as ``core.Linear`` does."""
    return selector if selector is not None else jnp.promote_types(dtype, param_dtype)


def index_bytes(batch: int) -> int:
    """Bytes of the cache's position counter (``index``, int32 per row)."""
    return 4 * batch


def nbytes(shape: tuple[int, ...], dtype) -> int:
    """Bytes of an array of ``shape`` and ``dtype``."""
    size = 1
    for d in shape:
        size *= int(d)
    return size * jnp.dtype(dtype).itemsize


def cache_arrays_bytes(cache) -> int:
    """Bytes of every array of a ``'cache'`` collection (what ``cache_bytes`` must equal)."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache)))


__all__ = ["UNBOUNDED", "ReadsEveryToken", "Step", "attend_cache", "begin", "cache_arrays_bytes",
           "cached_attention", "check_causal", "check_options", "dense_cache_bytes", "gather_rows",
           "index_bytes", "nbytes", "refuse_decode", "selector_dtype", "write_rows"]

"""The one table of implementations: every ``impl`` choice in ``attnhut_jax`` is resolved here.

An operation is a pure function of arrays with several exact implementations; a module names
the operation and passes its ``impl`` field, and never branches on the name itself.

    operation       impls                        ``auto`` resolves to
    dense           xla, cudnn                   cudnn on GPU where cuDNN supports the call,
                                                 else xla
    block_sparse    reference, xla, pallas       pallas on GPU and TPU, else xla
    token_sparse    reference, xla, pallas       pallas on GPU and TPU, else xla
    indexer_topk    reference, xla, pallas       pallas on GPU and TPU, else xla
    dsa             reference, xla, pallas       (DeepSeek sparse: select, then attend)
    csa             reference, xla, pallas       (compressed sparse: select, then attend)
    msa_index_loss  reference, xla, pallas       (MiniMax's index loss over the picked blocks)
    gated_delta     recurrent, chunk, pallas     pallas on GPU and TPU, else chunk (the gated
                                                 delta rule / linear attention recurrence)
    sparse_transformer reference, xla, pallas    pallas on GPU and TPU, else xla (Child et
                                                 al.'s patterns: the masked dense (T, T)
                                                 computation, or block-sparse passes merged
                                                 by log-sum-exp on that block_sparse impl)
    sinkhorn        reference, xla               xla (sparse Sinkhorn attention given its
                                                 sorting matrix: the masked dense (T, 2T)
                                                 computation, or the block path; no kernel)
    spark           reference, xla               xla (Spark attention's statistical top-k:
                                                 no kernel yet)

The functions register themselves where they are defined (``core`` for the shared cores, the
mechanism's file for DSA's and CSA's selection paths and MiniMax's index loss) with
``@register(op, impl)``; an impl may declare a ``supports`` check that names why a given call
cannot run on it. ``select`` resolves an
impl once per call site (at trace time): an explicit impl that cannot run the call raises a
``ValueError`` naming why, never falling back; ``auto`` takes the first supported impl in the
backend's order. An impl may also have a backend-specific entry (``register(..., backend="tpu")``:
the Mosaic TPU kernels under ``pallas``), which ``select`` prefers on that backend: the backend is
looked at here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import jax

DenseImpl = Literal["auto", "xla", "cudnn"]
SparseImpl = Literal["auto", "reference", "xla", "pallas"]
DENSE_IMPLS: tuple[str, ...] = get_args(DenseImpl)
SPARSE_IMPLS: tuple[str, ...] = get_args(SparseImpl)
LinearImpl = Literal["auto", "chunk", "recurrent", "pallas"]
LINEAR_IMPLS: tuple[str, ...] = get_args(LinearImpl)
SinkhornImpl = Literal["auto", "reference", "xla"]
SINKHORN_IMPLS: tuple[str, ...] = get_args(SinkhornImpl)

# op -> the impls a module may name (``auto`` included)
OPERATIONS: dict[str, tuple[str, ...]] = {
    "dense": DENSE_IMPLS,
    # ``mosaic_gpu``: the Hopper kernels (``pallas_kernels/*/mosaic_gpu.py``), named explicitly
    # until they are measured faster than the Triton kernels behind ``pallas``
    "block_sparse": SPARSE_IMPLS + ("mosaic_gpu",),
    "token_sparse": SPARSE_IMPLS + ("mosaic_gpu",),
    "indexer_topk": SPARSE_IMPLS,
    "dsa": SPARSE_IMPLS,
    "csa": SPARSE_IMPLS,
    "msa_index_loss": SPARSE_IMPLS,
    "gated_delta": LINEAR_IMPLS,
    "sparse_transformer": SPARSE_IMPLS,
    "sinkhorn": SINKHORN_IMPLS,
    "spark": ("auto", "reference", "xla"),
}
# op -> the impl ``auto`` ends on, on every backend (the one that supports every call)
_LAST = {"gated_delta": "chunk"}

# op kind -> backend -> the order in which ``auto`` tries impls
_DENSE_ORDER = {"gpu": ("cudnn", "xla")}
_SPARSE_ORDER = {"gpu": ("pallas",), "tpu": ("pallas",)}
_NO_KERNEL = {"sinkhorn", "spark"}  # ops without a Pallas kernel: ``auto`` is their last impl everywhere

Supports = Callable[..., "str | None"]
# (op, impl) -> backend (None: any backend) -> (function, supports)
_TABLE: dict[tuple[str, str], dict[str | None, tuple[Callable[..., Any], Supports | None]]] = {}


def register(op: str, impl: str, *, supports: Supports | None = None, backend: str | None = None):
    """Decorator: ``fn`` implements ``op`` as ``impl`` (on ``backend`` only, if given; a
    backend-specific entry wins over the generic one there, e.g. the Mosaic TPU kernels under
    ``pallas``).

    ``supports(*args, **kwargs)``, if given, takes the call's arguments and returns ``None`` when
    ``fn`` can run them, else a sentence naming why not.
    """
    if op not in OPERATIONS:
        raise ValueError(f"register: unknown operation {op!r}; known: {tuple(OPERATIONS)}")
    if impl == "auto" or impl not in OPERATIONS[op]:
        raise ValueError(f"register: impl={impl!r} is not a concrete impl of {op!r}; "
                         f"allowed: {tuple(i for i in OPERATIONS[op] if i != 'auto')}")

    def add(fn):
        entries = _TABLE.setdefault((op, impl), {})
        if backend in entries:
            where = "" if backend is None else f" on {backend!r}"
            raise ValueError(f"register: ({op!r}, {impl!r}){where} is already registered")
        entries[backend] = (fn, supports)
        return fn

    return add


def check(owner: str, op: str, impl: str) -> None:
    """Raise ``ValueError`` naming the module, op and allowed values unless ``impl`` is one."""
    allowed = OPERATIONS[op]
    if impl not in allowed:
        raise ValueError(f"{owner}: impl={impl!r} is not an implementation of {op!r}; "
                         f"allowed: {allowed}")


def implementations(op: str) -> tuple[str, ...]:
    """The concrete impls registered for ``op``."""
    return tuple(i for (o, i) in _TABLE if o == op)


def auto_order(op: str, backend: str | None = None) -> tuple[str, ...]:
    """The impls ``auto`` tries for ``op`` on ``backend`` (default: JAX's default backend)."""
    backend = backend or jax.default_backend()
    order = _DENSE_ORDER if op == "dense" else {} if op in _NO_KERNEL else _SPARSE_ORDER
    return order.get(backend, ()) + (_LAST.get(op, "xla"),)


def resolve(op: str, impl: str, backend: str | None = None) -> str:
    """``impl`` itself, or for ``auto`` the first impl of ``auto_order`` (support unchecked)."""
    check("resolve", op, impl)
    return auto_order(op, backend)[0] if impl == "auto" else impl


def select(owner: str, op: str, impl: str, *args, **kwargs) -> Callable[..., Any]:
    """The function that runs ``op`` with these arguments under ``impl``.

    An explicit impl whose ``supports`` rejects the call raises ``ValueError`` with the reason;
    ``auto`` takes the first supported impl in ``auto_order``.
    """
    check(owner, op, impl)
    backend = jax.default_backend()
    for name in (auto_order(op, backend) if impl == "auto" else (impl,)):
        entries = _TABLE[op, name]
        fn, supports = entries.get(backend) or entries[None]
        reason = None if supports is None else supports(*args, **kwargs)
        if reason is None:
            return fn
        if impl != "auto":
            raise ValueError(f"{owner}: impl={impl!r} cannot run {op!r} here: {reason}")
    raise AssertionError(f"{owner}: no impl of {op!r} supports this call")  # the last supports all


def call(owner: str, op: str, impl: str, *args, **kwargs):
    """``select(owner, op, impl, ...)(...)``: run ``op`` under ``impl``."""
    return select(owner, op, impl, *args, **kwargs)(*args, **kwargs)


def window_route(impl: str) -> tuple[str, str]:
    """(op, impl) a dense module's sliding window runs on: cuDNN's local window (the ``dense``
    op) under ``cudnn``, else the ``block_sparse`` op, O(T x window) (``xla`` stays ``xla``,
    ``auto`` is the block-sparse op's ``auto``: the Pallas kernels on GPU and TPU)."""
    return ("dense", "cudnn") if impl == "cudnn" else ("block_sparse", impl)

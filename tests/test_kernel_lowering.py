"""Every Pallas kernel lowers for its accelerator with ``jax.export`` on a CPU-only host.

GPU: the Triton kernels (block-sparse and token-sparse forward, dq and dk/dv; the radix-select
indexer; the gated delta rule's chunk scan, forward and backward) are lowered for ``cuda``
inside ``jax.sharding.use_abstract_mesh`` with an abstract Hopper device: jax 0.12 asks the
mesh which GPU to compile for when none is present (jax 0.10 falls back to compute capability
9.0 by itself; the same mesh works there). This catches operations the GPU lowering does not
support. The Triton custom call carries no serialization guarantee, so that one safety check
is disabled.

TPU: the Mosaic kernels lower to ``tpu_custom_call`` (block shapes, scalar prefetch and the
kernel bodies pass Pallas' Mosaic lowering; Mosaic's own compile needs a TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels.block_sparse import BlockSizes, block_sparse_attention
from pallas_kernels.block_sparse.tpu import block_sparse_attention_tpu
from pallas_kernels.gated_delta.kernel import scan_bwd, scan_fwd
from pallas_kernels.gated_delta.kernel_tpu import scan_bwd_tpu, scan_fwd_tpu
from pallas_kernels.token_sparse.indexer_kernel import IndexerKernelBlocks, indexer_topk_pallas
from pallas_kernels.token_sparse.kernel import token_sparse_attention
from pallas_kernels.token_sparse.kernel_tpu import token_sparse_attention_tpu

sds = jax.ShapeDtypeStruct
TRITON = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def export_for_cuda(fn, *args) -> str:
    """MLIR text of ``jax.jit(fn)`` exported for CUDA on a host without a GPU: lowered inside an
    abstract one-device mesh (axis type ``Auto``) whose device is an H100 (compute capability
    9.0, 132 SMs)."""
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,),
                                     abstract_device=h100)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=TRITON)(*args)
    return exported.mlir_module()


def _grad_of(fwd, *nondiff):
    """fn(q, k, v, sink) -> gradients of sum(fwd(q, k, v, *nondiff, sink)) in all four."""
    def fwd_bwd(q, k, v, sink):
        return jax.grad(lambda *a: fwd(*a[:3], *nondiff, a[3]).astype(jnp.float32).sum(),
                        argnums=(0, 1, 2, 3))(q, k, v, sink)
    return fwd_bwd


def test_block_sparse_kernels_lower_for_cuda():
    b, t, n, kg, h, bk = 1, 256, 4, 2, 64, 64
    q, k = sds((b, t, n, h), jnp.bfloat16), sds((b, t, kg, h), jnp.bfloat16)
    keep, sink = sds((b, kg, t, t // bk), jnp.bool_), sds((n,), jnp.float32)

    def fwd(q, k, v, keep, sink):
        return block_sparse_attention(q, k, v, keep, block_k=bk, causal=True, sink=sink,
                                      block_sizes=BlockSizes(64), interpret=False)

    assert export_for_cuda(fwd, q, k, k, keep, sink).count("xla.gpu.triton") == 1
    text = export_for_cuda(lambda q, k, v, keep, sink: _grad_of(fwd, keep)(q, k, v, sink),
                           q, k, k, keep, sink)
    assert text.count("xla.gpu.triton") == 3  # forward, dq and dk/dv kernels


def _grad_with_lse(fwd, *nondiff):
    """fn(q, k, v, sink) -> gradients in all four of a loss on both outputs of
    ``fwd(q, k, v, *nondiff, sink)`` (``return_lse=True``): the lse cotangent enters the
    backward's delta."""
    def loss(q, k, v, sink):
        out, lse = fwd(q, k, v, *nondiff, sink)
        return out.astype(jnp.float32).sum() + lse.sum()
    return lambda q, k, v, sink: jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sink)


def test_block_sparse_kernels_lower_with_lse():
    """``return_lse=True``: the Triton and the Mosaic kernels, forward and backward (the lse
    cotangent joining delta), still lower to one and three kernel calls."""
    b, t, n, kg, h, bk = 1, 256, 4, 2, 64, 64
    q, k = sds((b, t, n, h), jnp.bfloat16), sds((b, t, kg, h), jnp.bfloat16)
    keep, sink = sds((b, kg, t, t // bk), jnp.bool_), sds((n,), jnp.float32)
    kernels = (
        (lambda *a: block_sparse_attention(*a[:4], block_k=bk, causal=True, sink=a[4],
                                           block_sizes=BlockSizes(64), interpret=False,
                                           return_lse=True),
         export_for_cuda, "xla.gpu.triton"),
        (lambda *a: block_sparse_attention_tpu(*a[:4], block_k=bk, causal=True, sink=a[4],
                                               interpret=False, return_lse=True),
         lambda fn, *args: export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module(),
         "tpu_custom_call"),
    )
    for fwd, export_fn, call in kernels:
        fwd_bwd = lambda q, k, v, keep, sink, fwd=fwd: _grad_with_lse(fwd, keep)(q, k, v, sink)  # noqa: E731
        for fn, calls in ((fwd, 1), (fwd_bwd, 3)):
            assert export_fn(fn, q, k, k, keep, sink).count(call) == calls


def test_block_sparse_kernels_lower_for_cuda_with_segments():
    """Packed sequences: segment ids and per-key sink flags enter the three kernels as tiles."""
    b, t, n, kg, h, bk = 2, 256, 4, 2, 64, 64
    q, k = sds((b, t, n, h), jnp.bfloat16), sds((b, t, kg, h), jnp.bfloat16)
    keep, sink = sds((b, kg, t, t // bk), jnp.bool_), sds((n,), jnp.float32)
    seg, sinks = sds((b, t), jnp.int32), sds((b, t), jnp.bool_)

    def fwd(q, k, v, keep, seg, sinks, sink):
        return block_sparse_attention(q, k, v, keep, block_k=bk, causal=True, sink=sink,
                                      window=128, q_seg_BT=seg, k_seg_BS=seg, k_sink_BS=sinks,
                                      block_sizes=BlockSizes(64), interpret=False)

    def fwd_bwd(q, k, v, keep, seg, sinks, sink):
        return _grad_of(fwd, keep, seg, sinks)(q, k, v, sink)

    for fn, calls in ((fwd, 1), (fwd_bwd, 3)):
        assert export_for_cuda(fn, q, k, k, keep, seg, sinks, sink).count("xla.gpu.triton") == calls


# token-sparse cases: (S, kv heads, shared K/V, window, packed): the CSA shape is S = C + T (not
# a power of two) with shared K/V, window and sink, also with segment ids (packed sequences)
TOKEN_CASES = ((256, 2, False, None, False), (320, 1, True, 64, False), (320, 1, True, 64, True))


def _segments(packed: bool, s: int):
    """Segment-id arguments of a token-sparse call (abstract (B, T) and (B, S) int32), or none."""
    if not packed:
        return {}
    return dict(q_seg_BT=sds((1, 256), jnp.int32), k_seg_BS=sds((1, s), jnp.int32))


def test_token_sparse_kernels_lower_for_cuda():
    for s, kg, shared, window, packed in TOKEN_CASES:
        q, k = sds((1, 256, 4, 64), jnp.bfloat16), sds((1, s, kg, 64), jnp.bfloat16)
        idx, sink = sds((1, 256, 32), jnp.int32), sds((4,), jnp.float32)
        segs = _segments(packed, s)

        def fwd(q, k, v, idx, segs, sink, shared=shared, window=window, s=s):
            return token_sparse_attention(q, k, None if shared else v, idx, sink=sink,
                                          window=window, window_start=s - 256, interpret=False,
                                          **segs)

        def fwd_bwd(q, k, v, idx, segs, sink, fwd=fwd):
            return _grad_of(fwd, idx, segs)(q, k, v, sink)

        for fn, calls in ((fwd, 1), (fwd_bwd, 3)):
            assert export_for_cuda(fn, q, k, k, idx, segs, sink).count("xla.gpu.triton") == calls


def test_indexer_kernel_lowers_for_cuda():
    q, k, w = (sds((1, 256, 4, 64), jnp.bfloat16), sds((1, 256, 64), jnp.bfloat16),
               sds((1, 256, 4), jnp.bfloat16))
    text = export_for_cuda(lambda *a: indexer_topk_pallas(*a, 64, causal=True, interpret=False),
                           q, k, w)
    assert text.count("xla.gpu.triton") == 1
    seg = sds((1, 256), jnp.int32)  # packed sequences: segment ids of queries and keys
    text = export_for_cuda(lambda q, k, w, qs, ks: indexer_topk_pallas(
        q, k, w, 64, causal=True, q_seg_BT=qs, k_seg_BS=ks, interpret=False), q, k, w, seg, seg)
    assert text.count("xla.gpu.triton") == 1
    # scores stored once per chunk of query tiles, then the selection passes: two kernels
    stored = IndexerKernelBlocks(score_buffer_mib=0.25)
    text = export_for_cuda(lambda q, k, w, qs, ks: indexer_topk_pallas(
        q, k, w, 64, causal=True, q_seg_BT=qs, k_seg_BS=ks, interpret=False, blocks=stored),
        q, k, w, seg, seg)
    assert text.count("xla.gpu.triton") == 2


def test_block_sparse_tpu_kernels_lower_for_tpu():
    b, t, n, kg, h, bk = 1, 512, 8, 2, 128, 64
    q, k = sds((b, t, n, h), jnp.bfloat16), sds((b, t, kg, h), jnp.bfloat16)
    keep, sink = sds((b, kg, t, t // bk), jnp.bool_), sds((n,), jnp.float32)

    def fwd(q, k, v, keep, sink):
        return block_sparse_attention_tpu(q, k, v, keep, block_k=bk, causal=True, sink=sink,
                                          window=128, num_sink_keys=64, interpret=False)

    fwd_bwd = lambda q, k, v, keep, sink: _grad_of(fwd, keep)(q, k, v, sink)  # noqa: E731
    text = export.export(jax.jit(fwd_bwd), platforms=["tpu"])(q, k, k, keep, sink).mlir_module()
    assert text.count("tpu_custom_call") == 3  # forward, dq and dk/dv


def test_block_sparse_tpu_kernels_lower_for_tpu_with_segments():
    b, t, n, kg, h, bk = 2, 512, 8, 2, 128, 128
    q, k = sds((b, t, n, h), jnp.bfloat16), sds((b, t, kg, h), jnp.bfloat16)
    keep, sink = sds((b, kg, t, t // bk), jnp.bool_), sds((n,), jnp.float32)
    seg, sinks = sds((b, t), jnp.int32), sds((b, t), jnp.bool_)

    def fwd(q, k, v, keep, seg, sinks, sink):
        return block_sparse_attention_tpu(q, k, v, keep, block_k=bk, causal=True, sink=sink,
                                          window=128, q_seg_BT=seg, k_seg_BS=seg,
                                          k_sink_BS=sinks, interpret=False)

    def fwd_bwd(q, k, v, keep, seg, sinks, sink):
        return _grad_of(fwd, keep, seg, sinks)(q, k, v, sink)

    for fn, calls in ((fwd, 1), (fwd_bwd, 3)):
        text = export.export(jax.jit(fn), platforms=["tpu"])(q, k, k, keep, seg, sinks,
                                                              sink).mlir_module()
        assert text.count("tpu_custom_call") == calls


def test_token_sparse_tpu_kernels_lower_for_tpu():
    for s, kg, shared, window, packed in TOKEN_CASES:
        q, k = sds((1, 256, 4, 128), jnp.bfloat16), sds((1, s, kg, 128), jnp.bfloat16)
        idx, sink = sds((1, 256, 32), jnp.int32), sds((4,), jnp.float32)
        segs = _segments(packed, s)

        def fwd(q, k, v, idx, segs, sink, shared=shared, window=window, s=s):
            return token_sparse_attention_tpu(q, k, None if shared else v, idx, sink=sink,
                                              window=window, window_start=s - 256,
                                              interpret=False, **segs)

        def fwd_bwd(q, k, v, idx, segs, sink, fwd=fwd):
            return _grad_of(fwd, idx, segs)(q, k, v, sink)

        for fn, calls in ((fwd, 1), (fwd_bwd, 3)):
            text = export.export(jax.jit(fn), platforms=["tpu"])(q, k, k, idx, segs,
                                                                 sink).mlir_module()
            assert text.count("tpu_custom_call") == calls


# gated delta chunk scan: (B, N, X, T, H, V) as GDN / KDA run it (chunk 64, key and value width
# 128), bf16 and float32 operands, with the delta correction (w) and without (linear attention)
SCAN = (1, 2, 4, 64, 128, 128)


def _scan_exports(fwd, bwd, export_fn):
    """MLIR text of the forward and the backward scan for each operand dtype, with and without w
    (``w=None`` is static: the exported functions take w only when it is an operand)."""
    b, n, x, t, h, v = SCAN
    state, states = sds((b, n, h, v), jnp.float32), sds((b, n, x, h, v), jnp.float32)
    e, do = sds((b, n, x, h), jnp.float32), sds((b, n, x, t, v), jnp.float32)
    for dtype in (jnp.bfloat16, jnp.float32):
        mat, u, a = sds((b, n, x, t, h), dtype), sds((b, n, x, t, v), dtype), sds((b, n, x, t, t), dtype)
        for ws in ((mat,), ()):
            yield export_fn(lambda qg, kd, u, a, e, s0, *w: fwd(qg, kd, *(w or [None]), u, a, e, s0),
                            mat, mat, u, a, e, state, *ws)
            yield export_fn(lambda qg, kd, u, a, e, st, do, dsf, *w: bwd(
                qg, kd, *(w or [None]), u, a, e, st, do, dsf), mat, mat, u, a, e, states, do, state, *ws)


def _forward_only(fwd):
    """The forward without its chunk-entry states (``with_states=False``), bf16, with w."""
    b, n, x, t, h, v = SCAN
    mat = sds((b, n, x, t, h), jnp.bfloat16)
    return (lambda qg, kd, w, u, a, e, s0: fwd(qg, kd, w, u, a, e, s0, with_states=False),
            mat, mat, mat, sds((b, n, x, t, v), jnp.bfloat16), sds((b, n, x, t, t), jnp.bfloat16),
            sds((b, n, x, h), jnp.float32), sds((b, n, h, v), jnp.float32))


def test_gated_delta_scan_kernels_lower_for_cuda():
    texts = list(_scan_exports(scan_fwd, scan_bwd, export_for_cuda))
    texts.append(export_for_cuda(*_forward_only(scan_fwd)))
    assert len(texts) == 9 and all(text.count("xla.gpu.triton") == 1 for text in texts)


def test_gated_delta_scan_tpu_kernels_lower_for_tpu():
    def export_for_tpu(fn, *args):
        return export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()

    texts = list(_scan_exports(scan_fwd_tpu, scan_bwd_tpu, export_for_tpu))
    texts.append(export_for_tpu(*_forward_only(scan_fwd_tpu)))
    assert len(texts) == 9 and all(text.count("tpu_custom_call") == 1 for text in texts)

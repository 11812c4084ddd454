"""What every ``pallas_kernels`` op promises besides its numbers (checked in ``test_*_kernel.py``):
``precision`` reaches every matrix product, forward and backward, kernel bodies included; and
float64 inputs work under ``jax_enable_x64`` (enabled inside the test only), equal to the
reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import jaxpr_eqns

from pallas_kernels.block_sparse import (
    BlockSizes,
    block_sparse_attention,
    block_sparse_attention_reference,
    block_sparse_attention_tpu,
    block_sparse_attention_xla,
)
from pallas_kernels.token_sparse import BlockSizes as TokenBlockSizes
from pallas_kernels.token_sparse import (
    IndexerBlocks,
    IndexerKernelBlocks,
    TpuBlockSizes,
    indexer_topk,
    indexer_topk_pallas,
    indexer_topk_reference,
    token_sparse_attention,
    token_sparse_attention_reference,
    token_sparse_attention_tpu,
    token_sparse_attention_xla,
)

T, BK = 11, 4  # query/key length, key block of the block-sparse selection

# attention ops: fn(q, k, v, sink, selection, precision) with small tiles
BLOCK_SPARSE = {
    "reference": lambda *a, **kw: block_sparse_attention_reference(*a, **kw),
    "xla": lambda *a, **kw: block_sparse_attention_xla(*a, block_q=8, **kw),
    "pallas": lambda *a, **kw: block_sparse_attention(*a, block_sizes=BlockSizes(8), **kw),
    "tpu": lambda *a, **kw: block_sparse_attention_tpu(*a, block_sizes=BlockSizes(32), **kw),
}
TOKEN_SPARSE = {
    "reference": token_sparse_attention_reference,
    "xla": lambda *a, **kw: token_sparse_attention_xla(*a, block_q=8, **kw),
    "pallas": lambda *a, **kw: token_sparse_attention(*a, block_sizes=TokenBlockSizes(8, 1),
                                                      **kw),
    "tpu": lambda *a, **kw: token_sparse_attention_tpu(*a, block_sizes=TpuBlockSizes(16, 1), **kw),
}
INDEXERS = {
    "reference": indexer_topk_reference,
    "xla": lambda *a, **kw: indexer_topk(*a, blocks=IndexerBlocks(8, 8, 2, 1), **kw),
    "pallas": lambda *a, **kw: indexer_topk_pallas(*a, blocks=IndexerKernelBlocks(8, 16), **kw),
}
ATTENTION = [("block", n) for n in BLOCK_SPARSE] + [("token", n) for n in TOKEN_SPARSE]
# block-sparse on a packed row (segments 1, 2 and padding, a sink flag per segment)
SEG = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 2], jnp.int32)
PACKED = dict(q_seg_BT=SEG, k_seg_BS=SEG, k_sink_BS=jnp.asarray([[1, 0, 0, 0, 0, 1] + [0] * 5],
                                                                 bool))


def _operands(dtype):
    ks = jax.random.split(jax.random.key(0), 8)
    q = jax.random.normal(ks[0], (1, T, 4, 8), dtype)
    k = jax.random.normal(ks[1], (1, T, 2, 8), dtype)
    v = jax.random.normal(ks[2], (1, T, 2, 6), dtype)
    sink = jax.random.normal(ks[3], (4,), dtype)
    keep = jax.random.bernoulli(ks[4], 0.6, (1, 2, T, -(-T // BK)))
    idx = jnp.where(jax.random.bernoulli(ks[5], 0.3, (1, T, 3)), -1,
                    jax.random.randint(ks[5], (1, T, 3), 0, T) // 3 * 3
                    + jnp.arange(3)).astype(jnp.int32)  # distinct per row: 3 residues mod 3
    g = jax.random.normal(ks[6], (1, T, 4, 6), dtype)
    return q, k, v, sink, keep, idx, g


def _attention(family: str, name: str, keep, idx, **kw):
    if family in ("block", "packed"):
        fn = BLOCK_SPARSE[name]
        kw = {**kw, **PACKED} if family == "packed" else kw
        return lambda q, k, v, sink: fn(q, k, v, keep, block_k=BK, causal=True, sink=sink,
                                        window=5, num_sink_keys=2, **kw)
    fn = TOKEN_SPARSE[name]
    return lambda q, k, v, sink: fn(q, k, v, idx, sink=sink, **kw)


def _value_and_grads(fn, q, k, v, sink, g):
    def loss(q, k, v, sink):
        out = fn(q, k, v, sink)
        return (out * g).sum(), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, sink)
    return out, grads


def _indexer_operands(dtype):
    ks = jax.random.split(jax.random.key(1), 3)
    return (jax.random.normal(ks[0], (1, T, 2, 4), dtype), jax.random.normal(ks[1], (1, T, 4), dtype),
            jax.random.normal(ks[2], (1, T, 2), dtype))


def _dot_precisions(jaxpr) -> list:
    return [e.params["precision"] for e in jaxpr_eqns(jaxpr.jaxpr)
            if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("family,name", ATTENTION + [("packed", n) for n in BLOCK_SPARSE])
def test_precision_reaches_every_matrix_product_of_attention(family, name):
    """``precision="high"`` (not the suite's global "highest") on every ``dot_general`` of the
    forward and the backward, inside the Pallas kernel bodies too."""
    q, k, v, sink, keep, idx, g = _operands(jnp.float32)
    fn = _attention(family, name, keep, idx, precision="high")
    grads = jax.grad(lambda *a: (fn(*a) * g).sum(), argnums=(0, 1, 2, 3))
    precisions = _dot_precisions(jax.make_jaxpr(grads)(q, k, v, sink))
    assert len(precisions) >= 4  # forward logits and values, and their transposes
    high = jax.lax.Precision.HIGH
    assert all(p == (high, high) for p in precisions), precisions


@pytest.mark.parametrize("name", list(INDEXERS))
def test_precision_reaches_every_matrix_product_of_the_indexers(name):
    q, k, w = _indexer_operands(jnp.float32)
    jaxpr = jax.make_jaxpr(lambda q, k, w: INDEXERS[name](q, k, w, 3, causal=True,
                                                          precision="high"))(q, k, w)
    precisions = _dot_precisions(jaxpr)
    high = jax.lax.Precision.HIGH
    assert precisions and all(p == (high, high) for p in precisions), precisions


@pytest.mark.parametrize("family,name", ATTENTION)
def test_float64_under_x64_equals_the_reference(family, name):
    """Outputs stay float64 and equal the reference's (float32 softmax statistics inside), and
    so do the gradients; with x64 off again afterwards."""
    with jax.enable_x64(True):
        q, k, v, sink, keep, idx, g = _operands(jnp.float64)
        out, grads = _value_and_grads(_attention(family, name, keep, idx), q, k, v, sink, g)
        ref_out, ref_grads = _value_and_grads(_attention(family, "reference", keep, idx), q, k,
                                              v, sink, g)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
        for a, r in zip(grads, ref_grads, strict=True):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, r, atol=5e-5, rtol=5e-5)
    assert not jax.config.jax_enable_x64


@pytest.mark.selections
@pytest.mark.parametrize("name", list(INDEXERS))
def test_float64_indexers_under_x64_select_the_reference_keys(name):
    with jax.enable_x64(True):
        q, k, w = _indexer_operands(jnp.float64)
        got_i, got_v = jax.jit(lambda q, k, w: INDEXERS[name](q, k, w, 3, causal=True))(q, k, w)
        ref_i, ref_v = indexer_topk_reference(q, k, w, 3, causal=True)
        assert got_i.dtype == jnp.int32 and got_v.dtype == jnp.float32  # ranked in float32
        np.testing.assert_array_equal(np.sort(got_i, -1), np.sort(ref_i, -1))
        # the selection is exact; the scores may differ in the last float32 bit (the kernel sums
        # in another order, and XLA's optimiser may reassociate: seen at the default level)
        np.testing.assert_allclose(np.sort(got_v, -1), np.sort(ref_v, -1), rtol=1e-6, atol=1e-6)
    assert not jax.config.jax_enable_x64

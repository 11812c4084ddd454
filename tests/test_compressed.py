"""HeavilyCompressedAttention and CompressedSparseAttention: bad constructor values and inputs.

Parity with attnhut (and the behaviour checked on torch-initialised weights) is in
torch_parity/test_compressed_parity.py; causality, jit and bf16 are in test_behaviour.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import attnhut_jax as ah


@pytest.mark.parametrize("make,pattern", [
    (lambda: ah.HeavilyCompressedAttention(32, 4, compression_rate=0),
     r"HeavilyCompressedAttention: compression_rate=0 must be >= 1"),
    (lambda: ah.HeavilyCompressedAttention(32, 4, window=0), r"window=0 must be >= 1"),
    (lambda: ah.HeavilyCompressedAttention(32, 4, num_groups=3),
     r"num_heads=4 must be divisible by num_groups=3"),
    (lambda: ah.HeavilyCompressedAttention(32, 0), r"num_heads=0 must be >= 1"),
    (lambda: ah.HeavilyCompressedAttention(3, 4), r"kv_dim=0 must be >= 1"),
    (lambda: ah.HeavilyCompressedAttention(32, 4, kv_dim=-2), r"kv_dim=-2 must be >= 1"),
    (lambda: ah.CompressedSparseAttention(32, 4, compression_rate=-1),
     r"CompressedSparseAttention: compression_rate=-1 must be >= 1"),
    (lambda: ah.CompressedSparseAttention(32, 4, top_k=0), r"top_k=0 must be >= 1"),
    (lambda: ah.CompressedSparseAttention(32, 4, window=-3), r"window=-3 must be >= 1"),
    (lambda: ah.CompressedSparseAttention(32, 4, num_index_heads=0, index_dim=0),
     r"num_index_heads=0, index_dim=0 must be >= 1"),
    (lambda: ah.CompressedSparseAttention(32, 8, num_groups=3),
     r"num_heads=8 must be divisible by num_groups=3"),
    (lambda: ah.CompressedSparseAttention(32, 4, q_lora_rank=-1), r"q_lora_rank=-1 must be >= 1"),
])
def test_bad_constructor_values(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make().init(jax.random.key(0), jnp.zeros((1, 3, 32)))


def test_bad_grouped_projection():
    with pytest.raises(ValueError, match=r"num_heads=6 must be divisible by num_groups=4"):
        ah.GroupedOutputProjection(6, 5, 4, 16).init(jax.random.key(0), jnp.zeros((1, 2, 6, 5)))


@pytest.mark.parametrize("make", [lambda: ah.HeavilyCompressedAttention(32, 4),
                                  lambda: ah.CompressedSparseAttention(32, 4)])
@pytest.mark.parametrize("kw,error,pattern", [
    ({"segment_ids": jnp.ones((1, 4), jnp.int32)}, ValueError,
     r"segment_ids must have shape \(batch, seq\)=\(1, 3\)"),
    ({"segment_ids": jnp.ones((1, 3))}, TypeError, r"segment_ids must be an integer array"),
    ({"positions": jnp.ones((3,), jnp.int32)}, ValueError, r"positions must have shape"),
])
def test_bad_packing_arguments(make, kw, error, pattern):
    m = make()
    x = jnp.zeros((1, 3, 32))
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    with pytest.raises(error, match=pattern):
        m.apply(v, x, **kw)


def test_bad_index_loss():
    m = ah.CompressedSparseAttention(32, 4)
    x = jnp.zeros((1, 3, 32))
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"index_loss='full' must be None, 'dense' or 'sparse'"):
        m.apply(v, x, index_loss="full")

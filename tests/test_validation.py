"""Bad input gets a ValueError/TypeError that names the offending values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import attnhut_jax as ah


def _init(m, shape=(1, 3, 32), **kw):
    return m.init({"params": jax.random.key(0), "slots": jax.random.key(1)},
                  jnp.zeros(shape), **kw)


@pytest.mark.parametrize("make,pattern", [
    (lambda: ah.StandardAttention(30, 4), r"dim=30 must be divisible by num_heads=4"),
    (lambda: ah.MultiQueryAttention(30, 4), r"dim=30 must be divisible by num_heads=4"),
    (lambda: ah.GroupedQueryAttention(30, 4, 2), r"dim=30 must be divisible by num_heads=4"),
    (lambda: ah.GroupedQueryAttention(32, 8, 3),
     r"num_heads=8 must be divisible by num_kv_heads=3"),
    (lambda: ah.GroupedQueryAttention(32, 8, 0), r"num_kv_heads=0 must be >= 1"),
    (lambda: ah.StandardAttention(32, 0), r"num_heads=0 must be >= 1"),
    (lambda: ah.DifferentialAttention(36, 4), r"dim=36 must be divisible by 2 \* num_heads=8"),
    (lambda: ah.DifferentialAttention(32, 2, depth=-1), r"depth=-1 must be >= 0"),
    (lambda: ah.MultiHeadLatentAttention(32, 4, qk_rope_head_dim=3),
     r"qk_rope_head_dim=3 must be even"),
    (lambda: ah.MultiHeadLatentAttention(32, 64), r"qk_nope_head_dim=0, .*must be >= 1"),
    (lambda: ah.SlotAttention(32, 0), r"num_slots=0 must be >= 1"),
    (lambda: ah.SlotAttention(32, 2, num_iters=-1), r"num_iters=-1 must be >= 0"),
])
def test_bad_constructor_values(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        _init(make())


SEQ = [lambda: ah.StandardAttention(32, 4), lambda: ah.MultiQueryAttention(32, 4),
       lambda: ah.GroupedQueryAttention(32, 4, 2), lambda: ah.MultiHeadLatentAttention(32, 4),
       lambda: ah.DifferentialAttention(32, 2), lambda: ah.SlotAttention(32, 2)]


@pytest.mark.parametrize("make", SEQ)
def test_wrong_width(make):
    with pytest.raises(ValueError, match=r"input width 31 != dim=32"):
        _init(make(), (2, 3, 31))


@pytest.mark.parametrize("make", SEQ)
@pytest.mark.parametrize("shape", [(3, 32), (1, 2, 3, 32)])
def test_wrong_rank(make, shape):
    with pytest.raises(ValueError, match=r"expected input of rank 3 .* got shape"):
        _init(make(), shape)


@pytest.mark.parametrize("make", SEQ)
def test_integer_input(make):
    with pytest.raises(TypeError, match="floating point, got dtype int32"):
        m = make()
        m.init({"params": jax.random.key(0), "slots": jax.random.key(1)},
               jnp.zeros((1, 3, 32), jnp.int32))


@pytest.mark.parametrize("make", SEQ[:4])
def test_mask_of_wrong_shape(make):
    m = make()
    v = _init(m)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 4\) does not broadcast to "
                                         r"\(batch, heads, q_len, k_len\)=\(1, 4, 3, 3\)"):
        m.apply(v, jnp.zeros((1, 3, 32)), attn_mask=jnp.ones((3, 4), bool))
    with pytest.raises(TypeError, match="boolean or floating point, got int32"):
        m.apply(v, jnp.zeros((1, 3, 32)), attn_mask=jnp.ones((3, 3), jnp.int32))


def test_slot_noise_wrong_shape():
    m = ah.SlotAttention(32, 2)
    v = _init(m)
    with pytest.raises(ValueError, match=r"noise must have shape"):
        m.apply(v, jnp.zeros((1, 3, 32)), jnp.zeros((1, 2, 31)))

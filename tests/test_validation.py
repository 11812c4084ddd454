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



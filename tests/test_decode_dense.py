"""Incremental decoding of the dense mechanisms: decode == prefill, ragged prompts, one
compilation, the cache's bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import attnhut_jax as ah
from tests import decode_harness as h

D = 16
DENSE = {
    "standard": lambda dec: ah.StandardAttention(D, 4, causal=True, decode=dec),
    "gqa": lambda dec: ah.GroupedQueryAttention(D, 4, 2, causal=True, bias=True, decode=dec),
}


def _x(t, b=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


@pytest.mark.parametrize("name", sorted(DENSE))
def test_decode_equals_prefill(name):
    h.check_decode_equals_prefill(DENSE[name], _x(11))
    h.check_decode_equals_prefill(DENSE[name], _x(7), max_len=12)


@pytest.mark.parametrize("name", sorted(DENSE))
def test_ragged_prompts(name):
    h.check_ragged_prompts(DENSE[name], _x(12, b=3), [2, 7, 5], steps=4)


@pytest.mark.parametrize("name", sorted(DENSE))
def test_compiles_once_and_bytes(name):
    h.check_compiles_once(DENSE[name], _x(4))
    h.check_cache_bytes(DENSE[name], 2, 9, D)


def test_the_cache_rules_refuse_what_does_not_fit():
    make = DENSE["gqa"]
    x = _x(6)
    params = h.params_of(make, x)
    cache = h.empty_cache(make, 2, 5, D)["cache"]
    m = make(True)

    def run(c, chunk, **kw):
        return m.apply({"params": params, "cache": c}, chunk, mutable=["cache"], **kw)

    with pytest.raises(ValueError, match="6 tokens is longer than the cache"):
        run(cache, x)
    _, st = run(cache, x[:, :4], lengths=jnp.array([4, 1]))
    with pytest.raises(ValueError, match=r"rows that overflow: \[0\]"):
        run(st["cache"], x[:, :2])
    with pytest.raises(ValueError, match="longer than the cache"):
        jax.jit(lambda c, a: run(c, a))(cache, x)
    with pytest.raises(ValueError, match=r"lengths \[3, 9\] must lie in \[0, 4\]"):
        run(cache, x[:, :4], lengths=jnp.array([3, 9]))
    with pytest.raises(ValueError, match="shape \\(batch,\\)=\\(2,\\)"):
        run(cache, x[:, :4], lengths=jnp.array([3]))
    with pytest.raises(ValueError, match="needs the 'cache' collection"):
        m.apply({"params": params}, x[:, :1], mutable=["cache"])
    with pytest.raises(ValueError, match="cache holds 2 rows"):
        run(cache, x[:1, :1])
    # under jit the room is unknown on the host: what does not fit is not written and is NaN
    out, st2 = jax.jit(lambda c, a: run(c, a))(st["cache"], x[:, :2])
    assert bool(jnp.all(jnp.isnan(out[0, 1]))) and bool(jnp.all(jnp.isfinite(out[0, 0])))
    assert bool(jnp.all(jnp.isfinite(out[1])))
    assert st2["cache"]["index"].tolist() == [5, 3]


@pytest.mark.parametrize("name", sorted(DENSE))
def test_decode_refuses_non_causal_and_prefill_arguments(name):
    x = _x(3)
    with pytest.raises(ValueError, match="decode=True needs causal=True"):
        DENSE[name](True).clone(causal=False).init(jax.random.key(0), x)
    m = DENSE[name](True)
    variables = m.init(jax.random.key(0), x)
    for kw in ({"attn_mask": jnp.ones((3, 3), bool)}, {"segment_ids": jnp.ones((2, 3), int)},
               {"positions": jnp.zeros((2, 3), int)}):
        with pytest.raises(ValueError, match="cannot be used with decode=True"):
            m.apply(variables, x, mutable=["cache"], **kw)
    with pytest.raises(ValueError, match="lengths is a decode argument"):
        DENSE[name](False).apply({"params": variables["params"]}, x, lengths=jnp.array([1, 2]))

"""Incremental decoding of the causal SinkhornAttention: full forward == token-by-token decode ==
chunked prefill (uneven chunks, some starting several blocks, some starting mid-block) then
single steps; rows of different prompt lengths; one compilation; the cache's bytes; that a step
reads only its block and its cached sorted block; nn.scan over layers; the refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah
from attnhut_jax import cache as cache_lib
from tests import decode_harness as h

D = 16
T = 13  # blocks of 3: four whole blocks and one token
MAX_LEN = 17  # a cache longer than the sequence


def sinkhorn(dec, **kw):
    """2 heads of width 8, blocks of 3, 8 Sinkhorn iterations, the sorting network for 24."""
    return ah.SinkhornAttention(D, 2, 3, causal=True, max_len=24, decode=dec, **kw)


def _x(t=T, b=2, seed=0):
    # scaled so that the sorting logits are far from uniform (the sort matters to the output)
    return 2.0 * jax.random.normal(jax.random.key(seed), (b, t, D))


def test_decode_equals_prefill():
    x = _x()
    # chunks [3, 4, 2] then single steps (the 4 starts blocks 1 and 2); a longer cache
    params = h.check_decode_equals_prefill(sinkhorn, x, max_len=MAX_LEN)
    # a chunk starting mid-block that starts three blocks (1, 2, 3), then one that ends the row
    got, _ = h.decode_in_chunks(sinkhorn, params, x, [2, 8, 3], MAX_LEN)
    h.close(got, h.prefill(sinkhorn, params, x), what="chunks [2, 8, 3]")


def test_ragged_prompts():
    # prompts of 4 and 8 tokens (block 1 and block 2 partly written), 5 steps each: both rows
    # cross block starts at different steps
    h.check_ragged_prompts(sinkhorn, _x(seed=2), [4, 8], steps=5)


def test_compiles_once_and_bytes():
    h.check_compiles_once(sinkhorn, _x())  # 20 steps: seven block starts
    variables = h.check_cache_bytes(sinkhorn, 2, T, D)
    assert set(variables["cache"]) == {"index", "key", "value", "key_sum", "sort_prefix",
                                       "sorted_key", "sorted_value"}
    # bf16 keys and values, float32 key sums and prefixes
    m = sinkhorn(True, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((2, 10, D), jnp.bfloat16))
    cache = shapes["cache"]
    assert cache["key"].dtype == jnp.bfloat16 and cache["key_sum"].dtype == jnp.float32
    assert cache_lib.cache_arrays_bytes(cache) == m.cache_bytes(2, 10, jnp.bfloat16)


def test_accounting():
    m = sinkhorn(True)
    # K and V (bf16) of 2 x 8 per token; sorted K and V of one block; the key sum (float32);
    # the prefixes: 2 heads x 8 iterations x ceil(100 / 3) = 34 blocks (float32); the index
    assert m.cache_bytes(3, 100) == (3 * 100 * 2 * 16 * 2 + 3 * 3 * 2 * 16 * 2 + 3 * 16 * 4
                                     + 3 * 2 * 8 * 34 * 4 + 3 * 4)
    # position p reads p mod 3 + 1 keys of its block, from block 1 on 3 sorted slots, and the
    # mixture amortised: block i's first query reads its i x 3 earlier rows once, i per query
    assert [m.decode_reads(n) for n in (0, 1, 3, 4, 6, 7, 1000)] == [0, 1, 3, 5, 7, 6, 337]
    assert m.decode_scored(1000) == 0
    assert m.kv_cache_bytes_per_token() == 2 * D * 2


def test_a_step_reads_its_block_and_its_sorted_block():
    """A step inside a block (not its first token) reads the cached keys and values of its block
    only, and the cached sorted block: NaN everywhere else in the key and value caches gives the
    same output bit for bit. The first step of a block reads the earlier blocks (to mix them)."""
    x = _x(seed=3)
    params = h.params_of(sinkhorn, x)
    step = h.stepper(sinkhorn)
    _, cache = h.decode_in_chunks(sinkhorn, params, x[:, :10], [4, 6], MAX_LEN, step=step)
    # position 10: block 3 holds positions 9, 10 (9 written)
    out, _ = step(params, cache, x[:, 10:11])
    outside = (jnp.arange(MAX_LEN) < 9) | (jnp.arange(MAX_LEN) > 10)
    poisoned = {**cache, **{a: jnp.where(outside[None, :, None, None], jnp.nan, cache[a])
                            for a in ("key", "value")}}
    got, _ = step(params, poisoned, x[:, 10:11])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(out))
    # the cached sorted block is read (and a written key of the block)
    for a, at in (("sorted_value", (0, 1)), ("value", (0, 9))):
        got, _ = step(params, {**cache, a: cache[a].at[at].add(1.0)}, x[:, 10:11])
        assert float(jnp.abs(got[0] - out[0]).max()) > 1e-3, a
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(out[1]))
    # position 9 starts block 3: its sorted block mixes blocks 0..2
    _, cache9 = h.decode_in_chunks(sinkhorn, params, x[:, :9], [4, 5], MAX_LEN, step=step)
    out9, _ = step(params, cache9, x[:, 9:10])
    got9, _ = step(params, {**cache9, "value": cache9["value"].at[0, 1].add(1.0)}, x[:, 9:10])
    assert float(jnp.abs(got9[0] - out9[0]).max()) > 1e-3


def test_scanned_layers():
    """Two decoding layers under nn.scan (the block start's cond and the Sinkhorn rows' scan
    inside it), fed in chunks, equal the stack's forward."""
    h.check_scanned_layers(sinkhorn, _x(t=8, seed=4), [3, 4, 1], layers=2)


def test_decode_refusals():
    x = _x(t=3)
    m = sinkhorn(True)
    variables = jax.jit(m.init)(jax.random.key(0), x)
    for kw in ({"return_aux": True}, {"segment_ids": jnp.ones((2, 3), int)}):
        with pytest.raises(ValueError, match="cannot be used with decode=True"):
            m.apply(variables, x, mutable=["cache"], **kw)
    with pytest.raises(ValueError, match="deterministic=False cannot be used with decode=True"):
        m.apply(variables, x, mutable=["cache"], deterministic=False,
                rngs={"gumbel": jax.random.key(0)})
    with pytest.raises(ValueError, match="lengths is a decode argument"):
        sinkhorn(False).apply({"params": variables["params"]}, x, lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match="cache of max_len=25 is longer than max_len=24"):
        jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 25, D)))


def _eqns_outside(jaxpr, skip: str):
    """Every equation, nested ones included, except inside the ``skip`` primitive's branches;
    returns (outside, the skipped equations)."""
    outside, skipped = [], []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == skip:
            skipped.append(eqn)
            continue
        outside.append(eqn)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = sub if hasattr(sub, "eqns") else getattr(sub, "jaxpr", None)
                if inner is not None:
                    o, s = _eqns_outside(inner if hasattr(inner, "eqns") else inner.jaxpr, skip)
                    outside += o
                    skipped += s
    return outside, skipped


def test_a_step_spans_the_cache_only_at_a_block_start():
    """A single-token step's jaxpr: no product or reduction over the cache's max_len positions
    (17, a length no other axis has) outside the block start's ``cond``; inside it, the mixture
    contracts the cache's 5 whole blocks (never the positions)."""
    from tests.jaxpr_walk import jaxpr_eqns

    x = _x(t=4, seed=5)
    m = sinkhorn(True)
    variables = jax.jit(m.init)(jax.random.key(0), jnp.zeros((2, MAX_LEN, D)))
    jaxpr = jax.make_jaxpr(lambda v, a: m.apply(v, a, mutable=["cache"]))(variables, x[:, :1])
    outside, conds = _eqns_outside(jaxpr.jaxpr, "cond")
    assert len(conds) == 1

    def contracted(eqn):
        if eqn.primitive.name == "dot_general":
            (lhs_c, _), _ = eqn.params["dimension_numbers"]
            return {eqn.invars[0].aval.shape[d] for d in lhs_c}
        if eqn.primitive.name.startswith("reduce_") or eqn.primitive.name in ("argmax", "cumsum"):
            shape = eqn.invars[0].aval.shape
            return {shape[a] for a in eqn.params.get("axes", ())}
        return set()

    assert all(MAX_LEN not in contracted(e) for e in outside)
    # the walk sees the cache (its writes and the block's gather are outside the cond)
    assert any(MAX_LEN in getattr(v.aval, "shape", ()) for e in outside for v in e.invars)
    inside = [e for e in jaxpr_eqns(conds[0].params["branches"][1].jaxpr)
              if e.primitive.name == "dot_general"]
    assert len(inside) == 2 and all(contracted(e) == {MAX_LEN // 3} for e in inside), inside

"""Incremental decoding of the dense mechanisms: decode == prefill, ragged prompts, one
compilation, the cache's bytes; MLA's absorbed step == its expanded step; the published cache
sizes of MHA and MLA."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

import attnhut_jax as ah
from tests import decode_harness as h

D = 16
DENSE = {
    "standard": lambda dec: ah.StandardAttention(D, 4, causal=True, decode=dec),
    "gqa": lambda dec: ah.GroupedQueryAttention(D, 4, 2, causal=True, bias=True, decode=dec),
    "mqa": lambda dec: ah.MultiQueryAttention(D, 4, causal=True, decode=dec),
    "differential": lambda dec: ah.DifferentialAttention(D, 2, depth=1, bias=True, decode=dec),
    "mla": lambda dec: ah.MultiHeadLatentAttention(D, 4, decode=dec),
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
    m = DENSE[name](True)
    # a dense cache holds what kv_cache_bytes_per_token counts, and a query reads all of it
    assert m.cache_bytes(1, 100) == 100 * m.kv_cache_bytes_per_token() + 4
    assert (m.decode_reads(37), m.decode_scored(37)) == (37, 0)


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
    with pytest.raises(ValueError, match=r"mutable=\['cache'\]"):
        m.apply({"params": params, "cache": cache}, x[:, :1])
    mla_cache = h.empty_cache(DENSE["mla"], 2, 5, D)["cache"]
    with pytest.raises(ValueError, match="no array 'key': it was not initialised for this module"):
        run(mla_cache, x[:, :1])
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
    variables = jax.jit(m.init)(jax.random.key(0), x)
    takes = inspect.signature(type(m).__call__).parameters
    for kw in ({"attn_mask": jnp.ones((3, 3), bool)}, {"segment_ids": jnp.ones((2, 3), int)},
               {"positions": jnp.zeros((2, 3), int)}):
        if next(iter(kw)) not in takes:  # DifferentialAttention has no attn_mask
            continue
        with pytest.raises(ValueError, match="cannot be used with decode=True"):
            m.apply(variables, x, mutable=["cache"], **kw)
    with pytest.raises(ValueError, match="lengths is a decode argument"):
        DENSE[name](False).apply({"params": variables["params"]}, x, lengths=jnp.array([1, 2]))


# ----------------------------------------------------------------------------- MLA


def _mla(dec, absorb=True, **kw):
    return ah.MultiHeadLatentAttention(D, 4, decode=dec, absorb=absorb, **kw)


# ranks and widths off the defaults, V != nope + rope, biases on every projection
ODD = dict(q_lora_rank=6, kv_lora_rank=10, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=7,
           bias=True)


def test_mla_absorbed_equals_expanded_equals_prefill():
    """Both forms equal the full forward (ODD: V != nope + rope, ranks off the defaults, biases;
    DENSE["mla"] checks the absorbed form at the defaults); on one shared cache, steps alternating
    between the absorbed and the expanded module equal it too (they read the same arrays)."""
    x = _x(12)
    absorbed = lambda dec: _mla(dec, True, **ODD)  # noqa: E731
    expanded = lambda dec: _mla(dec, False, **ODD)  # noqa: E731
    params = h.check_decode_equals_prefill(absorbed, x, chunks=[5, 4, 3], max_len=14)
    h.check_decode_equals_prefill(expanded, x, chunks=[5, 4, 3], max_len=14)
    want = h.prefill(absorbed, params, x)
    steps = (h.stepper(absorbed), h.stepper(expanded))
    compiled = [s._cache_size() for s in steps]  # the single-token steps, compiled above
    cache = h.empty_cache(absorbed, 2, 14, D)["cache"]
    outs = []
    for i in range(12):
        out, cache = steps[i % 2](params, cache, x[:, i:i + 1])
        outs.append(out)
    h.close(jnp.concatenate(outs, axis=1), want, what="absorbed and expanded steps alternating")
    assert [s._cache_size() for s in steps] == compiled, "no form compiled again over its steps"
    # The absorbed form drops kv_up's key bias (a per-query constant on every logit, which
    # the softmax removes) and keeps its value bias: moving the key bias changes neither
    # form's output, moving the value bias changes both alike.
    params = meta.unbox(params)
    nope, vd = ODD["qk_nope_head_dim"], ODD["v_head_dim"]
    bias_NH = params["kv_up"]["bias"].reshape(4, nope + vd)

    def with_kv_up_bias(b_NH):
        return {**params, "kv_up": {**params["kv_up"], "bias": b_NH.reshape(-1)}}

    key_moved = with_kv_up_bias(bias_NH.at[:, :nope].add(3.0))
    got, _ = h.decode_in_chunks(absorbed, key_moved, x, [5, 4, 3], 14, step=steps[0])
    h.close(got, want, what="absorbed, key bias moved")
    h.close(h.prefill(absorbed, key_moved, x), want, what="prefill, key bias moved")
    value_moved = with_kv_up_bias(bias_NH.at[:, nope:].add(3.0))
    got, _ = h.decode_in_chunks(absorbed, value_moved, x, [5, 4, 3], 14, step=steps[0])
    moved = h.prefill(absorbed, value_moved, x)
    h.close(got, moved, what="absorbed, value bias moved")
    assert float(jnp.abs(moved - want).max()) > 0.1


def test_mla_cache_holds_only_the_latent_and_the_rope_key():
    m = _mla(True, **ODD)
    variables = jax.jit(m.init)(jax.random.key(0), jnp.zeros((2, 9, D)))
    shapes = {k: tuple(v.shape) for k, v in variables["cache"].items()}
    assert shapes == {"index": (2,), "latent": (2, 9, 10), "rope_key": (2, 9, 2)}
    assert m.cache_bytes(2, 9, jnp.float32) == (2 * 9 * (10 + 2)) * 4 + 2 * 4
    assert m.cache_bytes(1, 100) == 100 * m.kv_cache_bytes_per_token() + 4


def test_bfloat16_decode_stays_close_to_prefill():
    """A dtype=bfloat16 MLA (biased, the absorbed form: the one whose decode computes in another
    order than its prefill) decodes with a bfloat16 cache within 2e-2 of the output scale of its
    bfloat16 prefill: a few bfloat16 roundings (eps 2**-8) taken in another order (the key
    up-projection multiplies the query before, not the latent after, the dot). MQA and
    Differential decode with the dense path of Standard and GQA."""
    make = lambda dec: _mla(dec, bias=True, dtype=jnp.bfloat16)  # noqa: E731
    x = _x(12)
    params = h.params_of(make, x)
    want = h.prefill(make, params, x)
    got, cache = h.decode_in_chunks(make, params, x, [5] + [1] * 7)
    assert got.dtype == jnp.bfloat16
    assert {a.dtype for k, a in cache.items() if k != "index"} == {jnp.dtype(jnp.bfloat16)}
    h.close(got, want, 2e-2, "bfloat16")


# ----------------------------------------------------------------------------- published sizes

GIB = 2 ** 30
LAYERS, T = 32, 4096


def test_published_cache_sizes():
    """attention-forge's figures through the modules' own ``cache_bytes``: per layer, times 32
    layers, minus the 32 layers' int32 index counters (``cache_bytes`` counts one per row per
    layer; the published figures count keys and values only)."""
    counters = LAYERS * 4
    mha = ah.StandardAttention(dim=4096, num_heads=32)  # 32 heads of width 128
    assert mha.cache_bytes(1, T, jnp.float16) * LAYERS - counters == 2 * GIB
    mla = ah.MultiHeadLatentAttention(dim=4096, num_heads=32, kv_lora_rank=512, qk_rope_head_dim=64)
    assert mla.cache_bytes(1, T, jnp.float16) * LAYERS - counters == 0.140625 * GIB
    # the latent alone, from the shapes of the cache that init creates (no array allocated)
    shapes = jax.eval_shape(mla.clone(decode=True).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, T, 4096), jnp.float32))["cache"]
    assert tuple(shapes["latent"].shape) == (1, T, 512)
    assert tuple(shapes["rope_key"].shape) == (1, T, 64)
    latent = int(np.prod(shapes["latent"].shape)) * jnp.dtype(jnp.float16).itemsize
    assert latent * LAYERS == 0.125 * GIB
    rope_key = int(np.prod(shapes["rope_key"].shape)) * jnp.dtype(jnp.float16).itemsize
    assert (latent + rope_key) * LAYERS == 0.140625 * GIB


@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_layers_stacked_with_nn_scan_decode_like_their_forward(name):
    """Decoding layers stack with ``nn.scan`` over a 'cache' axis as over the params axis."""
    h.check_scanned_layers(DENSE[name], _x(7), chunks=(3, 1, 2, 1), layers=3)


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9])
def test_cache_reads_agree_in_both_forms(rows):
    """``cache.row_dots`` and ``cache.read_values`` switch at ``WEIGHTED_SUM_ROWS`` from a
    multiply-and-sum pass (decode steps) to a matrix product (chunks): both forms give the
    product's numbers, in float32 for half operands, on either side of the switch."""
    from attnhut_jax import cache

    ks = jax.random.split(jax.random.key(rows), 4)
    keys_BSE = jax.random.normal(ks[0], (2, 37, 8), jnp.bfloat16)
    q_BXE = jax.random.normal(ks[1], (2, rows, 8), jnp.bfloat16)
    dots = cache.row_dots(keys_BSE, q_BXE)
    assert dots.shape == (2, 37, rows) and dots.dtype == jnp.float32
    want = jnp.einsum("BSE,BXE->BSX", keys_BSE.astype(jnp.float32), q_BXE.astype(jnp.float32),
                      precision="highest")
    np.testing.assert_allclose(np.asarray(dots), np.asarray(want), rtol=1e-5, atol=1e-5)
    probs_BKXS = jax.nn.softmax(jax.random.normal(ks[2], (2, 3, rows, 37)), axis=-1)
    v_BKSV = jax.random.normal(ks[3], (2, 3, 37, 5))
    out = cache.read_values(probs_BKXS, v_BKSV, precision="highest")
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(jnp.einsum("BKXS,BKSV->BKXV", probs_BKXS, v_BKSV,
                                                     precision="highest")),
                               rtol=1e-5, atol=1e-6)

"""Incremental decoding of HeavilyCompressedAttention and CompressedSparseAttention: decode ==
prefill across compression and window boundaries, ragged prompts, one compilation, the cache's
bytes (entries, run buffers and a raw window, no per-token K/V) and the read accounting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah
from attnhut_jax import cache as cache_lib
from tests import decode_harness as h
from tests.jaxpr_walk import jaxpr_eqns

D = 16
R, W = 3, 4  # runs of 3 tokens, a window of 4 raw tokens
T = 14  # crosses 4 run boundaries and the window
COMPRESSED = {
    "hca": lambda dec: ah.HeavilyCompressedAttention(D, 4, compression_rate=R, window=W,
                                                     bias=True, decode=dec),
    # top_k 2 of up to 4 visible entries: the selection matters
    "csa": lambda dec: ah.CompressedSparseAttention(D, 4, compression_rate=R, top_k=2, window=W,
                                                    num_index_heads=2, index_dim=8, num_groups=2,
                                                    decode=dec),
}


def _x(t=T, b=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_decode_equals_prefill(name):
    # the first chunk (5) is longer than a run and than the window; the chunks end mid-run,
    # mid-run, on a run boundary; the cache (20 -> 21, whole runs) is longer than the sequence
    h.check_decode_equals_prefill(COMPRESSED[name], _x(), chunks=[5, 3, 4, 1, 1], max_len=20)


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_window_shorter_than_a_run_and_a_chunk_of_several_runs(name):
    # window 2 < rate 4; the first chunk (9) completes two runs and starts a third, which the
    # next chunk (3) completes from the buffered token (CSA: and run 1 from the buffer)
    def make(dec):
        return COMPRESSED[name](dec).clone(compression_rate=4, window=2)

    x = _x()
    params = h.params_of(make, x)
    got, _ = h.decode_in_chunks(make, params, x, [9, 3, 2], max_len=T)
    h.close(got, h.prefill(make, params, x), what="chunks [9, 3, 2]")


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_ragged_prompts(name):
    # row 0: a prompt inside the first run; row 1: past two runs and the window
    h.check_ragged_prompts(COMPRESSED[name], _x(), [2, 7], steps=4)


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_compiles_once_and_bytes(name):
    h.check_compiles_once(COMPRESSED[name], _x())
    variables = h.check_cache_bytes(COMPRESSED[name], 2, T, D)
    # max_len 14 is rounded up to 5 whole runs of 3
    assert variables["cache"]["entries"].shape == (2, 5, D // 4)


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_the_cache_holds_no_per_token_keys(name):
    """Only the entries (and CSA's indexer keys) grow with max_len, one per run: the cache holds
    no raw K/V of every token."""
    make = COMPRESSED[name]

    def shapes(max_len):
        cache = jax.eval_shape(make(True).init, jax.random.key(0),
                               jnp.zeros((2, max_len, D)))["cache"]
        return {k: (v.shape, v.dtype) for k, v in cache.items()}

    small, large = shapes(4 * R), shapes(4 * R * 25)
    growing = {k for k in small if small[k] != large[k]}
    assert growing == ({"entries"} if name == "hca" else {"entries", "index_key"}), growing
    for k in growing:
        assert small[k][0][1] == 4 and large[k][0][1] == 100
    for k in set(small) - growing:
        assert max(small[k][0][1:], default=0) <= max(2 * R, W), (k, small[k])
    m = make(True)
    per_entry = (m.cache_bytes(2, 4 * R * 25, jnp.float32)
                 - m.cache_bytes(2, 4 * R, jnp.float32)) / 96
    entry_width = D // 4 + (0 if name == "hca" else 8)
    assert per_entry == 2 * entry_width * 4


def test_read_accounting_and_the_published_figure():
    # a CSA decode at 1M tokens, window 256, top-128 entries: 384 entries, 2604x fewer than dense
    csa = ah.CompressedSparseAttention(512, 8, window=256, top_k=128, decode=True)
    n = 1_000_000
    assert csa.decode_reads(n) == 384
    assert n // csa.decode_reads(n) == 2604
    assert csa.decode_scored(n) == (n - 1) // 4
    hca = ah.HeavilyCompressedAttention(512, 8, compression_rate=16, window=64, decode=True)
    assert hca.decode_reads(n) == (n - 1) // 16 + 64 and hca.decode_scored(n) == 0
    # small caches: a query at position n - 1 reads the entries of the runs before it
    small = COMPRESSED["csa"](True)
    assert [small.decode_reads(k) for k in (0, 1, 3, 4, 7, 10)] == [0, 1, 3, 5, 6, 6]
    assert [COMPRESSED["hca"](True).decode_reads(k) for k in (1, 4, 10)] == [1, 5, 7]


def _entry_products(name, entries=50):
    """The shapes of the matmul operands of a single-token step that hold a full axis of the
    cache's ``entries`` compressed entries and end in the entry width (H = 4): a product of
    queries or weights with every entry."""
    m = COMPRESSED[name](True)
    v = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((2, entries * R, D)))
    jaxpr = jax.make_jaxpr(lambda v, x: m.apply(v, x, mutable=["cache"]))(v, jnp.zeros((2, 1, D)))
    shapes = [tuple(a.aval.shape) for e in jaxpr_eqns(jaxpr.jaxpr)
              if e.primitive.name == "dot_general" for a in e.invars]
    return [s for s in shapes if max(s) >= entries and s[-1] == D // 4]


def test_csa_attends_only_the_gathered_entries():
    """CSA's step scores every entry's indexer key but its attention reads only the gathered
    top_k entries (no product touches all entries); HCA, which keeps every entry, does."""
    assert _entry_products("csa") == []
    assert _entry_products("hca") != []


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_decode_refuses_prefill_arguments(name):
    x = _x(3)
    m = COMPRESSED[name](True)
    variables = jax.jit(m.init)(jax.random.key(0), x)
    bad = [{"segment_ids": jnp.ones((2, 3), int)}, {"positions": jnp.zeros((2, 3), int)}]
    if name == "csa":
        bad += [{"return_aux": True}, {"index_loss": "dense"}]
    for kw in bad:
        with pytest.raises(ValueError, match="cannot be used with decode=True"):
            m.apply(variables, x, mutable=["cache"], **kw)
    with pytest.raises(ValueError, match="lengths is a decode argument"):
        COMPRESSED[name](False).apply({"params": variables["params"]}, x,
                                      lengths=jnp.array([1, 2]))
    assert cache_lib.cache_arrays_bytes(variables["cache"]) == m.cache_bytes(2, 3, jnp.float32)
    np.testing.assert_array_equal(np.asarray(variables["cache"]["index"]), [0, 0])

"""Incremental decoding of the token- and block-sparse selectors (DSA, MSA): decode == prefill
(the default impl, and once attnhut's ``reference`` selection), ragged prompts, one compilation,
the cache's bytes, and that a step's attention reads only the selected tokens / blocks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah
from attnhut_jax import cache as cache_lib
from tests import decode_harness as h
from tests.jaxpr_walk import jaxpr_eqns

D = 16


def dsa(dec, **kw):
    """4 heads of width 4; the indexer has I = 2 heads of width E = 8; 3 of up to 12 keys."""
    kw = {"top_k": 3, "num_index_heads": 2, "index_head_dim": 8, **kw}
    return ah.DeepSeekSparseAttention(D, 4, decode=dec, **kw)


def msa(dec, **kw):
    """4 heads of width 4 in 2 groups, index width E = 6, blocks of 4, top 2 blocks (+ own)."""
    kw = {"block_size": 4, "top_k": 2, "index_dim": 6, **kw}
    return ah.MiniMaxSparseAttention(D, 4, 2, decode=dec, **kw)


# T crosses block boundaries (MSA: 13 tokens = 3 full blocks of 4 and one token); every query
# past the first few selects a strict subset of its keys (DSA: 3 of up to 12 keys).
MAKE = {"dsa": (dsa, 12), "msa": (msa, 13)}
# a cache longer than the sequence, of a length no other axis has (D = 16, the projections'
# widths): the jaxpr check below finds the cache's axis by its length
MAX_LEN = {"dsa": 15, "msa": 17}


def _x(t, b=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


@functools.cache
def _step(name):
    """A jit-compiled decode call shared by the tests of ``name`` (one compilation per chunk
    size and cache length)."""
    return h.stepper(MAKE[name][0])


@pytest.mark.selections
@pytest.mark.parametrize("name", sorted(MAKE))
def test_decode_equals_prefill(name):
    make, t = MAKE[name]
    x = _x(t)
    # chunks [3, 4, 2] then single steps; a cache longer than the sequence
    params = h.check_decode_equals_prefill(make, x, max_len=MAX_LEN[name])
    # the selection is attnhut's: decode equals the reference impl's prefill (dense scores and a
    # dense top-k mask) as well
    want = h.prefill(lambda dec: make(dec, impl="reference"), params, x)
    got, _ = h.decode_in_chunks(make, params, x, [1] * t, MAX_LEN[name], step=_step(name))
    h.close(got, want, what=f"{name}: decode vs impl='reference'")


@pytest.mark.parametrize("name, kw", [
    # the indexer reads stop_gradient(x) (nothing changes at inference); top_k beyond the cache
    ("dsa", {"detach_index_input": True, "top_k": 20}),
    # no RoPE, no forced own block, one block per query
    ("msa", {"use_rope": False, "force_current_block": False, "top_k": 1}),
])
def test_decode_equals_prefill_variants(name, kw):
    make, t = MAKE[name]
    h.check_decode_equals_prefill(lambda dec: make(dec, **kw), _x(t, seed=1),
                                  chunks=[3, 3, 3, 3] + [1] * (t - 12))


def test_dsa_chunk_in_query_tiles(monkeypatch):
    """A DSA chunk attends in query tiles (``attend_tiled``, a bounded gather per tile): tiles of
    3 queries (uneven against the chunks) equal one gather of the whole chunk, and decode in
    chunks still equals prefill."""
    from attnhut_jax import deepseek_sparse as ds

    ks = jax.random.split(jax.random.key(4), 4)
    b, t, s, m = 2, 7, 11, 5
    q = jax.random.normal(ks[0], (b, t, 4, 3))
    k = jax.random.normal(ks[1], (b, s, 2, 3))
    v = jax.random.normal(ks[2], (b, s, 2, 6))
    idx = jax.random.randint(ks[3], (b, t, m), -1, s)  # with empty slots (-1)
    want = ds.attend_selected(q, k, v, idx, scale=0.5)
    got = ds.attend_tiled(q, k, v, idx, scale=0.5, block_q=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # the module's tile: at most DECODE_TILE_BYTES of gathered keys and values (here 2 queries:
    # B * M * K * (H + V) * 4 bytes = 2 * 3 * 4 * 8 * 4 per query)
    monkeypatch.setattr(ds, "DECODE_TILE_BYTES", 2 * 768)
    h.check_decode_equals_prefill(dsa, _x(12, seed=5), chunks=[5, 4, 3])


@pytest.mark.parametrize("name", sorted(MAKE))
def test_ragged_prompts(name):
    make, t = MAKE[name]
    h.check_ragged_prompts(make, _x(t, seed=2), [3, 7], steps=t - 7)


@pytest.mark.parametrize("name", sorted(MAKE))
def test_compiles_once_and_bytes(name):
    make, t = MAKE[name]
    h.check_compiles_once(make, _x(t))  # 20 steps: past the sequence's length
    h.check_cache_bytes(make, 2, t, D)
    # a bfloat16 module keeps its index keys in selector_dtype (float32)
    bf16 = make(True, dtype=jnp.bfloat16)
    cache = bf16.init(jax.random.key(0), jnp.zeros((2, 9, D), jnp.bfloat16))["cache"]
    assert cache["key"].dtype == jnp.bfloat16 and cache["index_key"].dtype == jnp.float32
    assert cache_lib.cache_arrays_bytes(cache) == bf16.cache_bytes(2, 9, jnp.bfloat16)


def test_accounting():
    m = dsa(True)
    # K and V of 4 heads of width 4 (bf16), the indexer key of width 8 (float32), the index
    assert m.cache_bytes(3, 100) == 3 * 100 * (2 * 16 * 2 + 8 * 4) + 3 * 4
    assert [m.decode_reads(n) for n in (1, 3, 4, 1000)] == [1, 3, 3, 3]
    assert m.decode_scored(1000) == 1000
    m = msa(True)
    # K and V of 2 groups of width 4 (bf16), the index key of width 6 (float32), the index
    assert m.cache_bytes(3, 100) == 3 * 100 * (2 * 8 * 2 + 6 * 4) + 3 * 4
    # worst case: top_k blocks and the query's own block, never more than the cache holds
    assert [m.decode_reads(n) for n in (1, 5, 12, 13, 1000)] == [1, 5, 12, 12, 12]
    assert msa(True, force_current_block=False).decode_reads(1000) == 8
    assert m.decode_scored(1000) == 1000


def _selection(name, params, x, max_len):
    """(B, K, max_len) bool: the cached tokens the last query of ``x`` attends, per kv group
    (DSA: one selection for every head, K = 1), from the prefill's aux; False past ``x``."""
    make, t = MAKE[name]
    _, aux = jax.jit(lambda p, a: make(False).apply({"params": p}, a, return_aux=True))(params, x)
    sel = aux["selected"][:, None, -1] if name == "dsa" else aux["keep"][:, :, -1]
    return np.pad(np.asarray(sel), ((0, 0), (0, 0), (0, max_len - t)))


@pytest.mark.parametrize("name", sorted(MAKE))
def test_a_step_reads_only_its_selection(name):
    make, t = MAKE[name]
    max_len = MAX_LEN[name]
    x = _x(t, seed=3)
    params = h.params_of(make, x)
    step = _step(name)
    _, cache = h.decode_in_chunks(make, params, x[:, :-1], [1] * (t - 1), max_len, step=step)
    out, _ = step(params, cache, x[:, -1:])
    sel_BKS = _selection(name, params, x, max_len)
    # every row and group leaves some written token unread (else the check below is empty)
    assert np.all((~sel_BKS[:, :, :t]).any(axis=-1)), sel_BKS
    for b in range(2):
        # NaN in the keys and values that the query's heads do not select (of every token
        # written, and of the cache slots past them): the same output, bit for bit
        unread_SK1 = jnp.asarray(~sel_BKS[b].T)[:, :, None]
        poisoned = dict(cache)
        for a in ("key", "value"):
            kv_SNH = cache[a][b]
            kv_SKGH = kv_SNH.reshape(max_len, unread_SK1.shape[1], -1, kv_SNH.shape[-1])
            kv_SKGH = jnp.where(unread_SK1[..., None], jnp.nan, kv_SKGH)
            poisoned[a] = cache[a].at[b].set(kv_SKGH.reshape(kv_SNH.shape))
        got, _ = step(params, poisoned, x[:, -1:])
        np.testing.assert_array_equal(np.asarray(got), np.asarray(out))
        # a selected token's value does change it (in row b only)
        s = int(np.flatnonzero(sel_BKS[b].any(axis=0))[0])
        nudged = dict(cache, value=cache["value"].at[b, s].add(1.0))
        got, _ = step(params, nudged, x[:, -1:])
        assert float(jnp.abs(got[b] - out[b]).max()) > 1e-3
        np.testing.assert_array_equal(np.asarray(got[1 - b]), np.asarray(out[1 - b]))

    # the attention's products never span the cache: no matmul or sum contracts max_len keys,
    # and every matmul or sum with an axis of max_len is the selector's scoring pass
    # (contracting the index width E or the I indexer heads), none the head width over max_len
    m = make(True)
    selector_widths = {8, 2} if name == "dsa" else {6}
    jaxpr = jax.make_jaxpr(lambda p, c, a: m.apply({"params": p, "cache": c}, a,
                                                    mutable=["cache"]))(params, cache, x[:, -1:])
    spanning = 0
    for eqn in jaxpr_eqns(jaxpr.jaxpr):
        if eqn.primitive.name == "reduce_sum":  # a single-token step's scoring: multiply and sum
            shape = eqn.invars[0].aval.shape
            summed = {shape[a] for a in eqn.params["axes"]}
            assert max_len not in summed, eqn   # nothing sums over the cache's keys
            if max_len in shape:
                assert summed <= selector_widths, (eqn, summed)
                spanning += 1
        if eqn.primitive.name != "dot_general":
            continue
        (lhs_c, rhs_c), _ = eqn.params["dimension_numbers"]
        widths = {eqn.invars[0].aval.shape[d] for d in lhs_c}
        assert max_len not in widths | {eqn.invars[1].aval.shape[d] for d in rhs_c}, eqn
        if max_len in eqn.outvars[0].aval.shape:
            assert widths <= selector_widths, (eqn, widths)
            spanning += 1
    assert spanning >= 1  # the scoring pass was found: the walk sees the step


@pytest.mark.parametrize("name", sorted(MAKE))
def test_decode_refuses_non_causal_and_prefill_arguments(name):
    make, _ = MAKE[name]
    x = _x(3)
    with pytest.raises(ValueError, match="decode=True needs causal=True"):
        make(True, causal=False).init(jax.random.key(0), x)
    m = make(True)
    variables = jax.jit(m.init)(jax.random.key(0), x)
    for kw in ({"return_aux": True}, {"index_loss": "sparse"},
               {"segment_ids": jnp.ones((2, 3), int)}, {"positions": jnp.zeros((2, 3), int)}):
        with pytest.raises(ValueError, match="cannot be used with decode=True"):
            m.apply(variables, x, mutable=["cache"], **kw)
    with pytest.raises(ValueError, match="lengths is a decode argument"):
        make(False).apply({"params": variables["params"]}, x, lengths=jnp.array([1, 2]))


@pytest.mark.parametrize("selector", [None, jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_cache_bytes_follow_the_selector_dtype(dtype, selector):
    """``cache_bytes`` counts the selector's cached keys in the dtype they get, also when
    ``selector_dtype`` is None (the main dtype promoted with the parameters')."""

    for cls, kw in ((ah.DeepSeekSparseAttention, dict(top_k=3, index_head_dim=8)),
                    (ah.MiniMaxSparseAttention, dict(num_kv_groups=2, block_size=4, top_k=2)),
                    (ah.CompressedSparseAttention, dict(compression_rate=3, top_k=2, window=4,
                                                        index_dim=8))):
        m = cls(16, 4, **kw, dtype=dtype, selector_dtype=selector, decode=True)
        shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((2, 12, 16)))
        assert cache_lib.cache_arrays_bytes(shapes["cache"]) == m.cache_bytes(
            2, 12, dtype or jnp.float32), (cls.__name__, dtype, selector)

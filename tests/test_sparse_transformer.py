"""Child et al.'s strided and fixed sparse attention: the keys each query reads equal the paper's
set definitions exactly (prefill patterns and decode gathers), the default path (disjoint
block-sparse passes merged by log-sum-exp) equals the masked dense computation of the pattern in
outputs and gradients, packed == separate, no (T, T) array on the default path, and decode ==
prefill. Causality both ways, jit == eager and bf16 are the shared tests' (mechanisms_spec)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import jaxpr_shapes

import attnhut_jax as ah
from attnhut_jax import sparse_transformer as st
from tests import decode_harness as h

D = 16

# ----------------------------------------------------------------------------- the paper's sets


def _runs(seg_row):
    """(start, length) of each maximal run of one non-zero id."""
    runs, s = [], 0
    for i in range(1, len(seg_row) + 1):
        if i == len(seg_row) or seg_row[i] != seg_row[s]:
            if seg_row[s] != 0:
                runs.append((s, i - s))
            s = i
    return runs


def paper_sets(kind, t, l, c, causal, combine, num_heads, segment_ids=None):
    """(B, N, T, T) bool written from Section 4.3's definitions, one (i, j) at a time: strided
    A1_i = {max(0, i - l), ..., i}, A2_i = {j : (i - j) mod l = 0}; fixed A1_i = {j : j // l =
    i // l}, A2_i = {j : j mod l in {l - c, ..., l - 1}}; causal keeps j <= i; bidirectional
    strided A1 is |i - j| <= l; merged = union for every head, interleaved = A1 on even heads and
    A2 (plus i itself) on odd heads. Positions restart at each packed sequence."""
    seg = np.ones((1, t), int) if segment_ids is None else np.asarray(segment_ids)
    out = np.zeros((seg.shape[0], num_heads, t, t), bool)
    for b in range(seg.shape[0]):
        for start, length in _runs(list(seg[b])):
            for i in range(length):
                for j in range(length):
                    if causal and j > i:
                        continue
                    if kind == "strided":
                        a1 = (i - l <= j <= i) if causal else abs(i - j) <= l
                        a2 = (i - j) % l == 0
                    else:
                        a1 = j // l == i // l
                        a2 = j % l in range(l - c, l) or j == i
                    for n in range(num_heads):
                        read = (a1 or a2) if combine == "merged" else (a2 if n % 2 else a1)
                        out[b, n, start + i, start + j] = read
    return out


SEG = np.array([[1] * 9 + [2] * 6 + [0] * 2, [5] * 4 + [0] * 3 + [5] * 10])  # T = 17, 3 runs


def test_patterns_are_the_paper_sets():
    t = SEG.shape[1]
    for kind, l, c in [("strided", 1, 1), ("strided", 3, 1), ("strided", 4, 1),
                       ("fixed", 1, 1), ("fixed", 4, 1), ("fixed", 4, 2), ("fixed", 3, 3)]:
        for causal in (True, False):
            for combine in st.COMBINES:
                for seg in (None, SEG):
                    want = paper_sets(kind, t, l, c, causal, combine, 3, seg)
                    if kind == "strided":
                        got = ah.strided_pattern(t, l, causal=causal, combine=combine,
                                                 num_heads=3, segment_ids=seg)
                    else:
                        got = ah.fixed_pattern(t, l, c, causal=causal, combine=combine,
                                               num_heads=3, segment_ids=seg)
                    what = (kind, l, c, causal, combine, seg is not None)
                    np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(what))
                    # a query always reads itself; padding reads and is read by no one
                    real = (np.ones((1, t)) if seg is None else seg) != 0
                    diag = np.asarray(got)[:, :, np.arange(t), np.arange(t)]
                    assert np.array_equal(diag, np.broadcast_to(real[:, None], diag.shape))
    m = ah.FixedSparseAttention(D, 3, block_size=4, num_summary=2, combine="interleaved")
    np.testing.assert_array_equal(np.asarray(m.pattern(t, SEG)),
                                  paper_sets("fixed", t, 4, 2, True, "interleaved", 3, SEG))


# ----------------------------------------------------------------------------- default == dense

# (the torch oracle, tests/torch_parity/test_sparse_transformer_oracle.py, runs the default path
# on bidirectional and unpacked cases of both kinds)
CASES = {
    "strided_causal_packed": lambda impl: ah.StridedSparseAttention(D, 2, 3, impl=impl,
                                                                    bias=True),
    "fixed_causal_interleaved_packed": lambda impl: ah.FixedSparseAttention(
        D, 2, 4, 2, combine="interleaved", impl=impl),
}


@functools.cache
def _loss(name, impl):
    m = CASES[name](impl)

    def f(p, x, seg):
        out = m.apply({"params": p}, x, segment_ids=seg)
        return (out * jnp.cos(jnp.arange(out.size)).reshape(out.shape)).sum(), out

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("name", list(CASES))
def test_default_path_equals_the_masked_dense_pattern(name):
    """The passes (xla; pallas once) against impl='reference' (the pattern's (T, T) mask):
    outputs and the gradients of every parameter and the input."""
    x = jax.random.normal(jax.random.key(0), (2, SEG.shape[1], D))
    seg = jnp.asarray(SEG) if "packed" in name else None
    params = nn.unbox(jax.jit(CASES[name]("reference").init)(jax.random.key(1), x))["params"]
    (_, want), g_want = _loss(name, "reference")(params, x, seg)
    # the Pallas kernels (interpret mode on CPU) on one case, with packing
    for impl in ("xla", "pallas") if name == "fixed_causal_interleaved_packed" else ("xla",):
        (_, got), g_got = _loss(name, impl)(params, x, seg)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5,
                                   err_msg=impl)
        jax.tree_util.tree_map(lambda a, b, impl=impl: np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4, err_msg=impl), g_got, g_want)


def test_packed_equals_separate():
    """A packed row (two sequences and padding) equals each sequence run alone."""
    m = CASES["strided_causal_packed"]("xla")
    x = jax.random.normal(jax.random.key(2), (1, 17, D))
    seg = jnp.asarray([[1] * 9 + [2] * 6 + [0] * 2])
    params = jax.jit(m.init)(jax.random.key(1), x)
    packed = jax.jit(lambda v, a, s: m.apply(v, a, segment_ids=s))(params, x, seg)
    for lo, hi in ((0, 9), (9, 15)):
        alone = jax.jit(m.apply)(params, x[:, lo:hi])
        np.testing.assert_allclose(np.asarray(packed[:, lo:hi]), np.asarray(alone), atol=2e-6)
    # padding reads nothing: its rows are the output projection's bias
    bias = nn.unbox(params)["params"]["proj"]["bias"]
    np.testing.assert_array_equal(np.asarray(packed[0, 15:]), np.tile(np.asarray(bias), (2, 1)))


# ----------------------------------------------------------------------------- no (T, T) array

JAXPR_CASES = [
    lambda impl: ah.StridedSparseAttention(32, 4, 10, impl=impl),
    lambda impl: ah.StridedSparseAttention(32, 4, 10, causal=False, combine="interleaved",
                                           impl=impl),
    lambda impl: ah.FixedSparseAttention(32, 4, 10, 2, impl=impl),
    lambda impl: ah.FixedSparseAttention(32, 4, 10, causal=False, combine="interleaved",
                                         impl=impl),
]


def _big_shapes(make, impl, packed):
    t = 100  # larger than every feature width here (3 * 32 = 96)
    m = make(impl)
    x = jnp.zeros((2, t, 32))
    seg = jnp.asarray([[1] * 60 + [2] * 40, [3] * 100]) if packed else None
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v, x: jax.grad(
        lambda x: m.apply(v, x, segment_ids=seg).sum())(x))(v, x).jaxpr
    shapes = list(jaxpr_shapes(jaxpr))
    assert shapes
    return [s for s in shapes if sum(d >= t for d in s) >= 2]


@pytest.mark.parametrize("case", range(len(JAXPR_CASES)))
def test_default_path_builds_no_sequence_by_sequence_array(case):
    assert not _big_shapes(JAXPR_CASES[case], "auto", packed=case % 2 == 0)
    # the check can fail: the reference path builds the (T, T) pattern
    if case == 0:
        assert _big_shapes(JAXPR_CASES[case], "reference", packed=False)


# ----------------------------------------------------------------------------- decoding


def strided(dec, **kw):
    return ah.StridedSparseAttention(D, 4, 3, decode=dec, **kw)


def fixed(dec, **kw):
    return ah.FixedSparseAttention(D, 4, 4, 2, combine="interleaved", decode=dec, **kw)


DECODERS = {"strided": strided, "fixed": fixed}


def _x(t, b=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


@pytest.mark.parametrize("name", list(DECODERS))
def test_decode_equals_prefill(name):
    """13 tokens cross the stride / block boundaries: token by token, chunks [3, 4, 2] then
    steps (a cache longer than the sequence), and (strided) rows of different prompt
    lengths."""
    make = DECODERS[name]
    h.check_decode_equals_prefill(make, _x(13), max_len=15)
    if name == "strided":
        h.check_ragged_prompts(make, _x(13, seed=1), [3, 8], steps=5)


@pytest.mark.parametrize("name", list(DECODERS))
def test_decode_compiles_once_and_counts_its_bytes(name):
    make = DECODERS[name]
    h.check_compiles_once(make, _x(13), steps=6)
    h.check_cache_bytes(make, 2, 13, D)


@pytest.mark.parametrize("kind, l, c", [("strided", 3, 1), ("strided", 1, 1), ("fixed", 4, 2),
                                        ("fixed", 3, 1), ("fixed", 2, 2)])
@pytest.mark.parametrize("combine", st.COMBINES)
def test_a_decode_step_gathers_exactly_its_set(kind, l, c, combine):
    """The index list a step gathers (``decode_indices``) is the query's row of the pattern, for
    every position of a 13-token cache; ``decode_reads`` is its size over the heads."""
    max_len = 13
    pos = jnp.arange(max_len)[None]
    pattern = np.asarray(st._pattern(kind, max_len, l, c, True, combine, 2, None))[0]
    whiches = ("merged",) if combine == "merged" else ("a1", "a2")
    for n, which in enumerate(whiches):
        idx = np.asarray(st.decode_indices(kind, pos, l=l, num_summary=c, max_len=max_len,
                                           which=which))[0]
        for p in range(max_len):
            got = sorted(int(i) for i in idx[p] if i >= 0)
            assert len(got) == len(set(got)), (which, p, got)  # nothing read twice
            assert got == list(np.flatnonzero(pattern[n, p])), (which, p, got)
    m = (ah.StridedSparseAttention(8, 2, l) if kind == "strided"
         else ah.FixedSparseAttention(8, 2, l, c))
    union = pattern.any(axis=0)
    assert [m.decode_reads(n) for n in range(1, max_len + 1)] == [
        int(union[p].sum()) for p in range(max_len)]


def test_a_long_chunk_gathers_in_query_tiles(monkeypatch):
    """A chunk longer than a tile gathers tile by tile (padded queries read nothing): the same
    numbers as one gather of the whole chunk."""
    ks = jax.random.split(jax.random.key(4), 4)
    q = jax.random.normal(ks[0], (2, 7, 3, 4))
    k = jax.random.normal(ks[1], (2, 11, 3, 4))
    v = jax.random.normal(ks[2], (2, 11, 3, 5))
    idx = jax.random.randint(ks[3], (2, 7, 6), -1, 11)  # with empty slots (-1)
    want = st.attend_gathered(q, k, v, idx, scale=0.5)
    monkeypatch.setattr(st, "_DECODE_TILE", 3)
    got = st.attend_gathered(q, k, v, idx, scale=0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(got)[np.asarray((idx < 0).all(-1))] == 0)


def test_a_step_reads_only_its_set():
    """NaN in every cache row the last query does not read leaves its output bit for bit."""
    make, t = strided, 13
    x = _x(t, seed=3)
    params = h.params_of(make, x)
    step = h.stepper(make)
    _, cache = h.decode_in_chunks(make, params, x[:, :-1], [1] * (t - 1), t, step=step)
    out, _ = step(params, cache, x[:, -1:])
    read = np.asarray(ah.strided_pattern(t, 3))[0, 0, t - 1]
    assert (~read).sum() >= 6
    poisoned = {**cache, **{a: jnp.where(jnp.asarray(~read)[None, :, None, None], jnp.nan,
                                         cache[a]) for a in ("key", "value")}}
    got, _ = step(params, poisoned, x[:, -1:])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(out))


# ----------------------------------------------------------------------------- refusals


def test_bad_values_are_named():
    x = jnp.zeros((2, 5, D))
    cases = [
        (ah.StridedSparseAttention(D, 4, 0), r"stride=0 must be >= 1"),
        (ah.StridedSparseAttention(D, 4, 2, combine="sum"), r"combine='sum' is not one of"),
        (ah.FixedSparseAttention(D, 4, 3, 0), r"num_summary=0 must be >= 1"),
        (ah.FixedSparseAttention(D, 4, 3, 4), r"num_summary=4 must be <= block_size=3"),
        (ah.FixedSparseAttention(D, 4, 3, causal=False, decode=True),
         r"decode=True needs causal=True"),
    ]
    for m, match in cases:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(m.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"combine='sum' is not one of"):
        ah.strided_pattern(5, 2, combine="sum")
    m = strided(True)
    v = jax.jit(m.init)(jax.random.key(0), x)
    with pytest.raises(ValueError, match="cannot be used with decode=True"):
        m.apply(v, x, mutable=["cache"], segment_ids=jnp.ones((2, 5), int))

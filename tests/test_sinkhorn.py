"""Sparse Sinkhorn attention: the keys each query reads given the sort, the Sinkhorn matrix,
Gumbel noise, packed == separate, the masked-dense reference path, no (T, T) array, refusals.

Causality both ways, jit == eager, bf16 and bad input are the shared behaviour tests'
(``mechanisms_spec``: ``sinkhorn``, ``sinkhorn_bidir``); the torch oracle written from the
paper's equations is ``tests/torch_parity/test_sinkhorn_oracle.py``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import jaxpr_shapes

import attnhut_jax as ah
from attnhut_jax import sinkhorn as sk

D, N, H = 32, 4, 8


def _qkv(t, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k_, (1, t, N, H)) for k_ in ks]


def _dense_expected(q, k, v, reads):
    """Attention of each query over the keys ``reads[t]`` lists: (source, index) with source
    'k' (a key of the sequence) or 's' (a sorted slot, given as the block it copies and the
    slot), computed with numpy from scratch."""
    q, k, v = (np.asarray(a[0], np.float64) for a in (q, k, v))
    out = np.zeros_like(q)
    for t, keys in enumerate(reads):
        if not keys:
            continue
        kk = np.stack([k[s] for s in keys])  # (S, N, H)
        vv = np.stack([v[s] for s in keys])
        logits = np.einsum("NH,SNH->NS", q[t], kk) * H ** -0.5
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[t] = np.einsum("NS,SNH->NH", w, vv)
    return out


@pytest.mark.parametrize("causal,sortcut", [(False, None), (True, None), (False, 2)])
def test_each_query_reads_its_block_and_the_block_the_sort_assigns(causal, sortcut):
    """A hard permutation (one-hot rows) makes sorted block i a copy of block sigma(i): query t
    of block i reads exactly its own block (causal: keys <= t) and block sigma(i) (SortCut: the
    blocks sigma(0..k-1) only); padded keys of a partial last block are never read."""
    bs, t = 3, 11  # 4 blocks, the last one has 2 real tokens
    nb = 4
    sigma = [None, 0, 0, 1] if causal else [2, 3, 1, 0]
    p = np.zeros((nb, nb), np.float32)
    for i, j in enumerate(sigma):
        if j is not None:
            p[i, j] = 1.0
    q, k, v = (jnp.pad(a, ((0, 0), (0, nb * bs - t), (0, 0), (0, 0))) for a in _qkv(t))
    rid_BT, rid_BJ, start_BJ, _ = sk._layout(None, 1, t, bs)
    out = sk.sinkhorn_block_attention(
        q, k, v, jnp.broadcast_to(jnp.asarray(p), (1, N, nb, nb)), rid_BT, rid_BJ, start_BJ,
        block_size=bs, causal=causal, sortcut_k=sortcut)[:, :t]
    reads = []
    for pos in range(t):
        i = pos // bs
        if sortcut is not None:
            keys = [sigma[c] * bs + s for c in range(sortcut) for s in range(bs)]
        else:
            local = [s for s in range(i * bs, (i + 1) * bs) if s < t and (not causal or s <= pos)]
            srt = [] if sigma[i] is None else [sigma[i] * bs + s for s in range(bs)]
            keys = local + srt
        reads.append([s for s in keys if s < t])
    np.testing.assert_allclose(np.asarray(out[0]), _dense_expected(q, k, v, reads)[:t], atol=2e-6)


def _sinkhorn_in(nb, seed):
    return jax.random.normal(jax.random.key(seed), (2, N, nb, nb)) * 2.0


def test_sinkhorn_matrix_is_doubly_stochastic():
    """Non-causal: every iteration ends with the row step, so rows sum to 1 exactly; the columns
    converge to 1 (within 3e-2 after the default 8 iterations on these logits, 1e-5 after 60)."""
    x = _sinkhorn_in(6, 0)
    keep = jnp.ones((1, 1, 6, 6), bool)
    for iters, col_tol in ((8, 3e-2), (60, 1e-5)):
        p = np.asarray(sk.sinkhorn(x, keep, iters, causal=False))
        assert (p > 0).all()
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(p.sum(-2), 1.0, atol=col_tol)


def test_causal_sinkhorn_is_strictly_lower_triangular_and_reads_no_later_row():
    """Causal: block i is assigned only blocks j < i (row 0 is empty), every other row sums to
    1, and changing the logits of rows > i leaves row i bit for bit (the column step divides by
    a prefix sum). The columns are not normalised to 1: the newest block's column has seen one
    row only."""
    nb = 6
    x = _sinkhorn_in(nb, 1)
    keep = jnp.asarray(np.tril(np.ones((nb, nb), bool), -1))[None, None]
    p = np.asarray(sk.sinkhorn(x, keep, 8, causal=True))
    assert not p[..., np.triu_indices(nb)[0], np.triu_indices(nb)[1]].any()
    assert (p[..., 1:, :][..., np.tril(np.ones((nb, nb), bool), -1)[1:]] > 0).all()
    np.testing.assert_allclose(p[..., 1:, :].sum(-1), 1.0, atol=1e-6)
    for i in range(nb - 1):
        p2 = np.asarray(sk.sinkhorn(x.at[..., i + 1:, :].add(5.0), keep, 8, causal=True))
        np.testing.assert_array_equal(p2[..., :i + 1, :], p[..., :i + 1, :])


@functools.cache
def _module(**kw):
    return ah.SinkhornAttention(D, N, 3, max_len=24, **kw)


@functools.cache
def _vars():
    return jax.jit(_module().init)(jax.random.key(0), jnp.zeros((2, 12, D)))


def test_gumbel_noise():
    """Off (the default): deterministic and no rng needed. On: drawn from the 'gumbel' stream,
    the same key gives the same output, another key another one; without the stream: refused."""
    m, v = _module(), _vars()
    x = jax.random.normal(jax.random.key(4), (2, 12, D))
    run = jax.jit(lambda x, key: m.apply(v, x, deterministic=False, rngs={"gumbel": key}))
    off = jax.jit(lambda x, key: (m.apply(v, x), m.apply(v, x, deterministic=True,
                                                          rngs={"gumbel": key})))
    y0, y1 = (np.asarray(a) for a in off(x, jax.random.key(1)))
    np.testing.assert_array_equal(y1, y0)
    a, b, c = (np.asarray(run(x, jax.random.key(s))) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, y0)
    with pytest.raises(ValueError, match="'gumbel' rng stream"):
        jax.eval_shape(lambda x_: m.apply(v, x_, deterministic=False), x)


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"sortcut_k": 2}], ids=str)
def test_packed_equals_separate(kw):
    """Segments of 7 and 5 tokens, each padded to whole blocks of 3 (ids 0), in one row: each
    computes what it computes alone, and ``return_aux`` reports the Sinkhorn matrix and the
    blocks each query block reads (``sinkhorn_block_pattern`` for one sequence)."""
    m, v = _module(**kw), _vars()
    x = jax.random.normal(jax.random.key(5), (1, 15, D))
    seg = jnp.asarray([[1] * 7 + [0] * 2 + [2] * 5 + [0]])
    packed = np.asarray(jax.jit(lambda x, s: m.apply(v, x, segment_ids=s))(x, seg))
    alone1, aux = m.apply(v, x[:, :7], return_aux=True)
    alone2 = m.apply(v, x[:, 9:14])
    np.testing.assert_allclose(packed[:, :7], np.asarray(alone1), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(packed[:, 9:14], np.asarray(alone2), atol=2e-6, rtol=1e-5)
    assert aux["sort_matrix"].shape == (1, N, 3, 3)
    want = ah.sinkhorn_block_pattern(3, causal=kw.get("causal", False),
                                     sortcut_k=kw.get("sortcut_k"))
    np.testing.assert_array_equal(np.asarray(aux["block_reads"]),
                                  np.broadcast_to(want, (1, N, 3, 3)))
    p0 = np.asarray(aux["sort_matrix"][0, 0])
    heavy = ah.sinkhorn_block_pattern(3, causal=kw.get("causal", False),
                                      sortcut_k=kw.get("sortcut_k"), sort_matrix=p0,
                                      threshold=0.3)
    rows = p0[:kw["sortcut_k"]].max(0, keepdims=True) if "sortcut_k" in kw else p0
    own = np.zeros((3, 3), bool) if "sortcut_k" in kw else np.eye(3, dtype=bool)
    np.testing.assert_array_equal(heavy, np.broadcast_to(rows > 0.3, (3, 3)) | own)
    # a segment starting inside a block: refused eagerly (NaN rows under jit: one variant)
    bad = jnp.asarray([[1] * 7 + [2] * 8])
    with pytest.raises(ValueError, match=r"rows \[0\] have a segment starting inside a block"):
        m.apply(v, x, segment_ids=bad)
    if not kw:
        out = jax.jit(lambda x, s: m.apply(v, x, segment_ids=s))(x, bad)
        assert np.isnan(np.asarray(out)).all()


def test_reference_path_equals_the_block_path():
    """impl='reference' (masked dense (T, 2T) logits) computes the same outputs (every variant)
    and gradients (the causal one) as the block path (impl='xla', what 'auto' takes)."""
    x = jax.random.normal(jax.random.key(6), (2, 11, D))
    p = nn.unbox(_vars())["params"]
    for kw in ({}, {"sortcut_k": 2}):
        y_a, y_r = (jax.jit(_module(impl=i, **kw).apply)({"params": p}, x) for i in ("xla",
                                                                                    "reference"))
        np.testing.assert_allclose(np.asarray(y_a), np.asarray(y_r), atol=1e-5, rtol=1e-5)

    def grads(impl):
        m = _module(impl=impl, causal=True)
        return jax.jit(jax.value_and_grad(
            lambda p_, x_: jnp.sum(m.apply({"params": p_}, x_) ** 2), argnums=(0, 1)))(p, x)
    (l_a, g_a), (l_r, g_r) = grads("xla"), grads("reference")
    np.testing.assert_allclose(float(l_a), float(l_r), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                         rtol=1e-4), g_a, g_r)


def test_default_path_builds_no_t_by_t_array():
    t = 100  # longer than every width (qkv: 3 x 32)
    for kw, expect_tt in (({"causal": True}, False), ({}, False), ({"impl": "reference"}, True)):
        m = ah.SinkhornAttention(D, N, 4, max_len=t, **kw)
        x = jnp.zeros((1, t, D))
        v = jax.eval_shape(m.init, jax.random.key(0), x)
        jaxpr = jax.make_jaxpr(lambda v, x, m=m: jax.grad(lambda x: m.apply(v, x).sum())(x))(
            v, x).jaxpr
        tt = [s for s in jaxpr_shapes(jaxpr) if sum(d >= t for d in s) >= 2]
        assert bool(tt) == expect_tt, (kw, tt[:3])


def test_refusals():
    x = jnp.zeros((1, 12, D))
    cases = [
        (dict(decode=True), "cannot decode incrementally.*prefix's outputs change"),
        (dict(causal=True, sortcut_k=2), "sortcut_k=2 with causal=True"),
        (dict(sortcut_k=0), "sortcut_k=0 must be None or an int >= 1"),
        (dict(temperature=0.0), "temperature=0.0 must be > 0"),
        (dict(sinkhorn_iters=-1), "sinkhorn_iters=-1 must be an int >= 0"),
        (dict(max_len=8), "sequence length 12 > max_len=8"),
    ]
    for kw, match in cases:
        m = ah.SinkhornAttention(D, N, 3, **{"max_len": 24, **kw})
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(m.init, jax.random.key(0), x)

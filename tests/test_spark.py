"""SparkAttention (arXiv 2506.06644): the selection equals the statistical top-k's definition,
the threshold keeps about k keys on Gaussian scores, the streamed path equals the masked-dense
reference (outputs and gradients, packed sequences included), packed == separate, the default
path builds no (T, T) array forward or backward, decode == prefill, and the accounting.

(Causality both ways, jit == eager, bfloat16 and bad input: the shared base, ``mechanisms_spec``;
the torch oracle of the paper's equations: ``tests/torch_parity/test_spark_oracle.py``.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import jaxpr_eqns, jaxpr_shapes
from scipy.stats import norm

import attnhut_jax as ah
from attnhut_jax import registry, spark
from tests import decode_harness as h

D = 32
T = 23


def _make(impl="auto", causal=True, **kw):
    kw = {"top_k": 4, "predictor_dim": 3, "block_k": 8, **kw}
    return ah.SparkAttention(D, 4, causal=causal, impl=impl, **kw)


def _x(t=T, b=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


@functools.cache
def _vg(impl, causal, slots=None):
    m = _make(impl, causal, slots=slots)
    r = jax.random.normal(jax.random.key(9), (2, T, D))

    def loss(p, x, seg):
        y = m.apply({"params": p}, x, segment_ids=seg)
        return jnp.sum(y * r), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _params(seed=0):
    return jax.jit(_make().init)(jax.random.key(seed), _x())["params"]


# ----------------------------------------------------------------------------- definition


def _definition(q, k, r, top_k, causal, seg=None):
    """(B, N, T, S) bool in float64 numpy: the statistical top-k of q[:r] . k[:r] / sqrt(H) over
    each query's visible keys, and the distance of each score to its row's threshold."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, n, hd = q.shape
    s1 = np.einsum("btnr,bsnr->bnts", q[..., :r], k[..., :r]) / np.sqrt(hd)
    valid = np.ones((b, 1, t, t), bool)
    if causal:
        valid &= np.tril(np.ones((t, t), bool))
    if seg is not None:
        seg = np.asarray(seg)
        valid &= ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))[:, None]
    valid = np.broadcast_to(valid, s1.shape)
    cnt = valid.sum(-1)
    mean = np.where(valid, s1, 0).sum(-1) / np.maximum(cnt, 1)
    std = np.sqrt(np.where(valid, (s1 - mean[..., None]) ** 2, 0).sum(-1) / np.maximum(cnt, 1))
    z = norm.ppf(np.clip(1 - top_k / np.maximum(cnt, 1), 1e-12, 1))
    theta = np.where(cnt > top_k, mean + std * z, -np.inf)
    sel = valid & (s1 >= theta[..., None])
    gap = np.where(valid, np.abs(s1 - theta[..., None]), np.inf)
    return sel, gap


@pytest.mark.parametrize("causal", [True, False])
def test_selection_equals_the_definition(causal):
    """The keys each head's queries read (``selection``, the pattern the reference and streamed
    paths attend) equal the float64 definition, with packed segments; a score within 1e-5 of
    its threshold may go either way (none at these sizes)."""
    m = _make(causal=causal)
    x = _x(seed=1)
    seg = jnp.array([[1] * 9 + [2] * 10 + [0] * 4, [3] * 23])
    p = _params()
    got = np.asarray(m.apply({"params": p}, x, segment_ids=seg, method="selection"))
    qkv = np.asarray(x * (seg != 0)[..., None]) @ np.asarray(p["qkv"]["kernel"].value)
    q, k = (qkv[..., i * D:(i + 1) * D].reshape(2, T, 4, 8) for i in (0, 1))
    want, gap = _definition(q, k, 3, 4, causal, seg)
    near = gap < 1e-5
    assert near.sum() == 0
    np.testing.assert_array_equal(got, want)
    # a strict subset: rows with more than top_k visible keys read fewer than all of them
    assert (got.sum(-1) < want.shape[-1]).all() and got[..., 10:, :].sum(-1).mean() < 7


def test_threshold_keeps_about_k_on_gaussian_scores():
    """On Gaussian scores (Gaussian keys against a fixed query are Gaussian) the statistical
    top-k keeps about k keys: over 512 rows of n = 2048 keys and k = 64, the mean count is
    within 3% of k and 95% of the rows within 30% (the count's spread is about sqrt(k))."""
    kq, kk = jax.random.split(jax.random.key(3))
    q = jax.random.normal(kq, (1, 256, 2, 16))
    k = jax.random.normal(kk, (1, 2048, 2, 16))
    sel = spark.spark_pattern(q, k, top_k=64, predictor_dim=16, causal=False, scale=1.0)
    counts = np.asarray(sel.sum(-1), np.float64).ravel()
    assert abs(counts.mean() - 64) <= 0.03 * 64, counts.mean()
    assert np.mean(np.abs(counts - 64) <= 0.3 * 64) >= 0.95
    # the closed form of the threshold itself: n keys, mean 0, unit variance
    theta = spark.threshold(jnp.array(2048.0), jnp.array(0.0), jnp.array(2048.0), 64)
    np.testing.assert_allclose(float(theta), norm.ppf(1 - 64 / 2048), rtol=1e-5)
    # n <= k: every visible key
    assert float(spark.threshold(jnp.array(64.0), jnp.array(0.0), jnp.array(1.0), 64)) == -np.inf


# ----------------------------------------------------------------------------- paths


@pytest.mark.parametrize("causal,slots", [(True, 12), (False, 12), (True, None)])
def test_streamed_equals_reference_outputs_and_gradients(causal, slots, monkeypatch):
    """The default path (query and key tiles; the selection gathered into ``slots`` keys per
    query (forced here: at long T only), or the masked online softmax under its custom VJP)
    against the masked-dense reference: outputs and the gradients of every parameter and the
    input, float32, with packed segments and padding."""
    if slots is not None:
        monkeypatch.setattr(spark, "GATHER_RATIO", 0)
    p, x = _params(), _x(seed=2)
    seg = jnp.array([[1] * 7 + [2] * 12 + [0] * 4, [5] * 23])
    sel = _make(causal=causal).apply({"params": p}, x, segment_ids=seg, method="selection")
    assert int(sel.sum(-1).max()) <= 12  # no fallback: slots = 12 gathers every selection
    (_, y_r), g_r = _vg("reference", causal)(p, x, seg)
    (_, y_x), g_x = _vg("xla", causal, slots)(p, x, seg)
    h.close(y_x, y_r, what="output")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_r),
                            jax.tree_util.tree_leaves(g_x), strict=True):
        h.close(b, a, tol=1e-5, what=jax.tree_util.keystr(path))
    assert np.all(np.asarray(g_x[1])[0, 19:] == 0)  # padding gets no gradient


def test_packed_equals_separate():
    """Two segments packed in one row give each segment's output alone (the statistics and the
    selection run over the segment's own keys)."""
    p, x = _params(), _x(seed=4)
    seg = jnp.array([[1] * 10 + [2] * 13] * 2)
    (_, packed), _ = _vg("xla", True)(p, x, seg)
    run = jax.jit(_make("xla").apply)
    first = run({"params": p}, x[:, :10])
    second = run({"params": p}, x[:, 10:])
    h.close(packed[:, :10], first, what="segment 1")
    h.close(packed[:, 10:], second, what="segment 2")


def test_default_path_builds_no_t_by_t_array():
    """Forward and backward of the default path hold no array with two axes >= T / 2 (the
    predictor is scored in key tiles of block_k); the reference path does (the check can
    fail)."""
    t = 256
    x = _x(t=t, b=1)
    m = _make("auto", block_k=32)
    v = jax.jit(m.init)(jax.random.key(0), x)

    def grad(mm):
        return jax.grad(lambda v_, x_: mm.apply(v_, x_).sum(), argnums=(0, 1))

    for fn in (lambda v_, x_: m.apply(v_, x_), grad(m)):
        shapes = list(jaxpr_shapes(jax.make_jaxpr(fn)(v, x).jaxpr))
        bad = [s for s in shapes if sum(d >= t // 2 for d in s) >= 2]
        assert shapes and not bad, bad
    ref = m.clone(impl="reference")
    shapes = jaxpr_shapes(jax.make_jaxpr(lambda v_, x_: ref.apply(v_, x_))(v, x).jaxpr)
    assert any(sum(d >= t // 2 for d in s) >= 2 for s in shapes)


# ----------------------------------------------------------------------------- decode


def _dec(decode, **kw):
    return ah.SparkAttention(16, 2, top_k=3, predictor_dim=3, block_k=4, decode=decode, **kw)


def _dec_one_slot(decode):  # every query of 2+ keys overflows one slot: the masked fallback
    return _dec(decode, slots=1)


def test_decode_equals_prefill():
    """Full forward == token by token == chunks [3, 4, 2] then single steps (short chunks gather
    their selection), and == a 10-token chunk (streamed over the cache) then steps, a cache
    longer than the sequence; the masked fallback when a selection overflows the slots; the
    cache's bytes."""
    x = jax.random.normal(jax.random.key(5), (2, 13, 16))
    params = h.check_decode_equals_prefill(_dec, x, max_len=17)
    got, _ = h.decode_in_chunks(_dec, params, x, [10, 1, 2], 17)
    h.close(got, h.prefill(_dec, params, x), what="a long chunk")
    got, _ = h.decode_in_chunks(_dec_one_slot, params, x, [4, 4, 4, 1], 17)
    h.close(got, h.prefill(_dec, params, x), what="the masked fallback")
    h.check_cache_bytes(_dec, 2, 17, 16)


def test_a_decode_step_reads_only_its_selection():
    """A single-token step gathers (B, N, 1, slots) keys and values of the cache: the only
    arrays spanning the cache are the predictor scores and the selection (one row per query),
    and the gathered values are (slots)-wide."""
    m = _dec(True)
    v = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 40, 16)))
    x1 = jnp.ones((1, 1, 16))
    jaxpr = jax.make_jaxpr(lambda v_, x_: m.apply(v_, x_, mutable=["cache"]))(v, x1).jaxpr
    shapes = set(jaxpr_shapes(jaxpr))
    assert (1, 2, 1, 6, 8) in shapes  # gathered keys / values: 2 heads, 1 query, 6 slots


def test_decode_bf16_caches_float32_predictor_keys():
    m = ah.SparkAttention(16, 2, top_k=3, predictor_dim=3, decode=True, dtype=jnp.bfloat16)
    v = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 9, 16)))
    assert v["cache"]["predictor_key"].dtype == jnp.float32
    assert v["cache"]["predictor_key"].shape == (1, 9, 2, 3)
    assert m.cache_bytes(1, 9, jnp.bfloat16) == 2 * 9 * 16 * 2 + 4 + 9 * 2 * 3 * 4
    assert m.decode_reads(100) == 3 and m.decode_reads(2) == 2 and m.decode_scored(100) == 100
    assert m.num_slots == 6


def test_bad_config():
    with pytest.raises(ValueError, match=r"predictor_dim=0 must be >= 1"):
        _make(predictor_dim=0).init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match=r"decode=True needs causal=True"):
        _make(causal=False, decode=True).init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match=r"impl='pallas' is not an implementation of 'spark'"):
        _make(impl="pallas").init(jax.random.key(0), _x())


def test_auto_is_the_streamed_path_on_every_backend_and_precision_reaches_every_matmul():
    """``auto`` resolves to ``xla`` where the other sparse ops take a Pallas kernel (Spark has
    none), and ``precision`` reaches every product of the forward, the backward and a decode
    step (the gathering one and its masked fallback)."""
    for backend in ("cpu", "gpu", "tpu"):
        assert registry.resolve("spark", "auto", backend) == "xla"
    highest = (jax.lax.Precision.HIGHEST,) * 2
    m = _make(precision="highest", bias=True)
    x = _x(t=9)
    v = jax.jit(m.init)(jax.random.key(0), x)
    dec = ah.SparkAttention(D, 4, top_k=4, predictor_dim=3, precision="highest", decode=True)
    cache = jax.jit(dec.init)(jax.random.key(0), jnp.zeros((2, 12, D)))
    fns = [
        (lambda v_, x_: jax.grad(lambda a: m.apply(a, x_).sum())(v_), (v, x)),
        (lambda v_, x_: m.clone(impl="reference").apply(v_, x_), (v, x)),
        (lambda c, x_: dec.apply(c, x_[:, :1], mutable=["cache"]), (cache, x)),
    ]
    for fn, args in fns:
        dots = [e for e in jaxpr_eqns(jax.make_jaxpr(fn)(*args).jaxpr)
                if e.primitive.name == "dot_general"]
        assert dots and all(e.params["precision"] == highest for e in dots)

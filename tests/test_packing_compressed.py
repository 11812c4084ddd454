"""Packed sequences in HeavilyCompressedAttention, CompressedSparseAttention and DeltaAttention,
and CSA's in-module index losses.

A packed row equals each segment run alone when the segments start at multiples of the
compression rate / anchor stride; for any starts no output depends on another segment's
inputs (exactly zero gradient) and NaN in padding reaches nothing. CSA's ``index_loss="dense"``
equals attnhut's ``dsa_index_aux_loss`` on the aux arrays (value and gradients), ``"sparse"``
equals it less the teacher's entropy when the selection is every visible entry, and both
respect segments.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import jaxpr_shapes

import attnhut_jax as ah
from attnhut_jax import core

D = 16
MODULES = {
    "hca": lambda impl, **kw: ah.HeavilyCompressedAttention(
        D, 2, **({"compression_rate": 2, "window": 3} | kw), impl=impl),
    "csa": lambda impl, **kw: ah.CompressedSparseAttention(
        D, 2, **({"compression_rate": 2, "top_k": 2, "num_index_heads": 2, "index_dim": 4,
                  "window": 3} | kw), impl=impl),
    "delta": lambda impl, **kw: ah.DeltaAttention(
        D, 2, **({"window": 3, "sink": 2, "stride": 4} | kw), impl=impl),
}
# Two segments of 5 tokens (a partial last run for rate 2; ends off the stride), starting at 0
# and 8 (multiples of the rate and the stride), padding between them and at the tail.
ALIGNED = [1] * 5 + [0] * 3 + [2] * 5 + [0] * 3
# Arbitrary starts (not multiples of 2 or 4), a padding hole and a padding tail.
ARBITRARY = [1] * 3 + [2] * 6 + [0] * 2 + [3] * 5 + [2] * 1 + [0] * 2


def _variables(m, x):
    """Variables of ``m`` (initialised through its reference twin: no impl changes a variable,
    and the kernels then never run eagerly), with a non-zero sink."""
    params = nn.unbox(jax.jit(m.clone(impl="reference").init)(jax.random.key(1), x))["params"]
    if "sink" in params:  # attnhut initialises HCA's and CSA's sink to zeros: make it matter
        params = {**params, "sink": jax.random.normal(jax.random.key(2), params["sink"].shape)}
    return {"params": params}


def _x(t, b=1, key=0):
    return jax.random.normal(jax.random.key(key), (b, t, D))


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("name", list(MODULES))
def test_packed_rows(name, impl):
    """Aligned starts: the packed row equals each segment alone, and NaN in its padding changes
    no output. Arbitrary starts (every case but CSA on pallas, whose interpret-mode radix-select
    indexer compiles for tens of seconds per call): the gradient of one segment's outputs with
    respect to every other token's input (other segments, padding) is exactly zero, and non-zero
    within the segment."""
    m = MODULES[name](impl)
    seg, seg_any = jnp.array([ALIGNED]), jnp.array([ARBITRARY])
    x = _x(len(ALIGNED))
    x_any = _x(len(ARBITRARY), key=5)
    v = _variables(m, x)
    pad = jnp.asarray(np.array(ALIGNED) == 0)[None, :, None]
    grads = (name, impl) != ("csa", "pallas")

    @jax.jit
    def run(v, x, x_any):
        alone = m.apply(v, jnp.concatenate([x[:, 0:5], x[:, 8:13]]))  # each segment a row alone
        # the packed row, and the same row with NaN in its padding, as one batch
        packed = m.apply(v, jnp.concatenate([x, jnp.where(pad, jnp.nan, x)]),
                         segment_ids=jnp.concatenate([seg, seg]))
        if not grads:
            return alone, packed, None, None
        unpacked = m.apply(v, x)
        out, pull = jax.vjp(lambda x: m.apply(v, x, segment_ids=seg_any), x_any)
        ct = jax.random.normal(jax.random.key(3), out.shape)
        g = [pull(jnp.where(seg_any[..., None] == s, ct, 0.0))[0] for s in (1, 2, 3)]
        return alone, packed, unpacked, g

    alone, packed, unpacked, g = run(v, x, x_any)
    np.testing.assert_allclose(np.asarray(packed[0, 0:5]), np.asarray(alone[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed[0, 8:13]), np.asarray(alone[1]), atol=1e-5)
    assert np.all(np.isfinite(np.asarray(packed)))
    np.testing.assert_array_equal(np.asarray(packed[1]), np.asarray(packed[0]))
    if grads:
        # the check can fail: without segments the second run reads the first
        assert np.abs(np.asarray(unpacked[0, 8:13] - alone[1])).max() > 1e-4
        row = np.array(ARBITRARY)
        for s, g_s in zip((1, 2, 3), g, strict=True):
            g_s = np.abs(np.asarray(g_s[0])).max(axis=-1)
            assert np.all(g_s[row != s] == 0.0), (s, g_s)
            assert np.all(g_s[row == s] > 0.0), (s, g_s)


# ----------------------------------------------------------------------------- CSA index losses


def _loss_and_grads(m, v, x, loss_of):
    """(loss, d loss / d(params, x)) under jit."""
    return jax.jit(jax.value_and_grad(lambda p, x: loss_of(m, {"params": p}, x),
                                      argnums=(0, 1)))(v["params"], x)


def _assert_close(a, b, what):
    (la, ga), (lb, gb) = a, b
    np.testing.assert_allclose(float(la), float(lb), rtol=1e-5, atol=1e-6, err_msg=what)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(np.asarray(p), np.asarray(q), atol=1e-4,
                                                         rtol=1e-4, err_msg=what), ga, gb)


def _aux_dense(m, v, x, **kw):
    _, aux = m.apply(v, x, True, **kw)
    return ah.dsa_index_aux_loss(aux["index_scores"], aux["dense_weights"])


def _aux_entropy(m, v, x):
    """Mean over queries of the entropy of the normalised head-summed dense weights."""
    _, aux = m.apply(v, x, True)
    p = jax.lax.stop_gradient(aux["dense_weights"]).sum(axis=1)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-9)
    return -jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0).sum(-1).mean()


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_csa_dense_loss_is_dsa_index_aux_loss(impl):
    """``index_loss="dense"`` == ``dsa_index_aux_loss(aux["index_scores"], aux["dense_weights"])``,
    value and gradients with respect to every parameter and the input; T = 13 is not a multiple
    of the rate."""
    x = _x(13, b=2)
    m = MODULES["csa"](impl)
    v = _variables(m, x)
    want = _loss_and_grads(m, v, x, _aux_dense)
    _assert_close(_loss_and_grads(m, v, x, lambda m, v, x: m.apply(v, x, index_loss="dense")[1]),
                  want, "dense")
    # the gradient reaches the indexer, the entries' projections and the input
    for k in ("idx_q", "idx_k", "idx_w", "kv_a", "z_b", "q_down"):
        assert np.abs(np.asarray(jax.tree.leaves(want[1][0][k])[0])).max() > 0, k
    assert np.abs(np.asarray(want[1][1])).max() > 0


def test_csa_sparse_loss_over_every_visible_entry():
    """With one head and every visible entry selected, the sparse teacher (normalised over the
    selection) is the dense one, so ``"sparse"`` (a KL) == ``dsa_index_aux_loss`` (a
    cross-entropy) less the teacher's entropy, a constant: value and gradients."""
    x = _x(13, b=2)
    m = ah.CompressedSparseAttention(D, 1, compression_rate=2, top_k=16, num_index_heads=2,
                                     index_dim=4, window=3, impl="reference")  # top_k >= C = 7
    v = _variables(m, x)
    _assert_close(_loss_and_grads(m, v, x, lambda m, v, x: m.apply(v, x, True, index_loss="sparse")[2]
                                  + _aux_entropy(m, v, x)),
                  _loss_and_grads(m, v, x, _aux_dense), "sparse")


def test_csa_detach_index_input():
    """``detach_index_input=True``: the same loss, learnt by the indexer's own parameters only."""
    x = _x(13, b=2)
    m = MODULES["csa"]("xla", detach_index_input=True)
    v = _variables(m, x)
    loss, (gp, gx) = _loss_and_grads(m, v, x, lambda m, v, x: m.apply(v, x, index_loss="dense")[1])
    _assert_close((loss, (gp, gx)), _loss_and_grads(m, v, x, _aux_dense), "detached")
    np.testing.assert_allclose(float(loss), float(_aux_dense(m.clone(detach_index_input=False),
                                                             v, x)), rtol=1e-6)
    for k, sub in gp.items():
        moved = max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(sub))
        assert (moved > 0) == (k in ("idx_q", "idx_k", "idx_w")), (k, moved)
    assert np.all(np.asarray(gx) == 0)


def test_csa_losses_every_impl_agrees_with_the_reference():
    """The tiled losses of ``xla`` (both) and ``pallas`` (the sparse one, the only one that
    reads its selection) equal the reference's materialised ones, value and gradients."""
    x = _x(13, b=2)
    ref = MODULES["csa"]("reference")
    v = _variables(ref, x)
    for kind, impls in (("dense", ("xla",)), ("sparse", ("xla", "pallas"))):
        def loss(m, v, x, kind=kind):
            return m.apply(v, x, index_loss=kind)[1]
        want = _loss_and_grads(ref, v, x, loss)
        for impl in impls:
            _assert_close(_loss_and_grads(MODULES["csa"](impl), v, x, loss), want, f"{kind} {impl}")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_csa_losses_respect_segments(impl):
    """An aligned packed row's losses are the query-count-weighted means of each segment's
    losses alone, and NaN in its padding changes neither; the dense one is
    ``dsa_index_aux_loss`` of the (segment-masked) aux arrays rescaled to the non-padding
    queries."""
    layout = [1] * 7 + [0] * 1 + [2] * 4 + [0] * 2  # segments of 7 and 4 queries
    seg = jnp.array([layout])
    x = _x(len(layout))
    m = MODULES["csa"](impl)
    v = _variables(m, x)

    pad = (seg == 0)[..., None]
    both = jnp.concatenate([seg, seg])

    @jax.jit
    def losses(v, x):
        # the packed row twice, the second time with NaN in its padding: the same losses
        packed = [m.apply(v, jnp.concatenate([x, jnp.where(pad, jnp.nan, x)]), segment_ids=both,
                          index_loss=k)[1] for k in ("dense", "sparse")]
        alone = [[m.apply(v, xs, index_loss=k)[1] for xs in (x[:, 0:7], x[:, 8:12])]
                 for k in ("dense", "sparse")]
        return packed, alone

    packed, alone = losses(v, x)
    for kind, got, (a, b) in zip(("dense", "sparse"), packed, alone, strict=True):
        np.testing.assert_allclose(float(got), (7 * float(a) + 4 * float(b)) / 11, rtol=1e-5,
                                   err_msg=kind)
    if impl == "reference":
        return  # the rescaled aux loss is the reference's own materialised formula
    scale = len(layout) / 11  # dsa_index_aux_loss averages over every query, padding included
    _assert_close(
        _loss_and_grads(m, v, x, lambda m, v, x: m.apply(v, x, segment_ids=seg,
                                                         index_loss="dense")[1]),
        _loss_and_grads(m, v, x, lambda m, v, x: scale * _aux_dense(m, v, x, segment_ids=seg)),
        "dense with segments")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_csa_losses_build_no_sequence_by_entry_array(impl):
    t = 300  # C = T / 2 entries exceed every feature and tile width here
    m = ah.CompressedSparseAttention(32, 4, compression_rate=2, top_k=3, num_index_heads=2,
                                     index_dim=8, window=4, impl=impl)
    x = jnp.zeros((1, t, 32))
    seg = jnp.concatenate([jnp.ones((1, 170), jnp.int32), jnp.full((1, 130), 2, jnp.int32)], 1)
    v = jax.eval_shape(m.init, jax.random.key(0), x)

    def step(v, x):
        def f(v, x):
            out, l_dense = m.apply(v, x, segment_ids=seg, index_loss="dense")
            return out.sum() + l_dense + m.apply(v, x, segment_ids=seg, index_loss="sparse")[1]
        return jax.grad(f, argnums=(0, 1))(v, x)

    shapes = list(jaxpr_shapes(jax.make_jaxpr(step)(v, x).jaxpr))
    assert shapes
    bad = [s for s in shapes if sum(d >= t // 2 for d in s) >= 2]  # T x T and T x C alike
    assert not bad, bad
    # the check can fail: the reference path materialises (T, C) scores and weights
    ref = m.clone(impl="reference")
    ref_shapes = jaxpr_shapes(jax.make_jaxpr(
        lambda v, x: ref.apply(v, x, segment_ids=seg, index_loss="dense"))(v, x).jaxpr)
    assert any(sum(d >= t // 2 for d in s) >= 2 for s in ref_shapes)


def test_delta_counts_positions_per_segment():
    """Delta's sinks are each segment's first tokens, also for a segment that is not contiguous."""
    seg = jnp.array([[3, 3, 3, 1, 1, 0, 1, 3, 2, 2, 2, 2, 0]])
    np.testing.assert_array_equal(np.asarray(ah.delta.position_in_segment(seg)),
                                  [[0, 1, 2, 0, 1, 0, 2, 3, 0, 1, 2, 3, 1]])


def test_csa_aux_arrays_follow_the_segment_rule():
    m = MODULES["csa"]("auto")
    x = _x(len(ARBITRARY))
    v = _variables(m, x)
    seg = jnp.array([ARBITRARY])
    _, aux = jax.jit(lambda v, x: m.apply(v, x, True, segment_ids=seg))(v, x)
    e_seg = np.asarray(ARBITRARY)[::2]
    q_seg = np.asarray(ARBITRARY)
    foreign = (q_seg[:, None] != e_seg[None, :]) | (q_seg[:, None] == 0)
    assert not np.asarray(aux["selected"])[0][foreign].any()
    assert np.all(np.asarray(aux["dense_weights"])[0][:, foreign] == 0)
    assert np.all(np.asarray(aux["index_scores"])[0][foreign] == core.mask_value(jnp.float32))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("name", ["hca", "delta"])
def test_packed_default_paths_build_no_sequence_by_sequence_array(name, impl):
    t = 100  # larger than every feature width here (3 * 32 = 96)
    m = {"hca": ah.HeavilyCompressedAttention(32, 4, compression_rate=4, window=3, impl=impl),
         "delta": ah.DeltaAttention(32, 4, window=5, sink=2, stride=4, impl=impl)}[name]
    x = jnp.zeros((1, t, 32))
    seg = jnp.concatenate([jnp.ones((1, 60), jnp.int32), jnp.full((1, 40), 2, jnp.int32)], 1)
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v, x: jax.grad(
        lambda x: m.apply(v, x, segment_ids=seg).sum())(x))(v, x).jaxpr
    shapes = list(jaxpr_shapes(jaxpr))
    assert shapes
    bad = [s for s in shapes if sum(d >= t for d in s) >= 2]
    assert not bad, bad

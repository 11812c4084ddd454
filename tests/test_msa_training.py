"""MiniMaxSparseAttention in training: the index loss computed inside the module
(``index_loss="sparse"``, tiled over each query's picked blocks) and packed sequences
(``segment_ids`` / ``positions``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import jaxpr_shapes

import attnhut_jax as ah
from attnhut_jax import core
from attnhut_jax import minimax_sparse as msa


def make(impl="xla", **kw):
    kw = dict(dict(block_size=8, top_k=2), **kw)
    return ah.MiniMaxSparseAttention(32, 4, 2, impl=impl, **kw)


def setup(m, t=29, b=2, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, 32))
    params = nn.unbox(jax.jit(m.init)(jax.random.key(1), x))["params"]
    return params, x


def close_trees(a, b, **tol):
    jax.tree_util.tree_map(
        lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol), a, b)


def masked_mean_oracle(aux, seg_BT):
    """attnhut's ``msa_index_aux_loss`` written out on the materialised arrays, with the mean
    over non-padding (query, group) pairs."""
    b, n, t, s = aux["attn_weights"].shape
    kg = aux["index_scores"].shape[1]
    teacher = jax.lax.stop_gradient(aux["attn_weights"]).reshape(b, kg, n // kg, t, s).mean(2)
    scores = jnp.where(aux["keep"], aux["index_scores"], core.mask_value(jnp.float32))
    log_student = jax.nn.log_softmax(scores, axis=-1)
    kl = jnp.where(teacher > 0, teacher * (jnp.log(jnp.maximum(teacher, 1e-9)) - log_student), 0.0)
    w = (seg_BT != 0).astype(jnp.float32)[:, None, :]
    return (kl.sum(-1) * w).sum() / (kg * w.sum())


# --------------------------------------------------------------------------- the index loss


@pytest.mark.parametrize("causal,force,top_k", [(True, True, 2), (True, False, 9),
                                                (False, True, 9), (False, False, 2)])
def test_sparse_loss_equals_the_materialised_loss(causal, force, top_k, monkeypatch):
    """T=29 is not a multiple of block_size=8 (4 blocks): top_k 2 < 4 and 9 >= 4. The loss
    tiles hold 200 // (picks * 8) queries (8 or 5 here, or 7 and 6 without the forced block),
    so several tiles run and the last one is padded."""
    monkeypatch.setattr(msa, "_LOSS_TILE_KEYS", 200)
    m = make(causal=causal, force_current_block=force, top_k=top_k)
    params, x = setup(m)

    def tiled(p, x):
        return m.apply({"params": p}, x, index_loss="sparse")[1]

    def materialised(p, x):
        return ah.msa_index_aux_loss(**m.apply({"params": p}, x, return_aux=True)[1])

    l_t, g_t = jax.jit(jax.value_and_grad(tiled, argnums=(0, 1)))(params, x)
    l_m, g_m = jax.jit(jax.value_and_grad(materialised, argnums=(0, 1)))(params, x)
    assert float(l_m) > 0
    np.testing.assert_allclose(float(l_t), float(l_m), rtol=1e-5, atol=1e-5)
    close_trees(g_t, g_m, rtol=1e-4, atol=1e-4)
    # only the index branch learns from it; the input and the main branch get exactly nothing
    (g_p, g_x) = g_t
    assert not np.any(np.asarray(g_x))
    for name, g in g_p.items():
        moved = any(np.any(np.asarray(a)) for a in jax.tree_util.tree_leaves(g))
        assert moved == name.startswith("idx_"), name


def test_loss_path_output_impls_and_aux():
    m = make()
    params, x = setup(m)
    v = {"params": params}
    out = jax.jit(m.apply)(v, x)
    out_l, loss = jax.jit(lambda v, x: m.apply(v, x, index_loss="sparse"))(v, x)
    np.testing.assert_array_equal(np.asarray(out_l), np.asarray(out))  # same default path
    out_a, aux, loss_a = jax.jit(lambda v, x: m.apply(v, x, True, index_loss="sparse"))(v, x)
    np.testing.assert_allclose(float(loss_a), float(ah.msa_index_aux_loss(**aux)), rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(loss_a), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out_a), np.asarray(out), atol=1e-5)
    # impl="reference" computes the loss attnhut's materialised way (pallas: the tiled loss, as
    # xla; its output path is covered by test_block_sparse_modules and the packed tests here)
    o, lo = jax.jit(lambda v, x: make("reference").apply(v, x, index_loss="sparse"))(v, x)
    np.testing.assert_allclose(float(lo), float(loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(o), np.asarray(out), atol=2e-5)
    # jit == eager
    out_e, loss_e = m.apply(v, x, index_loss="sparse")
    np.testing.assert_allclose(float(loss_e), float(loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out_e), np.asarray(out), atol=1e-6)


def test_index_loss_values_are_checked():
    m = make()
    params, x = setup(m, t=8, b=1)
    with pytest.raises(ValueError, match="index_loss='dense' is not defined for MSA"):
        m.apply({"params": params}, x, index_loss="dense")
    with pytest.raises(ValueError, match=r"index_loss='kl' is not one of None, 'sparse'"):
        m.apply({"params": params}, x, index_loss="kl")
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(batch, seq\)=\(1, 8\)"):
        m.apply({"params": params}, x, segment_ids=jnp.ones((1, 7), jnp.int32))
    with pytest.raises(TypeError, match="positions must be an integer array"):
        m.apply({"params": params}, x, positions=jnp.zeros((1, 8)))


@pytest.mark.parametrize("impl", ["auto", "xla", "pallas"])
@pytest.mark.parametrize("packed", [False, True])
def test_loss_path_builds_no_sequence_by_sequence_array(impl, packed):
    t = 100  # larger than every feature width here (3 * 32 = 96)
    m = make(impl)
    x = jnp.zeros((1, t, 32))
    seg = jnp.ones((1, t), jnp.int32).at[0, 60:].set(2) if packed else None
    v = jax.eval_shape(m.init, jax.random.key(0), x)

    def step(v, x):
        def f(v, x):
            out, loss = m.apply(v, x, segment_ids=seg, index_loss="sparse")
            return out.sum() + loss
        return jax.grad(f, argnums=(0, 1))(v, x)

    shapes = list(jaxpr_shapes(jax.make_jaxpr(step)(v, x).jaxpr))
    assert shapes
    bad = [s for s in shapes if sum(d >= t for d in s) >= 2]
    assert not bad, bad


def test_tiled_loss_memory_is_linear_in_t():
    """The compiled gradient of ``sparse_index_loss`` at 4x the length needs at most 4x the
    temporary memory (a (T, T) or per-tile residual would need 16x)."""
    b, n, kg, h, bs, m = 1, 4, 2, 16, 16, 5

    def temp(t):
        q, k = jnp.zeros((b, t, n, h)), jnp.zeros((b, t, kg, h))
        qi, ki = jnp.zeros((b, t, kg, h)), jnp.zeros((b, t, h))
        idx = jnp.zeros((b, kg, t, m), jnp.int32)
        ok = jnp.ones((b, kg, t, m), bool)

        def f(qi, ki):
            return msa.sparse_index_loss(q, k, qi, ki, idx, ok, block_size=bs, causal=True,
                                         scale=0.25)
        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(qi, ki).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp(4096), temp(16384)
    assert large <= 4 * small, (small, large)


# --------------------------------------------------------------------------- packed sequences


def packed_row_layout():
    """Two rows of T=29: row 0 holds segments of 16 and 5 tokens (the last one short) and 8
    padding tokens, row 1 segments of 8 and 16 and 5 padding tokens; every segment starts at a
    multiple of block_size=8."""
    seg = np.zeros((2, 29), np.int32)
    seg[0, :16], seg[0, 16:21] = 1, 2
    seg[1, :8], seg[1, 8:24] = 3, 4
    spans = [(0, 0, 16), (0, 16, 21), (1, 0, 8), (1, 8, 24)]
    pos = np.zeros_like(seg)
    for r, a, z in spans:
        pos[r, a:z] = np.arange(z - a)
    return jnp.asarray(seg), jnp.asarray(pos), spans


@pytest.mark.parametrize("impl,causal", [("xla", True), ("pallas", True), ("reference", True),
                                         ("xla", False)])
def test_packed_row_equals_each_segment_alone(impl, causal):
    m = make(impl, causal=causal)
    seg, pos, spans = packed_row_layout()
    params, x = setup(m, t=29)
    v = {"params": params}
    # NaN in every padding input changes nothing
    x = jnp.where(seg[..., None] == 0, jnp.nan, x)
    out, loss = jax.jit(lambda v, x: m.apply(v, x, segment_ids=seg, positions=pos,
                                             index_loss="sparse"))(v, x)
    assert np.all(np.isfinite(np.asarray(out))) and np.isfinite(float(loss))
    alone = jax.jit(lambda v, x: m.apply(v, x, index_loss="sparse"))
    weighted = 0.0
    for r, a, z in spans:
        out_s, loss_s = alone(v, x[r:r + 1, a:z])
        np.testing.assert_allclose(np.asarray(out[r, a:z]), np.asarray(out_s[0]), atol=1e-5,
                                   err_msg=f"row {r} [{a}, {z})")
        weighted += float(loss_s) * (z - a)
    # the packed loss: the query-count-weighted mean of the per-segment losses
    np.testing.assert_allclose(float(loss), weighted / sum(z - a for _, a, z in spans), rtol=1e-5)


def arbitrary_segments():
    """Segments starting anywhere (0, 5, 19 and 3, 30), padding between and at the end."""
    seg = np.zeros((2, 37), np.int32)
    seg[0, :5], seg[0, 5:19], seg[0, 19:33] = 1, 2, 3
    seg[1, 3:30] = 4  # leading and trailing padding
    return jnp.asarray(seg)


@pytest.mark.parametrize("causal", [True, False])
def test_no_token_depends_on_another_segment(causal):
    seg = arbitrary_segments()
    sids = (1, 2, 3, 4)
    outs = {}
    impls = ("xla", "pallas", "reference") if causal else ("xla", "reference")
    for impl in impls:
        m = make(impl, causal=causal, top_k=3)
        params, x = setup(m, t=37)

        def run(p, x, m=m):
            out, vjp = jax.vjp(lambda x: m.apply({"params": p}, x, segment_ids=seg), x)
            if m.impl != "xla":
                return out, None
            # the gradient of each segment's outputs with respect to the input, one per segment
            cts = jnp.stack([jnp.where((seg == i)[..., None], 1.0, 0.0) * jnp.ones_like(out)
                             for i in sids])
            return out, jax.vmap(lambda ct: vjp(ct)[0])(cts)

        outs[impl], g_x = jax.jit(run)(params, x)
        if g_x is None:
            continue
        for i, g in zip(sids, np.asarray(g_x), strict=True):
            assert np.any(g[np.asarray(seg == i)])
            np.testing.assert_array_equal(g[np.asarray(seg != i)], 0.0, err_msg=f"segment {i}")
    for impl in impls[1:]:
        np.testing.assert_allclose(np.asarray(outs[impl]), np.asarray(outs["xla"]), atol=2e-5,
                                   err_msg=impl)


@pytest.mark.parametrize("causal,force", [(True, True), (False, False)])
def test_packed_loss_equals_the_masked_mean_oracle(causal, force, monkeypatch):
    """Arbitrary starts: the tiled loss (in tiles of 200 // (picks * 8) queries), its gradients,
    and the return_aux arrays (built with the segment rule) against the masked-mean oracle."""
    monkeypatch.setattr(msa, "_LOSS_TILE_KEYS", 200)
    m = make(causal=causal, force_current_block=force, top_k=2)
    seg = arbitrary_segments()
    pos = jnp.maximum(jnp.arange(37)[None] - jnp.array([[0], [3]]), 0)
    params, x = setup(m, t=37)

    def tiled(p, x):
        return m.apply({"params": p}, x, segment_ids=seg, positions=pos, index_loss="sparse")[1]

    def oracle(p, x):
        _, aux = m.apply({"params": p}, x, True, segment_ids=seg, positions=pos)
        return masked_mean_oracle(aux, seg)

    def aux_path(p, x):
        _, aux, loss = m.apply({"params": p}, x, True, segment_ids=seg, positions=pos,
                               index_loss="sparse")
        return loss, aux

    l_t, g_t = jax.jit(jax.value_and_grad(tiled))(params, x)
    l_o, g_o = jax.jit(jax.value_and_grad(oracle))(params, x)
    np.testing.assert_allclose(float(l_t), float(l_o), rtol=1e-5, atol=1e-5)
    close_trees(g_t, g_o, rtol=1e-4, atol=1e-4)
    l_a, aux = jax.jit(aux_path)(params, x)
    np.testing.assert_allclose(float(l_a), float(l_o), rtol=1e-6)
    # the aux arrays obey the segment rule
    cross = ~np.asarray(core.segment_keep(seg, seg))
    assert not np.any(np.asarray(aux["keep"]) & cross)
    assert not np.any(np.asarray(aux["attn_weights"]) * cross)

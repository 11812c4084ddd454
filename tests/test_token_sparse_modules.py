"""DeepSeek Sparse and Compressed Sparse attention on the token-sparse seam: every ``impl``
selects the same keys and gives the same outputs and gradients; the default path builds no
(T, T) array."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import jaxpr_shapes

import attnhut_jax as ah
from attnhut_jax import core, registry

D = 32
MODULES = {
    "dsa": lambda impl, **kw: ah.DeepSeekSparseAttention(
        D, 4, **({"top_k": 5, "num_index_heads": 2, "index_head_dim": 8} | kw), impl=impl),
    "csa": lambda impl, **kw: ah.CompressedSparseAttention(
        D, 4, **({"compression_rate": 2, "top_k": 3, "num_index_heads": 2, "index_dim": 8,
                  "window": 4} | kw), impl=impl),
}
CONFIGS = [  # (module, extra fields, T, impls besides the reference); T = 29 is not a
    # multiple of any tile. (top_k = 1 and T <= rate run through the default path in the torch
    # parity tests of test_sparse.py and test_compressed.py.)
    ("dsa", {}, 29, ("xla", "pallas")),
    ("dsa", {"causal": False, "bias": True, "top_k": 64}, 13, ("xla",)),  # bidir, top_k >= T
    ("csa", {}, 21, ("xla", "pallas")),
    ("csa", {"window": 100, "top_k": 16}, 9, ("xla",)),  # window > T, top_k >= entries
]


def _loss(m):
    return lambda p, x: (m.apply({"params": p}, x) ** 2).sum()


@pytest.mark.parametrize("name,kw,t,impls", CONFIGS,
                         ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}-T{t}"
                              for n, kw, t, _ in CONFIGS])
def test_impls_agree_on_outputs_and_gradients(name, kw, t, impls):
    x = jax.random.normal(jax.random.key(0), (2, t, D))
    ref_m = MODULES[name]("reference", **kw)
    params = nn.unbox(jax.jit(ref_m.init)(jax.random.key(1), x))["params"]
    if name == "csa":  # attnhut initialises the sink to zeros: make it matter
        params = {**params, "sink": jax.random.normal(jax.random.key(2), (4,))}
    l_ref, g_ref = jax.jit(jax.value_and_grad(_loss(ref_m), argnums=(0, 1)))(params, x)
    for impl in impls:
        m = MODULES[name](impl, **kw)
        l_imp, g_imp = jax.jit(jax.value_and_grad(_loss(m), argnums=(0, 1)))(params, x)
        np.testing.assert_allclose(float(l_imp), float(l_ref), rtol=1e-5, err_msg=impl)
        jax.tree_util.tree_map(
            lambda a, b, impl=impl: np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4, err_msg=impl), g_imp, g_ref)
        # the indexer is trained by the aux loss only, on every path
        g_idx = g_imp[0]["indexer"] if name == "dsa" else {k: g_imp[0][k]
                                                           for k in ("idx_q", "idx_k", "idx_w")}
        assert all(np.all(np.asarray(a) == 0) for a in jax.tree_util.tree_leaves(g_idx))


def _selected_indices(name, mod, x, impl):
    """The indexer top-k of ``mod`` (a bound DSA or CSA) under the registry's ``impl``."""
    if name == "dsa":
        q, k, w = mod.indexer.project(x)
        return core.indexer_topk(q, k, w, mod.top_k, causal=mod.causal, impl=impl)[0]
    comp = ah.compressed.compress_overlap(mod.kv_a(x), mod.kv_b(x), mod.z_a(x), mod.z_b(x),
                                          mod.bias_a, mod.bias_b, mod.compression_rate)
    c, t = comp.shape[1], x.shape[1]
    qi = mod.idx_q(mod.q_down(x)).reshape(*x.shape[:2], mod.num_index_heads, -1)
    return core.indexer_topk(qi, mod.idx_k(comp), mod.idx_w(x), mod.top_k, causal=True,
                             impl=impl, q_pos_T=jnp.arange(t),
                             k_pos_S=(jnp.arange(c) + 1) * mod.compression_rate)[0]


def _as_mask(idx_BTM, shape):
    sel = np.zeros(shape, bool)
    for b, t, j in np.ndindex(*idx_BTM.shape):
        if idx_BTM[b, t, j] >= 0:
            sel[b, t, idx_BTM[b, t, j]] = True
    return sel


@pytest.mark.selections
@pytest.mark.parametrize("selector_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(MODULES))
def test_bfloat16_every_impl_selects_the_same_keys(name, selector_dtype):
    """A bf16 module (and a bf16 selector) ranks in float32 on every path: the aux selection (which
    the reference path also attends) is the fused top-k's of every impl."""
    # long enough (T = 160, 32-wide index heads) that bf16 products summed in bf16 would reorder
    # near-tied scores: an impl that ranked such sums would fail here
    m = MODULES[name]("auto", top_k=16, dtype=jnp.bfloat16, selector_dtype=selector_dtype,
                      index_head_dim=32) if name == "dsa" else MODULES[name](
        "auto", top_k=16, dtype=jnp.bfloat16, selector_dtype=selector_dtype, index_dim=32)
    x = jax.random.normal(jax.random.key(3), (2, 160, D))
    v = jax.jit(m.init)(jax.random.key(1), x)
    _, aux = jax.jit(lambda v, x: m.apply(v, x, return_aux=True))(v, x)
    assert aux["index_scores"].dtype == jnp.float32
    want = np.asarray(aux["selected"])
    for impl in ("reference", "xla", "pallas"):
        idx = jax.jit(lambda v, x, impl=impl: m.apply(
            v, x, method=lambda mod, x: _selected_indices(name, mod, x, impl)))(v, x)
        np.testing.assert_array_equal(_as_mask(np.asarray(idx), want.shape), want, err_msg=impl)


@pytest.mark.selections
def test_bfloat16_dsa_selects_what_float32_selects():
    """The selector stays float32 under ``dtype=jnp.bfloat16``: same keys as a float32 module
    (CSA's indexer reads the bf16 query latent and entries, so only DSA's is exact)."""
    m32 = MODULES["dsa"]("xla", top_k=4)
    x = jax.random.normal(jax.random.key(4), (2, 40, D))
    v = jax.jit(m32.init)(jax.random.key(1), x)
    sel32 = jax.jit(lambda v, x: m32.apply(v, x, return_aux=True)[1]["selected"])(v, x)
    m16 = MODULES["dsa"]("xla", top_k=4, dtype=jnp.bfloat16)
    sel16 = jax.jit(lambda v, x: m16.apply(v, x, return_aux=True)[1]["selected"])(v, x)
    np.testing.assert_array_equal(np.asarray(sel16), np.asarray(sel32))


@pytest.mark.selections
@pytest.mark.parametrize("name", list(MODULES))
def test_default_selection_equals_the_aux_selection(name):
    """The fused top-k (default path) picks the keys that ``return_aux`` reports."""
    m = MODULES[name]("xla")
    x = jax.random.normal(jax.random.key(3), (2, 17, D))
    v = jax.jit(m.init)(jax.random.key(1), x)
    out_aux, aux = jax.jit(lambda v, x: m.apply(v, x, return_aux=True))(v, x)

    def fused(mod, x):
        if name == "dsa":
            q, k, w = mod.indexer.project(x)
            return core.indexer_topk(q, k, w, mod.top_k, causal=mod.causal, impl="xla")[0]
        comp = ah.compressed.compress_overlap(mod.kv_a(x), mod.kv_b(x), mod.z_a(x), mod.z_b(x),
                                              mod.bias_a, mod.bias_b, mod.compression_rate)
        c, t = comp.shape[1], x.shape[1]
        qi = mod.idx_q(mod.q_down(x)).reshape(*x.shape[:2], mod.num_index_heads, -1)
        return core.indexer_topk(qi, mod.idx_k(comp), mod.idx_w(x), mod.top_k, causal=True,
                                 impl="xla", q_pos_T=jnp.arange(t),
                                 k_pos_S=(jnp.arange(c) + 1) * mod.compression_rate)[0]

    idx = np.asarray(jax.jit(lambda v, x: m.apply(v, x, method=fused))(v, x))
    sel = np.zeros(np.asarray(aux["selected"]).shape, bool)
    for b, t, j in np.ndindex(*idx.shape):
        if idx[b, t, j] >= 0:
            sel[b, t, idx[b, t, j]] = True
    np.testing.assert_array_equal(sel, np.asarray(aux["selected"]))
    np.testing.assert_allclose(np.asarray(jax.jit(m.apply)(v, x)), np.asarray(out_aux),
                               atol=1e-6)


def test_auto_is_xla_on_cpu_and_variables_do_not_depend_on_impl():
    for op in ("dsa", "csa", "token_sparse", "indexer_topk"):
        assert registry.resolve(op, "auto") == ("pallas" if jax.default_backend() in ("gpu", "tpu")
                                                else "xla")
    x = jnp.zeros((1, 5, D))
    for name in MODULES:
        # same names, shapes, dtypes and logical axes for every impl ...
        trees = [jax.eval_shape(MODULES[name](impl).init, jax.random.key(0), x)
                 for impl in ("auto", "reference", "xla", "pallas")]
        for tree in trees[1:]:
            assert tree == trees[0]
        # ... and the same values (initialisers do not see the impl)
        a, b = (jax.jit(MODULES[name](impl).init)(jax.random.key(0), x)
                for impl in ("reference", "xla"))
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_default_paths_build_no_sequence_by_sequence_array(name, impl):
    t = 300  # T / 2 (the CSA entry count C) exceeds every feature and tile width here
    m = MODULES[name](impl)
    x = jnp.zeros((1, t, D))
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v, x: jax.grad(lambda x: m.apply(v, x).sum())(x))(v, x).jaxpr
    shapes = list(jaxpr_shapes(jaxpr))
    assert shapes
    bad = [s for s in shapes if sum(d >= t // 2 for d in s) >= 2]  # T x T and T x C alike
    assert not bad, bad
    # the check can fail: the reference path builds (T, T) masks and scores
    ref = MODULES[name]("reference")
    ref_shapes = jaxpr_shapes(jax.make_jaxpr(lambda v, x: ref.apply(v, x))(v, x).jaxpr)
    assert any(sum(d >= t // 2 for d in s) >= 2 for s in ref_shapes)


@pytest.mark.selections
@pytest.mark.parametrize("name", ["dsa", "csa", "msa"])
def test_eager_and_jit_select_the_same_keys(name):
    """The selection (``aux``) of one module is the same program's choice eagerly and under jit,
    in float32 and with a bfloat16 module (rerun at XLA's default optimisation level)."""
    for dtype in (jnp.float32, jnp.bfloat16):
        if name == "msa":
            m, key = ah.MiniMaxSparseAttention(D, 4, 2, block_size=4, top_k=2, dtype=dtype), "keep"
        else:
            m, key = MODULES[name]("auto", dtype=dtype), "selected"
        x = jax.random.normal(jax.random.key(4), (2, 37, D))
        v = jax.jit(m.init)(jax.random.key(1), x)
        eager = m.apply(v, x, return_aux=True)[1][key]
        jitted = jax.jit(lambda v, x, m=m, key=key: m.apply(v, x, return_aux=True)[1][key])(v, x)
        np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted), err_msg=str(dtype))

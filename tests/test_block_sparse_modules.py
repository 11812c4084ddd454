"""Modules on the block-sparse seam: every ``impl`` gives the same outputs and gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import jaxpr_shapes

import attnhut_jax as ah

MODULES = {
    "msa": lambda impl: ah.MiniMaxSparseAttention(32, 4, 2, block_size=8, top_k=2, impl=impl),
    "msa_bidir": lambda impl: ah.MiniMaxSparseAttention(32, 4, 1, block_size=8, top_k=1,
                                                        causal=False, impl=impl),
    "msa_topk_over_blocks": lambda impl: ah.MiniMaxSparseAttention(32, 4, 4, block_size=8,
                                                                   top_k=9, impl=impl),
    "bigbird": lambda impl: ah.BigBirdAttention(32, 4, block_size=8, num_window_blocks=1,
                                                num_random_blocks=1, num_global_blocks=1,
                                                impl=impl),
    "bigbird_causal": lambda impl: ah.BigBirdAttention(32, 4, block_size=4, causal=True,
                                                       impl=impl),
    "delta": lambda impl: ah.DeltaAttention(32, 4, window=5, sink=2, stride=4, impl=impl),
    "hca": lambda impl: ah.HeavilyCompressedAttention(32, 4, compression_rate=4, window=3,
                                                      impl=impl),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_impls_agree_on_outputs_and_gradients(name):
    x = jax.random.normal(jax.random.key(0), (2, 29, 32))
    ref_m = MODULES[name]("reference")
    v = jax.jit(ref_m.init)(jax.random.key(1), x)
    params = nn.unbox(v)["params"]

    def loss_and_out(m):
        def f(p, x):
            out = m.apply({"params": p}, x)
            return (out ** 2).sum(), out
        # loss, output and gradients in one jit per impl (eager dispatch is far slower on CPU)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (l_ref, out_ref), g_ref = loss_and_out(ref_m)(params, x)
    # the kernel in interpret mode on the four mechanisms; their variants on the XLA path (the
    # kernel-level tests cover every rule for both)
    for impl in ("pallas", "xla") if name in ("msa", "bigbird", "delta", "hca") else ("xla",):
        m = MODULES[name](impl)
        (l_imp, out_imp), g_imp = loss_and_out(m)(params, x)
        np.testing.assert_allclose(float(l_imp), float(l_ref), rtol=1e-5, err_msg=impl)
        np.testing.assert_allclose(np.asarray(out_imp), np.asarray(out_ref), atol=2e-5,
                                   err_msg=impl)
        jax.tree_util.tree_map(
            lambda a, b, impl=impl: np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4, err_msg=impl), g_imp, g_ref)
    # auto picks one of the two and agrees as well
    np.testing.assert_allclose(np.asarray(jax.jit(MODULES[name]("auto").apply)(v, x)),
                               np.asarray(out_ref), atol=2e-5)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_bigbird_key_padding_through_the_kernel(impl):
    x = jax.random.normal(jax.random.key(0), (2, 21, 32))
    kpm = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 21)).at[1].set(False)
    ref_m, imp_m = MODULES["bigbird"]("reference"), MODULES["bigbird"](impl)
    v = jax.jit(ref_m.init)(jax.random.key(1), x)
    np.testing.assert_allclose(np.asarray(jax.jit(imp_m.apply)(v, x, kpm)),
                               np.asarray(jax.jit(ref_m.apply)(v, x, kpm)), atol=2e-5)


@pytest.mark.selections
def test_msa_aux_path_agrees_with_default_path():
    m = MODULES["msa"]("reference")
    x = jax.random.normal(jax.random.key(0), (2, 29, 32))
    v = jax.jit(m.init)(jax.random.key(1), x)
    out, _ = jax.jit(lambda v, x: m.apply(v, x, return_aux=True))(v, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(m.apply)(v, x)), atol=1e-6)


@pytest.mark.parametrize("name", ["msa", "bigbird", "delta", "hca"])
@pytest.mark.parametrize("impl", ["auto", "pallas", "xla"])
def test_default_paths_build_no_sequence_by_sequence_array(name, impl):
    t = 100  # larger than every feature width in these modules (3 * 32 = 96)
    m = MODULES[name](impl)
    x = jnp.zeros((1, t, 32))
    v = jax.eval_shape(m.init, jax.random.key(0), x)  # shapes suffice for tracing
    jaxpr = jax.make_jaxpr(lambda v, x: jax.grad(lambda x: m.apply(v, x).sum())(x))(v, x).jaxpr
    shapes = list(jaxpr_shapes(jaxpr))
    assert shapes
    bad = [s for s in shapes if sum(d >= t for d in s) >= 2]
    assert not bad, bad


def test_the_jaxpr_check_can_fail():
    m = MODULES["msa"]("reference")
    x = jnp.zeros((1, 100, 32))
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    shapes = jaxpr_shapes(jax.make_jaxpr(lambda v, x: m.apply(v, x))(v, x).jaxpr)
    assert any(sum(d >= 100 for d in s) >= 2 for s in shapes)


@pytest.mark.selections
def test_bfloat16_msa_selects_the_blocks_float32_selects():
    """MSA's index branch runs in ``selector_dtype`` (float32) under ``dtype=jnp.bfloat16``: the
    same blocks as a float32 module, on the aux path and on the default path (whose selection
    equals the aux one, so comparing outputs of a bf16 and a bf16-selector module would not
    isolate it: compare the block scores the default path ranks)."""
    kw = dict(block_size=4, top_k=2)
    m32 = ah.MiniMaxSparseAttention(32, 4, 2, **kw)
    m16 = ah.MiniMaxSparseAttention(32, 4, 2, dtype=jnp.bfloat16, **kw)
    x = jax.random.normal(jax.random.key(5), (2, 48, 32))
    v = jax.jit(m32.init)(jax.random.key(1), x)
    keep32 = jax.jit(lambda v, x: m32.apply(v, x, return_aux=True)[1]["keep"])(v, x)
    keep16 = jax.jit(lambda v, x: m16.apply(v, x, return_aux=True)[1]["keep"])(v, x)
    np.testing.assert_array_equal(np.asarray(keep16), np.asarray(keep32))
    # a bf16 selector is a real choice: it is what the module used to do, and it moves blocks
    m16_16 = ah.MiniMaxSparseAttention(32, 4, 2, dtype=jnp.bfloat16, selector_dtype=jnp.bfloat16,
                                       **kw)
    s16 = jax.jit(lambda v, x: m16_16.apply(v, x, return_aux=True)[1]["index_scores"])(v, x)
    s32 = jax.jit(lambda v, x: m32.apply(v, x, return_aux=True)[1]["index_scores"])(v, x)
    assert s16.dtype == s32.dtype == jnp.float32
    assert not np.array_equal(np.asarray(s16), np.asarray(s32))

"""Every mechanism under float64 (``jax_enable_x64`` only inside the test) and wrapped for Flax NNX
with ``nnx.bridge.ToNNX`` + ``nnx.bridge.lazy_init``, as the NNX docs show."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnhut_jax as ah

D = 32

# name -> (module factory taking extra fields, input shape, extra apply arguments)
MECHANISMS = {
    "standard": (lambda **kw: ah.StandardAttention(D, 4, causal=True, **kw), (2, 12, D)),
    "mqa": (lambda **kw: ah.MultiQueryAttention(D, 4, causal=True, **kw), (2, 12, D)),
    "gqa": (lambda **kw: ah.GroupedQueryAttention(D, 4, 2, causal=True, **kw), (2, 12, D)),
    "mla": (lambda **kw: ah.MultiHeadLatentAttention(D, 4, **kw), (2, 12, D)),
    "gqa_options": (lambda **kw: ah.GroupedQueryAttention(
        D, 4, 2, causal=True, head_dim=6, qk_norm=True, output_gate=True, rope_theta=100.0,
        rope_dim=4, window=5, num_sink_logits=4, num_sink_tokens=2, **kw), (2, 12, D)),
    "mla_v32": (lambda **kw: ah.MultiHeadLatentAttention(
        D, 4, q_lora_rank=12, rope_style="interleaved", index_top_k=4, index_num_heads=2,
        index_head_dim=8, **kw), (2, 12, D)),
    "differential": (lambda **kw: ah.DifferentialAttention(D, 2, **kw), (2, 12, D)),
    "slot": (lambda **kw: ah.SlotAttention(D, 3, hidden_dim=16, **kw), (2, 12, D)),
    "bigbird": (lambda **kw: ah.BigBirdAttention(D, 4, block_size=4, **kw), (2, 12, D)),
    "sinkhorn": (lambda **kw: ah.SinkhornAttention(D, 4, 4, causal=True, max_len=12, **kw),
                 (2, 12, D)),
    "delta": (lambda **kw: ah.DeltaAttention(D, 4, window=4, sink=1, stride=3, **kw), (2, 12, D)),
    "dsa": (lambda **kw: ah.DeepSeekSparseAttention(D, 4, top_k=4, index_head_dim=8, **kw),
            (2, 12, D)),
    "msa": (lambda **kw: ah.MiniMaxSparseAttention(D, 4, 2, block_size=4, top_k=2, **kw),
            (2, 12, D)),
    "hca": (lambda **kw: ah.HeavilyCompressedAttention(D, 4, compression_rate=4, window=4, **kw),
            (2, 12, D)),
    "csa": (lambda **kw: ah.CompressedSparseAttention(D, 4, compression_rate=2, top_k=3,
                                                      window=4, index_dim=8, **kw), (2, 12, D)),
    "strided": (lambda **kw: ah.StridedSparseAttention(D, 4, stride=3, **kw), (2, 12, D)),
    "fixed": (lambda **kw: ah.FixedSparseAttention(D, 4, block_size=4, num_summary=2,
                                                   combine="interleaved", **kw), (2, 12, D)),
    "cjepa": (lambda **kw: ah.CausalJEPAAttention(D, 4, num_slots=3, history_frames=2, depth=1,
                                                  **kw), (2, 2, 3, D)),
    "gated_deltanet": (lambda **kw: ah.GatedDeltaNet(D, 2, 4, 8, 4, **kw), (2, 12, D)),
    "kimi_delta": (lambda **kw: ah.KimiDeltaAttention(D, 2, 8, **kw), (2, 12, D)),
    "linear": (lambda **kw: ah.LinearAttention(D, 4, **kw), (2, 12, D)),
    "spark": (lambda **kw: ah.SparkAttention(D, 4, top_k=4, predictor_dim=3, block_k=8, **kw),
              (2, 12, D)),
    # the exported sub-modules
    "lightning_indexer": (lambda **kw: ah.LightningIndexer(D, 2, 8, **kw), (2, 12, D)),
    "grouped_output": (lambda **kw: ah.GroupedOutputProjection(4, 8, 2, D, **kw), (2, 12, 4, 8)),
}


def _call_args(name, x):
    """Positional arguments after ``x`` that make the call deterministic."""
    if name == "slot":
        noise = jax.random.normal(jax.random.key(5), (x.shape[0], 3, D), jnp.float32)
        return (noise.astype(x.dtype),)
    if name == "cjepa":
        return (jnp.array([1]),)
    return ()


def _output(name, y):
    return y[0] if name == "cjepa" else y


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_float64_forward_and_grad(name):
    factory, shape = MECHANISMS[name]
    x32 = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    mod32 = factory()
    # float32 init and output under jit: one compiled program each, not every op dispatched
    v32 = jax.jit(mod32.init)(jax.random.key(0), x32, *_call_args(name, x32))
    y32 = jax.jit(lambda v, x: _output(name, mod32.apply(v, x, *_call_args(name, x))))(v32, x32)
    with jax.enable_x64(True):
        mod = factory(param_dtype=jnp.float64)
        x = x32.astype(jnp.float64)
        v = jax.tree.map(lambda a: a.astype(jnp.float64), v32)

        def loss(v, x):  # the output and the gradient from one compiled program
            y = _output(name, mod.apply(v, x, *_call_args(name, x)))
            return jnp.sum(y.astype(jnp.float64) ** 2), y

        (g_v, g_x), y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(v, x)
        # the indexer's scores are what selectors rank: float32 by contract, as on every impl
        assert y.dtype == (jnp.float32 if name == "lightning_indexer" else jnp.float64)
        assert g_x.dtype == jnp.float64
        assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves((g_v, g_x)))
        # the same module in float64 computes the float32 numbers, more exactly
        np.testing.assert_allclose(np.asarray(y), np.asarray(y32), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_nnx_bridge_wraps_every_module(name):
    factory, shape = MECHANISMS[name]
    lin = factory()
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    args = _call_args(name, x)
    model = nnx.bridge.ToNNX(lin, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, x, *args)
    y = _output(name, model(x, *args))
    # the NNX module holds the linen parameters under the same names, logical axes kept as
    # metadata, and computes what linen computes with them
    params = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    np.testing.assert_array_equal(np.asarray(y),
                                  np.asarray(_output(name, lin.apply({"params": pure}, x, *args))))
    linen_shapes = jax.eval_shape(lin.init, jax.random.key(0), x, *args)["params"]
    assert jax.tree.structure(jax.tree.map(lambda a: a.shape, pure)) == jax.tree.structure(
        jax.tree.map(lambda a: a.shape, nn.unbox(linen_shapes)))
    some = jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, nnx.Variable))[0]
    assert some.get_metadata().get("out_sharding") is not None

"""Behaviour of every mechanism beyond parity: causality, jit, dtypes, masks, dropout, axes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah


@dataclasses.dataclass(frozen=True)
class Mech:
    make: Callable[..., nn.Module]
    causal: bool = False
    mask: bool = True  # __call__ takes attn_mask
    dropout: bool = False
    slots: bool = False


MECHS = {
    "standard": Mech(lambda **kw: ah.StandardAttention(32, 4, causal=True, **kw), True,
                     dropout=True),
    "standard_bidir": Mech(lambda **kw: ah.StandardAttention(32, 4, bias=True, **kw)),
    "mqa": Mech(lambda **kw: ah.MultiQueryAttention(32, 4, causal=True, **kw), True, dropout=True),
    "gqa": Mech(lambda **kw: ah.GroupedQueryAttention(32, 4, 2, causal=True, **kw), True,
                dropout=True),
    "mla": Mech(lambda **kw: ah.MultiHeadLatentAttention(32, 4, **kw), True),
    "differential": Mech(lambda **kw: ah.DifferentialAttention(32, 2, **kw), True, mask=False),
    "slot": Mech(lambda **kw: ah.SlotAttention(32, 3, **kw), mask=False, slots=True),
}
SEQ = ["standard", "standard_bidir", "mqa", "gqa", "mla", "differential"]


def _x(shape=(2, 7, 32), dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _init(mech: Mech, x, **kw):
    m = mech.make(**kw)
    rngs = {"params": jax.random.key(1), "slots": jax.random.key(2)}
    return m, jax.jit(m.init)(rngs, x)


def _apply(m, v, x, **kw):
    return m.apply(v, x, rngs={"slots": jax.random.key(3)}, **kw)


@pytest.mark.parametrize("name", list(MECHS))
def test_bfloat16_compute_over_float32_params_stays_finite(name):
    """Mixed precision (float32 parameters, bfloat16 compute) with large logits; bfloat16
    parameters are test_behaviour.py's test_bfloat16_within_stated_tolerance_of_float32."""
    mech = MECHS[name]
    x = _x(dtype=jnp.bfloat16) * 30.0  # large logits
    m, v = _init(mech, x, dtype=jnp.bfloat16, param_dtype=jnp.float32)

    def loss(x_):
        y = _apply(m, v, x_)
        return y.astype(jnp.float32).sum(), y

    # output and input gradient from one jit (jit == eager is tested in test_jit_equals_eager)
    (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    assert y.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", [k for k in SEQ if MECHS[k].mask])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_without_visible_key_give_zeros_and_finite_grads(name, dtype):
    mech = MECHS[name]
    x = _x(dtype=dtype)
    m, v = _init(mech, x)
    mask = jnp.ones((2, 1, 7, 7), bool).at[:, :, 2].set(False)

    def loss(x_):
        y = _apply(m, v, x_, attn_mask=mask)
        return y.astype(jnp.float32).sum(), y

    # output and input gradient from one compiled program
    (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    # an empty row yields zeros before the output projection: only proj's bias remains
    proj = nn.unbox(v)["params"]["proj"]
    expect = proj["bias"] if "bias" in proj else jnp.zeros(32)
    np.testing.assert_allclose(np.asarray(y[:, 2], np.float32),
                               np.broadcast_to(np.asarray(expect, np.float32), (2, 32)),
                               atol=1e-6)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", [k for k in SEQ if MECHS[k].mask])
def test_boolean_and_additive_masks_agree(name):
    m, v = _init(MECHS[name], _x())
    x = _x()
    keep = jax.random.bernoulli(jax.random.key(9), 0.5, (2, 1, 7, 7)).at[:, :, :, 0].set(True)
    additive = jnp.where(keep, 0.0, -jnp.inf)
    per_head = jnp.broadcast_to(keep, (2, 4, 7, 7))
    y_bool, y_add, y_head = jax.jit(lambda v, x: [  # one compiled program
        _apply(m, v, x, attn_mask=mask) for mask in (keep, additive, per_head)])(v, x)
    np.testing.assert_allclose(np.asarray(y_bool), np.asarray(y_add), atol=1e-6)
    # a per-head (B, N, T, T) mask is accepted too
    np.testing.assert_allclose(np.asarray(y_head), np.asarray(y_bool), atol=1e-6)


@pytest.mark.parametrize("name", [k for k, m in MECHS.items() if m.dropout])
def test_attention_dropout_uses_the_dropout_stream(name):
    mech = MECHS[name]
    x = _x()
    m, v = _init(mech, x, dropout=0.5)
    base = _apply(m, v, x)
    np.testing.assert_allclose(np.asarray(base), np.asarray(_apply(m, v, x, deterministic=True)))
    m0, _ = _init(mech, x, dropout=0.0)
    np.testing.assert_allclose(np.asarray(_apply(m0, v, x, deterministic=False)),
                               np.asarray(base), atol=1e-6)
    d1 = m.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    d1b = m.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    d2 = m.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d1b))
    assert not np.allclose(d1, d2) and not np.allclose(d1, base)
    with pytest.raises(flax.errors.InvalidRngError):
        m.apply(v, x, deterministic=False)


@pytest.mark.parametrize("name", list(MECHS))
def test_parameters_carry_logical_axes_and_apply_accepts_boxes(name):
    mech = MECHS[name]
    m, v = _init(mech, _x())
    leaves = jax.tree_util.tree_leaves(v["params"], is_leaf=lambda a: isinstance(
        a, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
    for a in leaves:
        assert len(a.names) == a.value.ndim
    specs = nn.get_partition_spec(v)
    assert jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(
        s, jax.sharding.PartitionSpec))
    axes = {n for a in leaves for n in a.names if n}
    assert "embed" in axes
    # boxed and unboxed variables give the same result
    x = _x()
    np.testing.assert_array_equal(np.asarray(_apply(m, v, x)),
                                  np.asarray(_apply(m, nn.unbox(v), x)))


def test_gqa_kernel_axes_follow_heads():
    m, v = _init(MECHS["gqa"], _x())
    p = v["params"]
    assert p["q"]["kernel"].names == ("embed", "heads")
    assert p["k"]["kernel"].names == ("embed", "kv_heads")
    assert p["proj"]["kernel"].names == ("heads", "embed")


def test_initialisers_follow_torch():
    m = ah.GroupedQueryAttention(256, 8, 2, bias=True)
    v = nn.unbox(jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 1, 256))))["params"]
    k = np.asarray(v["q"]["kernel"])
    bound = 1 / np.sqrt(256)
    assert k.shape == (256, 256) and np.abs(k).max() <= bound
    assert np.isclose(k.std(), bound / np.sqrt(3), rtol=0.05)
    assert np.abs(np.asarray(v["q"]["bias"])).max() <= bound
    d = nn.unbox(jax.jit(ah.DifferentialAttention(512, 2).init)(jax.random.key(0),
                                                                jnp.zeros((1, 1, 512))))
    lam = np.concatenate([np.asarray(d["params"][f"lambda_{n}"]) for n in ("q1", "k1", "q2", "k2")])
    assert np.isclose(lam.std(), 0.1, rtol=0.15) and abs(lam.mean()) < 0.03
    np.testing.assert_array_equal(np.asarray(d["params"]["head_norm"]), 1.0)
    s = nn.unbox(jax.jit(ah.SlotAttention(256, 3).init)(
        {"params": jax.random.key(0), "slots": jax.random.key(1)}, jnp.zeros((1, 2, 256))))
    ls = np.asarray(s["params"]["slot_log_sigma"])
    assert ls.shape == (1, 1, 256) and np.abs(ls).max() <= np.sqrt(6 / 512)
    assert np.isclose(np.asarray(s["params"]["slot_mu"]).std(), 1.0, rtol=0.15)
    np.testing.assert_array_equal(np.asarray(s["params"]["norm_input"]["scale"]), 1.0)


def test_slot_noise_from_rng_stream_and_permutation_invariance():
    m = ah.SlotAttention(16, 4)
    x = _x((2, 9, 16))
    v = jax.jit(m.init)({"params": jax.random.key(0), "slots": jax.random.key(1)}, x)
    # compiled once each (not op by op); the same key drawn in two calls
    from_stream = jax.jit(lambda v, x, key: m.apply(v, x, rngs={"slots": key}))
    a = from_stream(v, x, jax.random.key(5))
    b = from_stream(v, x, jax.random.key(5))
    c = from_stream(v, x, jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(a, c)
    noise = jax.random.normal(jax.random.key(7), (2, 4, 16))
    given = jax.jit(lambda v, x: m.apply(v, x, noise))
    y = given(v, x)
    perm = jax.random.permutation(jax.random.key(8), 9)
    np.testing.assert_allclose(np.asarray(given(v, x[:, perm])), np.asarray(y), atol=1e-5)
    with pytest.raises(ValueError, match=r"noise must have shape .*\(2, 4, 16\).*\(2, 3, 16\)"):
        m.apply(v, x, jnp.zeros((2, 3, 16)))

"""The floor smoke: every mechanism, and every sparse ``impl`` that runs on a CPU host, does a
forward and a gradient with respect to its parameters and its input on whichever JAX runs the
tests, finite and of the right shapes, and agrees with a second path where the package has one
(``xla`` and ``pallas`` against ``reference``; modules that reduce to another one).

``make test`` runs it on the oldest supported JAX (the Python 3.11 venv, jax 0.10.x), where it
is the one check of every mechanism's forward and gradient; on the newest JAX the behaviour,
interop and kernel tests cover the same ground, and it runs there only when asked for. It
imports neither torch nor ``parity``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mechanisms_spec import BY_ID, MECHANISMS, SPARSE_IMPLS, Mechanism, params

import attnhut_jax as ah

# one declaration per mechanism (the first: the causal variant where there are two)
FIRST: dict[type, Mechanism] = {}
for _m in MECHANISMS:
    FIRST.setdefault(_m.cls, _m)
ONE_EACH = list(FIRST.values())
# the sparse mechanisms once per impl that runs on CPU, bar "auto" (a name for one of them,
# picked per backend: the registry's tests cover the choice); the others as constructed
CASES = [(m, impl) for m in ONE_EACH
         for impl in ([i for i in m.cpu_impls if i != "auto"] if m.impls == SPARSE_IMPLS
                      else [None])]


def _weights(shape):
    return jax.random.normal(jax.random.key(11), shape)


@functools.cache
def _run(mech_id: str, impl: str | None):
    """(output, param grads, input grad) of sum(out * r) for a declaration, float32, one jit."""
    mech = BY_ID[mech_id]
    m = mech.make() if impl is None else mech.make(impl=impl)
    x = mech.example(seed=5)
    return _grads(lambda p, x_: mech.apply(m, {"params": p}, x_), params(mech_id), x)


def _grads(f, p, x):
    r = _weights(jax.eval_shape(f, p, x).shape)

    def loss(p_, x_):
        y = f(p_, x_)
        return jnp.sum(y * r), y

    (_, y), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(p, x)
    return y, gp, gx


def _close(a, b, what, atol, rtol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol, err_msg=what)


def _same(got, want):
    """Outputs within 2e-5, every gradient within 2e-4 (+1e-4 relative)."""
    (y, gp, gx), (y_ref, gp_ref, gx_ref) = got, want
    _close(y, y_ref, "output", 2e-5)
    _close(gx, gx_ref, "input gradient", 2e-4)
    if gp_ref is not None:
        jax.tree_util.tree_map_with_path(
            lambda path, a, b: _close(a, b, f"grad {jax.tree_util.keystr(path)}", 2e-4), gp, gp_ref)


@pytest.mark.parametrize("mech,impl", CASES,
                         ids=[m.id + (f"-{i}" if i else "") for m, i in CASES])
def test_forward_and_gradients(mech, impl):
    y, gp, gx = _run(mech.id, impl)
    p, x = params(mech.id), mech.example(seed=5)
    expect = jax.eval_shape(lambda: mech.apply(mech.make(), {"params": p}, x))
    assert y.shape == expect.shape and y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
    assert gx.shape == x.shape and np.all(np.isfinite(np.asarray(gx)))
    assert np.any(np.asarray(gx) != 0.0)
    assert jax.tree_util.tree_structure(gp) == jax.tree_util.tree_structure(p)
    for g, a in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(p), strict=True):
        assert g.shape == a.shape and g.dtype == a.dtype
        assert np.all(np.isfinite(np.asarray(g)))
    assert any(np.any(np.asarray(g) != 0.0) for g in jax.tree_util.tree_leaves(gp))
    if impl not in (None, "reference"):  # every sparse impl computes what the reference does
        _same((y, gp, gx), _run(mech.id, "reference"))


# ----------------------------------------------------------------------------- second paths
# Modules that reduce to another one with the same weights; the input gradient is compared
# (the parameter trees differ), and the output.


def _standard(causal=True):
    m = ah.StandardAttention(32, 4, causal=causal)
    x = jax.random.normal(jax.random.key(5), (2, 11, 32))
    return m, nn.unbox(jax.jit(m.init)(jax.random.key(1), x))["params"], x


def _dense_paths(m_a, p_a, m_b, p_b, x):
    got = _grads(lambda p, x_: m_a.apply({"params": p}, x_), p_a, x)
    want = _grads(lambda p, x_: m_b.apply({"params": p}, x_), p_b, x)
    _same(got[:1] + (None, got[2]), want[:1] + (None, want[2]))


def test_standard_is_gqa_with_one_kv_head_per_query_head():
    m, p, x = _standard()
    q, k, v = jnp.split(p["qkv"]["kernel"], 3, axis=-1)
    gqa = {"q": {"kernel": q}, "k": {"kernel": k}, "v": {"kernel": v}, "proj": p["proj"]}
    _dense_paths(m, p, ah.GroupedQueryAttention(32, 4, 4, causal=True), gqa, x)


def test_mqa_is_gqa_with_one_kv_head():
    m = ah.MultiQueryAttention(32, 4, causal=True)
    x = jax.random.normal(jax.random.key(5), (2, 11, 32))
    p = nn.unbox(jax.jit(m.init)(jax.random.key(1), x))["params"]
    k, v = jnp.split(p["kv"]["kernel"], 2, axis=-1)
    gqa = {"q": p["q"], "k": {"kernel": k}, "v": {"kernel": v}, "proj": p["proj"]}
    _dense_paths(m, p, ah.GroupedQueryAttention(32, 4, 1, causal=True), gqa, x)


def test_delta_with_stride_one_is_causal_attention():
    """Every query is an anchor: the correction restores the dense row exactly."""
    m, p, x = _standard()
    _dense_paths(ah.DeltaAttention(32, 4, window=3, sink=1, stride=1), p, m, p, x)


def test_dsa_keeping_every_key_is_causal_attention():
    m, p, x = _standard()
    dsa = ah.DeepSeekSparseAttention(32, 4, top_k=11, num_index_heads=2, index_head_dim=8)
    indexer = nn.unbox(jax.jit(dsa.init)(jax.random.key(2), x))["params"]["indexer"]
    _dense_paths(dsa, {**p, "indexer": indexer}, m, p, x)


def test_cjepa_predict_is_the_future_of_the_unmasked_forward():
    mech = FIRST[ah.CausalJEPAAttention]
    m, p = mech.make(), params(mech.id)
    x = mech.example(seed=5)
    t = x.shape[1]
    nothing_hidden = jnp.zeros((0,), jnp.int32)
    got = _grads(lambda p_, x_: m.apply({"params": p_}, x_, method="predict"), p, x)
    want = _grads(lambda p_, x_: m.apply({"params": p_}, x_, nothing_hidden)[0][:, t:], p, x)
    _same(got, want)

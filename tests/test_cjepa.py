"""CausalJEPAAttention and cjepa_masked_loss: masking semantics, jit, dtypes, errors (torch
parity: torch_parity/test_cjepa_parity.py)."""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah

D, S, HIST, PRED = 16, 3, 3, 1


def _module(**kw) -> ah.CausalJEPAAttention:
    kw = {"num_masked_slots": 2, "depth": 2, **kw}
    return ah.CausalJEPAAttention(D, 2, S, HIST, PRED, **kw)


def _x(shape=(2, HIST, S, D), dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _init(m, x=None):
    return jax.jit(m.init)({"params": jax.random.key(1), "mask": jax.random.key(2)}, _x() if x is None else x)


def test_permuting_objects_permutes_the_prediction():
    m = _module()
    v = _init(m)
    x = _x()
    mask = jnp.array([0, 2])
    y, _ = m.apply(v, x, mask)
    perm = jnp.array([2, 0, 1])  # new object j is old object perm[j]
    inv = jnp.argsort(perm)
    y_p, ms_p = m.apply(v, x[:, :, perm], inv[mask])
    np.testing.assert_allclose(np.asarray(y_p), np.asarray(y[:, :, perm]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(m.apply(v, x[:, :, perm], method="predict")),
                               np.asarray(m.apply(v, x, method="predict")[:, :, perm]), atol=1e-5)
    # hiding other objects changes the prediction: the mask is not ignored
    assert not np.allclose(y, m.apply(v, x, jnp.array([1]))[0], atol=1e-3)


def test_hidden_history_cells_do_not_read_their_own_slot():
    """A hidden object's frames 1.. never reach the model; frame 0 (its anchor) does."""
    m = _module()
    v = _init(m)
    x = _x()
    mask = jnp.array([1])
    y, _ = m.apply(v, x, mask)
    y2, _ = m.apply(v, x.at[:, 1:, 1].add(3.0), mask)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))
    assert not np.allclose(y, m.apply(v, x.at[:, 0, 1].add(3.0), mask)[0])
    assert not np.allclose(y, m.apply(v, x.at[:, 1:, 2].add(3.0), mask)[0])


def test_loss_scores_only_inferred_cells():
    f = HIST + PRED
    pred, target = _x((2, f, S, D), seed=1), _x((2, f, S, D), seed=2)
    mask = jnp.array([1])
    loss = ah.cjepa_masked_loss(pred, target, mask, HIST)
    visible = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 2)]  # frame 0, unmasked history objects
    inferred = [(1, 1), (2, 1), (HIST, 0), (f - 1, 2)]
    for fr, obj in visible:
        changed = ah.cjepa_masked_loss(pred.at[:, fr, obj].add(7.0), target, mask, HIST)
        assert float(changed) == float(loss), (fr, obj)
    for fr, obj in inferred:
        changed = ah.cjepa_masked_loss(pred.at[:, fr, obj].add(7.0), target, mask, HIST)
        assert float(changed) != float(loss), (fr, obj)
    # the gradient is non-zero exactly on the scored cells, and the loss is their mean
    g = jax.grad(ah.cjepa_masked_loss)(pred, target, mask, HIST)
    scored = np.zeros((f, S), bool)
    scored[HIST:] = True
    scored[1:HIST, 1] = True
    np.testing.assert_array_equal(np.any(np.asarray(g) != 0, axis=(0, 3)), scored)
    err = np.mean((np.asarray(pred) - np.asarray(target)) ** 2, axis=-1)
    np.testing.assert_allclose(float(loss), err[:, scored].mean(), rtol=1e-6)


def test_mask_drawn_from_the_mask_stream():
    m = _module()
    v = _init(m)
    x = _x()

    def draw(seed):
        return m.apply(v, x, rngs={"mask": jax.random.key(seed)})

    draws = [np.asarray(draw(s)[1]) for s in range(8)]
    for d in draws:
        assert d.shape == (2,) and len(set(d.tolist())) == 2 and d.min() >= 0 and d.max() < S
    assert len({tuple(d) for d in draws}) > 1
    (y_a, ms_a), (y_b, ms_b) = draw(5), draw(5)
    np.testing.assert_array_equal(np.asarray(ms_a), np.asarray(ms_b))
    np.testing.assert_array_equal(np.asarray(y_a), np.asarray(y_b))
    # the drawn indices are the ones used
    np.testing.assert_allclose(np.asarray(m.apply(v, x, ms_a)[0]), np.asarray(y_a), atol=1e-6)
    with pytest.raises(flax.errors.InvalidRngError):
        m.apply(v, x)
    assert m.apply(v, x, jnp.array([1]))[1].shape == (1,)


def test_jit_equals_eager_with_traced_mask_slots():
    m = _module()
    v = _init(m)
    x = _x(seed=3)
    traces = []

    @jax.jit
    def fwd(v_, x_, ms):
        traces.append(1)
        y, _ = m.apply(v_, x_, ms)
        return y, ah.cjepa_masked_loss(y, jnp.zeros_like(y), ms, HIST)

    for ms in ([0, 2], [2, 1], [1, 1]):
        ms = jnp.array(ms)
        y_j, loss_j = fwd(v, x, ms)
        y_e, _ = m.apply(v, x, ms)
        np.testing.assert_allclose(np.asarray(y_j), np.asarray(y_e), atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(float(loss_j),
                                   float(ah.cjepa_masked_loss(y_e, jnp.zeros_like(y_e), ms, HIST)),
                                   rtol=1e-6)
    assert len(traces) == 1  # the mask is data, not a static argument
    drawn = jax.jit(lambda v_, x_, k: m.apply(v_, x_, rngs={"mask": k}))(v, x, jax.random.key(4))
    eager = m.apply(v, x, rngs={"mask": jax.random.key(4)})
    np.testing.assert_array_equal(np.asarray(drawn[1]), np.asarray(eager[1]))
    np.testing.assert_allclose(np.asarray(drawn[0]), np.asarray(eager[0]), atol=1e-6)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_inputs_stay_finite(param_dtype):
    m = _module(dtype=jnp.bfloat16, param_dtype=param_dtype)
    x = _x(dtype=jnp.bfloat16) * 30.0
    v = _init(m, x)

    def loss(x_):
        out, ms = m.apply(v, x_, jnp.array([0, 1]))
        return ah.cjepa_masked_loss(out, jnp.zeros_like(out), ms, HIST).astype(jnp.float32), out

    (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    assert jax.eval_shape(lambda: m.apply(v, x, method="predict")).dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(g, np.float32))) and np.any(np.asarray(g) != 0)


def test_dropout_uses_the_dropout_stream():
    x = _x()
    m = _module(dropout=0.3)
    v = _init(m, x)
    ms = jnp.array([1])
    base = m.apply(v, x, ms)[0]
    np.testing.assert_array_equal(np.asarray(base), np.asarray(m.apply(v, x, ms, True)[0]))
    np.testing.assert_allclose(np.asarray(_module().apply(v, x, ms, deterministic=False)[0]),
                               np.asarray(base), atol=1e-6)

    def run(seed, method="__call__"):
        out = m.apply(v, x, **({"mask_slots": ms} if method == "__call__" else {}),
                      deterministic=False, rngs={"dropout": jax.random.key(seed)}, method=method)
        return out[0] if method == "__call__" else out

    np.testing.assert_array_equal(np.asarray(run(0)), np.asarray(run(0)))
    assert not np.allclose(run(0), run(1)) and not np.allclose(run(0), base)
    assert not np.allclose(run(0, "predict"), m.apply(v, x, method="predict"))
    with pytest.raises(flax.errors.InvalidRngError):
        m.apply(v, x, ms, deterministic=False)


def test_parameters_carry_logical_axes_and_torch_names():
    m = _module(bias=True)
    v = _init(m)
    leaves = jax.tree_util.tree_leaves(v["params"], is_leaf=lambda a: isinstance(
        a, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
    assert all(len(a.names) == a.value.ndim for a in leaves)
    assert {"embed", "mlp", "qkv", "heads"} <= {n for a in leaves for n in a.names}
    p = v["params"]
    assert set(p) == {"mask_token", "time_pos", "id_proj", "blocks", "norm", "to_out"}
    assert set(p["blocks"]) == {"0", "1"}
    assert set(p["blocks"]["0"]["mlp"]) == {"0", "1", "4"}
    assert p["time_pos"].value.shape == (1, HIST + PRED, 1, D)
    x = _x()
    np.testing.assert_array_equal(np.asarray(m.apply(v, x, jnp.array([0]))[0]),
                                  np.asarray(m.apply(nn.unbox(v), x, jnp.array([0]))[0]))


def test_initialisers_follow_torch():
    m = ah.CausalJEPAAttention(128, 4, 1, 16, pred_frames=16, num_masked_slots=1, depth=1)
    p = nn.unbox(jax.jit(m.init)({"params": jax.random.key(0), "mask": jax.random.key(1)},
                                 jnp.zeros((1, 16, 1, 128))))["params"]
    tp = np.asarray(p["time_pos"])
    assert np.isclose(tp.std(), 0.02, rtol=0.05) and abs(tp.mean()) < 2e-3
    assert np.abs(np.asarray(p["mask_token"])).max() < 0.2
    assert np.abs(np.asarray(p["id_proj"]["kernel"])).max() <= 1 / np.sqrt(128)
    assert np.abs(np.asarray(p["blocks"]["0"]["mlp"]["4"]["kernel"])).max() <= 1 / np.sqrt(512)
    np.testing.assert_array_equal(np.asarray(p["norm"]["scale"]), 1.0)


@pytest.mark.parametrize("kw,pattern", [
    (dict(dim=30, num_heads=4), r"dim=30 must be divisible by num_heads=4"),
    (dict(num_masked_slots=-1), r"num_masked_slots=-1 must be >= 0"),
    (dict(history_frames=0), r"history_frames=0 must be >= 1"),
    (dict(pred_frames=-1, depth=-2), r"pred_frames=-1, depth=-2 must be >= 0"),
    (dict(num_slots=0), r"num_slots=0 must be >= 1"),
    (dict(dropout=1.5), r"dropout=1.5 must be in \[0, 1\]"),
])
def test_bad_constructor_values(kw, pattern):
    kw = {"dim": D, "num_heads": 2, "num_slots": S, "history_frames": HIST, **kw}
    m = ah.CausalJEPAAttention(**kw)
    with pytest.raises(ValueError, match=pattern):
        m.init({"params": jax.random.key(0), "mask": jax.random.key(0)},
               jnp.zeros((1, 1, S, kw["dim"])), jnp.array([0]))


@pytest.mark.parametrize("shape,pattern", [
    ((2, HIST * S, D), r"rank 4 .* got shape \(2, 9, 16\)"),
    ((2, HIST, S, D + 1), r"slot width 17 != dim=16"),
    ((2, HIST, S + 1, D), r"4 objects per frame != num_slots=3"),
    ((2, HIST + 1, S, D), r"4 history frames, expected 1..history_frames=3"),
    ((2, 0, S, D), r"0 history frames"),
])
def test_bad_input_shapes(shape, pattern):
    m = _module()
    v = _init(m)
    with pytest.raises(ValueError, match=pattern):
        m.apply(v, jnp.zeros(shape), jnp.array([0]))
    with pytest.raises(ValueError, match=pattern):
        m.apply(v, jnp.zeros(shape), method="predict")


def test_bad_mask_slots():
    m = _module()
    v = _init(m)
    x = _x()
    with pytest.raises(ValueError, match=r"mask_slots values \[3, -4\] are out of range for "
                                         r"num_slots=3 \(valid: -3..2\)"):
        m.apply(v, x, jnp.array([0, 3, -4, -3]))
    with pytest.raises(ValueError, match=r"boolean mask_slots must have shape \(num_slots,\)"):
        m.apply(v, x, jnp.array([True, False]))
    with pytest.raises(TypeError, match="integer object indices, got dtype float32"):
        m.apply(v, x, jnp.array([1.0]))
    with pytest.raises(ValueError, match=r"rank 0 or 1, got shape \(1, 2\)"):
        m.apply(v, x, jnp.array([[0, 1]]))
    with pytest.raises(TypeError, match="floating point, got dtype int32"):
        m.apply(v, x.astype(jnp.int32), jnp.array([0]))
    y = jnp.zeros((2, HIST + PRED, S, D))
    with pytest.raises(ValueError, match=r"mask_slots values \[7\]"):
        ah.cjepa_masked_loss(y, y, jnp.array([7]), HIST)
    with pytest.raises(ValueError, match=r"got \(2, 4, 3, 16\) and \(2, 4, 3, 15\)"):
        ah.cjepa_masked_loss(y, y[..., :15], jnp.array([0]), HIST)
    with pytest.raises(ValueError, match=r"history_frames=0 must be >= 1"):
        ah.cjepa_masked_loss(y, y, jnp.array([0]), 0)


def test_more_masked_slots_than_objects_hides_every_object_as_attnhut():
    m = ah.CausalJEPAAttention(D, 2, S, HIST, num_masked_slots=S + 2, depth=1)
    x = jax.random.normal(jax.random.key(0), (1, HIST, S, D))
    v = jax.jit(m.init)({"params": jax.random.key(1), "mask": jax.random.key(2)}, x)
    _, ms = m.apply(v, x, rngs={"mask": jax.random.key(3)})
    assert sorted(np.asarray(ms).tolist()) == list(range(S))
    m1 = ah.CausalJEPAAttention(D, 2, 1, HIST, depth=1)  # default num_masked_slots=2, one object
    v1 = jax.jit(m1.init)({"params": jax.random.key(1), "mask": jax.random.key(2)}, x[:, :, :1])
    assert m1.apply(v1, x[:, :, :1], rngs={"mask": jax.random.key(3)})[1].shape == (1,)

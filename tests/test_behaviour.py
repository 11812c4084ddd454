"""The shared test base: every mechanism declared in ``mechanisms_spec`` (all 13, causal and
bidirectional variants where a mechanism has both) is held to the same properties.

- causality both ways: a causal module's output t has exactly zero gradient from every input
  position after t and a non-zero one from an earlier position; a bidirectional one reads later
  positions; a dense pattern depends on every position it may see;
- jit == eager, outputs and gradients (and aux outputs), float32, tight tolerance;
- bfloat16 output within the declared relative tolerance of float32 for the same params;
- bad input raises ValueError/TypeError naming the offending value: width, rank, dtype, mask
  shape, non-divisible heads, impl.
"""

from __future__ import annotations

import functools
import inspect
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mechanisms_spec import BY_ID, MECHANISMS, Mechanism, params, rngs, variables

import attnhut_jax as ah

ALL = pytest.mark.parametrize("mech", MECHANISMS, ids=str)


# ----------------------------------------------------------------------------- one program


@functools.cache
def _program(mech_id: str):
    """``(loss_and_grads, the same jitted, output shape)`` for a declaration's float32 module.

    loss(params, x, w_T) = sum(out * r * w_T[position]) with fixed random weights ``r`` (a plain
    sum could cancel, e.g. through a LayerNorm) and row weights ``w_T`` on the output positions:
    the causality test calls the compiled program once per row (one-hot ``w_T``) and
    test_jit_equals_eager compares it with the eager one (``w_T`` all ones), so each mechanism
    costs one compile for both.
    """
    mech = BY_ID[mech_id]
    m, v = mech.make(), variables(mech_id)
    out_shape = jax.eval_shape(lambda: mech.apply(m, v, mech.example())).shape
    r = jax.random.normal(jax.random.key(11), out_shape)

    def loss(p, x, w_T):
        # a mechanism with aux outputs returns them from the same program (jit == eager on them)
        y, aux = (m.apply({"params": p}, x, return_aux=True, **mech.fixed(x)) if mech.aux
                  else (mech.apply(m, {"params": p}, x), None))
        w = w_T.reshape((1, -1) + (1,) * (y.ndim - 2))
        return jnp.sum(y * r * w), (y, aux)

    vg = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return vg, jax.jit(vg), out_shape


# ----------------------------------------------------------------------------- causality


def _dependence(mech: Mechanism, x) -> np.ndarray:
    """(T_out, T_in) bool: whether output position t has a non-zero gradient from input s.

    Position is axis 1 of input and output (tokens; CausalJEPA's frames; SlotAttention's slots
    against its inputs).
    """
    _, run, out_shape = _program(mech.id)
    p = params(mech.id)
    rows = []
    for t in range(out_shape[1]):
        _, (_, g) = run(p, x, jnp.zeros(out_shape[1]).at[t].set(1.0))
        g = np.asarray(g)
        assert np.all(np.isfinite(g))
        rows.append(np.any(g != 0.0, axis=tuple(a for a in range(g.ndim) if a != 1)))
    return np.stack(rows)


@ALL
def test_causality_both_ways(mech):
    x = mech.example(seed=2)
    dep = _dependence(mech, x)
    t_out, t_in = dep.shape
    if mech.causal is None:  # a set map: every output reads every input
        assert dep.all(), dep
        return
    ahead = np.triu(np.ones((t_out, t_in), bool), k=1)
    if mech.causal:
        assert t_out == t_in
        # exactly zero gradient from every later position, for every row
        assert not dep[ahead].any(), np.argwhere(dep & ahead)
        # and no leak through what has no gradient (top-k selections): moving input p leaves
        # every earlier output bit for bit
        _, run, _ = _program(mech.id)
        p, w = params(mech.id), jnp.ones(t_out)
        (_, (y, _)), _ = run(p, x, w)
        for pos in (0, 4, t_in - 1):
            (_, (y2, _)), _ = run(p, x.at[:, pos].add(3.0), w)
            np.testing.assert_array_equal(np.asarray(y2[:, :pos]), np.asarray(y[:, :pos]))
            assert not np.allclose(y2[:, pos], y[:, pos])
        if mech.full:
            np.testing.assert_array_equal(dep, ~ahead)
        else:
            assert dep[0, 0]
            for t in range(1, t_out):
                assert dep[t, :t].any(), f"row {t} reads no earlier position"
    else:
        if mech.full:
            assert dep.all(), dep
        else:
            assert mech.future_rows >= 1
            for t in range(mech.future_rows):
                assert dep[t, t + 1:].any(), f"row {t} reads no later position"


# ----------------------------------------------------------------------------- jit == eager


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=what)


@ALL
def test_jit_equals_eager(mech):
    eager, jitted, out_shape = _program(mech.id)
    p, x, w = params(mech.id), mech.example(seed=3), jnp.ones(out_shape[1])
    (l_e, (y_e, aux_e)), g_e = eager(p, x, w)
    (l_j, (y_j, aux_j)), g_j = jitted(p, x, w)
    _close(y_j, y_e, "output")
    _close(l_j, l_e, "loss")
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: _close(a, b, f"grad {jax.tree_util.keystr(path)}", atol=1e-5), g_j, g_e)
    if mech.aux:
        assert set(aux_e) == set(aux_j)
        for k in aux_e:
            _close(aux_j[k], aux_e[k], f"aux {k}")


# ----------------------------------------------------------------------------- bfloat16


@ALL
def test_bfloat16_within_stated_tolerance_of_float32(mech):
    """Same params and input, rounded to bf16 once: the float32 run sees the rounded values, so
    the difference is what computing in bf16 costs, bounded row by row by ``mech.bf16_rtol``
    (relative to the rows' RMS norm)."""
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params(mech.id))
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p16)
    x16 = mech.example(seed=4).astype(jnp.bfloat16)
    m32, m16 = mech.make(), mech.make(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    # eagerly: test_jit_equals_eager has compiled these float32 ops for these shapes already
    ref = mech.apply(m32, {"params": p32}, x16.astype(jnp.float32))

    def loss(x_):
        y = mech.apply(m16, {"params": p16}, x_)
        return y.astype(jnp.float32).sum(), y

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, y), _ = run(x16)
    assert y.dtype == jnp.bfloat16
    y, ref = (np.asarray(a, np.float64).reshape(a.shape[0] * a.shape[1], -1) for a in (y, ref))
    err_rows = np.linalg.norm(y - ref, axis=-1) / np.sqrt(np.mean(np.sum(ref ** 2, axis=-1)))
    beyond = np.flatnonzero(err_rows > mech.bf16_rtol)
    assert not len(beyond), (f"rows {beyond.tolist()} of {len(err_rows)} beyond {mech.bf16_rtol}: "
                             f"{err_rows[beyond].round(4).tolist()} ({mech.bf16_why})")
    # large logits (inputs x30) stay finite in bf16, forward and backward (same compiled program)
    (_, y_big), g_big = run(x16 * 30)
    assert np.all(np.isfinite(np.asarray(y_big, np.float32)))
    assert np.all(np.isfinite(np.asarray(g_big, np.float32)))


# ----------------------------------------------------------------------------- bad input


def _abstract_init(mech, m, x):
    return jax.eval_shape(lambda x_: m.init(rngs(), x_, **mech.fixed(x_)), x)


@ALL
def test_wrong_width(mech):
    d = mech.dim
    x = jnp.zeros((*mech.shape[:-1], d - 1))
    with pytest.raises(ValueError, match=rf"width {d - 1} != dim={d}"):
        _abstract_init(mech, mech.make(), x)


@ALL
@pytest.mark.parametrize("change", ["drop_batch", "extra_axis"])
def test_wrong_rank(mech, change):
    shape = mech.shape[1:] if change == "drop_batch" else (1, *mech.shape)
    with pytest.raises(ValueError, match=rf"rank {len(mech.shape)}\b.*got shape "
                                         rf"{re.escape(str(shape))}"):
        _abstract_init(mech, mech.make(), jnp.zeros(shape))


@ALL
def test_integer_input(mech):
    with pytest.raises(TypeError, match="floating point, got dtype int32"):
        _abstract_init(mech, mech.make(), jnp.zeros(mech.shape, jnp.int32))


BAD_CALLS = [(m, c) for m in MECHANISMS for c in m.bad_calls]


@pytest.mark.parametrize("mech,bad", BAD_CALLS,
                         ids=[f"{m.id}-{c.kwarg}{i}" for i, (m, c) in enumerate(BAD_CALLS)])
def test_bad_mask(mech, bad):
    m, v = mech.make(), variables(mech.id)
    x = mech.example()
    # eagerly: some checks need concrete values (CausalJEPA's object indices)
    with pytest.raises(bad.error, match=bad.match):
        mech.apply(m, v, x, **{bad.kwarg: bad.value(x)})


@pytest.mark.parametrize("mech", [m for m in MECHANISMS if "attn_mask" not in m.call], ids=str)
def test_modules_without_attn_mask_refuse_one(mech):
    """A mask is never silently ignored: a module that takes none says so."""
    m = mech.make()
    x = jnp.zeros(mech.shape)
    v = _abstract_init(mech, m, x)
    with pytest.raises(TypeError, match="attn_mask"):
        jax.eval_shape(lambda v_: mech.apply(m, v_, x, attn_mask=jnp.ones((x.shape[1],) * 2, bool)),
                       v)


@ALL
def test_bad_constructor_value(mech):
    overrides, match = mech.bad_config
    m = mech.make(**overrides)
    shape = (*mech.shape[:-1], overrides.get("dim", mech.dim))
    with pytest.raises(ValueError, match=match):
        _abstract_init(mech, m, jnp.zeros(shape))


@pytest.mark.parametrize("mech", [m for m in MECHANISMS if m.impls], ids=str)
def test_bad_impl(mech):
    """Every mechanism with an ``impl`` field refuses an unknown one with an error naming it."""
    with pytest.raises((ValueError, TypeError), match=r"impl\W+bogus"):
        _abstract_init(mech, mech.make(impl="bogus"), jnp.zeros(mech.shape))


# ----------------------------------------------------------------------------- declarations


@ALL
def test_declaration_matches_the_module(mech):
    """The declared call arguments and causality are the module's, so the base cannot drift."""
    sig = inspect.signature(mech.cls.__call__)
    names = [n for n in sig.parameters if n != "self"]
    assert set(names[1:]) == mech.call, names
    fields = {f.name for f in mech.cls.__dataclass_fields__.values()}
    if "causal" in fields and mech.causal is not None:
        assert mech.make().causal == mech.causal
    m, v, x = mech.make(), variables(mech.id), mech.example()
    out = jax.eval_shape(lambda: mech.apply(m, v, x))
    assert out.shape[0] == x.shape[0] and out.shape[-1] == x.shape[-1]
    leaves = jax.tree_util.tree_leaves(v["params"],
                                       is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
    assert all(len(a.names) == a.value.ndim for a in leaves)
    assert "embed" in {n for a in leaves for n in a.names}


def test_every_mechanism_is_declared():
    """A module exported by the package is either declared here or a named building block."""
    blocks = {ah.LightningIndexer, ah.GroupedOutputProjection}
    exported = {c for c in vars(ah).values() if isinstance(c, type) and issubclass(c, nn.Module)}
    missing = {c.__name__ for c in exported - blocks - {m.cls for m in MECHANISMS}}
    assert not missing, f"declare {sorted(missing)} in tests/mechanisms_spec.py"
    assert {m.cls for m in MECHANISMS} <= exported

"""The linear-attention modules (GatedDeltaNet, KimiDeltaAttention, LinearAttention): every impl
of the ``gated_delta`` op gives the same outputs and gradients; ``initial_state`` /
``return_state`` chain as documented; a packed row equals its segments run alone; linear
attention equals the paper's equations; bad input names the values. Causality, jit == eager,
bfloat16 and the shared bad inputs come from ``mechanisms_spec`` (test_behaviour.py)."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah

D = 16
B = 2


def _gdn(**kw):
    return ah.GatedDeltaNet(D, 2, 4, 4, 3, **{"impl": "recurrent", **kw})


def _kda(**kw):
    return ah.KimiDeltaAttention(D, 2, 4, **{"impl": "recurrent", **kw})


def _linear(**kw):
    return ah.LinearAttention(D, 2, **{"impl": "recurrent", **kw})


MODULES = {
    "gdn": _gdn,
    "gdn_logsigmoid": lambda **kw: _gdn(decay_gate="logsigmoid", use_qk_l2norm=False, **kw),
    "kda": _kda,
    "linear": _linear,
}


def _x(t, b=B, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


@functools.cache
def _params(name, conv_size=None):
    kw = {} if conv_size is None else {"conv_size": conv_size}
    m = MODULES[name](**kw)
    return nn.unbox(jax.jit(m.init)(jax.random.key(1), _x(5)))["params"]


def _close(got, want, tol=1e-5, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * scale {scale:.3g}"


# ----------------------------------------------------------------------------- impls


# pallas (interpret mode on CPU) once per kind of call: per-head decay, per-channel decay, none
IMPL_CASES = [(n, "chunk") for n in sorted(MODULES)] + [(n, "pallas") for n in ("gdn", "kda", "linear")]


@pytest.mark.parametrize("name, impl", IMPL_CASES, ids=[f"{n}-{i}" for n, i in IMPL_CASES])
def test_every_impl_computes_what_the_recurrence_does(name, impl):
    """Outputs, returned state and gradients (every parameter, the input, the initial state) of
    ``impl`` equal the recurrent impl's, on a length that is no multiple of the chunk (4), with
    segments and an initial state."""
    x = _x(11)
    seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 2, [3] * 2 + [0] + [3] * 8])
    p = _params(name)
    m0 = MODULES[name]()
    s0 = 0.3 * jax.random.normal(jax.random.key(2), m0.state_shape(B))
    r = jax.random.normal(jax.random.key(3), x.shape)

    def run(impl_):
        m = MODULES[name](impl=impl_, chunk_size=4)

        def loss(p_, x_, s_):
            y, s = m.apply({"params": p_}, x_, initial_state=s_, return_state=True,
                           segment_ids=seg)
            return jnp.sum(y * r) + jnp.sum(s * s), (y, s)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(p, x, s0)

    (_, (y, s)), g = run(impl)
    (_, (y_ref, s_ref)), g_ref = run("recurrent")
    _close(y, y_ref, 1e-5, "output")
    _close(s, s_ref, 1e-5, "final state")
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: _close(a, b, 1e-4, f"grad {jax.tree_util.keystr(path)}"), g, g_ref)


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("name", sorted(MODULES))
def test_return_state_then_initial_state_continues_the_sequence(name):
    """Running [0, a) with return_state, then [a, T) from that state, equals running [0, T):
    exactly what ``initial_state`` promises when the short conv reads no earlier token (conv_size
    1; LinearAttention has no conv). A zero initial_state is no initial state."""
    conv = {} if name == "linear" else {"conv_size": 1}
    m = MODULES[name](**conv)
    p = _params(name, conv.get("conv_size"))
    x = _x(9, seed=4)
    full, s_full = m.apply({"params": p}, x, return_state=True)
    first, s = m.apply({"params": p}, x[:, :4], return_state=True)
    second, s_end = m.apply({"params": p}, x[:, 4:], initial_state=s, return_state=True)
    assert s.dtype == jnp.float32 and s.shape == m.state_shape(B)
    _close(jnp.concatenate([first, second], axis=1), full, what="chained outputs")
    _close(s_end, s_full, what="chained final state")
    zero = m.apply({"params": p}, x, initial_state=jnp.zeros(m.state_shape(B)))
    _close(zero, full, 0, "zero initial state")


@pytest.mark.parametrize("name", ["gdn", "kda"])
def test_the_conv_starts_from_zeros_whatever_the_state(name):
    """With conv_size 4 the chain equals the full run exactly when the conv's taps on earlier
    tokens are zero (what ``initial_state`` does not carry is the conv's tail), and differs from
    it otherwise."""
    m = MODULES[name]()
    p = _params(name)
    x = _x(9, seed=5)

    def chain(params):
        _, s = m.apply({"params": params}, x[:, :4], return_state=True)
        return m.apply({"params": params}, x[:, 4:], initial_state=s)

    assert float(jnp.abs(chain(p) - m.apply({"params": p}, x)[:, 4:]).max()) > 1e-3
    only_now = {**p, "conv1d": {"kernel": p["conv1d"]["kernel"].at[:-1].set(0.0)}}
    _close(chain(only_now), m.apply({"params": only_now}, x)[:, 4:], what="current-token conv")


# ----------------------------------------------------------------------------- packing


PACKED = [(n, True) for n in sorted(MODULES)] + [("linear", False)]


@pytest.mark.parametrize("name, causal", PACKED, ids=[f"{n}-{c}" for n, c in PACKED])
def test_packed_row_equals_its_segments_run_alone(name, causal):
    """Row 0 packs a 4-token segment, padding, a 3-token segment with padding inside it and
    trailing padding; row 1 one segment after leading padding. Each segment's outputs equal
    the segment run alone, padding outputs are zero, NaN in padding changes nothing, and no
    output has a gradient from another segment or from padding."""
    extra = {} if name != "linear" else {"causal": causal}
    m = MODULES[name](**extra)
    p = _params(name)
    x = _x(11, seed=6)
    seg = jnp.array([[1, 1, 1, 1, 0, 2, 2, 0, 2, 0, 0], [0, 0, 5, 5, 5, 5, 5, 5, 5, 5, 5]])
    runs = ((0, [0, 1, 2, 3]), (0, [5, 6, 8]), (1, list(range(2, 11))))

    def packed(x_):
        return m.apply({"params": p}, x_, segment_ids=seg)

    @jax.jit  # each segment alone and the gradient: one compiled program
    def alone_and_grad(x):
        # gradients of the first segment's outputs: zero from every other token
        grad = jax.grad(lambda x_: jnp.sum(packed(x_)[0, :4] ** 2))(x)
        return [m.apply({"params": p}, x[row:row + 1, np.array(idx)]) for row, idx in runs], grad

    run = jax.jit(packed)
    out = run(x)
    alone, grad = alone_and_grad(x)
    for (row, idx), a in zip(runs, alone, strict=True):
        _close(out[row:row + 1, np.array(idx)], a, what=f"row {row} segment {idx}")
    pad = np.asarray(seg) == 0
    assert np.all(np.asarray(out)[pad] == 0)
    poisoned = x.at[0, 4].set(jnp.nan).at[1, 0].set(jnp.inf)
    np.testing.assert_array_equal(np.asarray(run(poisoned)), np.asarray(out))
    assert np.all(np.asarray(grad[0, 4:]) == 0) and np.all(np.asarray(grad[1]) == 0)
    assert np.any(np.asarray(grad[0, :4]) != 0)


def test_segmented_conv_reads_only_its_segment():
    """The short conv of a packed row, against the conv of each segment alone."""
    from attnhut_jax import linear_core

    x = jax.random.normal(jax.random.key(7), (1, 9, 3))
    kernel = jax.random.normal(jax.random.key(8), (3, 3))
    seg = jnp.array([[4, 4, 0, 4, 7, 0, 7, 7, 7]])
    valid, run = linear_core.segment_runs(seg, 1, 9)
    got = linear_core.segmented_conv(x, kernel, valid, run)
    for idx in ([0, 1, 3], [4, 6, 7, 8]):
        want = linear_core.causal_conv(x[:, np.array(idx)], kernel)
        _close(got[:, np.array(idx)], want, what=str(idx))
    assert np.all(np.asarray(got[0, np.array([2, 5])]) == 0)


# ----------------------------------------------------------------------------- math


def _paper_linear_attention(m, p, x, causal):
    """Katharopoulos et al. eq. (2)-(9) per head, written out: phi = elu + 1."""
    b, t, _ = x.shape
    n, h = m.num_heads, m.head_dim

    def proj(name):
        y = x @ p[name]["kernel"]
        return (y + p[name]["bias"] if "bias" in p[name] else y).reshape(b, t, n, h)

    phi = lambda a: jax.nn.elu(a) + 1  # noqa: E731
    q, k, v = phi(proj("q_proj")), phi(proj("k_proj")), proj("v_proj")
    sim = jnp.einsum("btnh,bsnh->bnts", q, k)
    if causal:
        sim = jnp.where(jnp.tril(jnp.ones((t, t), bool)), sim, 0.0)
    out = jnp.einsum("bnts,bsnh->btnh", sim, v) / (sim.sum(-1).transpose(0, 2, 1)[..., None]
                                                   + m.eps)
    y = out.reshape(b, t, n * h) @ p["o_proj"]["kernel"]
    return y + p["o_proj"]["bias"] if "bias" in p["o_proj"] else y


@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_is_the_papers_equations(causal):
    m = _linear(causal=causal, bias=True, eps=1e-3)
    x = _x(10, seed=9)
    p = nn.unbox(jax.jit(m.init)(jax.random.key(3), x))["params"]
    with jax.default_matmul_precision("highest"):
        _close(m.apply({"params": p}, x), _paper_linear_attention(m, p, x, causal),
               what=f"causal={causal}")
    if causal:  # the state's last column is z = sum phi(k)
        _, s = m.apply({"params": p}, x, return_state=True)
        k = jax.nn.elu((x @ p["k_proj"]["kernel"] + p["k_proj"]["bias"]).reshape(B, 10, 2, 8)) + 1
        _close(s[..., -1], k.sum(1), what="z")


def test_gdn_grouped_heads_read_their_query_key_head():
    """With Hv = 2 Hk, value heads 2i and 2i + 1 read query/key head i (HF's repeat_interleave):
    moving query/key head 1's projection changes only value heads 2 and 3."""
    p = _params("gdn")
    x = _x(6, seed=10)
    kernel = p["in_proj_qkv"]["kernel"]  # q (2 heads x 4) | k (2 x 4) | v (4 x 3)
    moved = kernel.at[:, 4:8].add(1.0).at[:, 12:16].add(1.0)  # query and key head 1
    eye_out = {**p, "out_proj": {"kernel": jnp.eye(12, D)}}
    a = _gdn().apply({"params": eye_out}, x)[..., :12].reshape(B, 6, 4, 3)
    moved_p = {**eye_out, "in_proj_qkv": {"kernel": moved}}
    b = _gdn().apply({"params": moved_p}, x)[..., :12].reshape(B, 6, 4, 3)
    diff = np.abs(np.asarray(a - b)).max(axis=(0, 1, 3))
    assert np.all(diff[:2] == 0) and np.all(diff[2:] > 1e-4), diff


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, match", [
    (lambda: _gdn(decay_gate="sigmoid"), r"decay_gate='sigmoid'; allowed: \('mamba', 'logsigmoid'\)"),
    (lambda: ah.GatedDeltaNet(D, 3, 4, 4, 3), r"num_value_heads=4 must be a multiple of "
                                              r"num_query_key_heads=3"),
    (lambda: _gdn(conv_size=0), r"conv_size=0 must be >= 1"),
    (lambda: _kda(chunk_size=0), r"chunk_size=0 must be >= 1"),
    (lambda: ah.KimiDeltaAttention(D, 2, 0), r"head_dim=0 must be >= 1"),
    (lambda: _linear(eps=-1.0), r"eps=-1.0 must be >= 0"),
    (lambda: _gdn(impl="xla"), r"impl='xla' is not an implementation of 'gated_delta'"),
])
def test_bad_configuration_names_the_values(make, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(make().init, jax.random.key(0), jnp.zeros((B, 5, D)))


@pytest.mark.parametrize("make, field", [
    (lambda: _gdn(conv_size=2.0), "conv_size"),
    (lambda: ah.GatedDeltaNet(D, 2, 4, 2.0, 3), "head_qk_dim"),
])
def test_a_size_that_is_not_an_integer_is_named(make, field):
    with pytest.raises(TypeError, match=rf"GatedDeltaNet: {field}=2.0 \(float\) must be an "
                                        r"integer"):
        jax.eval_shape(make().init, jax.random.key(0), jnp.zeros((B, 5, D)))


@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_without_eps_pads_with_finite_gradients(causal):
    """``eps=0`` (the paper's form: the normaliser of a token that reads a key is positive):
    a padding token reads none, its output is zero and no gradient is NaN."""
    m = _linear(eps=0.0, causal=causal, impl="chunk")
    x = _x(6)
    seg = jnp.array([[1, 1, 1, 1, 0, 0], [0, 2, 2, 2, 2, 2]])
    p = _params("linear")
    out = m.apply({"params": p}, x, segment_ids=seg)
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)
    grads = jax.grad(lambda p_, x_: jnp.sum(m.apply({"params": p_}, x_, segment_ids=seg) ** 2),
                     argnums=(0, 1))(p, x)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_bad_state_names_the_values(name):
    m = MODULES[name]()
    v = {"params": _params(name)}
    x = _x(5)
    want = m.state_shape(B)
    bad = (1, *want[1:])
    with pytest.raises(ValueError, match=rf"initial_state must have shape .*={re.escape(str(want))}"
                                         rf", got {re.escape(str(bad))}"):
        m.apply(v, x, initial_state=jnp.zeros(bad))
    with pytest.raises(TypeError, match="initial_state must be floating point, got dtype int32"):
        m.apply(v, x, initial_state=jnp.zeros(want, jnp.int32))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(batch, seq\)=\(2, 5\)"):
        m.apply(v, x, segment_ids=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="lengths is a decode argument"):
        m.apply(v, x, lengths=jnp.array([1, 2]))


def test_bidirectional_linear_attention_has_no_state():
    m = _linear(causal=False)
    v = {"params": _params("linear")}
    x = _x(5)
    for kw in ({"return_state": True}, {"initial_state": jnp.zeros((B, 2, 8, 9))}):
        with pytest.raises(ValueError, match="need causal=True"):
            m.apply(v, x, **kw)

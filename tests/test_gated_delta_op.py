"""The chunked gated delta rule (``impl="chunk"``: ``prep.prepare`` + the reference scan under the
shared ``jax.custom_vjp``) against the token-level recurrence: outputs, final states and
gradients for every float input, per-head and per-channel decay, linear attention (beta None),
segments with skipped tokens and resets, chunk sizes, bfloat16, jit, the saved residuals (no
per-token state), the input checks and the registry's ``core.gated_delta_rule``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.gated_delta import gated_delta_rule, recurrent_reference

F32 = jnp.float32
# (output, gradient) tolerance relative to max(1, max |reference|), per input dtype: the op
# computes in float32 whatever the input dtype, so bfloat16 costs only the output's rounding
TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (1e-2, 2e-2)}
_op = jax.jit(gated_delta_rule, static_argnames=("impl", "chunk_size", "group_chunks"))


def _inputs(seed, b=2, t=37, n=2, h=8, vw=5, *, per_channel=False, beta=True, g_scale=0.5,
            dtype=F32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, t, n, h))
    k = jax.random.normal(ks[1], (b, t, n, h))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, n, vw))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, n, h) if per_channel else (b, t, n)))
    bt = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, n))) if beta else None
    s0 = jax.random.normal(ks[5], (b, n, h, vw))
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g * g_scale), cast(bt), s0


def _segments(seed, b, t):
    """Random ids: runs of 1..3 with ~20% skipped tokens; row 0 also skips a whole chunk of 16."""
    rng = np.random.RandomState(seed)
    ids = np.cumsum(rng.rand(b, t) < 0.1, axis=1) % 3 + 1
    ids[rng.rand(b, t) < 0.2] = 0
    ids[0, 16:32] = 0
    return jnp.asarray(ids, jnp.int32)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "group_chunks"))
def _value_and_grads(q, k, v, g, beta, s0, segment_ids, *, impl, chunk_size, group_chunks=None):
    def loss(q, k, v, g, beta, s0):
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=segment_ids,
                                impl=impl, chunk_size=chunk_size, group_chunks=group_chunks)
        w = jnp.cos(jnp.arange(o.size, dtype=F32)).reshape(o.shape)
        return jnp.sum(o.astype(F32) * w) + jnp.sum(s * jnp.sin(s)), (o, s)
    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(
        q, k, v, g, beta, s0)
    return o, s, grads


def _close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    bound = tol * max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert np.isfinite(actual).all(), what
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _assert_matches_recurrent(args, segment_ids, chunk_size, dtype=F32, group_chunks=None):
    o_tol, g_tol = TOL[dtype]
    o, s, grads = _value_and_grads(*args, segment_ids, impl="chunk", chunk_size=chunk_size,
                                   group_chunks=group_chunks)
    o_ref, s_ref, grads_ref = _value_and_grads(*args, segment_ids, impl="recurrent", chunk_size=1)
    assert o.dtype == args[2].dtype and s.dtype == F32
    _close(o, o_ref, o_tol, "output")
    _close(s, s_ref, o_tol, "final state")
    for name, d, d_ref in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, grads_ref,
                              strict=True):
        if d_ref is None:
            assert d is None
            continue
        assert d.dtype == d_ref.dtype
        _close(d, d_ref, g_tol, f"d{name}")
    return o, s


@pytest.mark.parametrize("per_channel,beta,segments,chunk_size", [
    (False, True, True, 16),     # GDN (T = 37, not a multiple of the chunk), skipped tokens,
                                 # resets, a fully skipped chunk
    (True, True, True, 16),      # KDA (per-channel decay)
    (True, True, False, 64),     # KDA, one padded chunk
    (False, False, True, 64),    # gated linear attention
    (True, False, False, 1),     # per-channel gated linear attention, chunk of one token
    (False, True, True, 1),
])
def test_chunk_equals_recurrent(per_channel, beta, segments, chunk_size):
    args = _inputs(0, per_channel=per_channel, beta=beta)
    _assert_matches_recurrent(args, _segments(1, 2, 37) if segments else None, chunk_size)


@pytest.mark.parametrize("per_channel,beta,group_chunks", [
    (False, True, 1),    # GDN, every chunk its own group
    (True, True, 2),     # KDA, 5 chunks in 3 groups: the last group padded with a skipped chunk
    (False, False, 3),   # gated linear attention
])
def test_grouped_passes_equal_recurrent(per_channel, beta, group_chunks):
    """T = 37 in chunks of 8 is 5 chunks; the forward and backward passes run group by group
    (the state and its cotangent carried across groups), with resets and skipped tokens."""
    args = _inputs(2, per_channel=per_channel, beta=beta)
    _assert_matches_recurrent(args, _segments(3, 2, 37), 8, group_chunks=group_chunks)


@pytest.mark.parametrize("per_channel", [False, True])
def test_large_decay_stays_finite_and_exact(per_channel):
    """Decays of -1e3 a token (a chunk's cumulative decay reaches -1e4, as KDA's gate can): every
    exponent is formed <= 0, so nothing overflows and the result is still the recurrence's."""
    q, k, v, g, beta, s0 = _inputs(2, per_channel=per_channel)      # shapes as above: no compile
    g = jnp.where(jax.random.uniform(jax.random.PRNGKey(3), g.shape) < 0.3, -1e3, g * 20)
    assert float(jnp.min(jnp.cumsum(g[:, :16], axis=1))) < -1e3
    _assert_matches_recurrent((q, k, v, g, beta, s0), _segments(4, 2, 37), 16)


def test_fully_skipped_row_keeps_its_state():
    """A row whose every token is skipped outputs zeros, passes its initial state through and
    stays finite in the gradients (the other row resets and skips inside chunks)."""
    args = _inputs(18, per_channel=True)               # the shapes of a case above: no compile
    ids = _segments(19, 2, 37).at[0].set(0)
    o, s = _assert_matches_recurrent(args, ids, 16)
    assert float(jnp.abs(o[0]).max()) == 0.0
    np.testing.assert_array_equal(np.asarray(s[0]), np.asarray(args[5][0]))


@pytest.mark.parametrize("impl", ["chunk", "pallas"])
def test_skipped_tokens_are_never_read(impl):
    """NaN and inf in skipped tokens' q, k, v, g and beta change no output, state or gradient
    (the chunked forms multiply every token into products that the masks zero afterwards:
    the op zeroes skipped tokens first)."""
    args = _inputs(18, per_channel=True)               # the shapes of a case above
    ids = _segments(19, 2, 37)
    skip = (ids == 0)[..., None, None]
    poison = lambda a, val: jnp.where(skip.reshape(skip.shape[:2] + (1,) * (a.ndim - 2)),  # noqa: E731
                                      val, a)
    poisoned = (*(poison(a, v) for a, v in zip(args[:5], (jnp.nan, jnp.inf, jnp.nan, -jnp.inf,
                                                          jnp.nan), strict=True)), args[5])
    want = _value_and_grads(*args, ids, impl=impl, chunk_size=16)
    got = _value_and_grads(*poisoned, ids, impl=impl, chunk_size=16)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_packed_equals_separate():
    """Two sequences packed in one row (the second after three skipped tokens) give each one's
    own outputs; the initial state enters only the first; the final state is the second's."""
    qa, ka, va, ga, ba, s0 = _inputs(5, b=1, t=14, per_channel=True)
    qb, kb, vb, gb, bb, _ = _inputs(6, b=1, t=14, per_channel=True)
    pad = lambda x: jnp.zeros((1, 3, *x.shape[2:]), x.dtype)  # noqa: E731
    cat = lambda a, b: jnp.concatenate([a, pad(a), b], axis=1)  # noqa: E731
    ids = jnp.asarray([[1] * 14 + [0] * 3 + [2] * 14], jnp.int32)
    o, s = _op(cat(qa, qb), cat(ka, kb), cat(va, vb), cat(ga, gb), cat(ba, bb),
               initial_state=s0, segment_ids=ids, chunk_size=8)
    oa, _ = _op(qa, ka, va, ga, ba, initial_state=s0, chunk_size=8)
    ob, sb = _op(qb, kb, vb, gb, bb, initial_state=jnp.zeros_like(s0), chunk_size=8)
    _close(o[:, :14], oa, 1e-5, "first sequence")
    assert float(jnp.abs(o[:, 14:17]).max()) == 0.0
    _close(o[:, 17:], ob, 1e-5, "second sequence")
    _close(s, sb, 1e-5, "final state")


def test_bfloat16_inputs():
    args = _inputs(7, per_channel=True, dtype=jnp.bfloat16)
    _assert_matches_recurrent(args, _segments(8, 2, 37), 16, dtype=jnp.bfloat16)


def test_jit_equals_eager():
    q, k, v, g, beta, s0 = _inputs(9, b=1, t=7, n=1, h=3, vw=2, per_channel=True)
    run = functools.partial(gated_delta_rule, initial_state=s0, chunk_size=4)
    for a, b in zip(run(q, k, v, g, beta), jax.jit(run)(q, k, v, g, beta), strict=True):
        _close(a, b, 1e-6, "jit vs eager")


@settings(max_examples=3, deadline=None)
@given(b=st.integers(1, 2), t=st.integers(1, 24), n=st.integers(1, 2), h=st.integers(1, 6),
       vw=st.integers(1, 6), chunk_size=st.sampled_from([1, 3, 8, 16]),
       per_channel=st.booleans(), beta=st.booleans(), segments=st.booleans(),
       seed=st.integers(0, 99))
def test_chunk_equals_recurrent_hypothesis(b, t, n, h, vw, chunk_size, per_channel, beta,
                                           segments, seed):
    args = _inputs(seed, b, t, n, h, vw, per_channel=per_channel, beta=beta)
    ids = None
    if segments:
        rng = np.random.RandomState(seed)
        ids = jnp.asarray(rng.randint(0, 3, (b, t)), jnp.int32)
    _assert_matches_recurrent(args, ids, chunk_size)


def test_saved_residuals_hold_no_per_token_state():
    """The chunked op's VJP keeps the inputs and one state per chunk; the token-level recurrence's
    autodiff keeps a state per token (the test can tell the two apart)."""
    b, t, n, h, vw = 1, 32, 2, 4, 3
    q, k, v, g, beta, _ = _inputs(10, b, t, n, h, vw, per_channel=True)
    per_token_state = b * t * n * h * vw

    def largest(impl):
        op = functools.partial(gated_delta_rule, impl=impl, chunk_size=8)
        pull_back = jax.jit(lambda *a: jax.vjp(op, *a)[1])(q, k, v, g, beta)
        return max(leaf.size for leaf in jax.tree.leaves(pull_back))
    assert largest("chunk") < per_token_state
    assert largest("recurrent") >= per_token_state


def test_registry_chunk_is_the_op():
    from attnhut_jax import core
    q, k, v, g, beta, s0 = _inputs(11, b=1, t=9, n=1, h=3, vw=2)
    ids = jnp.asarray([[1, 1, 0, 2, 2, 2, 0, 3, 3]], jnp.int32)
    kw = dict(initial_state=s0, segment_ids=ids)
    via_registry = jax.jit(core.gated_delta_rule, static_argnames=("impl", "chunk_size"))
    for a, b in zip(via_registry(q, k, v, g, beta, impl="chunk", chunk_size=4, **kw),
                    _op(q, k, v, g, beta, impl="chunk", chunk_size=4, **kw), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_are_named():
    q, k, v, g, beta, s0 = _inputs(13, b=1, t=5, n=2, h=4, vw=3)
    op = functools.partial(gated_delta_rule, impl="chunk")
    cases = [
        (dict(impl="flash"), ValueError, "impl='flash'"),
        (dict(k=k[..., :3]), ValueError, r"q and k must be \(B, T, N, H\) and equal"),
        (dict(v=v[:, :4]), ValueError, r"v must be \(B, T, N, V\)=\(1, 5, 2, V\)"),
        (dict(g=g[..., None, None]), ValueError, r"g must be \(B, T, N\)=\(1, 5, 2\)"),
        (dict(beta=beta[..., None]), ValueError, r"beta must be \(B, T, N\)=\(1, 5, 2\)"),
        (dict(initial_state=s0[..., :2]), ValueError, r"initial_state must be \(B, N, H, V\)"),
        (dict(segment_ids=jnp.ones((1, 4), jnp.int32)), ValueError, r"segment_ids must be \(B, T\)"),
        (dict(segment_ids=jnp.ones((1, 5))), TypeError, "segment_ids must be integers"),
        (dict(chunk_size=0), ValueError, "chunk_size must be a positive int, got 0"),
    ]
    for change, error, message in cases:
        kw = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=None, segment_ids=None)
        kw.update(change)
        args = [kw.pop(name) for name in ("q", "k", "v", "g", "beta")]
        with pytest.raises(error, match=message):
            op(*args, **kw)


def test_reference_is_what_recurrent_runs():
    """``impl="recurrent"`` is the oracle itself (so the comparisons above are against it)."""
    q, k, v, g, beta, s0 = _inputs(14, t=6)
    for a, b in zip(gated_delta_rule(q, k, v, g, beta, initial_state=s0, impl="recurrent"),
                    recurrent_reference(q, k, v, g, beta, initial_state=s0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("impl,beta,group_chunks", [("pallas", True, 2),
                                                     ("pallas_tpu", False, None)])
def test_pallas_impls_equal_chunk(impl, beta, group_chunks):
    """The kernels (in interpret mode here) under the same custom_vjp as ``chunk``: outputs, final
    state and every gradient equal ``chunk``'s (which equals the recurrence, above); ``pallas``
    runs its 3 chunks in 2 groups."""
    args = _inputs(15, b=1, t=11, n=1, h=4, vw=3, beta=beta)   # prepare's forms: tested above
    ids = jnp.asarray([[1, 1, 1, 0, 0, 2, 2, 2, 2, 0, 2]], jnp.int32)
    o, s, grads = _value_and_grads(*args, ids, impl=impl, chunk_size=4, group_chunks=group_chunks)
    o_ref, s_ref, grads_ref = _value_and_grads(*args, ids, impl="chunk", chunk_size=4)
    _close(o, o_ref, 1e-5, "output")
    _close(s, s_ref, 1e-5, "final state")
    q, k, v, g, beta, s0 = args      # the forward alone (the kernels then write no states)
    for a, b in zip(_op(q, k, v, g, beta, initial_state=s0, segment_ids=ids, impl=impl,
                        chunk_size=4, group_chunks=group_chunks), (o_ref, s_ref), strict=True):
        _close(a, b, 1e-5, "forward only")
    for name, d, d_ref in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, grads_ref,
                              strict=True):
        if d_ref is not None:
            _close(d, d_ref, 1e-4, f"d{name}")


@pytest.mark.parametrize("per_channel", [False, True])
def test_precision_reaches_every_product(per_channel):
    from tests.jaxpr_walk import jaxpr_eqns
    q, k, v, g, beta, s0 = _inputs(17, b=1, t=10, n=1, h=3, vw=2, per_channel=per_channel)
    highest = jax.lax.Precision.HIGHEST

    def loss(*a):
        o, s = gated_delta_rule(*a, initial_state=s0, chunk_size=4, precision=highest)
        return jnp.sum(o) + jnp.sum(s)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(q, k, v, g, beta)
    dots = [e for e in jaxpr_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert dots and all(e.params["precision"] == (highest, highest) for e in dots), \
        {str(e.params["precision"]) for e in dots}

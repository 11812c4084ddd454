"""Training DeepSeekSparseAttention at long context: the index losses computed inside the module
(equal to attnhut's materialised losses in value and in every gradient, on every impl), the
detached-indexer option, packed sequences and padding, and no (T, T) array with the loss on."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import jaxpr_shapes

import attnhut_jax as ah
from attnhut_jax import core

D, N = 32, 4
IMPLS = ("reference", "xla", "pallas")


def _module(impl="xla", **kw):
    return ah.DeepSeekSparseAttention(D, N, **({"top_k": 5, "num_index_heads": 2,
                                                "index_head_dim": 8} | kw), impl=impl)


def _params(m, x):
    return nn.unbox(jax.jit(m.init)(jax.random.key(1), x))["params"]


def _close(a, b, atol, err_msg=""):
    jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(
        np.asarray(u), np.asarray(v), atol=atol, rtol=atol, err_msg=err_msg), a, b)


def sparse_oracle(m, params, x):
    """DeepSeek-V3.2's sparse-stage loss from dense arrays, written from its definition: the
    main softmax over each query's selection (``aux['selected']``), summed over heads and
    normalised over the selection (teacher, a constant), against the softmax of the index
    scores over the same selection (student); KL summed over keys, mean over queries."""
    _, aux = m.apply({"params": params}, x, return_aux=True)
    sel = aux["selected"]
    b, t, _ = x.shape
    q, k, _ = jnp.split(x @ params["qkv"]["kernel"], 3, axis=-1)
    q, k = (a.reshape(b, t, N, D // N) for a in (q, k))
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) * (D // N) ** -0.5
    probs = jax.nn.softmax(jnp.where(sel[:, None], logits, -jnp.inf), axis=-1)
    p = jax.lax.stop_gradient(jnp.where(sel, probs.sum(1), 0.0))
    teacher = p / p.sum(-1, keepdims=True)
    log_student = jax.nn.log_softmax(jnp.where(sel, aux["index_scores"], -jnp.inf), axis=-1)
    kl = jnp.where(sel, teacher * (jnp.log(jnp.where(sel, teacher, 1.0))
                                   - jnp.where(sel, log_student, 0.0)), 0.0)
    return kl.sum(-1).mean()


def dense_oracle(m, params, x):
    _, aux = m.apply({"params": params}, x, return_aux=True)
    return ah.dsa_index_aux_loss(aux["index_scores"], aux["dense_weights"])


def _loss_fn(m, kind, **kw):
    return lambda p, x: m.apply({"params": p}, x, index_loss=kind, **kw)[1]


CASES = [(True, 21), (False, 13)]  # (causal, T): lengths that are no multiple of any tile


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("causal,t", CASES, ids=["causal-T21", "bidir-T13"])
def test_index_loss_equals_the_materialised_loss_on_every_impl(kind, causal, t):
    x = jax.random.normal(jax.random.key(0), (2, t, D))
    ref = _module("reference", causal=causal)
    params = _params(ref, x)
    oracle = dense_oracle if kind == "dense" else sparse_oracle
    v_ref, g_ref = jax.jit(jax.value_and_grad(lambda p, x: oracle(ref, p, x), argnums=(0, 1)))(
        params, x)
    assert float(v_ref) > 1e-3
    # the loss trains the indexer and (attnhut's default) the input, nothing else
    assert float(jnp.abs(g_ref[1]).max()) > 1e-4
    assert all(float(jnp.abs(a).max()) > 1e-5 for a in jax.tree.leaves(g_ref[0]["indexer"]))
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(
        (g_ref[0]["qkv"], g_ref[0]["proj"])))
    # pallas differs from xla only in its selection kernels, which only the sparse loss reads
    for impl in IMPLS if kind == "sparse" and causal else IMPLS[:2]:
        v, g = jax.jit(jax.value_and_grad(_loss_fn(_module(impl, causal=causal), kind),
                                          argnums=(0, 1)))(params, x)
        np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5, err_msg=impl)
        _close(g, g_ref, 1e-4, impl)


def _both_losses(m, **kw):
    """(out, dense loss, sparse loss) of one module in one program."""
    def run(v, x):
        out, dense = m.apply(v, x, index_loss="dense", **kw)
        return out, dense, m.apply(v, x, index_loss="sparse", **kw)[1]
    return run


def test_return_aux_with_index_loss_and_jit_equals_eager():
    x = jax.random.normal(jax.random.key(2), (2, 11, D))
    m = _module("xla")
    v = {"params": _params(m, x)}
    out, aux, loss = jax.jit(lambda v, x: m.apply(v, x, return_aux=True, index_loss="sparse"))(
        v, x)
    assert set(aux) == {"index_scores", "selected", "dense_weights"}
    jit_out, jit_dense, jit_sparse = jax.jit(_both_losses(m))(v, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jit_out), atol=1e-6)
    np.testing.assert_allclose(float(loss), float(jit_sparse), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(m.apply)(v, x)), np.asarray(jit_out), atol=1e-6)
    eager_out, eager_dense, eager_sparse = _both_losses(m)(v, x)
    np.testing.assert_allclose(np.asarray(eager_out), np.asarray(jit_out), atol=1e-6)
    np.testing.assert_allclose(float(eager_dense), float(jit_dense), rtol=1e-6)
    np.testing.assert_allclose(float(eager_sparse), float(jit_sparse), rtol=1e-6)


def test_detached_index_input_trains_only_the_indexer():
    x = jax.random.normal(jax.random.key(3), (2, 15, D))
    m, m_det = _module("xla"), _module("xla", detach_index_input=True)
    params = _params(m, x)

    def grads(m):
        run = _both_losses(m)
        return jax.jit(jax.grad(lambda p, x: sum(run({"params": p}, x)[1:]), argnums=(0, 1)))(
            params, x)

    g, g_det = grads(m), grads(m_det)
    assert float(jnp.abs(g[1]).max()) > 1e-4  # attnhut's default: the losses reach x
    assert np.all(np.asarray(g_det[1]) == 0)
    _close(g_det[0], g[0], 1e-6)  # the same parameter gradients (the indexer's)
    assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g_det[0]["indexer"]))
    # the output is unchanged by the option
    v = {"params": params}
    np.testing.assert_array_equal(np.asarray(jax.jit(m.apply)(v, x)),
                                  np.asarray(jax.jit(m_det.apply)(v, x)))


def test_bad_index_loss_and_packing_arguments_raise():
    x = jnp.zeros((1, 6, D))
    m = _module("xla")
    v = jax.jit(m.init)(jax.random.key(0), x)
    with pytest.raises(ValueError, match="index_loss='kl'"):
        m.apply(v, x, index_loss="kl")
    with pytest.raises(ValueError, match="positions must have shape"):
        m.apply(v, x, positions=jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        m.apply(v, x, segment_ids=jnp.zeros((1, 6)))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_index_loss_builds_no_sequence_by_sequence_array(kind, impl):
    t = 300
    m = _module(impl, top_k=8)
    x = jnp.zeros((1, t, D))
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    seg = jnp.ones((1, t), jnp.int32)
    step = jax.value_and_grad(lambda v, x: sum(
        a.sum() for a in m.apply(v, x, index_loss=kind, segment_ids=seg)), argnums=(0, 1))
    shapes = list(jaxpr_shapes(jax.make_jaxpr(step)(v, x).jaxpr))
    assert shapes
    bad = [s for s in shapes if sum(d >= t // 2 for d in s) >= 2]
    assert not bad, bad
    ref = _module("reference", top_k=8)
    ref_shapes = jaxpr_shapes(jax.make_jaxpr(lambda v, x: ref.apply(v, x, index_loss=kind))(
        v, x).jaxpr)
    assert any(sum(d >= t // 2 for d in s) >= 2 for s in ref_shapes)


# ----------------------------------------------------------------------------- packed sequences

LENGTHS = (5, 9, 3)  # segment starts 0, 5, 14: no alignment; then 2 padding tokens
T_PACKED = sum(LENGTHS) + 2


def _packed_ids():
    ids = np.zeros((2, T_PACKED), np.int32)
    pos = 0
    for i, n in enumerate(LENGTHS):
        ids[0, pos:pos + n] = i + 1
        pos += n
    ids[1, :] = ids[0, ::-1]  # second row: padding first, segments reversed
    return jnp.asarray(ids)


def test_packed_rows_equal_each_segment_alone_on_every_impl():
    """Each impl's packed output equals the reference's packed output, which equals every
    segment run alone (any segment starts); unpacked, the impls already agree
    (test_token_sparse_modules.py)."""
    seg = _packed_ids()
    x = jax.random.normal(jax.random.key(5), (2, T_PACKED, D))
    params = _params(_module("reference"), x)
    v = {"params": params}
    for causal in (True, False):
        ref = _module("reference", causal=causal)
        out = np.asarray(jax.jit(lambda v, x, s, m=ref: m.apply(v, x, segment_ids=s))(v, x, seg))
        assert np.all(np.isfinite(out))
        alone = jax.jit(ref.apply)  # one compile per segment length, shared by both rows
        for b in range(2):
            for sid in range(1, len(LENGTHS) + 1):
                where = np.flatnonzero(np.asarray(seg[b]) == sid)
                np.testing.assert_allclose(out[b, where], np.asarray(alone(v, x[b:b + 1, where])[0]),
                                           atol=1e-5, err_msg=f"causal={causal} row {b} seg {sid}")
        for impl in IMPLS[1:]:
            m = _module(impl, causal=causal)
            got = jax.jit(lambda v, x, s, m=m: m.apply(v, x, segment_ids=s))(v, x, seg)
            np.testing.assert_allclose(np.asarray(got), out, atol=1e-5,
                                       err_msg=f"{impl} causal={causal}")


def test_no_gradient_crosses_segments_and_padding_nan_changes_nothing():
    seg = _packed_ids()
    x = jax.random.normal(jax.random.key(6), (2, T_PACKED, D))
    params = _params(_module("reference"), x)
    v = {"params": params}
    one_BT = np.asarray(seg) == 2
    for impl in IMPLS:
        m = _module(impl, causal=False)
        # outputs of segment 2 against every input: zero outside segment 2 (exactly)
        g = np.asarray(jax.jit(jax.grad(lambda x, m=m: jnp.where(
            one_BT[..., None], m.apply(v, x, segment_ids=seg), 0.0).sum()))(x))
        assert np.all(g[~one_BT] == 0), impl
        assert np.abs(g[one_BT]).max() > 0
    m = _module("xla", causal=False)
    # the losses of segment 2's queries (the others as padding) read no other segment
    run = _both_losses(m, segment_ids=jnp.where(one_BT, seg, 0))
    gl = np.asarray(jax.jit(jax.grad(lambda x: sum(run(v, x)[1:])))(x))
    assert np.all(gl[~one_BT] == 0) and np.abs(gl[one_BT]).max() > 0
    # NaN in padding: the same outputs and losses, finite everywhere
    run = jax.jit(_both_losses(m, segment_ids=seg))
    clean, dirty = run(v, x), run(v, jnp.where((np.asarray(seg) == 0)[..., None], jnp.nan, x))
    for a, b in zip(clean, dirty, strict=True):
        assert np.all(np.isfinite(np.asarray(b)))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_packed_losses_are_the_query_weighted_mean_of_the_segments_losses():
    seg = _packed_ids()
    x = jax.random.normal(jax.random.key(7), (2, T_PACKED, D))
    params = _params(_module("reference"), x)
    v = {"params": params}
    count = np.asarray([(np.asarray(seg) == i + 1).sum() for i in range(len(LENGTHS))])
    assert float(core.query_weights(seg, 2, T_PACKED).sum()) == count.sum()
    packed = {}
    for impl in ("reference", "xla"):
        m = _module(impl)
        packed[impl] = np.asarray(jax.jit(_both_losses(m, segment_ids=seg))(v, x)[1:])
        alone = jax.jit(_both_losses(m))
        per_seg = np.asarray([np.mean([alone(v, x[b:b + 1, np.flatnonzero(
            np.asarray(seg[b]) == sid)])[1:] for b in range(2)], axis=0)
            for sid in range(1, len(LENGTHS) + 1)])  # (segments, [dense, sparse])
        want = (per_seg * count[:, None]).sum(0) / count.sum()
        np.testing.assert_allclose(packed[impl], want, rtol=1e-5, err_msg=impl)
    np.testing.assert_allclose(packed["xla"], packed["reference"], rtol=1e-5)

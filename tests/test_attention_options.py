"""The softmax options of d9d / modern_llm / current open models on ``GroupedQueryAttention`` and
the DeepSeek layout of ``MultiHeadLatentAttention``.

Every option is checked against a masked-dense reference written here from the definitions
(no ``core`` function: RoPE, RMSNorm, the window, sinks and sink tokens spelled out), outputs
and gradients of every parameter and the input, float32; the sliding-window path builds no
(T, T) array (jaxpr); decode == prefill, packed == separate and causality by gradients with the
options on; bad combinations raise ``ValueError`` naming the values. The RoPE scalings are
checked against transformers' own functions in ``tests/torch_parity/test_hf_parity.py``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_harness import check_decode_equals_prefill, close
from jaxpr_walk import jaxpr_shapes

import attnhut_jax as ah
from attnhut_jax import core

B, T, D = 2, 13, 32

GQA_CASES = {
    "head_dim_qknorm_rope": dict(head_dim=12, qk_norm=True, rope_theta=100.0),
    "partial_interleaved_gate": dict(rope_theta=50.0, rope_dim=4, rope_style="interleaved",
                                     output_gate=True, bias=True, qk_norm=True,
                                     qk_norm_zero_centered=True, qk_norm_eps=1e-5),
    "window_sinks": dict(window=4, num_sink_logits=4, rope_theta=10.0),
    "window_sink_tokens": dict(window=5, num_sink_tokens=2, bias=True, qk_norm=True),
    "sink_tokens": dict(num_sink_tokens=3, rope_theta=10.0, num_sink_logits=4),
    "bidirectional_window": dict(causal=False, window=(3, 2), num_sink_tokens=1,
                                 num_sink_logits=4),
    "everything": dict(head_dim=6, qk_norm=True, output_gate=True, rope_theta=20.0, rope_dim=4,
                       window=3, num_sink_logits=4, num_sink_tokens=2,
                       rope_scaling=core.RopeScaling("yarn", 4.0, 8)),
}


def make_gqa(kind="gqa", **kw):
    args = dict(dim=D, num_heads=4, causal=True)
    args.update(kw)
    if kind == "gqa":
        return ah.GroupedQueryAttention(num_kv_heads=2, **args)
    return {"standard": ah.StandardAttention, "mqa": ah.MultiQueryAttention}[kind](**args)



# ----------------------------------------------------------------------------- reference


def _rope_ref(x, pos, r, theta, style, inv=None, scale=1.0):
    """RoPE from its definition: pair (a, b) rotated by angle pos * theta^(-2i/r)."""
    if inv is None:
        inv = theta ** (-np.arange(0, r, 2) / r)
    ang = pos[:, None] * jnp.asarray(inv, jnp.float32)  # (T, r/2)
    c, s = jnp.cos(ang)[None, :, None] * scale, jnp.sin(ang)[None, :, None] * scale
    rot, rest = x[..., :r], x[..., r:]
    if style == "half":
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        out = jnp.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([a * c - b * s, b * c + a * s], axis=-1).reshape(rot.shape)
    return jnp.concatenate([out, rest], axis=-1)


def gqa_reference(m, p, x, positions=None):
    b, t, _ = x.shape
    h = m.width
    n, kv = m.num_heads, m.kv_heads

    def lin(name, a):
        return a @ p[name]["kernel"] + (p[name]["bias"] if "bias" in p[name] else 0.0)

    def project(a):  # q (.., N, H), k and v (.., K, H) of the module's layout
        lead = a.shape[:-1]
        if "qkv" in p:
            q_, k_, v_ = jnp.split(lin("qkv", a), 3, -1)
        elif "kv" in p:
            q_, (k_, v_) = lin("q", a), jnp.split(lin("kv", a), 2, -1)
        else:
            q_, k_, v_ = lin("q", a), lin("k", a), lin("v", a)
        return (q_.reshape(*lead, n, h), k_.reshape(*lead, kv, h), v_.reshape(*lead, kv, h))

    def norm(a, w):
        w = w + 1.0 if m.qk_norm_zero_centered else w
        return a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + m.qk_norm_eps) * w

    q, k, v = project(x)
    if m.qk_norm:
        q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])
    if m.rope_theta is not None:
        r = m.rope_dim or h
        pos = jnp.arange(t, dtype=jnp.float32) if positions is None else positions
        inv, scale = None, 1.0
        if m.rope_scaling is not None:
            inv = core.rope_inverse_frequencies(r, m.rope_theta, m.rope_scaling)
            scale = m.rope_scaling.attention_scale()
        q = _rope_ref(q, pos, r, m.rope_theta, m.rope_style, inv, scale)
        k = _rope_ref(k, pos, r, m.rope_theta, m.rope_style, inv, scale)
    P = m.num_sink_tokens
    if P:
        _, sk, sv = project(p["sink_tokens"])
        if m.qk_norm:
            sk = norm(sk, p["k_norm"])
        k = jnp.concatenate([jnp.broadcast_to(sk, (b, P, kv, h)), k], 1)
        v = jnp.concatenate([jnp.broadcast_to(sv, (b, P, kv, h)), v], 1)
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    keep = np.ones((t, t), bool)
    if m.causal:
        keep &= j <= i
    if m.window is not None:
        left, right = (m.window, 0) if isinstance(m.window, int) else m.window
        keep &= (j > i - left) & (j <= i + right)
    keep = np.concatenate([np.ones((t, P), bool), keep], 1)
    g = n // kv
    k = jnp.repeat(k, g, axis=2)
    v = jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * h ** -0.5
    logits = jnp.where(keep, logits, -jnp.inf)
    if m.num_sink_logits:
        sink = jnp.broadcast_to(p["sinks"][None, :, None, None], (*logits.shape[:3], 1))
        logits = jnp.concatenate([logits, sink], -1)
    w = jax.nn.softmax(logits, -1)[..., : keep.shape[1]]
    out = jnp.einsum("bnts,bsnh->btnh", w, v).reshape(b, t, n * h)
    if m.output_gate:
        out = out * jax.nn.sigmoid(lin("gate", x))
    return lin("proj", out)


def _init(m, x, seed=0):
    params = nn.unbox(jax.jit(m.init)(jax.random.key(seed), x))["params"]
    # non-trivial norm weights and sink logits (their inits are ones / zeros)
    leaves = {}
    rng = np.random.default_rng(seed)
    for name in ("q_norm", "k_norm", "sinks"):
        if name in params:
            leaves[name] = jnp.asarray(rng.normal(0.5, 0.3, params[name].shape), jnp.float32)
    return {**params, **leaves}


@functools.cache
def _x(seed=0):
    return jax.random.normal(jax.random.key(100 + seed), (B, T, D))


# ----------------------------------------------------------------------------- tests


# Standard and MQA run the same shared options (dense_options) through their own projections
OPTION_RUNS = [(c, "gqa") for c in GQA_CASES] + [
    (c, k) for k in ("standard", "mqa") for c in ("everything", "bidirectional_window")]


@pytest.mark.parametrize("case, kind", OPTION_RUNS)
def test_gqa_options_match_the_reference(case, kind):
    m = make_gqa(kind, **GQA_CASES[case])
    x = _x()
    p = _init(m, x)
    cot = jax.random.normal(jax.random.key(7), x.shape)  # the output's shape

    @jax.jit  # the module and the reference, outputs and gradients: one compiled program
    def both(p, x):
        def out_and_grad(f):
            y, pull = jax.vjp(f, p, x)
            return y, pull(cot)
        return (out_and_grad(lambda p, x: m.apply({"params": p}, x)),
                out_and_grad(lambda p, x: gqa_reference(m, p, x)))

    (got, g_got), (want, g_want) = both(p, x)
    assert got.shape == cot.shape
    close(got, want, 1e-5, case)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got),
                            jax.tree_util.tree_leaves(g_want), strict=True):
        close(a, b, 1e-4, f"{case} grad {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("case, window", [("window_sinks", 70), ("window_sink_tokens", 70),
                                          ("bidirectional_window", (70, 40))])
def test_windows_across_key_blocks(case, window):
    """T = 150 spans three 64-key blocks of the block-sparse op: the block tables, the sink
    keys in block 0, the shifted bidirectional window and a packed row, against the reference
    (outputs and the input's gradient)."""
    m = make_gqa(**{**GQA_CASES[case], "window": window})
    t = 150
    x = jax.random.normal(jax.random.key(3), (1, t, D))
    p = _init(m, x)
    seg = jnp.asarray([[1] * 100 + [2] * 50], jnp.int32)
    pos = jnp.asarray([list(range(100)) + list(range(50))], jnp.int32)

    @jax.jit  # every output and gradient below from one compiled program
    def run(p, x):
        def out_and_grad(f):
            y, pull = jax.vjp(f, x)
            return y, pull(jnp.cos(y))[0]  # the gradient of sum(sin(out))
        mod, ref = (out_and_grad(lambda x: m.apply({"params": p}, x)),
                    out_and_grad(lambda x: gqa_reference(m, p, x)))
        if m.num_sink_tokens:
            return mod, ref, None  # sink tokens + window + segments run dense (test above)
        packed = m.apply({"params": p}, x, segment_ids=seg, positions=pos)
        return mod, ref, (packed, m.apply({"params": p}, x[:, :100]),
                          m.apply({"params": p}, x[:, 100:]))

    (out, g), (want, g_ref), packed = run(p, x)
    close(out, want, 1e-5, case)
    close(g, g_ref, 1e-4, case)
    if packed is None:
        return
    packed, alone1, alone2 = packed
    close(packed[:, :100], alone1, 1e-5, "segment 1")
    close(packed[:, 100:], alone2, 1e-5, "segment 2")


def test_positions_feed_rope():
    m = make_gqa(rope_theta=30.0, rope_dim=4)
    x = _x()
    p = _init(m, x)
    pos = jnp.broadcast_to(jnp.arange(T) + 50, (B, T)).astype(jnp.int32)
    got, want, unshifted = jax.jit(lambda p, x: (  # one compiled program
        m.apply({"params": p}, x, positions=pos),
        gqa_reference(m, p, x, positions=jnp.arange(T, dtype=jnp.float32) + 50),
        m.apply({"params": p}, x)))(p, x)
    close(got, want, 1e-5)
    # RoPE scores depend on differences only: a shift changes nothing beyond rounding
    close(got, unshifted, 1e-4)


@pytest.mark.parametrize("case", ["window_sinks", "window_sink_tokens", "bidirectional_window"])
def test_the_window_path_builds_no_square_array(case):
    m = make_gqa(**GQA_CASES[case])
    t = 160
    x = jnp.zeros((1, t, D))
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v, x: jax.grad(lambda x: m.apply(v, x).sum())(x))(v, x).jaxpr
    bad = [s for s in jaxpr_shapes(jaxpr) if sum(d >= t for d in s) >= 2]
    assert not bad, bad


@pytest.mark.parametrize("case", ["window_sinks", "window_sink_tokens", "everything"])
def test_causal_by_gradients(case):
    m = make_gqa(**GQA_CASES[case])
    x = _x()
    p = _init(m, x)
    rows = jnp.asarray([0, 6, T - 1])

    @jax.jit
    def grads(x):  # d out[:, t] / d x for each t in rows, one program
        return jax.vmap(lambda t: jax.grad(
            lambda x: jnp.sum(m.apply({"params": p}, x) * (jnp.arange(T) == t)[:, None]))(x))(rows)

    g = np.asarray(grads(x))
    for i, t in enumerate(rows.tolist()):
        assert np.all(g[i][:, t + 1:] == 0), (case, t)
        assert np.any(g[i][:, t] != 0)
        if m.window is not None:  # the window hides what lies before it
            assert np.all(g[i][:, : max(0, t + 1 - m.window)] == 0), (case, t)


@pytest.mark.parametrize("case, kind", [
    ("window_sinks", "gqa"), ("window_sink_tokens", "gqa"), ("partial_interleaved_gate", "gqa"),
    ("everything", "gqa"), ("everything", "standard"), ("everything", "mqa")])
def test_decode_equals_prefill(case, kind):
    kw = GQA_CASES[case]
    check_decode_equals_prefill(_maker(kind, tuple(sorted(kw.items()))), _x(1))


@functools.cache
def _maker(kind, items):
    return lambda decode: make_gqa(kind, decode=decode, **dict(items))


@pytest.mark.parametrize("case", ["window_sinks", "sink_tokens", "partial_interleaved_gate"])
def test_packed_equals_separate(case):
    m = make_gqa(**GQA_CASES[case])
    x = _x()
    p = _init(m, x)
    cut = 6
    seg = jnp.asarray([[1] * cut + [2] * (T - cut), [1] * (T - 2) + [0, 0]], jnp.int32)
    pos = jnp.asarray([list(range(cut)) + list(range(T - cut)), list(range(T))], jnp.int32)
    run = jax.jit(lambda x, seg=None, pos=None: m.apply({"params": p}, x, segment_ids=seg,
                                                        positions=pos))
    out = run(x, seg, pos)
    alone = [run(x[:1, :cut]), run(x[:1, cut:]), run(x[1:, : T - 2])]
    close(out[:1, :cut], alone[0], 1e-5, "row 0 segment 1")
    close(out[:1, cut:], alone[1], 1e-5, "row 0 segment 2")
    close(out[1:, : T - 2], alone[2], 1e-5, "row 1")


def test_sink_tokens_with_window_and_segments_run_dense():
    """The block-sparse op's segment rule cannot share keys across segments, so sink tokens with
    a window and segment_ids run the dense path: still each segment alone."""
    m = make_gqa(**GQA_CASES["window_sink_tokens"])
    x = _x()
    p = _init(m, x)
    run = jax.jit(lambda x, seg=None: m.apply({"params": p}, x, segment_ids=seg))
    cut = 6
    seg = jnp.asarray([[1] * cut + [2] * (T - cut)] * B, jnp.int32)
    out = run(x, seg)
    close(out[:, :cut], run(x[:, :cut]), 1e-5, "segment 1")
    close(out[:, cut:], run(x[:, cut:]), 1e-5, "segment 2")


@pytest.mark.parametrize("kw, match", [
    (dict(rope_dim=4), r"rope_dim=4 needs RoPE: set rope_theta"),
    (dict(rope_theta=10.0, rope_dim=5), r"rope_dim=5 must be even"),
    (dict(rope_theta=10.0, rope_dim=10), r"rope_dim=10 must be even, >= 2 and <= head_dim=8"),
    (dict(rope_theta=10.0, rope_style="neox"), r"rope_style='neox' is not one of"),
    (dict(rope_theta=-1.0), r"rope_theta=-1.0 must be > 0"),
    (dict(window=0), r"window=0: a causal module takes an int >= 1"),
    (dict(window=(3, 2)), r"window=\(3, 2\): a causal module"),
    (dict(causal=False, window=4), r"window=4: a bidirectional module takes \(left >= 1"),
    (dict(window=True), r"window=True must be an int or a tuple of ints, not bool"),
    (dict(rope_style="interleaved"), r"rope_style='interleaved' needs RoPE: set rope_theta"),
    (dict(num_sink_logits=3), r"num_sink_logits=3 must be 0 or num_heads=4"),
    (dict(num_sink_tokens=-1), r"num_sink_tokens=-1 must be >= 0"),
    (dict(head_dim=0), r"head_dim=0 must be >= 1"),
    (dict(qk_norm=True, qk_norm_eps=0.0), r"qk_norm_eps=0.0 must be > 0"),
    (dict(rope_theta=10.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
     r"rope_scaling must be a core.RopeScaling"),
])
def test_bad_options_are_refused(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_gqa(**kw).init(jax.random.key(0), _x())


@pytest.mark.parametrize("kw, match", [
    (dict(type="longrope", factor=2.0), r"type='longrope' is not one of"),
    (dict(type="linear", factor=0.0), r"factor=0.0 must be > 0"),
    (dict(type="yarn", factor=2.0), r"type='yarn' needs a positive original_max_position"),
    (dict(type="llama3", factor=8.0, original_max_position_embeddings=64, low_freq_factor=4.0,
          high_freq_factor=1.0), r"high_freq_factor=1.0 > low_freq_factor=4.0"),
    (dict(type="linear", factor=2.0, mscale_all_dim=1.0),
     r"mscale_all_dim=1.0 is YaRN's; type='linear' does not read it"),
])
def test_bad_rope_scalings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        core.RopeScaling(**kw)


def test_rope_scaling_from_hf_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match=r"RoPE scaling type 'longrope' is not implemented"):
        core.RopeScaling.from_hf({"rope_type": "longrope", "factor": 2.0}, 64)
    with pytest.raises(ValueError, match=r"unknown parameters \['wild'\]"):
        core.RopeScaling.from_hf({"rope_type": "linear", "factor": 2.0, "wild": 1}, 64)
    assert core.RopeScaling.from_hf({"rope_type": "default", "rope_theta": 1e4}) is None
    s = core.RopeScaling.from_hf({"rope_type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": 16}, 64)
    assert (s.type, s.factor, s.original_max_position_embeddings) == ("yarn", 4.0, 16)


def test_attn_mask_with_window_is_refused():
    m = make_gqa(window=4)
    x = _x()
    p = _init(m, x)
    with pytest.raises(ValueError, match=r"attn_mask cannot be combined with window=4"):
        m.apply({"params": p}, x, jnp.ones((T, T), bool))


def test_dynamic_ntk_grows_the_base_past_the_original_length():
    s = core.RopeScaling("dynamic", 2.0, 8)
    short, _ = core.rope_tables(jnp.arange(8), 8, 10.0, scaling=s)
    plain, _ = core.rope_tables(jnp.arange(8), 8, 10.0)
    np.testing.assert_array_equal(np.asarray(short), np.asarray(plain))  # within: unchanged
    long_, _ = core.rope_tables(jnp.arange(20), 8, 10.0, scaling=s)
    assert not np.allclose(np.asarray(long_[:8]), np.asarray(plain))


# ----------------------------------------------------------------------------- MLA


MLA_CASES = {
    "full_rank_query": dict(q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4,
                            qk_rope_head_dim=4, v_head_dim=6),
    "deepseek_v3": dict(q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4,
                        v_head_dim=5, norm_eps=1e-5, rope_style="interleaved",
                        rope_scaling=core.RopeScaling("yarn", 4.0, 8, mscale=1.0,
                                                      mscale_all_dim=1.0)),
}


def _mla(decode=False, **kw):
    return ah.MultiHeadLatentAttention(D, 4, decode=decode, **kw)


def mla_reference(m, p, x):
    b, t, _ = x.shape
    ql, kvl, nope, rope, vd = m.dims()
    n = m.num_heads

    def lin(name, a):
        return a @ p[name]["kernel"] + (p[name]["bias"] if "bias" in p[name] else 0.0)

    def norm(a, w):
        return a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + m.norm_eps) * w

    q = lin("q", x) if ql is None else lin("q_up", norm(lin("q_down", x), p["q_norm"]))
    q = q.reshape(b, t, n, nope + rope)
    c, kr = jnp.split(lin("kv_down", x), [kvl], -1)
    kv = lin("kv_up", norm(c, p["kv_norm"])).reshape(b, t, n, nope + vd)
    kn, v = jnp.split(kv, [nope], -1)
    inv = core.rope_inverse_frequencies(rope, m.rope_theta, m.rope_scaling)
    sc = 1.0 if m.rope_scaling is None else m.rope_scaling.attention_scale()
    pos = jnp.arange(t, dtype=jnp.float32)
    qr = _rope_ref(q[..., nope:], pos, rope, m.rope_theta, m.rope_style, inv, sc)
    kr = _rope_ref(kr[:, :, None], pos, rope, m.rope_theta, m.rope_style, inv, sc)
    qf = jnp.concatenate([q[..., :nope], qr], -1)
    kf = jnp.concatenate([kn, jnp.broadcast_to(kr, (b, t, n, rope))], -1)
    scale = (nope + rope) ** -0.5
    if m.rope_scaling is not None and m.rope_scaling.mscale_all_dim:
        scale *= (0.1 * m.rope_scaling.mscale_all_dim * np.log(m.rope_scaling.factor) + 1) ** 2
    logits = jnp.einsum("btnh,bsnh->bnts", qf, kf) * scale
    logits = jnp.where(np.tril(np.ones((t, t), bool)), logits, -jnp.inf)
    out = jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(logits, -1), v)
    return lin("proj", out.reshape(b, t, n * vd))


@pytest.mark.parametrize("case", MLA_CASES)
def test_mla_deepseek_layout_matches_the_reference(case):
    m = _mla(**MLA_CASES[case])
    x = _x()
    p = nn.unbox(jax.jit(m.init)(jax.random.key(0), x))["params"]
    assert ("q" in p) == (m.q_lora_rank is None) and ("q_down" in p) != ("q" in p)
    @jax.jit  # the module and the reference, outputs and gradients: one compiled program
    def both(p):
        return (jax.value_and_grad(lambda p: m.apply({"params": p}, x).sum())(p),
                m.apply({"params": p}, x),
                jax.value_and_grad(lambda p: mla_reference(m, p, x).sum())(p),
                mla_reference(m, p, x))

    (_, g), out, (_, g_ref), want = both(p)
    close(out, want, 1e-5, case)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref), strict=True):
        close(a, b, 1e-4, case)


@pytest.mark.parametrize("case", MLA_CASES)
@pytest.mark.parametrize("absorb", [True, False])
def test_mla_deepseek_layout_decode_equals_prefill(case, absorb):
    check_decode_equals_prefill(_mla_maker(case, absorb), _x(1))


@functools.cache
def _mla_maker(case, absorb):
    return lambda decode: _mla(decode=decode, absorb=absorb, **MLA_CASES[case])


def test_mla_default_rank_is_attnhuts():
    m = _mla()
    p = nn.unbox(jax.jit(m.init)(jax.random.key(0), _x()))["params"]
    assert p["q_down"]["kernel"].shape == (D, D // 2)


# ----------------------------------------------------------------------------- MLA + indexer


V32 = dict(q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
           rope_style="interleaved", index_top_k=5, index_num_heads=3, index_head_dim=8)


def v32_reference(m, p, x, keep=None):
    """MLA whose queries read their indexer's top-k keys, from the definitions (``keep``: a
    selection computed before, for gradients: the selection itself has none)."""
    b, t, _ = x.shape
    ql, kvl, nope, rope, vd = m.dims()
    n, ih, ie = m.num_heads, m.index_num_heads, m.index_head_dim

    def lin(tree, name, a):
        return a @ tree[name]["kernel"] + (tree[name]["bias"] if "bias" in tree[name] else 0.0)

    def norm(a, w):
        return a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + m.norm_eps) * w

    lat = norm(lin(p, "q_down", x), p["q_norm"])
    q = lin(p, "q_up", lat).reshape(b, t, n, nope + rope)
    c, kr = jnp.split(lin(p, "kv_down", x), [kvl], -1)
    kn, v = jnp.split(lin(p, "kv_up", norm(c, p["kv_norm"])).reshape(b, t, n, nope + vd), [nope], -1)
    pos = jnp.arange(t, dtype=jnp.float32)
    qf = jnp.concatenate([q[..., :nope], _rope_ref(q[..., nope:], pos, rope, m.rope_theta,
                                                   m.rope_style)], -1)
    kr = _rope_ref(kr[:, :, None], pos, rope, m.rope_theta, m.rope_style)
    kf = jnp.concatenate([kn, jnp.broadcast_to(kr, (b, t, n, rope))], -1)
    ip = p["indexer"]
    qi = _rope_ref(lin(ip, "wq_b", lat).reshape(b, t, ih, ie), pos, rope, m.rope_theta, "half")
    ki = lin(ip, "wk", x)
    mu = ki.mean(-1, keepdims=True)
    ki = (ki - mu) / jnp.sqrt(((ki - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
    ki = ki * ip["k_norm"]["scale"] + ip["k_norm"]["bias"]
    ki = _rope_ref(ki[:, :, None], pos, rope, m.rope_theta, "half")[:, :, 0]
    w = lin(ip, "weights_proj", x) * ih ** -0.5
    scores = jnp.einsum("bti,btis->bts", w, jax.nn.relu(
        jnp.einsum("btie,bse->btis", qi, ki) * ie ** -0.5))
    causal = np.tril(np.ones((t, t), bool))
    if keep is None:
        scores = np.where(causal, np.asarray(scores), -np.inf)
        order = np.argsort(-scores, axis=-1, kind="stable")[..., : m.index_top_k]
        keep = np.zeros((b, t, t), bool)
        np.put_along_axis(keep, order, True, axis=-1)
        keep &= causal
    logits = jnp.einsum("btnh,bsnh->bnts", qf, kf) * (nope + rope) ** -0.5
    logits = jnp.where(keep[:, None], logits, -jnp.inf)
    out = jnp.einsum("bnts,bsnv->btnv", jax.nn.softmax(logits, -1), v)
    return lin(p, "proj", out.reshape(b, t, n * vd)), keep


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_mla_indexer_matches_the_reference(impl):
    m = _mla(index_impl=impl, **V32)
    x = _x()
    p = nn.unbox(jax.jit(m.init)(jax.random.key(0), x))["params"]
    want, keep = v32_reference(m, p, x)
    assert 0 < keep.sum(-1).min() and keep.sum(-1).max() == m.index_top_k
    @jax.jit  # the module's output and gradients, the reference's gradients (for the
    def run(p, x):  # reference's selection): one compiled program
        return (m.apply({"params": p}, x),
                jax.grad(lambda p, x: m.apply({"params": p}, x).sum(), (0, 1))(p, x),
                jax.grad(lambda p, x: v32_reference(m, p, x, keep)[0].sum(), (0, 1))(p, x))

    out, g, g_ref = run(p, x)
    close(out, want, 1e-5, impl)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref), strict=True):
        close(a, b, 1e-4, impl)
    assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree_util.tree_leaves(g[0]["indexer"]))


def test_mla_indexer_index_loss_trains_the_indexer_only():
    m = _mla(index_impl="xla", **V32)
    x = _x()
    p = nn.unbox(jax.jit(m.init)(jax.random.key(0), x))["params"]
    grads = jax.jit(lambda p: {kind: jax.grad(  # both losses' gradients in one program
        lambda p, kind=kind: m.apply({"params": p}, x, index_loss=kind)[1])(p)
        for kind in ("sparse", "dense")})(p)
    for kind in ("sparse", "dense"):
        g = grads[kind]
        assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree_util.tree_leaves(g["indexer"]))
        rest = {k: v for k, v in g.items() if k != "indexer"}
        assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree_util.tree_leaves(rest))


def test_mla_indexer_decode_equals_prefill():
    check_decode_equals_prefill(_v32_maker(), _x(1))


@functools.cache
def _v32_maker():
    return lambda decode: _mla(decode=decode, index_impl="xla", **V32)


def test_mla_indexer_refusals():
    with pytest.raises(ValueError, match=r"index_top_k=4 needs a query latent"):
        _mla(q_lora_rank=None, index_top_k=4).init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match=r"index_head_dim=2 must be >= qk_rope_head_dim=4"):
        _mla(index_top_k=4, index_head_dim=2).init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match=r"index_loss='sparse' needs an indexer"):
        _mla().apply(_mla().init(jax.random.key(0), _x()), _x(), index_loss="sparse")


def test_cudnn_window_says_why_it_cannot_run_here():
    """``impl="cudnn"`` takes cuDNN's local window (the dense op), not the block-sparse one: on
    CPU it is refused with cuDNN's own reason; with sink tokens it is refused outright."""
    x = _x().astype(jnp.bfloat16)
    m = make_gqa(window=4, impl="cudnn", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"impl='cudnn' cannot run 'dense' here: cuDNN attention "
                                         r"needs an NVIDIA GPU"):
        m.init(jax.random.key(0), x)
    m = make_gqa(window=4, num_sink_tokens=1, impl="cudnn", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"cannot combine a window with sink tokens"):
        m.init(jax.random.key(0), x)


def test_cudnn_refuses_a_bidirectional_window():
    q = jnp.zeros((1, 8, 4, 16), jnp.bfloat16)
    why = core.cudnn_unsupported(q, q, q, causal=False, window=(3, 2), backend="gpu")
    assert why is not None and "bidirectional window (3, 2)" in why
    assert core.cudnn_unsupported(q, q, q, causal=True, window=(3, 0), backend="gpu") is None

"""HCA and CSA against attnhut 0.5.0: outputs, gradients, aux selections modulo ties, pooling,
masks, conversion, and the behaviour checked on torch-initialised weights."""

from __future__ import annotations

import functools

import attnhut
import attnhut.compressed as tc
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attnhut_jax as ah
from attnhut_jax import compressed as jc
from attnhut_jax import core
from parity import from_state_dict, from_torch, to_torch
from parity.cases import compressed_selection, csa_case
from parity.compare import Case, compare_selection, run_case
from parity.convert import constructor_kwargs

D = 32


# parameters attnhut initialises to constants: randomised in "rand" cases so that the pooling
# biases, the sink and the norm weights are exercised too
_CONST_PARAMS = ("pos_bias", "bias_a", "bias_b", "sink", "q_norm", "kv_norm")


def _rand(m: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name in _CONST_PARAMS:
            if hasattr(m, name):
                p = getattr(m, name)
                p.copy_(torch.randn_like(p) * 0.7 + (1.0 if name.endswith("norm") else 0.0))
    return m


def _hca(rand=False, **kw):
    return lambda: (_rand if rand else (lambda m: m))(attnhut.HeavilyCompressedAttention(D, 4, **kw))


def _csa(rand=False, **kw):
    return lambda: (_rand if rand else (lambda m: m))(attnhut.CompressedSparseAttention(D, 4, **kw))


HCA_CONFIGS = [  # (label, kwargs, randomise constants, sequence lengths)
    ("rate4 w5", dict(compression_rate=4, window=5), False, (1, 3, 4, 11)),
    ("rate4 w5 bias rand", dict(compression_rate=4, window=5, bias=True), True, (8,)),
    ("rate3 kv12 q10 g1 w8 rand", dict(compression_rate=3, kv_dim=12, q_lora_rank=10,
                                       num_groups=1, window=8), True, (10,)),
    ("rate2 g2 w1 rand", dict(compression_rate=2, num_groups=2, window=1), True, (7,)),
    ("rate1 w2 rand", dict(compression_rate=1, window=2), True, (5,)),
    ("rate5 w64 (window >= T) rand", dict(compression_rate=5), True, (12,)),
    ("defaults (rate16 w64)", dict(), False, (20,)),
]


CSA_CONFIGS = [  # (label, kwargs, randomise constants, sequence lengths)
    ("rate2 top3 idx2x8 w4", dict(compression_rate=2, top_k=3, num_index_heads=2, index_dim=8,
                                  window=4), False, (1, 2, 3, 13)),
    ("rate3 top1 w1 bias rand", dict(compression_rate=3, top_k=1, num_index_heads=3, index_dim=4,
                                     window=1, bias=True), True, (14,)),
    ("rate2 top16>=C kv12 q10 g2 rand", dict(compression_rate=2, top_k=16, kv_dim=12,
                                             q_lora_rank=10, num_index_heads=2, index_dim=4,
                                             num_groups=2, window=3), True, (9,)),
    ("rate2 top3 g1 w64 (window >= T) rand", dict(compression_rate=2, top_k=3, num_groups=1,
                                                  num_index_heads=2, index_dim=8), True, (11,)),
    ("defaults (rate4 top16 idx4x64 w64)", dict(), False, (9,)),
]


# one indexer head of width 2: about half the ReLU'd dots are exactly 0, so many index scores
# tie exactly at 0, often straddling the k-th place
TIES = dict(compression_rate=2, top_k=2, num_index_heads=1, index_dim=2, window=3)


def _csa_case(label, kw, rand, t, seed=0):
    rate = kw.get("compression_rate", 4)
    return csa_case(f"{label} T={t}", _csa(rand, **kw), (2, t, D), top_k=kw.get("top_k", 16),
                    rate=rate, seed=seed)


def _cases() -> list[Case]:
    cases = [Case("HeavilyCompressedAttention", f"{label} T={t}", _hca(rand, **kw), (2, t, D))
             for label, kw, rand, ts in HCA_CONFIGS for t in ts]
    cases += [_csa_case(label, kw, rand, t) for label, kw, rand, ts in CSA_CONFIGS for t in ts]
    cases.append(_csa_case("ties idx1x2 top2", TIES, True, 16))
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.name}[{c.config}]" for c in CASES])
def test_parity_with_attnhut(case: Case):
    r = run_case(case)
    assert r.selection_error is None, r.selection_error
    assert r.ok, f"out {r.out_err:.3e}, grads {r.grad_errs}"
    assert "input" in r.grad_errs and "proj.w" in r.grad_errs and "sink" in r.grad_errs


def _pair(make, shape, seed=0):
    """(torch module, flax module, variables, x as numpy) seeded as run_case seeds them."""
    torch.manual_seed(seed)
    tm = make().float().eval()
    fm, v = from_torch(tm)
    x = np.random.default_rng(seed + 1).standard_normal(shape, dtype=np.float32)
    return tm, fm, v, x


def _aux_both(make, shape, seed=0):
    tm, fm, v, x = _pair(make, shape, seed)
    with torch.no_grad():
        t_out = tm(torch.from_numpy(x), return_aux=True)
    j_out = jax.jit(lambda v, x: fm.apply(v, x, return_aux=True))(v, jnp.asarray(x))
    return t_out, j_out


def _straddling_ties(scores, selected, k, valid):
    """Rows whose k-th score is shared by more visible entries than the selection can hold."""
    s = np.where(valid, scores, -np.inf)
    kth = -np.sort(-s, axis=-1)[..., k - 1]
    n_tied = (s == kth[..., None]).sum(-1)
    n_above = (s > kth[..., None]).sum(-1)
    return np.isfinite(kth) & (n_above + n_tied > k)


@pytest.mark.parametrize("label,kw,seed", [
    ("rate2 top3 idx2x8 w4", CSA_CONFIGS[0][1], 0),
    ("rate3 top1", CSA_CONFIGS[1][1], 0),
    ("ties", TIES, 0),
    ("ties", TIES, 1),
])
def test_aux_matches_attnhut_modulo_ties(label, kw, seed):
    rate, top_k = kw["compression_rate"], kw["top_k"]
    (t_out, t_aux), (j_out, j_aux) = _aux_both(_csa(True, **kw), (2, 16, D), seed)
    ts, tsel = t_aux["index_scores"].numpy(), t_aux["selected"].numpy()
    js, jsel = np.asarray(j_aux["index_scores"]), np.asarray(j_aux["selected"])
    assert js.shape == ts.shape == (2, 16, -(-16 // rate)) and jsel.dtype == np.bool_
    sel = compressed_selection(top_k, rate)
    scores, _, k, valid = sel((t_out, t_aux))
    # not-yet-visible entries carry the same finite fill on both sides
    fill = np.finfo(np.float32).min
    assert np.all(ts[:, ~valid] == fill) and np.all(js[:, ~valid] == fill)
    np.testing.assert_allclose(js[:, valid], ts[:, valid], atol=1e-5, rtol=1e-4)
    assert not jsel[:, ~valid].any() and not tsel[:, ~valid].any()
    same_rows, err = compare_selection(sel((t_out, t_aux)), sel((j_out, j_aux)))
    assert err is None, err
    # every row keeps min(k, visible) entries on both sides
    np.testing.assert_array_equal(jsel.sum(-1), np.broadcast_to(np.minimum(k, valid.sum(-1)), (2, 16)))
    # away from ties at the k-th score the two selections are identical
    tied = _straddling_ties(scores, tsel, k, valid)
    np.testing.assert_array_equal(jsel[~tied], tsel[~tied])
    assert same_rows[~tied].all()
    if label == "ties":
        # the ReLU really produces exact ties at the k-th score, i.e. the tie rule is needed
        assert tied.any()
        assert (scores[:, valid] == 0.0).mean() > 0.2


def test_tie_config_selects_among_zero_scores():
    """Where the k-th score is an exact 0 tie, jax takes the lowest indices (lax.top_k)."""
    (_, t_aux), (_, j_aux) = _aux_both(_csa(True, **TIES), (2, 16, D))
    s = np.asarray(j_aux["index_scores"])
    sel = np.asarray(j_aux["selected"])
    _, _, k, valid = compressed_selection(TIES["top_k"], TIES["compression_rate"])(
        (None, j_aux))
    rows = _straddling_ties(s, sel, k, valid)
    assert rows.any()
    for b, t in zip(*np.nonzero(rows), strict=True):
        kth = -np.sort(-np.where(valid[t], s[b, t], -np.inf))[k - 1]
        tied = np.nonzero(valid[t] & (s[b, t] == kth))[0]
        chosen = tied[sel[b, t, tied]]
        np.testing.assert_array_equal(chosen, tied[: len(chosen)])


def test_harness_fails_on_a_real_selection_disagreement(monkeypatch):
    real = core.topk_keep

    def flipped(scores, valid, k):
        keep = real(scores, valid, k)
        return keep.at[0, -1].set(~keep[0, -1] & valid[-1])  # last query of sample 0: complement

    case = _csa_case("rate2 top3 idx2x8 w4", CSA_CONFIGS[0][1], False, 13)  # passes above
    monkeypatch.setattr(core, "topk_keep", flipped)
    r = run_case(case)
    assert not r.ok
    assert r.selection_error is not None and "disagree beyond ties" in r.selection_error


def test_top_k_at_least_entries_keeps_every_visible_entry():
    kw = dict(compression_rate=2, top_k=8, num_index_heads=2, index_dim=4, window=2)
    m = ah.CompressedSparseAttention(D, 4, **kw)
    x = jax.random.normal(jax.random.key(0), (2, 15, D))
    torch.manual_seed(0)
    v = from_state_dict(m, _torch_twin(m).state_dict())
    y_all, aux = _jit(m)(v, x, return_aux=True)
    visible = np.asarray(jc.compressed_visible(15, 8, 2))
    np.testing.assert_array_equal(np.asarray(aux["selected"]), np.broadcast_to(visible, (2, 15, 8)))
    # then selection changes nothing: any larger top_k gives the same output
    y_more = _jit(m.clone(top_k=100))(v, x)
    np.testing.assert_array_equal(np.asarray(y_all), np.asarray(y_more))


@pytest.mark.parametrize("t,rate", [(1, 4), (3, 4), (4, 4), (9, 4), (7, 1), (5, 2)])
def test_pooling_matches_attnhut(t, rate):
    g = torch.Generator().manual_seed(t * 10 + rate)
    c, z, zb, cb = (torch.randn(2, t, 6, generator=g) for _ in range(4))
    ba, bb = (torch.randn(rate, 6, generator=g) for _ in range(2))
    j = lambda a: jnp.asarray(a.numpy())  # noqa: E731
    np.testing.assert_allclose(np.asarray(jc.compress(j(c), j(z), j(ba), rate)),
                               tc._compress(c, z, ba, rate).numpy(), atol=1e-6)
    got = jc.compress_overlap(j(c), j(cb), j(z), j(zb), j(ba), j(bb), rate)
    np.testing.assert_allclose(np.asarray(got), tc._compress_overlap(c, cb, z, zb, ba, bb,
                                                                     rate).numpy(), atol=1e-6)
    assert got.shape == (2, -(-t // rate), 6)


def test_window_and_visibility_masks_match_attnhut():
    for t, w in [(1, 1), (6, 1), (6, 3), (6, 64)]:
        np.testing.assert_array_equal(np.asarray(core.sliding_window_mask(t, w)),
                                      tc._window_keep(t, w, torch.device("cpu")).numpy())
    np.testing.assert_array_equal(np.asarray(jc.compressed_visible(9, 3, 3)),
                                  (np.arange(3)[None] + 1) * 3 <= np.arange(9)[:, None])


def test_rows_with_nothing_visible_are_zero_and_finite():
    q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))
    kv = jax.random.normal(jax.random.key(1), (2, 7, 8)) * 10.0
    keep = jnp.ones((5, 7), bool).at[2].set(False)
    sink = jnp.array([0.0, -50.0, 3.0, 40.0])

    def f(q_, kv_, sink_):
        return jc.shared_kv_attention(q_, kv_, keep, sink_, 8 ** -0.5)

    y = f(q, kv, sink)
    np.testing.assert_array_equal(np.asarray(y[:, 2]), 0.0)
    assert np.all(np.isfinite(np.asarray(y)))
    # torch's _mqa_core agrees, empty row included
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    ref = tc._mqa_core(t(q).transpose(1, 2), t(kv), t(keep), 8 ** -0.5, t(sink))
    np.testing.assert_allclose(np.asarray(y), ref.transpose(1, 2).numpy(), atol=1e-5, rtol=1e-4)
    grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q, kv, sink)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


MODULES = {
    "hca": lambda **kw: ah.HeavilyCompressedAttention(D, 4, compression_rate=3, window=4, **kw),
    "csa": lambda **kw: ah.CompressedSparseAttention(D, 4, compression_rate=2, top_k=2,
                                                     num_index_heads=2, index_dim=8, window=3,
                                                     **kw),
}


def _x(shape=(2, 13, D), dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _randomised(v):
    """Random values for the constant-initialised parameters (biases, sink, norms)."""
    p = nn.unbox(v)["params"]
    keys = iter(jax.random.split(jax.random.key(42), 8))
    return {"params": {k: (jax.random.normal(next(keys), a.shape) * 0.7 + (k.endswith("norm"))
                           if k in _CONST_PARAMS else a) for k, a in p.items()}}


def _init(name, x, **kw):
    """(module, variables); variables do not depend on T, so they are built once per config."""
    return MODULES[name](**kw), _variables(name, x.dtype, tuple(sorted(kw.items())))


@functools.cache
def _variables(name, dtype, kw):
    """Seeded attnhut weights, converted (no XLA compile; ``init`` itself is tested below)."""
    m = MODULES[name](**dict(kw))
    torch.manual_seed(1)
    return from_state_dict(m, _torch_twin(m).state_dict())


def _torch_twin(m: nn.Module) -> torch.nn.Module:
    return getattr(attnhut, type(m).__name__)(**constructor_kwargs(m))


def _jit(m):
    """``m.apply`` as one jit (the properties below hold for any trace; jit == eager is tested)."""
    return jax.jit(m.apply, static_argnames=("return_aux",))


@pytest.mark.parametrize("name", list(MODULES))
def test_causal_perturbing_the_future_leaves_the_past(name):
    x = _x()
    m, v = _init(name, x)
    v = _randomised(v)
    apply = _jit(m)
    y = apply(v, x)
    for p in (0, 2, 5, 9, 12):
        y2 = apply(v, x.at[:, p].add(5.0))
        np.testing.assert_array_equal(np.asarray(y[:, :p]), np.asarray(y2[:, :p]))
        assert not np.allclose(y[:, p], y2[:, p])


@pytest.mark.parametrize("name", list(MODULES))
def test_causal_gradient_from_future_is_exactly_zero(name):
    x = _x()
    m, v = _init(name, x)
    v = _randomised(v)
    # d sum(y[:, i]) / dx for several i, through one compiled vjp (the row weights are traced)
    grad = jax.jit(jax.grad(lambda x_, w_T: (m.apply(v, x_) * w_T[:, None]).sum()))
    for i in (0, 4, 8):
        g = grad(x, jnp.zeros(x.shape[1]).at[i].set(1.0))
        assert np.all(np.asarray(g[:, i + 1:]) == 0.0)
        assert np.any(np.asarray(g[:, : i + 1]) != 0.0)


@pytest.mark.parametrize("name", list(MODULES))
def test_jit_equals_eager(name):
    x = _x(seed=3)
    m, v = _init(name, x)
    eager = m.apply(v, x)
    jitted = jax.jit(m.apply)(v, x)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-6, rtol=1e-6)
    if name == "csa":
        _, aux_e = m.apply(v, x, return_aux=True)
        _, aux_j = jax.jit(lambda v_, x_: m.apply(v_, x_, return_aux=True))(v, x)
        np.testing.assert_array_equal(np.asarray(aux_e["selected"]), np.asarray(aux_j["selected"]))


@pytest.mark.parametrize("name,param_dtype", [("hca", jnp.float32), ("hca", jnp.bfloat16),
                                              ("csa", jnp.bfloat16)])
def test_bfloat16_inputs_stay_finite(name, param_dtype):
    x = _x(dtype=jnp.bfloat16) * 30.0
    m, v = _init(name, x, dtype=jnp.bfloat16, param_dtype=param_dtype)
    y = _jit(m)(v, x)
    assert y.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    g = jax.jit(jax.grad(lambda x_: m.apply(v, x_).astype(jnp.float32).sum()))(x)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", list(MODULES))
def test_empty_compressed_prefix_ignores_pooling_parameters(name):
    """T <= rate: no compressed entry is visible yet, so pooling weights cannot matter."""
    rate = MODULES[name]().compression_rate
    for t in (1, rate):
        x = _x((2, t, D))
        m, v = _init(name, x)
        v = _randomised(v)
        apply = _jit(m)
        y = apply(v, x)
        assert y.shape == (2, t, D) and np.all(np.isfinite(np.asarray(y)))
        p = v["params"]
        moved = {k: (jax.tree_util.tree_map(lambda a: a + 3.0, a)
                     if k in ("z", "z_a", "z_b", "kv_b", "pos_bias", "bias_a", "bias_b")
                     else a) for k, a in p.items()}
        np.testing.assert_array_equal(np.asarray(apply({"params": moved}, x)), np.asarray(y))


@pytest.mark.parametrize("name", list(MODULES))
def test_window_covering_the_sequence(name):
    x = _x((2, 7, D))
    m, v = _init(name, x)
    y_wide = _jit(m.clone(window=7))(v, x)
    np.testing.assert_array_equal(np.asarray(y_wide), np.asarray(_jit(m.clone(window=1000))(v, x)))
    assert not np.allclose(_jit(m)(v, x), y_wide)


@pytest.mark.parametrize("name", list(MODULES))
def test_parameters_carry_logical_axes(name):
    x = _x()
    m = MODULES[name](bias=True)
    v = jax.eval_shape(m.init, jax.random.key(0), x)  # init's boxes, without compiling it
    leaves = jax.tree_util.tree_leaves_with_path(
        v["params"], is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
    assert leaves
    for path, a in leaves:
        assert isinstance(a, nn.LogicallyPartitioned), path
        assert len(a.names) == a.value.ndim, path
    p = v["params"]
    assert p["proj"]["w"].names == ("heads", None, None)
    assert p["proj"]["out"]["kernel"].names == ("heads", "embed")
    assert p["q_up"]["kernel"].names == ("latent", "heads")
    assert p["sink"].names == ("heads",)
    # apply takes boxed variables as they come from init (or from the converter)
    _, boxed = _init(name, x, bias=True)
    assert isinstance(boxed["params"]["sink"], nn.LogicallyPartitioned)
    assert np.all(np.isfinite(np.asarray(_jit(m)(boxed, x))))


def test_initialisers_follow_torch():
    m = ah.CompressedSparseAttention(64, 4, compression_rate=3, num_groups=2, bias=True)
    p = nn.unbox(jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 1, 64))))["params"]
    for k in ("bias_a", "bias_b", "sink"):
        np.testing.assert_array_equal(np.asarray(p[k]), 0.0)
    for k in ("q_norm", "kv_norm"):
        np.testing.assert_array_equal(np.asarray(p[k]), 1.0)
    assert p["bias_a"].shape == (3, 16) and p["sink"].shape == (4,)
    k = np.asarray(p["kv_a"]["kernel"])
    assert k.shape == (64, 16) and np.abs(k).max() <= 1 / 8
    assert np.isclose(k.std(), 1 / 8 / np.sqrt(3), rtol=0.1)
    assert np.abs(np.asarray(p["kv_a"]["bias"])).max() <= 1 / 8
    # GroupedOutputProjection.w: xavier-uniform on (A, I, O) = (2, 4 * 32, 32), torch's fans:
    # fan_in = I * O, fan_out = A * O
    w = np.asarray(jax.jit(ah.GroupedOutputProjection(8, 32, 2, 256).init)(
        jax.random.key(0), jnp.zeros((1, 1, 8, 32)))["params"]["w"].unbox())
    bound = np.sqrt(6 / (128 * 32 + 2 * 32))
    assert w.shape == (2, 128, 32) and np.abs(w).max() <= bound
    assert np.isclose(w.std(), bound / np.sqrt(3), rtol=0.05)
    tw = tc.GroupedOutputProjection(8, 32, 2, 256).w.detach().numpy()
    assert tw.shape == w.shape and np.abs(tw).max() <= bound
    assert np.isclose(tw.std(), w.std(), rtol=0.05)
    hca = jax.eval_shape(ah.HeavilyCompressedAttention(64, 4, 8).init, jax.random.key(0),
                         jnp.zeros((1, 1, 64)))["params"]
    assert hca["pos_bias"].value.shape == (8, 16)


@pytest.mark.parametrize("make", [
    lambda: attnhut.HeavilyCompressedAttention(32, 4, 3, 12, 10, 2, window=5, bias=True),
    lambda: attnhut.HeavilyCompressedAttention(30, 4),
    lambda: attnhut.CompressedSparseAttention(32, 4, 2, 3, 12, 10, 3, 8, 1, window=6),
    lambda: attnhut.CompressedSparseAttention(48, 2, bias=True),
])
def test_converter_round_trip_is_exact(make):
    torch.manual_seed(0)
    tm = _rand(make())
    fm, v = from_torch(tm)
    back = to_torch(fm, v)
    sa, sb = tm.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for attr in ("num_heads", "kv_dim", "rate", "window", "top_k", "num_index_heads",
                 "index_dim"):
        if hasattr(tm, attr):
            assert getattr(back, attr) == getattr(tm, attr), attr
    assert back.proj.num_groups == tm.proj.num_groups
    fm2, _ = from_torch(back)
    assert fm2 == fm


def test_grouped_output_projection_matches_attnhut():
    torch.manual_seed(0)
    tp = tc.GroupedOutputProjection(6, 5, 3, 16, group_dim=7, bias=True)
    jp = ah.GroupedOutputProjection(6, 5, 3, 16, group_dim=7, bias=True)
    params = {"w": jnp.asarray(tp.w.detach().numpy()),
              "out": {"kernel": jnp.asarray(tp.out.weight.detach().numpy().T),
                      "bias": jnp.asarray(tp.out.bias.detach().numpy())}}
    o = np.random.default_rng(0).standard_normal((2, 3, 6, 5), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(jp.apply({"params": params}, jnp.asarray(o))),
                               tp(torch.from_numpy(o)).detach().numpy(), atol=1e-5)


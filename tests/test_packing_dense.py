"""Packed sequences, padding and positions in the dense modules (issue 12).

Standard, MQA, GQA (K < N), MLA and Differential take ``segment_ids`` / ``positions``: a packed
row equals each of its segments run alone (any start, padding in the middle and at the ends),
no output depends on another segment or on padding (exactly zero gradient), NaN/inf in padding
changes nothing, MLA's RoPE reads ``positions``. The dense core itself ignores non-finite keys
and values hidden from a row. BigBird, Slot and CausalJEPA refuse segments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah
from attnhut_jax import core

B, T, D = 2, 12, 16
# Row 0: segments of 3 and 5 tokens, one padding token in the middle, a segment of 3 after it.
# Row 1: leading padding, segments of 5 and 3 tokens starting at 1 and 6, a padding tail.
SEG = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 0, 3, 3, 3],
                [0, 4, 4, 4, 4, 4, 5, 5, 5, 0, 0, 0]], np.int32)


def _runs(seg_T: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of every non-padding segment of a row."""
    out, t = [], 0
    while t < len(seg_T):
        u = t
        while u < len(seg_T) and seg_T[u] == seg_T[t]:
            u += 1
        if seg_T[t] != 0:
            out.append((t, u))
        t = u
    return out


SEGMENTS = [(b, s, e) for b in range(B) for s, e in _runs(SEG[b])]
# positions restarting at 0 in every segment (padding: 0)
POS = np.zeros_like(SEG)
for _b, _s, _e in SEGMENTS:
    POS[_b, _s:_e] = np.arange(_e - _s)

MODULES = {
    "standard": (ah.StandardAttention, {"dim": D, "num_heads": 2, "bias": True}),
    "mqa": (ah.MultiQueryAttention, {"dim": D, "num_heads": 4}),
    "gqa": (ah.GroupedQueryAttention, {"dim": D, "num_heads": 4, "num_kv_heads": 2}),
    "mla": (ah.MultiHeadLatentAttention, {"dim": D, "num_heads": 2}),
    "differential": (ah.DifferentialAttention, {"dim": D, "num_heads": 2}),
}
VARIANTS = [(name, causal) for name in MODULES for causal in (True, False)]
VARIANT_IDS = [f"{n}-{'causal' if c else 'bidir'}" for n, c in VARIANTS]
EACH = pytest.mark.parametrize("name,causal", VARIANTS, ids=VARIANT_IDS)


def _x(seed: int = 0, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(seed), shape)


@functools.cache
def _setup(name: str, causal: bool):
    """(module, params, jitted apply(params, x, **kw)) for one variant."""
    cls, kwargs = MODULES[name]
    m = cls(**kwargs, causal=causal)
    variables = jax.jit(m.init)(jax.random.key(1), _x())
    run = jax.jit(lambda v, x, **kw: m.apply(v, x, **kw))
    return m, variables, run


def _packing(name: str) -> dict:
    """The packed call's keyword arguments (MLA also gets positions restarting per segment)."""
    kw = {"segment_ids": jnp.asarray(SEG)}
    if name == "mla":
        kw["positions"] = jnp.asarray(POS)
    return kw


def _alone(name: str, causal: bool, x) -> np.ndarray:
    """(B, T, D) with each segment's rows computed by running that segment alone (batched by
    length); padding rows NaN (not compared)."""
    _, v, run = _setup(name, causal)
    out = np.full(x.shape, np.nan, np.float32)
    for length in sorted({e - s for _, s, e in SEGMENTS}):
        group = [(b, s, e) for b, s, e in SEGMENTS if e - s == length]
        xs = jnp.stack([x[b, s:e] for b, s, e in group])
        ys = np.asarray(run(v, xs))
        for (b, s, e), y in zip(group, ys, strict=True):
            out[b, s:e] = y
    return out


# ----------------------------------------------------------------------------- equivalence


@EACH
def test_packed_row_equals_segments_run_alone(name, causal):
    _, v, run = _setup(name, causal)
    x = _x()
    out = np.asarray(run(v, x, **_packing(name)))
    ref = _alone(name, causal, x)
    real = SEG != 0
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(out))  # padding rows too


def _poison_padding(x):
    """``x`` with NaN and inf in every padding token."""
    poison = jnp.where(jnp.arange(D) % 2 == 0, jnp.nan, jnp.inf)
    return jnp.where(jnp.asarray(SEG == 0)[..., None], poison, x)


@EACH
def test_no_output_depends_on_another_segment_or_padding(name, causal):
    """Full Jacobian, at an input with NaN and inf in the padding: exactly zero outside (same
    row, same nonzero segment, causal rule), so padding inputs get exactly zero gradient, and
    non-zero for every pair that rule allows (nothing is over-masked)."""
    m, v, _ = _setup(name, causal)
    kw = _packing(name)
    jac = jax.jit(jax.jacrev(lambda x: m.apply(v, x, **kw)))(_poison_padding(_x(3)))
    dep = np.any(np.asarray(jac) != 0.0, axis=(2, 5))  # (B, T, B, T)
    same_row = np.eye(B, dtype=bool)[:, None, :, None]
    same_seg = (SEG[:, :, None, None] == SEG[None, None, :, :]) & (SEG != 0)[None, None]
    allowed = same_row & same_seg
    if causal:
        allowed &= np.tril(np.ones((T, T), bool))[None, :, None, :]
    np.testing.assert_array_equal(dep, allowed)
    assert np.all(np.isfinite(np.asarray(jac)))


@EACH
def test_nan_and_inf_in_padding_change_nothing(name, causal):
    _, v, run = _setup(name, causal)
    kw = _packing(name)
    x = _x(4)
    clean, dirty = np.asarray(run(v, x, **kw)), np.asarray(run(v, _poison_padding(x), **kw))
    np.testing.assert_array_equal(dirty, clean)
    assert np.all(np.isfinite(dirty))  # padding rows too
    # (the Jacobian test checks that padding inputs get exactly zero gradient)


@EACH
def test_jit_equals_eager_packed(name, causal):
    m, v, run = _setup(name, causal)
    kw, x = _packing(name), _x(5)
    np.testing.assert_allclose(np.asarray(m.apply(v, x, **kw)), np.asarray(run(v, x, **kw)),
                               atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- positions


def test_mla_rope_reads_positions():
    m, v, run = _setup("mla", True)
    x = _x(6)
    base = np.asarray(run(v, x))
    # explicit arange(T) is the default; a uniform shift leaves every score unchanged (RoPE is
    # relative); spreading the positions changes the output
    ar = jnp.broadcast_to(jnp.arange(T), (B, T))
    np.testing.assert_array_equal(np.asarray(run(v, x, positions=ar)), base)
    np.testing.assert_allclose(np.asarray(run(v, x, positions=ar + 7)), base, atol=1e-5)
    assert np.max(np.abs(np.asarray(run(v, x, positions=2 * ar)) - base)) > 1e-3
    # per-row tables: each row equals that row run with its own positions
    pos = jnp.stack([3 * jnp.arange(T), jnp.arange(T)[::-1]])
    both = np.asarray(run(v, x, positions=pos))
    for b in range(B):
        np.testing.assert_allclose(both[b], np.asarray(run(v, x[b:b + 1], positions=pos[b:b + 1]))[0],
                                   atol=1e-5)
    # packed with global positions (no restart) equals packed with restarting ones: shift
    # invariance per segment, since scores never cross segments
    seg = jnp.asarray(SEG)
    np.testing.assert_allclose(np.asarray(run(v, x, segment_ids=seg, positions=ar)),
                               np.asarray(run(v, x, segment_ids=seg, positions=jnp.asarray(POS))),
                               atol=1e-5)


# ----------------------------------------------------------------------------- attn_mask


@pytest.mark.parametrize("name,causal", [v for v in VARIANTS if v[0] != "differential"],
                         ids=[i for i, v in zip(VARIANT_IDS, VARIANTS, strict=True)
                              if v[0] != "differential"])
def test_attn_mask_and_segments_both_apply(name, causal):
    """Segments AND with the user mask, which (as in attnhut) replaces the causal rule: the same
    as passing the combined mask alone, on every non-padding row. Boolean masks on the causal
    variants, additive ones (with -inf) on the bidirectional ones."""
    kind = "bool" if causal else "additive"
    _, v, run = _setup(name, causal)
    m_bool = jax.random.bernoulli(jax.random.key(8), 0.6, (B, 1, T, T)) | jnp.eye(T, dtype=bool)
    mask = m_bool if kind == "bool" else jnp.where(m_bool, 0.3, -jnp.inf)
    x, kw = _x(9), _packing(name)
    seg_keep = core.segment_keep(jnp.asarray(SEG), jnp.asarray(SEG))
    combined = (m_bool & seg_keep) if kind == "bool" else jnp.where(seg_keep, mask, -jnp.inf)
    kw_pos = {k: a for k, a in kw.items() if k == "positions"}
    out = np.asarray(run(v, x, attn_mask=mask, **kw))
    ref = np.asarray(run(v, x, attn_mask=combined, **kw_pos))
    real = SEG != 0
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(out))


# ----------------------------------------------------------------------------- the dense core


def test_dense_core_ignores_nonfinite_keys_a_row_does_not_read():
    ks = jax.random.split(jax.random.key(10), 4)
    q = jax.random.normal(ks[0], (2, 6, 4, 8))
    k = jax.random.normal(ks[1], (2, 7, 2, 8))
    v = jax.random.normal(ks[2], (2, 7, 2, 8))
    keep = jax.random.bernoulli(ks[3], 0.5, (2, 4, 6, 7)).at[:, :, 2].set(False)
    k_bad = k.at[0, 3, 1, 0].set(jnp.nan)  # kv head 1 of sample 0, key 3
    v_bad = v.at[1, 5, 0, 2].set(jnp.inf)  # kv head 0 of sample 1, key 5
    q_bad = q.at[0, 2, 0, 1].set(jnp.nan)  # a row that reads nothing
    f = functools.partial(core.dot_product_attention, keep=keep)
    clean, dirty = (np.asarray(jax.jit(f)(*a)) for a in ((q, k, v), (q_bad, k_bad, v_bad)))
    keep_n = np.asarray(keep)
    reads = np.zeros((2, 6, 4), bool)  # (B, T, N): the row reads a poisoned key
    reads[0, :, 2:] |= keep_n[0, 2:, :, 3].T
    reads[1, :, :2] |= keep_n[1, :2, :, 5].T
    np.testing.assert_array_equal(dirty[~reads], clean[~reads])
    assert reads.any() and np.all(np.isnan(dirty[reads]))
    assert np.all(dirty[:, 2] == 0.0)  # empty rows stay zeros, even with a NaN query
    # gradients of the rows that read nothing poisoned are those of the clean inputs
    w = jnp.asarray(~reads, jnp.float32)[..., None]
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))
    grads = [grad(*args) for args in ((q, k, v), (q_bad, k_bad, v_bad))]
    for g_clean, g_dirty in zip(*grads, strict=True):
        assert np.all(np.isfinite(np.asarray(g_dirty)))
        np.testing.assert_allclose(np.asarray(g_dirty), np.asarray(g_clean), atol=1e-6)
    # without keep every row reads every key: all rows of the poisoned heads are NaN
    assert np.all(np.isnan(np.asarray(core.dot_product_attention(q, k_bad, v))[0, :, 2:]))


@pytest.mark.parametrize("name", ["standard", "gqa", "differential", "mla"])
def test_nan_in_a_later_token_leaves_earlier_rows_and_other_segments(name):
    """Causal: a NaN input at a real token reaches only the rows that read it (its own and later
    rows of its segment); earlier rows and other segments keep their clean outputs and the input
    gradient of a loss on them stays finite."""
    m, v, run = _setup(name, True)
    kw, x = _packing(name), _x(12)
    b, s = 0, 5  # inside segment 2 (rows 3..7 of row 0)
    x_bad = x.at[b, s, 3].set(jnp.nan)
    clean, dirty = np.asarray(run(v, x, **kw)), np.asarray(run(v, x_bad, **kw))
    hit = np.zeros((B, T), bool)
    hit[b, s:8] = True
    np.testing.assert_array_equal(dirty[~hit], clean[~hit])
    assert np.all(np.isnan(dirty[hit]))
    r = jax.random.normal(jax.random.key(14), x.shape)
    g = jax.jit(jax.grad(lambda x_: jnp.sum(jnp.where(hit[..., None], 0.0, m.apply(v, x_, **kw)) * r)))
    g_clean, g_dirty = np.asarray(g(x)), np.asarray(g(x_bad))
    # the poisoned token's own input gradient may be NaN (d rms_norm(nan) / dx is NaN): not
    # compared; every other input's gradient is the clean one
    other = np.ones((B, T), bool)
    other[b, s] = False
    assert np.all(np.isfinite(g_dirty[other]))
    np.testing.assert_allclose(g_dirty[other], g_clean[other], atol=1e-6)


def test_cudnn_mask_path_carries_segments():
    """The segment rule reaches ``jax.nn.dot_product_attention`` as its boolean mask (the path
    impl='cudnn' takes), here run with its XLA implementation: the same as our XLA core, with
    padding rows zeros."""
    ks = jax.random.split(jax.random.key(13), 3)
    q = jax.random.normal(ks[0], (B, T, 4, 8))
    k = jax.random.normal(ks[1], (B, T, 2, 8))
    v = jax.random.normal(ks[2], (B, T, 2, 8))
    seg = jnp.asarray(SEG)
    keep = core.segment_keep(seg, seg)
    for causal in (True, False):
        ours = core.dense_attention_xla(q, k, v, keep=keep, causal=causal)
        theirs = core.jax_nn_attention(q, k, v, keep=keep, bias=None, causal=causal, scale=None,
                                       implementation="xla")
        np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), atol=1e-5)
        assert np.all(np.asarray(ours)[SEG == 0] == 0.0)


def test_cudnn_states_why_it_cannot_run_here():
    m = ah.StandardAttention(D, 2, causal=True, impl="cudnn")
    v = _setup("standard", True)[1]  # impl changes no variable
    with pytest.raises(ValueError, match="cuDNN"):
        jax.eval_shape(lambda: m.apply(v, jnp.zeros((B, T, D)), segment_ids=jnp.asarray(SEG)))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("arg", ["segment_ids", "positions"])
def test_bad_packing_arguments_name_the_values(name, arg):
    cls, kwargs = MODULES[name]
    m = cls(**kwargs)
    x = jnp.zeros((B, T, D))
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    cases = [
        (jnp.ones((B, T + 1), jnp.int32), ValueError,
         rf"{arg} must have shape \(batch, seq\)=\({B}, {T}\) .* got \({B}, {T + 1}\)"),
        (jnp.ones((T,), jnp.int32), ValueError, rf"{arg} must have shape .* got \({T},\)"),
        (jnp.ones((B, T), jnp.float32), TypeError, rf"{arg} must be an integer array, got dtype "
                                                   r"float32"),
        (SEG.tolist(), TypeError, rf"{arg} must be an integer array .* got <class 'list'>"),
    ]
    for value, error, match in cases:
        with pytest.raises(error, match=match):
            jax.eval_shape(lambda a: m.apply(v, x, **{arg: a}), value) if hasattr(value, "shape") \
                else m.apply(v, x, **{arg: value})


@pytest.mark.parametrize("cls,kwargs,shape,why", [
    (ah.BigBirdAttention, {"dim": D, "num_heads": 2, "block_size": 2}, (B, T, D),
     "random blocks are drawn over the whole row"),
    (ah.SlotAttention, {"dim": D, "num_slots": 3, "hidden_dim": D}, (B, T, D),
     "slots of a sample compete for all of its inputs"),
    (ah.CausalJEPAAttention, {"dim": D, "num_heads": 2, "num_slots": 3, "history_frames": 2,
                              "depth": 1}, (B, 2, 3, D), r"fixed \(frames, objects\) grid"),
], ids=["bigbird", "slot", "cjepa"])
def test_modules_that_cannot_pack_refuse_segments(cls, kwargs, shape, why):
    m = cls(**kwargs)
    x = jnp.zeros(shape)
    rngs = {"params": jax.random.key(0), "slots": jax.random.key(1), "mask": jax.random.key(2)}
    v = jax.eval_shape(lambda: m.init(rngs, x))
    seg = jnp.ones(shape[:2], jnp.int32)
    with pytest.raises(ValueError, match=rf"{cls.__name__} cannot take segment_ids: .*{why}"):
        jax.eval_shape(lambda v_: m.apply(v_, x, segment_ids=seg, rngs=rngs), v)
    # None is the default and changes nothing
    jax.eval_shape(lambda v_: m.apply(v_, x, segment_ids=None, rngs=rngs), v)


def test_sdpa_takes_query_and_key_segments_together():
    q = jnp.zeros((B, T, 2, 4))
    with pytest.raises(ValueError, match="X: give both query and key segment ids or neither"):
        core.sdpa(q, q, q, attn_mask=None, causal=True, owner="X", q_seg_BT=jnp.asarray(SEG))

"""BigBird, Delta, DeepSeek Sparse and MiniMax Sparse attention: the behaviour their papers
promise (selection sizes, causality, aux-loss gradients). Parity with attnhut 0.5.0 is in
torch_parity/test_sparse_parity.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnhut_jax as ah


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_pattern_structure(causal):
    m = ah.BigBirdAttention(32, 4, 4, num_window_blocks=3, num_random_blocks=2,
                            num_global_blocks=2, causal=causal, seed=1)
    nb = 24
    mask = m.block_mask(nb)
    assert mask[:2].all() and mask[:, :2].all()  # global rows and columns
    assert mask[np.arange(nb), np.arange(nb)].all()  # diagonal
    for j in range(2, nb):
        win = {k for k in range(j - 1, j + 2) if 0 <= k < nb and (not causal or k <= j)}
        assert all(mask[j, k] for k in win)
        cand = [k for k in range(nb) if k not in {0, 1} | set(range(j - 1, j + 2))
                and (not causal or k < j - 1)]
        extra = set(np.flatnonzero(mask[j])) - {0, 1} - win
        assert extra <= set(cand)
        assert len(extra) == min(2, len(cand)), (j, extra, cand)
    # a deterministic function of (seed, num_blocks): same across calls, differs across seeds
    np.testing.assert_array_equal(mask, m.block_mask(nb))
    other = ah.BigBirdAttention(32, 4, 4, 3, 2, 2, causal, seed=2).block_mask(nb)
    assert (other != mask).any()


def test_bigbird_pattern_is_fixed_across_traces():
    m = ah.BigBirdAttention(32, 4, block_size=2, num_random_blocks=2, num_global_blocks=1)
    x = jax.random.normal(jax.random.key(0), (1, 17, 32))
    v = jax.jit(m.init)(jax.random.key(1), x)
    a = jax.jit(m.apply)(v, x)
    b = jax.jit(lambda v, x: m.apply(v, x))(v, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_delta_anchor_rows_are_exact_dense_rows():
    d = ah.DeltaAttention(32, 4, window=2, sink=0, stride=4)
    s = ah.StandardAttention(32, 4, causal=True)
    x = jax.random.normal(jax.random.key(0), (1, 13, 32))
    v = jax.jit(d.init)(jax.random.key(1), x)
    np.testing.assert_allclose(np.asarray(jax.jit(d.apply)(v, x))[:, ::4],
                               np.asarray(jax.jit(s.apply)(v, x))[:, ::4], atol=2e-6)


def _aux(m):
    """``m.apply(v, x, return_aux=True)`` as one jit: op-by-op dispatch is slow on CPU, and the
    properties below hold for any trace (jit == eager: test_jit_bf16_and_axes)."""
    return jax.jit(lambda v, x: m.apply(v, x, return_aux=True))


def _dsa(top_k, causal=True, t=13):
    m = ah.DeepSeekSparseAttention(32, 4, top_k=top_k, num_index_heads=2, index_head_dim=8,
                                   causal=causal)
    x = jax.random.normal(jax.random.key(0), (2, t, 32))
    return m, jax.jit(m.init)(jax.random.key(1), x), x


@pytest.mark.parametrize("top_k", [1, 4, 13, 50])
def test_dsa_keeps_min_topk_t_plus_one_keys(top_k):
    m, v, x = _dsa(top_k)
    _, aux = _aux(m)(v, x)
    counts = np.asarray(aux["selected"]).sum(-1)
    np.testing.assert_array_equal(counts, np.minimum(top_k, np.arange(13) + 1)[None].repeat(2, 0))
    assert not np.asarray(aux["selected"] & ~np.tril(np.ones((13, 13), bool))).any()


def test_dsa_topk_at_least_t_is_full_causal_attention():
    m, v, x = _dsa(13)
    s = ah.StandardAttention(32, 4, causal=True)
    np.testing.assert_allclose(np.asarray(jax.jit(m.apply)(v, x)),
                               np.asarray(jax.jit(s.apply)(v, x)), atol=2e-6)
    m2, v2, x2 = _dsa(100, causal=False)
    s2 = ah.StandardAttention(32, 4)
    np.testing.assert_allclose(np.asarray(jax.jit(m2.apply)(v2, x2)),
                               np.asarray(jax.jit(s2.apply)(v2, x2)), atol=2e-6)


def test_dsa_ties_break_towards_lower_index():
    from attnhut_jax.core import topk_keep

    scores = jnp.asarray([[[1.0, 0.0, 0.0, 0.0, 2.0]]])
    keep = topk_keep(scores, jnp.ones((1, 5), bool), 3)
    np.testing.assert_array_equal(np.asarray(keep)[0, 0], [True, True, False, False, True])


def test_dsa_output_gives_indexer_no_gradient():
    m, v, x = _dsa(3)
    g = jax.jit(jax.grad(lambda p: m.apply({"params": p}, x).sum()))(nn.unbox(v)["params"])
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree_util.tree_leaves(g["indexer"]))


def _msa(t=13, **kw):
    cfg = dict(num_kv_groups=2, block_size=4, top_k=2) | kw
    m = ah.MiniMaxSparseAttention(32, 4, **cfg)
    x = jax.random.normal(jax.random.key(0), (2, t, 32))
    return m, jax.jit(m.init)(jax.random.key(1), x), x


def test_msa_topk_above_num_blocks_keeps_every_causal_key():
    m, v, x = _msa(top_k=10)
    _, aux = _aux(m)(v, x)
    np.testing.assert_array_equal(np.asarray(aux["keep"]),
                                  np.broadcast_to(np.tril(np.ones((13, 13), bool)), (2, 2, 13, 13)))


def test_msa_index_branch_gradients():
    m, v, x = _msa()
    params = nn.unbox(v)["params"]
    idx = ("idx_q", "idx_k", "idx_q_norm", "idx_k_norm")
    g_out = jax.jit(jax.grad(lambda p: m.apply({"params": p}, x).sum()))(params)
    for name in idx:
        assert all(np.all(np.asarray(a) == 0) for a in jax.tree_util.tree_leaves(g_out[name]))

    def aux_loss(p, x):
        _, aux = m.apply({"params": p}, x, return_aux=True)
        return ah.msa_index_aux_loss(aux["index_scores"], aux["attn_weights"], aux["keep"])

    loss, (gp, gx) = jax.jit(jax.value_and_grad(aux_loss, argnums=(0, 1)))(params, x)
    assert float(loss) >= 0.0
    for name in idx:
        assert any(np.abs(np.asarray(a)).max() > 0 for a in jax.tree_util.tree_leaves(gp[name]))
    for name in ("q", "k", "v", "proj", "q_norm", "k_norm"):
        assert all(np.all(np.asarray(a) == 0) for a in jax.tree_util.tree_leaves(gp[name]))
    assert np.all(np.asarray(gx) == 0)


def test_msa_selection_is_per_query_block_level():
    m, v, x = _msa(t=16, top_k=1, force_current_block=False)
    _, aux = _aux(m)(v, x)
    keep = np.asarray(aux["keep"])
    # each query keeps exactly one block: within the causal part, the kept keys form one block
    for b in range(2):
        for kg in range(2):
            for t in range(16):
                blocks = set(np.flatnonzero(keep[b, kg, t]) // 4)
                assert len(blocks) == 1 and max(blocks) <= t // 4


@pytest.mark.parametrize("make,pattern", [
    (lambda: ah.DeepSeekSparseAttention(32, 4, top_k=0), r"top_k=0 must be >= 1"),
    (lambda: ah.MiniMaxSparseAttention(32, 4, 2, top_k=0), r"top_k=0 must be >= 1"),
    (lambda: ah.MiniMaxSparseAttention(32, 4, 2, block_size=0), r"block_size=0 must be >= 1"),
    (lambda: ah.BigBirdAttention(32, 4, block_size=0), r"block_size=0 must be >= 1"),
    (lambda: ah.BigBirdAttention(32, 4, num_window_blocks=4), r"num_window_blocks=4 must be odd"),
    (lambda: ah.DeltaAttention(32, 4, window=0), r"window=0 must be >= 1"),
    (lambda: ah.DeltaAttention(32, 4, stride=0), r"stride=0 must be >= 1"),
    (lambda: ah.DeltaAttention(32, 4, sink=-1), r"sink=-1 must be >= 0"),
    (lambda: ah.MiniMaxSparseAttention(32, 4, 3), r"num_heads=4 must be divisible by num_kv_groups=3"),
    (lambda: ah.MiniMaxSparseAttention(32, 4, 2, rope_dim=3), r"rope_dim=3 must be even"),
    (lambda: ah.MiniMaxSparseAttention(32, 4, 2, rope_dim=16), r"rope_dim=16 .*<= head_dim=8"),
    (lambda: ah.MiniMaxSparseAttention(32, 4, 2, index_dim=4, rope_dim=6),
     r"rope_dim=6 .*<= index_dim=4"),
    (lambda: ah.DeepSeekSparseAttention(30, 4), r"dim=30 must be divisible by num_heads=4"),
])
def test_bad_values(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make().init(jax.random.key(0), jnp.zeros((1, 3, make().dim)))

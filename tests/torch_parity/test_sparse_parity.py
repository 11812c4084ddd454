"""BigBird, Delta, DSA and MSA against attnhut 0.5.0: outputs, gradients, aux tensors and losses,
BigBird's random blocks, DSA's top-k ties."""

from __future__ import annotations

import attnhut
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attnhut_jax as ah
from parity import from_torch, to_state_dict
from parity.cases import dsa_case
from parity.compare import Case, run_case


def _cases() -> list[Case]:
    cases = []
    add = cases.append
    # BigBird: lengths that are not multiples of the block, shorter than a block, many blocks.
    for causal in (False, True):
        for t, bs, w, r, g in [(1, 4, 3, 3, 2), (3, 4, 3, 1, 1), (13, 4, 3, 1, 1),
                               (40, 4, 3, 2, 1), (40, 4, 1, 3, 0), (33, 2, 5, 2, 2)]:
            cfg = f"T={t} bs={bs} win={w} rand={r} glob={g} causal={causal}"
            add(Case("BigBirdAttention", cfg, lambda bs=bs, w=w, r=r, g=g, c=causal:
                     attnhut.BigBirdAttention(32, 4, bs, w, r, g, c, seed=3, bias=c),
                     (2, t, 32)))

    def kpm(rng, tm):
        m = rng.random((2, 19)) < 0.7
        m[1, :] = False  # a sample with no real key at all
        return {"key_padding_mask": torch.from_numpy(m)}, {"key_padding_mask": jnp.asarray(m)}

    add(Case("BigBirdAttention", "key_padding_mask, T=19 bs=4",
             lambda: attnhut.BigBirdAttention(32, 4, 4, 3, 2, 1, seed=11), (2, 19, 32), call=kpm))
    # Delta
    for t, w, s, st in [(1, 4, 1, 3), (17, 4, 2, 3), (17, 32, 0, 5), (16, 3, 4, 16), (9, 1, 0, 2),
                        (23, 5, 1, 1)]:
        add(Case("DeltaAttention", f"T={t} window={w} sink={s} stride={st}",
                 lambda w=w, s=s, st=st: attnhut.DeltaAttention(32, 4, w, s, st, bias=st == 3),
                 (2, t, 32)))
    # DeepSeek Sparse: top_k 1, < T, >= T; causal and not; tiny and odd lengths.
    for causal in (True, False):
        for t, k in [(1, 4), (7, 1), (13, 3), (13, 64), (16, 5)]:
            add(dsa_case(f"T={t} top_k={k} causal={causal}",
                         lambda k=k, c=causal: attnhut.DeepSeekSparseAttention(
                             32, 4, top_k=k, num_index_heads=3, index_head_dim=8, causal=c, bias=c),
                         (2, t, 32), k, causal))
    # MiniMax Sparse
    msa = [
        ("K2 bs4 top2 T=13", dict(num_kv_groups=2, block_size=4, top_k=2), 13),
        ("K1 bs4 top1 T=3 (< block)", dict(num_kv_groups=1, block_size=4, top_k=1), 3),
        ("K4 bs3 top9 (>= blocks) T=11", dict(num_kv_groups=4, block_size=3, top_k=9), 11),
        ("K2 idx12 rope4 partial T=10", dict(num_kv_groups=2, block_size=4, top_k=2,
                                             index_dim=12, rope_dim=4), 10),
        ("K2 no rope bias T=9", dict(num_kv_groups=2, block_size=2, top_k=2, use_rope=False,
                                     bias=True), 9),
        ("K2 bidir T=12", dict(num_kv_groups=2, block_size=4, top_k=2, causal=False), 12),
        ("K2 no forced block T=12", dict(num_kv_groups=2, block_size=4, top_k=1,
                                         force_current_block=False, rope_theta=50.0), 12),
    ]
    for cfg, kw, t in msa:
        add(Case("MiniMaxSparseAttention", cfg,
                 lambda kw=kw: attnhut.MiniMaxSparseAttention(32, 4, **kw), (2, t, 32)))
    add(Case("LightningIndexer", "h3 d8", lambda: attnhut.LightningIndexer(32, 3, 8, bias=True),
             (2, 6, 32)))
    return cases


ALL = _cases()


@pytest.mark.parametrize("case", ALL, ids=[f"{c.name}[{c.config}]" for c in ALL])
def test_parity(case):
    r = run_case(case)
    assert r.selection_error is None, r.selection_error
    assert r.ok, f"out {r.out_err:.2e}, grads {r.grad_errs}"
    rows = case.shape[0] * case.shape[1]
    assert r.tied_rows <= rows // 2, f"{r.tied_rows} of {rows} rows differ by ties"


def test_dsa_cases_exercise_ties():
    """ReLU zeros give exact ties at the k-th score: the tie rule is really used."""
    torch.manual_seed(0)
    tm = attnhut.DeepSeekSparseAttention(32, 4, top_k=3, num_index_heads=3, index_head_dim=8)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 13, 32), dtype=np.float32))
    _, aux = tm(x, return_aux=True)
    s = aux["index_scores"].detach().numpy()
    kth = -np.sort(-s, -1)[..., 2]
    assert ((s == kth[..., None]).sum(-1) > 1).any()


def test_selection_comparison_fails_on_a_real_disagreement():
    from parity.compare import compare_selection

    scores = np.array([[3.0, 2.0, 1.0, 0.0]])
    valid = np.ones((1, 4), bool)
    ref = np.array([[True, True, False, False]])
    _, err = compare_selection((scores, ref, 2, valid), (scores, np.array([[True, False, True,
                                                                            False]])))
    assert err and "beyond ties" in err
    tied = np.array([[3.0, 1.0, 1.0, 0.0]])
    ok_rows, err = compare_selection((tied, ref, 2, valid), (tied, np.array([[True, False, True,
                                                                             False]])))
    assert err is None and not ok_rows[0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("w,r,g,seed", [(3, 3, 2, 0), (1, 2, 0, 5), (5, 1, 1, 123), (3, 0, 2, 9)])
def test_bigbird_block_pattern_equals_torch_for_every_length(causal, w, r, g, seed):
    tm = attnhut.BigBirdAttention(32, 4, 4, w, r, g, causal, seed)
    fm, _ = from_torch(tm)
    for nb in range(1, 41):
        np.testing.assert_array_equal(fm.block_mask(nb), tm.block_mask(nb, "cpu").numpy(),
                                      err_msg=f"num_blocks={nb}")


def test_dsa_index_aux_loss_matches_torch_and_trains_the_indexer():
    from attnhut.deepseek_sparse import dsa_index_aux_loss as torch_loss

    rng = np.random.default_rng(0)
    scores = rng.standard_normal((2, 5, 5)).astype(np.float32)
    attn = rng.random((2, 3, 5, 5)).astype(np.float32)
    ref = torch_loss(torch.from_numpy(scores), torch.from_numpy(attn)).item()
    assert np.isclose(float(ah.dsa_index_aux_loss(jnp.asarray(scores), jnp.asarray(attn))), ref,
                      rtol=1e-6)

    # the module's own target: its main attention over every visible key (aux["dense_weights"])
    m = ah.DeepSeekSparseAttention(32, 4, top_k=3, num_index_heads=2, index_head_dim=8)
    x = jax.random.normal(jax.random.key(0), (2, 13, 32))
    v = jax.jit(m.init)(jax.random.key(1), x)
    params = nn.unbox(v)["params"]
    target = jax.jit(lambda p: m.apply({"params": p}, x, return_aux=True)[1]["dense_weights"])(
        params)

    @jax.jit
    def loss(p):
        _, aux = m.apply({"params": p}, x, return_aux=True)
        return ah.dsa_index_aux_loss(aux["index_scores"], target)

    grad = jax.jit(jax.grad(loss))
    l0 = loss(params)
    g = grad(params)
    assert all(np.abs(np.asarray(a)).max() > 0 for a in jax.tree_util.tree_leaves(g["indexer"]))
    assert all(np.abs(np.asarray(a)).max() == 0 for a in jax.tree_util.tree_leaves(g["qkv"]))
    p = params
    for _ in range(20):
        gi = grad(p)
        p = jax.tree_util.tree_map(lambda a, b: a - 0.5 * b, p, gi)
    assert float(loss(p)) < float(l0) - 1e-3


def test_msa_aux_equals_torch():
    torch.manual_seed(0)
    tm = attnhut.MiniMaxSparseAttention(32, 4, 2, block_size=4, top_k=2, rope_dim=4)
    fm, v = from_torch(tm)
    x = np.random.default_rng(0).standard_normal((2, 11, 32)).astype(np.float32)
    with torch.no_grad():
        _, t_aux = tm(torch.from_numpy(x), return_aux=True)
    _, j_aux = jax.jit(lambda v, x: fm.apply(v, x, return_aux=True))(v, jnp.asarray(x))
    for key in ("index_scores", "attn_weights"):
        np.testing.assert_allclose(np.asarray(j_aux[key]), t_aux[key].numpy(), atol=1e-5,
                                   rtol=1e-4, err_msg=key)
    np.testing.assert_array_equal(np.asarray(j_aux["keep"]), t_aux["keep"].numpy())
    tl = attnhut.msa_index_aux_loss(t_aux["index_scores"], t_aux["attn_weights"], t_aux["keep"])
    jl = ah.msa_index_aux_loss(j_aux["index_scores"], j_aux["attn_weights"], j_aux["keep"])
    assert np.isclose(float(jl), tl.item(), rtol=1e-5, atol=1e-6)


def test_state_dict_names_mirror_attnhut():
    torch.manual_seed(0)
    for tm in (attnhut.BigBirdAttention(32, 4), attnhut.DeltaAttention(32, 4, bias=True),
               attnhut.DeepSeekSparseAttention(32, 4), attnhut.MiniMaxSparseAttention(32, 4, 2)):
        fm, v = from_torch(tm)
        assert set(to_state_dict(fm, v)) == set(tm.state_dict())


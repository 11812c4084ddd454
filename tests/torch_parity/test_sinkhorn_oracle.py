"""SinkhornAttention against a torch oracle written here from the paper's equations (Tay et al.,
*Sparse Sinkhorn Attention*, arXiv 2002.11296) with this package's documented choices: float64
loops over batch, head, block and query, outputs (float32 JAX within 1e-5 relative to the output
scale) and the gradients of every parameter and of the input (within 1e-4)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attnhut_jax as ah

D, N, BS = 32, 4, 3


def _oracle(x, w, *, causal, sortcut_k, iters, tau, max_len):
    """x (B, T, D) float64 torch; w: dict of float64 torch parameters (qkv/kernel, qkv/bias?,
    sort/kernel, sort/bias, proj/kernel, proj/bias?)."""
    b, t, _ = x.shape
    h = D // N
    qkv = x @ w["qkv/kernel"] + (w["qkv/bias"] if "qkv/bias" in w else 0)
    q, k, v = (a.reshape(b, t, N, h) for a in qkv.split(D, dim=-1))
    nb = math.ceil(t / BS)
    real = [s < t for s in range(nb * BS)]
    outs = torch.zeros(b, t, N, h, dtype=x.dtype)
    for bi in range(b):
        for n in range(N):
            def key(s, arr, bi=bi, n=n):  # padded keys and values are zeros
                return arr[bi, s, n] if real[s] else torch.zeros(h, dtype=x.dtype)
            kb = [torch.stack([key(j * BS + p, k) for p in range(BS)]) for j in range(nb)]
            vb = [torch.stack([key(j * BS + p, v) for p in range(BS)]) for j in range(nb)]
            # block summaries: the mean of the block's keys; causal: of all keys before the block
            summ = []
            for i in range(nb):
                idx = ([s for s in range(i * BS) if real[s]] if causal
                       else [s for s in range(i * BS, (i + 1) * BS) if real[s]])
                summ.append(torch.stack([k[bi, s, n] for s in idx]).mean(0) if idx
                            else torch.zeros(h, dtype=x.dtype))
            # SortNet: R = ReLU(summary W + b), columns = the sequence's blocks
            r = torch.relu(torch.stack(summ) @ w["sort/kernel"] + w["sort/bias"])[:, :nb]
            allow = [[(j < i) if causal else True for j in range(nb)] for i in range(nb)]
            # log-space Sinkhorn: columns then rows, each iteration; causal columns: prefix sums
            xl = [[r[i, j] / tau for j in range(nb)] for i in range(nb)]
            for _ in range(iters):
                new = [row[:] for row in xl]
                for j in range(nb):
                    for i in range(nb):
                        if not allow[i][j]:
                            continue
                        rows = [a for a in range(nb) if allow[a][j] and (not causal or a <= i)]
                        new[i][j] = xl[i][j] - torch.logsumexp(torch.stack([xl[a][j] for a in rows]), 0)
                xl = new
                new = [row[:] for row in xl]
                for i in range(nb):
                    cols = [j for j in range(nb) if allow[i][j]]
                    if not cols:
                        continue
                    lse = torch.logsumexp(torch.stack([xl[i][j] for j in cols]), 0)
                    for j in cols:
                        new[i][j] = xl[i][j] - lse
                xl = new
            p = [[torch.exp(xl[i][j]) if allow[i][j] else None for j in range(nb)]
                 for i in range(nb)]

            def sorted_block(i, p=p, kb=kb, vb=vb):
                """psi_S(K)_i = sum_j P_ij K_j and the slots holding a real token."""
                cols = [j for j in range(nb) if p[i][j] is not None]
                if not cols:
                    return None
                ks = sum(p[i][j] * kb[j] for j in cols)
                vs = sum(p[i][j] * vb[j] for j in cols)
                ok = [any(real[j * BS + s] for j in cols) for s in range(BS)]
                return ks, vs, ok
            for pos in range(t):
                i = pos // BS
                keys, vals = [], []
                if sortcut_k is None:
                    for s in range(i * BS, (i + 1) * BS):
                        if real[s] and (not causal or s <= pos):
                            keys.append(k[bi, s, n])
                            vals.append(v[bi, s, n])
                    blocks = [i]
                else:
                    blocks = list(range(min(sortcut_k, nb)))
                for c in blocks:
                    sb = sorted_block(c)
                    if sb is None:
                        continue
                    for s in range(BS):
                        if sb[2][s]:
                            keys.append(sb[0][s])
                            vals.append(sb[1][s])
                logits = torch.stack(keys) @ q[bi, pos, n] / math.sqrt(h)
                outs[bi, pos, n] = torch.softmax(logits, 0) @ torch.stack(vals)
    y = outs.reshape(b, t, D) @ w["proj/kernel"]
    return y + w["proj/bias"] if "proj/bias" in w else y


CASES = [
    ("bidir T=11", dict(), 11),
    ("causal T=11 bias", dict(causal=True, bias=True), 11),
    ("sortcut 2 T=10", dict(sortcut_k=2), 10),
]


@pytest.mark.parametrize("name,kw,t", CASES, ids=[c[0] for c in CASES])
def test_outputs_and_gradients_match_the_oracle(name, kw, t):
    m = ah.SinkhornAttention(D, N, BS, sinkhorn_iters=4, temperature=0.75, max_len=12, **kw)
    x = jax.random.normal(jax.random.key(1), (2, t, D))
    params = nn.unbox(m.init(jax.random.key(2), x))["params"]
    # larger sorting weights than the default init, so that the sort is far from uniform
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 8 if "sort" in jax.tree_util.keystr(path) else a, params)
    r = jax.random.normal(jax.random.key(3), (2, t, D))

    def loss(p, x_):
        return jnp.sum(m.apply({"params": p}, x_) * r)

    y = np.asarray(jax.jit(m.apply)({"params": params}, x))
    g_p, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    flat = {"/".join(str(getattr(e, "key", e)) for e in path): np.asarray(a, np.float64)
            for path, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    tw = {name_: torch.tensor(a, requires_grad=True) for name_, a in flat.items()}
    tx = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    ty = _oracle(tx, tw, causal=kw.get("causal", False), sortcut_k=kw.get("sortcut_k"),
                 iters=4, tau=0.75, max_len=12)
    (ty * torch.tensor(np.asarray(r, np.float64))).sum().backward()

    scale = np.abs(ty.detach().numpy()).max()
    np.testing.assert_allclose(y, ty.detach().numpy(), atol=1e-5 * scale, rtol=0)
    g_flat = {"/".join(str(getattr(e, "key", e)) for e in path): np.asarray(a)
              for path, a in jax.tree_util.tree_flatten_with_path(g_p)[0]}
    assert set(g_flat) == set(tw)
    for name_, g in g_flat.items():
        want = tw[name_].grad.numpy()
        np.testing.assert_allclose(g, want, atol=1e-4 * max(np.abs(want).max(), 1e-3), rtol=1e-4,
                                   err_msg=name_)
    want_x = tx.grad.numpy()
    np.testing.assert_allclose(np.asarray(g_x), want_x, atol=1e-4 * np.abs(want_x).max(),
                               rtol=1e-4)

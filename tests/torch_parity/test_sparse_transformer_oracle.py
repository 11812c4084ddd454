"""StridedSparseAttention and FixedSparseAttention against a torch oracle written from Child et
al. (2019), Section 4.2-4.3: for every output position i, the index sets A(1)_i and A(2)_i of the
strided or fixed pattern, combined per head (eq. 3, interleaved) or as their union (eq. 4,
merged), and ``a(x_i, S_i) = softmax((W_q x_i) K_{S_i}^T / sqrt(d)) V_{S_i}`` (eq. 2) over each
head's set, then the output projection. The oracle lists each set position by position, gathers
its keys and runs the softmax over them alone (no mask over a (T, T) grid). Compared in float32:
outputs within 1e-5 relative to their scale, the gradients of every parameter and of the input
within 1e-4; the module runs its default path (the block-sparse passes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attnhut_jax as ah

D = 16


def index_set(kind, i, l, c, causal, set_no, length):
    """A(set_no)_i within a sequence of ``length`` tokens (Section 4.3)."""
    js = range(0, i + 1) if causal else range(length)
    if kind == "strided":
        if set_no == 1:
            return [j for j in js if (i - l <= j <= i if causal else abs(i - j) <= l)]
        return [j for j in js if (i - j) % l == 0]
    if set_no == 1:
        return [j for j in js if j // l == i // l]
    return [j for j in js if l - c <= j % l <= l - 1]


def head_set(kind, i, l, c, causal, combine, head, length):
    """The keys head ``head`` of query i reads: the union (merged) or A(1) / A(2) by head
    parity (interleaved); a query always reads itself."""
    if combine == "merged":
        keys = set(index_set(kind, i, l, c, causal, 1, length)) | set(
            index_set(kind, i, l, c, causal, 2, length))
    else:
        keys = set(index_set(kind, i, l, c, causal, 1 + head % 2, length))
    return sorted(keys | {i})


class Oracle(torch.nn.Module):
    def __init__(self, dim, num_heads, kind, l, c, causal, combine, bias):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = torch.nn.Linear(dim, dim, bias=bias)
        self.n, self.kind, self.l, self.c = num_heads, kind, l, c
        self.causal, self.combine = causal, combine

    def forward(self, x, runs):
        """``runs``: per batch row, the (start, length) of each packed sequence; other tokens
        are padding and give zeros."""
        b, t, d = x.shape
        hd = d // self.n
        q, k, v = self.qkv(x).view(b, t, 3, self.n, hd).unbind(2)
        rows = []
        for bi in range(b):
            out = [[torch.zeros(hd) for _ in range(self.n)] for _ in range(t)]
            for start, length in runs[bi]:
                for i in range(length):
                    for hn in range(self.n):
                        keys = [start + j for j in head_set(self.kind, i, self.l, self.c,
                                                            self.causal, self.combine, hn, length)]
                        kk, vv = k[bi, keys, hn], v[bi, keys, hn]
                        w = torch.softmax(kk @ q[bi, start + i, hn] / hd ** 0.5, dim=0)
                        out[start + i][hn] = w @ vv
            rows.append(torch.stack([torch.cat(o) for o in out]))
        return self.proj(torch.stack(rows))


CASES = [
    # kind, l, c, causal, combine, bias, packed
    ("strided", 3, 1, True, "merged", True, False),
    ("strided", 4, 1, False, "interleaved", False, True),
    ("fixed", 4, 2, True, "interleaved", False, True),
    ("fixed", 3, 1, False, "merged", True, False),
]
T = 14
SEG = np.array([[1] * 8 + [2] * 5 + [0], [4] * 14])


def _runs(seg):
    out = []
    for row in seg:
        runs, s = [], 0
        for i in range(1, len(row) + 1):
            if i == len(row) or row[i] != row[s]:
                if row[s] != 0:
                    runs.append((s, i - s))
                s = i
        out.append(runs)
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-l{c[1]}-c{c[2]}-{'causal' if c[3] else 'bidir'}"
                                             f"-{c[4]}{'-packed' if c[6] else ''}" for c in CASES])
def test_matches_the_torch_oracle(case):
    kind, l, c, causal, combine, bias, packed = case
    torch.manual_seed(0)
    oracle = Oracle(D, 4, kind, l, c, causal, combine, bias)
    if kind == "strided":
        module = ah.StridedSparseAttention(D, 4, l, causal=causal, combine=combine, bias=bias)
    else:
        module = ah.FixedSparseAttention(D, 4, l, c, causal=causal, combine=combine, bias=bias)
    x = np.random.default_rng(1).standard_normal((2, T, D)).astype(np.float32)
    seg = SEG if packed else np.ones((2, T), int)
    r = np.random.default_rng(2).standard_normal((2, T, D)).astype(np.float32)

    def linear(lin):
        p = {"kernel": jnp.asarray(lin.weight.detach().numpy().T)}
        if lin.bias is not None:
            p["bias"] = jnp.asarray(lin.bias.detach().numpy())
        return p

    params = {"qkv": linear(oracle.qkv), "proj": linear(oracle.proj)}
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = oracle(xt, _runs(seg))
    (yt * torch.from_numpy(r)).sum().backward()

    def loss(p, x_):
        y = module.apply({"params": p}, x_, segment_ids=jnp.asarray(seg) if packed else None)
        return (y * r).sum(), y

    (_, y), (g_p, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, jnp.asarray(x))

    def close(got, want, tol, what):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        scale = max(1.0, float(np.abs(want).max()))
        err = float(np.abs(got - want).max())
        assert err <= tol * scale, f"{what}: {err:.3g} > {tol} * {scale:.3g}"

    close(y, yt.detach().numpy(), 1e-5, "output")
    close(g_x, xt.grad.numpy(), 1e-4, "grad input")
    for name, lin in (("qkv", oracle.qkv), ("proj", oracle.proj)):
        close(g_p[name]["kernel"], lin.weight.grad.numpy().T, 1e-4, f"grad {name}.kernel")
        if bias:
            close(g_p[name]["bias"], lin.bias.grad.numpy(), 1e-4, f"grad {name}.bias")
    if packed:  # padding tokens give zeros
        assert np.all(np.asarray(y)[SEG == 0] == 0)

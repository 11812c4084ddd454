"""SparkAttention against a torch oracle written here from the paper's equations (You et al.,
2025, arXiv 2506.06644): Section 2's Spark Attention,
``out = V . (softmax(Top_k(K1^T q[:r])) (.) softplus(K2^T q[r:]))``, with Section 3's statistical
top-k, ``theta = mean + std * Phi^{-1}(1 - k / n)`` over the n keys the query sees (population
std; every key when n <= k), keys at or above theta kept, the rest at -inf before the softmax.
The query is scaled by head_dim ** -0.5 before the split (the module's documented choice).

Float32, CPU, batch 2, T = 13: causal and bidirectional, with projection biases, and packed
segments with padding. Every impl (``reference``, ``xla`` with key tiles of 4, so several tiles
and a partial one, masked and gathering its selection). Outputs: max |d| <= 1e-5 max(1, max
|ref|); gradients of the input and of every parameter: max |d| <= 1e-4 max(1, max |ref|). The
oracle's selection is checked to be a strict subset of the visible keys in most rows (the
threshold bites).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import attnhut_jax as ah
from attnhut_jax import spark

B, T, D, N, R, K = 2, 13, 16, 2, 3, 3
OUT_TOL, GRAD_TOL = 1e-5, 1e-4


class SparkOracle(torch.nn.Module):
    """One Spark attention layer in torch, from the paper's equations."""

    def __init__(self, dim, num_heads, top_k, predictor_dim, causal, bias):
        super().__init__()
        self.n, self.hd, self.k, self.r, self.causal = (num_heads, dim // num_heads, top_k,
                                                        predictor_dim, causal)
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = torch.nn.Linear(dim, dim, bias=bias)

    def forward(self, x, segment_ids=None):
        b, t, d = x.shape
        if segment_ids is not None:
            x = x * (segment_ids != 0)[..., None]
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (a.reshape(b, t, self.n, self.hd).transpose(1, 2) for a in (q, k, v))
        q = q * self.hd ** -0.5
        s1 = q[..., :self.r] @ k[..., :self.r].transpose(-1, -2)  # predictor scores
        s2 = q[..., self.r:] @ k[..., self.r:].transpose(-1, -2)
        visible = torch.ones(t, t, dtype=torch.bool)
        if self.causal:
            visible = torch.tril(visible)
        visible = visible.expand(b, 1, t, t)
        if segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            visible = visible & (same & (segment_ids != 0)[:, None, :])[:, None]
        visible = visible.expand(b, self.n, t, t)
        with torch.no_grad():  # the threshold: statistics of the visible predictor scores
            n = visible.sum(-1).to(s1.dtype)
            mean = torch.where(visible, s1, 0.0).sum(-1) / n.clamp(min=1)
            var = torch.where(visible, (s1 - mean[..., None]) ** 2, 0.0).sum(-1) / n.clamp(min=1)
            frac = (1 - self.k / n.clamp(min=1)).clamp(min=1e-12)
            theta = torch.where(n > self.k, mean + var.sqrt() * torch.special.ndtri(frac),
                                torch.full_like(mean, -torch.inf))
            selected = visible & (s1 >= theta[..., None])
        logits = s1.masked_fill(~selected, -torch.inf)
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no key reads nothing
        w = p * torch.nn.functional.softplus(s2)
        out = (w @ v).transpose(1, 2).reshape(b, t, d)
        self.selected = selected
        return self.proj(out)


CASES = {
    "causal": dict(causal=True, bias=False, packed=False),
    "bidirectional_bias": dict(causal=False, bias=True, packed=False),
    "causal_packed": dict(causal=True, bias=True, packed=True),
}


def _seg():
    return np.array([[1] * 6 + [2] * 5 + [0] * 2, [3] * 13])


@functools.cache
def _case(name):
    c = CASES[name]
    torch.manual_seed(0)
    oracle = SparkOracle(D, N, K, R, c["causal"], c["bias"])
    x = torch.randn(B, T, D, requires_grad=True)
    seg = torch.tensor(_seg()) if c["packed"] else None
    y = oracle(x, seg)
    rw = torch.randn(B, T, D)
    (y * rw).sum().backward()
    params = {"qkv": {"kernel": oracle.qkv.weight.detach().numpy().T},
              "proj": {"kernel": oracle.proj.weight.detach().numpy().T}}
    grads = {"qkv": {"kernel": oracle.qkv.weight.grad.numpy().T},
             "proj": {"kernel": oracle.proj.weight.grad.numpy().T}}
    if c["bias"]:
        for name_ in ("qkv", "proj"):
            layer = getattr(oracle, name_)
            params[name_]["bias"] = layer.bias.detach().numpy()
            grads[name_]["bias"] = layer.bias.grad.numpy()
    return dict(c=c, x=x.detach().numpy(), y=y.detach().numpy(), gx=x.grad.numpy(),
                params=params, grads=grads, rw=rw.numpy(), selected=oracle.selected.numpy())


def _close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


@pytest.mark.parametrize("impl", ["reference", "xla", "xla_gathered"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_spark_matches_the_torch_oracle(name, impl, monkeypatch):
    """``xla_gathered``: the streamed path forced to gather each selection into 12 slots (it
    does so by itself only at long sequences, ``spark.GATHER_RATIO``)."""
    case = _case(name)
    c = case["c"]
    slots = None
    if impl == "xla_gathered":
        monkeypatch.setattr(spark, "GATHER_RATIO", 0)
        impl, slots = "xla", 12
    m = ah.SparkAttention(D, N, K, R, causal=c["causal"], bias=c["bias"], impl=impl, block_k=4,
                          slots=slots)
    seg = jnp.asarray(_seg()) if c["packed"] else None
    params = jax.tree_util.tree_map(jnp.asarray, case["params"])

    def loss(p, x):
        y = m.apply({"params": p}, x, segment_ids=seg)
        return jnp.sum(y * case["rw"]), y

    (_, y), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, jnp.asarray(case["x"]))
    _close(y, case["y"], OUT_TOL, "output")
    _close(gx, case["gx"], GRAD_TOL, "input gradient")
    for layer, leaves in case["grads"].items():
        for leaf, want in leaves.items():
            _close(gp[layer][leaf], want, GRAD_TOL, f"{layer}/{leaf} gradient")
    # the same keys: the module's selection is the oracle's
    sel = m.apply({"params": params}, jnp.asarray(case["x"]), segment_ids=seg, method="selection")
    np.testing.assert_array_equal(np.asarray(sel), case["selected"])
    # and the threshold bites: most rows with more than k visible keys read fewer
    visible_rows = case["selected"][..., K + 1:, :]
    assert (visible_rows.sum(-1) < np.arange(K + 2, T + 1)).mean() > 0.5 or not c["causal"]

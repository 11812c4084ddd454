"""Torch oracles for the linear-attention layers Hugging Face transformers has not got.

Written token by token from the definitions, for tiny parity tests (slow on purpose: nothing is
chunked, nothing is fused):

- ``GatedDeltaNet``: d9d's layer (its constructor), both decay gates. ``"mamba"``:
  ``g = -exp(A_log) * softplus(a + dt_bias)`` (Qwen3.5's, so the oracle is itself checked
  against ``Qwen3_5GatedDeltaNet``); ``"logsigmoid"``: ``g = log_sigmoid(a) / gate_normalizer``
  (no ``A_log`` / ``dt_bias``; ``attnhut_jax.GatedDeltaNet`` divides by its ``gate_normalizer``,
  default 16, and 1 gives d9d's plain ``log_sigmoid(a)``). Parameter names are
  ``Qwen3_5GatedDeltaNet``'s.
- ``LinearAttention``: Katharopoulos et al. (2020), eqs. 2-6 and 16-20: ``phi(x) = elu(x) + 1``,
  ``V'_i = phi(Q_i)^T S_i / (phi(Q_i)^T Z_i + eps)`` with ``S_i = sum_j phi(K_j) V_j^T`` and
  ``Z_i = sum_j phi(K_j)`` over ``j <= i`` (causal) or every ``j``; multi-head, the projections
  ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.

Both take ``forward(x, initial_state=None, return_state=False)`` with the state in the HF / fla
layout (B, heads, key width, value width); LinearAttention's value width is H + 1, the last column
the normaliser Z.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedDeltaNet", "LinearAttention"]


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last axis times ``weight``, times ``silu(gate)``."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y * F.silu(gate)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet (d9d's constructor, Qwen3.5's parameter names), the recurrence token by
    token: per value head, ``S <- exp(g) S``, ``S <- S + k (beta (v - S^T k))^T``,
    ``o = S^T q / sqrt(K)``."""

    def __init__(self, hidden_size: int, num_query_key_heads: int, num_value_heads: int,
                 head_qk_dim: int, head_v_dim: int, norm_eps: float = 1e-6, conv_size: int = 4,
                 decay_gate: str = "logsigmoid", use_qk_l2norm: bool = True,
                 gate_normalizer: float = 16.0):
        super().__init__()
        if num_value_heads % num_query_key_heads:
            raise ValueError(f"num_value_heads={num_value_heads} must be a multiple of "
                             f"num_query_key_heads={num_query_key_heads}")
        if decay_gate not in ("mamba", "logsigmoid"):
            raise ValueError(f"decay_gate={decay_gate!r}; allowed: 'mamba', 'logsigmoid'")
        self.hidden_size, self.num_query_key_heads = hidden_size, num_query_key_heads
        self.num_value_heads, self.head_qk_dim, self.head_v_dim = (num_value_heads, head_qk_dim,
                                                                   head_v_dim)
        self.norm_eps, self.conv_size, self.decay_gate = norm_eps, conv_size, decay_gate
        self.use_qk_l2norm, self.gate_normalizer = use_qk_l2norm, gate_normalizer
        kd, vd = num_query_key_heads * head_qk_dim, num_value_heads * head_v_dim
        self.conv_dim = 2 * kd + vd
        self.in_proj_qkv = nn.Linear(hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden_size, vd, bias=False)
        self.in_proj_b = nn.Linear(hidden_size, num_value_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden_size, num_value_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_size, groups=self.conv_dim,
                                bias=False)
        if decay_gate == "mamba":
            self.dt_bias = nn.Parameter(torch.ones(num_value_heads))
            self.A_log = nn.Parameter(torch.empty(num_value_heads).uniform_(0.01, 16).log())
        self.norm = GatedRMSNorm(head_v_dim, norm_eps)
        self.out_proj = nn.Linear(vd, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None,
                return_state: bool = False):
        b, t, _ = x.shape
        hk, hv, kd, vd = (self.num_query_key_heads, self.num_value_heads, self.head_qk_dim,
                          self.head_v_dim)
        # causal depthwise conv: output t reads inputs t - K + 1 .. t (zeros before 0), then SiLU
        qkv = self.in_proj_qkv(x).transpose(1, 2)
        qkv = F.silu(self.conv1d(F.pad(qkv, (self.conv_size - 1, 0)))).transpose(1, 2)
        q = qkv[..., :hk * kd].reshape(b, t, hk, kd)
        k = qkv[..., hk * kd:2 * hk * kd].reshape(b, t, hk, kd)
        v = qkv[..., 2 * hk * kd:].reshape(b, t, hv, vd)
        if self.use_qk_l2norm:
            q, k = _l2norm(q), _l2norm(k)
        # query/key head i serves value heads i * r ... i * r + r - 1
        q, k = (y.repeat_interleave(hv // hk, dim=2) for y in (q, k))
        q = q * kd ** -0.5
        a = self.in_proj_a(x)
        if self.decay_gate == "mamba":
            g = -self.A_log.exp() * F.softplus(a + self.dt_bias)
        else:
            g = F.logsigmoid(a) / self.gate_normalizer
        beta = torch.sigmoid(self.in_proj_b(x))
        s = (x.new_zeros(b, hv, kd, vd) if initial_state is None else initial_state)
        outs = []
        for i in range(t):
            s = s * g[:, i].exp()[..., None, None]
            pred = torch.einsum("bnkv,bnk->bnv", s, k[:, i])
            s = s + torch.einsum("bnk,bnv->bnkv", k[:, i],
                                 beta[:, i, :, None] * (v[:, i] - pred))
            outs.append(torch.einsum("bnkv,bnk->bnv", s, q[:, i]))
        o = torch.stack(outs, 1)  # (B, T, Hv, V)
        z = self.in_proj_z(x).reshape(b, t, hv, vd)
        out = self.out_proj(self.norm(o, z).reshape(b, t, hv * vd))
        return (out, s) if return_state else out


class LinearAttention(nn.Module):
    """Multi-head linear attention of Katharopoulos et al. with ``phi = elu + 1``."""

    def __init__(self, dim: int, num_heads: int, causal: bool = True, eps: float = 1e-6,
                 bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.causal, self.eps = dim, num_heads, causal, eps
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, initial_state: torch.Tensor | None = None,
                return_state: bool = False):
        b, t, d = x.shape
        n = self.num_heads
        h = d // n
        if not self.causal and (initial_state is not None or return_state):
            raise ValueError("initial_state / return_state need causal=True")
        phi_q, phi_k = (F.elu(p(x).reshape(b, t, n, h)) + 1 for p in (self.q_proj, self.k_proj))
        v = self.v_proj(x).reshape(b, t, n, h)
        if initial_state is None:
            s, z = x.new_zeros(b, n, h, h), x.new_zeros(b, n, h)
        else:
            s, z = initial_state[..., :h], initial_state[..., h]
        if self.causal:
            outs = []
            for i in range(t):
                s = s + torch.einsum("bnk,bnv->bnkv", phi_k[:, i], v[:, i])
                z = z + phi_k[:, i]
                num = torch.einsum("bnk,bnkv->bnv", phi_q[:, i], s)
                den = torch.einsum("bnk,bnk->bn", phi_q[:, i], z)[..., None] + self.eps
                outs.append(num / den)
            o = torch.stack(outs, 1)
        else:
            s = torch.einsum("btnk,btnv->bnkv", phi_k, v)
            z = phi_k.sum(1)
            num = torch.einsum("btnk,bnkv->btnv", phi_q, s)
            o = num / (torch.einsum("btnk,bnk->btn", phi_q, z)[..., None] + self.eps)
        out = self.o_proj(o.reshape(b, t, d))
        return (out, torch.cat([s, z[..., None]], -1)) if return_state else out

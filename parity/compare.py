"""Run one attnhut module and its converted Flax twin on the same input; measure the differences.

Used by both the test-suite and ``python -m parity``, so the report and the tests judge parity by
the same code.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from .convert import from_torch, to_state_dict

# float32 tolerances: outputs |a - b| <= OUT_ATOL + OUT_RTOL * |b|; gradients |a - b| <= GRAD_ATOL.
OUT_ATOL, OUT_RTOL = 1e-5, 1e-4
GRAD_ATOL = 1e-4


@dataclasses.dataclass
class Case:
    """A seeded attnhut module, an input shape, and the extra call arguments both sides get."""

    name: str
    config: str
    make: Callable[[], torch.nn.Module]
    shape: tuple[int, int, int]
    mask: Callable[[int, int], np.ndarray] | None = None  # (b, t) -> attn_mask
    noise: bool = False  # SlotAttention's randn_like draw, shared by both sides
    seed: int = 0


@dataclasses.dataclass
class Result:
    case: Case
    out_err: float
    out_ok: bool
    grad_errs: dict[str, float]
    grad_ok: bool

    @property
    def grad_err(self) -> float:
        return max(self.grad_errs.values()) if self.grad_errs else 0.0

    @property
    def ok(self) -> bool:
        return self.out_ok and self.grad_ok


def _within(a: np.ndarray, b: np.ndarray, atol: float, rtol: float = 0.0) -> bool:
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def _time_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def run_case(case: Case) -> Result:
    """Forward and backward on both sides with the same input and output cotangent."""
    torch.manual_seed(case.seed)
    tm = case.make().float().eval()
    fm, variables = from_torch(tm)
    params = nn.unbox(variables)["params"]

    rng = np.random.default_rng(case.seed + 1)
    x_np = rng.standard_normal(case.shape, dtype=np.float32)
    b, t, _ = case.shape
    torch_kw: dict[str, Any] = {}
    jax_kw: dict[str, Any] = {}
    if case.mask is not None:
        m = case.mask(b, t)
        torch_kw["attn_mask"] = torch.from_numpy(m)
        jax_kw["attn_mask"] = jnp.asarray(m)
    noise_seed = case.seed + 7
    if case.noise:
        torch.manual_seed(noise_seed)
        noise = torch.randn(b, tm.num_slots, case.shape[-1])
        jax_kw["noise"] = jnp.asarray(noise.numpy())

    def torch_forward(x):
        if case.noise:
            torch.manual_seed(noise_seed)  # attnhut draws the same numbers with randn_like
        return tm(x, **torch_kw)

    x_t = torch.from_numpy(x_np).requires_grad_(True)
    out_t = torch_forward(x_t)
    g_np = rng.standard_normal(tuple(out_t.shape), dtype=np.float32)
    (out_t * torch.from_numpy(g_np)).sum().backward()
    torch_grads = {"input": x_t.grad.numpy()}
    for name, p in tm.named_parameters():
        torch_grads[name] = (p.grad.numpy() if p.grad is not None
                             else np.zeros(tuple(p.shape), np.float32))

    def jax_forward(p, x):
        return fm.apply({"params": p}, x, **jax_kw)

    out_j, vjp = jax.vjp(jax_forward, params, jnp.asarray(x_np))
    gp, gx = vjp(jnp.asarray(g_np))
    jax_grads = {"input": np.asarray(gx), **to_state_dict(fm, {"params": gp})}

    out_t_np, out_j_np = out_t.detach().numpy(), np.asarray(out_j)
    out_err = float(np.max(np.abs(out_t_np - out_j_np))) if out_t_np.shape == out_j_np.shape \
        else float("inf")
    grad_errs = {}
    for k, ref in torch_grads.items():
        got = jax_grads.get(k)
        grad_errs[k] = (float(np.max(np.abs(got - ref), initial=0.0))
                        if got is not None and got.shape == ref.shape else float("inf"))
    grad_errs.update({k: float("inf") for k in set(jax_grads) - set(torch_grads)})
    res = Result(case, out_err, _within(out_j_np, out_t_np, OUT_ATOL, OUT_RTOL), grad_errs,
                 all(e <= GRAD_ATOL for e in grad_errs.values()))

    return res


@dataclasses.dataclass
class Timing:
    """Best-of-``reps`` milliseconds: torch eager vs jax jit, forward and forward+backward."""

    torch_fwd: float
    jax_fwd: float
    torch_fwd_bwd: float
    jax_fwd_bwd: float


def time_case(case: Case, reps: int = 5) -> Timing:
    """Time both sides on the case's input (gradients w.r.t. the input and all parameters)."""
    torch.manual_seed(case.seed)
    tm = case.make().float().eval()
    fm, variables = from_torch(tm)
    params = nn.unbox(variables)["params"]
    x_np = np.random.default_rng(case.seed + 1).standard_normal(case.shape, dtype=np.float32)
    b, t, d = case.shape
    torch_kw: dict[str, Any] = {}
    jax_kw: dict[str, Any] = {}
    if case.mask is not None:
        m = case.mask(b, t)
        torch_kw["attn_mask"], jax_kw["attn_mask"] = torch.from_numpy(m), jnp.asarray(m)
    if case.noise:
        jax_kw["noise"] = jnp.zeros((b, tm.num_slots, d))
    x_t = torch.from_numpy(x_np)
    x_j = jnp.asarray(x_np)

    def torch_fwd():
        with torch.no_grad():
            tm(x_t, **torch_kw)

    def torch_fwd_bwd():
        xg = x_t.clone().requires_grad_(True)
        tm(xg, **torch_kw).sum().backward()
        tm.zero_grad(set_to_none=True)

    def loss(p, x):
        return fm.apply({"params": p}, x, **jax_kw).sum()

    fwd = jax.jit(lambda p, x: fm.apply({"params": p}, x, **jax_kw))
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return Timing(
        _time_ms(torch_fwd, reps),
        _time_ms(lambda: fwd(params, x_j).block_until_ready(), reps),
        _time_ms(torch_fwd_bwd, reps),
        _time_ms(lambda: jax.block_until_ready(fwd_bwd(params, x_j)), reps),
    )

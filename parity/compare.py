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
    """A seeded attnhut module, an input shape, and the extra call arguments both sides get.

    ``call`` adds keyword arguments: ``call(rng, torch_module) -> (torch_kwargs, jax_kwargs)``.
    ``output`` picks the compared array from what the module returns (both sides).
    ``selection`` marks a token top-k module (see ``compare_selection``): both sides are run
    with ``return_aux=True`` and rows whose selections differ only by exact ties at the k-th
    score are excluded from the output comparison and get a zero cotangent.
    """

    name: str
    config: str
    make: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]
    mask: Callable[[int, int], np.ndarray] | None = None  # (b, t) -> attn_mask
    noise: bool = False  # SlotAttention's randn_like draw, shared by both sides
    seed: int = 0
    call: Callable[[np.random.Generator, torch.nn.Module], tuple[dict, dict]] | None = None
    output: Callable[[Any], Any] = staticmethod(lambda out: out)
    selection: Callable[[Any], tuple[np.ndarray, np.ndarray, int, np.ndarray]] | None = None
    # Flax fields set on the converted module (e.g. the linear modules' impl and chunk_size)
    jax_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    # tolerances relative to scale: the output's and each gradient's tolerance times
    # max(1, max |torch value|) (the linear layers: their gradients reach tens through the
    # L2 and RMS norms, where float32 sums round at ~1e-6 relative)
    scaled: bool = False


@dataclasses.dataclass
class Result:
    case: Case
    out_err: float
    out_ok: bool
    grad_errs: dict[str, float]
    grad_ok: bool
    selection_error: str | None = None
    tied_rows: int = 0  # rows left out of the output comparison (selections differ by ties)

    @property
    def grad_err(self) -> float:
        return max(self.grad_errs.values()) if self.grad_errs else 0.0

    @property
    def ok(self) -> bool:
        return self.out_ok and self.grad_ok


def compare_selection(ref, got, score_atol: float = 1e-5) -> tuple[np.ndarray, str | None]:
    """Compare two token top-k selections modulo exact ties at the k-th score.

    ``ref`` and ``got`` are ``(scores, selected, k, valid)`` with ``scores`` (..., S) float,
    ``selected`` (..., S) bool, ``k`` the number of keys kept per row before masking and
    ``valid`` (..., S) bool (the keys a row may select at all). The rule: the scores must agree
    within ``score_atol``; on every row, each key selected by one side and not the other must
    score exactly the k-th largest score of that row (on the reference side), i.e. it is a tie
    that torch is free to break either way. Anything else is a real disagreement and is
    reported. Returns (rows whose selections are identical, error message or None).
    """
    s_ref, sel_ref, k, valid = (np.asarray(a) for a in ref)
    s_got, sel_got = np.asarray(got[0]), np.asarray(got[1])
    if s_ref.shape != s_got.shape or sel_ref.shape != sel_got.shape:
        return np.zeros(sel_ref.shape[:-1], bool), (
            f"selection shapes differ: {sel_ref.shape} vs {sel_got.shape}")
    both = np.broadcast_to(valid, s_ref.shape)
    score_err = float(np.max(np.abs(np.where(both, s_ref - s_got, 0.0)), initial=0.0))
    if score_err > score_atol + 1e-4 * float(np.max(np.abs(np.where(both, s_ref, 0)), initial=0)):
        return np.zeros(sel_ref.shape[:-1], bool), f"index scores differ by {score_err:.3e}"
    k = int(k)
    kth = -np.sort(-np.where(both, s_ref, -np.inf), axis=-1)[..., min(k, s_ref.shape[-1]) - 1]
    diff = sel_ref != sel_got
    tie = np.abs(s_ref - kth[..., None]) <= score_atol
    bad = diff & ~tie
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return np.zeros(sel_ref.shape[:-1], bool), (
            f"selections disagree beyond ties at {idx}: score {s_ref[idx]:.6g}, "
            f"k-th score {kth[idx[:-1]]:.6g}")
    counts_ok = (sel_ref.sum(-1) == sel_got.sum(-1))
    if not counts_ok.all():
        return np.zeros(sel_ref.shape[:-1], bool), "selections keep different numbers of keys"
    return ~diff.any(-1), None


def _within(a: np.ndarray, b: np.ndarray, atol: float, rtol: float = 0.0) -> bool:
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def best_ms(fn: Callable[[], Any], reps: int) -> float:
    """Best wall time of ``reps`` calls of ``fn`` after one warm-up call, in milliseconds."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _call_kwargs(case: Case, tm: torch.nn.Module, rng: np.random.Generator):
    torch_kw: dict[str, Any] = {}
    jax_kw: dict[str, Any] = {}
    b, t = case.shape[0], case.shape[1]
    if case.mask is not None:
        m = case.mask(b, t)
        torch_kw["attn_mask"], jax_kw["attn_mask"] = torch.from_numpy(m), jnp.asarray(m)
    if case.noise:  # SlotAttention: the draw attnhut makes with randn_like, from a known seed
        torch.manual_seed(case.seed + 7)
        noise = torch.randn(case.shape[0], tm.num_slots, case.shape[-1])
        jax_kw["noise"] = jnp.asarray(noise.numpy())
    if case.call is not None:
        tk, jk = case.call(rng, tm)
        torch_kw.update(tk)
        jax_kw.update(jk)
    return torch_kw, jax_kw


def _setup(case: Case):
    """The seeded torch module, its conversion, the input and both sides' call kwargs."""
    torch.manual_seed(case.seed)
    tm = case.make().float().eval()
    fm, variables = from_torch(tm)
    if case.jax_fields:
        fm = fm.clone(**case.jax_fields)
    rng = np.random.default_rng(case.seed + 1)
    x_np = rng.standard_normal(case.shape, dtype=np.float32)
    torch_kw, jax_kw = _call_kwargs(case, tm, rng)
    return tm, fm, nn.unbox(variables)["params"], rng, x_np, torch_kw, jax_kw


def run_case(case: Case) -> Result:
    """Forward and backward on both sides with the same input and output cotangent."""
    tm, fm, params, rng, x_np, torch_kw, jax_kw = _setup(case)
    noise_seed = case.seed + 7

    def torch_forward(x, **extra):
        if case.noise:
            torch.manual_seed(noise_seed)  # attnhut draws the same numbers with randn_like
        return tm(x, **torch_kw, **extra)

    # The jax side runs jitted (one compile per case; eager op-by-op dispatch is far slower on
    # CPU). jit == eager is a property tested separately for every mechanism.
    def jax_forward(p, x, **extra):
        return fm.apply({"params": p}, x, **jax_kw, **extra)

    row_ok = None
    sel_error = None
    if case.selection is not None:
        with torch.no_grad():
            t_full = torch_forward(torch.from_numpy(x_np), return_aux=True)
        j_full = jax.jit(lambda p, x: jax_forward(p, x, return_aux=True))(params, jnp.asarray(x_np))
        row_ok, sel_error = compare_selection(case.selection(t_full), case.selection(j_full))

    x_t = torch.from_numpy(x_np).requires_grad_(True)
    out_t = case.output(torch_forward(x_t))
    g_np = rng.standard_normal(tuple(out_t.shape), dtype=np.float32)
    if row_ok is not None:  # rows that legitimately differ (ties) get no cotangent
        g_np = g_np * row_ok.reshape(row_ok.shape + (1,) * (g_np.ndim - row_ok.ndim))
    (out_t * torch.from_numpy(g_np)).sum().backward()
    torch_grads = {"input": x_t.grad.numpy()}
    for name, p in tm.named_parameters():
        torch_grads[name] = (p.grad.numpy() if p.grad is not None
                             else np.zeros(tuple(p.shape), np.float32))

    @jax.jit  # output and its vjp in one program: a single compile for both passes
    def out_and_grads(p, x, g):
        out, vjp = jax.vjp(lambda p, x: case.output(jax_forward(p, x)), p, x)
        return out, vjp(g)

    out_j, (gp, gx) = out_and_grads(params, jnp.asarray(x_np), jnp.asarray(g_np))
    jax_grads = {"input": np.asarray(gx), **to_state_dict(fm, {"params": gp}, type(tm))}

    out_t_np, out_j_np = out_t.detach().numpy(), np.asarray(out_j)
    if row_ok is not None and out_t_np.shape == out_j_np.shape:
        out_t_np, out_j_np = out_t_np[row_ok], out_j_np[row_ok]
    out_err = float(np.max(np.abs(out_t_np - out_j_np), initial=0.0)) \
        if out_t_np.shape == out_j_np.shape else float("inf")
    grad_errs = {}
    for k, ref in torch_grads.items():
        got = jax_grads.get(k)
        grad_errs[k] = (float(np.max(np.abs(got - ref), initial=0.0))
                        if got is not None and got.shape == ref.shape else float("inf"))
    grad_errs.update({k: float("inf") for k in set(jax_grads) - set(torch_grads)})
    if case.scaled:
        def scale(a):
            return max(1.0, float(np.max(np.abs(a), initial=0.0)))

        out_ok = out_err <= OUT_ATOL * scale(out_t_np) and sel_error is None
        grad_ok = all(e <= GRAD_ATOL * scale(torch_grads[k]) if k in torch_grads else False
                      for k, e in grad_errs.items())
    else:
        out_ok = _within(out_j_np, out_t_np, OUT_ATOL, OUT_RTOL) and sel_error is None
        grad_ok = all(e <= GRAD_ATOL for e in grad_errs.values())
    res = Result(case, out_err, out_ok, grad_errs, grad_ok, sel_error,
                 0 if row_ok is None else int((~row_ok).sum()))
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
    tm, fm, params, _, x_np, torch_kw, jax_kw = _setup(case)
    x_t = torch.from_numpy(x_np)
    x_j = jnp.asarray(x_np)

    def torch_fwd():
        with torch.no_grad():
            tm(x_t, **torch_kw)

    def torch_fwd_bwd():
        xg = x_t.clone().requires_grad_(True)
        case.output(tm(xg, **torch_kw)).sum().backward()
        tm.zero_grad(set_to_none=True)

    def loss(p, x):
        return case.output(fm.apply({"params": p}, x, **jax_kw)).sum()

    fwd = jax.jit(lambda p, x: case.output(fm.apply({"params": p}, x, **jax_kw)))
    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return Timing(
        best_ms(torch_fwd, reps),
        best_ms(lambda: jax.block_until_ready(fwd(params, x_j)), reps),
        best_ms(torch_fwd_bwd, reps),
        best_ms(lambda: jax.block_until_ready(fwd_bwd(params, x_j)), reps),
    )

"""Forward and gradient parity with attnhut 0.5.0 over many configurations (float32).

Outputs: |jax - torch| <= 1e-5 + 1e-4 |torch| elementwise; gradients w.r.t. the input and every
parameter: |jax - torch| <= 1e-4 (see parity/compare.py).
"""

from __future__ import annotations

import attnhut
import numpy as np
import pytest

from parity.cases import CASES, additive_mask, bool_mask
from parity.compare import Case, run_case


def _cases() -> list[Case]:
    cases = list(CASES)
    add = cases.append
    for causal in (False, True):
        for bias in (False, True):
            for t in (1, 2, 7):
                cfg = f"causal={causal} bias={bias} T={t}"
                add(Case("StandardAttention", cfg,
                         lambda c=causal, b=bias: attnhut.StandardAttention(24, 3, c, 0.0, b),
                         (2, t, 24)))
                add(Case("MultiQueryAttention", cfg,
                         lambda c=causal, b=bias: attnhut.MultiQueryAttention(24, 3, c, 0.0, b),
                         (2, t, 24)))
                add(Case("DifferentialAttention", cfg,
                         lambda c=causal, b=bias: attnhut.DifferentialAttention(
                             24, 3, depth=1, causal=c, bias=b), (2, t, 24)))
            # kv ratios 1, 2, 4 and full (one kv head)
            for kv in (8, 4, 2, 1):
                add(Case("GroupedQueryAttention", f"h8 kv{kv} causal={causal} bias={bias}",
                         lambda c=causal, b=bias, k=kv: attnhut.GroupedQueryAttention(
                             32, 8, k, c, 0.0, b), (2, 11, 32)))
    for kv in (8, 2):
        add(Case("GroupedQueryAttention", f"h8 kv{kv} bool mask",
                 lambda k=kv: attnhut.GroupedQueryAttention(32, 8, k), (2, 6, 32),
                 mask=bool_mask))
        add(Case("GroupedQueryAttention", f"h8 kv{kv} causal + additive mask (mask wins)",
                 lambda k=kv: attnhut.GroupedQueryAttention(32, 8, k, causal=True), (2, 6, 32),
                 mask=additive_mask))
    mla = [
        ("defaults causal", dict()),
        ("defaults bidir bias", dict(causal=False, bias=True)),
        ("q16 kv8 nope4 rope2 v6", dict(q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4,
                                        qk_rope_head_dim=2, v_head_dim=6)),
        ("rope12 nope4 v16 theta500", dict(qk_nope_head_dim=4, qk_rope_head_dim=12,
                                           v_head_dim=16, rope_theta=500.0)),
    ]
    for cfg, kw in mla:
        for t in (1, 9):
            add(Case("MultiHeadLatentAttention", f"{cfg} T={t}",
                     lambda kw=kw: attnhut.MultiHeadLatentAttention(48, 4, **kw), (2, t, 48)))
    add(Case("MultiHeadLatentAttention", "bool mask",
             lambda: attnhut.MultiHeadLatentAttention(48, 4), (2, 5, 48), mask=bool_mask))
    for depth in (0, 5):
        add(Case("DifferentialAttention", f"h2 depth={depth}",
                 lambda d=depth: attnhut.DifferentialAttention(32, 2, depth=d), (2, 9, 32)))
    for cfg, kw, shape in [("slots1 iters1", dict(num_slots=1, num_iters=1), (2, 5, 16)),
                           ("slots5 iters2 hidden8", dict(num_slots=5, num_iters=2,
                                                          hidden_dim=8), (2, 1, 16)),
                           ("slots3 hidden64 eps1e-6", dict(num_slots=3, hidden_dim=64,
                                                            eps=1e-6), (2, 12, 16))]:
        add(Case("SlotAttention", cfg, lambda kw=kw: attnhut.SlotAttention(16, **kw), shape,
                 noise=True))
    return cases


ALL = _cases()


@pytest.mark.parametrize("case", ALL, ids=[f"{c.name}[{c.config}]" for c in ALL])
def test_forward_and_gradients_match_attnhut(case: Case):
    r = run_case(case)
    assert r.out_ok, f"output max |d| = {r.out_err:.3e}"
    bad = {k: v for k, v in r.grad_errs.items() if v > 1e-4}
    assert not bad, f"gradients out of tolerance: {bad}"
    # every parameter and the input were compared
    assert "input" in r.grad_errs and len(r.grad_errs) >= 3


def test_every_registered_mechanism_is_covered():
    from parity import SPECS

    assert {c.name for c in ALL} == set(SPECS)


def test_comparison_detects_a_wrong_module(monkeypatch):
    """The harness can fail: perturb one converted weight and parity must break."""
    import parity.compare as compare

    real = compare.from_torch

    def perturbed(m):
        fm, v = real(m)
        v = {"params": dict(v["params"])}
        proj = dict(v["params"]["proj"])
        proj["kernel"] = proj["kernel"].replace_boxed(proj["kernel"].unbox() * 1.001)
        v["params"]["proj"] = proj
        return fm, v

    monkeypatch.setattr(compare, "from_torch", perturbed)
    r = run_case(CASES[0])
    assert not r.ok


def test_masks_used_by_cases_have_empty_rows():
    assert not bool_mask(2, 5)[:, :, 0].any()
    assert np.isneginf(additive_mask(1, 4)).any()

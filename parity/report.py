"""``python -m parity``: forward/gradient agreement and speed of every mechanism against attnhut."""

from __future__ import annotations

import sys

import jax
import torch

from .cases import CASES
from .compare import GRAD_ATOL, OUT_ATOL, OUT_RTOL, run_case


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    reps = 0 if "--no-timing" in argv else 5
    torch.set_num_threads(2)
    print(f"attnhut_jax parity vs attnhut 0.5.0 (torch {torch.__version__}, jax {jax.__version__}, "
          f"{jax.default_backend()}), float32")
    print(f"tolerance: output |d| <= {OUT_ATOL} + {OUT_RTOL}*|ref|, gradients |d| <= {GRAD_ATOL}; "
          "times: forward, best of 5")
    head = f"{'mechanism':<26} {'config':<42} {'max|d| out':>11} {'max|d| grad':>11} " \
           f"{'torch ms':>9} {'jax ms':>8}  ok"
    print(head)
    print("-" * len(head))
    failed = 0
    for case in CASES:
        r = run_case(case, timing_reps=reps)
        failed += not r.ok
        worst = max(r.grad_errs, key=r.grad_errs.get)
        print(f"{case.name:<26} {case.config:<42} {r.out_err:>11.2e} {r.grad_err:>11.2e} "
              f"{r.torch_ms:>9.3f} {r.jax_ms:>8.3f}  {'yes' if r.ok else 'NO (' + worst + ')'}")
    print(f"{len(CASES) - failed} passed, {failed} failed")
    return 1 if failed else 0

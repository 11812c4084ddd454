"""``python -m parity``: forward/gradient agreement and speed of every mechanism against attnhut.

Two tables. The first is the parity verdict on small float32 configurations, with the
tolerances of the test-suite, and exits non-zero when any row is out of tolerance. The second
times each mechanism at a working size (torch eager on 2 threads vs jax jit on the same CPU).
"""

from __future__ import annotations

import argparse
import sys

import jax
import torch

from .cases import CASES, SPEED_CASES
from .compare import GRAD_ATOL, OUT_ATOL, OUT_RTOL, run_case, time_case


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity", description=__doc__)
    ap.add_argument("--no-timing", action="store_true", help="parity table only")
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions (best is shown)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(2)
    import transformers

    # its "falling back to the reference PyTorch implementation" notices (no fla / triton here,
    # as tests/torch_parity/test_linear_parity.py asserts) would interleave with the table
    transformers.logging.set_verbosity_error()
    print(f"attnhut_jax vs attnhut 0.5.0: torch {torch.__version__} (2 threads), jax {jax.__version__} "
          f"({jax.default_backend()}), float32")
    print(f"tolerance: output |d| <= {OUT_ATOL} + {OUT_RTOL}*|ref| elementwise; gradients (input and "
          f"every parameter) |d| <= {GRAD_ATOL}; rows marked [impl] (the linear-attention layers, against "
          f"transformers' pure-torch layers or parity.oracles) compare max |d| with the tolerance times "
          f"max(1, max|ref|); transformers {transformers.__version__} on its pure-torch paths")
    timed = not args.no_timing
    head = f"{'mechanism':<26} {'config':<44} {'B,T,D':<10} {'max|d| out':>10} {'max|d| grad':>11}"
    head += f" {'torch ms':>9} {'jax ms':>8}" if timed else ""
    print("\n" + head + "  ok")
    print("-" * (len(head) + 4))
    failed = 0
    for case in CASES:
        r = run_case(case)
        failed += not r.ok
        worst = max(r.grad_errs, key=r.grad_errs.get)
        line = (f"{case.name:<26} {case.config:<44} {_shape(case):<10} {r.out_err:>10.2e} "
                f"{r.grad_err:>11.2e}")
        if timed:
            tm = time_case(case, args.reps)
            line += f" {tm.torch_fwd:>9.3f} {tm.jax_fwd:>8.3f}"
        print(line + ("  yes" if r.ok else f"  NO ({worst})"))
    print(f"parity: {len(CASES) - failed} passed, {failed} failed")
    if timed:
        print("\nspeed at a working size, best of", args.reps, "(ms; fwd+bwd = gradients of sum(out) "
              "w.r.t. input and parameters)")
        head = (f"{'mechanism':<26} {'config':<30} {'B,T,D':<12} {'torch fwd':>9} {'jax fwd':>8} "
                f"{'torch f+b':>9} {'jax f+b':>8}")
        print(head)
        print("-" * len(head))
        for case in SPEED_CASES:
            tm = time_case(case, args.reps)
            print(f"{case.name:<26} {case.config:<30} {_shape(case):<12} {tm.torch_fwd:>9.2f} "
                  f"{tm.jax_fwd:>8.2f} {tm.torch_fwd_bwd:>9.2f} {tm.jax_fwd_bwd:>8.2f}")
    return 1 if failed else 0


def _shape(case) -> str:
    return ",".join(str(s) for s in case.shape)

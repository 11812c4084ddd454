"""CPU timing of kittention's sparse mechanisms against a masked dense computation of the same
pattern, in the same run.

For each mechanism and length the module runs twice with the same weights and input: its default
path (``impl="auto"``: the block-sparse passes of Child et al.'s patterns, Sinkhorn's block path,
Spark's streamed selection) and ``impl="reference"``, which computes the dense (T, T) logits and
masks them to the same pattern (Sinkhorn: (T, 2T), the keys and the soft-sorted keys). Prints
milliseconds (best of ``--reps``) for the forward and for forward + backward (gradients of the
parameters and the input), the speedup, and, per mechanism, how the default path's time grows
against the number of (query, key) pairs its pattern reads.

The pattern grows with T as the papers intend: Child's stride / block ``l`` and Sinkhorn's block
are the power of two nearest sqrt(T) (O(T sqrt T) pairs), Fixed keeps ``c = 8`` summary cells,
Spark reads ``--top-k`` keys per query after an O(T^2 r) predictor pass (which the dense path
also pays).

    .venv/bin/python benchmarks/sparse_patterns_cpu.py                       # T = 2048, 16384
    .venv/bin/python benchmarks/sparse_patterns_cpu.py --lengths 4096 --mechanisms strided
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

import attnhut_jax as ah


def side(t: int) -> int:
    """The power of two nearest sqrt(t)."""
    return 1 << round(math.log2(math.sqrt(t)))


def build(name: str, t: int, dim: int, heads: int, top_k: int, predictor_dim: int):
    """(module, pairs read by the pattern over the causal sequence, description)."""
    l = side(t)
    q = np.arange(t)
    if name == "strided":
        m = ah.StridedSparseAttention(dim, heads, stride=l)
        pairs = int(np.minimum(q + 1, l + 1).sum() + np.maximum(q - l, 0).__floordiv__(l).sum())
        return m, pairs, f"stride {l}"
    if name == "fixed":
        m = ah.FixedSparseAttention(dim, heads, block_size=l, num_summary=8)
        own = q % l + 1
        earlier = (q // l) * 8
        return m, int((own + earlier).sum()), f"block {l}, c 8"
    if name == "sinkhorn":
        m = ah.SinkhornAttention(dim, heads, block_size=l, causal=True, max_len=t)
        return m, int((q % l + 1).sum() + t * l), f"block {l}"
    if name == "spark":
        m = ah.SparkAttention(dim, heads, top_k=top_k, predictor_dim=predictor_dim)
        return m, int(np.minimum(q + 1, top_k).sum()), f"top_k {top_k}, r {predictor_dim}"
    raise ValueError(name)


def best_ms(fn, reps: int) -> float:
    jax.block_until_ready(fn())  # compile
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def timed(module, variables, x, impl: str, backward: bool, reps: int) -> float | str:
    m = module.clone(impl=impl)
    if backward:
        f = jax.jit(jax.grad(lambda v, x: m.apply(v, x).astype(jnp.float32).sum(), argnums=(0, 1)))
    else:
        f = jax.jit(m.apply)
    try:
        return best_ms(lambda: f(variables, x), reps)
    except Exception as e:  # noqa: BLE001 -- report what did not fit and go on
        return f"failed: {type(e).__name__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ("strided", "fixed", "sinkhorn", "spark")
    ap.add_argument("--mechanisms", nargs="+", default=list(names), choices=names)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=256)
    ap.add_argument("--predictor-dim", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--forward-only", action="store_true")
    args = ap.parse_args()
    print(f"jax {jax.__version__} ({jax.default_backend()}), batch 1, dim {args.dim}, "
          f"{args.heads} heads, float32; ms, best of {args.reps}")
    passes = [False] if args.forward_only else [False, True]
    print(f"\n{'mechanism':<10} {'pattern':<16} {'T':>6} {'pass':<8} {'default':>9} "
          f"{'masked dense':>13} {'speedup':>8}")
    grow: dict[tuple, tuple[float, int]] = {}
    for name in args.mechanisms:
        for t in args.lengths:
            module, pairs, what = build(name, t, args.dim, args.heads, args.top_k,
                                        args.predictor_dim)
            x = jax.random.normal(jax.random.key(0), (1, t, args.dim), jnp.float32)
            variables = module.init(jax.random.key(1), x)
            for backward in passes:
                ours = timed(module, variables, x, "auto", backward, args.reps)
                dense = timed(module, variables, x, "reference", backward, args.reps)
                ratio = (f"{dense / ours:7.1f}x" if isinstance(ours, float)
                         and isinstance(dense, float) else "")
                fmt = lambda v: f"{v:9.0f}" if isinstance(v, float) else f"{v:>9}"  # noqa: E731
                print(f"{name:<10} {what:<16} {t:>6} {'fwd+bwd' if backward else 'fwd':<8} "
                      f"{fmt(ours)} {fmt(dense):>13} {ratio:>8}", flush=True)
                if isinstance(ours, float):
                    grow[name, backward, t] = (ours, pairs)
    lo, hi = min(args.lengths), max(args.lengths)
    if lo != hi:
        print(f"\ngrowth of the default path, T = {lo} -> {hi}: time ratio vs pairs-read ratio")
        for name in args.mechanisms:
            for backward in passes:
                a, b = grow.get((name, backward, lo)), grow.get((name, backward, hi))
                if a and b:
                    print(f"{name:<10} {'fwd+bwd' if backward else 'fwd':<8} time x{b[0] / a[0]:.1f}"
                          f"  pairs x{b[1] / a[1]:.1f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak resident memory {peak:.1f} GiB")


if __name__ == "__main__":
    main()

"""CPU timing of the block-structured mechanisms: attnhut (torch, 2 threads) vs attnhut_jax.

Prints one table per pass (forward; with ``--backward`` also forward + backward, gradients of
the parameters and the input): milliseconds, best of ``--reps``, for MiniMax Sparse (dim 512,
8 heads, 2 kv groups, blocks of 128, top 4) and BigBird (dim 512, 8 heads, blocks of 64) at
batch 1, per sequence length and attnhut_jax ``impl`` (``auto`` is the default path), then the
growth ratios and the process's peak resident memory. attnhut and the masked-dense
``reference`` are skipped where their (B, N, T, T) float32 score tensors would not fit in
``--dense-gib`` (one tensor for a forward, eight for forward + backward: autograd keeps the
scores, probabilities and masks alive).

    .venv/bin/python benchmarks/block_sparse_cpu.py --lengths 2048 8192 32768 --backward
    .venv/bin/python benchmarks/block_sparse_cpu.py --mechanisms MiniMaxSparseAttention \\
        --lengths 65536 --impls auto
"""

from __future__ import annotations

import argparse
import resource

import attnhut
import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity import from_torch
from parity.compare import best_ms

CONFIGS = {
    "MiniMaxSparseAttention": lambda: attnhut.MiniMaxSparseAttention(512, 8, 2, block_size=128,
                                                                     top_k=4),
    "BigBirdAttention": lambda: attnhut.BigBirdAttention(512, 8, block_size=64),
}
DENSE = ("attnhut", "reference")


def _torch_ms(tm, x: np.ndarray, backward: bool, reps: int) -> float:
    xt = torch.from_numpy(x)
    if not backward:
        with torch.no_grad():
            return best_ms(lambda: tm(xt), reps)
    xt.requires_grad_(True)

    def step():
        tm.zero_grad(set_to_none=True)
        tm(xt).sum().backward()
    return best_ms(step, reps)


def _jax_ms(fm, variables, x: np.ndarray, impl: str, backward: bool, reps: int) -> float:
    m = fm.clone(impl=impl)
    xj = jnp.asarray(x)
    if backward:
        f = jax.jit(jax.grad(lambda v, x: m.apply(v, x).sum(), argnums=(0, 1)))
    else:
        f = jax.jit(m.apply)
    return best_ms(lambda: jax.block_until_ready(f(variables, xj)), reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mechanisms", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--impls", nargs="+", default=["auto", "reference"])
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dense-gib", type=float, default=12.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; ms, best of {args.reps}")
    passes = [False, True] if args.backward else [False]
    cols = ["attnhut", *args.impls]
    times: dict[tuple, float] = {}
    for backward in passes:
        print(f"\n{'forward + backward' if backward else 'forward'}")
        print(f"{'mechanism':<24} {'T':>6} " + " ".join(f"{c:>10}" for c in cols)
              + f" {'attnhut/auto':>13}")
        for name in args.mechanisms:
            torch.manual_seed(0)
            tm = CONFIGS[name]().eval()
            fm, variables = from_torch(tm)
            for t in args.lengths:
                x = np.random.default_rng(0).standard_normal((1, t, 512), dtype=np.float32)
                dense_gib = 8 * t * t * 4 / 2**30 * (8 if backward else 1)
                cells = []
                for col in cols:
                    if col in DENSE and dense_gib > args.dense_gib:
                        cells.append(f"{'skip':>10}")
                        continue
                    ms = (_torch_ms(tm, x, backward, args.reps) if col == "attnhut"
                          else _jax_ms(fm, variables, x, col, backward, args.reps))
                    times[name, t, col, backward] = ms
                    cells.append(f"{ms:10.0f}")
                ratio = ""
                if (name, t, "attnhut", backward) in times and (name, t, "auto", backward) in times:
                    speedup = times[name, t, "attnhut", backward] / times[name, t, "auto", backward]
                    ratio = f"{speedup:12.1f}x"
                print(f"{name:<24} {t:>6} " + " ".join(cells) + f" {ratio:>13}", flush=True)
    print("\ngrowth of the default path, time(4T) / time(T):")
    for (name, t, col, backward), ms in sorted(times.items()):
        if col == "auto" and (name, 4 * t, col, backward) in times:
            kind = "fwd+bwd" if backward else "fwd"
            print(f"  {name:<24} {kind:<8} T={t:>6} -> {4 * t:>6}: "
                  f"{times[name, 4 * t, col, backward] / ms:.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak resident memory of this process: {peak:.1f} GiB")


if __name__ == "__main__":
    main()

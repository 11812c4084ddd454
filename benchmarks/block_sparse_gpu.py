"""GPU timing of the block-sparse kernel against cuDNN's dense causal attention.

bf16, batch 1, 16 heads (MHA), head_dim 128, causal; key blocks of 128; each query block selects
1/16 of the key blocks with one of two patterns:

- ``local``: a window of the nearest blocks plus blocks shared by every query (global);
- ``random``: blocks drawn at random (the query's own block always kept).

Prints forward and forward + backward milliseconds (median of ``--reps`` after a warm-up) for
the kernel and for ``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)``,
the speedup, and TFLOP/s: the kernel's counted on the blocks it visits (4 * bq * bk * H per
query-key block pair and head forward, 2.5x that for the backward), cuDNN's on the causal half.

    python benchmarks/block_sparse_gpu.py --lengths 8192 32768
    python benchmarks/block_sparse_gpu.py --kernel mosaic_gpu   # the Hopper kernels (bq = 64)
    python benchmarks/block_sparse_gpu.py --dry-run   # tiny sizes, any backend, dense = XLA
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from gpu_timing import dense_causal, median_ms, sparse_vs_dense

from pallas_kernels.block_sparse import (
    BlockSizes,
    block_sparse_attention,
    block_sparse_attention_mgpu,
    build_tables,
)
from pallas_kernels.block_sparse.mosaic_gpu import BLOCK_Q as MGPU_BLOCK_Q


def selection(pattern: str, t: int, bk: int, frac: float, seed: int = 0) -> np.ndarray:
    """(T, J) bool: block selection per query token (constant within a query block)."""
    j = t // bk
    per_row = max(1, int(round(j * frac)))
    rng = np.random.default_rng(seed)
    keep = np.zeros((j, j), bool)
    for i in range(j):
        if pattern == "local":
            n_global = max(1, per_row // 4)
            keep[i, :n_global] = True
            keep[i, max(0, i - (per_row - n_global) + 1): i + 1] = True
        else:
            keep[i, rng.choice(i + 1, size=min(per_row, i + 1), replace=False)] = True
            keep[i, i] = True
    return np.repeat(keep, bk, axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--fraction", type=float, default=1 / 16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--block-q", type=int, default=BlockSizes().block_q)
    ap.add_argument("--num-warps", type=int, default=BlockSizes().num_warps)
    ap.add_argument("--num-stages", type=int, default=BlockSizes().num_stages)
    ap.add_argument("--patterns", nargs="+", default=["local", "random"])
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--kernel", choices=["triton", "mosaic_gpu"], default="triton")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes; dense attention via XLA")
    args = ap.parse_args()
    if args.dry_run:
        args.lengths, args.heads, args.head_dim, args.block, args.reps = [256], 2, 32, 64, 1
    dense = dense_causal("xla" if args.dry_run else "cudnn")
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {dev.platform}: {getattr(dev, 'device_kind', '?')}; bf16, "
          f"{args.heads} heads x {args.head_dim}, blocks of {args.block}, "
          f"{args.fraction:.4g} of blocks selected; ms (median of {args.reps})")
    print(f"{'pattern':<8} {'T':>6} {'pass':<8} {'kernel':>9} {'cudnn':>9} {'speedup':>8} "
          f"{'kernel TF/s':>12} {'cudnn TF/s':>11}")
    n, h, bk = args.heads, args.head_dim, args.block
    mgpu = args.kernel == "mosaic_gpu"
    bs = (BlockSizes(MGPU_BLOCK_Q) if mgpu
          else BlockSizes(args.block_q, args.num_warps, args.num_stages))
    print(f"kernel {args.kernel} {'' if mgpu else bs}")
    for t in args.lengths:
        ks = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(kk, (1, t, n, h), jnp.bfloat16) for kk in ks)
        for pattern in args.patterns:
            keep = jnp.asarray(selection(pattern, t, bk, args.fraction))[None, None]
            keep = jnp.broadcast_to(keep, (1, n, t, t // bk))
            tables = jax.jit(lambda keep: build_tables(keep, block_q=bs.block_q, block_k=bk,
                                                       causal=True))
            fwd_table, _ = tables(keep)
            visited = int(np.asarray(fwd_table[..., 0]).sum())  # (query tile, key block) pairs
            sparse_flops = 4 * bs.block_q * bk * h * visited
            tables_ms = median_ms(lambda f=tables, a=keep: f(a), args.reps)
            print(f"  tables alone: {tables_ms:.2f} ms")
            dense_flops = 4 * t * t * h * n / 2

            def sparse(q, k, v, keep=keep):
                if mgpu:
                    return block_sparse_attention_mgpu(q, k, v, keep, block_k=bk, causal=True)
                return block_sparse_attention(q, k, v, keep, block_k=bk, causal=True,
                                              block_sizes=bs)

            for name, mult, ks_ms, dn_ms in sparse_vs_dense(sparse, dense, (q, k, v),
                                                            args.passes, args.reps):
                print(f"{pattern:<8} {t:>6} {name:<8} {ks_ms:9.2f} {dn_ms:9.2f} "
                      f"{dn_ms / ks_ms:7.1f}x {mult * sparse_flops / ks_ms / 1e9:12.1f} "
                      f"{mult * dense_flops / dn_ms / 1e9:11.1f}", flush=True)


if __name__ == "__main__":
    main()

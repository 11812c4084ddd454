"""GPU timing of the token-sparse (DeepSeek Sparse Attention) kernel against cuDNN dense causal.

bf16, batch 1, ``--heads`` x ``--head-dim`` (MHA, one selection shared by all heads as in DSA),
causal, each query reading ``--top-k`` keys. Two selections:

- ``clustered``: what a trained indexer tends to pick: the ``top_k / 2`` most recent keys plus
  ``top_k / 2`` keys in 64-key spans that every query of a 256-query segment shares (spans
  placed at random in the causal past);
- ``indexer``: the fused lightning indexer's own top-k on random projections, i.e. a random
  selection: the worst case for a tile kernel, since the union of a tile's selections then
  covers nearly every causal key block.

Per selection: forward and forward + backward milliseconds (median of ``--reps`` after a
warm-up) of the kernel (``token_sparse_attention``, bitmask and tables built inside the timed
call) and of ``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)``, the
speedup, the fraction of causal (query tile, key block) pairs the kernel visits, and TFLOP/s
(kernel: counted on the visited blocks, 4 * bq * bk * H per head and pair forward, 2.5x that
backward; cuDNN: the causal half). Then the fused indexer + top-k alone (Pallas radix select
recomputing the scores in each pass, the same select on scores stored once in 1 GiB chunks,
the XLA running top-k, and ``lax.top_k`` on the full (T, T) scores) at the same T and top_k.

    python benchmarks/token_sparse_gpu.py --lengths 32768 --top-k 2048
    python benchmarks/token_sparse_gpu.py --kernel mosaic_gpu --no-indexer   # Hopper kernels
    python benchmarks/token_sparse_gpu.py --dry-run   # tiny sizes, any backend, dense = XLA
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from gpu_timing import dense_causal, median_ms, sparse_vs_dense

from pallas_kernels.token_sparse import (
    BlockSizes,
    IndexerKernelBlocks,
    indexer_topk,
    indexer_topk_pallas,
    indexer_topk_reference,
    key_bitmask,
    tile_visits,
    token_sparse_attention,
    token_sparse_attention_mgpu,
)


def clustered(t: int, top_k: int, seed: int = 0, segment: int = 256, span: int = 64) -> np.ndarray:
    """(T, top_k) int32: recent keys plus spans shared within each query segment, -1 padded."""
    rng = np.random.default_rng(seed)
    near = top_k // 2
    n_spans = max(1, (top_k - near) // span)
    out = np.full((t, top_k), -1, np.int32)
    for s0 in range(0, t, segment):
        rows = np.arange(s0, min(s0 + segment, t))
        local = rows[:, None] - np.arange(near)[None, :]
        starts = rng.integers(0, max(1, s0 - near), size=n_spans)
        far = np.unique((starts[:, None] + np.arange(span)[None, :]).ravel())
        far = np.broadcast_to(far, (len(rows), far.size))
        far = np.where(far <= rows[:, None] - near, far, -1)  # causal, not already local
        sel = np.concatenate([np.where(local >= 0, local, -1), far], axis=1)[:, :top_k]
        out[rows, : sel.shape[1]] = sel
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768])
    ap.add_argument("--top-k", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--index-heads", type=int, default=4)
    ap.add_argument("--index-dim", type=int, default=64)
    ap.add_argument("--block-q", type=int, default=64)
    ap.add_argument("--words-per-block", type=int, default=2)
    ap.add_argument("--num-warps", type=int, default=BlockSizes().num_warps)
    ap.add_argument("--num-stages", type=int, default=BlockSizes().num_stages)
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--no-indexer", action="store_true", help="skip the indexer timings")
    ap.add_argument("--patterns", nargs="+", default=["clustered", "indexer"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-dense-topk", action="store_true",
                    help="skip lax.top_k on the full scores (a (T, T) float32 array)")
    ap.add_argument("--kernel", choices=["triton", "mosaic_gpu"], default="triton",
                    help="mosaic_gpu: query tiles of 64 (block_q and warps ignored)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes; dense attention via XLA")
    args = ap.parse_args()
    mgpu = args.kernel == "mosaic_gpu"
    if mgpu:
        args.block_q = 64
    if args.dry_run:
        args.lengths, args.heads, args.head_dim, args.top_k, args.reps = [512], 2, 32, 64, 1
        args.block_q, args.words_per_block = (64, 2) if mgpu else (16, 1)
    dense = dense_causal("xla" if args.dry_run else "cudnn")
    dev = jax.devices()[0]
    bs = BlockSizes(args.block_q, args.words_per_block, args.num_warps, args.num_stages)
    bq, bk = bs.block_q, 32 * bs.words_per_block
    n, h, m = args.heads, args.head_dim, args.top_k
    print(f"jax {jax.__version__}, {dev.platform}: {getattr(dev, 'device_kind', '?')}; bf16, "
          f"{n} heads x {h}, top_k {m}, tiles {bq} x {bk}; ms (median of {args.reps})")
    print(f"{'selection':<10} {'T':>6} {'pass':<8} {'kernel':>9} {'cudnn':>9} {'speedup':>8} "
          f"{'visited':>8} {'kernel TF/s':>12} {'cudnn TF/s':>11}", flush=True)
    for t in args.lengths:
        ks = jax.random.split(jax.random.key(0), 6)
        q, k, v = (jax.random.normal(kk, (1, t, n, h), jnp.bfloat16) for kk in ks[:3])
        qi = jax.random.normal(ks[3], (1, t, args.index_heads, args.index_dim), jnp.bfloat16)
        ki = jax.random.normal(ks[4], (1, t, args.index_dim), jnp.bfloat16)
        wi = jax.random.normal(ks[5], (1, t, args.index_heads), jnp.bfloat16)
        for pattern in args.patterns:
            if pattern == "clustered":
                idx = jnp.asarray(clustered(t, m))[None]
            else:
                idx = jax.jit(lambda a, b, c: indexer_topk_pallas(a, b, c, m, causal=True)[0])(
                    qi, ki, wi)
            visit = tile_visits(key_bitmask(idx, t), t=t, s=t, block_q=bq,
                                words_per_block=bs.words_per_block)
            visited = int(np.asarray(visit).sum())
            causal_pairs = sum(min(-(-t // bk), (i * bq + bq - 1) // bk + 1)
                               for i in range(-(-t // bq)))
            sparse_flops = 4 * bq * bk * h * n * visited
            dense_flops = 4 * t * t * h * n / 2

            def sparse(q, k, v, idx=idx):
                if mgpu:
                    return token_sparse_attention_mgpu(q, k, v, idx,
                                                       words_per_block=bs.words_per_block)
                return token_sparse_attention(q, k, v, idx, block_sizes=bs)

            for name, mult, ks_ms, dn_ms in sparse_vs_dense(sparse, dense, (q, k, v),
                                                            args.passes, args.reps):
                print(f"{pattern:<10} {t:>6} {name:<8} {ks_ms:9.2f} {dn_ms:9.2f} "
                      f"{dn_ms / ks_ms:7.1f}x {visited / causal_pairs:8.3f} "
                      f"{mult * sparse_flops / ks_ms / 1e9:12.1f} "
                      f"{mult * dense_flops / dn_ms / 1e9:11.1f}", flush=True)
        if args.no_indexer:
            continue
        print(f"indexer + top-k alone, T {t}, {args.index_heads} x {args.index_dim} heads, "
              f"top_k {m}:", flush=True)
        stored = functools.partial(indexer_topk_pallas,
                                   blocks=IndexerKernelBlocks(score_buffer_mib=1024))
        variants = [("pallas radix select", indexer_topk_pallas),
                    ("pallas stored scores", stored),  # scored once, 1 GiB chunks
                    ("xla running top-k", indexer_topk)]
        if not args.no_dense_topk:
            variants.append(("lax.top_k on (T, T)", indexer_topk_reference))
        for label, fn in variants:
            f = jax.jit(lambda a, b, c, fn=fn: fn(a, b, c, m, causal=True)[0])
            try:
                ms = median_ms(lambda f=f, ops=(qi, ki, wi): f(*ops), args.reps)
                print(f"  {label:<22} {ms:9.2f} ms", flush=True)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the dense one
                print(f"  {label:<22} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


if __name__ == "__main__":
    main()

"""CPU timing of the block-structured mechanisms: attnhut (torch, 2 threads) vs attnhut_jax.

Prints one table: forward milliseconds (best of ``--reps``) for MiniMax Sparse and BigBird at
dim 512, 8 heads, batch 1, for each sequence length and each attnhut_jax ``impl``. attnhut is
skipped where its (B, N, T, T) float32 score tensors alone would exceed ``--torch-gib``.

    .venv/bin/python benchmarks/block_sparse_cpu.py --lengths 2048 8192
"""

from __future__ import annotations

import argparse

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--impls", nargs="+", default=["reference", "pallas"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--torch-gib", type=float, default=6.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, forward ms")
    print(f"{'mechanism':<24} {'T':>6} {'attnhut':>9} " + " ".join(f"{i:>10}" for i in args.impls))
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        tm = make().eval()
        fm, variables = from_torch(tm)
        for t in args.lengths:
            x = np.random.default_rng(0).standard_normal((1, t, 512), dtype=np.float32)
            gib = 8 * t * t * 4 / 2**30
            if gib <= args.torch_gib:
                with torch.no_grad():
                    xt = torch.from_numpy(x)
                    torch_ms = f"{best_ms(lambda tm=tm, xt=xt: tm(xt), args.reps):9.0f}"
            else:
                torch_ms = f"{'skip':>9}"
            cells = []
            for impl in args.impls:
                m = fm.clone(impl=impl)
                f = jax.jit(m.apply)
                xj = jnp.asarray(x)
                ms = best_ms(lambda f=f, v=variables, xj=xj: f(v, xj).block_until_ready(), args.reps)
                cells.append(f"{ms:10.0f}")
            print(f"{name:<24} {t:>6} {torch_ms} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()

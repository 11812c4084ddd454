"""CPU timing of the token-sparse mechanisms: attnhut (torch, 2 threads) vs attnhut_jax's default.

Forward milliseconds, best of ``--reps``, at batch 1, dim 512, 8 heads, for DeepSeek Sparse
Attention (top_k 256, indexer 4 x 64) and Compressed Sparse Attention (attnhut's defaults:
rate 4, top_k 16, indexer 4 x 64, window 64), per sequence length: attnhut, attnhut_jax's
default path (``impl="auto"``: on CPU the XLA token gather and the fused indexer top-k), the
speedup, and how much of the default path the fused top-k alone takes (``topk`` column: the
indexer projections' outputs scored and reduced to indices, timed on its own). attnhut is
skipped where its (B, N, T, S) float32 score tensor alone would exceed ``--dense-gib``
(DSA: S = T, CSA: S = T / 4 + T); ``--jax-only`` lengths time attnhut_jax alone. Then the
growth ratios time(4T) / time(T) and the process's peak resident memory.

    .venv/bin/python benchmarks/token_sparse_cpu.py --lengths 2048 8192 32768 --jax-only 65536
"""

from __future__ import annotations

import argparse
import resource

import attnhut
import jax
import jax.numpy as jnp
import numpy as np
import torch

from attnhut_jax import core
from parity import from_torch
from parity.compare import best_ms

CONFIGS = {
    "DeepSeekSparseAttention": lambda: attnhut.DeepSeekSparseAttention(512, 8, top_k=256),
    "CompressedSparseAttention": lambda: attnhut.CompressedSparseAttention(512, 8),
}


def _key_len(name: str, t: int) -> int:
    return t if name == "DeepSeekSparseAttention" else -(-t // 4) + t


def _topk_ms(name: str, fm, t: int, reps: int) -> float:
    """The fused indexer top-k alone, on random operands of the module's shapes."""
    ks = jax.random.split(jax.random.key(0), 3)
    if name == "DeepSeekSparseAttention":
        s, ni, e, kw = t, fm.num_index_heads, fm.index_head_dim, dict(causal=fm.causal)
    else:
        s, ni, e = -(-t // fm.compression_rate), fm.num_index_heads, fm.index_dim
        kw = dict(causal=True, q_pos_T=jnp.arange(t),
                  k_pos_S=(jnp.arange(s) + 1) * fm.compression_rate)
    q = jax.random.normal(ks[0], (1, t, ni, e))
    k = jax.random.normal(ks[1], (1, s, e))
    w = jax.random.normal(ks[2], (1, t, ni))
    f = jax.jit(lambda q, k, w: core.indexer_topk(q, k, w, fm.top_k, impl="auto", **kw))
    return best_ms(lambda: jax.block_until_ready(f(q, k, w)), reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mechanisms", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--jax-only", type=int, nargs="*", default=[],
                    help="lengths timed for attnhut_jax only (DSA only)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dense-gib", type=float, default=8.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; forward ms, best of {args.reps}")
    print(f"{'mechanism':<26} {'T':>6} {'attnhut':>9} {'jax auto':>9} {'speedup':>8} "
          f"{'topk':>8}")
    times: dict[tuple[str, int], float] = {}
    for name in args.mechanisms:
        torch.manual_seed(0)
        tm = CONFIGS[name]().eval()
        fm, variables = from_torch(tm)
        f = jax.jit(fm.apply)
        lengths = [(t, True) for t in args.lengths]
        if name == "DeepSeekSparseAttention":
            lengths += [(t, False) for t in args.jax_only]
        for t, with_torch in lengths:
            x = np.random.default_rng(0).standard_normal((1, t, 512), dtype=np.float32)
            gib = 8 * t * _key_len(name, t) * 4 / 2**30
            if not with_torch:
                torch_cell = f"{'-':>9}"
            elif gib > args.dense_gib:
                torch_cell = f"{'skip':>9}"  # the dense score tensor alone would not fit
            else:
                with torch.no_grad():
                    xt = torch.from_numpy(x)
                    torch_ms = best_ms(lambda xt=xt, tm=tm: tm(xt), args.reps)
                torch_cell = f"{torch_ms:9.0f}"
            xj = jnp.asarray(x)
            ms = best_ms(lambda xj=xj, f=f, v=variables: jax.block_until_ready(f(v, xj)),
                         args.reps)
            times[name, t] = ms
            speed = (f"{torch_ms / ms:7.1f}x" if torch_cell.strip() not in ("-", "skip")
                     else f"{'':>8}")
            topk = _topk_ms(name, fm, t, args.reps)
            print(f"{name:<26} {t:>6} {torch_cell} {ms:9.0f} {speed} {topk:8.0f}", flush=True)
    print("\ngrowth of the default path, time(4T) / time(T):")
    for (name, t), ms in sorted(times.items()):
        if (name, 4 * t) in times:
            print(f"  {name:<26} T={t:>6} -> {4 * t:>6}: {times[name, 4 * t] / ms:.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak resident memory of this process: {peak:.1f} GiB")


if __name__ == "__main__":
    main()

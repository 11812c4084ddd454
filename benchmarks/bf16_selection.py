"""How often a bfloat16 selector picks other keys than float32: DSA, MSA and CSA.

For each mechanism, one set of float32 parameters is applied three times to the same input: as a
float32 module, as a bfloat16 module with the default ``selector_dtype`` (float32), and as a
bfloat16 module with ``selector_dtype=bfloat16``. A row (query, and kv group for MSA) counts as
different when its selected set differs from the float32 module's. Prints one table.

    python benchmarks/bf16_selection.py                  # dim 256, 4 heads, T 256, batch 2
    python benchmarks/bf16_selection.py --seq-len 1024 --seeds 3
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import attnhut_jax as ah


def modules(dim: int, heads: int) -> dict[str, tuple]:
    """name -> (constructor taking dtype fields, aux key holding the selection)."""
    return {
        "DSA (top_k 32)": (lambda **kw: ah.DeepSeekSparseAttention(dim, heads, top_k=32, **kw),
                           "selected"),
        "MSA (block 16, top_k 4)": (lambda **kw: ah.MiniMaxSparseAttention(
            dim, heads, 2, block_size=16, top_k=4, **kw), "keep"),
        "CSA (rate 4, top_k 16)": (lambda **kw: ah.CompressedSparseAttention(
            dim, heads, compression_rate=4, top_k=16, **kw), "selected"),
    }


def differing_rows(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows (all axes but the last) whose boolean selections differ."""
    return float(np.mean(np.any(a != b, axis=-1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, dim {args.dim}, heads "
          f"{args.heads}, T {args.seq_len}, batch {args.batch}, seeds {args.seeds}")
    print(f"{'mechanism':<26} {'bf16, selector f32':>20} {'bf16, selector bf16':>20}")
    for name, (make, key) in modules(args.dim, args.heads).items():
        fracs = {"f32": [], "bf16": []}
        for seed in range(args.seeds):
            x = jax.random.normal(jax.random.key(seed), (args.batch, args.seq_len, args.dim))
            params = make().init(jax.random.key(100 + seed), x)

            def selection(m, params=params, x=x, key=key):
                return np.asarray(jax.jit(lambda p, x: m.apply(p, x, return_aux=True)[1][key])(
                    params, x))

            ref = selection(make())
            fracs["f32"].append(differing_rows(selection(make(dtype=jnp.bfloat16)), ref))
            fracs["bf16"].append(differing_rows(
                selection(make(dtype=jnp.bfloat16, selector_dtype=jnp.bfloat16)), ref))
        print(f"{name:<26} {np.mean(fracs['f32']):>20.1%} {np.mean(fracs['bf16']):>20.1%}")


if __name__ == "__main__":
    main()

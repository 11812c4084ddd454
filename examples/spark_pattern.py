"""The keys Spark attention reads (``docs/figures/spark_pattern.png``): one head of an
untrained ``SparkAttention`` on a random sequence, causal, and how many keys each query keeps
against the statistical top-k's target ``min(top_k, n)``.

    python examples/spark_pattern.py --out docs/figures/spark_pattern.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnhut_jax as ah  # noqa: E402


def main(argv: Sequence[str] | None = None) -> np.ndarray:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--out", default="spark_pattern.png")
    a = p.parse_args(argv)
    m = ah.SparkAttention(64, 2, top_k=a.top_k, predictor_dim=8)
    x = jax.random.normal(jax.random.key(0), (1, a.seq_len, 64))
    v = m.init(jax.random.key(1), x)
    sel = np.asarray(m.apply(v, x, method="selection"))[0, 0]  # (T, T), head 0

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(a.seq_len)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.4))
    ax0.imshow(sel, cmap="Greys", interpolation="nearest")
    ax0.set(title=f"keys read (head 0, causal, top_k={a.top_k})", xlabel="key", ylabel="query")
    ax1.plot(t, sel.sum(-1), ".", ms=3, label="keys selected")
    ax1.plot(t, np.minimum(a.top_k, t + 1), "-", label="min(top_k, n visible)")
    ax1.set(title="statistical top-k: count per query", xlabel="query", ylabel="keys")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    return sel


if __name__ == "__main__":
    main()

"""What each mechanism caches and reads when decoding, from the modules' own accounting.

    python examples/decode_table.py          # writes docs/decode_table.md and docs/figures/decode_cache.png
    python examples/decode_table.py --out /tmp/t.md --figure /tmp/f.png

For every decoding mechanism at one realistic width (``DIM`` = 4096, ``HEADS`` = 32 query heads,
bf16 cache, batch 1, one layer) the table gives, at 4k, 128k and 1M tokens of context:

* cache bytes per token: ``cache_bytes(1, n, bfloat16) / n`` (every cache array: keys, values,
  latents, index keys, compressed entries, raw windows, counters);
* decode reads: ``decode_reads(n)``, the cache entries (tokens, or compressed entries) whose keys
  and values one decode query's attention reads;
* scored keys: ``decode_scored(n)``, the index keys a selector's scoring pass reads per query
  (0 without a selector).

Nothing is computed here by hand: every number is a call of the module's method, and the
configuration column lists the module's arguments. The figure draws the same two quantities
against the context length (log axes), one line per mechanism; the selectors' scored keys are
dashed in the reads panel. Mechanisms whose module has no decode accounting yet are listed as
missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

if not __package__:  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnhut_jax as ah  # noqa: E402

DIM, HEADS = 4096, 32
LENGTHS = (4096, 131072, 1 << 20)
CURVE = tuple(1 << p for p in range(10, 21))  # 1k .. 1M for the figure
DTYPE = jnp.bfloat16

# name -> (class, keyword arguments besides dim and num_heads). Sizes follow published models at
# this width: GQA with 8 kv heads (Llama 3 8B), MLA with a 512-wide latent and a 64-wide RoPE key
# (DeepSeek-V2), DSA's indexer of 64 heads x 128 and top-2048 tokens (DeepSeek-V3.2); MSA,
# HCA, CSA and Delta as the decode benchmark (benchmarks/decode_step.py) runs them.
MECHANISMS: dict[str, tuple[type, dict]] = {
    "standard": (ah.StandardAttention, dict(causal=True)),
    "mqa": (ah.MultiQueryAttention, dict(causal=True)),
    "gqa": (ah.GroupedQueryAttention, dict(num_kv_heads=8, causal=True)),
    "mla": (ah.MultiHeadLatentAttention, dict(q_lora_rank=1536, kv_lora_rank=512,
                                             qk_nope_head_dim=128, qk_rope_head_dim=64,
                                             v_head_dim=128)),
    "differential": (ah.DifferentialAttention, dict(num_heads=HEADS // 2)),
    "delta": (ah.DeltaAttention, dict(window=256, sink=4, stride=16)),
    "deepseek_sparse": (ah.DeepSeekSparseAttention, dict(top_k=2048, num_index_heads=64,
                                                         index_head_dim=128)),
    "minimax_sparse": (ah.MiniMaxSparseAttention, dict(num_kv_groups=8, block_size=64, top_k=16)),
    "heavily_compressed": (ah.HeavilyCompressedAttention, dict(compression_rate=16, window=128)),
    "compressed_sparse": (ah.CompressedSparseAttention, dict(compression_rate=4, top_k=128,
                                                             window=128)),
    # Child et al.'s image/text settings: stride 128, blocks of 128 with c = 8 summary cells
    "strided_sparse": (ah.StridedSparseAttention, dict(stride=128)),
    "fixed_sparse": (ah.FixedSparseAttention, dict(block_size=128, num_summary=8)),
    # Sparse Sinkhorn (causal), blocks of 128 (its sorting network sized for 1M tokens)
    "sinkhorn": (ah.SinkhornAttention, dict(block_size=128, causal=True, max_len=1 << 20)),
    # Spark Transformer's attention: at most about 256 keys per query, a 32-wide predictor slice
    "spark": (ah.SparkAttention, dict(top_k=256, predictor_dim=32)),
}
ACCOUNTING = ("cache_bytes", "decode_reads", "decode_scored")


def build(name: str, dim: int = DIM, heads: int = HEADS):
    """The module of mechanism ``name`` at this width (decode=False: the accounting does not
    depend on it)."""
    cls, kw = MECHANISMS[name]
    kw = dict(kw)
    heads = kw.pop("num_heads", heads)
    return cls(dim, heads, **kw)


def describe(name: str) -> str:
    cls, kw = MECHANISMS[name]
    args = ", ".join(f"{k}={v}" for k, v in kw.items() if k != "causal")
    return f"{cls.__name__}({args})" if args else cls.__name__


def can_account(module) -> bool:
    return all(callable(getattr(module, m, None)) for m in ACCOUNTING)


def measure(names: Sequence[str] | None = None, lengths: Sequence[int] = LENGTHS,
            dtype=DTYPE) -> tuple[dict[str, dict], list[str]]:
    """Per mechanism: {'bytes_per_token', 'reads', 'scored'} (lists over ``lengths``) and the
    names whose modules have no decode accounting yet."""
    rows, missing = {}, []
    for name in names or MECHANISMS:
        m = build(name)
        if not can_account(m):
            missing.append(name)
            continue
        rows[name] = {"bytes_per_token": [m.cache_bytes(1, n, dtype) / n for n in lengths],
                      "reads": [int(m.decode_reads(n)) for n in lengths],
                      "scored": [int(m.decode_scored(n)) for n in lengths]}
    return rows, missing


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 or float(x).is_integer() else f"{x:,.1f}"


def _len(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}k"


def table(names: Sequence[str] | None = None, lengths: Sequence[int] = LENGTHS) -> str:
    """The markdown table (and a line naming the mechanisms not yet accounted)."""
    rows, missing = measure(names, lengths)
    ls = [_len(n) for n in lengths]
    head = ("| mechanism | configuration | " + " | ".join(f"cache B/token {x}" for x in ls) + " | "
            + " | ".join(f"reads {x}" for x in ls) + " | "
            + " | ".join(f"scored {x}" for x in ls) + " |")
    out = [f"Decode accounting per layer, batch 1, at dim {DIM} with {HEADS} query heads, "
           f"{jnp.dtype(DTYPE).name} cache; every number is the module's own `cache_bytes` "
           f"(divided by the context length), `decode_reads` or `decode_scored`. Generated by "
           f"`python examples/decode_table.py`.", "", head,
           "|---|---|" + "---:|" * (3 * len(lengths))]
    for name, r in rows.items():
        cells = ([_n(b) for b in r["bytes_per_token"]] + [f"{x:,}" for x in r["reads"]]
                 + [f"{x:,}" for x in r["scored"]])
        out.append(f"| `{name}` | `{describe(name)}` | " + " | ".join(cells) + " |")
    if "standard" in rows and len(rows) > 1:
        dense = rows["standard"]["reads"][-1]
        fewer = ", ".join(f"`{k}` {dense / r['reads'][-1]:,.0f}x" for k, r in rows.items()
                          if k != "standard" and r["reads"][-1] < dense)
        if fewer:
            out += ["", f"Attention reads at {ls[-1]} tokens, fewer than `standard` by: {fewer}."]
    if missing:
        out += ["", "No decode accounting yet: " + ", ".join(f"`{m}`" for m in missing) + "."]
    return "\n".join(out) + "\n"


def plot(out: Path, names: Sequence[str] | None = None, lengths: Sequence[int] = CURVE) -> None:
    """Cache bytes (per layer) and decode reads against the context length, log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, _ = measure(names, lengths)
    fig, (ax_b, ax_r) = plt.subplots(1, 2, figsize=(11, 4.4))
    cmap = plt.get_cmap("tab10")
    for i, (name, r) in enumerate(rows.items()):
        # markers tell apart the lines that coincide (every dense mechanism reads all n tokens)
        style = dict(color=cmap(i % 10), lw=1.5, marker="os^vDxP*hX"[i % 10], ms=3.5, mfc="none")
        ax_b.plot(lengths, [b * n for b, n in zip(r["bytes_per_token"], lengths, strict=True)],
                  label=name, **style)
        ax_r.plot(lengths, r["reads"], label=name, **style)
        color = style["color"]
        if any(r["scored"]):
            ax_r.plot(lengths, r["scored"], color=color, lw=1, ls="--")
    ax_b.set(xscale="log", yscale="log", xlabel="context length (tokens)",
             ylabel="cache bytes per layer (batch 1)", title=f"cache size ({jnp.dtype(DTYPE).name})")
    every = [k for k, r in rows.items() if any(r["scored"]) and r["scored"] == list(lengths)]
    note = f"\n{', '.join(every)}: scored = n (on the dense line)" if every else ""
    ax_r.set(xscale="log", yscale="log", xlabel="context length (tokens)",
             ylabel="cache entries per decode query",
             title="attention reads (solid); selectors' scored keys (dashed)" + note)
    ax_r.title.set_fontsize(9)
    ax_b.legend(fontsize=7, ncol=2, loc="upper left")
    for ax in (ax_b, ax_r):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"decode accounting at dim {DIM}, {HEADS} query heads, one layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> str:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(root / "docs" / "decode_table.md"))
    p.add_argument("--figure", default=str(root / "docs" / "figures" / "decode_cache.png"))
    a = p.parse_args(argv)
    text = table()
    Path(a.out).write_text(text)
    plot(Path(a.figure))
    print(text)
    print(f"wrote {a.out} and {a.figure}")
    return text


if __name__ == "__main__":
    main()

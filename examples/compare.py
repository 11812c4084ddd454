"""Train several mechanisms on the same recall task and compare them in one picture and a table.

    python examples/compare.py                                    # every mechanism, 300 steps
    python examples/compare.py --attn standard,gqa,minimax_sparse --steps 150 --out cmp.png

Every run uses the same model sizes, data (batch ``s`` is the same for every mechanism), optimiser
and seed as ``train_lm.py`` with the flags given here; only the attention differs. The PNG shows
the training loss (moving average) and the held-out recall accuracy against the step; the table
(printed, and written next to the PNG as Markdown) gives the final accuracy, the tokens per second
of the jitted train step on this machine and the KV-cache bytes a decoder keeps per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if not __package__:  # run as a file (python examples/compare.py): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import lm  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attn", default=",".join(lm.MECHANISMS),
                   help="comma-separated mechanisms (default: all)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=lm.Config.seq_len)
    p.add_argument("--batch-size", type=int, default=lm.Config.batch_size)
    p.add_argument("--dim", type=int, default=lm.Config.dim)
    p.add_argument("--depth", type=int, default=lm.Config.depth)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", default="auto", help="sparse core (see train_lm.py --impl)")
    p.add_argument("--out", default="compare.png", help="PNG path; the table goes to .md beside it")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.attn.split(",") if n.strip()]
    unknown = [n for n in names if n not in lm.MECHANISMS]
    if unknown or not names:
        raise ValueError(f"--attn {a.attn!r}: unknown {unknown}; choose from "
                         f"{', '.join(lm.MECHANISMS)}")
    a.names = names
    return a


def smooth(y: Sequence[float], width: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    y = np.asarray(y, np.float64)
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - width, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def table(rows: list[dict]) -> str:
    head = ("| mechanism | params | final loss | recall accuracy | tokens/s | KV cache B/token |\n"
            "|---|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| `{r['attn']}` | {r['num_params']:,} | {r['final_loss']:.3f} | "
                     f"{r['final_acc']:.3f} | {r['tokens_per_sec'] or 0:,.0f} | "
                     f"{r['kv_cache_bytes_per_token']:g} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        style = dict(color=cmap(i % 10), ls=("-", "--", ":")[i // 10 % 3], lw=1.4, label=r["attn"])
        loss = r["train_loss"]
        ax_loss.plot(np.arange(1, len(loss) + 1), smooth(loss, 10), **style)
        steps = [e["step"] for e in r["evals"]]
        ax_acc.plot(steps, [e["acc"] for e in r["evals"]], marker="o", ms=3, **style)
    chance = rows[0]["chance_acc"]
    ax_acc.axhline(chance, color="grey", ls=":", lw=1)
    ax_acc.text(0, chance, " chance", va="bottom", color="grey", fontsize=8)
    ax_loss.set(xlabel="step", ylabel="train loss (moving avg. of 10)", title="training loss")
    ax_acc.set(xlabel="step", ylabel="held-out recall accuracy", title="recall accuracy")
    ax_acc.legend(fontsize=7, ncol=2, loc="upper left")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    base = dataclasses.replace(lm.Config(), steps=a.steps, eval_every=a.eval_every,
                               seq_len=a.seq_len, batch_size=a.batch_size, dim=a.dim,
                               depth=a.depth, seed=a.seed, impl=a.impl, progress=sys.stderr.isatty())
    rows = []
    for name in a.names:
        cfg = dataclasses.replace(base, attn=name)
        result = lm.train(cfg, log=lambda s: None)
        row = {k: v for k, v in result.items() if k not in ("state", "trainer", "cfg")}
        rows.append(row)
        print(f"{name:20s} loss {row['initial_loss']:.3f} -> {row['final_loss']:.3f}  "
              f"acc {row['final_acc']:.3f}  {row['tokens_per_sec'] or 0:,.0f} tok/s", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"MQAR, T={base.seq_len}, {base.num_pairs} pairs, {base.num_queries} queries; "
             f"dim {base.dim}, depth {base.depth}, batch {base.batch_size}, {a.steps} steps")
    plot(rows, out, title)
    md = table(rows)
    out.with_suffix(".md").write_text(f"{title}\n\n{md}\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=float))
    print(md)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.json')}")
    return rows


if __name__ == "__main__":
    main()

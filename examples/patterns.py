"""Heatmaps of which keys each sparse mechanism lets a query read, for one and the same input.

    python examples/patterns.py                      # train each briefly, then draw
    python examples/patterns.py --steps 0 --out p.png  # untrained selectors

Each mechanism is trained for ``--steps`` on the recall task of ``train_lm.py`` (same sizes, seed
and batches), then reads one held-out sequence. For the last layer, a cell (query t, key s) is

* 1 (dark) where the query attends the raw token s,
* 0.5 (mid) where it reads s only through a compressed entry (HCA, CSA), only through the
  dense correction of its anchor row (Delta), or only through the soft-sorted block, a
  Sinkhorn-weighted mixture of earlier blocks (Sinkhorn),
* 0 where s is out of its view.

The selectors of MiniMax (blocks, kv group 0 shown), DeepSeek (tokens) and CSA (entries) come
from the layer's own selection (``return_aux``); BigBird's blocks, Delta's window and HCA's
entries, Child et al.'s strided and fixed sets (merged over the heads) and Sinkhorn's local
block are fixed by position. Red ticks mark the query keys of the recall task; the title
gives "recall view": the fraction of those queries whose matching key or value token the
layer can read, raw or compressed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

if not __package__:  # run as a file (python examples/patterns.py): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import lm  # noqa: E402

SHOWN = lm.PATTERNED


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attn", default=",".join(SHOWN), help="comma-separated sparse mechanisms")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=lm.Config.seq_len)
    p.add_argument("--dim", type=int, default=lm.Config.dim)
    p.add_argument("--depth", type=int, default=lm.Config.depth)
    p.add_argument("--batch-size", type=int, default=lm.Config.batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", default="auto", help="sparse core (see train_lm.py --impl)")
    p.add_argument("--out", default="patterns.png")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.attn.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHOWN]
    if unknown or not names:
        raise ValueError(f"--attn {a.attn!r}: unknown {unknown}; choose from {', '.join(SHOWN)}")

    base = dataclasses.replace(lm.Config(), steps=a.steps, seq_len=a.seq_len, seed=a.seed, impl=a.impl,
                               dim=a.dim, depth=a.depth, batch_size=a.batch_size,
                               eval_every=max(a.steps, 1), progress=sys.stderr.isatty())
    maps, views = {}, {}
    tokens = weights = None
    for name in names:
        cfg = dataclasses.replace(base, attn=name)
        result = lm.train(cfg, log=lambda s: None)
        batch = lm.Data(cfg, result["trainer"]).eval_batches()[0]
        row = {k: np.asarray(v[:1]) for k, v in jax.device_get(batch).items()}
        tokens, weights = row["tokens"][0], row["weights"][0]
        sel = lm.last_layer_selection(result, row["tokens"])
        maps[name] = lm.key_read_map(cfg, None if sel is None else sel[0], cfg.seq_len)
        views[name] = lm.recall_view(cfg, tokens, weights, maps[name])
        print(f"{name:20s} recall view {views[name]:.2f}  reads "
              f"{(maps[name] > 0).sum() / np.tril(np.ones_like(maps[name])).sum():.2f} of the "
              f"causal (query, key) pairs; final recall accuracy {result['final_acc']:.3f}",
              flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    queries = np.flatnonzero(weights)
    for ax, name in zip(axes.flat, names, strict=False):
        ax.imshow(maps[name], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\nrecall view {views[name]:.2f}", fontsize=9)
        ax.set_yticks(queries)
        ax.set_yticklabels([])
        ax.tick_params(axis="y", colors="red", length=4, width=1.2)
        ax.axvline(2 * base.num_pairs - 0.5, color="tab:blue", lw=0.8, ls="--")
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"which keys the last layer reads (same sequence; {a.steps} training steps; "
                 f"dashed: end of the key-value pairs)", fontsize=10)
    fig.tight_layout()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70)
    plt.close(fig)
    print(f"wrote {out}")
    return views


if __name__ == "__main__":
    main()

"""Train a small decoder-only language model whose attention is any attnhut_jax mechanism.

    python examples/train_lm.py --attn minimax_sparse             # 150 steps of recall, ~1 min on CPU
    python examples/train_lm.py --attn gqa --mesh data=4,model=2  # 8 devices: batch on data, heads on model
    python examples/train_lm.py --attn standard --ckpt-dir /tmp/lm --ckpt-every 50   # resumable
    python examples/train_lm.py --attn deepseek_sparse --text notes.txt --seq-len 256  # bytes of a file
    python examples/train_lm.py --attn compressed_sparse --pack --seq-len 32768 --batch-size 1 \
        --steps 3                              # packed documents at long context, index loss in the layer

``python -m examples.train_lm ...`` from the repository root is the same. The model, the recall
task, the sharding rules and the checkpoints are described in the package ``examples/lm``
(``model.py``, ``data.py``, ``sharding.py``, ``training.py``); this file is its command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a file (python examples/train_lm.py): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.lm import MECHANISMS, Config, show_what_it_learned, train  # noqa: E402
from examples.lm.config import INDEX_LOSSES  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--attn", default=d.attn, help=f"one of: {', '.join(MECHANISMS)}")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=int, default=d.dim)
    g.add_argument("--depth", type=int, default=d.depth)
    g.add_argument("--heads", type=int, default=d.heads)
    g.add_argument("--kv-heads", type=int, default=d.kv_heads,
                   help="gqa kv heads, msa groups, gated_deltanet query/key heads")
    g.add_argument("--mlp-ratio", type=int, default=d.mlp_ratio)
    g.add_argument("--untied-head", action="store_true", help="separate output projection")
    g.add_argument("--no-token-shift", action="store_true",
                   help="feed attention LN(x) alone, not mixed with the previous position's")
    g.add_argument("--dtype", default=d.dtype, help="compute dtype (float32, bfloat16, float16)")
    g.add_argument("--block-size", type=int, default=d.block_size, help="bigbird, minimax_sparse")
    g.add_argument("--top-k", type=int, default=None,
                   help="blocks (minimax_sparse), tokens (deepseek_sparse) or entries "
                        "(compressed_sparse); default: a quarter of the context, at most 16 "
                        "blocks / 256 tokens / 64 entries")
    g.add_argument("--window", type=int, default=d.window,
                   help="delta, heavily_compressed, compressed_sparse")
    g.add_argument("--compression-rate", type=int, default=d.compression_rate)
    g.add_argument("--index-dim", type=int, default=d.index_dim)
    g.add_argument("--impl", default=d.impl,
                   help="sparse core of bigbird, delta and the sparse and compressed mechanisms "
                        "(auto, reference, xla, pallas); auto: pallas on GPU/TPU, xla elsewhere; "
                        "gated delta rule of gated_deltanet, kimi_delta and linear (auto, chunk, "
                        "recurrent, pallas); auto: pallas on GPU/TPU, chunk elsewhere")
    g = p.add_argument_group("data")
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument("--pack", action="store_true",
                   help="pack variable-length documents per row (segment ids, restarting positions)")
    g.add_argument("--doc-len", type=int, default=None,
                   help="mean document length with --pack (default seq-len / 4)")
    g.add_argument("--num-pairs", type=int, default=d.num_pairs)
    g.add_argument("--num-queries", type=int, default=d.num_queries)
    g.add_argument("--num-keys", type=int, default=d.num_keys)
    g.add_argument("--num-values", type=int, default=d.num_values)
    g.add_argument("--text", default=None, help="train on this file's bytes instead of recall")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup", type=int, default=d.warmup)
    g.add_argument("--end-lr-ratio", type=float, default=d.end_lr_ratio)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--clip", type=float, default=d.clip)
    g.add_argument("--aux-weight", type=float, default=d.aux_weight,
                   help="weight of the selectors' index losses (msa, dsa, csa)")
    g.add_argument("--index-loss", default=d.index_loss, choices=INDEX_LOSSES,
                   help="selectors' index loss, computed in the module: auto (attnhut's: MSA "
                        "sparse, DSA/CSA dense), sparse (selected keys only) or dense")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--eval-batches", type=int, default=d.eval_batches)
    g.add_argument("--ckpt-dir", default=None, help="save here and resume from here")
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    g.add_argument("--mesh", default=None, help="e.g. data=4,model=2 (default: all devices on data)")
    g.add_argument("--metrics-out", default=None, help="write a JSON summary here")
    g.add_argument("--stop-after", type=int, default=None,
                   help="leave after this many steps (checkpointed), e.g. for time-sliced jobs")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--show", action="store_true", help="print a held-out sample at the end")
    a = p.parse_args(argv)
    cfg = Config(
        attn=a.attn, dim=a.dim, depth=a.depth, heads=a.heads, kv_heads=a.kv_heads,
        mlp_ratio=a.mlp_ratio, tied_head=not a.untied_head, token_shift=not a.no_token_shift, dtype=a.dtype,
        block_size=a.block_size, top_k=a.top_k, window=a.window,
        compression_rate=a.compression_rate, index_dim=a.index_dim, impl=a.impl, seq_len=a.seq_len,
        pack=a.pack, doc_len=a.doc_len, index_loss=a.index_loss,
        num_pairs=a.num_pairs, num_queries=a.num_queries, num_keys=a.num_keys,
        num_values=a.num_values, text=a.text, batch_size=a.batch_size, steps=a.steps, lr=a.lr,
        warmup=a.warmup, end_lr_ratio=a.end_lr_ratio, weight_decay=a.weight_decay, clip=a.clip,
        aux_weight=a.aux_weight, seed=a.seed, eval_every=a.eval_every,
        eval_batches=a.eval_batches, ckpt_dir=a.ckpt_dir, ckpt_every=a.ckpt_every, mesh=a.mesh,
        metrics_out=a.metrics_out, progress=not a.no_progress)
    cfg.validate()
    return cfg, a


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, args = parse_args(argv)
    result = train(cfg, stop_after=args.stop_after)
    if args.show:
        show_what_it_learned(result)
    return result


if __name__ == "__main__":
    main()

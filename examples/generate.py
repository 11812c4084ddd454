"""Sample from the small LM of the training example, with the attention layers' caches.

    python examples/generate.py --attn gqa --steps 150               # train ~1 min, then generate
    python examples/generate.py --attn mla --steps 150 --temperature 0.8 --top-k 8 --seed 1
    python examples/generate.py --checkpoint /tmp/lm                  # a run of train_lm.py --ckpt-dir
    python examples/generate.py --attn standard --text notes.txt --seq-len 256 --steps 300 \\
        --prompt "The " --max-new 64                                  # bytes of a file

Without ``--checkpoint`` the model is first trained as ``examples/train_lm.py`` trains it: every
flag of that script (``--attn``, ``--impl``, ``--steps``, ``--seq-len``, ``--text``, ...) is
accepted here too. Generation then prefills the prompts through the cache (rows of different
lengths in one batch) and runs one jit-compiled step per new token; it prints the continuations and
the tokens/s of the prefill and of the decode steps (compilation apart).

Prompts: ``--prompt`` is text for a ``--text`` model, or recall tokens for the recall task
(``k3 v5 k7 v1 _ _ k3``: keys ``k<i>``, values ``v<i>``, filler ``_``). Without it, held-out
recall sequences are cut just after one of their query keys (``--num-prompts`` rows, different
lengths), and the first generated token is the model's answer, checked against the pair; a text
model gets held-out windows of the file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a file (python examples/generate.py): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from examples.lm import Config, Data, generate, train  # noqa: E402
from examples.lm.generation import load_checkpoint  # noqa: E402
from examples.train_lm import parse_args as parse_train_args  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="Every other flag goes to the training (see examples/train_lm.py --help).")
    p.add_argument("--checkpoint", default=None,
                   help="load the latest checkpoint of this --ckpt-dir instead of training")
    p.add_argument("--prompt", default=None, help="text (a --text model) or recall tokens")
    p.add_argument("--num-prompts", type=int, default=4, help="held-out prompts without --prompt")
    p.add_argument("--max-new", type=int, default=16, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", dest="sample_top_k", type=int, default=None,
                   help="sample from the k most likely tokens (with --temperature > 0); the "
                        "mechanisms' own --top-k is a training flag: use --attn-top-k for it")
    p.add_argument("--attn-top-k", type=int, default=None, help="--top-k of train_lm.py")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling key (and the training's seed when training; default: the run's)")
    p.add_argument("--chunk", type=int, default=None,
                   help="prefill chunk size (default: the longest prompt, one chunk)")
    a, rest = p.parse_known_args(argv)
    if a.attn_top_k is not None:
        rest += ["--top-k", str(a.attn_top_k)]
    if a.seed is not None and not a.checkpoint:
        rest += ["--seed", str(a.seed)]
    return a, rest


def token_name(cfg: Config, t: int) -> str:
    if cfg.text is not None:
        return bytes([t]).decode("latin-1")
    if t == 0:
        return "_"
    return f"k{t - 1}" if t <= cfg.num_keys else f"v{t - 1 - cfg.num_keys}"


def parse_prompt(cfg: Config, prompt: str) -> list[int]:
    """A ``--prompt`` as tokens: bytes of a text model, recall names otherwise."""
    if cfg.text is not None:
        return list(prompt.encode("utf-8"))
    out = []
    for word in prompt.split():
        if word == "_":
            out.append(0)
        elif word[:1] in "kv" and word[1:].isdigit():
            i, limit = int(word[1:]), cfg.num_keys if word[0] == "k" else cfg.num_values
            if i >= limit:
                raise ValueError(f"--prompt: {word} is out of range ({limit} {word[0]}-tokens)")
            out.append(1 + i if word[0] == "k" else 1 + cfg.num_keys + i)
        else:
            raise ValueError(f"--prompt: {word!r} is not a recall token (k<i>, v<i> or _)")
    return out


def held_out_prompts(cfg: Config, trainer, n: int, max_new: int) -> tuple[list[list[int]], list]:
    """Held-out prompts of different lengths, and for recall the expected answer of each."""
    batch = jax.device_get(Data(cfg, trainer).eval_batches()[0])
    tokens, weights = np.asarray(batch["tokens"]), np.asarray(batch["weights"])
    prompts, answers = [], []
    for r in range(min(n, tokens.shape[0])):
        if cfg.text is not None:
            cut = max(1, min(cfg.seq_len - max_new, cfg.seq_len // 4 + r * cfg.seq_len // (4 * n)))
            prompts.append(tokens[r, :cut].tolist())
            answers.append(None)
            continue
        queries = [q for q in np.flatnonzero(weights[r]) if q + 1 + max_new <= cfg.seq_len]
        if not queries:
            continue
        q = queries[r % len(queries)]
        prompts.append(tokens[r, :q + 1].tolist())
        answers.append(int(tokens[r, q + 1]))
    if not prompts:
        raise ValueError(f"--max-new {max_new} leaves no room after any query of seq_len="
                         f"{cfg.seq_len}")
    return prompts, answers


def main(argv: Sequence[str] | None = None) -> dict:
    a, rest = parse_args(argv)
    if a.checkpoint:
        if rest:
            raise ValueError(f"--checkpoint takes the run's own configuration; drop {rest}")
        cfg, params = load_checkpoint(a.checkpoint)
        trainer = None
        print(f"loaded {a.checkpoint}: attn={cfg.attn} dim={cfg.dim} depth={cfg.depth}")
    else:
        cfg, _ = parse_train_args(rest)
        result = train(cfg)
        params, trainer = result["state"]["params"], result["trainer"]
    if a.prompt is not None:
        prompts, answers = [parse_prompt(cfg, a.prompt)], [None]
    else:
        if trainer is None:
            from examples.lm import Trainer
            from examples.lm.sharding import make_mesh, parse_mesh
            trainer = Trainer.build(cfg, make_mesh(parse_mesh(None, jax.device_count())))
        prompts, answers = held_out_prompts(cfg, trainer, a.num_prompts, a.max_new)
    seed = cfg.seed if a.seed is None else a.seed
    out = generate(cfg, params, prompts, a.max_new, key=jax.random.key(seed),
                   temperature=a.temperature, top_k=a.sample_top_k, chunk=a.chunk)
    right = 0
    for r, prompt in enumerate(prompts):
        new = out.tokens[r].tolist()
        if cfg.text is not None:
            show = lambda ts: bytes(ts).decode("utf-8", "replace")  # noqa: E731
            print(f"prompt    {show(prompt)!r}\ncontinued {show(new)!r}")
            continue
        tail = " ".join(token_name(cfg, t) for t in prompt[-6:])
        print(f"prompt [{len(prompt)} tokens] ... {tail}  ->  "
              + " ".join(token_name(cfg, t) for t in new))
        if answers[r] is not None:
            ok = new[0] == answers[r]
            right += ok
            print(f"    answer {token_name(cfg, new[0])}, the pair says "
                  f"{token_name(cfg, answers[r])} ({'ok' if ok else 'WRONG'})")
    asked = sum(x is not None for x in answers)
    if asked:
        print(f"recall answers right: {right}/{asked}")
    print(f"{cfg.attn}: {out.summary()}")
    return {"tokens": out.tokens, "generation": out, "cfg": cfg, "right": right, "asked": asked}


if __name__ == "__main__":
    main()

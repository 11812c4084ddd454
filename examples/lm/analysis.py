"""What a trained model does: which keys each layer reads, and a readable held-out sample.

``key_read_map`` draws, for one sequence, the (query, key) pairs a mechanism's last layer can read
(raw, or only through a summary); ``recall_view`` counts how many recall queries can see their
answer; ``show_what_it_learned`` prints a held-out recall sequence with the model's answers, or a
greedy continuation of a text prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attnhut_jax as ah

from .config import WITH_AUX_LOSS, Config
from .data import Batch, Data
from .model import LM, make_attention

Array = jax.Array
PyTree = Any

PATTERNED = ("bigbird", "minimax_sparse", "deepseek_sparse", "compressed_sparse",
             "heavily_compressed", "delta", "strided_sparse", "fixed_sparse", "sinkhorn", "spark")


def key_read_map(cfg: Config, selection: np.ndarray | None, t: int) -> np.ndarray:
    """(T, T) float for one sequence: 1 raw read, 0.5 read through a summary, 0 not read.

    ``selection`` is the layer's sown selection for this sequence (None for fixed patterns).
    """
    causal = np.tril(np.ones((t, t), bool))
    out = np.zeros((t, t))
    qpos, kpos = np.arange(t)[:, None], np.arange(t)[None, :]
    window = (kpos > qpos - cfg.window) & causal
    if cfg.attn == "bigbird":
        module = make_attention(cfg, cfg.depth - 1)
        keys = np.repeat(module.block_keep(t), module.block_size, axis=1)[:, :t]
        out[keys & causal] = 1.0
    elif cfg.attn == "delta":
        module = make_attention(cfg, cfg.depth - 1)
        anchor = (qpos // module.stride) * module.stride
        out[causal & (kpos <= anchor)] = 0.5  # through dense(anchor) - sparse(anchor)
        out[window | ((kpos < module.sink) & causal)] = 1.0
    elif cfg.attn in ("strided_sparse", "fixed_sparse"):  # merged sets: every head reads these
        pattern = ah.strided_pattern if cfg.attn == "strided_sparse" else ah.fixed_pattern
        out[np.asarray(pattern(t, cfg.block_size))[0, 0]] = 1.0
    elif cfg.attn == "sinkhorn":
        # the local block raw; every earlier block only through the soft-sorted block (a
        # Sinkhorn-weighted mixture of the earlier blocks' keys and values)
        blk = np.arange(t) // cfg.block_size
        out[causal & (blk[None, :] < blk[:, None])] = 0.5
        out[causal & (blk[None, :] == blk[:, None])] = 1.0
    elif cfg.attn == "minimax_sparse":
        out[selection[0] & causal] = 1.0  # kv group 0
    elif cfg.attn in ("deepseek_sparse", "spark"):  # spark: head 0
        out[selection & causal] = 1.0
    elif cfg.attn in ("heavily_compressed", "compressed_sparse"):
        r = cfg.compression_rate
        nc = -(-t // r)
        visible = (np.arange(nc)[None, :] + 1) * r <= np.arange(t)[:, None]
        entries = visible if selection is None else selection & visible
        run = kpos // r  # the entry that pools token s
        via = np.take_along_axis(entries, np.broadcast_to(run, (t, t)), axis=1)
        if cfg.attn == "compressed_sparse":  # entry c also pools the run before it
            nxt = np.minimum(run + 1, nc - 1)
            via |= np.take_along_axis(entries, np.broadcast_to(nxt, (t, t)), axis=1) & (
                run + 1 < nc)
        out[via & causal] = 0.5
        out[window] = 1.0
    else:
        raise ValueError(f"no pattern for attn={cfg.attn!r}; choose from {PATTERNED}")
    return out


def recall_view(cfg: Config, tokens: np.ndarray, weights: np.ndarray,
                m: np.ndarray) -> float:
    """Fraction of query keys whose earlier key token or value token the map can read."""
    pairs = {int(tokens[2 * i]): 2 * i for i in range(cfg.num_pairs)}
    hits = [max(m[q, pairs[int(tokens[q])]], m[q, pairs[int(tokens[q])] + 1]) > 0
            for q in np.flatnonzero(weights)]
    return float(np.mean(hits))


@functools.lru_cache(maxsize=8)
def _selection_fn(model: LM):
    return jax.jit(lambda p, t: model.apply({"params": p}, t, record_selection=True,
                                            mutable=["intermediates"]))


def last_layer_selection(result: dict, tokens_BT: Array) -> np.ndarray | None:
    """The last layer's selection for ``tokens`` (None when the mechanism has no selector)."""
    cfg, trainer = result["cfg"], result["trainer"]
    if cfg.attn not in WITH_AUX_LOSS + ("spark",):
        return None
    _, state = _selection_fn(trainer.model)(result["state"]["params"], tokens_BT)
    sel = state["intermediates"][f"block_{cfg.depth - 1}"]["selection"][0]
    return np.asarray(jax.device_get(sel))


def describe_sample(cfg: Config, batch: Batch, logits: Array, row: int = 0) -> str:
    """A readable account of one recall sequence: the pairs, then each query and the answer."""
    tok = np.asarray(batch["tokens"][row])
    w = np.asarray(batch["weights"][row])
    pred = np.asarray(jnp.argmax(logits[row], -1))

    def name(t: int) -> str:
        if t == 0:
            return "_"
        return f"k{t - 1}" if t <= cfg.num_keys else f"v{t - 1 - cfg.num_keys}"

    pairs = " ".join(f"{name(tok[2 * i])}:{name(tok[2 * i + 1])}" for i in range(cfg.num_pairs))
    lines = [f"pairs     {pairs}"]
    answers = []
    for p in np.flatnonzero(w):
        ok = "ok" if pred[p] == tok[p + 1] else "WRONG"
        answers.append(f"{name(tok[p])}@{p}->{name(pred[p])} ({ok})")
    lines.append("queries   " + ", ".join(answers))
    return "\n".join(lines)


def show_what_it_learned(result: dict, log: Callable[[str], None] = print) -> None:
    """Print one held-out recall sequence with the model's answers, or a text continuation."""
    trainer, cfg = result["trainer"], result["cfg"]
    params = result["state"]["params"]
    data = Data(cfg, trainer)
    batch = data.eval_batches()[0]
    if cfg.text is None:
        logits, _ = trainer.model.apply({"params": params}, batch["tokens"])
        log(describe_sample(cfg, batch, logits))
        if cfg.attn in PATTERNED:
            host = jax.device_get(batch)
            sel = last_layer_selection(result, batch["tokens"][:1])
            view = key_read_map(cfg, None if sel is None else sel[0], cfg.seq_len)
            frac = (view > 0).sum() / (cfg.seq_len * (cfg.seq_len + 1) / 2)
            log(f"last layer: the answer's key or value token is in view for "
                f"{recall_view(cfg, host['tokens'][0], host['weights'][0], view):.0%} of these "
                f"queries, while each query reads {frac:.0%} of the causal (query, key) pairs")
        return
    prompt = np.asarray(batch["tokens"][0][: cfg.seq_len // 2])
    out = greedy_continue(trainer.model, params, prompt, cfg.seq_len)
    log("prompt    " + bytes(prompt.astype(np.uint8)).decode("utf-8", "replace"))
    log("continued " + bytes(out.astype(np.uint8)).decode("utf-8", "replace"))


def greedy_continue(model: LM, params: PyTree, prompt: np.ndarray, length: int) -> np.ndarray:
    """Greedy bytes after ``prompt`` up to ``length`` tokens (recomputes the causal model)."""
    buf = jnp.zeros((1, length), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))
    fwd = jax.jit(lambda p, b: model.apply({"params": p}, b)[0])
    for pos in range(len(prompt), length):
        nxt = jnp.argmax(fwd(params, buf)[0, pos - 1])
        buf = buf.at[0, pos].set(nxt)
    return np.asarray(buf[0, len(prompt):])

"""The data: multi-query associative recall made on device, or the bytes of a local file.

The default task is multi-query associative recall (MQAR, Arora et al. 2023), generated on the fly:
a sequence opens with ``num_pairs`` key-value pairs, then the keys come back one by one at random
places in a long stretch of filler, each followed by its value. The loss and the accuracy count
only the predictions made at those query keys, so a model scores above chance (1 / num_values)
only by finding the key's earlier occurrence and copying the token that followed it: exactly what
a sparse selector must learn to keep in view. ``text`` trains on a file's bytes instead.

Batch ``s`` of a run is a function of (seed, s), so a resumed run sees the batches it would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config

if TYPE_CHECKING:
    from .training import Trainer

Array = jax.Array

Batch = dict[str, Array]


def recall_batch(key: Array, cfg: Config, batch_size: int) -> Batch:
    """A batch of the multi-query associative recall task, made on device.

    Tokens: 0 filler, ``1..num_keys`` keys, then ``num_values`` values. Each row opens with
    ``num_pairs`` pairs (distinct keys, random values) ``k v k v ...``; ``num_queries`` of those
    keys return at random two-token slots of the filler, each followed by its value. ``targets``
    is the next token; ``weights`` is 1 exactly at the returning keys, whose target is the value.
    """
    t, np_, nq, nk, nv = cfg.seq_len, cfg.num_pairs, cfg.num_queries, cfg.num_keys, cfg.num_values
    slots = (t - 2 * np_) // 2

    def row(key):
        kk, kv, kq, ks = jax.random.split(key, 4)
        keys = jax.random.permutation(kk, nk)[:np_] + 1
        values = jax.random.randint(kv, (np_,), 0, nv) + 1 + nk
        pairs = jnp.stack([keys, values], axis=1).reshape(-1)
        asked = jax.random.permutation(kq, np_)[:nq]
        where = 2 * np_ + 2 * jax.random.permutation(ks, slots)[:nq]
        tokens = jnp.zeros((t,), jnp.int32).at[: 2 * np_].set(pairs)
        tokens = tokens.at[where].set(keys[asked]).at[where + 1].set(values[asked])
        weights = jnp.zeros((t,), jnp.float32).at[where].set(1.0)
        return tokens, weights

    tokens, weights = jax.vmap(row)(jax.random.split(key, batch_size))
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((batch_size, 1), jnp.int32)], axis=1)
    return {"tokens": tokens, "targets": targets, "weights": weights}


class TextData:
    """Random windows of a local file's bytes; the last 10% is held out for evaluation."""

    def __init__(self, path: str | Path, seq_len: int):
        raw = np.frombuffer(Path(path).read_bytes(), np.uint8).astype(np.int32)
        cut = int(len(raw) * 0.9)
        if cut < seq_len + 2 or len(raw) - cut < seq_len + 2:
            raise ValueError(f"--text {path}: {len(raw)} bytes is too short for seq_len={seq_len} "
                             f"(need > {int((seq_len + 2) / 0.1)} bytes)")
        self.train, self.held_out, self.seq_len = raw[:cut], raw[cut:], seq_len

    def batch(self, rng: np.random.Generator, batch_size: int, held_out: bool = False) -> dict:
        src = self.held_out if held_out else self.train
        starts = rng.integers(0, len(src) - self.seq_len - 1, batch_size)
        win = np.stack([src[s:s + self.seq_len + 1] for s in starts])
        return {"tokens": win[:, :-1], "targets": win[:, 1:],
                "weights": np.ones((batch_size, self.seq_len), np.float32)}


class Data:
    """Batch ``step`` of the run is a pure function of (seed, step): resuming replays nothing."""

    def __init__(self, cfg: Config, trainer: Trainer):
        self.cfg, self.sharding = cfg, trainer.batch_sharding
        self.text = TextData(cfg.text, cfg.seq_len) if cfg.text else None
        self._recall = trainer.recall_batch

    def train_batch(self, step: int) -> Batch:
        if self.text is None:
            return self._recall(jax.random.fold_in(jax.random.key(self.cfg.seed), step))
        rng = np.random.default_rng((self.cfg.seed, 0, step))
        return jax.device_put(self.text.batch(rng, self.cfg.batch_size), self.sharding)

    def eval_batches(self) -> list[Batch]:
        out = []
        for i in range(self.cfg.eval_batches):
            if self.text is None:
                key = jax.random.fold_in(jax.random.key(self.cfg.seed + 1_000_003), i)
                out.append(self._recall(key))
            else:
                rng = np.random.default_rng((self.cfg.seed, 1, i))
                out.append(jax.device_put(self.text.batch(rng, self.cfg.batch_size, True),
                                          self.sharding))
        return out

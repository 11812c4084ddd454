"""The data: multi-query associative recall made on device, or the bytes of a local file.

The default task is multi-query associative recall (MQAR, Arora et al. 2023), generated on the fly:
a sequence opens with ``num_pairs`` key-value pairs, then the keys come back one by one at random
places in a long stretch of filler, each followed by its value. The loss and the accuracy count
only the predictions made at those query keys, so a model scores above chance (1 / num_values)
only by finding the key's earlier occurrence and copying the token that followed it: exactly what
a sparse selector must learn to keep in view. ``text`` trains on a file's bytes instead.

With ``pack`` each row holds several documents of random length (mean ``doc_len``), each a recall
episode of its own (or a window of the file), as real pretraining rows do: ``segment_ids`` number
the documents from 1 (0 is the padding between and after them), ``positions`` restart at 0 in
each document, and documents start at multiples of the mechanism's ``pack_align``. A token's
target is the next token of its own document; the last token of a document predicts nothing.

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


def recall_document(rng: np.random.Generator, cfg: Config, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One recall episode of ``length`` tokens (numpy): the pairs, then the queries at random
    two-token slots of the filler; (tokens, weights) as in ``recall_batch``."""
    np_, nq, nk, nv = cfg.num_pairs, cfg.num_queries, cfg.num_keys, cfg.num_values
    keys = rng.permutation(nk)[:np_] + 1
    values = rng.integers(0, nv, np_) + 1 + nk
    tokens = np.zeros(length, np.int32)
    tokens[: 2 * np_] = np.stack([keys, values], axis=1).reshape(-1)
    asked = rng.permutation(np_)[:nq]
    where = 2 * np_ + 2 * rng.permutation((length - 2 * np_) // 2)[:nq]
    tokens[where], tokens[where + 1] = keys[asked], values[asked]
    weights = np.zeros(length, np.float32)
    weights[where] = 1.0
    return tokens, weights


def packed_batch(rng: np.random.Generator, cfg: Config, batch_size: int,
                 document) -> dict[str, np.ndarray]:
    """Rows of documents of random length packed end to end (numpy).

    ``document(rng, length) -> (tokens, weights)`` makes one document. Lengths are uniform in
    [doc_len / 2, 3 doc_len / 2] (at least ``cfg.min_doc_len``); each document starts at a
    multiple of ``cfg.pack_align``; the last one is cut to fit when at least ``min_doc_len``
    tokens are left, and the rest of the row is padding (segment 0, weight 0).
    """
    t, align, short = cfg.seq_len, cfg.pack_align, cfg.min_doc_len
    mean = cfg.doc_len or max(short, t // 4)
    lo, hi = max(short, mean // 2), max(short, 3 * mean // 2)
    out = {k: np.zeros((batch_size, t), np.int32) for k in
           ("tokens", "targets", "segment_ids", "positions")}
    out["weights"] = np.zeros((batch_size, t), np.float32)
    for r in range(batch_size):
        at, seg = 0, 1
        while t - at >= short:
            n = min(int(rng.integers(lo, hi + 1)), t - at)
            tokens, weights = document(rng, n)
            span = slice(at, at + n)
            out["tokens"][r, span], out["segment_ids"][r, span] = tokens, seg
            out["positions"][r, span] = np.arange(n)
            out["targets"][r, at:at + n - 1] = tokens[1:]
            out["weights"][r, at:at + n - 1] = weights[:-1]
            at, seg = -(-(at + n) // align) * align, seg + 1
    return out


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

    def document(self, rng: np.random.Generator, length: int, held_out: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
        """A random window of ``length`` bytes as one packed document, every byte weighted."""
        src = self.held_out if held_out else self.train
        start = int(rng.integers(0, len(src) - length))
        return src[start:start + length], np.ones(length, np.float32)


class Data:
    """Batch ``step`` of the run is a pure function of (seed, step): resuming replays nothing."""

    def __init__(self, cfg: Config, trainer: Trainer):
        self.cfg, self.sharding = cfg, trainer.batch_sharding
        self.text = TextData(cfg.text, cfg.seq_len) if cfg.text else None
        self._recall = trainer.recall_batch

    def _packed(self, rng: np.random.Generator, held_out: bool) -> Batch:
        cfg = self.cfg
        if self.text is None:
            doc = lambda r, n: recall_document(r, cfg, n)  # noqa: E731
        else:
            doc = lambda r, n: self.text.document(r, n, held_out)  # noqa: E731
        return jax.device_put(packed_batch(rng, cfg, cfg.batch_size, doc), self.sharding)

    def train_batch(self, step: int) -> Batch:
        if self.cfg.pack:
            return self._packed(np.random.default_rng((self.cfg.seed, 2, step)), False)
        if self.text is None:
            return self._recall(jax.random.fold_in(jax.random.key(self.cfg.seed), step))
        rng = np.random.default_rng((self.cfg.seed, 0, step))
        return jax.device_put(self.text.batch(rng, self.cfg.batch_size), self.sharding)

    def eval_batches(self) -> list[Batch]:
        out = []
        for i in range(self.cfg.eval_batches):
            if self.cfg.pack:
                out.append(self._packed(np.random.default_rng((self.cfg.seed, 3, i)), True))
            elif self.text is None:
                key = jax.random.fold_in(jax.random.key(self.cfg.seed + 1_000_003), i)
                out.append(self._recall(key))
            else:
                rng = np.random.default_rng((self.cfg.seed, 1, i))
                out.append(jax.device_put(self.text.batch(rng, self.cfg.batch_size, True),
                                          self.sharding))
        return out

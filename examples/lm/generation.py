"""Sampling from a trained ``LM`` with the attention layers' caches (``LM(cfg, decode=True)``).

``generate`` prefills the prompts through the cache in chunks of ``chunk`` tokens (one chunk by
default; rows of different lengths via ``lengths``), samples the first new token from each row's
last prompt logits, then runs one jit-compiled single-token step per new token: greedy
(``temperature=0``) or softmax sampling at ``temperature``, optionally from the ``top_k`` most
likely tokens, with a PRNG key folded with the step number. Every function is compiled once per
shape (a prefill chunk, a step) and warmed up before it is timed, so the reported tokens/s of the
prefill and of the decode steps exclude compilation (reported apart).

``rollout`` is the cache-free reference (argmax of full forwards over the growing prefix) that
greedy generation equals; ``load_checkpoint`` reads the parameters a ``train_lm.py --ckpt-dir``
run saved.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .model import LM
from .sharding import make_mesh, parse_mesh
from .training import Checkpoints, Trainer

Array = jax.Array
PyTree = Any


@dataclasses.dataclass
class Generation:
    """What ``generate`` returns.

    tokens: (B, max_new) int32 generated tokens of each row.
    logits: (B, max_new, vocab) float32 logits each new token was drawn from.
    lengths: (B,) prompt lengths.
    compile_s: seconds spent compiling (and running once) the prefill chunk and the step.
    prefill_s / decode_s: seconds of the prefill (all chunks) and of the max_new - 1 steps.
    """

    tokens: np.ndarray
    logits: np.ndarray
    lengths: np.ndarray
    compile_s: float
    prefill_s: float
    decode_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return float(self.lengths.sum()) / max(self.prefill_s, 1e-12)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens generated per second by the single-token steps (all rows together)."""
        b, new = self.tokens.shape
        return b * max(new - 1, 0) / max(self.decode_s, 1e-12)

    def summary(self) -> str:
        b, new = self.tokens.shape
        return (f"prefill {int(self.lengths.sum())} tokens in {self.prefill_s * 1e3:.1f} ms "
                f"({self.prefill_tokens_per_s:,.0f} tokens/s); decode {b} x {max(new - 1, 0)} "
                f"steps in {self.decode_s * 1e3:.1f} ms ({self.decode_tokens_per_s:,.0f} tokens/s, "
                f"{self.decode_s / max(new - 1, 1) * 1e3:.2f} ms/step); compile "
                f"{self.compile_s:.2f} s")


def sample(logits_BV: Array, key: Array, temperature: float, top_k: int | None) -> Array:
    """(B,) int32 next tokens: argmax when ``temperature == 0``, else a draw from
    softmax(logits / temperature) restricted to the ``top_k`` largest logits (all when None)."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """The jit-compiled functions of generation for one configuration and sampling rule.

    ``init_cache(batch, max_len)`` -> an empty cache; ``prefill(params, cache, chunk_BC,
    lengths_B, last_BV)`` -> (last_BV, cache): appends a chunk and keeps, per row, the logits of
    its last appended token (``last_BV`` unchanged for rows that append nothing);
    ``step(params, cache, token_B, key, i)`` -> (next_B, logits_BV, cache): appends one token per
    row and samples the next with ``fold_in(key, i)``.
    """

    cfg: Config
    temperature: float = 0.0
    top_k: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 (or None: all tokens)")

    @functools.cached_property
    def model(self) -> LM:
        return LM(self.cfg, decode=True)

    def init_cache(self, batch: int, max_len: int) -> PyTree:
        if max_len > self.cfg.seq_len:
            raise ValueError(f"a cache of {max_len} tokens is longer than the model's position "
                             f"embedding (seq_len={self.cfg.seq_len})")
        return self._init_cache_fn(batch, max_len)

    @functools.cached_property
    def _init_cache_fn(self) -> Callable:
        @functools.partial(jax.jit, static_argnums=(0, 1))
        def init(batch, max_len):
            tokens = jnp.zeros((batch, max_len), jnp.int32)
            return self.model.init(jax.random.key(0), tokens)["cache"]
        return init

    @functools.cached_property
    def prefill(self) -> Callable:
        model = self.model

        @jax.jit
        def prefill(params, cache, chunk_BC, lengths_B, last_BV):
            (logits_BCV, _), state = model.apply({"params": params, "cache": cache}, chunk_BC,
                                                 lengths=lengths_B, mutable=["cache"])
            b, c = chunk_BC.shape
            at_B = jnp.clip(lengths_B - 1, 0, c - 1)
            here_BV = logits_BCV[jnp.arange(b), at_B]
            return jnp.where((lengths_B > 0)[:, None], here_BV, last_BV), state["cache"]

        return prefill

    @functools.cached_property
    def step(self) -> Callable:
        model, temperature, top_k = self.model, self.temperature, self.top_k

        @jax.jit
        def step(params, cache, token_B, key, i):
            (logits_B1V, _), state = model.apply({"params": params, "cache": cache},
                                                 token_B[:, None], mutable=["cache"])
            logits_BV = logits_B1V[:, 0]
            nxt = sample(logits_BV, jax.random.fold_in(key, i), temperature, top_k)
            return nxt, logits_BV, state["cache"]

        return step

    def first_token(self, last_BV: Array, key: Array) -> Array:
        return sample(last_BV, jax.random.fold_in(key, 0), self.temperature, self.top_k)


def pad_prompts(prompts: Sequence[Sequence[int]] | np.ndarray, chunk: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(B, P) int32 prompts right-padded with 0 to a multiple of ``chunk`` (default: the longest
    prompt), and their (B,) lengths."""
    rows = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("generate needs at least one prompt")
    lens = np.array([len(r) for r in rows], np.int32)
    if lens.min() < 1:
        raise ValueError(f"every prompt needs at least one token, got lengths {lens.tolist()}")
    p = int(lens.max())
    c = p if chunk is None else chunk
    padded = np.zeros((len(rows), -(-p // c) * c), np.int32)
    for r, row in enumerate(rows):
        padded[r, :len(row)] = row
    return padded, lens


def generate(cfg: Config, params: PyTree, prompts: Sequence[Sequence[int]] | np.ndarray,
             max_new: int, *, key: Array | None = None, temperature: float = 0.0,
             top_k: int | None = None, chunk: int | None = None, max_len: int | None = None,
             decoder: Decoder | None = None) -> Generation:
    """Continue each prompt by ``max_new`` tokens with the cache.

    ``prompts``: a list of token sequences (any lengths >= 1) or a (B, P) array. ``chunk``: the
    prefill's chunk size (default: the longest prompt, one chunk). ``max_len``: the cache's length
    (default: longest prompt + max_new - 1, at most ``cfg.seq_len``). ``decoder``: reuse the
    compiled functions of an earlier call (same ``cfg`` and sampling rule).
    """
    if max_new < 1:
        raise ValueError(f"max_new={max_new} must be >= 1")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    dec = decoder or Decoder(cfg, temperature, top_k)
    if dec.cfg != cfg or dec.temperature != temperature or dec.top_k != top_k:
        raise ValueError("decoder was built for another configuration or sampling rule")
    key = jax.random.key(0) if key is None else key
    tokens, lens = pad_prompts(prompts, chunk)
    b, p = tokens.shape[0], int(lens.max())
    need = p + max_new - 1
    max_len = need if max_len is None else max_len
    if max_len < need:
        raise ValueError(f"max_len={max_len} has no room for a {p}-token prompt and {max_new} new "
                         f"tokens (need {need})")
    c = min(chunk or p, max_len)
    cache = dec.init_cache(b, max_len)
    lens_j = jnp.asarray(lens)
    last = jnp.zeros((b, cfg.vocab), jnp.float32)

    def run_prefill(cache, last):
        for a in range(0, tokens.shape[1], c):
            chunk_len = jnp.clip(lens_j - a, 0, c)
            last, cache = dec.prefill(params, cache, jnp.asarray(tokens[:, a:a + c]), chunk_len,
                                      last)
        return jax.block_until_ready((last, cache))

    t0 = time.perf_counter()
    dec.prefill(params, cache, jnp.asarray(tokens[:, :c]), jnp.clip(lens_j, 0, c),
                last)[0].block_until_ready()  # compile (the result is dropped)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    last, cache = run_prefill(cache, last)
    prefill_s = time.perf_counter() - t0

    out = [dec.first_token(last, key)]
    logits = [last]
    if max_new > 1:
        t0 = time.perf_counter()
        jax.block_until_ready(dec.step(params, cache, out[0], key, jnp.int32(1)))  # compile
        compile_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(1, max_new):
        nxt, step_logits, cache = dec.step(params, cache, out[-1], key, jnp.int32(i))
        out.append(nxt)
        logits.append(step_logits)
    jax.block_until_ready(out[-1])
    decode_s = time.perf_counter() - t0
    return Generation(np.asarray(jnp.stack(out, axis=1)), np.asarray(jnp.stack(logits, axis=1)),
                      lens, compile_s, prefill_s, decode_s)


def rollout(cfg: Config, params: PyTree, prompts: Sequence[Sequence[int]], max_new: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy continuation by full forwards (``decode=False``, no cache) over the growing prefix:
    (B, max_new) tokens and the (B, max_new, vocab) logits each was the argmax of; what
    ``generate(temperature=0)`` must equal.

    The rows sit in one (B, longest prompt + max_new) buffer (one compilation); the forward is
    causal, so the tokens after a row's prefix (zeros, or tokens not yet generated) do not reach
    the logits read at the prefix's last position.
    """
    tokens, lens = pad_prompts(prompts)
    b = tokens.shape[0]
    buf = np.zeros((b, int(lens.max()) + max_new), np.int32)
    buf[:, :tokens.shape[1]] = tokens
    model = LM(cfg)
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    rows, out = np.arange(b), []
    for i in range(max_new):
        logits_BV = np.asarray(fwd(params, jnp.asarray(buf)))[rows, lens + i - 1]
        buf[rows, lens + i] = logits_BV.argmax(-1)
        out.append(logits_BV)
    return np.stack([buf[r, lens[r]:lens[r] + max_new] for r in rows]), np.stack(out, axis=1)


def load_checkpoint(directory: str) -> tuple[Config, PyTree]:
    """(config, parameters) of the latest checkpoint a training run (``train_lm.py --ckpt-dir``)
    wrote to ``directory``."""
    ckpt = Checkpoints(directory, every=1)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ValueError(f"--checkpoint {directory}: no checkpoint there (train with "
                             f"examples/train_lm.py --ckpt-dir {directory})")
        cfg = Config(**ckpt.restore_meta(step)["config"])
        cfg.validate()
        trainer = Trainer.build(cfg, make_mesh(parse_mesh(None, jax.device_count())))
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(trainer.init_state), trainer.state_sharding)
        return cfg, ckpt.restore_state(step, abstract)["params"]
    finally:
        ckpt.close()

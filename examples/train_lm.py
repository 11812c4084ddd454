"""Train a small decoder-only language model whose attention is any attnhut_jax mechanism.

    python examples/train_lm.py --attn minimax_sparse             # 150 steps of recall, ~1 min on CPU
    python examples/train_lm.py --attn gqa --mesh data=4,model=2  # 8 devices: batch on data, heads on model
    python examples/train_lm.py --attn standard --ckpt-dir /tmp/lm --ckpt-every 50   # resumable
    python examples/train_lm.py --attn deepseek_sparse --text notes.txt --seq-len 256  # bytes of a file

The model is token + learned position embeddings, ``depth`` pre-norm blocks of attention and a GELU
MLP, a final LayerNorm and a head tied to the embedding (``--untied-head`` for a separate one).
Each block feeds its attention a per-channel mix of the normalised input and that of the previous
position (RWKV's token shift, ``--no-token-shift`` to drop it): it hands every layer the
previous-token feature that an induction head otherwise needs a whole layer to build, and makes
recall learnable in a few hundred steps on a CPU.

The default task is multi-query associative recall (MQAR, Arora et al. 2023), generated on the fly:
a sequence opens with ``num_pairs`` key-value pairs, then the keys come back one by one at random
places in a long stretch of filler, each followed by its value. The loss and the accuracy count
only the predictions made at those query keys, so a model scores above chance (1 / num_values)
only by finding the key's earlier occurrence and copying the token that followed it: exactly what
a sparse selector must learn to keep in view. ``--text FILE`` trains on the file's bytes instead.

Training is one jit-compiled step (optax AdamW, warmup + cosine decay, global-norm clipping). The
index branches of ``minimax_sparse``, ``deepseek_sparse`` and ``compressed_sparse`` get no
gradient from the task loss (hard top-k); their auxiliary losses, weighted by ``--aux-weight``,
train them to predict where the main attention looks.

Sharding: ``--mesh data=D,model=M`` (D * M = number of devices) builds a ``jax.sharding.Mesh``.
The batch is split over ``data``; every parameter is placed by the logical axis names the modules
declare, through ``RULES`` (heads, kv heads, fused qkv, MLP, vocabulary, indexer heads on
``model``, the rest replicated), so the same script runs on one CPU or a multi-GPU host.

Checkpoints (``--ckpt-dir``) are written with orbax every ``--ckpt-every`` steps and at the end;
a rerun with the same directory restores parameters, optimiser state, step and metric history,
and continues with the batches it would have seen (batch ``s`` is a function of (seed, s)).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import attnhut_jax as ah
from attnhut_jax import compressed as ah_compressed
from attnhut_jax import core

Array = jax.Array
PyTree = Any

MECHANISMS = ("standard", "gqa", "mqa", "mla", "differential", "delta", "bigbird",
              "minimax_sparse", "deepseek_sparse", "heavily_compressed", "compressed_sparse")
WITH_AUX_LOSS = ("minimax_sparse", "deepseek_sparse", "compressed_sparse")
MESH_AXES = ("data", "model")

# Logical axis -> mesh axis. Axes not listed (and axes whose size the mesh axis does not divide)
# are replicated. Order matters only when two logical axes of one array ask for the same mesh axis.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("qkv", "model"),
    ("mlp", "model"),
    ("index_heads", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("kv", None),
    ("latent", None),
    ("index", None),
    ("head_dim", None),
    ("rate", None),
    ("gru", None),
    ("scale", None),
)


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on (one field per command-line flag). ``top_k=None`` takes a
    per-mechanism default (``resolved_top_k``)."""

    attn: str = "standard"
    # model
    dim: int = 64
    depth: int = 2
    heads: int = 4
    kv_heads: int = 2          # gqa; kv groups of minimax_sparse
    mlp_ratio: int = 4
    tied_head: bool = True
    token_shift: bool = True   # mix each position's attention input with its predecessor's
    dtype: str = "float32"     # compute dtype; parameters stay float32
    # mechanism knobs (sparse / windowed / compressed mechanisms)
    block_size: int = 16       # bigbird, minimax_sparse
    top_k: int | None = None   # minimax_sparse: blocks, deepseek_sparse: tokens, compressed_sparse: entries
    window: int = 32           # delta, heavily_compressed, compressed_sparse
    compression_rate: int = 4  # heavily_compressed, compressed_sparse
    index_dim: int = 16        # width of the index / lightning-indexer heads
    impl: str = "auto"         # sparse core of the modules that have one: auto|reference|xla|pallas
    # task
    seq_len: int = 128
    num_pairs: int = 8
    num_queries: int = 8
    num_keys: int = 32
    num_values: int = 32
    text: str | None = None
    # optimisation
    batch_size: int = 32
    steps: int = 150
    lr: float = 3e-3
    warmup: int = 15
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    aux_weight: float = 0.1
    seed: int = 0
    # bookkeeping
    eval_every: int = 50
    eval_batches: int = 4
    ckpt_dir: str | None = None
    ckpt_every: int = 50
    mesh: str | None = None
    metrics_out: str | None = None
    progress: bool = True

    # fields that change the meaning of a checkpoint: a resumed run must agree on all of them
    MODEL_FIELDS = ("attn", "dim", "depth", "heads", "kv_heads", "mlp_ratio", "tied_head",
                    "token_shift", "block_size", "top_k", "window", "compression_rate",
                    "index_dim", "seq_len", "num_pairs", "num_queries", "num_keys", "num_values",
                    "text", "batch_size", "steps", "lr", "warmup", "end_lr_ratio",
                    "weight_decay", "clip", "aux_weight", "seed")

    def validate(self) -> None:
        if self.attn not in MECHANISMS:
            raise ValueError(f"--attn {self.attn!r} is not a mechanism; choose one of "
                             f"{', '.join(MECHANISMS)}")
        if self.impl not in core.IMPLS:
            raise ValueError(f"--impl {self.impl!r} must be one of {core.IMPLS}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype!r} must be float32, bfloat16 or float16")
        ints = dict(dim=self.dim, depth=self.depth, heads=self.heads, kv_heads=self.kv_heads,
                    mlp_ratio=self.mlp_ratio, seq_len=self.seq_len, batch_size=self.batch_size,
                    eval_every=self.eval_every, eval_batches=self.eval_batches,
                    ckpt_every=self.ckpt_every)
        bad = {k: v for k, v in ints.items() if v < 1}
        if bad or self.steps < 0:
            bad.update({"steps": self.steps} if self.steps < 0 else {})
            raise ValueError(f"must be positive: {bad}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be divisible by kv_heads={self.kv_heads}")
        if self.text is None:
            if not 1 <= self.num_queries <= self.num_pairs <= self.num_keys:
                raise ValueError(f"recall task needs 1 <= num_queries={self.num_queries} <= "
                                 f"num_pairs={self.num_pairs} <= num_keys={self.num_keys}")
            slots = (self.seq_len - 2 * self.num_pairs) // 2
            if slots < self.num_queries:
                raise ValueError(f"seq_len={self.seq_len} leaves {slots} query slots after "
                                 f"{self.num_pairs} pairs; need num_queries={self.num_queries}")
            if self.num_values < 2:
                raise ValueError(f"num_values={self.num_values} must be >= 2")

    def resolved_top_k(self) -> int:
        """``top_k`` in the unit of the mechanism, defaulting to about a quarter of the context."""
        if self.top_k is not None:
            return self.top_k
        t = self.seq_len
        return {"minimax_sparse": max(1, t // self.block_size // 4),
                "deepseek_sparse": max(1, t // 4),
                "compressed_sparse": max(1, t // self.compression_rate // 4)}.get(self.attn, 0)

    @property
    def vocab(self) -> int:
        if self.text is not None:
            return 256
        return _round_up(1 + self.num_keys + self.num_values, 8)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _dtype(cfg: Config):
    return jnp.dtype(cfg.dtype)


# ----------------------------------------------------------------------------- model


def make_attention(cfg: Config, layer: int, name: str = "attn") -> nn.Module:
    """The mechanism ``cfg.attn`` as a causal attention layer of width ``cfg.dim``."""
    d, n, a, k = cfg.dim, cfg.heads, cfg.attn, cfg.resolved_top_k()
    cls, args, kw = {
        "standard": (ah.StandardAttention, (d, n), dict(causal=True)),
        "gqa": (ah.GroupedQueryAttention, (d, n, cfg.kv_heads), dict(causal=True)),
        "mqa": (ah.MultiQueryAttention, (d, n), dict(causal=True)),
        "mla": (ah.MultiHeadLatentAttention, (d, n), dict(causal=True)),
        # Ye et al. halve the head count so that each (two-map) head keeps a normal head's width.
        "differential": (ah.DifferentialAttention, (d, max(1, n // 2)),
                         dict(depth=layer, causal=True)),
        "delta": (ah.DeltaAttention, (d, n), dict(window=cfg.window)),
        "bigbird": (ah.BigBirdAttention, (d, n),
                    dict(block_size=cfg.block_size, causal=True, seed=layer)),
        "minimax_sparse": (ah.MiniMaxSparseAttention, (d, n, cfg.kv_heads),
                           dict(block_size=cfg.block_size, top_k=k, index_dim=cfg.index_dim,
                                causal=True)),
        "deepseek_sparse": (ah.DeepSeekSparseAttention, (d, n),
                            dict(top_k=k, index_head_dim=cfg.index_dim, causal=True)),
        "heavily_compressed": (ah.HeavilyCompressedAttention, (d, n),
                               dict(compression_rate=cfg.compression_rate, window=cfg.window)),
        "compressed_sparse": (ah.CompressedSparseAttention, (d, n),
                              dict(compression_rate=cfg.compression_rate, top_k=k,
                                   window=cfg.window, index_dim=cfg.index_dim)),
    }[a]
    if cfg.impl != "auto" and "impl" in {f.name for f in dataclasses.fields(cls)}:
        kw["impl"] = cfg.impl
    return cls(*args, **kw, dtype=_dtype(cfg), name=name)


def _dense_teacher(attn: ah.DeepSeekSparseAttention, h: Array) -> Array:
    """DSA's main attention without the top-k selection, (B, N, T, T): the indexer's target."""
    b, t, _ = h.shape
    q, k, _ = jnp.split(attn.qkv(h), 3, axis=-1)
    shape = (b, t, attn.num_heads, attn.head_dim)
    probs = core.attention_weights(q.reshape(shape), k.reshape(shape),
                                   keep=core.causal_mask(t, t), scale=attn.head_dim ** -0.5)
    return probs.reshape(b, attn.num_heads, t, t)


def _compressed_teacher(attn: ah.CompressedSparseAttention, h: Array) -> Array:
    """CSA's main attention over *all* visible compressed entries, (B, N, T, C).

    CSA's ``return_aux`` gives the indexer scores but not the main branch's weights, so they are
    rebuilt here from the module's own sub-layers, step for step as in its ``__call__``.
    """
    b, t, _ = h.shape
    r = attn.compression_rate
    comp_BCH = ah_compressed.compress_overlap(attn.kv_a(h), attn.kv_b(h), attn.z_a(h),
                                              attn.z_b(h), attn.bias_a, attn.bias_b, r)
    comp_BCH = core.rms_norm(comp_BCH, attn.kv_norm)
    q_BTNH = core.rms_norm(attn.q_up(attn.q_down(h)).reshape(b, t, attn.num_heads, -1),
                           attn.q_norm)
    visible_TC = ah_compressed.compressed_visible(t, comp_BCH.shape[1], r)
    probs = core.attention_weights(q_BTNH, comp_BCH[:, :, None, :], keep=visible_TC,
                                   scale=q_BTNH.shape[-1] ** -0.5, sink=attn.sink)
    return probs.reshape(b, attn.num_heads, t, -1)


def attention_with_aux(attn: nn.Module, kind: str, h: Array, with_aux: bool
                       ) -> tuple[Array, Array, Array | None]:
    """(output, index aux loss, selection) of one attention layer.

    The selection is what the layer's selector keeps: (B, K, T, T) for minimax_sparse, (B, T, T)
    for deepseek_sparse, (B, T, C) for compressed_sparse; None elsewhere or without aux.
    """
    zero = jnp.zeros((), jnp.float32)
    if not with_aux or kind not in WITH_AUX_LOSS:
        return attn(h), zero, None
    out, aux = attn(h, return_aux=True)
    if kind == "minimax_sparse":
        loss = ah.msa_index_aux_loss(aux["index_scores"], aux["attn_weights"], aux["keep"])
        return out, loss, aux["keep"]
    if kind == "deepseek_sparse":
        return out, ah.dsa_index_aux_loss(aux["index_scores"], _dense_teacher(attn, h)), \
            aux["selected"]
    return out, ah.dsa_index_aux_loss(aux["index_scores"], _compressed_teacher(attn, h)), \
        aux["selected"]


class Block(nn.Module):
    """Pre-norm residual block: x + attn(shift(LN(x))), then x + MLP(LN(x)).

    ``shift(h)[t] = mu * h[t] + (1 - mu) * h[t - 1]`` with a learned per-channel ``mu`` (init 0.5)
    when ``cfg.token_shift``; causal, since position t mixes in only t - 1.
    """

    cfg: Config
    layer: int

    @nn.compact
    def __call__(self, x: Array, with_aux: bool = False) -> tuple[Array, Array]:
        cfg, dt = self.cfg, _dtype(self.cfg)
        h = core.layer_norm("ln_attn", dt, jnp.float32)(x)
        if cfg.token_shift:
            mu = self.param("shift", nn.with_logical_partitioning(
                nn.initializers.constant(0.5), ("embed",)), (cfg.dim,))
            prev = jnp.pad(h, ((0, 0), (1, 0), (0, 0)))[:, :-1]
            h = h * mu.astype(h.dtype) + prev * (1 - mu).astype(h.dtype)
        a, aux, selection = attention_with_aux(make_attention(cfg, self.layer), cfg.attn, h,
                                               with_aux)
        if selection is not None:
            self.sow("intermediates", "selection", selection)
        x = x + a
        h = core.layer_norm("ln_mlp", dt, jnp.float32)(x)
        h = core.Linear(cfg.mlp_ratio * cfg.dim, use_bias=True, axes=("embed", "mlp"), dtype=dt,
                        name="fc")(h)
        h = core.Linear(cfg.dim, use_bias=True, axes=("mlp", "embed"), dtype=dt,
                        name="proj")(nn.gelu(h))
        return x + h, aux


class LM(nn.Module):
    """Decoder-only LM: tokens (B, T) -> float32 logits (B, T, vocab) and the mean index aux loss."""

    cfg: Config

    @nn.compact
    def __call__(self, tokens_BT: Array, with_aux: bool = False) -> tuple[Array, Array]:
        cfg, dt = self.cfg, _dtype(self.cfg)
        t = tokens_BT.shape[1]
        if t > cfg.seq_len:
            raise ValueError(f"sequence of length {t} is longer than seq_len={cfg.seq_len}")
        init = nn.initializers.normal(0.02)
        embed = nn.Embed(cfg.vocab, cfg.dim, dtype=dt, name="embed",
                         embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")))
        pos = self.param("pos_embed", nn.with_logical_partitioning(init, (None, "embed")),
                         (cfg.seq_len, cfg.dim))
        x = embed(tokens_BT) + pos[:t].astype(dt)
        aux = jnp.zeros((), jnp.float32)
        for i in range(cfg.depth):
            x, a = Block(cfg, i, name=f"block_{i}")(x, with_aux)
            aux = aux + a
        x = core.layer_norm("ln_out", dt, jnp.float32)(x)
        if cfg.tied_head:
            logits = embed.attend(x)
        else:
            logits = core.Linear(cfg.vocab, axes=("embed", "vocab"), dtype=dt, name="head")(x)
        return logits.astype(jnp.float32), aux / cfg.depth


# ----------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------- mesh and sharding


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
    """``"data=4,model=2"`` -> {"data": 4, "model": 2}; missing axes are 1, no spec is all-data.

    Raises ``ValueError`` naming the values for an unknown axis, a malformed or repeated entry, a
    size below 1, or sizes whose product is not ``num_devices``.
    """
    if not spec:
        return {"data": num_devices, "model": 1}
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {spec!r}: entry {item!r} is not AXIS=SIZE "
                             f"(for example data=4,model=2)")
        name = name.strip()
        if name not in MESH_AXES:
            raise ValueError(f"--mesh {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"--mesh {spec!r}: axis {name!r} is given twice")
        sizes[name] = int(value)
        if sizes[name] < 1:
            raise ValueError(f"--mesh {spec!r}: axis {name}={sizes[name]} must be >= 1")
    sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
    prod = math.prod(sizes.values())
    if prod != num_devices:
        raise ValueError(f"--mesh {spec!r}: axis sizes {sizes} multiply to {prod}, but there are "
                         f"{num_devices} devices")
    return sizes


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over ``devices`` (default: all), both axes in automatic mode."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(shape)} devices, got {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def param_partition_specs(boxed: PyTree, mesh_shape: dict[str, int], rules=RULES
                          ) -> tuple[PyTree, list[str]]:
    """Mesh ``PartitionSpec`` per parameter from the logical axes it was declared with, and the
    parameters that had a dimension replicated because the mesh axis size does not divide it."""
    logical = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    fallback: list[str] = []

    def one(path, spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec else P()
        axes = list(mesh_spec) + [None] * (len(leaf.shape) - len(mesh_spec))
        for i, ax in enumerate(axes):
            if ax is not None and leaf.shape[i] % mesh_shape[ax]:
                axes[i] = None
                fallback.append(f"{jax.tree_util.keystr(path)} dim {i} ({leaf.shape[i]} % {ax}="
                                f"{mesh_shape[ax]})")
        return P(*axes)

    specs = jax.tree_util.tree_map_with_path(one, logical, shapes,
                                             is_leaf=lambda s: isinstance(s, P))
    return specs, fallback


def param_shardings(boxed: PyTree, mesh: Mesh, rules=RULES) -> tuple[PyTree, list[str]]:
    """``param_partition_specs`` as ``NamedSharding``s on ``mesh``."""
    specs, fallback = param_partition_specs(boxed, dict(mesh.shape), rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda s: isinstance(s, P)), fallback


def _dict_path(path) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state: PyTree, params_sh: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for the whole train state: optimiser moments follow their parameter (matched by
    the parameter's dict path and shape), everything else (counters, step) is replicated."""
    by_path = {_dict_path(p): s for p, s in jax.tree_util.tree_leaves_with_path(params_sh)}
    shapes = {_dict_path(p): x.shape
              for p, x in jax.tree_util.tree_leaves_with_path(abstract_state["params"])}
    rep = NamedSharding(mesh, P())

    def one(path, leaf):
        key = _dict_path(path)[1:]  # drop "params" / "opt_state"
        return by_path[key] if key in by_path and shapes[key] == leaf.shape else rep

    return jax.tree_util.tree_map_with_path(one, abstract_state)


# ----------------------------------------------------------------------------- optimisation


def schedule(cfg: Config) -> optax.Schedule:
    decay = max(cfg.steps, cfg.warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, decay,
                                              end_value=cfg.lr * cfg.end_lr_ratio)


def optimizer(cfg: Config) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; no weight decay on vectors (norms, biases, lambdas)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip),
        optax.adamw(schedule(cfg), b1=0.9, b2=0.95, weight_decay=cfg.weight_decay,
                    mask=decay_mask))


def loss_fn(model: LM, cfg: Config, params: PyTree, batch: Batch, with_aux: bool):
    """(task loss + aux_weight * index aux loss, metrics). Task loss: weighted next-token CE."""
    logits, aux = model.apply({"params": params}, batch["tokens"], with_aux=with_aux)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    denom = jnp.maximum(w.sum(), 1.0)
    task = (ce * w).sum() / denom
    correct = ((jnp.argmax(logits, -1) == batch["targets"]) * w).sum()
    return task + cfg.aux_weight * aux, {"loss": task, "aux": aux, "acc": correct / denom}


def make_train_step(model: LM, cfg: Config, tx: optax.GradientTransformation):
    """The un-jitted train step ``(state, batch) -> (state, metrics)``."""
    with_aux = cfg.aux_weight > 0 and cfg.attn in WITH_AUX_LOSS
    lr = schedule(cfg)

    def step(state, batch):
        grad_fn = jax.value_and_grad(lambda p: loss_fn(model, cfg, p, batch, with_aux),
                                     has_aux=True)
        (_, metrics), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=lr(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


def make_eval_step(model: LM, cfg: Config):
    def evaluate(params, batch):
        logits, _ = model.apply({"params": params}, batch["tokens"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        w = batch["weights"]
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * w
        return {"loss_sum": (ce * w).sum(), "correct": correct.sum(), "count": w.sum()}

    return evaluate


@dataclasses.dataclass
class Trainer:
    """Model, optimiser, mesh, shardings and the jitted functions of one configuration."""

    cfg: Config
    mesh: Mesh
    model: LM
    tx: optax.GradientTransformation
    state_sharding: PyTree
    batch_sharding: NamedSharding
    init_state: Callable[[], PyTree]
    train_step: Callable[[PyTree, Batch], tuple[PyTree, dict]]
    eval_step: Callable[[PyTree, Batch], dict]
    recall_batch: Callable[[Array], Batch]
    replicated_params: list[str]

    @classmethod
    def build(cls, cfg: Config, mesh: Mesh) -> Trainer:
        """The trainer for ``cfg`` on ``mesh``; configurations that differ only in bookkeeping
        (checkpoints, metrics file, eval cadence, progress) share one compiled trainer."""
        cfg.validate()
        return _build_trainer(dataclasses.replace(cfg, **BOOKKEEPING), mesh)

    @classmethod
    def _build(cls, cfg: Config, mesh: Mesh) -> Trainer:
        data_size = mesh.shape["data"]
        if cfg.batch_size % data_size:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the mesh's "
                             f"data={data_size}")
        model, tx = LM(cfg), optimizer(cfg)
        dummy = jnp.zeros((1, cfg.seq_len), jnp.int32)
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy)["params"])
        params_sh, fallback = param_shardings(boxed, mesh)

        def init_fn():
            params = nn.meta.unbox(model.init(jax.random.key(cfg.seed), dummy)["params"])
            return {"step": jnp.zeros((), jnp.int32), "params": params,
                    "opt_state": tx.init(params)}

        state_sh = state_shardings(jax.eval_shape(init_fn), params_sh, mesh)
        batch_sh = NamedSharding(mesh, P("data"))
        rep = NamedSharding(mesh, P())
        init_state = jax.jit(init_fn, out_shardings=state_sh)
        train_step = jax.jit(make_train_step(model, cfg, tx), in_shardings=(state_sh, batch_sh),
                             out_shardings=(state_sh, rep), donate_argnums=0)
        eval_step = jax.jit(make_eval_step(model, cfg),
                            in_shardings=(state_sh["params"], batch_sh), out_shardings=rep)
        recall = jax.jit(lambda key: recall_batch(key, cfg, cfg.batch_size), out_shardings=batch_sh)
        return cls(cfg, mesh, model, tx, state_sh, batch_sh, init_state, train_step, eval_step,
                   recall, fallback)

    def evaluate(self, params: PyTree, batches: list[Batch]) -> dict[str, float]:
        tot = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        for b in batches:
            for k, v in jax.device_get(self.eval_step(params, b)).items():
                tot[k] += float(v)
        n = max(tot["count"], 1.0)
        return {"loss": tot["loss_sum"] / n, "acc": tot["correct"] / n}


BOOKKEEPING = dict(eval_every=1, eval_batches=1, ckpt_dir=None, ckpt_every=1, mesh=None,
                   metrics_out=None, progress=False)


@functools.lru_cache(maxsize=16)
def _build_trainer(cfg: Config, mesh: Mesh) -> Trainer:
    return Trainer._build(cfg, mesh)


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """orbax CheckpointManager for the train state (sharded arrays) plus a JSON of metrics."""

    def __init__(self, directory: str | Path, every: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=2,
                                               create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, meta: dict, force: bool = False) -> bool:
        ocp = self.ocp
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=self.ocp.args.Composite(
            meta=self.ocp.args.JsonRestore()))["meta"]

    def restore_state(self, step: int, abstract_state: PyTree) -> PyTree:
        """The train state, each array restored straight into its sharding in ``abstract_state``."""
        return self.manager.restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract_state)))["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(state_sharding: PyTree, shapes: PyTree) -> PyTree:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, state_sharding)


def _check_resumable(cfg: Config, saved: dict) -> None:
    diff = {f: (saved.get(f), getattr(cfg, f)) for f in Config.MODEL_FIELDS
            if saved.get(f) != getattr(cfg, f)}
    if diff:
        named = ", ".join(f"{f}: checkpoint {a!r} vs now {b!r}" for f, (a, b) in diff.items())
        raise ValueError(f"--ckpt-dir holds a run with a different configuration ({named})")


# ----------------------------------------------------------------------------- progress


class Progress:
    """One carriage-return status line on a terminal; a line every 10% elsewhere."""

    def __init__(self, total: int, label: str, enabled: bool, stream=sys.stderr):
        self.total, self.label, self.enabled, self.stream = total, label, enabled, stream
        self.tty = stream.isatty()
        self.last_pct = -1

    def update(self, step: int, loss: float, acc: float, tok_s: float) -> None:
        if not self.enabled:
            return
        frac = step / max(self.total, 1)
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        line = (f"{self.label} [{bar}] {step}/{self.total} loss {loss:.4f} acc {acc:.3f} "
                f"{tok_s:,.0f} tok/s")
        if self.tty:
            self.stream.write("\r" + line)
        elif int(10 * frac) != self.last_pct or step == self.total:
            self.last_pct = int(10 * frac)
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- the run


def kv_cache_bytes_per_token(cfg: Config, bytes_per_value: int = 2) -> float:
    """Bytes a decoder caches per generated token, summed over layers (bf16 by default).

    Compressed mechanisms count their amortised cost at long context: one entry per
    ``compression_rate`` tokens (their raw window is a constant ``window`` tokens, not counted).
    Index keys that a selector caches (MSA, DSA, CSA) are included.
    """
    d, n = cfg.dim, cfg.heads
    h = d // n
    per_layer = {
        "standard": 2 * d, "bigbird": 2 * d, "delta": 2 * d, "differential": 2 * d,
        "gqa": 2 * cfg.kv_heads * h,
        "mqa": 2 * h,
        "mla": d // 4 + h // 2,  # the latent (kv_lora_rank) and the shared RoPE key
        "minimax_sparse": 2 * cfg.kv_heads * h + cfg.index_dim,
        "deepseek_sparse": 2 * d + cfg.index_dim,
        "heavily_compressed": h / cfg.compression_rate,
        "compressed_sparse": (h + cfg.index_dim) / cfg.compression_rate,
    }[cfg.attn]
    return per_layer * cfg.depth * bytes_per_value


PATTERNED = ("bigbird", "minimax_sparse", "deepseek_sparse", "compressed_sparse",
             "heavily_compressed", "delta")


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
    elif cfg.attn == "minimax_sparse":
        out[selection[0] & causal] = 1.0  # kv group 0
    elif cfg.attn == "deepseek_sparse":
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
    return jax.jit(lambda p, t: model.apply({"params": p}, t, with_aux=True,
                                            mutable=["intermediates"]))


def last_layer_selection(result: dict, tokens_BT: Array) -> np.ndarray | None:
    """The last layer's selection for ``tokens`` (None when the mechanism has no selector)."""
    cfg, trainer = result["cfg"], result["trainer"]
    if cfg.attn not in WITH_AUX_LOSS:
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


def train(cfg: Config, mesh: Mesh | None = None, log: Callable[[str], None] = print,
          stop_after: int | None = None) -> dict:
    """Run ``cfg`` and return the metrics dict (also written to ``cfg.metrics_out``).

    ``stop_after``: leave after this many steps of this call (saving a checkpoint there), as a
    preempted job would; a later call with the same ``ckpt_dir`` goes on from that step.
    """
    cfg.validate()
    if mesh is None:
        mesh = make_mesh(parse_mesh(cfg.mesh, jax.device_count()))
    trainer = Trainer.build(cfg, mesh)
    data = Data(cfg, trainer)
    eval_set = data.eval_batches()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    log(f"attn={cfg.attn} mesh={dict(mesh.shape)} devices={mesh.size} "
        f"({jax.devices()[0].platform}) vocab={cfg.vocab} "
        f"kv-cache {kv_cache_bytes_per_token(cfg):.1f} B/token (bf16)")
    if trainer.replicated_params:
        log("replicated (mesh axis does not divide): " + "; ".join(trainer.replicated_params))

    ckpt = Checkpoints(cfg.ckpt_dir, cfg.ckpt_every) if cfg.ckpt_dir else None
    meta: dict[str, Any] = {"config": dataclasses.asdict(cfg), "history": [], "evals": []}
    latest = ckpt.latest_step() if ckpt else None
    if latest is not None:
        saved = ckpt.restore_meta(latest)
        _check_resumable(cfg, saved["config"])  # before touching arrays of another shape
        abstract = _abstract(trainer.state_sharding, jax.eval_shape(trainer.init_state))
        state = ckpt.restore_state(latest, abstract)
        meta = dict(saved, config=dataclasses.asdict(cfg))
        log(f"resumed from {cfg.ckpt_dir} at step {latest}")
    else:
        state = trainer.init_state()
        n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        meta["num_params"] = int(n_params)
        first = trainer.evaluate(state["params"], eval_set)
        meta["evals"].append({"step": 0, **first})
        log(f"{n_params:,} parameters; step 0 eval loss {first['loss']:.4f} acc {first['acc']:.3f}")

    start = int(jax.device_get(state["step"]))
    bar = Progress(cfg.steps, cfg.attn, cfg.progress)
    timed_tokens, timed_seconds = 0, 0.0
    stop = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for step in range(start, stop):
        batch = data.train_batch(step)
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.perf_counter() - t0
        if step > start:  # the first step of a process includes compilation
            timed_tokens += tokens_per_step
            timed_seconds += dt
        meta["history"].append({"step": step, **metrics})
        done = step + 1
        bar.update(done, metrics["loss"], metrics["acc"],
                   timed_tokens / timed_seconds if timed_seconds else 0.0)
        if done % cfg.eval_every == 0 or done == stop:
            ev = trainer.evaluate(state["params"], eval_set)
            meta["evals"].append({"step": done, **ev})
            (bar.note if cfg.progress else log)(
                f"step {done}: eval loss {ev['loss']:.4f} acc {ev['acc']:.3f}")
        if ckpt is not None:
            ckpt.save(done, state, _json_meta(meta), force=done == stop)
    bar.close()
    if ckpt is not None:
        ckpt.close()

    evals = meta["evals"]
    final = evals[-1]
    result = {
        "attn": cfg.attn,
        "task": "text" if cfg.text else "mqar",
        "initial_loss": evals[0]["loss"],
        "final_loss": final["loss"],
        "initial_acc": evals[0]["acc"],
        "final_acc": final["acc"],
        "chance_acc": None if cfg.text else 1.0 / cfg.num_values,
        "steps": cfg.steps,
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "tokens_per_sec": timed_tokens / timed_seconds if timed_seconds else None,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "num_params": meta.get("num_params"),
        "train_loss": [h["loss"] for h in meta["history"]],
        "evals": evals,
        "config": dataclasses.asdict(cfg),
    }
    if cfg.steps > start or latest is None:
        log(f"eval loss {result['initial_loss']:.4f} -> {result['final_loss']:.4f}, "
            f"accuracy {result['initial_acc']:.3f} -> {result['final_acc']:.3f}"
            + ("" if cfg.text else f" (chance {1.0 / cfg.num_values:.3f})"))
    result["state"] = state
    result["trainer"], result["cfg"] = trainer, cfg
    if cfg.metrics_out:
        Path(cfg.metrics_out).write_text(json.dumps(_json_meta(
            {k: v for k, v in result.items() if k not in ("state", "trainer", "cfg")}), indent=1))
    return result


def _json_meta(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=float))


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


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--attn", default=d.attn, help=f"one of: {', '.join(MECHANISMS)}")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=int, default=d.dim)
    g.add_argument("--depth", type=int, default=d.depth)
    g.add_argument("--heads", type=int, default=d.heads)
    g.add_argument("--kv-heads", type=int, default=d.kv_heads, help="gqa kv heads, msa groups")
    g.add_argument("--mlp-ratio", type=int, default=d.mlp_ratio)
    g.add_argument("--untied-head", action="store_true", help="separate output projection")
    g.add_argument("--no-token-shift", action="store_true",
                   help="feed attention LN(x) alone, not mixed with the previous position's")
    g.add_argument("--dtype", default=d.dtype, help="compute dtype (float32, bfloat16, float16)")
    g.add_argument("--block-size", type=int, default=d.block_size, help="bigbird, minimax_sparse")
    g.add_argument("--top-k", type=int, default=None,
                   help="blocks (minimax_sparse), tokens (deepseek_sparse) or entries "
                        "(compressed_sparse); default: a quarter of the context")
    g.add_argument("--window", type=int, default=d.window,
                   help="delta, heavily_compressed, compressed_sparse")
    g.add_argument("--compression-rate", type=int, default=d.compression_rate)
    g.add_argument("--index-dim", type=int, default=d.index_dim)
    g.add_argument("--impl", default=d.impl,
                   help="sparse core for the modules with an impl field (auto, reference, xla, "
                        "pallas); auto: pallas on GPU/TPU, the module's CPU default elsewhere")
    g = p.add_argument_group("data")
    g.add_argument("--seq-len", type=int, default=d.seq_len)
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

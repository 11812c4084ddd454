"""The run configuration: one frozen dataclass, one field per command-line flag."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attnhut_jax import registry

MECHANISMS = ("standard", "gqa", "mqa", "mla", "differential", "delta", "bigbird",
              "minimax_sparse", "deepseek_sparse", "heavily_compressed", "compressed_sparse",
              "gated_deltanet", "kimi_delta", "linear", "strided_sparse", "fixed_sparse",
              "sinkhorn", "spark")
WITH_AUX_LOSS = ("minimax_sparse", "deepseek_sparse", "compressed_sparse")
# The mechanisms with a sparse core that ``impl`` picks (auto | reference | xla | pallas); the
# dense ones keep their own impl default (their impls are another set).
WITH_SPARSE_CORE = ("bigbird", "delta", "minimax_sparse", "deepseek_sparse", "heavily_compressed",
                    "compressed_sparse", "strided_sparse", "fixed_sparse")
# The linear-attention family: a recurrent state in place of a KV cache, the gated delta rule's
# ``impl`` (auto | chunk | recurrent | pallas), packed rows through ``segment_ids`` alone (no
# positions: nothing to rotate; the state resets at each document start, at any offset).
WITH_LINEAR_CORE = ("gated_deltanet", "kimi_delta", "linear")
# Mechanisms that take no ``positions``: the linear family, and those that derive each token's
# position in its document from ``segment_ids`` (a new id starts a document at position 0).
NO_POSITIONS = WITH_LINEAR_CORE + ("strided_sparse", "fixed_sparse", "sinkhorn")
# ``--index-loss``: ``auto`` is attnhut's definition of each selector's loss (MiniMax: over the
# selected blocks; DeepSeek and CSA: against the dense main attention), computed inside the module
# in memory linear in T; ``sparse`` / ``dense`` pick the support explicitly (MiniMax has no dense
# loss).
INDEX_LOSSES = ("auto", "sparse", "dense")
DEFAULT_INDEX_LOSS = {"minimax_sparse": "sparse", "deepseek_sparse": "dense",
                      "compressed_sparse": "dense"}
# Mechanisms that cannot take packed rows (see the README: BigBird's random blocks depend on the
# whole row).
NO_PACKING = ("bigbird",)
# DeltaAttention's anchor stride as make_attention builds it (the module default).
DELTA_STRIDE = 16


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on (one field per command-line flag). ``top_k=None`` takes a
    per-mechanism default (``resolved_top_k``)."""

    attn: str = "standard"
    # model
    dim: int = 64
    depth: int = 2
    heads: int = 4
    kv_heads: int = 2          # gqa; kv groups of minimax_sparse; query/key heads of gated_deltanet
    mlp_ratio: int = 4
    tied_head: bool = True
    token_shift: bool = True   # mix each position's attention input with its predecessor's
    dtype: str = "float32"     # compute dtype; parameters stay float32
    # mechanism knobs (sparse / windowed / compressed mechanisms)
    block_size: int = 16       # bigbird, minimax_sparse, sinkhorn, fixed_sparse; stride of strided_sparse
    top_k: int | None = None   # minimax_sparse: blocks, deepseek_sparse, spark: tokens, csa: entries
    window: int = 32           # delta, heavily_compressed, compressed_sparse
    compression_rate: int = 4  # heavily_compressed, compressed_sparse
    index_dim: int = 16        # width of the index / lightning-indexer heads; spark's predictor slice
    impl: str = "auto"         # sparse core of WITH_SPARSE_CORE: auto|reference|xla|pallas;
                               # gated delta rule of WITH_LINEAR_CORE: auto|chunk|recurrent|pallas
                               # (each mechanism takes the impl if it is one of its own)
    # task
    seq_len: int = 128
    pack: bool = False         # rows of variable-length documents: segment ids, restarting positions
    doc_len: int | None = None  # mean document length when packing (default seq_len // 4)
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
    index_loss: str = "auto"   # selectors' loss: auto | sparse | dense (INDEX_LOSSES)
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
                    "index_dim", "seq_len", "pack", "doc_len", "num_pairs", "num_queries",
                    "num_keys", "num_values", "text", "batch_size", "steps", "lr", "warmup", "end_lr_ratio",
                    "weight_decay", "clip", "aux_weight", "index_loss", "seed")

    def validate(self) -> None:
        if self.attn not in MECHANISMS:
            raise ValueError(f"--attn {self.attn!r} is not a mechanism; choose one of "
                             f"{', '.join(MECHANISMS)}")
        impls = tuple(dict.fromkeys(registry.SPARSE_IMPLS + registry.LINEAR_IMPLS))
        if self.impl not in impls:
            raise ValueError(f"--impl {self.impl!r} must be one of {impls}")
        if self.index_loss not in INDEX_LOSSES:
            raise ValueError(f"--index-loss {self.index_loss!r} must be one of {INDEX_LOSSES}")
        if self.attn == "minimax_sparse" and self.index_loss == "dense":
            raise ValueError("--index-loss dense: MiniMax's index loss is defined over the selected "
                             "blocks only; use sparse (or auto)")
        if self.pack and self.attn in NO_PACKING:
            raise ValueError(f"--pack: {self.attn} cannot take packed rows (its random blocks are "
                             f"drawn over the whole row, so a packed row cannot equal its "
                             f"documents run alone)")
        if self.doc_len is not None and self.doc_len < 1:
            raise ValueError(f"--doc-len {self.doc_len} must be >= 1")
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
        if self.pack and self.min_doc_len > self.seq_len:
            raise ValueError(f"--pack: a document needs at least {self.min_doc_len} tokens, longer "
                             f"than seq_len={self.seq_len}")
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
        """``top_k`` in the unit of the mechanism, defaulting to about a quarter of the context
        up to a cap (16 blocks, 256 tokens, 64 entries): long contexts keep a sparse budget."""
        if self.top_k is not None:
            return self.top_k
        t = self.seq_len
        return {"minimax_sparse": max(1, min(16, t // self.block_size // 4)),
                "deepseek_sparse": max(1, min(256, t // 4)),
                "spark": max(1, min(256, t // 4)),
                "compressed_sparse": max(1, min(64, t // self.compression_rate // 4))
                }.get(self.attn, 0)

    def resolved_index_loss(self) -> str:
        """``index_loss`` with ``auto`` resolved for this mechanism (attnhut's loss)."""
        if self.index_loss != "auto":
            return self.index_loss
        return DEFAULT_INDEX_LOSS.get(self.attn, "sparse")

    @property
    def pack_align(self) -> int:
        """Packed documents start at multiples of this: the mechanism's block size, compression
        rate or anchor stride, where a packed row then equals its documents run alone."""
        return {"minimax_sparse": self.block_size, "heavily_compressed": self.compression_rate,
                "compressed_sparse": self.compression_rate, "delta": DELTA_STRIDE,
                "sinkhorn": self.block_size}.get(self.attn, 1)

    @property
    def min_doc_len(self) -> int:
        """The shortest document packing makes: room for the recall pairs and queries (text: 2)."""
        return 2 if self.text is not None else 2 * (self.num_pairs + self.num_queries)

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a numpy dtype (the compute dtype; parameters stay float32)."""
        return jnp.dtype(self.dtype)

    @property
    def vocab(self) -> int:
        if self.text is not None:
            return 256
        return _round_up(1 + self.num_keys + self.num_values, 8)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m

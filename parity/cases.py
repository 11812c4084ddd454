"""The configurations ``python -m parity`` reports and the test-suite checks (tests add more)."""

from __future__ import annotations

import attnhut
import jax.numpy as jnp
import numpy as np
import torch

from .compare import Case


def bool_mask(b: int, t: int) -> np.ndarray:
    """Random (B, 1, T, T) keep-mask whose first query row sees no key at all."""
    m = np.random.default_rng(b * 1000 + t).random((b, 1, t, t)) < 0.6
    m[:, :, 0, :] = False
    return m


def additive_mask(b: int, t: int) -> np.ndarray:
    """(T, T) additive mask: a causal -inf pattern plus a finite distance penalty."""
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    return np.where(j <= i, -0.1 * (i - j), -np.inf).astype(np.float32)


def _c(name, config, make, shape=(2, 9, 32), **kw) -> Case:
    return Case(name, config, make, shape, **kw)


def compressed_selection(top_k: int, rate: int):
    """``Case.selection`` for CompressedSparseAttention: (index_scores, selected, k, valid).

    Reads the ``(out, aux)`` pair of either side; ``k = min(top_k, C)`` and ``valid`` (T, C) marks
    the compressed entries a query may select (``(c + 1) * rate <= t``).
    """

    def sel(full):
        aux = full[1]
        scores, selected = (np.asarray(a.detach() if hasattr(a, "detach") else a)
                            for a in (aux["index_scores"], aux["selected"]))
        t, c = scores.shape[-2:]
        valid = (np.arange(c)[None, :] + 1) * rate <= np.arange(t)[:, None]
        return scores, selected, min(top_k, c), valid

    return sel


def dsa_selection(top_k: int, causal: bool):
    """``Case.selection`` for DeepSeekSparseAttention: (index_scores, selected, k, valid)."""

    def sel(full):
        aux = full[1]
        scores, selected = (np.asarray(a.detach() if hasattr(a, "detach") else a)
                            for a in (aux["index_scores"], aux["selected"]))
        t = scores.shape[-1]
        valid = np.tril(np.ones((t, t), bool)) if causal else np.ones((t, t), bool)
        return scores, selected, min(top_k, t), valid

    return sel


def dsa_case(config: str, make, shape, top_k: int, causal: bool, **kw) -> Case:
    """A DeepSeekSparseAttention case: ``(out, aux)`` output, selections compared modulo ties."""
    return Case("DeepSeekSparseAttention", config, make, shape,
                output=lambda o: o[0] if isinstance(o, tuple) else o,
                selection=dsa_selection(top_k, causal), **kw)


def csa_case(config: str, make, shape, top_k: int, rate: int, **kw) -> Case:
    """A CompressedSparseAttention case: ``(out, aux)`` output, selections compared modulo ties."""
    return Case("CompressedSparseAttention", config, make, shape,
                output=lambda o: o[0] if isinstance(o, tuple) else o,
                selection=compressed_selection(top_k, rate), **kw)


def cjepa_case(config, make, shape, mask_slots) -> Case:
    """A CausalJEPAAttention row: fixed hidden objects for both sides, the prediction compared."""
    ms = np.asarray(mask_slots, np.int64)

    def call(rng, tm):
        return {"mask_slots": torch.from_numpy(ms)}, {"mask_slots": jnp.asarray(ms, jnp.int32)}

    return Case("CausalJEPAAttention", config, make, shape, call=call, output=lambda o: o[0])


CASES: list[Case] = [
    _c("StandardAttention", "d32 h4 causal bias",
       lambda: attnhut.StandardAttention(32, 4, causal=True, bias=True)),
    _c("StandardAttention", "d32 h4 bool mask", lambda: attnhut.StandardAttention(32, 4),
       mask=bool_mask),
    _c("MultiQueryAttention", "d32 h4 causal", lambda: attnhut.MultiQueryAttention(32, 4, True)),
    _c("MultiQueryAttention", "d32 h4 additive mask",
       lambda: attnhut.MultiQueryAttention(32, 4, bias=True), mask=additive_mask),
    _c("GroupedQueryAttention", "d64 h8 kv2 causal",
       lambda: attnhut.GroupedQueryAttention(64, 8, 2, causal=True), shape=(2, 17, 64)),
    _c("GroupedQueryAttention", "d64 h8 kv4 bias",
       lambda: attnhut.GroupedQueryAttention(64, 8, 4, bias=True), shape=(2, 17, 64)),
    _c("MultiHeadLatentAttention", "d64 h4 defaults",
       lambda: attnhut.MultiHeadLatentAttention(64, 4), shape=(2, 13, 64)),
    _c("MultiHeadLatentAttention", "d64 h4 ranks 24/12 nope8 rope4 v12 bidir",
       lambda: attnhut.MultiHeadLatentAttention(64, 4, 24, 12, 8, 4, 12, causal=False, bias=True),
       shape=(2, 13, 64)),
    _c("DifferentialAttention", "d64 h2 depth3 causal",
       lambda: attnhut.DifferentialAttention(64, 2, depth=3), shape=(2, 11, 64)),
    _c("DifferentialAttention", "d64 h4 bidir bias",
       lambda: attnhut.DifferentialAttention(64, 4, causal=False, bias=True), shape=(2, 11, 64)),
    _c("SlotAttention", "d32 slots4 iters3", lambda: attnhut.SlotAttention(32, 4),
       shape=(2, 15, 32), noise=True),
    _c("BigBirdAttention", "d32 h4 bs4 win3 rand2 glob1 T=37",
       lambda: attnhut.BigBirdAttention(32, 4, 4, 3, 2, 1, seed=7), shape=(2, 37, 32)),
    _c("BigBirdAttention", "d32 h4 bs2 win3 rand1 glob1 causal",
       lambda: attnhut.BigBirdAttention(32, 4, 2, 3, 1, 1, causal=True, bias=True),
       shape=(2, 21, 32)),
    _c("DeltaAttention", "d32 h4 window4 sink1 stride3",
       lambda: attnhut.DeltaAttention(32, 4, 4, 1, 3), shape=(2, 17, 32)),
    dsa_case("d32 h4 top3 idx3x8 causal",
             lambda: attnhut.DeepSeekSparseAttention(32, 4, 3, 3, 8), (2, 13, 32), 3, True),
    dsa_case("d32 h4 top5 idx2x8 bidir bias",
             lambda: attnhut.DeepSeekSparseAttention(32, 4, 5, 2, 8, causal=False, bias=True),
             (2, 11, 32), 5, False),
    _c("MiniMaxSparseAttention", "d32 h4 K2 bs4 top2 T=13",
       lambda: attnhut.MiniMaxSparseAttention(32, 4, 2, block_size=4, top_k=2), shape=(2, 13, 32)),
    _c("MiniMaxSparseAttention", "d64 h4 K2 idx12 rope4 bs3 top2",
       lambda: attnhut.MiniMaxSparseAttention(64, 4, 2, 3, 2, index_dim=12, rope_dim=4),
       shape=(2, 11, 64)),
    _c("LightningIndexer", "d32 h3 d8 bias", lambda: attnhut.LightningIndexer(32, 3, 8, True),
       shape=(2, 6, 32)),
    _c("HeavilyCompressedAttention", "d32 h4 rate4 window5 bias",
       lambda: attnhut.HeavilyCompressedAttention(32, 4, 4, window=5, bias=True),
       shape=(2, 19, 32)),
    _c("HeavilyCompressedAttention", "d32 h4 rate3 kv12 q10 groups2 window4",
       lambda: attnhut.HeavilyCompressedAttention(32, 4, 3, 12, 10, 2, window=4),
       shape=(2, 14, 32)),
    csa_case("d32 h4 rate2 top3 idx2x8 window4",
             lambda: attnhut.CompressedSparseAttention(32, 4, 2, 3, num_index_heads=2,
                                                       index_dim=8, window=4),
             (2, 15, 32), top_k=3, rate=2),
    cjepa_case("d32 h4 S4 hist3 pred2 depth2 mask[1,3]",
               lambda: attnhut.CausalJEPAAttention(32, 4, 4, 3, pred_frames=2, depth=2),
               (2, 3, 4, 32), mask_slots=[1, 3]),
    cjepa_case("d32 h2 S3 hist2 depth1 mlp48 nobias mask[]",
               lambda: attnhut.CausalJEPAAttention(32, 2, 3, 2, num_masked_slots=0, depth=1,
                                                   mlp_dim=48, bias=False),
               (2, 2, 3, 32), mask_slots=[]),
]


SPEED_CASES: list[Case] = [
    Case("StandardAttention", "d256 h8 causal", lambda: attnhut.StandardAttention(256, 8, True),
         (2, 512, 256)),
    Case("MultiQueryAttention", "d256 h8 causal",
         lambda: attnhut.MultiQueryAttention(256, 8, True), (2, 512, 256)),
    Case("GroupedQueryAttention", "d256 h8 kv2 causal",
         lambda: attnhut.GroupedQueryAttention(256, 8, 2, True), (2, 512, 256)),
    Case("MultiHeadLatentAttention", "d256 h8 defaults",
         lambda: attnhut.MultiHeadLatentAttention(256, 8), (2, 512, 256)),
    Case("DifferentialAttention", "d256 h4 causal",
         lambda: attnhut.DifferentialAttention(256, 4), (2, 512, 256)),
    Case("SlotAttention", "d256 slots8 iters3", lambda: attnhut.SlotAttention(256, 8),
         (2, 512, 256), noise=True),
    Case("BigBirdAttention", "d256 h8 bs64 defaults", lambda: attnhut.BigBirdAttention(256, 8),
         (2, 512, 256)),
    Case("DeltaAttention", "d256 h8 win128 sink4 stride16",
         lambda: attnhut.DeltaAttention(256, 8, 128), (2, 512, 256)),
    Case("DeepSeekSparseAttention", "d256 h8 top64", lambda: attnhut.DeepSeekSparseAttention(256, 8),
         (2, 512, 256), output=lambda o: o),
    Case("MiniMaxSparseAttention", "d256 h8 K2 bs64 top4",
         lambda: attnhut.MiniMaxSparseAttention(256, 8, 2, 64, 4), (2, 512, 256)),
    Case("HeavilyCompressedAttention", "d256 h8 rate16 win64",
         lambda: attnhut.HeavilyCompressedAttention(256, 8), (2, 512, 256)),
    Case("CompressedSparseAttention", "d256 h8 rate4 top16 win64",
         lambda: attnhut.CompressedSparseAttention(256, 8), (2, 512, 256)),
    cjepa_case("d256 h8 S16 hist8 pred2 depth2",
               lambda: attnhut.CausalJEPAAttention(256, 8, 16, 8, 2, depth=2), (2, 8, 16, 256),
               mask_slots=[0, 5]),
]

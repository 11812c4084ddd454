"""The configurations ``python -m parity`` reports and the test-suite checks (tests add more)."""

from __future__ import annotations

import attnhut
import numpy as np

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
]

"""BigBird block-sparse attention (Zaheer et al., 2020), internal global tokens (ITC).

Each query block attends a few global blocks, a window of neighbouring blocks and a few random
blocks; global blocks also attend everything. The block pattern depends only on
(seed, number of blocks, causal, sizes): it is built on the host at trace time, so it is fixed
across calls and traces and costs nothing on device. The random draw reproduces attnhut's
``torch.randperm`` under ``torch.Generator().manual_seed(seed)`` exactly (torch shuffles with
32-bit Mersenne-Twister outputs; numpy's legacy ``RandomState`` yields the same stream), so a
converted module reads exactly the keys the torch module reads.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from . import cache, core, registry
from .core import Array, Dtype


def _torch_randperm_prefix(n: int, count: int, draws: np.ndarray) -> np.ndarray:
    """``torch.randperm(n, generator=g)[:count]`` given the generator's next n - 1 raw outputs."""
    perm = np.arange(n)
    for i in range(n - 1):
        z = int(draws[i]) % (n - i)
        perm[i], perm[i + z] = perm[i + z], perm[i]
    return perm[:count]


@functools.lru_cache(maxsize=256)
def bigbird_block_mask(num_blocks: int, num_window_blocks: int, num_random_blocks: int,
                       num_global_blocks: int, causal: bool, seed: int) -> np.ndarray:
    """(num_blocks, num_blocks) bool: True where a query block attends a key block.

    global rows and columns | the window (only its past half when causal) | per non-global
    query block, ``num_random_blocks`` random blocks drawn from outside the globals and the
    (full) window, and in the causal case only from blocks before the window.
    """
    m, half = num_blocks, num_window_blocks // 2
    glob = set(range(min(num_global_blocks, m)))
    mask = np.zeros((m, m), bool)
    for g in glob:
        mask[g, :] = True
        mask[:, g] = True
    hi = 0 if causal else half
    for j in range(m):
        lo_k, hi_k = max(0, j - half), min(m - 1, j + hi)
        mask[j, lo_k:hi_k + 1] = True
    # One generator stream for the whole pattern, consumed row by row exactly as attnhut does.
    rows = []
    for j in range(m):
        if j in glob:
            continue
        taken = glob | set(range(j - half, j + half + 1))
        cand = [k for k in range(m) if k not in taken and (not causal or k < j - half)]
        if cand:
            rows.append((j, cand))
    total = sum(len(c) - 1 for _, c in rows)
    draws = np.random.RandomState(seed & 0xFFFFFFFF).randint(0, 2**32, size=total, dtype=np.uint32)
    pos = 0
    for j, cand in rows:
        pick = _torch_randperm_prefix(len(cand), num_random_blocks, draws[pos:pos + len(cand) - 1])
        pos += len(cand) - 1
        mask[j, np.asarray(cand)[pick]] = True
    mask.setflags(write=False)
    return mask


_PACKING_REFUSED = (
    "its global blocks are the first blocks of the whole row and its random blocks are drawn over "
    "the whole row length, so a packed segment would read other blocks than it reads when run "
    "alone; run one sequence per row (key_padding_mask marks padding)")


_DECODE_REFUSED = {
    False: "with causal=False its outputs change as the sequence grows: the global blocks attend "
           "the whole row, the window reaches forward and the random blocks are drawn over all "
           "blocks of the row, so the block pattern depends on the total length",
    True: "not implemented for causal=True: the causal block pattern is the same for every prefix "
          "(random blocks drawn only from earlier blocks, row by row), so a decoder could cache K "
          "and V, but no decode step (global query blocks read every past key, the others their "
          "window, global and random blocks) is written; run the full causal forward",
}


class BigBirdAttention(nn.Module):
    """Global + sliding-window + random block-sparse attention.

    Args mirror ``attnhut.BigBirdAttention``: ``dim``, ``num_heads``, ``block_size`` (64),
    ``num_window_blocks`` (3, odd), ``num_random_blocks`` (3), ``num_global_blocks`` (2),
    ``causal`` (False), ``seed`` (0), ``bias``. Parameters: ``qkv``, ``proj``.
    ``impl`` picks the registry's ``block_sparse`` op (``auto``/``reference``/``xla``/``pallas``;
    changes no variable); ``precision`` reaches every matmul.

    ``decode=True`` raises ``ValueError``: bidirectional, the pattern and a
    prefix's outputs change as the sequence grows; causal, the pattern is the same for every
    prefix but no decode step is written.
    """

    dim: int
    num_heads: int
    block_size: int = 64
    num_window_blocks: int = 3
    num_random_blocks: int = 3
    num_global_blocks: int = 2
    causal: bool = False
    seed: int = 0
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    decode: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every head (global and random
        blocks reach any past key)."""
        return float(2 * self.dim * jnp.dtype(dtype).itemsize)

    def setup(self) -> None:
        owner = "BigBirdAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads,
                            block_size=self.block_size, num_window_blocks=self.num_window_blocks)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        if self.num_window_blocks % 2 == 0:
            raise ValueError(f"{owner}: num_window_blocks={self.num_window_blocks} must be odd")
        if self.num_random_blocks < 0 or self.num_global_blocks < 0:
            raise ValueError(f"{owner}: num_random_blocks={self.num_random_blocks} and "
                             f"num_global_blocks={self.num_global_blocks} must be >= 0")
        registry.check(owner, "block_sparse", self.impl)
        cache.refuse_decode(owner, self.decode, _DECODE_REFUSED[self.causal])
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        self.qkv = core.Linear(3 * self.dim, axes=("embed", "qkv"), **kw)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def block_mask(self, num_blocks: int) -> np.ndarray:
        """The (num_blocks, num_blocks) block pattern (a host constant)."""
        return bigbird_block_mask(num_blocks, self.num_window_blocks, self.num_random_blocks,
                                  self.num_global_blocks, self.causal, self.seed)

    def block_keep(self, t: int) -> np.ndarray:
        """(T, nb) bool: the key blocks each query token's block attends (a host constant)."""
        nb = -(-t // self.block_size)
        return self.block_mask(nb)[np.arange(t) // self.block_size]

    def __call__(self, x: Array, key_padding_mask: Array | None = None, *,
                 segment_ids: Array | None = None) -> Array:
        """(B, T, D) -> (B, T, D). ``key_padding_mask`` (B, T): True for real tokens.

        attnhut pads the sequence to a multiple of ``block_size`` and masks the padded keys;
        padded queries are discarded, so the result equals attending over the first T tokens
        with the pattern cut to (T, T), which is what is computed here.

        Packed sequences are refused: ``segment_ids`` other than None raises ``ValueError``. The
        global blocks are the row's first blocks and the random blocks are drawn over all blocks
        of the row, so a segment packed at an offset would read other global and random blocks
        than it reads alone; no mask can make a packed row equal its segments run alone.
        """
        core.reject_packing("BigBirdAttention", segment_ids, _PACKING_REFUSED)
        core.check_input(x, self.dim, "BigBirdAttention")
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        valid = None
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (b, t):
                raise ValueError(f"BigBirdAttention: key_padding_mask must have shape (batch, seq)="
                                 f"{(b, t)}, got {tuple(key_padding_mask.shape)}")
            valid = key_padding_mask.astype(bool)
        block_keep = jnp.broadcast_to(jnp.asarray(self.block_keep(t)),
                                      (b, self.num_heads, t, -(-t // self.block_size)))
        out = core.block_sparse_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                          block_keep, block_k=self.block_size, causal=self.causal,
                                          impl=self.impl, scale=self.head_dim ** -0.5,
                                          key_valid_BS=valid, precision=self.precision,
                                          owner="BigBirdAttention")
        return self.proj(out.reshape(b, t, self.dim))

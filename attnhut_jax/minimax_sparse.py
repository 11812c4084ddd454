"""MiniMax Sparse Attention (MiniMax, 2026), attnhut 0.5.0 semantics: top-k blocks on GQA.

A cheap index branch (one index query per kv group, one index key shared by all groups) scores
every token, max-pools the scores into key blocks, and keeps each query's ``top_k`` blocks per
group; the group's query heads attend only there. The index branch reads a stop-gradient of
``x`` and is trained only by ``msa_index_aux_loss``. Both branches get QK-RMSNorm and partial
RoPE on their first ``rope_dim`` channels. A query's own block is always kept
(``force_current_block``), so no softmax row is empty.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import core, registry
from .core import Array, Dtype


def _index_logits(qi_BTKE: Array, ki_BSE: Array, causal: bool, s_offset: int = 0,
                  precision: core.Precision = None) -> Array:
    """Index scores (B, K, T, S) of the queries against keys ``s_offset + [0, S)``, in float32
    (or the operands' dtype when wider), with the finite fill on keys after the query when
    causal."""
    t, e = qi_BTKE.shape[1], qi_BTKE.shape[-1]
    dtype = jnp.promote_types(qi_BTKE.dtype, jnp.float32)
    scores_BKTS = jnp.einsum("BTKE,BSE->BKTS", qi_BTKE.astype(dtype), ki_BSE.astype(dtype),
                             precision=precision) * e ** -0.5
    if causal:
        pos_S = s_offset + jnp.arange(ki_BSE.shape[1])
        scores_BKTS = jnp.where(pos_S[None, :] <= jnp.arange(t)[:, None], scores_BKTS,
                                core.mask_value(dtype))
    return scores_BKTS


def block_scores(qi_BTKE: Array, ki_BSE: Array, *, block_size: int, causal: bool,
                 tile: int = 512, precision: core.Precision = None) -> Array:
    """Max-pooled index scores (B, K, T, J), computed tile by tile.

    Never materialises the (T, S) token scores: queries go in tiles of ``tile`` tokens (whole
    key blocks, at most a quarter of the sequence) and each tile walks key chunks of the same
    size, so only (tile, tile) scores are alive and memory is O(T * J). When causal, a query
    tile visits only the chunks at or before it, which halves the work; the scores themselves
    are dense over the visible triangle, as the mechanism defines them.
    """
    b, t, kg, _ = qi_BTKE.shape
    s = ki_BSE.shape[1]
    nb = -(-s // block_size)
    cb = max(1, min(tile // block_size, nb // 4))  # key blocks per chunk; >= 4 chunks
    ck = cb * block_size  # keys per chunk = queries per tile
    nq, nk = -(-t // ck), -(-nb // cb)
    dtype = jnp.promote_types(qi_BTKE.dtype, jnp.float32)
    fill = core.mask_value(dtype)
    qi_BTKE = jnp.pad(qi_BTKE, ((0, 0), (0, nq * ck - t), (0, 0), (0, 0)))
    qi_tiles = qi_BTKE.reshape(b, nq, ck, kg, -1).swapaxes(0, 1)  # nq tiles of (B, ck, K, E)
    ki_BSE = jnp.pad(ki_BSE, ((0, 0), (0, nk * ck - s), (0, 0)))

    def query_tile(xs):
        i, qi_tile_BTKE = xs

        def chunk(jc, out_BKTJ):
            ki_chunk_BSE = jax.lax.dynamic_slice_in_dim(ki_BSE, jc * ck, ck, axis=1)
            s_BKTS = _index_logits(qi_tile_BTKE, ki_chunk_BSE, False, precision=precision)
            k_pos_S = jc * ck + jnp.arange(ck)
            ok_TS = (k_pos_S < s)[None, :]
            if causal:
                ok_TS = ok_TS & (k_pos_S[None, :] <= i * ck + jnp.arange(ck)[:, None])
            pooled_BKTJ = jnp.where(ok_TS, s_BKTS, fill).reshape(b, kg, ck, cb, block_size).max(-1)
            return jax.lax.dynamic_update_slice_in_dim(out_BKTJ, pooled_BKTJ, jc * cb, axis=3)

        init_BKTJ = jnp.full((b, kg, ck, nk * cb), fill, dtype)
        return jax.lax.fori_loop(0, jnp.minimum(i + 1, nk) if causal else nk, chunk, init_BKTJ)

    tiles = jax.lax.map(query_tile, (jnp.arange(nq), qi_tiles))  # (nq, B, K, ck, nk * cb)
    out_BKTJ = jnp.moveaxis(tiles, 0, 2).reshape(b, kg, nq * ck, nk * cb)
    return out_BKTJ[:, :, :t, :nb]


def select_blocks(block_scores_BKTJ: Array, *, t: int, block_size: int, top_k: int,
                  causal: bool, force_current_block: bool) -> Array:
    """(B, K, T, J) bool: each query's top-k blocks per group, minus blocks after the query,
    plus the query's own block when ``force_current_block``."""
    nb = block_scores_BKTJ.shape[-1]
    _, idx = jax.lax.top_k(block_scores_BKTJ, max(1, min(top_k, nb)))
    keep = jnp.put_along_axis(jnp.zeros(block_scores_BKTJ.shape, bool), idx, True, axis=-1,
                              inplace=False)
    pos = jnp.arange(t)[:, None]
    if causal:
        keep = keep & (jnp.arange(nb)[None, :] * block_size <= pos)
    if force_current_block:
        keep = keep | (jnp.minimum(pos // block_size, nb - 1) == jnp.arange(nb)[None, :])
    return keep


class MiniMaxSparseAttention(nn.Module):
    """Top-k block selection on a GQA backbone.

    Args mirror ``attnhut.MiniMaxSparseAttention`` 0.5.0: ``dim``, ``num_heads``,
    ``num_kv_groups`` (dividing num_heads), ``block_size`` (128), ``top_k`` (16), ``index_dim``
    (head_dim), ``rope_dim`` (min(head_dim, index_dim)), ``causal`` (True), ``use_rope`` (True),
    ``rope_theta``, ``force_current_block`` (True), ``bias``. Parameters: ``q``, ``k``, ``v``,
    ``idx_q``, ``idx_k``, ``q_norm``, ``k_norm``, ``idx_q_norm``, ``idx_k_norm``, ``proj``.

    Beyond attnhut's: ``impl`` (the registry's ``block_sparse`` op: ``auto``/``reference``/
    ``xla``/``pallas``; changes no variable), ``dtype``/``param_dtype``, ``precision`` (of every
    matmul), and ``selector_dtype`` (default float32): the dtype of the index branch (its
    projections, norms, RoPE and block scores), so that a ``dtype=jnp.bfloat16`` module keeps its
    block selection in float32. The block scores are ranked in float32 (or wider) always.
    """

    dim: int
    num_heads: int
    num_kv_groups: int
    block_size: int = 128
    top_k: int = 16
    index_dim: int | None = None
    rope_dim: int | None = None
    causal: bool = True
    use_rope: bool = True
    rope_theta: float = 10000.0
    force_current_block: bool = True
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    selector_dtype: Dtype = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def resolved_dims(self) -> tuple[int, int]:
        """(index_dim, rope_dim) with attnhut's defaults applied."""
        di = self.index_dim or self.head_dim
        return di, (self.rope_dim if self.rope_dim is not None else min(self.head_dim, di))

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``: K and V of every kv group, plus the index
        key shared by all groups."""
        index_dim, _ = self.resolved_dims()
        return float((2 * self.num_kv_groups * self.head_dim + index_dim) * jnp.dtype(dtype).itemsize)

    def setup(self) -> None:
        owner = "MiniMaxSparseAttention"
        core.check_positive(owner, dim=self.dim, num_heads=self.num_heads,
                            num_kv_groups=self.num_kv_groups, block_size=self.block_size,
                            top_k=self.top_k)
        core.check_divisible(owner, ("dim", self.dim), ("num_heads", self.num_heads))
        core.check_divisible(owner, ("num_heads", self.num_heads),
                             ("num_kv_groups", self.num_kv_groups))
        registry.check(owner, "block_sparse", self.impl)
        d, (di, rd) = self.head_dim, self.resolved_dims()
        if self.use_rope and (rd % 2 or rd < 2 or rd > d or rd > di):
            raise ValueError(f"{owner}: rope_dim={rd} must be even, >= 2 and <= head_dim={d} "
                             f"and <= index_dim={di}")
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision)
        kv = self.num_kv_groups * d
        self.q = core.Linear(self.dim, axes=("embed", "heads"), **kw)
        self.k = core.Linear(kv, axes=("embed", "kv_heads"), **kw)
        self.v = core.Linear(kv, axes=("embed", "kv_heads"), **kw)
        kw_index = dict(kw, dtype=self.selector_dtype)
        self.idx_q = core.Linear(self.num_kv_groups * di, axes=("embed", "kv_heads"), **kw_index)
        self.idx_k = core.Linear(di, axes=("embed", "index"), **kw_index)
        pd = self.param_dtype
        self.q_norm = core.ones_param(self, "q_norm", d, "head_dim", pd)
        self.k_norm = core.ones_param(self, "k_norm", d, "head_dim", pd)
        self.idx_q_norm = core.ones_param(self, "idx_q_norm", di, "index", pd)
        self.idx_k_norm = core.ones_param(self, "idx_k_norm", di, "index", pd)
        self.proj = core.Linear(self.dim, axes=("heads", "embed"), **kw)

    def __call__(self, x: Array, return_aux: bool = False):
        """(B, T, D) -> (B, T, D), or ``(out, aux)`` with ``return_aux=True``.

        aux: ``index_scores`` (B, K, T, T) float32 (or wider), ``attn_weights`` (B, N, T, T), ``keep``
        (B, K, T, T) bool: what ``msa_index_aux_loss`` takes.
        """
        core.check_input(x, self.dim, "MiniMaxSparseAttention")
        b, t, _ = x.shape
        kg, d = self.num_kv_groups, self.head_dim
        di, rd = self.resolved_dims()
        xd = jax.lax.stop_gradient(x)  # the index branch is trained only by the aux loss
        q_BTNH = core.rms_norm(self.q(x).reshape(b, t, self.num_heads, d), self.q_norm)
        k_BSKH = core.rms_norm(self.k(x).reshape(b, t, kg, d), self.k_norm)
        v_BSKV = self.v(x).reshape(b, t, kg, d)
        qi_BTKE = core.rms_norm(self.idx_q(xd).reshape(b, t, kg, di), self.idx_q_norm)
        ki_BT1E = core.rms_norm(self.idx_k(xd).reshape(b, t, 1, di), self.idx_k_norm)
        if self.use_rope:
            cos, sin = core.rope_tables(jnp.arange(t), rd, self.rope_theta, q_BTNH.dtype)
            q_BTNH, k_BSKH = (core.apply_rope(a, cos, sin) for a in (q_BTNH, k_BSKH))
            cos, sin = core.rope_tables(jnp.arange(t), rd, self.rope_theta, qi_BTKE.dtype)
            qi_BTKE, ki_BT1E = (core.apply_rope(a, cos, sin) for a in (qi_BTKE, ki_BT1E))

        sel = dict(t=t, block_size=self.block_size, top_k=self.top_k, causal=self.causal,
                   force_current_block=self.force_current_block)
        if not return_aux:
            # default path: block scores from a scan over key blocks, then the block-sparse core;
            # no (T, T) array is built.
            scores_BKTJ = block_scores(qi_BTKE, ki_BT1E[:, :, 0], block_size=self.block_size,
                                       causal=self.causal, precision=self.precision)
            block_keep_BKTJ = select_blocks(scores_BKTJ, **sel)
            out = core.block_sparse_attention(q_BTNH, k_BSKH, v_BSKV, block_keep_BKTJ,
                                              block_k=self.block_size, causal=self.causal,
                                              impl=self.impl, scale=d ** -0.5,
                                              precision=self.precision,
                                              owner="MiniMaxSparseAttention")
            return self.proj(out.reshape(b, t, self.dim))

        # aux path: the aux loss needs token-level scores and weights, so they are materialised
        index_scores = _index_logits(qi_BTKE, ki_BT1E[:, :, 0], self.causal,
                                     precision=self.precision)
        nb = -(-t // self.block_size)
        padded = jnp.pad(index_scores, ((0, 0), (0, 0), (0, 0), (0, nb * self.block_size - t)),
                         constant_values=core.mask_value(index_scores.dtype))
        block_keep_BKTJ = select_blocks(
            padded.reshape(b, kg, t, nb, self.block_size).max(axis=-1), **sel)
        keep_BKTS = jnp.repeat(block_keep_BKTJ, self.block_size, axis=-1)[..., :t]
        if self.causal:
            keep_BKTS = keep_BKTS & core.causal_mask(t, t)
        # the weights are materialised for the aux loss anyway, so the output reuses them (every
        # impl computes the same numbers; the default path above is where impls differ)
        probs = core.attention_weights(q_BTNH, k_BSKH, keep=keep_BKTS, scale=d ** -0.5,
                                       precision=self.precision)
        out = self.proj(core.attend(probs, v_BSKV, precision=self.precision).reshape(
            b, t, self.dim))
        aux = {"index_scores": index_scores,
               "attn_weights": probs.astype(q_BTNH.dtype).reshape(b, self.num_heads, t, t),
               "keep": keep_BKTS}
        return out, aux


def msa_index_aux_loss(index_scores: Array, attn_weights: Array, keep: Array,
                       eps: float = 1e-9) -> Array:
    """KL(teacher || student) aligning the index branch with the main branch (attnhut 0.5.0).

    teacher: the main attention (a constant) averaged over each group's heads, (B, K, T, S);
    student: ``softmax(index_scores)`` over the same selected support ``keep``. Summed over keys,
    averaged over queries and groups. Only the index branch receives gradient.
    """
    b, n, t, s = attn_weights.shape
    groups = index_scores.shape[1]
    if n % groups != 0:
        raise ValueError(f"msa_index_aux_loss: attn_weights heads {n} not divisible by index "
                         f"groups {groups}")
    teacher = jax.lax.stop_gradient(attn_weights).astype(jnp.float32)
    teacher = teacher.reshape(b, groups, n // groups, t, s).mean(axis=2)
    scores = jnp.where(keep, index_scores.astype(jnp.float32), core.mask_value(jnp.float32))
    log_student = jax.nn.log_softmax(scores, axis=-1)
    kl = teacher * (jnp.log(jnp.maximum(teacher, eps)) - log_student)
    kl = jnp.where(teacher > 0, kl, 0.0)
    return kl.sum(axis=-1).mean()

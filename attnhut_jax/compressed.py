"""DeepSeek-V4's compressed attention: Heavily Compressed (HCA) and Compressed Sparse (CSA).

Both pool runs of ``compression_rate`` tokens into single KV entries (a softmax over the run's
positions with a learned per-position bias), then let every head of the query attend one shared
KV sequence (MQA): the compressed entries whose whole run lies strictly in the past, plus the
last ``window`` raw tokens. A per-head sink logit joins the softmax denominator. HCA keeps every
visible entry; CSA pools with a one-block overlap and keeps only the ``top_k`` entries a
lightning indexer scores highest. RoPE is left out, as in attnhut.

Array names follow the project's dimension key (``pallas_kernels/__init__.py``): C compressed
entries, P positions pooled into one entry, I indexer heads, E indexer width, M selected entries
per query, A output-projection groups, Y / O per-group input / output width. H is both the
query head width and the shared entry width (``kv_dim``).

CSA's selector (indexer projections and scores) runs in its own ``selector_dtype``, float32 by
default, and every impl ranks in float32 (or wider).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import core, registry
from .core import Array, Dtype

# ----------------------------------------------------------------------------- pure functions


def _blocks(x_BTH: Array, rate: int, fill: float) -> Array:
    """(B, T, H) -> (B, C, P=rate, H), the tail padded with ``fill`` up to a multiple of rate."""
    b, t, h = x_BTH.shape
    pad = (-t) % rate
    if pad:
        x_BTH = jnp.pad(x_BTH, ((0, 0), (0, pad), (0, 0)), constant_values=fill)
    return x_BTH.reshape(b, (t + pad) // rate, rate, h)


def _pool(c_BCPH: Array, z_BCPH: Array) -> Array:
    """Softmax over the P pooled positions (in float32), then the weighted sum of values."""
    s_BCPH = jax.nn.softmax(z_BCPH.astype(jnp.promote_types(z_BCPH.dtype, jnp.float32)), axis=2)
    return jnp.sum(s_BCPH.astype(c_BCPH.dtype) * c_BCPH, axis=2)


@functools.partial(jax.jit, static_argnames=("rate",))
def compress(c_BTH: Array, z_BTH: Array, bias_PH: Array, rate: int) -> Array:
    """Non-overlapped pooling: entry i pools tokens [i*rate, (i+1)*rate). Returns (B, C, H).

    C = ceil(T / rate); the missing tail positions of the last run carry value 0 and the finite
    fill logit (plus their bias), so they get zero weight.
    """
    fill = core.mask_value(z_BTH.dtype)
    z_BCPH = _blocks(z_BTH, rate, fill) + bias_PH.astype(z_BTH.dtype)
    return _pool(_blocks(c_BTH, rate, 0.0), z_BCPH)


@functools.partial(jax.jit, static_argnames=("rate",))
def compress_overlap(ca_BTH: Array, cb_BTH: Array, za_BTH: Array, zb_BTH: Array, ba_PH: Array,
                     bb_PH: Array, rate: int) -> Array:
    """Overlapped pooling: entry i pools its own run (``a`` projections, bias ``ba``) and the
    previous run (``b`` projections, bias ``bb``) in one softmax over 2*rate positions.

    Entry 0 has no previous run: that half has value 0 and the bare fill logit. Returns (B, C, H).
    """
    dtype = za_BTH.dtype
    fill = core.mask_value(dtype)
    a_c = _blocks(ca_BTH, rate, 0.0)
    a_z = _blocks(za_BTH, rate, fill) + ba_PH.astype(dtype)
    b, _, p, h = a_c.shape
    prev_c = _blocks(cb_BTH, rate, 0.0)[:, :-1]
    prev_z = _blocks(zb_BTH, rate, fill)[:, :-1] + bb_PH.astype(dtype)
    b_c = jnp.concatenate([jnp.zeros((b, 1, p, h), a_c.dtype), prev_c], axis=1)
    b_z = jnp.concatenate([jnp.full((b, 1, p, h), fill, dtype), prev_z], axis=1)
    return _pool(jnp.concatenate([a_c, b_c], axis=2), jnp.concatenate([a_z, b_z], axis=2))


def compressed_visible(t: int, c: int, rate: int) -> Array:
    """Boolean (T, C): entry c is visible to query t once its whole run is in the past."""
    return (jnp.arange(c)[None, :] + 1) * rate <= jnp.arange(t)[:, None]


@functools.partial(jax.jit, static_argnames=("scale", "precision"))
def shared_kv_attention(q_BTNH: Array, kv_BSH: Array, keep: Array, sink_N: Array,
                        scale: float, precision: core.Precision = None) -> Array:
    """Every head reads one shared sequence as both keys and values, with a per-head sink.

    ``keep`` broadcasts to (B, N, T, S). Returns (B, T, N, H); a row with no visible entry is
    zeros (only the sink is left in its softmax).
    """
    kv_BS1H = kv_BSH[:, :, None, :]
    return core.dot_product_attention(q_BTNH, kv_BS1H, kv_BS1H, keep=keep, scale=scale,
                                      sink=sink_N, precision=precision)


# The registry's ``csa`` op: (q_BTNH, kv_BSH, sink_N, qi_BTIE, ki_BCE, w_BTI, *, top_k, rate,
# window, scale, index_scores_BTC, precision) -> (B, T, N, H). Keys are [C pooled entries | T raw
# tokens]; entry c sits at position (c + 1) * rate and is visible once that is <= t.
# ``index_scores_BTC`` (already masked) is given when built for ``return_aux``: the impl then
# selects from them, so the selection returned is the one attended.


@registry.register("csa", "reference")
def csa_reference(q_BTNH, kv_BSH, sink_N, qi_BTIE, ki_BCE, w_BTI, *, top_k, rate, window, scale,
                  index_scores_BTC=None, precision=None):
    """attnhut's path: score every (query, entry) pair, attend through a dense (T, C + T) mask."""
    b, t = q_BTNH.shape[:2]
    visible_TC = compressed_visible(t, ki_BCE.shape[1], rate)
    if index_scores_BTC is None:
        index_scores_BTC = core.masked_lightning_scores(qi_BTIE, ki_BCE, w_BTI, visible_TC, precision)
    selected_BTC = core.topk_keep(index_scores_BTC, visible_TC, top_k)
    keep_BTS = jnp.concatenate(
        [selected_BTC, jnp.broadcast_to(core.sliding_window_mask(t, window), (b, t, t))], axis=2)
    return shared_kv_attention(q_BTNH, kv_BSH, keep_BTS[:, None], sink_N, scale, precision)


def _csa_token_sparse(q_BTNH, kv_BSH, sink_N, qi_BTIE, ki_BCE, w_BTI, *, top_k, rate, window,
                      scale, index_scores_BTC=None, precision=None, impl):
    """Fused indexer top-k over the entries, then attention over the selected entries, the raw
    window and the sink only (``token_sparse_attention`` with ``window_start = C``)."""
    t, nc = q_BTNH.shape[1], ki_BCE.shape[1]
    if index_scores_BTC is not None:
        indices_BTM = core.indices_from_scores(index_scores_BTC, compressed_visible(t, nc, rate),
                                               top_k)
    else:
        indices_BTM, _ = core.indexer_topk(
            qi_BTIE, ki_BCE, w_BTI, top_k, causal=True, impl=impl, q_pos_T=jnp.arange(t),
            k_pos_S=(jnp.arange(nc) + 1) * rate, precision=precision)
    return core.token_sparse_attention(q_BTNH, kv_BSH[:, :, None, :], None, indices_BTM,
                                       impl=impl, scale=scale, sink=sink_N, window=window,
                                       window_start=nc, precision=precision)


registry.register("csa", "xla")(functools.partial(_csa_token_sparse, impl="xla"))
registry.register("csa", "pallas")(functools.partial(_csa_token_sparse, impl="pallas"))


# ----------------------------------------------------------------------------- modules


def _xavier_uniform_grouped(key, shape, dtype=jnp.float32):
    """``nn.init.xavier_uniform_`` on an (A, Y, O) tensor: fan_in = Y * O, fan_out = A * O."""
    a, y, o = shape
    bound = math.sqrt(6.0 / (y * o + a * o))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class GroupedOutputProjection(nn.Module):
    """Heads split into ``num_groups`` groups, each projected to ``group_dim``; then one Linear.

    Args mirror ``attnhut.compressed.GroupedOutputProjection``: ``num_heads``, ``head_dim``,
    ``num_groups`` (divides num_heads), ``dim``, ``group_dim`` (falsy: head_dim), ``bias``;
    ``precision`` of both matmuls.
    Parameters: ``w`` (A, Y, O) with Y = (num_heads // num_groups) * head_dim, ``out``.
    """

    num_heads: int
    head_dim: int
    num_groups: int
    dim: int
    group_dim: int | None = None
    bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    def setup(self) -> None:
        owner = "GroupedOutputProjection"
        gd = self.group_dim or self.head_dim
        core.check_positive(owner, num_heads=self.num_heads, head_dim=self.head_dim,
                            num_groups=self.num_groups, dim=self.dim, group_dim=gd)
        core.check_divisible(owner, ("num_heads", self.num_heads), ("num_groups", self.num_groups))
        in_g = (self.num_heads // self.num_groups) * self.head_dim
        self.w = core.param(self, "w", _xavier_uniform_grouped, (self.num_groups, in_g, gd),
                            ("heads", None, None), self.param_dtype)
        self.out = core.Linear(self.dim, use_bias=self.bias, axes=("heads", "embed"),
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               precision=self.precision)

    def __call__(self, o_BTNH: Array) -> Array:
        """(B, T, N, H) head outputs -> (B, T, D)."""
        b, t, _, _ = o_BTNH.shape
        o_BTAY = o_BTNH.reshape(b, t, self.num_groups, -1)
        o_BTAY, w_AYO = nn.dtypes.promote_dtype(o_BTAY, self.w, dtype=self.dtype)
        o_BTAO = jnp.einsum("BTAY,AYO->BTAO", o_BTAY, w_AYO, precision=self.precision)
        return self.out(o_BTAO.reshape(b, t, -1))


def _resolved(owner: str, dim: int, num_heads: int, kv_dim: int | None, q_lora_rank: int | None,
              num_groups: int | None, rate: int, window: int, **more: int) -> tuple[int, int, int]:
    """Validate the shared fields; (kv_dim, q_lora_rank, num_groups) with attnhut's defaults."""
    core.check_positive(owner, dim=dim, num_heads=num_heads, compression_rate=rate,
                        window=window, **more)
    c = kv_dim or dim // num_heads
    ql = q_lora_rank or dim // 2
    g = num_groups or num_heads
    core.check_positive(owner, kv_dim=c, q_lora_rank=ql, num_groups=g)
    core.check_divisible(owner, ("num_heads", num_heads), ("num_groups", g))
    return c, ql, g


def _queries(mod: nn.Module, x: Array, c_q: Array) -> Array:
    """(B, T, N, H) queries from the query latent, RMS-normalised per head."""
    b, t, _ = x.shape
    q_BTNH = mod.q_up(c_q).reshape(b, t, mod.num_heads, -1)
    return core.rms_norm(q_BTNH, mod.q_norm)


_BLOCK_K = 64  # key block of HCA's block-sparse core; the token rules are exact at any size


class HeavilyCompressedAttention(nn.Module):
    """HCA: heavy non-overlapped KV compression, every visible entry kept, plus a raw window.

    Args mirror ``attnhut.HeavilyCompressedAttention``: ``dim``, ``num_heads``,
    ``compression_rate`` (16), ``kv_dim`` (dim // num_heads), ``q_lora_rank`` (dim // 2),
    ``num_groups`` (num_heads), ``window`` (64), ``bias``; a falsy kv_dim / q_lora_rank /
    num_groups selects the default, as in attnhut. Parameters: ``kv``, ``z``, ``pos_bias``,
    ``q_down``, ``q_up``, ``q_norm``, ``kv_norm``, ``sink``, ``proj/w``, ``proj/out``.
    ``impl`` picks the registry's ``block_sparse`` op (``auto``/``reference``/``xla``/``pallas``;
    changes no variable); ``precision`` reaches every matmul.
    """

    dim: int
    num_heads: int
    compression_rate: int = 16
    kv_dim: int | None = None
    q_lora_rank: int | None = None
    num_groups: int | None = None
    window: int = 64
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``, amortised at long context: one shared
        ``kv_dim`` entry per ``compression_rate`` tokens (the raw window is a constant ``window``
        tokens, not a per-token cost)."""
        kv_dim = self.kv_dim or self.dim // self.num_heads
        return float(kv_dim / self.compression_rate * jnp.dtype(dtype).itemsize)

    def setup(self) -> None:
        registry.check("HeavilyCompressedAttention", "block_sparse", self.impl)
        c, ql, g = _resolved("HeavilyCompressedAttention", self.dim, self.num_heads, self.kv_dim,
                             self.q_lora_rank, self.num_groups, self.compression_rate, self.window)
        n, pd = self.num_heads, self.param_dtype
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=pd, precision=self.precision)
        zeros = nn.initializers.zeros_init()
        self.kv = core.Linear(c, axes=("embed", "kv"), **kw)
        self.z = core.Linear(c, axes=("embed", "kv"), **kw)
        self.pos_bias = core.param(self, "pos_bias", zeros, (self.compression_rate, c),
                                   (None, "kv"), pd)
        self.q_down = core.Linear(ql, axes=("embed", "latent"), **kw)
        self.q_up = core.Linear(n * c, axes=("latent", "heads"), **kw)
        self.q_norm = core.ones_param(self, "q_norm", c, "kv", pd)
        self.kv_norm = core.ones_param(self, "kv_norm", c, "kv", pd)
        self.sink = core.param(self, "sink", zeros, (n,), ("heads",), pd)
        self.proj = GroupedOutputProjection(n, c, g, self.dim, bias=self.bias, dtype=self.dtype,
                                            param_dtype=pd, precision=self.precision)

    def __call__(self, x: Array) -> Array:
        """(B, T, D) -> (B, T, D), causal."""
        core.check_input(x, self.dim, "HeavilyCompressedAttention")
        t = x.shape[1]
        kv_BTH = self.kv(x)
        comp_BCH = compress(kv_BTH, self.z(x), self.pos_bias, self.compression_rate)
        kv_BSH = core.rms_norm(jnp.concatenate([comp_BCH, kv_BTH], axis=1), self.kv_norm)
        q_BTNH = _queries(self, x, self.q_down(x))
        # Keys are [pooled entries | raw tokens]. Entry c sits at position (c + 1) * rate, so the
        # causal rule shows it once its whole run is past; the entries are exempt from the window
        # (they are the first C keys), the raw tokens are windowed.
        nc, b = comp_BCH.shape[1], x.shape[0]
        q_pos = jnp.arange(t)
        k_pos = jnp.concatenate([(jnp.arange(nc) + 1) * self.compression_rate, q_pos])
        keep_TJ = core.window_block_keep(q_pos, k_pos, _BLOCK_K, window=self.window,
                                         num_sink_keys=nc)
        kv_BS1H = kv_BSH[:, :, None, :]
        out_BTNH = core.block_sparse_attention(
            q_BTNH, kv_BS1H, kv_BS1H, jnp.broadcast_to(keep_TJ, (b, 1, *keep_TJ.shape)),
            block_k=_BLOCK_K, causal=True, impl=self.impl, scale=q_BTNH.shape[-1] ** -0.5,
            sink=self.sink, q_pos_T=q_pos, k_pos_S=k_pos, window=self.window, num_sink_keys=nc,
            precision=self.precision, owner="HeavilyCompressedAttention")
        return self.proj(out_BTNH)


class CompressedSparseAttention(nn.Module):
    """CSA: light overlapped compression, top-k entries per query from a lightning indexer.

    Args mirror ``attnhut.CompressedSparseAttention``: ``dim``, ``num_heads``,
    ``compression_rate`` (4), ``top_k`` (16), ``kv_dim`` (dim // num_heads), ``q_lora_rank``
    (dim // 2), ``num_index_heads`` (4), ``index_dim`` (64), ``num_groups`` (num_heads),
    ``window`` (64), ``bias``; plus ``impl`` (the registry's ``csa`` op:
    ``auto``/``reference``/``xla``/``pallas``), which changes no variable, ``precision`` (every
    matmul) and ``selector_dtype`` (default float32: the indexer's projections and scores,
    whatever ``dtype``). Parameters: ``kv_a``, ``kv_b``, ``z_a``, ``z_b``, ``bias_a``,
    ``bias_b``, ``q_down``, ``q_up``, ``q_norm``, ``kv_norm``, ``sink``, ``idx_q``, ``idx_k``,
    ``idx_w``, ``proj/w``, ``proj/out``.

    ``reference`` scores every (query, entry) pair and attends through a dense
    (T, C + T) mask, as attnhut does. ``xla`` / ``pallas`` (``auto``: the fastest for the
    backend) select with the fused indexer top-k (entry ``c`` sits at position
    ``(c + 1) * rate`` and is valid once that is ``<= t``) and attend over the selected entries,
    the raw window and the sink only (``token_sparse_attention`` with ``window_start = C``),
    building no (T, T) array. ``return_aux=True`` builds the (T, C) scores and selects from
    them, so the returned selection is the one attended.
    """

    dim: int
    num_heads: int
    compression_rate: int = 4
    top_k: int = 16
    kv_dim: int | None = None
    q_lora_rank: int | None = None
    num_index_heads: int = 4
    index_dim: int = 64
    num_groups: int | None = None
    window: int = 64
    bias: bool = False
    impl: registry.SparseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: core.Precision = None
    selector_dtype: Dtype = jnp.float32

    def kv_cache_bytes_per_token(self, dtype: Dtype = jnp.bfloat16) -> float:
        """Bytes a decoder caches per token in ``dtype``, amortised at long context: per
        ``compression_rate`` tokens one shared ``kv_dim`` entry and its indexer key (``index_dim``);
        the raw window is a constant ``window`` tokens, not counted."""
        kv_dim = self.kv_dim or self.dim // self.num_heads
        return float((kv_dim + self.index_dim) / self.compression_rate * jnp.dtype(dtype).itemsize)

    def setup(self) -> None:
        registry.check("CompressedSparseAttention", "csa", self.impl)
        c, ql, g = _resolved("CompressedSparseAttention", self.dim, self.num_heads, self.kv_dim,
                             self.q_lora_rank, self.num_groups, self.compression_rate, self.window,
                             top_k=self.top_k, num_index_heads=self.num_index_heads,
                             index_dim=self.index_dim)
        n, r, pd = self.num_heads, self.compression_rate, self.param_dtype
        kw = dict(use_bias=self.bias, dtype=self.dtype, param_dtype=pd, precision=self.precision)
        zeros = nn.initializers.zeros_init()
        self.kv_a = core.Linear(c, axes=("embed", "kv"), **kw)
        self.kv_b = core.Linear(c, axes=("embed", "kv"), **kw)
        self.z_a = core.Linear(c, axes=("embed", "kv"), **kw)
        self.z_b = core.Linear(c, axes=("embed", "kv"), **kw)
        self.bias_a = core.param(self, "bias_a", zeros, (r, c), (None, "kv"), pd)
        self.bias_b = core.param(self, "bias_b", zeros, (r, c), (None, "kv"), pd)
        self.q_down = core.Linear(ql, axes=("embed", "latent"), **kw)
        self.q_up = core.Linear(n * c, axes=("latent", "heads"), **kw)
        self.q_norm = core.ones_param(self, "q_norm", c, "kv", pd)
        self.kv_norm = core.ones_param(self, "kv_norm", c, "kv", pd)
        self.sink = core.param(self, "sink", zeros, (n,), ("heads",), pd)
        kw_index = dict(kw, dtype=self.selector_dtype)
        self.idx_q = core.Linear(self.num_index_heads * self.index_dim, axes=("latent", "index"),
                                 **kw_index)
        self.idx_k = core.Linear(self.index_dim, axes=("kv", "index"), **kw_index)
        self.idx_w = core.Linear(self.num_index_heads, axes=("embed", "index_heads"), **kw_index)
        self.proj = GroupedOutputProjection(n, c, g, self.dim, bias=self.bias, dtype=self.dtype,
                                            param_dtype=pd, precision=self.precision)

    def __call__(self, x: Array, return_aux: bool = False) -> Array | tuple[Array, dict[str, Array]]:
        """(B, T, D) -> (B, T, D), causal.

        With ``return_aux`` also returns ``{"index_scores": (B, T, C), "selected": (B, T, C),
        "dense_weights": (B, N, T, C)}``: the indexer scores (fill value where the entry is not yet
        visible), the kept entries, and the main branch's attention over *every* visible entry
        (no top-k; the sink logit in the denominator, the raw window left out), the target of
        ``dsa_index_aux_loss(aux["index_scores"], aux["dense_weights"])``.
        """
        core.check_input(x, self.dim, "CompressedSparseAttention")
        b, t, _ = x.shape
        r = self.compression_rate
        kv_a_BTH = self.kv_a(x)
        comp_BCH = compress_overlap(kv_a_BTH, self.kv_b(x), self.z_a(x), self.z_b(x), self.bias_a,
                                    self.bias_b, r)
        nc = comp_BCH.shape[1]
        kv_BSH = core.rms_norm(jnp.concatenate([comp_BCH, kv_a_BTH], axis=1), self.kv_norm)
        c_q = self.q_down(x)
        q_BTNH = _queries(self, x, c_q)

        # Lightning indexer: sum over indexer heads of w * relu(q . k), no scale.
        qi_BTIE = self.idx_q(c_q).reshape(b, t, self.num_index_heads, self.index_dim)
        ki_BCE = self.idx_k(comp_BCH)
        w_BTI = self.idx_w(x)
        scale = q_BTNH.shape[-1] ** -0.5
        aux = None
        if return_aux:
            visible_TC = compressed_visible(t, nc, r)
            scores_BTC = core.masked_lightning_scores(qi_BTIE, ki_BCE, w_BTI, visible_TC, self.precision)
            selected_BTC = core.topk_keep(scores_BTC, visible_TC, self.top_k)
            aux = {"index_scores": scores_BTC, "selected": selected_BTC}
        out_BTNH = registry.call(
            "CompressedSparseAttention", "csa", self.impl, q_BTNH, kv_BSH, self.sink, qi_BTIE,
            ki_BCE, w_BTI, top_k=self.top_k, rate=r, window=self.window, scale=scale,
            index_scores_BTC=None if aux is None else scores_BTC, precision=self.precision)
        out = self.proj(out_BTNH)
        if return_aux:
            probs_BKGTC = core.attention_weights(
                q_BTNH, kv_BSH[:, :nc, None, :], keep=visible_TC, scale=scale,
                sink=self.sink, precision=self.precision)
            aux["dense_weights"] = probs_BKGTC.reshape(b, self.num_heads, t, nc)
            return out, aux
        return out

"""What each mechanism supports, declared once; the shared tests (test_behaviour.py,
test_floor_smoke.py) read these declarations instead of keeping thirteen copies of each test.

A declaration is a small configuration plus the facts the tests need: how the module is called,
whether it is causal, which call arguments and ``impl`` values it has, the mask-like argument a
caller can get wrong, the constructor value it must refuse, and how far its bfloat16 output may
be from float32 (with the reason). Adding a mechanism means adding one ``Mechanism`` here.

This module imports neither torch nor ``parity``: the floor smoke runs it on the older JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import attnhut_jax as ah
from attnhut_jax import core

B = 2  # batch of every example input
D = 32  # model width of the sequence mechanisms
T = 11  # sequence length: a multiple of no block size, compression rate or stride below

SPARSE_IMPLS = ("auto", "reference", "xla", "pallas")
DENSE_IMPLS = ("auto", "xla", "cudnn")  # issue 11's seam for the dense mechanisms
LINEAR_IMPLS = ("auto", "chunk", "recurrent", "pallas")  # the gated_delta op (issue 14)


@dataclasses.dataclass(frozen=True)
class BadCall:
    """A wrong call argument (``kwarg=value(x)``) and the error it must raise."""

    kwarg: str
    value: Callable[[jax.Array], Any]
    error: type[Exception]
    match: str


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """One mechanism as the shared tests see it.

    ``causal``: True when output position t may depend only on input positions <= t; False when
    it also sees later positions; None when the output is not indexed by position (SlotAttention
    maps a set of inputs to a set of slots).
    ``full``: every output position depends on every input position the causal rule allows (a
    dense pattern); False for selections and windows, which then promise less (see
    ``future_rows``).
    ``future_rows``: for a sparse bidirectional mechanism, how many leading rows are guaranteed
    by construction to read some later position (the rest depend on the data).
    ``call``: the keyword arguments ``__call__`` takes besides the input, by name.
    ``impls``: the values the ``impl`` field takes; empty when the module has none.
    ``cpu_impls``: those that run on a CPU host (the floor smoke runs each).
    ``fixed``: call arguments every test passes so that a call is deterministic and needs no rng
    (SlotAttention's noise, CausalJEPA's hidden objects), as a function of the input.
    ``bad_calls``: a wrong mask (or other shaped call argument) and the error it must raise.
    ``bad_config``: constructor overrides the module must refuse (non-divisible heads where it has
    heads) and the message naming the values.
    ``bf16_rtol``: bound on each output row's error, bf16 against float32 for the same
    (bf16-rounded) params and input, relative to the rows' RMS norm; ``bf16_why`` says where the
    error comes from. Measured at these sizes over ten inputs: at most 0.012 for every mechanism
    (bf16's unit roundoff is 2^-9 = 0.002 per rounding, and a row goes through several). The
    selectors (DSA, MSA, CSA) rank in float32 under a bf16 module (issue 11's
    ``selector_dtype``), so they select what float32 selects and no row is exempt.
    """

    id: str
    cls: type[nn.Module]
    kwargs: Mapping[str, Any]
    causal: bool | None
    full: bool
    call: frozenset[str]
    bad_config: tuple[Mapping[str, Any], str]
    bf16_why: str
    bf16_rtol: float = 0.02
    impls: tuple[str, ...] = ()
    cpu_impls: tuple[str, ...] = ()
    future_rows: int = 0
    shape: tuple[int, ...] = (B, T, D)
    fixed: Callable[[jax.Array], dict[str, Any]] = lambda x: {}
    bad_calls: tuple[BadCall, ...] = ()
    aux: bool = False  # __call__(..., return_aux=True) returns (out, aux)
    pair_output: bool = False  # __call__ returns (out, something): the tests read out

    def __str__(self) -> str:
        return self.id

    @property
    def dim(self) -> int:
        return self.kwargs["dim"] if "dim" in self.kwargs else self.kwargs["hidden_size"]

    def make(self, **overrides) -> nn.Module:
        return self.cls(**{**self.kwargs, **overrides})

    def example(self, dtype=jnp.float32, seed: int = 0, shape: tuple[int, ...] | None = None):
        return jax.random.normal(jax.random.key(seed), shape or self.shape, dtype)

    def apply(self, module: nn.Module, variables, x, **kwargs):
        """The main output of ``module.apply`` (the first of a pair)."""
        out = module.apply(variables, x, **{**self.fixed(x), **kwargs})
        return out[0] if self.pair_output or kwargs.get("return_aux") else out


def _attn_mask_calls(n_heads: int) -> tuple[BadCall, ...]:
    """attn_mask of a shape that does not broadcast, and of an integer dtype."""
    return (
        BadCall("attn_mask", lambda x: jnp.ones((x.shape[1], x.shape[1] + 1), bool), ValueError,
                rf"attn_mask of shape \({T}, {T + 1}\) does not broadcast to "
                rf"\(batch, heads, q_len, k_len\)=\({B}, {n_heads}, {T}, {T}\)"),
        BadCall("attn_mask", lambda x: jnp.ones((x.shape[1], x.shape[1]), jnp.int32), TypeError,
                "boolean or floating point, got int32"),
    )


_DENSE_HEADS = ({"dim": 30}, r"dim=30 must be divisible by num_heads=4")
_BF16_DENSE = ("one softmax over float32 logits; the bf16 rounding of q, k, v, the weights and the "
               "output projection (unit roundoff 2^-9 each) is what remains")


def _dense(id_, cls, kwargs, causal, bad_config=_DENSE_HEADS, why=_BF16_DENSE,
           mask=True, dropout=True, extra_call=()):
    call = ({"attn_mask"} if mask else set()) | ({"deterministic"} if dropout else set()) | {
        "segment_ids", "positions", "lengths", *extra_call}
    return Mechanism(
        id_, cls, {**kwargs, "causal": causal}, causal=causal, full=True, call=frozenset(call),
        impls=DENSE_IMPLS, cpu_impls=("auto", "xla"), bad_config=bad_config, bf16_why=why,
        bad_calls=_attn_mask_calls(kwargs["num_heads"]) if mask else ())


def _variants(make: Callable[[bool], Mechanism]) -> list[Mechanism]:
    return [make(True), make(False)]


_SLOTS = 3


def _cjepa_fixed(x):
    return {"mask_slots": jnp.array([1])}


MECHANISMS: list[Mechanism] = [
    *_variants(lambda c: _dense(f"standard{'' if c else '_bidir'}", ah.StandardAttention,
                                {"dim": D, "num_heads": 4, "bias": not c}, c)),
    *_variants(lambda c: _dense(f"mqa{'' if c else '_bidir'}", ah.MultiQueryAttention,
                                {"dim": D, "num_heads": 4}, c)),
    *_variants(lambda c: _dense(
        f"gqa{'' if c else '_bidir'}", ah.GroupedQueryAttention,
        {"dim": D, "num_heads": 4, "num_kv_heads": 2}, c,
        bad_config=({"num_kv_heads": 3}, r"num_heads=4 must be divisible by num_kv_heads=3"))),
    # the options that keep the dense contract (attn_mask, every earlier token read); the
    # window and sink tokens are test_attention_options.py's and test_interop.py's
    _dense("gqa_options", ah.GroupedQueryAttention,
           {"dim": D, "num_heads": 4, "num_kv_heads": 2, "head_dim": 6, "qk_norm": True,
            "output_gate": True, "rope_theta": 100.0, "rope_dim": 4, "num_sink_logits": 4,
            "rope_scaling": core.RopeScaling("yarn", 4.0, 8)}, True,
           bad_config=({"num_sink_logits": 3}, r"num_sink_logits=3 must be 0 or num_heads=4"),
           why=_BF16_DENSE + "; RMSNorm on q and k, a sigmoid gate"),
    *_variants(lambda c: _dense(
        f"mla{'' if c else '_bidir'}", ah.MultiHeadLatentAttention, {"dim": D, "num_heads": 4}, c,
        dropout=False, extra_call=("index_loss",),
        why=_BF16_DENSE + "; two RMSNorms and two more low-rank products",
        # MLA's head widths are free (attnhut's too): too many heads leave no width for them
        bad_config=({"num_heads": 64}, r"qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0 "
                                       r"must be >= 1"))),
    *_variants(lambda c: _dense(
        f"differential{'' if c else '_bidir'}", ah.DifferentialAttention,
        {"dim": D, "num_heads": 2}, c, mask=False, dropout=False,
        why="two softmax maps whose difference (lambda about 0.2-0.8) cancels part of each, so "
            "their rounding weighs more in the result; then a per-head RMSNorm",
        bad_config=({"dim": 36, "num_heads": 4}, r"dim=36 must be divisible by 2 \* num_heads=8"))),
    Mechanism(
        "slot", ah.SlotAttention, {"dim": D, "num_slots": _SLOTS, "hidden_dim": D}, causal=None,
        full=True, call=frozenset({"noise", "segment_ids"}),
        fixed=lambda x: {"noise": jax.random.normal(jax.random.key(7), (x.shape[0], _SLOTS,
                                                                       x.shape[-1]))},
        bad_calls=(BadCall("noise", lambda x: jnp.zeros((x.shape[0], _SLOTS + 1, x.shape[-1])),
                           ValueError, rf"noise must have shape \(batch, num_slots, dim\)="
                                       rf"\({B}, {_SLOTS}, {D}\), got \({B}, {_SLOTS + 1}, {D}\)"),),
        # no heads: the constructor value to refuse is the slot count
        bad_config=({"num_slots": 0}, r"num_slots=0 must be >= 1"),
        bf16_why="three GRU + MLP iterations compound the bf16 rounding of each step"),
    *_variants(lambda c: Mechanism(
        f"bigbird{'_causal' if c else ''}", ah.BigBirdAttention,
        {"dim": D, "num_heads": 4, "block_size": 2, "num_window_blocks": 3,
         "num_random_blocks": 1, "num_global_blocks": 1, "causal": c}, causal=c, full=False,
        # every row's own block and the next window block hold later keys (bar the last)
        future_rows=T - 1, call=frozenset({"key_padding_mask", "segment_ids"}), impls=SPARSE_IMPLS,
        cpu_impls=SPARSE_IMPLS,
        bad_calls=(BadCall("key_padding_mask", lambda x: jnp.ones((x.shape[0], T - 1), bool),
                           ValueError, rf"key_padding_mask must have shape \(batch, seq\)="
                                       rf"\({B}, {T}\), got \({B}, {T - 1}\)"),),
        bad_config=({"dim": 30}, r"dim=30 must be divisible by num_heads=4"),
        bf16_why=_BF16_DENSE + " (a fixed block pattern: no data-dependent selection)")),
    *_variants(lambda c: Mechanism(
        f"sinkhorn{'' if c else '_bidir'}", ah.SinkhornAttention,
        {"dim": D, "num_heads": 4, "block_size": 3, "causal": c, "max_len": 16}, causal=c,
        # soft sorting: every sorted block mixes every (earlier) block with a non-zero weight and
        # the summaries read them all, so each output depends on every position it may see
        full=True, call=frozenset({"segment_ids", "deterministic", "return_aux", "lengths"}), aux=True,
        impls=("auto", "reference", "xla"), cpu_impls=("auto", "reference", "xla"),
        bad_config=({"dim": 30}, r"dim=30 must be divisible by num_heads=4"),
        bf16_why=_BF16_DENSE + "; the sorting network and Sinkhorn run in float32, the soft "
                 "permutation mixes bf16 keys and values")),
    Mechanism(
        "delta", ah.DeltaAttention, {"dim": D, "num_heads": 4, "window": 3, "sink": 1, "stride": 3},
        causal=True, full=False, call=frozenset({"segment_ids", "positions", "lengths"}), impls=SPARSE_IMPLS,
        cpu_impls=SPARSE_IMPLS,
        bad_config=({"dim": 30}, r"dim=30 must be divisible by num_heads=4"),
        bf16_why=_BF16_DENSE + "; the correction adds a difference of two attentions"),
    *_variants(lambda c: Mechanism(
        f"dsa{'' if c else '_bidir'}", ah.DeepSeekSparseAttention,
        {"dim": D, "num_heads": 4, "top_k": 3, "num_index_heads": 2, "index_head_dim": 8,
         "causal": c}, causal=c, full=False,
        # row t has t + 1 keys at or before it, so top_k = 3 keys include a later one for t < 2
        future_rows=2, call=frozenset({"return_aux", "segment_ids", "positions", "index_loss", "lengths"}),
        aux=True, impls=SPARSE_IMPLS,
        cpu_impls=SPARSE_IMPLS,
        bad_config=({"dim": 30}, r"dim=30 must be divisible by num_heads=4"),
        bf16_why=_BF16_DENSE + "; the indexer ranks in float32 (selector_dtype), so it selects "
                 "the keys float32 selects")),
    *_variants(lambda c: Mechanism(
        f"msa{'' if c else '_bidir'}", ah.MiniMaxSparseAttention,
        {"dim": D, "num_heads": 4, "num_kv_groups": 2, "block_size": 3, "top_k": 2, "causal": c},
        causal=c, full=False,
        # each row keeps its own block (force_current_block): rows 0, 1 see keys 1, 2 after them
        future_rows=2, call=frozenset({"return_aux", "segment_ids", "positions", "index_loss", "lengths"}),
        aux=True, impls=SPARSE_IMPLS, cpu_impls=SPARSE_IMPLS,
        bad_config=({"num_kv_groups": 3}, r"num_heads=4 must be divisible by num_kv_groups=3"),
        bf16_why=_BF16_DENSE + "; the index branch ranks blocks in float32 (selector_dtype); "
                 "with bf16 block scores, 1 row in 22 picked another block on some inputs")),
    *_variants(lambda c: Mechanism(
        f"spark{'' if c else '_bidir'}", ah.SparkAttention,
        {"dim": D, "num_heads": 4, "top_k": 4, "predictor_dim": 3, "causal": c, "block_k": 4},
        causal=c, full=False,
        # rows 0-3 see at most top_k keys when causal (all read); bidirectional rows select
        # about 4 of 11 keys by a threshold: row 0 reads a later key for these inputs
        future_rows=1, call=frozenset({"segment_ids", "positions", "lengths"}),
        impls=("auto", "reference", "xla"), cpu_impls=("auto", "reference", "xla"),
        bad_config=({"predictor_dim": 8}, r"predictor_dim=8 must be < head_dim=8"),
        bf16_why=_BF16_DENSE + "; the selection thresholds float32 predictor scores of bf16 "
                 "q and k, so a score within bf16 rounding of the threshold may flip")),
    Mechanism(
        "hca", ah.HeavilyCompressedAttention,
        {"dim": D, "num_heads": 4, "compression_rate": 3, "window": 4}, causal=True,
        # window (4) >= rate (3): every earlier token is in the window or in a visible entry
        full=True, call=frozenset({"segment_ids", "positions", "lengths"}), impls=SPARSE_IMPLS,
        cpu_impls=SPARSE_IMPLS,
        bad_config=({"num_groups": 3}, r"num_heads=4 must be divisible by num_groups=3"),
        bf16_why=_BF16_DENSE + "; softmax-gated pooling and the grouped output projection"),
    Mechanism(
        "csa", ah.CompressedSparseAttention,
        {"dim": D, "num_heads": 4, "compression_rate": 2, "top_k": 2, "num_index_heads": 2,
         "index_dim": 8, "window": 3}, causal=True, full=False,
        call=frozenset({"return_aux", "segment_ids", "positions", "index_loss", "lengths"}),
        aux=True, impls=SPARSE_IMPLS, cpu_impls=SPARSE_IMPLS,
        bad_config=({"num_groups": 3}, r"num_heads=4 must be divisible by num_groups=3"),
        bf16_why=_BF16_DENSE + "; the indexer ranks in float32 (selector_dtype), so it selects "
                 "the entries float32 selects"),
    # Child et al.'s factorised patterns: strided (merged sets) and fixed (interleaved sets,
    # two summary positions per block of 4: the row's blocks end in a partial one)
    *_variants(lambda c: Mechanism(
        f"strided{'' if c else '_bidir'}", ah.StridedSparseAttention,
        {"dim": D, "num_heads": 4, "stride": 3, "causal": c}, causal=c, full=False,
        # bidirectional: every row but the last reads its next position (|i - j| <= 3)
        future_rows=T - 1, call=frozenset({"segment_ids", "lengths"}), impls=SPARSE_IMPLS,
        cpu_impls=SPARSE_IMPLS,
        bad_config=({"dim": 30}, r"dim=30 must be divisible by num_heads=4"),
        bf16_why=_BF16_DENSE + " (a fixed pattern; the passes merge by float32 log-sum-exps)")),
    *_variants(lambda c: Mechanism(
        f"fixed{'' if c else '_bidir'}", ah.FixedSparseAttention,
        {"dim": D, "num_heads": 4, "block_size": 4, "num_summary": 2, "combine": "interleaved",
         "causal": c}, causal=c, full=False,
        # bidirectional: rows 0-9 read a later position of their block or the summary 10
        future_rows=T - 1, call=frozenset({"segment_ids", "lengths"}), impls=SPARSE_IMPLS,
        cpu_impls=SPARSE_IMPLS,
        bad_config=({"num_summary": 5}, r"num_summary=5 must be <= block_size=4"),
        bf16_why=_BF16_DENSE + " (a fixed pattern; the passes merge by float32 log-sum-exps)")),
    Mechanism(
        "cjepa", ah.CausalJEPAAttention,
        {"dim": 16, "num_heads": 2, "num_slots": _SLOTS, "history_frames": 3, "pred_frames": 1,
         "num_masked_slots": 1, "depth": 1}, causal=False, full=True,
        call=frozenset({"mask_slots", "deterministic", "segment_ids"}), shape=(B, 3, _SLOTS, 16),
        impls=DENSE_IMPLS, cpu_impls=("auto", "xla"),
        fixed=_cjepa_fixed, pair_output=True,
        bad_calls=(BadCall("mask_slots", lambda x: jnp.array([True, False]), ValueError,
                           rf"boolean mask_slots must have shape \(num_slots,\)=\({_SLOTS},\), "
                           r"got \(2,\)"),
                   BadCall("mask_slots", lambda x: jnp.array([_SLOTS]), ValueError,
                           rf"mask_slots values \[{_SLOTS}\] are out of range")),
        bad_config=({"dim": 30, "num_heads": 4}, r"dim=30 must be divisible by num_heads=4"),
        bf16_why="a pre-norm transformer block: bf16 attention, MLP and LayerNorm"),
]


# ----------------------------------------------------------------------------- linear attention
# The gated delta rule and linear attention (issue 14): a recurrent state instead of a softmax.

_LINEAR_CALL = frozenset({"initial_state", "return_state", "segment_ids", "lengths"})
_BF16_LINEAR = ("the recurrence runs in float32 (the op upcasts; q and k are L2-normalised in "
                "float32); the bf16 roundings of the projections, the short conv and the value "
                "remain, and the per-head gated RMSNorm rescales each head's output to unit RMS, "
                "so a head whose core output is small (the delta rule subtracts what the state "
                "already predicts) has its rounding magnified: at most 0.035 over ten inputs")


def _bad_state(shape: tuple[int, ...]) -> tuple[BadCall, ...]:
    """An ``initial_state`` whose value width is one short."""
    bad = (*shape[:-1], shape[-1] - 1)
    return (BadCall("initial_state", lambda x: jnp.zeros(bad), ValueError,
                    r"initial_state must have shape \(batch, heads, key width, value width\)="
                    rf"{re.escape(str(shape))}, got {re.escape(str(bad))}"),)


MECHANISMS += [
    Mechanism(
        "gated_deltanet", ah.GatedDeltaNet,
        {"hidden_size": D, "num_query_key_heads": 2, "num_value_heads": 4, "head_qk_dim": 8,
         "head_v_dim": 6, "conv_size": 3}, causal=True, full=True, call=_LINEAR_CALL,
        impls=LINEAR_IMPLS, cpu_impls=LINEAR_IMPLS, bad_calls=_bad_state((B, 4, 8, 6)),
        bad_config=({"num_query_key_heads": 3},
                    r"num_value_heads=4 must be a multiple of num_query_key_heads=3"),
        bf16_rtol=0.05, bf16_why=_BF16_LINEAR),
    Mechanism(
        "kimi_delta", ah.KimiDeltaAttention, {"hidden_size": D, "num_heads": 4, "head_dim": 8},
        causal=True, full=True, call=_LINEAR_CALL, impls=LINEAR_IMPLS, cpu_impls=LINEAR_IMPLS,
        bad_calls=_bad_state((B, 4, 8, 8)),
        bad_config=({"num_heads": 0}, r"num_heads=0 must be >= 1"),
        bf16_rtol=0.05, bf16_why=_BF16_LINEAR + "; the per-channel decay is computed in float32"),
    *_variants(lambda c: Mechanism(
        f"linear{'' if c else '_bidir'}", ah.LinearAttention, {"dim": D, "num_heads": 4,
                                                               "causal": c},
        causal=c, full=True, call=_LINEAR_CALL, impls=LINEAR_IMPLS, cpu_impls=LINEAR_IMPLS,
        bad_calls=_bad_state((B, 4, 8, 9)) if c else (),
        bad_config=({"dim": 30}, r"dim=30 must be divisible by num_heads=4"),
        bf16_why="elu + 1 feature maps and the sums in float32; the bf16 projections and the "
                 "division by the normaliser remain")),
]
BY_ID = {m.id: m for m in MECHANISMS}
assert len(BY_ID) == len(MECHANISMS)
assert len({m.cls for m in MECHANISMS}) == 20  # every mechanism of the package is declared


def rngs(seed: int = 1) -> dict[str, jax.Array]:
    return {"params": jax.random.key(seed), "slots": jax.random.key(seed + 1),
            "mask": jax.random.key(seed + 2)}


@functools.cache
def variables(mech_id: str):
    """Float32 variables of a declaration's module, initialised once per process (one jit: far
    cheaper than dispatching init's ops one by one)."""
    m = BY_ID[mech_id]
    module = m.make()
    return jax.jit(lambda x: module.init(rngs(), x, **m.fixed(x)))(m.example())


def params(mech_id: str):
    return nn.unbox(variables(mech_id))["params"]

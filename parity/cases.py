"""The configurations ``python -m parity`` reports and the test-suite checks (tests add more)."""

from __future__ import annotations

import math

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


# ----------------------------------------------------------------------------- linear family
#
# transformers' torch layers (their pure-torch fallbacks: no fla / triton here) and the oracles
# of ``parity.oracles``, tiny: batch 2, T = 13, the chunked forms with chunk 8.

LINEAR_CHUNK = 8


def linear_impl() -> str:
    """The impl the report's linear rows run: ``auto`` (chunk on CPU) once the ``gated_delta``
    op has it, else ``recurrent``."""
    from attnhut_jax import core

    z = jnp.zeros((1, 2, 1, 2), jnp.float32)
    try:
        core.gated_delta_rule(z, z, z, jnp.zeros((1, 2, 1)), jnp.ones((1, 2, 1)), impl="auto",
                              chunk_size=LINEAR_CHUNK, owner="parity")
    except NotImplementedError:
        return "recurrent"
    return "auto"


def _randomise(layer: torch.nn.Module, names: tuple[str, ...], scale: float = 0.3):
    """Move parameters off their constant initialisation, so their gradients test something."""
    with torch.no_grad():
        for name in names:
            p = layer.get_parameter(name)
            p.add_(scale * torch.randn_like(p))
    return layer


def qwen_gdn(cls_name: str = "Qwen3_5GatedDeltaNet", hidden_size: int = 16, hk: int = 2,
             hv: int = 4, head_qk_dim: int = 8, head_v_dim: int = 6, conv_size: int = 4):
    """A seeded transformers Gated DeltaNet (``Qwen3_5GatedDeltaNet`` or
    ``Qwen3NextGatedDeltaNet``), ``dt_bias`` and the norm's weight moved off their constants."""
    from transformers.models.qwen3_5 import modeling_qwen3_5
    from transformers.models.qwen3_next import modeling_qwen3_next

    import attnhut_jax as ah

    from .convert import qwen_text_config

    shape = ah.GatedDeltaNet(hidden_size, hk, hv, head_qk_dim, head_v_dim, conv_size=conv_size)
    if cls_name == "Qwen3_5GatedDeltaNet":
        layer = modeling_qwen3_5.Qwen3_5GatedDeltaNet(
            qwen_text_config("Qwen3_5TextConfig", shape), 0)
    else:
        layer = modeling_qwen3_next.Qwen3NextGatedDeltaNet(
            qwen_text_config("Qwen3NextConfig", shape), 0)
    return _randomise(layer, ("dt_bias", "norm.weight"))


def init_kimi_forget_gate(layer: torch.nn.Module) -> None:
    """``KimiLinearPreTrainedModel._init_weights`` for the forget gate (the constructor leaves
    ``A_log`` and ``dt_bias`` as ``torch.empty``): A_log = log U(1, 16); dt_bias = the inverse
    softplus of dt = exp(U(log 1e-3, log 1e-1)) clamped at >= 1e-4."""
    fg = layer.forget_gate
    with torch.no_grad():
        fg.A_log.copy_(torch.empty_like(fg.A_log).uniform_(1.0, 16.0).log())
        dt = torch.empty_like(fg.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        dt = dt.clamp_min(1e-4)
        fg.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def kimi_delta(hidden_size: int = 16, num_heads: int = 2, head_dim: int = 8, conv_size: int = 4):
    """A seeded ``KimiLinearDeltaAttention``, its forget gate initialised as HF's model does."""
    from transformers import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention

    config = KimiLinearConfig(hidden_size=hidden_size, linear_num_heads=num_heads,
                              linear_head_dim=head_dim, linear_conv_kernel_dim=conv_size,
                              rms_norm_eps=1e-6, num_hidden_layers=1,
                              layer_types=["linear_attention"])
    layer = KimiLinearDeltaAttention(config, layer_idx=0)
    init_kimi_forget_gate(layer)
    return _randomise(layer, ("o_norm.weight",))


def logsigmoid_gdn(gate_normalizer: float = 1.0):
    """The oracle GDN with d9d's gate g = log_sigmoid(a) / gate_normalizer (1: d9d's own)."""
    from . import oracles

    layer = oracles.GatedDeltaNet(16, 2, 4, 8, 6, decay_gate="logsigmoid",
                                  gate_normalizer=gate_normalizer)
    return _randomise(layer, ("norm.weight",))


def hf_cache(layer: torch.nn.Module, state: torch.Tensor, *, replay: bool = True):
    """A real transformers ``Cache`` of one linear-attention layer holding ``state`` as its
    recurrent state and a zero conv tail (so the HF layer's conv starts from zeros, as ours does).

    ``replay=False``: the stock ``LinearAttentionLayer``; a forward advances it, the new state is
    ``cache.get_recurrent_state(0)``. ``replay=True`` (for comparisons): a ``LinearAttentionLayer``
    whose every multi-token forward starts again from ``state`` (the conv tail and the state are
    read, never written) and which keeps the state after the latest forward as
    ``cache.layers[0].final_state``, by reference: the stock layer ``copy_``s it in place into
    the tensor autograd saved, so no backward could run through the initial state, and one cache
    serves any number of forwards (timing, gradients).
    """
    from transformers.cache_utils import Cache, LinearAttentionLayer

    class ReplayingLayer(LinearAttentionLayer):
        def update_conv_state(self, conv_states, state_idx=0, **kwargs):
            return torch.cat([self.conv_states[state_idx], conv_states], dim=-1)

        def update_recurrent_state(self, recurrent_states, state_idx=0, **kwargs):
            self.final_state = recurrent_states
            return recurrent_states

    conv = torch.zeros(state.shape[0], layer.conv_dim, layer.conv_kernel_size)
    cache = Cache(layers=[LinearAttentionLayer()])
    cache.update_conv_state(conv, 0)
    cache.update_recurrent_state(state, 0)
    if replay:
        stock = cache.layers[0]
        replaying = ReplayingLayer()
        replaying.__dict__.update(stock.__dict__)
        replaying.recurrent_states = {0: state}
        replaying.final_state = None
        cache.layers[0] = replaying
    return cache


def initial_state_call(state_shape: tuple[int, ...], hf: bool):
    """``Case.call`` passing a seeded initial state (B, heads, key width, value width): to the HF
    layer through ``hf_cache``, to the oracles and to ours as ``initial_state``."""

    def call(rng, tm):
        s0 = (0.5 * rng.standard_normal(state_shape)).astype(np.float32)
        torch_kw = ({"cache": hf_cache(tm, torch.from_numpy(s0.copy()))} if hf
                    else {"initial_state": torch.from_numpy(s0)})
        return torch_kw, {"initial_state": jnp.asarray(s0)}

    return call


def linear_cases(impl: str) -> list[Case]:
    from . import oracles

    shape = (2, 13, 16)
    fields = {"impl": impl, "chunk_size": LINEAR_CHUNK}
    tag = f" [{impl}]"

    def c(name, config, make, **kw):
        return Case(name, config + tag, make, shape, jax_fields=fields, scaled=True, **kw)

    gdn_state, kda_state, la_state = (2, 4, 8, 6), (2, 2, 8, 8), (2, 2, 8, 9)
    return [
        c("GatedDeltaNet", "Qwen3.5 hk2 hv4 K8 V6", qwen_gdn),
        c("GatedDeltaNet", "Qwen3.5 hk2 hv4 K8 V6 +s0", qwen_gdn,
          call=initial_state_call(gdn_state, hf=True)),
        c("GatedDeltaNet", "Qwen3-Next hk2 hv4 K8 V6 +s0",
          lambda: qwen_gdn("Qwen3NextGatedDeltaNet"), call=initial_state_call(gdn_state, True)),
        c("GatedDeltaNet", "logsigmoid hk2 hv4 K8 V6", logsigmoid_gdn),
        c("GatedDeltaNet", "logsigmoid/16 hk2 hv4 +s0",
          lambda: logsigmoid_gdn(16.0), call=initial_state_call(gdn_state, hf=False)),
        c("KimiDeltaAttention", "Kimi Linear N2 H8", kimi_delta),
        c("KimiDeltaAttention", "Kimi Linear N2 H8 +s0", kimi_delta,
          call=initial_state_call(kda_state, hf=True)),
        c("LinearAttention", "d16 h2 causal bias",
          lambda: oracles.LinearAttention(16, 2, causal=True, bias=True)),
        c("LinearAttention", "d16 h2 causal +s0",
          lambda: oracles.LinearAttention(16, 2, causal=True),
          call=initial_state_call(la_state, hf=False)),
        c("LinearAttention", "d16 h2 bidirectional",
          lambda: oracles.LinearAttention(16, 2, causal=False)),
    ]


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
    *linear_cases(linear_impl()),
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

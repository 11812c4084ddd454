"""DeepSeek-V3 MLA and DeepSeek-V3.2 DSA from transformers' torch layers (float32, CPU, eager).

The converted ``MultiHeadLatentAttention`` called as ``apply(variables, x)`` (positions 0..T-1,
causal) against ``DeepseekV3Attention`` / ``DeepseekV32Attention`` called with their model's
rotary embedding at those positions and an additive causal mask: outputs within 1e-5 and
gradients of every parameter and the input within 1e-4 (relative to scale); YaRN at positions
far past ``original_max_position_embeddings``; decode == the layer's own cached generation
(``DynamicCache``); refusals by name. V3.2's selection has no ties at the k-th score on these
inputs (asserted: a tie would make either side's pick arbitrary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV32Config, DynamicCache
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3
from transformers.models.deepseek_v32 import modeling_deepseek_v32 as v32

from parity import hf

B, T, D = 2, 13, 32
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "rope_theta": 10000.0}
COMMON = dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=8,
              qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, num_hidden_layers=1,
              vocab_size=64, intermediate_size=16, moe_intermediate_size=16,
              max_position_embeddings=128)

CASES = {
    "v3": (v3, lambda **kw: DeepseekV3Config(q_lora_rank=12, **{**COMMON, **kw})),
    "v3_full_rank_q_half_rope": (v3, lambda **kw: DeepseekV3Config(
        q_lora_rank=None, rope_interleave=False, **{**COMMON, **kw})),
    "v3_yarn": (v3, lambda **kw: DeepseekV3Config(q_lora_rank=12, rope_parameters=dict(YARN),
                                                  **{**COMMON, **kw})),
    "v32_yarn": (v32, lambda **kw: DeepseekV32Config(
        q_lora_rank=12, rope_parameters=dict(YARN), index_topk=5, index_n_heads=3,
        index_head_dim=8, **{**COMMON, **kw})),
}


def _layer(case, seed=0):
    mod, make = CASES[case]
    config = make()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = mod.DeepseekV3Attention if mod is v3 else mod.DeepseekV32Attention
    layer = cls(config, 0).float()
    with torch.no_grad():  # norms away from their ones / zeros init
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight")
                        else 0.3 * torch.randn_like(p))
    rotary = (v3.DeepseekV3RotaryEmbedding if mod is v3 else v32.DeepseekV32RotaryEmbedding)(
        config)
    return layer, rotary


def _mask(t, s=None):
    s = t if s is None else s
    keep = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None].expand(B, 1, t, s)


def _module(config):
    """The module ``parity.hf`` builds for layer 0 of this config (a dict or config object)."""
    c = hf.HFConfig(config)
    return hf.arch_for_layer(c, 0).module(c, 0)


def _close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err, scale = np.abs(got - want).max(), max(1.0, np.abs(want).max())
    assert err <= tol * scale, f"{what}: {err:.3g} > {tol} * {scale:.3g}"


def _selection_margin(layer, rotary, x, pos):
    """The smallest gap between the k-th and (k+1)-th index score of any query with more than
    k visible keys, from transformers' own indexer arithmetic: a gap of 0 is a tie, which either
    side may break its own way."""
    ind = layer.indexer
    t, k, r = x.shape[1], ind.index_topk, ind.qk_rope_head_dim
    with torch.no_grad():
        cos, sin = rotary(x, pos)
        q = ind.wq_b(layer.q_a_layernorm(layer.q_a_proj(x))).view(B, t, ind.n_heads, -1)
        key = ind.k_norm(ind.wk(x)).unsqueeze(2)
        qr, kr = v32.apply_rotary_pos_emb(q[..., :r], key[..., :r], cos, sin, unsqueeze_dim=2)
        q, key = torch.cat([qr, q[..., r:]], -1), torch.cat([kr, key[..., r:]], -1).squeeze(2)
        s = torch.relu(q @ key.transpose(-1, -2).unsqueeze(1) * ind.softmax_scale)
        w = ind.weights_proj(x) * ind.n_heads ** -0.5
        scores = (w.unsqueeze(-2) @ s).squeeze(-2) + _mask(t)[:, 0]
        top = scores.sort(-1, descending=True).values
    return float((top[:, k:, k - 1] - top[:, k:, k]).min())


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_transformers(case):
    layer, rotary = _layer(case)
    fm, variables = hf.from_hf(layer)
    offset = 100 if "yarn" in case else 0  # far past original_max_position_embeddings=16
    pos = torch.arange(T)[None].expand(B, T) + offset
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    cos, sin = rotary(x, pos)
    want = layer(x, (cos, sin), _mask(T))[0]
    cot = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    (want * cot).sum().backward()
    xj = jnp.asarray(x.detach().numpy())
    posj = jnp.asarray(pos.numpy(), jnp.int32)

    def f(params, x):
        return fm.apply({"params": params}, x, positions=posj)

    got = jax.jit(f)(variables["params"], xj)
    _close(got, want.detach().numpy(), 1e-5, f"{case} output")
    if fm.index_top_k:  # no tie at the k-th score: both sides pick the same keys
        assert _selection_margin(layer, rotary, x, pos) > 1e-4
    g_params, g_x = jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) * jnp.asarray(cot.numpy())),
                                     (0, 1)))(variables["params"], xj)
    _close(g_x, x.grad.numpy(), 1e-4, f"{case} input grad")
    torch_grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p))
                   for k, p in layer.named_parameters()}
    mapped = hf.state_dict_to_hf(hf.ARCHS[type(layer).__name__], fm, {"params": g_params})
    assert set(mapped) == set(torch_grads)
    for k, g in mapped.items():
        _close(g, torch_grads[k].numpy(), 1e-4, f"{case} grad {k}")


@pytest.mark.parametrize("case", ["v3_yarn", "v32_yarn"])
def test_decode_equals_transformers_cached_generation(case):
    layer, rotary = _layer(case, seed=6)
    fm, variables = hf.from_hf(layer)
    steps = 9
    x = torch.randn(B, steps, D, generator=torch.Generator().manual_seed(7))
    if fm.index_top_k:  # seed 3 has a tie at step 6: transformers' own decode != its prefill
        assert _selection_margin(layer, rotary, x, torch.arange(steps)[None].expand(B, -1)) > 1e-4
    cache = DynamicCache(config=layer.config)
    want = []
    with torch.no_grad():
        for t in range(steps):
            pos = torch.full((B, 1), t)
            out = layer(x[:, t:t + 1], rotary(x, pos), _mask(1, t + 1), cache=cache,
                        position_ids=pos)[0]
            want.append(out.numpy())
    dec = fm.clone(decode=True)
    state = dec.init(jax.random.key(0), jnp.zeros((B, steps, D)))
    step = jax.jit(lambda c, xt: dec.apply({"params": variables["params"], "cache": c}, xt,
                                           mutable=["cache"]))
    c = state["cache"]
    for t in range(steps):
        out, s = step(c, jnp.asarray(x[:, t:t + 1].numpy()))
        c = s["cache"]
        _close(out, want[t], 1e-5, f"{case} step {t}")


def test_round_trip_to_hf():
    layer, _ = _layer("v32_yarn")
    fm, variables = hf.from_hf(layer)
    fresh, _ = _layer("v32_yarn", seed=9)
    hf.to_hf(fm, variables, fresh)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v.numpy())


@pytest.mark.parametrize("change, match", [
    (dict(attention_bias=True), r"attention_bias=True"),
    (dict(attention_dropout=0.1), r"attention_dropout=0.1"),
    (dict(num_key_value_heads=2), r"num_key_value_heads=2 != num_attention_heads=4"),
    (dict(rope_parameters={"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}),
     r"RoPE scaling type 'longrope' is not implemented"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "mscale_all_dim": 1.0,
                           "rope_theta": 1e4}), r"mscale_all_dim=1.0 is YaRN's; type='linear'"),
])
def test_refusals_name_the_field(change, match):
    config = {**COMMON, "q_lora_rank": 12, "model_type": "deepseek_v3", **change}
    with pytest.raises(ValueError, match=match):
        _module(config)


def test_unknown_state_keys_are_refused():
    layer, _ = _layer("v3")
    fm = _module(layer.config)
    state = dict(layer.state_dict())
    state["q_a_proj.bias"] = torch.zeros(12)
    with pytest.raises(ValueError, match=r"q_down.bias"):
        hf.variables_from_hf(hf.ARCHS["DeepseekV3Attention"], fm, state)


@pytest.mark.parametrize("case", ["v3_yarn", "v32_yarn"])
def test_load_hf_layer_reads_a_checkpoint(case, tmp_path):
    """A tiny model written by ``save_pretrained`` (two layers): layer 1 read from its files
    without torch's loader equals ``from_hf`` of the live layer."""
    import transformers

    _, make = CASES[case]
    config = make(num_hidden_layers=2, first_k_dense_replace=2)
    torch.manual_seed(0)
    cls = (transformers.DeepseekV3ForCausalLM if case.startswith("v3_")
           else transformers.DeepseekV32ForCausalLM)
    model = cls(config).float()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    fm, variables = hf.load_hf_layer(tmp_path, layer=1)
    want_fm, want = hf.from_hf(model.model.layers[1].self_attn)
    assert fm == want_fm
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(want),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

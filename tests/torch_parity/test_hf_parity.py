"""Hugging Face transformers' attention layers against their conversions (``parity.hf``; float32,
CPU).

- Forward and gradients: each layer, seeded and moved off its constant initialisation, run by
  transformers with ``position_embeddings`` from its model's rotary class at the same positions
  and the model's own 4-D additive causal mask (``masking_utils``; sliding for a sliding layer),
  eager attention;
  against ``from_hf``'s module with ``positions``. Llama plain, with attention bias and each
  RoPE scaling (linear, dynamic NTK, YaRN, Llama 3) at positions far beyond the original
  context; Qwen3 (QK-norm, head_dim != hidden / heads, a sliding layer); gpt-oss (sink logits,
  biases; a sliding and a full layer); Qwen3-Next and Qwen3.5 (output gate, zero-centred
  QK-norm, partial RoPE); Qwen3.5's Gated DeltaNet and Kimi Delta Attention through ``from_hf``.
  Batch 2, T = 13, window 4. Outputs: max |d| <= 1e-5 max(1, max |ref|); gradients of the input
  and of every parameter (a fixed random cotangent): max |d| <= 1e-4 max(1, max |ref|).
- Decoding: the converted Llama layer with ``decode=True`` (a prompt, then token by token)
  against the layer run with a ``transformers.DynamicCache``.
- RoPE tables: ``core.rope_inverse_frequencies`` / ``rope_tables`` read through the converter's
  config reader against ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS``.
- ``to_hf`` round trip; ``load_hf_layer`` on tiny model directories written by
  ``save_pretrained`` (sharded, bf16, Qwen3.5's ``model.language_model`` prefix, Kimi's
  checkpoint layout), equal to ``from_hf`` of the model's layer, also where torch cannot be
  imported; a ``config.json`` that omits fields reads as transformers' config class reads it;
  refusals name the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss
from transformers.models.llama import modeling_llama as llama
from transformers.models.qwen3 import modeling_qwen3 as qwen3
from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen35
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3n

from attnhut_jax import core
from parity import from_hf, load_hf_layer, to_hf
from parity.cases import kimi_delta, qwen_gdn
from parity.convert import to_state_dict
from parity.hf import ARCHS, HFConfig, _rope, arch_for_layer, state_dict_to_hf

B, T, D = 2, 13, 32
WINDOW = 4
OFFSET = 190  # scaled-RoPE cases: positions 190..202, far past the original 32
OUT_TOL, GRAD_TOL = 1e-5, 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ----------------------------------------------------------------------------- configs

SIZES = dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, intermediate_size=16,
             num_hidden_layers=2, vocab_size=16)


def _eager(config):
    config._attn_implementation = "eager"
    return config


def llama_config(**kw):
    return _eager(transformers.LlamaConfig(**{**SIZES, "head_dim": 8, **kw}))


def qwen3_config(**kw):
    return _eager(transformers.Qwen3Config(**{**SIZES, "head_dim": 16, **kw}))


def gpt_oss_config(**kw):
    return _eager(transformers.GptOssConfig(**{**SIZES, "head_dim": 16, "sliding_window": WINDOW,
                                               "num_local_experts": 2, "num_experts_per_tok": 1,
                                               **kw}))


HYBRID = dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=8, linear_value_head_dim=8,
              layer_types=["linear_attention", "full_attention"])


def qwen3_next_config(**kw):
    return _eager(transformers.Qwen3NextConfig(**{**SIZES, **HYBRID, "num_experts": 2,
                                                  "num_experts_per_tok": 1,
                                                  "moe_intermediate_size": 8,
                                                  "shared_expert_intermediate_size": 8, **kw}))


def qwen35_config(**kw):
    return _eager(transformers.Qwen3_5TextConfig(**{**SIZES, **HYBRID, **kw}))


def _randomise(layer: torch.nn.Module) -> torch.nn.Module:
    """Every parameter off its initialisation: N(0, 0.2) (sink logits N(0, 1)), RMSNorm weights
    around their identity (1 + N(0, 0.3), zero-centred ones N(0, 0.3))."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                zero_centred = not torch.all(p == 1)
                p.copy_((0.0 if zero_centred else 1.0) + 0.3 * torch.randn_like(p))
            elif name == "sinks":
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return layer


@dataclasses.dataclass(frozen=True)
class Layer:
    make: Callable[[], torch.nn.Module]  # the seeded layer
    rotary: Callable[[object], torch.nn.Module] | None  # its model's rotary class (None: linear)
    window: int | None = None
    offset: int = 0  # first position


def attention(cls, config, idx, rotary, **kw) -> Layer:
    return Layer(lambda: _randomise(cls(config(), idx)), rotary, **kw)


def rope(rope_type, **kw):
    """A Llama config with a scaled RoPE of original context 32 (head_dim 16 wavelengths fall in
    all of Llama 3's bands and YaRN's ramp)."""
    params = {"rope_type": rope_type, "rope_theta": 10000.0, **kw}
    if rope_type == "dynamic":  # dynamic NTK grows past max_position_embeddings
        return lambda: llama_config(head_dim=16, max_position_embeddings=32,
                                    rope_parameters=params)
    params.setdefault("original_max_position_embeddings", 32)
    return lambda: llama_config(head_dim=16, max_position_embeddings=256, rope_parameters=params)


LA, QW, GO = llama.LlamaAttention, qwen3.Qwen3Attention, gpt_oss.GptOssAttention
LAYERS = {
    "llama": attention(LA, llama_config, 1, llama.LlamaRotaryEmbedding),
    "llama-bias-hd16": attention(LA, lambda: llama_config(head_dim=16, attention_bias=True), 1,
                                 llama.LlamaRotaryEmbedding),
    "llama-linear": attention(LA, rope("linear", factor=4.0), 0, llama.LlamaRotaryEmbedding,
                              offset=OFFSET),
    "llama-dynamic": attention(LA, rope("dynamic", factor=4.0), 0, llama.LlamaRotaryEmbedding,
                               offset=OFFSET),
    "llama-yarn": attention(LA, rope("yarn", factor=8.0), 0, llama.LlamaRotaryEmbedding,
                            offset=OFFSET),
    "llama-llama3": attention(LA, rope("llama3", factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0), 0, llama.LlamaRotaryEmbedding,
                              offset=OFFSET),
    "qwen3-hd16": attention(QW, qwen3_config, 1, qwen3.Qwen3RotaryEmbedding),
    "qwen3-sliding": attention(QW, lambda: qwen3_config(use_sliding_window=True,
                                                        sliding_window=WINDOW,
                                                        max_window_layers=1), 1,
                               qwen3.Qwen3RotaryEmbedding, window=WINDOW),
    "gpt-oss-sliding": attention(GO, gpt_oss_config, 0, gpt_oss.GptOssRotaryEmbedding,
                                 window=WINDOW),
    "gpt-oss-full": attention(GO, gpt_oss_config, 1, gpt_oss.GptOssRotaryEmbedding),
    "qwen3-next-partial": attention(qwen3n.Qwen3NextAttention, qwen3_next_config, 1,
                                    qwen3n.Qwen3NextRotaryEmbedding),
    "qwen3.5-partial": attention(qwen35.Qwen3_5Attention,
                                 lambda: qwen35_config(partial_rotary_factor=0.5), 1,
                                 qwen35.Qwen3_5TextRotaryEmbedding),
    "gdn-qwen3.5": Layer(lambda: qwen_gdn("Qwen3_5GatedDeltaNet", hidden_size=D), None),
    "kda-kimi": Layer(lambda: kimi_delta(hidden_size=D), None),
}


# ----------------------------------------------------------------------------- running


def hf_mask(q: int, s: int, start: int = 0) -> torch.Tensor:
    """(B, 1, q, s) additive causal mask of a decode chunk: query i (at position start + i) sees
    keys j <= start + i (finfo.min elsewhere, as transformers' eager masks)."""
    keep = torch.arange(s)[None, :] <= torch.arange(q)[:, None] + start
    mask = torch.zeros(q, s).masked_fill(~keep, torch.finfo(torch.float32).min)
    return mask[None, None].expand(B, 1, q, s)


def hf_names(layer: torch.nn.Module, fm: nn.Module, params) -> dict[str, np.ndarray]:
    """A Flax tree named as the layer's state dict (the converter's own map)."""
    arch = next(a for a in ARCHS.values() if a.hf_class.endswith(type(layer).__qualname__))
    if arch.linear:
        return to_state_dict(fm, {"params": params}, type(layer))
    return state_dict_to_hf(arch, fm, {"params": params})


def _close(got: np.ndarray, ref: np.ndarray, tol: float) -> tuple[bool, float]:
    err = float(np.max(np.abs(got - ref), initial=0.0)) if got.shape == ref.shape else np.inf
    return err <= tol * max(1.0, float(np.max(np.abs(ref), initial=0.0))), err


@functools.cache
def reference(name: str):
    """The layer, its conversion, input, cotangent, and transformers' output and gradients."""
    spec = LAYERS[name]
    torch.manual_seed(0)
    layer = spec.make().float()
    fm, variables = from_hf(layer)
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((B, T, D), dtype=np.float32)
    cot = rng.standard_normal((B, T, D), dtype=np.float32)
    positions = spec.offset + np.arange(T)
    x = torch.from_numpy(x_np).requires_grad_(True)
    if spec.rotary is None:
        out = layer(x)
    else:
        config = layer.config
        pos = torch.from_numpy(positions)[None].expand(B, T)
        cos, sin = spec.rotary(config)(x, pos)  # fresh: dynamic NTK keeps state across calls
        make_mask = create_causal_mask if spec.window is None else (
            create_sliding_window_causal_mask)  # the model's own masks (eager: additive, 4-D)
        mask = make_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None,
                         position_ids=pos)
        assert mask.shape == (B, 1, T, T) and getattr(layer, "sliding_window", None) == (
            spec.window)
        out, _ = layer(x, position_embeddings=(cos, sin), attention_mask=mask)
    (out * torch.from_numpy(cot)).sum().backward()
    grads = {"input": x.grad.numpy()}
    for pname, p in layer.named_parameters():
        grads[pname] = p.grad.numpy()
    return dict(layer=layer, fm=fm, params=nn.unbox(variables)["params"], x=x_np, cot=cot,
                positions=np.broadcast_to(positions, (B, T)).astype(np.int32),
                offset=spec.offset, out=out.detach().numpy(), grads=grads)


def run_jax(ref: dict):
    fm = ref["fm"]
    kw = {"positions": jnp.asarray(ref["positions"])} if ref["offset"] else {}

    @jax.jit
    def fwd_bwd(p, x):
        out, vjp = jax.vjp(lambda p, x: fm.apply({"params": p}, x, **kw), p, x)
        return out, vjp(jnp.asarray(ref["cot"]))

    out, (gp, gx) = fwd_bwd(ref["params"], jnp.asarray(ref["x"]))
    return np.asarray(out), {"input": np.asarray(gx), **hf_names(ref["layer"], fm, gp)}


def check(ref: dict) -> None:
    out, grads = run_jax(ref)
    ok, err = _close(out, ref["out"], OUT_TOL)
    assert ok, f"output max |d| = {err:.3e}"
    assert set(grads) == set(ref["grads"]), (sorted(grads), sorted(ref["grads"]))
    bad = {}
    for k, want in ref["grads"].items():
        ok, err = _close(np.asarray(grads[k], np.float32), want, GRAD_TOL)
        if not ok:
            bad[k] = err
    assert not bad, f"gradients out of tolerance: {bad}"


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_and_gradients(name):
    check(reference(name))


def test_the_conversions_use_the_options():
    """What each case converts to (so a case cannot pass by converting to something simpler)."""
    fms = {name: reference(name)["fm"] for name in
           ("llama-yarn", "qwen3-sliding", "gpt-oss-sliding", "gpt-oss-full",
            "qwen3-next-partial", "qwen3.5-partial")}
    assert fms["llama-yarn"].rope_scaling.type == "yarn"
    assert (fms["qwen3-sliding"].window, fms["qwen3-sliding"].qk_norm) == (WINDOW, True)
    assert fms["gpt-oss-sliding"].window == WINDOW and fms["gpt-oss-full"].window is None
    assert fms["gpt-oss-full"].num_sink_logits == 4 and fms["gpt-oss-full"].bias
    assert fms["gpt-oss-full"].rope_scaling.type == "yarn"
    for name, r in (("qwen3-next-partial", 4), ("qwen3.5-partial", 8)):
        fm = fms[name]
        assert (fm.rope_dim, fm.output_gate, fm.qk_norm_zero_centered) == (r, True, True), name
    assert reference("qwen3-hd16")["fm"].width == 16


def test_the_comparison_can_fail():
    """One weight off by 0.1 %: the check must fail."""
    ref = dict(reference("gpt-oss-full"))
    params = jax.tree_util.tree_map(lambda a: a, ref["params"])
    params["proj"] = dict(params["proj"], kernel=params["proj"]["kernel"] * 1.001)
    ref["params"] = params
    with pytest.raises(AssertionError, match="output max"):
        check(ref)


def test_decode_matches_cached_generation():
    """``decode=True`` fed a 5-token prompt and then token by token == the Llama layer run step
    by step with a ``DynamicCache`` and the position embeddings of each step."""
    torch.manual_seed(0)
    config = llama_config(head_dim=16)
    layer = _randomise(llama.LlamaAttention(config, 0)).eval()
    fm, variables = from_hf(layer)
    dec = fm.clone(decode=True)
    steps, max_len = 9, 12
    x = np.random.default_rng(2).standard_normal((B, steps, D), dtype=np.float32)
    cache = dec.init(jax.random.key(0), jnp.zeros((B, max_len, D)))["cache"]
    step = jax.jit(lambda c, xs: dec.apply({"params": variables["params"], "cache": c}, xs,
                                           mutable=["cache"]))
    rotary, hf_cache = llama.LlamaRotaryEmbedding(config), transformers.DynamicCache()
    for start, stop in [(0, 5), *[(t, t + 1) for t in range(5, steps)]]:
        xs = torch.from_numpy(x[:, start:stop])
        pos = torch.arange(start, stop)[None].expand(B, -1)
        with torch.no_grad():
            want, _ = layer(xs, position_embeddings=rotary(xs, pos), cache=hf_cache,
                            attention_mask=hf_mask(stop - start, stop, start))
        got, state = step(cache, jnp.asarray(xs.numpy()))
        cache = state["cache"]
        ok, err = _close(np.asarray(got), want.numpy(), OUT_TOL)
        assert ok, f"tokens {start}..{stop - 1}: max |d| = {err:.3e}"
    assert hf_cache.get_seq_length() == steps


# ----------------------------------------------------------------------------- RoPE tables

ROPES = {
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=8.0),
    "yarn-untruncated": dict(rope_type="yarn", factor=8.0, truncate=False),
    "yarn-mscale": dict(rope_type="yarn", factor=8.0, mscale=0.707, mscale_all_dim=1.0,
                        beta_fast=16.0, beta_slow=2.0),
    "yarn-attention-factor": dict(rope_type="yarn", factor=8.0, attention_factor=1.3),
    "yarn-partial": dict(rope_type="yarn", factor=8.0, partial_rotary_factor=0.5),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
    "llama3-partial": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, partial_rotary_factor=0.5),
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_tables_match_transformers(name):
    params = {"rope_theta": 10000.0, **ROPES[name]}
    if params["rope_type"] != "dynamic":
        params.setdefault("original_max_position_embeddings", 32)
    config = llama_config(head_dim=16, max_position_embeddings=32 if name == "dynamic" else 256,
                          rope_parameters=params)
    rope_kw = _rope(HFConfig(config), "test", 16, partial_ok=True)
    r = rope_kw["rope_dim"] or 16
    scaling = rope_kw["rope_scaling"]
    assert scaling.type == params["rope_type"]
    init = ROPE_INIT_FUNCTIONS[params["rope_type"]]
    if name == "dynamic":
        for length in (20, 32, 203):  # below, at and past the original context
            inv, factor = init(config, None, seq_len=length)
            pos = np.arange(length)
            freqs = pos[:, None] * inv.double().numpy()[None]
            emb = np.concatenate([freqs, freqs], axis=-1)
            cos, sin = core.rope_tables(jnp.asarray(pos), r, 10000.0, scaling=scaling)
            np.testing.assert_allclose(np.asarray(cos), np.cos(emb), atol=2e-5)
            np.testing.assert_allclose(np.asarray(sin), np.sin(emb), atol=2e-5)
            assert factor == scaling.attention_scale() == 1.0
        return
    inv, factor = init(config, None)
    ours = core.rope_inverse_frequencies(r, 10000.0, scaling)
    assert inv.shape == ours.shape == (r // 2,)
    np.testing.assert_allclose(ours, inv.double().numpy(), rtol=1e-6)
    assert factor == pytest.approx(scaling.attention_scale(), rel=1e-12)


# ----------------------------------------------------------------------------- to_hf


@pytest.mark.parametrize("name", ["llama-bias-hd16", "qwen3-hd16", "gpt-oss-sliding",
                                  "qwen3-next-partial", "qwen3.5-partial", "gdn-qwen3.5",
                                  "kda-kimi"])
def test_to_hf_round_trip_is_exact(name):
    spec = LAYERS[name]
    torch.manual_seed(0)
    layer = spec.make()
    fm, variables = from_hf(layer)
    torch.manual_seed(1)
    fresh = spec.make()
    assert to_hf(fm, variables, fresh) is fresh
    sa, sb = layer.state_dict(), fresh.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_to_hf_refuses_another_configuration():
    torch.manual_seed(0)
    layer = LAYERS["gpt-oss-sliding"].make()
    fm, variables = from_hf(layer)
    with pytest.raises(ValueError, match="window"):
        to_hf(fm.clone(window=8), variables, layer)
    with pytest.raises(ValueError, match="num_sink_logits"):
        to_hf(fm, variables, LAYERS["llama"].make())
    # runtime fields do not matter
    to_hf(fm.clone(impl="xla", decode=True), variables, layer)


# ----------------------------------------------------------------------------- files


def _save(model: torch.nn.Module, path, **kw) -> str:
    model.save_pretrained(path, **kw)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny two-layer models written by ``save_pretrained``: {name: (directory, model)}."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=D)
    kimi = transformers.KimiLinearConfig(
        **{**SIZES, "num_key_value_heads": 4}, moe_intermediate_size=8, num_local_experts=2,
        num_experts_per_tok=1, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        linear_attn_config={"head_dim": 8, "num_heads": 2, "short_conv_kernel_size": 4,
                            "kda_layers": [1], "full_attn_layers": [2]})
    models = {
        "llama": transformers.LlamaForCausalLM(
            llama_config(head_dim=16, attention_bias=True, rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32})),
        "qwen3-bf16": transformers.Qwen3ForCausalLM(qwen3_config()).to(torch.bfloat16),
        "gpt-oss": transformers.GptOssForCausalLM(gpt_oss_config()),
        "qwen3-next": transformers.Qwen3NextForCausalLM(qwen3_next_config()),
        "qwen3.5": transformers.Qwen3_5ForConditionalGeneration(transformers.Qwen3_5Config(
            text_config=qwen35_config().to_dict(), vision_config=vision)),
        "kimi": transformers.KimiLinearForCausalLM(kimi),
    }
    out = {}
    for name, model in models.items():
        for layer in model.modules():  # sinks, the forget gate: torch.empty until init
            for pname in ("sinks",):
                if hasattr(layer, pname):
                    with torch.no_grad():
                        getattr(layer, pname).normal_()
        kw = {"max_shard_size": "20KB"} if name == "llama" else {}
        out[name] = (_save(model, root / name, **kw), model)
    return out


def _layers(model):
    inner = model.model
    return (inner.language_model if hasattr(inner, "language_model") else inner).layers


def _attn(model, i):
    block = _layers(model)[i]
    return getattr(block, "linear_attn", None) or block.self_attn


def flat(variables) -> dict[str, np.ndarray]:
    """{"q/kernel": array, ...} of a variables tree."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(a)
            for path, a in jax.tree_util.tree_flatten_with_path(nn.unbox(variables))[0]}


def _assert_same(a, b):
    fa, va = a
    fb, vb = b
    assert fa == fb
    jax.tree_util.tree_map(np.testing.assert_array_equal, nn.unbox(va), nn.unbox(vb))


@pytest.mark.parametrize("name, i", [("llama", 1), ("qwen3-bf16", 1), ("gpt-oss", 0),
                                     ("gpt-oss", 1), ("qwen3-next", 0), ("qwen3-next", 1),
                                     ("qwen3.5", 0), ("qwen3.5", 1), ("kimi", 0)])
def test_load_hf_layer_equals_from_hf(checkpoints, name, i):
    path, model = checkpoints[name]
    _assert_same(load_hf_layer(path, layer=i), from_hf(_attn(model, i)))


def test_load_hf_layer_files_and_configs(checkpoints):
    path, model = checkpoints["llama"]
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))  # sharded
    want = from_hf(_attn(model, 1))
    _assert_same(load_hf_layer(path, 1, config=model.config), want)
    gpt_path, gpt_model = checkpoints["gpt-oss"]
    with open(os.path.join(gpt_path, "config.json")) as f:
        config = json.load(f)
    single = os.path.join(gpt_path, "model.safetensors")
    _assert_same(load_hf_layer(single, 0, config=config), from_hf(_attn(gpt_model, 0)))
    with pytest.raises(ValueError, match="layer=2 is not a layer"):
        load_hf_layer(path, 2)
    kimi_path, _ = checkpoints["kimi"]
    with pytest.raises(ValueError, match="MLA"):
        load_hf_layer(kimi_path, 1)


def test_load_hf_layer_needs_no_torch(checkpoints, tmp_path):
    """The file loader in a process where ``import torch`` fails."""
    cases = [("llama", 1), ("qwen3-bf16", 1), ("qwen3.5", 0), ("kimi", 0)]
    jobs = [(checkpoints[n][0], i, str(tmp_path / f"{n}-{i}.npz")) for n, i in cases]
    script = f"""
import sys
sys.modules["torch"] = None
import flax.linen as nn
import jax
import numpy as np
from parity.hf import load_hf_layer
for path, i, out in {jobs!r}:
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(load_hf_layer(path, i)[1]))[0]
    np.savez(out, **{{"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(a)
                     for p, a in leaves}})
"""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for n, i in cases:
        want = flat(from_hf(_attn(checkpoints[n][1], i))[1])
        got = np.load(tmp_path / f"{n}-{i}.npz")
        assert set(got.files) == set(want), (n, i)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("minimal, cls", [
    (dict(model_type="llama", num_hidden_layers=2), transformers.LlamaConfig),
    (dict(model_type="qwen3", num_hidden_layers=4, use_sliding_window=True, sliding_window=4,
          max_window_layers=2), transformers.Qwen3Config),
    (dict(model_type="qwen3", num_hidden_layers=2, sliding_window=4), transformers.Qwen3Config),
    (dict(model_type="gpt_oss", num_hidden_layers=2), transformers.GptOssConfig),
    (dict(model_type="gpt_oss", num_hidden_layers=2, rope_theta=1e6,
          rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                        "truncate": False}), transformers.GptOssConfig),
    (dict(model_type="qwen3_next", num_hidden_layers=4), transformers.Qwen3NextConfig),
    (dict(model_type="qwen3_5_text", num_hidden_layers=4, full_attention_interval=2),
     transformers.Qwen3_5TextConfig),
    (dict(model_type="kimi_linear", num_hidden_layers=5), transformers.KimiLinearConfig),
    (dict(model_type="kimi_linear", num_hidden_layers=4, linear_attn_config={
        "kda_layers": [1, 2, 4], "full_attn_layers": [3], "head_dim": 8, "num_heads": 2,
        "short_conv_kernel_size": 3}), transformers.KimiLinearConfig),
], ids=["llama", "qwen3-sliding", "qwen3-no-sliding", "gpt-oss", "gpt-oss-old-keys",
        "qwen3-next", "qwen3.5", "kimi", "kimi-linear-attn-config"])
def test_a_config_json_missing_fields_reads_as_transformers(minimal, cls):
    """A dict that omits fields (an older ``config.json``) gives, layer by layer, the module
    transformers' config class gives: the defaults table, the layer types, the RoPE dict."""
    minimal = dict(minimal, hidden_size=D, num_attention_heads=4)  # every config.json has them
    from_dict = HFConfig(minimal)
    from_cls = HFConfig(cls(**{k: v for k, v in minimal.items() if k != "model_type"}))
    for i in range(minimal["num_hidden_layers"]):
        assert from_dict.layer_type(i) == from_cls.layer_type(i), i
        if (from_dict.model_type, from_dict.layer_type(i)) == ("kimi_linear", "full_attention"):
            continue  # MLA: not converted here
        a, b = arch_for_layer(from_dict, i), arch_for_layer(from_cls, i)
        assert a is b, i
        assert a.module(from_dict, i) == b.module(from_cls, i), (a.name, i)


# ----------------------------------------------------------------------------- refusals


def test_refusals_name_the_field():
    long_factor = [1.0] * 8
    cases = [
        (lambda: llama_config(head_dim=16, rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "short_factor": long_factor,
            "long_factor": long_factor, "original_max_position_embeddings": 16}),
         llama.LlamaAttention, "longrope"),
        (lambda: llama_config(partial_rotary_factor=0.5), llama.LlamaAttention,
         "partial_rotary_factor=0.5"),
        (lambda: gpt_oss_config(sliding_window=None), gpt_oss.GptOssAttention,
         "sliding_window=None"),
        (lambda: qwen3_config(partial_rotary_factor=0.5), qwen3.Qwen3Attention,
         "partial_rotary_factor"),
        (lambda: qwen3_next_config(partial_rotary_factor=0.1875), qwen3n.Qwen3NextAttention,
         "partial_rotary_factor=0.1875 of head_dim=16 gives a rotary width 3"),
    ]
    for config, cls, match in cases:
        with pytest.raises(ValueError, match=match):
            from_hf(cls(config(), 0))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        from_hf(qwen35.Qwen3_5GatedDeltaNet(qwen35_config(hidden_act="gelu"), 0))
    with pytest.raises(ValueError, match="scaling"):
        layer = llama.LlamaAttention(llama_config(), 0)
        layer.scaling = 0.3
        from_hf(layer)
    # dicts, as a config.json gives them (transformers' classes refuse these themselves)
    dicts = [
        (dict(model_type="llama", num_hidden_layers=1, hidden_size=D, num_attention_heads=4,
              rope_parameters={"rope_type": "ntk-by-parts", "factor": 2.0}), "ntk-by-parts"),
        (dict(model_type="qwen3", num_hidden_layers=1, hidden_size=D, num_attention_heads=4,
              layer_types=["chunked_attention"]), r"layer_types\[0\]='chunked_attention'"),
        (dict(model_type="qwen3_5_text", num_hidden_layers=1, hidden_size=D,
              num_attention_heads=4, layer_types=["full_attention"],
              rope_parameters={"rope_type": "yarn", "factor": 2.0, "mscale_all": 1.0}),
         "mscale_all"),
        (dict(model_type="mixtral", num_hidden_layers=1), "model_type='mixtral'"),
    ]
    for config, match in dicts:
        with pytest.raises(ValueError, match=match):
            load_hf_layer("unused.safetensors", 0, config=config)
    with pytest.raises(TypeError, match="no converter for .*MistralAttention"):
        from transformers.models.mistral.modeling_mistral import MistralAttention

        from_hf(MistralAttention(_eager(transformers.MistralConfig(**SIZES)), 0))

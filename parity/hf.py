"""Hugging Face transformers' attention layers <-> attnhut_jax, with proven parity.

* ``from_hf(layer) -> (flax_module, variables)``: the Flax module computing what a transformers
  attention layer computes, with its weights.
* ``to_hf(flax_module, variables, layer)``: write the Flax weights into a transformers layer of
  the same configuration, in place (returned).
* ``load_hf_layer(path, layer=i, config=None) -> (flax_module, variables)``: read layer ``i`` of
  a model directory (``config.json`` + ``*.safetensors``, sharded or not) without torch.

Each architecture is an ``Arch``: ``module(config, i)`` builds the Flax module of layer ``i``
from a config (a transformers config object or a ``config.json`` dict, read through ``HFConfig``
with transformers 5.24's class defaults for the fields a file may omit), and ``to_rule`` /
``from_rule`` map the layer's own state dict (numpy arrays, the layer's names) to and from the
naming rule of ``parity.naming``. ``from_hf`` and ``load_hf_layer`` share them, so a file and a
live layer give the same module. The softmax layers (Llama, Qwen3, gpt-oss, Qwen3-Next, Qwen3.5)
become ``attnhut_jax.GroupedQueryAttention``, DeepSeek-V3 / V3.2 ``MultiHeadLatentAttention``;
the linear ones (Qwen3.5 / Qwen3-Next Gated
DeltaNet, Kimi Delta Attention) are ``convert``'s ``TorchLayer``s, and ``from_hf`` / ``to_hf``
hand them to ``from_torch`` / ``to_state_dict``.

A config field that changes the layer's math and that attnhut_jax does not implement is refused
with a ``ValueError`` naming it (``docs/huggingface.md`` lists what each converter reads and
refuses). torch is imported by ``from_hf`` / ``to_hf`` only.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import attnhut_jax
from attnhut_jax import core

from . import hf_deepseek, naming
from .naming import SILU_NAMES

Variables = dict[str, Any]

# ----------------------------------------------------------------------------- configs

_YARN_GPT_OSS = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}
_QWEN_HYBRID = dict(num_key_value_heads=None, head_dim=256, attention_bias=False,
                    attention_dropout=0.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    partial_rotary_factor=0.25, rope_theta=10000.0, hidden_act="silu",
                    linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                    linear_num_key_heads=16, linear_num_value_heads=32)

_DEEPSEEK = dict(num_attention_heads=128, num_key_value_heads=128, kv_lora_rank=512,
                 qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
                 attention_bias=False, attention_dropout=0.0, rope_theta=10000.0)

# transformers 5.24's class defaults of the fields read here (a config.json may omit them);
# ``rope_theta`` is the class's ``default_theta``. tests/torch_parity/test_hf_parity.py checks
# them against the classes.
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(num_key_value_heads=None, head_dim=None, attention_bias=False,
                  attention_dropout=0.0, max_position_embeddings=2048, rope_theta=10000.0),
    "qwen3": dict(num_key_value_heads=32, head_dim=128, attention_bias=False,
                  attention_dropout=0.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  rope_theta=10000.0),
    "gpt_oss": dict(num_key_value_heads=8, head_dim=64, attention_bias=True,
                    attention_dropout=0.0, max_position_embeddings=131072, sliding_window=128,
                    rope_theta=150000.0, rope_parameters=_YARN_GPT_OSS),
    "qwen3_next": dict(_QWEN_HYBRID, num_key_value_heads=2),
    "qwen3_5_text": dict(_QWEN_HYBRID, num_key_value_heads=4),
    "kimi_linear": dict(rms_norm_eps=1e-5, hidden_act="silu", linear_head_dim=128,
                        linear_num_heads=32, linear_conv_kernel_dim=4),
    "deepseek_v3": dict(_DEEPSEEK, max_position_embeddings=4096, q_lora_rank=1536,
                        rope_interleave=True),
    "deepseek_v32": dict(_DEEPSEEK, max_position_embeddings=163840, q_lora_rank=1536,
                         index_topk=2048, index_head_dim=128, index_n_heads=64),
}
# configs whose text model is a sub-config
_COMPOSITE = {"qwen3_5": "text_config"}


class HFConfig:
    """A Hugging Face config as transformers reads it: a config object's fields or a
    ``config.json`` dict, a field the dict omits taking its class default (``DEFAULTS``)."""

    def __init__(self, config: Any):
        d = dict(config) if isinstance(config, Mapping) else config.to_dict()
        if d.get("model_type") in _COMPOSITE:
            d = dict(d[_COMPOSITE[d["model_type"]]])
        self.d = d
        self.model_type = d.get("model_type")
        self.defaults = DEFAULTS.get(self.model_type, {})

    def __getitem__(self, name: str) -> Any:
        if name in self.d:
            return self.d[name]
        if name in self.defaults:
            return self.defaults[name]
        raise ValueError(f"{self.model_type} config has no {name!r}")

    def layer_type(self, i: int) -> str:
        """``layer_types[i]``, derived as the config class derives it when the dict has none."""
        n = self.check_layer(i)
        types = self.d.get("layer_types")
        if types is None:
            types = self._default_layer_types(n)
        return types[i]

    def check_layer(self, i: int) -> int:
        """``num_hidden_layers``, after checking that layer ``i`` is one of them."""
        n = int(self["num_hidden_layers"])
        if not 0 <= i < n:
            raise ValueError(f"layer={i} is not a layer of a {n}-layer model")
        return n

    def _default_layer_types(self, n: int) -> list[str]:
        mt = self.model_type
        if mt == "qwen3":
            w = self.sliding_window()
            return ["sliding_attention" if w is not None and i >= self["max_window_layers"]
                    else "full_attention" for i in range(n)]
        if mt == "gpt_oss":
            return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        if mt in ("qwen3_next", "qwen3_5_text"):
            every = self.d.get("full_attention_interval", 4)
            return ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]
        if mt == "kimi_linear":
            lac = self.d.get("linear_attn_config") or {}
            if "full_attn_layers" in lac and "kda_layers" in lac:
                types = [None] * n
                for j in lac["full_attn_layers"]:
                    types[j - 1] = "full_attention"  # 1-indexed in the checkpoint
                for j in lac["kda_layers"]:
                    types[j - 1] = "linear_attention"
                return types
            return ["full_attention" if i and i % 4 == 0 else "linear_attention"
                    for i in range(n)]
        return ["full_attention"] * n

    def sliding_window(self) -> int | None:
        w = self["sliding_window"]
        if self.model_type == "qwen3" and not self["use_sliding_window"]:
            return None
        return w

    def linear(self, name: str) -> Any:
        """Kimi Linear's ``linear_*`` fields: ``linear_attn_config``'s entry wins, as in
        ``KimiLinearConfig``."""
        sub = {"linear_head_dim": "head_dim", "linear_num_heads": "num_heads",
               "linear_conv_kernel_dim": "short_conv_kernel_size"}
        lac = self.d.get("linear_attn_config") or {}
        return lac[sub[name]] if sub.get(name) in lac else self[name]

    def rope_parameters(self) -> dict[str, Any]:
        """The RoPE dict as ``RotaryEmbeddingConfigMixin`` standardises it (``rope_scaling``
        before ``rope_parameters``; top-level ``rope_theta`` / ``partial_rotary_factor`` /
        ``original_max_position_embeddings`` moved in)."""
        rp = dict(self.d.get("rope_scaling") or self.d.get("rope_parameters")
                  or self.defaults.get("rope_parameters") or {})
        nested = sorted(k for k, v in rp.items() if isinstance(v, Mapping))
        if nested:
            raise ValueError(f"{self.model_type}: rope_parameters per layer type {nested} are "
                             f"not converted")
        rp.setdefault("rope_theta", self["rope_theta"])
        partial = self.d.get("partial_rotary_factor", self.defaults.get("partial_rotary_factor"))
        if partial is not None:
            rp.setdefault("partial_rotary_factor", partial)
        kind = rp.setdefault("rope_type", rp.pop("type", "default"))
        if kind in ("llama3", "yarn", "longrope"):
            if "original_max_position_embeddings" in self.d:
                rp["original_max_position_embeddings"] = self.d["original_max_position_embeddings"]
            rp.setdefault("original_max_position_embeddings", self["max_position_embeddings"])
        return rp


# ----------------------------------------------------------------------------- architectures


@dataclasses.dataclass(frozen=True)
class Arch:
    """How one transformers layer class converts.

    ``module(config, i)``: the Flax module of layer ``i``; ``to_rule`` / ``from_rule``: the
    layer's state dict (its own names) to / from the naming rule's; ``hub``: the layer's name
    under ``model.layers.{i}``; ``hub_layout``: a checkpoint's names (``save_pretrained``'s
    layout) -> the layer's; ``linear``: a ``convert.TorchLayer`` (``from_torch`` converts it).
    """

    name: str
    hf_class: str
    module: Callable[[HFConfig, int], nn.Module]
    to_rule: Callable[[nn.Module, dict[str, Any]], dict[str, Any]]
    from_rule: Callable[[nn.Module, dict[str, Any]], dict[str, Any]]
    hub: str = "self_attn"
    hub_layout: Callable[[dict[str, Any]], dict[str, Any]] = dict
    linear: bool = False


def _rope(c: HFConfig, owner: str, h: int, partial_ok: bool, text_keys: tuple[str, ...] = ()
          ) -> dict[str, Any]:
    """``rope_theta`` / ``rope_dim`` / ``rope_scaling`` of a head of width ``h``."""
    rp = c.rope_parameters()
    partial = rp.pop("partial_rotary_factor", None)
    partial = 1.0 if partial is None else float(partial)
    if partial != 1.0 and not partial_ok:
        raise ValueError(f"{owner}: partial_rotary_factor={partial} is not converted: the layer "
                         f"rotates the whole head (transformers ignores the factor under the "
                         f"default RoPE and fails under a scaled one)")
    r = int(h * partial)
    if r < 2 or r % 2:
        raise ValueError(f"{owner}: partial_rotary_factor={partial} of head_dim={h} gives a "
                         f"rotary width {r}; it must be even and >= 2")
    for key in text_keys:  # mRoPE's sections: text positions are equal on every axis
        rp.pop(key, None)
    theta = rp.pop("rope_theta")
    try:
        scaling = core.RopeScaling.from_hf(rp, c["max_position_embeddings"])
    except ValueError as e:
        raise ValueError(f"{owner}: rope_parameters (rope_type={rp.get('rope_type')!r}): "
                         f"{e}") from None
    return dict(rope_theta=float(theta), rope_dim=None if r == h else r, rope_scaling=scaling)


def _window(c: HFConfig, owner: str, i: int) -> int | None:
    kind = c.layer_type(i)
    if kind == "full_attention":
        return None
    if kind != "sliding_attention":
        raise ValueError(f"{owner}: layer_types[{i}]={kind!r} is not converted (known: "
                         f"'full_attention', 'sliding_attention')")
    w = c.sliding_window()
    if w is None:
        raise ValueError(f"{owner}: layer_types[{i}]='sliding_attention' with "
                         f"sliding_window=None")
    return int(w)


def _attention(owner: str, *, qk_norm: bool = False, gated: bool = False, sinks: bool = False,
               windows: bool = False, text_keys: tuple[str, ...] = ()):
    """The ``module`` of a softmax layer: q/k/v/o projections (``attention_bias`` on all four),
    RoPE, scale head_dim ** -0.5, causal; ``qk_norm``: per-head RMSNorm of q and k (``gated``:
    zero-centred, ``1 + weight``); ``gated``: the sigmoid output gate and partial RoPE;
    ``sinks``: per-head sink logits; ``windows``: the sliding window of
    ``layer_types[i] == "sliding_attention"``."""

    def build(c: HFConfig, i: int) -> nn.Module:
        d, n = int(c["hidden_size"]), int(c["num_attention_heads"])
        kv = int(c["num_key_value_heads"] or n)
        h = int(c["head_dim"] or d // n)
        kw: dict[str, Any] = {}
        if qk_norm or gated:
            kw.update(qk_norm=True, qk_norm_eps=float(c["rms_norm_eps"]),
                      qk_norm_zero_centered=gated)
        if sinks:
            kw["num_sink_logits"] = n
        return attnhut_jax.GroupedQueryAttention(
            dim=d, num_heads=n, num_kv_heads=kv, causal=True,
            dropout=float(c["attention_dropout"] or 0.0), bias=bool(c["attention_bias"]),
            head_dim=None if h * n == d else h, output_gate=gated,
            window=_window(c, owner, i) if windows else None,
            **_rope(c, owner, h, partial_ok=gated, text_keys=text_keys), **kw)

    return build


_PROJ = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "proj"}
_PROJ_BACK = {v: k for k, v in _PROJ.items()}


def _attention_to_rule(fm: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    """q_proj/k_proj/v_proj/o_proj -> q/k/v/proj; ``q_norm.weight`` -> ``q_norm`` (a (H,)
    parameter here); a gated layer's ``q_proj`` rows, per head [query H | gate H], split into
    ``q`` and ``gate``. Names not known are left for ``naming.from_rule`` to name."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        mod, _, leaf = key.partition(".")
        if mod in _PROJ and leaf in ("weight", "bias"):
            out[f"{_PROJ[mod]}.{leaf}"] = value
        elif key in ("q_norm.weight", "k_norm.weight"):
            out[mod] = value
        else:
            out[key] = value
    if fm.output_gate:
        n, h = fm.num_heads, fm.width
        for leaf in ("weight", "bias"):
            key = f"q.{leaf}"
            if key in out and out[key].shape[0] == 2 * n * h:
                w = naming.to_numpy(out.pop(key))
                w = w.reshape(n, 2, h, *w.shape[1:])
                out[key] = w[:, 0].reshape(n * h, *w.shape[3:])
                out[f"gate.{leaf}"] = w[:, 1].reshape(n * h, *w.shape[3:])
    return out


def _attention_from_rule(fm: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    sd = dict(sd)
    if fm.output_gate:
        n, h = fm.num_heads, fm.width
        for leaf in ("weight", "bias"):
            if f"gate.{leaf}" in sd:
                q, g = sd.pop(f"q.{leaf}"), sd.pop(f"gate.{leaf}")
                both = np.stack([q.reshape(n, h, *q.shape[1:]), g.reshape(n, h, *g.shape[1:])],
                                axis=1)
                sd[f"q.{leaf}"] = both.reshape(2 * n * h, *q.shape[1:])
    out = {}
    for key, value in sd.items():
        mod, _, leaf = key.partition(".")
        if mod in _PROJ_BACK:
            out[f"{_PROJ_BACK[mod]}.{leaf}"] = value
        elif key in ("q_norm", "k_norm"):
            out[f"{key}.weight"] = value
        else:
            out[key] = value
    return out


def _check_silu(c: HFConfig, owner: str) -> None:
    act = c["hidden_act"]
    if act not in SILU_NAMES:
        raise ValueError(f"{owner}: hidden_act={act!r} is not converted (the short convolution's "
                         f"activation is SiLU here)")


def _gdn(owner: str):
    def build(c: HFConfig, i: int) -> nn.Module:
        _check_silu(c, owner)
        return attnhut_jax.GatedDeltaNet(
            hidden_size=int(c["hidden_size"]), num_query_key_heads=int(c["linear_num_key_heads"]),
            num_value_heads=int(c["linear_num_value_heads"]),
            head_qk_dim=int(c["linear_key_head_dim"]),
            head_v_dim=int(c["linear_value_head_dim"]), norm_eps=float(c["rms_norm_eps"]),
            conv_size=int(c["linear_conv_kernel_dim"]), decay_gate="mamba", use_qk_l2norm=True)

    return build


def _kda(c: HFConfig, i: int) -> nn.Module:
    _check_silu(c, "KimiLinearDeltaAttention")
    return attnhut_jax.KimiDeltaAttention(
        hidden_size=int(c["hidden_size"]), num_heads=int(c.linear("linear_num_heads")),
        head_dim=int(c.linear("linear_head_dim")), conv_size=int(c.linear("linear_conv_kernel_dim")),
        norm_eps=float(c["rms_norm_eps"]))


def _kimi_hub_layout(sd: dict[str, Any]) -> dict[str, Any]:
    """Kimi Linear's checkpoint names -> ``KimiLinearDeltaAttention``'s (transformers'
    ``conversion_mapping``): the forget gate's weights move under ``forget_gate``, the q / k / v
    short convolutions are stacked into ``conv1d``."""
    sd = dict(sd)
    for name in ("f_a_proj.weight", "f_b_proj.weight", "dt_bias", "A_log"):
        if name in sd:
            sd[f"forget_gate.{name}"] = sd.pop(name)
    convs = [f"{x}_conv1d.weight" for x in "qkv"]
    if all(k in sd for k in convs):
        sd["conv1d.weight"] = np.concatenate([naming.to_numpy(sd.pop(k)) for k in convs], axis=0)
    return sd


_T = "transformers.models"
_GATED_TEXT_KEYS = ("mrope_section", "mrope_interleaved")
ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("LlamaAttention", f"{_T}.llama.modeling_llama.LlamaAttention",
         _attention("LlamaAttention"), _attention_to_rule, _attention_from_rule),
    Arch("Qwen3Attention", f"{_T}.qwen3.modeling_qwen3.Qwen3Attention",
         _attention("Qwen3Attention", qk_norm=True, windows=True), _attention_to_rule,
         _attention_from_rule),
    Arch("GptOssAttention", f"{_T}.gpt_oss.modeling_gpt_oss.GptOssAttention",
         _attention("GptOssAttention", sinks=True, windows=True), _attention_to_rule,
         _attention_from_rule),
    Arch("Qwen3NextAttention", f"{_T}.qwen3_next.modeling_qwen3_next.Qwen3NextAttention",
         _attention("Qwen3NextAttention", gated=True), _attention_to_rule, _attention_from_rule),
    Arch("Qwen3_5Attention", f"{_T}.qwen3_5.modeling_qwen3_5.Qwen3_5Attention",
         _attention("Qwen3_5Attention", gated=True, text_keys=_GATED_TEXT_KEYS),
         _attention_to_rule, _attention_from_rule),
    Arch("Qwen3_5GatedDeltaNet", f"{_T}.qwen3_5.modeling_qwen3_5.Qwen3_5GatedDeltaNet",
         _gdn("Qwen3_5GatedDeltaNet"), lambda fm, sd: naming.conv_to_rule(sd),
         lambda fm, sd: naming.conv_from_rule(sd), hub="linear_attn", linear=True),
    Arch("Qwen3NextGatedDeltaNet", f"{_T}.qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet",
         _gdn("Qwen3NextGatedDeltaNet"), naming.next_to_rule, naming.next_from_rule,
         hub="linear_attn", linear=True),
    Arch("DeepseekV3Attention", f"{_T}.deepseek_v3.modeling_deepseek_v3.DeepseekV3Attention",
         lambda c, i: hf_deepseek.module_from_config({**c.defaults, **c.d}, c.rope_parameters()),
         hf_deepseek.to_rule, hf_deepseek.from_rule),
    Arch("DeepseekV32Attention", f"{_T}.deepseek_v32.modeling_deepseek_v32.DeepseekV32Attention",
         lambda c, i: hf_deepseek.module_from_config({**c.defaults, **c.d}, c.rope_parameters()),
         hf_deepseek.to_rule, hf_deepseek.from_rule),
    Arch("KimiLinearDeltaAttention",
         f"{_T}.kimi_linear.modeling_kimi_linear.KimiLinearDeltaAttention", _kda,
         naming.kimi_to_rule, naming.kimi_from_rule, hub_layout=_kimi_hub_layout, linear=True),
]}

# model_type -> (arch of a full-attention layer, arch of a linear-attention layer)
_MODEL_TYPES: dict[str, tuple[str | None, str | None]] = {
    "llama": ("LlamaAttention", None),
    "qwen3": ("Qwen3Attention", None),
    "gpt_oss": ("GptOssAttention", None),
    "qwen3_next": ("Qwen3NextAttention", "Qwen3NextGatedDeltaNet"),
    "qwen3_5_text": ("Qwen3_5Attention", "Qwen3_5GatedDeltaNet"),
    "kimi_linear": (None, "KimiLinearDeltaAttention"),
    "deepseek_v3": ("DeepseekV3Attention", None),
    "deepseek_v32": ("DeepseekV32Attention", None),
}


def arch_for_layer(c: HFConfig, i: int) -> Arch:
    """The ``Arch`` of layer ``i`` of a model of this config."""
    if c.model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type={c.model_type!r} is not converted (known: "
                         f"{sorted(_MODEL_TYPES)}, and {sorted(_COMPOSITE)})")
    full, linear = _MODEL_TYPES[c.model_type]
    c.check_layer(i)
    kind = c.layer_type(i) if linear is not None else "full_attention"
    if kind == "linear_attention" and linear is not None:
        return ARCHS[linear]
    if kind != "linear_attention" and full is not None:
        return ARCHS[full]
    raise ValueError(f"{c.model_type}: layer_types[{i}]={kind!r} is not converted here (Kimi "
                     f"Linear's full-attention layers are MLA)")


def _arch_for_module(layer: Any) -> Arch:
    path = f"{type(layer).__module__}.{type(layer).__qualname__}"
    for arch in ARCHS.values():
        if arch.hf_class == path:
            return arch
    raise TypeError(f"from_hf: no converter for {path}; known: {', '.join(ARCHS)}")


def _abstract(fm: nn.Module) -> Variables:
    if isinstance(fm, (attnhut_jax.GroupedQueryAttention, attnhut_jax.MultiHeadLatentAttention)):
        width = fm.dim
    else:  # no variable depends on the linear modules' impl; the token-level one traces anywhere
        fm, width = fm.clone(impl="recurrent"), fm.hidden_size
    return jax.eval_shape(lambda: fm.init(jax.random.key(0), jnp.zeros((1, 1, width))))


def variables_from_hf(arch: Arch, fm: nn.Module, state_dict: Mapping[str, Any]) -> Variables:
    """Variables of ``fm`` from the layer's state dict (its names; numpy arrays or tensors)."""
    return naming.from_rule(fm, arch.to_rule(fm, dict(state_dict)), _abstract(fm))


def state_dict_to_hf(arch: Arch, fm: nn.Module, variables: Variables) -> dict[str, np.ndarray]:
    """The layer's state dict (its names, numpy arrays) of ``variables``."""
    return arch.from_rule(fm, naming.to_rule(variables))


# ----------------------------------------------------------------------------- modules

# Flax fields that change how a module runs, not what it computes
_RUNTIME = {"parent", "name", "impl", "chunk_size", "dtype", "param_dtype", "precision",
            "decode"}


def _math(fm: nn.Module) -> dict[str, Any]:
    return {f.name: getattr(fm, f.name) for f in dataclasses.fields(fm)
            if f.name not in _RUNTIME}


def _check_layer(arch: Arch, layer: Any, fm: nn.Module) -> None:
    """What the layer object holds besides its config: the scale, causality, head width,
    window."""
    if isinstance(fm, attnhut_jax.MultiHeadLatentAttention):
        checks = [("scaling", getattr(layer, "scaling", None), fm.softmax_scale()),
                  ("is_causal", getattr(layer, "is_causal", None), True)]
    else:
        h = fm.width
        checks = [("scaling", getattr(layer, "scaling", None), h ** -0.5),
                  ("is_causal", getattr(layer, "is_causal", None), True),
                  ("head_dim", getattr(layer, "head_dim", None), h),
                  ("sliding_window", getattr(layer, "sliding_window", None), fm.window)]
    for name, got, want in checks:
        same = (got is not None and math.isclose(got, want, rel_tol=1e-12)
                if name == "scaling" else got == want)
        if not same:
            raise ValueError(f"from_hf: {arch.name}.{name}={got!r}; its config implies "
                             f"{want!r} (attnhut_jax's scale and causal rule)")


def _module_of(arch: Arch, layer: Any) -> nn.Module:
    """The Flax module the transformers ``layer`` computes: a softmax layer's from its config
    (refusing what the config sets and attnhut_jax does not implement) and checked against the
    layer; a linear layer's (which keeps no config) read off the layer by ``convert``."""
    if arch.linear:
        from .convert import _torch_layer_for

        act = getattr(layer, "activation", "silu")  # the config's hidden_act
        if act not in SILU_NAMES:
            raise ValueError(f"from_hf: {arch.name} with hidden_act={act!r} is not converted "
                             f"(the short convolution's activation is SiLU here)")
        spec = _torch_layer_for(layer)
        return getattr(attnhut_jax, spec.flax_name)(**spec.config(layer))
    fm = arch.module(HFConfig(layer.config), int(layer.layer_idx))
    _check_layer(arch, layer, fm)
    return fm


def from_hf(layer: Any) -> tuple[nn.Module, Variables]:
    """(Flax module, variables) computing what the transformers ``layer`` computes.

    Softmax layers (``LlamaAttention``, ``Qwen3Attention``, ``GptOssAttention``,
    ``Qwen3NextAttention``, ``Qwen3_5Attention``) -> ``GroupedQueryAttention`` built from
    ``layer.config`` and ``layer.layer_idx``; ``DeepseekV3Attention`` / ``DeepseekV32Attention``
    -> ``MultiHeadLatentAttention`` (V3.2 with its indexer, ``parity.hf_deepseek``);
    ``Qwen3_5GatedDeltaNet`` / ``Qwen3NextGatedDeltaNet`` / ``KimiLinearDeltaAttention`` ->
    ``parity.from_torch``. The module takes positions 0..T-1 unless given ``positions``
    (RoPE), as the layer takes ``position_embeddings``.
    """
    arch = _arch_for_module(layer)
    fm = _module_of(arch, layer)
    if arch.linear:
        from .convert import from_torch

        return from_torch(layer)
    return fm, variables_from_hf(arch, fm, layer.state_dict())


def to_hf(flax_module: nn.Module, variables: Variables, layer: Any) -> Any:
    """Write ``variables`` into the transformers ``layer`` (in place; returned).

    The layer must compute what ``flax_module`` computes (same configuration; runtime fields
    such as ``impl`` or ``decode`` aside): ``ValueError`` names the fields that differ, and any
    key or shape that does not match.
    """
    import torch

    arch = _arch_for_module(layer)
    want = _module_of(arch, layer)
    if type(want) is not type(flax_module) or _math(want) != _math(flax_module):
        a, b = _math(want), _math(flax_module) if type(want) is type(flax_module) else {}
        diff = sorted(k for k in a if a.get(k) != b.get(k))
        raise ValueError(f"to_hf: {arch.name} computes {type(want).__name__} with "
                         f"{ {k: a[k] for k in diff} }; the Flax module has "
                         f"{ {k: b.get(k) for k in diff} }")
    if arch.linear:
        from .convert import to_state_dict

        state = to_state_dict(flax_module, variables, type(layer))
    else:
        state = state_dict_to_hf(arch, flax_module, variables)
    own = layer.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"to_hf: missing keys {missing}, unexpected keys {extra}")
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"to_hf: '{key}' has shape {tuple(value.shape)}, expected "
                             f"{tuple(own[key].shape)}")
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32 if v.dtype == jnp.bfloat16
                                            else v.dtype)).to(own[k].dtype)
               for k, v in state.items()}
    layer.load_state_dict(tensors, strict=True)
    return layer


# ----------------------------------------------------------------------------- files

_NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8",
                 "BOOL"}


def _header(path: str) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header) of a safetensors file: {key: {dtype, shape, data_offsets}}
    (and ``__metadata__``)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def _read(path: str, keys: list[str]) -> dict[str, np.ndarray]:
    """Tensors of one safetensors file as numpy arrays: ``safe_open(framework="np")`` for the
    dtypes numpy has; BF16 (which it has not) from the file's bytes as ``jnp.bfloat16``."""
    from safetensors import safe_open

    start, header = _header(path)
    out = {}
    with safe_open(path, framework="np") as f, open(path, "rb") as raw:
        for key in keys:
            dtype = header[key]["dtype"]
            if dtype in _NUMPY_DTYPES:
                out[key] = f.get_tensor(key)
            elif dtype == "BF16":
                begin, end = header[key]["data_offsets"]
                raw.seek(start + begin)
                out[key] = np.frombuffer(raw.read(end - begin), dtype=jnp.bfloat16).reshape(
                    header[key]["shape"])
            else:
                raise ValueError(f"load_hf_layer: {path}: '{key}' has dtype {dtype}, which is "
                                 f"not read (known: BF16, {sorted(_NUMPY_DTYPES)})")
    return out


def _shards(path: str, prefixes: list[str]) -> dict[str, str]:
    """{key: file} of the checkpoint keys under any of ``prefixes``."""
    if os.path.isfile(path):
        files = [path]
    else:
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return {k: os.path.join(path, v) for k, v in weight_map.items()
                    if k.startswith(tuple(prefixes))}
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"load_hf_layer: no *.safetensors in {path}")
    return {k: file for file in files for k in _header(file)[1]
            if k != "__metadata__" and k.startswith(tuple(prefixes))}


def _read_config(path: str) -> dict[str, Any]:
    where = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(where, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"load_hf_layer: no config.json beside {path}; pass config=")
    with open(file) as f:
        return json.load(f)


def load_hf_layer(path: str | os.PathLike, layer: int, config: Any = None
                  ) -> tuple[nn.Module, Variables]:
    """(Flax module, variables) of layer ``layer``'s attention in a Hugging Face checkpoint.

    ``path``: a model directory (``config.json`` and ``model.safetensors``, or shards listed in
    ``model.safetensors.index.json``, or else every ``*.safetensors`` in it) or one
    ``.safetensors`` file. ``config``: a ``config.json`` dict or a transformers config object
    (default: the directory's ``config.json``). The weights are those under
    ``model.layers.{layer}.self_attn.`` (``linear_attn.`` for a Gated DeltaNet layer), or under
    ``model.language_model.layers.{layer}.`` (Qwen3.5's checkpoints). Read with safetensors'
    numpy API (BF16 from the file's bytes): nothing is unpickled and torch is not needed.
    Parameters come out in the module's ``param_dtype`` (float32).
    """
    path = os.fspath(path)
    c = HFConfig(_read_config(path) if config is None else config)
    arch = arch_for_layer(c, layer)
    fm = arch.module(c, layer)
    prefixes = [f"model.layers.{layer}.{arch.hub}.",
                f"model.language_model.layers.{layer}.{arch.hub}."]
    where = _shards(path, prefixes)
    found = [p for p in prefixes if any(k.startswith(p) for k in where)]
    if not found:
        raise ValueError(f"load_hf_layer: {path} has no weights under {' or '.join(prefixes)}")
    prefix = found[0]
    by_file: dict[str, list[str]] = {}
    for key, file in where.items():
        if key.startswith(prefix):
            by_file.setdefault(file, []).append(key)
    state = {}
    for file, keys in sorted(by_file.items()):
        state.update({k[len(prefix):]: v for k, v in _read(file, keys).items()})
    return fm, variables_from_hf(arch, fm, arch.hub_layout(state))

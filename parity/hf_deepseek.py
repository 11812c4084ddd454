"""DeepSeek-V3 MLA and DeepSeek-V3.2 DSA attention between Hugging Face transformers and
``attnhut_jax.MultiHeadLatentAttention``.

``module_config(config, rope)`` gives the Flax module's kwargs from a config (a transformers config
object or a ``config.json`` dict); ``to_rule`` / ``from_rule`` rename the layer's state dict to
and from ``parity.naming``'s rule. ``parity.hf`` registers both classes as ``Arch``es, so
``from_hf`` / ``to_hf`` / ``load_hf_layer`` take them. Config values that change the math and
that the module does not implement are refused by name. FP8 scoring and the Hadamard rotation of
DeepSeek's V3.2 release are out of scope (transformers' torch layer has neither either: the
rotation is orthogonal, the scores are the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attnhut_jax
from attnhut_jax import core

# the layer's names -> the naming rule's (``parity.naming``: ``kernel`` is ``weight`` transposed,
# a LayerNorm's ``scale`` is ``weight``); the indexer's names are the rule's already
_RENAME = {"q_proj.": "q.", "q_a_proj.": "q_down.", "q_a_layernorm.weight": "q_norm",
           "q_b_proj.": "q_up.", "kv_a_proj_with_mqa.": "kv_down.",
           "kv_a_layernorm.weight": "kv_norm", "kv_b_proj.": "kv_up.", "o_proj.": "proj."}

MODEL_TYPES = ("deepseek_v3", "deepseek_v32")


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def module_config(config: Any, rope: Mapping[str, Any]) -> dict[str, Any]:
    """The ``MultiHeadLatentAttention`` kwargs of a DeepSeek-V3 / V3.2 config (a config dict or
    object) and its RoPE dict as ``parity.hf.HFConfig.rope_parameters`` standardises it;
    refuses what the module does not compute."""
    kind = _get(config, "model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"hf_deepseek: model_type={kind!r} is not one of {MODEL_TYPES}")
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads", heads)
    if kv_heads != heads:
        raise ValueError(f"hf_deepseek: num_key_value_heads={kv_heads} != num_attention_heads="
                         f"{heads}: MLA expands one key/value per query head")
    if _get(config, "attention_bias", False):
        raise ValueError("hf_deepseek: attention_bias=True (biases on q_a_proj, kv_a_proj and "
                         "o_proj only) is not implemented: MultiHeadLatentAttention's bias is on "
                         "every projection")
    if _get(config, "attention_dropout", 0.0):
        raise ValueError(f"hf_deepseek: attention_dropout={_get(config, 'attention_dropout')} "
                         f"is not implemented by MultiHeadLatentAttention")
    rope = dict(rope)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"hf_deepseek: partial_rotary_factor={rope['partial_rotary_factor']} "
                         f"(MLA rotates its whole qk_rope_head_dim)")
    # (mscale_all_dim with another type than YaRN, whose softmax factor transformers would
    # apply, is refused by RopeScaling: those fields are YaRN's)
    scaling = core.RopeScaling.from_hf(rope, _get(config, "max_position_embeddings"))
    q_lora_rank = _get(config, "q_lora_rank")
    if kind == "deepseek_v32" and q_lora_rank is None:
        raise ValueError("hf_deepseek: DeepSeek-V3.2 with q_lora_rank=None (its indexer reads "
                         "the query latent)")
    kw = dict(dim=_get(config, "hidden_size"), num_heads=heads, q_lora_rank=q_lora_rank,
              kv_lora_rank=_get(config, "kv_lora_rank"),
              qk_nope_head_dim=_get(config, "qk_nope_head_dim"),
              qk_rope_head_dim=_get(config, "qk_rope_head_dim"),
              v_head_dim=_get(config, "v_head_dim"), causal=True,
              rope_theta=float(rope["rope_theta"]), norm_eps=1e-6, rope_scaling=scaling,
              rope_style="interleaved")
    if kind == "deepseek_v3" and not _get(config, "rope_interleave", True):
        kw["rope_style"] = "half"
    if kind == "deepseek_v32":
        kw.update(index_top_k=_get(config, "index_topk"),
                  index_num_heads=_get(config, "index_n_heads"),
                  index_head_dim=_get(config, "index_head_dim"))
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if not kw[name]:
            raise ValueError(f"hf_deepseek: {name}={kw[name]!r} must be a positive int")
    return kw


def module_from_config(config: Any, rope: Mapping[str, Any],
                       **overrides: Any) -> attnhut_jax.MultiHeadLatentAttention:
    return attnhut_jax.MultiHeadLatentAttention(**{**module_config(config, rope), **overrides})


def to_rule(fm: Any, sd: dict[str, Any]) -> dict[str, Any]:
    """The layer's state dict names -> the naming rule's."""
    out = {}
    for key, value in sd.items():
        for old, new in _RENAME.items():
            if key.startswith(old):
                key = new + key[len(old):] if old.endswith(".") else new
                break
        out[key] = value
    return out


def from_rule(fm: Any, sd: dict[str, Any]) -> dict[str, Any]:
    """The naming rule's names -> the layer's."""
    back = {v: k for k, v in _RENAME.items()}
    out = {}
    for key, value in sd.items():
        for new, old in back.items():
            if key.startswith(new) if new.endswith(".") else key == new:
                key = old + key[len(new):] if new.endswith(".") else old
                break
        out[key] = value
    return out

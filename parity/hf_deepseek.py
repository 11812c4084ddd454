"""DeepSeek-V3 MLA and DeepSeek-V3.2 DSA attention between Hugging Face transformers and
``attnhut_jax.MultiHeadLatentAttention``.

``module_from_config(config, layer)`` builds the Flax module from a config (a transformers config
object or a ``config.json`` dict); ``variables_from_state(module, state)`` maps the layer's state
dict (hub names without the ``model.layers.{i}.self_attn.`` prefix, numpy or torch arrays) to
its variables; ``state_from_variables`` is the inverse. Config values that change the math and
that the module does not implement are refused by name. FP8 scoring and the Hadamard rotation of
DeepSeek's V3.2 release are out of scope (transformers' torch layer has neither either: the
rotation is orthogonal, the scores are the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

import attnhut_jax
from attnhut_jax import core

# hub name -> (Flax path, transpose?); q_* for the low-rank query, q_proj for a full-rank one
_NAMES = {
    "q_proj.weight": (("q", "kernel"), True),
    "q_a_proj.weight": (("q_down", "kernel"), True),
    "q_a_layernorm.weight": (("q_norm",), False),
    "q_b_proj.weight": (("q_up", "kernel"), True),
    "kv_a_proj_with_mqa.weight": (("kv_down", "kernel"), True),
    "kv_a_layernorm.weight": (("kv_norm",), False),
    "kv_b_proj.weight": (("kv_up", "kernel"), True),
    "o_proj.weight": (("proj", "kernel"), True),
    "indexer.wq_b.weight": (("indexer", "wq_b", "kernel"), True),
    "indexer.wk.weight": (("indexer", "wk", "kernel"), True),
    "indexer.k_norm.weight": (("indexer", "k_norm", "scale"), False),
    "indexer.k_norm.bias": (("indexer", "k_norm", "bias"), False),
    "indexer.weights_proj.weight": (("indexer", "weights_proj", "kernel"), True),
}

MODEL_TYPES = ("deepseek_v3", "deepseek_v32")


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _rope_parameters(config: Any) -> dict:
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    params = dict(params)
    if "rope_theta" not in params:
        params["rope_theta"] = _get(config, "rope_theta", 10000.0)
    return params


def module_config(config: Any) -> dict[str, Any]:
    """The ``MultiHeadLatentAttention`` kwargs of a DeepSeek-V3 / V3.2 config; refuses what the
    module does not compute."""
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
    rope = _rope_parameters(config)
    scaling = core.RopeScaling.from_hf(rope, _get(config, "max_position_embeddings"))
    if rope.get("mscale_all_dim") and (scaling is None or scaling.type != "yarn"):
        raise ValueError(f"hf_deepseek: rope_parameters mscale_all_dim="
                         f"{rope.get('mscale_all_dim')} with rope type "
                         f"{rope.get('rope_type', rope.get('type', 'default'))!r} (DeepSeek's "
                         f"softmax mscale is implemented for YaRN only)")
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


def module_from_config(config: Any, **overrides: Any) -> attnhut_jax.MultiHeadLatentAttention:
    return attnhut_jax.MultiHeadLatentAttention(**{**module_config(config), **overrides})


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy() if str(value.dtype) == "torch.bfloat16" \
            else value.detach().cpu().numpy()
    return np.asarray(value)


def variables_from_state(module: attnhut_jax.MultiHeadLatentAttention,
                         state: Mapping[str, Any]) -> dict[str, Any]:
    """``{"params": ...}`` of ``module`` from the layer's state dict; every key and shape is
    checked against the module's abstract ``init`` (unknown keys refused by name)."""
    import jax
    import jax.numpy as jnp
    from flax.core import meta

    want = meta.unbox(jax.eval_shape(module.init, jax.random.key(0),
                                     jnp.zeros((1, 1, module.dim))))["params"]
    unknown = sorted(k for k in state if k not in _NAMES)
    if unknown:
        raise ValueError(f"hf_deepseek: state dict keys this converter does not know: {unknown}")
    params: dict[str, Any] = {}
    for key, value in state.items():
        path, transpose = _NAMES[key]
        node = want
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                raise ValueError(f"hf_deepseek: {key} has no place in the module (its "
                                 f"configuration has no {'/'.join(path)})")
            node = node[p]
        hub = _numpy(value)
        array = hub.T if transpose else hub
        if tuple(array.shape) != tuple(node.shape):
            expected = tuple(node.shape)[::-1] if transpose else tuple(node.shape)
            raise ValueError(f"hf_deepseek: {key} has shape {tuple(hub.shape)}, the module "
                             f"expects {expected}")
        tree = params
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        tree[path[-1]] = jnp.asarray(array, node.dtype)
    missing = [("/".join(path)) for path, _ in _paths(want) if _lookup(params, path) is None]
    if missing:
        raise ValueError(f"hf_deepseek: the state dict lacks {missing}")
    return {"params": params}


def state_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The layer's state dict (hub names) from the module's variables."""
    from flax.core import meta

    params = meta.unbox(variables["params"])
    out = {}
    for key, (path, transpose) in _NAMES.items():
        value = _lookup(params, path)
        if value is not None:
            array = np.asarray(value)
            out[key] = array.T if transpose else array
    return out


def _paths(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _paths(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _lookup(tree, path):
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return None
        tree = tree[p]
    return tree


def from_hf(layer: Any):
    """(module, variables) of a transformers ``DeepseekV3Attention`` / ``DeepseekV32Attention``."""
    module = module_from_config(layer.config)
    return module, variables_from_state(module, layer.state_dict())


def to_hf(module, variables, layer):
    """Write the module's weights into the transformers layer (in place) and return it."""
    import torch

    if module_config(layer.config) != {k: getattr(module, k) for k in module_config(layer.config)}:
        raise ValueError("to_hf: the transformers layer's configuration differs from the module's")
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
             state_from_variables(variables).items()}
    layer.load_state_dict(state, strict=True)
    return layer

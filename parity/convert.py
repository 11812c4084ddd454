"""Weights between attnhut (torch) and attnhut_jax (Flax): renaming plus a transpose list.

The rule is the same for every mechanism. A Flax parameter path joined with ``.`` is the torch
``state_dict`` key, except that a leaf named ``kernel*`` is torch's ``weight*`` transposed
(Linear weights are (out, in) in torch, (in, out) here) and a LayerNorm ``scale`` is torch's
``weight``. The set of keys and every shape are checked against the Flax module's abstract
``init``; nothing is guessed.

A mechanism is registered with the function that reads its constructor arguments off a torch
module; the Flax class takes the same arguments by the same names, so ``to_torch`` rebuilds the
torch module from the Flax module's fields. The linear-attention modules, whose torch layers are
not attnhut's, are registered as ``TorchLayer``s (below): built from config objects, with a few
weights reshaped or split on the way (``to_rule`` / ``from_rule``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import attnhut
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import attnhut_jax

from . import naming
from .naming import (
    SILU_NAMES,
    torch_key,  # noqa: F401  (public here since the rule's first version)
)
from .naming import conv_from_rule as _conv_from_rule
from .naming import conv_to_rule as _conv_to_rule
from .naming import kimi_from_rule as _kimi_from_rule
from .naming import kimi_to_rule as _kimi_to_rule
from .naming import next_from_rule as _next_from_rule
from .naming import next_to_rule as _next_to_rule
from .naming import to_numpy as _to_numpy

Variables = dict[str, Any]

# ----------------------------------------------------------------------------- registry


def _bias(linear: torch.nn.Linear) -> bool:
    return linear.bias is not None


def _depth_from_lambda_init(value: float) -> int:
    """Invert ``lambda_init(depth) = 0.8 - 0.6 exp(-0.3 depth)`` (attnhut stores only the value)."""
    depth = round(-math.log((0.8 - value) / 0.6) / 0.3)
    if not math.isclose(attnhut_jax.lambda_init(depth), value, rel_tol=0, abs_tol=1e-9):
        raise ValueError(f"DifferentialAttention: lambda_init={value} matches no integer depth")
    return depth


@dataclasses.dataclass(frozen=True)
class Spec:
    flax_cls: type[nn.Module]
    torch_cls: type[torch.nn.Module]
    config: Callable[[torch.nn.Module], dict[str, Any]]
    # the input shape ``init`` is traced with (batch and sequence 1 where the module allows)
    example_shape: Callable[[nn.Module], tuple[int, ...]] = lambda m: (1, 1, m.dim)


SPECS: dict[str, Spec] = {}


def register(name: str, config: Callable[[torch.nn.Module], dict[str, Any]], **kw: Any) -> None:
    """Register attnhut's class ``name`` (same name in both packages) with its config reader."""
    SPECS[name] = Spec(getattr(attnhut_jax, name), getattr(attnhut, name), config, **kw)


register("StandardAttention", lambda m: dict(
    dim=m.qkv.in_features, num_heads=m.num_heads, causal=m.causal, dropout=m.dropout,
    bias=_bias(m.qkv)))
register("MultiQueryAttention", lambda m: dict(
    dim=m.q.in_features, num_heads=m.num_heads, causal=m.causal, dropout=m.dropout,
    bias=_bias(m.q)))
register("GroupedQueryAttention", lambda m: dict(
    dim=m.q.in_features, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, causal=m.causal,
    dropout=m.dropout, bias=_bias(m.q)))
register("MultiHeadLatentAttention", lambda m: dict(
    dim=m.q_down.in_features, num_heads=m.num_heads, q_lora_rank=m.q_lora_rank,
    kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
    qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, causal=m.causal,
    rope_theta=m.rope_theta, bias=_bias(m.q_down)))
register("DifferentialAttention", lambda m: dict(
    dim=m.q.in_features, num_heads=m.num_heads, depth=_depth_from_lambda_init(m.lambda_init),
    causal=m.causal, bias=_bias(m.q)))
register("SlotAttention", lambda m: dict(
    dim=m.to_q.in_features, num_slots=m.num_slots, num_iters=m.num_iters,
    hidden_dim=m.mlp[0].out_features, eps=m.eps))
register("BigBirdAttention", lambda m: dict(
    dim=m.qkv.in_features, num_heads=m.num_heads, block_size=m.block_size,
    num_window_blocks=m.window, num_random_blocks=m.random, num_global_blocks=m.globals,
    causal=m.causal, seed=m.seed, bias=_bias(m.qkv)))
register("DeltaAttention", lambda m: dict(
    dim=m.qkv.in_features, num_heads=m.num_heads, window=m.window, sink=m.sink,
    stride=m.stride, bias=_bias(m.qkv)))
register("LightningIndexer", lambda m: dict(
    dim=m.wq.in_features, num_heads=m.num_heads, head_dim=m.head_dim, bias=_bias(m.wq)))
register("DeepSeekSparseAttention", lambda m: dict(
    dim=m.qkv.in_features, num_heads=m.num_heads, top_k=m.top_k,
    num_index_heads=m.indexer.num_heads, index_head_dim=m.indexer.head_dim, causal=m.causal,
    bias=_bias(m.qkv)))
register("MiniMaxSparseAttention", lambda m: dict(
    dim=m.q.in_features, num_heads=m.num_heads, num_kv_groups=m.num_kv_groups,
    block_size=m.block_size, top_k=m.top_k, index_dim=m.index_dim, rope_dim=m.rope_dim,
    causal=m.causal, use_rope=m.use_rope, rope_theta=m.rope_theta,
    force_current_block=m.force_current_block, bias=_bias(m.q)))
register("HeavilyCompressedAttention", lambda m: dict(
    dim=m.q_down.in_features, num_heads=m.num_heads, compression_rate=m.rate,
    kv_dim=m.kv_dim, q_lora_rank=m.q_down.out_features, num_groups=m.proj.num_groups,
    window=m.window, bias=_bias(m.q_down)))
register("CompressedSparseAttention", lambda m: dict(
    dim=m.q_down.in_features, num_heads=m.num_heads, compression_rate=m.rate, top_k=m.top_k,
    kv_dim=m.kv_dim, q_lora_rank=m.q_down.out_features, num_index_heads=m.num_index_heads,
    index_dim=m.index_dim, num_groups=m.proj.num_groups, window=m.window,
    bias=_bias(m.q_down)))


def _cjepa_config(m: torch.nn.Module) -> dict[str, Any]:
    """attnhut keeps no dim/num_heads/mlp_dim/dropout: read them off the layers. With depth 0 there
    is no attention at all; num_heads=1 (always valid) and the default mlp_dim stand in."""
    first = m.blocks[0] if len(m.blocks) else None
    return dict(
        dim=m.id_proj.in_features, num_heads=first.attn.num_heads if first else 1,
        num_slots=m.num_slots, history_frames=m.history_frames, pred_frames=m.pred_frames,
        num_masked_slots=m.num_masked_slots, depth=len(m.blocks),
        mlp_dim=first.mlp[1].out_features if first else None,
        dropout=first.attn.dropout if first else 0.0, bias=_bias(m.id_proj))


register("CausalJEPAAttention", _cjepa_config,
         example_shape=lambda fm: (1, fm.history_frames, fm.num_slots, fm.dim))


# ----------------------------------------------------------------------------- linear family
#
# The linear-attention modules mirror torch layers that are not attnhut's (Hugging Face
# transformers' Qwen3.5 / Qwen3-Next Gated DeltaNet and Kimi Linear's Kimi Delta Attention, and the
# oracles of ``parity.oracles``), built from config objects and with a few weights laid out
# differently. Each such torch class is a ``TorchLayer``: how to read the Flax constructor off it,
# how to build it for a Flax module, and how its state dict maps onto the naming rule's.


@dataclasses.dataclass(frozen=True)
class TorchLayer:
    """A torch layer class ``from_torch`` / ``to_torch`` take besides attnhut's.

    ``config(layer)`` -> the Flax module's kwargs; ``build(flax_module)`` -> a fresh torch layer of
    that configuration; ``represents(flax_module)``: whether this class can compute what the Flax
    module computes (``to_torch`` picks the first registered class that can); ``to_rule`` /
    ``from_rule`` map this class's state dict to / from the naming rule's (keys absent are left
    absent, so the key and shape checks still name them). ``torch_cls`` is the class's dotted
    path, so that transformers loads only when one of its layers is converted.
    """

    torch_cls: str
    flax_name: str
    config: Callable[[torch.nn.Module], dict[str, Any]]
    build: Callable[[nn.Module], torch.nn.Module]
    represents: Callable[[nn.Module], bool]
    to_rule: Callable[[nn.Module, dict[str, Any]], dict[str, Any]] = lambda fm, sd: dict(sd)
    from_rule: Callable[[nn.Module, dict[str, Any]], dict[str, Any]] = lambda fm, sd: dict(sd)


TORCH_LAYERS: list[TorchLayer] = []


def _check_silu(layer: torch.nn.Module) -> None:
    act = getattr(layer, "activation", "silu")
    if act not in SILU_NAMES:
        raise ValueError(f"from_torch: {type(layer).__name__} with activation={act!r}; "
                         f"attnhut_jax's short convolution applies SiLU ({SILU_NAMES})")
    if layer.conv1d.bias is not None:
        raise ValueError(f"from_torch: {type(layer).__name__} with a conv bias; attnhut_jax's "
                         f"short convolution has none")


def _hf_gdn_config(layer: torch.nn.Module) -> dict[str, Any]:
    _check_silu(layer)
    return dict(hidden_size=layer.hidden_size, num_query_key_heads=layer.num_k_heads,
                num_value_heads=layer.num_v_heads, head_qk_dim=layer.head_k_dim,
                head_v_dim=layer.head_v_dim, norm_eps=layer.layer_norm_epsilon,
                conv_size=layer.conv_kernel_size, decay_gate="mamba", use_qk_l2norm=True)


def _hf_gdn_represents(fm: nn.Module) -> bool:
    return fm.decay_gate == "mamba" and fm.use_qk_l2norm


def qwen_text_config(cls_name: str, fm: nn.Module):
    import transformers

    return getattr(transformers, cls_name)(
        hidden_size=fm.hidden_size, linear_num_value_heads=fm.num_value_heads,
        linear_num_key_heads=fm.num_query_key_heads, linear_key_head_dim=fm.head_qk_dim,
        linear_value_head_dim=fm.head_v_dim, linear_conv_kernel_dim=fm.conv_size,
        rms_norm_eps=fm.norm_eps, hidden_act="silu", num_hidden_layers=1,
        layer_types=["linear_attention"])


def _kimi_config(layer: torch.nn.Module) -> dict[str, Any]:
    _check_silu(layer)
    return dict(hidden_size=layer.hidden_size, num_heads=layer.num_heads,
                head_dim=layer.head_dim, conv_size=layer.conv_kernel_size,
                norm_eps=layer.layer_norm_epsilon)


def _kimi_build(fm: nn.Module) -> torch.nn.Module:
    from transformers import KimiLinearConfig

    config = KimiLinearConfig(hidden_size=fm.hidden_size, linear_num_heads=fm.num_heads,
                              linear_head_dim=fm.head_dim, linear_conv_kernel_dim=fm.conv_size,
                              rms_norm_eps=fm.norm_eps, hidden_act="silu", num_hidden_layers=1,
                              layer_types=["linear_attention"])
    return _import(_KIMI)(config, layer_idx=0)


def _oracle_gdn_config(layer: torch.nn.Module) -> dict[str, Any]:
    return {k: getattr(layer, k) for k in (
        "hidden_size", "num_query_key_heads", "num_value_heads", "head_qk_dim", "head_v_dim",
        "norm_eps", "conv_size", "decay_gate", "use_qk_l2norm", "gate_normalizer")}


_QWEN35 = "transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5GatedDeltaNet"
_QWEN3NEXT = "transformers.models.qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet"
_KIMI = "transformers.models.kimi_linear.modeling_kimi_linear.KimiLinearDeltaAttention"


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(path: str) -> type:
    """The class at a dotted path (transformers' modeling modules load on first use: importing
    them costs seconds)."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _register_linear_family() -> None:
    from . import oracles

    TORCH_LAYERS.extend([
        TorchLayer(_QWEN35, "GatedDeltaNet", _hf_gdn_config,
                   lambda fm: _import(_QWEN35)(qwen_text_config("Qwen3_5TextConfig", fm), 0),
                   _hf_gdn_represents, lambda fm, sd: _conv_to_rule(sd),
                   lambda fm, sd: _conv_from_rule(sd)),
        TorchLayer(_path(oracles.GatedDeltaNet), "GatedDeltaNet", _oracle_gdn_config,
                   lambda fm: oracles.GatedDeltaNet(**_oracle_gdn_config(fm)),
                   lambda fm: True, lambda fm, sd: _conv_to_rule(sd),
                   lambda fm, sd: _conv_from_rule(sd)),
        TorchLayer(_QWEN3NEXT, "GatedDeltaNet", _hf_gdn_config,
                   lambda fm: _import(_QWEN3NEXT)(qwen_text_config("Qwen3NextConfig", fm), 0),
                   _hf_gdn_represents, _next_to_rule, _next_from_rule),
        TorchLayer(_KIMI, "KimiDeltaAttention", _kimi_config, _kimi_build,
                   lambda fm: True, _kimi_to_rule, _kimi_from_rule),
        TorchLayer(_path(oracles.LinearAttention), "LinearAttention",
                   lambda m: dict(dim=m.dim, num_heads=m.num_heads, causal=m.causal, eps=m.eps,
                                  bias=_bias(m.q_proj)),
                   lambda fm: oracles.LinearAttention(fm.dim, fm.num_heads, fm.causal, fm.eps,
                                                      fm.bias),
                   lambda fm: True),
    ])
    for name, shape in (("GatedDeltaNet", lambda m: (1, 1, m.hidden_size)),
                        ("KimiDeltaAttention", lambda m: (1, 1, m.hidden_size)),
                        ("LinearAttention", lambda m: (1, 1, m.dim))):
        # torch_cls: any torch layer of TORCH_LAYERS for this name (from_torch / to_torch ask them)
        SPECS[name] = Spec(getattr(attnhut_jax, name), torch.nn.Module,
                           lambda m: _torch_layer_for(m).config(m), example_shape=shape)


def _torch_layer_for(module: Any) -> TorchLayer | None:
    """The ``TorchLayer`` of a torch module (by its class's dotted path), or None."""
    path = _path(type(module))
    for layer in TORCH_LAYERS:
        if layer.torch_cls == path:
            return layer
    return None


def _default_torch_layer(flax_module: nn.Module, torch_cls: type | None = None) -> TorchLayer | None:
    """The torch class ``to_torch`` builds for ``flax_module`` (``torch_cls`` if given), or None for
    attnhut's mechanisms."""
    name = type(flax_module).__name__
    family = [t for t in TORCH_LAYERS if t.flax_name == name]
    if not family:
        return None
    want = None if torch_cls is None else _path(torch_cls)
    for layer in family:
        if (want is None or layer.torch_cls == want) and layer.represents(flax_module):
            return layer
    known = ", ".join(t.torch_cls.rpartition(".")[2] for t in family)
    fields = ", ".join(f"{f.name}={getattr(flax_module, f.name)!r}"
                       for f in dataclasses.fields(flax_module)
                       if f.name not in ("parent", "name")
                       and getattr(flax_module, f.name) != f.default)
    raise ValueError(f"to_torch: no torch layer for {name}({fields})"
                     + (f" of class {torch_cls.__name__}" if torch_cls else "")
                     + f"; known for {name}: {known}")


_register_linear_family()


def _spec_for_torch(module: Any) -> Spec:
    layer = _torch_layer_for(module)
    if layer is not None:
        return SPECS[layer.flax_name]
    spec = SPECS.get(type(module).__name__)
    # a linear-attention name (torch_cls nn.Module) converts only the classes of TORCH_LAYERS:
    # another library's layer of that name (fla.layers.GatedDeltaNet) is not one of them
    if spec is None or spec.torch_cls is torch.nn.Module or not isinstance(module,
                                                                            spec.torch_cls):
        raise TypeError(
            f"from_torch: no converter for {type(module).__module__}.{type(module).__qualname__}; "
            f"known attnhut modules: {', '.join(sorted(SPECS))}; known torch layers: "
            f"{', '.join(t.torch_cls for t in TORCH_LAYERS)}")
    return spec


def _spec_for_flax(module: Any) -> Spec:
    spec = SPECS.get(type(module).__name__)
    if spec is None or not isinstance(module, spec.flax_cls):
        raise TypeError(
            f"to_torch: no converter for {type(module).__module__}.{type(module).__qualname__}; "
            f"known attnhut_jax modules: {', '.join(sorted(SPECS))}")
    return spec


def constructor_kwargs(flax_module: nn.Module) -> dict[str, Any]:
    """The Flax module's fields that attnhut's constructor takes (``dtype`` etc. dropped)."""
    spec = _spec_for_flax(flax_module)
    import inspect

    names = inspect.signature(spec.torch_cls.__init__).parameters
    if spec.torch_cls is not torch.nn.Module:  # an attnhut class: it must hold every option set
        unheld = [f"{f.name}={getattr(flax_module, f.name)!r}"
                  for f in dataclasses.fields(flax_module)
                  if f.name not in names and f.name not in _NOT_MATH
                  and f.default is not dataclasses.MISSING
                  and getattr(flax_module, f.name) != f.default]
        if unheld:
            raise ValueError(f"to_torch: attnhut's {spec.torch_cls.__name__} has no "
                             f"{', '.join(unheld)} (convert to a Hugging Face layer with "
                             f"parity.to_hf, or keep these at their defaults)")
    if isinstance(flax_module, attnhut_jax.MultiHeadLatentAttention) and (
            flax_module.q_lora_rank is None):
        raise ValueError(f"to_torch: attnhut's {spec.torch_cls.__name__} has no full-rank query "
                         f"(q_lora_rank=None)")
    return {k: getattr(flax_module, k) for k in names if k != "self"}


# Flax fields that change how a module runs, not what it computes
_NOT_MATH = {"parent", "name", "impl", "dtype", "param_dtype", "precision", "decode", "absorb",
             "deterministic"}


# ----------------------------------------------------------------------------- naming rule


def abstract_variables(flax_module: nn.Module) -> Variables:
    """Shapes, dtypes and logical-axis boxes of ``flax_module.init``, computed without running it."""
    x = jax.ShapeDtypeStruct(_spec_for_flax(flax_module).example_shape(flax_module), jnp.float32)
    if any(t.flax_name == type(flax_module).__name__ for t in TORCH_LAYERS):
        # no variable depends on the linear modules' impl; the token-level one traces everywhere
        flax_module = flax_module.clone(impl="recurrent")
    rngs = {"params": jax.random.key(0), "slots": jax.random.key(0), "mask": jax.random.key(0)}
    return jax.eval_shape(lambda: flax_module.init(rngs, jnp.zeros(x.shape, x.dtype)))


# ----------------------------------------------------------------------------- state dicts


def from_state_dict(flax_module: nn.Module, state_dict: Mapping[str, Any],
                    torch_cls: type | None = None) -> Variables:
    """Variables for ``flax_module`` from a torch-named state dict (tensors or numpy arrays).

    Raises ``ValueError`` naming missing keys, unexpected keys, or a key whose shape is wrong.
    The result has the same structure as ``flax_module.init`` (logical-axis boxes included).
    For the linear-attention modules the state dict is laid out as the torch layer ``to_torch``
    builds (``torch_cls``: another registered one, e.g. ``Qwen3NextGatedDeltaNet``).
    """
    layer = _default_torch_layer(flax_module, torch_cls)
    if layer is not None:
        state_dict = layer.to_rule(flax_module, dict(state_dict))
    return _from_rule(flax_module, state_dict)


def _from_rule(flax_module: nn.Module, state_dict: Mapping[str, Any]) -> Variables:
    return naming.from_rule(flax_module, state_dict, abstract_variables(flax_module))


def to_state_dict(flax_module: nn.Module, variables: Variables,
                  torch_cls: type | None = None) -> dict[str, np.ndarray]:
    """The torch-named state dict (numpy arrays) of ``variables``; inverse of ``from_state_dict``
    (the linear-attention modules' in the layout of the torch layer ``to_torch`` builds, or of
    ``torch_cls``)."""
    out = naming.to_rule(variables)
    layer = _default_torch_layer(flax_module, torch_cls)
    return out if layer is None else layer.from_rule(flax_module, out)


# ----------------------------------------------------------------------------- modules


def from_torch(torch_module: torch.nn.Module) -> tuple[nn.Module, Variables]:
    """(Flax module, variables) computing what the attnhut ``torch_module`` computes.

    Also takes transformers' ``Qwen3_5GatedDeltaNet`` / ``Qwen3NextGatedDeltaNet`` (->
    ``GatedDeltaNet``, decay gate "mamba"), ``KimiLinearDeltaAttention`` (->
    ``KimiDeltaAttention``) and ``parity.oracles``' ``GatedDeltaNet`` / ``LinearAttention``.
    The variables are float32 (the Flax modules' ``param_dtype``) whatever the torch layer's
    dtype, and ``to_torch`` builds a float32 torch layer: a bfloat16 layer's weights convert
    exactly, and cast back with ``.to(torch.bfloat16)``.
    """
    layer = _torch_layer_for(torch_module)
    if layer is not None:
        flax_module = getattr(attnhut_jax, layer.flax_name)(**layer.config(torch_module))
        return flax_module, _from_rule(
            flax_module, layer.to_rule(flax_module, dict(torch_module.state_dict())))
    spec = _spec_for_torch(torch_module)
    flax_module = spec.flax_cls(**spec.config(torch_module))
    return flax_module, from_state_dict(flax_module, torch_module.state_dict())


def to_torch(flax_module: nn.Module, variables: Variables,
             torch_cls: type | None = None) -> torch.nn.Module:
    """The attnhut module with ``flax_module``'s configuration and ``variables``' weights.

    The linear-attention modules give the first registered torch layer that computes what they
    do (``GatedDeltaNet``: ``Qwen3_5GatedDeltaNet`` for the "mamba" gate with L2-normalised q/k,
    else ``parity.oracles.GatedDeltaNet``; ``KimiDeltaAttention``: ``KimiLinearDeltaAttention``;
    ``LinearAttention``: ``parity.oracles.LinearAttention``), or ``torch_cls`` (e.g.
    ``Qwen3NextGatedDeltaNet``). Its weights all come from ``variables``.
    """
    spec = _spec_for_flax(flax_module)
    layer = _default_torch_layer(flax_module, torch_cls)
    if torch_cls is not None and layer is None:
        raise ValueError("to_torch: torch_cls applies to the linear-attention modules only")
    torch_module = (layer.build(flax_module) if layer is not None
                    else spec.torch_cls(**constructor_kwargs(flax_module)))
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32 if v.dtype == jnp.bfloat16
                                          else v.dtype))
             for k, v in to_state_dict(flax_module, variables, torch_cls).items()}
    own = torch_module.state_dict()
    for key, tensor in state.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise ValueError(f"to_torch: '{key}' has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(own[key].shape)}")
    result = torch_module.load_state_dict(
        {k: t.to(own[k].dtype) if k in own else t for k, t in state.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"to_torch: missing keys {sorted(result.missing_keys)}, "
                         f"unexpected keys {sorted(result.unexpected_keys)}")
    return torch_module


# ----------------------------------------------------------------------------- files


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch-named state dict from disk without unpickling code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(..., weights_only=True)``, which refuses pickled objects other than tensors.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise TypeError(f"{path}: expected a state_dict mapping, got {type(loaded).__name__}")
    return {k: _to_numpy(v) for k, v in loaded.items()}


def save_state_dict(flax_module: nn.Module, variables: Variables,
                    path: str | os.PathLike) -> None:
    """Write ``variables`` as a torch-named safetensors file that attnhut can load."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v)
               for k, v in to_state_dict(flax_module, variables).items()}, os.fspath(path))


def load_variables(flax_module: nn.Module, path: str | os.PathLike) -> Variables:
    """Variables for ``flax_module`` from a torch state dict file (see ``load_state_dict``)."""
    return from_state_dict(flax_module, load_state_dict(path))

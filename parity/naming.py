"""The naming rule between torch state dicts and Flax variables, without torch.

A Flax parameter path joined with ``.`` is the torch ``state_dict`` key, except that a leaf named
``kernel*`` is torch's ``weight*`` transposed and a LayerNorm ``scale`` is torch's ``weight``
(``convert`` documents the rule). The functions here need no torch, so that ``parity.hf`` can
read safetensors checkpoints where torch is not installed; ``convert`` builds on them. Besides the
rule: the weight layouts of transformers' linear-attention layers (``*_to_rule`` /
``*_from_rule``: a few weights reshaped or split on the way).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# transformers' names of the activation the linear layers' short convolutions apply
# (ACT2FN maps both to nn.SiLU)
SILU_NAMES = ("silu", "swish")

Variables = dict[str, Any]

# ----------------------------------------------------------------------------- the rule


def torch_key(path: tuple[str, ...]) -> tuple[str, bool]:
    """(torch state_dict key, transpose?) for a Flax parameter path."""
    *prefix, leaf = path
    if leaf.startswith("kernel"):
        return ".".join([*prefix, "weight" + leaf[len("kernel"):]]), True
    if leaf == "scale":
        return ".".join([*prefix, "weight"]), False
    return ".".join(path), False


def path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def leaves(variables: Variables):
    """[(flax path, leaf)] over ``variables['params']``, boxes kept as leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        variables["params"], is_leaf=lambda v: isinstance(v, nn.meta.AxisMetadata))
    return [(path_names(p), leaf) for p, leaf in flat]


def to_numpy(value: Any) -> np.ndarray:
    """A numpy array of a torch tensor (by duck type: torch is not imported here) or array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.float().numpy().astype(jnp.bfloat16)
        return value.numpy()
    return np.asarray(value)


def from_rule(flax_module: nn.Module, state_dict: Mapping[str, Any],
              abstract: Variables) -> Variables:
    """Variables shaped as ``abstract`` (``flax_module``'s abstract ``init``) from a rule-named
    state dict; ``ValueError`` naming missing keys, unexpected keys, or a key of the wrong shape."""
    expected = {torch_key(path)[0]: (path, leaf) for path, leaf in leaves(abstract)}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ValueError(f"{type(flax_module).__name__}: state_dict mismatch; missing keys "
                         f"{missing}, unexpected keys {extra}")
    values = {}
    for key, (path, leaf) in expected.items():
        arr = to_numpy(state_dict[key])
        transpose = torch_key(path)[1]
        if transpose:
            arr = arr.T
        box = leaf if isinstance(leaf, nn.meta.AxisMetadata) else None
        want = (box.unbox() if box else leaf)
        if tuple(arr.shape) != tuple(want.shape):
            shown = tuple(arr.T.shape) if transpose else tuple(arr.shape)
            need = tuple(want.shape[::-1]) if transpose else tuple(want.shape)
            raise ValueError(f"{type(flax_module).__name__}: state_dict['{key}'] has shape "
                             f"{shown}, expected {need}")
        value = jnp.asarray(arr, dtype=want.dtype)
        values[path] = box.replace_boxed(value) if box else value

    def fill(path, leaf):
        return values[path_names(path)]

    params = jax.tree_util.tree_map_with_path(
        fill, abstract["params"], is_leaf=lambda v: isinstance(v, nn.meta.AxisMetadata))
    return {"params": params}


def to_rule(variables: Variables) -> dict[str, np.ndarray]:
    """The rule-named state dict (numpy arrays) of ``variables``; inverse of ``from_rule``."""
    out = {}
    for path, leaf in leaves(variables):
        key, transpose = torch_key(path)
        arr = np.asarray(nn.meta.unbox(leaf))
        out[key] = arr.T if transpose else arr
    return out


# ----------------------------------------------------------------------------- linear layouts


def _reshape(sd: dict[str, Any], key: str, shape: Callable[[tuple[int, ...]], tuple[int, ...]]):
    if key in sd:
        value = sd[key]
        sd[key] = value.reshape(shape(tuple(value.shape)))
    return sd


def conv_to_rule(sd: dict[str, Any]) -> dict[str, Any]:
    """torch ``Conv1d(groups=C)`` weight (C, 1, K) -> (C, K) (the rule transposes it to (K, C))."""
    return _reshape(dict(sd), "conv1d.weight",
                    lambda s: (s[0], s[2]) if len(s) == 3 and s[1] == 1 else s)


def conv_from_rule(sd: dict[str, Any]) -> dict[str, Any]:
    return _reshape(dict(sd), "conv1d.weight", lambda s: (s[0], 1, s[1]) if len(s) == 2 else s)


def next_to_rule(fm: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-Next's fused, per-key-head-grouped ``in_proj_qkvz`` / ``in_proj_ba`` -> Qwen3.5's
    ``in_proj_qkv`` (all q, all k, all v), ``in_proj_z``, ``in_proj_b``, ``in_proj_a``."""
    sd = conv_to_rule(sd)
    hk, kd, vd = fm.num_query_key_heads, fm.head_qk_dim, fm.head_v_dim
    r = fm.num_value_heads // hk
    if "in_proj_qkvz.weight" in sd:
        w = to_numpy(sd.pop("in_proj_qkvz.weight"))
        w = w.reshape(hk, 2 * kd + 2 * r * vd, w.shape[-1])
        q, k, v, z = np.split(w, np.cumsum([kd, kd, r * vd]), axis=1)
        sd["in_proj_qkv.weight"] = np.concatenate(
            [y.reshape(-1, w.shape[-1]) for y in (q, k, v)], axis=0)
        sd["in_proj_z.weight"] = z.reshape(-1, w.shape[-1])
    if "in_proj_ba.weight" in sd:
        w = to_numpy(sd.pop("in_proj_ba.weight"))
        w = w.reshape(hk, 2 * r, w.shape[-1])
        sd["in_proj_b.weight"] = w[:, :r].reshape(-1, w.shape[-1])
        sd["in_proj_a.weight"] = w[:, r:].reshape(-1, w.shape[-1])
    return sd


def next_from_rule(fm: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    sd = conv_from_rule(sd)
    hk, kd, vd = fm.num_query_key_heads, fm.head_qk_dim, fm.head_v_dim
    r = fm.num_value_heads // hk
    qkv, z = sd.pop("in_proj_qkv.weight"), sd.pop("in_proj_z.weight")
    d = qkv.shape[-1]
    q, k, v = np.split(qkv, np.cumsum([hk * kd, hk * kd]), axis=0)
    sd["in_proj_qkvz.weight"] = np.concatenate(
        [q.reshape(hk, kd, d), k.reshape(hk, kd, d), v.reshape(hk, r * vd, d),
         z.reshape(hk, r * vd, d)], axis=1).reshape(-1, d)
    b, a = sd.pop("in_proj_b.weight"), sd.pop("in_proj_a.weight")
    sd["in_proj_ba.weight"] = np.concatenate([b.reshape(hk, r, d), a.reshape(hk, r, d)],
                                             axis=1).reshape(-1, d)
    return sd


def kimi_to_rule(fm: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    """conv (C, 1, K) -> (C, K); ``forget_gate.A_log`` (1, 1, N, 1) -> (N,)."""
    return _reshape(conv_to_rule(sd), "forget_gate.A_log",
                    lambda s: (s[2],) if len(s) == 4 else s)


def kimi_from_rule(fm: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    return _reshape(conv_from_rule(sd), "forget_gate.A_log",
                    lambda s: (1, 1, s[0], 1) if len(s) == 1 else s)

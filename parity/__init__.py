"""Parity between attnhut (PyTorch) and attnhut_jax (Flax): weight conversion and a report.

``from_torch(m) -> (flax_module, variables)`` and ``to_torch(flax_module, variables)`` move a
module between the two; ``python -m parity`` prints forward/gradient agreement and speed.
torch is imported here and in tests only, never by ``attnhut_jax``. The linear-attention modules
convert to and from transformers' Qwen3.5 / Qwen3-Next Gated DeltaNet and Kimi Delta Attention
layers and the token-level torch oracles of ``parity.oracles`` (logsigmoid-gated GDN, linear
attention).

``from_hf`` / ``to_hf`` move Hugging Face transformers' attention layers (Llama, Qwen3, gpt-oss,
Qwen3-Next, Qwen3.5, Kimi Linear's KDA) to and from attnhut_jax; ``load_hf_layer`` reads one
layer of a model directory's safetensors checkpoint (``parity.hf``; needs no torch).

The names load on first use, so ``parity.hf``'s file loader runs where torch is not installed.
"""

import importlib

_EXPORTS = {
    "SPECS": "convert",
    "from_torch": "convert",
    "to_torch": "convert",
    "from_state_dict": "convert",
    "to_state_dict": "convert",
    "load_state_dict": "convert",
    "load_variables": "convert",
    "save_state_dict": "convert",
    "from_hf": "hf",
    "to_hf": "hf",
    "load_hf_layer": "hf",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

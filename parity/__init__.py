"""Parity between attnhut (PyTorch) and attnhut_jax (Flax): weight conversion and a report.

``from_torch(m) -> (flax_module, variables)`` and ``to_torch(flax_module, variables)`` move a
module between the two; ``python -m parity`` prints forward/gradient agreement and speed.
torch is imported here and in tests only, never by ``attnhut_jax``. The linear-attention modules
convert to and from transformers' Qwen3.5 / Qwen3-Next Gated DeltaNet and Kimi Delta Attention
layers and the token-level torch oracles of ``parity.oracles`` (logsigmoid-gated GDN, linear
attention).
"""

from .convert import (
    SPECS,
    from_state_dict,
    from_torch,
    load_state_dict,
    load_variables,
    save_state_dict,
    to_state_dict,
    to_torch,
)

__all__ = [
    "SPECS",
    "from_torch",
    "to_torch",
    "from_state_dict",
    "to_state_dict",
    "load_state_dict",
    "load_variables",
    "save_state_dict",
]

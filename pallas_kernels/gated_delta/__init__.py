"""The gated delta rule (Gated DeltaNet's per-head decay, Kimi Delta Attention's per-channel
decay) and gated / plain linear attention, chunked and recurrent: ``reference.py`` the recurrence
and the scan contract, ``prep.py`` the chunked form's parallel part (inputs -> contract arrays),
``ops.py`` the op, its ``impl`` switch and the chunked forms' shared ``jax.custom_vjp``."""

from .ops import IMPLS, gated_delta_rule
from .prep import prepare
from .reference import (
    recurrent_reference,
    scan_bwd_reference,
    scan_fwd_reference,
    segment_flags,
)

__all__ = [
    "IMPLS",
    "gated_delta_rule",
    "prepare",
    "recurrent_reference",
    "scan_bwd_reference",
    "scan_fwd_reference",
    "segment_flags",
]

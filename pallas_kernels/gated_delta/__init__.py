"""The gated delta rule (Gated DeltaNet's per-head decay, Kimi Delta Attention's per-channel
decay) and gated / plain linear attention, chunked and recurrent: ``reference.py`` the recurrence
and the scan contract, ``ops.py`` the op and its ``impl`` switch."""

from .ops import IMPLS, gated_delta_rule
from .reference import (
    recurrent_reference,
    scan_bwd_reference,
    scan_fwd_reference,
    segment_flags,
)

__all__ = [
    "IMPLS",
    "gated_delta_rule",
    "recurrent_reference",
    "scan_bwd_reference",
    "scan_fwd_reference",
    "segment_flags",
]

"""Block-sparse attention: GPU-style (Triton), Mosaic GPU (Hopper) and TPU (Mosaic) kernels, an
XLA path, the jnp reference and the on-device block-table builders."""

from ..common import check_segments, masked_logsumexp
from .kernel import BlockSizes, block_sparse_attention
from .mosaic_gpu import block_sparse_attention_mgpu, mosaic_gpu_unsupported
from .reference import block_sparse_attention_reference, token_keep, zero_padding
from .tables import build_tables, segment_block_keep, tile_visits
from .tpu import block_sparse_attention_tpu
from .xla import block_sparse_attention_xla

__all__ = [
    "BlockSizes",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_attention_xla",
    "block_sparse_attention_tpu",
    "block_sparse_attention_mgpu",
    "mosaic_gpu_unsupported",
    "token_keep",
    "zero_padding",
    "build_tables",
    "check_segments",
    "masked_logsumexp",
    "segment_block_keep",
    "tile_visits",
]

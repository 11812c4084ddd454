"""Token-level sparse attention (DeepSeek Sparse, Compressed Sparse): each query attends its own
selected keys, shared by all heads, plus an optional raw causal window and a per-head sink;
packed sequences pass segment ids (``q_seg_BT``, ``k_seg_BS``) to the attention and to the
indexer top-k, which then only read / select keys of the query's own segment.

Side by side: the Pallas kernels (``kernel.py`` Triton-style GPU, ``mosaic_gpu.py`` Hopper,
``kernel_tpu.py`` Mosaic TPU, ``indexer_kernel.py`` the fused lightning-indexer top-k), the
pure-jnp references they must equal (``reference.py``), the plain-XLA paths that are fastest on
CPU (``xla.py``, ``indexer.py``), the on-device bitmask and visit tables (``tables.py``); what
they share with block-sparse is ``pallas_kernels/common.py`` (and ``mgpu_flash.py`` for the
Hopper kernels). The ``impl`` switch over them lives in
``attnhut_jax.core`` (``token_sparse_attention``, ``indexer_topk``), next to block-sparse's.
"""

from ..common import check_segments
from .indexer import IndexerBlocks, indexer_topk
from .indexer_kernel import IndexerKernelBlocks, indexer_topk_pallas
from .kernel import BlockSizes, token_sparse_attention
from .kernel_tpu import TpuBlockSizes, token_sparse_attention_tpu
from .mosaic_gpu import mosaic_gpu_unsupported, token_sparse_attention_mgpu
from .reference import (
    indexer_scores_reference,
    indexer_topk_reference,
    token_keep,
    token_sparse_attention_reference,
)
from .tables import build_tables, key_bitmask, tile_visits
from .xla import token_sparse_attention_xla

__all__ = [
    "BlockSizes",
    "IndexerBlocks",
    "IndexerKernelBlocks",
    "TpuBlockSizes",
    "build_tables",
    "check_segments",
    "indexer_scores_reference",
    "indexer_topk",
    "indexer_topk_pallas",
    "indexer_topk_reference",
    "key_bitmask",
    "mosaic_gpu_unsupported",
    "tile_visits",
    "token_keep",
    "token_sparse_attention",
    "token_sparse_attention_mgpu",
    "token_sparse_attention_reference",
    "token_sparse_attention_tpu",
    "token_sparse_attention_xla",
]

"""Block-sparse attention: kernel, jnp reference and on-device block-table builders."""

from .kernel import BlockSizes, block_sparse_attention
from .reference import block_sparse_attention_reference, token_keep
from .tables import build_tables, tile_visits
from .xla import block_sparse_attention_xla

__all__ = [
    "BlockSizes",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "block_sparse_attention_xla",
    "token_keep",
    "build_tables",
    "tile_visits",
]

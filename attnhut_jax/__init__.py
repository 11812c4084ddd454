"""attnhut_jax: attention mechanisms from frontier labs as Flax linen modules.

Every mechanism is built from plain ints, initialised with ``init`` and called with ``apply`` on a
(batch, seq, dim) array; parameters mirror attnhut 0.5.0's ``state_dict`` names.

    import jax, jax.numpy as jnp
    from attnhut_jax import GroupedQueryAttention
    attn = GroupedQueryAttention(dim=512, num_heads=8, num_kv_heads=2)
    x = jnp.ones((2, 128, 512))
    variables = attn.init(jax.random.key(0), x)
    y = attn.apply(variables, x)
"""

from .bigbird import BigBirdAttention
from .cjepa import CausalJEPAAttention, cjepa_masked_loss
from .compressed import CompressedSparseAttention, GroupedOutputProjection, HeavilyCompressedAttention
from .deepseek_sparse import DeepSeekSparseAttention, LightningIndexer, dsa_index_aux_loss
from .delta import DeltaAttention
from .differential import DifferentialAttention, lambda_init
from .gated_deltanet import GatedDeltaNet
from .gqa import GroupedQueryAttention
from .kimi_delta import KimiDeltaAttention
from .linear_attention import LinearAttention
from .minimax_sparse import MiniMaxSparseAttention, msa_index_aux_loss
from .mla import MultiHeadLatentAttention
from .mqa import MultiQueryAttention
from .sinkhorn import SinkhornAttention, sinkhorn_block_pattern
from .slot import SlotAttention
from .spark import SparkAttention, spark_pattern
from .sparse_transformer import (
    FixedSparseAttention,
    StridedSparseAttention,
    fixed_pattern,
    strided_pattern,
)
from .standard import StandardAttention

__version__ = "0.1.0"

__all__ = [
    "StandardAttention",
    "MultiQueryAttention",
    "GroupedQueryAttention",
    "MultiHeadLatentAttention",
    "DifferentialAttention",
    "lambda_init",
    "SlotAttention",
    "BigBirdAttention",
    "DeltaAttention",
    "DeepSeekSparseAttention",
    "LightningIndexer",
    "dsa_index_aux_loss",
    "MiniMaxSparseAttention",
    "msa_index_aux_loss",
    "HeavilyCompressedAttention",
    "CompressedSparseAttention",
    "GroupedOutputProjection",
    "CausalJEPAAttention",
    "cjepa_masked_loss",
    "GatedDeltaNet",
    "KimiDeltaAttention",
    "LinearAttention",
    "StridedSparseAttention",
    "FixedSparseAttention",
    "strided_pattern",
    "fixed_pattern",
    "SinkhornAttention",
    "sinkhorn_block_pattern",
    "SparkAttention",
    "spark_pattern",
]

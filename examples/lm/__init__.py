"""A small decoder-only language model whose attention is any attnhut_jax mechanism.

``config`` (the run's ``Config``), ``model`` (``LM`` and the attention each layer builds),
``data`` (multi-query associative recall, or a file's bytes), ``sharding`` (mesh and parameter
placement by logical axes), ``training`` (the jitted step, evaluation, checkpoints, the loop),
``analysis`` (read maps and samples) and ``generation`` (sampling with the attention layers'
caches). ``examples/train_lm.py`` is the command line on top; ``examples/generate.py`` samples
from a trained model; ``examples/compare.py`` and ``examples/patterns.py`` run several mechanisms
through ``train``.
"""

from .analysis import (
    PATTERNED,
    describe_sample,
    greedy_continue,
    key_read_map,
    last_layer_selection,
    recall_view,
    show_what_it_learned,
)
from .config import MECHANISMS, WITH_AUX_LOSS, WITH_LINEAR_CORE, WITH_SPARSE_CORE, Config
from .data import Batch, Data, TextData, recall_batch
from .generation import Decoder, Generation, generate, rollout, sample
from .model import LM, Block, attention_with_aux, kv_cache_bytes_per_token, make_attention
from .sharding import (
    MESH_AXES,
    RULES,
    make_mesh,
    param_partition_specs,
    param_shardings,
    parse_mesh,
    state_shardings,
)
from .training import Checkpoints, Progress, Trainer, loss_fn, optimizer, schedule, train

__all__ = [
    "Batch", "Block", "Checkpoints", "Config", "Data", "Decoder", "Generation", "LM", "MECHANISMS",
    "MESH_AXES",
    "PATTERNED", "Progress", "RULES", "TextData", "Trainer", "WITH_AUX_LOSS", "WITH_LINEAR_CORE",
    "WITH_SPARSE_CORE",
    "attention_with_aux",
    "describe_sample", "generate", "greedy_continue", "key_read_map", "kv_cache_bytes_per_token",
    "last_layer_selection", "loss_fn", "make_attention", "make_mesh", "optimizer",
    "param_partition_specs", "param_shardings", "parse_mesh", "recall_batch", "recall_view",
    "rollout", "sample", "schedule", "show_what_it_learned", "state_shardings", "train",
]

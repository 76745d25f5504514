"""Extract SAE activations: tokenize, batch by length, one forward pass for every layer, sparse output.

The forward pass stops right after the deepest layer asked for (a hook raises once it has that layer's
output), so the layers above it and the LM head never run: the outputs at the hooked layers are
bit-identical to a full run. Each hooked layer's output (``resid_post``) goes through its SAE on the
device, is pooled per sample there (max, mean over all tokens, argmax, active-token count), and only the
non-zero entries leave the device as sparse rows. Optionally the hooked layer's output itself leaves too, one
float16 vector per real token (``token_residuals``, for token-level dense probes; see
:func:`~dagster_project.lib.extraction.pooling.float16_scaled`).

The package, along the pipeline's seams (the Arrow schemas of the tables it writes are the table
registry's, :mod:`dagster_project.lib.tables`):

- :mod:`.batching`: tokenizing, the ``tokens`` rows, batch planning by length, padded batches;
- :mod:`.pooling`: the SAE encode and pooling on the device, the sparse device batches and their Arrow tables;
- :mod:`.forward`: the hooked forward pass, the pipelined batch loop (``extract``), the batch budget by
  memory, residual vectors for SAE training;
- :mod:`.writers`: ``extract_to_lake``, the writer threads that stream each batch into the lake.

Tunable module constants (``COMPILE_POOL``, ``LAST_BATCH_FRACTION``, ``WRITE_DEPTH``, the ``AUTO_*``
budget) are read where they are defined, so they are not re-exported here: set them on their own module.
"""

from dagster_project.lib.extraction.batching import (
    Tokenized,
    length_batches,
    pad_batch,
    pad_id,
    plan_batches,
    small_last_batch,
    tokenize,
    tokens_table,
)
from dagster_project.lib.extraction.forward import (
    ExtractStats,
    auto_batch_tokens,
    batch_hidden,
    collect_layer_vectors,
    collect_vectors,
    extract,
    forward_layers,
    initial_budget,
)
from dagster_project.lib.extraction.pooling import (
    FLOAT16_MAX,
    DeviceBatch,
    LayerBatch,
    PooledDevice,
    compact,
    encode_pool_device,
    float16_scaled,
    jumprelu_pool,
    pool_device,
    real_token_index,
)
from dagster_project.lib.extraction.writers import extract_to_lake
from dagster_project.lib.tables import ACTIVATION_TABLES as LAYER_TABLES  # what a (layer, dataset) holds
from dagster_project.lib.tables import (
    POOLED_SCHEMA,
    TOKEN_ACTS_SCHEMA,
    TOKENS_SCHEMA,
    residual_schema,
    token_residual_schema,
)

__all__ = [
    "FLOAT16_MAX",
    "LAYER_TABLES",
    "POOLED_SCHEMA",
    "TOKENS_SCHEMA",
    "TOKEN_ACTS_SCHEMA",
    "DeviceBatch",
    "ExtractStats",
    "LayerBatch",
    "PooledDevice",
    "Tokenized",
    "auto_batch_tokens",
    "batch_hidden",
    "collect_layer_vectors",
    "collect_vectors",
    "compact",
    "encode_pool_device",
    "extract",
    "extract_to_lake",
    "float16_scaled",
    "forward_layers",
    "initial_budget",
    "jumprelu_pool",
    "length_batches",
    "pad_batch",
    "pad_id",
    "plan_batches",
    "pool_device",
    "real_token_index",
    "residual_schema",
    "small_last_batch",
    "token_residual_schema",
    "tokenize",
    "tokens_table",
]

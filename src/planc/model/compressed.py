"""Compressed attention: DeepSeek-V4's `heavily_compressed_attention` (HCA) and
`compressed_sparse_attention` (CSA) layers.

Cache, per sequence (transformers 5.23 `DeepseekV4HCACache` / `DeepseekV4CSACache`, verified
against real caches in tests/test_hybrid.py):
- a sliding window of shared-KV MQA keys (keys and values are one tensor): head_dim per token,
  window - 1 + step tokens as for any sliding layer;
- one compressed entry per `compress_rate` tokens (128 for HCA, 4 for CSA): head_dim wide, plus
  for CSA the lightning indexer's own entry of index_head_dim;
- the projections waiting for their window to close (kv and gate per entry name), which the cache
  keeps as a view of the step's whole projection: the step's tokens (plus up to compress_rate - 1
  carried over) of head_dim (HCA) or 2 x head_dim and 2 x index_head_dim (CSA, two overlapping
  series);
- CSA's overlap state: the last window's first series, compress_rate x (head_dim +
  index_head_dim) for kv and gate.
All in the model dtype but the overlap's gate, fp32 as the fp32 position bias it adds.

Transients: DeepSeek-V4 runs eager attention with sinks over the window and the compressed
entries (its attention.py transient with those columns), and CSA's indexer scores every query
against every compressed entry per indexer head (indexed.py's scoring over S / compress_rate).
"""

from __future__ import annotations

from planc.model.cache import LayerCache
from planc.model.config import DTYPE_BYTES

HCA, CSA = "heavily_compressed_attention", "compressed_sparse_attention"
LAYER_TYPES = (HCA, CSA)


def layer_cache(layer_type: str, config, dtype: str) -> LayerCache:
    """The cache of one DeepSeek-V4 compressed-attention layer, from its (per-layer) config."""
    e = DTYPE_BYTES[dtype]
    head_dim = config.head_dim
    rate = config.compress_rates[layer_type]
    if layer_type == HCA:
        return LayerCache(
            layer_type,
            bytes_per_token=head_dim * e,
            window=config.sliding_window,
            compress_rate=rate,
            compressed_bytes=head_dim * e,
            buffer_bytes_per_token=2 * head_dim * e,
        )
    index_dim = config.index_head_dim
    return LayerCache(
        layer_type,
        bytes_per_token=head_dim * e,
        window=config.sliding_window,
        # The overlap's kv in the model dtype, its gate in fp32: the gate adds the compressor's
        # position_bias, which transformers keeps in fp32 (_keep_in_fp32_modules_strict).
        state_bytes=rate * (head_dim + index_dim) * (e + 4),
        indexer_heads=config.index_n_heads,
        indexer_head_dim=index_dim,
        compress_rate=rate,
        compressed_bytes=(head_dim + index_dim) * e,
        buffer_bytes_per_token=2 * (2 * head_dim + 2 * index_dim) * e,
    )

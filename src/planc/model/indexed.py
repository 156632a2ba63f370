"""Indexed (DeepSeek sparse) attention: DeepSeek-V3.2, GLM-5 (`glm_moe_dsa`), GLM-5-Next, HunYuan v4,
AXK2 (every model whose `indexed_attention` layers transformers gives a `DynamicIndexedLayer`): MLA
attention whose keys an indexer ranks, per query, to keep the top k.

Cache, per token of a sequence (transformers 5.23 `DynamicIndexedLayer`, verified against real
caches in tests/test_hybrid.py): the MLA latent and rotary key as for DeepSeek-V3 (attention.py),
plus the indexer's key, one `index_head_dim` vector in the model dtype. Layers that reuse an
earlier layer's top-k (HunYuan v4's `indexer_types: shared`) have no indexer and keep no indexer
keys. GLM-5-Next's k-pool indexer (`Glm5NextTextIndexer`) caches a packed row per token instead:
its key, its pooling gate scores (`index_kpool_compress_gate`, one per key channel) and a validity
channel, `2 * index_head_dim + 1` values in the model dtype, and scores one gate-weighted pooled key
per `index_kpool` tokens.

Transients. transformers computes the indexer's scores densely (the bf16 stand-in for the
reference FP8 kernel, `*Indexer.forward`): per indexer head, a fp32 query x key score matrix over
the whole context, two alive at once (the product and its ReLU), then their weighted sum per query
and its masked copy, and turns the top k into a boolean mask for the attention (so SDPA always runs
with a mask). That is quadratic in tokens: 64 heads x 16k x 16k x 8 bytes = 128 GiB for one
DeepSeek-V3.2 layer at 16k, so a long prefill is planned in chunks. The attention part is the MLA
transient of attention.py.
"""

from __future__ import annotations

from planc.model.cache import LayerCache
from planc.model.config import DTYPE_BYTES, FP32, Shapes
from planc.workload import Workload


def _indexer_of(layer_module):
    """The layer's DSA indexer module, or None where the layer reuses another layer's top-k."""
    if layer_module is None:
        return None
    for module in layer_module.modules():
        if all(hasattr(module, name) for name in ("n_heads", "head_dim", "index_topk")):
            return module
    return None


def layer_cache(model_type: str, shapes: Shapes, dtype: str, layer_module, index: int) -> LayerCache:
    """The cache of one indexed-attention layer: MLA KV plus its indexer's keys."""
    from planc.model import attention

    indexer = _indexer_of(layer_module)
    kv = attention.kv_bytes_per_token(shapes, dtype)
    if indexer is None:
        return LayerCache("indexed_attention", kv)
    pool = int(getattr(indexer, "index_kpool", 0) or 0)
    # The k-pool indexer's packed row: key, gate scores, validity (Glm5NextTextIndexer.forward).
    indexer_width = 2 * indexer.head_dim + 1 if pool else indexer.head_dim
    return LayerCache(
        "indexed_attention",
        kv + indexer_width * DTYPE_BYTES[dtype],
        indexer_heads=indexer.n_heads,
        indexer_head_dim=indexer.head_dim,
        indexer_pool=pool,
    )


def indexer_transient_bytes(cache: LayerCache, shapes: Shapes, workload: Workload, dtype: str) -> int:
    """Peak bytes of an indexer's scoring over the largest step (0 for a layer without indexer)."""
    if not cache.indexer_heads:
        return 0
    e = DTYPE_BYTES[dtype]
    b, t = workload.batch_size, workload.step_tokens
    # DSA scores every cached token; DeepSeek-V4's CSA indexer scores the compressed entries.
    s = cache.compressed_entries(workload) if cache.compress_rate else workload.max_seq_len
    heads, dim = cache.indexer_heads, cache.indexer_head_dim
    if cache.indexer_pool:
        return _pooled_indexer_transient_bytes(cache, workload, e)
    scores = 2 * b * heads * t * s * FP32  # the per-head product and its ReLU
    queries = b * t * heads * dim * (e + FP32)  # rotated queries and their fp32 copy
    keys = b * s * dim * FP32  # the cached indexer keys in fp32
    summed = 2 * b * t * s * FP32  # weighted sum over heads and its masked copy
    mask = 2 * b * t * s  # the top-k mask and the attention mask it is folded into (bool)
    return scores + queries + keys + summed + mask


def _pooled_indexer_transient_bytes(cache: LayerCache, workload: Workload, e: int) -> int:
    """GLM-5-Next's k-pool indexer: fp32 scores over one pooled key per `indexer_pool` tokens, but
    token-wide visibility masks and the int32 selection counts the top-k pools expand back into
    (`Glm5NextTextIndexer.forward`, `Glm5NextTextAttention.build_attention_mask_from_topk`)."""
    b, t, s = workload.batch_size, workload.step_tokens, workload.max_seq_len
    heads, dim, pool = cache.indexer_heads, cache.indexer_head_dim, cache.indexer_pool
    pools = -(-s // pool)
    scores = 2 * b * heads * t * pools * FP32  # the per-head product and its ReLU
    queries = b * t * heads * dim * (e + FP32)  # projected queries and their fp32 copy
    # Keys and gate scores gathered into pools, the fp32 gate logits and softmax, the weighted keys.
    pooled = b * pools * pool * dim * (3 * e + 2 * FP32)
    pool_scores = 3 * b * t * pools * FP32  # weighted sum over heads, masked copy, visibility gather
    visible = 2 * b * t * s  # causal and visible (bool)
    selected = b * t * s * (4 + 1)  # int32 selection counts and the boolean attention mask
    return scores + queries + pooled + pool_scores + visible + selected

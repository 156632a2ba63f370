"""Softmax attention layers (full, sliding window, chunked, reference sliding; GQA and MLA): their cache
and their transients.

Reference sliding-window attention (Unlimited-OCR's `reference_sliding_attention`,
`UnlimitedOcrDynamicReferenceSlidingWindowLayer`) keeps every prefill token and a sliding window over
the generated ones. The prompt's share of `max_seq_len` is not in the workload, and a prompt of at
least max_seq_len - window tokens keeps the whole context, so the ledger plans it as full attention;
its mask is always built (the prefill overlay is a mask function).

Cache bytes are as transformers' DynamicCache stores them, verified against real caches in
tests/test_memory.py; transients are checked against the fake-tensor simulation (planc simulate).
"""

from __future__ import annotations

from planc.model.cache import LayerCache
from planc.model.config import DTYPE_BYTES, Shapes
from planc.workload import Workload

LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "reference_sliding_attention")
# Window kinds: the cache keeps at most `sliding_window` tokens (the reference kind keeps the prompt too).
WINDOWED = ("sliding_attention", "chunked_attention")


def kv_bytes_per_token(shapes: Shapes, dtype: str) -> int:
    """Cache bytes one token adds to one layer of one sequence, as transformers' DynamicCache stores it."""
    element = DTYPE_BYTES[dtype]
    if shapes.mla_latent_dim:
        # transformers 5 caches MLA's compressed latent and rotary key (one "head"), not per-head K/V.
        return shapes.mla_latent_dim * element
    return shapes.num_key_value_heads * (shapes.head_dim + shapes.v_head_dim) * element


def kv_elements_per_token(shapes: Shapes) -> tuple[int, int]:
    """Key and value elements one token adds to one layer's cache (MLA: the latent as keys, the rotary key as values)."""
    if shapes.mla_latent_dim:
        return shapes.mla_key_dim, shapes.mla_latent_dim - shapes.mla_key_dim
    return shapes.num_key_value_heads * shapes.head_dim, shapes.num_key_value_heads * shapes.v_head_dim


# QuantizedCache backends planc sizes: bytes per cached element, and the per-layer scales.
QUANTIZED_KV = {"fp8": (1, 2 * 4)}  # float8_e4m3fn states; one fp32 scale for keys and one for values per layer


def quantized_layer_cache(shapes: Shapes, backend: str) -> LayerCache:
    """A full-attention layer in transformers' Fp8QuantizedLayer: fp8 keys and values, per-tensor fp32 scales."""
    element, scales = QUANTIZED_KV[backend]
    keys, values = kv_elements_per_token(shapes)
    return LayerCache("full_attention", (keys + values) * element, None, quantized=backend, fixed_bytes=scales)


def dequantized_kv_bytes(shapes: Shapes, workload: Workload, dtype: str, mixer: int) -> int:
    """Peak of one quantized-cache update plus the attention that reads its result.

    Fp8QuantizedLayer.update appends the new fp8 states, then dequantizes the whole layer:
    `(quantized.float() * scale).to(dtype)` holds two fp32 copies (4 + 4 bytes per element), keys
    first, then values while the keys' result (in the model dtype) is alive; attention then runs on
    both in the model dtype. The first (prefill) update quantizes its states the same way.
    """
    e = DTYPE_BYTES[dtype]
    rows = workload.batch_size * workload.max_seq_len
    keys, values = (rows * n for n in kv_elements_per_token(shapes))
    return max(8 * keys, e * keys + 8 * values, e * (keys + values) + mixer)


def layer_cache(layer_type: str, layer_kwargs: dict, shapes: Shapes, dtype: str, layer_module=None) -> LayerCache:
    """The cache of one attention layer of `layer_type` (one of LAYER_TYPES), with what its
    attention module does beyond softmax attention (`layer_module`: the decoder layer on meta)."""
    window = int(layer_kwargs["sliding_window"]) if layer_type in WINDOWED else None
    return LayerCache(layer_type, kv_bytes_per_token(shapes, dtype), window,
                      dynamic_mask_keep=_dynamic_mask_keep(layer_module))


def _dynamic_mask_keep(layer_module) -> int:
    """keep_window_size of a dynamic-mask attention module in the layer (Doge's DMA), else 0."""
    for module in layer_module.modules() if layer_module is not None else ():
        if hasattr(module, "prepare_dynamic_mask") and isinstance(getattr(module, "keep_window_size", None), int):
            return module.keep_window_size
    return 0


def hybrid_layer_cache(layer_type: str, layer_kwargs: dict, shapes: Shapes, dtype: str, layer_module) -> LayerCache:
    """The attention half of a `hybrid` layer (Falcon-H1, Zamba): its KV per token and window.

    Hybrid layers run an attention block of their own beside (or shared over) the state-space
    mixer, whose heads need not be the config's top-level ones (Zamba's shared block attends over
    the concatenated 2 x hidden): the KV per token is what its k_proj and v_proj produce.
    """
    import torch

    window = int(layer_kwargs["sliding_window"]) if layer_type == "hybrid_sliding" else None
    per_token = kv_bytes_per_token(shapes, dtype)
    for module in layer_module.modules() if layer_module is not None else ():
        k_proj, v_proj = getattr(module, "k_proj", None), getattr(module, "v_proj", None)
        if isinstance(k_proj, torch.nn.Linear) and isinstance(v_proj, torch.nn.Linear):
            per_token = (k_proj.out_features + v_proj.out_features) * DTYPE_BYTES[dtype]
            break
    return LayerCache(layer_type, per_token, window)


def materialises_scores(backend: str) -> bool:
    """The math SDPA path and eager attention build the B x H x T x S score matrix."""
    return backend in ("math", "eager")


def context_tokens(cache: LayerCache | None, workload: Workload) -> int:
    """Keys a query of the largest step attends over: the context, capped by a sliding window."""
    s = workload.max_seq_len
    if cache is not None and cache.window is not None:
        s = min(s, cache.window - 1 + workload.step_tokens)
    if cache is not None:
        s += cache.compressed_entries(workload)  # DeepSeek-V4 attends over its compressed entries too
    return s


def dynamic_mask_bytes(shapes: Shapes, cache: LayerCache, workload: Workload, dtype: str, backend: str) -> tuple[int, int]:
    """(peak while building, bytes held through the attention) of a dynamic-mask attention's mask.

    DogeAttention.prepare_dynamic_mask: a per-KV-head score of every key, broadcast over the
    queries, is filled with the causal mask (turned from bool into the model dtype first, for
    SDPA): b x kv_heads x t x s in the model dtype. Past keep_window_size keys it keeps the top k
    per query: a zeroed copy, topk's int64 indices (alive until the function returns), the scatter
    into that copy, its `== 0` bool and the masked result, beside the filled mask. repeat_kv then
    copies the result per query head, and SDPA runs with it.
    """
    e = DTYPE_BYTES[dtype]
    b, t = workload.batch_size, workload.step_tokens
    s = context_tokens(cache, workload)
    heads, kv_heads = shapes.num_attention_heads, shapes.num_key_value_heads
    converted = b * t * s * e if backend != "eager" else 0
    per_head = b * kv_heads * t * s
    if s > cache.dynamic_mask_keep:
        building = converted + per_head * (3 * e + 1) + b * kv_heads * t * cache.dynamic_mask_keep * 8
    else:
        building = converted + per_head * e
    held = per_head * e + (b * heads * t * s * e if heads != kv_heads else 0)
    return building, held


def transient_bytes(shapes: Shapes, cache: LayerCache | None, workload: Workload, dtype: str, backend: str) -> int:
    """Peak transient bytes inside one attention block over the largest step (projections to output)."""
    e = DTYPE_BYTES[dtype]
    b, t = workload.batch_size, workload.step_tokens
    s = context_tokens(cache, workload)
    heads, kv_heads = shapes.num_attention_heads, shapes.num_key_value_heads
    d_qk, d_v = shapes.head_dim, shapes.v_head_dim
    dynamic = cache is not None and cache.dynamic_mask_keep > 0
    # q, k, v projections and their rotary-embedded copies.
    qkv = b * t * (2 * heads * d_qk + 2 * kv_heads * d_qk + kv_heads * d_v) * e
    if shapes.mla_latent_dim:
        # MLA expands the cached latents into per-head keys and values over the whole context.
        expanded = b * heads * s * (d_qk + d_v) * e
    elif heads != kv_heads and (materialises_scores(backend) or b > 1 or dynamic):
        # repeat_kv copies K/V per query head when SDPA cannot use enable_gqa (a mask is present).
        expanded = b * heads * s * (d_qk + d_v) * e
    else:
        expanded = 0
    if backend == "eager":
        # Masked scores in the model dtype, then softmax(dtype=float32): an fp32 copy and the fp32
        # result (the cast back reuses the fp32 result's lifetime).
        scores = b * heads * t * s * (e + 8 if e < 4 else 8)
    elif backend == "math":
        # torch's math SDPA upcasts to fp32: scores and softmax, plus fp32 copies of q, k and v.
        scores = b * heads * t * s * 8 + b * heads * (t * d_qk + s * (d_qk + d_v)) * 4
    else:
        scores = 0
    attn_out = b * t * heads * d_v * e
    mixer = qkv + expanded + scores + attn_out
    if dynamic:
        building, held = dynamic_mask_bytes(shapes, cache, workload, dtype, backend)
        mixer = qkv + max(building, held + expanded + scores + attn_out)
    if cache is not None and cache.quantized:
        return dequantized_kv_bytes(shapes, workload, dtype, mixer)
    return mixer


def mask_bytes(units, workload: Workload, backend: str, dtype: str) -> tuple[int, int]:
    """Attention-mask bytes on the main device and on every other executing device.

    transformers passes no mask (SDPA's is_causal) only for a single unpadded sequence in one
    prefill step with full attention; otherwise it builds a b x t x s mask per kind (full,
    sliding): bool for SDPA, the model dtype for eager. The main device keeps the originals for
    the whole forward; a hook copies one to each other device while its layers run.
    """
    b, t, full = workload.batch_size, workload.step_tokens, workload.max_seq_len
    eager = backend == "eager"
    attending = [unit.cache for unit in units if unit.kind == "layer" and unit.cache.attention]
    windows = {cache.window for cache in attending}
    # Indexed (sparse) attention always builds its mask: the indexer needs it for causality; so
    # does reference sliding attention, whose prefill overlay is a mask function, and dynamic mask
    # attention, which adds its own onto it.
    forced = any(
        cache.kind in ("indexed_attention", "reference_sliding_attention") or cache.dynamic_mask_keep
        for cache in attending
    )
    chunked = t < full
    sizes = []
    for window in windows:
        s = full if window is None else min(full, window - 1 + t)
        sliding_cut = window is not None and window <= full
        if eager or b > 1 or chunked or sliding_cut or forced:
            sizes.append(b * t * s)
    element = DTYPE_BYTES[dtype] if eager else 1
    return sum(sizes) * element, max(sizes, default=0) * element

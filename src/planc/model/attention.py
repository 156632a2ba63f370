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

import functools

from planc.model.cache import LayerCache
from planc.model.config import DTYPE_BYTES, FP32, Shapes
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


# Attention modules with an eager forward of their own (not transformers' eager_attention_forward),
# by class: (model-dtype copies of the b x h x t x s scores alive at the fp32 softmax, whether the
# model keeps the probabilities the layer returns while its next layer runs).
OWN_EAGER_SCORES = {
    # BloomAttention.forward: alibi.baddbmm's scores stay referenced (attention_scores) beside
    # their masked copy (attn_weights + attention_mask); BloomBlock returns attention_probs
    # whatever output_attentions says, and BloomModel's loop holds that `outputs` tuple until the
    # next block has returned.
    "BloomAttention": (2, True),
    # XLNetRelativeAttention.rel_attn_core (float32: the only dtype it generates in): the content
    # scores `ac` and the shifted position scores `bd` stay referenced beside their sum
    # attn_score, and the softmax's result beside all three.
    "XLNetRelativeAttention": (3, False),
}


# Attention modules that meet fp32 tensors with the weights' dtype on the path generate takes, so
# that the model generates only in float32. XLNetRelativeAttention: generate's
# prepare_inputs_for_generation always passes target_mapping, and the two-stream branch of its
# forward takes `torch.einsum("ibh,hnd->ibnd", r, self.r)` with the relative position encodings
# `r` that relative_positional_encoding builds in fp32 (only the one-stream branch casts them).
FP32_ONLY_ATTENTION = {"XLNetRelativeAttention"}


def half_precision_generates(model) -> bool:
    """generate can run the model (on meta) in bfloat16 or float16: no module of FP32_ONLY_ATTENTION in it."""
    return not any(type(module).__name__ in FP32_ONLY_ATTENTION for module in model.modules())


def layer_cache(layer_type: str, layer_kwargs: dict, shapes: Shapes, dtype: str, layer_module=None) -> LayerCache:
    """The cache of one attention layer of `layer_type` (one of LAYER_TYPES), with what its
    attention module does beyond softmax attention (`layer_module`: the decoder layer on meta)."""
    window = int(layer_kwargs["sliding_window"]) if layer_type in WINDOWED else None
    modules = list(layer_module.modules()) if layer_module is not None else []
    copies, outlive = next((OWN_EAGER_SCORES[type(m).__name__] for m in modules if type(m).__name__ in OWN_EAGER_SCORES),
                           (1, False))
    return LayerCache(layer_type, kv_bytes_per_token(shapes, dtype), window,
                      dynamic_mask_keep=_dynamic_mask_keep(layer_module), eager_score_copies=copies,
                      scores_outlive_layer=outlive, fp32_rotary=rotary_upcasts(layer_module, shapes))


def rotary_upcasts(layer_module, shapes: Shapes) -> bool:
    """The layer's attention computes its rotary embedding in fp32 (ERNIE 4.5's and ModernBERT's
    apply_rotary_pos_emb: `(q.float() * cos) + (rotate_half(q).float() * sin)`).

    Read from what the function does, not its name: the modeling module's apply_rotary_pos_emb
    runs once on meta tensors in the model dtype, and upcasts when one of its results the size of
    the queries is fp32. A function it cannot call so (another signature) counts as not upcasting.
    """
    import sys

    if layer_module is None or not shapes.num_attention_heads or not shapes.head_dim:
        return False
    modeling = (sys.modules.get(type(module).__module__) for module in layer_module.modules())
    function = next((f for f in (getattr(m, "apply_rotary_pos_emb", None) for m in modeling) if callable(f)), None)
    if function is None:
        return False
    return _upcasts(function, shapes.num_attention_heads, shapes.num_key_value_heads, shapes.head_dim)


@functools.lru_cache(maxsize=64)
def _upcasts(function, heads: int, kv_heads: int, head_dim: int) -> bool:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    tokens = 4
    queries = heads * tokens * head_dim
    upcast = []

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            upcast.extend(leaf.dtype == torch.float32 and leaf.numel() == queries
                          for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor))
            return out

    def empty(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    try:
        with Dtypes():
            function(empty(1, heads, tokens, head_dim), empty(1, kv_heads, tokens, head_dim),
                     empty(1, tokens, head_dim), empty(1, tokens, head_dim))
    except Exception:  # noqa: BLE001 - a rotary of another signature (partial, multimodal sections)
        return False
    return any(upcast)


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


def transient_bytes(
    shapes: Shapes, cache: LayerCache | None, workload: Workload, dtype: str, backend: str, masked: bool = False
) -> int:
    """Peak transient bytes inside one attention block over the largest step (projections to output).
    `masked`: the block is given a mask even for one unpadded sequence (T5Gemma2's sliding encoder layers)."""
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
    elif heads != kv_heads and (materialises_scores(backend) or b > 1 or dynamic or masked) and (t > 1 or backend == "eager"):
        # repeat_kv copies K/V per query head when SDPA cannot use enable_gqa (a mask is present);
        # for one query token SDPA folds the groups into the query instead (sdpa_attention.pack_gqa).
        expanded = b * heads * s * (d_qk + d_v) * e
    else:
        expanded = 0
    if backend == "eager":
        # Masked scores in the model dtype (more copies where the module keeps them: OWN_EAGER_SCORES),
        # then softmax(dtype=float32): an fp32 copy and the fp32 result (the cast back reuses the
        # fp32 result's lifetime).
        copies = cache.eager_score_copies if cache is not None else 1
        scores = b * heads * t * s * (copies * e + (8 if e < 4 else 4))
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
    if cache is not None and cache.fp32_rotary:
        # The rotary phase, before attention: q, k and v, and the fp32 embedding of q (its fp32
        # copy times cos, rotate_half's fp32 copy times sin, their sum: three at once), then of k
        # beside q's fp32 result; their casts back are smaller.
        queries, keys, values = b * t * heads * d_qk, b * t * kv_heads * d_qk, b * t * kv_heads * d_v
        rotary = (queries + keys + values) * e + max(3 * queries, queries + 3 * keys) * FP32
        mixer = max(mixer, rotary)
    if cache is not None and cache.quantized:
        return dequantized_kv_bytes(shapes, workload, dtype, mixer)
    return mixer


def kept_scores_bytes(shapes: Shapes, cache: LayerCache | None, workload: Workload, dtype: str, backend: str) -> int:
    """Bytes of a layer's attention probabilities that stay alive while the next layer runs (the
    model keeps what the layer returns: OWN_EAGER_SCORES); 0 where the backend builds none."""
    if cache is None or not cache.scores_outlive_layer or not materialises_scores(backend):
        return 0
    b, t = workload.batch_size, workload.step_tokens
    return b * shapes.num_attention_heads * t * context_tokens(cache, workload) * DTYPE_BYTES[dtype]


def mask_bytes(units, workload: Workload, backend: str, dtype: str) -> tuple[int, int, int]:
    """Attention-mask bytes on the main device, on every other executing device, and the main
    device's peak while it builds them.

    transformers passes no mask (SDPA's is_causal) only for a single unpadded sequence in one
    prefill step with full attention; otherwise it builds a b x t x s mask per kind (full,
    sliding): bool for SDPA, the model dtype for eager. The main device keeps the originals for
    the whole forward; a hook copies one to each other device while its layers run. It builds
    them before any layer runs, each beside the ones already built (`mask_build_bytes`).
    """
    b, t, full = workload.batch_size, workload.step_tokens, workload.max_seq_len
    eager = backend == "eager"
    attending = [unit.cache for unit in units if unit.kind == "layer" and unit.cache.attention]
    windows = {(cache.window, cache.kind in ("chunked_attention",)) for cache in attending}
    # Indexed (sparse) attention always builds its mask: the indexer needs it for causality; so
    # does reference sliding attention, whose prefill overlay is a mask function, and dynamic mask
    # attention, which adds its own onto it; and merged self + cross attention (T5Gemma2), whose
    # decoder builds every mask (allow_is_causal_skip=False), the source's, and their concatenations.
    merged = any(cache.merged_cross for cache in attending)
    forced = merged or any(
        cache.kind in ("indexed_attention", "reference_sliding_attention") or cache.dynamic_mask_keep
        for cache in attending
    )
    chunked = t < full
    element = DTYPE_BYTES[dtype] if eager else 1
    held, building = [], []
    for window, chunks in windows:
        s = full if window is None else min(full, window - 1 + t)
        sliding_cut = window is not None and window <= full
        if eager or b > 1 or chunked or sliding_cut or forced:
            merged_with_source = b * t * (s + workload.source_tokens) * element if merged else 0
            held.append(b * t * s * element + merged_with_source)
            building.append(mask_build_bytes(b, t, s, window is not None, chunks, dtype if eager else None))
    if merged:
        held.append(b * t * workload.source_tokens * element)  # the source's mask, kept in the mapping
        building.append(held[-1])
    main = sum(held)
    # Built one after another: the largest build beside all the others' results bounds the peak.
    peak = max((main - result + build for result, build in zip(held, building)), default=0)
    return main, max(held, default=0), peak


def mask_build_bytes(b: int, t: int, s: int, windowed: bool, chunks: bool, eager_dtype: str | None) -> int:
    """Peak bytes of building one b x t x s mask (masking_utils.sdpa_mask, then eager_mask).

    sdpa_mask broadcasts the mask function over (b, 1, t, 1) and (1, 1, 1, s) indices: an
    index-only function gives one t x s bool, expanded (a view) over the batch. A window (the
    sliding overlay and causal, masking_utils.and_masks) evaluates each function and their `&`
    beside the running result: three t x s bools at once. A padded batch (b > 1: generate passes
    the attention mask) adds the padding function over the batch: the b x t x s result beside the
    t x s one; chunked attention's overlay compares per-sequence chunk ids over the batch (its
    `==` and `&` beside the result). eager_mask then turns the bools into the model dtype
    (torch.where) while they are alive. Checked against fake-tensor runs of transformers' own
    create_*_mask functions in tests/test_transients.py.
    """
    plane, whole = t * s, b * t * s
    padded = b > 1
    if chunks and padded:
        bools = 2 * whole + plane
    elif windowed or chunks:
        bools = max(3 * plane, plane + whole) if padded else 3 * plane
    else:
        bools = plane + whole if padded else whole
    if eager_dtype is None:
        return bools
    return max(bools, whole * (1 + DTYPE_BYTES[eager_dtype]))

"""Encoder-decoder models (T5, BART, Florence2, Pix2Struct, VisionEncoderDecoder, ...): the encoder, its output and the
decoder's cross-attention cache.

transformers' contract (generation/utils.py `_prepare_text_encoder_decoder_kwargs_for_generation`):
generate runs `model.get_encoder()` once over the source (the prompt's tokens, or the image's
patches), with `io_same_device` so that `encoder_outputs` (batch x source tokens x d_model) come
back on the input device, the main GPU, and keeps them for every decode step. The decoder starts
from `decoder_start_token_id`; its context is the generated tokens. Its cache is an
`EncoderDecoderCache`: a self-attention DynamicCache that grows by one token a step, and a
cross-attention DynamicCache that each decoder layer fills once, at the first step, with the K/V
of the whole source (cache_utils.py: EncoderDecoderCache, `is_updated`), fixed afterwards.

What the ledger charges, and where:
- the encoder's units ("pre" units, `Unit.encoder`) run on the main GPU before the decoder; their
  peak is one encoder block over batch x source tokens, attending both ways (no causal mask), with
  T5's relative position bias where the encoder has one, and the encoder's inputs;
- the encoder output, alive for the whole generation, on the main GPU (a `LayerCache` of the
  encoder's last unit, d_model bytes-wide per source token);
- per decoder layer, the cross-attention K/V of the source tokens (`LayerCache.bytes_per_source_token`)
  and the cross-attention's transients (T5Gemma2's merged attention: one attention over the context's
  and the source's K/V concatenated, `LayerCache.merged_cross`); the decoder's steps are one token each
  (`Workload.step_tokens`), its self-attention cache max_seq_len tokens.

`workload.source_tokens` is the source length: the prompt's tokens for a text encoder (T5, BART),
unset meaning max_seq_len, image tokens included where the model scatters an image's features over
image-token placeholders before the encoder (Florence2: the processor's image tokens, as many as
the graph's `vision.image_tokens`; its tower is a vision tower ahead of the encoder; T5Gemma2's encoder
holds its SigLIP tower and a projector that pools the patch grid to mm_tokens_per_image tokens, placed as
vision units ahead of the encoder's text blocks); for an encoder of fixed-size images (a ViT) the patches of one image and
its class token, which the image decides (a value is refused), or, for an encoder that resamples its
patch grid (PP-FormulaNet's neck and projector), the pooler_output tokens a run on meta tensors gives; for Pix2Struct's patch list, the
processor's max_patches (unset: the vision config's seq_len). Checked against real caches and
fake-tensor executions in tests/test_encoder_decoder.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from planc.errors import ModelError, SpecError
from planc.model.config import DTYPE_BYTES, Shapes, config_value
from planc.workload import Workload

# How an encoder takes its source (the encoder's main_input_name).
TEXT = "text"  # input_ids: the prompt's tokens
IMAGE = "image"  # pixel_values of one fixed-size image: its patches
PATCHES = "patches"  # Pix2Struct's flattened_patches: up to max_patches patches

# Cross-attention modules of the families transformers ships, by (lower-cased) name or class name.
CROSS_ATTENTION_MARKS = ("encoder_attn", "encdecattention", "crossattention", "cross_attn")
KEY_NAMES = ("k_proj", "k", "key")
VALUE_NAMES = ("v_proj", "v", "value")


@dataclass(frozen=True)
class Encoder:
    """The encoder of an encoder-decoder model, as the ledger needs it."""

    path: str  # module path of model.get_encoder()
    source: str  # TEXT, IMAGE or PATCHES
    shapes: Shapes  # one encoder block's numbers (batch and source tokens give its transients)
    output_width: int  # d_model of encoder_outputs.last_hidden_state
    image_tokens: int = 0  # IMAGE: tokens one image becomes (patches, plus a class token where the encoder adds one)
    default_patches: int = 0  # PATCHES: the config's seq_len
    # T5-style relative attention bias (config.relative_attention_num_buckets): the encoder's first
    # layer computes a heads x S x S bias that every layer adds to its scores.
    relative_bias: bool = False
    # Feed-forward intermediates of batch x S x intermediate_size alive at its peak: the up
    # projection and its activation (2), with a gate (wi_0 / gate_proj) 3, and one more where the
    # activation is composed in Python (gelu_new: NewGELUActivation's tanh formula keeps its input).
    mlp_intermediates: int = 2
    # What generate hands the encoder: int64 ids per source token, or model-dtype elements per
    # source token (Pix2Struct's patches) and per image (pixel values).
    input_bytes_per_token: int = 0
    input_elements_per_token: int = 0
    input_elements_per_image: int = 0
    position_limit: int | None = None  # positions of the encoder's learned position table (BART's embed_positions)
    # An image encoder that resamples its patch grid after its blocks (PP-FormulaNet's neck and
    # projector, stride-2 convolutions): the grid tokens its blocks attend over (image_tokens is then
    # what the decoder cross-attends), its blocks' windows (window x window tokens; global layers
    # attend over the whole grid) with decomposed relative positions added to eager scores, and the
    # neck's output, which generate keeps (encoder_outputs.last_hidden_state) beside the source.
    grid_tokens: int = 0
    window: int = 0
    global_layers: bool = False
    output_elements_per_image: int = 0
    # Udop: a text encoder that embeds one image's patches itself (embed_patches, a Conv2d) and appends
    # them after the prompt's tokens (combine_image_text_embeddings pads them to all of the grid's
    # patches, so an image adds exactly image_patches source tokens), and whose relative bias sums
    # T5's 1D buckets with layout_biases more over each token's bounding box (horizontal, vertical):
    # those are bucketed per sequence, so the summed bias is batch x heads x S x S.
    image_patches: int = 0
    layout_biases: int = 0
    image_side: int = 0  # the side of the only image size its patch embedding takes
    # Bytes per source token that encoder_outputs hold beside last_hidden_state: Udop's attention_mask
    # (BaseModelOutputWithAttentionMask, int64, extended over the patches), kept by generate with it.
    output_mask_bytes: int = 0
    # Sliding-window layers (T5Gemma2's encoder): their bidirectional mask is built even for one
    # unpadded sequence (a window is a mask function, which create_bidirectional_mask never skips).
    sliding_mask: bool = False

    def source_tokens(self, requested: int | None, max_seq_len: int) -> int:
        """Tokens the encoder reads per sequence for the spec's `workload.source_tokens` (None: unset)."""
        if self.source == IMAGE:
            if requested is not None and requested != self.image_tokens:
                raise SpecError(
                    f"workload.source_tokens: this model's encoder reads one image of {self.image_tokens} patch tokens "
                    f"(its image size and patch size decide it), not {requested}; leave source_tokens unset"
                )
            return self.image_tokens
        tokens = (requested or self.default_patches) if self.source == PATCHES else (requested or max_seq_len)
        if self.position_limit is not None and tokens > self.position_limit:
            given = f"workload.source_tokens {requested}" if requested else f"the source ({tokens} tokens: source_tokens unset)"
            raise SpecError(
                f"{given} exceeds the {self.position_limit} positions of the encoder's learned position table: "
                f"source tokens past it have no position (generate fails there); plan at most {self.position_limit} "
                "source tokens"
            )
        return tokens


def encoder_path(model) -> str | None:
    """Module path of the model's encoder (model.get_encoder()) when the config is an encoder-decoder's."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return None
    encoder = model.get_encoder()
    return next((name for name, module in model.named_modules() if module is encoder and name), None)


def encoder_of(model, block_count: int) -> Encoder:
    """The Encoder numbers from the model built on meta (`block_count`: its blocks, as placement units)."""
    path = encoder_path(model)
    if path is None:
        raise ModelError(f"{type(model).__name__}: get_encoder() returns no submodule to place")
    module = model.get_submodule(path)
    config = getattr(module, "config", None) or model.config
    if "text_config" in (getattr(config, "sub_configs", None) or {}):
        # An encoder holding a vision tower (T5Gemma2's): its blocks are its text part's.
        config = config.text_config
    main_input = getattr(module, "main_input_name", "input_ids")
    get = lambda *names, default=0: config_value(config, *names, default=default)  # noqa: E731
    hidden = get("d_model", "hidden_size", "embed_dim", "width")
    heads = get("encoder_attention_heads", "num_attention_heads", "num_heads", default=1) or 1
    head_dim = get("d_kv", "head_dim", default=hidden // heads)
    shapes = Shapes(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads", default=heads),
        head_dim=head_dim,
        v_head_dim=head_dim,
        intermediate_size=get("encoder_ffn_dim", "d_ff", "intermediate_size", "mlp_dim", default=4 * hidden),
        vocab_size=0,
        num_layers=block_count,
    )
    feed_forward = dict(mlp_intermediates=_mlp_intermediates(module))
    if main_input == "input_ids" and patch_embedding(module) is not None:
        return _layout_encoder(module, path, shapes, hidden, get, feed_forward)
    if main_input == "input_ids":
        sliding = "sliding_attention" in (get("layer_types", default=None) or ())
        return Encoder(path, TEXT, shapes, hidden, relative_bias=bool(get("relative_attention_num_buckets")),
                       input_bytes_per_token=8, sliding_mask=sliding, **feed_forward)  # int64 ids
    if main_input == "flattened_patches":
        # Each patch's pixels in the model dtype, after its row and column indices.
        width = get("patch_embed_hidden_size") + 2
        return Encoder(path, PATCHES, shapes, hidden, default_patches=int(get("seq_len", default=0)),
                       input_elements_per_token=width, **feed_forward)
    if main_input == "pixel_values" and resamples_patches(module):
        return _resampling_encoder(module, path, shapes, get, feed_forward)
    if main_input == "pixel_values":
        side = get("image_size", default=None)
        patch = get("patch_size", default=None)
        side = max(side) if isinstance(side, (list, tuple)) else side
        patch = max(patch) if isinstance(patch, (list, tuple)) else patch
        if not isinstance(side, int) or not isinstance(patch, int) or not patch:
            raise ModelError(
                f"{type(model).__name__}: its image encoder's config gives no image_size and patch_size, so planc "
                "cannot tell how many tokens an image becomes"
            )
        patches = (-(-side // patch)) ** 2
        # ViT-style embeddings prepend a class token (ViTEmbeddings.cls_token).
        embeddings = getattr(module, "embeddings", None)
        tokens = patches + (1 if getattr(embeddings, "cls_token", None) is not None else 0)
        pixels = get("num_channels", default=3) * side * side
        return Encoder(path, IMAGE, shapes, hidden, image_tokens=tokens, input_elements_per_image=pixels, **feed_forward)
    raise ModelError(
        f"{type(model).__name__}: its encoder takes {main_input!r}, which planc does not size (text encoders take "
        "input_ids, image encoders pixel_values)"
    )


def patch_embedding(encoder_module):
    """A text encoder's own patch embedding, through which it appends an image's patches to the
    prompt's tokens (Udop's UdopStack.embed_patches), or None."""
    import torch

    embedding = getattr(encoder_module, "embed_patches", None)
    convolution = getattr(embedding, "proj", None)
    return embedding if isinstance(convolution, torch.nn.Conv2d) else None


# Per source token, what Udop's encoder holds of its inputs: the int64 ids, the bbox (4 coordinates,
# int64 or float32 as given), its float64 copy with the patches' boxes (combine_image_text_embeddings),
# alive until the encoder returns, and the int64 attention mask it extends over the patches.
LAYOUT_INPUT_BYTES_PER_TOKEN = 8 + 4 * 8 + 4 * 8 + 8


def _layout_encoder(module, path: str, shapes: Shapes, hidden: int, get, feed_forward: dict) -> Encoder:
    """Udop's encoder: the prompt's tokens with their boxes, then one image's patches."""
    embedding = patch_embedding(module)
    side, patch = embedding.image_size, embedding.patch_size
    pixels = embedding.num_channels * side[0] * side[1]
    # Only the horizontal and vertical biases read the boxes; the 1D one is T5's, over positions.
    biases = list(getattr(getattr(module, "relative_bias", None), "biases", ()))
    layout = sum(1 for bias in biases if type(bias).__name__ != "RelativePositionBias1D")
    return Encoder(path, TEXT, shapes, hidden, relative_bias=bool(biases), input_bytes_per_token=LAYOUT_INPUT_BYTES_PER_TOKEN,
                   input_elements_per_image=pixels, image_patches=embedding.num_patches, layout_biases=layout,
                   image_side=max(side), output_mask_bytes=8,
                   **feed_forward)


def resamples_patches(encoder_module) -> bool:
    """An image encoder with convolutions after its patch embedding (PP-FormulaNet's neck and projector)."""
    import torch

    return sum(isinstance(child, torch.nn.Conv2d) for child in encoder_module.modules()) > 1


def resampled_output(encoder_module, side: int):
    """(source tokens, source width, neck elements per image) of a resampling encoder's output, from
    one run on meta tensors: the pooler_output the decoder cross-attends, and last_hidden_state."""
    import torch

    channels = config_value(encoder_module.config, "num_channels", default=3)
    pixels = torch.empty(1, channels, side, side, dtype=encoder_module.dtype, device="meta")
    with torch.no_grad():
        out = encoder_module(pixel_values=pixels, return_dict=True)
    source = out.pooler_output
    return int(source.shape[1]), int(source.shape[2]), int(out.last_hidden_state.numel())


def _resampling_encoder(module, path: str, shapes: Shapes, get, feed_forward: dict) -> Encoder:
    side, patch = get("image_size"), get("patch_size")
    tokens, width, neck = resampled_output(module, side)
    window = get("window_size", default=0)
    global_layers = bool(get("global_attn_indexes", default=()) or not window)
    return Encoder(path, IMAGE, shapes, width, image_tokens=tokens, input_elements_per_image=get("num_channels", default=3)
                   * side * side, grid_tokens=(side // patch) ** 2, window=window, global_layers=global_layers,
                   output_elements_per_image=neck, **feed_forward)


def _mlp_intermediates(encoder_module) -> int:
    """Feed-forward intermediates an encoder block holds at its peak (see Encoder.mlp_intermediates)."""
    from transformers.activations import NewGELUActivation

    names = {name.rsplit(".", 1)[-1] for name, _ in encoder_module.named_modules()}
    gated = bool(names & {"wi_0", "gate_proj", "w1", "wi_1"})
    python_gelu = any(isinstance(module, NewGELUActivation) for module in encoder_module.modules())
    return (3 if gated else 2) + (1 if python_gelu else 0)


def decoder_shapes(config, shapes: Shapes) -> Shapes:
    """The decoder's numbers where a config names them apart from the encoder's (BART's
    decoder_attention_heads and decoder_ffn_dim; its num_attention_heads maps to the encoder's)."""
    from planc.model.config import text_config

    text = text_config(config)
    heads = getattr(text, "decoder_attention_heads", None)
    ffn = getattr(text, "decoder_ffn_dim", None)
    if isinstance(heads, int) and heads != shapes.num_attention_heads:
        head_dim = shapes.hidden_size // heads
        shapes = replace(shapes, num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim, v_head_dim=head_dim)
    if isinstance(ffn, int):
        shapes = replace(shapes, intermediate_size=ffn)
    return shapes


def cross_attention_bytes_per_token(layer_module, dtype: str, fallback: int) -> int:
    """Cross-attention cache bytes one source token adds to one decoder layer of one sequence: the
    widths of the K and V projections of the layer's cross-attention (BART's encoder_attn, T5's
    EncDecAttention, BERT's crossattention); `fallback` (the self-attention's KV per token) where
    the layer projects source K/V with its self-attention's projections (T5Gemma2's merged attention)."""
    widths = _cross_attention_widths(layer_module)
    return fallback if widths is None else sum(widths) * DTYPE_BYTES[dtype]


def merges_cross_attention(layer_module) -> bool:
    """A decoder layer with no cross-attention module of its own: its self-attention projects the
    source's K/V too and attends over the context and the source at once (T5Gemma2MergedAttention)."""
    return _cross_attention_widths(layer_module) is None


def _cross_attention_widths(layer_module) -> tuple[int, int] | None:
    import torch

    for name, module in layer_module.named_modules():
        marked = name.rsplit(".", 1)[-1].lower() if name else ""
        if not any(mark in marked or mark in type(module).__name__.lower() for mark in CROSS_ATTENTION_MARKS):
            continue
        widths = []
        for names in (KEY_NAMES, VALUE_NAMES):
            linear = next(
                (child for child_name, child in module.named_modules()
                 if child_name.rsplit(".", 1)[-1] in names and isinstance(child, torch.nn.Linear)),
                None,
            )
            if linear is None:
                break
            widths.append(linear.out_features)
        if len(widths) == 2:
            return widths[0], widths[1]
    return None


def _source_step(workload: Workload) -> Workload:
    """The encoder's one forward: every source token of every sequence at once."""
    return Workload(workload.batch_size, workload.source_tokens)


def transient_bytes(encoder: Encoder, workload: Workload, dtype: str, backend: str) -> int:
    """Peak transient bytes of the encoder's run over batch x source tokens (once per prefill).

    One encoder block's (the residual stream and its copies, then the larger of its attention's,
    as the decoder formula at tokens = source tokens, attending both ways, and its feed-forward
    intermediates), plus the bidirectional padding mask transformers builds where the batch is
    padded (b x S x S, bool for SDPA, the model dtype for eager), a T5-style relative position
    bias, and the encoder's inputs.
    """
    from planc.model import attention

    if encoder.grid_tokens:
        return _grid_transient_bytes(encoder, workload, dtype)
    step = _source_step(workload)
    e = DTYPE_BYTES[dtype]
    b, s, h = step.batch_size, step.max_seq_len, encoder.shapes.hidden_size
    if not s:
        return 0
    hidden = 4 * b * s * h * e
    mixer = attention.transient_bytes(encoder.shapes, None, step, dtype, backend, masked=encoder.sliding_mask)
    feed_forward = encoder.mlp_intermediates * b * s * encoder.shapes.intermediate_size * e
    masks = (b > 1 or backend == "eager") + encoder.sliding_mask
    mask = masks * b * s * s * (e if backend == "eager" else 1)
    held, in_attention = relative_bias_bytes(encoder, step, dtype, backend)
    # The inputs stay alive until generate returns (its model_kwargs hold them); a text encoder's
    # image (Udop's) only where the workload shows one, and its embedded patches (UdopStack.forward's
    # image_embeddings) until the encoder returns.
    image = encoder.source != TEXT or bool(workload.images_per_sequence)
    pixels = encoder.input_elements_per_image * e if image else 0
    patches = encoder.image_patches * h * e if image else 0
    inputs = b * (s * (encoder.input_bytes_per_token + encoder.input_elements_per_token * e) + pixels + patches)
    return hidden + max(mixer + in_attention, feed_forward) + mask + held + inputs


def _grid_transient_bytes(encoder: Encoder, workload: Workload, dtype: str) -> int:
    """A resampling image encoder's peak (PP-FormulaNet's SAM-style ViT): one block over its patch
    grid, the residual stream and its copies, then the larger of its feed-forward (fc1, activation)
    and its attention, which computes eager scores whatever the backend: the qkv projection and its
    reshaped copy, then per (query, key) pair the decomposed relative position bias, the biased
    scores and their fp32 softmax, all alive at once; over the whole grid in global
    layers, over window x window tokens (the grid padded to whole windows) in the others. Plus the
    image's pixels, which generate keeps."""
    e = DTYPE_BYTES[dtype]
    b, n, c = workload.batch_size, encoder.grid_tokens, encoder.shapes.hidden_size
    heads = encoder.shapes.num_attention_heads

    def attention(rows: int, tokens: int) -> int:
        # Per pair while softmax(dtype=float32) runs: the bias and the biased scores (model dtype), the
        # scores cast to fp32 and the fp32 result (in fp32 there is no cast, and the cast back's copy
        # takes its place: 2e + 8 bytes either way).
        return 2 * 3 * rows * tokens * c * e + rows * heads * tokens * tokens * (2 * e + 8)

    side = math.isqrt(n)
    windowed = 0
    if encoder.window:
        per_side = -(-side // encoder.window)
        windowed = attention(b * per_side * per_side, encoder.window ** 2)
    mixer = max(attention(b, n) if encoder.global_layers else 0, windowed)
    hidden = 4 * b * n * c * e
    feed_forward = 2 * b * n * encoder.shapes.intermediate_size * e
    return hidden + max(mixer, feed_forward) + b * encoder.input_elements_per_image * e


# Bytes per (query, key) pair of the temporaries T5Attention.compute_bias holds at once while it
# buckets the relative positions (int64 positions and buckets, the bool and fp32 steps of the log
# bucketing): 33, measured under fake tensors at 256 and 1024 tokens (49 bytes with 8 bf16 heads).
RELATIVE_BUCKETING_BYTES = 33


def relative_bias_bytes(encoder: Encoder, step: Workload, dtype: str, backend: str) -> tuple[int, int]:
    """A T5-style encoder's relative position bias: (bytes alive through every layer, bytes beside an
    attention's own transients). The bias, 1 x heads x S x S in the model dtype, lives from the first
    layer to the last; inside an attention, the bucketing temporaries while the first layer computes
    it, or where a mask is applied (a padded batch, or eager) each layer's copy of the bias with the
    mask (sdpa_attention.create_position_bias_mask), whichever is larger.

    Udop's (layout_biases): RelativePositionBiasAggregated sums its modules' biases, those over the
    boxes per sequence, so the bias is batch x heads x S x S; while it sums one module's in, the sum
    so far, that module's bias or its bucketing temporaries (per pair of each sequence), and the new sum."""
    if not encoder.relative_bias:
        return 0, 0
    e = DTYPE_BYTES[dtype]
    b, s, heads = step.batch_size, step.max_seq_len, encoder.shapes.num_attention_heads
    masked = b * heads * s * s * e if b > 1 or backend == "eager" else 0
    if encoder.layout_biases:
        bias = b * heads * s * s * e
        return bias, max(bias + max(bias, b * s * s * RELATIVE_BUCKETING_BYTES), masked)
    return s * s * heads * e, max(s * s * RELATIVE_BUCKETING_BYTES, masked)


def cross_attention_transient_bytes(shapes: Shapes, cache, workload: Workload, dtype: str, backend: str) -> int:
    """Peak transient bytes of a decoder layer's cross-attention over the largest step.

    At the first step the layer projects the source's K/V (kept by the cross-attention cache after
    DynamicLayer.update's torch.cat copies them: both alive at once), and each step its queries
    attend over every source token: the score matrix where the backend materialises it, and the
    encoder mask expanded to b x t x S where there is one (a padded batch, or eager). The hook of
    a layer on another device than the encoder output's copies encoder_hidden_states there.
    """
    from planc.model.attention import materialises_scores

    e = DTYPE_BYTES[dtype]
    b, t, s = workload.batch_size, workload.step_tokens, workload.source_tokens
    heads, d_qk, d_v = shapes.num_attention_heads, shapes.head_dim, shapes.v_head_dim
    projected = b * s * cache.bytes_per_source_token
    copied = b * s * shapes.hidden_size * e
    queries = b * t * heads * d_qk * e
    if backend == "eager":
        scores = b * heads * t * s * (e + 8 if e < 4 else 8)
    elif materialises_scores(backend):
        scores = b * heads * t * s * 8 + b * heads * (t * d_qk + s * (d_qk + d_v)) * 4
    else:
        scores = 0
    mask = b * t * s * (e if backend == "eager" else 1) if b > 1 or backend == "eager" else 0
    return copied + projected + queries + scores + mask + b * t * heads * d_v * e


def merged_attention_transient_bytes(shapes: Shapes, cache, workload: Workload, dtype: str, backend: str) -> int:
    """Peak transient bytes of a merged self + cross attention (T5Gemma2MergedAttention) over the largest step.

    At the first step it projects the source's K/V with its own k/v projections and normalises the
    keys (an RMSNorm computing in fp32) before the cross cache stores them; every step it then
    concatenates the context's K/V (the self cache's, up to its window) and the source's into one K
    and one V, new tensors of b x (context + source) tokens, and attends over them: the attention
    formula at context + source keys, under the merged mask the decoder always builds (SDPA takes no
    enable_gqa then; for one query token it folds the groups into the query, eager copies K/V per
    query head). The hook of a layer on another device than the encoder output's copies
    encoder_hidden_states there.
    """
    from planc.model import attention

    e = DTYPE_BYTES[dtype]
    b, s = workload.batch_size, workload.source_tokens
    kv_heads = shapes.num_key_value_heads
    context = attention.context_tokens(cache, workload)
    keys = context + s
    step = replace(workload, max_seq_len=keys)  # still one token a step: the source is set
    attend = attention.transient_bytes(shapes, replace(cache, window=None), step, dtype, backend)
    concatenated = b * (context * cache.bytes_per_token + s * cache.bytes_per_source_token)
    key_elements = b * s * kv_heads * shapes.head_dim
    # The source's K and V, and the keys' fp32 copy in the norm (the cache's copies are its bytes).
    projected = b * s * cache.bytes_per_source_token + key_elements * 4
    copied = b * s * shapes.hidden_size * e
    return copied + max(projected, concatenated + attend)

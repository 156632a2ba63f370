"""Gated cross-attention blocks between the decoder layers (Idefics): where they run and what they cost.

IdeficsModel.forward runs `gated_cross_attn_layers[idx // cross_layer_interval]` before decoder
layer idx whenever idx % cross_layer_interval == 0: a block of its own list that attends from the
step's tokens to every image token of the sequence, then runs an MLP, both gated by tanh(alpha).
The block keeps no cache (it is called with past_key_values=None), so every step, the prefill
and each decode step alike, projects K and V of all the image hidden states again.

The image hidden states are what the tower (and the perceiver resampler, where
config.use_resampler) returns: per image, the resampler's latents, or the tower's patches and
its class token. generate keeps them between steps (`_update_model_kwargs_for_generation` stores
outputs.image_hidden_states and feeds them back as perceiver_embeddings / image_encoder_embeddings),
with the pixel values, on the main device, where the root module's hook returns the outputs. The
forward also builds the image attention mask there, b x 1 x t x image tokens in the model dtype,
from the processor's b x t x images mask (an int64 expansion first), and keeps it for the step.

The ledger (planc.memory, the solver's main-device mask) sizes these here, and the simulation
(planc.simulate) builds the inputs generate gives each step here, so that what is planned is
what is run. Checked against `planc simulate` of 2-GPU plans in tests/test_architectures.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from planc.model.config import DTYPE_BYTES, FP32, Shapes
from planc.model.vision import Vision
from planc.workload import Workload

# IdeficsProcessor's image_attention_mask is int64, expanded per image token before the where().
MASK_INDEX_BYTES = 8


@dataclass(frozen=True)
class GatedCrossAttention:
    """The blocks, where each runs, and the numbers of the image states they attend to."""

    blocks: tuple[str, ...]  # module paths, in the order they run
    before: tuple[int, ...]  # per block, the index of the decoder layer it runs before
    image_width: int  # hidden size of the image states (the vision tower's embed_dim)
    latents: int | None  # image tokens per image out of the perceiver resampler; None: the tower's own
    resampler: str | None  # module path of the resampler (runs once per prefill, over the tower's output)
    resampler_heads: int = 0
    resampler_head_dim: int = 0
    qk_norms: bool = False  # config.qk_layer_norms: normed copies of q and k in every block
    channels: int = 3  # of the pixel values

    def tokens_per_image(self, vision: Vision, workload: Workload) -> int:
        """Image tokens one image becomes: the resampler's latents, or the tower's patches and class token."""
        return self.latents if self.latents is not None else vision.patches_per_image(workload) + 1

    def image_tokens(self, vision: Vision, workload: Workload) -> int:
        """Image tokens each sequence's blocks attend to."""
        return workload.images_per_sequence * self.tokens_per_image(vision, workload)

    def kept_bytes(self, vision: Vision, workload: Workload, dtype: str) -> int:
        """What generate keeps between steps on the main device for the whole batch: the image hidden
        states, and the pixel values it was given (model_kwargs holds them to the end; planc's run
        casts them to the model dtype)."""
        e = DTYPE_BYTES[dtype]
        states = self.image_tokens(vision, workload) * self.image_width * e
        side = workload.image_size or vision.image_size or 0
        pixels = workload.images_per_sequence * self.channels * side * side * e
        return workload.batch_size * (states + pixels)

    def mask_bytes(self, vision: Vision, workload: Workload, dtype: str) -> int:
        """The b x 1 x t x image-tokens mask the forward builds on the main device and holds through the step."""
        return workload.batch_size * workload.step_tokens * self.image_tokens(vision, workload) * DTYPE_BYTES[dtype]

    def mask_building_bytes(self, vision: Vision, workload: Workload, dtype: str, text_hidden: int) -> int:
        """The main device's peak beyond the held image mask while the forward builds it, before the
        layers run: the processor's int64 mask (b x t x images), its expansion per image token (a
        copy: reshape of an expand) and the bool condition of the where(), beside the token embeddings."""
        b, t = workload.batch_size, workload.step_tokens
        expanded = b * t * self.image_tokens(vision, workload) * (MASK_INDEX_BYTES + 1)
        given = b * t * workload.images_per_sequence * MASK_INDEX_BYTES
        return expanded + given + b * t * text_hidden * DTYPE_BYTES[dtype]

    def transient_bytes(self, shapes: Shapes, vision: Vision, workload: Workload, dtype: str, backend: str) -> int:
        """Peak transient bytes of one block's forward over the largest step.

        The hook copies the image states and the image mask to the block's device (a copy where it is
        not the main device; counted always). Then the residual stream and the normed copy beside the
        larger of the cross-attention (q over the step, K and V of every image token, the output and
        o_proj's, the scores where the backend materialises them) and the MLP.
        """
        from planc.model import attention, mlp

        e = DTYPE_BYTES[dtype]
        b, t, h = workload.batch_size, workload.step_tokens, shapes.hidden_size
        s = self.image_tokens(vision, workload)
        heads = shapes.num_attention_heads
        inputs = b * s * self.image_width * e + self.mask_bytes(vision, workload, dtype)
        hidden = 2 * b * t * h * e
        # q and K, V of every image token; under qk_layer_norms each RMSNorm in turn holds an fp32
        # copy of q (then of k) and its square before the attention.
        qkv = b * t * h * e + 2 * b * s * h * e
        normed = 2 * b * max(t, s) * h * FP32 if self.qk_norms else 0
        if backend == "eager":
            scores = b * heads * t * s * (e + 2 * FP32 if e < FP32 else 2 * FP32)
        elif attention.materialises_scores(backend):
            scores = b * heads * t * s * 2 * FP32 + b * (t + 2 * s) * h * FP32
        else:
            scores = 0
        attended = qkv + max(normed, scores + 2 * b * t * h * e)
        feed_forward = mlp.transient_bytes(shapes, False, workload, dtype)
        return inputs + hidden + max(attended, feed_forward)

    def resampler_transient_bytes(self, vision: Vision, workload: Workload, dtype: str) -> int:
        """Peak transient bytes of the perceiver resampler over every image of the batch (0 without one).

        Each block attends from the latents to the tower's tokens and the latents together (K and V
        of their concatenation), einsum scores in the model dtype with their stabilised copy and
        softmax, then a 4 x width MLP; the tower's output stays alive beside it.
        """
        if self.resampler is None or not workload.images_per_sequence:
            return 0
        e = DTYPE_BYTES[dtype]
        images = workload.batch_size * workload.images_per_sequence
        context = vision.patches_per_image(workload) + 1
        latents, width = self.latents or 0, self.image_width
        inner = self.resampler_heads * self.resampler_head_dim
        tower_output = images * context * width * e
        keys = context + latents
        # Per image: the normed context, the latents and their normed copy, the concatenation being
        # projected; q, k and v; the scores, their stabilised copy and the softmax.
        held = (context + 2 * latents + keys) * width + (latents + 2 * keys) * inner
        scores = 3 * self.resampler_heads * latents * keys
        attention = images * (held + scores) * e
        feed_forward = images * latents * (2 * width + 2 * 4 * width) * e
        return tower_output + max(attention, feed_forward) + images * latents * width * e


def gated_cross_of(model, layer_names: list[str], cache_layers: int) -> tuple[list[str], GatedCrossAttention] | None:
    """The decoder layers and the gated cross-attention blocks, when the layer lists are Idefics' layout.

    Precisely: two kinds of block; one kind's forward takes `image_hidden_states` (the cross
    blocks), the other kind is as many as the config's cache layers (the decoder layers); the
    decoder (the model's base) names `cross_layer_interval` and holds the cross blocks in a list of
    num_hidden_layers // cross_layer_interval. Anything else returns None, so a miscounted cache
    is still refused as one.
    """
    kinds: dict[str, list[str]] = {}
    for name in layer_names:
        kinds.setdefault(type(model.get_submodule(name)).__name__, []).append(name)
    if len(kinds) != 2:
        return None
    cross = [names for names in kinds.values()
             if "image_hidden_states" in inspect.signature(model.get_submodule(names[0]).forward).parameters]
    if len(cross) != 1:
        return None
    blocks = cross[0]
    decoder = next(names for names in kinds.values() if names is not blocks)
    base = model.get_submodule(decoder[0].rsplit(".", 2)[0]) if decoder[0].count(".") >= 2 else model
    interval = getattr(base, "cross_layer_interval", None)
    if len(decoder) != cache_layers or not isinstance(interval, int) or interval < 1:
        return None
    if len(blocks) != len(decoder) // interval:
        return None
    config = model.config
    vision = config.vision_config
    perceiver = getattr(config, "perceiver_config", None)
    resampling = bool(getattr(config, "use_resampler", False)) and perceiver is not None
    resampler = next((n for n, m in model.named_modules() if type(m).__name__.endswith("PerceiverResampler")), None)
    info = GatedCrossAttention(
        blocks=tuple(blocks),
        before=tuple(index * interval for index in range(len(blocks))),
        image_width=int(vision.embed_dim),
        latents=int(perceiver.resampler_n_latents) if resampling else None,
        resampler=resampler if resampling else None,
        resampler_heads=int(perceiver.resampler_n_heads) if resampling else 0,
        resampler_head_dim=int(perceiver.resampler_head_dim) if resampling else 0,
        qk_norms=bool(getattr(config, "qk_layer_norms", False)),
        channels=int(getattr(vision, "num_channels", 3)),
    )
    return decoder, info


def prefill_inputs(model, batch: int, images: int, side: int, tokens: int, device: str) -> dict:
    """What generate gives the first forward (IdeficsProcessor's output): pixel values per sequence
    and image, and every token's mask over the images (all seen, the worst case for nothing)."""
    import torch

    channels = getattr(model.config.vision_config, "num_channels", 3)
    return {
        "pixel_values": torch.empty(batch, images, channels, side, side, dtype=model.dtype, device=device),
        "image_attention_mask": torch.ones(batch, tokens, images, dtype=torch.long, device=device),
    }


def step_inputs(model, states, batch: int, images: int, tokens: int, device: str) -> dict:
    """What generate gives a later forward: the image hidden states the last one returned
    (`_update_model_kwargs_for_generation`), as the resampler's or the tower's output, and the
    mask of the step's tokens."""
    import torch

    key = "perceiver_embeddings" if model.config.use_resampler else "image_encoder_embeddings"
    return {key: states, "image_attention_mask": torch.ones(batch, tokens, images, dtype=torch.long, device=device)}


def runs_image_cross_attention(model) -> bool:
    """The model's decoder holds a list of gated cross-attention blocks (forwards taking
    image_hidden_states) run every `cross_layer_interval` layers: every forward needs image states."""
    import torch

    for module in model.modules():
        blocks = getattr(module, "gated_cross_attn_layers", None)
        if isinstance(getattr(module, "cross_layer_interval", None), int) and isinstance(blocks, torch.nn.ModuleList):
            return any("image_hidden_states" in inspect.signature(block.forward).parameters for block in blocks)
    return False

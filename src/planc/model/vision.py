"""Vision towers of image-text-to-text models: how many tokens an image becomes and the encoder's transients.

The tower runs once per prefill over every image of the batch (batch_size x
workload.images_per_sequence images), block by block, before the decoder layers; it keeps no
cache. Each block is an attention + MLP block over the image's patches, so its transient is the
decoder formulas' (`attention.transient_bytes`, `mlp.transient_bytes`) at "batch = images,
tokens = patches per image", without a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planc.errors import SpecError
from planc.model import attention, mlp
from planc.model.config import DTYPE_BYTES, Shapes, config_value
from planc.workload import Workload


@dataclass(frozen=True)
class Stage:
    """One stage of a multi-stage convolutional tower (Florence2's DaViT): a strided convolution that
    shrinks the grid, then blocks of window attention (window x window tokens) and feed-forward."""

    kernel: int
    stride: int
    padding: int
    shapes: Shapes  # the stage's width, heads and feed-forward size
    window: int

    def side(self, side: int) -> int:
        """Grid side after the stage's convolution (Conv2d's output size)."""
        return (side + 2 * self.padding - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class Vision:
    """The vision encoder's numbers (`config.vision_config`)."""

    shapes: Shapes
    patch_size: int
    image_size: int | None  # the config's default input side, pixels; None for dynamic-resolution towers
    towers: tuple[str, ...]  # module paths of the tower(s)
    # A multi-stage tower (embed_dim per stage): its stages; the tower's output grid is the last stage's.
    stages: tuple[Stage, ...] = ()
    # Tokens the projector adds to the output grid (Florence2's mean-over-positions token), measured
    # by running the model's get_image_features on meta tensors (planc.model.graph).
    extra_tokens: int = 0
    # A projector that pools the tower's output grid (T5Gemma2's AvgPool2d to mm_tokens_per_image):
    # the tokens one image becomes, measured the same way; it takes only the config's image size.
    pooled_tokens: int = 0
    image_refusal: str = ""  # why no image can run through this config's tower and projector ("" if one can)

    def _side(self, workload: Workload) -> int:
        side = workload.image_size or self.image_size
        if not side:
            raise SpecError(
                "workload.image_size is required with images_per_sequence for this model: its vision tower takes "
                "images of any resolution"
            )
        return side

    def patches_per_image(self, workload: Workload) -> int:
        """Patch tokens the encoder attends over for one image of workload.image_size (or the config's) pixels."""
        side = self._side(workload)
        if self.stages:
            for stage in self.stages:
                side = stage.side(side)
            return side * side
        per_side = -(-side // self.patch_size)
        return per_side * per_side

    def image_tokens(self, workload: Workload) -> int:
        """Tokens one image becomes in the text model's input: the output grid and the projector's extra
        tokens, or the pooled grid."""
        if self.pooled_tokens:
            return self.pooled_tokens
        return self.patches_per_image(workload) + self.extra_tokens


def vision_of(config, towers: tuple[str, ...]) -> Vision | None:
    """The Vision numbers of a multimodal config whose vision tower is among `towers`, or None."""
    vision = getattr(config, "vision_config", None)
    if vision is None or not towers:
        return None
    get = lambda *names, default=0: config_value(vision, *names, default=default)  # noqa: E731
    staged = ("embed_dim", "num_heads", "depths", "patch_size", "patch_stride", "patch_padding")
    if all(isinstance(getattr(vision, name, None), (list, tuple)) for name in staged) and hasattr(vision, "window_size"):
        return _staged_vision_of(vision, towers)
    hidden = get("embed_dim", "hidden_size", "width", "d_model")
    heads = get("num_attention_heads", "num_heads", "heads") or 1
    mlp_ratio = get("mlp_ratio", default=4)
    intermediate = get("intermediate_size", default=int(hidden * mlp_ratio))
    shapes = Shapes(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads", default=heads),
        head_dim=get("head_dim", default=hidden // heads),
        v_head_dim=get("head_dim", default=hidden // heads),
        intermediate_size=intermediate,
        vocab_size=0,
        num_layers=get("num_hidden_layers", "depth", "num_layers"),
    )
    image_size = get("image_size", default=None)
    if isinstance(image_size, (list, tuple)):
        image_size = max(image_size)
    patch = get("patch_size", default=14)
    if isinstance(patch, (list, tuple)):
        patch = max(patch)
    return Vision(shapes, int(patch) or 14, int(image_size) if image_size else None, towers)


def _staged_vision_of(vision, towers: tuple[str, ...]) -> Vision:
    """A DaViT-style tower (Florence2's): per stage a convolution (patch_size, patch_stride, patch_padding)
    and blocks of embed_dim[i] channels, num_heads[i] heads, windows of window_size."""
    ratio = getattr(vision, "mlp_ratio", 4.0)
    stages = []
    for index, dim in enumerate(vision.embed_dim):
        heads = vision.num_heads[index]
        shapes = Shapes(hidden_size=dim, num_attention_heads=heads, num_key_value_heads=heads, head_dim=dim // heads,
                        v_head_dim=dim // heads, intermediate_size=int(dim * ratio), vocab_size=0,
                        num_layers=vision.depths[index])
        stages.append(Stage(vision.patch_size[index], vision.patch_stride[index], vision.patch_padding[index], shapes,
                            vision.window_size))
    last = stages[-1].shapes
    image_size = getattr(vision, "image_size", None)
    return Vision(last, stages[0].kernel, int(image_size) if isinstance(image_size, int) else None, towers, tuple(stages))


def _staged_transient_bytes(vision: Vision, workload: Workload, dtype: str, backend: str, text_hidden: int) -> int:
    """A multi-stage tower's peak: its largest stage block (the residual stream and its copies over the
    stage's grid, then the larger of its window attention, over images x windows of window^2 tokens,
    and its ungated feed-forward over the grid), and the projector's output in the text width."""
    images = workload.batch_size * workload.images_per_sequence
    e = DTYPE_BYTES[dtype]
    side = vision._side(workload)
    peak = 0
    for stage in vision.stages:
        side = stage.side(side)
        tokens = side * side
        padded = -(-side // stage.window) * stage.window
        windows = images * (padded // stage.window) ** 2
        # Steps of the tower's own tokens (no encoder-decoder source: they run whole, not one a step).
        window_step = Workload(windows, stage.window ** 2)
        hidden = 4 * images * padded * padded * stage.shapes.hidden_size * e
        mixer = attention.transient_bytes(stage.shapes, None, window_step, dtype, backend)
        # Its feed-forward is fc1 -> activation -> fc2 (Florence2VisionMLP, no gate): two intermediates.
        feed_forward = 2 * images * tokens * stage.shapes.intermediate_size * e
        peak = max(peak, hidden + max(mixer, feed_forward))
    projector = 3 * images * vision.image_tokens(workload) * max(text_hidden, vision.shapes.hidden_size) * e
    return peak + projector


def transient_bytes(
    vision: Vision, workload: Workload, dtype: str, backend: str, text_hidden: int, last_state_only: bool = False
) -> int:
    """Peak transient bytes of the vision tower's run over all images of the batch (0 without images).

    One block's transient, plus what outlives the blocks: the hidden states of every block
    (LLaVA-style models select a layer from `output_hidden_states`, so all of them stay alive until
    the tower returns), and the projector's output and intermediate in the text width. A class token
    is counted per image (CLIP-style towers add one). `last_state_only`: the model takes the tower's
    last_hidden_state to no projector (Idefics' cross-attention blocks project it themselves), so
    only the block and its input stay alive.
    """
    images = workload.batch_size * workload.images_per_sequence
    if not images:
        return 0
    if vision.stages:
        return _staged_transient_bytes(vision, workload, dtype, backend, text_hidden)
    tokens = vision.patches_per_image(workload) + 1
    step = replace(workload, batch_size=images, max_seq_len=tokens, prefill_chunk_size=None, images_per_sequence=0,
                   source_tokens=0)
    e = DTYPE_BYTES[dtype]
    width = images * tokens * e
    hidden = 4 * width * vision.shapes.hidden_size
    mixer = attention.transient_bytes(vision.shapes, None, step, dtype, backend)
    block = hidden + max(mixer, mlp.transient_bytes(vision.shapes, False, step, dtype))
    if last_state_only:
        return block
    if vision.pooled_tokens:
        # get_image_features of a pooling projector (T5Gemma2) asks for no hidden states: the tower's
        # output, then the projector's contiguous grid copy of it, beside the larger of the block
        # before and the pooled tokens' norm (fp32) and projection after.
        pooled = images * vision.pooled_tokens
        projector = width * vision.shapes.hidden_size + pooled * (2 * vision.shapes.hidden_size * 4 + text_hidden * e)
        return max(block, width * vision.shapes.hidden_size + projector)
    held = (vision.shapes.num_layers + 1) * width * vision.shapes.hidden_size
    projector = 3 * width * text_hidden
    return block + held + projector

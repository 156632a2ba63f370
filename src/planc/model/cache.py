"""What each decoder layer keeps between forward steps, per sequence: one entry per cache layer kind.

Mirrors transformers' `cache_utils.py`, where `DynamicCache(config=...)` builds one layer object
per `config.layer_types` entry (after `remap_legacy_layer_types`: `mamba` -> `linear_attention`,
`*_sparse_attention` -> `indexed_attention`). Each kind's byte formula lives in the module of its
mixer; this module maps layer types to them:

- full / sliding / chunked attention: `attention.py` (KV per token, capped by a window); also
  Unlimited-OCR's reference sliding attention (every prefill token plus a window of generated ones);
- indexed attention (DeepSeek sparse attention): `indexed.py` (KV plus the indexer's keys, or
  GLM-5-Next's packed k-pool rows);
- compressed attention (DeepSeek-V4's heavily compressed / compressed sparse attention):
  `compressed.py` (a sliding window plus one compressed entry per few tokens);
- linear attention, conv and hybrid layers: a fixed-size state per sequence from the layer's
  sequence mixer, one module per family (`delta_rule.py`: gated DeltaNet and Kimi delta
  attention, GLM-5-Next's too; `mamba.py`: Mamba1 and Mamba2; `short_conv.py`: LFM2's gated
  convolution and Inkling's residual short convolutions; `lightning.py`: MiniMax's lightning
  attention; `cca.py`: ZAYA's compressed convolutional attention; `rg_lru.py`: RecurrentGemma's
  recurrent blocks), plus the attention KV for `hybrid` / `hybrid_sliding` layers;
- mlp / moe / dummy layers: nothing;
- models recurrent throughout, whose configs declare no layer types (`Mixer.every_layer`): one
  `recurrent` cache per decoder layer read from the model (`rwkv.py`, `xlstm.py`).

Some families keep their state outside DynamicCache layers, and the ledger follows them:
RecurrentGemma on its modules (per layer, on the layer's device), RWKV in the `state` list its
forward returns and xLSTM in its own xLSTMCache, both allocated for every layer on the input
embeddings' device (`Mixer.state_on_input_device`: the graph charges that state to the
embedding unit). `layer_tensors` reads all of them. Layer kinds whose state no formula here
describes yet are refused with the reason (`UNSIZED`): planning them as attention would be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from planc.errors import ModelError
from planc.workload import Workload

if TYPE_CHECKING:
    from planc.model.config import Shapes

# The two ways transformers runs a sequence mixer's prefill and decode (chosen when its modeling
# module is imported: transformers/integrations/hub_kernels.py use_kernel_func_from_hub_with_fallback).
FALLBACK = "fallback"  # pure-torch reference implementations: any device
KERNELS = "kernels"  # the CUDA kernel packages (flash-linear-attention, causal-conv1d, mamba-ssm)
MIXER_PATHS = (FALLBACK, KERNELS)

STATE_LAYER_TYPES = ("linear_attention", "conv")
HYBRID_LAYER_TYPES = ("hybrid", "hybrid_sliding")


@dataclass(frozen=True)
class Mixer:
    """A layer's sequence mixer that keeps a fixed-size state per sequence (no per-token cache).

    Subclasses (one per family, in the family's module) hold the dimensions the formulas need,
    read from the mixer module transformers built, and give the state it keeps and the transient
    bytes of its forward on each path.
    """

    family: ClassVar[str]
    # Attributes that identify the family's mixer module inside a decoder layer (transformers'
    # modular copies keep them across the models of a family).
    signature: ClassVar[tuple[str, ...]] = ()
    # transformers' modeling functions that run this family through its kernel packages (and
    # fall back to torch without them): what `planc simulate` stands in for on a kernels plan.
    kernel_functions: ClassVar[tuple[str, ...]] = ()
    # Every decoder layer of the family's models is this block, and their configs declare no
    # layer types (RWKV, xLSTM): planc reads the layers from the model, not from layer_types.
    every_layer: ClassVar[bool] = False
    # transformers allocates the state of every layer on the device the input embeddings run on,
    # not on each layer's (RWKV's state list, xLSTMCache): the ledger charges it there.
    state_on_input_device: ClassVar[bool] = False
    # The state lives in the Cache object the caller passes, so one cache per sequence keeps
    # sequences apart; False where the model keeps it elsewhere (its modules, its own state list).
    state_in_cache: ClassVar[bool] = True

    @classmethod
    def module_of(cls, layer_module, index: int):
        """The family's mixer module inside a decoder layer."""
        return find_mixer(layer_module, index, *cls.signature)

    def state_bytes(self, dtype: str) -> int:
        """Bytes of state one sequence keeps between steps (conv window and recurrent state)."""
        raise NotImplementedError

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        """Peak transient bytes inside the mixer over the largest step (its input excluded)."""
        raise NotImplementedError


@dataclass(frozen=True)
class LayerCache:
    """One layer's cache, per sequence: a part that grows with tokens and a part that does not."""

    kind: str  # the transformers layer type (full_attention, sliding_attention, linear_attention, ...)
    bytes_per_token: int = 0
    window: int | None = None  # keeps at most this many tokens between steps
    state_bytes: int = 0  # fixed per sequence whatever the context (recurrent / convolution states)
    mixer: Mixer | None = None  # the state-keeping sequence mixer, for linear / conv / hybrid layers
    attention: bool = True  # runs softmax attention over its cached tokens (its transients, its masks)
    indexer_heads: int = 0  # indexed attention: heads of the indexer that scores every cached token
    indexer_head_dim: int = 0
    indexer_pool: int = 0  # GLM-5-Next's k-pool indexer: scores one pooled key per this many tokens
    # Compressed attention (DeepSeek-V4): one entry of `compressed_bytes` per `compress_rate`
    # tokens, and the projections awaiting compression, which the cache keeps as views of the
    # last step's storage (`buffer_bytes_per_token`).
    compress_rate: int = 0
    compressed_bytes: int = 0
    buffer_bytes_per_token: int = 0
    quantized: str | None = None  # the QuantizedCache backend storing it (fp8), None for the model dtype
    # Dynamic mask attention (Doge): keys kept per query by a top-k over a per-head mask of the
    # whole context, built in the model dtype beside the causal mask (attention.dynamic_mask_bytes).
    dynamic_mask_keep: int = 0
    fixed_bytes: int = 0  # per layer whatever the batch (a quantized cache's scales)
    # What the layer's attention module does beyond transformers' eager_attention_forward
    # (attention.OWN_EAGER_SCORES, attention.rotary_upcasts): model-dtype copies of the eager
    # scores alive at the softmax; whether the model keeps the probabilities the layer returns
    # while the next layer runs; whether its rotary embedding is computed in fp32.
    eager_score_copies: int = 1
    scores_outlive_layer: bool = False
    fp32_rotary: bool = False
    # The state is kept on the input embeddings' device, whichever device runs the layer: the
    # graph charges it to the embedding unit and leaves this layer's state_bytes 0.
    on_input_device: bool = False
    # An encoder-decoder's decoder layer keeps the K/V of every source token for its cross-attention
    # (EncoderDecoderCache.cross_attention_cache), filled at the first step and fixed afterwards; the
    # encoder's last unit keeps the encoder output, as wide per source token (model/encoder_decoder.py).
    bytes_per_source_token: int = 0
    # Its attention is merged (T5Gemma2): each step concatenates the self-attention K/V and the
    # source's into one attention over context + source tokens, under a mask built for both.
    merged_cross: bool = False

    def tokens_held(self, workload: Workload) -> int:
        """Tokens of cache the layer holds at its peak.

        A sliding layer holds window - 1 + the step's tokens: transformers' DynamicSlidingWindowLayer
        keeps a *view* of the concatenated states, so the whole step stays alive until the next update.
        """
        if self.window is None:
            return workload.max_seq_len
        return min(workload.max_seq_len, self.window - 1 + workload.step_tokens)

    def compressed_entries(self, workload: Workload) -> int:
        """Compressed entries held after max_seq_len tokens (one per whole window of compress_rate)."""
        return workload.max_seq_len // self.compress_rate if self.compress_rate else 0

    def buffered_tokens(self, workload: Workload) -> int:
        """Tokens whose projections the compressor's buffer keeps alive: the step's whole storage
        (a view of it holds the leftover), plus up to compress_rate - 1 carried from the last step."""
        if not self.buffer_bytes_per_token:
            return 0
        carried = self.compress_rate - 1 if workload.step_tokens < workload.max_seq_len else 0
        return workload.step_tokens + carried

    def token_bytes(self, workload: Workload) -> int:
        """Peak bytes of the part that grows with tokens, whole batch (what torch.cat copies on update)."""
        per_sequence = self.tokens_held(workload) * self.bytes_per_token
        per_sequence += self.compressed_entries(workload) * self.compressed_bytes
        return workload.batch_size * per_sequence

    def bytes(self, workload: Workload) -> int:
        """Peak cache bytes of this layer for the whole batch."""
        buffers = self.buffered_tokens(workload) * self.buffer_bytes_per_token
        source = workload.source_tokens * self.bytes_per_source_token
        return self.token_bytes(workload) + workload.batch_size * (self.state_bytes + buffers + source) + self.fixed_bytes


# model_type -> why planc does not size it. Each keeps its recurrent state where the cache
# formulas cannot see it, or in a cache class no formula here describes yet.
UNSIZED = {
    "qwen4_exp": "Qwen4-Exp's indexed layers keep block-compressed indexer keys that planc does not size yet",
}


def refuse_unsized(model_type: str) -> None:
    """ModelError with the reason when planc does not size this family's state (UNSIZED)."""
    base_type = model_type.removesuffix("_text")
    if base_type in UNSIZED:
        raise ModelError(f"{model_type}: {UNSIZED[base_type]}")


def layer_caches(
    config, shapes: "Shapes", dtype: str, layer_modules=None, per_layer=None, kv_cache: str | None = None
) -> list[LayerCache]:
    """Per cache layer, the cache transformers builds for it (after its remap of legacy names).

    `kv_cache` "fp8": transformers' QuantizedCache(backend="fp8"), which refuses any layer type but
    full attention (cache_utils.py: QuantizedCache.__init__), and so does planc.

    `layer_modules` are the decoder layers of the model built on meta, in order: the state-keeping
    layers read their mixer's dimensions from them.
    `per_layer` gives each cache layer's shapes where the config varies them (Gemma 4's
    full-attention layers have their own head_dim and KV heads); else `shapes` serves every layer.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    from planc.model import attention, compressed, indexed
    from planc.model.config import text_config

    text = text_config(config)
    model_type = getattr(text, "model_type", "")
    refuse_unsized(model_type)
    family = mixer_family(model_type)
    if family is not None and family.every_layer:
        return [recurrent_layer_cache(model_type, module, index, dtype) for index, module in enumerate(layer_modules or ())]
    layer_types, kwargs = get_layer_types_and_kwargs(text)
    declared = list(getattr(text, "layer_types", None) or [])
    modules = list(layer_modules or ())
    # Only the state-keeping and indexed kinds read their module; an attention-only config may list
    # several cache layers per decoder layer (build_model_graph groups them).
    reads_module = STATE_LAYER_TYPES + HYBRID_LAYER_TYPES + ("indexed_attention",)
    if modules and len(modules) != len(layer_types) and any(t in reads_module for t in layer_types):
        raise ModelError(f"config describes {len(layer_types)} cache layers for {len(modules)} decoder layers")
    if kv_cache is not None:
        others = sorted(set(layer_types) - {"full_attention"})
        if others:
            raise ModelError(
                f"model.kv_cache {kv_cache}: transformers' QuantizedCache takes only full-attention layers, and "
                f"{model_type or config.model_type} has {', '.join(others)} layers"
            )
        return [
            attention.quantized_layer_cache(per_layer[index] if per_layer and index < len(per_layer) else shapes, kv_cache)
            for index in range(len(layer_types))
        ]
    caches = []
    for index, (layer_type, layer_kwargs) in enumerate(zip(layer_types, kwargs)):
        own = per_layer[index] if per_layer and index < len(per_layer) else shapes
        module = modules[index] if len(modules) == len(layer_types) else None
        if layer_type in attention.LAYER_TYPES:
            caches.append(attention.layer_cache(layer_type, layer_kwargs, own, dtype, module))
        elif layer_type == "indexed_attention":
            caches.append(indexed.layer_cache(model_type, own, dtype, module, index))
        elif layer_type in compressed.LAYER_TYPES:
            caches.append(compressed.layer_cache(layer_type, layer_kwargs["config"], dtype))
        elif layer_type in STATE_LAYER_TYPES + HYBRID_LAYER_TYPES:
            mixer = mixer_of(model_type, layer_type, module, index)
            cache = LayerCache(layer_type, state_bytes=mixer.state_bytes(dtype), mixer=mixer, attention=False)
            if layer_type in HYBRID_LAYER_TYPES:
                kv = attention.hybrid_layer_cache(layer_type, layer_kwargs, own, dtype, module)
                cache = LayerCache(layer_type, kv.bytes_per_token, kv.window, state_bytes=cache.state_bytes, mixer=mixer)
            caches.append(cache)
        elif layer_type == "dummy":
            # No cache of its own: a feed-forward-only layer (Nemotron-H's mlp / moe blocks), or
            # one that attends over another layer's KV (Gemma 3n's KV sharing).
            feed_forward_only = declared[index] in ("mlp", "moe") if declared else False
            caches.append(LayerCache("dummy", attention=not feed_forward_only))
        else:
            raise ModelError(f"{model_type}: layer type {layer_type!r} is not sized by planc yet")
    return caches


# Modules with the state formulas of each sequence-mixer family; each maps the model types whose
# layers it describes to its Mixer class (`MIXERS`).
MIXER_MODULES = ("delta_rule", "mamba", "short_conv", "lightning", "cca", "rg_lru", "xlstm", "rwkv")


def mixer_family(model_type: str) -> type[Mixer] | None:
    """The Mixer class describing this model type's state-keeping layers, if a family module has one."""
    import importlib

    for name in MIXER_MODULES:
        family = importlib.import_module(f"planc.model.{name}")
        if model_type in family.MIXERS:
            return family.MIXERS[model_type]
    return None


def recurrent_layer_cache(model_type: str, layer_module, index: int, dtype: str) -> LayerCache:
    """A decoder layer of a model that is recurrent throughout (every_layer families): its state,
    with where transformers keeps it."""
    mixer = mixer_of(model_type, "recurrent", layer_module, index)
    return LayerCache(
        "recurrent", state_bytes=mixer.state_bytes(dtype), mixer=mixer, attention=False,
        on_input_device=mixer.state_on_input_device,
    )


def mixer_of(model_type: str, layer_type: str, layer_module, index: int) -> Mixer:
    """The sequence mixer of one state-keeping layer, with its dimensions read from the module."""
    family = mixer_family(model_type)
    if family is not None:
        if layer_module is None:
            raise ModelError(f"{model_type}: layer {index} ({layer_type}) needs its module to be sized")
        return family.from_layer(layer_module, index)
    raise ModelError(
        f"{model_type}: its {layer_type} layers keep a recurrent state whose layout planc does not know yet"
    )


def find_mixer(layer_module, index: int, *attributes: str):
    """The submodule of a decoder layer that carries all of `attributes` (a family's mixer)."""
    for module in layer_module.modules():
        if all(hasattr(module, name) for name in attributes):
            return module
    raise ModelError(
        f"decoder layer {index} ({type(layer_module).__name__}) has no submodule with {', '.join(attributes)}: "
        "its mixer is not the one planc's formulas describe"
    )


def conv_window(mixer_module, index: int) -> tuple[int, int]:
    """(channels, kernel) of the mixer's depthwise causal convolution: the conv state's shape per
    sequence (transformers keeps the whole kernel width, zero-padded for short prompts)."""
    import torch

    for child in mixer_module.children():
        if isinstance(child, torch.nn.Conv1d) and child.groups == child.in_channels:
            return child.in_channels, child.kernel_size[0]
    raise ModelError(f"decoder layer {index}: {type(mixer_module).__name__} has no depthwise Conv1d")


def family_mixer(family: str) -> type[Mixer] | None:
    """The Mixer class of a mixer family by its name (as a lock's mixers section lists it)."""
    import importlib

    for name in MIXER_MODULES:
        for mixer in importlib.import_module(f"planc.model.{name}").MIXERS.values():
            if mixer.family == family:
                return mixer
    return None


def kernel_functions(family: str) -> tuple[str, ...]:
    """transformers' modeling functions that a mixer family runs on its kernel packages."""
    mixer = family_mixer(family)
    return mixer.kernel_functions if mixer is not None else ()


def layer_tensors(cache, model=None) -> list[list]:
    """Per decoder layer, the tensors a model keeps for it between steps right now (KV, conv and
    recurrent states, indexer keys, compressed KV), each storage once, under the first layer that
    holds it: what the ledger's cache terms are held to, in the tests and in `planc simulate`.

    `cache` is what the forward returns under `cache_keyword`: a transformers Cache with `.layers`
    (MiniMaxCache also keeps `linear_cache`; an EncoderDecoderCache gives each decoder layer its
    self-attention and cross-attention layers), xLSTM's xLSTMCache (`rnn_state`: per layer the
    matrix, normaliser and max states), or RWKV's `state`, a list of tensors stacking every
    layer along the last dimension (all of it listed under layer 0). `model`: where it is given,
    state its decoder layers keep on their modules outside any cache (RecurrentGemma's conv
    window and RG-LRU state) is added to their layer's list.
    """
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef

    per_layer: list[list] = []
    seen: set = set()

    def collect(value, into: list) -> None:
        if isinstance(value, torch.Tensor):
            # An empty view still keeps its storage alive (DeepSeek-V4's drained buffers).
            key = StorageWeakRef(value.untyped_storage()).cdata
            if key not in seen:
                seen.add(key)
                into.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item, into)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item, into)
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
            for name, item in vars(value).items():
                # 0-d bookkeeping counters, not cache; a config is no state
                if name not in ("_sliding_window_tensor", "seqlen_offset", "config"):
                    collect(item, into)

    if isinstance(cache, (list, tuple)):
        layers: list = [list(cache)]  # RWKV: every layer's state in the same few tensors
    elif hasattr(cache, "rnn_state"):
        layers = [cache.rnn_state[index] for index in sorted(cache.rnn_state)]  # xLSTMCache
    elif hasattr(cache, "cross_attention_cache"):
        # EncoderDecoderCache: per decoder layer, its self-attention layer and its cross-attention layer.
        own, cross = (list(c.layers) for c in (cache.self_attention_cache, cache.cross_attention_cache))
        layers = [[own[i] if i < len(own) else None, cross[i] if i < len(cross) else None]
                  for i in range(max(len(own), len(cross)))]
    else:
        layers = list(getattr(cache, "layers", ()) or ())
    # MiniMaxCache keeps lightning-attention states beside its (attention-only) layers.
    side = list(getattr(cache, "linear_cache", ()) or ())
    held_on_modules = [module_states(layer) for layer in decoder_layers(model)] if model is not None else []
    for index in range(max(len(layers), len(side), len(held_on_modules))):
        tensors: list = []
        for source in (layers, side, held_on_modules):
            if index < len(source):
                collect(source[index], tensors)
        per_layer.append(tensors)
    return per_layer


def decoder_layers(model) -> list:
    """The decoder layers of a transformers model, in order: the children of the first ModuleList
    whose blocks are of a class the model keeps whole (`_no_split_modules`)."""
    import torch

    no_split = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and module and all(type(m).__name__ in no_split for m in module):
            return list(module)
    return []


def module_states(layer) -> list:
    """Tensors a decoder layer's modules keep as plain attributes (neither parameters nor buffers):
    state a model holds on its modules between steps (RecurrentGemma's `conv1d_state`,
    `rg_lru.recurrent_states`)."""
    import torch

    return [
        value
        for module in layer.modules()
        for name, value in vars(module).items()
        if isinstance(value, torch.Tensor) and not name.startswith("_")
    ]


def held_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors`."""
    return sum(tensor.untyped_storage().nbytes() for tensor in tensors)


def cache_keyword(model) -> str:
    """The forward argument (and output attribute) a causal LM passes its cache in: Mamba, Mamba2,
    Falcon-Mamba and xLSTM call it `cache_params`, RWKV `state`, every other model
    `past_key_values` (some, such as Evolla, take it through **kwargs)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    if "past_key_values" not in parameters:
        for keyword in ("cache_params", "state"):
            if keyword in parameters:
                return keyword
    return "past_key_values"

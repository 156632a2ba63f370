"""From a config to placement units: the model built on the meta device, cut where accelerate may cut it.

A unit is what one device_map entry places: a `_no_split_modules` block (a decoder layer), a
leaf module (embedding, norm, lm_head), or a module's own parameters. Units form a chain in
execution order (embeddings, layers, final norm, head); tied parameters add "tied" edges whose
ends must share a device. Bytes are exact: the model is built at the plan's dtype on meta and
every distinct tensor is counted once (fp32 rotary buffers stay fp32, tied weights once).
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from planc.errors import ModelError
from planc.model.attention import half_precision_generates
from planc.model.build import meta_model
from planc.model.cache import LayerCache, cache_keyword, layer_caches, refuse_unsized
from planc.model.config import Shapes, config_value, checkpoint_dtype, known_model_type, layer_shapes, shapes_of, text_config
from planc.model.gated_cross import GatedCrossAttention, gated_cross_of, runs_image_cross_attention
from planc.model.encoder_decoder import (
    Encoder, cross_attention_bytes_per_token, decoder_shapes, encoder_of, encoder_path, merges_cross_attention,
    patch_embedding,
)
from planc.model.mlp import sized_activation
from planc.model.vision import Vision, vision_of

if TYPE_CHECKING:
    import networkx as nx

    from planc.model.quant import Quantization


@dataclass(frozen=True)
class Unit:
    """One device_map entry."""

    name: str
    weight_bytes: int
    # "pre" (before the layers), "layer", "cross" (a block between the layers that keeps no cache:
    # Idefics' gated cross-attention, planc.model.gated_cross), "post" (after the layers)
    kind: str
    layer_index: int | None = None
    cache: LayerCache | None = None  # what a decoder layer keeps between steps; None for other units
    moe: bool = False
    expert_bytes: int = 0  # routed-expert weights (fused 3-D parameters); a decode step reads only some
    row_bytes: int = 0  # an untied embedding table: a decode step reads one row per sequence, not the table
    # Quantized units (planc.model.quant.Held of the modules inside):
    host_bytes: int | None = None  # weights when offloaded to cpu/disk, if not weight_bytes (bnb leaves those dense)
    offloadable: bool = True  # accelerate can keep its weights on the host (mxfp4's swizzled experts it cannot)
    quant_prefill_transient: int = 0  # a quantized kernel's largest allocation per call (a dequantized weight)
    quant_token_transient: int = 0  # ... and per token of the step
    experts_token_transient: int = 0  # a fused quantized MoE kernel's bytes per token (0: eager experts' estimate)
    # Its experts take no routing (Llama 4's Llama4TextExperts): every token runs through every
    # expert, scaled by the router's scores, rather than through its top k.
    every_expert: bool = False
    # Its activation module's class when its peak is sized apart (planc.model.mlp.ACTIVATION_PEAK_BYTES).
    mlp_activation: str = ""
    shapes: Shapes | None = None  # this layer's own numbers where the config varies them by layer; else the model's
    vision: bool = False  # the vision tower or its projector: runs once per prefill over the images
    encoder: bool = False  # an encoder-decoder's encoder (model.get_encoder()): runs once per prefill over the source
    # A parameter-free norm computing in fp32 runs on this unit's output before the layers, on its
    # device (NanoChat's model.norm after embed_tokens; it has no weights, so no device of its own).
    fp32_norm_after: bool = False
    # Under the model's tensor-parallel plan: (size of the split dimension, bytes) per tensor the
    # plan shards across ranks (the rest of the unit is replicated), and (kind, elements per
    # token) per collective its forward makes ("all_reduce" of partial sums, "all_gather" of shards).
    tp_shards: tuple[tuple[int, int], ...] = ()
    tp_collectives: tuple[tuple[str, int], ...] = ()

    @property
    def host_weight_bytes(self) -> int:
        """Bytes of the unit's weights when they live on the host."""
        return self.weight_bytes if self.host_bytes is None else self.host_bytes


@dataclass(frozen=True)
class ParallelSupport:
    """What transformers' tensor and pipeline parallelism can do with this model, read from the meta model."""

    tp_plan: bool  # model.supports_tp_plan: a base_model_tp_plan or _tp_plan exists
    tp_unsized_styles: tuple[str, ...]  # TP styles in the plan whose sharding planc does not know
    heads_sharded: bool  # query projections are split by head (num_attention_heads must divide)
    kv_heads_sharded: bool  # key/value projections are split by head: the KV cache is too
    pp_refusal: str | None  # why transformers' pipeline split cannot run this model; None when it can
    pp_units: tuple[str, str, str] = ("", "", "")  # the embedding, final norm and head units PP moves


@dataclass(frozen=True)
class ModelGraph:
    """Placement units of one model at one dtype, with the graph that links them."""

    architecture: str
    model_type: str
    dtype: str
    units: tuple[Unit, ...]
    graph: "nx.DiGraph" = field(repr=False, compare=False)
    no_split_module_classes: tuple[str, ...]
    skip_keys: tuple[str, ...]
    tied_parameters: tuple[tuple[str, ...], ...]
    parameters: int
    shapes: Shapes
    checkpoint_dtype: str | None
    forced_attn_implementation: str | None
    quantization: "Quantization | None" = None  # with its native flag as built
    dense_modules: tuple[str, ...] = ()  # modules with weights left at the plan's dtype (patterns)
    dense_weight_bytes: int = 0  # the same weights dense at the plan's dtype
    inferred_no_split: tuple[str, ...] = ()  # decoder-layer classes kept whole where the model declares none
    config_class: str | None = None  # set when config.json's model_type is unknown and `architectures` resolved it
    vision: Vision | None = None  # the vision tower's numbers, for image-text-to-text models
    encoder: "Encoder | None" = None  # an encoder-decoder model's encoder (planc.model.encoder_decoder)
    position_limit: int | None = None  # positions of a learned position table (GPT-2's wpe): tokens past it fail
    position_table: str = ""  # what holds those positions (a learned table, MPT's ALiBi bias)
    needs_images: bool = False  # generate requires pixel_values (BLIP, BLIP-2, Idefics): no text-only prompt runs
    gated_cross: GatedCrossAttention | None = None  # Idefics' cross-attention blocks between the decoder layers
    # The forward takes no logits_to_keep (generate passes it only where the signature has it): the
    # head computes logits for every position of a step, not the last one only.
    logits_every_position: bool = False
    # xLSTM upcasts the logits of every position to fp32 and soft-caps them (output_logit_soft_cap).
    logits_soft_capped: bool = False
    # The unit holding the output embeddings (lm_head): the logits are computed there. None where
    # the model names none; the last unit then. (Not always the last unit: a vision projector's
    # norm outside the decoder is ordered after it.)
    head: str | None = None
    # generate runs it in bfloat16 and float16 (planc.model.attention.half_precision_generates).
    half_precision_generates: bool = True

    def shapes_of(self, unit: Unit) -> Shapes:
        """The numbers a unit's formulas use: its own where the config varies them by layer."""
        return unit.shapes or self.shapes

    @property
    def logits_unit(self) -> str:
        """The unit that computes the logits."""
        return self.head or self.units[-1].name
    parallel: ParallelSupport | None = None

    @property
    def weight_bytes(self) -> int:
        return sum(unit.weight_bytes for unit in self.units)

    @property
    def is_moe(self) -> bool:
        return any(unit.moe for unit in self.units)

    @property
    def mixer_families(self) -> tuple[str, ...]:
        """Families of the state-keeping sequence mixers in its layers (gated_deltanet, mamba2, ...)."""
        return tuple(sorted({u.cache.mixer.family for u in self.units if u.cache is not None and u.cache.mixer}))

    def tied_unit_groups(self) -> list[set[str]]:
        """Sets of unit names that must share a device (connected by tied edges)."""
        import networkx as nx

        tied = nx.Graph()
        tied.add_edges_from((a, b) for a, b, kind in self.graph.edges(data="kind") if kind == "tied")
        return [set(group) for group in nx.connected_components(tied)]


def _tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _towers(model) -> dict[str, str]:
    """Encoders beside the text decoder (vision, audio): module path -> the config attribute naming them.

    A tower is a PreTrainedModel inside the model whose config is one of the model's sub-configs
    other than the text decoder's (LlavaForConditionalGeneration's `model.vision_tower` carries
    `config.vision_config`).
    """
    from planc.model.config import text_config

    config = model.config
    text = text_config(config)
    sub = {}
    for key in getattr(config, "sub_configs", {}) or {}:
        value = getattr(config, key, None)
        if value is not None and value is not text:
            sub[id(value)] = key
    towers: dict[str, str] = {}
    for name, module in model.named_modules():
        own = getattr(module, "config", None)
        if not name or id(own) not in sub or any(name.startswith(t + ".") for t in towers):
            continue
        towers[name] = sub[id(own)]
    return towers


def _encoder_vision_towers(model, encoder: str) -> dict[str, str]:
    """Vision towers inside an encoder-decoder's encoder, by their paths in the model."""
    module = model.get_submodule(encoder)
    return {f"{encoder}.{name}": key for name, key in _towers(module).items() if key == "vision_config"}


def _encoder_text_prefix(model, encoder: str | None, towers: dict[str, str]) -> str | None:
    """Where an encoder that holds a vision tower keeps its text part (T5Gemma2's encoder.text_model,
    the parent of its input embeddings); None for an encoder without a tower inside."""
    if encoder is None or not any(name.startswith(encoder + ".") for name in towers):
        return None
    embeddings = model.get_submodule(encoder).get_input_embeddings()
    path = next((name for name, module in model.named_modules() if module is embeddings), None)
    if path is None or "." not in path or not path.startswith(encoder + "."):
        raise ModelError(
            f"{type(model).__name__}: its encoder holds a vision tower, and planc finds no text part of the encoder "
            "(the module holding its input embeddings) to tell the tower's and projector's units from the encoder's"
        )
    return path.rsplit(".", 1)[0]


def _decoder_layers(model, no_split: set[str], towers: dict[str, str]) -> tuple[list[str], bool]:
    """Paths of the decoder's layers: the blocks of the ModuleLists outside the towers, in order; and
    whether they were inferred (no list holds a declared no-split block, so each list's children are
    taken as the blocks, when they are all of one class)."""
    import torch

    inside_tower = lambda name: any(name == t or name.startswith(t + ".") for t in towers)  # noqa: E731

    def lists(select) -> list[list[str]]:
        found: list[list[str]] = []
        taken: list[str] = []
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.ModuleList) or inside_tower(name):
                continue
            if any(name.startswith(layer + ".") for layer in taken):
                continue  # lists inside a decoder layer (experts, sub-blocks)
            blocks = select(name, list(module.named_children()))
            if blocks:
                found.append(blocks)
                taken.extend(blocks)
        return found

    declared = lists(lambda name, children: [f"{name}.{c}" for c, m in children if type(m).__name__ in no_split])
    if declared:
        return [layer for group in declared for layer in group], False

    def uniform(name, children):
        kinds = {type(m).__name__ for _, m in children}
        return [f"{name}.{c}" for c, _ in children] if len(children) > 1 and len(kinds) == 1 else []

    inferred = lists(uniform)
    if len(inferred) > 1:
        names = ", ".join(group[0].rsplit(".", 1)[0] for group in inferred)
        raise ModelError(
            f"{type(model).__name__} declares no _no_split_modules and its layers are spread over parallel lists "
            f"({names}): planc finds no block it may keep whole"
        )
    return (inferred[0] if inferred else []), True


def _encoder_derived(model) -> bool:
    """An encoder's causal-LM head (BertLMHeadModel and kin) whose config does not set is_decoder: its
    attention is bidirectional and it keeps no KV cache."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from planc.model.config import text_config

    text = text_config(model.config)
    encoder_family = text.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or text.model_type == "bert-generation"
    return encoder_family and not getattr(text, "is_decoder", True)


def _no_cached_decode(model) -> str | None:
    """Why transformers' generate() of this model is no decode over a KV cache, which is what planc
    plans (and what accelerate's map, a placement of weights, does not check); None when it is."""
    import inspect

    import transformers
    from transformers import DynamicCache

    cls = type(model)
    if not cls.can_generate():
        # PI0 samples robot actions by flow matching (sample_actions): a forward pass, no tokens.
        return (
            "does not generate tokens: transformers gives the class no generate() (it does not inherit "
            "GenerationMixin: can_generate() is False), so there is no decode loop over a KV cache to plan; "
            "accelerate's map only places its weights for a forward pass"
        )
    if "MaskedLMOutput" in str(inspect.signature(cls.forward).return_annotation):
        text = text_config(model.config)
        both_ways = " with attention both ways (config.causal is false)" if getattr(text, "causal", None) is False else ""
        return (
            "is a masked LM: its forward returns MaskedLMOutput, which carries no past_key_values, so generate() "
            f"keeps no KV cache and re-encodes the whole sequence plus a mask token at every step{both_ways}; "
            "planc plans decoding over a KV cache, and accelerate's map only places the weights: use a causal LM"
        )
    if cls._supports_default_dynamic_cache():
        # What generate() builds before the first step (GenerationMixin._prepare_cache_for_generation).
        decoder = model.config.get_text_config(decoder=True)
        try:
            DynamicCache(config=decoder)
        except Exception as exc:  # noqa: BLE001 - whatever stops generate is the reason
            return (
                f"cannot build its KV cache in transformers {transformers.__version__}: generate() starts with "
                f"DynamicCache(config={type(decoder).__name__}), which raises {type(exc).__name__}: {exc}; "
                "so generate fails (with use_cache=False it re-encodes the whole sequence at every step, which "
                "planc does not plan), and accelerate's map places weights for a forward generate cannot run"
            )
    return None


def _call_order(model, layer_names: list[str]) -> dict[str, int] | None:
    """Module path -> when it first runs in a two-token forward under fake tensors, the decoder
    layers passed through (their order is known; running them would cost seconds); None when the
    model does not get through its layers that way, and names decide instead.

    A passed-through layer returns its hidden states, or (hidden states, None) where the model
    unpacks two values from each layer (HY-V4 threads its indexer's top-k from layer to layer)."""
    for pair in (False, True):
        order = _traced_order(model, layer_names, pair)
        if order is not None:
            return order
    return None


def _traced_order(model, layer_names: list[str], pair: bool) -> dict[str, int] | None:
    import types

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    def passthrough(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        return (hidden, None) if pair else hidden

    order: dict[str, int] = {}
    handles, stubbed = [], []
    for name in layer_names:
        layer = model.get_submodule(name)
        stubbed.append((layer, layer.__dict__.get("forward")))
        layer.forward = types.MethodType(passthrough, layer)
    for name, module in model.named_modules():
        def record(_module, _args, name=name):
            order.setdefault(name, len(order))

        handles.append(module.register_forward_pre_hook(record))
    fake_logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_logger.level
    fake_logger.setLevel(logging.CRITICAL)  # fake mode logs each op that fails; a failure is a fallback here
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device="meta"), use_cache=False)
    except Exception:  # noqa: BLE001 - a failure after the last layer ran (a passed-through layer
        # returns no tuple where the head expects one) still leaves the order of what ran
        if any(name not in order for name in layer_names):
            return None
    finally:
        fake_logger.setLevel(level)
        for handle in handles:
            handle.remove()
        for layer, own in stubbed:
            if own is None:
                del layer.forward
            else:
                layer.forward = own
    return order


def _native_norm(module) -> bool:
    """A torch norm (one kernel, no fp32 copies beside its output), not a transformers RMSNorm that upcasts."""
    import torch

    native = (torch.nn.LayerNorm, torch.nn.GroupNorm, getattr(torch.nn, "RMSNorm", torch.nn.LayerNorm))
    return isinstance(module, native)


def _position_limit(model, pre_units: list[str], text) -> tuple[int | None, str]:
    """How many positions a learned absolute position table holds (GPT-2's wpe, OPT's embed_positions),
    or a position bias built at a fixed length (MPT's ALiBi); None where positions are computed for
    any length (rotary, Bloom's ALiBi)."""
    import torch

    modules = dict(model.named_modules())
    for unit in pre_units:
        if unit not in modules:
            continue  # a module's own tensor (gpt_bigcode's transformer.bias)
        # The table may be the unit, or inside it (BertEmbeddings is one no-split block).
        for name, module in modules[unit].named_modules(prefix=unit):
            leaf = name.rsplit(".", 1)[-1]
            # Layout tables (Udop's cell_2d_embedding.x_/y_position_embeddings) index a box's
            # coordinates, not the token's position: any source length fits them.
            layout = leaf.startswith(("x_position", "y_position"))
            if isinstance(module, torch.nn.Embedding) and ("pos" in leaf or leaf == "wpe") and not layout:
                limit = config_value(text, "max_position_embeddings", "n_positions", default=None)
                table = min(limit, module.num_embeddings) if isinstance(limit, int) else module.num_embeddings
                return table, "learned position table"
    # A computed bias of fixed length: MPT builds its ALiBi bias once for config.max_seq_len tokens
    # (MptModel.forward) and adds it to every layer's scores; longer keys do not broadcast.
    if getattr(text, "model_type", None) == "mpt" and isinstance(getattr(text, "max_seq_len", None), int):
        return text.max_seq_len, "ALiBi bias, built for config.max_seq_len tokens"
    return None, ""


def _refuse_cache_without_attention(model, caches: list[LayerCache]) -> None:
    """A DynamicCache of state layers only: transformers' generate (and the mask functions) ask
    it for the sequence length, which only an attention layer tracks, so the model cannot generate
    (cache_utils.py DynamicCache.get_seq_length raises). Bamba's and GraniteMoeHybrid's default
    configs are such; their real checkpoints interleave attention layers."""
    if not caches or any(cache.attention or cache.bytes_per_token for cache in caches):
        return
    if cache_keyword(model) != "past_key_values" or not any(cache.mixer for cache in caches):
        return  # Mamba's own cache (cache_params), or a model that keeps no cache at all
    import transformers

    kinds = ", ".join(sorted({cache.kind for cache in caches}))
    raise ModelError(
        f"{type(model).__name__}: no layer of this config attends (only {kinds}), and transformers "
        f"{transformers.__version__} generates only with an attention layer in its cache (DynamicCache.get_seq_length "
        "raises without one): give the config its attention layers"
    )


def _cache_owners(model, layer_names: list[str]) -> list[int] | None:
    """Per cache layer, the decoder layer whose forward updates it, from a one-token forward on meta
    (HRM runs its L-stack at H x L cache slots and its H-stack at H); None when the model does not
    get through that forward or some cache layer is not updated."""
    import torch
    from transformers import DynamicCache

    running: list[int] = []
    owners: dict[int, int] = {}
    handles = []

    def enter(_module, _args, index: int) -> None:
        running.append(index)

    def leave(_module, _args, _output) -> None:  # returns None: the layer's output stands
        running.pop()

    for index, name in enumerate(layer_names):
        layer = model.get_submodule(name)
        handles.append(layer.register_forward_pre_hook(lambda module, args, index=index: enter(module, args, index)))
        handles.append(layer.register_forward_hook(leave))
    cache = DynamicCache(config=model.config)
    update = cache.update

    def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
        if running:
            owners.setdefault(layer_idx, running[-1])
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = recording_update
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device="meta"), past_key_values=cache, use_cache=True)
    except Exception:  # noqa: BLE001 - without the trace, the contiguous grouping stands
        return None
    finally:
        for handle in handles:
            handle.remove()
    if sorted(owners) != list(range(len(cache.layers))):
        return None
    return [owners[index] for index in range(len(cache.layers))]


def _group_caches(caches: list[LayerCache], layers: int, owners: list[int] | None = None) -> list[LayerCache]:
    """One cache per decoder layer when the config lists several per layer (LongCat-Flash runs two
    attentions per layer; HRM loops its layers): each layer's entries are those it updates
    (`owners`, per cache entry its decoder layer), else k consecutive ones, layer i holding
    k*i .. k*i + k - 1."""
    if len(caches) == layers or not layers:
        return caches
    if owners is None or len(owners) != len(caches):
        if len(caches) % layers:
            return caches
        k = len(caches) // layers
        owners = [index // k for index in range(len(caches))]
    from dataclasses import replace

    grouped = []
    for i in range(layers):
        part = [cache for cache, owner in zip(caches, owners) if owner == i]
        if not part:
            return caches
        # Only plain attention caches add up; a mixer's state or a compressed / indexed cache
        # has a layout of its own (such configs are refused by the caller's count check).
        if len({(c.kind, c.window) for c in part}) != 1 or any(
            c.mixer or c.indexer_heads or c.compress_rate for c in part
        ):
            return caches
        grouped.append(replace(part[0], bytes_per_token=sum(c.bytes_per_token for c in part),
                               state_bytes=sum(c.state_bytes for c in part)))
    return grouped


def build_model_graph(
    config_dict: dict[str, Any],
    dtype: str,
    trust_remote_code: bool = False,
    quantization: "Quantization | None" = None,
    kv_cache: str | None = None,
) -> ModelGraph:
    """Build the model on the meta device at `dtype` (in `quantization`'s layout) and cut it into placement units.

    `kv_cache`: the QuantizedCache backend the KV cache is stored with (fp8), None for the model dtype.
    """
    import torch
    from accelerate.utils import find_tied_parameters

    from planc.model.quant import dense_module_patterns, held

    # Refused before building: some of these do not even build at their default sizes.
    refuse_unsized(str(config_dict.get("model_type", "")))
    model = meta_model(config_dict, dtype, trust_remote_code, quantization=quantization)
    config = model.config
    architecture = type(model).__name__
    shapes = shapes_of(config)
    declared = tuple(sorted(model._no_split_modules or ()))
    towers = _towers(model)
    encoder = encoder_path(model)
    if getattr(config, "is_encoder_decoder", False):
        _refuse_unplanned_encoder(model, encoder)
        # The encoder runs once per prefill, before the decoder, like a vision tower: its modules are
        # units ahead of the decoder layers, and its block lists are no decoder layers.
        towers = {name: key for name, key in towers.items() if not name.startswith(encoder + ".")}
        towers[encoder] = "encoder"
        # A vision tower inside the encoder (T5Gemma2's get_encoder() holds vision_tower, its config
        # the encoder config's vision_config) is a vision tower all the same: it runs over the images
        # before the encoder's text blocks, whose source its pooled features join.
        towers.update(_encoder_vision_towers(model, encoder))
        shapes = decoder_shapes(config, shapes)
    if encoder is None and _encoder_derived(model):
        raise ModelError(
            f"{architecture}: config.is_decoder is false, so this encoder's LM head attends both ways and keeps no "
            "KV cache: it does not generate; set is_decoder: true in config.json for a causal LM"
        )
    refusal = _no_cached_decode(model)
    if refusal:
        raise ModelError(f"{architecture} {refusal}")
    layer_names, guessed = _decoder_layers(model, set(declared), towers)
    if not layer_names:
        raise ModelError(
            f"{architecture}: no decoder layers found (no ModuleList of {', '.join(declared) or 'blocks of one class'})"
        )
    # Where no declared no-split block is a decoder layer, each decoder layer is kept whole (as one would be).
    inferred = tuple(sorted({type(model.get_submodule(n)).__name__ for n in layer_names})) if guessed else ()
    no_split = set(declared) | set(inferred)
    # An encoder-decoder's config counts and sizes its encoder's layers too (BART's num_hidden_layers is
    # encoder_layers): every decoder layer has the decoder's numbers.
    config_layers = layer_shapes(config) if encoder is None else [shapes] * len(layer_names)
    layer_modules = [model.get_submodule(name) for name in layer_names]
    if encoder is not None and kv_cache is not None:
        raise ModelError(
            f"model.kv_cache {kv_cache}: transformers' generate builds no QuantizedCache for an encoder-decoder "
            "model (it raises: 'This model does not support the quantized cache'); leave model.kv_cache unset"
        )
    if encoder is not None:
        _refuse_short_decoder_cache(model, len(layer_names))
    cache_config = _decoder_cache_config(config, len(layer_names)) if encoder is not None else config
    caches = layer_caches(cache_config, shapes, dtype, layer_modules, config_layers, kv_cache)
    if len(caches) != len(layer_names):
        caches = _group_caches(caches, len(layer_names), _cache_owners(model, layer_names))
    per_layer = config_layers if len(config_layers) == len(layer_names) else [shapes] * len(layer_names)
    gated = gated_cross_of(model, layer_names, len(caches)) if len(caches) != len(layer_names) else None
    if gated is not None:
        # Idefics: the decoder layers keep the caches; its gated cross-attention blocks, a list of
        # their own, run between them and keep none (placed in the chain below).
        layer_names, gated_cross = gated
        layer_modules = [model.get_submodule(name) for name in layer_names]
        caches = layer_caches(config, shapes, dtype, layer_modules, config_layers, kv_cache)
        per_layer = config_layers if len(config_layers) == len(layer_names) else [shapes] * len(layer_names)
    else:
        gated_cross = None
    cross_set = set(gated_cross.blocks) if gated_cross else set()
    if len(caches) != len(layer_names):
        # Several kinds of block in the layer lists, one of them as many as the cache layers, in a
        # layout other than Idefics' (model.gated_cross): a list of their own that keeps no cache.
        kinds = Counter(type(module).__name__ for module in layer_modules)
        if len(kinds) > 1 and len(caches) in kinds.values():
            listed = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
            raise ModelError(
                f"{architecture}: its layer lists hold {len(layer_names)} blocks of {len(kinds)} kinds ({listed}) "
                f"for the config's {len(caches)} cache layers: planc does not yet place blocks that keep no cache "
                "between the decoder layers"
            )
        raise ModelError(
            f"{architecture}: config describes {len(caches)} cache layers for {len(layer_names)} decoder layers "
            "(transformers' DynamicCache is built from the config's layer count, so generate would fail or the "
            "cache would not be what planc sizes)"
        )
    _refuse_cache_without_attention(model, caches)
    layer_set = set(layer_names)
    if encoder is not None:
        # Each decoder layer also keeps the source's K/V for its cross-attention, fixed after the first step.
        caches = [
            replace(cache, bytes_per_source_token=cross_attention_bytes_per_token(module, dtype, cache.bytes_per_token),
                    merged_cross=merges_cross_attention(module))
            for cache, module in zip(caches, layer_modules)
        ]
    output_embeddings = model.get_output_embeddings()

    # Tensors are shared when tied; count each once, on the first unit (execution order) that holds it.
    owners: dict[int, str] = {}
    raw_units: list[tuple[str, Any, list[Any]]] = []  # (name, module or None, direct tensors)

    def visit(prefix: str, module) -> None:
        # Children without tensors give nothing to split, and a module kept whole gets accelerate's
        # hook (Inkling2's final_input: its own `query` and a weightless norm; split, the hook-less
        # offloaded parameter would never reach the execution device).
        splittable = (
            prefix not in layer_set and prefix not in cross_set and type(module).__name__ not in no_split
            and any(next(child.parameters(), None) is not None or next(child.buffers(), None) is not None
                    for child in module.children())
        )
        if not splittable:
            raw_units.append((prefix, module, list(module.parameters()) + list(module.buffers())))
            return
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in own:
            raw_units.append((f"{prefix}.{name}" if prefix else name, None, [tensor]))
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    layer_prefix = layer_names[0].rsplit(".", 1)[0]
    decoder_prefix = layer_prefix.rsplit(".", 1)[0] if "." in layer_prefix else ""
    vision_towers = tuple(name for name, key in towers.items() if key == "vision_config")
    # Idefics' perceiver resampler runs over the tower's output before the layers, like the tower.
    resampler = gated_cross.resampler if gated_cross else None

    def in_resampler(name: str) -> bool:
        return resampler is not None and (name == resampler or name.startswith(resampler + "."))

    text_prefixes = _text_prefixes(model, decoder_prefix, towers)
    encoder_text = _encoder_text_prefix(model, encoder, towers)

    # Norms outside the layers are taken to run after them, unless there are several or one is named
    # for the embeddings (Bloom's word_embeddings_layernorm, Blenderbot-Small's layernorm_embedding):
    # then a traced forward decides.
    loose_norms = [
        name for name, module, _ in raw_units
        if module is not None and "norm" in type(module).__name__.lower() and not name.startswith(layer_prefix)
        and name not in cross_set and not in_resampler(name)
        and not any(name == t or name.startswith(t + ".") for t in towers)
    ]
    suspicious = len(loose_norms) > 1 or any("emb" in name.rsplit(".", 1)[-1] for name in loose_norms)
    # So do modules outside the layers that are neither embeddings, rotary tables nor norms
    # (Gemma 3n's altup projections: some run before the layers, some after).
    unusual = [
        name for name, module, _ in raw_units
        if module is not None and module is not output_embeddings and not name.startswith(layer_prefix)
        and name not in cross_set and not isinstance(module, torch.nn.Embedding)
        and "rotary" not in type(module).__name__.lower()
        and "norm" not in type(module).__name__.lower() and not any(name == t or name.startswith(t + ".") for t in towers)
    ]
    # And so do a module's own tensors where that module is not one the layers run inside
    # (DeepSeek-V4's hc_head holds hc_fn / hc_base / hc_scale and collapses the streams after the
    # layers); a tensor of the model or the decoder itself (gpt_bigcode's transformer.bias) is pre.
    def owner_of(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else ""

    detached = [
        name for name, module, _ in raw_units
        if module is None and owner_of(name) and not layer_prefix.startswith(owner_of(name) + ".")
        and not name.startswith(layer_prefix) and not any(name.startswith(t + ".") for t in towers)
    ]
    # And so do parameter-free norms outside the layers: accelerate places nothing for them, so
    # they run wherever their input is, the input embeddings' device when they run before the layers.
    weightless_norms = [
        name for name, module in model.named_modules()
        if name and "norm" in type(module).__name__.lower() and not _native_norm(module)
        and next(module.parameters(), None) is None and next(module.buffers(), None) is None
        and not name.startswith(layer_prefix + ".") and not any(name == t or name.startswith(t + ".") for t in towers)
    ]
    calls = _call_order(model, layer_names) if suspicious or unusual or detached or weightless_norms else None
    last_layer_call = max((calls.get(n, -1) for n in layer_names), default=-1) if calls else -1
    detached_set = set(detached)

    def call_of(name: str) -> int | None:
        """When a unit first runs in the traced forward: a module's own tensor when its module does."""
        if calls is None:
            return None
        return calls.get(owner_of(name) if name in detached_set else name)

    def is_post(name: str, module) -> bool:
        # After the layers run only the final norm and the output head; rotary tables, position
        # embeddings and the like run before them even where they are defined after. Where the
        # model runs on meta, its call order says so (Blenderbot-Small's layernorm_embedding is
        # defined after its layers and runs before them); otherwise a norm outside the layers is post.
        if module is not None and module is output_embeddings:
            return True
        in_tower = any(name.startswith(t + ".") or name == t for t in towers) or in_resampler(name)
        if in_tower or name.startswith(layer_prefix) or (module is None and name not in detached_set):
            return False
        call = call_of(name)
        if call is not None and last_layer_call >= 0:
            return call > last_layer_call
        # Without a call order: a projector between the vision tower and the text model runs before
        # both (Florence2's multi_modal_projector.image_proj_norm is a norm outside the layers, and no final norm).
        if any(part.endswith("projector") for part in name.split(".")[:-1]):
            return False
        return module is not None and "norm" in type(module).__name__.lower()

    tied_groups = tuple(tuple(sorted(group)) for group in find_tied_parameters(model))
    tied_names = {name for group in tied_groups for name in group}
    first_layer_call = min((calls.get(n, len(calls)) for n in layer_names), default=0) if calls else 0
    input_norm = any(calls.get(name, first_layer_call) < first_layer_call for name in weightless_norms) if calls else False
    input_embeddings = model.get_input_embeddings() if input_norm else None
    pre, layers, post = [], [], []
    crosses: dict[str, Unit] = {}
    layer_index = 0
    for name, module, tensors in raw_units:
        unique = [t for t in tensors if id(t) not in owners]
        for t in unique:
            owners[id(t)] = name
        if not tensors:
            continue  # parameter-free modules (dropout, activations) need no placement
        records = [held(m) for m in module.modules()] if module is not None else []
        records = [record for record in records if record is not None]
        # State a quantized module keeps outside its tensors (mxfp4 scales, bitsandbytes' quant state).
        weight = sum(_tensor_bytes(t) for t in unique) + sum(r.hidden_bytes for r in records)
        quant = _quantized_terms(weight, records, quantization)
        if name in layer_set:
            # transformers 5 stores routed experts as fused 3-D parameters (quantized ones with their scales).
            experts = sum(_tensor_bytes(t) for t in unique if t.dim() == 3)
            experts += sum(_expert_hidden_bytes(m) for m in module.modules())
            layers.append(
                Unit(name, weight, "layer", layer_index, caches[layer_index], experts > 0, experts,
                     shapes=per_layer[layer_index] if per_layer[layer_index] != shapes else None,
                     every_expert=experts > 0 and _runs_every_expert(module),
                     mlp_activation=sized_activation(module), **quant)
            )
            layer_index += 1
        elif name in cross_set:
            crosses[name] = Unit(name, weight, "cross", **quant)
        elif is_post(name, module):
            post.append(Unit(name, weight, "post", **quant))
        else:
            # An embedding's decode step reads one row per sequence, unless lm_head reads it whole.
            row = 0
            if isinstance(module, torch.nn.Embedding) and f"{name}.weight" not in tied_names:
                row = module.embedding_dim * module.weight.element_size()
            # The tower's units, and the projector between it and the decoder (a unit outside both).
            in_vision = any(name == t or name.startswith(t + ".") for t in vision_towers) or in_resampler(name)
            vision = in_vision or bool(vision_towers) and not any(
                name == p or name.startswith(p + ".") for p in text_prefixes
            ) and not any(name == t or name.startswith(t + ".") for t in towers)
            in_encoder = encoder is not None and (name == encoder or name.startswith(encoder + "."))
            if in_encoder and encoder_text is not None and not name.startswith(encoder_text + "."):
                # The tower inside the encoder and the projector beside it: vision units.
                in_encoder, vision = False, True
            pre.append(Unit(name, weight, "pre", row_bytes=row, vision=vision and not in_encoder, encoder=in_encoder,
                            fp32_norm_after=input_norm and module is input_embeddings, **quant))
    if calls is not None:
        # After the layers, in the order they run (Gemma 3n unembeds its altup streams, then norms).
        post.sort(key=lambda unit: len(calls) if call_of(unit.name) is None else call_of(unit.name))
    pre, layers = _state_on_input_device(model, pre, layers)
    if encoder_text is not None:
        pre = _vision_before_encoder(pre)
    if gated_cross:
        layers = _interleave(layers, crosses, gated_cross)
    encoder_info = None
    if encoder is not None:
        encoder_units = {unit.name for unit in pre if unit.encoder}
        blocks = sum(1 for name, module, _ in raw_units
                     if module is not None and name in encoder_units and type(module).__name__ in no_split)
        encoder_info = encoder_of(model, blocks)
        encoder_limit, _ = _position_limit(model, [u.name for u in pre if u.encoder], model.get_submodule(encoder).config)
        encoder_info = replace(encoder_info, position_limit=encoder_limit)
        pre = _encoder_output_on_last_unit(pre, encoder_info, dtype)
    vision = vision_of(config if encoder_text is None else model.get_submodule(encoder).config, vision_towers)
    if vision is not None and vision.stages:
        vision = replace(vision, extra_tokens=image_tokens_added(model, vision))
    if vision is not None and encoder_text is not None:
        vision = pooled_image_tokens(model.get_submodule(encoder), vision)
    units = tuple(pre + layers + post)
    all_records = [r for r in (held(m) for m in model.modules()) if r is not None]
    dense_bytes = sum(u.weight_bytes for u in units) + sum(r.dense_bytes - r.quantized_bytes for r in all_records)
    decoder_pre = [u.name for u in pre if not u.vision and not any(u.name.startswith(t + ".") for t in towers)]
    position_limit, position_table = _position_limit(model, decoder_pre, text_config(config))
    units, parallel = _parallel_support(model, units, layer_prefix)

    import networkx as nx

    graph = nx.DiGraph()
    for position, unit in enumerate(units):
        graph.add_node(unit.name, position=position, unit=unit)
    for a, b in zip(units, units[1:]):
        graph.add_edge(a.name, b.name, kind="flow")

    def owning_unit(param_name: str) -> str:
        candidates = [u.name for u in units if param_name == u.name or param_name.startswith(u.name + ".")]
        return max(candidates, key=len)

    for group in tied_groups:
        owners_of_group = sorted({owning_unit(p) for p in group}, key=lambda n: graph.nodes[n]["position"])
        for a, b in zip(owners_of_group, owners_of_group[1:]):
            graph.add_edge(a, b, kind="tied")

    # Parameters as the dense model counts them: packed layouts hold fewer (or more) elements.
    inside_quantized = {id(p) for m in model.modules() if held(m) is not None for p in m.parameters()}
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in inside_quantized)
    parameters += sum(r.dense_parameters for r in all_records)
    # Some architectures (Gemma-2, gpt-oss) resolve to eager attention whatever we ask for.
    forced_attn = "eager" if getattr(model.config, "_attn_implementation", None) == "eager" else None
    skip = model._skip_keys_device_placement or ()
    skip_keys = (skip,) if isinstance(skip, str) else tuple(sorted(skip))
    return ModelGraph(
        architecture=architecture,
        model_type=config_dict["model_type"],
        dtype=dtype,
        units=units,
        graph=graph,
        no_split_module_classes=declared,
        skip_keys=skip_keys,
        tied_parameters=tied_groups,
        parameters=parameters,
        shapes=shapes,
        checkpoint_dtype=checkpoint_dtype(config_dict),
        forced_attn_implementation=forced_attn,
        quantization=quantization,
        dense_modules=tuple(dense_module_patterns(model)) if quantization is not None and quantization.native else (),
        dense_weight_bytes=dense_bytes,
        inferred_no_split=inferred,
        config_class=None if known_model_type(config_dict["model_type"]) else type(config).__name__,
        vision=vision,
        position_limit=position_limit,
        position_table=position_table,
        needs_images=generates_from_images(model),
        gated_cross=gated_cross,
        logits_every_position="logits_to_keep" not in inspect.signature(model.forward).parameters,
        head=next((name for name, module, tensors in raw_units if tensors and module is not None
                   and module is output_embeddings), None),
        logits_soft_capped=getattr(text_config(config), "output_logit_soft_cap", None) is not None,
        half_precision_generates=half_precision_generates(model),
        parallel=parallel,
        encoder=encoder_info,
    )


def _interleave(layers: list[Unit], crosses: dict[str, Unit], gated_cross: GatedCrossAttention) -> list[Unit]:
    """The decoder layers with each gated cross-attention block just before the layer it runs
    before: the chain in call order, which the solver cuts into contiguous device ranges."""
    before: dict[int, list[Unit]] = {}
    for name, index in zip(gated_cross.blocks, gated_cross.before):
        before.setdefault(index, []).append(crosses[name])
    chain: list[Unit] = []
    for layer in layers:
        chain.extend(before.pop(layer.layer_index, []))
        chain.append(layer)
    return chain


def places_image_features(model) -> bool:
    """A text encoder whose image tokens are placeholders in input_ids: the vision tower and projector
    run first and their features are scattered over the image-token positions (masked_scatter), so
    the encoder's source is the prompt's ids, the processor's image tokens included. The tower sits
    ahead of the encoder (Florence2: the model's get_placeholder_mask) or inside it (T5Gemma2: the
    encoder's get_image_placeholder_mask); either way it is a vision tower ahead of the text blocks."""
    encoder = model.get_encoder()
    placeholders = hasattr(model, "get_placeholder_mask") or hasattr(encoder, "get_image_placeholder_mask")
    return placeholders and hasattr(model, "get_image_features")


def _vision_before_encoder(pre: list[Unit]) -> list[Unit]:
    """The pre units in the order they run where the encoder holds the tower: its tower and projector
    first (get_image_features), then the encoder's text units over the merged embeddings."""
    first = next((i for i, unit in enumerate(pre) if unit.encoder), None)
    if first is None:
        return pre
    inside = [unit for unit in pre[first:] if unit.vision]
    rest = [unit for unit in pre[first:] if not unit.vision]
    return pre[:first] + inside + rest


def pooled_image_tokens(encoder, vision: Vision) -> Vision:
    """An encoder whose projector pools the tower's patch grid (T5Gemma2: an AvgPool2d down to
    mm_tokens_per_image): the tokens one image of the config's size becomes, from get_image_features
    on meta tensors; where that fails (a pool kernel of 0 in a config whose tower and projector do not
    agree), why no image can run."""
    import torch

    side = vision.image_size
    channels = config_value(encoder.config.vision_config, "num_channels", default=3)
    if not side:
        return replace(vision, image_refusal="its vision config gives no image_size, which its projector pools")
    pixels = torch.empty(1, channels, side, side, dtype=encoder.dtype, device="meta")
    try:
        with torch.no_grad():
            out = encoder.get_image_features(pixel_values=pixels, return_dict=True)
        tokens = int(out.pooler_output.shape[1])
    except Exception as exc:  # noqa: BLE001 - the reason a real image fails the same way
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        return replace(vision, image_refusal=(
            f"its projector cannot pool this config's {side} x {side} images ({type(exc).__name__}: {first}); "
            "give the vision config an image_size and patch_size whose patch grid its mm_tokens_per_image divides"))
    return replace(vision, pooled_tokens=tokens)


def image_tokens_added(model, vision) -> int:
    """Tokens get_image_features gives beyond the tower's output grid (Florence2's projector appends a
    mean-over-positions token), from one run on meta tensors at the smallest side of whole windows."""
    import torch

    if not vision.stages or not hasattr(model, "get_image_features"):
        return 0
    side, stride = vision.stages[-1].window, 1
    for stage in vision.stages:
        stride *= stage.stride
    side *= stride
    channels = config_value(model.config.vision_config, "in_channels", "num_channels", default=3)
    pixels = torch.empty(1, channels, side, side, dtype=model.dtype, device="meta")
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    features = getattr(out, "pooler_output", None)
    features = out if features is None else features
    from planc.workload import Workload

    grid = vision.patches_per_image(Workload(1, 1, image_size=side))
    return int(features.shape[1]) - grid


def _resampling_measured(encoder) -> bool:
    """A resampling image encoder planc sizes (encoder_decoder._resampling_encoder): a fixed image size,
    a pooler_output of batch x tokens x width from a run on meta tensors, and no class token."""
    from planc.model.encoder_decoder import resampled_output

    side = config_value(encoder.config, "image_size", default=None)
    patch = config_value(encoder.config, "patch_size", default=None)
    if not isinstance(side, int) or not isinstance(patch, int):
        return False
    try:
        resampled_output(encoder, side)
    except Exception:  # noqa: BLE001 - an output planc cannot read is refused with the reason below
        return False
    return getattr(getattr(encoder, "embeddings", None), "cls_token", None) is None


def _resampled_source(encoder) -> str:
    """What a resampling image encoder gives the decoder, from one run on meta tensors of the config's
    image size (PP-FormulaNet: a 32 x 32 patch grid, 64 source tokens after its neck and projector)."""
    import torch

    config = encoder.config
    side, patch = config_value(config, "image_size", default=0), config_value(config, "patch_size", default=0)
    side = max(side) if isinstance(side, (list, tuple)) else side
    patch = max(patch) if isinstance(patch, (list, tuple)) else patch
    channels = config_value(config, "num_channels", default=3)
    try:
        pixels = torch.empty(1, channels, side, side, dtype=encoder.dtype, device="meta")
        with torch.no_grad():
            out = encoder(pixel_values=pixels, return_dict=True)
        source = getattr(out, "pooler_output", None)
        source = out.last_hidden_state if source is None or source.dim() != 3 else source
        tokens = int(source.shape[1])
    except Exception:  # noqa: BLE001 - the measurement only words the refusal
        return "the decoder's source is not the patch grid"
    grid = side // patch if patch else 0
    return (f"its blocks attend over the {grid} x {grid} patch grid of a {side} x {side} image and the decoder "
            f"cross-attends {tokens} resampled tokens")


def _refuse_unplanned_encoder(model, encoder: str | None) -> None:
    """Encoder-decoder models whose source planc cannot size yet: an encoder that is no submodule, or
    a text encoder that takes images other than as features scattered over image-token placeholders
    (Florence2's and T5Gemma2's, places_image_features) or as patches appended after the text (Udop's,
    encoder_decoder.patch_embedding), which are counted."""
    architecture = type(model).__name__
    if encoder is None:
        raise ModelError(f"{architecture} is an encoder-decoder model whose get_encoder() is no submodule planc can place")
    module = model.get_submodule(encoder)
    main_input = getattr(module, "main_input_name", "input_ids")
    image_inputs = {"pixel_values", "image", "images"} & set(inspect.signature(model.forward).parameters)
    if main_input == "pixel_values":
        import torch

        convolutions = [name for name, child in module.named_modules() if isinstance(child, torch.nn.Conv2d)]
        if len(convolutions) > 1 and not _resampling_measured(module):
            raise ModelError(
                f"{architecture} is an encoder-decoder model whose image encoder resamples its patches after the "
                f"patch embedding ({', '.join(convolutions[1:3])}): {_resampled_source(module)}, and planc sizes "
                "image encoders whose output is one token per patch (their blocks' peak and the source the decoder "
                "cross-attends are then the same tokens)"
            )
    if main_input == "input_ids" and image_inputs and not places_image_features(model) and patch_embedding(module) is None:
        # Images as placeholders' features (Florence2, T5Gemma2) or appended patches (Udop) are
        # counted in the source; any other merge of an image into the text encoder's tokens is not.
        raise ModelError(
            f"{architecture} is an encoder-decoder model whose encoder reads the prompt's tokens and the image's "
            f"({', '.join(sorted(image_inputs))} beside input_ids): its encoder merges the image with the text tokens "
            "in a way planc does not count in the source yet; planc plans text encoders, image encoders, and text "
            "encoders whose image features fill image-token placeholders (Florence2, T5Gemma2)"
        )


def _refuse_short_decoder_cache(model, layers: int) -> None:
    """generate's DynamicCache(config=decoder config) has one layer per num_hidden_layers, which T5's
    config maps to the encoder's num_layers: with more decoder layers than that, the first step past
    them raises IndexError (cache_utils.py DynamicCache.update appends layers only for caches built
    without a config)."""
    import transformers
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if cache.layer_class_to_replicate is None and len(cache.layers) < layers:
        raise ModelError(
            f"{type(model).__name__} cannot generate in transformers {transformers.__version__}: its {layers} decoder "
            f"layers update a self-attention cache that generate builds with {len(cache.layers)} layers (the config's "
            "num_hidden_layers, its encoder's count), and the step past them raises IndexError; give the config as "
            "many encoder as decoder layers"
        )


def _decoder_cache_config(config, layers: int):
    """The decoder's config with one cache layer per decoder layer: T5's config counts the encoder's
    num_layers, and where the decoder has fewer, the cache layers past them stay empty (more are
    refused by _refuse_short_decoder_cache)."""
    import copy

    text = text_config(config)
    if getattr(text, "layer_types", None) or config_value(text, "num_hidden_layers", default=layers) == layers:
        return config
    view = copy.deepcopy(text)
    view.num_hidden_layers = layers
    return view


def _encoder_output_on_last_unit(pre: list[Unit], encoder: "Encoder", dtype: str) -> list[Unit]:
    """The encoder output generate keeps for every step, charged to the encoder's last unit: the encoder
    runs on the main GPU, and its io_same_device hook returns the output to the input device, the main GPU."""
    from planc.model.config import DTYPE_BYTES

    last = max((i for i, unit in enumerate(pre) if unit.encoder), default=None)
    if last is None:
        return pre
    # A resampling encoder's neck output (last_hidden_state) is kept beside the source it gives the decoder.
    width = encoder.output_width * DTYPE_BYTES[dtype] + encoder.output_mask_bytes
    held = LayerCache("encoder_output", attention=False, bytes_per_source_token=width,
                      state_bytes=encoder.output_elements_per_image * DTYPE_BYTES[dtype])
    return [replace(unit, cache=held) if i == last else unit for i, unit in enumerate(pre)]


def _state_on_input_device(model, pre: list[Unit], layers: list[Unit]) -> tuple[list[Unit], list[Unit]]:
    """Move the state transformers keeps on the input embeddings' device (RWKV, xLSTM allocate
    every layer's state from `inputs_embeds`) from the layers to the embedding unit, so that the
    ledger charges it to the device the embeddings run on, wherever the layers go."""
    held = sum(unit.cache.state_bytes for unit in layers if unit.cache is not None and unit.cache.on_input_device)
    if not held:
        return pre, layers
    embeddings = model.get_input_embeddings()
    name = next((n for n, module in model.named_modules() if module is embeddings), None)
    if name is None or not any(unit.name == name for unit in pre):
        raise ModelError(
            f"{type(model).__name__} keeps its recurrent state on the input embeddings' device, and planc finds no "
            "embedding unit before the layers to charge it to"
        )
    pre = [
        replace(unit, cache=LayerCache("input_device_state", state_bytes=held, attention=False)) if unit.name == name else unit
        for unit in pre
    ]
    layers = [
        replace(unit, cache=replace(unit.cache, state_bytes=0))
        if unit.cache is not None and unit.cache.on_input_device else unit
        for unit in layers
    ]
    return pre, layers


def _text_prefixes(model, decoder_prefix: str, towers: dict[str, str]) -> list[str]:
    """Module paths that belong to the text model, not to a projector between tower and decoder:
    the decoder's own prefix, the input embedding, and the embedding's parent module where that
    holds no tower (GIT's `git.embeddings`, beside its layers at `git.encoder`)."""
    prefixes = [decoder_prefix] if decoder_prefix else []
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    name = next((n for n, m in model.named_modules() if m is embedding), None) if embedding is not None else None
    if name:
        prefixes.append(name)
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if parent and not any(t.startswith(parent + ".") for t in towers):
            prefixes.append(parent)
    return prefixes


def generates_from_images(model) -> bool:
    """Whether the model's generate (or forward) requires pixel_values: BLIP and BLIP-2 generate
    text from the image's embeddings, so a text-only prompt fails with a TypeError; Idefics
    cross-attends to the images at every step, and its forward raises a ValueError without them."""
    import inspect

    for method in (model.generate, model.forward):
        parameter = inspect.signature(method).parameters.get("pixel_values")
        if parameter is not None and parameter.default is inspect.Parameter.empty:
            return True
    # Idefics' forward raises without pixel values (or image embeddings): its gated
    # cross-attention blocks run at every step and need the image states.
    return runs_image_cross_attention(model)


def _quantized_terms(weight: int, records, quantization) -> dict[str, Any]:
    """A unit's quantization fields from the Held records of the modules inside it."""
    if not records:
        return {}
    terms: dict[str, Any] = {
        "offloadable": all(r.offloadable for r in records),
        "quant_prefill_transient": max(r.prefill_transient for r in records),
        "quant_token_transient": max(r.token_transient for r in records),
        "experts_token_transient": max(r.experts_token_transient for r in records),
    }
    if quantization is not None and quantization.origin == "load":
        # bitsandbytes' fp32-offload path leaves the modules of cpu/disk entries unquantized.
        terms["host_bytes"] = weight + sum(r.dense_bytes - r.quantized_bytes for r in records)
    return terms


def _runs_every_expert(layer_module) -> bool:
    """The layer's experts (the module holding 3-D expert weights) take the hidden states alone, no
    routing: they run every token through every expert (Llama4TextExperts' batched matmul)."""
    for module in layer_module.modules():
        if any(p.dim() == 3 for p in module.parameters(recurse=False)):
            return list(inspect.signature(module.forward).parameters) == ["hidden_states"]
    return False


def _expert_hidden_bytes(module) -> int:
    from planc.model.quant import held

    record = held(module)
    if record is None or not any(t.dim() == 3 for t in module.parameters(recurse=False)):
        return 0
    return record.hidden_bytes


# How each transformers TP style (transformers/distributed/tensor_parallel.py, the shard_param of
# its class) splits a parameter: the dimension, given the parameter's name and number of
# dimensions, or None for a replicated one. Styles absent here are refused, not guessed.
def _colwise(name: str, ndim: int):
    return ndim - 2 if ndim >= 2 else 0


def _rowwise(name: str, ndim: int):
    return None if name.endswith("bias") else ndim - 1


def _packed_rowwise(name: str, ndim: int):
    return None if ndim == 1 else ndim - 1


def _replicated(name: str, ndim: int):
    return None


TP_SHARD_DIM = {
    "colwise": _colwise,
    "colwise_gather_output": _colwise,
    "colwise_rep": _colwise,
    "packed_colwise": _colwise,
    "rowwise": _rowwise,
    "rowwise_rep": _rowwise,
    "rowwise_split_input": _rowwise,
    "packed_rowwise": _packed_rowwise,
    "embedding_rowwise": lambda name, ndim: 0,
    "embedding_colwise": lambda name, ndim: 1,
    "replicated_with_grad_allreduce": _replicated,
    "replicate": _replicated,
    "all_reduce": _replicated,
    "moe_tp_experts": _replicated,
    "moe_identity_expert": _replicated,
    "mla_kv_a_proj": _replicated,
    "local_params": _replicated,
    "sequence_parallel": _replicated,
}
# The collective a module style's forward ends with (transform_output_post_forward): rowwise
# outputs are partial sums all-reduced; gathered outputs are all-gathered; vocab-parallel
# embeddings all-reduce their masked lookups.
TP_COLLECTIVE = {
    "rowwise": "all_reduce",
    "rowwise_rep": "all_reduce",
    "rowwise_split_input": "all_reduce",
    "all_reduce": "all_reduce",
    "moe_tp_experts": "all_reduce",
    "embedding_rowwise": "all_reduce",
    "embedding_colwise": "all_gather",
    "colwise_gather_output": "all_gather",
    "colwise_rep": "all_gather",
}
QUERY_PROJECTIONS = ("q_proj", "q_b_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn")
KEY_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn")


def _parallel_support(model, units: tuple[Unit, ...], layer_prefix: str) -> tuple[tuple[Unit, ...], ParallelSupport]:
    """Units with their TP shards and collectives, and what TP and PP can run (both read on the meta model)."""

    tp_plan = bool(model.supports_tp_plan)
    expanded: dict[str, str] = {}
    if tp_plan and hasattr(model, "_expand_parallel_plan"):
        expanded = model._expand_parallel_plan(dict(model.tp_plan))
    parameters = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    hidden = getattr(model.config.get_text_config(decoder=True), "hidden_size", 0)
    unsized = sorted({style for style in expanded.values() if style not in TP_SHARD_DIM})
    shards: dict[str, list[tuple[int, int]]] = {}
    collectives: dict[str, list[tuple[str, int]]] = {}
    names = sorted((unit.name for unit in units), key=len, reverse=True)

    def owner(name: str) -> str | None:
        return next((u for u in names if u == "" or name == u or name.startswith(u + ".")), None)

    seen: set[int] = set()
    for name, style in expanded.items():
        unit = owner(name)
        if unit is None or style not in TP_SHARD_DIM:
            continue
        if name in parameters:
            tensor = parameters[name]
            dim = TP_SHARD_DIM[style](name, tensor.dim())
            if dim is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                shards.setdefault(unit, []).append((tensor.shape[dim], _tensor_bytes(tensor)))
        elif name in modules and style in TP_COLLECTIVE:
            module = modules[name]
            width = getattr(module, "out_features", None) or getattr(module, "embedding_dim", None) or hidden
            collectives.setdefault(unit, []).append((TP_COLLECTIVE[style], int(width)))
    units = tuple(
        replace(unit, tp_shards=tuple(shards.get(unit.name, ())), tp_collectives=tuple(collectives.get(unit.name, ())))
        for unit in units
    )
    modules_with = lambda suffixes: any(  # noqa: E731
        expanded.get(name) in ("colwise", "packed_colwise") and name.rsplit(".", 1)[-1] in suffixes
        for name in expanded
        if name in modules
    )
    return units, ParallelSupport(
        tp_plan=tp_plan,
        tp_unsized_styles=tuple(unsized),
        heads_sharded=modules_with(QUERY_PROJECTIONS),
        kv_heads_sharded=modules_with(KEY_PROJECTIONS),
        pp_refusal=_pp_refusal(model, layer_prefix),
        pp_units=_pp_units(model),
    )


def _pp_units(model) -> tuple[str, str, str]:
    prefix = model.base_model_prefix
    return (f"{prefix}.embed_tokens", f"{prefix}.norm", "lm_head")


def _pp_refusal(model, layer_prefix: str) -> str | None:
    """transformers' apply_pipeline_parallelism replaces `base_model.layers[i]`, `embed_tokens`, `norm` and
    `lm_head` by name; a model laid out otherwise cannot be split by it."""
    if runs_image_cross_attention(model):
        return (
            "transformers' pipeline split moves the decoder layers by index and knows nothing of the gated "
            "cross-attention blocks between them, nor of the image states each stage would need"
        )
    prefix = model.base_model_prefix
    base = getattr(model, prefix, None)
    missing = [
        f"{prefix}.{name}" for name in ("embed_tokens", "layers", "norm") if base is None or not hasattr(base, name)
    ]
    if not hasattr(model, "lm_head"):
        missing.append("lm_head")
    if missing:
        return (
            f"transformers' pipeline parallelism splits {prefix}.layers and moves {prefix}.embed_tokens, "
            f"{prefix}.norm and lm_head by name; {type(model).__name__} has no {', '.join(missing)}"
        )
    if layer_prefix != f"{prefix}.layers":
        return f"its decoder layers are {layer_prefix}.*, not {prefix}.layers.* where transformers' pipeline split looks"
    return None

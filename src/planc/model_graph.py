"""From a config to placement units: the model built on the meta device, cut where accelerate may cut it.

A unit is what one device_map entry places: a `_no_split_modules` block (a decoder layer), a
leaf module (embedding, norm, lm_head), or a module's own parameters. Units form a chain in
execution order (embeddings, layers, final norm, head); tied parameters add "tied" edges whose
ends must share a device. Bytes are exact: the model is built at the plan's dtype on meta and
every distinct tensor is counted once (fp32 rotary buffers stay fp32, tied weights once).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from planc.errors import ModelError, SpecError
from planc.files import JSON_LIMIT, parse_json, read_bytes

if TYPE_CHECKING:
    import networkx as nx

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Unit:
    """One device_map entry."""

    name: str
    weight_bytes: int
    kind: str  # "pre" (before the layers), "layer", "post" (after the layers)
    layer_index: int | None = None
    kv_bytes_per_token: int = 0  # one sequence, one token, this layer
    kv_window: int | None = None  # sliding-window layers keep at most this many tokens between steps
    moe: bool = False
    expert_bytes: int = 0  # routed-expert weights (fused 3-D parameters); a decode step reads only some
    row_bytes: int = 0  # an untied embedding table: a decode step reads one row per sequence, not the table


@dataclass(frozen=True)
class Shapes:
    """The config numbers the memory model needs."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # query/key head dim
    v_head_dim: int
    intermediate_size: int
    vocab_size: int
    num_layers: int
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    mla_latent_dim: int = 0  # kv_lora_rank + qk_rope_head_dim when the cache holds MLA latents


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

    @property
    def weight_bytes(self) -> int:
        return sum(unit.weight_bytes for unit in self.units)

    @property
    def is_moe(self) -> bool:
        return any(unit.moe for unit in self.units)

    def tied_unit_groups(self) -> list[set[str]]:
        """Sets of unit names that must share a device (connected by tied edges)."""
        import networkx as nx

        tied = nx.Graph()
        tied.add_edges_from((a, b) for a, b, kind in self.graph.edges(data="kind") if kind == "tied")
        return [set(group) for group in nx.connected_components(tied)]


@dataclass(frozen=True)
class ModelFiles:
    """What was found on disk for the model source."""

    config: dict[str, Any]
    config_sha256: str
    folder: Path | None  # holds weights when present
    weight_files: tuple[Path, ...]


def _resolve_hf_id(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except ValueError as exc:  # huggingface_hub's HFValidationError: not a repo id at all
        raise ModelError(f"model id {repo_id!r} is not a Hugging Face repo id: {exc}") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ModelError(
            f"model {repo_id!r} is not in the local Hugging Face cache (planc resolves ids offline); "
            f"download it first (huggingface-cli download {repo_id}) or point model.path at a folder"
        ) from None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def read_model_files(source, base_dir: Path) -> ModelFiles:
    """Locate config.json (and weights, if any) for a spec's or lock's model source."""
    if source.id:
        folder: Path | None = _resolve_hf_id(source.id, source.revision)
        config_path = folder / "config.json"
    elif source.path:
        folder = (base_dir / source.path).resolve()
        config_path = folder / "config.json"
    else:
        folder = None
        config_path = (base_dir / source.config).resolve()
    raw = read_bytes(config_path, "model config", ModelError, JSON_LIMIT)
    config = parse_json(raw, str(config_path), ModelError)
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{config_path}: not a transformers config (no model_type)")
    weights: tuple[Path, ...] = ()
    if folder is not None and folder.is_dir():
        weights = tuple(
            sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and "training_args" not in p.name)
        )
    return ModelFiles(config, "sha256:" + hashlib.sha256(raw).hexdigest(), folder, weights)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def checkpoint_dtype(config: dict[str, Any]) -> str | None:
    """The dtype the checkpoint was saved in, normalised, or None when the config does not say."""
    value = config.get("dtype") or config.get("torch_dtype")
    if isinstance(value, str):
        value = value.removeprefix("torch.")
        return value if value in DTYPE_BYTES else None
    return None


def make_config(config_dict: dict[str, Any], trust_remote_code: bool = False):
    """A transformers config object from a config.json dict (no files, no network)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    quant = config_dict.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise ModelError(
            f"quantized checkpoint ({method}): planc does not size {method} weights yet and will not plan them as "
            "if they were dense; plan a dense (bf16/fp16) release of this model instead"
        )
    model_type = config_dict["model_type"]
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelError(_unknown_model_type(config_dict, trust_remote_code))
    data = {k: v for k, v in config_dict.items() if k not in ("transformers_version",)}
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as exc:
        # StrictDataclassError: transformers' own field and class validators (huggingface_hub's
        # @strict), e.g. num_hidden_layers: -3.
        message = " ".join(str(exc).split())
        raise ModelError(f"config.json does not load in transformers ({model_type}): {message}") from None


def _unknown_model_type(config_dict: dict[str, Any], trust_remote_code: bool) -> str:
    """Why a model_type cannot be built, and the advice that is true for this planc."""
    import transformers

    model_type = config_dict["model_type"]
    head = f"model_type {str(model_type)[:60]!r} is unknown to the installed transformers {transformers.__version__}"
    if trust_remote_code:
        return f"{head}, and planc does not plan remote-code models"
    architectures = config_dict.get("architectures")
    shipped = [
        name for name in (architectures if isinstance(architectures, list) else [])
        if isinstance(name, str) and name.isidentifier() and _ships(transformers, name)
    ]
    if shipped:
        return (
            f"{head}; config.architectures names {shipped[0]}, which it ships, but planc resolves a model by "
            "model_type only, not by architectures"
        )
    return f"{head}: a newer transformers may know it (planc does not plan remote-code models)"


def _ships(transformers, name: str) -> bool:
    try:
        return getattr(transformers, name, None) is not None
    except Exception:  # noqa: BLE001 - a lazy import that fails means: not usable here
        return False


def _shapes(config) -> Shapes:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    get = lambda *names, default=0: next((getattr(text, n) for n in names if getattr(text, n, None) is not None), default)  # noqa: E731
    hidden = get("hidden_size")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads", default=heads)
    mla_rank = get("kv_lora_rank")
    if mla_rank:
        head_dim = get("qk_nope_head_dim") + get("qk_rope_head_dim")
        v_head_dim = get("v_head_dim", default=head_dim)
        mla_latent = mla_rank + get("qk_rope_head_dim")
    else:
        head_dim = get("head_dim", default=hidden // heads)
        v_head_dim = head_dim
        mla_latent = 0
    intermediate = get("intermediate_size", "n_inner", default=4 * hidden)
    num_experts = get("num_experts", "num_local_experts", "n_routed_experts")
    moe_intermediate = get("moe_intermediate_size", default=intermediate if num_experts else 0)
    shared = get("shared_expert_intermediate_size")
    if not shared and get("n_shared_experts"):
        shared = get("n_shared_experts") * moe_intermediate
    return Shapes(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        intermediate_size=intermediate,
        vocab_size=get("vocab_size"),
        num_layers=get("num_hidden_layers"),
        num_experts=num_experts,
        experts_per_token=get("num_experts_per_tok", "num_experts_per_token", "top_k") if num_experts else 0,
        moe_intermediate_size=moe_intermediate,
        shared_intermediate_size=shared,
        mla_latent_dim=mla_latent,
    )


def _layer_cache_kinds(config, num_layers: int) -> list[tuple[str, int | None]]:
    """Per layer: the cache kind transformers builds ("full", "sliding", "none") and its window."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    layer_types, kwargs = get_layer_types_and_kwargs(text)
    kinds = []
    for layer_type, layer_kwargs in zip(layer_types, kwargs):
        if layer_type == "full_attention":
            kinds.append(("full", None))
        elif layer_type in ("sliding_attention", "chunked_attention"):
            kinds.append(("sliding", int(layer_kwargs["sliding_window"])))
        elif layer_type == "dummy":
            kinds.append(("none", None))
        else:
            raise ModelError(f"layer type {layer_type!r} (linear/recurrent attention) is not sized by planc yet")
    if len(kinds) != num_layers:
        raise ModelError(f"config describes {len(kinds)} cache layers for {num_layers} decoder layers")
    return kinds


def kv_bytes_per_token(shapes: Shapes, dtype: str) -> int:
    """Cache bytes one token adds to one layer of one sequence, as transformers' DynamicCache stores it."""
    element = DTYPE_BYTES[dtype]
    if shapes.mla_latent_dim:
        # transformers 5 caches MLA's compressed latent and rotary key (one "head"), not per-head K/V.
        return shapes.mla_latent_dim * element
    return shapes.num_key_value_heads * (shapes.head_dim + shapes.v_head_dim) * element


def _tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def build_model_graph(config_dict: dict[str, Any], dtype: str, trust_remote_code: bool = False) -> ModelGraph:
    """Build the model on the meta device at `dtype` and cut it into placement units."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import find_tied_parameters
    from transformers import AutoModelForCausalLM

    config = make_config(config_dict, trust_remote_code)
    try:
        with init_empty_weights(include_buffers=True):
            model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        # The auto-class refusal goes on to list every config class it knows: keep the first sentence.
        reason = " ".join(str(exc).split()).split(". Model type should be one of")[0][:300]
        raise ModelError(f"transformers cannot build {config_dict.get('model_type')} as a causal LM: {reason}") from None
    shapes = _shapes(config)
    no_split = tuple(sorted(model._no_split_modules or ()))
    if not no_split:
        raise ModelError(f"{type(model).__name__} declares no _no_split_modules: planc cannot tell where it may cut it")
    output_embeddings = model.get_output_embeddings()

    # Tensors are shared when tied; count each once, on the first unit (execution order) that holds it.
    owners: dict[int, str] = {}
    raw_units: list[tuple[str, Any, list[Any]]] = []  # (name, module or None, direct tensors)

    def visit(prefix: str, module) -> None:
        splittable = type(module).__name__ not in no_split and any(True for _ in module.children())
        if not splittable:
            raw_units.append((prefix, module, list(module.parameters()) + list(module.buffers())))
            return
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in own:
            raw_units.append((f"{prefix}.{name}" if prefix else name, None, [tensor]))
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    layer_prefix = None
    for name, module, _ in raw_units:
        if module is not None and type(module).__name__ in no_split:
            layer_prefix = name.rsplit(".", 1)[0]
            break
    if layer_prefix is None:
        raise ModelError(f"{type(model).__name__}: no {', '.join(no_split)} block found")
    layer_names = [name for name, module, _ in raw_units if module is not None and type(module).__name__ in no_split]
    kinds = _layer_cache_kinds(config, len(layer_names))
    per_token = kv_bytes_per_token(shapes, dtype)

    def is_post(name: str, module) -> bool:
        # After the layers run only the final norm and the output head; rotary tables, position
        # embeddings and the like run before them even where they are defined after.
        if module is not None and module is output_embeddings:
            return True
        return module is not None and "norm" in type(module).__name__.lower() and not name.startswith(layer_prefix)

    tied_groups = tuple(tuple(sorted(group)) for group in find_tied_parameters(model))
    tied_names = {name for group in tied_groups for name in group}
    pre, layers, post = [], [], []
    layer_index = 0
    for name, module, tensors in raw_units:
        unique = [t for t in tensors if id(t) not in owners]
        for t in unique:
            owners[id(t)] = name
        if not tensors:
            continue  # parameter-free modules (dropout, activations) need no placement
        weight = sum(_tensor_bytes(t) for t in unique)
        if module is not None and type(module).__name__ in no_split:
            kind, window = kinds[layer_index]
            # transformers 5 stores routed experts as fused 3-D parameters.
            experts = sum(_tensor_bytes(t) for t in unique if t.dim() == 3)
            layers.append(
                Unit(name, weight, "layer", layer_index, 0 if kind == "none" else per_token, window, experts > 0, experts)
            )
            layer_index += 1
        elif is_post(name, module):
            post.append(Unit(name, weight, "post"))
        else:
            # An embedding's decode step reads one row per sequence, unless lm_head reads it whole.
            row = 0
            if isinstance(module, torch.nn.Embedding) and f"{name}.weight" not in tied_names:
                row = module.embedding_dim * module.weight.element_size()
            pre.append(Unit(name, weight, "pre", row_bytes=row))
    units = tuple(pre + layers + post)

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

    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # Some architectures (Gemma-2, gpt-oss) resolve to eager attention whatever we ask for.
    forced_attn = "eager" if getattr(model.config, "_attn_implementation", None) == "eager" else None
    skip = model._skip_keys_device_placement or ()
    skip_keys = (skip,) if isinstance(skip, str) else tuple(sorted(skip))
    return ModelGraph(
        architecture=type(model).__name__,
        model_type=config_dict["model_type"],
        dtype=dtype,
        units=units,
        graph=graph,
        no_split_module_classes=no_split,
        skip_keys=skip_keys,
        tied_parameters=tied_groups,
        parameters=parameters,
        shapes=shapes,
        checkpoint_dtype=checkpoint_dtype(config_dict),
        forced_attn_implementation=forced_attn,
    )


def check_model_source_exists(source, base_dir: Path) -> None:
    """Raise SpecError early when a local model path is missing (a spec mistake, not a model problem)."""
    if source.path and not (base_dir / source.path).is_dir():
        raise SpecError(f"model.path {source.path!r}: no such folder (relative to {base_dir.name or '.'}/)")
    if source.config and not (base_dir / source.config).is_file():
        raise SpecError(f"model.config {source.config!r}: no such file (relative to {base_dir.name or '.'}/)")

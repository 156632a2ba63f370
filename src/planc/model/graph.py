"""From a config to placement units: the model built on the meta device, cut where accelerate may cut it.

A unit is what one device_map entry places: a `_no_split_modules` block (a decoder layer), a
leaf module (embedding, norm, lm_head), or a module's own parameters. Units form a chain in
execution order (embeddings, layers, final norm, head); tied parameters add "tied" edges whose
ends must share a device. Bytes are exact: the model is built at the plan's dtype on meta and
every distinct tensor is counted once (fp32 rotary buffers stay fp32, tied weights once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from planc.errors import ModelError
from planc.model.build import meta_model
from planc.model.cache import LayerCache, layer_caches
from planc.model.config import Shapes, checkpoint_dtype, shapes_of

if TYPE_CHECKING:
    import networkx as nx


@dataclass(frozen=True)
class Unit:
    """One device_map entry."""

    name: str
    weight_bytes: int
    kind: str  # "pre" (before the layers), "layer", "post" (after the layers)
    layer_index: int | None = None
    cache: LayerCache | None = None  # what a decoder layer keeps between steps; None for other units
    moe: bool = False
    expert_bytes: int = 0  # routed-expert weights (fused 3-D parameters); a decode step reads only some
    row_bytes: int = 0  # an untied embedding table: a decode step reads one row per sequence, not the table


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


def _tensor_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def build_model_graph(config_dict: dict[str, Any], dtype: str, trust_remote_code: bool = False) -> ModelGraph:
    """Build the model on the meta device at `dtype` and cut it into placement units."""
    import torch
    from accelerate.utils import find_tied_parameters

    model = meta_model(config_dict, dtype, trust_remote_code)
    config = model.config
    shapes = shapes_of(config)
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
    caches = layer_caches(config, shapes, dtype)
    if len(caches) != len(layer_names):
        raise ModelError(f"config describes {len(caches)} cache layers for {len(layer_names)} decoder layers")

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
            # transformers 5 stores routed experts as fused 3-D parameters.
            experts = sum(_tensor_bytes(t) for t in unique if t.dim() == 3)
            layers.append(Unit(name, weight, "layer", layer_index, caches[layer_index], experts > 0, experts))
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

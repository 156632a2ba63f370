"""Pipeline parallelism: which decoder layers each stage runs, as the engine itself splits them.

transformers (`DistributedConfig(pp_size=N)`) splits by count: N - 1 stages of L // N layers, the
last one taking the remainder (`PipelineStage.layer_range_for_rank`, called here so the ledger is
transformers' split, not planc's); the first stage keeps the embedding, the last the final norm and
the head (and the embedding again when it is tied); every other module stays on every stage.
vLLM spreads the remainder over the stages before the last (`vllm/distributed/utils.py:
get_pp_indices`); planc pins its split with VLLM_PP_LAYER_PARTITION when it exports one.
"""

from __future__ import annotations

from types import SimpleNamespace

from planc.model import ModelGraph


def transformers_stage_ranges(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """[start, end) of the layers each pipeline rank owns, by transformers' own function."""
    from transformers.distributed.pipeline_parallel import PipelineStage

    stage = SimpleNamespace(pp_size=stages)
    return [PipelineStage.layer_range_for_rank(stage, rank, num_layers) for rank in range(stages)]


def vllm_stage_ranges(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """vLLM's default split (get_pp_indices): the remainder goes to the stages before the last, one each."""
    counts = [num_layers // stages] * stages
    for i in range(2, num_layers % stages + 2):
        counts[-i] += 1
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def stage_ranges(num_layers: int, stages: int, engine: str) -> list[tuple[int, int]]:
    if stages == 1:
        return [(0, num_layers)]
    return transformers_stage_ranges(num_layers, stages) if engine == "transformers" else vllm_stage_ranges(num_layers, stages)


def pp_refusal(graph: ModelGraph, stages: int, engine: str = "transformers") -> str | None:
    """Why the model cannot be split into `stages` pipeline stages (None when it can)."""
    layers = graph.shapes.num_layers
    if engine == "transformers":
        support = graph.parallel
        if support is None or support.pp_refusal:
            return support.pp_refusal if support else "no pipeline layout known for this model"
    if layers < stages:
        return f"{layers} decoder layers cannot fill {stages} pipeline stages"
    if engine == "transformers" and layers // stages == 0:
        return f"transformers' even split gives the first stages no layer ({layers} layers, {stages} stages)"
    return None


def stage_units(graph: ModelGraph, ranges: list[tuple[int, int]], stage: int, engine: str) -> list[str]:
    """Names of the units a stage holds, in execution order."""
    start, end = ranges[stage]
    first, last = stage == 0, stage == len(ranges) - 1
    embed, norm, head = graph.parallel.pp_units if graph.parallel else ("", "", "")
    tied = any(embed in group or any(name.startswith(embed + ".") for name in group) for group in graph.tied_parameters)
    names = []
    for unit in graph.units:
        if unit.kind == "layer":
            if start <= unit.layer_index < end:
                names.append(unit.name)
        elif unit.name == embed:
            if first or (last and tied):
                names.append(unit.name)
        elif unit.name in (norm, head):
            if last:
                names.append(unit.name)
        elif unit.kind == "post" and not last and engine == "vllm":
            continue  # vLLM builds the final norm and head on the last stage only
        else:
            names.append(unit.name)  # rotary tables and the like: every stage has them
    return names

"""A distributed layout (tensor x pipeline ranks over GPUs and nodes) and the memory ledger of each rank.

Every rank runs one process on one device. A rank holds its pipeline stage's units (all of them
without PP), split by tensor parallelism (planc.parallel.tensor); its ledger is the single-process
ledger's terms (planc.memory: weights, KV cache, activations, reserve) over that rank view, plus
the communication buffers the collectives add: a vocab-parallel embedding's all-reduce output,
a gathered head's local logits shard, NCCL's communicator on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from planc.memory import (
    NCCL_COMMUNICATOR,
    Load,
    Reserve,
    logits_bytes,
    reserve_bytes,
    unit_costs,
)
from planc.model import DTYPE_BYTES, ModelGraph
from planc.model.attention import mask_bytes
from planc.model.cache import FALLBACK
from planc.parallel.pipeline import stage_ranges, stage_units
from planc.parallel.tensor import rank_graph
from planc.workload import Workload


@dataclass(frozen=True)
class RankSlot:
    """Where one rank runs."""

    rank: int
    node: int
    device: int | str  # CUDA index on its node, or "cpu" for a CPU rank
    stage: int  # pipeline stage
    capacity: int
    headroom: int
    bandwidth: int  # memory bandwidth of the device, bytes/s
    backend: str  # attention backend its layers run with
    gpu: bool


@dataclass(frozen=True)
class Layout:
    """tp x pp ranks: stage s holds ranks s*tp .. s*tp + tp - 1 (one TP group per stage, on one node)."""

    engine: str  # "transformers" or "vllm"
    tp: int
    pp: int
    stages: tuple[tuple[int, int], ...]  # [start, end) of the layers of each stage
    ranks: tuple[RankSlot, ...]

    @property
    def strategy(self) -> str:
        if self.tp > 1 and self.pp > 1:
            return "tensor x pipeline"
        return "tensor" if self.tp > 1 else "pipeline"

    def stage_ranks(self, stage: int) -> tuple[RankSlot, ...]:
        return tuple(slot for slot in self.ranks if slot.stage == stage)


@dataclass(frozen=True)
class RankLedger:
    """One rank's memory, bytes."""

    slot: RankSlot
    reserve: int
    weights: int
    kv_cache: int
    activations: int
    communication: int
    units: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.reserve + self.weights + self.kv_cache + self.activations + self.communication

    @property
    def free(self) -> int:
        return self.slot.capacity - self.slot.headroom - self.total


def make_layout(graph: ModelGraph, engine: str, tp: int, pp: int, slots: list[RankSlot]) -> Layout:
    """Assign stages to `slots` (tp per stage, in order) with the engine's layer split."""
    ranges = tuple(stage_ranges(graph.shapes.num_layers, pp, engine))
    ranks = tuple(
        RankSlot(i, s.node, s.device, i // tp, s.capacity, s.headroom, s.bandwidth, s.backend, s.gpu)
        for i, s in enumerate(slots[: tp * pp])
    )
    return Layout(engine, tp, pp, ranges, ranks)


def rank_view(graph: ModelGraph, layout: Layout, stage: int) -> tuple[ModelGraph, list[str]]:
    """The stage's units as one of its TP ranks holds them."""
    names = stage_units(graph, list(layout.stages), stage, layout.engine)
    return rank_graph(graph, layout.tp, layout.engine), names


def communication_bytes(graph: ModelGraph, names: list[str], layout: Layout, workload: Workload, gpu: bool) -> int:
    """Buffers the collectives of these units allocate beyond the ledger's activations.

    Linear and expert all-reduces run in place (transformers' local inference path: dist.all_reduce
    on the output); a vocab-parallel embedding's all-reduce goes through a DTensor redistribute that
    allocates its output; an all-gathered head keeps its local shard next to the gathered logits
    (which the ledger's logits term already holds).
    """
    if layout.tp == 1:
        return NCCL_COMMUNICATOR if gpu else 0
    e = DTYPE_BYTES[graph.dtype]
    b, t = workload.batch_size, workload.step_tokens
    largest = 0
    last = graph.logits_unit
    wanted = set(names)
    for unit in graph.units:
        if unit.name not in wanted:
            continue
        for kind, width in unit.tp_collectives:
            # generate keeps the last position's logits only, where the forward takes logits_to_keep.
            tokens = 1 if unit.name == last and not graph.logits_every_position else t
            if kind == "all_gather":
                largest = max(largest, b * tokens * -(-width // layout.tp) * e)
            elif unit.kind == "pre":
                largest = max(largest, b * tokens * width * e)
    return largest + (NCCL_COMMUNICATOR if gpu else 0)


def rank_ledgers(
    graph: ModelGraph, layout: Layout, workload: Workload, reserve: Reserve, mixer_path: str = FALLBACK
) -> list[RankLedger]:
    """The ledger of every rank of the layout (ranks of one stage are identical up to their device).

    Linear-attention / SSM mixers run on `mixer_path`; their states and transients are not divided
    by the TP size (transformers' TP plans gather those projections' outputs, e.g. Qwen3-Next's
    `colwise_gather_output`, so each rank runs the whole mixer)."""
    ledgers = []
    for stage in range(layout.pp):
        view, names = rank_view(graph, layout, stage)
        for slot in layout.stage_ranks(stage):
            costs = unit_costs(view, workload, [slot.backend], mixer_path)[slot.backend]
            # Every rank runs the model's forward itself, so each builds its own attention masks.
            stage_layers = [unit for unit in view.units if unit.name in set(names)]
            held, _, building = mask_bytes(stage_layers, workload, slot.backend, view.dtype)
            load = Load(executes=True, mask=held, main=True, mask_build=building)
            for name in names:
                load.add(costs[name])
            if stage < layout.pp - 1:
                # Every stage receives the logits the last one computes (transformers broadcasts them
                # so that generate runs on every rank) and keeps generate's fp32 copy.
                load.logits = max(load.logits, logits_bytes(view.shapes, workload, view.dtype, view.logits_every_position))
            activations = load.activations(view.shapes, workload, view.dtype)
            communication = communication_bytes(view, names, layout, workload, slot.gpu)
            reserve_total = reserve_bytes(reserve, load.kv_cache, activations + communication, 0, slot.gpu)
            ledgers.append(
                RankLedger(slot, reserve_total, load.weights, load.kv_cache, activations, communication, tuple(names))
            )
    return ledgers

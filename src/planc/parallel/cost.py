"""Predicted decode time per token of a distributed layout, collectives included.

Memory-bound like the single-process estimate (planc.memory.decode_read_bytes over the device's
bandwidth): a stage takes as long as its slowest TP rank reading its share, stages run one after
another (no micro-batches in transformers' PP, none needed at decode), and the collectives add
their latency and bytes over the link they run on:
- per TP group, every collective its units make (2 all-reduces per dense decoder layer, one for
  the embedding, one all-gather of the logits), each over planc.parallel.topology's group link;
- per pipeline boundary, one send of the hidden states (batch x hidden), over NVLink/PCIe within
  a node or the network between nodes; transformers then broadcasts the logits from the last
  stage to every rank, vLLM only the sampled token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from planc.hardware import Inventory
from planc.memory import decode_read_bytes
from planc.model import DTYPE_BYTES, ModelGraph
from planc.parallel.ranks import Layout, rank_view
from planc.parallel.topology import Link, group_link, network_link
from planc.workload import Workload


@dataclass(frozen=True)
class DecodeCost:
    """Seconds per decode step, by part."""

    weights: float  # reading weights and KV cache, summed over stages
    collectives: float  # TP all-reduces and all-gathers
    pipeline: float  # stage-to-stage sends and the logits broadcast

    @property
    def total(self) -> float:
        return self.weights + self.collectives + self.pipeline

    def describe(self) -> str:
        parts = [f"reads {self.weights * 1e3:.2f} ms"]
        if self.collectives:
            parts.append(f"collectives {self.collectives * 1e3:.2f} ms")
        if self.pipeline:
            parts.append(f"stage hand-offs {self.pipeline * 1e3:.2f} ms")
        return " + ".join(parts)


def _link_between(inventory: Inventory, a, b) -> Link:
    nodes = inventory.all_nodes()
    if a.node != b.node:
        return network_link(inventory.network)
    node = nodes[a.node]
    members = tuple(sorted({a.device, b.device})) if isinstance(a.device, int) else (0,)
    return group_link(node, members)


def tp_group_link(inventory: Inventory, layout: Layout, stage: int) -> Link:
    slots = layout.stage_ranks(stage)
    node = inventory.all_nodes()[slots[0].node]
    members = tuple(slot.device for slot in slots) if slots[0].gpu else tuple(range(len(slots)))
    return group_link(node, members)


def layout_decode_cost(graph: ModelGraph, layout: Layout, inventory: Inventory, workload: Workload) -> DecodeCost:
    """Decode seconds per token of `layout` at the workload's batch (one token per sequence per step)."""
    e = DTYPE_BYTES[graph.dtype]
    b = workload.batch_size
    reads = collectives = 0.0
    for stage in range(layout.pp):
        view, names = rank_view(graph, layout, stage)
        units = {unit.name: unit for unit in view.units}
        slowest = 0.0
        for slot in layout.stage_ranks(stage):
            nbytes = sum(decode_read_bytes(units[name], view.shapes, workload) for name in names)
            slowest = max(slowest, nbytes / slot.bandwidth)
        reads += slowest
        if layout.tp > 1:
            link = tp_group_link(inventory, layout, stage)
            for name in names:
                for kind, width in units[name].tp_collectives:
                    size = b * width * e
                    if kind == "all_reduce":
                        collectives += link.all_reduce_seconds(layout.tp, size)
                    else:
                        collectives += link.all_gather_seconds(layout.tp, size)
    pipeline = 0.0
    if layout.pp > 1:
        hidden = b * graph.shapes.hidden_size * e
        for stage in range(layout.pp - 1):
            sender, receiver = layout.stage_ranks(stage)[0], layout.stage_ranks(stage + 1)[0]
            pipeline += _link_between(inventory, sender, receiver).send_seconds(hidden)
        if layout.engine == "transformers":
            # broadcast_from_last: a shape message, then the logits, from the last rank to all.
            first, last = layout.ranks[0], layout.ranks[-1]
            link = _link_between(inventory, first, last)
            logits = b * graph.shapes.vocab_size * e
            pipeline += 2 * link.base_s + (layout.pp - 1) * link.hop_s + logits / link.bandwidth
    return DecodeCost(reads, collectives, pipeline)

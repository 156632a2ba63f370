"""GPU catalogue (data/gpus.yaml) and the resolution of a spec's hardware into an inventory.

The inventory's `gpus`, `cpu_memory` and `disk` are the first node's: what one process (an
accelerate device_map) can use, and what the single-node solver works on. `nodes` lists every
node, the first included, with its links (`hardware.interconnect`); `network` joins them. The
strategy layer (planc.parallel) reads those to plan ranks across GPUs and nodes.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from planc.errors import SpecError
from planc.units import parse_bandwidth, parse_size


@dataclass(frozen=True)
class GpuModel:
    """One catalogue entry."""

    key: str
    name: str
    aliases: tuple[str, ...]
    memory: int
    compute_capability: str
    bandwidth: int
    tflops_16bit: float | None
    source: str


@dataclass(frozen=True)
class Gpu:
    """One planned GPU."""

    index: int
    name: str
    memory: int
    compute_capability: str
    bandwidth: int
    catalogue: str | None = None

    @property
    def capability(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    @property
    def sm(self) -> int:
        """Compute capability as the sm number (7.5 -> 75)."""
        major, minor = self.capability
        return major * 10 + minor


@dataclass(frozen=True)
class Node:
    """One machine: its GPUs (CUDA order), RAM, offload folder and the links between its GPUs."""

    index: int
    gpus: tuple[Gpu, ...]
    cpu_memory: int
    disk: str | None
    # Per-pair link codes as `nvidia-smi topo -m` writes them (X, NV18, PIX, SYS, ...); None when
    # the spec does not say, which the strategy layer reads as PCIe.
    links: tuple[tuple[str, ...], ...] | None = None
    interconnect: str | None = None  # the spec's shorthand (nvswitch, nvlink, pcie), when it used one
    cpu_ranks: int | None = None  # CPU-only node: ranks a distributed plan runs here


@dataclass(frozen=True)
class Network:
    """Between nodes: bandwidth per node and direction (bytes/s), latency of one message (ns)."""

    bandwidth: int
    latency_ns: int


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    cpu_memory: int
    disk: str | None
    nodes: tuple[Node, ...] = ()  # every node, the first being gpus/cpu_memory/disk above
    network: Network | None = None

    def all_nodes(self) -> tuple[Node, ...]:
        """The nodes; an inventory built without them is its own single node."""
        return self.nodes or (Node(0, self.gpus, self.cpu_memory, self.disk),)


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@lru_cache(maxsize=1)
def load_catalogue() -> tuple[GpuModel, ...]:
    """The bundled GPU catalogue."""
    raw = yaml.safe_load(resources.files("planc").joinpath("data/gpus.yaml").read_text())
    return tuple(
        GpuModel(
            key=entry["key"],
            name=entry["name"],
            aliases=tuple(entry.get("aliases", ())),
            memory=parse_size(entry["memory"]),
            compute_capability=str(entry["compute_capability"]),
            bandwidth=parse_bandwidth(entry["bandwidth"]),
            tflops_16bit=entry.get("tflops_16bit"),
            source=entry["source"],
        )
        for entry in raw["gpus"]
    )


def _spellings(model: GpuModel) -> set[str]:
    # Old drivers drop the "NVIDIA " prefix from GeForce names; accept both spellings.
    names = (model.name, model.key, *model.aliases, model.name.removeprefix("NVIDIA "))
    return {_normalise(n) for n in names}


def lookup_gpu(text: str) -> GpuModel:
    """Find a catalogue entry by exact driver name, key or alias (case and punctuation ignored).

    Raises SpecError naming the closest entries when nothing matches, and the keys to choose from
    when a driver name is shared by variants (the RTX 3080 is sold with 10 and 12 GB).
    """
    wanted = _normalise(text)
    found = [model for model in load_catalogue() if wanted in _spellings(model)]
    if len(found) == 1:
        return found[0]
    if found:
        choices = ", ".join(f"{m.key} ({m.memory / 2**30:.1f} GiB)" for m in found)
        raise SpecError(f"GPU type {text!r} names {len(found)} cards with the same driver name: give one of {choices}")
    choices = {}
    for model in load_catalogue():
        for n in (model.name, model.key, *model.aliases):
            choices[_normalise(n)] = f"{model.key} ({model.name})"
    close = difflib.get_close_matches(wanted, list(choices), n=3, cutoff=0.5)
    hint = ", ".join(dict.fromkeys(choices[c] for c in close)) or "see `planc gpus`"
    raise SpecError(f"unknown GPU type {text!r}; closest: {hint}")


def match_driver_name(name: str, memory: int) -> GpuModel | None:
    """The entry for a card the driver reports as `name` with `memory` bytes: among the entries of
    that driver name, the one closest in memory, and none when even that one is more than 10%
    off (a variant planc does not catalogue, such as the 8 GB RTX 4060 Ti)."""
    wanted = _normalise(name)
    candidates = [model for model in load_catalogue() if wanted in _spellings(model)]
    if not candidates:
        return None
    best = min(candidates, key=lambda model: abs(model.memory - memory))
    return best if abs(best.memory - memory) <= best.memory // 10 else None


def _resolve_gpus(entries) -> tuple[Gpu, ...]:
    gpus: list[Gpu] = []
    for entry in entries:
        for _ in range(entry.count):
            if hasattr(entry, "type"):
                model = lookup_gpu(entry.type)
                gpu = Gpu(len(gpus), model.name, model.memory, model.compute_capability, model.bandwidth, model.key)
            else:
                gpu = Gpu(len(gpus), entry.name, entry.memory, entry.compute_capability, entry.bandwidth, None)
            gpus.append(gpu)
    return tuple(gpus)


def _resolve_node(index: int, node) -> Node:
    gpus = _resolve_gpus(node.gpus)
    where = "hardware" if index == 0 else f"hardware.nodes.{index}"
    if node.cpu_ranks is not None and gpus:
        raise SpecError(f"{where}.cpu_ranks: only for a CPU-only node (this one has {len(gpus)} GPUs: one rank each)")
    links = None
    shorthand = None
    if isinstance(node.interconnect, str):
        shorthand = node.interconnect
    elif node.interconnect is not None:
        links = tuple(tuple(row) for row in node.interconnect.links)
        if len(links) != len(gpus):
            raise SpecError(
                f"{where}.interconnect.links: a {len(links)} x {len(links)} matrix for {len(gpus)} GPUs"
            )
    return Node(index, gpus, node.cpu_memory, node.disk, links, shorthand, node.cpu_ranks)


def resolve_inventory(hardware) -> Inventory:
    """Turn a spec's `hardware` into numbered GPUs per node (catalogue entries looked up, counts expanded)."""
    nodes = tuple(_resolve_node(i, node) for i, node in enumerate(hardware.node_list()))
    network = hardware.network
    first = nodes[0]
    return Inventory(
        gpus=first.gpus,
        cpu_memory=first.cpu_memory,
        disk=first.disk,
        nodes=nodes,
        network=Network(network.bandwidth, network.latency) if network is not None else None,
    )

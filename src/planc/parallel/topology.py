"""How ranks reach each other: NVLink islands within a node, PCIe, the network between nodes, and what
a collective costs over each (data/interconnect.yaml holds the numbers, with their sources).

A node's links come from the spec: a shorthand (nvswitch, nvlink, pcie) or the per-pair matrix that
`nvidia-smi topo -m` prints (`planc detect` writes it). Unset means PCIe: planc does not plan tensor
parallelism on links it was not told about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from planc.errors import SpecError
from planc.hardware import Gpu, Network, Node
from planc.units import parse_bandwidth, parse_duration

INTERCONNECT_SOURCE = "planc interconnect facts (src/planc/data/interconnect.yaml)"


@dataclass(frozen=True)
class Link:
    """What a collective among some ranks runs over: bandwidth per direction and per-message latency."""

    kind: str  # "nvlink", "pcie", "host" (gloo between CPU processes), "network" (between nodes)
    bandwidth: int  # bytes/s per direction available to each rank
    base_s: float  # latency of one collective, before hops
    hop_s: float  # latency added per hop of a ring

    def all_reduce_seconds(self, ranks: int, nbytes: int) -> float:
        """Ring all-reduce: 2 (n - 1) hops, each rank sends and receives 2 (n - 1) / n of the buffer."""
        if ranks <= 1:
            return 0.0
        return self.base_s + 2 * (ranks - 1) * self.hop_s + 2 * (ranks - 1) / ranks * nbytes / self.bandwidth

    def all_gather_seconds(self, ranks: int, nbytes: int) -> float:
        """Ring all-gather of a buffer of `nbytes` in total: n - 1 hops, (n - 1) / n of it received."""
        if ranks <= 1:
            return 0.0
        return self.base_s + (ranks - 1) * self.hop_s + (ranks - 1) / ranks * nbytes / self.bandwidth

    def send_seconds(self, nbytes: int) -> float:
        """One point-to-point message (a pipeline stage handing its hidden states on)."""
        return self.base_s + self.hop_s + nbytes / self.bandwidth

    def describe(self) -> str:
        return f"{self.kind} {self.bandwidth / 1e9:.0f} GB/s, {self.base_s * 1e6:.0f} us + {self.hop_s * 1e6:.1f} us/hop"


@lru_cache(maxsize=1)
def facts() -> dict:
    """The interconnect data file, sizes and durations parsed."""
    raw = yaml.safe_load(resources.files("planc").joinpath("data/interconnect.yaml").read_text())
    nvlink, pcie, host = raw["nvlink"], raw["pcie"], raw["host"]

    def latency(entry):
        return parse_duration(entry["base"]) / 1e9, parse_duration(entry["per_hop"]) / 1e9

    return {
        "nvlink_link": {str(cc): parse_bandwidth(bw) for cc, bw in nvlink["link_bandwidth"].items()},
        "nvlink_links": dict(nvlink["links"]),
        "nvlink_latency": latency(nvlink["latency"]),
        "pcie_generation": {str(cc): gen for cc, gen in pcie["generation"].items()},
        "pcie_bandwidth": {int(gen): parse_bandwidth(bw) for gen, bw in pcie["bandwidth"].items()},
        "pcie_latency": latency(pcie["latency"]),
        "host_bandwidth": parse_bandwidth(host["bandwidth"]),
        "host_latency": latency(host["latency"]),
    }


def nvlink_links(gpu: Gpu) -> int:
    """NVLinks of a catalogued card (0 when it has none or is not catalogued)."""
    return int(facts()["nvlink_links"].get(gpu.catalogue or "", 0))


def nvlink_link_bandwidth(gpu: Gpu) -> int:
    table = facts()["nvlink_link"]
    return table.get(gpu.compute_capability) or table[max(table, key=lambda cc: tuple(map(int, cc.split("."))))]


def pcie_bandwidth(gpu: Gpu) -> int:
    generation = facts()["pcie_generation"].get(gpu.compute_capability, 4)
    return facts()["pcie_bandwidth"][generation]


_NV = re.compile(r"^NV(\d+)$")


def pair_links(node: Node) -> list[list[int]]:
    """NVLinks between each pair of the node's GPUs (0 = PCIe only), from the matrix or the shorthand."""
    gpus = node.gpus
    n = len(gpus)
    if node.links is not None:
        return [[int(m.group(1)) if (m := _NV.match(code)) else 0 for code in row] for row in node.links]
    if node.interconnect in ("nvlink", "nvswitch"):
        lacking = [gpu for gpu in gpus if not nvlink_links(gpu)]
        if lacking:
            names = ", ".join(f"GPU {gpu.index} ({gpu.name})" for gpu in lacking)
            where = "hardware" if node.index == 0 else f"hardware.nodes.{node.index}"
            raise SpecError(f"{where}.interconnect: {node.interconnect}, but {names} has no NVLink in planc's catalogue")
        if node.interconnect == "nvswitch":
            # Through the switch every pair can use all of a card's links.
            return [[0 if i == j else min(nvlink_links(gpus[i]), nvlink_links(gpus[j])) for j in range(n)] for i in range(n)]
        # Bridged or meshed: a card's links are shared among its peers (recorded per pair, rounded down).
        return [
            [0 if i == j else max(1, min(nvlink_links(gpus[i]), nvlink_links(gpus[j])) // max(1, n - 1)) for j in range(n)]
            for i in range(n)
        ]
    return [[0] * n for _ in range(n)]


def nvlink_islands(node: Node) -> list[tuple[int, ...]]:
    """Largest sets of the node's GPUs joined pairwise by NVLink, in index order (largest first)."""
    links = pair_links(node)
    n = len(links)
    islands: list[tuple[int, ...]] = []
    # Greedy cliques from each GPU in index order: NVLink topologies are switches or small meshes,
    # where this finds the maximal groups exactly.
    for start in range(n):
        group = [start]
        for other in range(start + 1, n):
            if all(links[member][other] for member in group):
                group.append(other)
        if len(group) > 1 and not any(set(group) <= set(island) for island in islands):
            islands.append(tuple(group))
    return sorted(islands, key=lambda island: (-len(island), island))


def group_link(node: Node, members: tuple[int, ...]) -> Link:
    """The link a collective among `members` (GPU indices of one node) runs over.

    All pairs on NVLink: each rank's bus bandwidth is its links to the other members (capped by the
    links it has) at its generation's per-link rate, the slowest member setting the pace. Otherwise
    PCIe at the slowest member's slot.
    """
    if node.cpu_ranks or not node.gpus:
        base, hop = facts()["host_latency"]
        return Link("host", facts()["host_bandwidth"], base, hop)
    links = pair_links(node)
    gpus = node.gpus
    if len(members) > 1 and all(links[a][b] for a in members for b in members if a != b):
        per_rank = []
        for a in members:
            peers = sum(links[a][b] for b in members if b != a)
            own = nvlink_links(gpus[a]) or max(links[a])
            per_rank.append(min(own, peers) * nvlink_link_bandwidth(gpus[a]))
        base, hop = facts()["nvlink_latency"]
        return Link("nvlink", min(per_rank), base, hop)
    base, hop = facts()["pcie_latency"]
    return Link("pcie", min(pcie_bandwidth(gpus[a]) for a in members), base, hop)


def network_link(network: Network | None) -> Link:
    """Between nodes: one message costs the network's latency plus bytes over its bandwidth."""
    if network is None:
        raise SpecError("hardware.network: required with several nodes (bandwidth per node, latency between nodes)")
    return Link("network", network.bandwidth, network.latency_ns / 1e9, 0.0)


def describe_node(node: Node) -> str:
    """One phrase for decisions: how the node's GPUs are linked."""
    if not node.gpus:
        return f"{node.cpu_ranks or 1} CPU rank(s)"
    islands = nvlink_islands(node)
    if not islands:
        return f"{len(node.gpus)} GPUs on PCIe" + ("" if node.links or node.interconnect else " (no interconnect given)")
    best = islands[0]
    link = group_link(node, best)
    return f"NVLink island of {len(best)} GPUs ({', '.join(map(str, best))}; {link.bandwidth / 1e9:.0f} GB/s per rank)"

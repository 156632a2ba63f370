"""Which strategies a spec allows, what each costs per token, and the one the plan takes.

Strategies (policy.parallelism):
- device_map: accelerate's layer split in one process on the first node (planc.solver);
- tensor: transformers TP (`DistributedConfig(tp_size=N)`) over one node's NVLink/NVSwitch island
  (`auto` never plans it over PCIe; `tensor` does, on request), only at sizes the heads divide;
- pipeline: transformers PP (`pp_size=N`), one rank per GPU across every node, layers split by
  transformers' own even split;
- tensor x pipeline: TP within each node and PP across nodes, which transformers 5.23 cannot run
  (apply_tensor_parallelism fails with both): planned for vLLM and run through `planc export --to vllm`.
`auto` takes the fastest predicted strategy that fits, preferring what `planc run` executes
(accelerate, transformers) over what only vLLM runs, and fewer processes on ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from planc.errors import InfeasibleError
from planc.hardware import Inventory
from planc.memory import CPU_BANDWIDTH, Reserve
from planc.model import ModelGraph
from planc.model.cache import FALLBACK
from planc.parallel.cost import DecodeCost, layout_decode_cost
from planc.parallel.pipeline import pp_refusal
from planc.parallel.ranks import Layout, RankLedger, RankSlot, make_layout, rank_ledgers
from planc.parallel.tensor import tp_refusal
from planc.parallel.topology import describe_node, nvlink_islands
from planc.units import GiB
from planc.workload import Workload

# vLLM's CUDA wheels are built for compute capability 7.5 and newer (no Volta).
VLLM_MIN_CAPABILITY = (7, 5)
STRATEGY_SOURCE = "planc strategy layer (src/planc/parallel/)"


@dataclass(frozen=True)
class Candidate:
    """One strategy at one size, with its predicted decode time or the reason it cannot be planned."""

    strategy: str  # device_map | tensor | pipeline | tensor x pipeline
    engine: str  # accelerate | transformers | vllm
    tp: int
    pp: int
    cost: DecodeCost | None = None
    refusal: str | None = None
    layout: Layout | None = None
    ledgers: tuple[RankLedger, ...] = ()
    placement: object = None  # (the solver's Placement, prefill chunk), for device_map
    chunk: int | None = None  # prefill chunk the ranks' activations were planned for

    @property
    def fits(self) -> bool:
        return self.refusal is None and self.cost is not None

    @property
    def label(self) -> str:
        sizes = {
            "device_map": "device_map",
            "tensor": f"tensor {self.tp}",
            "pipeline": f"pipeline {self.pp}",
            "tensor x pipeline": f"tensor {self.tp} x pipeline {self.pp}",
        }
        return f"{sizes[self.strategy]} ({self.engine})"

    @property
    def ms(self) -> float | None:
        return None if self.cost is None else self.cost.total * 1000


def rank_slots(inventory: Inventory, runtime, headroom: float) -> list[RankSlot]:
    """One slot per GPU of every node (CUDA order, node by node); a CPU-only node gives its cpu_ranks."""
    slots: list[RankSlot] = []
    forced_eager = runtime.attn_implementation == "eager"
    for node in inventory.all_nodes():
        if node.gpus:
            for gpu in node.gpus:
                backend = "eager" if forced_eager else runtime.backend_per_gpu.get(gpu.index, "math")
                slots.append(RankSlot(len(slots), node.index, gpu.index, 0, gpu.memory, int(gpu.memory * headroom),
                                      gpu.bandwidth, backend, True))
        else:
            count = node.cpu_ranks or 1
            for _ in range(count):
                slots.append(RankSlot(len(slots), node.index, "cpu", 0, node.cpu_memory // count, 0,
                                      CPU_BANDWIDTH, "eager" if forced_eager else "cpu", False))
    return slots


def _describe(ledger: RankLedger) -> str:
    g = lambda n: f"{n / GiB:.1f}"  # noqa: E731
    slot = ledger.slot
    where = f"GPU {slot.device}" if slot.gpu else "CPU"
    node = f" on node {slot.node}" if slot.node else ""
    return (
        f"rank {slot.rank} ({where}{node}) needs {g(ledger.total)} GiB (weights {g(ledger.weights)} + KV "
        f"{g(ledger.kv_cache)} + activations {g(ledger.activations)} + communication {g(ledger.communication)} + "
        f"reserve {g(ledger.reserve)}), has {g(slot.capacity - slot.headroom)} GiB"
    )


def evaluate_layout(strategy: str, graph: ModelGraph, layout: Layout, inventory: Inventory,
                    workloads: list[Workload], reserve: Reserve, mixer_path: str = FALLBACK) -> Candidate:
    """Ledger every rank at each prefill chunking in turn (whole prompt first); the first that fits
    wins, else the layout is refused naming its worst rank."""
    candidate = None
    for workload in workloads:
        ledgers = tuple(rank_ledgers(graph, layout, workload, reserve, mixer_path))
        cost = layout_decode_cost(graph, layout, inventory, workload)
        over = [ledger for ledger in ledgers if ledger.free < 0]
        refusal = None
        if over:
            worst = min(over, key=lambda ledger: ledger.free)
            layers = layout.stages[worst.slot.stage]
            split = f", layers {layers[0]}-{layers[1] - 1} of {graph.shapes.num_layers}" if layout.pp > 1 else ""
            refusal = f"{len(over)} of {len(ledgers)} ranks over budget; {_describe(worst)}{split}"
        candidate = Candidate(strategy, layout.engine, layout.tp, layout.pp, cost, refusal, layout, ledgers,
                              chunk=workload.prefill_chunk_size)
        if refusal is None:
            return candidate
    return candidate


def _tensor_candidates(graph, inventory, slots, spec, workloads, reserve, mixer_path) -> list[Candidate]:
    policy = spec.policy.parallelism
    node = inventory.all_nodes()[0]
    node_slots = [slot for slot in slots if slot.node == 0]
    if node.gpus:
        islands = nvlink_islands(node)
        island = islands[0] if islands else ()
        if policy == "tensor" and len(island) < len(node.gpus):
            island = tuple(range(len(node.gpus)))  # asked for: over PCIe too
        members = [slot for slot in node_slots if slot.device in island]
    else:
        members = node_slots
    if len(members) < 2:
        return []
    out = []
    # Group sizes that split the island evenly (2, 4, 8 of 8 GPUs): the sizes TP deployments use,
    # and the ones a model's power-of-two head counts divide.
    for size in [n for n in range(2, len(members) + 1) if len(members) % n == 0]:
        refusal = tp_refusal(graph, size)
        if refusal is not None:
            if size == len(members):
                out.append(Candidate("tensor", "transformers", size, 1, refusal=refusal))
            continue
        layout = make_layout(graph, "transformers", size, 1, members[:size])
        out.append(evaluate_layout("tensor", graph, layout, inventory, workloads, reserve, mixer_path))
    return out


def _pipeline_candidate(graph, inventory, slots, workloads, reserve, mixer_path) -> Candidate:
    size = len(slots)
    refusal = pp_refusal(graph, size) if size > 1 else "one rank: nothing to pipeline"
    if refusal is not None:
        return Candidate("pipeline", "transformers", 1, size, refusal=refusal)
    layout = make_layout(graph, "transformers", 1, size, slots)
    return evaluate_layout("pipeline", graph, layout, inventory, workloads, reserve, mixer_path)


def _vllm_candidate(graph, inventory, slots, workloads, reserve, mixer_path) -> Candidate:
    nodes = inventory.all_nodes()
    per_node = len(nodes[0].gpus)
    pp = len(nodes)
    names = [gpu.name for gpu in nodes[0].gpus]
    if not per_node or any([gpu.name for gpu in node.gpus] != names for node in nodes):
        return Candidate("tensor x pipeline", "vllm", per_node, pp,
                         refusal="the nodes' GPUs differ; vLLM runs one TP size on identical cards per stage")
    low = [gpu for node in nodes for gpu in node.gpus if gpu.capability < VLLM_MIN_CAPABILITY]
    if low:
        return Candidate("tensor x pipeline", "vllm", per_node, pp,
                         refusal=f"vLLM needs compute capability 7.5 or newer; {low[0].name} is {low[0].compute_capability}")
    refusal = tp_refusal(graph, per_node, "vllm") or pp_refusal(graph, pp, "vllm")
    if refusal is not None:
        return Candidate("tensor x pipeline", "vllm", per_node, pp, refusal=refusal)
    layout = make_layout(graph, "vllm", per_node, pp, slots)
    return evaluate_layout("tensor x pipeline", graph, layout, inventory, workloads, reserve, mixer_path)


def considered_strategies(spec, inventory: Inventory) -> set[str]:
    """The strategies the policy asks planc to weigh on this inventory."""
    policy = spec.policy.parallelism
    nodes = inventory.all_nodes()
    multi = len(nodes) > 1
    cpu_ranks = any(node.cpu_ranks and node.cpu_ranks > 1 for node in nodes)
    if policy == "device_map":
        return {"device_map"}
    if policy == "tensor":
        return {"tensor", "tensor x pipeline"} if multi else {"tensor"}
    if policy == "pipeline":
        return {"pipeline"}
    chosen = {"device_map"} if nodes[0].gpus or not cpu_ranks else set()
    if nodes[0].gpus and nvlink_islands(nodes[0]):
        chosen.add("tensor")
    if cpu_ranks:
        chosen |= {"tensor", "pipeline"}
    if multi:
        chosen |= {"pipeline", "tensor x pipeline"}
    return chosen


def plan_strategies(graph: ModelGraph, inventory: Inventory, runtime, spec, workloads: list[Workload],
                    reserve: Reserve, device_map: Callable[[], Candidate]) -> list[Candidate]:
    """Every candidate the policy allows, evaluated (device_map through the solver, via `device_map()`)."""
    wanted = considered_strategies(spec, inventory)
    slots = rank_slots(inventory, runtime, spec.policy.headroom)
    mixer_path = runtime.mixer_path or FALLBACK  # how linear-attention / SSM layers run, on every rank
    candidates: list[Candidate] = []
    if "device_map" in wanted:
        candidates.append(device_map())
    if "tensor" in wanted:
        candidates += _tensor_candidates(graph, inventory, slots, spec, workloads, reserve, mixer_path)
    if "pipeline" in wanted:
        candidates.append(_pipeline_candidate(graph, inventory, slots, workloads, reserve, mixer_path))
    if "tensor x pipeline" in wanted and len(inventory.all_nodes()) > 1:
        candidates.append(_vllm_candidate(graph, inventory, slots, workloads, reserve, mixer_path))
    return candidates


def choose(candidates: list[Candidate], graph: ModelGraph, workload: Workload) -> Candidate:
    """The fastest fitting candidate that planc runs itself, else vLLM's; refuse listing every reason."""
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        reasons = "; ".join(f"{c.label}: {c.refusal}" for c in candidates)
        raise InfeasibleError(
            f"{graph.architecture} ({graph.weight_bytes / GiB:.1f} GiB of weights in {graph.dtype}) does not fit at "
            f"batch {workload.batch_size} x {workload.max_seq_len} tokens under any strategy: {reasons}"
        )
    return min(fitting, key=lambda c: (c.engine == "vllm", round(c.cost.total, 9), c.tp * c.pp))


def choice_reason(chosen: Candidate, candidates: list[Candidate], inventory: Inventory, policy: str) -> str:
    """Why this strategy: the others' predicted times or refusals, the links it was weighed on."""
    others = []
    for candidate in candidates:
        if candidate is chosen:
            continue
        if candidate.fits:
            others.append(f"{candidate.label} {candidate.ms:.2f} ms/token")
        else:
            others.append(f"{candidate.label} not planned ({candidate.refusal})")
    links = "; ".join(f"node {node.index}: {describe_node(node)}" for node in inventory.all_nodes())
    vllm = ""
    if chosen.engine == "vllm":
        vllm = "; transformers 5.23 cannot combine tensor and pipeline parallelism, so this plan runs on vLLM (planc export --to vllm)"
    return (
        f"policy.parallelism {policy}: {chosen.label} predicts {chosen.ms:.2f} ms/token ({chosen.cost.describe()})"
        + (f"; considered {', '.join(others)}" if others else "")
        + f"; {links}{vllm}"
    )

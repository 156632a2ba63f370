"""One yardstick for any placement: planc's ledger terms and decode estimate, and `planc simulate`.

`evaluate` applies planc.memory's functions to an arbitrary unit -> device assignment (planc's own
or accelerate's), term by term as planc's solver does for its own candidates: weights where they
live; KV cache, activations and logits on the device that executes a unit (offloaded units execute
on the main GPU, which also stages the largest of them); the attention masks (all of them on the
main GPU, a copy of one on each other GPU); the reserve from planc's defaults. The
decode estimate is the solver's: bytes read per token over the bandwidth of the device holding
them, offloaded weights over PCIe (and disk) on every token.

`simulated_peaks` runs a placement through planc's simulate (fake tensors on virtual GPUs) and
returns the tensor peak per GPU; callers add the CUDA reserve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from planc.model.attention import mask_bytes
from planc.memory import (
    DISK_BANDWIDTH,
    PCIE_BANDWIDTH,
    Load,
    Reserve,
    Workload,
    reserve_bytes,
    unit_costs,
)

HOST = ("cpu", "disk")


@dataclass(frozen=True)
class GpuLoad:
    index: int
    capacity: int
    weights: int
    kv_cache: int
    activations: int
    staging: int
    reserve: int  # planc's: context + workspace + allocator slack

    @property
    def tensors(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.staging

    @property
    def total(self) -> int:
        return self.tensors + self.reserve


@dataclass(frozen=True)
class Evaluation:
    gpus: tuple[GpuLoad, ...]
    decode_seconds: float
    offloaded_bytes: int


def evaluate(graph, device_of: dict[str, int | str], plan, workload: Workload, reserve: Reserve = Reserve()) -> Evaluation:
    """planc's ledger and decode estimate for `device_of` (unit -> device) on `plan`'s devices with
    its per-device attention backends."""
    devices = {d.index: d for d in plan.devices}
    # As planc's compiler does: forced-eager models are costed as eager on every GPU.
    eager = plan.attention.attn_implementation == "eager"
    # A card the plan leaves idle has no backend in the lock; nothing runs there, so any will do.
    backend_of = {d.index: "eager" if eager else plan.attention.per_device.get(str(d.index), "math") for d in plan.devices}
    gpu_order = [device_of[u.name] for u in graph.units if device_of[u.name] not in HOST]
    main = gpu_order[0]
    backends = sorted(set(backend_of.values()))
    costs = unit_costs(graph, workload, backends)
    # The main GPU keeps every attention mask for the whole forward; the others get a copy of one.
    masks = {backend: mask_bytes(graph.units, workload, backend, graph.dtype) for backend in backends}
    loads = {index: Load(mask=masks[backend_of[index]][0 if index == main else 1]) for index in devices}
    decode = 0.0
    offloaded_bytes = 0
    staging = 0
    for unit in graph.units:
        device = device_of[unit.name]
        executes_on = main if device in HOST else device
        cost = costs[backend_of[executes_on]][unit.name]
        loads[executes_on].add(cost, resident=device not in HOST)
        if device in HOST:
            offloaded_bytes += cost.weights
            staging = max(staging, cost.weights)
            decode += cost.weights / PCIE_BANDWIDTH + cost.decode_bytes / devices[main].bandwidth
            if device == "disk":
                decode += cost.weights / DISK_BANDWIDTH
        else:
            decode += cost.decode_bytes / devices[device].bandwidth
    loads[main].staging = staging
    # Tied weights count once, on their first unit; an end on another GPU holds its own copy.
    weight_of = {unit.name: unit.weight_bytes for unit in graph.units}
    position = {unit.name: i for i, unit in enumerate(graph.units)}
    for group in graph.tied_unit_groups():
        owner = min(group, key=position.__getitem__)
        for device in {device_of[name] for name in group} - {device_of[owner]} - set(HOST):
            loads[device].weights += weight_of[owner]
    gpus = []
    for index, load in loads.items():
        activations = load.activations(graph.shapes, workload, graph.dtype)
        capacity = devices[index].memory
        gpus.append(
            GpuLoad(
                index=index,
                capacity=capacity,
                weights=load.weights,
                kv_cache=load.kv_cache,
                activations=activations,
                staging=load.staging,
                reserve=reserve_bytes(reserve, load.kv_cache, activations, load.staging, gpu=True) if load.executes else 0,
            )
        )
    return Evaluation(tuple(gpus), decode, offloaded_bytes)


def largest_context(fits, upper: int) -> int:
    """Largest context in [1, upper] for which fits(context) holds (monotone), 0 if none."""
    from planc.compile import largest_below

    return upper if fits(upper) else largest_below(fits, upper)


@dataclass(frozen=True)
class Simulated:
    peaks: dict[int, int]  # tensor peak per GPU, bytes (no context, workspace or fragmentation)
    error: str | None
    seconds: float


def simulated_peaks(plan, lock_dir: Path, batch_size: int, max_seq_len: int, decode_steps: int) -> Simulated:
    """Run `plan` (its device_map, dtype, attention, prefill chunk) through planc's simulate."""
    from planc.simulate import simulate_plan

    report = simulate_plan(plan, lock_dir, batch_size=batch_size, max_seq_len=max_seq_len, decode_steps=decode_steps)
    return Simulated({d.index: d.simulated_peak for d in report.devices}, report.error, report.elapsed_seconds)

"""Partition the unit chain over the devices.

The model graph is a chain (execution order) plus tied edges. Units tied to an earlier unit
(lm_head tied to the embedding) are pinned to their partner's device and leave the chain; the
rest is cut into contiguous segments, one per device, in some order of the GPUs, with an
optional suffix offloaded to CPU and then disk. accelerate executes offloaded units on its main
device (the device of the first entry), so their KV cache and a staging copy land there.

Decoder layers tied to one another (Zamba's hybrid layers share one transformer block; Zamba2
cycles through `num_mem_blocks` of them) form a tie group that leaves the chain too and goes
whole onto one GPU of the solver's choosing, wherever its members sit in the chain. A tied
parameter is one tensor, on the device its checkpoint entry was loaded to; accelerate's hook on
a GPU-resident layer moves only the inputs, so a member on another GPU would fail its forward
(weights and activations on different devices). On the group's GPU every member runs, holds its
own KV cache and states, and the hidden states come to it and go back: what accelerate's own
infer_auto_device_map does, placing a module's tied modules with it.

Exactness. For a fixed GPU order and a fixed offloaded suffix, the best contiguous split is a
shortest path in a DAG whose nodes are (device, first unit not yet placed); we solve it by
dynamic programming over that DAG. Orders are enumerated up to identical cards. The objective is
lexicographic:
1. offload as little as possible (the fewest units off the GPUs: a spilled layer costs PCIe
   bandwidth on every token; planc never spills what fits);
2. `latency`: least predicted decode time, then lowest peak utilisation;
   `balance`: lowest peak utilisation, then least decode time.
Mixing a sum and a max is handled by bisecting on a utilisation cap U: the DP minimises the sum
among segments whose utilisation is at most U. Tie groups add to the DP's node the set of groups
already placed: each device's segment may take any of the groups not yet placed. tests/test_solver.py checks the result against
brute force over every contiguous assignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from planc.model.attention import mask_bytes
from planc.memory import (
    CPU_BANDWIDTH,
    DISK_BANDWIDTH,
    PCIE_BANDWIDTH,
    Load,
    Reserve,
    Workload,
    main_mask_bytes,
    reserve_bytes,
    returned_logits_bytes,
    unit_costs,
)
from planc.errors import ModelError, SpecError
from planc.model import ModelGraph
from planc.model.cache import FALLBACK

INF = float("inf")
PICO = 10**12
# solve() runs the DP once per GPU order at no cap, then up to ~41 more times while it bisects the
# utilisation cap; one DP at no cap tries about gpus x units^2 / 2 segments, a capped one about
# units^2. Counted that way one step takes 70-100 ns on one shared core (Llama-3.1-70B over 4+4
# cards of two kinds, 70 orders: 2.2e7 steps in 1.6 s; over 3+3+2 cards, 560 orders: 1.8e8 in 17 s;
# 1024 layers on 8 identical cards: 4.8e7 in 3.7 s), so this bound keeps the search under about half
# a minute; a larger one is refused at once rather than searched for minutes.
MAX_SEARCH_STEPS = 300_000_000
BISECTION_PASSES = 41


@dataclass(frozen=True)
class Target:
    """A device the solver may place units on."""

    key: int | str  # GPU index, "cpu" or "disk"
    capacity: int
    headroom: int
    bandwidth: int
    backend: str  # attention backend its layers run with
    gpu: bool
    kind: tuple = ()  # identical cards share a kind; orders are enumerated up to kind

    @property
    def budget(self) -> int:
        return self.capacity - self.headroom


@dataclass(frozen=True)
class DeviceLedger:
    key: int | str
    capacity: int
    headroom: int
    reserve: int
    weights: int
    kv_cache: int
    activations: int
    staging: int
    units: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.reserve + self.weights + self.kv_cache + self.activations + self.staging

    @property
    def free(self) -> int:
        return self.capacity - self.headroom - self.total


@dataclass(frozen=True)
class Placement:
    device_of: dict[str, int | str]  # unit name -> device key, execution order
    ledgers: tuple[DeviceLedger, ...]  # GPUs in chain order, then cpu, then disk when used
    decode_seconds: float
    peak_utilisation: float  # max over GPUs of (total + headroom) / capacity
    offloaded_units: int


@dataclass
class Infeasible:
    """Why nothing fits: a near-miss placement and its overflowing devices."""

    ledgers: tuple[DeviceLedger, ...]

    def overflowing(self) -> list[DeviceLedger]:
        return [ledger for ledger in self.ledgers if ledger.free < 0]


@dataclass
class _Problem:
    graph: ModelGraph
    gpus: list[Target]
    cpu: Target | None
    disk: Target | None
    workload: Workload
    reserve: Reserve
    objective: str
    chain: list[str]
    pinned: dict[str, str]  # unit -> partner it shares a device with
    head: int  # the first `head` chain units (all before the first layer) stay on the main GPU
    costs: dict  # backend -> unit -> UnitCost
    groups: tuple[tuple[str, ...], ...] = ()  # tied decoder layers, each group whole on one GPU
    orders: list = field(init=False)  # GPU orders up to identical cards
    masks: dict = field(init=False)  # backend -> (main device, other devices, main's build peak) mask bytes
    evaluators: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.orders = _orders(self.gpus) if self.gpus else [()]
        self.masks = {backend: self._masks(backend) for backend in self.costs}

    def _masks(self, backend: str) -> tuple[int, int, int]:
        main, other, building = mask_bytes(self.graph.units, self.workload, backend, self.graph.dtype)
        # The main device also holds the image mask of gated cross-attention blocks (Idefics).
        return main + main_mask_bytes(self.graph, self.workload), other, building

    def cost(self, backend: str, name: str):
        return self.costs[backend][name]

    def evaluator(self, main: Target, offloaded: list[str]) -> "_Evaluator":
        """One evaluator per main card and offloaded suffix, kept for the whole solve (its segment
        rows are what the cap bisection re-reads)."""
        key = (main.capacity, main.headroom, main.bandwidth, main.backend, main.gpu, len(offloaded))
        ev = self.evaluators.get(key)
        if ev is None:
            ev = self.evaluators[key] = _Evaluator(self, main, offloaded)
        return ev


def _split_chain(graph: ModelGraph) -> tuple[list[str], dict[str, str], int, tuple[tuple[str, ...], ...]]:
    """The chain, the units pinned to a tied partner, how many chain units the main GPU must hold,
    and the tie groups that float (decoder layers tied to one another).

    Every unit before the first decoder layer stays on the main GPU: the model's own forward
    combines their outputs outside any hooked module (GPT-2 adds wte and wpe, Gemma 3n projects its
    per-layer embeddings), where accelerate moves nothing. A pinned unit (lm_head tied to the
    embedding) executes on its partner's device, which is therefore the main GPU too. A tie group
    whose first unit is a decoder layer leaves the chain whole: the solver puts it on one GPU.
    """
    position = {unit.name: i for i, unit in enumerate(graph.units)}
    kinds = {unit.name: unit.kind for unit in graph.units}
    pinned: dict[str, str] = {}
    groups: list[tuple[str, ...]] = []
    for group in graph.tied_unit_groups():
        ordered = sorted(group, key=position.__getitem__)
        if kinds[ordered[0]] == "layer":
            groups.append(tuple(ordered))
            continue
        for later in ordered[1:]:
            pinned[later] = ordered[0]
    floating = {name for group in groups for name in group}
    chain = [unit.name for unit in graph.units if unit.name not in pinned and unit.name not in floating]
    index = {name: i for i, name in enumerate(chain)}
    head = max([index[u.name] + 1 for u in graph.units if u.kind == "pre" and u.name in index], default=1)
    for unit, partner in pinned.items():
        head = max(head, index[partner] + 1)
    return chain, pinned, head, tuple(sorted(groups, key=lambda g: position[g[0]]))


def shared_layer_groups(graph: ModelGraph) -> tuple[tuple[str, ...], ...]:
    """Decoder layers tied to one another (callers of one shared block), each group in execution order."""
    return _split_chain(graph)[3]


def _subsets(mask: int):
    """Every subset of the bits of `mask`, the empty one first."""
    subset = 0
    while True:
        yield subset
        if subset == mask:
            return
        subset = (subset - mask) & mask


class _Evaluator:
    """Loads and costs of segments, with the main-device extras of one offload choice."""

    def __init__(self, problem: _Problem, main: Target, offloaded: list[str]):
        self.p = problem
        self.main = main
        # The main GPU runs offloaded units (weights elsewhere) and pinned ones (weights here).
        held, _, building = problem.masks[main.backend]
        extra = Load(executes=True, mask=held, main=True, mask_build=building,
                     returned_logits=returned_logits_bytes(problem.graph, problem.workload))
        for name in offloaded:
            extra.add(problem.cost(main.backend, name), resident=False)
        for name in problem.pinned:
            extra.add(problem.cost(main.backend, name))
        extra.staging = max((problem.cost(main.backend, n).host_weights for n in offloaded), default=0)
        self.main_extra = extra
        self.placeable = len(problem.chain) - len(offloaded)
        self._rows: dict[tuple, list[tuple[int, int, float]]] = {}

    def ledger(self, target: Target, names: Sequence[str], is_main: bool, groups: int = 0) -> DeviceLedger:
        load = self.start(target, is_main, groups)
        for name in names:
            self.add(load, target, name)
        return self.finish(load, target, tuple(names) + self.members(groups))

    def members(self, groups: int) -> tuple[str, ...]:
        """The units of the tie groups in the bit set `groups`."""
        return tuple(name for g, group in enumerate(self.p.groups) if groups >> g & 1 for name in group)

    def start(self, target: Target, is_main: bool, groups: int = 0) -> Load:
        if is_main:
            load = replace(self.main_extra)  # a fresh copy: the DP grows it unit by unit
        else:
            load = Load(mask=self.p.masks[target.backend][1])
        for name in self.members(groups):
            self.add(load, target, name)
        return load

    def add(self, load: Load, target: Target, name: str) -> None:
        load.add(self.p.cost(target.backend, name))

    def finish(self, load: Load, target: Target, names: tuple[str, ...]) -> DeviceLedger:
        p = self.p
        activations = load.activations(p.graph.shapes, p.workload, p.graph.dtype)
        reserve = reserve_bytes(p.reserve, load.kv_cache, activations, load.staging, target.gpu)
        return DeviceLedger(
            target.key, target.capacity, target.headroom, reserve, load.weights, load.kv_cache,
            activations, load.staging, names,
        )

    def total(self, load: Load, target: Target) -> int:
        p = self.p
        activations = load.activations(p.graph.shapes, p.workload, p.graph.dtype)
        return load.weights + load.kv_cache + activations + load.staging + reserve_bytes(
            p.reserve, load.kv_cache, activations, load.staging, target.gpu
        )

    def seg_cost(self, target: Target, name: str) -> int:
        """Decode time of one unit on a GPU, in picoseconds (integers add exactly)."""
        return -(-self.p.cost(target.backend, name).decode_bytes * PICO // target.bandwidth)

    def row(self, target: Target, is_main: bool, start: int, groups: int = 0) -> list[tuple[int, int, float]]:
        """(end, decode cost, utilisation) of the segment chain[start:end] on `target`, with the tie
        groups in the bit set `groups`, for every end while it fits; end == start (the groups alone)
        leads when there are groups. The DP reads these for each cap of the bisection and each GPU
        order, and identical cards share them, so each segment is costed once per solve."""
        key = (target.capacity, target.headroom, target.bandwidth, target.backend, target.gpu, is_main, start, groups)
        row = self._rows.get(key)
        if row is not None:
            return row
        row = []
        load = self.start(target, is_main, groups)
        cost = sum(self.seg_cost(target, name) for name in self.members(groups))
        ends = range(start + (0 if groups else 1), self.placeable + 1)
        for end in ends:
            if end > start:
                name = self.p.chain[end - 1]
                self.add(load, target, name)
                cost += self.seg_cost(target, name)
            # Rounded so that placements equal up to float noise (sums in another order)
            # tie on utilisation and are told apart by decode time.
            util = round(self.total(load, target) / target.budget, 9)
            if util > 1.0:
                break  # a longer segment only holds more
            row.append((end, cost, util))
        self._rows[key] = row
        return row


def _offload_split(problem: _Problem, offloaded: list[str], main: Target | None):
    """Put an offloaded suffix on CPU (longest prefix that fits) then disk. None if it cannot."""
    if not offloaded:
        return [], [], 0
    cpu, disk = problem.cpu, problem.disk
    if cpu is None:
        return None
    executing_on_cpu = main is None
    # CPU ledger: resident weights; when the CPU executes (no GPUs) also every offloaded layer's
    # KV cache and activations, and a staging copy of the largest unit read back from disk.
    held, _, building = problem.masks[cpu.backend]
    fixed = Load(executes=executing_on_cpu, mask=held, main=True, mask_build=building)
    floating = 0
    if executing_on_cpu:
        for name in offloaded:
            fixed.add(problem.cost(cpu.backend, name), resident=False)
        # Without GPUs the tie groups run on the CPU too, their weights resident (never on disk).
        for name in _group_members(problem):
            fixed.add(problem.cost(cpu.backend, name))
            floating += _host_cost(problem, cpu, name, True)[0]
    activations = fixed.activations(problem.graph.shapes, problem.workload, problem.graph.dtype)
    # Weights kept for a GPU to stream in are the host copies (bitsandbytes leaves those dense); a
    # CPU-only plan holds them as the CPU runs them.
    weights = [_host_cost(problem, cpu, name, executing_on_cpu)[0] for name in offloaded]
    kept = None
    resident = floating
    for prefix in range(len(offloaded) + 1):
        if prefix:
            resident += weights[prefix - 1]
        staging = max(weights[prefix:], default=0) if executing_on_cpu else 0
        total = resident + fixed.kv_cache + activations + staging + reserve_bytes(
            problem.reserve, fixed.kv_cache, activations, staging, gpu=False
        )
        if total <= cpu.budget:
            kept = prefix  # the longest prefix that fits: the fewest units on disk
    if kept is None:
        return None
    on_cpu = offloaded[:kept]
    on_disk = offloaded[len(on_cpu):]
    if on_disk and disk is None:
        return None
    # Per token: offloaded weights cross PCIe (or are read from DRAM when the CPU computes), disk
    # ones are read from disk first.
    cost = 0
    for name in offloaded + (list(_group_members(problem)) if executing_on_cpu else []):
        held, read = _host_cost(problem, cpu, name, executing_on_cpu)
        if executing_on_cpu:
            cost += -(-read * PICO // CPU_BANDWIDTH)
        else:
            cost += -(-held * PICO // PCIE_BANDWIDTH) + -(-read * PICO // main.bandwidth)
        if name in on_disk:
            cost += -(-held * PICO // DISK_BANDWIDTH)
    return on_cpu, on_disk, cost


def _group_members(problem: _Problem) -> tuple[str, ...]:
    return tuple(name for group in problem.groups for name in group)


def _host_cost(problem: _Problem, cpu: Target, name: str, executing_on_cpu: bool) -> tuple[int, int]:
    """(bytes held on the host, bytes a decode step reads) of an offloaded unit."""
    c = problem.cost(cpu.backend, name)
    if executing_on_cpu:
        return c.weights, c.decode_bytes
    return c.host_weights, c.host_decode_bytes


def _orders(gpus: list[Target]) -> list[tuple[Target, ...]]:
    """GPU orders up to identical cards (same kind), deterministic: distinct kind sequences only.

    Eight identical H100s give one order, not 40,320; cards of one kind keep their index order.
    """
    by_kind: dict[tuple, list[Target]] = {}
    for target in gpus:
        by_kind.setdefault(target.kind, []).append(target)
    kinds = list(by_kind)
    orders: list[tuple[Target, ...]] = []

    def extend(prefix: list[tuple], left: dict[tuple, int]) -> None:
        if len(prefix) == len(gpus):
            taken = {kind: iter(by_kind[kind]) for kind in kinds}
            orders.append(tuple(next(taken[kind]) for kind in prefix))
            return
        for kind in kinds:
            if left[kind]:
                left[kind] -= 1
                extend(prefix + [kind], left)
                left[kind] += 1

    extend([], {kind: len(by_kind[kind]) for kind in kinds})
    return orders


def count_orders(gpus: Sequence[Target]) -> int:
    """How many GPU orders `_orders` enumerates: the multinomial over identical kinds."""
    counts: dict[tuple, int] = {}
    for target in gpus:
        counts[target.kind] = counts.get(target.kind, 0) + 1
    orders = math.factorial(len(gpus))
    for count in counts.values():
        orders //= math.factorial(count)
    return orders


def _check_search_size(
    graph: ModelGraph, chain: list[str], head: int, gpus: Sequence[Target], groups: int = 0
) -> None:
    """Refuse, naming the numbers, a search the exact solver cannot finish in reasonable time."""
    orders = count_orders(gpus)
    # The units before the first layer stay together on the main GPU (_split_chain): no segment
    # starts or ends among them, so for the search they are one unit (Phi-4-multimodal's 700
    # vision and audio encoder modules count once).
    units = len(chain) - head + 1
    # Each segment step is tried with every split of the tie groups not yet placed: 3^groups in all.
    steps = orders * units * units * (len(gpus) / 2 + BISECTION_PASSES) * 3**groups
    if steps <= MAX_SEARCH_STEPS:
        return
    if orders > 1 and units * units * (len(gpus) / 2 + BISECTION_PASSES) <= MAX_SEARCH_STEPS:
        kinds = len({target.kind for target in gpus})
        raise SpecError(
            f"hardware.gpus: {kinds} kinds of card in {len(gpus)} slots give {orders} GPU orders to search for "
            f"{graph.architecture}; planc's exact solver searches at most about {MAX_SEARCH_STEPS:.0e} segment "
            f"steps ({steps:.1e} here): list identical cards with the same type (or name and numbers) so they "
            "count as one kind, or plan fewer kinds"
        )
    raise ModelError(
        f"{graph.architecture} has {units} placement units on {len(gpus)} GPUs: planc's exact solver searches at "
        f"most about {MAX_SEARCH_STEPS:.0e} segment steps ({steps:.1e} here); its modules outside "
        f"{', '.join(graph.no_split_module_classes)} blocks are each a unit, so planc cannot plan it yet"
    )


def _solve_fixed(problem: _Problem, order: tuple[Target, ...], m: int, cap: float):
    """Best split of the chain prefix over `order` with the last m units offloaded, each tie group
    whole on one GPU of the order.

    Returns (gpu_cost, offload_cost, peak_util, segments, offload, groups per segment) or None.
    """
    chain = problem.chain
    n = len(chain) - m
    offloaded = chain[n:]
    main = order[0] if order else None
    split = _offload_split(problem, offloaded, main)
    if split is None:
        return None
    on_cpu, on_disk, offload_cost = split
    if not order:
        return (0, offload_cost, 0.0, [], (on_cpu, on_disk), []) if n == 0 else None
    if n < problem.head:
        return None  # the main GPU holds every unit before the first layer
    if any(not problem.cost(main.backend, name).offloadable for name in offloaded):
        return None  # weights accelerate cannot stream from the host (mxfp4's swizzled experts)
    ev = problem.evaluator(main, offloaded)
    k = len(order)
    every = (1 << len(problem.groups)) - 1
    # best[placed][i]: (cost, util) having placed chain[:i] and the tie groups in the bit set
    # `placed` on the devices so far; parents for the path.
    best: list[list[tuple[int, float] | None]] = [[None] * (n + 1) for _ in range(every + 1)]
    best[0][0] = (0, 0.0)
    parents: list[list[list[tuple[int, int] | None]]] = []
    for j, target in enumerate(order):
        new: list[list[tuple[int, float] | None]] = [[None] * (n + 1) for _ in range(every + 1)]
        parent: list[list[tuple[int, int] | None]] = [[None] * (n + 1) for _ in range(every + 1)]
        if j > 0:
            # This GPU stays unused. Tried before every segment, so that among equal splits the one
            # whose earlier GPUs hold the units wins (GPUs 0-6 of 8, not 0 and 2-7): the idle GPUs
            # come last.
            for placed in range(every + 1):
                for i in range(n + 1):
                    if best[placed][i] is not None:
                        _relax(new[placed], parent[placed], i, (i, placed), *best[placed][i])
        for placed in range(every + 1):
            for i in range(n + 1):
                if best[placed][i] is None:
                    continue
                base_cost, base_util = best[placed][i]
                for groups in _subsets(every & ~placed):
                    after = new[placed | groups]
                    for end, seg_cost, util in ev.row(target, j == 0, i, groups):
                        if util > cap:
                            break
                        if j == 0 and end < problem.head:
                            continue
                        _relax(after, parent[placed | groups], end, (i, placed), base_cost + seg_cost,
                               max(base_util, util))
        best = new
        parents.append(parent)
        if j == 0:
            for row in best:
                row[0] = None  # the first GPU runs the first unit
    if best[every][n] is None:
        return None
    # Walk back the segments and the groups each took.
    cuts = [(n, every)]
    for j in range(k - 1, -1, -1):
        i, placed = cuts[-1]
        cuts.append(parents[j][placed][i])
    cuts.reverse()
    segments = [chain[cuts[j][0]:cuts[j + 1][0]] for j in range(k)]
    masks = [cuts[j + 1][1] & ~cuts[j][1] for j in range(k)]
    return best[every][n][0], offload_cost, best[every][n][1], segments, (on_cpu, on_disk), masks


def _relax(new, parent, end, start, cost, util):
    # Within a utilisation cap the DP minimises the sum (decode time); a max is not decomposable
    # along the chain, so the peak utilisation is handled by the cap bisection in solve().
    candidate = (cost, util)
    current = new[end]
    if current is None or candidate < current:
        new[end] = candidate
        parent[end] = start


def _better(a: tuple[int, float], b: tuple[int, float], objective: str) -> bool:
    if objective == "balance":
        return (a[1], a[0]) < (b[1], b[0])
    return a < b


def _best(problem: _Problem, m: int, cap: float):
    best = None
    for order in problem.orders:
        found = _solve_fixed(problem, order, m, cap)
        if found is None:
            continue
        key = (found[0] + found[1], found[2])
        if best is None or _better(key, best[0], problem.objective):
            best = (key, order, found)
    return best


def _fits_fixed(problem: _Problem, order: tuple[Target, ...], m: int) -> bool:
    """Whether some split of the chain prefix over `order` fits with the last m units offloaded.

    Greedy is exact here: a segment that fits still fits without its first units (every ledger
    term is a sum or a max over its units), so filling each card as far as it goes reaches at
    least as far as any other split.
    """
    n = len(problem.chain) - m
    offloaded = problem.chain[n:]
    main = order[0] if order else None
    if _offload_split(problem, offloaded, main) is None:
        return False
    if main is not None and any(not problem.cost(main.backend, name).offloadable for name in offloaded):
        return False  # weights accelerate cannot stream from the host (mxfp4's swizzled experts)
    if not order or n < problem.head:
        return not order and n == 0  # without GPUs all is offloaded; with them the main GPU runs the pre-layer units
    ev = problem.evaluator(main, offloaded)
    every = (1 << len(problem.groups)) - 1
    # Per set of tie groups placed, the farthest the chain reaches: a farther reach with the same
    # groups placed can continue wherever a shorter one can.
    reached = {0: 0}
    for j, target in enumerate(order):
        further = dict(reached) if j > 0 else {}
        for placed, start in reached.items():
            for groups in _subsets(every & ~placed):
                row = ev.row(target, j == 0, start, groups)
                if not row or (j == 0 and row[-1][0] < problem.head):
                    continue
                key = placed | groups
                further[key] = max(further.get(key, 0), row[-1][0])
        reached = further
        if reached.get(every) == n:
            return True
    return False


def _min_offload(problem: _Problem, allow_offload: bool) -> int | None:
    """The fewest units offloaded for which some placement fits, or None."""
    n = len(problem.chain)
    candidates = range(0, (n if allow_offload else 0) + 1) if problem.gpus else [n]
    for m in candidates:
        if any(_fits_fixed(problem, order, m) for order in problem.orders):
            return m
    return None


def _problem(graph, gpus, cpu, disk, workload, reserve, objective, mixer_path: str = FALLBACK) -> _Problem:
    chain, pinned, head, groups = _split_chain(graph)
    _check_search_size(graph, chain, head, gpus, len(groups))
    backends = sorted({t.backend for t in gpus} | ({cpu.backend} if cpu else set()))
    return _Problem(graph, gpus, cpu, disk, workload, reserve, objective, chain, pinned, head,
                    unit_costs(graph, workload, backends, mixer_path), groups)


def feasible(
    graph: ModelGraph,
    gpus: list[Target],
    cpu: Target | None,
    disk: Target | None,
    workload: Workload,
    reserve: Reserve,
    mixer_path: str = FALLBACK,
) -> bool:
    """Whether `solve` would find a placement: its first step alone, without choosing the best one."""
    problem = _problem(graph, gpus, cpu, disk, workload, reserve, "latency", mixer_path)
    return _min_offload(problem, allow_offload=cpu is not None) is not None


def solve(
    graph: ModelGraph,
    gpus: list[Target],
    cpu: Target | None,
    disk: Target | None,
    workload: Workload,
    reserve: Reserve,
    objective: str,
    mixer_path: str = FALLBACK,
) -> Placement | Infeasible:
    """Place the graph's units; cpu/disk are None when the policy forbids them. Linear-attention
    and SSM mixers run on `mixer_path` (fallback or kernels) wherever they execute."""
    problem = _problem(graph, gpus, cpu, disk, workload, reserve, objective, mixer_path)
    m = _min_offload(problem, allow_offload=cpu is not None)
    if m is None:
        return _closest(problem)
    best = _best(problem, m, INF)
    if problem.gpus:
        # Tighten the utilisation cap while the primary objective holds (latency), or as far as
        # it stays feasible (balance): the secondary objective of the lexicographic order. A
        # placement's peak is the utilisation of one of its segments, so the tightest cap is one
        # of those values: a binary search over them (monotone: a looser cap only admits more).
        primary = best[0][0]

        def holds(found) -> bool:
            return found is not None and (objective == "balance" or found[0][0] == primary)

        caps = sorted(u for u in _segment_utilisations(problem, m) if u <= best[0][1])
        lo, hi = 0, len(caps) - 1  # caps[hi] is the peak of `best`: it holds
        while lo < hi:
            mid = (lo + hi) // 2
            if holds(_best(problem, m, caps[mid])):
                hi = mid
            else:
                lo = mid + 1
        # At the tightest cap, among placements at the best peak utilisation, the DP returns the
        # least decode time.
        final = _best(problem, m, caps[hi])
        if holds(final):
            best = final
    return _placement(problem, best, m)


def _segment_utilisations(problem: _Problem, m: int) -> set[float]:
    """Every utilisation a segment of a placement with m units offloaded can have."""
    offloaded = problem.chain[len(problem.chain) - m:]
    found: set[float] = set()
    every = (1 << len(problem.groups)) - 1
    for main in {order[0] for order in problem.orders}:
        ev = problem.evaluator(main, offloaded)
        for groups in _subsets(every):
            found.update(util for end, _, util in ev.row(main, True, 0, groups) if end >= problem.head)
            for target in problem.gpus:
                # A later GPU starts after the head; one holding a tie group may hold no chain unit.
                for start in range(problem.head, ev.placeable + (1 if groups else 0)):
                    found.update(util for _, _, util in ev.row(target, False, start, groups))
    return found


def _placement(problem: _Problem, best, m: int) -> Placement:
    (_, util), order, (gpu_cost, offload_cost, _, segments, (on_cpu, on_disk), masks) = best
    chain = problem.chain
    offloaded = chain[len(chain) - m:]
    device_of: dict[str, int | str] = {}
    main = order[0] if order else None
    ev = _Evaluator(problem, main, offloaded) if order else None
    for target, names, groups in zip(order, segments, masks):
        for name in names + list(ev.members(groups)):
            device_of[name] = target.key
    for name in on_cpu + (list(_group_members(problem)) if not order else []):
        device_of[name] = "cpu"
    for name in on_disk:
        device_of[name] = "disk"
    for unit, partner in problem.pinned.items():
        device_of[unit] = device_of[partner]
    device_of = {unit.name: device_of[unit.name] for unit in problem.graph.units}
    ledgers = []
    if order:
        for j, (target, names, groups) in enumerate(zip(order, segments, masks)):
            if names or groups or j == 0:
                ledgers.append(ev.ledger(target, names, j == 0, groups))
    ledgers.extend(_host_ledgers(problem, main, on_cpu, on_disk))
    peak = max(((l.total + l.headroom) / l.capacity for l in ledgers if isinstance(l.key, int)), default=0.0)
    return Placement(device_of, tuple(ledgers), (gpu_cost + offload_cost) / PICO, peak, m)


def _host_ledgers(problem: _Problem, main: Target | None, on_cpu: list[str], on_disk: list[str]) -> list[DeviceLedger]:
    ledgers = []
    cpu = problem.cpu
    if cpu is None:
        return ledgers
    executing = main is None
    held, _, building = problem.masks[cpu.backend]
    load = Load(executes=executing, mask=held, main=True, mask_build=building)
    if executing:
        on_cpu = on_cpu + list(_group_members(problem))  # without GPUs the tie groups run here too
    for name in on_cpu + (on_disk if executing else []):
        c = problem.cost(cpu.backend, name)
        if executing:
            load.add(c, resident=name in on_cpu)
        else:
            load.weights += c.host_weights
    if executing and on_disk:
        load.staging = max(problem.cost(cpu.backend, n).weights for n in on_disk)
    if on_cpu or executing:
        activations = load.activations(problem.graph.shapes, problem.workload, problem.graph.dtype)
        reserve = reserve_bytes(problem.reserve, load.kv_cache, activations, load.staging, gpu=False)
        ledgers.append(DeviceLedger("cpu", cpu.capacity, 0, reserve, load.weights, load.kv_cache, activations,
                                    load.staging, tuple(on_cpu)))
    if on_disk:
        weights = sum(_host_cost(problem, cpu, n, executing)[0] for n in on_disk)
        ledgers.append(DeviceLedger("disk", 0, 0, 0, weights, 0, 0, 0, tuple(on_disk)))
    return ledgers


def _closest(problem: _Problem) -> Infeasible:
    """A near-miss placement for the error message: the chain spread over the GPUs in proportion
    to their budgets (readable, not optimal), or everything on the CPU for a CPU-only plan."""
    if not problem.gpus:
        return Infeasible(tuple(_host_ledgers(problem, None, list(problem.chain), [])))
    order = problem.orders[0]
    ev = _Evaluator(problem, order[0], [])
    weights = [problem.cost(order[0].backend, name).weights for name in problem.chain]
    total_weight = sum(weights) or 1
    total_budget = sum(t.budget for t in order)
    cuts, acc, j = [0], 0, 0
    bound = order[0].budget / total_budget * total_weight
    for i, w in enumerate(weights):
        if acc + w / 2 > bound and j < len(order) - 1 and i > cuts[-1]:
            cuts.append(i)
            j += 1
            bound += order[j].budget / total_budget * total_weight
        acc += w
    cuts += [len(problem.chain)] * (len(order) + 1 - len(cuts))
    every = (1 << len(problem.groups)) - 1  # the tie groups on the main GPU, where their first members run
    ledgers = tuple(
        ev.ledger(t, problem.chain[cuts[j]:cuts[j + 1]], j == 0, every if j == 0 else 0) for j, t in enumerate(order)
    )
    return Infeasible(ledgers)

"""Solver invariants and optimality against brute force on small cases (hypothesis)."""

from __future__ import annotations

from itertools import combinations_with_replacement, permutations, product

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planc.errors import ModelError
from planc.memory import Reserve, Workload
from planc.model import LayerCache, ModelGraph, Shapes, Unit
from planc.solver import Infeasible, Placement, Target, _Evaluator, _Problem, _split_chain, _offload_split, feasible, solve
from planc.memory import unit_costs

MiB = 2**20
SHAPES = Shapes(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, v_head_dim=16,
                intermediate_size=128, vocab_size=1000, num_layers=0)
WORKLOAD = Workload(batch_size=1, max_seq_len=256)
RESERVE = Reserve(cuda_context=64 * MiB, cublas_workspace=0, allocator_slack=0.1)


def make_graph(layer_mib: list[int], embed_mib: int, head_mib: int, tied: bool, tower_kib: list[int] = (),
               tied_layers: tuple[tuple[int, ...], ...] = ()) -> ModelGraph:
    """A toy chain. `tower_kib`: units before the layers besides the embedding (a vision or audio
    encoder's modules); `tied_layers`: groups of layer indices that share weights (Zamba's hybrid layers)."""
    units = [Unit("embed", embed_mib * MiB, "pre")]
    units += [Unit(f"tower.{i}", w * 1024, "pre") for i, w in enumerate(tower_kib)]
    units += [Unit(f"layers.{i}", w * MiB, "layer", i, LayerCache("full_attention", 4096)) for i, w in enumerate(layer_mib)]
    units += [Unit("norm", 1024, "post"), Unit("lm_head", 0 if tied else head_mib * MiB, "post")]
    graph = nx.DiGraph()
    for position, unit in enumerate(units):
        graph.add_node(unit.name, position=position, unit=unit)
    for a, b in zip(units, units[1:]):
        graph.add_edge(a.name, b.name, kind="flow")
    if tied:
        graph.add_edge("embed", "lm_head", kind="tied")
    for group in tied_layers:
        for a, b in zip(group, group[1:]):
            graph.add_edge(f"layers.{a}", f"layers.{b}", kind="tied")
    return ModelGraph("Toy", "toy", "float16", tuple(units), graph, ("Layer",), ("past_key_values",),
                      (("embed.weight", "lm_head.weight"),) if tied else (), 0,
                      Shapes(**{**SHAPES.__dict__, "num_layers": len(layer_mib)}), None, None)


def gpu(index: int, mib: int, bandwidth_gbs: int) -> Target:
    return Target(index, mib * MiB, 0, bandwidth_gbs * 10**9, "flash", True, (mib, bandwidth_gbs))


def brute_force(graph, gpus, cpu, objective):
    """Every GPU order, every contiguous split, every GPU for each tie group, every offloaded suffix:
    the lexicographic best key."""
    chain, pinned, head, groups = _split_chain(graph)
    problem = _Problem(graph, list(gpus), cpu, None, WORKLOAD, RESERVE, objective, chain, pinned, head,
                       unit_costs(graph, WORKLOAD, ["flash"]), groups)
    members = [name for group in groups for name in group]
    best = None
    n = len(chain)
    for m in range(0, (n if cpu else 0) + 1):
        prefix = n - m
        if prefix < head:
            continue
        for order in set(permutations(gpus)):
            # Offloaded units run on the order's first GPU: their cost depends on its bandwidth.
            split = _offload_split(problem, chain[prefix:], order[0])
            if split is None:
                continue
            ev = _Evaluator(problem, order[0], chain[prefix:])
            k = len(order)
            for cuts, homes in product(combinations_with_replacement(range(prefix + 1), k - 1),
                                       product(range(k), repeat=len(groups))):
                bounds = [0, *cuts, prefix]
                segments = [chain[bounds[j]:bounds[j + 1]] for j in range(k)]
                if len(segments[0]) < head:
                    continue
                masks = [sum(1 << g for g, home in enumerate(homes) if home == j) for j in range(k)]
                used = [bool(s) or bool(mask) or j == 0 for j, (s, mask) in enumerate(zip(segments, masks))]
                ledgers = [ev.ledger(t, s, j == 0, mask) for j, (t, s, mask) in enumerate(zip(order, segments, masks))]
                if any(l.total > t.budget for l, t, u in zip(ledgers, order, used) if u):
                    continue
                cost = sum(ev.seg_cost(t, name) for t, s in zip(order, segments) for name in s) + split[2]
                cost += sum(ev.seg_cost(order[homes[g]], name) for g, group in enumerate(groups) for name in group)
                util = max(l.total / t.budget for l, t, s in zip(ledgers, order, segments) if s or set(l.units) & set(members))
                key = (m, cost, util) if objective == "latency" else (m, util, cost)
                if best is None or key < best:
                    best = key
        if best is not None:
            return best
    return None


@st.composite
def cases(draw):
    n_layers = draw(st.integers(1, 5))
    layers = draw(st.lists(st.integers(50, 400), min_size=n_layers, max_size=n_layers))
    tied = draw(st.booleans())
    tower = draw(st.lists(st.integers(1, 40_000), max_size=3))
    # Layers sharing weights, as Zamba's hybrid layers (one group) or Zamba2's alternating blocks (two).
    tied_layers = draw(st.sampled_from([(), ((0, 2),), ((1, 3),), ((0, 2, 4),), ((0, 2), (1, 3)), ((1, 4), (2, 3))]))
    tied_layers = tuple(group for group in tied_layers if max(group) < n_layers)
    graph = make_graph(layers, draw(st.integers(10, 200)), draw(st.integers(10, 200)), tied, tower, tied_layers)
    n_gpus = draw(st.integers(1, 3))
    gpus = [gpu(i, draw(st.sampled_from([300, 600, 1000, 1500])), draw(st.sampled_from([300, 900, 2000])))
            for i in range(n_gpus)]
    offload = draw(st.booleans())
    cpu = Target("cpu", 3 * 2**30, 0, 0, "flash", False) if offload else None
    return graph, gpus, cpu, draw(st.sampled_from(["latency", "balance"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_solver_matches_brute_force(case):
    graph, gpus, cpu, objective = case
    result = solve(graph, gpus, cpu, None, WORKLOAD, RESERVE, objective)
    expected = brute_force(graph, gpus, cpu, objective)
    # The feasibility test fit and the infeasible hints use agrees with the full solve.
    assert feasible(graph, gpus, cpu, None, WORKLOAD, RESERVE) is (expected is not None)
    if expected is None:
        assert isinstance(result, Infeasible)
        return
    assert isinstance(result, Placement), f"brute force found {expected}"
    m, first, second = expected
    assert result.offloaded_units == m
    gpu_ledgers = [l for l in result.ledgers if isinstance(l.key, int)]
    util = max(l.total / (l.capacity - l.headroom) for l in gpu_ledgers if l.units)
    cost_ps = round(result.decode_seconds * 10**12)
    if objective == "latency":
        assert cost_ps == first
        assert util <= second + 1e-5
    else:
        assert abs(util - first) <= 1e-5
        assert cost_ps <= second


@settings(max_examples=80, deadline=None)
@given(cases())
def test_placement_invariants(case):
    graph, gpus, cpu, objective = case
    result = solve(graph, gpus, cpu, None, WORKLOAD, RESERVE, objective)
    if isinstance(result, Infeasible):
        assert result.ledgers
        return
    names = [unit.name for unit in graph.units]
    assert list(result.device_of) == names  # execution order, every unit placed once
    # Contiguity: the chain (tied units aside) visits each device in one run.
    chain, pinned, _, groups = _split_chain(graph)
    runs = [result.device_of[n] for i, n in enumerate(chain) if i == 0 or result.device_of[n] != result.device_of[chain[i - 1]]]
    assert len(runs) == len(set(runs))
    # Offloaded units form a suffix of the chain.
    on_host = [result.device_of[n] in ("cpu", "disk") for n in chain]
    assert on_host == sorted(on_host)
    for unit, partner in pinned.items():
        assert result.device_of[unit] == result.device_of[partner]
    for group in groups:  # a tie group whole on one GPU
        assert len({result.device_of[name] for name in group}) == 1 and isinstance(result.device_of[group[0]], int)
    # Every unit's weights are held once, on the device it was given.
    assert sum(ledger.weights for ledger in result.ledgers) == sum(unit.weight_bytes for unit in graph.units)
    for ledger in result.ledgers:
        assert all(result.device_of[name] == ledger.key for name in ledger.units)
    for ledger in result.ledgers:
        if ledger.key != "disk":
            assert ledger.free >= 0, ledger


def test_latency_puts_more_layers_on_the_faster_card():
    graph = make_graph([100] * 8, 50, 50, tied=False)
    slow, fast = gpu(0, 1200, 300), gpu(1, 1200, 2000)
    result = solve(graph, [slow, fast], None, None, WORKLOAD, RESERVE, "latency")
    layers = [result.device_of[f"layers.{i}"] for i in range(8)]
    assert layers.count(1) > layers.count(0)


def test_balance_evens_out_identical_cards():
    graph = make_graph([100] * 8, 50, 50, tied=False)
    result = solve(graph, [gpu(0, 1500, 900), gpu(1, 1500, 900)], None, None, WORKLOAD, RESERVE, "balance")
    layers = [result.device_of[f"layers.{i}"] for i in range(8)]
    assert abs(layers.count(0) - layers.count(1)) <= 1


def test_among_equal_splits_the_idle_gpus_are_the_last():
    # GPU 0 holds the tied embedding and head, the heaviest segment whatever the split: every
    # spread of the layers over the other cards that stays under it is optimal, with or without
    # some cards idle. The plan a user reads uses GPUs 0..k and leaves the rest.
    graph = make_graph([100] * 6, 300, 0, tied=True)
    gpus = [gpu(index, 1000, 900) for index in range(8)]
    result = solve(graph, gpus, None, None, WORKLOAD, RESERVE, "latency")
    used = sorted({device for device in result.device_of.values()})
    assert used == list(range(len(used))) and len(used) < len(gpus), result.device_of


def test_offload_only_when_needed_and_as_little_as_possible():
    graph = make_graph([200] * 6, 50, 50, tied=False)
    cpu = Target("cpu", 8 * 2**30, 0, 0, "flash", False)
    fits = solve(graph, [gpu(0, 2000, 900)], cpu, None, WORKLOAD, RESERVE, "latency")
    assert fits.offloaded_units == 0
    tight = solve(graph, [gpu(0, 900, 900)], cpu, None, WORKLOAD, RESERVE, "latency")
    assert 0 < tight.offloaded_units < len(graph.units)
    assert solve(graph, [gpu(0, 900, 900)], None, None, WORKLOAD, RESERVE, "latency").__class__ is Infeasible


def test_cpu_only_plan_with_disk_stays_inside_the_cpu_budget():
    # The CPU executes everything; units read back from disk need a staging copy in CPU memory.
    graph = make_graph([100] * 6, 20, 20, tied=False)
    reserve_and_some = 1 * 2**30 + 350 * MiB
    cpu = Target("cpu", reserve_and_some, 0, 0, "flash", False)
    disk = Target("disk", 0, 0, 0, "flash", False)
    result = solve(graph, [], cpu, disk, WORKLOAD, RESERVE, "latency")
    assert isinstance(result, Placement)
    cpu_ledger = next(l for l in result.ledgers if l.key == "cpu")
    assert "disk" in result.device_of.values()
    assert cpu_ledger.staging == 100 * MiB and cpu_ledger.free >= 0


def test_a_long_head_is_searched_as_one_unit():
    # Phi-4-multimodal's 700 vision and audio encoder modules run before its layers, so all stay on
    # the main GPU: the search treats them as one unit, and the plan is the one for that unit.
    layers = [100] * 16
    gpus = [gpu(i, 900, 900) for i in range(8)]
    for objective in ("latency", "balance"):
        long = solve(make_graph(layers, 50, 50, False, [8] * 3000), gpus, None, None, WORKLOAD, RESERVE, objective)
        merged = solve(make_graph(layers, 50, 50, False, [8 * 3000]), gpus, None, None, WORKLOAD, RESERVE, objective)
        assert {f"tower.{i}" for i in range(3000)} <= {n for n, d in long.device_of.items() if d == 0}
        assert [long.device_of[f"layers.{i}"] for i in range(16)] == [merged.device_of[f"layers.{i}"] for i in range(16)]
        assert abs(long.peak_utilisation - merged.peak_utilisation) < 1e-9


def test_a_search_too_large_is_refused_at_once():
    graph = make_graph([1] * 3000, 1, 1, False)
    with pytest.raises(ModelError, match="3003 placement units on 8 GPUs: planc's exact solver searches at most"):
        solve(graph, [gpu(i, 900, 900) for i in range(8)], None, None, WORKLOAD, RESERVE, "latency")

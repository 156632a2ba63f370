"""The compiler: spec + model graph + inventory -> Plan.

`compile_plan` is pure: it reads no clock, environment, GPU or file; the model graph builder is
passed in. `compile_spec` does the I/O around it (spec, config, weight hashes, package versions)
and `check_lock` answers `planc compile --check` from the lock's recorded inputs alone, so it
needs neither torch nor transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Callable

from planc import __version__
from planc.errors import InfeasibleError, ModelError, SpecError, StalePlanError, foreign_errors
from planc.hardware import Inventory, resolve_inventory
from planc.limits import config_scale_problem
from planc.memory import Reserve, Workload
from planc.model.config import describe_model
from planc.plan import (
    BASE_FORMAT_VERSION,
    FORMAT_VERSION,
    Attention,
    Decision,
    Device,
    Generation,
    Host,
    Inputs,
    Ledger,
    Mixers,
    ModelInfo,
    NodeHost,
    Objective,
    Packages,
    Parallel,
    Plan,
    Rank,
    StrategyOption,
    WeightFile,
    WeightQuantization,
    dump_lock,
    load_lock,
)
from planc.plan import Workload as LockWorkload
from planc.spec import Spec, load_spec
from planc.units import GiB

SOLVER_SOURCE = "planc solver (src/planc/solver.py)"


@dataclass(frozen=True)
class ModelInput:
    """What the compiler knows of the model besides its graph."""

    config: dict
    config_sha256: str
    weights: dict[str, WeightFile]
    id: str | None
    path: str | None  # relative to the lock
    config_path: str | None  # relative to the lock


def _prefill_chunks(workload, max_seq_len: int | None = None) -> list[int | None]:
    """The prefill chunks compile may choose from, whole first: the spec's own, or the candidates;
    only the whole prefill with images, which generate cannot split into chunks (the spec refuses
    a chunk with images)."""
    if workload.prefill_chunk_size:
        return [workload.prefill_chunk_size]
    if workload.images_per_sequence:
        return [None]
    return _chunk_candidates(max_seq_len or workload.max_seq_len)


def _chunk_candidates(max_seq_len: int) -> list[int | None]:
    """Whole prefill first, then power-of-two chunks from large to small (largest that fits wins)."""
    chunks: list[int | None] = [None]
    size = 1 << (max_seq_len - 1).bit_length() - 1 if max_seq_len > 1 else 1
    while size >= 256:
        if size < max_seq_len:
            chunks.append(size)
        size //= 2
    return chunks


def _targets(inventory: Inventory, runtime, headroom: float, level: str):
    from planc.solver import Target

    gpus = [
        Target(
            key=gpu.index,
            capacity=gpu.memory,
            headroom=int(gpu.memory * headroom),
            bandwidth=gpu.bandwidth,
            # Forced-eager models materialise scores differently from SDPA's math path.
            backend="eager" if runtime.attn_implementation == "eager" else runtime.backend_per_gpu[gpu.index],
            gpu=True,
            kind=(gpu.name, gpu.memory, gpu.compute_capability, gpu.bandwidth),
        )
        for gpu in inventory.gpus
    ]
    cpu_backend = "eager" if runtime.attn_implementation == "eager" else "cpu"
    # Offloaded layers run on the main GPU; on a CPU-only plan the CPU runs them.
    host_backend = gpus[0].backend if gpus else cpu_backend
    cpu = Target("cpu", inventory.cpu_memory, 0, 0, host_backend, False) if level in ("cpu", "disk") else None
    disk = Target("disk", 0, 0, 0, host_backend, False) if level == "disk" else None
    return gpus, cpu, disk


def _levels(policy_offload: str, has_gpus: bool) -> list[str]:
    levels = {"none": ["none"], "cpu": ["none", "cpu"], "disk": ["none", "cpu", "disk"]}[policy_offload]
    if not has_gpus:
        levels = [level for level in levels if level != "none"]
    return levels


def _solve(graph, inventory, runtime, spec: Spec, workload: Workload, level: str):
    from planc.model.cache import FALLBACK
    from planc.solver import solve

    gpus, cpu, disk = _targets(inventory, runtime, spec.policy.headroom, level)
    return solve(
        graph, gpus, cpu, disk, workload, Reserve.from_policy(spec.policy.reserve), spec.policy.objective,
        runtime.mixer_path or FALLBACK,
    )


def _fits(graph, inventory, runtime, spec, batch: int, seq: int) -> bool:
    """Whether batch x seq fits at the policy's deepest offload level and the smallest prefill chunk."""
    from planc.model.cache import FALLBACK
    from planc.solver import feasible

    levels = _levels(spec.policy.offload, bool(inventory.gpus))
    chunks = _prefill_chunks(spec.workload, seq)[-1:]
    gpus, cpu, disk = _targets(inventory, runtime, spec.policy.headroom, levels[-1])
    return feasible(
        graph, gpus, cpu, disk, _workload(spec, graph, batch, seq, chunks[0]), Reserve.from_policy(spec.policy.reserve),
        runtime.mixer_path or FALLBACK,
    )


def _workload(spec: Spec, graph, batch: int, seq: int, chunk: int | None = None) -> Workload:
    """The ledger's workload: the spec's images and source with the given batch, context and prefill chunk."""
    wl = spec.workload
    return Workload(batch, seq, chunk, wl.images_per_sequence, wl.image_size, _source_tokens(spec, graph))


def _source_tokens(spec: Spec, graph) -> int:
    """The source tokens an encoder-decoder's encoder reads per sequence (0 for decoder-only models)."""
    wl = spec.workload
    if graph.encoder is None:
        if wl.source_tokens is not None:
            raise SpecError(
                f"workload.source_tokens is set but {graph.architecture} is no encoder-decoder model: its prompt "
                "counts within max_seq_len"
            )
        return 0
    source = graph.encoder.source_tokens(wl.source_tokens, wl.max_seq_len)
    patches = graph.encoder.image_patches
    if wl.images_per_sequence and patches and source <= patches:
        # Udop: the encoder appends all of one image's patches after the prompt's tokens.
        raise SpecError(
            f"workload.source_tokens {source}: the encoder's source holds the prompt's tokens and the image's {patches} "
            f"patches, which the encoder appends after them; plan at least {patches + 1} source tokens"
        )
    if wl.images_per_sequence and graph.vision is not None and graph.encoder.source == "text":
        # Florence2: each image's features take image-token positions of the encoder's source.
        tokens = wl.images_per_sequence * graph.vision.image_tokens(
            Workload(wl.batch_size, wl.max_seq_len, image_size=wl.image_size))
        if source <= tokens:
            raise SpecError(
                f"workload.source_tokens {source}: the encoder's source holds the prompt's text and its images' "
                f"{tokens} tokens ({wl.images_per_sequence} x {tokens // wl.images_per_sequence}); plan at least "
                f"{tokens + 1} source tokens"
            )
    return source


def largest_below(predicate: Callable[[int], bool], upper: int) -> int:
    """Largest x in [1, upper) with predicate(x) true (predicate monotone), 0 if none."""
    lo, hi = 0, upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if predicate(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _describe_ledger(ledger, name: str) -> str:
    g = lambda n: f"{n / GiB:.1f}"  # noqa: E731
    has = ledger.capacity - ledger.headroom
    return (
        f"{name} needs {g(ledger.total)} GiB (weights {g(ledger.weights)} + KV {g(ledger.kv_cache)} + "
        f"activations {g(ledger.activations)} + reserve {g(ledger.reserve)}"
        + (f" + staging {g(ledger.staging)}" if ledger.staging else "")
        + f"), has {g(has)} GiB"
    )


def _device_name(key, inventory: Inventory) -> str:
    if isinstance(key, int):
        return f"GPU {key} ({inventory.gpus[key].name})"
    return key.upper() if key == "cpu" else key


def _infeasible_message(graph, inventory, runtime, spec: Spec, closest, builder: "_Builder") -> str:
    wl = spec.workload
    over = closest.overflowing() or list(closest.ledgers)
    parts = [_describe_ledger(ledger, _device_name(ledger.key, inventory)) for ledger in over]
    head = f"{graph.architecture} ({_weights_phrase(graph)}) does not fit at batch {wl.batch_size} x {wl.max_seq_len} tokens"
    dequantized = _dequantizing_rule(graph, runtime)
    if dequantized is not None:
        # Dequantization is what the inventory forces; say so, and what the quantized layout weighs.
        native = builder.graph(graph.dtype, graph.quantization.with_native(True))
        head = (
            f"{graph.architecture} is dequantized on this inventory: {dequantized.reason} (rule {dequantized.id}); "
            f"it loads as {graph.weight_bytes / GiB:.1f} GiB of {graph.dtype} ({native.weight_bytes / GiB:.1f} GiB as "
            f"{graph.quantization.method}) and does not fit at batch {wl.batch_size} x {wl.max_seq_len} tokens"
        )
    hints = []
    seq = largest_below(lambda s: _fits(graph, inventory, runtime, spec, wl.batch_size, s), wl.max_seq_len)
    if seq:
        hints.append(f"max_seq_len {seq} at batch {wl.batch_size}")
    if wl.batch_size > 1:
        batch = largest_below(lambda b: _fits(graph, inventory, runtime, spec, b, wl.max_seq_len), wl.batch_size)
        if batch:
            hints.append(f"batch_size {batch} at {wl.max_seq_len} tokens")
    if spec.policy.offload != "disk" and inventory.gpus:
        for level in ("cpu", "disk"):
            if level == "cpu" and spec.policy.offload == "cpu":
                continue
            relaxed = spec.model_copy(update={"policy": spec.policy.model_copy(update={"offload": level})})
            if _fits(graph, inventory, runtime, relaxed, wl.batch_size, wl.max_seq_len):
                hints.append(f"policy.offload: {level}")
                break
    hints += _quantization_hints(graph, inventory, runtime, spec, builder)
    fits = "; would fit: " + ", or ".join(hints) if hints else "; nothing smaller fits either: more or larger GPUs are needed"
    return f"{head}: " + "; ".join(parts) + fits


def _weights_phrase(graph) -> str:
    quantization = graph.quantization
    if quantization is not None and quantization.native:
        return f"{graph.weight_bytes / GiB:.1f} GiB of weights, {quantization.method} with the rest in {graph.dtype}"
    return f"{graph.weight_bytes / GiB:.1f} GiB of weights in {graph.dtype}"


def _dequantizing_rule(graph, runtime):
    """The rule that made transformers' dequantization the plan's, when the GPUs force it (not on a CPU plan)."""
    if graph.quantization is None or graph.quantization.native or not runtime.backend_per_gpu:
        return None
    return next(d for d in runtime.decisions if d.id == runtime.quantization_rule)


def _quantization_hints(graph, inventory, runtime, spec: Spec, builder: "_Builder") -> list[str]:
    """What quantization would make the workload fit: bitsandbytes at load, or an fp8 KV cache."""
    from planc.errors import ModelError
    from planc.model.quant import load_quantization
    from planc.rules import decide_runtime
    from planc.spec import Quantize

    wl = spec.workload
    hints = []
    if builder.quantization is None:
        for method in ("bnb-8bit", "bnb-4bit"):
            facts = replace(builder.facts, quantization=method)
            try:
                quantized_runtime = decide_runtime(inventory.gpus, facts, spec.model.dtype, spec.policy.mixer_kernels)
            except SpecError:
                continue  # the rules refuse it on this inventory (LLM.int8() below sm75)
            dtype = quantized_runtime.dtype
            quantized = builder.graph(dtype, load_quantization(Quantize(method=method), dtype))
            if _fits(quantized, inventory, quantized_runtime, spec, wl.batch_size, wl.max_seq_len):
                hints.append(f"model.quantize: {method}")
                break
    if spec.model.kv_cache is None:
        try:
            fp8_cache = builder.graph(graph.dtype, graph.quantization, kv_cache="fp8")
        except ModelError:
            return hints  # sliding-window or hybrid layers: transformers refuses a quantized cache
        if _fits(fp8_cache, inventory, runtime, spec, wl.batch_size, wl.max_seq_len):
            hints.append("model.kv_cache: fp8")
    return hints


def _model_facts(graph, quantization: str | None = None):
    from planc.rules import ModelFacts

    return ModelFacts(
        model_type=graph.model_type,
        checkpoint_dtype=graph.checkpoint_dtype,
        is_moe=graph.is_moe,
        head_dim=max(max(s.head_dim, s.v_head_dim) for s in [graph.shapes, *(u.shapes for u in graph.units if u.shapes)]),
        forced_attn_implementation=graph.forced_attn_implementation,
        skip_keys=graph.skip_keys,
        quantization=quantization,
        mixer_families=graph.mixer_families,
        half_precision_generates=graph.half_precision_generates,
    )


@dataclass
class _Builder:
    """The model graphs a compile needs, each built once: per dtype, quantization (native or not) and KV cache."""

    config: dict
    trust: bool
    kv_cache: str | None
    quantization: object | None  # planc.model.quant.Quantization as the checkpoint or spec says, unresolved
    requested: object | None  # spec.model.quantize
    build: Callable
    facts: object = None  # ModelFacts, once the probe graph is built
    built: dict = field(default_factory=dict)

    def graph(self, dtype: str, quantization, kv_cache: str | None = "default"):
        kv = self.kv_cache if kv_cache == "default" else kv_cache
        key = (dtype, quantization, kv)
        if key not in self.built:
            self.built[key] = self.build(self.config, dtype, self.trust, quantization=quantization, kv_cache=kv)
        return self.built[key]

    def resolved(self, runtime):
        """The quantization as `runtime` has it: native or dequantized; bitsandbytes at the plan's compute dtype."""
        from planc.model.quant import load_quantization

        if self.quantization is None:
            return None
        if self.quantization.origin == "load":
            return load_quantization(self.requested, runtime.dtype)
        return self.quantization.with_native(runtime.quantized_weights == "native")

    def for_runtime(self, runtime):
        return self.graph(runtime.dtype, self.resolved(runtime))


def compile_plan(
    spec: Spec,
    inventory: Inventory,
    model: ModelInput,
    packages: Packages,
    disk: str | None,
    build_graph: Callable[..., object],
) -> Plan:
    """Compile a plan. Pure: everything it depends on is an argument.

    `build_graph(config, dtype, trust_remote_code, quantization=, kv_cache=)` builds the model graph
    (planc.model.build_model_graph).
    """
    from planc.model.quant import quantization_of
    from planc.rules import decide_runtime

    from planc.parallel.strategy import considered_strategies

    nodes = inventory.all_nodes()
    several_ranks = len(nodes) > 1 or any((node.cpu_ranks or 1) > 1 for node in nodes)
    if not inventory.gpus and spec.policy.offload == "none" and not several_ranks:
        raise SpecError("hardware.gpus is empty: a CPU-only plan needs policy.offload: cpu (or disk)")
    if spec.policy.offload == "disk" and not disk:
        raise SpecError("policy.offload is disk but hardware.disk names no offload folder")
    names = [gpu.name for gpu in inventory.gpus]
    for node in nodes[1:]:
        if [gpu.name for gpu in node.gpus] != names:
            raise SpecError(
                f"hardware.nodes.{node.index}: its GPUs differ from node 0's; planc plans nodes with identical GPUs"
            )
    trust = spec.model.trust_remote_code

    scale = config_scale_problem(model.config)
    if scale:
        raise ModelError(f"{describe_model(model.config)}: config.json {scale}")

    build_graph = _guarded(build_graph)
    probe_dtype = "bfloat16" if spec.model.dtype == "auto" else spec.model.dtype
    quantization = quantization_of(model.config, spec.model.quantize, probe_dtype)
    if quantization is not None and quantization.origin == "load" and not inventory.gpus and spec.policy.offload == "disk":
        raise SpecError(
            f"model.quantize {quantization.method} on a CPU-only plan cannot offload to disk: with disk entries in the "
            "device_map transformers keeps every CPU module unquantized (llm_int8_enable_fp32_cpu_offload)"
        )
    builder = _Builder(model.config, trust, spec.model.kv_cache, quantization, spec.model.quantize, build_graph)
    # The rules' facts do not depend on the layout: probe with the dense (dequantized) model.
    probe = builder.graph(probe_dtype, quantization.with_native(False) if quantization and quantization.origin == "checkpoint" else None)
    builder.facts = _model_facts(probe, quantization.method if quantization else None)
    _check_images(spec, probe)
    _source_tokens(spec, probe)  # a source_tokens the model cannot take is refused before the search
    limit = getattr(probe, "position_limit", None)
    if limit and spec.workload.max_seq_len > limit:
        raise SpecError(
            f"workload.max_seq_len {spec.workload.max_seq_len} exceeds the {limit} positions of "
            f"{probe.architecture}'s {probe.position_table}: tokens past {limit} have no position "
            f"(generate fails there); plan at most {limit} tokens"
        )

    wanted = considered_strategies(spec, inventory)
    strategy_note = None
    # Planned for one process only: (decision id, the refusal's middle, the reason, its source).
    one_process = None
    if quantization is not None or spec.model.kv_cache is not None:
        what = f"{quantization.method} weights" if quantization is not None else f"a {spec.model.kv_cache} KV cache"
        one_process = (
            "parallel.quantized-device-map", f" with {what}: planc sizes quantized layouts",
            f"planc sizes {what} for one process only: the model's TP plan shards dense tensors, and the quantized "
            "layouts' per-rank shares are not modelled",
            "planc.model.quant; transformers distributed/tensor_parallel.py",
        )
    elif probe.encoder is not None:
        one_process = (
            "parallel.encoder-decoder-device-map",
            f": {probe.architecture} is an encoder-decoder model, and planc plans those",
            f"{probe.architecture} is an encoder-decoder model: transformers' pipeline split moves a decoder-only "
            "layout, and planc does not size an encoder's or a cross-attention's per-rank shares",
            "planc.model.encoder_decoder",
        )
    if one_process is not None:
        decision_id, refusal, reason, source = one_process
        if spec.policy.parallelism in ("tensor", "pipeline"):
            raise SpecError(
                f"policy.parallelism {spec.policy.parallelism}{refusal} "
                "for one process (an accelerate device_map) only; set policy.parallelism: device_map or auto"
            )
        if wanted != {"device_map"}:
            strategy_note = Decision(
                id=decision_id,
                decision="one process (accelerate device_map); tensor and pipeline parallelism not weighed",
                reason=reason, source=source,
            )
            wanted = {"device_map"}
    if wanted == {"device_map"}:
        return _one_process_plan(spec, inventory, model, packages, disk, builder, strategy_note)
    runtime = decide_runtime(inventory.gpus, builder.facts, spec.model.dtype, spec.policy.mixer_kernels)
    graph = builder.for_runtime(runtime)
    return _strategy_plan(spec, inventory, model, packages, disk, builder, graph, runtime)


def _one_process_plan(spec, inventory, model, packages, disk, builder: _Builder, strategy_note) -> Plan:
    """The device_map plan; a quantized model natively on the GPUs that run it natively, when they hold it."""
    from planc.rules import decide_runtime

    extra: list[Decision] = [strategy_note] if strategy_note else []
    try:
        runtime = decide_runtime(inventory.gpus, builder.facts, spec.model.dtype, spec.policy.mixer_kernels)
    except SpecError:
        # The whole inventory cannot run it (an fp8 checkpoint dequantized to bf16 for a V100): the
        # GPUs that hold it natively may.
        native = _native_subset(inventory, builder, spec, None)
        if native is None:
            raise
        graph, runtime, placement, chunk, decision = native
        extra.append(decision)
    else:
        graph = builder.for_runtime(runtime)
        placement, chunk, closest = _place(graph, inventory, runtime, spec)
        native = _native_subset(inventory, builder, spec, runtime)
        if native is not None:
            graph, runtime, placement, chunk, decision = native
            extra.append(decision)
    if placement is None:
        raise InfeasibleError(_infeasible_message(graph, inventory, runtime, spec, closest, builder))
    return _device_map_plan(spec, inventory, model, packages, disk, builder, graph, runtime, placement, chunk,
                            extra=extra)


def _guarded(build_graph: Callable[..., object]) -> Callable[..., object]:
    """`build_graph` whose foreign exceptions become a ModelError naming the model.

    Whatever transformers raises while building an architecture from its config is about that
    config, not a planc bug: one line naming the model.
    """

    def build(config: dict, dtype: str, trust_remote_code: bool, **kwargs):
        with foreign_errors(ModelError, f"cannot build {describe_model(config)} from its config"):
            return build_graph(config, dtype, trust_remote_code, **kwargs)

    return build


def _device_map_plan(spec, inventory, model, packages, disk, builder: _Builder, graph, runtime, placement, chunk,
                     parallel=None, strategy_decision=None, extra=()) -> Plan:
    """A one-process plan: accelerate's device_map from the solver's placement."""
    from planc.rules import decide_runtime

    extra = list(extra)
    if spec.model.dtype == "auto":
        used = sorted({k for k in placement.device_of.values() if isinstance(k, int)})
        used_gpus = tuple(gpu for gpu in inventory.gpus if gpu.index in used)
        narrowed = decide_runtime(used_gpus, builder.facts, "auto", spec.policy.mixer_kernels) if used_gpus else runtime
        if narrowed.dtype != runtime.dtype and narrowed.quantized_weights == runtime.quantized_weights:
            # The placement leaves the cards that forced the dtype idle: plan the used ones alone,
            # in the dtype they support (same bytes per element, so the same split still fits).
            idle = [gpu for gpu in inventory.gpus if gpu.index not in used]
            subset = Inventory(used_gpus, inventory.cpu_memory, inventory.disk)
            regraph = builder.for_runtime(narrowed)
            replaced, rechunk, _ = _place(regraph, subset, narrowed, spec)
            if replaced is not None:
                graph, runtime, placement, chunk = regraph, narrowed, replaced, rechunk
                names = ", ".join(f"GPU {g.index} ({g.name}, sm{g.sm})" for g in idle)
                extra.append(
                    Decision(
                        id="solver.dtype-of-used-gpus",
                        decision=f"dtype {narrowed.dtype}; {names} left unused",
                        reason=f"the best placement does not use {names}, the card(s) that ruled out "
                        f"{narrowed.dtype}; the GPUs that run the model all support it",
                        source=SOLVER_SOURCE,
                    )
                )

    decisions = [Decision(id=d.id, decision=d.decision, reason=d.reason, source=d.source) for d in runtime.decisions]
    decisions += (
        _model_decisions(graph)
        + ([strategy_decision] if strategy_decision else [])
        + _planner_decisions(spec, graph, placement, chunk, inventory)
        + extra
        + _quantization_decisions(spec, graph, placement)
    )
    plan = _assemble(spec, inventory, model, packages, disk, graph, runtime, placement, chunk, decisions)
    if parallel is not None:
        plan = plan.model_copy(update={"parallel": parallel, "format_version": FORMAT_VERSION}).sealed()
    return plan


def _device_map_candidate(graph, inventory, runtime, spec):
    from planc.parallel.cost import DecodeCost
    from planc.parallel.strategy import Candidate

    if not inventory.gpus and spec.policy.offload == "none":
        return Candidate("device_map", "accelerate", 1, 1, refusal="no GPU on node 0 and policy.offload is none")
    placement, chunk, closest = _place(graph, inventory, runtime, spec)
    if placement is None:
        over = closest.overflowing() or list(closest.ledgers)
        reason = "; ".join(_describe_ledger(ledger, _device_name(ledger.key, inventory)) for ledger in over)
        return Candidate("device_map", "accelerate", 1, 1, refusal=f"node 0 cannot hold it: {reason}")
    return Candidate("device_map", "accelerate", 1, 1, cost=DecodeCost(placement.decode_seconds, 0.0, 0.0),
                     placement=(placement, chunk))


def _strategy_plan(spec, inventory, model, packages, disk, builder: _Builder, graph, runtime) -> Plan:
    """Weigh the strategies the policy allows; plan the chosen one."""
    from planc.parallel.strategy import STRATEGY_SOURCE, choice_reason, choose, plan_strategies

    wl = spec.workload
    reserve = Reserve.from_policy(spec.policy.reserve)
    chunks = _prefill_chunks(wl)
    candidates = plan_strategies(
        graph, inventory, runtime, spec, [_workload(spec, graph, wl.batch_size, wl.max_seq_len, chunk) for chunk in chunks],
        reserve, lambda: _device_map_candidate(graph, inventory, runtime, spec),
    )
    chosen = choose(candidates, graph, _workload(spec, graph, wl.batch_size, wl.max_seq_len))
    decision = Decision(
        id="parallel.strategy",
        decision=f"{chosen.label}",
        reason=choice_reason(chosen, candidates, inventory, spec.policy.parallelism),
        source=STRATEGY_SOURCE + "; transformers distributed/ and vLLM engine arguments (reference/distributed.md)",
    )
    parallel = _parallel_section(chosen, candidates, inventory)
    if chosen.strategy == "device_map":
        placement, chunk = chosen.placement
        return _device_map_plan(spec, inventory, model, packages, disk, builder, graph, runtime, placement, chunk,
                                parallel, decision)
    return _assemble_distributed(spec, inventory, model, packages, disk, graph, runtime, chosen, parallel, decision)


def _parallel_section(chosen, candidates, inventory) -> Parallel:
    considered = [
        StrategyOption(
            strategy=c.strategy,
            engine=c.engine,
            tensor_parallel_size=c.tp,
            pipeline_parallel_size=c.pp,
            fits=c.fits,
            decode_ms_per_token=round(c.ms, 3) if c.fits else None,
            detail=c.cost.describe() if c.fits else c.refusal,
        )
        for c in candidates
    ]
    ranks, hosts = [], []
    if chosen.layout is not None:
        layout = chosen.layout
        ranks = [
            Rank(rank=slot.rank, node=slot.node, device=slot.device, stage=slot.stage,
                 layers=list(layout.stages[slot.stage]))
            for slot in layout.ranks
        ]
        for node in inventory.all_nodes():
            on_node = sum(1 for slot in layout.ranks if slot.node == node.index)
            hosts.append(NodeHost(index=node.index, gpus=len(node.gpus), cpu_memory=node.cpu_memory, ranks=on_node))
    gpu = bool(chosen.layout and chosen.layout.ranks[0].gpu)
    return Parallel(
        strategy=chosen.strategy,
        engine=chosen.engine,
        tensor_parallel_size=chosen.tp,
        pipeline_parallel_size=chosen.pp,
        backend=None if chosen.layout is None else ("nccl" if gpu else "gloo"),
        ranks=ranks,
        nodes=hosts,
        considered=considered,
    )


def _assemble_distributed(spec, inventory, model, packages, disk, graph, runtime, chosen, parallel, decision) -> Plan:
    """A plan of ranks: one Ledger per rank, no device_map (each rank loads its own share)."""
    chunk = chosen.chunk
    ledgers = []
    for ledger in chosen.ledgers:
        slot = ledger.slot
        names = list(ledger.units)
        ledgers.append(
            Ledger(
                device=slot.device, capacity=slot.capacity, headroom=slot.headroom, reserve=ledger.reserve,
                weights=ledger.weights, kv_cache=ledger.kv_cache, activations=ledger.activations, staging=0,
                total=ledger.total, free=ledger.free, modules=[names[0], names[-1]] if names else [],
                communication=ledger.communication, rank=slot.rank, node=slot.node,
            )
        )
    decisions = [Decision(id=d.id, decision=d.decision, reason=d.reason, source=d.source) for d in runtime.decisions]
    decisions.append(decision)
    layout = chosen.layout
    if layout.pp > 1:
        counts = ", ".join(str(end - start) for start, end in layout.stages)
        split = "transformers' even split (PipelineStage.layer_range_for_rank: the last stage takes the remainder)"
        if layout.engine == "vllm":
            split = "vLLM's split (get_pp_indices: the remainder on the stages before the last), pinned by VLLM_PP_LAYER_PARTITION"
        decisions.append(Decision(id="parallel.pipeline-split", decision=f"layers per stage: {counts}",
                                  reason=f"{split}; every rank's ledger is that stage's layers",
                                  source="transformers distributed/pipeline_parallel.py; vllm distributed/utils.py"))
    if layout.tp > 1:
        support = graph.parallel
        split = []
        if support.heads_sharded or layout.engine == "vllm":
            split.append(f"{graph.shapes.num_attention_heads // layout.tp} of {graph.shapes.num_attention_heads} query heads")
        if support.kv_heads_sharded or layout.engine == "vllm":
            kv = graph.shapes.num_key_value_heads
            split.append(f"{max(1, kv // layout.tp)} of {kv} KV heads")
        split.append("1/" + str(layout.tp) + " of the feed-forward, embedding and head")
        decisions.append(Decision(
            id="parallel.tensor-split", decision=f"each of {layout.tp} ranks holds " + ", ".join(split),
            reason="the model's own TP plan (base_model_tp_plan/_tp_plan) read on the meta model: what it splits is "
            "sharded, norms and what it does not name are replicated; heads and KV heads divide the group size",
            source="transformers distributed/tensor_parallel.py",
        ))
    if chunk:
        decisions.append(Decision(
            id="generation.prefill-chunk", decision=f"prefill_chunk_size {chunk}",
            reason=f"a whole-prompt prefill of {spec.workload.max_seq_len} tokens does not fit a rank's activation "
            f"budget; {chunk} is the largest power-of-two chunk that does",
            source="transformers GenerationConfig.prefill_chunk_size; field-notes section 2",
        ) if not spec.workload.prefill_chunk_size else Decision(
            id="generation.prefill-chunk", decision=f"prefill_chunk_size {chunk}", reason="set by the spec",
            source="spec.workload.prefill_chunk_size"))
    gpu_ledgers = [l for l in ledgers if isinstance(l.device, int)]
    devices = [
        Device(index=g.index, name=g.name, memory=g.memory, compute_capability=g.compute_capability,
               bandwidth=g.bandwidth, catalogue=g.catalogue, node=node.index)
        for node in inventory.all_nodes()
        for g in node.gpus
    ]
    return Plan(
        format_version=FORMAT_VERSION,  # the parallel section and the per-rank ledgers are 1.1 fields
        inputs=Inputs(spec_sha256=spec.sha256(), config_sha256=model.config_sha256, weights=model.weights,
                      packages=packages, versions=spec.policy.versions),
        model=ModelInfo(id=model.id, path=model.path, config=model.config_path, revision=spec.model.revision,
                        trust_remote_code=spec.model.trust_remote_code, architecture=graph.architecture,
                        model_type=graph.model_type, config_class=graph.config_class, parameters=graph.parameters,
                        weight_bytes=graph.weight_bytes),
        devices=devices,
        host=Host(cpu_memory=inventory.cpu_memory, disk=disk),
        workload=_lock_workload(spec, graph),
        dtype=runtime.dtype,
        device_map={},
        max_memory={},
        no_split_module_classes=list(graph.no_split_module_classes),
        skip_keys=list(graph.skip_keys),
        tied_parameters=[list(group) for group in graph.tied_parameters],
        attention=Attention(attn_implementation=runtime.attn_implementation, sdpa_backends=list(runtime.sdpa_backends),
                            per_device={str(k): v for k, v in sorted(runtime.backend_per_gpu.items())}),
        env=dict(sorted(runtime.env.items())),
        generation=Generation(prefill_chunk_size=chunk, experts_implementation=runtime.experts_implementation),
        mixers=_mixers_section(graph, runtime),
        memory=ledgers,
        objective=Objective(
            name=spec.policy.objective,
            decode_ms_per_token=round(chosen.ms, 3),
            peak_utilisation=round(max(((l.total + l.headroom) / l.capacity for l in gpu_ledgers), default=0.0), 4),
        ),
        decisions=decisions,
        parallel=parallel,
    ).sealed()


def _lock_workload(spec: Spec, graph) -> LockWorkload:
    wl = spec.workload
    return LockWorkload(batch_size=wl.batch_size, max_seq_len=wl.max_seq_len,
                        images_per_sequence=wl.images_per_sequence, image_size=wl.image_size,
                        source_tokens=_source_tokens(spec, graph))


def _uses_1_1_fields(spec: Spec, graph, mixers: Mixers | None) -> bool:
    """Whether the plan writes a 1.1 field (model.config_class, workload images, the mixers section)."""
    return bool(graph.config_class or spec.workload.images_per_sequence or spec.workload.image_size or mixers
                or graph.encoder is not None)


def _check_images(spec: Spec, graph) -> None:
    """Images need a vision tower, and a size where the tower takes any resolution."""
    wl = spec.workload
    if not wl.images_per_sequence:
        if wl.image_size is not None:
            raise SpecError("workload.image_size is set but images_per_sequence is 0")
        if graph.needs_images:
            raise SpecError(
                f"{graph.architecture} generates only from an image (its generate requires pixel_values): set "
                "workload.images_per_sequence"
            )
        return
    if graph.vision is None and graph.encoder is not None and graph.encoder.image_patches:
        _check_encoder_image(wl, graph)
        return
    if graph.vision is None:
        raise SpecError(
            f"workload.images_per_sequence is {wl.images_per_sequence} but {graph.architecture} has no vision tower"
        )
    if graph.vision.image_refusal:
        raise SpecError(
            f"workload.images_per_sequence {wl.images_per_sequence}: {graph.architecture} cannot take an image: "
            f"{graph.vision.image_refusal}"
        )
    if graph.vision.pooled_tokens and wl.image_size not in (None, graph.vision.image_size):
        side = graph.vision.image_size
        raise SpecError(
            f"workload.image_size {wl.image_size}: {graph.architecture}'s projector pools the patch grid of its "
            f"config's {side} x {side} images only (it reshapes the tower's output to that grid); leave image_size unset"
        )
    graph.vision.patches_per_image(_workload(spec, graph, wl.batch_size, wl.max_seq_len))


def _check_encoder_image(wl, graph) -> None:
    """A text encoder that embeds the image itself (Udop) reads one image of its config's size."""
    side = graph.encoder.image_side
    if wl.images_per_sequence > 1:
        raise SpecError(
            f"workload.images_per_sequence {wl.images_per_sequence}: {graph.architecture}'s encoder appends the "
            "patches of one image (pixel_values of one per sequence) to the prompt's tokens; plan 1"
        )
    if wl.image_size is not None and wl.image_size != side:
        raise SpecError(
            f"workload.image_size {wl.image_size}: {graph.architecture}'s patch embedding takes only its config's "
            f"{side} x {side} images (it raises on any other size); leave image_size unset"
        )


def _model_decisions(graph) -> list[Decision]:
    """How the model was read: a class resolved by `architectures`, layers kept whole without no-split classes."""
    out = []
    if graph.config_class:
        out.append(
            Decision(
                id="model.architecture",
                decision=f"{graph.architecture} with {graph.config_class}",
                reason=f"model_type {graph.model_type!r} is unknown to transformers and config.architectures names "
                f"{graph.architecture}, which it ships; the checkpoint's own code (auto_map) is not run",
                source="config.json architectures (as vLLM resolves models); planc.model.build",
            )
        )
    if graph.inferred_no_split:
        out.append(
            Decision(
                id="model.no-split",
                decision=f"each {', '.join(graph.inferred_no_split)} kept on one device",
                reason=f"{graph.architecture} declares no _no_split_modules; planc cuts only between decoder layers "
                "(accelerate would otherwise split a layer's modules across devices)",
                source="planc.model.graph",
            )
        )
    if graph.encoder is not None:
        out.append(
            Decision(
                id="model.encoder",
                decision=f"encoder ({graph.encoder.path}, {graph.encoder.source} source) placed as units ahead of the "
                "decoder layers, on the main GPU",
                reason="generate runs the encoder once per prompt and keeps its output (batch x source tokens x "
                f"{graph.encoder.output_width}) on the input device for every step; each decoder layer keeps the "
                "source's cross-attention K/V, fixed after the first step",
                source="planc.model.encoder_decoder; transformers generation/utils.py, cache_utils.py "
                "EncoderDecoderCache",
            )
        )
    if graph.vision is not None:
        out.append(
            Decision(
                id="model.vision",
                decision=f"vision tower ({', '.join(graph.vision.towers)}) placed as units ahead of the decoder layers",
                reason="the tower runs once per prefill over the prompt's images; its blocks are placement units "
                "like decoder layers, and the ledger holds its activations for every image of the batch",
                source="planc.model.vision",
            )
        )
    if graph.gated_cross is not None:
        cross = graph.gated_cross
        out.append(
            Decision(
                id="model.gated-cross-attention",
                decision=f"{len(cross.blocks)} gated cross-attention blocks placed in the chain, each before decoder "
                f"layer {', '.join(str(i) for i in cross.before[:3])}{', ...' if len(cross.before) > 3 else ''}",
                reason="IdeficsModel runs a block of gated_cross_attn_layers before every cross_layer_interval-th "
                "decoder layer; it keeps no cache, so every step (prefill and decode) projects K and V of all the "
                "image tokens again, and generate keeps the image states and pixel values on the main device",
                source="planc.model.gated_cross",
            )
        )
    return out


def _native_subset(inventory: Inventory, builder: _Builder, spec: Spec, runtime):
    """A dequantized checkpoint on a mixed inventory: the plan on the GPUs that hold it natively, if it fits there.

    fp8 on sm89+ next to older cards: transformers checks only the current device, so the plan
    itself must keep quantized weights off the older ones; natively the weights are about half
    their dequantized size, so when the newer cards alone hold them the older ones are left idle.
    Returns (graph, runtime, placement, chunk, decision) or None.
    """
    from planc.rules import decide_runtime

    if builder.quantization is None or not inventory.gpus:
        return None
    if runtime is not None and runtime.quantized_weights != "dequantized":
        return None

    def native_on(gpu) -> bool:
        try:
            return decide_runtime([gpu], builder.facts, spec.model.dtype, spec.policy.mixer_kernels).quantized_weights == "native"
        except SpecError:
            return False

    native_gpus = tuple(gpu for gpu in inventory.gpus if native_on(gpu))
    if not native_gpus or len(native_gpus) == len(inventory.gpus):
        return None
    sub_runtime = decide_runtime(native_gpus, builder.facts, spec.model.dtype, spec.policy.mixer_kernels)
    subset = Inventory(native_gpus, inventory.cpu_memory, inventory.disk)
    graph = builder.for_runtime(sub_runtime)
    placement, chunk, _ = _place(graph, subset, sub_runtime, spec)
    if placement is None:
        return None
    idle = ", ".join(f"GPU {g.index} ({g.name}, sm{g.sm})" for g in inventory.gpus if g not in native_gpus)
    method = graph.quantization.method
    instead = (
        f"dequantizing them for every card would hold {builder.graph(runtime.dtype, builder.resolved(runtime)).weight_bytes / GiB:.1f} "
        f"GiB instead of {graph.weight_bytes / GiB:.1f}" if runtime is not None
        else "dequantized, the model cannot run on the whole inventory (see the dtype rules)"
    )
    decision = Decision(
        id="solver.native-quantized-gpus",
        decision=f"{method} weights native on {len(native_gpus)} GPU(s); {idle} left unused",
        reason=f"{method} runs natively only on some GPUs of the inventory, and transformers checks only the current "
        f"device: quantized weights on {idle} would fail at the first forward, and {instead}; the GPUs that run it "
        "natively hold the whole plan",
        source=SOLVER_SOURCE,
    )
    return graph, sub_runtime, placement, chunk, decision


def _quantization_decisions(spec: Spec, graph, placement) -> list[Decision]:
    """The layout the plan sized, what stays dense, and the quantized KV cache."""
    quantization = graph.quantization
    out = []
    if quantization is not None:
        layout = quantization.module.describe(quantization.config)
        dense = ", ".join(graph.dense_modules) or "none"
        held = "as quantized" if quantization.native else f"dequantized to {graph.dtype}"
        out.append(
            Decision(
                id="quant.layout",
                decision=f"{quantization.method} weights {held}: {graph.weight_bytes / GiB:.2f} GiB "
                f"({graph.dense_weight_bytes / GiB:.2f} GiB dense)",
                reason=(f"{layout}; left at {graph.dtype}: {dense}" if quantization.native else
                        f"every weight at {graph.dtype}, as transformers holds it after dequantizing the checkpoint"),
                source=f"planc.model.quant.{quantization.module.__name__.rsplit('.', 1)[-1]} (layout sized from "
                "transformers' own modules on meta)",
            )
        )
        offloaded = [name for name, device in placement.device_of.items() if device in ("cpu", "disk")]
        if quantization.origin == "load" and offloaded and any(isinstance(d, int) for d in placement.device_of.values()):
            out.append(
                Decision(
                    id="quant.offloaded-dense",
                    decision=f"{len(offloaded)} offloaded units unquantized (llm_int8_enable_fp32_cpu_offload)",
                    reason="bitsandbytes quantizes only what sits on a GPU: transformers adds the device_map's cpu and "
                    f"disk entries to the modules it does not convert, so they are held and streamed in {graph.dtype}",
                    source="transformers quantizers/quantizer_bnb_4bit.py: _process_model_before_weight_loading "
                    "(keys_on_cpu)",
                )
            )
    if spec.model.kv_cache is not None:
        out.append(
            Decision(
                id="generation.kv-cache-quantized",
                decision=f"KV cache in {spec.model.kv_cache} (cache_implementation quantized)",
                reason="transformers' Fp8QuantizedLayer keeps keys and values as float8_e4m3fn with one fp32 scale each "
                "per layer (half the bytes of a 16-bit cache); every update dequantizes the whole layer through fp32, "
                "which the activations budget on each GPU",
                source="transformers cache_utils.py: QuantizedCache, Fp8QuantizedLayer",
            )
        )
    return out


def _place(graph, inventory: Inventory, runtime, spec: Spec):
    """First placement found over offload levels (none first) and prefill chunks (whole first).

    Returns (placement or None, chunk, the last Infeasible for the error message).
    """
    from planc.solver import Placement

    wl = spec.workload
    chunks = _prefill_chunks(wl)
    result = None
    for level in _levels(spec.policy.offload, bool(inventory.gpus)):
        for chunk in chunks:
            result = _solve(graph, inventory, runtime, spec, _workload(spec, graph, wl.batch_size, wl.max_seq_len, chunk), level)
            if isinstance(result, Placement):
                return result, chunk, None
    return None, None, result


def _planner_decisions(spec, graph, placement, chunk, inventory) -> list[Decision]:
    wl = spec.workload
    layers_on: dict = {}
    for unit in graph.units:
        if unit.kind == "layer":
            device = placement.device_of[unit.name]
            layers_on[device] = layers_on.get(device, 0) + 1
    split = ", ".join(f"{_device_name(k, inventory)}: {v}" for k, v in layers_on.items())
    objective = spec.policy.objective
    goal = (
        "least predicted decode time (bytes read per token / bandwidth of the device holding them), then lowest peak utilisation"
        if objective == "latency"
        else "lowest peak utilisation, then least predicted decode time"
    )
    out = [
        Decision(
            id="solver.placement",
            decision=f"layers per device: {split}",
            reason=f"optimal contiguous split for objective {objective}: {goal}; every device within its budget "
            f"for weights + KV cache + activations + reserve at batch {wl.batch_size} x {wl.max_seq_len} tokens",
            source=SOLVER_SOURCE,
        )
    ]
    from planc.solver import shared_layer_groups

    groups = shared_layer_groups(graph)
    if groups:
        index = {unit.name: unit.layer_index for unit in graph.units}
        where = "; ".join(
            f"layers {', '.join(str(index[name]) for name in group)} on "
            f"{_device_name(placement.device_of[group[0]], inventory)}"
            for group in groups
        )
        out.append(
            Decision(
                id="solver.shared-blocks",
                decision=f"layers sharing a block on the block's device: {where}",
                reason="these layers call one block whose tied parameters are a single tensor, on the device its "
                "checkpoint entry is loaded to; accelerate's hook on a resident layer moves only the inputs, so "
                "each caller runs there (the hidden states go to it and back, its KV cache and state stay there)",
                source=SOLVER_SOURCE,
            )
        )
    if placement.offloaded_units:
        out.append(
            Decision(
                id="solver.offload",
                decision=f"{placement.offloaded_units} units offloaded (policy.offload: {spec.policy.offload})",
                reason="the GPUs cannot hold the whole model with its KV cache and activations; the fewest units "
                "are offloaded, and they execute on the main GPU, which also holds their KV cache",
                source=SOLVER_SOURCE,
            )
        )
    if wl.prefill_chunk_size:
        out.append(Decision(id="generation.prefill-chunk", decision=f"prefill_chunk_size {chunk}",
                            reason="set by the spec", source="spec.workload.prefill_chunk_size"))
    elif chunk:
        out.append(
            Decision(
                id="generation.prefill-chunk",
                decision=f"prefill_chunk_size {chunk}",
                reason=f"a whole-prompt prefill of {wl.max_seq_len} tokens does not fit the activation budget; "
                f"{chunk} is the largest power-of-two chunk that does",
                source="transformers GenerationConfig.prefill_chunk_size; field-notes section 2",
            )
        )
    return out


def _mixers_section(graph, runtime) -> Mixers | None:
    """How the plan runs its linear-attention / SSM / short-conv layers (None for models without them)."""
    if not runtime.mixer_path:
        return None
    return Mixers(path=runtime.mixer_path, families=list(graph.mixer_families), requires=runtime.mixer_requires)


def _assemble(spec, inventory, model: ModelInput, packages, disk, graph, runtime, placement, chunk, decisions) -> Plan:
    ledgers = []
    max_memory = {}
    for ledger in placement.ledgers:
        names = list(ledger.units)
        ledgers.append(
            Ledger(
                device=ledger.key,
                capacity=ledger.capacity,
                headroom=ledger.headroom,
                reserve=ledger.reserve,
                weights=ledger.weights,
                kv_cache=ledger.kv_cache,
                activations=ledger.activations,
                staging=ledger.staging,
                total=ledger.total,
                free=ledger.free,
                modules=[names[0], names[-1]] if names else [],
            )
        )
        if ledger.key != "disk":
            max_memory[str(ledger.key)] = ledger.capacity - ledger.headroom - (ledger.total - ledger.weights)
    used = {str(k) for k in placement.device_of.values()}
    if "cpu" in used and "cpu" not in max_memory:
        max_memory["cpu"] = inventory.cpu_memory
    gpu_ledgers = [l for l in ledgers if isinstance(l.device, int)]
    mixers = _mixers_section(graph, runtime)
    return Plan(
        # model.config_class, the workload's images and the mixers section are 1.1 fields; a plan
        # without them keeps the 1.0 bytes.
        format_version=FORMAT_VERSION if _uses_1_1_fields(spec, graph, mixers) else BASE_FORMAT_VERSION,
        inputs=Inputs(
            spec_sha256=spec.sha256(),
            config_sha256=model.config_sha256,
            weights=model.weights,
            packages=packages,
            versions=spec.policy.versions,
        ),
        model=ModelInfo(
            id=model.id,
            path=model.path,
            config=model.config_path,
            revision=spec.model.revision,
            trust_remote_code=spec.model.trust_remote_code,
            architecture=graph.architecture,
            model_type=graph.model_type,
            config_class=graph.config_class,
            parameters=graph.parameters,
            weight_bytes=graph.weight_bytes,
        ),
        devices=[
            Device(index=g.index, name=g.name, memory=g.memory, compute_capability=g.compute_capability,
                   bandwidth=g.bandwidth, catalogue=g.catalogue)
            for g in inventory.gpus
        ],
        host=Host(cpu_memory=inventory.cpu_memory, disk=disk),
        workload=_lock_workload(spec, graph),
        dtype=runtime.dtype,
        quantization=_quantization_section(graph, runtime, placement),
        device_map=dict(placement.device_of),
        max_memory=max_memory,
        no_split_module_classes=list(graph.no_split_module_classes),
        skip_keys=list(graph.skip_keys),
        tied_parameters=[list(group) for group in graph.tied_parameters],
        attention=Attention(
            attn_implementation=runtime.attn_implementation,
            sdpa_backends=list(runtime.sdpa_backends),
            per_device={str(k): v for k, v in sorted(runtime.backend_per_gpu.items())},
        ),
        env=dict(sorted(runtime.env.items())),
        generation=Generation(
            prefill_chunk_size=chunk,
            experts_implementation=runtime.experts_implementation,
            cache_implementation="quantized" if spec.model.kv_cache else None,
            cache_config={"backend": spec.model.kv_cache} if spec.model.kv_cache else None,
        ),
        mixers=mixers,
        memory=ledgers,
        objective=Objective(
            name=spec.policy.objective,
            decode_ms_per_token=round(placement.decode_seconds * 1000, 3),
            peak_utilisation=round(max(((l.total + l.headroom) / l.capacity for l in gpu_ledgers), default=0.0), 4),
        ),
        decisions=decisions,
    ).sealed()


def _quantization_section(graph, runtime, placement) -> WeightQuantization | None:
    """The lock's record of the quantization: what from_pretrained gets, what stays dense, what the run needs."""
    quantization = graph.quantization
    if quantization is None:
        return None
    config = quantization.config
    if quantization.origin == "checkpoint" and not quantization.native and "dequantize" in _loading_attributes(quantization):
        config["dequantize"] = True
    offloaded = any(device in ("cpu", "disk") for device in placement.device_of.values())
    if quantization.origin == "load" and offloaded and runtime.backend_per_gpu:
        config["llm_int8_enable_fp32_cpu_offload"] = True
    return WeightQuantization(
        method=quantization.method,
        origin=quantization.origin,
        weights="native" if quantization.native else "dequantized",
        layout=quantization.module.describe(quantization.config) if quantization.native else f"dense {graph.dtype}",
        config=config,
        dense_weight_bytes=graph.dense_weight_bytes,
        dense_modules=list(graph.dense_modules),
        requires_packages=list(runtime.requires_packages),
        requires_compute_capability=f"{runtime.requires_sm // 10}.{runtime.requires_sm % 10}"
        if runtime.requires_sm and quantization.native else None,
    )


def _loading_attributes(quantization) -> set[str]:
    """The quantization_config keys from_pretrained lets a caller override for this method."""
    return {"fp8": {"dequantize"}, "mxfp4": {"dequantize"}}.get(quantization.method, set())


# ---------------------------------------------------------------- I/O around the pure core


def installed_packages() -> Packages:
    """Versions of the packages a plan depends on, without importing them (local build tags dropped)."""

    def version(name: str) -> str:
        try:
            return metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            return "not installed"

    return Packages(planc=__version__, torch=version("torch"), transformers=version("transformers"),
                    accelerate=version("accelerate"))


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def default_lock_path(spec_path: Path) -> Path:
    return spec_path.parent / "plan.lock"


def regenerate_command(spec_path: Path, lock_path: Path) -> str:
    return f"planc compile {_relative(spec_path, lock_path.parent)} -o {lock_path.name}  (paths relative to this file)"


@dataclass(frozen=True)
class ModelLocation:
    files: object  # model.ModelFiles
    model: ModelInput


def locate_model(spec: Spec, spec_dir: Path, lock_dir: Path, hash_weights: bool = True, progress=None) -> ModelLocation:
    """Read the config and hash the weights of the spec's model; paths re-expressed relative to the lock."""
    from planc.checksums import hash_files
    from planc.model import check_model_source_exists, read_model_files

    check_model_source_exists(spec.model, spec_dir)
    files = read_model_files(spec.model, spec_dir)
    weights = hash_files(files.folder, files.weight_files, progress) if hash_weights and files.weight_files else {}
    source = spec.model
    model = ModelInput(
        config=files.config,
        config_sha256=files.config_sha256,
        weights=weights,
        id=source.id,
        path=_relative((spec_dir / source.path).resolve(), lock_dir.resolve()) if source.path else None,
        config_path=_relative((spec_dir / source.config).resolve(), lock_dir.resolve()) if source.config else None,
    )
    return ModelLocation(files, model)


def compile_spec(spec_path: str | Path, lock_path: str | Path | None = None, progress=None) -> tuple[Plan, str]:
    """Compile a spec file; returns the plan and the lock text (nothing is written)."""
    from planc.model import build_model_graph

    spec_path = Path(spec_path)
    lock_path = Path(lock_path) if lock_path else default_lock_path(spec_path)
    spec = load_spec(spec_path)
    inventory = resolve_inventory(spec.hardware)
    location = locate_model(spec, spec_path.parent, lock_path.parent, progress=progress)
    disk = (
        _relative((spec_path.parent / inventory.disk).resolve(), lock_path.parent.resolve())
        if inventory.disk
        else None
    )
    plan = compile_plan(spec, inventory, location.model, installed_packages(), disk, build_model_graph)
    return plan, dump_lock(plan, regenerate_command(spec_path, lock_path))


def check_lock(spec_path: str | Path, lock_path: str | Path | None = None, packages: bool = True) -> list[str]:
    """What makes the committed lock stale, from recorded inputs only (no torch). Empty list = fresh.

    `packages=False` leaves the installed planc/torch/transformers/accelerate out of it: for an
    environment that is not the one the plan runs in (pre-commit's own).
    """
    spec_path = Path(spec_path)
    lock_path = Path(lock_path) if lock_path else default_lock_path(spec_path)
    if not lock_path.exists():
        raise StalePlanError(f"{lock_path} does not exist; run planc compile {spec_path}")
    plan = load_lock(lock_path)
    spec = load_spec(spec_path)
    changes = []
    if plan.inputs.spec_sha256 != spec.sha256():
        changes.extend(_spec_changes(spec, plan) or ["spec changed (policy or model options)"])
    location = locate_model(spec, spec_path.parent, lock_path.parent)
    if location.model.config_sha256 != plan.inputs.config_sha256:
        changes.append("model config.json changed")
    if location.model.weights != plan.inputs.weights:
        before, after = set(plan.inputs.weights), set(location.model.weights)
        names = sorted((before ^ after) | {n for n in before & after if plan.inputs.weights[n] != location.model.weights[n]})
        changes.append("weight files changed: " + ", ".join(names))
    if packages:
        installed = installed_packages()
        for name in ("planc", "torch", "transformers", "accelerate"):
            locked, now = getattr(plan.inputs.packages, name), getattr(installed, name)
            if locked != now:
                changes.append(f"{name} {locked} -> {now}")
    return changes


def _spec_changes(spec: Spec, plan: Plan) -> list[str]:
    changes = []
    if spec.workload.batch_size != plan.workload.batch_size:
        changes.append(f"workload.batch_size {plan.workload.batch_size} -> {spec.workload.batch_size}")
    if spec.workload.max_seq_len != plan.workload.max_seq_len:
        changes.append(f"workload.max_seq_len {plan.workload.max_seq_len} -> {spec.workload.max_seq_len}")
    if spec.workload.source_tokens is not None and spec.workload.source_tokens != plan.workload.source_tokens:
        changes.append(f"workload.source_tokens {plan.workload.source_tokens} -> {spec.workload.source_tokens}")
    for name in ("images_per_sequence", "image_size"):
        before, after = getattr(plan.workload, name), getattr(spec.workload, name)
        if before != after:
            changes.append(f"workload.{name} {before} -> {after}")
    try:
        inventory = resolve_inventory(spec.hardware)
    except SpecError:
        return changes + ["hardware changed"]
    now = [(g.name, g.memory, g.compute_capability, g.bandwidth) for g in inventory.gpus]
    locked = [(d.name, d.memory, d.compute_capability, d.bandwidth) for d in plan.devices]
    if now != locked:
        changes.append(f"hardware.gpus {len(locked)} -> {len(now)} devices" if len(now) != len(locked) else "hardware.gpus changed")
    if inventory.cpu_memory != plan.host.cpu_memory:
        changes.append("hardware.cpu_memory changed")
    return changes

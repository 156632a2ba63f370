"""planc against accelerate's planner, case by case, judged by one yardstick.

    PYTHONPATH=src python -m bench.placement [--quick] [--cases SUBSTRING] [--jobs 2]
                                              [--markdown docs/benchmarks.md] [--json results.json]

For each case (a config from bench/corpus, a GPU inventory, a workload) two plans are made:
- planc: `compile_plan` on the case's spec (policy.offload as the case says);
- accelerate: the recipe users copy (bench/recipe.py): the model on meta at the dtype planc chose,
  `get_balanced_memory` + `infer_auto_device_map` with the driver-reported capacity of each GPU and
  the host RAM as budgets. It prefills the whole prompt (the recipe sets no prefill_chunk_size).
Both run with the attention backends and dtype planc's rules chose for the hardware.

The yardstick, the same for both (column "by"):
- `sim`: planc simulate on virtual GPUs (prefill, then one decode step); the peak per GPU is the
  simulated tensor peak + 0.5 GiB of CUDA context and workspace (field notes, section 1).
- `ledger`: planc's memory ledger applied to the placement (bench/yardstick.py) + the same 0.5 GiB;
  used where a simulation would take minutes (many layers times many prefill chunks).
A plan fits when every GPU's peak is within the capacity the driver reports.

Other columns: decode ms/token by planc's estimate (bytes read per token / bandwidth of the device
holding them; offloaded weights over PCIe) for both maps; GiB left off the GPUs; the largest context
at the case's batch (searched up to 2^20 tokens): planc's is what compile_plan accepts under its own
budget (capacity - 5 % headroom - context, workspace and 10 % allocator slack), read from its refusal
at 2^20 tokens ("would fit: max_seq_len N") and compiled to check; accelerate's is the largest at
which the ledger of its (workload-blind) map + 0.5 GiB fits every GPU's capacity, whole prefill, and
in brackets with a 256-token chunked prefill. The rule favours accelerate (no headroom, no slack).
Plan time is compile_plan without building the model graph against get_balanced_memory +
infer_auto_device_map without building the meta model; the two builds are reported apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

GiB = 2**30
CORPUS = Path(__file__).parent / "corpus"
CUDA_RESERVE = GiB // 2  # context + cuBLAS workspace per GPU, as in the field notes
CONTEXT_CAP = 2**20  # the largest context searched (a memory bound, not the model's trained limit)
DECODE_STEPS = 1
# Simulate costs about this many seconds per layer and forward pass on this 2-core machine; a case
# whose two simulations would exceed SIMULATION_BUDGET is judged by the ledger instead.
SECONDS_PER_LAYER_PASS = 0.06
SIMULATION_BUDGET = 240.0

# name -> ([(catalogue key, count), ...] in CUDA order, host RAM)
INVENTORIES: dict[str, tuple[list[tuple[str, int]], str]] = {
    "2xV100-16GB": ([("v100-sxm2-16gb", 2)], "64GiB"),
    "2x T4": ([("t4", 2)], "64GiB"),
    "2080Ti+3090": ([("rtx2080ti", 1), ("rtx3090", 1)], "64GiB"),
    "3090+2080Ti+T4": ([("rtx3090", 1), ("rtx2080ti", 1), ("t4", 1)], "64GiB"),
    "T4+2080Ti": ([("t4", 1), ("rtx2080ti", 1)], "64GiB"),
    "4090+L4+L4": ([("rtx4090", 1), ("l4", 2)], "128GiB"),
    "3x4090": ([("rtx4090", 3)], "128GiB"),
    "2x4090": ([("rtx4090", 2)], "128GiB"),
    "4x4090": ([("rtx4090", 4)], "256GiB"),
    "4x A10": ([("a10", 4)], "256GiB"),
    "A6000+3090": ([("rtx-a6000", 1), ("rtx3090", 1)], "128GiB"),
    "2xA100-80GB": ([("a100-sxm4-80gb", 2)], "512GiB"),
    "A100-80GB+A100-40GB": ([("a100-sxm4-80gb", 1), ("a100-sxm4-40gb", 1)], "512GiB"),
    "H100+A100-80GB": ([("h100-sxm", 1), ("a100-sxm4-80gb", 1)], "512GiB"),
    "2xH100": ([("h100-sxm", 2)], "512GiB"),
    "8xH100": ([("h100-sxm", 8)], "2TiB"),
    "8xH200": ([("h200", 8)], "2TiB"),
}


@dataclass(frozen=True)
class Case:
    model: str  # folder in bench/corpus
    gpus: str  # key of INVENTORIES
    batch: int
    context: int  # max_seq_len: prompt plus generated tokens
    offload: str = "none"  # planc's policy.offload (accelerate always has the host RAM as a budget)
    dense: bool = False  # drop quantization_config and plan the dense release: a "(bf16)" row
    yardstick: str = "sim"  # "sim" or "ledger"
    why: str = ""

    @property
    def id(self) -> str:
        name = self.model + (" (bf16)" if self.dense else "")
        return f"{name}, {self.gpus}, {self.batch}x{_tokens(self.context)}"


FIELD_NOTES = "field notes section 1"
CASES: list[Case] = [
    # The field notes' measured cases.
    Case("qwen3-8b", "2xV100-16GB", 1, 8192, why=FIELD_NOTES + "; fp16 on sm70"),
    Case("qwen3-32b", "4x A10", 1, 32768, why=FIELD_NOTES + ": accelerate OOM on 3 GPUs"),
    Case("llama-3.1-70b", "2xH100", 8, 8192, why=FIELD_NOTES + ": no placement fits"),
    Case("qwen3-30b-a3b", "3x4090", 2, 16384, why=FIELD_NOTES + ": accelerate OOM on all 3"),
    Case("qwen3-235b-a22b", "8xH100", 4, 32768, why=FIELD_NOTES + ": accelerate OOM on 7 of 8"),
    Case("llama-3.1-8b", "3090+2080Ti+T4", 8, 8192, why=FIELD_NOTES + ": small cards OOM, 3090 idle"),
    Case("deepseek-v3", "8xH200", 1, 4096, offload="cpu", dense=True, why=FIELD_NOTES + ": 237 GiB offloaded"),
    # Mixed inventories: capacity and bandwidth differ.
    Case("qwen3-8b", "2080Ti+3090", 1, 16384, why="examples/qwen3-8b-2080ti-3090.yaml"),
    Case("qwen2.5-14b", "2080Ti+3090", 1, 4096, why="27.5 GiB on 34 GiB, 24+16-like (anchors 1.2)"),
    Case("mistral-7b-v0.1", "2080Ti+3090", 4, 8192, why="sliding-window KV"),
    Case("llama-3.2-1b", "2080Ti+3090", 32, 8192, why="KV-dominated"),
    Case("phi-3-mini-4k-instruct", "T4+2080Ti", 8, 4096, why="sm75 pair, fp16"),
    Case("gemma-2-2b-it", "T4+2080Ti", 4, 8192, why="eager attention forced by the config"),
    Case("qwen3-0.6b", "3090+2080Ti+T4", 64, 4096, why="three kinds, KV-dominated"),
    Case("qwen3-4b", "4090+L4+L4", 8, 16384, why="bandwidth 1008 vs 300 GB/s"),
    Case("llama-3.1-8b", "4090+L4+L4", 4, 16384, why="bandwidth 1008 vs 300 GB/s"),
    Case("qwen2.5-32b", "A6000+3090", 1, 16384, why="61 GiB on 69 GiB"),
    Case("gpt-oss-20b", "A6000+3090", 4, 16384, dense=True, why="MoE, sliding + full layers, eager"),
    Case("llama-3.1-70b", "A100-80GB+A100-40GB", 1, 4096, offload="cpu", why="131 GiB on 119 GiB: offload"),
    Case("qwen3-30b-a3b", "H100+A100-80GB", 8, 32768, why="bandwidth 3350 vs 2039 GB/s"),
    Case("qwen3-32b", "H100+A100-80GB", 16, 8192, why="bandwidth 3350 vs 2039 GB/s"),
    # Homogeneous inventories.
    Case("qwen2.5-14b", "2xV100-16GB", 1, 4096, why="27.5 GiB on 31.6 GiB, fp16"),
    Case("qwen2.5-7b", "2x T4", 4, 16384, why="fp16, KV-heavy"),
    Case("llama-3.2-3b", "2x T4", 16, 8192),
    Case("gemma-2-9b-it", "3x4090", 1, 8192, why="eager attention: score matrix at 8k"),
    Case("qwen3-14b", "3x4090", 4, 32768),
    Case("mixtral-8x7b", "4x4090", 1, 4096, why="87 GiB on 96 GiB"),
    Case("llama-3.1-8b", "4x A10", 16, 8192, why="KV-heavy"),
    Case("mixtral-8x7b", "2xA100-80GB", 8, 32768),
    Case("llama-3.1-70b", "2xA100-80GB", 1, 8192, why="examples/llama-3.1-70b-2xa100-80gb.yaml"),
    Case("qwen3-32b", "2xA100-80GB", 16, 8192),
    Case("llama-3.1-70b", "8xH100", 32, 8192),
    Case("qwen3-235b-a22b", "8xH200", 8, 32768),
    Case("deepseek-v3", "8xH100", 1, 4096, offload="cpu", dense=True, why="examples/deepseek-v3-8xh100-offload.yaml"),
    # Quantized checkpoints: planc refuses them.
    Case("qwen3-32b-fp8", "2x4090", 1, 4096, why="fp8 quantization_config"),
    Case("gpt-oss-20b", "A6000+3090", 4, 16384, why="mxfp4 quantization_config"),
]
QUICK = [
    "qwen3-8b, 2xV100-16GB, 1x8k",
    "llama-3.2-1b, 2080Ti+3090, 32x8k",
    "llama-3.1-70b, 2xH100, 8x8k",
    "qwen3-32b-fp8, 2x4090, 1x4k",
]


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _mixed(inventory: str) -> bool:
    return len(INVENTORIES[inventory][0]) > 1


# ---------------------------------------------------------------- one case (in a worker process)


class _GraphCache:
    """build_model_graph with memory, so compile_plan's time excludes building the model graph."""

    def __init__(self) -> None:
        self.graphs: dict[str, object] = {}
        self.build_seconds = 0.0

    def __call__(self, config: dict, dtype: str, trust_remote_code: bool = False):
        from planc.model import build_model_graph

        if dtype not in self.graphs:
            started = time.perf_counter()
            self.graphs[dtype] = build_model_graph(config, dtype, trust_remote_code)
            self.build_seconds += time.perf_counter() - started
        return self.graphs[dtype]


def _spec(case: Case, context: int, offload: str | None = None, dtype: str = "auto"):
    from planc.spec import parse_spec

    gpus, cpu = INVENTORIES[case.gpus]
    return parse_spec(
        {
            "planc": 1,
            "model": {"config": "config.json", "dtype": dtype},
            "hardware": {"gpus": [{"type": key, "count": n} for key, n in gpus], "cpu_memory": cpu},
            "workload": {"batch_size": case.batch, "max_seq_len": context},
            "policy": {"offload": offload or case.offload},
        }
    )


def _compile(
    case: Case, config: dict, graphs: _GraphCache, context: int, offload: str | None = None, dtype: str = "auto"
):
    from planc.compile import ModelInput, compile_plan, installed_packages
    from planc.hardware import resolve_inventory

    spec = _spec(case, context, offload, dtype)
    model = ModelInput(config, "sha256:0", {}, None, None, "config.json")
    return compile_plan(spec, resolve_inventory(spec.hardware), model, installed_packages(), None, graphs)


def _layers_per_gpu(graph, device_of, gpu_count: int) -> str:
    counts = {key: 0 for key in [*range(gpu_count), "cpu", "disk"]}
    for unit in graph.units:
        if unit.kind == "layer":
            counts[device_of[unit.name]] += 1
    text = "/".join(str(counts[i]) for i in range(gpu_count))
    host = counts["cpu"] + counts["disk"]
    return text + (f" +{host} off" if host else "")


def _simulation_cost(units: int, context: int, chunk: int | None) -> float:
    passes = math.ceil(context / (chunk or context)) + DECODE_STEPS
    return passes * units * SECONDS_PER_LAYER_PASS


def run_case(case: Case) -> dict:
    """Both plans for one case, judged by the case's yardstick; a JSON-able dict."""
    import torch

    from planc.errors import InfeasibleError, ModelError
    from planc.memory import Workload

    from bench.recipe import accelerate_device_map, device_of_units
    from bench.yardstick import evaluate, largest_context

    torch.set_num_threads(1)
    config = json.loads((CORPUS / case.model / "config.json").read_text())
    if case.dense:
        config.pop("quantization_config", None)
    out: dict = {"case": asdict(case), "id": case.id, "mixed": _mixed(case.gpus), "checks": []}
    graphs = _GraphCache()
    _import_model_code(config)

    started = time.perf_counter()
    try:
        plan = _compile(case, config, graphs, case.context)
        refusal = None
    except ModelError as exc:
        out.update(status="refused (quantized)" if config.get("quantization_config") else "refused", message=str(exc))
        return out
    except InfeasibleError as exc:
        plan, refusal = None, str(exc)
    planc_seconds = time.perf_counter() - started - graphs.build_seconds
    graph_seconds = graphs.build_seconds
    # A plan to copy dtype, attention and devices from when planc refuses the workload itself.
    skeleton = plan or _compile(case, config, graphs, 256, offload="cpu")
    if any(str(d.index) not in skeleton.attention.per_device for d in skeleton.devices):
        # planc left a card idle and planned the others in a dtype that card lacks (bf16 without
        # the 2080 Ti); accelerate's map uses every card, so judge it in the whole inventory's dtype.
        skeleton = _compile(case, config, graphs, 256, offload="cpu", dtype="float16")
    graph = graphs(config, skeleton.dtype)
    gpu_count = len(skeleton.devices)
    capacities = [d.memory for d in skeleton.devices]

    recipe = accelerate_device_map(config, skeleton.dtype, capacities, skeleton.host.cpu_memory)
    acc_device_of = device_of_units(recipe.device_map, [u.name for u in graph.units])
    chunk = plan.generation.prefill_chunk_size if plan else None
    workload_planc = Workload(case.batch, case.context, chunk)
    workload_acc = Workload(case.batch, case.context, None)
    acc_eval = evaluate(graph, acc_device_of, skeleton, workload_acc)
    out.update(
        status="ok",
        dtype=skeleton.dtype,
        capacities=capacities,
        graph_build_s=graph_seconds,
        meta_build_s=recipe.build_seconds,
        planc={"refused": refusal, "plan_s": planc_seconds},
        acc={
            "plan_s": recipe.plan_seconds,
            "layers": _layers_per_gpu(graph, acc_device_of, gpu_count),
            "offloaded_gib": acc_eval.offloaded_bytes / GiB,
            "decode_ms": acc_eval.decode_seconds * 1000,
            "ledger_tensors": [g.tensors for g in acc_eval.gpus],
        },
    )
    if plan:
        planc_eval = evaluate(graph, dict(plan.device_map), plan, workload_planc)
        out["planc"].update(
            chunk=chunk,
            layers=_layers_per_gpu(graph, plan.device_map, gpu_count),
            offloaded_gib=planc_eval.offloaded_bytes / GiB,
            decode_ms=plan.objective.decode_ms_per_token,
            ledger_tensors=[g.tensors for g in planc_eval.gpus],
        )
        _check_ledger_matches_plan(plan, planc_eval, out["checks"])
        _check_dtype_from_used_gpus(plan, graph, out["checks"])

    # The yardstick at the case's workload.
    yardstick = case.yardstick
    cost = _simulation_cost(len(graph.units), case.context, chunk) + _simulation_cost(len(graph.units), case.context, None)
    if yardstick == "sim" and cost > SIMULATION_BUDGET:
        yardstick = "ledger"
        out["checks"].append(f"simulation estimated at {cost:.0f} s: judged by the ledger")
    out["yardstick"] = yardstick
    acc_plan = skeleton.model_copy(
        update={
            "device_map": dict(recipe.device_map),
            "generation": skeleton.generation.model_copy(update={"prefill_chunk_size": None}),
        }
    ).sealed()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        if plan:
            out["planc"].update(_judge(plan, out["planc"]["ledger_tensors"], yardstick, Path(folder), case, capacities))
        out["acc"].update(_judge(acc_plan, out["acc"]["ledger_tensors"], yardstick, Path(folder), case, capacities))
    if plan and yardstick == "sim":
        _check_ledger_covers_simulation(out)

    # Largest context at the case's batch: planc's as it compiles it, accelerate's by the ledger.
    started = time.perf_counter()
    out["planc"]["max_ctx"] = _planc_max_context(case, config, graphs, out["checks"])
    out["planc"]["max_ctx_s"] = time.perf_counter() - started

    def acc_fits(context: int, chunked: bool = False) -> bool:
        step = 256 if chunked and context > 256 else None
        gpus = evaluate(graph, acc_device_of, skeleton, Workload(case.batch, context, step)).gpus
        return all(gpu.tensors + CUDA_RESERVE <= gpu.capacity for gpu in gpus if gpu.tensors)

    out["acc"]["max_ctx"] = largest_context(acc_fits, CONTEXT_CAP)
    out["acc"]["max_ctx_chunked"] = largest_context(lambda c: acc_fits(c, True), CONTEXT_CAP)
    return out


def _import_model_code(config: dict) -> None:
    """Import the model's transformers module now, so neither timed build pays for it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from planc.errors import ModelError
    from planc.model import make_config

    try:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(make_config(config))]
    except (KeyError, ModelError):
        pass  # planc reports it


def _judge(plan, ledger_tensors: list[int], yardstick: str, lock_dir: Path, case: Case, capacities: list[int]) -> dict:
    """Peak per GPU (tensors + CUDA reserve, 0 for an unused GPU) and whether every GPU fits."""
    from bench.yardstick import simulated_peaks

    judged: dict = {}
    tensors = list(ledger_tensors)
    if yardstick == "sim":
        sim = simulated_peaks(plan, lock_dir, case.batch, case.context, DECODE_STEPS)
        tensors = [sim.peaks.get(i, 0) for i in range(len(capacities))]
        judged.update(sim_error=sim.error, sim_s=sim.seconds)
    peaks = [t + CUDA_RESERVE if t else 0 for t in tensors]
    judged.update(peaks=peaks, fits=judged.get("sim_error") is None and all(p <= c for p, c in zip(peaks, capacities)))
    return judged


def _planc_max_context(case: Case, config: dict, graphs: _GraphCache, checks: list[str]) -> int:
    """planc's answer at 2^20 tokens: the plan, or the context its refusal says would fit (compiled to check)."""
    from planc.errors import InfeasibleError

    try:
        _compile(case, config, graphs, CONTEXT_CAP)
        return CONTEXT_CAP
    except InfeasibleError as exc:
        found = re.search(r"max_seq_len (\d+) at batch", str(exc))
        context = int(found.group(1)) if found else 0
    if context:
        try:
            _compile(case, config, graphs, context)
        except InfeasibleError:
            checks.append(f"planc's refusal says max_seq_len {context} would fit, but compile_plan refuses it")
    return context


def _check_ledger_matches_plan(plan, evaluation, checks: list[str]) -> None:
    """The bench's ledger on planc's own map must reproduce the plan's ledger and decode estimate."""
    totals = {ledger.device: ledger.total for ledger in plan.memory if isinstance(ledger.device, int)}
    for gpu in evaluation.gpus:
        if gpu.index in totals and abs(totals[gpu.index] - gpu.total) > 2**20:
            checks.append(
                f"bench ledger differs from the plan's on GPU {gpu.index}: {gpu.total / GiB:.2f} vs "
                f"{totals[gpu.index] / GiB:.2f} GiB"
            )
    planned = plan.objective.decode_ms_per_token
    if abs(evaluation.decode_seconds * 1000 - planned) > 0.01 * planned + 0.002:
        checks.append(f"bench decode estimate {evaluation.decode_seconds * 1000:.3f} ms vs plan's {planned:.3f} ms")


def _check_dtype_from_used_gpus(plan, graph, checks: list[str]) -> None:
    """A bf16 checkpoint run in fp16 only because of a card the plan leaves empty."""
    used = {device for device in plan.device_map.values() if isinstance(device, int)}
    old_cards = [d for d in plan.devices if float(d.compute_capability) < 8.0]
    if plan.dtype == "float16" and graph.checkpoint_dtype == "bfloat16" and old_cards and not used & {d.index for d in old_cards}:
        names = ", ".join(f"GPU {d.index} ({d.name}, sm{d.compute_capability.replace('.', '')})" for d in old_cards)
        checks.append(f"plan runs float16 (bf16 checkpoint) because of {names}, which holds no module")


def _check_ledger_covers_simulation(out: dict) -> None:
    """Where planc's ledger plans fewer tensor bytes than the simulation uses (the ledger is not conservative)."""
    planc = out["planc"]
    short = [
        (peak - CUDA_RESERVE - planned, index, planned, peak - CUDA_RESERVE)
        for index, (planned, peak) in enumerate(zip(planc["ledger_tensors"], planc["peaks"]))
        if peak and peak - CUDA_RESERVE > planned * 1.01 and peak - CUDA_RESERVE - planned > 64 * 2**20
    ]
    if short:
        gap, index, planned, simulated = max(short)
        out["checks"].append(
            f"planc's ledger under-plans {len(short)} of {len(planc['peaks'])} GPUs; worst GPU {index}: "
            f"{planned / GiB:.2f} GiB of tensors planned, {simulated / GiB:.2f} simulated (+{gap / GiB:.2f} GiB, "
            f"+{gap / planned:.0%})"
        )


# ---------------------------------------------------------------- table


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def _peaks(peaks: list[int] | None, capacities: list[int], mark) -> str:
    """'8.7/15.8 10.2/15.8' ('-' for an unused GPU), equal neighbours run-length compressed ('68.4/79.2 x6'),
    OOM marked."""
    if peaks is None:
        return "-"
    cells = [(f"{_gib(p) if p else '-'}/{_gib(c)}", p > c) for p, c in zip(peaks, capacities)]
    runs: list[list] = []
    for cell in cells:
        if runs and runs[-1][0] == cell:
            runs[-1][1] += 1
        else:
            runs.append([cell, 1])
    parts = []
    for (text, over), count in runs:
        text = text + (f" x{count}" if count > 1 else "")
        parts.append(mark(text) if over else text)
    return " ".join(parts)


def _ctx(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= CONTEXT_CAP:
        return "1M+"
    return f"{n / 1024:.1f}k" if n >= 1024 else str(n)


def _fits(side: dict) -> str:
    if side.get("refused"):
        return "refused"
    if side.get("sim_error"):
        return "error"
    return "fits" if side.get("fits") else "OOM"


def rows(results: list[dict], mark) -> list[list[str]]:
    table = []
    for r in results:
        if r["status"] != "ok":
            table.append([r["id"], "-", r["status"]] + ["-"] * (len(HEADERS) - 3))
            continue
        p, a, caps = r["planc"], r["acc"], r["capacities"]
        planc_decode = f"{p['decode_ms']:.1f}" if "decode_ms" in p else "-"
        table.append(
            [
                r["id"],
                r["yardstick"],
                f"{_fits(p)} / {_fits(a)}",
                _peaks(p.get("peaks"), caps, mark),
                _peaks(a.get("peaks"), caps, mark),
                f"{p['offloaded_gib']:.0f} / {a['offloaded_gib']:.0f}" if "offloaded_gib" in p else f"- / {a['offloaded_gib']:.0f}",
                f"{planc_decode} / {a['decode_ms']:.1f}",
                f"{_ctx(p['max_ctx'])} / {_ctx(a['max_ctx'])} ({_ctx(a['max_ctx_chunked'])})",
                f"{p['layers'] if 'layers' in p else '-'} | {a['layers']}",
                f"{p['plan_s']:.2f} / {a['plan_s']:.3f}",
                f"{r['graph_build_s']:.2f} / {r['meta_build_s']:.2f}",
            ]
        )
    return table


HEADERS = [
    "case (model, GPUs, batch x context)",
    "by",
    "fits planc / acc",
    "peak per GPU, planc (GiB)",
    "peak per GPU, accelerate (GiB)",
    "offloaded GiB planc / acc",
    "decode ms/token planc / acc",
    "max context planc / acc (acc chunked)",
    "layers per GPU planc | acc",
    "plan s planc / acc",
    "model build s planc / acc",
]


def summary(results: list[dict]) -> list[str]:
    ok = [r for r in results if r["status"] == "ok"]
    acc_oom_planc_fits = [r["id"] for r in ok if r["planc"].get("fits") and not r["acc"].get("fits")]
    both_fail = [r for r in ok if r["planc"].get("refused") and not r["acc"].get("fits")]
    planc_refuses_acc_fits = [r for r in ok if r["planc"].get("refused") and r["acc"].get("fits")]
    planc_oom = [r["id"] for r in ok if not r["planc"].get("refused") and not r["planc"].get("fits")]
    acc_spills = [r["id"] for r in ok if r["acc"]["offloaded_gib"] > 0 and r["planc"].get("offloaded_gib", 1) == 0]

    def ratio(r: dict) -> float:
        return r["acc"]["decode_ms"] / r["planc"]["decode_ms"]

    ratios = [ratio(r) for r in ok if r["mixed"] and r["planc"].get("decode_ms")]
    both_fit = [ratio(r) for r in ok if r["mixed"] and r["planc"].get("fits") and r["acc"].get("fits")]
    all_ratios = [ratio(r) for r in ok if r["planc"].get("decode_ms")]
    lines = [
        f"cases: {len(results)} ({len(ok)} planned by both, {len(results) - len(ok)} refused before planning)",
        *(f"  {r['id']}: {r['status']}: {r.get('message', '')}" for r in results if r["status"] != "ok"),
        f"accelerate's map OOMs and planc's fits: {len(acc_oom_planc_fits)} of {len(ok)}"
        + (": " + "; ".join(acc_oom_planc_fits) if acc_oom_planc_fits else ""),
        f"planc's own plan OOMs under the yardstick: {len(planc_oom)}" + (": " + "; ".join(planc_oom) if planc_oom else ""),
        f"accelerate spills weights to the CPU where planc keeps them on the GPUs: {len(acc_spills)}"
        + (": " + "; ".join(acc_spills) if acc_spills else ""),
        f"neither fits (planc refuses at compile time, accelerate's map OOMs): {len(both_fail)}",
    ]
    for r in both_fail:
        lines.append(f"  {r['id']}: planc: {r['planc']['refused']}")
    if planc_refuses_acc_fits:
        lines.append(f"planc refuses but accelerate's map fits: {len(planc_refuses_acc_fits)}")
        for r in planc_refuses_acc_fits:
            lines.append(f"  {r['id']}: planc: {r['planc']['refused']}")
    if ratios:
        lines.append(
            f"decode time accelerate / planc, median on mixed inventories: {statistics.median(ratios):.2f}x "
            f"(n={len(ratios)}, range {min(ratios):.2f}-{max(ratios):.2f})"
            + (f"; where both fit: {statistics.median(both_fit):.2f}x (n={len(both_fit)})" if both_fit else "")
            + f"; all inventories: {statistics.median(all_ratios):.2f}x (n={len(all_ratios)})"
        )
    margins = [
        (planned - (peak - CUDA_RESERVE)) / (peak - CUDA_RESERVE)
        for r in ok
        if r["yardstick"] == "sim" and r["planc"].get("peaks")
        for planned, peak in zip(r["planc"]["ledger_tensors"], r["planc"]["peaks"])
        if peak > GiB  # GPUs holding more than an embedding or a head
    ]
    if margins:
        lines.append(
            f"planc's ledger against the simulated tensor peak of its own plans (GPUs above 1 GiB): median "
            f"{statistics.median(margins):+.1%}, range {min(margins):+.1%} to {max(margins):+.1%} (n={len(margins)})"
        )
    contexts = [r["planc"]["max_ctx"] / r["acc"]["max_ctx"] for r in ok if r["acc"]["max_ctx"] and r["planc"]["max_ctx"]]
    if contexts:
        lines.append(
            f"max context planc / accelerate (whole prefill): median {statistics.median(contexts):.1f}x, range "
            f"{min(contexts):.1f}-{max(contexts):.1f}x (n={len(contexts)}); accelerate's map is over capacity even at "
            f"1 token in {sum(1 for r in ok if not r['acc']['max_ctx'])} cases"
        )
    more = [(r["id"], check) for r in results for check in r.get("checks", [])]
    if more:
        lines.append("checks (what the bench noticed about planc or about the yardstick):")
        lines += [f"  {case}: {check}" for case, check in more]
    return lines


def machine() -> str:
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "transformers", "accelerate"))
    return f"{platform.machine()}, {os.cpu_count()} cores, CPU only; Python {platform.python_version()}, {versions}"


def planc_revision() -> str:
    """The commit the numbers were measured at, and whether src/ differed from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" with uncommitted changes in src/" if git("status", "--porcelain", "--", "src") else "")


def markdown(results: list[dict], command: str, seconds: float) -> str:
    lines = [
        "| " + " | ".join(header.replace("|", "\\|") for header in HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for row in rows(results, lambda text: f"**{text}**"):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(
        [
            f"Command: `{command}`  ",
            f"Machine: {machine()}; planc at {planc_revision()}; wall time {seconds / 60:.1f} min.",
            "",
            *lines,
            "",
            "```",
            *summary(results),
            "```",
        ]
    )


# ---------------------------------------------------------------- main


def _expected_seconds(case: Case) -> float:
    """Rough cost of a case, for scheduling: simulated forward passes times layers."""
    layers = json.loads((CORPUS / case.model / "config.json").read_text()).get("num_hidden_layers", 32)
    if case.yardstick != "sim":
        return layers * 0.5
    return layers * (2 * (1 + DECODE_STEPS) + case.batch * case.context / 65536) * SECONDS_PER_LAYER_PASS


def _select(args) -> list[Case]:
    if args.quick:
        return [c for c in CASES if c.id in QUICK]
    if args.cases:
        return [c for c in CASES if any(s in c.id for s in args.cases.split(","))]
    return list(CASES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a handful of cases (smoke test)")
    parser.add_argument("--cases", help="comma-separated substrings of case ids")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--markdown", type=Path, help="write the table into this markdown file (between markers)")
    parser.add_argument("--json", type=Path, help="write raw results as JSON")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    cases = _select(args)
    if not cases:
        parser.error("no case matches")
    console = Console(width=260, stderr=True)
    started = time.perf_counter()
    results: dict[str, dict] = {}
    # Longest first, so the workers finish together.
    order = sorted(cases, key=lambda c: -_expected_seconds(c))
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"), initializer=_quiet) as pool:
        futures = {pool.submit(run_case, case): case for case in order}
        for future in as_completed(futures):
            case = futures[future]
            try:
                results[case.id] = future.result()
            except Exception as exc:  # a bench bug or a planc crash: report it as a row
                results[case.id] = {"id": case.id, "status": f"crashed: {type(exc).__name__}: {exc}", "checks": []}
            console.print(f"[{time.perf_counter() - started:6.0f} s] {case.id}: {results[case.id]['status']}")
    seconds = time.perf_counter() - started
    ordered = [results[c.id] for c in cases]

    table = Table(title="planc vs accelerate's recipe (GiB; OOM in red)", show_lines=False)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows(ordered, lambda text: f"[red]{text}[/red]"):
        table.add_row(*row)
    out = Console(width=260)
    out.print(table)
    for line in summary(ordered):
        out.print(line, markup=False, highlight=False)
    out.print(f"wall time {seconds:.0f} s on {machine()}", highlight=False)

    command = "PYTHONPATH=src python -m bench.placement " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps(ordered, indent=1, sort_keys=True, default=str) + "\n")
    if args.markdown:
        write_block(args.markdown, markdown(ordered, command.strip(), seconds), "bench.placement")
    return 0


def write_block(path: Path, text: str, name: str) -> None:
    """Replace the text between `<!-- name:begin/end -->` markers (or append them), keeping the prose around."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    current = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in current and end in current:
        current = current[: current.index(begin)] + block + current[current.index(end) + len(end):]
    else:
        current = current + ("\n" if current else "") + block + "\n"
    path.write_text(current)


def _quiet() -> None:
    """Worker start-up: no warnings or info logs from transformers and accelerate in the table."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import accelerate  # noqa: F401 - imported before any timing
    import transformers  # noqa: F401

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())

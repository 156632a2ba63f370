"""planc's strategy (tensor / pipeline parallel, several nodes) against accelerate's device_map, by predicted decode time.

    PYTHONPATH=src python -m bench.parallel [--markdown docs/benchmarks.md] [--cases SUBSTRING,...]

For each case (a public config from examples/models or bench/corpus, an inventory, a workload):
- planc: `compile_spec` with the default policy (parallelism auto) and the inventory's interconnect;
  its chosen strategy and predicted decode ms/token (planc.parallel.cost: weights and KV read per
  rank over HBM bandwidth, plus every all-reduce / all-gather / stage hand-off over its link);
- accelerate: the recipe users copy (bench/recipe.py: get_balanced_memory + infer_auto_device_map
  over the first node's GPUs and its RAM), judged by the same yardstick as planc's own device_map
  (bench/yardstick.py: bytes read per token over the bandwidth of the device holding them, offloaded
  weights over PCIe every token). accelerate runs one process: it cannot use a second node.
Predictions, not measurements: no GPU runs here. The goal the table checks: at batch 1 on NVLink,
planc at least 1.6x faster than accelerate's map.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "Llama-3.1-70B": REPO / "examples/models/llama-3.1-70b/config.json",
    "Qwen3-32B": REPO / "bench/corpus/qwen3-32b/config.json",
    "Qwen3-8B": REPO / "examples/models/qwen3-8b/config.json",
    "Qwen3-30B-A3B": REPO / "examples/models/qwen3-30b-a3b/config.json",
    "DeepSeek-V3 (bf16)": REPO / "examples/models/deepseek-v3-bf16/config.json",
}
GOAL = 1.6


@dataclass(frozen=True)
class Case:
    model: str
    inventory: str  # label
    hardware: dict
    batch: int
    context: int
    link: str  # nvlink | pcie | nodes
    why: str


def node(gpu: str, count: int, interconnect: str, ram: str = "2TiB") -> dict:
    return {"gpus": [{"type": gpu, "count": count}], "cpu_memory": ram, "interconnect": interconnect}


NETWORK = {"bandwidth": "400GB/s", "latency": "5us"}  # 8 x 400 Gb/s InfiniBand per node
CASES = [
    Case("Llama-3.1-70B", "8 x H100 SXM (NVSwitch)", node("h100-sxm", 8, "nvswitch"), 1, 8192, "nvlink",
         "the classic TP-8 node"),
    Case("Llama-3.1-70B", "8 x H100 SXM (NVSwitch)", node("h100-sxm", 8, "nvswitch"), 16, 4096, "nvlink",
         "a throughput batch: KV reads and all-reduce bytes grow"),
    Case("Qwen3-30B-A3B", "8 x H100 SXM (NVSwitch)", node("h100-sxm", 8, "nvswitch"), 1, 8192, "nvlink",
         "4 KV heads: transformers' TP stops at 4 ranks"),
    Case("Llama-3.1-70B", "4 x A100 SXM4 80GB (NVLink)", node("a100-sxm4-80gb", 4, "nvlink"), 1, 8192, "nvlink",
         "HGX A100 4-GPU"),
    Case("Qwen3-32B", "4 x A100 SXM4 80GB (NVLink)", node("a100-sxm4-80gb", 4, "nvlink"), 1, 8192, "nvlink",
         "a model one card could nearly hold"),
    Case("Llama-3.1-70B", "2 x H200 (NVLink)", node("h200", 2, "nvlink"), 1, 8192, "nvlink", "two big cards"),
    Case("Qwen3-8B", "2 x H200 (NVLink)", node("h200", 2, "nvlink"), 1, 8192, "nvlink",
         "fits one card: accelerate still spreads it"),
    Case("Qwen3-32B", "4 x RTX 4090 (PCIe)", node("rtx4090", 4, "pcie", "128GiB"), 1, 8192, "pcie",
         "no NVLink: auto keeps the device_map"),
    Case("Llama-3.1-70B", "4 x L40S (PCIe)", node("l40s", 4, "pcie", "512GiB"), 1, 8192, "pcie",
         "no NVLink: auto keeps the device_map"),
    Case("Llama-3.1-405B", "2 nodes x 8 x H100 SXM", {"nodes": [node("h100-sxm", 8, "nvswitch")] * 2,
         "network": NETWORK}, 1, 8192, "nodes", "810 GB of bf16 weights: more than one node holds"),
    Case("DeepSeek-V3 (bf16)", "2 nodes x 8 x H100 SXM", {"nodes": [node("h100-sxm", 8, "nvswitch")] * 2,
         "network": NETWORK}, 1, 4096, "nodes", "1.25 TiB of bf16 weights against 1.24 TiB of HBM"),
    Case("DeepSeek-V3 (bf16)", "2 nodes x 8 x H200", {"nodes": [node("h200", 8, "nvswitch")] * 2,
         "network": NETWORK}, 1, 4096, "nodes", "the same on 141 GB cards"),
]


def _config(model: str) -> dict:
    if model == "Llama-3.1-405B":
        # Llama-3.1-405B's published sizes on the 70B's config (same family, vocabulary, RoPE scaling).
        config = json.loads(MODELS["Llama-3.1-70B"].read_text())
        config.update(hidden_size=16384, intermediate_size=53248, num_attention_heads=128, num_hidden_layers=126,
                      num_key_value_heads=8)
        return config
    return json.loads(MODELS[model].read_text())


def run_case(case: Case) -> dict:
    import yaml

    from planc.compile import compile_spec
    from planc.errors import PlancError
    from planc.memory import Workload
    from planc.model import build_model_graph

    from bench.recipe import accelerate_device_map, device_of_units
    from bench.yardstick import evaluate

    out: dict = {"case": case.__dict__}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(_config(case.model)))
        spec = {"planc": 1, "model": {"config": "config.json"}, "hardware": case.hardware,
                "workload": {"batch_size": case.batch, "max_seq_len": case.context}}
        (Path(folder) / "spec.yaml").write_text(yaml.safe_dump(spec))
        started = time.perf_counter()
        try:
            plan, _ = compile_spec(Path(folder) / "spec.yaml")
        except PlancError as exc:
            out["planc"] = {"error": str(exc)}
            return out
        out["compile_s"] = time.perf_counter() - started
    parallel = plan.parallel
    out["planc"] = {
        "strategy": _label(parallel.strategy, parallel.engine, parallel.tensor_parallel_size,
                           parallel.pipeline_parallel_size) if parallel else "device_map (accelerate)",
        "ms": plan.objective.decode_ms_per_token,
        "considered": [
            {"label": _label(o.strategy, o.engine, o.tensor_parallel_size, o.pipeline_parallel_size),
             "ms": o.decode_ms_per_token, "detail": o.detail}
            for o in (parallel.considered if parallel else [])
        ],
    }
    graph = build_model_graph(_config(case.model), plan.dtype)
    first = plan.devices[: len([d for d in plan.devices if d.node == 0])]
    ram = (case.hardware.get("nodes") or [case.hardware])[0]["cpu_memory"]
    from planc.units import parse_size

    recipe = accelerate_device_map(_config(case.model), plan.dtype, [d.memory for d in first], parse_size(ram))
    device_of = device_of_units(recipe.device_map, [unit.name for unit in graph.units])
    evaluation = evaluate(graph, device_of, plan, Workload(case.batch, case.context))
    fits = all(gpu.total <= gpu.capacity for gpu in evaluation.gpus)
    out["accelerate"] = {
        "ms": round(evaluation.decode_seconds * 1000, 3),
        "offloaded_gib": evaluation.offloaded_bytes / 2**30,
        "fits": fits,
        "gpus": len({d for d in device_of.values() if isinstance(d, int)}),
    }
    return out


def _label(strategy: str, engine: str, tp: int, pp: int) -> str:
    sizes = {"device_map": "device_map", "tensor": f"TP {tp}", "pipeline": f"PP {pp}",
             "tensor x pipeline": f"TP {tp} x PP {pp}"}
    return f"{sizes[strategy]} ({engine})"


def rows(results: list[dict]) -> list[list[str]]:
    table = []
    for result in results:
        case = result["case"]
        planc = result["planc"]
        acc = result.get("accelerate")
        workload = f"{case['batch']} x {case['context'] // 1024}k"
        if "error" in planc:
            table.append([case["model"], case["inventory"], workload, "does not fit: " + _short(planc["error"]),
                          "-", _acc_text(acc) if acc else "-", "-", "-"])
            continue
        speed = f"{acc['ms'] / planc['ms']:.2f}x" if acc and acc["ms"] else "-"
        table.append([case["model"], case["inventory"], workload, planc["strategy"], f"{planc['ms']:.2f}",
                      _acc_text(acc), f"{acc['ms']:.2f}" if acc else "-", speed])
    return table


def _acc_text(acc: dict) -> str:
    text = f"{acc['gpus']} GPUs"
    if acc["offloaded_gib"]:
        text += f", {acc['offloaded_gib']:.0f} GiB on CPU/disk"
    if not acc["fits"]:
        text += ", over capacity"
    return text


def _brief(detail: str) -> str:
    """A refusal's first clause (the worst rank, or the first device), without the per-device listing."""
    return re.split(r"; GPU [1-9]", detail)[0]


def _short(error: str) -> str:
    head = error.split(": ", 1)[0]
    return head[:120]


def markdown(results: list[dict], command: str, seconds: float) -> str:
    header = ["model", "inventory", "batch x ctx", "planc strategy", "planc ms/tok", "accelerate map",
              "accelerate ms/tok", "speedup"]
    lines = [f"Command: `{command}` ({seconds:.0f} s on this machine).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    nvlink = [r for r in results if r["case"]["link"] == "nvlink" and r["case"]["batch"] == 1 and "ms" in r["planc"]]
    speed = {f"{r['case']['model']} on {r['case']['inventory']}": r["accelerate"]["ms"] / r["planc"]["ms"] for r in nvlink}
    met = {name: x for name, x in speed.items() if x >= GOAL}
    below = {name: x for name, x in speed.items() if x < GOAL}
    lines += ["", f"Batch 1 on NVLink (goal: planc at least {GOAL}x faster than accelerate's map): met on {len(met)} of "
              f"{len(speed)} rows ({min(met.values(), default=0):.2f}x to {max(met.values(), default=0):.2f}x)"
              + ("; below it: " + ", ".join(f"{name} {x:.2f}x" for name, x in below.items()) if below else "") + "."]
    lines += ["", "Strategies weighed per case (predicted ms/token, or why not planned):", ""]
    for result in results:
        case, planc = result["case"], result["planc"]
        if "error" in planc:
            reasons = planc["error"].split("under any strategy: ", 1)[-1]
            # Each strategy's label and the first clause of its refusal (its worst device or rank).
            labelled = re.findall(r"((?:device_map|tensor|pipeline)[\w ]* \((?:accelerate|transformers|vllm)\)): "
                                  r"(.*?)(?=; (?:device_map|tensor|pipeline)[\w ]* \(|$)", reasons)
            lines.append(f"- {case['model']} on {case['inventory']} ({case['why']}): nothing fits; "
                         + "; ".join(f"{label}: {_brief(text)}" for label, text in labelled))
            continue
        weighed = "; ".join(f"{o['label']} {o['ms']:.2f}" if o["ms"] is not None else f"{o['label']}: {_brief(o['detail'])}"
                            for o in planc["considered"]) or "device_map only (no NVLink island, one node)"
        lines.append(f"- {case['model']} on {case['inventory']} ({case['why']}): {weighed}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="write the table into this markdown file (between markers)")
    parser.add_argument("--cases", help="comma-separated substrings of model or inventory")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cases = CASES
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in CASES if any(w in c.model or w in c.inventory for w in wanted)]
    started = time.perf_counter()
    results = []
    for case in cases:
        print(f"{case.model} on {case.inventory} ...", file=sys.stderr, flush=True)
        results.append(run_case(case))
    seconds = time.perf_counter() - started
    command = "PYTHONPATH=src python -m bench.parallel" + (" --markdown docs/benchmarks.md" if args.markdown else "")
    text = markdown(results, command, seconds)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.markdown:
        from bench.placement import write_block

        write_block(args.markdown, text, "bench.parallel")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ledger against `planc simulate` for quantized plans: one row per GPU.

    PYTHONPATH=src python -m bench.quantized_agreement [--cases SUBSTRING,...] [--markdown FILE]

Each case compiles a spec (a config from bench/corpus, an inventory, a workload, the model options)
and simulates the lock on virtual GPUs (prefill, one decode step). Columns: the ledger's weights,
KV and activations; planned tensors (total - reserve) against the simulated peak; the ledger's error
(positive when conservative); whether the simulated weights equal the planned ones to the byte
(hidden state such as mxfp4 scales and bitsandbytes' quant state included). tests/test_simulate.py
asserts a subset of these within its tolerance.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"
GiB = 2**30

SPEC = """planc: 1
model: {{config: config.json{model}}}
hardware:
  gpus: [{gpus}]
  cpu_memory: 256GiB
workload: {{batch_size: {batch}, max_seq_len: {seq}}}
policy: {{offload: {offload}}}
"""

# (label, config, gpus, batch, context, model options, offload)
CASES = [
    ("fp8 native", "qwen3-32b-fp8", "{type: rtx4090, count: 2}", 1, 4096, "", "none"),
    ("fp8 native, batch 4", "qwen3-32b-fp8", "{type: h100-sxm, count: 2}", 4, 16384, "", "none"),
    ("fp8 dequantized", "qwen3-32b-fp8", "{type: a100-sxm4-80gb}", 1, 4096, "", "none"),
    ("fp8 native, MLA + MoE", "deepseek-r1", "{type: h200, count: 8}", 1, 4096, "", "none"),
    ("mxfp4 native", "gpt-oss-20b", "{type: rtx4090}", 1, 8192, "", "none"),
    ("mxfp4 native", "gpt-oss-20b", "{type: rtx-a6000}", 1, 2048, "", "none"),
    ("mxfp4 dequantized (sm70)", "gpt-oss-20b", "{type: v100-sxm2-32gb, count: 2}", 1, 2048, "", "none"),
    ("bnb-4bit nf4 + double quant", "qwen3-8b", "{type: t4}", 1, 4096,
     ", quantize: {method: bnb-4bit, quant_type: nf4, double_quant: true}", "none"),
    ("bnb-4bit fp4", "llama-3.1-70b", "{type: rtx4090, count: 2}", 1, 4096, ", quantize: bnb-4bit", "none"),
    ("bnb-8bit", "qwen3-8b", "{type: t4, count: 2}", 2, 4096, ", quantize: bnb-8bit", "none"),
    ("bnb-4bit, MoE experts dense", "qwen3-30b-a3b", "{type: h100-sxm}", 1, 4096, ", quantize: bnb-4bit", "none"),
    ("bnb-4bit + cpu offload (dense)", "qwen3-1.7b",
     "{name: Small GPU, memory: 2GiB, compute_capability: '8.0', bandwidth: 300GB/s}", 1, 1024,
     ", quantize: bnb-4bit", "cpu"),
    ("fp8 KV cache", "qwen3-8b", "{type: v100-sxm2-16gb, count: 2}", 2, 8192, ", kv_cache: fp8", "none"),
    ("fp8 KV cache + fp8 weights", "qwen3-32b-fp8", "{type: rtx4090, count: 2}", 2, 8192, ", kv_cache: fp8", "none"),
]

HEADERS = ["case", "model, GPUs, batch x context", "GPU", "weights", "KV", "activ.", "planned", "simulated", "ledger",
           "weights exact"]


def run(case) -> list[list[str]]:
    from planc.compile import compile_spec
    from planc.plan import load_lock, write_if_changed
    from planc.simulate import simulate_plan

    label, config, gpus, batch, seq, model, offload = case
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "config.json").write_text((CORPUS / config / "config.json").read_text())
        (folder / "spec.yaml").write_text(SPEC.format(model=model, gpus=gpus, batch=batch, seq=seq, offload=offload))
        _, text = compile_spec(folder / "spec.yaml", folder / "plan.lock")
        write_if_changed(folder / "plan.lock", text)
        plan = load_lock(folder / "plan.lock")
        report = simulate_plan(plan, folder, decode_steps=1)
    what = f"{config}, {gpus.strip('{}')}, {batch}x{seq // 1024}k"
    if report.error:
        return [[label, what, "-", "-", "-", "-", "-", "-", f"error: {report.error}", "-"]]
    rows = []
    for device in report.devices:
        if not device.planned["weights"]:
            continue
        planned = device.planned
        rows.append([
            label, what, str(device.index), f"{planned['weights'] / GiB:.2f}", f"{planned['kv_cache'] / GiB:.2f}",
            f"{planned['activations'] / GiB:.2f}", f"{device.planned_tensors / GiB:.2f}",
            f"{device.simulated_peak / GiB:.2f}", f"{device.ledger_error:+.1%}",
            "yes" if device.simulated_weights == planned["weights"] else f"no ({device.simulated_weights / GiB:.2f})",
        ])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quantized_agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated substrings of the case label or config")
    parser.add_argument("--markdown", type=Path, help="write the table into this markdown file (between markers)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.cases or any(s in c[0] or s in c[1] for s in args.cases.split(","))]
    started = time.perf_counter()
    rows = [row for case in cases for row in run(case)]
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    print("\n".join(lines))
    seconds = time.perf_counter() - started
    print(f"\n{len(cases)} plans in {seconds:.0f} s")
    if args.markdown:
        from bench.placement import machine, planc_revision, write_block

        command = "PYTHONPATH=src python -m bench.quantized_agreement " + " ".join(argv if argv is not None else sys.argv[1:])
        text = "\n".join([f"Command: `{command.strip()}`  ",
                          f"Machine: {machine()}; planc at {planc_revision()}; {seconds / 60:.1f} min.", "", *lines])
        write_block(args.markdown, text, "bench.quantized_agreement")
    return 0


if __name__ == "__main__":
    sys.exit(main())

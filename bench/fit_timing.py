"""`planc fit` in one process, phase by phase: imports and the first model build, then the whole fit
(catalogue sweep, the spec's envelope, remedies), in CPU and wall seconds, for each example spec.

    PYTHONPATH=src python -m bench.fit_timing [--max-gpus 8 16] [--markdown docs/benchmarks.md]

CPU seconds are the process's own (time.process_time), the steadier figure on a shared machine;
`bench.cli_timing` times the same command as a whole process against its 10 s target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPECS = ["qwen3-8b-2xv100", "qwen3-30b-a3b-3x4090", "llama-3.1-70b-2xa100-80gb", "deepseek-v3-8xh100-offload"]


def measure(max_gpus_list: list[int]) -> tuple[float, float, list[dict]]:
    wall, cpu = time.perf_counter(), time.process_time()
    import json

    from planc.model import build_model_graph

    build_model_graph(json.loads((REPO / "examples/models/qwen3-8b/config.json").read_text()), "bfloat16")
    startup = (time.perf_counter() - wall, time.process_time() - cpu)
    from planc.fit import fit_spec

    rows = []
    for name in SPECS:
        for max_gpus in max_gpus_list:
            wall, cpu = time.perf_counter(), time.process_time()
            report = fit_spec(REPO / "examples" / f"{name}.yaml", max_gpus=max_gpus)
            rows.append({
                "spec": name, "max_gpus": max_gpus, "architecture": report.architecture,
                "weights_gib": report.weight_bytes / 2**30, "fitting": sum(1 for c in report.cards if c.count),
                "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
            })
    return startup[0], startup[1], rows


def markdown(startup_wall: float, startup_cpu: float, rows: list[dict]) -> str:
    from bench.placement import machine, planc_revision
    from planc.hardware import load_catalogue

    lines = [
        f"Command: `PYTHONPATH=src python -m bench.fit_timing` (one process; the catalogue is {len(load_catalogue())} cards)  ",
        f"Machine: {machine()}; planc at {planc_revision()}.",
        "",
        f"Imports and the first model build: {startup_cpu:.2f} s CPU ({startup_wall:.2f} s wall), paid once per process.",
        "",
        "| spec | model | weights (GiB) | cards tried | kinds that fit | fit CPU (s) | fit wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['spec']} | {row['architecture']} | {row['weights_gib']:.1f} | 1-{row['max_gpus']} of each | "
            f"{row['fitting']} | {row['cpu_s']:.2f} | {row['wall_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fit_timing", description=__doc__.splitlines()[0])
    parser.add_argument("--max-gpus", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--markdown", type=Path, help="write the table into this markdown file (between markers)")
    args = parser.parse_args(argv)
    startup_wall, startup_cpu, rows = measure(args.max_gpus)
    text = markdown(startup_wall, startup_cpu, rows)
    print(text)
    if args.markdown:
        from bench.placement import write_block

        write_block(args.markdown, text, "bench.fit_timing")
    return 0


if __name__ == "__main__":
    sys.exit(main())

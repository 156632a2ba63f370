"""planc's commands timed as whole processes (start-up, imports and all), best of N, against targets.

    PYTHONPATH=src python -m bench.cli_timing [--repeat 5] [--markdown docs/benchmarks.md]

Each command runs as `python -m planc ...` in a fresh process from the repository root (the
`planc` console script adds nothing measurable). `compile` writes its lock into a temporary
folder so the committed plans are never touched; the spec is copied beside its model folder so
the relative paths resolve.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Command:
    name: str
    args: list[str]
    target_s: float
    expected_exit: int = 0  # `planc diff` exits 1 when the plans differ


def commands(scratch: Path) -> list[Command]:
    out = lambda name: str(scratch / name)  # noqa: E731
    return [
        Command("planc --help", ["--help"], 0.3),
        Command(
            "planc compile --check (unchanged plan, qwen3-8b-2xv100)",
            ["compile", "--check", "examples/qwen3-8b-2xv100.yaml", "-o", "plans/qwen3-8b-2xv100.lock"],
            0.5,
        ),
        Command("planc compile qwen3-8b-2xv100", ["-q", "compile", "examples/qwen3-8b-2xv100.yaml", "-o", out("a.lock")], 5.0),
        Command(
            "planc compile deepseek-v3-8xh100-offload (largest config)",
            ["-q", "compile", "examples/deepseek-v3-8xh100-offload.yaml", "-o", out("b.lock")],
            5.0,
        ),
        Command(
            "planc fit llama-3.1-70b-2xa100-80gb (whole catalogue x 1-8, envelope)",
            ["fit", "--json", "examples/llama-3.1-70b-2xa100-80gb.yaml"],
            10.0,
        ),
        Command(
            "planc fit deepseek-v3-8xh100-offload --max-gpus 16",
            ["fit", "--json", "--max-gpus", "16", "examples/deepseek-v3-8xh100-offload.yaml"],
            10.0,
        ),
        Command(
            "planc diff (two committed plans, markdown)",
            ["diff", "--format", "markdown", "plans/qwen3-8b-2xv100.lock", "plans/qwen3-8b-2080ti-3090.lock"],
            0.5,
            expected_exit=1,
        ),
        Command(
            "planc export --to transformers --format python",
            ["export", "--to", "transformers", "--format", "python", "plans/llama-3.1-70b-2xa100-80gb.lock"],
            0.5,
        ),
        Command(
            "planc check (every example spec)",
            ["check", *sorted(str(p.relative_to(REPO)) for p in (REPO / "examples").glob("*.yaml"))],
            1.0,
        ),
    ]


def time_command(args: list[str], repeat: int) -> tuple[float, float, int, str]:
    """Best wall time and best CPU time (user + system of the process) of `repeat` runs; the exit
    code and stderr tail of the last. On a shared machine the CPU time is the steadier figure:
    wall time grows with whatever else runs."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    best = best_cpu = float("inf")
    result = None
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "planc", *args], cwd=REPO, env=env, capture_output=True, text=True)
        best = min(best, time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best_cpu = min(best_cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return best, best_cpu, result.returncode, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""


def run(repeat: int) -> list[tuple[Command, float, float, int, str]]:
    scratch = Path(tempfile.mkdtemp(prefix="planc-cli-timing-"))
    try:
        return [(c, *time_command(c.args, repeat)) for c in commands(scratch)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def markdown(results, repeat: int) -> str:
    from bench.placement import machine, planc_revision

    lines = [
        f"Command: `PYTHONPATH=src python -m bench.cli_timing --repeat {repeat}` (best of {repeat}, whole processes)  ",
        f"Machine: {machine()}; planc at {planc_revision()}.",
        "",
        "| command | measured (s) | CPU (s) | target (s) | verdict |",
        "|---|---|---|---|---|",
    ]
    for command, seconds, cpu, code, err in results:
        ran = code == command.expected_exit
        verdict = "ok" if ran and seconds <= command.target_s else ("over target" if ran else f"exit {code}: {err}")
        lines.append(f"| `{command.name}` | {seconds:.2f} | {cpu:.2f} | {command.target_s:.1f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli_timing", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the best is kept")
    parser.add_argument("--markdown", type=Path, help="write the table into this markdown file (between markers)")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    results = run(args.repeat)
    table = Table(title=f"planc commands as whole processes (best of {args.repeat})")
    for header in ("command", "measured (s)", "CPU (s)", "target (s)", "verdict"):
        table.add_column(header)
    for command, seconds, cpu, code, err in results:
        ran = code == command.expected_exit
        ok = ran and seconds <= command.target_s
        verdict = "ok" if ok else ("over target" if ran else f"exit {code}: {err}")
        table.add_row(command.name, f"{seconds:.2f}", f"{cpu:.2f}", f"{command.target_s:.1f}",
                      f"[green]{verdict}[/]" if ok else f"[red]{verdict}[/]")
    Console(width=160).print(table)
    if args.markdown:
        from bench.placement import write_block

        write_block(args.markdown, markdown(results, args.repeat), "bench.cli_timing")
    return 0 if all(code == command.expected_exit for command, _, _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())

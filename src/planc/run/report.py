"""What `planc run` shows: progress bars and the memory/timing summary on stderr (stdout carries only
completions or JSON, so it can be piped), and the JSON document of --json."""

from __future__ import annotations

from dataclasses import dataclass

from planc.plan import Plan
from planc.run.generate import Completion
from planc.units import fmt_gib


@dataclass
class Timings:
    check_s: float = 0.0
    load_s: float = 0.0
    generate_s: float = 0.0
    new_tokens: int = 0

    def to_json(self) -> dict:
        rate = self.new_tokens / self.generate_s if self.generate_s else 0.0
        return {
            "check_s": round(self.check_s, 3),
            "load_s": round(self.load_s, 3),
            "generate_s": round(self.generate_s, 3),
            "new_tokens": self.new_tokens,
            "tokens_per_s": round(rate, 2),
        }


@dataclass
class MemoryRow:
    device: str  # "0", "1", "cpu", "disk"
    predicted: int  # the plan's ledger total, bytes
    peak: int | None  # measured, bytes; None where nothing is measured (disk)
    measure: str

    def to_json(self) -> dict:
        return {"device": self.device, "predicted": self.predicted, "peak": self.peak, "measure": self.measure}


def memory_rows(plan: Plan, peaks: dict[str, int], rank: int | None = None) -> list[MemoryRow]:
    """Predicted (ledger total) against measured, per device of the plan, and the CPU always; for a rank of a
    distributed plan, its own device (and the CPU of its process)."""
    rows = []
    if rank is not None:
        ledger = next(ledger for ledger in plan.memory if ledger.rank == rank)
        device = str(ledger.device)
        measure = "peak RSS of the rank's process" if device == "cpu" else "torch.cuda.max_memory_allocated"
        rows.append(MemoryRow(f"rank {rank} " + device, ledger.total, peaks.get(device), measure))
        return rows
    ledgers = {str(ledger.device): ledger for ledger in plan.memory}
    for device in [str(d.index) for d in plan.devices] + ["cpu", "disk"]:
        ledger = ledgers.get(device)
        if device == "disk":
            if ledger is not None:
                rows.append(MemoryRow("disk", ledger.total, None, "not measured (weights read from the checkpoint)"))
            continue
        measure = "peak RSS of the process" if device == "cpu" else "torch.cuda.max_memory_allocated (no CUDA context)"
        rows.append(MemoryRow(device, ledger.total if ledger else 0, peaks.get(device), measure))
    return rows


def make_console():
    from rich.console import Console

    return Console(stderr=True, markup=False)  # lock strings print as themselves


def hashing_progress(console):
    """A rich Progress for file hashing (bytes) and a callback for hash_files, or (None, None) when
    stderr is not a terminal. A file gets a bar only when it has to be read (the cache answers a
    second run)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    if not console.is_terminal:
        return None, None
    progress = Progress(
        TextColumn("hashing {task.description}", markup=False), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=console, transient=True,
    )
    tasks: dict[str, int] = {}

    def callback(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=total)
        progress.update(tasks[name], completed=done)

    return progress, callback


def loading_progress(console):
    """A rich Progress for loading the weights, or None when stderr is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not console.is_terminal:
        return None
    return Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )


def show_summary(console, rows: list[MemoryRow], timings: Timings) -> None:
    from rich.table import Table

    table = Table(title="memory per device: plan vs this run", title_justify="left")
    for column in ("device", "plan (ledger total)", "peak used", "measured as"):
        table.add_column(column, justify="right" if column in ("plan (ledger total)", "peak used") else "left")
    for row in rows:
        name = f"GPU {row.device}" if row.device.isdigit() else row.device
        table.add_row(name, fmt_gib(row.predicted, 2), "-" if row.peak is None else fmt_gib(row.peak, 2), row.measure)
    console.print(table)
    t = timings.to_json()
    console.print(
        f"checks {t['check_s']:.2f} s, load {t['load_s']:.2f} s, generate {t['generate_s']:.2f} s "
        f"({t['new_tokens']} new tokens, {t['tokens_per_s']:.1f} tokens/s)"
    )


def show_completions(completions: list[Completion], write) -> None:
    """Several prompts: each prompt and its completion, separated by a blank line."""
    for index, completion in enumerate(completions, 1):
        write(f"[{index}] {completion.prompt}{completion.text}\n\n")


def run_json(plan: Plan, completions: list[Completion], rows, timings: Timings, fingerprint: dict, expect=None) -> dict:
    data = {
        "plan_hash": plan.plan_hash,
        "results": [
            {"prompt": c.prompt, "completion": c.text, "prompt_tokens": c.prompt_tokens, "token_ids": c.token_ids}
            for c in completions
        ],
        "memory": [row.to_json() for row in rows],
        "timings": timings.to_json(),
        "fingerprint": fingerprint,
    }
    if expect is not None:
        data["expect"] = expect
    return data

"""Terminal rendering with rich: ledgers with bars, decisions, the catalogue, progress."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from planc.plan import Plan
from planc.units import GiB

BAR_WIDTH = 30
PARTS = (("weights", "blue"), ("kv_cache", "magenta"), ("activations", "yellow"), ("staging", "cyan"), ("reserve", "red"))


def _console() -> Console:
    # markup=False: every string shown comes from a lock or a spec, and "[/x]" in a module or card
    # name must print as itself, not be read (or rejected) as rich markup. Styles are Text objects.
    # Pipes and CI logs report 80 columns; the ledger needs about 130 to stay readable.
    console = Console(highlight=False, markup=False)
    if not console.is_terminal:
        console = Console(highlight=False, markup=False, width=max(console.width, 140))
    return console


def _g(n: int) -> str:
    return f"{n / GiB:.2f}"


def _device_label(plan: Plan, key) -> str:
    if isinstance(key, int):
        return f"GPU {key} {plan.devices[key].name}"  # the lock's validator: indices are 0..n-1
    return str(key)


def _bar(ledger) -> Text:
    """One character per 1/BAR_WIDTH of capacity, coloured by ledger part; headroom dim, free blank."""
    text = Text()
    if ledger.capacity <= 0:
        return text
    used = 0

    def cells_of(n_bytes: int) -> int:
        # Clamped to what is left of the bar, whatever a lock's numbers say.
        return max(0, min(round(n_bytes / ledger.capacity * BAR_WIDTH), BAR_WIDTH - used))

    for name, colour in PARTS:
        cells = cells_of(getattr(ledger, name))
        text.append("█" * cells, style=colour)
        used += cells
    headroom = cells_of(ledger.headroom)
    text.append("░" * headroom, style="dim")
    text.append("·" * (BAR_WIDTH - used - headroom), style="dim")
    return text


def ledger_table(plan: Plan) -> Table:
    table = Table(title="Memory per device (GiB)", title_justify="left")
    for column in ("device", "layers", "weights", "KV", "activ.", "staging", "reserve", "free", "capacity"):
        table.add_column(column, justify="left" if column in ("device", "layers") else "right")
    table.add_column("use", no_wrap=True)
    for ledger in plan.memory:
        layers = " .. ".join(ledger.modules) if ledger.modules else "-"
        free = Text(_g(ledger.free), style="red" if ledger.free < 0 else "")
        table.add_row(
            _device_label(plan, ledger.device), layers, _g(ledger.weights), _g(ledger.kv_cache),
            _g(ledger.activations), _g(ledger.staging), _g(ledger.reserve),
            free if ledger.device != "disk" else "-", _g(ledger.capacity) if ledger.capacity else "-", _bar(ledger),
        )
    return table


def decisions_table(plan: Plan) -> Table:
    table = Table(title="Decisions", title_justify="left", show_lines=False)
    table.add_column("rule")
    table.add_column("decision")
    table.add_column("why", overflow="fold")
    for decision in plan.decisions:
        table.add_row(decision.id, decision.decision, Text.assemble(decision.reason, " ", (f"({decision.source})", "dim")))
    return table


def show_plan(plan: Plan, console: Console | None = None) -> None:
    """`planc show`: header, ledger with bars, settings, decisions."""
    console = console or _console()
    wl = plan.workload
    console.print(Text.assemble(
        (plan.model.architecture, "bold"),
        f" {plan.model.parameters / 1e9:.2f}B params, {plan.dtype}, "
        f"batch {wl.batch_size} x {wl.max_seq_len} tokens; objective {plan.objective.name}: "
        f"{plan.objective.decode_ms_per_token:.2f} ms/token predicted, peak utilisation "
        f"{plan.objective.peak_utilisation:.0%}",
    ))
    console.print(ledger_table(plan))
    console.print(
        f"attention: {plan.attention.attn_implementation}, SDPA backends {', '.join(plan.attention.sdpa_backends)}"
        + (f"; prefill chunk {plan.generation.prefill_chunk_size}" if plan.generation.prefill_chunk_size else "")
    )
    for key, value in plan.env.items():
        console.print(f"env {key}={value}")
    console.print(decisions_table(plan))
    console.print(Text(f"plan_hash {plan.plan_hash}", style="dim"))


def compile_summary(plan: Plan, lock: Path, written: bool) -> None:
    console = _console()
    console.print(ledger_table(plan))
    state = "wrote" if written else "unchanged:"
    console.print(
        f"{state} {lock} ({plan.dtype}, {plan.objective.decode_ms_per_token:.2f} ms/token predicted, "
        f"{len(plan.decisions)} decisions; `planc show {lock}` explains them)"
    )


def show_catalogue() -> None:
    from planc.hardware import load_catalogue

    table = Table(title="GPU catalogue")
    for column in ("key", "driver name", "memory (GiB)", "CC", "bandwidth (GB/s)", "aliases"):
        table.add_column(column)
    for gpu in load_catalogue():
        table.add_row(gpu.key, gpu.name, f"{gpu.memory / GiB:.2f}", gpu.compute_capability,
                      f"{gpu.bandwidth / 1e9:.0f}", ", ".join(gpu.aliases))
    _console().print(table)


class hashing_progress:
    """Callable progress for checksums.hash_files: one rich bar per file, shown only while hashing."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task = None
        self._name = None

    def __call__(self, name: str, done: int, total: int) -> None:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("hashing {task.description}", markup=False), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                console=Console(stderr=True), transient=True,
            )
            self._progress.start()
        if name != self._name:
            self._task = self._progress.add_task(name, total=total)
            self._name = name
        self._progress.update(self._task, completed=done)
        if done >= total and self._progress is not None and all(t.finished for t in self._progress.tasks):
            self._progress.stop()
            self._progress = None
            self._name = None


def show_simulation(report, console: Console | None = None) -> None:
    """`planc simulate`: per GPU, the lock's ledger against the simulated peak, then the verdict."""
    console = console or _console()
    chunk = f", prefill chunks of {report.prefill_chunk_size}" if report.prefill_chunk_size else ""
    console.print(Text.assemble(
        (report.architecture, "bold"),
        f" {report.dtype} on virtual GPUs: batch {report.batch_size} x {report.max_seq_len} tokens{chunk}, "
        f"then {report.decode_steps} decode steps ({report.elapsed_seconds:.1f} s)",
    ))
    table = Table(title="Planned vs simulated memory per GPU (GiB)", title_justify="left")
    staging = any(device.planned["staging"] for device in report.devices)
    columns = ["device", "weights", "KV", "activ."] + (["staging"] if staging else [])
    for column in columns + ["planned", "simulated", "ledger", "+reserve", "budget", "capacity", "verdict"]:
        table.add_column(column, justify="left" if column in ("device", "verdict") else "right", no_wrap=True)
    for device in report.devices:
        planned = device.planned
        colour = {"fits": "green", "out of memory": "red"}.get(device.verdict, "yellow")
        parts = [planned["weights"], planned["kv_cache"], planned["activations"]] + ([planned["staging"]] if staging else [])
        table.add_row(
            f"GPU {device.index} {device.name.removeprefix('NVIDIA ').removeprefix('Tesla ')}",
            *(_g(part) for part in parts), _g(device.planned_tensors), _g(device.simulated_peak),
            f"{device.ledger_error:+.1%}", _g(device.simulated_total), _g(device.budget), _g(device.capacity),
            Text(device.verdict, style=colour),
        )
    console.print(table)
    console.print(Text(
        "planned: the ledger's weights + KV + activations + staging; simulated: peak of live tensors; ledger: "
        "(planned - simulated) / simulated, positive when conservative; +reserve: simulated plus the plan's reserve "
        "(CUDA context, workspace, slack), which fake tensors cannot see",
        style="dim",
    ))
    if report.host_peak:
        console.print(f"CPU: {_g(report.host_peak)} GiB of host tensors (offloaded weights)")
    for note in report.notes:
        console.print(f"note: {note}")
    if report.error:
        console.print(Text.assemble(("execution failed:", "red"), f" {report.error}"))
    if report.ok:
        console.print(Text.assemble(("ok", "green"), ": ran to the end, every GPU within its capacity"))
    else:
        console.print(Text("not ok", style="red"))

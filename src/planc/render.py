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
PARTS = (("weights", "blue"), ("kv_cache", "magenta"), ("activations", "yellow"), ("staging", "cyan"), ("communication", "green"),
         ("reserve", "red"))


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


def _device_label(plan: Plan, key, ledger=None) -> str:
    node = ledger.node if ledger is not None else 0
    prefix = f"rank {ledger.rank} " if ledger is not None and ledger.rank is not None else ""
    where = f" (node {node})" if node else ""
    if isinstance(key, int):
        device = next(d for d in plan.devices if d.index == key and d.node == node)
        return f"{prefix}GPU {key} {device.name}{where}"
    return f"{prefix}{key}{where}"


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
    distributed = plan.distributed
    title = "Memory per rank (GiB)" if distributed else "Memory per device (GiB)"
    table = Table(title=title, title_justify="left")
    middle = ("comm.",) if distributed else ("staging",)
    for column in ("device", "layers", "weights", "KV", "activ.", *middle, "reserve", "free", "capacity"):
        table.add_column(column, justify="left" if column in ("device", "layers") else "right")
    table.add_column("use", no_wrap=True)
    for ledger in plan.memory:
        layers = " .. ".join(ledger.modules) if ledger.modules else "-"
        free = Text(_g(ledger.free), style="red" if ledger.free < 0 else "")
        table.add_row(
            _device_label(plan, ledger.device, ledger), layers, _g(ledger.weights), _g(ledger.kv_cache),
            _g(ledger.activations), _g(ledger.communication if distributed else ledger.staging), _g(ledger.reserve),
            free if ledger.device != "disk" else "-", _g(ledger.capacity) if ledger.capacity else "-", _bar(ledger),
        )
    return table


def strategies_table(plan: Plan) -> Table:
    """Every strategy the compiler weighed, its predicted decode time or why it was not planned."""
    parallel = plan.parallel
    table = Table(title="Strategies weighed (decode time per token, predicted)", title_justify="left")
    for column in ("", "strategy", "engine", "TP", "PP", "ms/token", "detail"):
        table.add_column(column, justify="right" if column in ("TP", "PP", "ms/token") else "left",
                         overflow="fold" if column == "detail" else "ellipsis")
    for option in parallel.considered:
        chosen = (option.strategy, option.tensor_parallel_size, option.pipeline_parallel_size) == (
            parallel.strategy, parallel.tensor_parallel_size, parallel.pipeline_parallel_size)
        table.add_row(
            "->" if chosen else "", option.strategy, option.engine, str(option.tensor_parallel_size),
            str(option.pipeline_parallel_size),
            f"{option.decode_ms_per_token:.2f}" if option.decode_ms_per_token is not None else "-",
            Text(option.detail, style="" if option.fits else "dim"),
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
    quantized = f" with {plan.quantization.method} weights ({plan.quantization.weights})" if plan.quantization else ""
    source = f" ({wl.source_tokens} source tokens to the encoder)" if wl.source_tokens else ""
    console.print(Text.assemble(
        (plan.model.architecture, "bold"),
        f" {plan.model.parameters / 1e9:.2f}B params, {plan.dtype}{quantized}, "
        f"batch {wl.batch_size} x {wl.max_seq_len} tokens{source}; objective {plan.objective.name}: "
        f"{plan.objective.decode_ms_per_token:.2f} ms/token predicted, peak utilisation "
        f"{plan.objective.peak_utilisation:.0%}",
    ))
    if plan.parallel is not None:
        console.print(strategies_table(plan))
        parallel = plan.parallel
        if plan.distributed:
            nodes = len({rank.node for rank in parallel.ranks})
            console.print(Text(
                f"strategy: {parallel.strategy} on {parallel.engine}, {len(parallel.ranks)} ranks"
                + (f" on {nodes} nodes" if nodes > 1 else "") + f" ({parallel.backend})"
            ))
    console.print(ledger_table(plan))
    console.print(
        f"attention: {plan.attention.attn_implementation}, SDPA backends {', '.join(plan.attention.sdpa_backends)}"
        + (f"; prefill chunk {plan.generation.prefill_chunk_size}" if plan.generation.prefill_chunk_size else "")
    )
    if plan.quantization is not None:
        console.print(quantization_line(plan))
    if plan.generation.cache_implementation:
        console.print(f"KV cache: {plan.generation.cache_implementation} {plan.generation.cache_config}")
    if plan.mixers is not None:
        needs = ", ".join(plan.mixers.requires.values())
        console.print(
            f"mixers: {', '.join(plan.mixers.families)} on the {plan.mixers.path} path" + (f" (needs {needs})" if needs else "")
        )
    for key, value in plan.env.items():
        console.print(f"env {key}={value}")
    console.print(decisions_table(plan))
    console.print(Text(f"plan_hash {plan.plan_hash}", style="dim"))


def quantization_line(plan: Plan) -> str:
    """quantization: fp8 native, 626.92 GiB (1249.88 GiB dense); dense: lm_head, ...; run needs kernels, sm8.9+."""
    q = plan.quantization
    needs = ", ".join(q.requires_packages) or "nothing extra"
    if q.requires_compute_capability:
        needs += f", compute capability {q.requires_compute_capability}+"
    dense = f"; left at {plan.dtype}: {', '.join(q.dense_modules)}" if q.dense_modules else ""
    return (
        f"quantization: {q.method} ({q.origin}) {q.weights}: {q.layout}; {_g(plan.model.weight_bytes)} GiB "
        f"({_g(q.dense_weight_bytes)} GiB dense){dense}; the run needs {needs}"
    )


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
        short = device.name.removeprefix("NVIDIA ").removeprefix("Tesla ")
        table.add_row(
            short if device.name.startswith("rank ") else f"GPU {device.index} {short}",
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


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _tokens(n: int, cap: int | None = None) -> str:
    if not n:
        return "none"
    return f"{n:,}+" if cap is not None and n >= cap else f"{n:,}"  # the search stops at its cap


def show_fit(report, console: Console | None = None) -> None:
    """`planc fit`: the catalogue cards that fit, the spec's inventory's envelope, and what would fit."""
    console = console or _console()
    console.print(Text.assemble(
        (report.architecture, "bold"),
        f" {report.parameters / 1e9:.2f}B params, {report.weight_bytes / GiB:.1f} GiB in {report.dtype}; "
        f"batch {report.batch_size} x {report.max_seq_len} tokens",
    ))
    order = "cheapest first" if report.priced else "by total memory"
    table = Table(title=f"Fewest cards that fit, on the GPUs alone (1 to {report.max_gpus} per node, {order})",
                  title_justify="left")
    columns = ["card", "count", "memory (GiB)", "dtype", "ms/token", "peak", "prefill chunk"]
    if report.priced:
        columns.append("price")
    for column in columns:
        table.add_column(column, justify="left" if column in ("card", "dtype") else "right")
    for fit in report.cards:
        if fit.count is None:
            continue
        row = [fit.card.key, str(fit.count), f"{fit.total_memory / GiB:.0f}", fit.dtype, _ms(fit.decode_ms_per_token),
               f"{fit.peak_utilisation:.0%}", str(fit.prefill_chunk_size or "whole")]
        if report.priced:
            row.append("-" if fit.price is None else f"{fit.price:g}")
        table.add_row(*row)
    if table.row_count:
        console.print(table)
    else:
        console.print(f"No catalogue card fits in {report.max_gpus} per node.")
    misses = [fit for fit in report.cards if fit.count is None]
    if misses:
        console.print(Text(f"do not fit in {report.max_gpus}:", style="dim"))
        need = [fit for fit in misses if fit.weights_need]
        if need:
            console.print(Text("  the weights alone need more cards: "
                               + ", ".join(f"{fit.card.key} {fit.weights_need}" for fit in need), style="dim"))
        for fit in misses:
            if not fit.weights_need:
                console.print(Text(f"  {fit.card.key}: {fit.reason}", style="dim"))

    own = report.inventory
    where = ", ".join(f"{count} x {name}" for name, count in _counted(own.gpus)) or "CPU only"
    if own.fits:
        chunk = f", prefill chunk {own.prefill_chunk_size}" if own.prefill_chunk_size else ""
        if own.gpus:
            offload = f", {own.offloaded_units} units offloaded" if own.offloaded_units else ""
            where_it_runs = f"peak utilisation {own.peak_utilisation:.0%}{chunk}{offload}"
        else:
            where_it_runs = f"on the CPU{chunk}"
        console.print(Text.assemble(
            f"\nThis spec's inventory ({where}): ", ("fits", "green"),
            f", {_ms(own.decode_ms_per_token)} ms/token predicted, {where_it_runs}",
        ))
    else:
        console.print(Text.assemble(f"\nThis spec's inventory ({where}): ", ("does not fit", "red")))
    by_batch = Table(title=f"Largest context (of {report.context_limit:,})", title_justify="left", min_width=34)
    by_batch.add_column("batch", justify="right")
    by_batch.add_column("max_seq_len", justify="right")
    for batch, seq in own.largest_context:
        by_batch.add_row(str(batch), _tokens(seq))
    by_context = Table(title="Largest batch", title_justify="left", min_width=24)
    by_context.add_column("max_seq_len", justify="right")
    by_context.add_column("batch", justify="right")
    for seq, batch in own.largest_batch:
        by_context.add_row(f"{seq:,}", _tokens(batch, report.max_batch))
    grid = Table.grid(padding=(0, 4))
    grid.add_row(by_batch, by_context)
    console.print(grid)
    if report.remedies:
        table = Table(title="Would fit", title_justify="left")
        table.add_column("kind")
        table.add_column("change in the spec", no_wrap=True)
        table.add_column("", overflow="fold")
        for remedy in report.remedies:
            change = remedy.change or Text("not available", style="dim")
            table.add_row(remedy.kind, change, Text(remedy.detail, style="dim"))
        console.print(table)


def _counted(names: list[str]) -> list[tuple[str, int]]:
    """Consecutive equal names as (name, count), in order."""
    out: list[tuple[str, int]] = []
    for name in names:
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + 1)
        else:
            out.append((name, 1))
    return out


def show_diff(diff, console: Console | None = None) -> None:
    """`planc diff`: one table per section, removed in red, added in green."""
    console = console or _console()
    if diff.identical:
        console.print(f"{diff.old} and {diff.new}: no differences (plan_hash {diff.new_hash})")
        return
    count = diff.change_count()
    console.print(Text.assemble(
        (str(diff.old), "bold"), " -> ", (str(diff.new), "bold"), f": {count} change{'s' if count != 1 else ''}"
    ))
    for section in diff.sections:
        table = Table(title=section.title, title_justify="left", title_style="bold")
        table.add_column("")
        table.add_column("before", overflow="fold")
        table.add_column("after", overflow="fold")
        notes = any(change.note for change in section.changes)
        if notes:
            table.add_column("", style="dim")
        for change in section.changes:
            before = Text("(none)", style="dim") if change.before is None else Text(change.before, style="red")
            after = Text("(none)", style="dim") if change.after is None else Text(change.after, style="green")
            table.add_row(change.subject, before, after, *([change.note] if notes else []))
        console.print(table)

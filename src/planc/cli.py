"""Command line. Each command parses, calls one API function, renders, and maps the result to an exit code.

Exit codes: 0 ok; 1 stale plan, failed check or failed run; 2 bad input or infeasible plan;
3 internal error (an exception planc did not expect: a bug, reported as one line naming it);
130 interrupted (Ctrl-C). Errors print one line on stderr (`-v` adds the traceback). Heavy
libraries (torch, transformers, accelerate) are imported only inside commands that need them.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import click

from planc import __version__
from planc.errors import PlancError, SpecError
from planc.export import target_names
from planc.limits import MAX_BATCH_SIZE, MAX_SEQ_LEN

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C


class _State:
    verbose = False
    quiet = False


def _fail(exc: BaseException, message: str, exit_code: int) -> None:
    if _State.verbose:
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(exit_code)


# What `pip install "planc[torch]"` adds to the light install (check, show, diff, export, gpus, schema).
HEAVY_PACKAGES = {"torch", "transformers", "accelerate", "networkx", "huggingface_hub", "psutil", "safetensors"}
# What `planc[serve]` adds for `planc serve`.
SERVE_PACKAGES = {"starlette", "uvicorn", "prometheus_client", "jinja2"}


class _Group(click.Group):
    """The single boundary: a PlancError becomes one line and its exit code; so does anything else.

    click's own exceptions (usage errors, --help, Exit) pass through to click, which renders them.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PlancError as exc:
            _fail(exc, str(exc), exc.exit_code)
        except ModuleNotFoundError as exc:
            package = (exc.name or "").split(".")[0]
            if package not in HEAVY_PACKAGES | SERVE_PACKAGES:
                _internal_error(exc)
            command = ctx.invoked_subcommand or "this command"
            extras = "torch,serve" if command == "serve" else "torch"
            missing = SpecError(f"planc {command} needs {package}, which is not installed: pip install 'planc[{extras}]'")
            _fail(exc, str(missing), missing.exit_code)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            # `planc show plan.lock | head`: the reader left. Python's documented recipe: point
            # stdout at devnull so the interpreter's final flush does not fail again, and stop.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except KeyboardInterrupt as exc:
            # Writes are atomic (temp file + os.replace), so an interrupted compile leaves the old lock.
            _fail(exc, "interrupted", EXIT_INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - no input may produce a raw traceback
            _internal_error(exc)


def _internal_error(exc: BaseException) -> None:
    detail = " ".join(str(exc).split())
    detail = detail if len(detail) <= 200 else detail[:197] + "..."
    _fail(
        exc,
        f"internal error: {type(exc).__name__}{': ' + detail if detail else ''} "
        "(a bug in planc; run with -v for the traceback)",
        EXIT_INTERNAL_ERROR,
    )


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="planc")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or tables; errors still print.")
def main(verbose: bool, quiet: bool) -> None:
    """Compile a model, a GPU inventory and a workload into a locked, explained deployment plan."""
    _State.verbose = verbose
    _State.quiet = quiet
    if not verbose:
        # transformers logs warnings about the configs it builds ("Missing validation function ...");
        # planc's own line says what matters. Read when transformers is imported; the user's setting wins.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@main.command("compile", context_settings=CONTEXT)
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("-o", "--output", "lock", type=click.Path(path_type=Path), help="Lock to write [default: plan.lock beside SPEC].")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 naming what changed if the lock is stale.")
def compile_command(spec: Path, lock: Path | None, check: bool) -> None:
    """Compile SPEC into a plan lock."""
    from planc.compile import check_lock, default_lock_path

    lock = lock or default_lock_path(spec)
    if check:
        changes = check_lock(spec, lock)
        if changes:
            # One line, whatever the lock's strings hold (a package version with a newline).
            click.echo(" ".join(f"{lock} is stale: {'; '.join(changes)}".split()), err=True)
            sys.exit(1)
        click.echo(f"{lock} is up to date")
        return
    from planc.compile import compile_spec
    from planc.plan import write_lock
    from planc.render import compile_summary

    plan, text = compile_spec(spec, lock, progress=_progress())
    written = write_lock(lock, text)
    if not _State.quiet:
        compile_summary(plan, lock, written)


@main.command("check", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--map", "maps", multiple=True, metavar="PATTERN=TEMPLATE",
              help="Where a spec's lock is: e.g. 'examples/*.yaml=plans/{stem}.lock' ({stem}, {name}, {dir}). "
              "Default: the lock whose header names the spec, else plan.lock beside it.")
@click.option("--ignore-packages", is_flag=True,
              help="Leave installed package versions out (pre-commit's environment is not the one plans run in).")
def check_command(paths: tuple[Path, ...], maps: tuple[str, ...], ignore_packages: bool) -> None:
    """Are the plans that PATHS (specs, locks, model files) feed still fresh? `compile --check` for
    each; exit 1 naming what changed. The pre-commit hook runs this on the files of a commit."""
    from planc.freshness import LockMap, check_plans

    report = check_plans(list(paths), [LockMap.parse(m) for m in maps], packages=not ignore_packages)
    for check in report.checks:
        if check.error:
            click.echo(f"error: {check.error}", err=True)
        elif check.changes:
            click.echo(f"{check.lock} is stale: " + "; ".join(check.changes)
                       + f"; recompile: planc compile {check.spec} -o {check.lock}", err=True)
        elif not _State.quiet:
            click.echo(f"{check.lock} is up to date")
    sys.exit(report.exit_code)


@main.command("show", context_settings=CONTEXT)
@click.argument("lock", type=click.Path(path_type=Path))
def show_command(lock: Path) -> None:
    """Show a lock: per-device memory with bars, settings and decisions."""
    from planc.plan import load_lock
    from planc.render import show_plan

    show_plan(load_lock(lock))


@main.command("diff", context_settings=CONTEXT)
@click.argument("old")
@click.argument("new")
@click.option("--format", "fmt", type=click.Choice(["terminal", "markdown", "json"]), default="terminal",
              show_default=True, help="markdown: for a pull-request comment.")
def diff_command(old: str, new: str, fmt: str) -> None:
    """What changed from plan OLD to plan NEW (files, or git REV:PATH such as HEAD~1:plans/x.lock).

    Exit 0 when the plans are the same, 1 when they differ, 2 when a lock cannot be read.
    """
    from planc.diff import diff_locks, to_json, to_markdown

    diff = diff_locks(old, new)
    if fmt == "json":
        click.echo(to_json(diff), nl=False)
    elif fmt == "markdown":
        click.echo(to_markdown(diff), nl=False)
    elif not _State.quiet:
        from planc.render import show_diff

        show_diff(diff)
    sys.exit(0 if diff.identical else 1)


@main.command("export", context_settings=CONTEXT)
@click.argument("lock", type=click.Path(path_type=Path))
@click.option("--to", "target", required=True, type=click.Choice(target_names()), help="The tool to export to.")
@click.option("--format", "fmt", help="One of the target's formats (json, python, ...)  [default: its first, json].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here (atomically) instead of stdout; the export's relative paths start from its folder.")
@click.option("--model", help="Model folder or Hugging Face id to load instead of the lock's.")
def export_command(lock: Path, target: str, fmt: str | None, output: Path | None, model: str | None) -> None:
    """Write LOCK as another tool's settings: its loader's arguments, the decoding settings and the
    environment, as JSON or as a Python script that loads and generates without planc."""
    from planc.export import export_plan

    text = export_plan(lock, target, fmt, output=output, model=model)
    if output is None:
        click.echo(text, nl=False)
        return
    from planc.plan import write_if_changed

    written = write_if_changed(output, text)
    if not _State.quiet:
        click.echo(f"{'wrote' if written else 'unchanged:'} {output}", err=True)


@main.command("schema", context_settings=CONTEXT)
@click.argument("which", type=click.Choice(["spec", "lock"]), default="spec")
def schema_command(which: str) -> None:
    """Print the JSON Schema of the spec or of the lock."""
    from planc.schemas import schema_text

    click.echo(schema_text(which), nl=False)


@main.command("gpus", context_settings=CONTEXT)
def gpus_command() -> None:
    """List the GPU catalogue (names, memory, compute capability, bandwidth)."""
    from planc.render import show_catalogue

    show_catalogue()


@main.command("detect", context_settings=CONTEXT)
def detect_command() -> None:
    """Print this machine's inventory as the `hardware:` block of a spec."""
    from planc.detect import detect_machine, machine_as_spec_yaml

    click.echo(machine_as_spec_yaml(detect_machine(topology=True)), nl=False)


@main.command("simulate", context_settings=CONTEXT)
@click.argument("lock", type=click.Path(path_type=Path))
@click.option("--batch-size", type=click.IntRange(min=1, max=MAX_BATCH_SIZE), help="Override the plan's batch size.")
@click.option("--max-seq-len", type=click.IntRange(min=1, max=MAX_SEQ_LEN), help="Override the plan's context length.")
@click.option("--decode-steps", type=click.IntRange(min=0, max=1024), default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def simulate_command(lock: Path, batch_size: int | None, max_seq_len: int | None, decode_steps: int, as_json: bool) -> None:
    """Execute LOCK on virtual GPUs (fake tensors): per-device peak memory and cross-device errors."""
    from planc.plan import load_lock
    from planc.simulate import simulate_plan

    report = simulate_plan(
        load_lock(lock), lock.parent, batch_size=batch_size, max_seq_len=max_seq_len, decode_steps=decode_steps
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    elif not _State.quiet:
        from planc.render import show_simulation

        show_simulation(report)
    sys.exit(0 if report.ok else 1)


@main.command("fit", context_settings=CONTEXT)
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--max-gpus", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most cards of one kind to try (one node).")
@click.option("--prices", type=click.Path(path_type=Path),
              help="YAML/JSON mapping of catalogue card to the price of one card: cheapest first.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def fit_command(spec: Path, max_gpus: int, prices: Path | None, as_json: bool) -> None:
    """Which GPU inventories hold SPEC's model and workload, and what would make its own fit."""
    from planc.fit import fit_json, fit_spec

    report = fit_spec(spec, max_gpus=max_gpus, prices=prices)
    if as_json:
        click.echo(fit_json(report), nl=False)
    elif not _State.quiet:
        from planc.render import show_fit

        show_fit(report)


@main.command("run", context_settings=CONTEXT)
@click.argument("lock", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", "prompts", multiple=True, help="Prompt text (repeatable).")
@click.option("--prompts", "prompt_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File of prompts: one per line, or JSONL with a 'prompt' field (Udop: and 'words', 'boxes').")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Tokens to generate per prompt  [default: 32, or the record's with --expect].")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results instead of streaming text.")
@click.option("--record", type=click.Path(dir_okay=False, path_type=Path), help="Write output token ids and fingerprint.")
@click.option("--expect", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Replay this record's prompts; fail (exit 1) unless every token equals it.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Image file every prompt shows (repeatable; at most the plan's images_per_sequence).")
@click.option("--check-only", is_flag=True, help="Only check the machine against the plan.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow code shipped with the checkpoint, for a lock with model.trust_remote_code: true.")
@click.option("--node-rank", type=click.IntRange(min=0), help="Multi-node plan: this node's index in hardware.nodes.")
@click.option("--master-addr", help="Multi-node plan: address of node 0 (torch.distributed rendezvous).")
@click.option("--master-port", type=click.IntRange(min=1, max=65535), help="Multi-node plan: rendezvous port [29500].")
def run_command(lock: Path, prompts, prompt_file, max_new_tokens, as_json, record, expect, images, check_only,
                trust_remote_code, node_rank, master_addr, master_port) -> None:
    """Check the machine against LOCK, apply it, load the weights and generate.

    A tensor- or pipeline-parallel plan starts one process per rank with torch's launcher; a
    multi-node one prints the command for each node, which then runs with --node-rank.
    """
    from planc.run import run_plan

    outcome = run_plan(
        lock,
        prompts=list(prompts),
        prompt_file=prompt_file,
        max_new_tokens=max_new_tokens,
        as_json=as_json,
        record=record,
        expect=expect,
        check_only=check_only,
        quiet=_State.quiet,
        trust_remote_code=trust_remote_code,
        images=list(images),
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
    )
    sys.exit(outcome.exit_code)


@main.command("serve", context_settings=CONTEXT)
@click.argument("lock", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port; the ready line names it).")
@click.option("--max-queue", type=click.IntRange(min=0),
              help="Requests that may wait for a slot before 429  [default: 4 x the plan's batch_size].")
@click.option("--model-name", help="The model's name in the API  [default: hub id or folder name].")
@click.option("--batching", type=click.Choice(["exact", "fast"]), default="exact", show_default=True,
              help="exact: each request's tokens equal planc run's whatever else is in flight; "
                   "fast: plain batched matrix products (greedy may differ where logits nearly tie).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="warning", show_default=True, help="Server log level; info adds an access log.")
def serve_command(lock: Path, host, port, max_queue, model_name, batching, log_level) -> None:
    """Check the machine against LOCK, load it as planned and serve an OpenAI-compatible API."""
    from planc.serve import serve_plan

    sys.exit(serve_plan(lock, host=host, port=port, max_queue=max_queue, model_name=model_name,
                        batching=batching, log_level=log_level, quiet=_State.quiet))


def _progress():
    """A callback for hashing progress, or None when quiet."""
    if _State.quiet:
        return None
    from planc.render import hashing_progress

    return hashing_progress()


if __name__ == "__main__":
    main()

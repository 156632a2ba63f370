"""Command line. Each command parses, calls one API function, renders, and maps the result to an exit code.

Exit codes: 0 ok; 1 stale plan, failed check or failed run; 2 bad input or infeasible plan.
User errors print one line on stderr (`-v` adds the traceback). Heavy libraries (torch,
transformers, accelerate) are imported only inside commands that need them.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click

from planc import __version__
from planc.errors import PlancError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _State:
    verbose = False
    quiet = False


def _fail(exc: BaseException) -> None:
    if _State.verbose:
        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc).replace("\n", " ")
    click.echo(f"error: {message}", err=True)
    sys.exit(getattr(exc, "exit_code", 1))


class _Group(click.Group):
    """Maps PlancError to one line and its exit code at a single boundary."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PlancError as exc:
            _fail(exc)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="planc")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or tables; errors still print.")
def main(verbose: bool, quiet: bool) -> None:
    """Compile a model, a GPU inventory and a workload into a locked, explained deployment plan."""
    _State.verbose = verbose
    _State.quiet = quiet


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
            click.echo(f"{lock} is stale: " + "; ".join(changes), err=True)
            sys.exit(1)
        click.echo(f"{lock} is up to date")
        return
    from planc.compile import compile_spec
    from planc.plan import write_if_changed
    from planc.render import compile_summary

    plan, text = compile_spec(spec, lock, progress=_progress())
    written = write_if_changed(lock, text)
    if not _State.quiet:
        compile_summary(plan, lock, written)


@main.command("show", context_settings=CONTEXT)
@click.argument("lock", type=click.Path(path_type=Path))
def show_command(lock: Path) -> None:
    """Show a lock: per-device memory with bars, settings and decisions."""
    from planc.plan import load_lock
    from planc.render import show_plan

    show_plan(load_lock(lock))


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

    click.echo(machine_as_spec_yaml(detect_machine()), nl=False)


@main.command("simulate", context_settings=CONTEXT)
@click.argument("lock", type=click.Path(path_type=Path))
@click.option("--batch-size", type=click.IntRange(min=1), help="Override the plan's batch size.")
@click.option("--max-seq-len", type=click.IntRange(min=1), help="Override the plan's context length.")
@click.option("--decode-steps", type=click.IntRange(min=0), default=2, show_default=True)
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


@main.command("run", context_settings=CONTEXT)
@click.argument("lock", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", "prompts", multiple=True, help="Prompt text (repeatable).")
@click.option("--prompts", "prompt_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File of prompts: one per line, or JSONL with a 'prompt' field.")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Tokens to generate per prompt  [default: 32, or the record's with --expect].")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results instead of streaming text.")
@click.option("--record", type=click.Path(dir_okay=False, path_type=Path), help="Write output token ids and fingerprint.")
@click.option("--expect", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Replay this record's prompts; fail (exit 1) unless every token equals it.")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Image file every prompt shows (repeatable; at most the plan's images_per_sequence).")
@click.option("--check-only", is_flag=True, help="Only check the machine against the plan.")
def run_command(lock: Path, prompts, prompt_file, max_new_tokens, as_json, record, expect, images, check_only) -> None:
    """Check the machine against LOCK, apply it, load the weights and generate."""
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
        images=list(images),
    )
    sys.exit(outcome.exit_code)


def _progress():
    """A callback for hashing progress, or None when quiet."""
    if _State.quiet:
        return None
    from planc.render import hashing_progress

    return hashing_progress()


if __name__ == "__main__":
    main()

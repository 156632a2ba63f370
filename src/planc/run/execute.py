"""`planc run`: check the machine against a lock, apply it, load, generate; or refuse with the reasons.

The order is the contract: inputs first (cheap), then the plan's environment (before anything can
initialise CUDA, GPU detection included), then every check with all mismatches reported together,
and only then torch settings, loading and generation.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from planc.errors import SpecError, UsageError
from planc.plan import Plan, load_lock
from planc.run.generate import Completion
from planc.run.session import Session, open_session
from planc.run.trust import check_lock_trust

DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class RunOutcome:
    """What a run did. exit_code: 0 ok, 1 failed expectation (refusals raise instead)."""

    exit_code: int
    completions: list[Completion] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    failure: str | None = None  # why --expect failed


@dataclass(frozen=True)
class _Request:
    """What the user asked for, resolved against the record when there is one."""

    prompts: list[str]
    max_new_tokens: int
    as_json: bool
    record: Path | None
    expected: dict | None
    quiet: bool
    images: list = field(default_factory=list)  # PIL images every prompt shows
    layouts: list | None = None  # per prompt its document's words and boxes (WordBoxes, or None); None if no prompt has


def run_plan(
    lock_path,
    prompts: list[str] = (),
    prompt_file: Path | None = None,
    max_new_tokens: int | None = None,
    as_json: bool = False,
    record: Path | None = None,
    expect: Path | None = None,
    check_only: bool = False,
    quiet: bool = False,
    trust_remote_code: bool = False,
    images: list[Path] = (),
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> RunOutcome:
    """Execute the plan in `lock_path` exactly, or raise DriftError/RunError/LockError naming why not.

    max_new_tokens None means 32, or the record's with `expect`; with `expect` and no prompts, the
    record's prompts are replayed. `images` (files) are shown with every prompt, through the model
    folder's processor. `trust_remote_code` is the runner's consent to a lock that asks for code
    shipped with the checkpoint (run.trust). A tensor- or pipeline-parallel plan starts its ranks
    with torch's launcher (planc.run.distributed); node_rank / master_addr / master_port place this
    node in a multi-node one.
    """
    from planc.run import record as records
    from planc.run.generate import check_batch, read_images, read_prompt_entries
    from planc.run.report import make_console

    lock_path = Path(lock_path)
    plan = load_lock(lock_path)
    entries = read_prompt_entries(list(prompts), prompt_file)
    prompt_list = [prompt for prompt, _ in entries]
    layouts = [layout for _, layout in entries] if any(layout for _, layout in entries) else None
    expected = records.read_record(expect) if expect else None
    if expected is not None:
        prompt_list, max_new_tokens = records.expected_prompts(expected, prompt_list, max_new_tokens)
    if not check_only:
        if not prompt_list:
            raise SpecError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
        check_batch(plan, prompt_list)
    pictures = read_images(list(images), plan) if not check_only else []
    request = _Request(
        prompt_list, max_new_tokens or DEFAULT_MAX_NEW_TOKENS, as_json, record, expected, quiet, pictures, layouts
    )
    console = make_console()
    rank = None
    if plan.distributed and pictures:
        raise UsageError("image prompts run on device_map plans only; this plan is tensor/pipeline parallel")
    if plan.distributed and layouts:
        raise UsageError(
            "prompts with words and boxes run on device_map plans only; this plan is tensor/pipeline parallel"
        )
    if plan.distributed:
        from planc.run import distributed

        rank = distributed.rank_context(plan)
        if rank is None:
            distributed.refuse_unrunnable(plan, lock_path)
            if check_only:
                return _check_only(plan, lock_path, request, console, trust_remote_code, node_rank or 0)
            arguments = distributed.run_arguments(
                list(prompts), prompt_file, max_new_tokens, as_json, record, expect, trust_remote_code
            )
            code = distributed.launch(plan, lock_path, arguments, node_rank, master_addr, master_port, quiet)
            return RunOutcome(code)
    if check_only:
        return _check_only(plan, lock_path, request, console, trust_remote_code)
    from planc.run.generate import encode, encode_layout, takes_word_boxes

    def within_plan(tokenizer) -> None:
        # Image prompts are measured by the processor once the model is loaded (their tokens depend on it).
        if takes_word_boxes(tokenizer):
            if not request.images:
                layouts = request.layouts or [None] * len(request.prompts)
                encode_layout(tokenizer, None, request.prompts, layouts, None, plan, request.max_new_tokens)
        elif request.layouts:
            raise UsageError(
                f"the prompts give words and boxes, and {type(tokenizer).__name__} reads text only (a layout model's "
                'tokenizer, such as Udop\'s, takes them): drop "words" and "boxes" from the prompts'
            )
        elif not request.images:
            encode(tokenizer, request.prompts, plan, request.max_new_tokens)

    leader = rank is None or rank.leader
    with open_session(
        plan, lock_path.parent, None if quiet or not leader else console, within_plan, rank=rank,
        trust_remote_code=trust_remote_code,
    ) as session:
        try:
            return _execute(session, request, console) if leader else _follow(session, request)
        finally:
            if rank is not None:
                from planc.run.distributed import finish

                finish()


def _follow(session: Session, request: _Request) -> RunOutcome:
    """A rank other than 0: generate on the same inputs (SPMD), report nothing."""
    return RunOutcome(0, session.generate(request.prompts, request.max_new_tokens))


def _check_only(
    plan: Plan, lock_path: Path, request: _Request, console, trust_remote_code: bool, node: int = 0
) -> RunOutcome:
    from planc.run.apply import applied_environment
    from planc.run.checks import check_machine
    from planc.run.report import hashing_progress

    check_lock_trust(plan, lock_path.parent, trust_remote_code)
    started = time.perf_counter()
    with applied_environment(plan):
        progress, on_hash = (None, None) if request.quiet else hashing_progress(console)
        with progress or nullcontext():
            check_machine(plan, lock_path.parent, on_hash, node=node)
    return _report_check(plan, lock_path, time.perf_counter() - started, request, node)


def _report_check(plan: Plan, lock_path: Path, check_s: float, request: _Request, node: int = 0) -> RunOutcome:
    devices = [device for device in plan.devices if device.node == node]
    gpus = f"{len(devices)} GPU" + ("" if len(devices) == 1 else "s")
    files = len(plan.inputs.weights)
    summary = f"packages, {gpus}, CPU memory, config and {files} weight file{'' if files == 1 else 's'}"
    report = {"ok": True, "plan_hash": plan.plan_hash, "checked": summary, "check_s": round(check_s, 3)}
    if request.as_json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    elif not request.quiet:
        sys.stdout.write(f"{lock_path}: this machine matches the plan ({summary})\n")
    return RunOutcome(0, report=report)


def _execute(session: Session, request: _Request, console) -> RunOutcome:
    from planc.run import record as records
    from planc.run.report import Timings, memory_rows, run_json, show_completions, show_summary

    plan = session.plan
    timings = Timings(check_s=session.check_s, load_s=session.load_s)
    stream = len(request.prompts) == 1 and not request.as_json
    started = time.perf_counter()
    completions = session.generate(request.prompts, request.max_new_tokens, stream, request.images, request.layouts)
    timings.generate_s = time.perf_counter() - started
    timings.new_tokens = sum(len(c.token_ids) for c in completions)
    rows = memory_rows(plan, session.measured_peaks(), None if session.rank is None else session.rank.rank)
    fingerprint = records.fingerprint(plan, session.machine.installed, session.machine.gpu_names)

    failure = None
    if request.expected is not None:
        failure = records.expectation_failure(request.expected, completions, fingerprint, session.tokenizer)
    expect_report = None if request.expected is None else {"ok": failure is None, "message": failure}
    report = run_json(plan, completions, rows, timings, fingerprint, expect_report)
    if request.as_json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    else:
        if stream:
            sys.stdout.write("\n")
        else:
            show_completions(completions, sys.stdout.write)
        sys.stdout.flush()
        if not request.quiet:
            show_summary(console, rows, timings)
    if request.record is not None:
        data = records.record_data(fingerprint, request.max_new_tokens, completions)
        records.write_record(request.record, data)
    if failure is not None:
        # Returned, not raised: the results are still worth having, and --json's report says why.
        sys.stderr.write(f"error: {failure}\n")
        return RunOutcome(1, completions, report, failure)
    return RunOutcome(0, completions, report)

"""`--record` / `--expect`: the output token ids of a run, with what produced them.

A record holds, per prompt, the new token ids and their sha256, plus a fingerprint of the
environment (package versions, devices, CPU kernel level, plan_hash). `--expect` replays the
record's prompts and fails on the first token that differs; fingerprint differences are reported
alongside, since they usually explain a difference, but do not fail a run whose tokens agree.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from planc.errors import RunError, SpecError
from planc.files import TEXT_LIMIT, parse_json, read_bytes
from planc.plan import Packages, Plan, write_if_changed
from planc.run.generate import Completion

RECORD_FORMAT = 1
PROMPT_PREVIEW = 40


def tokens_sha256(token_ids: list[int]) -> str:
    """sha256 of the ids written as comma-separated decimals."""
    return "sha256:" + hashlib.sha256(",".join(map(str, token_ids)).encode()).hexdigest()


def fingerprint(plan: Plan, installed: Packages, gpu_names: list[str]) -> dict:
    """What a run's numerics depend on besides the plan: package versions, devices, CPU kernels."""
    import torch

    return {
        "plan_hash": plan.plan_hash,
        "packages": {name: getattr(installed, name) for name in ("planc", "torch", "transformers", "accelerate")},
        "python": platform.python_version(),
        "gpus": gpu_names[: len(plan.devices)],
        "cpu": platform.machine(),
        # Vectorised CPU kernels (AVX2 vs AVX512) can round differently.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def record_data(fingerprint_: dict, max_new_tokens: int, completions: list[Completion]) -> dict:
    outputs = [
        {"prompt": c.prompt, "token_ids": c.token_ids, "sha256": tokens_sha256(c.token_ids)} for c in completions
    ]
    return {
        "planc_record": RECORD_FORMAT,
        "fingerprint": fingerprint_,
        "max_new_tokens": max_new_tokens,
        "outputs": outputs,
    }


def write_record(path: Path, data: dict) -> None:
    try:
        write_if_changed(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise SpecError(f"cannot write record {path}: {exc.strerror or exc}") from None


def read_record(path: Path) -> dict:
    """A record file, checked for shape (not for content: that is what --expect compares)."""
    data = parse_json(read_bytes(path, "record", SpecError, TEXT_LIMIT), f"record {path}", SpecError)
    try:
        if data["planc_record"] != RECORD_FORMAT:
            raise SpecError(f"record {path}: format {data['planc_record']}, this planc reads {RECORD_FORMAT}")
        valid = _positive_int(data["max_new_tokens"]) and isinstance(data["outputs"], list) and all(
            isinstance(output["prompt"], str) and isinstance(output["sha256"], str)
            and isinstance(output["token_ids"], list) and all(map(_positive_int, output["token_ids"]))
            for output in data["outputs"]
        )
        if not valid:
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise SpecError(f"record {path}: not a planc run record (write one with planc run --record)") from None
    return data


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def expectation_failure(record: dict, completions: list[Completion], fingerprint_: dict, tokenizer=None) -> str | None:
    """None when every token equals the record's; otherwise the first difference, with context."""
    problem = _first_difference(record, completions, tokenizer)
    if problem is None:
        edited = [
            str(index)
            for index, output in enumerate(record["outputs"], 1)
            if tokens_sha256(output["token_ids"]) != output["sha256"]
        ]
        if not edited:
            return None
        problem = (
            f"the record's sha256 does not match its own token ids for prompt {', '.join(edited)} (edited by hand?)"
        )
    notes = fingerprint_differences(record.get("fingerprint", {}), fingerprint_)
    return problem + (f" (environment differs: {'; '.join(notes)})" if notes else "")


def _first_difference(record: dict, completions: list[Completion], tokenizer) -> str | None:
    for index, (output, completion) in enumerate(zip(record["outputs"], completions), 1):
        expected, got = [int(t) for t in output["token_ids"]], completion.token_ids
        for position in range(max(len(expected), len(got))):
            want = expected[position] if position < len(expected) else None
            have = got[position] if position < len(got) else None
            if want != have:
                return (
                    f"tokens differ from the record at prompt {index} ({_preview(completion.prompt)}), new token "
                    f"{position + 1}: record {_token(want, tokenizer)}, this run {_token(have, tokenizer)}"
                )
    return None


def _preview(prompt: str) -> str:
    text = prompt if len(prompt) <= PROMPT_PREVIEW else prompt[: PROMPT_PREVIEW - 1] + "…"
    return json.dumps(text, ensure_ascii=False)


def _token(token_id: int | None, tokenizer) -> str:
    if token_id is None:
        return "nothing (sequence ended)"
    if tokenizer is None:
        return str(token_id)
    return f"{token_id} {json.dumps(tokenizer.decode([token_id]), ensure_ascii=False)}"


def fingerprint_differences(recorded: dict, now: dict) -> list[str]:
    """'what: record X, this run Y' for each fingerprint field that changed."""
    differences = []
    for key in sorted(set(recorded) | set(now)):
        before, after = recorded.get(key), now.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            differences += [
                f"{key}.{name}: record {before.get(name)}, this run {after.get(name)}"
                for name in sorted(set(before) | set(after))
                if before.get(name) != after.get(name)
            ]
        elif before != after:
            differences.append(f"{key}: record {before}, this run {after}")
    return differences


def expected_prompts(record: dict, prompts: list[str], max_new_tokens: int | None) -> tuple[list[str], int]:
    """The prompts and max_new_tokens to replay: the record's, unless given, and then they must agree."""
    recorded = [output["prompt"] for output in record["outputs"]]
    if prompts and prompts != recorded:
        raise RunError(
            f"the prompts differ from the record's {len(recorded)} "
            f"(first: {_preview(recorded[0]) if recorded else 'none'}); omit --prompt/--prompts to replay the record's"
        )
    recorded_tokens = int(record["max_new_tokens"])
    if max_new_tokens is not None and max_new_tokens != recorded_tokens:
        raise RunError(
            f"--max-new-tokens {max_new_tokens} differs from the record's {recorded_tokens}; "
            "omit it to replay the record's"
        )
    return recorded, recorded_tokens

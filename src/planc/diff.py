"""`planc diff`: what changed between two plans, in the order a reviewer reads a plan.

`diff_plans(old, new)` is pure: two Plans in, sections of changes out, each section a list of
(subject, before, after, note). The order is the review order: the plan's shape (placement,
dtype, attention, workload, predicted speed), the devices, the layers that moved between
devices, memory per device, decisions, environment, package versions, then the inputs. Any lock
field this module does not know (one a newer MINOR added) still shows up, under "Other fields",
so two plans with different hashes never diff as equal.

Locks come from files or from git (`REV:PATH`, read with `git show`). Rendering: `to_markdown`
for a pull-request comment and `to_json` here; the coloured terminal view is `render.show_diff`.
No torch, transformers or accelerate is imported.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planc.errors import LockError
from planc.plan import Plan, load_lock, parse_lock
from planc.units import GiB

# Lock fields the sections below present; any other top-level field is diffed generically.
_PRESENTED = {
    "format_version", "inputs", "model", "devices", "host", "workload", "dtype", "device_map", "max_memory",
    "no_split_module_classes", "skip_keys", "tied_parameters", "attention", "env", "generation", "memory",
    "objective", "decisions", "plan_hash", "mixers",
}


@dataclass(frozen=True)
class Change:
    """One difference. `before` None: added; `after` None: removed."""

    subject: str
    before: str | None
    after: str | None
    note: str = ""


@dataclass(frozen=True)
class Section:
    title: str
    changes: tuple[Change, ...]


@dataclass(frozen=True)
class PlanDiff:
    old: str  # where the old lock came from, as given
    new: str
    old_hash: str
    new_hash: str
    sections: tuple[Section, ...]  # only the sections with changes, in review order

    @property
    def identical(self) -> bool:
        return not self.sections

    def change_count(self) -> int:
        return sum(len(section.changes) for section in self.sections)


def read_plan(ref: str, cwd: str | Path | None = None) -> Plan:
    """A lock from a file, or from git as `REV:PATH` (`git show`: `HEAD~1:plans/x.lock` is relative to
    the repository root, `HEAD~1:./x.lock` to the current folder)."""
    path = Path(ref) if cwd is None else Path(cwd) / ref
    if path.exists() or ":" not in ref:
        return load_lock(path)
    try:
        shown = subprocess.run(["git", "show", ref], cwd=cwd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LockError(f"{ref}: no such file, and git is not installed to read it as REV:PATH") from None
    if shown.returncode != 0:
        reason = (shown.stderr.strip().splitlines() or ["git show failed"])[-1].removeprefix("fatal: ")
        raise LockError(f"{ref}: no such file, and git cannot show it: {reason}")
    return parse_lock(shown.stdout, source=ref)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _device_name(plan: Plan, key) -> str:
    if isinstance(key, int):
        device = next((d for d in plan.devices if d.index == key), None)
        return f"GPU {key} ({device.name})" if device else f"GPU {key}"
    return "CPU" if key == "cpu" else str(key)


def _where(key) -> str:
    return f"GPU {key}" if isinstance(key, int) else ("CPU" if key == "cpu" else str(key))


def _strategy(plan: Plan) -> str:
    """How the plan runs, in a phrase: where the layers go, in one process."""
    gpus = sorted({d for d in plan.device_map.values() if isinstance(d, int)})
    offloaded = {name: sum(1 for d in plan.device_map.values() if d == name) for name in ("cpu", "disk")}
    parts = [f"one process, {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}" if gpus else "one process, CPU only"]
    for name, count in offloaded.items():
        if count and gpus:
            parts.append(f"{count} entries offloaded to {name}")
        elif count and name == "disk":
            parts.append(f"{count} entries on disk")
    return ", ".join(parts)


def _scalar(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _compare(changes: list[Change], subject: str, before: Any, after: Any, note: str = "") -> None:
    if before != after:
        changes.append(Change(subject, _scalar(before), _scalar(after), note))


def _mixers(plan: Plan) -> str | None:
    """How the plan runs its linear-attention / SSM layers, with the packages that path needs."""
    if plan.mixers is None:
        return None
    needs = f" (needs {', '.join(plan.mixers.requires.values())})" if plan.mixers.requires else ""
    return f"{', '.join(plan.mixers.families)} on {plan.mixers.path}{needs}"


def _plan_section(old: Plan, new: Plan) -> list[Change]:
    out: list[Change] = []
    _compare(out, "strategy", _strategy(old), _strategy(new))
    _compare(out, "dtype", old.dtype, new.dtype)
    _compare(out, "attn_implementation", old.attention.attn_implementation, new.attention.attn_implementation)
    _compare(out, "SDPA backends", old.attention.sdpa_backends, new.attention.sdpa_backends)
    for key in sorted(set(old.attention.per_device) | set(new.attention.per_device)):
        _compare(out, f"prefill backend on GPU {key}", old.attention.per_device.get(key),
                 new.attention.per_device.get(key))
    _compare(out, "workload", f"batch {old.workload.batch_size} x {old.workload.max_seq_len} tokens",
             f"batch {new.workload.batch_size} x {new.workload.max_seq_len} tokens")
    _compare(out, "prefill_chunk_size", old.generation.prefill_chunk_size or "whole prompt",
             new.generation.prefill_chunk_size or "whole prompt")
    _compare(out, "experts_implementation", old.generation.experts_implementation,
             new.generation.experts_implementation)
    _compare(out, "mixer path", _mixers(old), _mixers(new))
    _compare(out, "sampling", "sampled" if old.generation.do_sample else "greedy",
             "sampled" if new.generation.do_sample else "greedy")
    _compare(out, "seed", old.generation.seed, new.generation.seed)
    _compare(out, "objective", old.objective.name, new.objective.name)
    before, after = old.objective.decode_ms_per_token, new.objective.decode_ms_per_token
    if before != after:
        change = (after - before) / before if before else 0.0
        out.append(Change("predicted decode", f"{before:.2f} ms/token", f"{after:.2f} ms/token",
                          f"{change:+.1%}" if before else ""))
    before, after = old.objective.peak_utilisation, new.objective.peak_utilisation
    if before != after:
        out.append(Change("peak GPU utilisation", f"{before:.1%}", f"{after:.1%}", f"{(after - before) * 100:+.1f} points"))
    _compare(out, "no_split_module_classes", old.no_split_module_classes, new.no_split_module_classes)
    _compare(out, "skip_keys", old.skip_keys, new.skip_keys)
    _compare(out, "tied parameters", [" = ".join(g) for g in old.tied_parameters],
             [" = ".join(g) for g in new.tied_parameters])
    return out


def _describe_device(device) -> str:
    return (f"{device.name} ({device.memory / GiB:.1f} GiB, sm {device.compute_capability}, "
            f"{device.bandwidth / 1e9:.0f} GB/s)")


def _devices_section(old: Plan, new: Plan) -> list[Change]:
    out: list[Change] = []
    before = {d.index: d for d in old.devices}
    after = {d.index: d for d in new.devices}
    for index in sorted(set(before) | set(after)):
        b, a = before.get(index), after.get(index)
        if b != a:
            out.append(Change(f"GPU {index}", _describe_device(b) if b else None, _describe_device(a) if a else None))
    _compare(out, "CPU memory", _gib(old.host.cpu_memory), _gib(new.host.cpu_memory))
    _compare(out, "offload folder", old.host.disk, new.host.disk)
    return out


def _span(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return f"{names[0]} .. {names[-1]} ({len(names)} entries)"


def _layers_section(old: Plan, new: Plan) -> list[Change]:
    """device_map entries whose device changed, grouped into runs of the execution order."""
    before, after = old.device_map, new.device_map
    order = list(after) + [name for name in before if name not in after]
    changed = [name for name in order if before.get(name, "-") != after.get(name, "-")]
    out: list[Change] = []
    # Runs of consecutive changed entries (in execution order) that moved the same way.
    position = {name: i for i, name in enumerate(order)}
    runs: list[list[str]] = []
    for name in changed:
        same_move = runs and (before.get(runs[-1][-1], "-"), after.get(runs[-1][-1], "-")) == (
            before.get(name, "-"), after.get(name, "-"))
        if runs and same_move and position[name] == position[runs[-1][-1]] + 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    for run in runs:
        b, a = before.get(run[0]), after.get(run[0])
        out.append(Change(_span(run), None if b is None else _where(b), None if a is None else _where(a)))
    return out


def _ledger_text(ledger) -> str:
    parts = [f"weights {ledger.weights / GiB:.2f}", f"KV {ledger.kv_cache / GiB:.2f}",
             f"activations {ledger.activations / GiB:.2f}"]
    if ledger.staging:
        parts.append(f"staging {ledger.staging / GiB:.2f}")
    if ledger.device != "disk":
        parts.append(f"reserve {ledger.reserve / GiB:.2f}")
    return f"{_gib(ledger.total)} ({' + '.join(parts)})"


def _memory_section(old: Plan, new: Plan) -> list[Change]:
    out: list[Change] = []
    before = {str(l.device): l for l in old.memory}
    after = {str(l.device): l for l in new.memory}
    keys = list(dict.fromkeys([str(l.device) for l in new.memory] + [str(l.device) for l in old.memory]))
    for key in keys:
        b, a = before.get(key), after.get(key)
        if b == a:
            continue
        device = (a or b).device
        name = _device_name(new if a else old, device)
        note = ""
        if a and b:
            note = f"{(a.total - b.total) / GiB:+.2f} GiB"
            if device != "disk" and a.free != b.free:
                note += f", free {_gib(b.free)} -> {_gib(a.free)}"
        out.append(Change(name, _ledger_text(b) if b else None, _ledger_text(a) if a else None, note))
    for key in sorted(set(old.max_memory) | set(new.max_memory)):
        b, a = old.max_memory.get(key), new.max_memory.get(key)
        if b != a:
            delta = f"{(a - b) / GiB:+.2f} GiB" if a is not None and b is not None else ""
            label = f"max_memory[{key}]"
            out.append(Change(label, None if b is None else _gib(b), None if a is None else _gib(a), delta))
    return out


def _decisions_section(old: Plan, new: Plan) -> list[Change]:
    out: list[Change] = []
    ids = list(dict.fromkeys([d.id for d in new.decisions] + [d.id for d in old.decisions]))
    for rule in ids:
        b = [d for d in old.decisions if d.id == rule]
        a = [d for d in new.decisions if d.id == rule]
        if b == a:
            continue
        if len(b) == 1 and len(a) == 1:
            if b[0].decision != a[0].decision:
                out.append(Change(rule, b[0].decision, a[0].decision))
            else:
                out.append(Change(rule, b[0].reason, a[0].reason, "reason or source changed"))
            continue
        for d in b:
            if d not in a:
                out.append(Change(rule, d.decision, None, "dropped"))
        for d in a:
            if d not in b:
                out.append(Change(rule, None, d.decision, "added"))
    return out


def _mapping_section(before: dict, after: dict) -> list[Change]:
    out = []
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        if b != a:
            out.append(Change(key, None if b is None else str(b), None if a is None else str(a)))
    return out


def _inputs_section(old: Plan, new: Plan) -> list[Change]:
    out: list[Change] = []
    _compare(out, "format_version", old.format_version, new.format_version)
    for field in ("architecture", "model_type", "id", "path", "config", "revision", "trust_remote_code"):
        _compare(out, f"model.{field}", getattr(old.model, field), getattr(new.model, field))
    _compare(out, "model.parameters", f"{old.model.parameters:,}", f"{new.model.parameters:,}")
    _compare(out, "model.weight_bytes", _gib(old.model.weight_bytes), _gib(new.model.weight_bytes))
    _compare(out, "spec", _short(old.inputs.spec_sha256), _short(new.inputs.spec_sha256), "sha256")
    _compare(out, "config.json", _short(old.inputs.config_sha256), _short(new.inputs.config_sha256), "sha256")
    for name in sorted(set(old.inputs.weights) | set(new.inputs.weights)):
        b, a = old.inputs.weights.get(name), new.inputs.weights.get(name)
        if b != a:
            out.append(Change(f"weights {name}", _short(b.sha256) if b else None, _short(a.sha256) if a else None,
                              "sha256"))
    _compare(out, "package policy", old.inputs.versions, new.inputs.versions)
    return out


def _flatten(value: Any, prefix: str) -> dict[str, str]:
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}.{key}"))
        return flat or {prefix: "{}"}
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        flat = {}
        for i, inner in enumerate(value):
            flat.update(_flatten(inner, f"{prefix}[{i}]"))
        return flat
    return {prefix: json.dumps(value, sort_keys=True)}


def _other_section(old: Plan, new: Plan) -> list[Change]:
    before = {k: v for k, v in old.model_dump(mode="json").items() if k not in _PRESENTED}
    after = {k: v for k, v in new.model_dump(mode="json").items() if k not in _PRESENTED}
    flat_before = {k: v for key, value in before.items() for k, v in _flatten(value, key).items()}
    flat_after = {k: v for key, value in after.items() for k, v in _flatten(value, key).items()}
    return _mapping_section(flat_before, flat_after)


def diff_plans(old: Plan, new: Plan, old_label: str = "old", new_label: str = "new") -> PlanDiff:
    """Every difference between two plans, grouped and ordered for review."""
    sections = [
        Section("Plan", tuple(_plan_section(old, new))),
        Section("Devices", tuple(_devices_section(old, new))),
        Section("Layers moved", tuple(_layers_section(old, new))),
        Section("Memory per device", tuple(_memory_section(old, new))),
        Section("Decisions", tuple(_decisions_section(old, new))),
        Section("Environment", tuple(_mapping_section(old.env, new.env))),
        Section("Packages", tuple(_mapping_section(old.inputs.packages.model_dump(), new.inputs.packages.model_dump()))),
        Section("Inputs", tuple(_inputs_section(old, new))),
        Section("Other fields", tuple(_other_section(old, new))),
    ]
    found = tuple(section for section in sections if section.changes)
    if not found and old.plan_hash != new.plan_hash:
        # Unreachable while every field is presented or flattened above; never report different plans as equal.
        found = (Section("Other fields", (Change("plan_hash", old.plan_hash, new.plan_hash),)),)
    return PlanDiff(old_label, new_label, old.plan_hash, new.plan_hash, found)


def diff_locks(old_ref: str, new_ref: str) -> PlanDiff:
    """Read two locks (files or REV:PATH) and diff them."""
    return diff_plans(read_plan(old_ref), read_plan(new_ref), old_ref, new_ref)


def to_json(diff: PlanDiff) -> str:
    data = {
        "old": diff.old, "new": diff.new, "old_plan_hash": diff.old_hash, "new_plan_hash": diff.new_hash,
        "identical": diff.identical,
        "sections": [
            {"title": s.title, "changes": [
                {"subject": c.subject, "before": c.before, "after": c.after, "note": c.note} for c in s.changes
            ]}
            for s in diff.sections
        ],
    }
    return json.dumps(data, indent=2) + "\n"


def _cell(text: str | None, empty: str) -> str:
    if text is None:
        return empty
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(diff: PlanDiff) -> str:
    """The diff as GitHub-flavoured markdown, for a pull-request comment."""
    lines = [f"### planc diff `{diff.old}` → `{diff.new}`", ""]
    if diff.identical:
        lines.append(f"No differences (plan_hash `{_short(diff.new_hash)}`).")
        return "\n".join(lines) + "\n"
    count = diff.change_count()
    lines.append(f"{count} change{'s' if count != 1 else ''}; plan_hash `{_short(diff.old_hash)}` → "
                 f"`{_short(diff.new_hash)}`.")
    for section in diff.sections:
        lines += ["", f"#### {section.title}", "", "| | before | after | |", "|---|---|---|---|"]
        for change in section.changes:
            lines.append(
                f"| {_cell(change.subject, '')} | {_cell(change.before, '*(none)*')} | "
                f"{_cell(change.after, '*(none)*')} | {_cell(change.note, '')} |"
            )
    return "\n".join(lines) + "\n"

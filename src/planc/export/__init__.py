"""Exports: a plan as the configuration another engine takes, one module per target (`vllm`)."""

from __future__ import annotations

from pathlib import Path

from planc.errors import SpecError

TARGETS = ("vllm",)


def export_plan(lock_path: str | Path, target: str, output: str | Path | None = None, model: str | None = None):
    """(text, export) of `lock_path` for `target`; `model` overrides the lock's model folder or id."""
    from planc.plan import load_lock

    if target not in TARGETS:
        raise SpecError(f"unknown export target {target!r}; known: {', '.join(TARGETS)}")
    from planc.export.vllm import render_yaml, vllm_export

    lock_path = Path(lock_path)
    plan = load_lock(lock_path)
    name = Path(output).name if output else "vllm.yaml"
    export = vllm_export(plan, lock_path.parent, name, model)
    return render_yaml(export, plan, lock_path.name), export

"""Exports: a plan as the settings another tool takes, one module per target.

A target is a module of this package that defines `TARGET`, an `ExportTarget` named like the
module; adding a target (vLLM, a server config) is adding a module, nothing else. Modules whose
names start with "_" are shared code, not targets. Target modules must import nothing heavy at
import time: `planc export` lists and loads them without torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from planc.errors import PlancError, SpecError


def target_names() -> list[str]:
    """The targets this planc can export to, without importing them."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))


def get_target(name: str):
    """The ExportTarget called `name`; SpecError naming the others when there is none."""
    from planc.export._common import ExportTarget

    if name not in target_names():
        raise SpecError(f"unknown export target {name!r}; known: {', '.join(target_names())}")
    target = getattr(importlib.import_module(f"{__name__}.{name}"), "TARGET", None)
    if not isinstance(target, ExportTarget) or target.name != name:
        raise PlancError(f"planc.export.{name} defines no TARGET named {name!r} (a bug in that module)")
    return target


def export_plan(
    lock_path: str | Path, target: str, fmt: str | None = None, output: str | Path | None = None,
    model: str | None = None,
) -> str:
    """The text of `lock_path` exported to `target` in `fmt` (the target's first format by default).

    Paths in the export are relative to where it is written: `output`'s folder, else the current one.
    `model` overrides the model folder or Hugging Face id the lock names.
    """
    from planc.export._common import ExportContext
    from planc.plan import load_lock

    chosen = get_target(target)
    fmt = fmt or chosen.formats[0]
    if fmt not in chosen.renderers:
        raise SpecError(f"--to {target} writes {', '.join(chosen.formats)}, not {fmt!r}")
    lock_path = Path(lock_path)
    plan = load_lock(lock_path)
    if fmt == "python" and target != "vllm" and plan.workload.source_tokens:
        raise SpecError(
            f"--format python writes a decoder-only generate() (it continues the prompt), and "
            f"{plan.model.architecture} is an encoder-decoder model: export --format json or yaml for its loader "
            "arguments, or generate with planc run"
        )
    context = ExportContext(
        plan=plan, lock_path=lock_path, output_dir=Path(output).parent if output else Path("."), model=model,
        output_name=Path(output).name if output else None,
    )
    return chosen.renderers[fmt](chosen.settings(context), context)

"""Which architectures planc plans, against the anchor (accelerate's `infer_auto_device_map`), model by model.

    PYTHONPATH=src python -m bench.coverage [--only SUBSTRING] [--no-simulate] [--markdown docs/coverage.md]
                                            [--baseline bench/coverage-baseline.json]
                                            [--json results.json] [--from-json results.json]
                                            [--update results.json --only TEXT[,TEXT...]]

The population is every (model_type, class) pair of transformers' causal-LM and image-text-to-text
mappings (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES), each at its
default config (`AutoConfig.for_model(model_type)` with `architectures` set to the class). For each:

- planc: `compile_plan` for 8 x H200 with `policy.offload: cpu` (2 TiB of host RAM), 1 x 4096 tokens:
  planned, refused (a PlancError: the reason, sorted into classes below) or crashed (any other
  exception: a planc bug, with the frame it came from).
- anchor: the recipe `device_map="auto"` runs: the class built on meta (`init_empty_weights`,
  `_from_config` in bf16), `tie_weights()`, `get_balanced_memory` + `infer_auto_device_map` with the
  same GPUs (driver-reported totals) and host RAM: mapped, or the error that stopped it.
- for planned ones (unless --no-simulate): `planc simulate` of the lock (prefill of the whole
  context in the plan's chunks, one decode step). The plan holds when every GPU's simulated peak
  plus the plan's reserve (CUDA context, workspace, allocator slack) is within the budget the plan
  gave it; the worst GPU's ledger error, (planned tensors - simulated peak) / simulated peak, says
  how close the ledger's terms came.

`--update` re-runs only the `--only` pairs and puts their rows into an earlier `--json` run (the
rest are that run's, as measured): for a change that touches a few families. A change to formulas
every plan uses needs the whole run.

It imports only planc's public compile and simulate functions, so it runs against any checkout
(`PYTHONPATH=<checkout>/src`) to measure a baseline. It is a benchmark, not a test: the suite's
tests/test_coverage.py compiles the same population and asserts no outcome is a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

GiB = 2**30
GPUS, GPU_TYPE, CPU_MEMORY, CONTEXT = 8, "h200", 2 * 1024 * GiB, 4096

# Refusal classes, first match wins: (class, pattern on the message).
REASONS: list[tuple[str, str]] = [
    ("no generate() in transformers (not a token generator)", r"does not generate tokens"),
    ("masked LM: generate keeps no KV cache", r"is a masked LM"),
    ("generate cannot build its KV cache in this transformers", r"cannot build its KV cache"),
    ("a layer kind or recurrent state planc does not size yet",
     r"layer type '|no attention heads|does not know yet|does not size|outside (any|the) cache planc sizes"),
    ("more placement units than the exact solver searches", r"exact solver searches at most"),
    ("transformers cannot build the default config", r"cannot build .* from its config|does not load (in transformers|as )"),
    ("needs a package not installed here", r"needs a package that is not installed"),
    ("encoder-decoder model", r"encoder-decoder model"),
    ("encoder LM head without is_decoder", r"is_decoder is false"),
    ("no decoder layer list to place", r"no decoder layers found|parallel lists"),
    ("blocks without a cache between the decoder layers", r"blocks that keep no cache"),
    ("cache layers do not match decoder layers", r"cache layers for"),
    ("transformers cannot generate with the default config", r"generates only with an attention layer"),
    ("unsupported tie", r"is tied to"),
    ("no generative class", r"no causal-LM or image-text-to-text class"),
    ("remote code", r"remote code|unknown to transformers"),
    ("quantized", r"quantized checkpoint"),
    ("does not fit", r"does not fit"),
    ("context beyond the position table", r"positions of .* generate fails there"),
]


@dataclass
class Row:
    model_type: str
    architecture: str
    planc: str  # planned | refused | crashed | no default config
    planc_detail: str = ""  # placement summary, refusal message or crash
    reason_class: str = ""
    anchor: str = ""  # mapped | failed
    anchor_detail: str = ""
    simulated: str = ""  # holds | over | failed | "" (not simulated)
    ledger_error: float | None = None  # worst GPU: (planned tensors - simulated peak) / simulated peak
    seconds: float = 0.0


def population() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()) | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items()))


def default_config(model_type: str, architecture: str) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    config.architectures = [architecture]
    return config.to_dict()


def reason_class(message: str) -> str:
    return next((name for name, pattern in REASONS if re.search(pattern, message)), "other")


def _crash(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    frame = frames[-1] if frames else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}{where}"


def spec_for(context: int = CONTEXT, images: int = 0):
    from planc.spec import parse_spec

    workload = {"batch_size": 1, "max_seq_len": context}
    if images:
        workload["images_per_sequence"] = images
    return parse_spec({
        "planc": 1,
        "model": {"config": "config.json"},
        "hardware": {"gpus": [{"type": GPU_TYPE, "count": GPUS}], "cpu_memory": CPU_MEMORY},
        "workload": workload,
        "policy": {"offload": "cpu"},
    })


def plan_with_planc(config: dict, packages, context: int = CONTEXT, images: int = 0):
    """(plan or None, outcome, detail). A model whose learned position table is shorter than the
    context is planned at the table's length, and one that generates only from an image with one
    image per sequence (the architecture is what is measured, not the workload)."""
    from planc.compile import ModelInput, compile_plan
    from planc.errors import PlancError
    from planc.hardware import resolve_inventory
    from planc.model import build_model_graph

    spec = spec_for(context, images)
    model = ModelInput(config, "sha256:" + "0" * 64, {}, None, None, "config.json")
    try:
        plan = compile_plan(spec, resolve_inventory(spec.hardware), model, packages, None, build_model_graph)
    except PlancError as exc:
        table = re.search(r"plan at most (\d+) (?:source )?tokens", str(exc))
        if table and context == CONTEXT:
            plan, outcome, detail = plan_with_planc(config, packages, int(table.group(1)), images)
            return plan, outcome, f"at {table.group(1)} tokens (its position table): {detail}"
        if "generates only from an image" in str(exc) and not images:
            plan, outcome, detail = plan_with_planc(config, packages, context, 1)
            return plan, outcome, f"with 1 image per sequence (it generates only from one): {detail}"
        return None, "refused", str(exc).replace("\n", " ")
    except Exception as exc:  # noqa: BLE001 - a crash is the finding
        return None, "crashed", _crash(exc)
    devices = Counter(plan.device_map.values())
    gpus = sum(1 for key in devices if isinstance(key, int))
    host = devices.get("cpu", 0)
    return plan, "planned", f"{gpus} GPUs" + (f", {host} units on CPU" if host else "")


def map_with_accelerate(config_dict: dict, architecture: str) -> tuple[str, str]:
    """The documented device_map="auto" path on meta: mapped, or the error."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from accelerate.utils import get_balanced_memory, infer_auto_device_map
    from transformers import AutoConfig

    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)
    try:
        cls = getattr(transformers, architecture)
        data = {k: v for k, v in config_dict.items() if k != "transformers_version"}
        config = AutoConfig.for_model(**data)
        expected = getattr(cls, "config_class", None)
        if expected is not None and not isinstance(config, expected):
            subs = [getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {}]
            config = next((sub for sub in subs if isinstance(sub, expected)), config)
        with init_empty_weights():
            model = cls._from_config(config, dtype=torch.bfloat16)
        model.tie_weights()
        no_split = list(model._no_split_modules or ())
        budgets: dict = {i: _gpu_memory() for i in range(GPUS)}
        budgets["cpu"] = CPU_MEMORY
        balanced = get_balanced_memory(model, max_memory=dict(budgets), no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split)
    except Exception as exc:  # noqa: BLE001 - the anchor's failure is its outcome
        return "failed", _crash(exc)
    devices = Counter(device_map.values())
    gpus = sum(1 for key in devices if isinstance(key, int))
    host = sum(count for key, count in devices.items() if key in ("cpu", "disk"))
    return "mapped", f"{gpus} GPUs" + (f", {host} entries on CPU/disk" if host else "")


def _gpu_memory() -> int:
    from planc.hardware import resolve_inventory

    return resolve_inventory(spec_for().hardware).gpus[0].memory


class _SimulationTimeout(BaseException):
    """Raised by the alarm; a BaseException so that simulate's own `except Exception` lets it through."""


SIMULATE_SECONDS = 120


def _alarm(signum, frame):
    raise _SimulationTimeout


def simulate(plan, config: dict, seconds: int = SIMULATE_SECONDS, seq: int | None = None) -> tuple[str, float | None, str]:
    """planc simulate of the plan: (holds | over | failed | timed out, worst ledger error, error).

    Bounded in time: Mamba1's torch fallback scans token by token in Python, and 4096 tokens x 64
    layers under fake tensors take tens of minutes (the plan is still compiled and listed).
    """
    import signal

    from planc.plan import dump_lock
    from planc.simulate import simulate_plan

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        (Path(folder) / "plan.lock").write_text(dump_lock(plan, "bench.coverage"))
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(seconds)
        try:
            report = simulate_plan(plan, Path(folder), decode_steps=1, max_seq_len=seq)
        except _SimulationTimeout:
            return "timed out", None, f"simulate stopped after {seconds} s"
        except Exception as exc:  # noqa: BLE001
            return "failed", None, _crash(exc)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    if report.error:
        return "failed", None, report.error
    used = [d for d in report.devices if d.simulated_peak]
    if not used:
        return "holds", None, ""
    worst = min(used, key=lambda d: d.ledger_error)
    # Holds: every GPU's simulated peak plus the plan's reserve (context, workspace, allocator slack)
    # stays within the budget the plan gave it.
    holds = all(d.simulated_total <= d.budget for d in used)
    return ("holds" if holds else "over budget"), round(worst.ledger_error, 4), ""


def selected(only: str | None, model_type: str, architecture: str) -> bool:
    """Whether `--only` (comma-separated substrings of a model type or class) takes this pair."""
    if not only:
        return True
    return any(text in model_type or text in architecture for text in only.split(",") if text)


def run(only: str | None, do_simulate: bool, progress=print) -> list[Row]:
    from planc.compile import installed_packages

    packages = installed_packages()
    rows = []
    for model_type, architecture in population():
        if not selected(only, model_type, architecture):
            continue
        started = time.perf_counter()
        row = Row(model_type, architecture, "")
        try:
            config = default_config(model_type, architecture)
        except Exception as exc:  # noqa: BLE001 - transformers' own default is invalid
            row.planc, row.planc_detail = "no default config", _crash(exc)
            row.anchor, row.anchor_detail = "failed", "no default config"
            rows.append(row)
            continue
        plan, row.planc, row.planc_detail = plan_with_planc(config, packages)
        if row.planc == "refused":
            row.reason_class = reason_class(row.planc_detail)
        row.anchor, row.anchor_detail = map_with_accelerate(config, architecture)
        if plan is not None and do_simulate:
            # A plan at its position table's length holds max_seq_len tokens in all: the prefill
            # leaves room for the decode step (a whole-table prefill plus one more is past the table).
            at_table = plan.workload.max_seq_len if "(its position table)" in row.planc_detail else None
            row.simulated, row.ledger_error, error = simulate(plan, config, seq=at_table and at_table - 1)
            if error:
                row.planc_detail += f"; simulate: {error}"
        row.seconds = round(time.perf_counter() - started, 1)
        rows.append(row)
        progress(f"{model_type}/{architecture}: planc {row.planc} ({row.reason_class or row.planc_detail[:60]}), "
                 f"accelerate {row.anchor}, simulate {row.simulated or '-'} {row.ledger_error if row.ledger_error is not None else ''} "
                 f"[{row.seconds}s]")
    return rows


def summary(rows: list[Row]) -> dict:
    planc = Counter(row.planc for row in rows)
    anchor = Counter(row.anchor for row in rows)
    mapped = [row for row in rows if row.anchor == "mapped"]
    return {
        "architectures": len(rows),
        "planc": dict(planc),
        "accelerate": dict(anchor),
        "accelerate mapped, planc planned": sum(1 for r in mapped if r.planc == "planned"),
        "accelerate mapped, planc refused": sum(1 for r in mapped if r.planc == "refused"),
        "accelerate mapped, planc crashed": sum(1 for r in mapped if r.planc == "crashed"),
        "planc planned, accelerate failed": sum(1 for r in rows if r.planc == "planned" and r.anchor != "mapped"),
        "simulated": dict(Counter(row.simulated for row in rows if row.simulated)),
        "refusals": dict(Counter(row.reason_class for row in rows if row.planc == "refused").most_common()),
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[Row], baseline: dict | None = None) -> str:
    s = summary(rows)
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("transformers", "accelerate", "torch"))
    out = [
        "# Coverage: every causal-LM and image-text-to-text architecture transformers ships",
        "",
        f"Generated by `PYTHONPATH=src python -m bench.coverage --markdown docs/coverage.md` ({versions}).",
        f"Each (model_type, class) pair of the two mappings at its default config, compiled for {GPUS} x H200 with",
        f"`policy.offload: cpu`, 1 x {CONTEXT} tokens; the anchor is accelerate's `infer_auto_device_map` (after",
        "`get_balanced_memory`) on the same meta model, GPUs and host RAM. Planned ones were executed by",
        "`planc simulate` (whole-context prefill in the plan's chunks, one decode step). The plan *holds* when",
        "every GPU's simulated peak plus the plan's reserve (context, workspace, allocator slack) is within the",
        "budget the plan gave it; in brackets the worst GPU's (planned tensors - simulated peak) / simulated peak.",
        "",
        "## Summary",
        "",
        "| | count |",
        "|---|---|",
        f"| architectures | {s['architectures']} |",
    ]
    for outcome in ("planned", "refused", "crashed", "no default config"):
        out.append(f"| planc {outcome} | {s['planc'].get(outcome, 0)} |")
    out.append(f"| accelerate mapped | {s['accelerate'].get('mapped', 0)} |")
    for key in ("accelerate mapped, planc planned", "accelerate mapped, planc refused", "accelerate mapped, planc crashed",
                "planc planned, accelerate failed"):
        out.append(f"| {key} | {s[key]} |")
    for outcome, count in sorted(s["simulated"].items()):
        out.append(f"| simulate: plan {outcome} | {count} |")
    errors = [r.ledger_error for r in rows if r.ledger_error is not None]
    if errors:
        buckets = (("ledger >= simulated peak", lambda e: e >= 0), ("ledger short by 0-5%", lambda e: -0.05 <= e < 0),
                   ("ledger short by 5-10%", lambda e: -0.10 <= e < -0.05), ("ledger short by over 10%", lambda e: e < -0.10))
        for label, test in buckets:
            out.append(f"| simulated, worst GPU's {label} | {sum(1 for e in errors if test(e))} |")
    if baseline:
        out += ["", "Before this work (main at " + baseline["commit"] + ", same population and script): planc planned "
                f"{baseline['planned']}, refused {baseline['refused']}, crashed {baseline['crashed']}; accelerate mapped "
                f"{baseline['mapped']}."]
    out += ["", "## Refusals by reason", "", "| reason | planc refuses | of which accelerate maps |", "|---|---|---|"]
    for reason, count in s["refusals"].items():
        maps = sum(1 for r in rows if r.planc == "refused" and r.reason_class == reason and r.anchor == "mapped")
        out.append(f"| {reason} | {count} | {maps} |")
    out += ["", "## Mapped by accelerate, refused by planc", "",
            "Why accelerate's map is not a plan for these (or what planc does not size yet):", ""]
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if r.planc == "refused" and r.anchor == "mapped":
            by_reason.setdefault(r.reason_class, []).append(r.architecture)
    for reason, names in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        out.append(f"- **{reason}** ({len(names)}): {', '.join(sorted(names))}")
    failed = [r for r in rows if r.simulated in ("failed", "timed out")]
    if failed:
        out += ["", "## Planned, but the simulation did not complete", "",
                "The error `planc simulate` reported (a default config transformers cannot run, a model whose forward",
                "needs images, a context at the end of a position table plus the decode step, or a simulation gap):", ""]
        for r in failed:
            error = r.planc_detail.split("; simulate: ", 1)[-1]
            out.append(f"- {r.architecture}: {_cell(error[:200])}")
    out += ["", "## Per architecture", "",
            "| model_type | class | planc | reason / placement | accelerate | simulate (ledger) |", "|---|---|---|---|---|---|"]
    for r in rows:
        sim = f"{r.simulated} ({r.ledger_error:+.1%})" if r.ledger_error is not None else r.simulated
        detail = r.planc_detail if r.planc != "refused" else r.planc_detail[:220]
        anchor = r.anchor if r.anchor == "mapped" else f"{r.anchor}: {r.anchor_detail[:120]}"
        out.append(f"| {r.model_type} | {r.architecture} | {r.planc} | {_cell(detail)} | {_cell(anchor)} | {sim} |")
    return "\n".join(out) + "\n"


def earlier_rows(path: Path) -> list[Row]:
    """The rows of an earlier --json run, refusals classified again (the classes may have changed)."""
    rows = [Row(**row) for row in json.loads(path.read_text())]
    for row in rows:
        if row.planc == "refused":
            row.reason_class = reason_class(row.planc_detail)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="Only model types or classes containing this text (several: comma-separated).")
    parser.add_argument("--no-simulate", action="store_true", help="Skip planc simulate of the planned ones.")
    parser.add_argument("--markdown", type=Path, help="Write the report here (docs/coverage.md).")
    parser.add_argument("--baseline", type=Path, help="JSON {commit, planned, refused, crashed, mapped} of an earlier run.")
    parser.add_argument("--json", type=Path, help="Write every row as JSON.")
    parser.add_argument("--from-json", type=Path, help="Render the rows of an earlier --json run; compile nothing.")
    parser.add_argument("--update", type=Path, help="Re-run the --only pairs and replace their rows in this earlier --json run.")
    args = parser.parse_args(argv)
    if args.update and not args.only:
        parser.error("--update re-runs the pairs --only names")
    if args.from_json:
        rows = earlier_rows(args.from_json)
        baseline = json.loads(args.baseline.read_text()) if args.baseline else None
        print(json.dumps(summary(rows), indent=2))
        if args.markdown:
            args.markdown.write_text(markdown(rows, baseline))
        return 0
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = run(args.only, not args.no_simulate, progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.update:
        fresh = {(r.model_type, r.architecture): r for r in rows}
        rows = [fresh.pop((row.model_type, row.architecture), None) or row for row in earlier_rows(args.update)]
        rows += fresh.values()  # pairs the earlier run did not have
    print(json.dumps(summary(rows), indent=2))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    if args.markdown:
        baseline = json.loads(args.baseline.read_text()) if args.baseline else None
        args.markdown.write_text(markdown(rows, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does any architecture transformers ships crash planc? (A robustness sweep, not a coverage table.)

    PYTHONPATH=src python -m bench.no_crash_sweep [--only SUBSTRING] [--timeout 120]

Every model type of transformers' causal-LM and image-text-to-text auto mappings, at its default
config (`AutoConfig.for_model(model_type)`, `architectures` set to the mapped class), goes through
`compile_plan` for 8 x H200, CPU offload allowed, batch 1 x 4096 tokens. Each outcome is a plan, a
PlancError (refused, with its one line) or a crash (any other exception: a bug to fix). A model
type whose own default config transformers rejects is counted apart ("no default"): there is no
input to give planc. Prints one line per crash, a count per outcome and the refusals grouped by
their message with names and numbers blanked; exits 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections import Counter


def model_types() -> list[tuple[str, str]]:
    """(model_type, class name) of both mappings; image-text-to-text wins where both name one."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    classes = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    classes.update(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    return sorted(classes.items())


def default_config(model_type: str, architecture: str) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type).to_dict()
    config["architectures"] = [architecture]
    return config


def spec():
    from planc.spec import parse_spec

    return parse_spec({
        "planc": 1,
        "model": {"config": "config.json"},
        "hardware": {"gpus": [{"type": "h200", "count": 8}], "cpu_memory": "2TiB"},
        "workload": {"batch_size": 1, "max_seq_len": 4096},
        "policy": {"offload": "cpu"},
    })


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def compile_one(model_type: str, architecture: str, timeout: int) -> tuple[str, str]:
    """('planned' | 'refused' | 'crashed' | 'timeout', detail)."""
    from planc.compile import ModelInput, compile_plan, installed_packages
    from planc.errors import PlancError
    from planc.hardware import resolve_inventory
    from planc.model import build_model_graph

    the_spec = spec()
    try:
        config = default_config(model_type, architecture)
    except Exception as exc:  # noqa: BLE001 - transformers rejecting its own default
        return "no default", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
    signal.alarm(timeout)
    try:
        model = ModelInput(config, "sha256:0", {}, None, None, "config.json")
        plan = compile_plan(the_spec, resolve_inventory(the_spec.hardware), model, installed_packages(), None,
                            build_model_graph)
        return "planned", f"{plan.model.architecture} {plan.dtype}"
    except PlancError as exc:
        return "refused", str(exc).replace("\n", " ")
    except _Timeout:
        return "timeout", f"over {timeout} s"
    except Exception as exc:  # noqa: BLE001 - the point of the sweep
        return "crashed", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
    finally:
        signal.alarm(0)


def _pattern(message: str, model_type: str, architecture: str) -> str:
    """A refusal with the model's names, other class names, quoted words and numbers blanked."""
    import re

    text = message.replace(architecture, "<class>").replace(model_type, "<type>")
    text = re.sub(r"\b[A-Z][A-Za-z0-9_]*(Config|Model|ForCausalLM|Layer|Block|Decoder\w*)\b", "<class>", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
    return text[:110]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="Only model types containing this substring.")
    parser.add_argument("--timeout", type=int, default=120, help="Seconds per model type.")
    parser.add_argument("-v", "--verbose", action="store_true", help="One line per model type.")
    args = parser.parse_args()

    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGALRM, _alarm)

    outcomes: Counter = Counter()
    refusals: Counter = Counter()
    started = time.perf_counter()
    types = [(t, c) for t, c in model_types() if args.only in t]
    for model_type, architecture in types:
        t0 = time.perf_counter()
        outcome, detail = compile_one(model_type, architecture, args.timeout)
        outcomes[outcome] += 1
        if outcome == "refused":
            refusals[_pattern(detail, model_type, architecture)] += 1
        if args.verbose or outcome in ("crashed", "timeout", "no default"):
            print(f"{outcome:8} {model_type:32} {time.perf_counter() - t0:6.1f}s  {detail[:200]}", flush=True)
    import transformers as tf

    print(f"\ntransformers {tf.__version__}: {len(types)} model types in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())))
    print("refusals by message:")
    for pattern, n in refusals.most_common():
        print(f"  {n:4}  {pattern}")
    return 1 if outcomes["crashed"] or outcomes["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())

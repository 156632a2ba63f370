"""Every causal-LM and image-text-to-text architecture transformers ships compiles to a plan or to a
refusal with a reason: never to a traceback. The population and the spec are bench/coverage.py's
(8 x H200, CPU offload allowed, 1 x 4096 tokens, each model_type's default config); that benchmark
adds the anchor and the simulation, this test only the no-crash property, in one process."""

from __future__ import annotations

import logging
import traceback
import warnings

from planc.compile import ModelInput, compile_plan, installed_packages
from planc.errors import PlancError
from planc.hardware import resolve_inventory
from planc.model import build_model_graph
from planc.spec import parse_spec

SPEC = {
    "planc": 1,
    "model": {"config": "config.json"},
    "hardware": {"gpus": [{"type": "h200", "count": 8}], "cpu_memory": "2048GiB"},
    "workload": {"batch_size": 1, "max_seq_len": 4096},
    "policy": {"offload": "cpu"},
}


def test_every_shipped_architecture_is_planned_or_refused_with_a_reason():
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    spec = parse_spec(SPEC)
    inventory = resolve_inventory(spec.hardware)
    packages = installed_packages()
    population = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()) | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items()))
    outcomes: dict[str, int] = {"planned": 0, "refused": 0}
    crashes = []
    for model_type, architecture in population:
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:  # noqa: BLE001 - transformers' own default config is invalid: nothing to plan
            continue
        config.architectures = [architecture]
        model = ModelInput(config.to_dict(), "sha256:" + "0" * 64, {}, None, None, "config.json")
        try:
            compile_plan(spec, inventory, model, packages, None, build_model_graph)
            outcomes["planned"] += 1
        except PlancError as exc:
            assert str(exc).strip(), f"{architecture}: a refusal without a reason"
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - what this test looks for
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            crashes.append(f"{model_type}/{architecture}: {type(exc).__name__}: {exc} ({frame.filename}:{frame.lineno})")
    assert not crashes, "\n".join(crashes)
    assert len(population) > 250 and outcomes["planned"] > outcomes["refused"], outcomes

"""accelerate's recipe as users write it, on the meta device, and its map in planc's unit names.

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    max_memory = get_balanced_memory(model, max_memory={0: total0, 1: total1, ..., "cpu": ram},
                                     no_split_module_classes=model._no_split_modules)
    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=model._no_split_modules)

`tie_weights()` is the step accelerate's own warning asks for ("The model weights are not tied.
Please use the `tie_weights` method before using the `infer_auto_device` function"): under
transformers 5.23, `init_empty_weights()` re-creates every registered parameter, so the tied
lm_head/embedding pair arrives untied; without the call accelerate plans lm_head as a separate
copy and may put the two ends on different GPUs.

The GPU budgets are the totals the driver reports (the catalogue's figures), i.e. the cards as if
empty; a real `get_max_memory()` would read free memory at call time and give somewhat less.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecipeResult:
    device_map: dict[str, int | str]  # accelerate's keys (module paths), execution order
    max_memory: dict[int | str, int]  # what get_balanced_memory returned
    build_seconds: float  # init_empty_weights + from_config (the shared meta-model build)
    plan_seconds: float  # get_balanced_memory + infer_auto_device_map


def accelerate_device_map(config_dict: dict[str, Any], dtype: str, gpu_memory: list[int], cpu_memory: int) -> RecipeResult:
    """Run the recipe; budgets are `gpu_memory` (bytes per GPU, CUDA order) and `cpu_memory`."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import get_balanced_memory, infer_auto_device_map
    from transformers import AutoModelForCausalLM

    from planc.model import make_config

    # accelerate checks the GPU ids against torch.cuda and logs "Device 0 is not available" on a CPU build.
    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)
    config = make_config(config_dict)
    started = time.perf_counter()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.tie_weights()
    built = time.perf_counter()
    no_split = list(model._no_split_modules or ())
    budgets: dict[int | str, int] = {i: memory for i, memory in enumerate(gpu_memory)}
    budgets["cpu"] = cpu_memory
    max_memory = get_balanced_memory(model, max_memory=dict(budgets), no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    planned = time.perf_counter()
    return RecipeResult(dict(device_map), dict(max_memory), built - started, planned - built)


def device_of_units(device_map: dict[str, int | str], unit_names: list[str]) -> dict[str, int | str]:
    """Each planc unit's device under `device_map` (longest entry that is the unit or a prefix of it).

    accelerate never cuts below planc's units (no-split blocks and leaves), so every unit lies
    inside one entry; an entry below a unit would be a planc bug and raises.
    """
    out = {}
    for unit in unit_names:
        best = None
        for entry in device_map:
            if entry == "" or unit == entry or unit.startswith(entry + "."):
                if best is None or len(entry) > len(best):
                    best = entry
        if best is None:
            inside = [e for e in device_map if e.startswith(unit + ".")]
            raise ValueError(f"accelerate's map does not place planc unit {unit} (entries inside it: {inside[:3]})")
        out[unit] = device_map[best]
    return out

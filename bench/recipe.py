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

For a quantized model the anchor is transformers' own `device_map="auto"` instead
(`transformers_device_map`): that is the planner users of a quantized checkpoint get.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from unittest import mock
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


def transformers_device_map(
    config_dict: dict[str, Any], dtype: str, gpu_memory: list[int], cpu_memory: int, quantization: dict[str, Any],
    pre_quantized: bool,
) -> RecipeResult:
    """What `from_pretrained(..., device_map="auto", max_memory=...)` plans for a quantized model.

    transformers' own steps (integrations/accelerate.py `_get_device_map`): the quantizer swaps the
    model on meta (`preprocess_model`), `get_balanced_memory` and `infer_auto_device_map` size every
    tensor with `hf_quantizer.param_element_size` (exact for pre-quantized fp8; flat 0.5 byte per
    bitsandbytes 4-bit weight and 1 per 8-bit one; mxfp4's packed bytes without their scales), and
    `adjust_max_memory` scales the budgets (0.9 for bitsandbytes). Its final `validate_environment`
    is skipped: it probes this machine (no GPU) and would flip fp8 to dequantize after the fact. The
    caller passes the config transformers would hold on the target GPUs (dequantize set when the
    cards cannot run it natively: validate_environment flips that before the map is made).
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map
    from transformers.modeling_utils import local_torch_dtype
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.auto import AutoQuantizationConfig

    from planc.model import make_config

    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = make_config(config_dict)
    torch_dtype = getattr(torch, dtype)
    started = time.perf_counter()
    quantizer = AutoHfQuantizer.from_config(AutoQuantizationConfig.from_dict(dict(quantization)), pre_quantized=pre_quantized)
    with init_empty_weights(), local_torch_dtype(torch_dtype):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        # mxfp4's swap fetches a hub kernel first; its structure does not depend on it.
        with mock.patch("transformers.integrations.hub_kernels.get_kernel", return_value=object()):
            quantizer.preprocess_model(model, dtype=torch_dtype, device_map=None, use_kernels=True)
    model.tie_weights()
    built = time.perf_counter()
    no_split = list(model._no_split_modules or ())
    budgets: dict[int | str, int] = {i: memory for i, memory in enumerate(gpu_memory)}
    budgets["cpu"] = cpu_memory
    max_memory = get_balanced_memory(model, max_memory=dict(budgets), no_split_module_classes=no_split,
                                     hf_quantizer=quantizer)
    max_memory = quantizer.adjust_max_memory(max_memory)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                       hf_quantizer=quantizer)
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

"""compressed-tensors checkpoints (`quant_method: compressed-tensors`, llm-compressor's format).

By default transformers loads the compressed tensors and compressed-tensors decompresses each
module on its first forward: from then on the model holds dense weights at the plan's dtype, and
that steady state is what the plan sizes ("dequantized"). With `use_optimized_inference: true` in
the config and an fp8 weight scheme, transformers keeps the targeted linears in fp8
(`CompressedTensorsFP8Linear`: float8_e4m3fn [out, in] plus an fp32 row scale [1, out]) where the
GPUs have fp8 matmuls (sm89+): method `compressed-tensors-fp8`. Targets and ignores are matched as
compressed-tensors matches them: a class name, or `re:` and a regex on the module name.
"""

from __future__ import annotations

import re
from typing import Any

from planc.errors import ModelError
from planc.model.quant import mark, record


def _groups(quant: dict[str, Any]) -> dict[str, Any]:
    groups = quant.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise ModelError("compressed-tensors quantization_config: config_groups is not a mapping")
    return groups


def _is_fp8(group: dict[str, Any]) -> bool:
    weights = group.get("weights") or {}
    return weights.get("type") == "float" and weights.get("num_bits") == 8


def variant(quant: dict[str, Any]) -> str:
    if quant.get("use_optimized_inference") and any(_is_fp8(g) for g in _groups(quant).values()):
        return "compressed-tensors-fp8"
    return "compressed-tensors"


def validate(quant: dict[str, Any], config_dict: dict[str, Any]) -> None:
    if not _groups(quant):
        raise ModelError("compressed-tensors checkpoint without config_groups: nothing says which weights are quantized")


def describe(quant: dict[str, Any]) -> str:
    if variant(quant) == "compressed-tensors-fp8":
        return "fp8 linears with fp32 row scales (use_optimized_inference)"
    return "decompressed to the plan's dtype on the first forward"


def _matches(pattern: str, name: str, module) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == type(module).__name__ or pattern == name


def prepare(model, quantization, dtype: str, offloaded: tuple[str, ...]) -> None:
    if not quantization.native:
        return
    import torch
    from torch import nn
    from transformers.integrations.compressed_tensors import CompressedTensorsFP8Linear
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = quantization.config
    targets = [t for g in _groups(config).values() if _is_fp8(g) for t in g.get("targets", [])]
    ignore = list(config.get("ignore") or [])
    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, nn.Linear) or not should_convert_module(name, skip):
            continue
        if not any(_matches(t, name, module) for t in targets) or any(_matches(i, name, module) for i in ignore):
            continue
        with torch.device("meta"):
            swapped = CompressedTensorsFP8Linear(module.in_features, module.out_features, module.bias is not None)
        mark(swapped, record(module, swapped, token_transient=module.in_features + 4))
        model.set_submodule(name, swapped)


def simulated_forwards(model) -> int:
    """Give CompressedTensorsFP8Linear a forward that allocates what its row-wise fp8 matmul does."""
    import types

    from transformers.integrations.compressed_tensors import CompressedTensorsFP8Linear

    count = 0
    for module in model.modules():
        if isinstance(module, CompressedTensorsFP8Linear):
            module.forward = types.MethodType(_row_scaled_forward, module)
            count += 1
    return count


def _row_scaled_forward(self, x):
    """quantize_fp8_per_row (an fp8 copy and a scale per row) then the row-wise scaled matmul's output."""
    from planc.model.quant.fp8 import fp8_matmul_output

    out = fp8_matmul_output(x, self.weight, self.in_features, self.out_features, None)
    return out + self.bias if self.bias is not None else out

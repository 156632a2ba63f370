"""AWQ checkpoints (`quant_method: awq`, loaded through gptqmodel).

transformers' `replace_with_awq_linear` swaps every `nn.Linear` outside `modules_to_not_convert`
and the default skips (lm_head, tied and last modules). The GEMM format's layout is `packed.py`'s
("awq": qweight packed along the outputs); the GEMV formats pad their packing differently and are
refused. On CUDA, transformers casts a bfloat16 request to float16 (`AwqQuantizer.update_dtype`):
the dtype rules pick float16 for AWQ on GPUs.
"""

from __future__ import annotations

from typing import Any

from planc.errors import ModelError
from planc.model.quant import packed
from planc.model.quant.gptq import _refuse_fused_experts

GEMM_FORMATS = ("gemm", "exllama", "exllama_v1", "exllama_v2", "marlin", "ipex", "llm-awq")


def awq_format(quant: dict[str, Any]) -> str:
    return str(quant.get("format") or quant.get("version") or "gemm").lower()


def validate(quant: dict[str, Any], config_dict: dict[str, Any]) -> None:
    if quant.get("bits", 4) != 4:
        raise ModelError(f"AWQ checkpoint with bits {quant.get('bits')!r}: AWQ kernels take 4 bits")
    if awq_format(quant) not in GEMM_FORMATS:
        raise ModelError(f"AWQ format {awq_format(quant)!r}: planc sizes the GEMM packing only (gemv pads rows)")
    _refuse_fused_experts(config_dict, "AWQ")


def describe(quant: dict[str, Any]) -> str:
    return f"int4 weights packed in int32 (AWQ {awq_format(quant)}), fp16 scales per {quant.get('group_size', 128)} inputs"


def prepare(model, quantization, dtype: str, offloaded: tuple[str, ...]) -> None:
    from torch import nn
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = quantization.config
    skip = HfQuantizer.get_modules_to_not_convert(
        model, config.get("modules_to_not_convert"), model._keep_in_fp32_modules, add_default_skips=True
    )
    for name, module in list(model.named_modules()):
        if name and isinstance(module, nn.Linear) and should_convert_module(name, skip):
            packed.swap(model, name, module, config.get("bits", 4), config.get("group_size", 128), "awq", dtype)

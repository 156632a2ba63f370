"""GPTQ checkpoints (`quant_method: gptq`, loaded through optimum + gptqmodel).

optimum's `GPTQQuantizer.convert_model` swaps the `nn.Linear` / `Conv1D` modules inside the decoder
blocks (only `modules_in_block_to_quantize` when the config lists them), plus lm_head when the
config says `lm_head: true`; everything else (embeddings, norms, routers, the head) stays at the
plan's dtype. The layout is `packed.py`'s. Fused 3-D MoE experts have no per-expert linears to
swap, so a GPTQ MoE checkpoint does not load into transformers 5's fused experts: refused.
"""

from __future__ import annotations

from typing import Any

from planc.errors import ModelError
from planc.model.quant import packed


def validate(quant: dict[str, Any], config_dict: dict[str, Any]) -> None:
    bits = quant.get("bits")
    if bits not in (2, 3, 4, 8):
        raise ModelError(f"GPTQ checkpoint with bits {bits!r}: transformers supports 2, 3, 4 and 8")
    if quant.get("dynamic"):
        raise ModelError("GPTQ checkpoint with per-module `dynamic` overrides: planc does not size mixed bit widths")
    if quant.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        raise ModelError(f"GPTQ checkpoint_format {quant.get('checkpoint_format')!r}: planc sizes the gptq packing only")
    _refuse_fused_experts(config_dict, "GPTQ")


def _refuse_fused_experts(config_dict: dict[str, Any], method: str) -> None:
    text = config_dict.get("text_config") if isinstance(config_dict.get("text_config"), dict) else config_dict
    if any(text.get(key) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ModelError(
            f"{method} checkpoint of a MoE model: transformers 5 holds routed experts as fused 3-D tensors, which "
            f"the {method} integration cannot load per expert"
        )


def describe(quant: dict[str, Any]) -> str:
    return f"int{quant['bits']} weights packed in int32, fp16 scales per {quant.get('group_size', 128)} inputs"


def prepare(model, quantization, dtype: str, offloaded: tuple[str, ...]) -> None:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    config = quantization.config
    no_split = tuple(model._no_split_modules or ())
    block_names = [name for name, module in model.named_modules() if type(module).__name__ in no_split]
    wanted = config.get("modules_in_block_to_quantize")
    allowed = {name for group in wanted for name in group} if wanted else None
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if not (type(module) is nn.Linear or isinstance(module, Conv1D)):
            continue
        block = next((b for b in block_names if name.startswith(b + ".")), None)
        in_block = block is not None and (allowed is None or name[len(block) + 1:] in allowed)
        if in_block or (module is head and config.get("lm_head")):
            packed.swap(model, name, module, config["bits"], config.get("group_size", 128), "gptq", dtype)

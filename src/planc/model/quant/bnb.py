"""bitsandbytes at load (`model.quantize: bnb-4bit | bnb-8bit`), sized per bitsandbytes 0.50's layout.

Which modules: those transformers' `replace_with_bnb_linear` swaps, found with its own helpers:
exactly `nn.Linear` (and `Conv1D`) outside `get_modules_to_not_convert` (lm_head, tied and last
modules, `_keep_in_fp32_modules`, or `llm_int8_skip_modules` when given). Fused 3-D MoE experts,
routers and embeddings are not `nn.Linear` and stay dense (bitsandbytes issue #1849). Entries the
device_map puts on cpu/disk are added to the skip list (`llm_int8_enable_fp32_cpu_offload`) and stay
dense too.

The layout, per swapped module of N = out x in weights (bitsandbytes/functional.py `quantize_4bit`,
`quantize_blockwise`; nn/modules.py `Params4bit`, `Int8Params`):
- 4-bit: packed uint8 [ceil(N/2), 1] (the parameter), and in its quant state fp32 absmax per 64
  weights and the 16-entry fp32 code; with double quantization the absmax is uint8 plus an fp32
  offset, fp32 absmax per 256 blocks and the 256-entry fp32 second code (one per module, as
  measured on bitsandbytes 0.50's CPU backend: tests/test_quant.py).
- 8-bit: int8 [out, in] (the parameter) and fp32 SCB [out] per-row scales.

planc's stand-ins below carry that layout on meta without importing bitsandbytes (planning needs
none of the kernel packages); their parameters have bitsandbytes' names, so a device_map made for
them places the real modules.
"""

from __future__ import annotations

from typing import Any

from planc.model.quant import ELEMENT_BYTES, mark, record

BLOCKSIZE = 64  # Params4bit's default blocksize (CUDA and CPU)
NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) quantizes absmax in blocks of 256
CODE_ENTRIES = 16  # get_4bit_type: the nf4 / fp4 value table, fp32, one per module
NESTED_CODE_ENTRIES = 256  # create_dynamic_map: the 8-bit code of the double-quantized absmax


def config_arguments(requested, dtype: str) -> dict[str, Any]:
    """BitsAndBytesConfig keyword arguments for a spec's `model.quantize` at the plan's compute dtype."""
    arguments: dict[str, Any] = {"llm_int8_skip_modules": list(requested.skip_modules) or None}
    if requested.method == "bnb-4bit":
        arguments.update(
            load_in_4bit=True,
            bnb_4bit_quant_type=requested.quant_type,
            bnb_4bit_use_double_quant=requested.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        arguments["load_in_8bit"] = True
    return arguments


def describe(config: dict[str, Any]) -> str:
    if config.get("load_in_4bit"):
        double = ", double-quantized absmax" if config.get("bnb_4bit_use_double_quant") else ""
        return f"{config['bnb_4bit_quant_type']} 4-bit weights, absmax per {BLOCKSIZE}{double}"
    return "int8 weights with fp32 per-row scales (LLM.int8())"


def four_bit_hidden(weights: int, double_quant: bool) -> tuple[tuple[tuple[int, ...], str], ...]:
    """The quant state of one 4-bit weight of `weights` elements."""
    blocks = -(-weights // BLOCKSIZE)
    code = ((CODE_ENTRIES,), "float32")
    if not double_quant:
        return (((blocks,), "float32"), code)
    nested = ((-(-blocks // NESTED_BLOCKSIZE),), "float32")
    return (((blocks,), "uint8"), ((), "float32"), nested, ((NESTED_CODE_ENTRIES,), "float32"), code)


def _stand_ins():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Linear4bit(nn.Module):
        """planc's stand-in for bitsandbytes.nn.Linear4bit on meta: its parameters, and its forward's memory.

        Prefill (bitsandbytes' dequant fallback past a few rows) dequantizes the whole weight to the
        compute dtype, then calls F.linear; a decode step's kernel reads the packed weight directly.
        """

        def __init__(self, in_features: int, out_features: int, bias: bool, dtype, double_quant: bool):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.double_quant = double_quant
            weights = in_features * out_features
            self.weight = nn.Parameter(torch.empty((weights + 1) // 2, 1, dtype=torch.uint8), requires_grad=False)
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

        def forward(self, x):
            if x.numel() // x.shape[-1] > DECODE_ROWS:
                # _dequant_linear_fallback: the nested absmax dequantized (and offset) in fp32, then
                # the weight in the compute dtype; all alive until F.linear returns.
                absmax = []
                if self.double_quant:
                    blocks = -(-self.in_features * self.out_features // BLOCKSIZE)
                    absmax = [torch.empty(blocks, dtype=torch.float32, device=x.device) for _ in range(2)]
                weight = torch.empty(self.out_features, self.in_features, dtype=x.dtype, device=x.device)
                out = F.linear(x, weight, self.bias)
                del absmax, weight
                return out
            return torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)

    class Linear8bitLt(nn.Module):
        """planc's stand-in for bitsandbytes.nn.Linear8bitLt: int8 weight, and LLM.int8()'s int32 accumulator."""

        def __init__(self, in_features: int, out_features: int, bias: bool, dtype):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

        def forward(self, x):
            rows = x.shape[:-1]
            # MatMul8bitLt casts other inputs to float16 first ("inputs will be cast ... to float16").
            half = torch.empty(*rows, self.in_features, dtype=torch.float16, device=x.device) if x.dtype != torch.float16 else None
            quantized = torch.empty(*rows, self.in_features, dtype=torch.int8, device=x.device)
            scales = torch.empty(*rows, dtype=torch.float32, device=x.device)
            accumulated = torch.empty(*rows, self.out_features, dtype=torch.int32, device=x.device)
            del quantized, scales, half
            out = torch.empty(*rows, self.out_features, dtype=x.dtype, device=x.device)
            del accumulated
            return out

    return Linear4bit, Linear8bitLt


# bitsandbytes' 4-bit kernel reads the packed weight directly for at most this many rows
# (backends/cuda/ops.py _GEMM_4BIT_CUSTOM_FLOOR_M); a prefill's rows go through the dequantize +
# F.linear fallback (beyond the arch heuristics' caps, and always past 1536 rows).
DECODE_ROWS = 4


def prepare(model, quantization, dtype: str, offloaded: tuple[str, ...]) -> None:
    """Swap the modules transformers would give to bitsandbytes for planc's stand-ins."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from planc.model.build import torch_dtype

    config = quantization.config
    four_bit = bool(config.get("load_in_4bit"))
    double = bool(config.get("bnb_4bit_use_double_quant"))
    skip = HfQuantizer.get_modules_to_not_convert(model, config.get("llm_int8_skip_modules"), model._keep_in_fp32_modules)
    skip = skip + list(offloaded)
    Linear4bit, Linear8bitLt = _stand_ins()
    element = ELEMENT_BYTES[dtype]
    for name, module in list(model.named_modules()):
        if not name or not should_convert_module(name, skip):
            continue
        if not (isinstance(module, Conv1D) or type(module) is nn.Linear):
            continue
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
        else:
            # int(): a model may build its Linear from 0-d tensors (Inkling's vision folds), which
            # nn.Linear keeps as its in_features / out_features.
            in_features, out_features = int(module.in_features), int(module.out_features)
        has_bias = module.bias is not None
        weights = in_features * out_features
        with torch.device("meta"):
            if four_bit:
                swapped = Linear4bit(in_features, out_features, has_bias, torch_dtype(dtype), double)
                absmax = 2 * -(-weights // BLOCKSIZE) * 4 if double else 0
                mark(swapped, record(module, swapped, four_bit_hidden(weights, double),
                                     prefill_transient=weights * element + absmax))
            else:
                swapped = Linear8bitLt(in_features, out_features, has_bias, torch_dtype(dtype))
                # Per token: the float16 cast of other inputs, the int8 input and its scale, the int32 result.
                cast = 2 * in_features if dtype != "float16" else 0
                mark(swapped, record(module, swapped, (((out_features,), "float32"),),
                                     token_transient=cast + in_features + 4 + 4 * out_features))
        model.set_submodule(name, swapped)

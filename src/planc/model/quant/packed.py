"""The int-packed layout GPTQ and AWQ checkpoints share, as gptqmodel's quant linears register it.

A quantized linear of in x out weights at `bits` bits with groups of G input rows holds int32
`qweight` (bits/32 of an int32 per weight), int32 `qzeros` (one zero point per group and output,
packed the same way), fp16 `scales` (per group and output), for GPTQ an int32 `g_idx` [in] (the
group of each input row), and an fp16 `bias`. All are buffers, not parameters. planc's stand-in
registers exactly those buffers on meta (gptqmodel is not needed to plan); its forward, run only
by the simulation, allocates what the unpacking kernels allocate: the dequantized weight during a
prefill, the output otherwise.
"""

from __future__ import annotations

from planc.model.quant import ELEMENT_BYTES, mark, record

PACK_BITS = 32  # int32 storage
DECODE_ROWS = 8  # the fused kernels read packed weights directly for small batches


def packed_shapes(in_features: int, out_features: int, bits: int, group_size: int, layout: str):
    """{buffer: (shape, dtype)} of one packed linear; layout "gptq" ([in, out] packed along in) or "awq"."""
    group = in_features if group_size in (-1, 0, None) else group_size
    groups = -(-in_features // group)
    zeros = (groups, -(-out_features * bits // PACK_BITS))
    shapes = {"qzeros": (zeros, "int32"), "scales": ((groups, out_features), "float16")}
    if layout == "gptq":
        shapes["qweight"] = ((-(-in_features * bits // PACK_BITS), out_features), "int32")
        shapes["g_idx"] = ((in_features,), "int32")
    else:
        shapes["qweight"] = ((in_features, -(-out_features * bits // PACK_BITS)), "int32")
    return shapes


def swap(model, name: str, module, bits: int, group_size: int, layout: str, dtype: str) -> None:
    """Replace the linear `name` by the stand-in and mark it."""
    import torch

    in_features, out_features = _features(module)
    with torch.device("meta"):
        stand_in = _stand_in_class()(in_features, out_features, module.bias is not None,
                                     packed_shapes(in_features, out_features, bits, group_size, layout))
    # A prefill unpacks the whole weight to the activations' dtype before the matmul.
    mark(stand_in, record(module, stand_in, prefill_transient=in_features * out_features * ELEMENT_BYTES[dtype]))
    model.set_submodule(name, stand_in)


def _features(module) -> tuple[int, int]:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return int(module.in_features), int(module.out_features)  # 0-d tensors in some models (Inkling's vision)


def _stand_in_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class QuantLinear(nn.Module):
        """planc's stand-in for gptqmodel's quant linear: its buffers, and its forward's memory."""

        def __init__(self, in_features: int, out_features: int, bias: bool, shapes: dict):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            for buffer, (shape, dtype) in shapes.items():
                self.register_buffer(buffer, torch.empty(shape, dtype=getattr(torch, dtype)))
            self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16) if bias else None)

        def forward(self, x):
            if x.numel() // x.shape[-1] > DECODE_ROWS:
                weight = torch.empty(self.out_features, self.in_features, dtype=x.dtype, device=x.device)
                out = F.linear(x, weight)
                del weight
                return out
            return torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)

    return QuantLinear

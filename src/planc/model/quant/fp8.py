"""Fine-grained fp8 checkpoints (`quant_method: fp8`: DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8).

transformers' own swap builds the layout (`FineGrainedFP8HfQuantizer.preprocess_model`, which runs
without a GPU and without the kernels it calls at forward time): every `nn.Linear` becomes
`FP8Linear` (float8_e4m3fn weight [out, in] plus `weight_scale_inv` [ceil(out/b0), ceil(in/b1)],
fp32 or 1-byte ue8m0 for `scale_fmt: ue8m0`; a scalar scale without `weight_block_size`; an fp32
`activation_scale` per module for `activation_scheme: static`), modules named `*.experts` become
`FP8Experts` (3-D fp8 weights and scales), and the skip list (lm_head, embeddings, routers,
`modules_to_not_convert`) stays at the plan's dtype. Every byte is a parameter, so the module
tensors are the whole layout. Dequantized (below sm89, or on the CPU) the model is dense.
"""

from __future__ import annotations

from typing import Any

from planc.errors import ModelError
from planc.model.quant import mark, record


def validate(quant: dict[str, Any], config_dict: dict[str, Any]) -> None:
    """Refuse the fp8 variants transformers cannot build or planc cannot run."""
    from transformers.utils.quantization_config import FineGrainedFP8Config

    try:
        FineGrainedFP8Config.from_dict(dict(quant))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"quantization_config (fp8) does not load in transformers: {exc}") from None
    if quant.get("expert_dtype", "fp8") != "fp8":
        raise ModelError("fp8 checkpoint with fp4 experts (expert_dtype: fp4): DeepGEMM-only, not planned by planc")


def describe(quant: dict[str, Any]) -> str:
    block = quant.get("weight_block_size")
    scales = "ue8m0" if quant.get("scale_fmt") == "ue8m0" else "fp32"
    blocks = f"{block[0]}x{block[1]} blocks" if block else "per-tensor"
    return f"float8_e4m3fn weights, {scales} scales per {blocks}, {quant.get('activation_scheme', 'dynamic')} activations"


def prepare(model, quantization, dtype: str, offloaded: tuple[str, ...]) -> None:
    """transformers' own swap, with a fresh config (its `dequantize` flag is set from the plan, never probed)."""
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear
    from transformers.quantizers import AutoHfQuantizer
    from transformers.utils.quantization_config import FineGrainedFP8Config

    from planc.model.build import torch_dtype

    config = FineGrainedFP8Config.from_dict({**quantization.config, "dequantize": not quantization.native})
    originals = dict(model.named_modules()) if quantization.native else {}
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)
    quantizer.preprocess_model(model, dtype=torch_dtype(dtype), device_map=None)
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            inputs = module.in_features
        elif isinstance(module, FP8Experts):
            inputs = max(module.hidden_dim, module.intermediate_dim)
        else:
            continue
        mark(module, record(originals[name], module, token_transient=_activation_quant_bytes(inputs, module.block_size)))


def _activation_quant_bytes(in_features: int, block_size) -> int:
    """Per token: the fp8 copy of the input the kernel makes, and its fp32 scale per block of in_features."""
    group = block_size[1] if block_size else in_features
    return in_features + -(-in_features // group) * 4


def fp8_matmul_output(x, weight, in_features: int, out_features: int, block_size):
    """What the fp8 kernels allocate for `x @ weight.T`: an fp8 copy of x and its block scales, then the output.

    The finegrained-fp8 Triton kernel cannot run under fake tensors; this is its memory, and the
    device check a real matmul makes.
    """
    import torch

    if weight.device != x.device:
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two devices, {x.device} and {weight.device}!"
        )
    rows = x.shape[:-1]
    group = block_size[1] if block_size else in_features
    quantized = torch.empty(*rows, in_features, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(*rows, -(-in_features // group), dtype=torch.float32, device=x.device)
    out = torch.empty(*rows, out_features, dtype=x.dtype, device=x.device)
    del quantized, scales
    return out


def simulated_forwards(model) -> int:
    """Give FP8Linear and FP8Experts forwards that allocate what their kernels do; returns how many."""
    import types

    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear

    count = 0
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.forward = types.MethodType(_linear_forward, module)
            count += 1
        elif isinstance(module, FP8Experts):
            module.forward = types.MethodType(_experts_worst_iteration, module)
            count += 1
    return count


def _linear_forward(self, x):
    out = fp8_matmul_output(x, self.weight, self.in_features, self.out_features, self.block_size)
    return out + self.bias if self.bias is not None else out


def _experts_worst_iteration(self, hidden_states, top_k_index, top_k_weights):
    """FP8Experts.forward at its worst iteration: one expert receiving every token (as planc simulate
    bounds transformers' eager experts loop), its matmuls as the fp8 kernel allocates them."""
    import torch
    import torch.nn.functional as F

    tokens = hidden_states.shape[0]
    final = torch.zeros_like(hidden_states, dtype=torch.float32)
    expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0)
    token_index = torch.zeros(tokens, dtype=torch.long, device=hidden_states.device)
    current = hidden_states[token_index]
    up = self.gate_up_proj if self.has_gate else self.up_proj
    projected = fp8_matmul_output(current, up, self.hidden_dim, up.shape[1], self.block_size)
    projected = self._apply_gate(projected) if self.has_gate else self.act_fn(projected)
    out = fp8_matmul_output(projected, self.down_proj, self.intermediate_dim, self.hidden_dim, self.block_size)
    out = out * top_k_weights[token_index, 0, None].to(out.dtype)
    final.index_add_(0, token_index, out.to(final.dtype))
    del expert_mask, expert_hit
    return final.to(hidden_states.dtype)

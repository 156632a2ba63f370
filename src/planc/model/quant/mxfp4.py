"""mxfp4 checkpoints (gpt-oss): only the MoE experts are quantized.

transformers' `replace_with_mxfp4_linear` fetches a Triton kernel from the hub (`get_kernel`) before
it swaps anything, so planc makes the same swap itself with transformers' own classes: each
`GptOssMLP` whose experts are not in `modules_to_not_convert` becomes `Mxfp4GptOssMLP(router,
Mxfp4GptOssExperts)`, with packed uint8 `gate_up_proj` [E, 2I, H/2] and `down_proj` [E, H, I/2] and
fp32 biases. The E8M0 scales, one byte per 32 weights, are not parameters: at load they go into a
Triton precision config. They are counted here as hidden state (N/32 bytes per expert matrix, which
`named_parameters()` misses). Swizzled expert tensors are not Parameters either, so accelerate cannot
offload them: mxfp4 experts must sit on a GPU.
"""

from __future__ import annotations

from typing import Any

from planc.model.quant import ELEMENT_BYTES, mark, record

SCALE_GROUP = 32  # weights per E8M0 scale


def validate(quant: dict[str, Any], config_dict: dict[str, Any]) -> None:
    from planc.errors import ModelError

    if config_dict.get("model_type") != "gpt_oss":
        raise ModelError(f"mxfp4 checkpoint of {config_dict.get('model_type')}: transformers swaps only gpt-oss experts")


def describe(quant: dict[str, Any]) -> str:
    return "MoE experts as packed fp4 (uint8, two weights a byte) with one E8M0 scale per 32 weights"


def prepare(model, quantization, dtype: str, offloaded: tuple[str, ...]) -> None:
    """The swap `replace_with_mxfp4_linear` makes, without fetching its kernel; nothing when dequantized."""
    if not quantization.native:
        return
    import torch
    from transformers.integrations.mxfp4 import Mxfp4GptOssExperts, Mxfp4GptOssMLP
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(
        model, quantization.config.get("modules_to_not_convert"), model._keep_in_fp32_modules
    )
    for name, module in list(model.named_modules()):
        if isinstance(module, GptOssMLP) and should_convert_module(f"{name}.experts", skip):
            with torch.device("meta"):
                experts = Mxfp4GptOssExperts(model.config)
                model.set_submodule(name, Mxfp4GptOssMLP(module.router, experts))
            # Two fp4 weights per packed byte: packed.numel() * 2 weights, one scale byte per 32.
            hidden = tuple(
                ((getattr(experts, proj).numel() * 2 // SCALE_GROUP,), "uint8") for proj in ("gate_up_proj", "down_proj")
            )
            # matmul_ogs gathers rows in-kernel and fuses SwiGLU: top_k x I per token, then H (see _mlp_forward).
            per_token = (module.router.top_k * experts.intermediate_size + experts.hidden_size) * ELEMENT_BYTES[dtype]
            mark(experts, record(module.experts, experts, hidden, offloadable=False, experts_token_transient=per_token))


def simulated_forwards(model) -> int:
    """Give Mxfp4GptOssMLP a forward that allocates what the Triton MoE kernels do; returns how many."""
    import types

    from transformers.integrations.mxfp4 import Mxfp4GptOssMLP

    count = 0
    for module in model.modules():
        if isinstance(module, Mxfp4GptOssMLP):
            module.forward = types.MethodType(_mlp_forward, module)
            count += 1
    return count


def _mlp_forward(self, hidden_states):
    """Mxfp4GptOssMLP.forward's memory: the router's logits, then matmul_ogs twice.

    The first gathers each token's rows inside the kernel and fuses the SwiGLU, so it writes
    tokens x top_k x I; the second scatters back with the routing weights to tokens x H.
    """
    import torch
    import torch.nn.functional as F

    batch = hidden_states.shape[0]
    hidden = hidden_states.reshape(-1, self.router.hidden_dim)
    router_logits = F.linear(hidden, self.router.weight, self.router.bias)
    experts = self.experts
    if experts.gate_up_proj.device != hidden.device:
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"{hidden.device} and {experts.gate_up_proj.device}!"
        )
    tokens = hidden.shape[0]
    intermediate = torch.empty(tokens * self.router.top_k, experts.intermediate_size, dtype=hidden.dtype,
                               device=hidden.device)
    routed = torch.empty(tokens, experts.hidden_size, dtype=hidden.dtype, device=hidden.device)
    del intermediate
    return routed.reshape(batch, -1, self.router.hidden_dim), router_logits

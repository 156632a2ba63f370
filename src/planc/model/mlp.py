"""The feed-forward half of a decoder layer (dense, gated or not; routed experts): its transients."""

from __future__ import annotations

from planc.model.config import DTYPE_BYTES, Shapes
from planc.workload import Workload

# Architectures whose MLP is not gated keep four b x t x I intermediates (fc, and gelu_new's
# pieces) where gated ones keep three (gate, up, their product).
NON_GATED_MLP = {"gpt2"}
# MoE implementations that keep routing weights in fp32 (DeepSeek-V3's gate); the others cast
# them to the model dtype (Qwen3-MoE: router_top_value.to(router_logits.dtype)).
FP32_ROUTING_WEIGHTS = {"deepseek_v3"}
# Activation modules whose forward holds more than one intermediate-wide tensor besides its input,
# by class: bytes per intermediate element alive at their peak (their input excluded).
ACTIVATION_PEAK_BYTES = {
    # XIELUActivation._xielu_python (the path without the xielu CUDA package): torch.where over
    # `x > 0` (bool) with the positive branch's result, while the negative branch holds its
    # expm1 product, beta * x and their sum.
    "XIELUActivation": lambda element: 4 * element + 1,
}


def sized_activation(layer_module) -> str:
    """The class of the activation module in a decoder layer when ACTIVATION_PEAK_BYTES sizes it, else ""."""
    return next((type(m).__name__ for m in layer_module.modules() if type(m).__name__ in ACTIVATION_PEAK_BYTES), "")


def transient_bytes(
    shapes: Shapes, moe: bool, workload: Workload, dtype: str, model_type: str = "", kernel_token_bytes: int = 0,
    every_expert: bool = False, activation: str = "",
) -> int:
    """Peak transient bytes inside one feed-forward block over the largest step.

    `kernel_token_bytes`: a fused MoE kernel's bytes per token (mxfp4's Triton matmul_ogs, from
    planc.model.quant), in place of the experts' intermediates. `every_expert`: experts that run
    every token (Llama 4: the hidden states repeated once per expert, then one batched matmul).
    `activation`: the layer's activation class when ACTIVATION_PEAK_BYTES sizes it.
    """
    e = DTYPE_BYTES[dtype]
    b, t, h = workload.batch_size, workload.step_tokens, shapes.hidden_size
    if moe:
        routed_rows = b * t * (shapes.num_experts if every_expert else shapes.experts_per_token)
        # Peak of the expert step: gathered inputs with gate/up/activation intermediates, or the
        # down projection and its weighting by the routing weights.
        r = 4 if model_type in FP32_ROUTING_WEIGHTS else e
        routed = routed_rows * max((h + 4 * shapes.moe_intermediate_size) * e, h * (2 * e + 2 * r))
        if kernel_token_bytes:
            routed = b * t * kernel_token_bytes
        router = b * t * shapes.num_experts * 4 * 2
        shared = 3 * b * t * shapes.shared_intermediate_size * e
        return routed + router + shared
    if activation in ACTIVATION_PEAK_BYTES:
        # The up projection's output beside the activation's peak: down(act(up(x))), the one MLP
        # using such an activation (Apertus') being a non-gated one.
        return b * t * shapes.intermediate_size * (e + ACTIVATION_PEAK_BYTES[activation](e))
    intermediates = 4 if model_type in NON_GATED_MLP else 3
    return intermediates * b * t * shapes.intermediate_size * e

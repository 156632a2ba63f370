"""Norms outside the decoder layers: the transients of one that upcasts to fp32."""

from __future__ import annotations

from planc.model.config import DTYPE_BYTES, FP32
from planc.workload import Workload


def fp32_norm_transient_bytes(hidden_size: int, workload: Workload, dtype: str) -> int:
    """Peak bytes of an RMSNorm computed in fp32 over the step's hidden states (NanoChatRMSNorm:
    `x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)` on `x.float()`, cast back): its
    model-dtype input beside two fp32 copies (the upcast and its square, then the upcast and the
    product)."""
    return workload.batch_size * workload.step_tokens * hidden_size * (DTYPE_BYTES[dtype] + 2 * FP32)

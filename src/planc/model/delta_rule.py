"""Delta-rule linear attention: gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo hybrid) and Kimi delta
attention (Kimi-Linear, Bailing hybrid): the state each layer keeps and its prefill transients.

State, per sequence (transformers 5.23 `LinearAttentionLayer`, verified against real caches in
tests/test_hybrid.py): the causal convolution's window over the concatenated q, k, v channels,
(conv_dim, kernel) in the model dtype, and the recurrent state in fp32: (Hv, dk, dv) for gated
DeltaNet, (H, d, d) for Kimi delta attention.

Transients. The torch fallback (`torch_chunk_gated_delta_rule`, `torch_chunk_kda`) upcasts q, k,
v to fp32 per value head, pads the sequence to whole 64-token chunks and keeps a dozen such
copies plus chunk x chunk decay matrices alive at its peak (inside the chunk scan); Kimi's keeps
a per-channel decay of chunk x chunk x d per head, about 3 MiB per token per layer at
Kimi-Linear's size. The counts below are the tensors alive at that peak, read from the code and
held to a fake-tensor execution of the real module (tests/test_hybrid.py). The kernel path
(flash-linear-attention's `chunk_gated_delta_rule` / `chunk_kda`) keeps the WY factors, one
state per chunk and the output in the model dtype (fla/ops/gated_delta_rule/chunk.py,
fla/ops/common/chunk_delta_h.py); read from its source, not measured on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from planc.model.cache import FALLBACK, Mixer, conv_window
from planc.model.config import DTYPE_BYTES, FP32
from planc.workload import Workload

CHUNK = 64  # chunk_size of transformers' torch fallbacks and of fla's chunked kernels


def _padded(tokens: int) -> int:
    return -(-tokens // CHUNK) * CHUNK


@dataclass(frozen=True)
class GatedDeltaNet(Mixer):
    """One gated DeltaNet layer (`*GatedDeltaNet` in transformers)."""

    family: ClassVar[str] = "gated_deltanet"
    signature: ClassVar[tuple[str, ...]] = ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim")
    kernel_functions: ClassVar[tuple[str, ...]] = (
        "torch_chunk_gated_delta_rule",
        "torch_recurrent_gated_delta_rule",
        "causal_conv1d_fn",
        "causal_conv1d_update",
    )

    key_heads: int
    value_heads: int
    key_dim: int  # per head
    value_dim: int  # per head
    conv_channels: int
    conv_kernel: int
    held_projection: int  # channels of input projections still alive during the scan, besides the conv's

    @classmethod
    def from_layer(cls, layer, index: int) -> "GatedDeltaNet":
        mixer = cls.module_of(layer, index)
        channels, kernel = conv_window(mixer, index)
        value_width = mixer.num_v_heads * mixer.head_v_dim
        if hasattr(mixer, "in_proj_qkvz"):
            # Qwen3-Next: the fused q/k/v/z projection stays alive (z is a view of it), and z's
            # reshape to heads copies it.
            held = mixer.in_proj_qkvz.out_features + value_width
        elif hasattr(mixer, "in_proj_z"):
            held = mixer.in_proj_z.out_features  # Qwen3.5: z projected on its own
        else:
            held = 0  # OLMo hybrid: separate q, k, v projections, freed once convolved; the gate comes later
        return cls(
            mixer.num_k_heads, mixer.num_v_heads, mixer.head_k_dim, mixer.head_v_dim, channels, kernel, held
        )

    def state_bytes(self, dtype: str) -> int:
        conv = self.conv_channels * self.conv_kernel * DTYPE_BYTES[dtype]
        return conv + self.value_heads * self.key_dim * self.value_dim * FP32

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        e = DTYPE_BYTES[dtype]
        b, t = workload.batch_size, workload.step_tokens
        hk, hv, dk, dv = self.key_heads, self.value_heads, self.key_dim, self.value_dim
        # In the model dtype, for the whole step: the convolution's output (q, k and v are views of
        # it) and the input projections still alive.
        projections = b * t * (self.conv_channels + self.held_projection) * e
        if path == FALLBACK:
            # fp32 per value head over the padded step: five copies of the dk-wide and five of the
            # dv-wide tensors (q and k repeated to the value heads, beta-scaled, decayed, solved)
            # and three chunk x chunk decay / attention matrices; the state before and after a
            # chunk, and three chunk-sized reads of it.
            tp = _padded(t)
            scan = b * tp * hv * (5 * dk + 5 * dv + 3 * CHUNK) * FP32
            per_chunk = b * hv * (3 * CHUNK * dv + 2 * dk * dv) * FP32
            return projections + scan + per_chunk
        # fla: l2-normed q and k, the WY factors w and u, the intra-chunk matrix A, v_new and the
        # output in the model dtype, the gate cumsum in fp32, one state per chunk and the final one.
        tp = _padded(t)
        kernel = b * t * (2 * hk * dk + hv * (dk + 3 * dv + CHUNK)) * e + b * t * hv * FP32
        states = b * (tp // CHUNK) * hv * dk * dv * e + b * hv * dk * dv * FP32
        return projections + kernel + states


@dataclass(frozen=True)
class KimiDeltaAttention(Mixer):
    """One Kimi delta attention layer (per-channel decay; `KimiLinearDeltaAttention` and kin)."""

    family: ClassVar[str] = "kimi_delta"
    signature: ClassVar[tuple[str, ...]] = ("num_heads", "head_dim", "qkv_dim", "conv_dim")
    kernel_functions: ClassVar[tuple[str, ...]] = (
        "chunk_kimi_delta_attention",
        "recurrent_kimi_delta_attention",
        "causal_conv1d_fn",
        "causal_conv1d_update",
    )

    heads: int
    head_dim: int
    conv_channels: int
    conv_kernel: int

    @classmethod
    def from_layer(cls, layer, index: int) -> "KimiDeltaAttention":
        mixer = cls.module_of(layer, index)
        channels, kernel = conv_window(mixer, index)
        return cls(mixer.num_heads, mixer.head_dim, channels, kernel)

    def state_bytes(self, dtype: str) -> int:
        conv = self.conv_channels * self.conv_kernel * DTYPE_BYTES[dtype]
        return conv + self.heads * self.head_dim * self.head_dim * FP32

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        e = DTYPE_BYTES[dtype]
        b, t = workload.batch_size, workload.step_tokens
        h, d = self.heads, self.head_dim
        tp = _padded(t)
        # The convolution's output (q, k, v) in the model dtype and the fp32 per-channel forget gate.
        projections = b * t * self.conv_channels * e + b * t * h * d * FP32
        if path == FALLBACK:
            # Three per-channel decay tensors of chunk x chunk x d per head (the decay, its exp and
            # the decayed keys) next to six fp32 copies of the d-wide q/k/v/gate tensors.
            return projections + b * tp * h * (3 * CHUNK * d + 6 * d) * FP32
        # fla's chunk_kda: as chunk_gated_delta_rule, with the gate cumsum per channel in fp32.
        kernel = b * t * h * (2 * d + d + 3 * d + CHUNK) * e + b * t * h * d * FP32
        states = b * (tp // CHUNK) * h * d * d * e + b * h * d * d * FP32
        return projections + kernel + states


# model_type (of the text decoder) -> the delta-rule mixer of its linear_attention layers.
MIXERS: dict[str, type[Mixer]] = {
    "qwen3_next": GatedDeltaNet,
    "qwen3_5_text": GatedDeltaNet,
    "qwen3_5_moe_text": GatedDeltaNet,
    "olmo_hybrid": GatedDeltaNet,
    "kimi_linear": KimiDeltaAttention,
    "bailing_hybrid": KimiDeltaAttention,
    "glm5_next_text": KimiDeltaAttention,  # Glm5NextTextLinearAttention: Kimi's module with a gate lower bound
}

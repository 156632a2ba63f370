"""State-space layers: Mamba2 (Bamba, Granite 4, Nemotron-H, Falcon-H1, Zamba2, Mamba2) and Mamba1
(Mamba, Falcon-Mamba, Jamba, Zamba): the state each layer keeps and its prefill transients.

State, per sequence (transformers 5.23 `LinearAttentionLayer`, verified against real caches in
tests/test_hybrid.py): the causal convolution's window, (conv_dim, d_conv) in the model dtype
(conv_dim = d_inner + 2 x groups x d_state for Mamba2, d_inner for Mamba1), and the SSM state in
fp32: (heads, head_dim, d_state) for Mamba2, (d_inner, d_state) for Mamba1. Dimensions are read
from the mixer module transformers built (each model spells its config fields differently).

Transients. Mamba2's torch fallback (`mamba2_chunk_scan`) materialises, per chunk, the
chunk x chunk decay and score matrices per head (L, G, M of the SSD algorithm) and fp32 copies of
x, B and C per head, about 1.1 MiB per token per layer at Bamba's size; Mamba1's
(`slow_forward`'s selective scan) keeps the discretised A and B x (d_inner x d_state per token)
in fp32, about 1.7 MiB per token at Jamba's. The counts below are the tensors alive at the peak,
held to a fake-tensor execution of the real module (tests/test_hybrid.py). The kernel paths
(mamba-ssm's `mamba_chunk_scan_combined` / `selective_scan_fn`, causal-conv1d) keep per-chunk
states and their outputs only (mamba_ssm/ops/triton/ssd_combined.py, selective_scan_interface.py);
read from their source, not measured on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from planc.model.cache import FALLBACK, Mixer, conv_window
from planc.model.config import DTYPE_BYTES, FP32
from planc.workload import Workload


@dataclass(frozen=True)
class Mamba2(Mixer):
    """One Mamba2 mixer (the SSD chunked scan)."""

    family: ClassVar[str] = "mamba2"
    signature: ClassVar[tuple[str, ...]] = ("num_heads", "head_dim", "ssm_state_size", "n_groups", "chunk_size")
    kernel_functions: ClassVar[tuple[str, ...]] = (
        "mamba2_chunk_scan",
        "mamba2_selective_state_update",
        "mamba2_split_conv1d_scan_combined",
        "causal_conv1d_fn",
        "causal_conv1d_update",
    )

    heads: int
    head_dim: int
    state_size: int
    groups: int
    chunk: int
    inner: int  # d_inner = heads x head_dim (the gate's width)
    conv_channels: int
    conv_kernel: int

    @classmethod
    def from_layer(cls, layer, index: int) -> "Mamba2":
        mixer = cls.module_of(layer, index)
        channels, kernel = conv_window(mixer, index)
        return cls(
            mixer.num_heads,
            mixer.head_dim,
            mixer.ssm_state_size,
            mixer.n_groups,
            mixer.chunk_size,
            mixer.intermediate_size,
            channels,
            kernel,
        )

    def state_bytes(self, dtype: str) -> int:
        conv = self.conv_channels * self.conv_kernel * DTYPE_BYTES[dtype]
        return conv + self.heads * self.head_dim * self.state_size * FP32

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        e = DTYPE_BYTES[dtype]
        b, t = workload.batch_size, workload.step_tokens
        h, p, n, c = self.heads, self.head_dim, self.state_size, self.chunk
        chunks = -(-t // c)
        tp = chunks * c
        # In the model dtype: in_proj's output (gate, x/B/C, dt) and the convolution's output.
        projections = b * t * (self.inner + 2 * self.conv_channels + h) * e
        if path == FALLBACK:
            # Over the padded step, fp32 per head: three state-wide rows (B, C and the decayed B),
            # and at the worse of two moments either three chunk-wide (L, G, M) with seven
            # head_dim-wide (x discretised, padded, the D residual, Y_diag, Y_off, their sum), or
            # four chunk-wide (einsum's copy of M) with five head_dim-wide; the chunk states.
            scan = b * tp * h * (max(3 * c + 7 * p, 4 * c + 5 * p) + 3 * n) * FP32
            states = b * (chunks + 2) * h * p * n * FP32
            return projections + scan + states
        # mamba_chunk_scan_combined: dt, its cumsum and the decay in fp32 per head, C^T B per
        # group and chunk, the chunk states and the output.
        kernel = b * tp * (3 * h * FP32 + self.groups * c * FP32 + h * p * e)
        states = 2 * b * chunks * h * p * n * FP32
        return projections + kernel + states


@dataclass(frozen=True)
class Mamba1(Mixer):
    """One Mamba1 mixer (the selective scan)."""

    family: ClassVar[str] = "mamba"
    signature: ClassVar[tuple[str, ...]] = ("intermediate_size", "ssm_state_size", "time_step_rank", "conv_kernel_size")
    kernel_functions: ClassVar[tuple[str, ...]] = (
        "mamba_selective_scan",
        "mamba_selective_state_update",
        "mamba_inner_fn",
        "causal_conv1d_fn",
        "causal_conv1d_update",
    )

    inner: int  # d_inner
    state_size: int
    time_step_rank: int
    conv_channels: int
    conv_kernel: int

    @classmethod
    def from_layer(cls, layer, index: int) -> "Mamba1":
        mixer = cls.module_of(layer, index)
        channels, kernel = conv_window(mixer, index)
        return cls(mixer.intermediate_size, mixer.ssm_state_size, mixer.time_step_rank, channels, kernel)

    def state_bytes(self, dtype: str) -> int:
        conv = self.conv_channels * self.conv_kernel * DTYPE_BYTES[dtype]
        return conv + self.inner * self.state_size * FP32

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        e = DTYPE_BYTES[dtype]
        b, t = workload.batch_size, workload.step_tokens
        d, n = self.inner, self.state_size
        # In the model dtype: in_proj's x and gate, then the convolution's output, dt, and the
        # scan's per-step outputs with their stacked copy.
        projections = b * t * (2 * d + 5 * d) * e
        if path == FALLBACK:
            # discrete_A = exp(A dt), deltaB_u and their product over d_inner x d_state per
            # token in fp32, with dt and the D skip in fp32.
            return projections + b * t * (3 * d * n + 2 * d) * FP32
        # selective_scan_fn: the output and fp32 chunk states (one per 2048 tokens).
        return projections + b * t * d * e + b * -(-t // 2048) * d * 2 * n * FP32


MIXERS: dict[str, type[Mixer]] = {
    "bamba": Mamba2,
    "granitemoehybrid": Mamba2,
    "nemotron_h": Mamba2,
    "falcon_h1": Mamba2,
    "zamba2": Mamba2,
    "mamba2": Mamba2,
    "mamba": Mamba1,
    "falcon_mamba": Mamba1,
    "jamba": Mamba1,
    "zamba": Mamba1,  # multi-head Mamba1: (heads, d_inner / heads, d_state), the same bytes
}

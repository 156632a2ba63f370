"""Short convolutions: LFM2, LFM2-MoE and LFM3 `conv` layers (a gated short convolution as the
sequence mixer), and Inkling / Inkling2 `hybrid` / `hybrid_sliding` layers (attention with four
residual short convolutions around it).

State, per sequence (transformers 5.23 `LinearAttentionLayer` with conv states only, verified
against real caches in tests/test_hybrid.py):
- LFM2: the convolution's window, (hidden, L_cache) in the model dtype; no recurrent state.
- Inkling / Inkling2 (`number_of_conv_states = 4`): the windows of the convolutions over the
  attention's keys and values (KV heads x head_dim channels, `sconv_kernel_size`; Inkling2's
  full-attention layers make theirs dynamic, per-token taps over the same window) and over the
  attention's and the MLP's outputs (hidden channels, `conv_kernel_size`), each (channels, kernel)
  in **fp32** whatever the model dtype: the modules convolve in fp32 (`InklingShortConvolution`,
  `Inkling2ShortConvolution`, `Inkling2DynamicShortConvolution`). Their attention's KV is the
  usual one, in the model dtype (attention.py).

Transients, the same on both paths up to the kernel's scratch, held to a fake-tensor execution of
the real modules (tests/test_hybrid.py):
- LFM2: in_proj's B, C and x (three hidden-wide rows per token), B x x, the convolution's output
  and the output projection, all in the model dtype (`Lfm2ShortConv.forward`; causal-conv1d's
  `causal_conv1d_fn` writes the same output).
- Inkling: the four convolutions run one at a time; the widest (hidden channels) holds its fp32
  input, the kernel-padded fp32 convolution output, the fp32 residual sum and its cast back
  (Inkling2's scales the sum: one more fp32 row). Inkling2's dynamic convolutions also hold per-token taps and the unfolded windows, kernel x
  channels fp32 values per token (Inkling2's key convolution under fake tensors: 61,597 bytes per
  token measured, 61,580 planned); the layer's peak is whichever convolution holds most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from planc.model.cache import Mixer, conv_window
from planc.model.config import DTYPE_BYTES, FP32
from planc.workload import Workload


@dataclass(frozen=True)
class ShortConv(Mixer):
    """One LFM2-style gated short convolution."""

    family: ClassVar[str] = "short_conv"
    signature: ClassVar[tuple[str, ...]] = ("conv_kernel_size", "in_proj", "out_proj", "conv")
    kernel_functions: ClassVar[tuple[str, ...]] = ("causal_conv1d_fn", "causal_conv1d_update")

    channels: int
    kernel: int

    @classmethod
    def from_layer(cls, layer, index: int) -> "ShortConv":
        mixer = cls.module_of(layer, index)
        return cls(*conv_window(mixer, index))

    def state_bytes(self, dtype: str) -> int:
        return self.channels * self.kernel * DTYPE_BYTES[dtype]

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        b, t = workload.batch_size, workload.step_tokens
        # in_proj (3 rows), B x x, the convolution's output (padded by kernel - 1), the output.
        return b * (6 * t + self.kernel - 1) * self.channels * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ResidualShortConvs(Mixer):
    """The residual short convolutions of one Inkling / Inkling2 layer: (channels, kernel, dynamic
    heads) per convolution, in the order of their state index (`conv_idx`)."""

    family: ClassVar[str] = "residual_short_conv"
    signature: ClassVar[tuple[str, ...]] = ("conv_idx", "conv_kernel_size")
    kernel_functions: ClassVar[tuple[str, ...]] = ("causal_conv1d_fn", "causal_conv1d_update")

    convolutions: tuple[tuple[int, int, int], ...]

    @staticmethod
    def _convolutions_of(layer) -> list:
        return sorted(
            (module for module in layer.modules() if hasattr(module, "conv_idx") and hasattr(module, "conv_kernel_size")),
            key=lambda module: module.conv_idx,
        )

    @staticmethod
    def _dimensions(module) -> tuple[int, int, int]:
        if hasattr(module, "static_weight"):  # Inkling2DynamicShortConvolution: per-head taps
            return module.static_weight.shape[1], module.conv_kernel_size, module.num_heads
        return module.conv1d.in_channels, module.conv_kernel_size, 0

    @classmethod
    def convolution_width(cls, module) -> int:
        """Channels of one of the layer's convolution modules."""
        return cls._dimensions(module)[0]

    @classmethod
    def module_of(cls, layer_module, index: int):
        """The convolution whose transient is the layer's largest (what the fake execution runs)."""
        convolutions = cls._convolutions_of(layer_module)
        if not convolutions:
            super().module_of(layer_module, index)  # raises, naming the missing attributes
        return max(convolutions, key=lambda module: cls._peak_bytes(*cls._dimensions(module), 1, 1024, 2))

    @classmethod
    def from_layer(cls, layer, index: int) -> "ResidualShortConvs":
        convolutions = cls._convolutions_of(layer)
        if not convolutions:
            super().module_of(layer, index)
        return cls(tuple(cls._dimensions(module) for module in convolutions))

    @classmethod
    def _peak_bytes(cls, channels: int, kernel: int, heads: int, batch: int, tokens: int, element: int) -> int:
        """Peak bytes inside one convolution's forward over batch x tokens."""
        if heads:
            # The dynamic taps (per head), their sum with the static taps and the unfolded,
            # flipped windows (kernel x channels each), the fp32 input, residual sum and output.
            return batch * tokens * (3 * kernel * channels + heads * kernel + 3 * channels) * FP32
        # The fp32 input, the convolution's output (kernel-padded), the residual sum and its cast back.
        return batch * (tokens * (3 * channels * FP32 + channels * element) + (kernel - 1) * channels * FP32)

    def state_bytes(self, dtype: str) -> int:
        return sum(channels * kernel for channels, kernel, _ in self.convolutions) * FP32

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        b, t, e = workload.batch_size, workload.step_tokens, DTYPE_BYTES[dtype]
        return max(self._peak_bytes(channels, kernel, heads, b, t, e) for channels, kernel, heads in self.convolutions)


@dataclass(frozen=True)
class ScaledResidualShortConvs(ResidualShortConvs):
    """Inkling2's: each static convolution scales its residual sum (`/ sqrt(kernel + 1)`), one more
    fp32 row per token alive beside the sum (Inkling2ShortConvolution.forward)."""

    @classmethod
    def _peak_bytes(cls, channels: int, kernel: int, heads: int, batch: int, tokens: int, element: int) -> int:
        if heads:
            return super()._peak_bytes(channels, kernel, heads, batch, tokens, element)
        return batch * (tokens * 4 * channels + (kernel - 1) * channels) * FP32


MIXERS: dict[str, type[Mixer]] = {
    "lfm2": ShortConv,
    "lfm2_moe": ShortConv,
    "lfm3": ShortConv,
    "inkling_text": ResidualShortConvs,
    "inkling2_text": ScaledResidualShortConvs,
}

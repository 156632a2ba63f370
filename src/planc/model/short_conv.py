"""Gated short convolutions: LFM2, LFM2-MoE and LFM3 `conv` layers.

State, per sequence (transformers 5.23 `LinearAttentionLayer` with a conv state only, verified
against real caches in tests/test_hybrid.py): the convolution's window, (hidden, L_cache) in the
model dtype; no recurrent state.

Transients, the same on both paths up to the kernel's scratch: in_proj's B, C and x (three
hidden-wide rows per token), B x x, the convolution's output and the output projection, all in
the model dtype (`Lfm2ShortConv.forward`; causal-conv1d's `causal_conv1d_fn` writes the same
output), held to a fake-tensor execution of the real module (tests/test_hybrid.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from planc.model.cache import Mixer, conv_window
from planc.model.config import DTYPE_BYTES
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


MIXERS: dict[str, type[Mixer]] = {"lfm2": ShortConv, "lfm2_moe": ShortConv, "lfm3": ShortConv}

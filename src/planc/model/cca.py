"""Compressed convolutional attention (CCA): ZAYA's `hybrid` / `hybrid_sliding` layers, softmax
attention whose q/k/v projection keeps a state of its own.

State, per sequence (transformers 5.23 `ZayaCCAProjection.forward` in a
`LinearAttentionAndFullAttentionLayer`, verified against real caches in tests/test_hybrid.py): the
window of the two stacked causal convolutions over the concatenated q and k projections,
(q_width + k_width, (cca_time0 - 1) + (cca_time1 - 1)) in the model dtype, and the recurrent state
of the delayed value path, the last token's `v_proj_delayed` output (half a value row), also in
the model dtype. The attention's KV per token is the usual one (attention.py: k_proj's width and
two value halves).

Transients: there is no kernel path (plain torch convolutions). Inside the projection at its peak
(its end), per token: the q and k projections and their averaged residuals, the convolutions'
output, the resulting q and k, and the value halves with their concatenations, all in the model
dtype (held to a fake-tensor execution of the real module in
tests/test_hybrid.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from planc.model.cache import Mixer
from planc.model.config import DTYPE_BYTES
from planc.workload import Workload


@dataclass(frozen=True)
class CCAProjection(Mixer):
    """One ZAYA CCA projection (`ZayaCCAProjection`)."""

    family: ClassVar[str] = "cca"
    signature: ClassVar[tuple[str, ...]] = ("conv_qk_depthwise", "conv_qk_grouped", "v_proj_delayed")

    query_width: int  # q_proj's output: heads x head_dim
    key_width: int  # k_proj's output: KV heads x head_dim (the value row is as wide)
    conv_kernel: int  # the conv window kept: (depthwise kernel - 1) + (grouped kernel - 1)

    @classmethod
    def from_layer(cls, layer, index: int) -> "CCAProjection":
        projection = cls.module_of(layer, index)
        return cls(projection.q_proj.out_features, projection.k_proj.out_features, projection.conv_kernel_size)

    @property
    def conv_channels(self) -> int:
        return self.query_width + self.key_width

    def state_bytes(self, dtype: str) -> int:
        delayed_value = self.key_width // 2
        return (self.conv_channels * self.conv_kernel + delayed_value) * DTYPE_BYTES[dtype]

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        b, t = workload.batch_size, workload.step_tokens
        q, k = self.query_width, self.key_width
        # At the end of the projection: the q and k projections and their averaged residuals
        # (2q + 2k), the convolutions' output (q + k), the q and k it gives (q + k), and the value
        # halves, their shifted concatenation and the value row (2.5 k); the convolution's input
        # is kernel-padded.
        per_token = 4 * (q + k) + 5 * k // 2
        return b * (t * per_token + self.conv_kernel * self.conv_channels) * DTYPE_BYTES[dtype]


MIXERS: dict[str, type[Mixer]] = {"zaya": CCAProjection}

"""MiniMax lightning attention: the `linear_attention` layers of MiniMax-Text-01 / MiniMax-M1.

State, per sequence: K^T V per head, (heads, head_dim, head_dim) in the model dtype, which
`MiniMaxCache` keeps in its `linear_cache` list beside the attention layers' KV (transformers 5.23
`modeling_minimax.py`; verified against real caches in tests/test_hybrid.py). No convolution.

Transients: there is no kernel path; the torch implementation walks the prompt in blocks of
`block_size` tokens and keeps the fused q/k/v projection, every block's output and their
concatenation, and the output norm's fp32 copies (held to a fake-tensor execution of the real
module in tests/test_hybrid.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from planc.model.cache import Mixer
from planc.model.config import DTYPE_BYTES, FP32
from planc.workload import Workload


@dataclass(frozen=True)
class LightningAttention(Mixer):
    """One MiniMax lightning-attention layer."""

    family: ClassVar[str] = "lightning"
    signature: ClassVar[tuple[str, ...]] = ("num_attention_heads", "head_dim", "block_size", "qkv_proj")

    heads: int
    head_dim: int
    block: int

    @classmethod
    def from_layer(cls, layer, index: int) -> "LightningAttention":
        mixer = cls.module_of(layer, index)
        return cls(mixer.num_attention_heads, mixer.head_dim, mixer.block_size)

    def state_bytes(self, dtype: str) -> int:
        return self.heads * self.head_dim * self.head_dim * DTYPE_BYTES[dtype]

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        e = DTYPE_BYTES[dtype]
        b, t = workload.batch_size, workload.step_tokens
        width = self.heads * self.head_dim
        # q/k/v, the blocks' outputs and their concatenation in the model dtype; the norm's fp32
        # input and product; one block's scores, partial outputs and state update.
        per_token = b * t * width * (4 * e + 2 * FP32)
        per_block = 3 * b * self.heads * self.block * max(self.block, self.head_dim) * e
        return per_token + per_block


MIXERS: dict[str, type[Mixer]] = {"minimax": LightningAttention}

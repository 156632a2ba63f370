"""RecurrentGemma (Griffin): the `linear_attention` layers' recurrent block, a depthwise causal
convolution followed by the RG-LRU (real-gated linear recurrent unit).

State, per sequence (transformers 5.23 `modeling_recurrent_gemma.py`,
`RecurrentGemmaRecurrentBlock.forward` and `RecurrentGemmaRglru._rnn_scan`): the model keeps it
on the modules, not in the cache: `conv1d_state` in the model dtype and
`rg_lru.recurrent_states`, (lru_width,) in fp32. generate passes a DynamicCache (RecurrentGemma
supports the default cache), so `_setup_cache` never runs and each block allocates its state on
the device of its own input, i.e. its layer's GPU (placement held to a two-GPU simulation in
tests/test_recurrent.py). After a prefill the conv window is (lru_width, width - 1) (a copy:
`F.pad` with negative padding clones); after a decode step it is a view of the step's
concatenated (lru_width, width) window, which the ledger holds as the peak. The state outlives
generate (it stays on the modules until the next call replaces it). The local-attention layers'
window of KV is in the DynamicCache (`sliding_attention`, `attention.py`).

Transients: there is no kernel path (the scan is a Python loop over tokens in every
configuration). At the prefill's peak, inside the RG-LRU, eleven lru_width-wide rows per token
in the model dtype (the y branch, the convolution's output, the gates and their products, the
scan's output) and one fp32 row, plus the convolution's padding and the scan's per-step fp32
rows; held to a fake-tensor execution of the real block (tests/test_recurrent.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from planc.model.cache import Mixer
from planc.model.config import DTYPE_BYTES, FP32
from planc.workload import Workload


@dataclass(frozen=True)
class RgLru(Mixer):
    """One RecurrentGemma recurrent block (conv1d + RG-LRU)."""

    family: ClassVar[str] = "rg_lru"
    signature: ClassVar[tuple[str, ...]] = ("lru_width", "conv1d_width", "rg_lru", "conv_1d")
    state_in_cache: ClassVar[bool] = False

    width: int  # lru_width: the recurrence's channels
    conv_width: int  # conv1d_width: the temporal convolution's kernel

    @classmethod
    def from_layer(cls, layer, index: int) -> "RgLru":
        block = cls.module_of(layer, index)
        return cls(block.lru_width, block.conv1d_width)

    def state_bytes(self, dtype: str) -> int:
        return self.width * self.conv_width * DTYPE_BYTES[dtype] + self.width * FP32

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        e = DTYPE_BYTES[dtype]
        b, t = workload.batch_size, workload.step_tokens
        per_token = b * t * self.width * (11 * e + FP32)
        return per_token + b * self.width * ((self.conv_width - 1) * e + 3 * FP32)


MIXERS: dict[str, type[Mixer]] = {"recurrent_gemma": RgLru}

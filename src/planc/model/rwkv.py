"""RWKV (RWKV-4 "Raven" / "World"): every block's time mixing keeps a recurrent state in the
tensor list the model returns as `state`.

State (transformers 5.23 `modeling_rwkv.py`, `RwkvModel.forward`): five tensors of shape
(batch, hidden_size, num_hidden_layers), every layer's state stacked along the last dimension:
the feed-forward's and the attention's previous token in the model dtype (`state[0]`,
`state[1]`) and the WKV numerator, denominator and running max in fp32 (`state[2:]`, float32
whatever the model dtype). Per sequence and layer: hidden x (2 x model dtype + 3 x 4) bytes.
`RwkvModel.forward` allocates all of it on `inputs_embeds.device`, the device the embeddings run
on, so the ledger charges it there (`state_on_input_device`). On a multi-GPU plan, accelerate's
hook on each block moves the `state` list to the block's GPU (the model declares no
`_skip_keys_device_placement`), which copies the whole list, every layer's state, onto every
other GPU the blocks run on; the blocks then update the copies, and the root's hook moves the
returned state back to the input device. The ledger counts that copy in each block's transient
(one whole state; it is kilobytes to a few MiB per sequence). Held to a two-GPU simulation in
tests/test_recurrent.py.

Transients of a block's time mixing on transformers' torch path (`rwkv_linear_attention_cpu`,
also the path of every decode step): the shifted input, the key / value / receptance mixes and
projections and the WKV output, six rows per token of the step in the model dtype, and the
per-step fp32 rows of the recurrence; held to a fake-tensor execution of the real module
(tests/test_recurrent.py). The CUDA kernel (kernels-community/rwkv, loaded only where `kernels`,
ninja and CUDA are present) is not sized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from planc.model.cache import Mixer
from planc.model.config import DTYPE_BYTES, FP32
from planc.workload import Workload


@dataclass(frozen=True)
class RwkvTimeMix(Mixer):
    """One RWKV block's time mixing (its WKV linear attention)."""

    family: ClassVar[str] = "rwkv"
    signature: ClassVar[tuple[str, ...]] = ("time_decay", "time_first", "time_mix_key", "receptance")
    every_layer: ClassVar[bool] = True
    state_on_input_device: ClassVar[bool] = True
    state_in_cache: ClassVar[bool] = False

    hidden: int
    attention_hidden: int
    layers: int  # every layer's state travels together (the copy a GPU hop makes)

    @classmethod
    def from_layer(cls, layer, index: int) -> "RwkvTimeMix":
        mixer = cls.module_of(layer, index)
        return cls(mixer.config.hidden_size, mixer.attention_hidden_size, mixer.config.num_hidden_layers)

    def state_bytes(self, dtype: str) -> int:
        return self.hidden * (2 * DTYPE_BYTES[dtype] + 3 * FP32)

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        e = DTYPE_BYTES[dtype]
        b, t = workload.batch_size, workload.step_tokens
        width = max(self.hidden, self.attention_hidden)
        per_token = b * t * width * 6 * e
        # The recurrence's (batch, width) rows: fp32 exponentials and sums, model-dtype reads.
        per_step = b * width * (14 * FP32 + 7 * e)
        state_copy = b * self.layers * self.state_bytes(dtype)
        return per_token + per_step + state_copy


MIXERS: dict[str, type[Mixer]] = {"rwkv": RwkvTimeMix}

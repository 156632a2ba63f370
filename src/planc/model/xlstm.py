"""xLSTM (xLSTM-7B): every decoder block is an mLSTM layer; its state lives in xLSTMCache.

State, per sequence and layer (transformers 5.23 `modeling_xlstm.py`, `xLSTMCache.__init__`): the
matrix memory C (heads, qk_head_dim, v_head_dim), the normaliser n (heads, qk_head_dim) and the
max state m (heads, 1), in the dtype of the input embeddings (the model dtype; the kernels
compute in fp32 and copy back). `xLSTMModel.forward` allocates the cache for every layer at once
on `inputs_embeds.device`, the device the embeddings run on, and copies each block's new state
back into it (`rnn_state[layer][i].copy_(...)`): a block on another GPU receives a copy of its
state from accelerate's hook and hands back its new one, but the cache stays on the embeddings'
device. The ledger therefore charges every layer's state there (`state_on_input_device`), held
to a two-GPU simulation in tests/test_recurrent.py. The cache's `seqlen_offset` is one int64.

Transients of one block's prefill on transformers' native torch path (`mode: inference`,
`wrap_chunkwise_arbitrary_sequence_length`): the chunkwise kernel on whole chunks keeps every
chunk's C, n and m ((chunks + 1) states in the model dtype; the last state returned is a view of
them, so all stay alive until the block returns), q/k/v and the gates with their contiguous
copies, the per-chunk chunk x chunk decay and score matrices per head, and the multi-head norm's
fp32 copies of h; the tokens past the last whole chunk, and a decode step, run the recurrent
step with fp32 states (four state-sized tensors at once). The formula is the sum of the
tensors alive at those moments, an upper bound within +45 % of a fake-tensor execution of the
real layer (tests/test_recurrent.py). Prompts longer than `max_inference_chunksize` are run in
pieces of that many tokens, with the whole step's hidden states kept for the output. Where the
`xlstm` package imports, transformers runs that package's blocks instead, which planc does not
size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from planc.model.cache import Mixer
from planc.model.config import DTYPE_BYTES, FP32
from planc.workload import Workload


@dataclass(frozen=True)
class MLstm(Mixer):
    """One xLSTM block's mLSTM layer."""

    family: ClassVar[str] = "mlstm"
    signature: ClassVar[tuple[str, ...]] = ("qk_dim", "v_dim", "mlstm_backend", "multihead_norm")
    every_layer: ClassVar[bool] = True
    state_on_input_device: ClassVar[bool] = True
    state_in_cache: ClassVar[bool] = False

    heads: int
    qk_head_dim: int
    v_head_dim: int
    chunk: int  # chunk_size of the chunkwise kernel
    max_step_tokens: int  # max_inference_chunksize: longer steps run in pieces
    hidden: int

    @classmethod
    def from_layer(cls, layer, index: int) -> "MLstm":
        mixer = cls.module_of(layer, index)
        config = mixer.config
        # xLSTMCache's shapes (the config rounds qk_dim and v_dim up to multiples of 64).
        return cls(
            config.num_heads,
            config.qk_head_dim,
            config.v_head_dim,
            config.chunk_size,
            config.max_inference_chunksize,
            config.hidden_size,
        )

    def state_bytes(self, dtype: str) -> int:
        return self.heads * (self.qk_head_dim * self.v_head_dim + self.qk_head_dim + 1) * DTYPE_BYTES[dtype]

    def transient_bytes(self, workload: Workload, dtype: str, path: str) -> int:
        e = DTYPE_BYTES[dtype]
        b, step = workload.batch_size, workload.step_tokens
        t = min(step, self.max_step_tokens)
        h, qk, v = self.heads, self.qk_head_dim * self.heads, self.v_head_dim * self.heads
        chunks = t // self.chunk
        chunk_states = (chunks + 1) * self.state_bytes(dtype) if chunks else 0
        recurrent = 4 * h * self.qk_head_dim * self.v_head_dim * FP32
        # q and k with their contiguous copies and the gated q; v, the output gate, the numerator
        # and h; the norm's three fp32 copies of h; seven chunk-wide decay / score matrices per
        # head; the gates.
        per_token = t * (5 * qk * e + 4 * v * e + 3 * v * FP32 + 7 * h * self.chunk * e + 10 * h * e)
        pieces = b * step * self.hidden * e if step > self.max_step_tokens else 0
        return b * (chunk_states + recurrent + per_token) + pieces


MIXERS: dict[str, type[Mixer]] = {"xlstm": MLstm}

"""The shape of one generation the plan must survive: batch, context, images, and the largest forward step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    batch_size: int
    max_seq_len: int
    prefill_chunk_size: int | None = None
    images_per_sequence: int = 0  # images in each prompt (their tokens count within max_seq_len)
    image_size: int | None = None  # pixels per side; None: the vision config's own

    @property
    def step_tokens(self) -> int:
        """Tokens processed by the largest forward step (the prefill, or one chunk of it)."""
        if self.prefill_chunk_size is None:
            return self.max_seq_len
        return min(self.prefill_chunk_size, self.max_seq_len)

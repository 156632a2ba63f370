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
    # An encoder-decoder's source: the tokens its encoder reads per sequence (0 for decoder-only
    # models), resolved from the spec by planc.model.encoder_decoder.Encoder.source_tokens.
    source_tokens: int = 0

    @property
    def step_tokens(self) -> int:
        """Tokens processed by the largest forward step (the prefill, or one chunk of it).

        An encoder-decoder's decoder takes one token a step: generate starts it from
        decoder_start_token_id, and its context is the tokens it generates (the prompt is the encoder's).
        """
        if self.source_tokens:
            return 1
        if self.prefill_chunk_size is None:
            return self.max_seq_len
        return min(self.prefill_chunk_size, self.max_seq_len)

"""The model side of the server: prefill one sequence, decode all running sequences one token per step.

A sequence's tokens must not depend on what else is in flight: greedy output equals `planc run` for
the same prompt. So the prefill is `generate` itself on the sequence alone (the plan's chunked
prefill included), and a decode step is the forward `generate` makes for one unpadded sequence
(`input_ids` [1, 1], its position, its own `DynamicCache`, `logits_to_keep=1`), either for all
rows at once with the row-exact batching of `planc.serve.invariant` or, where start-up could not
prove that exact on this model, one row after the other. Token choice uses the logits processors
`generate` builds from the plan's generation config.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass, field

import torch

from planc.plan import Plan
from planc.serve.text import TextStream

# RoPE variants that pick their frequencies from the longest position in the batch
# (transformers' `dynamic_rope_update`), so a row's rotation would depend on the other rows.
BATCH_DEPENDENT_ROPE = {"dynamic", "longrope"}
PROBE_TOKENS = 4


@dataclass(frozen=True)
class Sampling:
    """A request's decoding: None fields take the plan's (greedy unless the plan samples)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class Sequence:
    """One request being decoded: its cache, its tokens so far and how it ends."""

    max_new_tokens: int
    config: object  # GenerationConfig of this request
    processors: object  # LogitsProcessorList built by generate's own rules
    generator: torch.Generator | None
    text: TextStream
    cache: object = None
    ids: torch.Tensor | None = None  # [1, prompt + generated] on the input device
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end-of-sequence token or stop string) or "length"
    logit_log: list | None = None  # the start-up probe records the logits behind each choice

    @property
    def position(self) -> int:
        """Index of the next token fed to the model (the last one chosen)."""
        return self.ids.shape[1] - 1


@dataclass(frozen=True)
class Emitted:
    """What one step produced for a sequence."""

    token_id: int
    text: str
    finish_reason: str | None


class Engine:
    """Prefill and decode on a loaded session's model. Not thread-safe: one worker thread drives it."""

    def __init__(self, model, tokenizer, plan: Plan, batching: str = "exact"):
        from planc.run.generate import generation_config, input_device
        from planc.serve.invariant import RowExactLinear, install_kernel_split

        self.model, self.tokenizer, self.plan = model, tokenizer, plan
        self.device = torch.device(input_device(plan))
        self.base_config = generation_config(model, tokenizer, plan, max_new_tokens=1)
        # The prefill only needs the raw logits of the last prompt position; the token is chosen here.
        self.prefill_config = copy.deepcopy(self.base_config)
        self.prefill_config.do_sample = False
        self.prefill_config.temperature = self.prefill_config.top_p = self.prefill_config.top_k = None
        self.prefill_config.return_dict_in_generate = True
        self.prefill_config.output_logits = True
        eos = self.base_config.eos_token_id
        self.eos_ids = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        forward_parameters = inspect.signature(model.forward).parameters
        self.keep_last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}
        self.linear_mode = RowExactLinear() if batching == "exact" else None
        self.batched = False
        self.split: str | None = None  # how rows are split around attention: "kernel" or "module"
        install_kernel_split()

    # ------------------------------------------------------------------ sequences

    def new_sequence(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, stop: list[str]) -> Sequence:
        """A sequence ready for `prefill`: its generation config and logits processors, as generate builds them."""
        config = copy.deepcopy(self.base_config)
        config.max_new_tokens = max_new_tokens
        if sampling.temperature is not None:
            config.do_sample = sampling.temperature > 0
            if config.do_sample:
                config.temperature = sampling.temperature
        if sampling.top_p is not None and config.do_sample:
            config.top_p = sampling.top_p
        if not config.do_sample:
            config.temperature = config.top_p = config.top_k = None
        generator = None
        if config.do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        ids = torch.tensor([prompt_ids], device=self.device)
        # generate's own steps (private but stable in the pinned transformers): special-token tensors
        # first, then the processors for this prompt length (min_new_tokens, repetition penalty, ...).
        self.model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=self.device)
        processors = self.model._get_logits_processor(
            generation_config=config, input_ids_seq_length=len(prompt_ids), encoder_input_ids=ids, device=self.device
        )
        text = TextStream(self.tokenizer, stop)
        return Sequence(max_new_tokens, config, processors, generator, text, ids=ids)

    def prefill(self, sequence: Sequence) -> Emitted:
        """Run the prompt through `generate` alone (one new token) and choose the first token."""
        from transformers import DynamicCache

        from planc.run.apply import pinned_attention

        sequence.cache = DynamicCache(config=self.model.config)
        with torch.inference_mode(), pinned_attention(self.plan):
            output = self.model.generate(
                input_ids=sequence.ids,
                attention_mask=torch.ones_like(sequence.ids),
                generation_config=self.prefill_config,
                past_key_values=sequence.cache,
            )
        return self._choose(sequence, output.logits[0])

    def step(self, sequences: list[Sequence]) -> list[Emitted | BaseException]:
        """One decode step for every sequence; a failure is returned in that sequence's place, the
        others still advance (a batched step that fails is retried row by row to find whose it was)."""
        if not sequences:
            return []
        if self.batched and len(sequences) > 1:
            saved = [_snapshot(s.cache) for s in sequences]
            try:
                logits = self._forward_rows(sequences)
            except Exception:  # noqa: BLE001 - whose failure it was is found by retrying each row alone
                for sequence, state in zip(sequences, saved):
                    _restore(sequence.cache, state)
            else:
                return [self._choose_safely(s, row) for s, row in zip(sequences, logits)]
        results: list[Emitted | BaseException] = []
        for sequence in sequences:
            try:
                logits = self._forward_one(sequence)
            except Exception as exc:  # noqa: BLE001 - fails this sequence only
                results.append(exc)
                continue
            results.append(self._choose_safely(sequence, logits))
        return results

    # ------------------------------------------------------------------ forwards

    def _forward_one(self, sequence: Sequence) -> torch.Tensor:
        """The decode forward generate makes for one unpadded sequence."""
        from planc.run.apply import pinned_attention

        with torch.inference_mode(), pinned_attention(self.plan):
            output = self.model(
                input_ids=sequence.ids[:, -1:],
                position_ids=torch.tensor([[sequence.position]], device=self.device),
                past_key_values=sequence.cache,
                use_cache=True,
                return_dict=True,
                **self.keep_last_logits,
            )
        return output.logits[0, -1].to(copy=True, dtype=torch.float32, device=self.device)

    def _forward_rows(self, sequences: list[Sequence]) -> torch.Tensor:
        """All rows in one forward, each row's arithmetic that of `_forward_one`."""
        from contextlib import nullcontext

        from planc.run.apply import pinned_attention
        from planc.serve.invariant import RowCaches, placeholder_mask, row_masks

        caches = [s.cache for s in sequences]
        positions = [s.position for s in sequences]
        masks = row_masks(self.model, caches, positions, self.device)
        with torch.inference_mode(), pinned_attention(self.plan), self.linear_mode or nullcontext():
            output = self.model(
                input_ids=torch.cat([s.ids[:, -1:] for s in sequences]),
                position_ids=torch.tensor([[p] for p in positions], device=self.device),
                attention_mask=placeholder_mask(masks, len(sequences), self.device),
                past_key_values=RowCaches(caches, masks),
                use_cache=True,
                return_dict=True,
                **self.keep_last_logits,
            )
        return output.logits[:, -1].to(copy=True, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ token choice

    def _choose_safely(self, sequence: Sequence, logits: torch.Tensor) -> Emitted | BaseException:
        try:
            return self._choose(sequence, logits)
        except Exception as exc:  # noqa: BLE001 - fails this sequence only
            return exc

    def _choose(self, sequence: Sequence, logits: torch.Tensor) -> Emitted:
        """generate's choice: the processors, then argmax (greedy) or a draw from this request's generator."""
        if sequence.logit_log is not None:
            sequence.logit_log.append(logits.reshape(-1).clone())
        scores = sequence.processors(sequence.ids, logits.reshape(1, -1))
        if sequence.generator is None:
            token = int(torch.argmax(scores, dim=-1)[0])
        else:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=sequence.generator)[0, 0])
        sequence.ids = torch.cat([sequence.ids, torch.tensor([[token]], device=self.device)], dim=1)
        sequence.token_ids.append(token)
        delta, stopped = sequence.text.push(token)
        if stopped or token in self.eos_ids:
            sequence.finish_reason = "stop"
        elif len(sequence.token_ids) >= sequence.max_new_tokens:
            sequence.finish_reason = "length"
        if sequence.finish_reason is not None and not stopped:
            delta += sequence.text.flush()
        return Emitted(token, delta, sequence.finish_reason)

    # ------------------------------------------------------------------ proving the batching exact

    def prove_batching(self, rows: int) -> str:
        """Decode a few probe sequences alone and then together, the rows split around each kernel
        first, then around each attention block; batch only where every logit agrees bit for bit
        (with --batching fast: where the batched step runs at all).

        Returns how the server decodes, for the log and /health.
        """
        from planc.serve.invariant import install_row_split

        if rows <= 1:
            return "one sequence at a time (the plan's batch_size is 1)"
        reason = self._cannot_split_rows()
        if reason is None:
            kernel = self._probe(min(rows, 3))
            if kernel is None:
                self.split = "kernel"
            elif not install_row_split(self.model):
                reason = kernel
            elif (module := self._probe(min(rows, 3))) is None:
                self.split = "module"
            else:
                reason = f"split around kernels: {kernel}; around attention blocks: {module}"
        self.batched = self.split is not None
        if not self.batched:
            return f"one sequence per forward ({reason})"
        exact = "bit-identical to decoding each alone" if self.linear_mode else "batched GEMMs (--batching fast)"
        where = "each attention kernel" if self.split == "kernel" else "each attention block"
        return f"batched: up to {rows} sequences per decode step, {exact}; rows split around {where}"

    def _cannot_split_rows(self) -> str | None:
        rope = getattr(self.model.config.get_text_config(), "rope_parameters", None) or {}
        rope_type = rope.get("rope_type") if isinstance(rope, dict) else None
        if rope_type in BATCH_DEPENDENT_ROPE:
            return f"its RoPE ({rope_type}) depends on the longest position in a batch"
        return None

    def _probe(self, rows: int) -> str | None:
        vocabulary = len(self.tokenizer)
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocabulary, (3 + 4 * i,), generator=generator).tolist() for i in range(rows)]
        alone = [self._probe_logits([p], self._forward_one)[0] for p in prompts]
        try:
            together = self._probe_logits(prompts, self._forward_rows)
        except Exception as exc:  # noqa: BLE001 - a model this batching cannot split decodes sequentially
            return f"batched decoding failed on this model ({type(exc).__name__}: {exc})"
        for index, (one, many) in enumerate(zip(alone, together)):
            if self.linear_mode is not None and not torch.equal(one, many):
                return f"batched logits differ from sequential ones on probe sequence {index + 1}"
        return None

    def _probe_logits(self, prompts: list[list[int]], forward) -> list[torch.Tensor]:
        """The logits behind PROBE_TOKENS greedy steps per prompt, a new prompt joining at each step.
        `forward` is `_forward_one` (one sequence given) or `_forward_rows`."""
        sequences = [self.new_sequence(p, PROBE_TOKENS, Sampling(temperature=0.0), []) for p in prompts]
        for sequence in sequences:
            sequence.logit_log = []
        pending, running = list(sequences), []
        while pending or running:
            if pending:
                sequence = pending.pop(0)
                self.prefill(sequence)
                running = [s for s in running + [sequence] if s.finish_reason is None]
            if running:
                logits = forward(running[0]) if forward == self._forward_one else forward(running)
                for sequence, row in zip(running, logits.reshape(len(running), -1)):
                    self._choose(sequence, row)
            running = [s for s in running if s.finish_reason is None]
        return [torch.stack(s.logit_log) for s in sequences]


def _snapshot(cache) -> list[dict]:
    """The cache's layer states. Dynamic layers grow by rebinding (torch.cat), never in place, so a
    shallow copy of each layer's attributes restores the cache exactly."""
    return [dict(layer.__dict__) for layer in cache.layers]


def _restore(cache, state: list[dict]) -> None:
    for layer, attributes in zip(cache.layers, state):
        layer.__dict__.clear()
        layer.__dict__.update(attributes)

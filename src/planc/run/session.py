"""A plan in force: checks passed, environment set, model loaded and placed exactly as the lock says.

`open_session` is everything `planc run` does before it generates; `planc run`, the server and the
Python API all build on it, so a plan is enacted the same way whoever drives it. The order is the
contract: the plan's environment first (before anything can initialise CUDA, GPU detection
included), then every check with all mismatches reported together, and only then torch settings
and loading.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from planc.errors import RunError, UsageError
from planc.plan import Plan
from planc.run.checks import MachineCheck
from planc.run.generate import Completion


@dataclass
class Session:
    """A loaded plan: the model as the lock places it, its tokenizer, and what it took to get there."""

    plan: Plan
    lock_dir: Path
    machine: MachineCheck
    model: Any
    tokenizer: Any
    check_s: float
    load_s: float
    rank: Any = None  # planc.run.distributed.RankContext of a tensor/pipeline rank; None in one process
    processor: Any = None  # loaded on the first image prompt

    def generate(
        self, prompts: list[str], max_new_tokens: int, stream: bool = False, images: list | None = None,
        layouts: list | None = None,
    ) -> list[Completion]:
        """Greedy (or the plan's) decoding of up to workload.batch_size prompts within max_seq_len; each
        prompt shows `images` (PIL images, at most the plan's images_per_sequence) when given. `layouts`
        (planc.run.generate.WordBoxes, one per prompt) are a document's words and boxes, which Udop needs."""
        from planc.run.apply import pinned_attention
        from planc.run.generate import (
            check_batch, check_word_boxes, encode, encode_layout, encode_source_image, encode_with_images, generate,
            generation_config, input_device,
        )

        from planc.model.graph import places_image_features

        check_batch(self.plan, prompts)
        encoder = self.model.get_encoder() if self.plan.workload.source_tokens else None
        embedding = None
        if encoder is not None:
            from planc.model.encoder_decoder import patch_embedding

            embedding = patch_embedding(encoder)
        if layouts is not None and any(layouts) and embedding is None:
            raise UsageError(
                f"{type(self.model).__name__} reads no word boxes (only Udop's encoder has layout biases over them): "
                'drop "words" and "boxes" from the prompts'
            )
        if embedding is not None:
            # Udop's layout biases need a box per token (bbox), which OCR or the caller gives: boxes
            # made up for a prompt would change what the model reads, so a prompt without them is refused.
            image = images[0] if images else None  # read_images refuses more than one
            if image is not None and not self.plan.workload.images_per_sequence:
                raise UsageError(
                    f"the plan sized {type(self.model).__name__}'s encoder source without the image's patches "
                    "(workload.images_per_sequence 0): recompile with images_per_sequence: 1, or run without --image"
                )
            layouts = list(layouts or [None] * len(prompts))
            check_word_boxes(layouts)  # before the processor loads: a checkpoint may ship none
            processor = self._processor() if image is not None else None
            batch = encode_layout(
                self.tokenizer, processor, prompts, layouts, image, self.plan, max_new_tokens, embedding.num_patches
            )
        elif encoder is not None and getattr(encoder, "main_input_name", "input_ids") != "input_ids":
            # An image encoder (ViT, Pix2Struct): the image is the source, the decoder starts from its start token.
            if not images:
                raise UsageError(
                    f"{type(self.model).__name__}'s encoder reads an image ({encoder.main_input_name}): give each "
                    "sequence one (--image)"
                )
            batch = encode_source_image(self._processor(), self.model, prompts, images[0], self.plan, max_new_tokens)
        elif encoder is not None and images and self.plan.workload.images_per_sequence:
            # A text encoder whose image tokens are placeholders (Florence2): the processor places the
            # image's tokens in the source, generate the image's features at them.
            batch = encode_with_images(self._processor(), prompts, images, self.plan, max_new_tokens)
        elif encoder is not None and images and places_image_features(self.model):
            raise UsageError(
                f"the plan sized {type(self.model).__name__}'s encoder source without images "
                "(workload.images_per_sequence 0): recompile with images_per_sequence: 1 (and source_tokens room for "
                "the image's tokens), or run without --image"
            )
        elif encoder is not None and images:
            raise UsageError(
                f"{type(self.model).__name__} is an encoder-decoder model whose encoder reads text: --image has "
                "nowhere to go"
            )
        elif images:
            batch = encode_with_images(self._processor(), prompts, images, self.plan, max_new_tokens)
        else:
            from planc.model.graph import generates_from_images

            if generates_from_images(self.model):
                raise UsageError(
                    f"{type(self.model).__name__} generates only from an image (its generate requires pixel_values): "
                    "give each prompt an image (--image)"
                )
            batch = encode(self.tokenizer, prompts, self.plan, max_new_tokens)
        config = generation_config(self.model, self.tokenizer, self.plan, max_new_tokens)
        device, extra = input_device(self.plan), {}
        if self.rank is not None:
            from planc.run.distributed import generate_kwargs, rank_device

            device, extra = rank_device(self.plan, self.rank), generate_kwargs(self.plan, self.model, self.rank)
        with pinned_attention(self.plan):
            return generate(self.model, self.tokenizer, batch, prompts, config, device, stream, extra)

    def _processor(self):
        """The model folder's processor, loaded on the first image prompt."""
        from planc.run.generate import load_processor

        if self.processor is None:
            self.processor = load_processor(self.machine.folder, self.plan)
        return self.processor

    def measured_peaks(self) -> dict[str, int]:
        """Peak bytes per device since the session opened (torch's allocator per GPU, RSS on CPU)."""
        from planc.run.generate import measured_peaks

        return measured_peaks(self.plan, self._own_devices())

    def _own_devices(self) -> list[int] | None:
        if self.rank is None:
            return None
        device = self.plan.parallel.ranks[self.rank.rank].device
        return [device] if isinstance(device, int) else []


@contextmanager
def open_session(
    plan: Plan,
    lock_dir: Path,
    console=None,
    before_load: Callable[[Any], None] | None = None,
    keep: bool = False,
    rank=None,
    trust_remote_code: bool = False,
) -> Iterator[Session]:
    """Check the machine against `plan`, apply it and load the model; refuse (raise) naming why not.

    `console` (rich) shows hashing and loading progress; None is silent. `before_load(tokenizer)`
    may refuse the request before the weights are read (a prompt longer than the plan allows should
    not wait for a 100 GiB load). The environment and torch settings stay in force until the block
    exits. With `keep` (planc.load: the model outlives the block) they stay in force for the rest
    of the process once the block ends well, and the model carries the plan's SDPA backends and
    decoding settings itself (`apply.attach_plan`); a failure still restores everything.
    `rank` (a planc.run.distributed.RankContext) opens one rank of a tensor- or pipeline-parallel
    plan: its part of the machine is checked and its share loaded. First of all, the lock may ask
    only for what planc writes (run.trust); `trust_remote_code` is the caller's consent to a lock
    that asks for code shipped with the checkpoint.
    """
    from planc.run.apply import applied_environment, attach_plan, torch_settings
    from planc.run.checks import check_machine
    from planc.run.generate import load_tokenizer, reset_peaks
    from planc.run.load import load_model, placement_mismatches
    from planc.run.report import hashing_progress, loading_progress
    from planc.run.trust import check_lock_trust

    check_lock_trust(plan, lock_dir, trust_remote_code)
    if plan.distributed and rank is None:
        raise RunError(
            f"this plan is {plan.parallel.strategy} over {len(plan.parallel.ranks)} ranks: each process loads one "
            "share, started by torch's launcher; run it with planc run (or export it with planc export --to vllm)"
        )
    started = time.perf_counter()
    with applied_environment(plan, keep=keep):
        progress, on_hash = (None, None) if console is None else hashing_progress(console)
        with progress or nullcontext():
            machine = check_machine(plan, lock_dir, on_hash, rank=rank)
        check_s = time.perf_counter() - started
        if machine.folder is None or not plan.inputs.weights:
            raise RunError(
                "the plan was compiled from a config only (no weights): it can be checked (--check-only) and "
                "simulated, not run; compile it from the model folder"
            )
        tokenizer = load_tokenizer(machine.folder, plan)
        if before_load is not None:
            before_load(tokenizer)
        with torch_settings(plan, keep=keep):
            own = None if rank is None else ([d] if isinstance(d := plan.parallel.ranks[rank.rank].device, int) else [])
            reset_peaks(plan, own)
            started = time.perf_counter()
            bar = None if console is None else loading_progress(console)
            with bar or nullcontext():
                if bar is not None:
                    bar.console.print(f"loading {plan.model.architecture} from {machine.folder}", style="dim")
                if rank is None:
                    model = load_model(plan, machine.folder, lock_dir, bar)
                else:
                    from planc.run.distributed import load_rank_model

                    model = load_rank_model(plan, machine.folder, bar)
            load_s = time.perf_counter() - started
            if rank is None:
                wrong = placement_mismatches(plan, model)
            else:
                from planc.run.distributed import rank_placement_mismatches

                wrong = rank_placement_mismatches(plan, model, rank)
            if wrong:
                raise RunError("the loaded model does not match the plan: " + "; ".join(wrong))
            if keep:
                attach_plan(model, tokenizer, plan)
            yield Session(plan, lock_dir, machine, model, tokenizer, check_s, load_s, rank)

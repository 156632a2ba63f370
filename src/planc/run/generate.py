"""Prompts in, token ids out: one left-padded batch within the plan's workload, greedy unless the plan says."""

from __future__ import annotations

import copy
import json
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from planc.errors import RunError, SpecError, UsageError
from planc.files import parse_json, read_text
from planc.plan import Plan


@dataclass(frozen=True)
class Completion:
    prompt: str
    prompt_tokens: int
    token_ids: list[int]  # new tokens only, up to and including the first end-of-sequence token
    text: str


@dataclass(frozen=True)
class WordBoxes:
    """A document's words (from OCR) and one box per word, x0, y0, x1, y1 normalized to 0-1000: what
    Udop's processor reads as text_pair and boxes beside the prompt (the question)."""

    words: list[str]
    boxes: list[list[int]]


def read_prompts(prompts: list[str], prompt_file: Path | None) -> list[str]:
    """--prompt values, then the file's: one prompt per line, or JSONL lines {"prompt": ...}."""
    return [prompt for prompt, _ in read_prompt_entries(prompts, prompt_file)]


def read_prompt_entries(prompts: list[str], prompt_file: Path | None) -> list[tuple[str, WordBoxes | None]]:
    """read_prompts with each prompt's words and boxes: JSONL lines may add {"words": [...], "boxes":
    [[x0, y0, x1, y1], ...]} (a document's OCR, one box per word, for Udop)."""
    result: list[tuple[str, WordBoxes | None]] = [(prompt, None) for prompt in prompts]
    if prompt_file is None:
        return result
    lines = read_text(prompt_file, "prompts", SpecError).splitlines()
    first = next((line for line in lines if line.strip()), "")
    jsonl = Path(prompt_file).suffix == ".jsonl" or _is_prompt_object(first)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            result.append((line, None))
            continue
        entry = parse_json(line, f"{prompt_file}:{number}", SpecError)
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise SpecError(f'{prompt_file}:{number}: a JSONL prompt file needs {{"prompt": "..."}} on every line')
        layout = None
        if "words" in entry or "boxes" in entry:
            layout = word_boxes(entry.get("words"), entry.get("boxes"), f"{prompt_file}:{number}")
        result.append((entry["prompt"], layout))
    return result


def word_boxes(words, boxes, where: str) -> WordBoxes:
    """`words` and their `boxes` as the processor takes them, or SpecError naming what is wrong; boxes
    are never made up (a word's place on the page is what the layout biases read)."""
    if not isinstance(words, list) or not words or not all(isinstance(word, str) for word in words):
        raise SpecError(f'{where}: "words" must be a non-empty list of strings (the document\'s OCR words)')
    if not isinstance(boxes, list) or len(boxes) != len(words):
        count = len(boxes) if isinstance(boxes, list) else "no"
        raise SpecError(f'{where}: {len(words)} words and {count} boxes: "boxes" needs one [x0, y0, x1, y1] per word')
    for index, box in enumerate(boxes):
        if not (isinstance(box, list) and len(box) == 4
                and all(type(value) is int and 0 <= value <= 1000 for value in box)):
            raise SpecError(
                f"{where}: box {index + 1} ({json.dumps(box)}) of word {json.dumps(words[index])} is not 4 integers "
                "x0, y0, x1, y1 in 0..1000 (coordinates normalized to the page's width and height)"
            )
    return WordBoxes(list(words), [list(box) for box in boxes])


def _is_prompt_object(line: str) -> bool:
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer too long to convert
        return False
    return isinstance(entry, dict) and "prompt" in entry


def check_batch(plan: Plan, prompts: list[str]) -> None:
    """The plan's memory was sized for at most workload.batch_size sequences."""
    if len(prompts) > plan.workload.batch_size:
        raise UsageError(
            f"{len(prompts)} prompts exceed the plan's batch_size {plan.workload.batch_size} (its KV cache and "
            f"activations were planned for {plan.workload.batch_size} x {plan.workload.max_seq_len} tokens); "
            f"pass at most {plan.workload.batch_size}, or recompile with a larger workload.batch_size"
        )


def load_tokenizer(folder: Path, plan: Plan):
    """The model folder's tokenizer, padding on the left (decoder-only models continue from the right)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=plan.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot load a tokenizer from {folder}: {exc}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode(tokenizer, prompts: list[str], plan: Plan, max_new_tokens: int):
    """The padded batch, refused when a sequence would outgrow the plan's max_seq_len (an
    encoder-decoder's prompt: its source_tokens)."""
    if plan.workload.source_tokens:
        # The encoder reads the prompt from position 0 (learned position tables count from the left).
        tokenizer.padding_side = "right"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    _check_length(batch, plan, max_new_tokens)
    return batch


def takes_word_boxes(tokenizer) -> bool:
    """A layout tokenizer (Udop's) tokenizes words with one box each (call_boxes) and refuses text alone."""
    return callable(getattr(tokenizer, "call_boxes", None))


def check_word_boxes(layouts: list) -> None:
    """Every prompt of a layout model comes with its document's words and boxes, well formed (a
    Session.generate caller builds WordBoxes itself)."""
    for index, layout in enumerate(layouts):
        if layout is not None:
            word_boxes(layout.words, layout.boxes, f"prompt {index + 1}")
    if any(layout is None for layout in layouts):
        missing = next(index for index, layout in enumerate(layouts) if layout is None) + 1
        raise UsageError(
            f"prompt {missing} has no words and boxes, and Udop reads a bounding box for every word beside the "
            'question (bbox, from OCR or the caller): give each prompt in a JSONL file {"prompt": QUESTION, '
            '"words": [...], "boxes": [[x0, y0, x1, y1], ...]} (0-1000)'
        )


def encode_layout(tokenizer, processor, prompts: list[str], layouts: list, image, plan: Plan, max_new_tokens: int,
                  patches: int = 0):
    """Udop's source: each prompt (the question) with its document's words and boxes, as UdopProcessor
    tokenizes them (text, text_pair, boxes); with an image, the processor's pixel_values too, whose
    `patches` the encoder appends after the tokens. Without an image the processor cannot be called
    (its image processor needs images), so its tokenizer takes the same arguments directly."""
    import torch

    check_word_boxes(layouts)
    tokenizer.padding_side = "right"  # the encoder reads the source from position 0
    inputs = dict(text=list(prompts), text_pair=[layout.words for layout in layouts],
                  boxes=[layout.boxes for layout in layouts], return_tensors="pt", padding=True)
    try:
        batch = tokenizer(**inputs) if image is None else processor(images=[image] * len(prompts), **inputs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"the processor refuses the prompt, words and boxes: {exc}") from None
    if image is None:
        # With an image UdopStack casts the boxes to float64 itself (combine_image_text_embeddings) before its
        # layout biases average them; without one it passes the processor's int64 boxes on, whose mean()
        # torch refuses. The same cast here: the same coordinates, read as they are with an image.
        batch["bbox"] = batch["bbox"].to(torch.float64)
    source = batch["input_ids"].shape[1] + (patches if image is not None else 0)
    _check_source_length({"input_ids": torch.empty(len(prompts), source)}, plan, max_new_tokens)
    return batch


def read_images(paths: list[Path], plan: Plan) -> list:
    """--image files as RGB PIL images, refused beyond the images per prompt the plan was sized for."""
    if not paths:
        return []
    planned = plan.workload.images_per_sequence
    if plan.workload.source_tokens and len(paths) > 1:
        raise UsageError(
            f"{len(paths)} images per prompt: an encoder-decoder's image encoder reads one image per sequence (its "
            f"{plan.workload.source_tokens} source tokens); pass one --image"
        )
    if len(paths) > planned and not plan.workload.source_tokens:
        raise UsageError(
            f"{len(paths)} images per prompt exceed the plan's images_per_sequence {planned} (the vision tower's "
            "activations were planned for that many); pass fewer, or recompile with a larger "
            "workload.images_per_sequence"
        )
    try:
        from PIL import Image
    except ImportError:
        raise RunError("image prompts need Pillow: pip install pillow") from None
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as exc:
            raise SpecError(f"cannot read image {path}: {exc}") from None
    return images


def load_processor(folder: Path, plan: Plan):
    """The model folder's processor (tokenizer + image processor), padding on the left."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=plan.model.trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise RunError(f"cannot load an image processor from {folder}: {exc}") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise RunError(f"{folder} has no processor with an image processor: it cannot take image prompts")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def with_image_tokens(processor, prompt: str, count: int) -> str:
    """The prompt with one image placeholder per image in front, unless it places them itself."""
    token = getattr(processor, "image_token", None)
    if not token or token in prompt:
        return prompt
    return token * count + prompt


def encode_with_images(processor, prompts: list[str], images: list, plan: Plan, max_new_tokens: int):
    """The padded batch of prompts that each show `images`, refused beyond the plan's max_seq_len
    (the tokens the processor expands each image into count)."""
    if plan.workload.source_tokens:
        # An encoder-decoder's processor places the image's tokens itself (Florence2's prepare_inputs_layout
        # puts one image token before the text), or expands a start-of-image token per image in the text
        # (T5Gemma2's Gemma3Processor: its image_token is that boi_token); the encoder reads the source
        # from position 0.
        own = getattr(processor, "boi_token", None) is None
        texts = list(prompts) if own else [with_image_tokens(processor, prompt, len(images)) for prompt in prompts]
        processor.tokenizer.padding_side = "right"
    else:
        texts = [with_image_tokens(processor, prompt, len(images)) for prompt in prompts]
    try:
        batch = processor(text=texts, images=[list(images) for _ in prompts], return_tensors="pt", padding=True)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"the processor refuses the prompt and images: {exc}") from None
    _check_length(batch, plan, max_new_tokens, "with its images ")
    return batch


def encode_source_image(processor, model, prompts: list[str], image, plan: Plan, max_new_tokens: int):
    """An image encoder's input for every sequence: the image through the processor's image processor
    (Pix2Struct's at the plan's source_tokens as max_patches), refused where it is not the source the
    plan sized. The decoder starts from its start token, so a prompt's text has nowhere to go."""
    import torch

    encoder = model.get_encoder()
    name = encoder.main_input_name
    if any(prompt.strip() for prompt in prompts):
        raise UsageError(
            f"{type(model).__name__}'s encoder reads only the image and its decoder starts from its start token: the "
            "prompt's text has nowhere to go; pass --prompt '' (one per sequence) with --image"
        )
    options = {"max_patches": plan.workload.source_tokens} if name == "flattened_patches" else {}
    try:
        inputs = processor.image_processor([image] * len(prompts), return_tensors="pt", **options)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"the image processor refuses the image: {exc}") from None
    batch = {name: inputs[name]}
    if name == "flattened_patches":
        batch["attention_mask"] = inputs["attention_mask"]
        source = inputs[name].shape[1]
    else:
        side = getattr(encoder.config, "image_size", None)
        if isinstance(side, int) and tuple(inputs[name].shape[-2:]) != (side, side):
            raise UsageError(
                f"the image processor gives {tuple(inputs[name].shape[-2:])} pixels, and the plan sized the encoder for "
                f"its config's {side} x {side} ({plan.workload.source_tokens} source tokens): fix the processor's size"
            )
        source = plan.workload.source_tokens
    _check_source_length({"input_ids": torch.empty(len(prompts), source)}, plan, max_new_tokens)
    return batch


def _check_length(batch, plan: Plan, max_new_tokens: int, what: str = "") -> None:
    if plan.workload.source_tokens:
        _check_source_length(batch, plan, max_new_tokens)
        return
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    # Left padding gives every row the longest prompt's length, and the KV cache holds the padding too.
    longest = batch["input_ids"].shape[1]
    if longest + max_new_tokens > plan.workload.max_seq_len:
        which = lengths.index(max(lengths)) + 1
        raise UsageError(
            f"prompt {which} {what}is {longest} tokens; with max_new_tokens {max_new_tokens} that is "
            f"{longest + max_new_tokens} > the plan's max_seq_len {plan.workload.max_seq_len}; shorten it, lower "
            "--max-new-tokens, or recompile with a larger workload.max_seq_len"
        )


def _check_source_length(batch, plan: Plan, max_new_tokens: int) -> None:
    """An encoder-decoder's prompt is the encoder's source (workload.source_tokens, padding included);
    its decoder holds the start token and the generated ones (max_seq_len)."""
    source = batch["input_ids"].shape[1]
    if source > plan.workload.source_tokens:
        raise UsageError(
            f"the prompt is {source} tokens > the plan's source_tokens {plan.workload.source_tokens} (the encoder's "
            "activations, its output and the cross-attention caches were planned for that many); shorten it, or "
            "recompile with a larger workload.source_tokens"
        )
    if max_new_tokens + 1 > plan.workload.max_seq_len:
        raise UsageError(
            f"max_new_tokens {max_new_tokens} plus the decoder's start token is {max_new_tokens + 1} > the plan's "
            f"max_seq_len {plan.workload.max_seq_len} (the decoder's tokens); lower --max-new-tokens, or recompile "
            "with a larger workload.max_seq_len"
        )


def generation_settings(plan: Plan) -> dict:
    """The plan's decoding settings as GenerationConfig fields (exports write them out as they are)."""
    settings: dict = {"do_sample": plan.generation.do_sample}
    if not plan.generation.do_sample:
        settings.update(temperature=None, top_p=None, top_k=None)  # unused by greedy search
    settings["prefill_chunk_size"] = plan.generation.prefill_chunk_size
    return settings


def generation_config(model, tokenizer, plan: Plan, max_new_tokens: int):
    """The model's own generation defaults with the plan's decoding settings on top."""
    config = copy.deepcopy(model.generation_config)
    for name, value in generation_settings(plan).items():
        setattr(config, name, value)
    config.max_new_tokens = max_new_tokens
    config.pad_token_id = tokenizer.pad_token_id
    if plan.generation.cache_implementation:
        config.cache_implementation = plan.generation.cache_implementation
        config.cache_config = dict(plan.generation.cache_config or {})
    return config


def generate(
    model, tokenizer, batch, prompts: list[str], config, input_device: str, stream: bool, extra: dict | None = None
) -> list[Completion]:
    """Run generate on the batch; one prompt can stream its text to stdout as it is produced.

    `extra` goes to generate as well (a pipeline stage's cache)."""
    import torch
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
    inputs = {}
    for name, tensor in batch.items():
        if isinstance(tensor, torch.Tensor):
            # Pixel values come as float32; the vision tower runs in the plan's dtype. Boxes are coordinates
            # (0-1000), which bfloat16 would round.
            cast = tensor.is_floating_point() and name != "bbox"
            tensor = tensor.to(input_device, dtype=model.dtype if cast else None)
        inputs[name] = tensor
    try:
        with torch.inference_mode():
            output = model.generate(**inputs, generation_config=config, streamer=streamer, **(extra or {}))
    except RuntimeError as exc:  # out of memory included: the plan's prediction was wrong here
        raise RunError(f"generate failed: {exc}") from None
    # An encoder-decoder's output is the decoder's tokens from its start token; a decoder-only
    # model's continues the prompt.
    skip = 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
    new_tokens = output[:, skip:].tolist()
    end = _end_token_ids(config)
    completions = []
    # An image encoder's sequences have no prompt tokens (the image is the source).
    lengths = batch["attention_mask"].sum(dim=1).tolist() if "input_ids" in batch else [0] * len(prompts)
    for prompt, prompt_tokens, ids in zip(prompts, lengths, new_tokens):
        stop = next((index + 1 for index, token in enumerate(ids) if token in end), len(ids))
        ids = ids[:stop]
        completions.append(Completion(prompt, int(prompt_tokens), ids, tokenizer.decode(ids, skip_special_tokens=True)))
    return completions


def _end_token_ids(config) -> set[int]:
    eos = config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def input_device(plan: Plan) -> str:
    """Where the inputs go: accelerate's root hook moves them anyway; without hooks, the model's device."""
    from planc.run.load import main_device

    device = main_device(plan)
    return f"cuda:{device}" if isinstance(device, int) else "cpu"


def reset_peaks(plan: Plan, devices: list[int] | None = None) -> None:
    """Reset torch's peak counters of the plan's GPUs (or only `devices`, a rank's own)."""
    import torch

    for index in [device.index for device in plan.devices] if devices is None else devices:
        torch.cuda.reset_peak_memory_stats(index)


def measured_peaks(plan: Plan, devices: list[int] | None = None) -> dict[str, int]:
    """Peak bytes per device: torch's allocator peak on each GPU (or only `devices`), the process's peak RSS
    on the CPU."""
    peaks: dict[str, int] = {}
    indices = [device.index for device in plan.devices] if devices is None else devices
    if indices:
        import torch

        for index in indices:
            peaks[str(index)] = torch.cuda.max_memory_allocated(index)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    peaks["cpu"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peaks

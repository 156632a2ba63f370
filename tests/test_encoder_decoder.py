"""Encoder-decoder models (T5, BART, Pix2Struct, VisionEncoderDecoder): the encoder placed ahead of the
decoder, its output and the decoder's cross-attention caches sized once (planc.model.encoder_decoder),
held to the EncoderDecoderCache a real generate keeps and to `planc simulate` of two-GPU plans, and
`planc run` generating the tokens plain transformers gives; what planc does not do for them refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import save_tiny_tokenizer
from hybrid_models import compile_for_a100s, simulate_lock
from planc.errors import SpecError, UsageError
from test_run import compile_to

PROMPTS = ["The quick brown fox jumps", "A device map"]
MAX_NEW_TOKENS = 6


def build_tiny_seq2seq(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A tiny random T5 or BART with the BPE tokenizer of conftest, saved with save_pretrained."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    fast = save_tiny_tokenizer(folder)
    special = dict(pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id)
    if model_type == "t5":
        # d_kv x heads (32) is not d_model (24): the cache is sized from the heads' width.
        config = T5Config(vocab_size=len(fast), d_model=24, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3,
                          num_heads=4, decoder_start_token_id=fast.pad_token_id, **special)
        cls = T5ForConditionalGeneration
    else:
        # Decoder heads and widths apart from the encoder's (decoder_attention_heads, decoder_ffn_dim).
        config = BartConfig(vocab_size=len(fast), d_model=32, encoder_layers=2, decoder_layers=3,
                            encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=64,
                            decoder_ffn_dim=48, max_position_embeddings=128,
                            decoder_start_token_id=fast.eos_token_id, forced_eos_token_id=None, **special)
        cls = BartForConditionalGeneration
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    model.save_pretrained(folder)
    return folder


def build_tiny_image_seq2seq(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A tiny random VisionEncoderDecoder (ViT encoder of 32 x 32 images in 8-pixel patches, BERT
    decoder; TrOCRProcessor) or Pix2Struct (16 patches of 8 x 8; Pix2StructProcessor), saved with
    their processors."""
    import torch
    from transformers import (
        BertConfig, Pix2StructConfig, Pix2StructForConditionalGeneration, Pix2StructImageProcessor,
        Pix2StructProcessor, TrOCRProcessor, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

    fast = save_tiny_tokenizer(folder)
    if model_type == "vision-encoder-decoder":
        TrOCRProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=fast).save_pretrained(folder)
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64),
            BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, pad_token_id=fast.pad_token_id),
        )
        config.decoder_start_token_id, config.pad_token_id = fast.bos_token_id, fast.pad_token_id
        config.eos_token_id = fast.eos_token_id
        cls = VisionEncoderDecoderModel
    else:
        image_processor = Pix2StructImageProcessor(patch_size={"height": 8, "width": 8}, max_patches=16)
        Pix2StructProcessor(image_processor=image_processor, tokenizer=fast).save_pretrained(folder)
        config = Pix2StructConfig(
            text_config=dict(vocab_size=len(fast), hidden_size=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                             decoder_start_token_id=fast.pad_token_id),
            vision_config=dict(hidden_size=32, patch_embed_hidden_size=8 * 8 * 3, d_ff=64, d_kv=8, num_hidden_layers=2,
                               num_attention_heads=4, seq_len=16),
        )
        cls = Pix2StructForConditionalGeneration
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    cls(config).to(torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def seq2seq_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq-models")
    # BART at seed 3: its greedy tokens run past the end-of-sequence token (at seed 0 it ends at once).
    return {name: build_tiny_seq2seq(root / name, name, seed) for name, seed in (("t5", 0), ("bart", 3))}


def plain_seq2seq_tokens(model: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """What users get without planc: greedy generate in float32 on one right-padded batch."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="right")
    reference = AutoModelForSeq2SeqLM.from_pretrained(model, dtype=torch.float32)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    output = reference.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    eos = reference.generation_config.eos_token_id
    rows = output[:, 1:].tolist()  # after the decoder's start token
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


CPU_SPEC = """\
planc: 1
model: {{path: {model}}}
hardware: {{gpus: [], cpu_memory: 8GiB}}
workload: {{batch_size: 2, max_seq_len: 16{workload}}}
policy: {{offload: cpu}}
"""


# ------------------------------------------------------------------ the cache, to the byte


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_the_planned_caches_are_the_encoder_decoder_cache_generate_keeps(seq2seq_models, name):
    """After a real generate, every decoder layer holds its self-attention K/V of the decoder's tokens
    and its cross-attention K/V of the source, and the encoder output is batch x source x d_model:
    the bytes the graph's caches give at that workload."""
    import json

    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from planc.model import build_model_graph
    from planc.model.cache import held_bytes, layer_tensors
    from planc.workload import Workload

    folder = seq2seq_models[name]
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    steps = 5
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         return_dict_in_generate=True)
    encoded = model.get_encoder()(**batch).last_hidden_state
    source = batch["input_ids"].shape[1]

    graph = build_model_graph(json.loads((folder / "config.json").read_text()), "float32")
    # The last token generated is not fed back: the decoder's cache holds the start token and steps - 1.
    workload = Workload(len(PROMPTS), steps, source_tokens=source)
    layers = [unit for unit in graph.units if unit.kind == "layer"]
    held = [held_bytes(tensors) for tensors in layer_tensors(out.past_key_values)]
    assert held == [unit.cache.bytes(workload) for unit in layers]
    assert all(unit.cache.bytes_per_source_token for unit in layers)
    (output_unit,) = [unit for unit in graph.units if unit.cache is not None and unit.kind == "pre"]
    assert output_unit.encoder and output_unit.cache.bytes(workload) == held_bytes([encoded])
    assert graph.encoder.source_tokens(None, 64) == 64  # a text encoder's source: the prompt, max_seq_len unless set


# ------------------------------------------------------------------ two GPUs, simulated

SIMULATED = [
    # A text encoder with T5's relative position bias, at batch 1 (no mask: the bias is the sdpa mask).
    pytest.param("t5", "T5ForConditionalGeneration", dict(num_layers=4, num_decoder_layers=4), 1, 1024, id="t5"),
    # A padded batch: the encoder's and the cross-attention's masks are built.
    pytest.param("bart", "BartForConditionalGeneration", dict(encoder_layers=4, decoder_layers=4), 2, 1024, id="bart"),
    # Image encoders: a ViT's 197 patch tokens (BERT decoder), Pix2Struct's 4096 patches (its seq_len).
    pytest.param("vision-encoder-decoder", "VisionEncoderDecoderModel", {}, 2, 256, id="vit-bert"),
    # PP-FormulaNet: a SAM-style ViT over its 32 x 32 patch grid (eager scores with relative positions),
    # resampled to 64 source tokens by its neck and projector.
    pytest.param("pp_formulanet", "PPFormulaNetForConditionalGeneration", {}, 2, 256, id="pp-formulanet"),
    # Udop: T5 with layout biases over each token's box (batch x heads x S x S), a text source here.
    pytest.param("udop", "UdopForConditionalGeneration", dict(num_layers=4, num_decoder_layers=4), 2, 256, id="udop"),
    pytest.param("pix2struct", "Pix2StructForConditionalGeneration",
                 dict(text_config=dict(num_layers=4), vision_config=dict(num_hidden_layers=4)), 1, 1024,
                 id="pix2struct"),
]


@pytest.mark.parametrize(("model_type", "architecture", "overrides", "batch", "seq"), SIMULATED)
def test_simulated_encoder_decoder_plans_agree_with_the_ledger(tmp_path, model_type, architecture, overrides, batch, seq):
    from transformers import AutoConfig

    from test_simulate import LEDGER_TOLERANCE

    config = AutoConfig.for_model(model_type).to_dict()
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    config["architectures"] = [architecture]
    plan = compile_for_a100s(tmp_path, config, 2, seq, batch)
    assert plan.workload.source_tokens > 0
    # The encoder stays on the main GPU with the embeddings; decoder layers go to both.
    assert {device for name, device in plan.device_map.items() if ".layer" in name or ".block" in name} == {0, 1}

    report, errors = simulate_lock(tmp_path)

    assert all(abs(error) <= LEDGER_TOLERANCE for error in errors.values()), errors
    held = {device.index: device.simulated_kv_cache for device in report.devices}
    planned = {ledger.device: ledger.kv_cache for ledger in plan.memory}
    for device in held:
        # The decode step adds a token to the self-attention caches beyond the plan's max_seq_len.
        assert planned[device] <= held[device] <= planned[device] * (seq + 1) / seq, device


# ------------------------------------------------------------------ planc run


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_a_cpu_plan_generates_the_tokens_of_plain_transformers(seq2seq_models, tmp_path, name):
    from planc.plan import load_lock
    from planc.run import run_plan

    lock = compile_to(tmp_path, CPU_SPEC.format(model=seq2seq_models[name], workload=", source_tokens: 12"))
    plan = load_lock(lock)
    assert (plan.workload.source_tokens, plan.workload.max_seq_len) == (12, 16)
    assert any(decision.id == "model.encoder" for decision in plan.decisions)

    outcome = run_plan(lock, prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS, quiet=True)

    assert outcome.exit_code == 0
    tokens = [c.token_ids for c in outcome.completions]
    assert tokens == plain_seq2seq_tokens(seq2seq_models[name], PROMPTS, MAX_NEW_TOKENS)
    assert all(len(row) == MAX_NEW_TOKENS for row in tokens)  # the decoder's start token is not returned


def test_a_prompt_longer_than_the_planned_source_is_refused(seq2seq_models, tmp_path):
    from test_run import planc_cli

    compile_to(tmp_path, CPU_SPEC.format(model=seq2seq_models["t5"], workload=", source_tokens: 2"))

    result = planc_cli("run", "plan.lock", "-p", PROMPTS[0], "--max-new-tokens", "4", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.startswith("error: the prompt is ") and "> the plan's source_tokens 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = planc_cli("run", "plan.lock", "-p", "fox", "--max-new-tokens", "16", cwd=tmp_path)
    assert result.returncode == 2 and "max_new_tokens 16 plus the decoder's start token is 17 > the plan's max_seq_len 16" \
        in result.stderr


@pytest.fixture(scope="module")
def image_seq2seq_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-seq2seq-models")
    return {name: build_tiny_image_seq2seq(root / name, name) for name in ("vision-encoder-decoder", "pix2struct")}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "card.png"
    Image.new("RGB", (40, 30), (200, 30, 90)).save(path)
    return path


def plain_image_seq2seq_tokens(model: Path, image: Path, sequences: int, max_new_tokens: int, **options):
    """Greedy generate from the image through the folder's image processor, in float32."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    reference = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32)
    with Image.open(image) as picture:
        inputs = processor.image_processor([picture.convert("RGB")] * sequences, return_tensors="pt", **options)
    output = reference.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    eos = reference.generation_config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in output[:, 1:].tolist()]


# The ViT's source is its 16 patches and class token; Pix2Struct's the processor's max_patches.
@pytest.mark.parametrize(("name", "source", "workload", "options"), [
    ("vision-encoder-decoder", 17, "", {}),
    ("pix2struct", 16, ", source_tokens: 16", {"max_patches": 16}),
])
def test_an_image_encoder_plan_generates_from_the_image_the_tokens_of_plain_transformers(
    image_seq2seq_models, image_file, tmp_path, name, source, workload, options
):
    from planc.plan import load_lock
    from planc.run import run_plan

    model = image_seq2seq_models[name]
    lock = compile_to(tmp_path, CPU_SPEC.format(model=model, workload=workload))
    assert load_lock(lock).workload.source_tokens == source

    outcome = run_plan(lock, prompts=["", ""], images=[image_file], max_new_tokens=MAX_NEW_TOKENS, quiet=True)

    assert outcome.exit_code == 0
    assert [c.token_ids for c in outcome.completions] == plain_image_seq2seq_tokens(
        model, image_file, 2, MAX_NEW_TOKENS, **options
    )
    with pytest.raises(UsageError, match="encoder reads an image \\(pixel_values|flattened_patches"):
        run_plan(lock, prompts=[""], max_new_tokens=2, quiet=True)
    with pytest.raises(UsageError, match="the prompt's text has nowhere to go; pass --prompt ''"):
        run_plan(lock, prompts=["describe it"], images=[image_file], max_new_tokens=2, quiet=True)


# ------------------------------------------------------------------ what planc does not do for them


def test_serve_vllm_python_export_and_parallel_plans_are_refused(seq2seq_models, tmp_path):
    from planc.export import export_plan
    from planc.export.vllm import ExportError
    from planc.serve import serve_plan

    lock = compile_to(tmp_path, CPU_SPEC.format(model=seq2seq_models["bart"], workload=""))
    with pytest.raises(UsageError, match="planc serve decodes decoder-only models; BartForConditionalGeneration is an "
                                         "encoder-decoder model"):
        serve_plan(lock, port=0, quiet=True)
    with pytest.raises(ExportError, match="is an encoder-decoder model, and planc's vLLM export writes decoder-only"):
        export_plan(lock, "vllm")
    with pytest.raises(SpecError, match="--format python writes a decoder-only generate"):
        export_plan(lock, "transformers", "python")
    assert '"device_map"' in export_plan(lock, "accelerate", "json")  # the loader's arguments still export

    (tmp_path / "tp").mkdir()
    with pytest.raises(SpecError, match="policy.parallelism tensor: BartForConditionalGeneration is an encoder-decoder "
                                        "model, and planc plans those for one process"):
        compile_to(tmp_path / "tp", CPU_SPEC.format(model=seq2seq_models["bart"], workload="").replace(
            "hardware: {gpus: [], cpu_memory: 8GiB}", "hardware: {gpus: [{type: a100-sxm4-80gb, count: 2}], cpu_memory: 8GiB}"
        ).replace("policy: {offload: cpu}", "policy: {parallelism: tensor}"))


def test_source_tokens_where_the_model_takes_none_or_decides_it_is_bad_input(seq2seq_models, tiny_model, tmp_path):
    from test_run import planc_cli

    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "spec.yaml").write_text(CPU_SPEC.format(model=tiny_model, workload=", source_tokens: 8"))
    result = planc_cli("-q", "compile", "spec.yaml", cwd=tmp_path / "llm")
    assert result.returncode == 2
    assert result.stderr == ("error: workload.source_tokens is set but Qwen3ForCausalLM is no encoder-decoder model: its "
                             "prompt counts within max_seq_len\n")
    assert not (tmp_path / "llm" / "plan.lock").exists()

    from transformers import AutoConfig

    config = AutoConfig.for_model("vision-encoder-decoder")
    config.architectures = ["VisionEncoderDecoderModel"]
    (tmp_path / "ved").mkdir()
    (tmp_path / "ved" / "config.json").write_text(config.to_json_string())
    (tmp_path / "ved" / "spec.yaml").write_text(
        "planc: 1\nmodel: {config: config.json}\nhardware: {gpus: [{type: a100-sxm4-80gb}], cpu_memory: 64GiB}\n"
        "workload: {batch_size: 1, max_seq_len: 64, source_tokens: 100}\n"
    )
    result = planc_cli("-q", "compile", "spec.yaml", cwd=tmp_path / "ved")
    assert result.returncode == 2
    assert result.stderr == ("error: workload.source_tokens: this model's encoder reads one image of 197 patch tokens "
                             "(its image size and patch size decide it), not 100; leave source_tokens unset\n")


def test_a_source_past_the_encoders_position_table_is_bad_input(seq2seq_models, tmp_path):
    """The tiny BART's encoder has 128 learned positions: its source may not be longer; unset, the
    source is max_seq_len, so a longer decoder context is refused unless source_tokens says less."""
    spec = CPU_SPEC.format(model=seq2seq_models["bart"], workload=", source_tokens: 200")
    with pytest.raises(SpecError, match="workload.source_tokens 200 exceeds the 128 positions of the encoder's learned "
                                        "position table"):
        compile_to(tmp_path, spec)
    assert not (tmp_path / "plan.lock").exists()


def test_show_names_the_source_tokens_and_check_finds_the_lock_fresh_until_they_change(seq2seq_models, tmp_path):
    from test_run import planc_cli

    compile_to(tmp_path, CPU_SPEC.format(model=seq2seq_models["t5"], workload=", source_tokens: 12"))
    result = planc_cli("show", "plan.lock", cwd=tmp_path)
    assert result.returncode == 0
    assert "batch 2 x 16 tokens (12 source tokens to the encoder)" in " ".join(result.stdout.split())
    assert planc_cli("-q", "compile", "--check", "spec.yaml", cwd=tmp_path).returncode == 0

    (tmp_path / "spec.yaml").write_text(CPU_SPEC.format(model=seq2seq_models["t5"], workload=", source_tokens: 10"))
    result = planc_cli("compile", "--check", "spec.yaml", cwd=tmp_path)
    assert result.returncode == 1 and "workload.source_tokens 12 -> 10" in result.stdout + result.stderr


def test_a_quantized_kv_cache_is_refused(seq2seq_models, tmp_path):
    from planc.errors import ModelError

    spec = CPU_SPEC.format(model=seq2seq_models["bart"], workload="").replace(
        "model: {path: ", "model: {kv_cache: fp8, path: ")
    with pytest.raises(ModelError, match="generate builds no QuantizedCache for an encoder-decoder model"):
        compile_to(tmp_path, spec)


@pytest.mark.parametrize(("model_type", "architecture", "overrides", "reason"), [
    ("t5", "T5ForConditionalGeneration", dict(num_layers=2, num_decoder_layers=3), "its 3 decoder layers update a "
     "self-attention cache that generate builds with 2 layers"),
])
def test_encoder_decoders_planc_cannot_size_are_refused_with_the_reason(model_type, architecture, overrides, reason):
    from transformers import AutoConfig

    from planc.errors import ModelError
    from planc.model import build_model_graph

    config = AutoConfig.for_model(model_type).to_dict()
    config.update(overrides, architectures=[architecture])
    with pytest.raises(ModelError) as refused:
        build_model_graph(config, "bfloat16")
    assert reason in str(refused.value) and "\n" not in str(refused.value)


# ------------------------------------------------------------------ Florence2: image tokens in a text encoder's source


def build_tiny_florence2(folder: Path, seed: int = 2) -> Path:
    """A tiny random Florence2 (a two-stage DaViT of 32 x 32 images: an 8 x 8 then a 4 x 4 grid, and the
    projector's mean token: 17 image tokens; a BART encoder-decoder) with a Florence2Processor built
    offline (a BPE tokenizer with an <image> token, a CLIP image processor of image_seq_length 17).
    init_std 0.3 and seed 2: greedy tokens that differ between prompts and steps."""
    import torch
    from transformers import CLIPImageProcessorPil, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    from conftest import image_token_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    fast = image_token_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                            do_center_crop=False)
    image_processor.image_seq_length = 17
    Florence2Processor(image_processor=image_processor, tokenizer=fast).save_pretrained(folder)
    config = Florence2Config(
        vision_config=dict(embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4], depths=[1, 1], patch_size=[7, 3],
                           patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True], window_size=2,
                           projection_dim=32, max_position_embeddings=16),
        text_config=dict(vocab_size=len(fast), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
                         decoder_start_token_id=fast.eos_token_id, forced_eos_token_id=None, init_std=0.3),
        image_token_id=fast.convert_tokens_to_ids("<image>"),
    )
    config.architectures = ["Florence2ForConditionalGeneration"]
    torch.manual_seed(seed)
    Florence2ForConditionalGeneration(config).to(torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def florence2_model(tmp_path_factory):
    return build_tiny_florence2(tmp_path_factory.mktemp("florence2"))


def florence2_batch(model: Path, prompts: list[str], image: Path):
    """The processor's batch (right-padded: the encoder reads from position 0), one image per prompt."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    processor.tokenizer.padding_side = "right"
    with Image.open(image) as picture:
        return processor(text=prompts, images=[picture.convert("RGB")] * len(prompts), return_tensors="pt", padding=True)


def test_florence2_image_tokens_count_in_the_source_and_its_caches_are_the_ones_generate_keeps(
    florence2_model, image_file
):
    """The processor puts 17 image tokens in the source, as many as the graph's vision numbers give;
    after a real generate from text and image, the cross-attention K/V, the self-attention K/V and the
    encoder output (batch x source, image tokens included) are the graph's bytes."""
    import json

    import torch
    from transformers import AutoModelForImageTextToText

    from planc.model import build_model_graph
    from planc.model.cache import held_bytes, layer_tensors
    from planc.workload import Workload

    batch = florence2_batch(florence2_model, PROMPTS, image_file)
    model = AutoModelForImageTextToText.from_pretrained(florence2_model, dtype=torch.float32)
    steps = 5
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         return_dict_in_generate=True, output_hidden_states=True)
    source = batch["input_ids"].shape[1]
    image_id = model.config.image_token_id

    graph = build_model_graph(json.loads((florence2_model / "config.json").read_text()), "float32")
    workload = Workload(len(PROMPTS), steps, images_per_sequence=1, image_size=32, source_tokens=source)
    assert graph.vision.image_tokens(workload) == 17 == int((batch["input_ids"][0] == image_id).sum())
    layers = [unit for unit in graph.units if unit.kind == "layer"]
    assert [held_bytes(t) for t in layer_tensors(out.past_key_values)] == [u.cache.bytes(workload) for u in layers]
    (output_unit,) = [unit for unit in graph.units if unit.cache is not None and unit.kind == "pre"]
    assert output_unit.encoder and output_unit.cache.bytes(workload) == held_bytes([out.encoder_hidden_states[-1]])
    # The tower and its projector (a norm among them) run before the encoder, as vision units.
    assert all(unit.vision for unit in graph.units if unit.name.startswith(("model.vision_tower", "model.multi_modal")))


def test_a_florence2_plan_generates_from_text_and_image_the_tokens_of_plain_transformers(
    florence2_model, image_file, tmp_path
):
    import torch
    from transformers import AutoModelForImageTextToText

    from planc.plan import load_lock
    from planc.run import run_plan

    workload = ", source_tokens: 32, images_per_sequence: 1, image_size: 32"
    lock = compile_to(tmp_path, CPU_SPEC.format(model=florence2_model, workload=workload))
    assert load_lock(lock).workload.source_tokens == 32

    outcome = run_plan(lock, prompts=PROMPTS, images=[image_file], max_new_tokens=MAX_NEW_TOKENS, quiet=True)

    assert outcome.exit_code == 0
    reference = AutoModelForImageTextToText.from_pretrained(florence2_model, dtype=torch.float32)
    output = reference.generate(**florence2_batch(florence2_model, PROMPTS, image_file), max_new_tokens=MAX_NEW_TOKENS,
                                do_sample=False)
    eos = reference.generation_config.eos_token_id
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in output[:, 1:].tolist()]
    tokens = [c.token_ids for c in outcome.completions]
    assert tokens == expected and tokens[0] != tokens[1]

    (tmp_path / "text").mkdir()
    text_only = compile_to(tmp_path / "text", CPU_SPEC.format(model=florence2_model, workload=", source_tokens: 32"))
    with pytest.raises(UsageError, match="the plan sized Florence2ForConditionalGeneration's encoder source without "
                                         "images \\(workload.images_per_sequence 0\\): recompile"):
        run_plan(text_only, prompts=PROMPTS, images=[image_file], max_new_tokens=2, quiet=True)


def test_a_florence2_source_without_room_for_its_image_is_bad_input(florence2_model, tmp_path):
    workload = ", source_tokens: 16, images_per_sequence: 1, image_size: 32"
    with pytest.raises(SpecError, match="workload.source_tokens 16: the encoder's source holds the prompt's text and "
                                        "its images' 17 tokens"):
        compile_to(tmp_path, CPU_SPEC.format(model=florence2_model, workload=workload))
    assert not (tmp_path / "plan.lock").exists()


def test_a_simulated_florence2_plan_with_an_image_agrees_with_the_ledger(tmp_path):
    """The default Florence2 (DaViT of 768 x 768 images: 577 tokens) on two GPUs, batch 2 with 1024
    source tokens: the tower's stages, the encoder and the cross-attention caches within tolerance."""
    import json

    from transformers import AutoConfig, PretrainedConfig

    from planc.compile import compile_spec
    from planc.plan import write_if_changed
    from test_simulate import LEDGER_TOLERANCE

    config = AutoConfig.for_model("florence2").to_dict()
    config["architectures"] = ["Florence2ForConditionalGeneration"]
    config.pop("transformers_version", None)
    (tmp_path / "config.json").write_text(json.dumps(PretrainedConfig._encode_special_floats(config)))
    (tmp_path / "spec.yaml").write_text(
        "planc: 1\nmodel: {config: config.json}\nhardware: {gpus: [{type: a100-sxm4-80gb, count: 2}], cpu_memory: 64GiB}\n"
        "workload: {batch_size: 2, max_seq_len: 256, source_tokens: 1024, images_per_sequence: 1, image_size: 768}\n"
    )
    plan, text = compile_spec(tmp_path / "spec.yaml", tmp_path / "plan.lock")
    write_if_changed(tmp_path / "plan.lock", text)
    assert {device for name, device in plan.device_map.items() if ".layers." in name} == {0, 1}

    report, errors = simulate_lock(tmp_path)

    assert all(abs(error) <= LEDGER_TOLERANCE for error in errors.values()), errors
    assert any("vision tower ran over 2 images of 768 x 768" in note for note in report.notes)


# ------------------------------------------------------------------ PP-FormulaNet: a resampling image encoder


def build_tiny_pp_formulanet(folder: Path, seed: int = 2) -> Path:
    """A tiny random PP-FormulaNet: 128 x 128 images in 16-pixel patches (an 8 x 8 grid, windows of 3 and
    one global layer), resampled by its neck and two stride-2 convolutions to 4 source tokens; an mBART
    decoder. Its image processor (PPFormulaNetImageProcessor) needs torchvision, which this environment
    lacks, so no processor is saved and the pixels are given as a tensor."""
    import torch
    from transformers import PPFormulaNetConfig, PPFormulaNetForConditionalGeneration

    fast = save_tiny_tokenizer(folder)
    config = PPFormulaNetConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=128,
                           patch_size=16, window_size=3, global_attn_indexes=[1], mlp_dim=64, post_conv_in_channels=16,
                           post_conv_mid_channels=16, post_conv_out_channels=32, decoder_hidden_size=32,
                           initializer_range=0.02),
        text_config=dict(vocab_size=len(fast), d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                         max_position_embeddings=64, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, decoder_start_token_id=fast.eos_token_id,
                         forced_eos_token_id=None, init_std=0.3),
    )
    config.architectures = ["PPFormulaNetForConditionalGeneration"]
    torch.manual_seed(seed)
    PPFormulaNetForConditionalGeneration(config).to(torch.float32).save_pretrained(folder)
    return folder


def test_pp_formulanets_resampled_source_and_neck_output_are_what_generate_keeps(tmp_path):
    """After a real generate from two images, every decoder layer's cross-attention K/V holds the 4
    resampled tokens (not the 64 patches), and the encoder output generate keeps (pooler_output, the
    source, and the neck's last_hidden_state) is the graph's encoder-output bytes."""
    import json

    import torch
    from transformers import AutoModelForImageTextToText

    from planc.model import build_model_graph
    from planc.model.cache import held_bytes, layer_tensors
    from planc.workload import Workload

    folder = build_tiny_pp_formulanet(tmp_path / "ppf")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 128, 128)
    steps = 5
    out = model.generate(pixel_values=pixels, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         return_dict_in_generate=True)
    encoded = model.get_encoder()(pixel_values=pixels)

    graph = build_model_graph(json.loads((folder / "config.json").read_text()), "float32")
    assert (graph.encoder.image_tokens, graph.encoder.grid_tokens) == (4, 64) == (encoded.pooler_output.shape[1], 64)
    workload = Workload(2, steps, source_tokens=graph.encoder.source_tokens(None, steps))
    layers = [unit for unit in graph.units if unit.kind == "layer"]
    assert [held_bytes(t) for t in layer_tensors(out.past_key_values)] == [u.cache.bytes(workload) for u in layers]
    (output_unit,) = [unit for unit in graph.units if unit.cache is not None and unit.kind == "pre"]
    assert output_unit.cache.bytes(workload) == held_bytes([encoded.pooler_output, encoded.last_hidden_state])


def test_a_pp_formulanet_plan_loads_and_generates_from_pixels_the_tokens_of_plain_transformers(tmp_path):
    """Its processor needs torchvision (absent here), so `planc run` cannot read an image for it; the
    closest real path: the plan's loading (load_model: its class, dtype and device map) and planc's
    generate over the pixels the image processor would give, against plain generate."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from planc.plan import load_lock
    from planc.run.generate import generate, generation_config, input_device
    from planc.run.load import load_model

    folder = build_tiny_pp_formulanet(tmp_path / "ppf")
    lock = compile_to(tmp_path, CPU_SPEC.format(model=folder, workload=""))
    plan = load_lock(lock)
    assert plan.workload.source_tokens == 4  # the resampled tokens, which the image decides
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 128, 128)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(plan, folder, tmp_path)

    completions = generate(model, tokenizer, {"pixel_values": pixels}, ["", ""],
                           generation_config(model, tokenizer, plan, MAX_NEW_TOKENS), input_device(plan), False)

    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    output = reference.generate(pixel_values=pixels, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    eos = reference.generation_config.eos_token_id
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in output[:, 1:].tolist()]
    tokens = [c.token_ids for c in completions]
    assert tokens == expected and len(set(tokens[0])) > 1


# ------------------------------------------------------------------ Udop: a T5 that appends an image's patches


def build_tiny_udop(folder: Path, seed: int = 0, processor: bool = False) -> Path:
    """A tiny random Udop: 32 x 32 images in 8-pixel patches (16 patches appended after the prompt's
    tokens), T5 blocks with its 1D, horizontal and vertical relative biases; conftest's tokenizer, or
    with `processor` a UdopProcessor (a Unigram UdopTokenizer over UDOP_WORDS, LayoutLMv3's image
    processor without OCR) as a Udop checkpoint ships one."""
    import torch
    from transformers import UdopConfig, UdopForConditionalGeneration

    fast = save_tiny_udop_processor(folder) if processor else save_tiny_tokenizer(folder)
    config = UdopConfig(vocab_size=len(fast), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                        num_heads=4, image_size=32, patch_size=8, max_2d_position_embeddings=64,
                        pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                        decoder_start_token_id=fast.pad_token_id)
    config.architectures = ["UdopForConditionalGeneration"]
    torch.manual_seed(seed)
    UdopForConditionalGeneration(config).to(torch.float32).save_pretrained(folder)
    return folder


UDOP_WORDS = "invoice total due date paid amount what is the question answer".split()


def save_tiny_udop_processor(folder: Path):
    """Save a UdopProcessor into `folder`; returns its tokenizer."""
    from transformers import LayoutLMv3ImageProcessor, UdopProcessor, UdopTokenizer

    pieces = sorted({character for word in UDOP_WORDS for character in word})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(piece, -3.0) for piece in pieces] + [("\u2581" + word, -1.0) for word in UDOP_WORDS]
    tokenizer = UdopTokenizer(vocab=vocab)
    images = LayoutLMv3ImageProcessor(apply_ocr=False, size={"height": 32, "width": 32})
    UdopProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return tokenizer


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_udops_source_is_the_prompt_and_the_images_patches_and_its_caches_are_what_generate_keeps(tmp_path, with_image):
    """After a real generate from a prompt with boxes (and an image), every decoder layer's cross-attention
    K/V holds the prompt's tokens plus all 16 patches, and the encoder output generate keeps
    (last_hidden_state and Udop's extended attention_mask) is the graph's encoder-output bytes."""
    import json

    import torch
    from transformers import AutoTokenizer, UdopForConditionalGeneration

    from planc.model import build_model_graph
    from planc.model.cache import held_bytes, layer_tensors
    from planc.workload import Workload

    folder = build_tiny_udop(tmp_path / "udop")
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    model = UdopForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    batch = dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))
    torch.manual_seed(1)
    batch["bbox"] = torch.rand(*batch["input_ids"].shape, 4)  # layout biases average coordinates: float boxes
    if with_image:
        batch["pixel_values"] = torch.randn(len(PROMPTS), 3, 32, 32)
    steps = 5
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         return_dict_in_generate=True)
    encoded = model.get_encoder()(**batch)

    graph = build_model_graph(json.loads((folder / "config.json").read_text()), "float32")
    assert graph.encoder.image_patches == 16 and graph.encoder.layout_biases == 2
    source = batch["input_ids"].shape[1] + (16 if with_image else 0)
    assert encoded.last_hidden_state.shape[1] == source
    workload = Workload(len(PROMPTS), steps, images_per_sequence=int(with_image), source_tokens=source)
    layers = [unit for unit in graph.units if unit.kind == "layer"]
    assert [held_bytes(t) for t in layer_tensors(out.past_key_values)] == [u.cache.bytes(workload) for u in layers]
    (output_unit,) = [unit for unit in graph.units if unit.cache is not None and unit.kind == "pre"]
    assert output_unit.cache.bytes(workload) == held_bytes([encoded.last_hidden_state, encoded.attention_mask])


def test_a_udop_source_without_room_for_its_patches_and_a_run_without_boxes_are_refused(tmp_path, image_file):
    from planc.run import run_plan

    folder = build_tiny_udop(tmp_path / "udop")
    with pytest.raises(SpecError, match="workload.source_tokens 16: the encoder's source holds the prompt's tokens and "
                                        "the image's 16 patches"):
        compile_to(tmp_path, CPU_SPEC.format(model=folder, workload=", source_tokens: 16, images_per_sequence: 1"))
    assert not (tmp_path / "plan.lock").exists()
    with pytest.raises(SpecError, match="patch embedding takes only its config's 32 x 32 images"):
        compile_to(tmp_path, CPU_SPEC.format(model=folder, workload=", source_tokens: 24, images_per_sequence: 1, "
                                                                    "image_size: 64"))
    lock = compile_to(tmp_path, CPU_SPEC.format(model=folder, workload=", source_tokens: 24, images_per_sequence: 1"))

    # A prompt without its document's words and boxes: boxes made up for it would change what Udop reads.
    with pytest.raises(UsageError, match="prompt 1 has no words and boxes, and Udop reads a bounding box for every "
                                         "word beside the question \\(bbox"):
        run_plan(lock, prompts=PROMPTS, images=[image_file], max_new_tokens=2, quiet=True)


# A document's OCR words and their boxes (0-1000), and the questions asked about it, as JSONL prompts.
UDOP_PROMPTS = [
    {"prompt": "what is the total", "words": ["invoice", "total", "paid"],
     "boxes": [[40, 30, 300, 80], [40, 500, 260, 560], [600, 500, 900, 560]]},
    {"prompt": "question", "words": ["due", "date"], "boxes": [[10, 10, 200, 50], [220, 10, 480, 50]]},
]


def plain_udop_tokens(folder: Path, image: Path | None, max_new_tokens: int) -> list[list[int]]:
    """Greedy generate in float32 from what UdopProcessor makes of UDOP_PROMPTS, as transformers
    documents it (text: the question, text_pair: the words, boxes); without an image, its tokenizer's."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, UdopForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    inputs = dict(text=[p["prompt"] for p in UDOP_PROMPTS], text_pair=[p["words"] for p in UDOP_PROMPTS],
                  boxes=[p["boxes"] for p in UDOP_PROMPTS], return_tensors="pt", padding=True)
    if image is None:
        batch = processor.tokenizer(**inputs)
        # Udop's encoder casts the boxes to float64 only where it appends an image's patches; its layout biases
        # cannot average int64 boxes (torch's mean() refuses them), so text alone needs the same cast.
        batch["bbox"] = batch["bbox"].to(torch.float64)
    else:
        with Image.open(image) as picture:
            batch = processor(images=[picture.convert("RGB")] * len(UDOP_PROMPTS), **inputs)
    reference = UdopForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    output = reference.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    eos = reference.generation_config.eos_token_id
    rows = output[:, 1:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


@pytest.fixture(scope="module")
def udop_lock(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("udop-run")
    # Seed 15: greedy tokens other than the pad token from both prompts, with and without the image (most
    # seeds of so tiny a model repeat token 0).
    folder = build_tiny_udop(root / "udop", seed=15, processor=True)
    return compile_to(root, CPU_SPEC.format(model=folder, workload=", source_tokens: 40, images_per_sequence: 1"))


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_planc_run_gives_udop_the_words_and_boxes_and_the_tokens_of_plain_transformers(
    udop_lock, image_file, with_image
):
    import json

    from test_run import planc_cli

    prompts = udop_lock.parent / "document.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in UDOP_PROMPTS))
    image = ["--image", str(image_file)] if with_image else []
    result = planc_cli("-q", "run", udop_lock.name, "--prompts", prompts.name, "--max-new-tokens", "6", "--json",
                       *image, cwd=udop_lock.parent)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = plain_udop_tokens(udop_lock.parent / "udop", image_file if with_image else None, 6)
    assert [r["token_ids"] for r in report["results"]] == expected
    assert [r["prompt"] for r in report["results"]] == [p["prompt"] for p in UDOP_PROMPTS]


@pytest.mark.parametrize("entry, message", [
    ({"words": ["total"]}, "1 words and no boxes: \"boxes\" needs one [x0, y0, x1, y1] per word"),
    ({"words": ["total", "due"], "boxes": [[0, 0, 10, 10]]}, "2 words and 1 boxes"),
    ({"words": ["total"], "boxes": [[0, 0, 10]]}, "box 1 ([0, 0, 10]) of word \"total\" is not 4 integers"),
    ({"words": ["total"], "boxes": [[0, 0, 10, 1001]]}, "is not 4 integers x0, y0, x1, y1 in 0..1000"),
    ({"words": ["total"], "boxes": [[0, 0, 10.5, 20]]}, "is not 4 integers"),
    ({"boxes": [[0, 0, 10, 20]]}, '"words" must be a non-empty list of strings'),
])
def test_malformed_word_boxes_are_refused_in_one_line(udop_lock, entry, message):
    import json

    from test_run import planc_cli

    prompts = udop_lock.parent / "bad.jsonl"
    prompts.write_text(json.dumps({"prompt": "what is the total", **entry}) + "\n")
    result = planc_cli("run", udop_lock.name, "--prompts", prompts.name, cwd=udop_lock.parent)

    assert result.returncode == 2
    assert result.stderr.startswith("error: bad.jsonl:1: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_udop_prompt_without_boxes_is_refused_before_loading_and_boxes_elsewhere_in_one_line(
    udop_lock, seq2seq_models, tmp_path
):
    import json

    from test_run import planc_cli

    result = planc_cli("run", udop_lock.name, "-p", "what is the total", cwd=udop_lock.parent)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "prompt 1 has no words and boxes, and Udop reads a bounding box for every word" in result.stderr

    # Too long a source is refused before the weights are read, as for any encoder's prompt.
    long = udop_lock.parent / "long.jsonl"
    words = UDOP_WORDS * 4
    long.write_text(json.dumps({"prompt": "what is the total", "words": words, "boxes": [[0, 0, 10, 10]] * len(words)}))
    result = planc_cli("run", udop_lock.name, "--prompts", long.name, "--max-new-tokens", "2", cwd=udop_lock.parent)
    assert result.returncode == 2 and "> the plan's source_tokens 40" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    compile_to(tmp_path, CPU_SPEC.format(model=seq2seq_models["t5"], workload=""))
    boxed = tmp_path / "boxed.jsonl"
    boxed.write_text(json.dumps(UDOP_PROMPTS[0]) + "\n")
    result = planc_cli("run", "plan.lock", "--prompts", boxed.name, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "the prompts give words and boxes, and" in result.stderr and "reads text only" in result.stderr


def test_session_generate_takes_word_boxes_for_udop_and_refuses_them_elsewhere(udop_lock, seq2seq_models, tmp_path):
    """The Python API: Session.generate's layouts give Udop the tokens planc run gives; a model without
    layout biases refuses them, and a malformed box is refused before the processor sees it."""
    from planc.plan import load_lock
    from planc.run import open_session
    from planc.run.generate import WordBoxes

    layouts = [WordBoxes(p["words"], p["boxes"]) for p in UDOP_PROMPTS]
    with open_session(load_lock(udop_lock), udop_lock.parent) as session:
        completions = session.generate([p["prompt"] for p in UDOP_PROMPTS], 6, layouts=layouts)
        assert [c.token_ids for c in completions] == plain_udop_tokens(udop_lock.parent / "udop", None, 6)
        with pytest.raises(SpecError, match="prompt 2: box 1 \\(\\[0, 0, 1, 2000\\]\\) of word \"due\""):
            session.generate(["a", "b"], 2, layouts=[layouts[0], WordBoxes(["due"], [[0, 0, 1, 2000]])])

    lock = compile_to(tmp_path, CPU_SPEC.format(model=seq2seq_models["t5"], workload=""))
    with open_session(load_lock(lock), tmp_path) as session:
        with pytest.raises(UsageError, match="T5ForConditionalGeneration reads no word boxes"):
            session.generate(["what is the total"], 2, layouts=layouts[:1])


# ------------------------------------------------------------------ T5Gemma2: a vision tower inside the encoder


def build_tiny_t5gemma2(folder: Path, seed: int = 0) -> Path:
    """A tiny random T5Gemma2: a SigLIP tower of 32 x 32 images in 8-pixel patches (a 4 x 4 grid) that
    its projector pools to 2 x 2, so one image is 4 tokens of the encoder's source (mm_tokens_per_image);
    sliding (window 4) and full layers with one KV head for two query heads, in the encoder and the
    decoder. Its Gemma3Processor is built offline: a BPE tokenizer with the start-of-image, image and
    end-of-image tokens, and a Gemma3 image processor of 32 x 32."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast, T5Gemma2Config,
        T5Gemma2ForConditionalGeneration,
    )

    from conftest import SENTENCES

    folder.mkdir(parents=True, exist_ok=True)
    tokens = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<pad>", *tokens.values()]
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens=tokens)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=fast,
                    image_seq_length=4).save_pretrained(folder)
    ids = {name: fast.convert_tokens_to_ids(token) for name, token in tokens.items()}
    text = dict(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = T5Gemma2Config(
        encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=ids["boi_token"],
                     eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"]),
        decoder=text, image_token_index=ids["image_token"], eoi_token_index=ids["eoi_token"],
    )
    config.architectures = ["T5Gemma2ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = T5Gemma2ForConditionalGeneration(config).to(torch.float32)
    model.generation_config.decoder_start_token_id = fast.bos_token_id
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5gemma2_model(tmp_path_factory):
    return build_tiny_t5gemma2(tmp_path_factory.mktemp("t5gemma2"))


def t5gemma2_batch(model: Path, prompts: list[str], image: Path | None):
    """The processor's right-padded batch, with a start-of-image token and the image before each prompt."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    processor.tokenizer.padding_side = "right"
    if image is None:
        return processor.tokenizer(prompts, return_tensors="pt", padding=True)
    with Image.open(image) as picture:
        return processor(text=[processor.boi_token + p for p in prompts], images=[[picture.convert("RGB")]] * len(prompts),
                         return_tensors="pt", padding=True)


def test_t5gemma2s_source_holds_its_pooled_image_tokens_and_its_caches_are_what_generate_keeps(
    t5gemma2_model, image_file
):
    """The tower inside the encoder and its projector are vision units ahead of the encoder's text
    blocks; one image is the 4 pooled tokens the processor puts in the source; after a real generate
    from text and image, every decoder layer's self (sliding and full) and cross K/V and the encoder
    output are the graph's bytes."""
    import json

    import torch
    from transformers import T5Gemma2ForConditionalGeneration

    from planc.model import build_model_graph
    from planc.model.cache import held_bytes, layer_tensors
    from planc.workload import Workload

    batch = t5gemma2_batch(t5gemma2_model, PROMPTS, image_file)
    model = T5Gemma2ForConditionalGeneration.from_pretrained(t5gemma2_model, dtype=torch.float32)
    steps = 6  # past the sliding window of 4
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         return_dict_in_generate=True, output_hidden_states=True)
    source = batch["input_ids"].shape[1]

    graph = build_model_graph(json.loads((t5gemma2_model / "config.json").read_text()), "float32")
    workload = Workload(len(PROMPTS), steps, images_per_sequence=1, source_tokens=source)
    image_tokens = int((batch["input_ids"][0] == model.config.encoder.image_token_index).sum())
    assert graph.vision.image_tokens(workload) == 4 == image_tokens
    assert graph.vision.towers == ("model.encoder.vision_tower",)
    layers = [unit for unit in graph.units if unit.kind == "layer"]
    assert [held_bytes(t) for t in layer_tensors(out.past_key_values)] == [u.cache.bytes(workload) for u in layers]
    assert all(unit.cache.merged_cross for unit in layers)
    (output_unit,) = [unit for unit in graph.units if unit.cache is not None and unit.kind == "pre"]
    assert output_unit.encoder and output_unit.cache.bytes(workload) == held_bytes([out.encoder_hidden_states[-1]])
    assert (graph.encoder.shapes.hidden_size, graph.encoder.shapes.num_layers, graph.encoder.sliding_mask) == (32, 2, True)
    pre = [unit for unit in graph.units if unit.kind == "pre"]
    vision = [unit.name for unit in pre if unit.vision]
    assert vision and all(name.startswith(("model.encoder.vision_tower", "model.encoder.multi_modal_projector"))
                          for name in vision)
    assert all(unit.encoder for unit in pre if unit.name.startswith("model.encoder.text_model"))
    # In the order they run: the tower and projector, then the encoder's text blocks.
    first_text = next(i for i, unit in enumerate(pre) if unit.encoder)
    assert all(unit.vision for unit in pre[first_text - len(vision) : first_text])


def test_a_t5gemma2_plan_generates_from_text_and_image_the_tokens_of_plain_transformers(
    t5gemma2_model, image_file, tmp_path
):
    import torch
    from transformers import T5Gemma2ForConditionalGeneration

    from planc.plan import load_lock
    from planc.run import run_plan

    reference = T5Gemma2ForConditionalGeneration.from_pretrained(t5gemma2_model, dtype=torch.float32)
    eos = reference.generation_config.eos_token_id

    def plain(image):
        output = reference.generate(**t5gemma2_batch(t5gemma2_model, PROMPTS, image), max_new_tokens=MAX_NEW_TOKENS,
                                    do_sample=False)
        return [row[: row.index(eos) + 1] if eos in row else row for row in output[:, 1:].tolist()]

    workload = ", source_tokens: 24, images_per_sequence: 1"
    lock = compile_to(tmp_path, CPU_SPEC.format(model=t5gemma2_model, workload=workload))
    assert load_lock(lock).workload.source_tokens == 24
    outcome = run_plan(lock, prompts=PROMPTS, images=[image_file], max_new_tokens=MAX_NEW_TOKENS, quiet=True)
    assert outcome.exit_code == 0
    tokens = [c.token_ids for c in outcome.completions]
    assert tokens == plain(image_file) and tokens[0] != tokens[1]

    (tmp_path / "text").mkdir()
    text_only = compile_to(tmp_path / "text", CPU_SPEC.format(model=t5gemma2_model, workload=", source_tokens: 12"))
    outcome = run_plan(text_only, prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS, quiet=True)
    assert outcome.exit_code == 0
    assert [c.token_ids for c in outcome.completions] == plain(None) != tokens
    with pytest.raises(UsageError, match="the plan sized T5Gemma2ForConditionalGeneration's encoder source without "
                                         "images"):
        run_plan(text_only, prompts=PROMPTS, images=[image_file], max_new_tokens=2, quiet=True)


def test_t5gemma2_images_its_projector_cannot_take_are_bad_input(t5gemma2_model, tmp_path):
    import json

    from transformers import AutoConfig, PretrainedConfig

    with pytest.raises(SpecError, match="workload.source_tokens 4: the encoder's source holds the prompt's text and "
                                        "its images' 4 tokens"):
        compile_to(tmp_path, CPU_SPEC.format(model=t5gemma2_model, workload=", source_tokens: 4, images_per_sequence: 1"))
    with pytest.raises(SpecError, match="pools the patch grid of its config's 32 x 32 images only"):
        compile_to(tmp_path, CPU_SPEC.format(model=t5gemma2_model, workload=", source_tokens: 24, images_per_sequence: 1, "
                                                                            "image_size: 64"))
    # transformers' default config: a 14 x 14 patch grid (224 / 16) pooled to 16 x 16 tokens, a pool kernel of 0.
    config = AutoConfig.for_model("t5gemma2").to_dict()
    config["architectures"] = ["T5Gemma2ForConditionalGeneration"]
    config.pop("transformers_version", None)
    (tmp_path / "config.json").write_text(json.dumps(PretrainedConfig._encode_special_floats(config)))
    spec = ("planc: 1\nmodel: {config: config.json}\nhardware: {gpus: [{type: a100-sxm4-80gb, count: 1}], cpu_memory: 64GiB}\n"
            "workload: {batch_size: 1, max_seq_len: 64, source_tokens: 512, images_per_sequence: 1}\n")
    with pytest.raises(SpecError, match="cannot take an image: its projector cannot pool this config's 224 x 224 images"):
        compile_to(tmp_path, spec)
    assert not (tmp_path / "plan.lock").exists()
    compile_to(tmp_path, spec.replace(", images_per_sequence: 1", ""))  # text only, it plans


@pytest.mark.parametrize(("batch", "source", "seq"), [(2, 1024, 256), (4, 4096, 4096)])
def test_a_simulated_t5gemma2_plan_with_an_image_agrees_with_the_ledger(tmp_path, batch, source, seq):
    """transformers' T5Gemma2 (Gemma 2 2B-sized encoder and decoder, 6 layers each) with a SigLIP tower of
    896 x 896 images in 14-pixel patches (4096 patches pooled to 256 tokens) on two GPUs: the tower and
    its projector, the encoder's sliding masks, and the decoder's merged attention over context and source."""
    import json

    from transformers import AutoConfig, PretrainedConfig

    from planc.compile import compile_spec
    from planc.plan import write_if_changed
    from test_simulate import LEDGER_TOLERANCE

    config = AutoConfig.for_model("t5gemma2").to_dict()
    config["architectures"] = ["T5Gemma2ForConditionalGeneration"]
    config["encoder"]["vision_config"].update(image_size=896, patch_size=14)
    for part in (config["encoder"]["text_config"], config["decoder"]):
        part.update(num_hidden_layers=6, layer_types=part["layer_types"][:6])
    config.pop("transformers_version", None)
    (tmp_path / "config.json").write_text(json.dumps(PretrainedConfig._encode_special_floats(config)))
    (tmp_path / "spec.yaml").write_text(
        "planc: 1\nmodel: {config: config.json}\nhardware: {gpus: [{type: a100-sxm4-80gb, count: 2}], cpu_memory: 64GiB}\n"
        f"workload: {{batch_size: {batch}, max_seq_len: {seq}, source_tokens: {source}, images_per_sequence: 1}}\n"
        "policy: {offload: none}\n"
    )
    plan, text = compile_spec(tmp_path / "spec.yaml", tmp_path / "plan.lock")
    write_if_changed(tmp_path / "plan.lock", text)
    assert {device for name, device in plan.device_map.items() if name.startswith("model.decoder.layers.")} == {1}

    report, errors = simulate_lock(tmp_path)

    assert all(abs(error) <= LEDGER_TOLERANCE for error in errors.values()), errors
    assert any(f"vision tower ran over {batch} images of 896 x 896" in note for note in report.notes)

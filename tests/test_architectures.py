"""The families issue 11 added, end to end on tiny real models: image-text-to-text (LLaVA), per-layer
configs (Gemma 4), resolution by `architectures` (Kimi-K2 on DeepSeek-V3), ties whose target does
not run first (StarCoder's gpt_bigcode). Each is compiled by planc, run by `planc run` on the CPU
and compared with plain transformers; GPU plans are executed by `planc simulate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import SENTENCES
from planc.errors import InfeasibleError, ModelError, SpecError, UsageError
from planc.plan import load_lock
from planc.run import run_plan
from test_run import compile_to

MAX_NEW_TOKENS = 6
CPU_SPEC = """\
planc: 1
model: {{path: {model}}}
hardware: {{gpus: [], cpu_memory: 8GiB}}
workload: {{batch_size: 2, max_seq_len: 96{workload}}}
policy: {{offload: cpu}}
"""
TWO_GPU_SPEC = """\
planc: 1
model: {{config: {config}}}
hardware:
  gpus: [{{name: card, memory: {memory}, compute_capability: "8.0", bandwidth: 1000GB/s, count: 2}}]
  cpu_memory: 8GiB
workload: {{batch_size: 2, max_seq_len: 64{workload}}}
"""


ONE_GPU_LONG_SPEC = """\
planc: 1
model: {{config: config.json}}
hardware:
  gpus: [{{name: card, memory: {memory}, compute_capability: "8.0", bandwidth: 1000GB/s}}]
  cpu_memory: 8GiB
workload: {{batch_size: 4, max_seq_len: 16384{workload}}}
"""


def image(folder: Path, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    path = folder / f"image{seed}.png"
    Image.fromarray(pixels).save(path)
    return path


def plain_generate(model_class, folder: Path, inputs: dict, **load) -> list[list[int]]:
    """Greedy generate in float32 as users write it, new tokens up to the first end-of-sequence."""
    import torch

    model = model_class.from_pretrained(folder, dtype=torch.float32, **load)
    output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    rows = output[:, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


# ------------------------------------------------------------------ image-text-to-text


def test_vlm_plan_places_the_vision_tower_and_plans_its_peak_per_image(tiny_vlm, tmp_path):
    for images in (0, 4):
        folder = tmp_path / f"images{images}"
        folder.mkdir()
        shutil.copy(tiny_vlm / "config.json", folder / "config.json")
        workload = f", images_per_sequence: {images}, image_size: 256" if images else ""
        plan = load_lock(compile_to(folder, TWO_GPU_SPEC.format(config="config.json", memory="1GiB", workload=workload)))
        assert plan.model.architecture == "LlavaForConditionalGeneration"
        assert any(key.startswith("model.vision_tower.encoder.layers.") for key in plan.device_map)
        assert "model.language_model.layers.0" in plan.device_map
        assert any(d.id == "model.vision" for d in plan.decisions)
        if images:
            assert plan.format_version == "1.1" and plan.workload.images_per_sequence == 4
            with_images = plan.memory[0].activations
        else:
            assert plan.format_version == "1.0"  # no 1.1 field used: readable by older planc
            text_only = plan.memory[0].activations
    # 2 x 4 images of (256 / 8)^2 patches through a CLIP block outweigh the text's 2 x 64 tokens.
    assert with_images > text_only


def test_prompts_with_images_prefill_whole(tiny_vlm, tmp_path):
    # transformers' generate raises on a chunked first step that carries pixel values
    # ("Chunked prefill cannot split the raw multimodal inputs"): a text plan that needs a chunk
    # to fit is planned chunked; with images it is refused with what fits, and a spec's chunk is
    # bad input.
    shutil.copy(tiny_vlm / "config.json", tmp_path / "config.json")
    spec = ONE_GPU_LONG_SPEC.format(memory="1GiB", workload="")
    assert load_lock(compile_to(tmp_path, spec)).generation.prefill_chunk_size == 4096
    with pytest.raises(InfeasibleError, match="would fit: max_seq_len"):
        compile_to(tmp_path, ONE_GPU_LONG_SPEC.format(memory="1GiB", workload=", images_per_sequence: 1, image_size: 64"))
    chunked = ", images_per_sequence: 1, image_size: 64, prefill_chunk_size: 4096"
    with pytest.raises(SpecError, match="cannot split a prompt's images into prefill chunks"):
        compile_to(tmp_path, ONE_GPU_LONG_SPEC.format(memory="1GiB", workload=chunked))


def test_a_model_that_generates_only_from_an_image_needs_images(tmp_path):
    """BLIP-2's generate requires pixel_values: a text-only plan would fail at its first prompt."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from conftest import save_tiny_tokenizer
    from planc.serve import serve_plan

    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            encoder_hidden_size=32, vocab_size=100),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, word_embed_proj_dim=32),
        num_query_tokens=4, architectures=["Blip2ForConditionalGeneration"],
    )
    model = tmp_path / "model"
    Blip2ForConditionalGeneration(config).save_pretrained(model)
    save_tiny_tokenizer(model)
    with pytest.raises(SpecError, match="generates only from an image .its generate requires pixel_values.: set"):
        compile_to(tmp_path, CPU_SPEC.format(model=model, workload=""))

    lock = compile_to(tmp_path, CPU_SPEC.format(model=model, workload=", images_per_sequence: 1"))
    assert load_lock(lock).workload.images_per_sequence == 1
    with pytest.raises(UsageError, match="generates only from an image .* give each prompt an image"):
        run_plan(lock, prompts=["The quick brown fox"], max_new_tokens=2, quiet=True)
    with pytest.raises(UsageError, match="planc serve takes text prompts, and Blip2ForConditionalGeneration generates"):
        serve_plan(lock, port=0, quiet=True)


def test_images_need_a_vision_tower(tmp_path, tiny_model):
    with pytest.raises(SpecError, match="has no vision tower"):
        compile_to(tmp_path, CPU_SPEC.format(model=tiny_model, workload=", images_per_sequence: 1"))


def test_vlm_runs_text_and_image_prompts_with_the_tokens_of_plain_transformers(tiny_vlm, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from PIL import Image

    lock = compile_to(tmp_path, CPU_SPEC.format(model=tiny_vlm, workload=", images_per_sequence: 1"))
    picture = image(tmp_path)
    prompts = ["The quick brown fox", "A device map"]

    with_image = run_plan(lock, prompts=prompts, max_new_tokens=MAX_NEW_TOKENS, images=[picture], quiet=True)
    text_only = run_plan(lock, prompts=prompts, max_new_tokens=MAX_NEW_TOKENS, quiet=True)

    processor = AutoProcessor.from_pretrained(tiny_vlm, padding_side="left")
    rgb = Image.open(picture).convert("RGB")
    batch = processor(text=["<image>" + p for p in prompts], images=[[rgb], [rgb]], return_tensors="pt", padding=True)
    assert [c.token_ids for c in with_image.completions] == plain_generate(LlavaForConditionalGeneration, tiny_vlm, dict(batch))
    assert with_image.completions[0].prompt_tokens == 16 + len(processor.tokenizer(prompts[0])["input_ids"])
    text = processor.tokenizer(prompts, return_tensors="pt", padding=True)
    assert [c.token_ids for c in text_only.completions] == plain_generate(LlavaForConditionalGeneration, tiny_vlm, dict(text))
    assert [c.token_ids for c in text_only.completions] != [c.token_ids for c in with_image.completions]


def test_more_images_than_planned_is_refused_before_loading(tiny_vlm, tmp_path):
    lock = compile_to(tmp_path, CPU_SPEC.format(model=tiny_vlm, workload=", images_per_sequence: 1"))
    pictures = [image(tmp_path, 0), image(tmp_path, 1)]
    with pytest.raises(UsageError, match="exceed the plan's images_per_sequence 1"):
        run_plan(lock, prompts=["hello"], images=pictures, quiet=True)


@pytest.mark.parametrize("images", [0, 64])
def test_vlm_gpu_plan_simulates_within_its_ledger(tiny_vlm, tmp_path, images):
    from planc.simulate import simulate_plan

    shutil.copy(tiny_vlm / "config.json", tmp_path / "config.json")
    workload = f", images_per_sequence: {images}" if images else ""
    lock = compile_to(tmp_path, TWO_GPU_SPEC.format(config="config.json", memory="1GiB", workload=workload))
    report = simulate_plan(load_lock(lock), tmp_path, decode_steps=1)
    assert report.ok, report.error
    if images:
        # 2 x 64 images of 16 patches: the tower's peak is most of GPU 0's, and the ledger holds it.
        assert any("vision tower ran over 128 images" in note for note in report.notes), report.notes
    for device in report.devices:
        assert device.planned_tensors >= device.simulated_peak, device


# ------------------------------------------------------------------ per-layer configs


def gemma4_text_config() -> dict:
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "gemma4_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, vocab_size=128, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=0,
        hidden_size_per_layer_input=0, max_position_embeddings=256, pad_token_id=None, bos_token_id=None,
        eos_token_id=None,
    )
    data = config.to_dict()
    data["architectures"] = ["Gemma4ForCausalLM"]
    return data


def test_gemma4_head_dim_per_layer_matches_the_real_cache():
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from planc.memory import Workload, unit_kv_bytes
    from planc.model import build_model_graph, make_config

    config = gemma4_text_config()
    graph = build_model_graph(config, "float32")
    layers = [unit for unit in graph.units if unit.kind == "layer"]
    assert [graph.shapes_of(u).head_dim for u in layers] == [16, 32, 16, 32]
    model = AutoModelForCausalLM.from_config(make_config(config), dtype=torch.float32).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 24)), past_key_values=cache, use_cache=True)
    for unit, layer in zip(layers, cache.layers):
        held = sum(t.untyped_storage().nbytes() for t in (layer.keys, layer.values))
        assert held == unit_kv_bytes(unit, Workload(2, 24)), unit.name


def test_gemma4_gpu_plan_simulates_within_its_ledger(tmp_path):
    from planc.simulate import simulate_plan

    (tmp_path / "config.json").write_text(json.dumps(gemma4_text_config()))
    lock = compile_to(tmp_path, TWO_GPU_SPEC.format(config="config.json", memory="1GiB", workload=""))
    report = simulate_plan(load_lock(lock), tmp_path, decode_steps=1)
    assert report.ok, report.error


# ------------------------------------------------------------------ resolution by architectures


@pytest.fixture(scope="module")
def tiny_kimi(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 saved with Kimi-K2's config.json shape: model_type kimi_k2 and an auto_map."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-kimi")  # for its tokenizer
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (folder / name).unlink(missing_ok=True)
    config = DeepseekV3Config(
        vocab_size=304, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(config).to(torch.float32).save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["model_type"] = "kimi_k2"
    data["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    return folder


def test_kimi_k2_is_planned_and_run_as_the_class_its_architectures_name(tiny_kimi, tmp_path):
    from transformers import AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM

    lock = compile_to(tmp_path, CPU_SPEC.format(model=tiny_kimi, workload=""))
    plan = load_lock(lock)
    assert (plan.model.model_type, plan.model.architecture) == ("kimi_k2", "DeepseekV3ForCausalLM")
    assert plan.model.config_class == "DeepseekV3Config" and plan.format_version == "1.1"
    decision = next(d for d in plan.decisions if d.id == "model.architecture")
    assert "auto_map" in decision.reason

    prompts = SENTENCES[:2]
    outcome = run_plan(lock, prompts=prompts, max_new_tokens=MAX_NEW_TOKENS, quiet=True)

    data = {k: v for k, v in json.loads((tiny_kimi / "config.json").read_text()).items() if k not in ("model_type", "auto_map")}
    tokenizer = AutoTokenizer.from_pretrained(tiny_kimi, padding_side="left")
    batch = dict(tokenizer(prompts, return_tensors="pt", padding=True))
    expected = plain_generate(DeepseekV3ForCausalLM, tiny_kimi, batch, config=DeepseekV3Config(**data))
    assert [c.token_ids for c in outcome.completions] == expected


def test_an_unknown_model_type_without_a_shipped_class_is_refused(tmp_path):
    config = {"model_type": "my_model", "architectures": ["MyModelForCausalLM"],
              "auto_map": {"AutoModelForCausalLM": "modeling_my.MyModelForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="names no class transformers ships .*auto_map.*does not run remote code"):
        compile_to(tmp_path, TWO_GPU_SPEC.format(config="config.json", memory="1GiB", workload=""))


# ------------------------------------------------------------------ ties whose target does not run first


def test_gpt_bigcode_lm_head_stays_with_its_tied_embedding_and_runs(tmp_path):
    import torch
    from transformers import AutoTokenizer, GPTBigCodeConfig, GPTBigCodeForCausalLM

    from conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "model")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (folder / name).unlink()
    config = GPTBigCodeConfig(vocab_size=304, n_positions=128, n_embd=64, n_layer=4, n_head=4, multi_query=True,
                              bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    GPTBigCodeForCausalLM(config).to(torch.float32).save_pretrained(folder)

    # Two GPUs that each hold about half of the 1.1 MB of bf16 weights: the layers split, and lm_head
    # stays on the GPU that holds transformer.wte (with wpe, which runs before it).
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    tiny_cards = TWO_GPU_SPEC.format(config="config.json", memory=900_000, workload="")
    tiny_cards += "policy: {headroom: 0, reserve: {cuda_context: 0, cublas_workspace: 0, allocator_slack: 0}}\n"
    gpu_plan = load_lock(compile_to(tmp_path, tiny_cards))
    placed = gpu_plan.device_map
    assert placed["lm_head"] == placed["transformer.wte"] == placed["transformer.wpe"] == 0
    assert len(set(placed.values())) == 2

    (tmp_path / "cpu").mkdir()
    lock = compile_to(tmp_path / "cpu", CPU_SPEC.format(model=folder, workload=""))
    prompts = SENTENCES[:2]
    outcome = run_plan(lock, prompts=prompts, max_new_tokens=MAX_NEW_TOKENS, quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    batch = dict(tokenizer(prompts, return_tensors="pt", padding=True))
    assert [c.token_ids for c in outcome.completions] == plain_generate(GPTBigCodeForCausalLM, folder, batch)


# ------------------------------------------------------------------ execution order


def test_a_norm_that_runs_before_the_layers_is_placed_before_them(tmp_path):
    """Bloom's word_embeddings_layernorm runs before the layers: placed after them, its output would
    meet the position terms of GPU 0 on the last GPU (a cross-device error on real cards)."""
    from transformers import BloomConfig

    from planc.simulate import simulate_plan

    config = BloomConfig(vocab_size=128, hidden_size=64, n_layer=4, n_head=4).to_dict()
    config["architectures"] = ["BloomForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = TWO_GPU_SPEC.format(config="config.json", memory=1_000_000, workload="")
    spec += "policy: {headroom: 0, reserve: {cuda_context: 0, cublas_workspace: 0, allocator_slack: 0}}\n"
    plan = load_lock(compile_to(tmp_path, spec))
    assert plan.device_map["transformer.word_embeddings_layernorm"] == plan.device_map["transformer.word_embeddings"]
    assert len(set(plan.device_map.values())) == 2
    report = simulate_plan(plan, tmp_path, decode_steps=1)
    assert report.ok, report.error


# ------------------------------------------------------------------ exports load the lock's class


@pytest.mark.parametrize("model", ["tiny_vlm", "tiny_kimi"])
def test_exported_scripts_load_the_class_and_config_the_lock_names(request, tmp_path, model):
    """A LLaVA plan is not an AutoModelForCausalLM, and Kimi-K2's kimi_k2 config does not load
    through AutoConfig: the scripts build what `planc run` builds and give its tokens."""
    from test_export import MAX_NEW_TOKENS as SCRIPT_TOKENS
    from test_export import export, run_script

    folder = request.getfixturevalue(model)
    (tmp_path / "plans").mkdir()
    lock = compile_to(tmp_path / "plans", CPU_SPEC.format(model=folder, workload=""))
    script = export(lock, "transformers", tmp_path / "exports" / "load.py")
    text = script.read_text()
    assert "AutoModelForCausalLM" not in text and f"MODEL_CLASS = {load_lock(lock).model.architecture}" in text

    prompts = SENTENCES[:2]
    expected = run_plan(lock, prompts=prompts, max_new_tokens=SCRIPT_TOKENS, quiet=True)
    assert run_script(script, prompts)["ids"] == [c.token_ids for c in expected.completions]


@pytest.mark.parametrize("model", ["tiny_vlm", "tiny_kimi"])
def test_accelerate_export_refuses_checkpoints_transformers_renames_while_loading(request, tmp_path, model):
    """LLaVA's checkpoint keys carry a language_model prefix and DeepSeek-V3's experts are stored one
    by one: load_checkpoint_and_dispatch, which loads by name, would fail on either."""
    from click.testing import CliRunner

    from planc.cli import main

    folder = request.getfixturevalue(model)
    lock = compile_to(tmp_path, CPU_SPEC.format(model=folder, workload=""))
    result = CliRunner().invoke(main, ["export", "--to", "accelerate", str(lock)])
    assert result.exit_code == 2
    assert "transformers converts" in result.output and "use --to transformers" in result.output


def test_text_embeddings_beside_the_decoder_are_not_the_projector():
    """GIT keeps its text embeddings at `git.embeddings`, beside its layers at `git.encoder`: they
    are text units (their learned position table bounds the context), not a vision projector."""
    from transformers import GitConfig

    from planc.model import build_model_graph

    config = GitConfig(architectures=["GitForCausalLM"]).to_dict()
    config.pop("transformers_version", None)
    graph = build_model_graph(config, "bfloat16")

    embeddings = [unit for unit in graph.units if unit.name.startswith("git.embeddings.")]
    assert embeddings and not any(unit.vision for unit in embeddings)
    assert all(unit.vision for unit in graph.units if unit.name.startswith("git.image_encoder."))
    assert graph.position_limit == config["max_position_embeddings"] == 1024


# ------------------------------------------------------------------ a long head (Phi-4-multimodal)


@pytest.fixture(scope="module")
def tiny_phi4mm(tmp_path_factory) -> Path:
    """A tiny Phi-4-multimodal: its vision and audio encoders are ~50 units before the text layers."""
    import torch
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    from conftest import save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("phi4mm")
    fast = save_tiny_tokenizer(folder)
    config = Phi4MultimodalConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14, crop_size=28, image_token_id=len(fast) - 2),
        audio_config=dict(hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=2,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=32,
                          audio_token_id=len(fast) - 1),
    )
    torch.manual_seed(0)
    Phi4MultimodalForCausalLM(config).to(torch.float32).save_pretrained(folder)
    return folder


def test_phi4_multimodal_keeps_its_encoders_on_the_main_gpu_and_simulates(tiny_phi4mm, tmp_path):
    from planc.simulate import simulate_plan

    shutil.copy(tiny_phi4mm / "config.json", tmp_path / "config.json")
    lock = compile_to(tmp_path, TWO_GPU_SPEC.format(config="config.json", memory="1GiB", workload=""))
    plan = load_lock(lock)
    main = plan.device_map["model.embed_tokens"]
    encoders = [key for key in plan.device_map if key.startswith("model.embed_tokens_extend.")]
    assert len(encoders) > 40 and {plan.device_map[key] for key in encoders} == {main}
    assert len(set(plan.device_map.values())) == 2
    report = simulate_plan(plan, tmp_path, decode_steps=1)
    assert report.ok, report.error


def test_phi4_multimodal_runs_with_the_tokens_of_plain_transformers(tiny_phi4mm, tmp_path):
    from test_run import plain_transformers_tokens

    lock = compile_to(tmp_path, CPU_SPEC.format(model=tiny_phi4mm, workload=""))
    result = run_plan(lock, prompts=SENTENCES[:2], max_new_tokens=MAX_NEW_TOKENS, quiet=True)
    assert [c.token_ids for c in result.completions] == plain_transformers_tokens(tiny_phi4mm, SENTENCES[:2], MAX_NEW_TOKENS)


# ------------------------------------------------------------------ generate that is no cached decode


@pytest.mark.parametrize("model_type, architecture, reason", [
    ("pi0", "PI0ForConditionalGeneration", "does not generate tokens: transformers gives the class no generate()"),
    ("xlm", "XLMWithLMHeadModel", r"is a masked LM: .* re-encodes the whole sequence .* \(config.causal is false\)"),
    ("blt", "BltForCausalLM", "cannot build its KV cache in transformers .*: generate\\(\\) starts with "
                              "DynamicCache\\(config=BltConfig\\), which raises AttributeError"),
])
def test_a_model_whose_generate_is_no_cached_decode_is_refused_saying_why(model_type, architecture, reason):
    """accelerate maps all three; none runs the KV-cache decode planc plans."""
    from transformers import AutoConfig

    from planc.model import build_model_graph

    config = AutoConfig.for_model(model_type)
    config.architectures = [architecture]
    with pytest.raises(ModelError, match=f"^{architecture} {reason}"):
        build_model_graph(config.to_dict(), "bfloat16")


@pytest.mark.parametrize("causal", [False, True])
def test_xlm_generate_re_encodes_the_whole_sequence_at_every_step(causal):
    """The refusal's premise, on transformers itself: no step reuses a cache, causal or not."""
    import torch
    from transformers import XLMConfig, XLMWithLMHeadModel

    config = XLMConfig(vocab_size=64, emb_dim=32, n_layers=2, n_heads=2, max_position_embeddings=32, causal=causal)
    model = XLMWithLMHeadModel(config).eval()
    lengths = []
    model.transformer.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(args[0].shape[1]), with_kwargs=True)
    model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False)
    assert lengths == [5, 6, 7]  # the prompt, the tokens so far and a mask token, each step


def test_blt_generate_fails_where_it_builds_its_cache():
    """The refusal's premise: when transformers gives BltConfig what DynamicCache reads, this fails
    and Blt's three stacks (local encoder, global transformer, local decoder) become worth planning."""
    import torch
    from transformers import BltConfig, BltForCausalLM, PI0ForConditionalGeneration

    small = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    config = BltConfig(
        encoder_config=dict(num_hidden_layers=1, hidden_size_global=64, **small),
        global_config=dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=64),
        decoder_config=dict(num_hidden_layers=1, hidden_size_global=64, **small),
        patcher_config=dict(num_hidden_layers=1, **small), encoder_hash_byte_group_vocab=64,
    )
    model = BltForCausalLM(config).eval()
    with pytest.raises(AttributeError, match="no attribute 'num_hidden_layers'"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert not PI0ForConditionalGeneration.can_generate() and not hasattr(PI0ForConditionalGeneration, "generate")


# ------------------------------------------------------------------ gated cross-attention (Idefics)


def build_tiny_idefics(folder: Path, resampler: bool = True, qk_norms: bool = False) -> Path:
    """Save a tiny Idefics (a cross-attention block before every other decoder layer) and its processor.

    Images are 32 x 32 pixels in 8-pixel patches: 17 tokens out of the tower, 4 latents out of the
    resampler. alpha_initializer "ones" opens the gates and initializer_range 0.2 makes the weights
    large enough that the images change the tokens.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil, IdeficsProcessor, PreTrainedTokenizerFast,
    )

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<fake_token_around_image>"]
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=special))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=32), tokenizer=fast, image_size=32)
    processor.save_pretrained(folder)
    config = IdeficsConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=512, cross_layer_interval=2, alpha_initializer="ones", use_resampler=resampler,
        qk_layer_norms=qk_norms, initializer_range=0.2,
        vision_config=dict(embed_dim=32, image_size=32, patch_size=8, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        perceiver_config=dict(use_resampler=resampler, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8),
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        architectures=["IdeficsForVisionText2Text"],
    )
    torch.manual_seed(0)
    IdeficsForVisionText2Text(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_idefics(tmp_path_factory) -> Path:
    return build_tiny_idefics(tmp_path_factory.mktemp("models") / "tiny-idefics")


def test_idefics_chain_holds_each_cross_attention_block_before_the_layer_it_runs_before(tiny_idefics):
    """The units' order is the real forward's: hooks on the blocks of a real run with an image."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    from planc.model import build_model_graph

    graph = build_model_graph(json.loads((tiny_idefics / "config.json").read_text()), "float32")
    chain = [(unit.kind, unit.name) for unit in graph.units if unit.kind in ("layer", "cross")]
    assert chain == [
        ("cross", "model.gated_cross_attn_layers.0"), ("layer", "model.layers.0"), ("layer", "model.layers.1"),
        ("cross", "model.gated_cross_attn_layers.1"), ("layer", "model.layers.2"), ("layer", "model.layers.3"),
    ]
    crosses = [unit for unit in graph.units if unit.kind == "cross"]
    assert all(unit.cache is None for unit in crosses)
    assert [unit.layer_index for unit in graph.units if unit.kind == "layer"] == [0, 1, 2, 3]
    # The tower and the resampler run before the layers, once per prefill over the images.
    assert all(unit.kind == "pre" and unit.vision for unit in graph.units if ".perceiver_resampler." in unit.name)
    assert graph.needs_images and graph.parallel.pp_refusal

    model = IdeficsForVisionText2Text.from_pretrained(tiny_idefics, dtype=torch.float32)
    ran = []
    for kind, name in chain:
        model.get_submodule(name).register_forward_pre_hook(lambda _m, _a, name=name: ran.append(name))
    processor = AutoProcessor.from_pretrained(tiny_idefics)
    batch = processor(text=["A device map"], images=[[Image.new("RGB", (32, 32))]], return_tensors="pt")
    model(**batch)
    assert ran == [name for _, name in chain]


def test_idefics_needs_images_and_refuses_text_only_prompts(tiny_idefics, tmp_path):
    """Its forward raises without pixel values (plain generate from text alone fails), so a plan
    without images is refused, and so is a text prompt to a plan with them."""
    import torch
    from transformers import AutoTokenizer, IdeficsForVisionText2Text

    model = IdeficsForVisionText2Text.from_pretrained(tiny_idefics, dtype=torch.float32)
    text = AutoTokenizer.from_pretrained(tiny_idefics)(["A device map"], return_tensors="pt")
    with pytest.raises(ValueError, match="Exactly 1 of pixel_values"):
        model.generate(**text, max_new_tokens=2, do_sample=False)
    with pytest.raises(SpecError, match="IdeficsForVisionText2Text generates only from an image"):
        compile_to(tmp_path, CPU_SPEC.format(model=tiny_idefics, workload=""))
    lock = compile_to(tmp_path, CPU_SPEC.format(model=tiny_idefics, workload=", images_per_sequence: 1"))
    with pytest.raises(UsageError, match="generates only from an image .* give each prompt an image"):
        run_plan(lock, prompts=["A device map"], max_new_tokens=2, quiet=True)


def test_idefics_runs_image_prompts_with_the_tokens_of_plain_transformers(tiny_idefics, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, IdeficsForVisionText2Text

    lock = compile_to(tmp_path, CPU_SPEC.format(model=tiny_idefics, workload=", images_per_sequence: 1"))
    prompts = ["The quick brown fox", "A device map"]
    outcomes, expected = [], []
    processor = AutoProcessor.from_pretrained(tiny_idefics)
    processor.tokenizer.padding_side = "left"
    for seed in (0, 1):
        picture = image(tmp_path, seed)
        outcomes.append([c.token_ids for c in run_plan(lock, prompts=prompts, max_new_tokens=MAX_NEW_TOKENS,
                                                       images=[picture], quiet=True).completions])
        rgb = Image.open(picture).convert("RGB")
        batch = processor(text=prompts, images=[[rgb], [rgb]], return_tensors="pt", padding=True)
        expected.append(plain_generate(IdeficsForVisionText2Text, tiny_idefics, dict(batch)))
    assert outcomes == expected
    assert outcomes[0] != outcomes[1]  # the cross-attention blocks read the image at every step


@pytest.mark.parametrize(("resampler", "qk_norms", "images"), [(True, False, 16), (False, False, 8), (True, True, 16)])
def test_idefics_two_gpu_plan_simulates_within_ten_percent_of_its_ledger(tmp_path, resampler, qk_norms, images):
    """Each GPU's ledger (cross-attention transients over every image token, the image states and
    pixels generate keeps, the image mask) against the fake-tensor run of prefill and decode."""
    from planc.simulate import simulate_plan

    model = build_tiny_idefics(tmp_path / "model", resampler, qk_norms)
    shutil.copy(model / "config.json", tmp_path / "config.json")
    workload = f", images_per_sequence: {images}"
    lock = compile_to(tmp_path, TWO_GPU_SPEC.format(config="config.json", memory="1GiB", workload=workload))
    plan = load_lock(lock)
    gpu_of = {name: device for name, device in plan.device_map.items()}
    assert set(gpu_of.values()) == {0, 1}
    assert gpu_of["model.gated_cross_attn_layers.0"] == 0 and gpu_of["model.layers.3"] == 1
    report = simulate_plan(plan, tmp_path, decode_steps=2)
    assert report.ok, report.error
    assert any("image states to every decode step" in note for note in report.notes), report.notes
    for device in report.devices:
        assert abs(device.ledger_error) <= 0.10, device


def test_only_idefics_layout_of_cross_attention_blocks_is_placed():
    """A layout that is not Idefics' (here its cross-attention list one block short of
    num_hidden_layers // cross_layer_interval) is not taken for it: the cache-count refusal stands."""
    from transformers import IdeficsConfig

    from planc.model.build import meta_model
    from planc.model.gated_cross import gated_cross_of
    from planc.model.graph import _decoder_layers, _towers

    config = IdeficsConfig(architectures=["IdeficsForVisionText2Text"], num_hidden_layers=4).to_dict()
    config.pop("transformers_version", None)
    model = meta_model(config, "bfloat16", False)
    layers, _ = _decoder_layers(model, set(model._no_split_modules), _towers(model))
    decoder, found = gated_cross_of(model, layers, 4)
    assert decoder == [f"model.layers.{i}" for i in range(4)] and found.before == (0, 1, 2, 3)
    assert gated_cross_of(model, layers, 3) is None  # a cache count that is not the decoder's
    del model.model.gated_cross_attn_layers[3]
    assert gated_cross_of(model, layers[:-1], 4) is None

"""Shared fixtures: a tiny real model (random weights, trained tokenizer) saved with save_pretrained."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Real config.json files of public models (provenance in bench/corpus/SOURCES.md).
CORPUS = REPO / "bench" / "corpus"
EXAMPLES = REPO / "examples"
PLANS = REPO / "plans"

SENTENCES = [
    "planc compiles a model, a GPU inventory and a workload into a plan.",
    "The quick brown fox jumps over the lazy dog.",
    "Attention kernels differ by compute capability and dtype.",
    "A device map places each decoder layer on one device.",
    "The KV cache grows with batch size and context length.",
]


# ChatML-like turns between the tokenizer's own <s> and </s>, for `planc serve`'s /v1/chat/completions.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


# One real config per architecture family in the corpus, and their tiny versions.
FAMILIES = ["qwen3-8b", "gpt2", "gemma-2-2b-it", "mistral-7b-v0.1", "deepseek-v3", "qwen3-30b-a3b",
            "gpt-oss-20b", "phi-3-mini-4k-instruct", "mixtral-8x7b", "gemma-3-1b-it"]
WINDOW = 8


def shrink(name: str) -> dict:
    """The corpus config `name` with tiny dimensions: same architecture, runs on a CPU in milliseconds."""
    config = json.loads((CORPUS / name / "config.json").read_text())
    config.pop("quantization_config", None)
    small = {
        "hidden_size": 64, "n_embd": 64, "intermediate_size": 128, "num_hidden_layers": 4, "n_layer": 4,
        "num_attention_heads": 4, "n_head": 4, "head_dim": 16, "vocab_size": 128, "moe_intermediate_size": 32,
        "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "max_position_embeddings": 256,
        "n_positions": 256, "sliding_window": WINDOW, "n_inner": None, "shared_expert_intermediate_size": 32,
    }
    grouped = config.get("num_key_value_heads", 0) < config.get("num_attention_heads", 0)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        config[key] = None  # real ids point past the tiny vocabulary
    for key, value in small.items():
        if key in config:
            config[key] = value
    if config.get("num_key_value_heads"):
        config["num_key_value_heads"] = 2 if grouped else 4
    if "layer_types" in config:
        config["layer_types"] = (config["layer_types"] * 4)[:4]
    if config.get("model_type") == "gemma3_text":
        config["layer_types"] = ["sliding_attention", "full_attention"] * 2
    return config


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the weight-hash cache out of the user's home; trust the tests' own temp tree.

    Locks written in a test's tmp_path name the session's tiny model, which lives in another temp
    folder: outside the lock's tree, so `planc run` trusts it only through PLANC_TRUSTED_DIRS.
    Session-wide, so module-scoped fixtures (a server started once per module) see it too.
    """
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PLANC_CACHE_DIR", str(base / "planc-cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("PLANC_TRUSTED_DIRS", str(base))
        yield


def save_tiny_tokenizer(folder: Path):
    """Save a BPE tokenizer trained on SENTENCES into `folder`; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()  # decoded text shows spaces, not the byte-level "Ġ"
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, num_layers: int = 4, tie: bool = False, seed: int = 0, head_dim: int = 16) -> Path:
    """Save a tiny Qwen3 model with random weights and a BPE tokenizer trained on SENTENCES."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    fast = save_tiny_tokenizer(folder)
    config = Qwen3Config(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.save_pretrained(folder)
    return folder


def build_tiny_fp8_model(folder: Path, block: int = 32) -> Path:
    """The tiny Qwen3 as an fp8 release is shipped: float8_e4m3fn linear weights with fp32
    `weight_scale_inv` per block x block tile (DeepSeek-V3's layout), everything else in bfloat16,
    and the quantization_config in config.json."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    build_tiny_model(folder)
    dense = load_file(folder / "model.safetensors")
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    tensors = {}
    for name, weight in dense.items():
        if name.endswith(".weight") and weight.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
            rows, cols = weight.shape
            tiles = weight.reshape(rows // block, block, cols // block, block)
            scale = tiles.abs().amax(dim=(1, 3)) / fp8_max
            tensors[name] = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(rows, cols)
            tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale.float()
        else:
            tensors[name] = weight.to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_fp8_model(tmp_path_factory) -> Path:
    """A tiny fp8 checkpoint (real float8_e4m3fn tensors and block scales in safetensors)."""
    return build_tiny_fp8_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-fp8")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder with a tiny Qwen3 (4 layers, untied) saved by save_pretrained, plus its tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3")


def write_spec(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def cpu_env(monkeypatch):
    """Run as on a machine without GPUs even where one exists."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return os.environ


def image_token_tokenizer():
    """A byte-level BPE tokenizer trained on SENTENCES, with <s>, </s>, <pad> and an <image> placeholder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_tiny_vlm(folder: Path, seed: int = 0) -> Path:
    """Save a tiny LLaVA (CLIP vision tower, Llama decoder) with random weights and its processor.

    Images are 32 x 32 pixels in 8-pixel patches: each becomes 16 image tokens in the prompt.
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    fast = image_token_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=fast, patch_size=8, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
        ),
        text_config=LlamaConfig(
            vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        ),
        image_token_index=fast.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """Folder with a tiny LLaVA saved by save_pretrained, plus its processor."""
    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-llava")

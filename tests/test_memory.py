"""The ledger's KV cache sizes against transformers' real DynamicCache, per architecture family.

Each real config from bench/corpus is shrunk (same architecture, tiny dimensions) and run
for real on the CPU; the bytes the cache actually holds must equal what the ledger predicts.
"""

from __future__ import annotations

import json

import pytest

from conftest import CORPUS
from planc.memory import Workload, unit_kv_bytes
from planc.model import build_model_graph

FAMILIES = ["qwen3-8b", "gpt2", "gemma-2-2b-it", "mistral-7b-v0.1", "deepseek-v3", "qwen3-30b-a3b",
            "gpt-oss-20b", "phi-3-mini-4k-instruct", "mixtral-8x7b", "gemma-3-1b-it"]
WINDOW = 8


def shrink(name: str) -> dict:
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


@pytest.mark.parametrize("name", FAMILIES)
def test_ledger_kv_equals_real_cache(name):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from planc.model import make_config

    config_dict = shrink(name)
    graph = build_model_graph(config_dict, "float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(config_dict), dtype=torch.float32).eval()
    batch, prompt = 2, 3 * WINDOW
    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, 128, (batch, prompt))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    layers = [unit for unit in graph.units if unit.kind == "layer"]
    assert len(layers) == len(cache.layers)
    workload = Workload(batch_size=batch, max_seq_len=prompt)
    for unit, layer in zip(layers, cache.layers):
        held = sum(t.untyped_storage().nbytes() for t in (layer.keys, layer.values) if t is not None and t.numel())
        # Right after the prefill, a sliding layer still holds the whole prompt (a view keeps the
        # concatenated storage alive): the ledger counts min(S, window - 1 + step) tokens for it.
        assert held == unit_kv_bytes(unit, workload), f"{unit.name}: cache holds {held} B"
    # One decode step later the sliding layers drop to window - 1 + 1 tokens, full ones grow by one.
    with torch.no_grad():
        model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    for unit, layer in zip(layers, cache.layers):
        held = sum(t.untyped_storage().nbytes() for t in (layer.keys, layer.values) if t is not None and t.numel())
        tokens = prompt + 1 if unit.cache.window is None else min(prompt + 1, unit.cache.window)
        assert held == batch * tokens * unit.cache.bytes_per_token, unit.name


def test_mla_cache_holds_latents_not_heads():
    graph = build_model_graph(shrink("deepseek-v3"), "bfloat16")
    layer = next(unit for unit in graph.units if unit.kind == "layer")
    assert layer.cache.bytes_per_token == (32 + 8) * 2  # kv_lora_rank + rope dim, one "head", bf16

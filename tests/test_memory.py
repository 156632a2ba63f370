"""The ledger's KV cache sizes against transformers' real DynamicCache, per architecture family.

Each real config from bench/corpus is shrunk (same architecture, tiny dimensions) and run
for real on the CPU; the bytes the cache actually holds must equal what the ledger predicts.
"""

from __future__ import annotations

import pytest

from conftest import FAMILIES, WINDOW, shrink
from planc.memory import Workload, unit_kv_bytes
from planc.model import build_model_graph


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

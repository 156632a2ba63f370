"""Hybrid models: linear-attention, state-space, short-conv and indexed-attention layers.

Tiny random models of every family (tests/hybrid_models.py) run for real on the CPU; the bytes
their cache objects hold after a prefill and after decode steps must equal the ledger's, to the
byte, in bfloat16 and float32. Each mixer family's prefill transient on the torch fallback, at
its real size, is held to a fake-tensor execution of the real module.
"""

from __future__ import annotations

import pytest

from hybrid_models import AT_SCALE, FAMILIES, mixer_prefill_peak, tiny_config
from planc.memory import Workload, unit_kv_bytes
from planc.model import build_model_graph, make_config
from planc.model.cache import FALLBACK, cache_keyword, held_bytes, layer_tensors

BATCH, PROMPT, DECODE = 2, 37, 2


def _run_cache(config_dict: dict, dtype: str):
    """Prefill BATCH x PROMPT tokens, then DECODE single-token steps; the cache after each phase."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(config_dict), dtype=getattr(torch, dtype)).eval()
    ids = torch.randint(0, 100, (BATCH, PROMPT))
    keyword = cache_keyword(model)
    phases = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = getattr(out, keyword)
        phases.append([held_bytes(t) for t in layer_tensors(cache)])
        for _ in range(DECODE):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{keyword: cache})
        phases.append([held_bytes(t) for t in layer_tensors(cache)])
    return phases


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_ledger_cache_equals_real_cache(model_type, dtype):
    config = tiny_config(model_type)
    graph = build_model_graph(config, dtype)
    layers = [unit for unit in graph.units if unit.kind == "layer"]
    after_prefill, after_decode = _run_cache(config, dtype)

    # Right after the prefill a sliding layer still holds the whole prompt (the ledger's window - 1
    # + step); after decode steps it holds its window.
    for workload, held in ((Workload(BATCH, PROMPT), after_prefill), (Workload(BATCH, PROMPT + DECODE, 1), after_decode)):
        held = held + [0] * (len(layers) - len(held))  # caches may stop at their last stateful layer
        planned = [unit_kv_bytes(unit, workload) for unit in layers]
        tokens = workload.max_seq_len
        assert held == planned, f"after {tokens} tokens: cache holds {held}, ledger plans {planned}"


TRANSIENT_TOLERANCE = 0.05


@pytest.mark.parametrize("model_type", sorted(AT_SCALE))
def test_fallback_transient_equals_fake_execution(model_type):
    """Each family's torch-fallback prefill transient, at its real size, against the fake-tensor
    execution of the real mixer module (padded and unpadded chunks, batch 2)."""
    tokens = 300 if model_type == "jamba" else 1000  # Jamba's scan is a Python loop per token
    measured, mixer = mixer_prefill_peak(model_type, tokens, batch=2)
    planned = mixer.transient_bytes(Workload(2, tokens), "bfloat16", FALLBACK)

    assert abs(planned - measured) <= TRANSIENT_TOLERANCE * measured, (planned, measured)

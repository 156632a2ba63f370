"""Recurrent families whose state transformers keeps outside DynamicCache layers: RecurrentGemma
(on its modules), RWKV (the `state` list its forward returns), xLSTM (its own xLSTMCache).

Tiny random models of each run for real on the CPU: the state the model holds after a prefill
and after decode steps equals the ledger's to the byte; a two-GPU plan at the family's real
widths holds under `planc simulate`, with each device's cache where transformers puts it; and
`planc run` generates the tokens of plain transformers.
"""

from __future__ import annotations

import pytest

from hybrid_models import RECURRENT, build_tiny_hybrid, compile_for_a100s, simulate_lock, tiny_config
from planc.memory import Workload, unit_kv_bytes
from planc.model import build_model_graph, make_config
from planc.model.cache import FALLBACK, cache_keyword, held_bytes, layer_tensors

BATCH, PROMPT, DECODE = 2, 37, 2


def _held_state(config_dict: dict, dtype: str) -> tuple[int, int]:
    """Bytes the model keeps between steps after a prefill of BATCH x PROMPT tokens, and after DECODE
    single-token steps, fed as generate feeds them (its default cache where the model takes one)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(config_dict), dtype=getattr(torch, dtype)).eval()
    keyword = cache_keyword(model)
    cache = DynamicCache(config=model.config) if keyword == "past_key_values" else None
    ids = torch.randint(0, 100, (BATCH, PROMPT))
    held = []
    with torch.no_grad():
        for step in range(DECODE + 1):
            out = model(input_ids=ids, use_cache=True, **{keyword: cache})
            returned = getattr(out, keyword, None)
            cache = cache if returned is None else returned
            ids = out.logits[:, -1:].argmax(-1)
            if step in (0, DECODE):
                held.append(sum(held_bytes(tensors) for tensors in layer_tensors(cache, model)))
    return held[0], held[1]


def _ledger_state(graph, workload: Workload) -> int:
    return sum(unit_kv_bytes(unit, workload) for unit in graph.units)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("model_type", sorted(RECURRENT))
def test_ledger_state_equals_the_state_the_model_keeps(model_type, dtype):
    config = tiny_config(model_type)
    graph = build_model_graph(config, dtype)
    after_prefill, after_decode = _held_state(config, dtype)

    assert after_decode == _ledger_state(graph, Workload(BATCH, PROMPT + DECODE, 1))
    planned_prefill = _ledger_state(graph, Workload(BATCH, PROMPT))
    if model_type == "recurrent_gemma":
        # After the prefill the conv window is width - 1 columns; each decode step keeps a view of
        # the width-wide concatenation, the peak the ledger holds.
        recurrent = sum(1 for unit in graph.units if unit.cache is not None and unit.cache.mixer is not None)
        lru = next(unit.cache.mixer.width for unit in graph.units if unit.cache is not None and unit.cache.mixer)
        planned_prefill -= recurrent * BATCH * lru * (2 if dtype == "bfloat16" else 4)
    assert after_prefill == planned_prefill


@pytest.mark.parametrize(("tokens", "batch", "dtype"), [(300, 2, "bfloat16"), (200, 1, "float32"), (1, 2, "bfloat16")])
def test_rwkv_time_mix_transient_equals_fake_execution(tokens, batch, dtype):
    """RWKV-4 7B's time mixing (hidden 4096) over a prefill and a decode step, under fake tensors,
    against the ledger's transient less the whole-state copy a GPU hop adds."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from planc.model.rwkv import RwkvTimeMix
    from planc.simulate import forward_peak

    config = AutoConfig.for_model("rwkv", num_hidden_layers=2)
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    layer = model.rwkv.blocks[1]
    shape = (batch, config.hidden_size, config.num_hidden_layers)

    def inputs():
        hidden = torch.empty(batch, tokens, config.hidden_size, dtype=getattr(torch, dtype))
        state = [torch.zeros(shape, dtype=getattr(torch, dtype) if i <= 1 else torch.float32) for i in range(5)]
        return (hidden,), {"state": state, "use_cache": True}

    measured = forward_peak(RwkvTimeMix.module_of(layer, 1), inputs)
    mixer = RwkvTimeMix.from_layer(layer, 1)
    planned = mixer.transient_bytes(Workload(batch, tokens), dtype, FALLBACK)
    planned -= batch * mixer.layers * mixer.state_bytes(dtype)

    assert measured <= planned <= measured * (1.2 if tokens == 1 else 1.05), (planned, measured)


# Real widths (class default configs) for the transients; model_type -> overrides.
AT_SCALE = {"recurrent_gemma": dict(num_hidden_layers=3)}


@pytest.mark.parametrize(("tokens", "batch", "dtype"), [(1000, 2, "bfloat16"), (300, 1, "float32")])
def test_rg_lru_prefill_transient_equals_fake_execution(tokens, batch, dtype):
    """RecurrentGemma-2B's recurrent block (conv1d + RG-LRU, 2560 channels) over a prefill, under
    fake tensors, against the ledger's transient."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from planc.model.rg_lru import RgLru
    from planc.simulate import forward_peak

    config = AutoConfig.for_model("recurrent_gemma", **AT_SCALE["recurrent_gemma"])
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    layer = model.model.layers[0]
    block = RgLru.module_of(layer, 0)

    def inputs():
        block.conv1d_state = None
        hidden = torch.empty(batch, tokens, config.hidden_size, dtype=getattr(torch, dtype))
        positions = torch.arange(tokens)[None].expand(batch, tokens)
        return (hidden,), {"position_ids": positions, "attention_mask": None, "use_cache": True}

    measured = forward_peak(block, inputs)
    planned = RgLru.from_layer(layer, 0).transient_bytes(Workload(batch, tokens), dtype, FALLBACK)

    assert abs(planned - measured) <= 0.01 * measured, (planned, measured)


@pytest.mark.parametrize(("tokens", "batch", "dtype"), [(1000, 2, "bfloat16"), (40, 1, "float32"), (1, 2, "bfloat16")])
def test_mlstm_transient_bounds_fake_execution(tokens, batch, dtype):
    """xLSTM-7B's mLSTM layer over a prefill (whole chunks and the recurrent remainder) and a
    decode step, under fake tensors: the ledger's sum of the tensors alive at the native path's
    peaks is an upper bound, within +45 %."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.xlstm.modeling_xlstm import xLSTMCache

    from planc.model.xlstm import MLstm
    from planc.simulate import forward_peak

    config = AutoConfig.for_model("xlstm", num_hidden_layers=1, num_blocks=1)
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    layer = model.backbone.blocks[0]

    def inputs():
        hidden = torch.empty(batch, tokens, config.hidden_size, dtype=getattr(torch, dtype))
        return (hidden, xLSTMCache(config, batch, dtype=getattr(torch, dtype), device="cpu").rnn_state[0]), {}

    measured = forward_peak(MLstm.module_of(layer, 0), inputs)
    planned = MLstm.from_layer(layer, 0).transient_bytes(Workload(batch, tokens), dtype, FALLBACK)

    assert measured <= planned <= 1.45 * measured, (planned, measured)


# Whole models at their real widths, a few layers, compiled for two A100-80GB and executed on
# virtual GPUs: model_type -> (overrides, max_seq_len).
SIMULATED = {
    "recurrent_gemma": (dict(num_hidden_layers=4), 512),
    # xLSTM's forward takes no logits_to_keep: the prefill's logits of every token are on the last GPU.
    "xlstm": (dict(num_hidden_layers=4, num_blocks=4), 512),
    # RWKV's recurrence is a Python loop over the prompt's tokens: a short one.
    "rwkv": (dict(num_hidden_layers=4), 128),
}


@pytest.mark.parametrize("model_type", sorted(SIMULATED))
def test_a_two_gpu_plan_holds_under_simulation(tmp_path, model_type):
    from transformers import AutoConfig

    from test_simulate import LEDGER_TOLERANCE

    overrides, seq = SIMULATED[model_type]
    config = AutoConfig.for_model(model_type).to_dict()
    config.update(overrides)
    plan = compile_for_a100s(tmp_path, config, 2, seq)
    layer_devices = {device for name, device in plan.device_map.items() if ".layers." in name or ".blocks." in name}
    assert len({str(device) for device in plan.device_map.values()}) == 2

    report, errors = simulate_lock(tmp_path)

    assert all(abs(error) <= LEDGER_TOLERANCE for error in errors.values()), errors
    # After the decode step each device holds the ledger's cache for max_seq_len tokens, and one
    # token more of local-attention KV: the states are where the ledger put them, on the layers'
    # GPUs (RecurrentGemma) or all on the embeddings' (xLSTM, RWKV).
    for device in report.devices:
        held, planned = device.simulated_kv_cache, device.planned["kv_cache"]
        assert planned <= held <= planned * (seq + 1) / seq, device
    embeddings = plan.device_map[next(name for name in plan.device_map if "embed" in name)]
    holders = {device.index for device in report.devices if device.simulated_kv_cache}
    assert holders == (layer_devices if model_type == "recurrent_gemma" else {embeddings})


@pytest.fixture(scope="module")
def recurrent_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("recurrent-models")
    return {name: build_tiny_hybrid(root / name, name) for name in sorted(RECURRENT)}


@pytest.mark.parametrize("model_type", sorted(RECURRENT))
def test_a_cpu_plan_generates_the_tokens_of_plain_transformers(recurrent_models, tmp_path, model_type):
    from planc.run import run_plan
    from test_run import CPU_SPEC, MAX_NEW_TOKENS, PROMPTS, compile_to, plain_transformers_tokens

    model = recurrent_models[model_type]
    lock = compile_to(tmp_path, CPU_SPEC.format(model=model, policy=""))

    outcome = run_plan(lock, prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS, quiet=True)

    assert outcome.exit_code == 0
    assert [c.token_ids for c in outcome.completions] == plain_transformers_tokens(model, PROMPTS, MAX_NEW_TOKENS)


def test_serve_refuses_a_model_whose_state_is_outside_its_cache(recurrent_models, tmp_path):
    """planc serve keeps one DynamicCache per sequence; RecurrentGemma's state on its modules would
    be shared by every sequence in flight, so the server refuses before it binds or loads."""
    from planc.errors import UsageError
    from planc.serve import serve_plan
    from test_run import CPU_SPEC, compile_to

    lock = compile_to(tmp_path, CPU_SPEC.format(model=recurrent_models["recurrent_gemma"], policy=""))

    with pytest.raises(UsageError, match="this model's rg_lru layers keep their state outside it"):
        serve_plan(lock, port=0)

"""Hybrid models: linear-attention, state-space, short-conv and indexed-attention layers.

Tiny random models of every family (tests/hybrid_models.py) run for real on the CPU; the bytes
their cache objects hold after a prefill and after decode steps must equal the ledger's, to the
byte, in bfloat16 and float32. Each mixer family's prefill transient on the torch fallback, at
its real size, is held to a fake-tensor execution of the real module.
"""

from __future__ import annotations

import pytest

from hybrid_models import AT_SCALE, FAMILIES, compile_for_a100s, simulate_lock, mixer_prefill_peak, tiny_config, tiny_model
from planc.memory import Workload, unit_kv_bytes
from planc.model import build_model_graph, make_config
from planc.model.cache import FALLBACK, cache_keyword, held_bytes, layer_tensors

BATCH, PROMPT, DECODE = 2, 37, 2


def _run_cache(config_dict: dict, dtype: str):
    """Prefill BATCH x PROMPT tokens, then DECODE single-token steps; the cache after each phase."""
    import torch

    torch.manual_seed(0)
    model = tiny_model(config_dict, dtype)
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


# bfloat16 tells the model-dtype conv window from the fp32 recurrent state; float32 once per family.
CASES = [(model_type, "bfloat16") for model_type in sorted(FAMILIES)] + [
    (model_type, "float32")
    for model_type in ("qwen3_next", "kimi_linear", "bamba", "jamba", "lfm2", "minimax", "deepseek_v32", "deepseek_v4",
                       "zaya", "inkling_text")
]


@pytest.mark.parametrize(("model_type", "dtype"), CASES)
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


# Whole models at their real sizes (class default configs, a few layers of each kind) compiled for
# two A100-80GB and executed on virtual GPUs.
_LINEAR = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
SIMULATED = [
    pytest.param("qwen3_next", dict(layer_types=["linear_attention"] * 3 + ["full_attention"]), 2, 1024, "fallback",
                 id="gated-deltanet-qwen3-next"),
    pytest.param("qwen3_next", dict(layer_types=["linear_attention"] * 3 + ["full_attention"]), 2, 2048, "kernels",
                 id="gated-deltanet-qwen3-next-kernels"),
    pytest.param("kimi_linear", dict(layer_types=_LINEAR, mlp_layer_types=["dense"] + ["sparse"] * 3), 2, 1024,
                 "fallback", id="kimi-delta-kimi-linear"),
    pytest.param("bamba", dict(attn_layer_indices=[1]), 2, 2048, "fallback", id="mamba2-bamba"),
    pytest.param("nemotron_h", dict(layers_block_type=["mamba", "attention", "mamba", "moe"]), 2, 2048, "fallback",
                 id="mamba2-nemotron-h-moe"),
    pytest.param("falcon_h1", dict(), 2, 2048, "fallback", id="hybrid-layers-falcon-h1"),
    pytest.param("jamba", dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
                 2, 128, "fallback", id="mamba1-jamba"),
    pytest.param("lfm2", dict(layer_types=["conv", "full_attention", "conv", "conv"]), 2, 2048, "fallback",
                 id="short-conv-lfm2"),
    pytest.param("minimax", dict(layer_types=_LINEAR), 2, 2048, "fallback", id="lightning-minimax"),
    pytest.param("deepseek_v32", dict(num_hidden_layers=2, layer_types=["indexed_attention"] * 2,
                                      mlp_layer_types=["dense", "sparse"], first_k_dense_replace=1),
                 2, 4096, "fallback", id="indexed-deepseek-v3.2"),
    # DeepSeek-V4's hyper-connection head (model.hc_head's own tensors) runs after the layers: it
    # goes with the final norm on the last GPU.
    pytest.param("deepseek_v4", dict(), 2, 1024, "fallback", id="compressed-deepseek-v4"),
    pytest.param("zaya", dict(layer_types=["hybrid"] * 4), 2, 1024, "fallback", id="cca-zaya"),
    # Contexts within the sliding windows (512 and 1024): after the decode step every layer holds
    # what the ledger planned.
    pytest.param("inkling_text", dict(layer_types=["hybrid_sliding", "hybrid"] * 2, mlp_layer_types=["sparse"] * 4), 2, 512,
                 "fallback",
                 id="residual-short-conv-inkling"),
    pytest.param("inkling2_text", dict(layer_types=["hybrid_sliding", "hybrid"] * 2), 2, 1024, "fallback",
                 id="residual-short-conv-inkling2"),
    # Image-text-to-text models: their text model cut to four layers.
    pytest.param("glm5_next", dict(text_config=dict(layer_types=_LINEAR, mlp_layer_types=["dense"] + ["sparse"] * 3)),
                 2, 1024, "fallback", id="kimi-delta-and-k-pool-indexer-glm5-next"),
    pytest.param("unlimited_ocr", dict(text_config=dict(layer_types=["reference_sliding_attention"] * 4,
                                                        mlp_layer_types=["dense"] + ["sparse"] * 3)),
                 2, 1024, "fallback", id="reference-sliding-unlimited-ocr"),
    # HY-V4's hc_head too; its layers return (hidden states, top-k) pairs, which the call-order
    # trace must pass through to see the head run after them.
    pytest.param("hy_v4", dict(layer_types=["indexed_attention"] * 4, mlp_layer_types=["dense", "sparse"] * 2),
                 2, 1024, "fallback", id="indexed-hy-v4"),
]


@pytest.mark.parametrize(("model_type", "overrides", "gpus", "seq", "kernels"), SIMULATED)
def test_simulated_hybrid_plans_agree_with_the_ledger(tmp_path, model_type, overrides, gpus, seq, kernels):
    from transformers import AutoConfig

    from test_simulate import LEDGER_TOLERANCE

    config = AutoConfig.for_model(model_type).to_dict()
    overrides = dict(overrides)
    text = config["text_config"] if "text_config" in overrides else config
    text.update({"num_hidden_layers": 4, **overrides.pop("text_config", {})})
    config.update(overrides)
    plan = compile_for_a100s(tmp_path, config, gpus, seq, policy=f"mixer_kernels: {kernels}")
    assert plan.mixers is None or plan.mixers.path == kernels
    assert len({str(device) for device in plan.device_map.values()}) == gpus  # split, so the ledger is per GPU

    report, errors = simulate_lock(tmp_path)

    assert all(abs(error) <= LEDGER_TOLERANCE for error in errors.values()), errors
    # Every cache tensor lands on its layer's GPU: after the decode step, the ledger's cache for
    # max_seq_len tokens and one token more (DeepSeek-V4's window and buffers shrink after the
    # prefill, where the ledger holds their peak).
    for device in report.devices:
        held, planned = device.simulated_kv_cache, device.planned["kv_cache"]
        assert held <= planned * (seq + 1) / seq + 2**20, device
        if model_type != "deepseek_v4":
            assert planned <= held, device


@pytest.mark.parametrize("model_type", ["qwen4_exp_text"])
def test_families_planc_does_not_size_are_refused_with_the_reason(model_type):
    """Planning their recurrent state as attention KV would be wrong; each says why, in one line."""
    from transformers import AutoConfig

    from planc.errors import ModelError
    from planc.model.cache import UNSIZED

    config = AutoConfig.for_model(model_type).to_dict()
    config.pop("transformers_version", None)
    with pytest.raises(ModelError) as refused:
        build_model_graph(config, "bfloat16")

    message = str(refused.value)
    assert UNSIZED[model_type.removesuffix("_text")] in message and "\n" not in message


@pytest.mark.parametrize("model_type", ["bamba", "granitemoehybrid"])
def test_a_cache_without_an_attention_layer_is_refused_as_transformers_cannot_generate_with_it(model_type):
    """Their default configs have Mamba layers only: plain transformers' generate raises on the
    first step (DynamicCache.get_seq_length needs an attention layer), so there is no plan to make."""
    import torch
    from transformers import AutoModelForCausalLM

    from planc.errors import ModelError

    overrides = {"bamba": dict(attn_layer_indices=None), "granitemoehybrid": dict(layer_types=["mamba"] * 4)}
    data = {**tiny_config(model_type), **overrides[model_type]}
    model = AutoModelForCausalLM.from_config(make_config(data)).eval()
    with pytest.raises(ValueError, match="can only be called on Attention layers"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1, do_sample=False)

    with pytest.raises(ModelError, match="no layer of this config attends .only linear_attention.") as refused:
        build_model_graph(data, "bfloat16")
    assert "\n" not in str(refused.value)


def test_a_linear_layer_of_an_unknown_family_is_refused():
    """A model type whose linear_attention layers no family module describes is refused, not
    sized with another family's formula."""
    from planc.errors import ModelError
    from planc.model.cache import mixer_of

    with pytest.raises(ModelError, match="^mistral: its linear_attention layers keep a recurrent state whose layout"):
        mixer_of("mistral", "linear_attention", object(), 0)


@pytest.mark.parametrize(("kernels", "chunk"), [("kernels", None), ("fallback", 16384)])
def test_the_prefill_chunk_search_covers_the_mixer_path(tmp_path, kernels, chunk):
    """Qwen3-Next-80B-A3B on four A100-80GB at 4 x 32k: on the CUDA kernels the whole prompt fits;
    the torch fallback's DeltaNet intermediates (~233 KiB per token per layer) need 16k chunks,
    and the lock says which path it sized and why."""
    from conftest import CORPUS
    from planc.compile import compile_spec

    (tmp_path / "spec.yaml").write_text(
        f"planc: 1\nmodel: {{config: {CORPUS / 'qwen3-next-80b-a3b' / 'config.json'}}}\n"
        "hardware: {gpus: [{type: a100-sxm4-80gb, count: 4}], cpu_memory: 512GiB}\n"
        f"workload: {{batch_size: 4, max_seq_len: 32768}}\npolicy: {{mixer_kernels: {kernels}}}\n"
    )
    plan, _ = compile_spec(tmp_path / "spec.yaml", tmp_path / "plan.lock")

    assert plan.generation.prefill_chunk_size == chunk
    assert plan.mixers.path == kernels and plan.mixers.families == ["gated_deltanet"]
    decisions = {d.id: d for d in plan.decisions}
    assert f"mixers.{kernels}" in decisions
    assert ("generation.prefill-chunk" in decisions) == (chunk is not None)
    if kernels == "kernels":
        assert decisions["mixers.kernels-delta-rule"].decision == (
            "requires flash-linear-attention (fla), causal-conv1d (causal_conv1d)"
        )
    # 36 DeltaNet layers keep 2.06 MiB per sequence each (conv window bf16 + fp32 state), the 12
    # attention layers 2 KV heads x 256 x 2 x bf16 per token.
    state = 36 * (8192 * 4 * 2 + 32 * 128 * 128 * 4)
    kv = 12 * 2 * 256 * 2 * 2 * 32768
    assert sum(ledger.kv_cache for ledger in plan.memory) == 4 * (state + kv)


# Zamba's hybrid layers share one transformer block: its parameters are one tensor, where the
# checkpoint entry was loaded, and accelerate's hook on a GPU-resident layer moves only the inputs.
TIED_BLOCKS = [
    pytest.param("zamba", dict(layers_block_type=["mamba", "hybrid", "mamba", "mamba", "hybrid", "mamba"]), 32,
                 id="zamba-one-shared-block"),  # Mamba1's torch scan is a Python loop per token
    pytest.param("zamba2", dict(layers_block_type=["mamba", "hybrid"] * 4, hybrid_layer_ids=[1, 3, 5, 7],
                                num_mem_blocks=2, use_shared_attention_adapter=True), 1024,
                 id="zamba2-two-shared-blocks-with-adapters"),
]


def _tied_block_plan(folder, model_type: str, overrides: dict, seq: int):
    from transformers import AutoConfig

    from planc.plan import load_lock

    config = AutoConfig.for_model(model_type).to_dict()
    config.update({"num_hidden_layers": len(overrides["layers_block_type"]), **overrides})
    config.pop("transformers_version", None)
    compile_for_a100s(folder, config, 2, seq)
    return load_lock(folder / "plan.lock"), config


@pytest.mark.parametrize(("model_type", "overrides", "seq"), TIED_BLOCKS)
def test_layers_sharing_a_block_run_on_its_gpu_and_simulate_holds_the_ledger(tmp_path, model_type, overrides, seq):
    """Zamba / Zamba2 at their real sizes on two GPUs: every layer that calls a shared block sits on
    the block's GPU, whatever GPU its neighbours run on; the hidden states go to it and back, each
    call's KV and Mamba state stay on that GPU, and the simulated cache equals the ledger's there."""
    from planc.simulate import simulate_plan
    from test_simulate import LEDGER_TOLERANCE

    plan, config = _tied_block_plan(tmp_path, model_type, overrides, seq)
    hybrid = [i for i, kind in enumerate(config["layers_block_type"]) if kind == "hybrid"]
    blocks = config.get("num_mem_blocks", 1)
    for block in range(blocks):
        users = {plan.device_map[f"model.layers.{i}"] for i in hybrid[block::blocks]}
        assert len(users) == 1, (block, users)
    assert len(set(plan.device_map.values())) == 2
    decision = {d.id: d for d in plan.decisions}["solver.shared-blocks"].decision
    assert decision.startswith("layers sharing a block on the block's device: layers 1, ")

    report = simulate_plan(plan, tmp_path, decode_steps=1)

    assert report.ok, report.error
    for device in report.devices:
        held, planned = device.simulated_kv_cache, device.planned["kv_cache"]
        assert planned <= held <= planned * (seq + 1) / seq, device
        assert device.simulated_weights == device.planned["weights"], device  # the shared block counted once
        assert device.ledger_error >= 0, device  # planned tensors cover the simulated peak
        if model_type == "zamba2":
            assert device.ledger_error <= LEDGER_TOLERANCE, device


def test_a_layer_away_from_its_shared_block_fails_where_accelerate_would(tmp_path):
    """The constraint is real: the same plan with one caller of the shared block moved to the other
    GPU fails its forward (the block's weights on one GPU, the layer's inputs on the other)."""
    from planc.simulate import simulate_plan

    model_type, overrides, seq = TIED_BLOCKS[1].values
    plan, _ = _tied_block_plan(tmp_path, model_type, overrides, seq)
    home = plan.device_map["model.layers.5"]  # shares layers.1's block
    split = {**plan.device_map, "model.layers.5": 1 - home}

    report = simulate_plan(plan.model_copy(update={"device_map": split}), tmp_path, decode_steps=1)

    assert report.error is not None and "model.layers.5.shared_transformer" in report.error
    assert "GPU 0 and GPU 1" in report.error or "GPU 1 and GPU 0" in report.error


def test_the_cache_keyword_follows_the_forward_signature():
    """Mamba's forward names its cache `cache_params`; Evolla's takes `past_key_values` through
    **kwargs (simulating it once failed reading `cache_params` from its output)."""

    class MambaLike:
        def forward(self, input_ids=None, cache_params=None, **kwargs): ...

    class EvollaLike:
        def forward(self, input_ids=None, use_cache=None, **kwargs): ...

    assert cache_keyword(MambaLike()) == "cache_params"
    assert cache_keyword(EvollaLike()) == "past_key_values"


def test_a_plan_whose_layers_visit_a_gpu_twice_is_not_exported_to_vllm(tmp_path):
    """vLLM's pipeline stages are contiguous layer ranges: Zamba2's callers of one block on GPU 1
    between layers on GPU 0 cannot be such stages, so the export says so instead of writing them."""
    from planc.export.vllm import ExportError, vllm_export

    model_type, overrides, seq = TIED_BLOCKS[1].values
    plan, _ = _tied_block_plan(tmp_path, model_type, overrides, seq)
    interleaved = {name: 1 if name in ("model.layers.3", "model.layers.7") else 0 for name in plan.device_map}

    with pytest.raises(ExportError, match="visit a GPU more than once"):
        vllm_export(plan.model_copy(update={"device_map": interleaved}), tmp_path, None)

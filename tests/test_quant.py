"""Quantized models: pre-quantized checkpoints sized as transformers holds them on the plan's GPUs,
bitsandbytes at load, an fp8 KV cache, and the runs that prove it on the CPU.

Real components: the corpus configs built by transformers' own quantizer code on meta; a tiny fp8
checkpoint written with real float8_e4m3fn tensors and block scales; bitsandbytes' CPU backend
loading a tiny model; transformers' QuantizedCache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CORPUS, write_spec
from planc.compile import ModelInput, compile_plan, compile_spec, installed_packages
from planc.errors import DriftError, InfeasibleError, ModelError, SpecError
from planc.hardware import Gpu, resolve_inventory
from planc.model import build_model_graph
from planc.plan import dump_lock, load_lock, parse_lock, write_if_changed
from planc.rules import ModelFacts, decide_runtime
from planc.spec import parse_spec

GiB = 2**30
PROMPTS = ["The quick brown fox", "A device map"]


def compile_config(config: dict, gpus: list, seq: int = 4096, batch: int = 1, offload: str = "none",
                   model: dict | None = None, cpu: str = "2TiB"):
    spec = parse_spec({"planc": 1, "model": {"config": "config.json", **(model or {})},
                       "hardware": {"gpus": gpus, "cpu_memory": cpu},
                       "workload": {"batch_size": batch, "max_seq_len": seq}, "policy": {"offload": offload}})
    source = ModelInput(config, "sha256:0", {}, None, None, "config.json")
    return compile_plan(spec, resolve_inventory(spec.hardware), source, installed_packages(), None, build_model_graph)


def corpus(name: str) -> dict:
    return json.loads((CORPUS / name / "config.json").read_text())


# ------------------------------------------------------------------ sized as transformers builds them


def transformers_bytes(config: dict, native: bool) -> int:
    """What transformers itself holds for the checkpoint, built on meta by its own code, independently of planc:
    natively the quantizer's swap (mxfp4 with its hub kernel stubbed, plus the E8M0 scales it keeps outside
    the module), dequantized the dense model from_config builds."""
    from unittest import mock

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import local_torch_dtype
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.auto import AutoQuantizationConfig

    data = {k: v for k, v in config.items() if k != "transformers_version"}
    quant = data["quantization_config"]
    with init_empty_weights(include_buffers=True), local_torch_dtype(torch.bfloat16):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**data), dtype=torch.bfloat16)
        scales = 0
        if native:
            quantizer = AutoHfQuantizer.from_config(AutoQuantizationConfig.from_dict(dict(quant)), pre_quantized=True)
            # get_current_accelerator: the CPU, as on this machine before any `planc simulate` in
            # the process registered its virtual GPU backend (which the quantizer would take for
            # an accelerator, and dequantize for).
            with mock.patch("transformers.integrations.hub_kernels.get_kernel", return_value=object()), \
                    mock.patch("transformers.quantizers.quantizer_mxfp4.get_current_accelerator", return_value=None):
                quantizer.preprocess_model(model, dtype=torch.bfloat16, device_map=None, use_kernels=True)
            scales = sum(p.numel() * 2 // 32 for n, p in model.named_parameters() if p.dtype == torch.uint8)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) + scales


DONE_CASES = [
    # (config, inventory that runs it natively, inventory that dequantizes it, policy.offload there)
    ("qwen3-32b-fp8", [{"type": "rtx4090", "count": 2}], [{"type": "a100-sxm4-80gb"}], "none"),
    ("gpt-oss-20b", [{"type": "rtx4090"}], [{"type": "v100-sxm2-32gb", "count": 2}], "none"),
    ("deepseek-r1", [{"type": "h200", "count": 8}], [{"type": "a100-sxm4-80gb", "count": 8}], "cpu"),
    ("deepseek-v3", [{"type": "h100-sxm", "count": 8}], [{"type": "a100-sxm4-80gb", "count": 8}], "cpu"),
]


@pytest.mark.parametrize(("name", "native_gpus", "old_gpus", "offload"), DONE_CASES, ids=[c[0] for c in DONE_CASES])
def test_quantized_corpus_plans_within_one_percent_of_transformers(name, native_gpus, old_gpus, offload):
    config = corpus(name)
    native = compile_config(config, native_gpus, offload="cpu")
    dequantized = compile_config(config, old_gpus, offload=offload)

    assert native.quantization.weights == "native" and dequantized.quantization.weights == "dequantized"
    expected_native, expected_dense = transformers_bytes(config, True), transformers_bytes(config, False)
    assert abs(native.model.weight_bytes - expected_native) <= 0.01 * expected_native
    assert abs(dequantized.model.weight_bytes - expected_dense) <= 0.01 * expected_dense
    assert native.quantization.dense_weight_bytes == dequantized.model.weight_bytes
    assert native.model.parameters == dequantized.model.parameters  # counted dense, not packed
    assert sum(ledger.weights for ledger in native.memory) == native.model.weight_bytes


@pytest.mark.parametrize(
    "variant",
    [{"scale_fmt": "ue8m0"}, {"activation_scheme": "static"}, {"weight_block_size": None}, {"weight_block_size": [64, 128]}],
    ids=["ue8m0-scales", "static-activation-scales", "per-tensor-scale", "64x128-blocks"],
)
def test_fp8_variants_are_sized_as_transformers_builds_them(variant):
    config = corpus("qwen3-32b-fp8")
    config["quantization_config"] = {**config["quantization_config"], **variant}
    plan = compile_config(config, [{"type": "h100-sxm"}])
    assert plan.model.weight_bytes == transformers_bytes(config, True)


def test_the_lock_says_what_stays_dense_and_what_the_run_needs():
    plan = compile_config(corpus("gpt-oss-20b"), [{"type": "rtx4090"}])
    section = plan.quantization
    assert (section.method, section.origin, section.weights) == ("mxfp4", "checkpoint", "native")
    assert {"model.embed_tokens", "lm_head", "model.layers.*.mlp.router"} <= set(section.dense_modules)
    assert not any("experts" in pattern for pattern in section.dense_modules)
    assert set(section.requires_packages) == {"kernels>=0.18.2,<0.19.0", "triton>=3.4.0"}
    assert section.requires_compute_capability == "7.5"
    assert plan.format_version == "1.1"
    assert parse_lock(dump_lock(plan, "test")) == plan
    ids = [d.id for d in plan.decisions]
    assert "quant.mxfp4-native-sm75" in ids and "quant.layout" in ids


def test_mxfp4_experts_are_never_offloaded():
    # 12.8 GiB natively on a 12 GiB card: accelerate cannot stream swizzled experts from the host,
    # so offloading them is not a way to fit.
    with pytest.raises(InfeasibleError) as info:
        card = {"name": "NVIDIA GeForce RTX 3060", "memory": "12GiB", "compute_capability": "8.6", "bandwidth": "360GB/s"}
        compile_config(corpus("gpt-oss-20b"), [card], offload="cpu", seq=1024)
    assert "policy.offload" not in str(info.value).split("would fit:")[-1]


def test_fp8_on_a_mixed_inventory_runs_natively_on_the_newer_cards():
    plan = compile_config(corpus("qwen3-32b-fp8"), [{"type": "h100-sxm"}, {"type": "a100-sxm4-80gb"}])
    assert plan.quantization.weights == "native"
    assert set(plan.device_map.values()) == {0}
    decision = next(d for d in plan.decisions if d.id == "solver.native-quantized-gpus")
    assert "GPU 1 (NVIDIA A100-SXM4-80GB, sm80) left unused" in decision.decision


def test_dequantization_that_breaks_the_fit_is_named_in_the_refusal():
    with pytest.raises(InfeasibleError) as info:
        compile_config(corpus("deepseek-r1"), [{"type": "a100-sxm4-80gb", "count": 8}])
    message = str(info.value)
    assert "fp8 runs natively on sm89+ only" in message and "rule quant.fp8-dequantized-below-sm89" in message
    assert "1249.9 GiB of bfloat16 (626.9 GiB as fp8)" in message


def test_a_dequantized_fp8_checkpoint_needs_bf16_gpus():
    with pytest.raises(SpecError, match="runs only in its own bfloat16"):
        compile_config(corpus("qwen3-32b-fp8"), [{"type": "v100-sxm2-32gb", "count": 4}])
    with pytest.raises(SpecError, match="mixed-dtype matmuls"):
        compile_config(corpus("qwen3-32b-fp8"), [{"type": "a100-sxm4-80gb"}], model={"dtype": "float16"})


def test_the_refusal_proposes_quantization_when_it_would_fit():
    with pytest.raises(InfeasibleError) as info:
        compile_config(corpus("qwen3-8b"), [{"type": "t4"}])
    assert "or model.quantize: bnb-8bit" in str(info.value)
    with pytest.raises(InfeasibleError) as info:
        compile_config(corpus("llama-3.1-8b"), [{"type": "t4"}], batch=8, seq=8192, model={"quantize": "bnb-4bit"})
    assert "model.kv_cache: fp8" in str(info.value) and "model.quantize" not in str(info.value)


def test_bitsandbytes_sizes():
    dense = compile_config(corpus("qwen3-8b"), [{"type": "a100-sxm4-80gb"}])
    four = compile_config(corpus("qwen3-8b"), [{"type": "a100-sxm4-80gb"}], model={"quantize": "bnb-4bit"})
    eight = compile_config(corpus("qwen3-8b"), [{"type": "a100-sxm4-80gb"}], model={"quantize": "bnb-8bit"})
    assert four.quantization.config == {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
                                        "bnb_4bit_compute_dtype": "bfloat16", "llm_int8_skip_modules": None}
    # Qwen3-8B: 6.9 B weights in its linears, 1.2 B in the embedding and the head that stay dense.
    assert 0.35 < four.model.weight_bytes / dense.model.weight_bytes < 0.40
    assert 0.55 < eight.model.weight_bytes / dense.model.weight_bytes < 0.60
    assert four.quantization.dense_modules == ["model.embed_tokens", "lm_head"]


def test_bitsandbytes_leaves_fused_experts_dense():
    plan = compile_config(corpus("qwen3-30b-a3b"), [{"type": "h100-sxm", "count": 2}], model={"quantize": "bnb-4bit"})
    assert "model.layers.*.mlp.experts" in plan.quantization.dense_modules
    assert plan.model.weight_bytes > 0.9 * plan.quantization.dense_weight_bytes  # the experts are nearly all of it


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"quant_method": "hqq"}, ModelError, "planc does not size hqq"),
        ({"quant_method": "torchao"}, ModelError, "planc does not size torchao"),
        ({"quant_method": "bitnet"}, ModelError, "planc does not size bitnet"),
        ({"quant_method": "mystery"}, ModelError, "not a quantization method planc knows"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, ModelError, "only when it quantizes at load"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:.*": {}}}, ModelError, "mixed bit widths"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, ModelError, "GEMM packing only"),
    ],
)
def test_methods_planc_does_not_size_are_refused_by_name(change, error, message):
    config = dict(corpus("qwen3-8b"), quantization_config=change)
    with pytest.raises(error, match=message):
        compile_config(config, [{"type": "h100-sxm"}])


def test_quantize_at_load_refusals():
    with pytest.raises(ModelError, match="already quantized"):
        compile_config(corpus("qwen3-32b-fp8"), [{"type": "h100-sxm"}], model={"quantize": "bnb-4bit"})
    with pytest.raises(SpecError, match="sm75"):
        compile_config(corpus("qwen3-8b"), [{"type": "v100-sxm2-16gb"}], model={"quantize": "bnb-8bit"})
    with pytest.raises(ModelError, match="GPTQ checkpoint of a MoE model"):
        moe = dict(corpus("qwen3-30b-a3b"), quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
        compile_config(moe, [{"type": "h100-sxm", "count": 2}])


# gptqmodel's buffers for Qwen3-8B's q_proj (4096 -> 4096) at 4 bits, groups of 128 inputs.
GPTQ_Q_PROJ = {"qweight": ((512, 4096), "int32"), "qzeros": ((32, 512), "int32"), "scales": ((32, 4096), "float16"),
               "g_idx": ((4096,), "int32")}
AWQ_Q_PROJ = {"qweight": ((4096, 512), "int32"), "qzeros": ((32, 512), "int32"), "scales": ((32, 4096), "float16")}


@pytest.mark.parametrize(
    ("quantization", "buffers"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, GPTQ_Q_PROJ),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, AWQ_Q_PROJ),
    ],
    ids=["gptq", "awq"],
)
def test_int_packed_checkpoints_hold_their_packing(quantization, buffers):
    from planc.model.build import meta_model
    from planc.model.quant import quantization_of_lock

    config = dict(corpus("qwen3-8b"), quantization_config=quantization)
    plan = compile_config(config, [{"type": "a100-sxm4-80gb"}])
    model = meta_model(config, plan.dtype, quantization=quantization_of_lock(plan)[0])
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    held = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in q_proj.named_buffers()}
    assert held == buffers
    assert plan.quantization.dense_modules == ["model.embed_tokens", "lm_head"]
    dense = compile_config(corpus("qwen3-8b"), [{"type": "a100-sxm4-80gb"}])
    assert 0.36 < plan.model.weight_bytes / dense.model.weight_bytes < 0.40  # ~0.52 B per linear weight, 2 B elsewhere
    if quantization["quant_method"] == "awq":
        assert plan.dtype == "float16" and any(d.id == "dtype.auto-awq-float16" for d in plan.decisions)


def test_compressed_tensors_plans_the_decompressed_model_unless_fp8_kernels_run():
    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}
    quantization = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": group},
                    "ignore": ["lm_head"]}
    dense = compile_config(corpus("qwen3-8b"), [{"type": "h100-sxm"}])
    default = compile_config(dict(corpus("qwen3-8b"), quantization_config=quantization), [{"type": "h100-sxm"}])
    assert default.quantization.weights == "dequantized" and default.model.weight_bytes == dense.model.weight_bytes
    fast = dict(quantization, use_optimized_inference=True)
    native = compile_config(dict(corpus("qwen3-8b"), quantization_config=fast), [{"type": "h100-sxm"}])
    assert (native.quantization.method, native.quantization.weights) == ("compressed-tensors-fp8", "native")
    assert 0.55 < native.model.weight_bytes / dense.model.weight_bytes < 0.6
    older = compile_config(dict(corpus("qwen3-8b"), quantization_config=fast), [{"type": "a100-sxm4-80gb"}])
    assert older.quantization.weights == "dequantized"


GROUP_FP8 = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}
CHECKPOINT_LAYOUTS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "compressed-tensors-fp8": {"quant_method": "compressed-tensors", "format": "float-quantized",
                               "config_groups": {"g": GROUP_FP8}, "ignore": ["lm_head"], "use_optimized_inference": True},
}


@pytest.mark.parametrize("method", sorted(CHECKPOINT_LAYOUTS))
def test_checkpoint_layouts_simulate_with_their_planned_weights(method, tmp_path):
    """planc's stand-ins (GPTQ, AWQ) and compressed-tensors' fp8 linears run under planc simulate."""
    from planc.simulate import simulate_plan

    config = dict(corpus("qwen3-0.6b"), quantization_config=CHECKPOINT_LAYOUTS[method])
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = write_spec(tmp_path, "planc: 1\nmodel: {config: config.json}\nhardware: {gpus: [{type: h100-sxm}], "
                                "cpu_memory: 64GiB}\nworkload: {batch_size: 2, max_seq_len: 1024}\n")
    _, text = compile_spec(spec, tmp_path / "plan.lock")
    write_if_changed(tmp_path / "plan.lock", text)
    plan = load_lock(tmp_path / "plan.lock")
    assert (plan.quantization.method, plan.quantization.weights) == (method, "native")

    report = simulate_plan(plan, tmp_path, decode_steps=1)

    assert report.ok, report.error
    (gpu,) = report.devices
    assert gpu.simulated_weights == gpu.planned["weights"]
    assert abs(gpu.ledger_error) <= 0.10


# ------------------------------------------------------------------ the rules


INVENTORIES = [(), ("7.0",), ("7.5",), ("8.0",), ("8.6", "8.9"), ("8.9",), ("9.0", "9.0"), ("10.0",), ("12.0",)]
METHODS = ["fp8", "mxfp4", "compressed-tensors", "compressed-tensors-fp8", "gptq", "awq", "bnb-4bit", "bnb-8bit"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda cc: "+".join(cc) or "cpu")
def test_exactly_one_rule_decides_native_or_dequantized(method, inventory):
    gpus = [Gpu(i, f"GPU{cc}", 80 * GiB, cc, 10**12) for i, cc in enumerate(inventory)]
    facts = ModelFacts("qwen3", "bfloat16", False, 128, None, ("past_key_values",), method)
    try:
        runtime = decide_runtime(gpus, facts, "auto")
    except SpecError:
        assert method in ("fp8", "bnb-8bit") and any(g.sm < 80 for g in gpus)
        return
    setters = [d for d in runtime.decisions if d.decision.startswith(f"{method} weights ")]
    assert len(setters) == 1 and setters[0].id == runtime.quantization_rule
    smallest = min((g.sm for g in gpus), default=0)
    expected_native = {
        "fp8": bool(gpus) and smallest >= 89,
        "mxfp4": bool(gpus) and smallest >= 75,
        "compressed-tensors": False,
        "compressed-tensors-fp8": bool(gpus) and smallest >= 89,
    }.get(method, True)
    assert (runtime.quantized_weights == "native") == expected_native
    dtype_setters = [d for d in runtime.decisions if d.id.startswith("dtype.") and d.decision.startswith("dtype ")]
    assert len(dtype_setters) == 1


# ------------------------------------------------------------------ real runs on the CPU


CPU_SPEC = """\
planc: 1
model: {{path: {model}{options}}}
hardware: {{gpus: [], cpu_memory: 8GiB}}
workload: {{batch_size: 2, max_seq_len: 64}}
policy: {{offload: cpu}}
"""


def cpu_plan(folder: Path, model: Path, options: str = "") -> Path:
    spec = write_spec(folder, CPU_SPEC.format(model=model, options=options))
    lock = folder / "plan.lock"
    _, text = compile_spec(spec, lock)
    write_if_changed(lock, text)
    return lock


def greedy(model, tokenizer, max_new_tokens: int = 8, **generate) -> list[list[int]]:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **generate)
    rows = output[:, batch["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def planc_tokens(lock: Path) -> list[list[int]]:
    from planc.run import run_plan

    outcome = run_plan(lock, prompts=PROMPTS, max_new_tokens=8, quiet=True)
    assert outcome.exit_code == 0
    return [completion.token_ids for completion in outcome.completions]


def stored_bytes(model) -> int:
    """Bytes the loaded model holds: every distinct storage of its tensors and of bitsandbytes' quant states."""
    import torch

    storages = {}

    def add(tensor):
        if isinstance(tensor, torch.Tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for part in (state.absmax, state.code, state.offset, *(
                    (state.state2.absmax, state.state2.code) if state.nested else ())):
                add(part)
        add(getattr(tensor, "SCB", None))
    return sum(storages.values())


def test_an_fp8_checkpoint_on_the_cpu_is_planned_dequantized_and_runs_like_transformers(tiny_fp8_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lock = cpu_plan(tmp_path, tiny_fp8_model)
    plan = load_lock(lock)
    assert (plan.quantization.method, plan.quantization.weights) == ("fp8", "dequantized")
    assert plan.quantization.config["dequantize"] is True
    assert plan.dtype == "bfloat16"  # the checkpoint's: transformers keeps its unquantized tensors as stored
    assert any(d.id == "quant.fp8-dequantized-cpu" for d in plan.decisions)

    tokenizer = AutoTokenizer.from_pretrained(tiny_fp8_model, padding_side="left")
    reference = AutoModelForCausalLM.from_pretrained(tiny_fp8_model, dtype=torch.bfloat16)
    assert not getattr(reference, "is_quantized", False)  # transformers dequantized it too
    assert plan.model.weight_bytes == stored_bytes(reference)
    assert planc_tokens(lock) == greedy(reference, tokenizer)


def test_bitsandbytes_4bit_on_the_cpu_matches_transformers_byte_for_byte(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    lock = cpu_plan(tmp_path, tiny_model, ", quantize: {method: bnb-4bit, quant_type: nf4, double_quant: true}")
    plan = load_lock(lock)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=config, dtype=torch.float32,
                                                     device_map={"": "cpu"})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")

    assert plan.model.weight_bytes == stored_bytes(reference)
    assert planc_tokens(lock) == greedy(reference, tokenizer)


def test_bitsandbytes_8bit_is_sized_as_loaded(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from planc.model.quant import load_quantization
    from planc.spec import Quantize

    config = json.loads((tiny_model / "config.json").read_text())
    graph = build_model_graph(config, "float32", quantization=load_quantization(Quantize(method="bnb-8bit"), "float32"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                     dtype=torch.float32, device_map={"": "cpu"})
    assert graph.weight_bytes == stored_bytes(reference)


def test_an_fp8_kv_cache_runs_like_transformers_quantized_cache(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lock = cpu_plan(tmp_path, tiny_model, ", kv_cache: fp8")
    plan = load_lock(lock)
    assert (plan.generation.cache_implementation, plan.generation.cache_config) == ("quantized", {"backend": "fp8"})
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model, padding_side="left")
    expected = greedy(reference, tokenizer, cache_implementation="quantized", cache_config={"backend": "fp8"})
    assert planc_tokens(lock) == expected


def test_the_fp8_kv_cache_ledger_equals_transformers_cache(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import QuantizedCache

    from planc.memory import Workload, unit_kv_bytes

    config = json.loads((tiny_model / "config.json").read_text())
    graph = build_model_graph(config, "float32", kv_cache="fp8")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    cache = QuantizedCache(backend="fp8", config=model.config)
    model(input_ids=torch.ones(3, 40, dtype=torch.long), past_key_values=cache, use_cache=True)
    held = sum(t.untyped_storage().nbytes() for layer in cache.layers
               for pair in (layer._quantized_keys, layer._quantized_values) for t in pair)
    planned = sum(unit_kv_bytes(u, Workload(3, 40)) for u in graph.units if u.kind == "layer")
    assert planned == held


def test_a_quantized_cache_is_refused_for_sliding_window_models():
    with pytest.raises(ModelError, match="QuantizedCache takes only full-attention layers.*sliding_attention"):
        compile_config(corpus("gemma-3-1b-it"), [{"type": "t4"}], model={"kv_cache": "fp8"})


# ------------------------------------------------------------------ planc run refuses before loading


def test_run_refuses_when_a_package_the_lock_needs_is_missing(tiny_model, tmp_path):
    """A requirement some rule names (the fp8/mxfp4 kernels package) that this machine lacks."""
    from planc.run import run_plan

    lock = cpu_plan(tmp_path, tiny_model, ", quantize: bnb-4bit")
    plan = load_lock(lock)
    requirements = ["bitsandbytes>=0.46.1", "kernels>=0.18.2,<0.19.0"]
    section = plan.quantization.model_copy(update={"requires_packages": requirements})
    lock.write_text(dump_lock(plan.model_copy(update={"quantization": section}).sealed(), "test"))

    with pytest.raises(DriftError) as info:
        run_plan(lock, prompts=PROMPTS, max_new_tokens=4, quiet=True)
    message = str(info.value)
    assert "package kernels>=0.18.2,<0.19.0 (bnb-4bit weights native): machine does not have it" in message
    assert "bitsandbytes" not in message


def test_a_package_older_than_the_lock_needs_is_a_mismatch(tiny_model, tmp_path):
    """The version check itself (a lock naming a requirement no rule writes is refused before it, run.trust)."""
    from importlib import metadata

    from planc.detect import detect_machine
    from planc.run.checks import quantization_mismatches

    plan = load_lock(cpu_plan(tmp_path, tiny_model, ", quantize: bnb-4bit"))
    section = plan.quantization.model_copy(update={"requires_packages": ["bitsandbytes>=99"]})
    mismatches = quantization_mismatches(plan.model_copy(update={"quantization": section}), detect_machine())
    installed = metadata.version("bitsandbytes")
    assert mismatches == [f"package bitsandbytes>=99 (bnb-4bit weights native): machine has bitsandbytes {installed}"]


def test_run_refuses_gpus_older_than_the_quantized_weights_need():
    from planc.detect import DetectedGpu, DetectedMachine
    from planc.run.checks import quantization_mismatches

    plan = compile_config(corpus("qwen3-32b-fp8"), [{"type": "rtx4090", "count": 2}])
    machine = DetectedMachine((DetectedGpu(0, "NVIDIA GeForce RTX 4090", 24 * GiB, "8.9"),
                               DetectedGpu(1, "NVIDIA GeForce RTX 3090", 24 * GiB, "8.6")), 64 * GiB)
    mismatches = quantization_mismatches(plan, machine)
    assert "GPU 1 compute capability for fp8 weights: plan needs 8.9+, machine 8.6" in mismatches


# ------------------------------------------------------------------ exports


def test_a_quantized_plan_exports_its_quantization_config(tiny_model, tmp_path):
    """The transformers export passes the same quantization_config planc run does (and loads the same tokens);
    accelerate's loader cannot swap quantized modules in and refuses."""
    import subprocess
    import sys

    from planc.export import export_plan

    lock = cpu_plan(tmp_path, tiny_model, ", quantize: {method: bnb-4bit, quant_type: nf4, double_quant: true}")
    data = json.loads(export_plan(lock, "transformers", "json"))
    assert data["from_pretrained"]["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    script = tmp_path / "load.py"
    script.write_text(export_plan(lock, "transformers", "python", output=script))
    driver = ("import runpy, json, sys; s = runpy.run_path(sys.argv[1]); m, t = s['load'](); "
              "print(json.dumps(s['generate'](m, t, json.loads(sys.argv[2]), 8)))")
    env = {key: value for key, value in __import__("os").environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", driver, str(script), json.dumps(PROMPTS)], capture_output=True,
                            text=True, env={**env, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == planc_tokens(lock)
    with pytest.raises(SpecError, match="use --to transformers"):
        export_plan(lock, "accelerate", "json")


def test_vllm_export_names_the_quantization():
    from planc.export.vllm import vllm_export

    plan = compile_config(corpus("qwen3-32b-fp8"), [{"type": "rtx4090", "count": 2}], model={"kv_cache": "fp8"})
    exported = vllm_export(plan, CORPUS, "Qwen/Qwen3-32B-FP8")
    assert exported.config["quantization"] == "fp8" and exported.config["kv-cache-dtype"] == "fp8"

"""The compatibility knowledge base (planc/rules/*.yaml) and the engine that applies it."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import planc.rules
from planc.errors import SpecError
from planc.hardware import Gpu
from planc.rules import (
    ModelFacts,
    arch_list,
    build_rulebook,
    decide_runtime,
    load_rulebook,
    parse_rule_file,
)

GiB = 2**30


def v100(index: int) -> Gpu:
    return Gpu(
        index=index, name="Tesla V100-SXM2-16GB", memory=16945512448, compute_capability="7.0", bandwidth=900 * 10**9
    )


def rtx2080ti(index: int) -> Gpu:
    return Gpu(index, "NVIDIA GeForce RTX 2080 Ti", 11 * GiB, "7.5", 616 * 10**9)


def rtx3090(index: int) -> Gpu:
    return Gpu(index, "NVIDIA GeForce RTX 3090", 24 * GiB, "8.6", 936 * 10**9)


def a100(index: int) -> Gpu:
    return Gpu(index, "NVIDIA A100-SXM4-80GB", 80 * GiB, "8.0", 2039 * 10**9)


def h100(index: int) -> Gpu:
    return Gpu(index, "NVIDIA H100 80GB HBM3", 80 * GiB, "9.0", 3350 * 10**9)


def facts(**overrides) -> ModelFacts:
    values = dict(
        model_type="qwen3",
        checkpoint_dtype="bfloat16",
        is_moe=False,
        head_dim=128,
        forced_attn_implementation=None,
        skip_keys=("past_key_values",),
    )
    values.update(overrides)
    return ModelFacts(**values)


def ids(runtime) -> list[str]:
    return [decision.id for decision in runtime.decisions]


def decision(runtime, rule_id: str):
    (found,) = [d for d in runtime.decisions if d.id == rule_id]
    return found


# --- behaviour on real inventories -------------------------------------------------------------


def test_two_v100_auto_runs_float16_on_mem_efficient_attention():
    runtime = decide_runtime([v100(0), v100(1)], facts(), "auto")
    assert runtime.dtype == "float16"
    assert runtime.attn_implementation == "sdpa"
    assert runtime.sdpa_backends == ("efficient", "math")
    assert runtime.backend_per_gpu == {0: "efficient", 1: "efficient"}
    assert runtime.env["TORCH_CUDA_ARCH_LIST"] == "7.0+PTX"
    assert "TORCH_CUDNN_SDPA_DEPRIORITIZED" not in runtime.env
    assert "sm70" in decision(runtime, "dtype.auto-fp16-below-sm80").reason


def test_bfloat16_forced_on_v100_is_a_spec_error_naming_the_gpus():
    with pytest.raises(SpecError) as caught:
        decide_runtime([v100(0), v100(1)], facts(), "bfloat16")
    message = str(caught.value)
    assert "\n" not in message
    assert "sm70" in message and "GPU 0,1" in message
    assert "cutlassF: no kernel found to launch" in message
    assert "float16 or auto" in message
    assert "dtype.bf16-needs-sm80" in message


def test_turing_plus_ampere_picks_float16_and_a_backend_per_gpu():
    runtime = decide_runtime([rtx2080ti(0), rtx3090(1)], facts(), "auto")
    assert runtime.dtype == "float16"
    assert runtime.env["TORCH_CUDA_ARCH_LIST"] == "7.5 8.6+PTX"
    # PyTorch selects per call on the device's capability, so flash stays enabled for the 3090.
    assert runtime.sdpa_backends == ("flash", "efficient", "math")
    assert runtime.backend_per_gpu == {0: "efficient", 1: "flash"}
    assert "sdpa.mixed-architectures" in ids(runtime)
    assert "sm86" in decision(runtime, "sdpa.cudnn-off").reason


def test_two_a100_run_bfloat16_on_flash_with_cudnn_left_off():
    runtime = decide_runtime([a100(0), a100(1)], facts(), "auto")
    assert runtime.dtype == "bfloat16"
    assert runtime.sdpa_backends == ("flash", "efficient", "math")
    assert runtime.backend_per_gpu == {0: "flash", 1: "flash"}
    assert decision(runtime, "sdpa.cudnn-off").decision == "cudnn disabled"
    assert runtime.env["TORCH_CUDA_ARCH_LIST"] == "8.0+PTX"


def test_h100_turns_cudnn_attention_off_and_deprioritises_it():
    runtime = decide_runtime([h100(0)], facts(), "auto")
    assert runtime.dtype == "bfloat16"
    assert "cudnn" not in runtime.sdpa_backends
    assert runtime.backend_per_gpu == {0: "flash"}
    assert runtime.env["TORCH_CUDNN_SDPA_DEPRIORITIZED"] == "1"
    hopper = decision(runtime, "sdpa.cudnn-off-hopper")
    assert "pytorch/pytorch#139298" in hopper.source
    assert "sdpa.cudnn-off" not in ids(runtime)


def test_gemma2_config_forcing_eager_runs_the_math_path_everywhere():
    runtime = decide_runtime([a100(0), a100(1)], facts(model_type="gemma2", forced_attn_implementation="eager"), "auto")
    assert runtime.attn_implementation == "eager"
    assert runtime.backend_per_gpu == {0: "math", 1: "math"}
    assert "gemma2" in decision(runtime, "attn.config-forces-eager").reason
    assert "attn.sdpa" not in ids(runtime)


def test_moe_in_float16_runs_experts_eagerly_and_bfloat16_keeps_the_default():
    moe = facts(model_type="qwen3_moe", is_moe=True)
    on_v100 = decide_runtime([v100(0)], moe, "auto")
    assert on_v100.experts_implementation == "eager"
    assert "field-notes section 2" in decision(on_v100, "moe.experts-eager").source
    assert decide_runtime([a100(0)], moe, "auto").experts_implementation is None
    assert decide_runtime([a100(0)], moe, "float32").experts_implementation == "eager"
    assert decide_runtime([v100(0)], facts(), "auto").experts_implementation is None


def test_models_without_mixers_get_no_mixer_decision():
    runtime = decide_runtime([a100(0)], facts(), "auto", "kernels")
    assert runtime.mixer_path is None and runtime.mixer_requires == {}
    assert not [i for i in ids(runtime) if i.startswith("mixers.")]


def test_mixers_default_to_the_torch_fallback():
    runtime = decide_runtime([a100(0)], facts(model_type="qwen3_next", mixer_families=("gated_deltanet",)), "auto")
    assert runtime.mixer_path == "fallback" and runtime.mixer_requires == {}
    assert decision(runtime, "mixers.fallback").decision == "gated_deltanet layers on the fallback path"


@pytest.mark.parametrize(
    ("families", "requires"),
    [
        (("gated_deltanet",), {"causal_conv1d": "causal-conv1d", "fla": "flash-linear-attention"}),
        (("kimi_delta",), {"causal_conv1d": "causal-conv1d", "fla": "flash-linear-attention"}),
        (("mamba2",), {"causal_conv1d": "causal-conv1d", "mamba_ssm": "mamba-ssm"}),
        (("mamba",), {"causal_conv1d": "causal-conv1d", "mamba_ssm": "mamba-ssm"}),
        (("short_conv",), {"causal_conv1d": "causal-conv1d"}),
        (("lightning",), {}),
    ],
)
def test_the_kernels_path_requires_each_familys_packages(families, requires):
    runtime = decide_runtime([h100(0)], facts(mixer_families=families), "auto", "kernels")
    assert runtime.mixer_path == "kernels"
    assert runtime.mixer_requires == requires


def test_the_kernels_path_needs_gpus():
    with pytest.raises(SpecError, match=r"a CPU-only plan has no GPU to run them.*\(rule mixers.kernels-need-gpus\)"):
        decide_runtime([], facts(mixer_families=("mamba2",)), "auto", "kernels")


def test_cpu_only_auto_is_float32_without_cuda_environment():
    runtime = decide_runtime([], facts(), "auto")
    assert runtime.dtype == "float32"
    assert runtime.env == {}
    assert runtime.backend_per_gpu == {}
    assert runtime.sdpa_backends == ("flash", "math")
    assert not any(d.id.startswith("env.") for d in runtime.decisions)


def test_cpu_only_half_precision_is_allowed_with_a_warning():
    runtime = decide_runtime([], facts(), "float16")
    assert runtime.dtype == "float16"
    assert decision(runtime, "dtype.cpu-half-precision").decision.startswith("warning:")


def test_float16_checkpoint_stays_float16_on_ampere():
    runtime = decide_runtime([a100(0)], facts(checkpoint_dtype="float16"), "auto")
    assert runtime.dtype == "float16"
    assert ids(runtime)[0] == "dtype.auto-keep-fp16-checkpoint"
    for checkpoint in ("float32", None):
        assert decide_runtime([a100(0)], facts(checkpoint_dtype=checkpoint), "auto").dtype == "bfloat16"


def test_forced_float32_is_recorded_and_never_uses_flash():
    runtime = decide_runtime([v100(0), a100(1)], facts(), "float32")
    assert runtime.dtype == "float32"
    assert decision(runtime, "dtype.requested").decision == "dtype float32"
    assert runtime.sdpa_backends == ("efficient", "math")
    assert runtime.backend_per_gpu == {0: "efficient", 1: "efficient"}


def test_head_dim_beyond_flash_falls_to_mem_efficient():
    runtime = decide_runtime([a100(0)], facts(head_dim=512), "auto")
    assert runtime.backend_per_gpu == {0: "efficient"}
    assert "flash" not in runtime.sdpa_backends


def test_skip_keys_are_passed_or_their_absence_warned_about():
    with_keys = decide_runtime([a100(0), a100(1)], facts(), "auto")
    assert "past_key_values" in decision(with_keys, "dispatch.skip-keys").decision
    without = decide_runtime([a100(0), a100(1)], facts(skip_keys=()), "auto")
    warning = decision(without, "dispatch.no-skip-keys")
    assert warning.decision.startswith("warning:")
    assert "accelerate#1394" in warning.source
    single = decide_runtime([a100(0)], facts(skip_keys=()), "auto")
    assert not any(d.id.startswith("dispatch.") for d in single.decisions)


def test_env_pins_device_order_and_allocator():
    runtime = decide_runtime([a100(0)], facts(), "auto")
    assert runtime.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert runtime.env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_arch_list_is_the_sorted_union_with_ptx_on_the_last_entry():
    assert arch_list([h100(0), a100(1), a100(2), rtx2080ti(3)]) == "7.5 8.0 9.0+PTX"
    assert arch_list([]) == ""


def test_unknown_requested_dtype_is_a_spec_error():
    with pytest.raises(SpecError, match="dtype must be"):
        decide_runtime([a100(0)], facts(), "fp8")


def test_model_facts_reject_an_unnormalised_checkpoint_dtype():
    with pytest.raises(ValueError):
        facts(checkpoint_dtype="torch.bfloat16")


def test_decisions_are_deterministic_and_independent_of_input_order():
    gpus = [rtx2080ti(0), rtx3090(1), h100(2)]
    first = decide_runtime(gpus, facts(skip_keys=()), "auto")
    assert decide_runtime(gpus, facts(skip_keys=()), "auto") == first
    assert decide_runtime(list(reversed(gpus)), facts(skip_keys=()), "auto") == first


DTYPE_SETTERS = {rule.id for rule in load_rulebook().stage("dtype") if dict(rule.effect).get("dtype")}


@pytest.mark.parametrize("requested", ["auto", "bfloat16", "float16", "float32"])
@pytest.mark.parametrize("checkpoint", ["bfloat16", "float16", "float32", None])
@pytest.mark.parametrize(
    "inventory", [(), ("7.0",), ("7.5", "8.6"), ("8.0",), ("8.0", "9.0"), ("9.0",), ("12.0",), ("6.1", "8.9")]
)
def test_exactly_one_dtype_rule_decides_every_input(requested, checkpoint, inventory):
    gpus = [Gpu(i, f"GPU{cc}", 16 * GiB, cc, 10**12) for i, cc in enumerate(inventory)]
    old = any(gpu.sm < 80 for gpu in gpus)
    if requested == "bfloat16" and old:
        with pytest.raises(SpecError):
            decide_runtime(gpus, facts(checkpoint_dtype=checkpoint), requested)
        return
    runtime = decide_runtime(gpus, facts(checkpoint_dtype=checkpoint), requested)
    assert len([d for d in runtime.decisions if d.id in DTYPE_SETTERS]) == 1
    if requested == "auto":
        expected = "float32" if not gpus else "float16" if old or checkpoint == "float16" else "bfloat16"
        assert runtime.dtype == expected


CAPABILITIES = ["5.2", "6.1", "7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]


@settings(max_examples=200, deadline=None)
@given(
    capabilities=st.lists(st.sampled_from(CAPABILITIES), max_size=5),
    requested=st.sampled_from(["auto", "float16", "float32"]),
    head_dim=st.sampled_from([64, 128, 192, 256, 512]),
    forced=st.sampled_from([None, "eager", "sdpa"]),
    is_moe=st.booleans(),
)
def test_runtime_invariants(capabilities, requested, head_dim, forced, is_moe):
    gpus = [Gpu(i, f"GPU{cc}", 16 * GiB, cc, 10**12) for i, cc in enumerate(capabilities)]
    model = facts(head_dim=head_dim, forced_attn_implementation=forced, is_moe=is_moe)
    runtime = decide_runtime(gpus, model, requested)
    assert runtime.sdpa_backends[-1] == "math"
    assert "cudnn" not in runtime.sdpa_backends
    assert set(runtime.backend_per_gpu) == {gpu.index for gpu in gpus}
    for gpu in gpus:
        backend = runtime.backend_per_gpu[gpu.index]
        assert backend in runtime.sdpa_backends
        if backend == "flash":
            assert gpu.sm >= 80 and runtime.dtype != "float32" and head_dim <= 256
        if runtime.attn_implementation == "eager":
            assert backend == "math"
    assert bool(runtime.env) == bool(gpus)
    assert (runtime.experts_implementation == "eager") == (is_moe and runtime.dtype != "bfloat16")
    assert len(set(ids(runtime))) == len(runtime.decisions)
    assert all(d.reason and d.source and d.decision and "{" not in d.reason for d in runtime.decisions)


# --- the knowledge base as data ------------------------------------------------------------------


def bundled_files() -> dict[str, str]:
    folder = resources.files("planc").joinpath("rules")
    return {entry.name: entry.read_text() for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def test_planc_rules_is_the_module_and_the_yaml_is_package_data():
    assert planc.rules.__file__.endswith("rules.py")
    assert hasattr(planc.rules, "decide_runtime")
    assert "dtype.bf16-needs-sm80" in resources.files("planc").joinpath("rules/dtype.yaml").read_text()


def test_every_bundled_rule_is_complete_and_ids_are_unique():
    seen = []
    for name, text in sorted(bundled_files().items()):
        for stage, rules in yaml.safe_load(text).items():
            for rule in rules:
                assert set(rule) == {"id", "when", "effect", "reason", "source"}, (name, rule.get("id"))
                assert rule["reason"].strip() and rule["source"].strip()
                seen.append(rule["id"])
    assert len(seen) == len(set(seen))
    assert {"dtype.bf16-needs-sm80", "sdpa.flash-sm80", "sdpa.cudnn-off-hopper", "env.arch-list"} <= set(seen)


RULE = """
dtype:
  - id: dtype.example
    when: {when}
    effect: {effect}
    reason: "an example reason for {{gpus}}"
    source: "tests"
"""


def rule_file(when: str = "{requested_dtype: auto}", effect: str = "{dtype: float16}") -> str:
    return RULE.format(when=when, effect=effect)


def test_example_rule_file_parses():
    (rule,) = parse_rule_file(rule_file(), "example.yaml")
    assert rule.id == "dtype.example" and rule.stage == "dtype"


@pytest.mark.parametrize(
    "text, message",
    [
        (rule_file(when="{any_gpu_sm_blow: 80}"), "unknown condition key 'any_gpu_sm_blow'"),
        (rule_file(when="{not: {gpu_sm: 80}}"), "unknown condition key 'gpu_sm'"),
        (rule_file(effect="{dtype: float8}"), "effect 'dtype'"),
        (rule_file(effect="{colour: red}"), "unknown effect 'colour'"),
        (rule_file(when="{requested_dtype: bf16}"), "condition 'requested_dtype'"),
        (rule_file(when="{any_gpu_sm_below: eighty}"), "condition 'any_gpu_sm_below'"),
        (rule_file(when="{dtype: float16}"), "decided in stage 'attention'"),
        (rule_file(when="{sm_between: [80, 89]}"), "per-GPU stage"),
        (rule_file(effect="{supports: flash}"), "not allowed in stage 'dtype'"),
        (RULE.format(when="{}", effect="{dtype: float16}").replace("{gpus}", "{gpu_name}"), "unknown placeholder"),
        (RULE.format(when="{}", effect="{dtype: float16}").replace('    source: "tests"\n', ""), "missing source"),
        (RULE.format(when="{}", effect="{dtype: float16}") + "    extra: 1\n", "unknown key extra"),
        (RULE.format(when="{}", effect="{dtype: float16}").replace("dtype.example", "Example"), "dotted"),
        (RULE.format(when="{}", effect="{dtype: float16}").replace("dtype:\n", "precision:\n"), "unknown stage"),
        (RULE.format(when="{}", effect="{dtype: float16}") + "    when: {}\n", "duplicate key 'when'"),
    ],
)
def test_malformed_rule_files_fail_at_load(text, message):
    with pytest.raises(SpecError, match="example.yaml") as caught:
        parse_rule_file(text, "example.yaml")
    assert message in str(caught.value)


def test_duplicate_rule_ids_across_files_fail_at_load():
    with pytest.raises(SpecError, match="also defined in a.yaml"):
        build_rulebook([("a.yaml", rule_file()), ("b.yaml", rule_file())])


def test_rulebook_orders_by_stage_then_file():
    book = build_rulebook(sorted(bundled_files().items()))
    stages = [rule.stage for rule in book.rules]
    assert stages == sorted(stages, key=planc.rules.STAGES.index)
    assert book == load_rulebook()


def _condition_keys(when) -> set[str]:
    keys = set()
    for key, value in when:
        keys.add(key)
        if key == "not":
            keys |= _condition_keys(value)
    return keys


def test_the_bundled_rules_use_the_whole_language():
    # Vocabulary no rule uses is dead code: the language stays as small as the knowledge.
    rules = load_rulebook().rules
    assert set().union(*(_condition_keys(rule.when) for rule in rules)) == set(planc.rules._CONDITIONS)
    assert {key for rule in rules for key, _ in rule.effect} == set(planc.rules._EFFECTS)
    assert {rule.stage for rule in rules} == set(planc.rules.STAGES)


def test_xlnet_generates_only_in_float32_so_auto_plans_it_there_and_half_precision_is_refused(tmp_path):
    # Held to transformers itself: when its XLNet generates in bfloat16, these rules must go.
    import torch
    from click.testing import CliRunner
    from hybrid_models import compile_for_a100s
    from transformers import XLNetConfig, XLNetLMHeadModel

    from planc.cli import main

    config = XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, d_inner=64, architectures=["XLNetLMHeadModel"])
    prompt = torch.tensor([[1, 2, 3]])
    model = XLNetLMHeadModel(config).eval()
    with torch.no_grad():
        assert model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape == (1, 5)
        for dtype in (torch.bfloat16, torch.float16):
            with pytest.raises(RuntimeError, match="same dtype"):
                model.to(dtype).generate(prompt, max_new_tokens=2, do_sample=False)

    plan = compile_for_a100s(tmp_path, config.to_dict(), 1, 64)
    assert plan.dtype == "float32"
    assert "dtype.auto-float32-half-precision-fails" in [d.id for d in plan.decisions]

    spec = (tmp_path / "spec.yaml").read_text().replace("model: {config: config.json}",
                                                       "model: {config: config.json, dtype: bfloat16}")
    (tmp_path / "spec.yaml").write_text(spec)
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "half.lock")])
    assert result.exit_code == 2
    assert "generates only in float32" in result.output and "set dtype to float32 or auto" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "half.lock").exists()

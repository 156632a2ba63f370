"""planc run on hybrid models: tiny random models of each mixer family, saved with save_pretrained
(Mamba2-family configs then carry transformers' tagged Infinity), compiled by planc and generated
on the CPU with the tokens plain transformers gives; with layers offloaded to disk (accelerate's
hooks stream their weights in, which the decode path's direct conv1d.weight reads used to skip);
and a plan that assumes the CUDA kernels refused where they do not import."""

from __future__ import annotations

import json

import pytest

from hybrid_models import FAMILIES, ZAMBA2_TWO_BLOCKS, build_tiny_hybrid
from planc.errors import DriftError
from planc.memory import CPU_PROCESS_RESERVE
from planc.plan import load_lock
from planc.run import run_plan
from test_run import CPU_SPEC, MAX_NEW_TOKENS, PROMPTS, compile_to, plain_transformers_tokens, planc_cli

# Gated DeltaNet, Mamba2 beside attention, pure Mamba2 (its cache passed as cache_params), a short
# convolution, Falcon-H1's hybrid layers (attention and Mamba2 in one layer), Zamba / Zamba2,
# whose hybrid layers call a transformer block they share (tied weights; Zamba2 with two blocks
# used in turn and per-layer adapters), ZAYA's and Inkling's attention with convolution states,
# Kimi delta attention beside GLM-5-Next's k-pool indexer, and Unlimited-OCR's reference sliding
# window (generated tokens slide past the prompt's); the other families' caches are held to the
# real ones in test_hybrid.py.
RUN_FAMILIES = [
    "qwen3_next", "bamba", "mamba2", "lfm2", "falcon_h1", "zamba", "zamba2_two_blocks", "zaya", "inkling_text",
    "inkling2_text", "glm5_next", "unlimited_ocr",
]


@pytest.fixture(scope="module")
def hybrid_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid-models")
    models = {name: build_tiny_hybrid(root / name, name) for name in RUN_FAMILIES if name in FAMILIES}
    models["zamba2_two_blocks"] = build_tiny_hybrid(root / "zamba2_two_blocks", "zamba2", **ZAMBA2_TWO_BLOCKS)
    return models


def test_a_saved_mamba2_config_carries_tagged_infinity_and_compiles(hybrid_models, tmp_path):
    config = json.loads((hybrid_models["bamba"] / "config.json").read_text())
    assert config["time_step_limit"] == [0.0, {"__float__": "Infinity"}]

    plan = load_lock(compile_to(tmp_path, CPU_SPEC.format(model=hybrid_models["bamba"], policy="")))

    assert plan.mixers.families == ["mamba2"] and plan.mixers.path == "fallback"
    assert plan.format_version == "1.1"


@pytest.mark.parametrize("family", RUN_FAMILIES)
def test_a_cpu_plan_generates_the_tokens_of_plain_transformers(hybrid_models, tmp_path, family):
    model = hybrid_models[family]
    lock = compile_to(tmp_path, CPU_SPEC.format(model=model, policy=""))

    outcome = run_plan(lock, prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS, quiet=True)

    assert outcome.exit_code == 0
    assert [c.token_ids for c in outcome.completions] == plain_transformers_tokens(model, PROMPTS, MAX_NEW_TOKENS)


def _offloaded_and_whole_tokens(model, folder, resident: float = 0.5) -> tuple[list, list]:
    """Tokens of a CPU plan with room for `resident` of the weights (the rest on disk), and those of
    plain transformers."""
    (folder / "roomy").mkdir()
    roomy = load_lock(compile_to(folder / "roomy", CPU_SPEC.format(model=model, policy="")))
    ledger = roomy.memory[0]
    running = ledger.total - ledger.weights - CPU_PROCESS_RESERVE
    largest_unit = max(ledger.weights // len(roomy.device_map), 1)
    cpu_memory = CPU_PROCESS_RESERVE + int(running * 1.05) + 2 * largest_unit + int(ledger.weights * resident)
    spec = f"""\
planc: 1
model: {{path: {model}}}
hardware: {{gpus: [], cpu_memory: {cpu_memory}, disk: offload/}}
workload: {{batch_size: 2, max_seq_len: 64}}
policy: {{offload: disk}}
"""
    lock = compile_to(folder, spec)
    placed = load_lock(lock).device_map
    assert {"cpu", "disk"} <= set(placed.values()), placed
    assert any(name.startswith(("model.layers.", "backbone.layers.")) for name, device in placed.items() if device == "disk")
    outcome = run_plan(lock, prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS, quiet=True)
    return [c.token_ids for c in outcome.completions], plain_transformers_tokens(model, PROMPTS, MAX_NEW_TOKENS)


# Zamba2's two shared blocks (with every caller's adapters) are 68% of its weights and stay resident.
@pytest.mark.parametrize(("family", "resident"), [("qwen3_next", 0.5), ("bamba", 0.5), ("zamba2_two_blocks", 0.72)])
def test_layers_offloaded_to_disk_generate_the_same_tokens(hybrid_models, tmp_path, family, resident):
    """Disk entries keep their weights off the device; accelerate's hooks load them per module, and
    the decode step's causal_conv1d_update reads conv1d.weight without calling conv1d: transformers
    5.23 fires that hook for it (force_accelerate_hooks), so the tokens match the model in memory."""
    offloaded, whole = _offloaded_and_whole_tokens(hybrid_models[family], tmp_path, resident)

    assert offloaded == whole
    if family == "zamba2_two_blocks":
        # The layers sharing a block stay resident on the CPU with it; others went to disk.
        placed = load_lock(tmp_path / "plan.lock").device_map
        assert {placed[f"model.layers.{i}"] for i in (1, 3, 5, 7)} == {"cpu"}


def test_without_transformers_hook_fix_the_offloaded_plan_breaks(hybrid_models, tmp_path, monkeypatch):
    """The check above can fail: undo transformers' force_accelerate_hooks on the gated DeltaNet
    (its forward as before PR #46978) and the disk-offloaded layers' conv1d weights stay on meta:
    the output is garbage, as users saw."""
    from transformers.models.qwen3_next import modeling_qwen3_next

    mixer = modeling_qwen3_next.Qwen3NextGatedDeltaNet
    monkeypatch.setattr(mixer, "forward", mixer.forward.__wrapped__)

    offloaded, whole = _offloaded_and_whole_tokens(hybrid_models["qwen3_next"], tmp_path)

    assert offloaded != whole


def test_a_kernels_plan_is_refused_where_the_kernels_do_not_import(hybrid_models, tmp_path):
    """Planned for the CUDA kernels on a GPU; this machine has neither the GPU nor the packages,
    and `planc run` lists both, the packages by the import transformers itself attempts."""
    spec = f"""\
planc: 1
model: {{path: {hybrid_models["qwen3_next"]}}}
hardware: {{gpus: [{{type: a100-sxm4-80gb}}], cpu_memory: 8GiB}}
workload: {{batch_size: 1, max_seq_len: 64}}
policy: {{mixer_kernels: kernels}}
"""
    lock = compile_to(tmp_path, spec)
    plan = load_lock(lock)
    assert plan.mixers.path == "kernels"
    assert plan.mixers.requires == {"causal_conv1d": "causal-conv1d", "fla": "flash-linear-attention"}

    with pytest.raises(DriftError) as refused:
        run_plan(lock, prompts=PROMPTS[:1], quiet=True)

    kernels = [m for m in refused.value.mismatches if m.startswith("mixer kernels")]
    assert kernels == [
        "mixer kernels: plan runs its gated_deltanet layers on causal-conv1d (import causal_conv1d), machine cannot "
        "import it (ModuleNotFoundError: No module named 'causal_conv1d'); install causal-conv1d or recompile with "
        "policy.mixer_kernels: fallback",
        "mixer kernels: plan runs its gated_deltanet layers on flash-linear-attention (import fla), machine cannot "
        "import it (ModuleNotFoundError: No module named 'fla'); install flash-linear-attention or recompile with "
        "policy.mixer_kernels: fallback",
    ]


def test_kernels_for_a_cpu_only_plan_are_bad_input(hybrid_models, tmp_path):
    (tmp_path / "spec.yaml").write_text(CPU_SPEC.format(model=hybrid_models["bamba"], policy=", mixer_kernels: kernels"))

    result = planc_cli("compile", "spec.yaml", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: policy.mixer_kernels: kernels plans the CUDA kernels of the mamba2 layers, and a CPU-only plan has "
        "no GPU to run them; use policy.mixer_kernels: fallback (rule mixers.kernels-need-gpus)"
    ]
    assert not (tmp_path / "plan.lock").exists()



@pytest.mark.parametrize("family", ["qwen3_next", "bamba", "unlimited_ocr"])
def test_a_chunked_prefill_carries_the_states_across_chunks(hybrid_models, tmp_path, family):
    """Fallback plans lean on chunked prefill to fit the mixers' transients: each chunk starts from
    the conv window and recurrent state the previous one left, and the tokens are those of an
    unchunked prefill."""
    model = hybrid_models[family]
    prompts = ["The quick brown fox jumps over the lazy dog and", "A device map places each decoder layer"]
    lock = compile_to(tmp_path, CPU_SPEC.format(model=model, policy="").replace("max_seq_len: 64", "max_seq_len: 64, prefill_chunk_size: 3"))
    assert load_lock(lock).generation.prefill_chunk_size == 3

    outcome = run_plan(lock, prompts=prompts, max_new_tokens=MAX_NEW_TOKENS, quiet=True)

    assert [c.token_ids for c in outcome.completions] == plain_transformers_tokens(model, prompts, MAX_NEW_TOKENS)


def test_an_exported_kernels_plan_refuses_to_start_without_the_kernels(hybrid_models, tmp_path):
    """`planc export` of a kernels plan: the plain-transformers script checks the packages the way
    `planc run` does before it loads anything."""
    import subprocess
    import sys

    spec = f"""\
planc: 1
model: {{path: {hybrid_models["bamba"]}}}
hardware: {{gpus: [{{type: a100-sxm4-80gb}}], cpu_memory: 8GiB}}
workload: {{batch_size: 1, max_seq_len: 64}}
policy: {{mixer_kernels: kernels}}
"""
    compile_to(tmp_path, spec)
    assert planc_cli("export", "plan.lock", "--to", "transformers", "--format", "python", "-o", "run.py", cwd=tmp_path).returncode == 0

    result = subprocess.run([sys.executable, "run.py", "hello"], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "this plan needs causal-conv1d (import causal_conv1d failed: No module named 'causal_conv1d'); "
        "install it or recompile with policy.mixer_kernels: fallback"
    )

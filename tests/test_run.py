"""planc run: a compiled plan executes on the CPU with the tokens plain transformers gives, or is
refused with the reason. Real components: a tiny Qwen3 saved with save_pretrained, compiled by
planc, loaded by transformers; the CLI is driven as a real process for the main path and a refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_spec
from planc.compile import compile_spec
from planc.errors import DriftError, LockError, RunError, UsageError
from planc.memory import CPU_PROCESS_RESERVE
from planc.plan import dump_lock, load_lock, write_if_changed
from planc.run import run_plan

PROMPTS = ["The quick brown fox", "A device map"]
MAX_NEW_TOKENS = 8

CPU_SPEC = """\
planc: 1
model: {{path: {model}}}
hardware: {{gpus: [], cpu_memory: 8GiB}}
workload: {{batch_size: 2, max_seq_len: 64}}
policy: {{offload: cpu{policy}}}
"""


def compile_to(folder: Path, spec_text: str) -> Path:
    """Write the spec, compile it, write plan.lock beside it; return the lock's path."""
    spec = write_spec(folder, spec_text)
    lock = folder / "plan.lock"
    _, text = compile_spec(spec, lock)
    write_if_changed(lock, text)
    return lock


def reseal(lock: Path, **update) -> None:
    """Rewrite the lock with some fields changed and a valid plan_hash (a lock from another world)."""
    plan = load_lock(lock).model_copy(update=update).sealed()
    lock.write_text(dump_lock(plan, "test"))


def cpu_lock(folder: Path, model: Path, policy: str = "") -> Path:
    return compile_to(folder, CPU_SPEC.format(model=model, policy=policy))


def plain_transformers_tokens(model: Path, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """What users get without planc: greedy generate in float32 on one left-padded batch."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    # Image-text-to-text models without a causal-LM class (GLM-5-Next, Unlimited-OCR) generate text too.
    causal = type(AutoConfig.from_pretrained(model)) in MODEL_FOR_CAUSAL_LM_MAPPING
    auto = AutoModelForCausalLM if causal else AutoModelForImageTextToText
    reference = auto.from_pretrained(model, dtype=torch.float32)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    output = reference.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    rows = output[:, batch["input_ids"].shape[1] :].tolist()
    eos = reference.generation_config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny model, for tests that change its files."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def planc_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-m", "planc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


# ------------------------------------------------------------------ the main path


def test_cli_runs_a_cpu_plan_with_the_tokens_of_plain_transformers(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)
    args = ["-q", "run", lock.name, "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]
    result = planc_cli(*args, *[a for p in PROMPTS for a in ("-p", p)], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # -q: no progress, no table
    report = json.loads(result.stdout)
    assert [r["token_ids"] for r in report["results"]] == plain_transformers_tokens(tiny_model, PROMPTS, MAX_NEW_TOKENS)
    assert [r["prompt"] for r in report["results"]] == PROMPTS
    assert report["plan_hash"] == load_lock(lock).plan_hash
    (cpu,) = report["memory"]
    assert cpu["device"] == "cpu" and cpu["predicted"] == load_lock(lock).memory[0].total and cpu["peak"] > 0
    assert set(report["timings"]) >= {"load_s", "generate_s", "new_tokens", "tokens_per_s"}


def test_one_prompt_streams_its_text(tiny_model, tmp_path, capsys):
    lock = cpu_lock(tmp_path, tiny_model)

    outcome = run_plan(lock, prompts=[PROMPTS[0]], max_new_tokens=4, quiet=True)

    assert outcome.exit_code == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPTS[0].split()[0])  # the streamer echoes the prompt, then the completion
    assert len(outcome.completions[0].token_ids) <= 4


def test_layers_offloaded_to_disk_give_the_same_tokens(tiny_model, tmp_path):
    # The CPU runs every layer, so besides resident weights it holds all KV cache, the activations
    # and a staging copy of each unit read back from disk: take those from an unconstrained plan,
    # then leave room for only half the weights.
    (tmp_path / "roomy").mkdir()
    roomy = load_lock(compile_to(tmp_path / "roomy", CPU_SPEC.format(model=tiny_model, policy="")))
    ledger = roomy.memory[0]
    running = ledger.total - ledger.weights - CPU_PROCESS_RESERVE
    largest_unit = max(ledger.weights // len(roomy.device_map), 1)
    cpu_memory = CPU_PROCESS_RESERVE + int(running * 1.05) + 2 * largest_unit + ledger.weights // 2
    spec = f"""\
planc: 1
model: {{path: {tiny_model}}}
hardware: {{gpus: [], cpu_memory: {cpu_memory}, disk: offload/}}
workload: {{batch_size: 2, max_seq_len: 64}}
policy: {{offload: disk}}
"""
    lock = compile_to(tmp_path, spec)
    placed = set(load_lock(lock).device_map.values())
    assert placed == {"cpu", "disk"}, placed

    outcome = run_plan(lock, prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS, quiet=True)

    assert [c.token_ids for c in outcome.completions] == plain_transformers_tokens(tiny_model, PROMPTS, MAX_NEW_TOKENS)


@pytest.mark.parametrize("kind", ["lines", "jsonl"])
def test_prompts_from_a_file(tiny_model, tmp_path, kind):
    lock = cpu_lock(tmp_path, tiny_model)
    prompts = tmp_path / "prompts.txt"
    lines = PROMPTS if kind == "lines" else [json.dumps({"prompt": p}) for p in PROMPTS]
    prompts.write_text("\n".join(lines) + "\n\n")

    outcome = run_plan(lock, prompt_file=prompts, max_new_tokens=2, as_json=True, quiet=True)

    assert [c.prompt for c in outcome.completions] == PROMPTS


def test_check_only_passes_on_a_matching_machine(tiny_model, tmp_path, capsys):
    lock = cpu_lock(tmp_path, tiny_model)

    outcome = run_plan(lock, check_only=True)

    assert outcome.exit_code == 0
    assert "this machine matches the plan" in capsys.readouterr().out


# ------------------------------------------------------------------ refusals


def test_cli_refuses_a_gpu_plan_on_a_machine_without_gpus(tiny_model, tmp_path):
    shutil.copy(tiny_model / "config.json", tmp_path / "config.json")
    write_spec(
        tmp_path,
        "planc: 1\nmodel: {config: config.json}\nhardware: {gpus: [{type: v100-sxm2-16gb}], cpu_memory: 8GiB}\n"
        "workload: {batch_size: 1, max_seq_len: 64}\n",
    )
    assert planc_cli("-q", "compile", "spec.yaml", cwd=tmp_path).returncode == 0

    result = planc_cli("run", "plan.lock", "-p", "hello", cwd=tmp_path)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: the machine does not match the plan: the plan needs 1 GPU (Tesla V100-SXM2-16GB x1); "
        "this machine has none"
    ]


def test_a_lock_edited_by_hand_is_refused(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)
    lock.write_text(lock.read_text().replace("batch_size: 2", "batch_size: 4"))

    with pytest.raises(LockError, match="plan_hash does not match"):
        run_plan(lock, prompts=PROMPTS, quiet=True)


def test_weights_changed_after_compile_are_refused(model_copy, tmp_path):
    lock = cpu_lock(tmp_path, model_copy)
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    weights.write_bytes(bytes(data))

    with pytest.raises(DriftError) as refused:
        run_plan(lock, prompts=PROMPTS, quiet=True)

    (mismatch,) = refused.value.mismatches
    assert mismatch.startswith("weight file model.safetensors sha256: plan sha256:")
    assert ", machine sha256:" in mismatch


def test_config_changed_after_compile_is_refused(model_copy, tmp_path):
    lock = cpu_lock(tmp_path, model_copy)
    config = model_copy / "config.json"
    config.write_text(config.read_text() + "\n")

    with pytest.raises(DriftError, match=r"model config.json sha256: plan sha256:\w+, machine sha256:"):
        run_plan(lock, prompts=PROMPTS, quiet=True)


def test_another_transformers_version_is_refused_under_exact(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model, policy=", versions: exact")
    plan = load_lock(lock)
    installed = plan.inputs.packages.transformers
    other = plan.inputs.packages.model_copy(update={"transformers": "4.0.0"})
    reseal(lock, inputs=plan.inputs.model_copy(update={"packages": other}))

    with pytest.raises(DriftError) as refused:
        run_plan(lock, prompts=PROMPTS, quiet=True)

    assert refused.value.mismatches == [f"transformers version (policy exact): plan 4.0.0, machine {installed}"]


def test_a_patch_release_passes_under_compatible(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model, policy=", versions: compatible")
    plan = load_lock(lock)
    major, minor, *_ = plan.inputs.packages.torch.split(".")
    other = plan.inputs.packages.model_copy(update={"torch": f"{major}.{minor}.99"})
    reseal(lock, inputs=plan.inputs.model_copy(update={"packages": other}))

    assert run_plan(lock, check_only=True, quiet=True).exit_code == 0


def test_every_mismatch_is_listed_at_once(model_copy, tmp_path):
    lock = cpu_lock(tmp_path, model_copy, policy=", versions: exact")
    plan = load_lock(lock)
    other = plan.inputs.packages.model_copy(update={"torch": "1.0.0", "accelerate": "0.1.0"})
    reseal(lock, inputs=plan.inputs.model_copy(update={"packages": other}))
    (model_copy / "model.safetensors").unlink()

    with pytest.raises(DriftError) as refused:
        run_plan(lock, prompts=PROMPTS, quiet=True)

    found = refused.value.mismatches
    assert [m.split(":")[0] for m in found] == [
        "torch version (policy exact)",
        "accelerate version (policy exact)",
        "weight file model.safetensors",
    ]
    assert found[-1].endswith("machine missing")


def test_a_device_map_naming_a_module_the_model_lacks_is_refused(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)
    device_map = dict(load_lock(lock).device_map)
    device_map["model.layers.9"] = "cpu"
    reseal(lock, device_map=device_map)

    with pytest.raises(DriftError, match=r"device_map entries: plan model.layers.9, machine's model has no such"):
        run_plan(lock, prompts=PROMPTS, quiet=True)


def test_a_device_map_missing_a_module_is_refused(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)
    device_map = {name: device for name, device in load_lock(lock).device_map.items() if name != "lm_head"}
    reseal(lock, device_map=device_map)

    with pytest.raises(DriftError, match=r"device_map coverage: plan places no device for lm_head.weight"):
        run_plan(lock, prompts=PROMPTS, quiet=True)


def test_skip_keys_other_than_the_models_are_refused(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)
    reseal(lock, skip_keys=[])

    with pytest.raises(DriftError, match=r"skip_keys: plan \[\], machine's model \['past_key_values'\]"):
        run_plan(lock, prompts=PROMPTS, quiet=True)


def test_a_model_loaded_elsewhere_than_planned_is_caught(tiny_model, tmp_path):
    """The after-loading check, against a model transformers placed by another map."""
    import torch
    from transformers import AutoModelForCausalLM

    from planc.run.load import placement_mismatches

    lock = cpu_lock(tmp_path, tiny_model)
    plan = load_lock(lock)
    elsewhere = {name: ("disk" if name.startswith("model.layers.") else "cpu") for name in plan.device_map}
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, device_map=elsewhere, offload_folder=str(tmp_path / "offload")
    )

    found = placement_mismatches(plan, model)

    assert found[0].startswith("hf_device_map after loading: model.layers.0.")
    assert "(disk instead of cpu)" in found[0]
    assert any(m.startswith("tensors after loading:") and "(meta instead of cpu)" in m for m in found)
    assert placement_mismatches(plan.model_copy(update={"device_map": elsewhere}), model) == []


def test_more_prompts_than_the_planned_batch_are_refused(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)

    with pytest.raises(UsageError, match="3 prompts exceed the plan's batch_size 2"):
        run_plan(lock, prompts=[*PROMPTS, "one more"], quiet=True)


def test_a_sequence_longer_than_the_plan_is_refused(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)

    with pytest.raises(UsageError, match=r"> the plan's max_seq_len 64"):
        run_plan(lock, prompts=PROMPTS, max_new_tokens=64, quiet=True)


# ------------------------------------------------------------------ --record / --expect


def test_record_then_expect_passes_and_an_altered_record_fails(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)
    record = tmp_path / "run.json"

    first = run_plan(lock, prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS, record=record, quiet=True)
    saved = json.loads(record.read_text())
    assert [o["token_ids"] for o in saved["outputs"]] == [c.token_ids for c in first.completions]
    assert saved["fingerprint"]["plan_hash"] == load_lock(lock).plan_hash
    assert all(o["sha256"].startswith("sha256:") for o in saved["outputs"])

    replay = run_plan(lock, expect=record, quiet=True)  # the record's prompts and max_new_tokens
    assert replay.exit_code == 0
    assert [c.token_ids for c in replay.completions] == [c.token_ids for c in first.completions]

    saved["outputs"][1]["token_ids"][2] += 1
    record.write_text(json.dumps(saved))
    altered = run_plan(lock, expect=record, quiet=True)
    assert altered.exit_code == 1
    assert altered.failure.startswith(
        'tokens differ from the record at prompt 2 ("A device map"), new token 3: record '
    )


def test_expect_refuses_other_prompts_than_the_records(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)
    record = tmp_path / "run.json"
    run_plan(lock, prompts=PROMPTS[:1], max_new_tokens=2, record=record, quiet=True)

    with pytest.raises(RunError, match="the prompts differ from the record's"):
        run_plan(lock, prompts=PROMPTS[1:], expect=record, quiet=True)


def test_a_lock_moved_away_from_its_model_is_refused(tiny_model, tmp_path):
    """The lock names the model folder relative to itself; moved alone, it points at nothing."""
    lock = cpu_lock(tmp_path, tiny_model)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    text = yaml.safe_load(lock.read_text())
    assert not Path(text["model"]["path"]).is_absolute()
    shutil.copy(lock, moved / "plan.lock")

    with pytest.raises(DriftError, match="machine cannot read it"):
        run_plan(moved / "plan.lock", check_only=True, quiet=True)


# ------------------------------------------------------------------ what a lock may make planc do
# plan_hash is a checksum anyone can recompute: each lock below has a valid one, and a real
# `planc run` still refuses it before it sets a variable, reads a path or loads anything.


def _refused_by_a_real_run(lock: Path, *extra: str) -> str:
    result = planc_cli("run", lock.name, "-p", "hello", "--max-new-tokens", "2", *extra, cwd=lock.parent)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the lock asks for what planc does not do: ")
    return line


@pytest.mark.parametrize(
    "env,named",
    [
        ({"LD_PRELOAD": "/tmp/evil.so"}, "env 'LD_PRELOAD' is not a variable planc sets"),
        ({"PYTHONPATH": "/tmp"}, "env 'PYTHONPATH' is not a variable planc sets"),
        ({"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, "env CUDA_DEVICE_ORDER='FASTEST_FIRST' is not a value"),
        ({"TORCH_CUDA_ARCH_LIST": "8.6\n; rm -rf /"}, "env TORCH_CUDA_ARCH_LIST="),
    ],
    ids=["ld-preload", "pythonpath", "bad-value", "newline"],
)
def test_a_lock_setting_an_environment_no_rule_produces_is_refused(tiny_model, tmp_path, env, named):
    lock = cpu_lock(tmp_path, tiny_model)
    reseal(lock, env=env)
    line = _refused_by_a_real_run(lock)
    assert named in line
    assert "it sets CUBLAS_WORKSPACE_CONFIG, CUDA_DEVICE_ORDER" in line or "value" in line


def test_the_environment_rules_produce_is_what_a_lock_may_carry():
    from planc.rules import allowed_env

    allowed = allowed_env()
    for lock in (REPO / "plans").glob("*.lock"):
        for name, value in load_lock(lock).env.items():
            assert allowed[name].fullmatch(value), (lock.name, name, value)
    assert set(allowed) == {
        "CUBLAS_WORKSPACE_CONFIG", "CUDA_DEVICE_ORDER", "PYTORCH_CUDA_ALLOC_CONF", "TORCH_CUDA_ARCH_LIST",
        "TORCH_CUDNN_SDPA_DEPRIORITIZED",
    }


@pytest.mark.parametrize(
    "field,value,named",
    [
        ("model.path", "/etc", "model.path '/etc' is not a relative path"),
        ("model.path", "../" * 40 + "etc", "resolves to /etc, outside the lock's tree"),
        ("host.disk", "../" * 40 + "tmp/planc-elsewhere", "host.disk '"),
        ("model.config", "../" * 40 + "etc/hostname", "model.config '"),
        ("model.revision", "../../../../etc", "model.revision '../../../../etc' is not a branch, tag or commit"),
    ],
    ids=["absolute", "dotdot", "disk", "config", "revision"],
)
def test_a_lock_path_leaving_its_tree_is_refused(tiny_model, tmp_path, field, value, named):
    lock = cpu_lock(tmp_path, tiny_model)
    plan = load_lock(lock)
    section, key = field.split(".")
    update = {key: value, "path": None} if field == "model.config" else {key: value}  # one model source
    reseal(lock, **{section: getattr(plan, section).model_copy(update=update)})
    assert named in _refused_by_a_real_run(lock)


def test_a_model_outside_the_tree_runs_once_the_runner_trusts_its_folder(tmp_path, monkeypatch):
    """The repository's tiny model is outside tmp_path's tree and outside the tests' temp folder."""
    model = REPO / "examples" / "models" / "tiny-qwen3"
    lock = cpu_lock(tmp_path, model)
    assert "outside the lock's tree" in _refused_by_a_real_run(lock)

    monkeypatch.setenv("PLANC_TRUSTED_DIRS", os.pathsep.join([os.environ["PLANC_TRUSTED_DIRS"], str(model.parent)]))
    result = planc_cli("run", lock.name, "--check-only", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_flag_planc_never_writes_is_refused_when_the_lock_loads(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)
    plan = load_lock(lock)
    reseal(lock, attention=plan.attention.model_copy(update={"attn_implementation": "flash_attention_2"}))
    result = planc_cli("run", lock.name, "-p", "hello", cwd=tmp_path)
    assert result.returncode == 2
    assert "attention.attn_implementation: Input should be 'sdpa' or 'eager'" in result.stderr


def test_remote_code_in_a_lock_needs_the_runners_consent(tiny_model, tmp_path):
    lock = cpu_lock(tmp_path, tiny_model)
    reseal(lock, model=load_lock(lock).model.model_copy(update={"trust_remote_code": True}))
    assert "runs only with --trust-remote-code on the command line" in _refused_by_a_real_run(lock)

    result = planc_cli("run", lock.name, "--check-only", "--trust-remote-code", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_lock_asking_for_requirements_no_rule_names_is_refused(tiny_model, tmp_path):
    from planc.plan import WeightQuantization
    from planc.rules import allowed_requirements

    lock = cpu_lock(tmp_path, tiny_model)
    section = WeightQuantization(
        method="bnb-4bit", origin="load", weights="native", layout="nf4", config={"load_in_4bit": True},
        dense_weight_bytes=1, requires_packages=["bitsandbytes>=0.46.1", "evil-package==6.6.6"],
    )
    assert "bitsandbytes>=0.46.1" in allowed_requirements()
    reseal(lock, quantization=section)
    line = _refused_by_a_real_run(lock)
    assert "quantization.requires_packages names 'evil-package==6.6.6', which no rule requires" in line
    assert "bitsandbytes" not in line

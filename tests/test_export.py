"""`planc export`: the exported script, run in a fresh process with plain transformers or accelerate
(no planc imported), generates the tokens `planc run` generates; the JSON carries the same facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import PLANS, REPO, build_tiny_model
from planc.cli import main
from planc.export import target_names
from planc.plan import load_lock
from planc.run import run_plan
from planc.run.load import from_pretrained_settings
from test_run import CPU_SPEC, MAX_NEW_TOKENS, PROMPTS, compile_to, cpu_lock

# Runs an exported script the two ways users do: load() + generate() from their code, and as a
# script with a prompt on the command line.
DRIVER = """\
import contextlib, io, json, runpy, sys
path, prompts, max_new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
script = runpy.run_path(path)
model, tokenizer = script["load"]()
ids = script["generate"](model, tokenizer, prompts, max_new_tokens)
printed = io.StringIO()
sys.argv = [path, prompts[0]]
with contextlib.redirect_stdout(printed):
    runpy.run_path(path, run_name="__main__")
print(json.dumps({"ids": ids, "printed": printed.getvalue(), "planc": sorted(m for m in sys.modules if m.startswith("planc"))}))
"""


def export(lock: Path, target: str, output: Path, fmt: str = "python") -> Path:
    result = CliRunner().invoke(main, ["-q", "export", "--to", target, "--format", fmt, "-o", str(output), str(lock)])
    assert result.exit_code == 0, result.output
    return output


def run_script(script: Path, prompts: list[str]) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(script), json.dumps(prompts), str(MAX_NEW_TOKENS)],
        cwd=script.parent.parent, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def planc_tokens(lock: Path, prompts: list[str], max_new_tokens: int):
    return run_plan(lock, prompts=prompts, max_new_tokens=max_new_tokens, quiet=True).completions


@pytest.mark.parametrize("target", ["transformers", "accelerate"])
def test_exported_script_generates_the_tokens_of_planc_run(tiny_model, tmp_path, target, capsys):
    (tmp_path / "plans").mkdir()
    lock = cpu_lock(tmp_path / "plans", tiny_model)
    # Written to another folder than the lock's: the script finds the model relative to itself.
    script = export(lock, target, tmp_path / "exports" / f"load_{target}.py")

    got = run_script(script, PROMPTS)

    expected = planc_tokens(lock, PROMPTS, MAX_NEW_TOKENS)
    assert got["ids"] == [c.token_ids for c in expected]
    assert got["planc"] == []  # plain transformers/accelerate: planc was never imported
    (first,) = planc_tokens(lock, PROMPTS[:1], 32)
    capsys.readouterr()
    assert got["printed"] == first.text + "\n"


def test_accelerate_script_offloads_to_disk_as_planned(tmp_path):
    # A tied model, half of it on disk: the accelerate-specific paths (tie_weights, offload_folder).
    model = build_tiny_model(tmp_path / "tied", tie=True)
    (tmp_path / "roomy").mkdir()
    roomy = load_lock(compile_to(tmp_path / "roomy", CPU_SPEC.format(model=model, policy="")))
    ledger = roomy.memory[0]
    cpu_memory = ledger.total - ledger.weights // 2 + 2 * max(ledger.weights // len(roomy.device_map), 1)
    (tmp_path / "plans").mkdir()
    spec = CPU_SPEC.format(model=model, policy="").replace("cpu_memory: 8GiB", f"cpu_memory: {cpu_memory}, disk: offload/")
    lock = compile_to(tmp_path / "plans", spec.replace("offload: cpu", "offload: disk"))
    assert "disk" in load_lock(lock).device_map.values()
    script = export(lock, "accelerate", tmp_path / "exports" / "load.py")
    assert "'offload_folder': str(HERE / '../plans/offload')" in script.read_text()

    got = run_script(script, PROMPTS)

    assert got["ids"] == [c.token_ids for c in planc_tokens(lock, PROMPTS, MAX_NEW_TOKENS)]


def test_json_exports(tmp_path):
    lock = PLANS / "qwen3-8b-2080ti-3090.lock"
    plan = load_lock(lock)
    runner = CliRunner()

    out = runner.invoke(main, ["export", "--to", "transformers", str(lock)])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["from_pretrained"] == json.loads(json.dumps(from_pretrained_settings(plan, None)))
    assert list(data["from_pretrained"]["device_map"]) == list(plan.device_map)  # execution order kept
    assert data["model"] == {"path": os.path.relpath(REPO / "examples/models/qwen3-8b"), "weights": False}
    assert data["env"]["TORCH_CUDA_ARCH_LIST"] == "7.5 8.6+PTX" and data["env"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert data["generation"]["prefill_chunk_size"] == plan.generation.prefill_chunk_size
    assert data["input_device"] == "cuda:0" and data["sdpa_backends"] == plan.attention.sdpa_backends

    (tmp_path / "deep").mkdir()
    written = tmp_path / "deep" / "accelerate.json"
    result = runner.invoke(main, ["export", "--to", "accelerate", "-o", str(written), str(lock), "--model", "org/qwen"])
    assert result.exit_code == 0 and "wrote" in result.output
    dispatch = json.loads(written.read_text())["load_checkpoint_and_dispatch"]
    assert dispatch["no_split_module_classes"] == ["Qwen3DecoderLayer"] and dispatch["skip_keys"] == ["past_key_values"]
    assert dispatch["max_memory"] == {"0": plan.max_memory["0"], "1": plan.max_memory["1"]}
    assert dispatch["checkpoint"] is None and json.loads(written.read_text())["model"]["id"] == "org/qwen"
    again = runner.invoke(main, ["export", "--to", "accelerate", "-o", str(written), str(lock), "--model", "org/qwen"])
    assert "unchanged" in again.output


def test_a_target_is_one_module(tmp_path, monkeypatch):
    import planc.export

    (tmp_path / "echo.py").write_text(
        "from planc.export._common import ExportTarget, common_settings, render_json\n"
        "TARGET = ExportTarget('echo', 'the common settings', lambda context: common_settings(context),"
        " {'json': render_json})\n"
    )
    monkeypatch.setattr(planc.export, "__path__", [*planc.export.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "planc.export.echo", raising=False)

    assert target_names() == ["accelerate", "echo", "transformers", "vllm"]
    data = json.loads(planc.export.export_plan(PLANS / "tiny-cpu.lock", "echo"))
    assert data["plan_hash"] == load_lock(PLANS / "tiny-cpu.lock").plan_hash


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--to", "transformers", "--format", "yaml"], "--to transformers writes json, python, not 'yaml'"),
        (["--to", "transformers", "missing.lock"], "cannot read lock missing.lock"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, expect):
    lock = [] if args[-1].endswith(".lock") else [str(PLANS / "tiny-cpu.lock")]
    result = CliRunner().invoke(main, ["export", *args, *lock])
    assert result.exit_code == 2
    assert expect in result.output and result.output.count("\n") == 1


def test_export_does_not_import_torch():
    """(--to accelerate consults transformers' checkpoint conversion table, which imports torch.)"""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "planc", "export", "--to", "transformers", "--format", "python",
         "plans/qwen3-8b-2080ti-3090.lock"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "accelerate"}

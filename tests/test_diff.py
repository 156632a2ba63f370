"""`planc diff`: two plans' differences in review order, from files or git, as text, markdown and JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import PLANS, REPO, CORPUS
from planc.cli import main
from planc.compile import compile_spec
from planc.diff import diff_plans, to_markdown
from planc.plan import load_lock, write_if_changed

SPEC = """\
planc: 1
model: {{config: config.json}}
hardware:
  gpus: [{{type: rtx2080ti}}, {{type: rtx3090}}]
  cpu_memory: 64GiB
workload: {{batch_size: 1, max_seq_len: {seq}}}
"""


def planc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "planc", *args], capture_output=True, text=True, cwd=cwd, env=env)


def compile_at(folder: Path, seq: int) -> Path:
    shutil.copy(CORPUS / "qwen3-8b" / "config.json", folder / "config.json")
    (folder / "spec.yaml").write_text(SPEC.format(seq=seq))
    lock = folder / "plan.lock"
    write_if_changed(lock, compile_spec(folder / "spec.yaml", lock)[1])
    return lock


def titles(diff) -> list[str]:
    return [section.title for section in diff.sections]


def changes(diff, title: str) -> dict[str, tuple]:
    section = next(s for s in diff.sections if s.title == title)
    return {c.subject: (c.before, c.after, c.note) for c in section.changes}


def test_the_same_plan_has_no_differences():
    plan = load_lock(PLANS / "qwen3-8b-2xv100.lock")
    diff = diff_plans(plan, plan)

    assert diff.identical and diff.sections == ()
    result = CliRunner().invoke(main, ["diff", str(PLANS / "tiny-cpu.lock"), str(PLANS / "tiny-cpu.lock")])
    assert result.exit_code == 0 and "no differences" in result.output


def test_two_inventories_in_review_order():
    old, new = load_lock(PLANS / "qwen3-8b-2xv100.lock"), load_lock(PLANS / "qwen3-8b-2080ti-3090.lock")
    diff = diff_plans(old, new)

    assert titles(diff) == ["Plan", "Devices", "Layers moved", "Memory per device", "Decisions", "Environment", "Inputs"]
    plan = changes(diff, "Plan")
    assert plan["workload"][:2] == ("batch 1 x 8192 tokens", "batch 2 x 16384 tokens")
    assert plan["SDPA backends"][:2] == ("efficient, math", "flash, efficient, math")
    assert changes(diff, "Devices")["GPU 1"][1].startswith("NVIDIA GeForce RTX 3090")
    # 18/18 on two V100s becomes 3/33 on a 2080 Ti + 3090: layers 3..17 move to GPU 1, as one run.
    assert changes(diff, "Layers moved") == {"model.layers.3 .. model.layers.17 (15 entries)": ("GPU 0", "GPU 1", "")}
    memory = changes(diff, "Memory per device")
    delta = (new.memory[1].total - old.memory[1].total) / 2**30
    assert memory["GPU 1 (NVIDIA GeForce RTX 3090)"][2].startswith(f"{delta:+.2f} GiB")
    assert changes(diff, "Environment") == {"TORCH_CUDA_ARCH_LIST": ("7.0+PTX", "7.5 8.6+PTX", "")}
    decisions = changes(diff, "Decisions")
    assert decisions["sdpa.flash-sm80"] == (None, "flash eligible on GPU 1", "added")


def test_a_recompiled_workload(tmp_path):
    old = load_lock(compile_at(tmp_path, 4096))
    new = load_lock(compile_at(tmp_path, 32768))
    diff = diff_plans(old, new)

    plan = changes(diff, "Plan")
    assert plan["workload"][:2] == ("batch 1 x 4096 tokens", "batch 1 x 32768 tokens")
    assert "Layers moved" in titles(diff) and "Memory per device" in titles(diff)
    assert changes(diff, "Inputs")["spec"][2] == "sha256"
    assert "Devices" not in titles(diff) and "Packages" not in titles(diff)


@pytest.mark.parametrize(
    "update, title, subject",
    [
        ({"host": {"cpu_memory": 1, "disk": "x/"}}, "Devices", "offload folder"),
        ({"generation": {"seed": 7}}, "Plan", "seed"),
        ({"tied_parameters": [["a", "b"]]}, "Plan", "tied parameters"),
        ({"skip_keys": ["x"]}, "Plan", "skip_keys"),
        ({"env": {"A": "1"}}, "Environment", "A"),
        ({"format_version": "1.9"}, "Inputs", "format_version"),
    ],
)
def test_each_field_lands_in_its_section(update, title, subject):
    plan = load_lock(PLANS / "tiny-cpu.lock")
    fields = {}
    for key, value in update.items():
        current = getattr(plan, key)
        fields[key] = current.model_copy(update=value) if isinstance(value, dict) and hasattr(current, "model_copy") else value
    changed = plan.model_copy(update=fields).sealed()
    diff = diff_plans(plan, changed)

    assert subject in changes(diff, title)
    assert "Other fields" not in titles(diff)


def test_git_revisions_and_formats(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    compile_at(tmp_path, 4096)
    git("add", ".")
    git("commit", "-qm", "plan")
    compile_at(tmp_path, 32768)

    text = planc("diff", "HEAD:plan.lock", "plan.lock", cwd=tmp_path)
    assert text.returncode == 1, text.stderr
    assert "batch 1 x 4096 tokens" in text.stdout and "batch 1 x 32768 tokens" in text.stdout

    runner = CliRunner()
    os.chdir(tmp_path)
    try:
        markdown = runner.invoke(main, ["diff", "HEAD:./plan.lock", "plan.lock", "--format", "markdown"])
        as_json = runner.invoke(main, ["diff", "HEAD:plan.lock", "plan.lock", "--format", "json"])
        bad_rev = runner.invoke(main, ["diff", "HEAD~3:plan.lock", "plan.lock"])
    finally:
        os.chdir(REPO)
    assert markdown.exit_code == 1
    assert markdown.output.startswith("### planc diff `HEAD:./plan.lock` → `plan.lock`")
    assert "#### Plan" in markdown.output and "| workload | batch 1 x 4096 tokens | batch 1 x 32768 tokens |" in markdown.output
    data = json.loads(as_json.output)
    assert data["identical"] is False and data["sections"][0]["title"] == "Plan"
    assert bad_rev.exit_code == 2 and bad_rev.output.count("\n") == 1
    assert "git cannot show it" in bad_rev.output


def test_markdown_escapes_table_cells():
    plan = load_lock(PLANS / "tiny-cpu.lock")
    changed = plan.model_copy(update={"env": {"A": "x|y"}}).sealed()

    assert "| A | *(none)* | x\\|y |" in to_markdown(diff_plans(plan, changed))


def test_bad_input_is_one_line_exit_2(tmp_path):
    broken = tmp_path / "broken.lock"
    broken.write_text("format_version: '1.0'\n: [\n")
    for args, expect in [
        (["diff", str(tmp_path / "missing.lock"), str(PLANS / "tiny-cpu.lock")], "cannot read lock"),
        (["diff", str(broken), str(PLANS / "tiny-cpu.lock")], "not valid YAML"),
    ]:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert expect in result.output and result.output.count("\n") == 1


def test_diff_does_not_import_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "planc", "diff", "plans/qwen3-8b-2xv100.lock",
         "plans/qwen3-8b-2080ti-3090.lock", "--format", "markdown"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "accelerate", "networkx"}


def test_package_versions_and_weights():
    plan = load_lock(PLANS / "tiny-cpu.lock")
    packages = plan.inputs.packages.model_copy(update={"transformers": "5.24.0"})
    weights = {name: entry.model_copy(update={"sha256": "sha256:" + "0" * 64}) for name, entry in plan.inputs.weights.items()}
    changed = plan.model_copy(update={"inputs": plan.inputs.model_copy(update={"packages": packages, "weights": weights})})
    diff = diff_plans(plan, changed.sealed())

    assert changes(diff, "Packages") == {"transformers": ("5.23.0", "5.24.0", "")}
    assert changes(diff, "Inputs")["weights model.safetensors"][1] == "000000000000"

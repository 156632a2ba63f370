"""The pre-commit hooks for real, and the file-to-plan mapping of `planc check` behind them.

pre-commit installs this repository's `planc-check` hook (planc's light core, no torch) in an
environment of its own, from a git repository holding this working tree's package files; a
project repository commits specs and locks through it with `git commit`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import CORPUS, REPO
from planc.cli import main
from planc.compile import compile_spec
from planc.plan import write_if_changed

SPEC = """\
planc: 1
model: {{config: models/qwen3-8b/config.json}}
hardware:
  gpus: [{{type: v100-16gb, count: 2}}]
  cpu_memory: 64GiB
workload: {{batch_size: 1, max_seq_len: {seq}}}
"""
# What a clone of planc needs for `pip install .` and pre-commit's hook manifest.
HOOK_REPOSITORY_FILES = ["pyproject.toml", "README.md", ".pre-commit-hooks.yaml", "src"]


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {result.stdout}{result.stderr}")
    return result


def hook_repository(folder: Path) -> str:
    """A git repository with this working tree's planc package and hook manifest; its commit id."""
    folder.mkdir()
    for name in HOOK_REPOSITORY_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, folder / name)
    git(folder, "init", "-q")
    git(folder, "add", ".")
    git(folder, "commit", "-qm", "planc")
    return git(folder, "rev-parse", "HEAD").stdout.strip()


def compile_lock(project: Path) -> None:
    spec, lock = project / "examples" / "qwen.yaml", project / "plans" / "qwen.lock"
    write_if_changed(lock, compile_spec(spec, lock)[1])


def write_spec(project: Path, seq: int) -> None:
    (project / "examples" / "qwen.yaml").write_text(SPEC.format(seq=seq))


def test_commits_pass_with_fresh_plans_and_fail_naming_what_changed(tmp_path):
    rev = hook_repository(tmp_path / "planc")
    project = tmp_path / "project"
    (project / "examples" / "models" / "qwen3-8b").mkdir(parents=True)
    shutil.copy(CORPUS / "qwen3-8b" / "config.json", project / "examples" / "models" / "qwen3-8b" / "config.json")
    write_spec(project, 4096)
    compile_lock(project)
    (project / ".pre-commit-config.yaml").write_text(
        f"repos:\n  - repo: {tmp_path / 'planc'}\n    rev: {rev}\n"
        "    hooks:\n      - id: planc-check\n      - id: planc-check-system\n"
    )
    git(project, "init", "-q")
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
           # planc-check-system runs the planc of the environment git runs in: this one.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "pre_commit", "install"], cwd=project, env=env, check=True,
                   capture_output=True)

    def commit(message: str) -> tuple[int, str]:
        git(project, "add", "-A")
        done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", message],
                              cwd=project, env=env, capture_output=True, text=True, timeout=900)
        return done.returncode, done.stdout + done.stderr  # pre-commit reports on either, by version

    code, out = commit("plans")
    assert code == 0, out
    assert "planc plans are fresh" in out and "Passed" in out and "Failed" not in out

    write_spec(project, 8192)  # the spec changes, the lock is not recompiled
    code, out = commit("longer context")
    assert code != 0
    assert "plans/qwen.lock is stale: workload.max_seq_len 4096 -> 8192" in out
    assert out.count("Failed") == 2  # both hooks
    assert "recompile: planc compile examples/qwen.yaml -o plans/qwen.lock" in out

    compile_lock(project)
    assert commit("longer context, recompiled")[0] == 0

    config = project / "examples" / "models" / "qwen3-8b" / "config.json"
    data = json.loads(config.read_text())
    data["num_hidden_layers"] = 30
    config.write_text(json.dumps(data))  # only the model's config.json is in this commit
    code, out = commit("fewer layers")
    assert code != 0
    assert "plans/qwen.lock is stale: model config.json changed" in out


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git work tree with specs in three layouts: examples/ -> plans/ (named in the lock's header),
    plan.lock beside its spec, and specs/ -> locks/ (a layout only --map describes)."""
    (tmp_path / "examples").mkdir()
    shutil.copy(CORPUS / "qwen3-8b" / "config.json", tmp_path / "config.json")
    for folder in ("examples", "beside", "specs"):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "spec.yaml").write_text(
            SPEC.format(seq=4096).replace("models/qwen3-8b/config.json", "../config.json"))
    (tmp_path / "examples" / "qwen.yaml").write_text((tmp_path / "examples" / "spec.yaml").read_text())
    (tmp_path / "examples" / "spec.yaml").unlink()
    for spec, lock in [("examples/qwen.yaml", "plans/qwen.lock"), ("beside/spec.yaml", "beside/plan.lock"),
                       ("specs/spec.yaml", "locks/spec.lock")]:
        write_if_changed(tmp_path / lock, compile_spec(tmp_path / spec, tmp_path / lock)[1])
    # locks/spec.lock's header names specs/spec.yaml; a lock moved from elsewhere names another path.
    text = (tmp_path / "locks" / "spec.lock").read_text().replace("../specs/spec.yaml", "../old/spec.yaml")
    (tmp_path / "locks" / "spec.lock").write_text(text)
    (tmp_path / "notes.yaml").write_text("not: a spec\n")
    (tmp_path / "poetry.lock").write_text("# another tool's lock\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def check(*args: str):
    return CliRunner().invoke(main, ["check", *args])


def test_each_layout_finds_its_lock(repo):
    for folder in ("examples/qwen.yaml", "beside/spec.yaml"):
        (repo / folder).write_text((repo / folder).read_text().replace("4096", "8192"))
    (repo / "specs" / "spec.yaml").write_text((repo / "specs" / "spec.yaml").read_text().replace("4096", "8192"))

    result = check("examples/qwen.yaml", "beside/spec.yaml", "notes.yaml", "poetry.lock")
    assert result.exit_code == 1
    assert "plans/qwen.lock is stale: workload.max_seq_len 4096 -> 8192" in result.output
    assert "beside/plan.lock is stale: workload.max_seq_len 4096 -> 8192" in result.output
    assert "notes" not in result.output and "poetry" not in result.output

    # Without a rule specs/spec.yaml would look for plan.lock beside it; with one it finds its lock.
    assert "specs/plan.lock is stale: it does not exist" in check("specs/spec.yaml").output
    mapped = check("--map", "specs/*.yaml=locks/{stem}.lock", "specs/spec.yaml")
    assert mapped.exit_code == 1 and "locks/spec.lock is stale: workload.max_seq_len 4096 -> 8192" in mapped.output


def test_a_lock_or_a_model_file_leads_to_its_plans(repo):
    assert check("plans/qwen.lock").exit_code == 0
    data = json.loads((repo / "config.json").read_text())
    data["vocab_size"] += 64
    (repo / "config.json").write_text(json.dumps(data))

    result = check("config.json")
    assert result.exit_code == 1
    # Every lock whose model config is this file, the moved lock included.
    for lock in ("plans/qwen.lock", "beside/plan.lock", "locks/spec.lock"):
        assert f"{lock} is stale: " in result.output
    assert "its spec old/spec.yaml does not exist" in result.output


def test_bad_input_exits_2(repo):
    assert check("--map", "specs/*.yaml", "specs/spec.yaml").exit_code == 2
    bad_placeholder = check("--map", "specs/*.yaml=locks/{base}.lock", "specs/spec.yaml")
    assert bad_placeholder.exit_code == 2 and "unknown placeholder {base}" in bad_placeholder.output
    (repo / "plans" / "qwen.lock").write_text((repo / "plans" / "qwen.lock").read_text().replace("dtype: float16", "dtype: float32"))
    edited = check("examples/qwen.yaml")
    assert edited.exit_code == 1 and "plan_hash does not match" in edited.output
    (repo / "beside" / "spec.yaml").write_text("planc: 1\nmodel: {config: x}\n")
    broken = check("beside/spec.yaml")
    assert broken.exit_code == 2 and "error: beside/spec.yaml: hardware: Field required" in broken.output

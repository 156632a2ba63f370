"""Golden files: every example compiles to the committed plan byte for byte; so does every tests/cases spec.

Regenerate deliberately with `PLANC_REGEN=1 pytest tests/test_golden.py` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import EXAMPLES, PLANS, REPO
from planc.compile import check_lock, compile_spec
from planc.plan import parse_lock, write_if_changed

CASES = REPO / "tests" / "cases"
PAIRS = [(spec, PLANS / f"{spec.stem}.lock") for spec in sorted(EXAMPLES.glob("*.yaml"))] + [
    (spec, spec.parent / "plan.lock") for spec in sorted(CASES.glob("*/spec.yaml"))
]


def test_every_example_has_a_committed_plan():
    assert len(list(EXAMPLES.glob("*.yaml"))) >= 6
    assert {p.stem for p in PLANS.glob("*.lock")} == {s.stem for s in EXAMPLES.glob("*.yaml")}


@pytest.mark.parametrize("spec,lock", PAIRS, ids=[str(s.relative_to(REPO)) for s, _ in PAIRS])
def test_compiles_to_committed_bytes(spec: Path, lock: Path):
    plan, text = compile_spec(spec, lock)
    if os.environ.get("PLANC_REGEN") == "1":
        write_if_changed(lock, text)
    assert lock.exists(), f"{lock} missing: run with PLANC_REGEN=1"
    assert text == lock.read_text(), f"{lock} differs from what {spec.name} compiles to"
    assert parse_lock(text).plan_hash == plan.plan_hash
    assert check_lock(spec, lock) == []


def test_the_repository_stands_alone():
    """A clone has nothing beside it: no committed file may point at the shared reference folder."""
    outside = ("/work/" + "shared", "../" + "shared")  # spelled apart so this file does not match itself
    offenders = []
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        ignored = parts[0] in (".git", ".venv", ".hypothesis", ".pytest_cache", "build", "dist")
        if not path.is_file() or ignored or any(p == "__pycache__" or p.endswith(".egg-info") for p in parts):
            continue
        if path.suffix in (".safetensors", ".bin", ".pt", ".pyc"):
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{path.relative_to(REPO)}: {needle}" for needle in outside if needle in text]
    assert offenders == []

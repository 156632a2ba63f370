"""The lock as a contract across versions and against damage.

- Locks of format 1.0 (tests/fixtures/locks-1.0: frozen copies of the committed plans and golden
  cases, never regenerated) load, verify, `show` and `compile --check` (fresh or stale, never
  "edited by hand") with every later reader of MAJOR 1. Their hashes are pinned here, so a change
  of format or of hashing is a visible decision.
- A future MINOR that adds an optional field still reads them; this reader refuses that MINOR.
- A damaged lock is a LockError (exit 2); only a plan_hash mismatch is a failed check (exit 1).
- A failed compile leaves the lock that was there byte for byte.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import planc.plan as plan_module
from conftest import REPO
from planc.cli import main
from planc.errors import LockError, TamperedLockError
from planc.plan import FORMAT_VERSION, Plan, document_sha256, dump_lock, load_lock, optional, parse_lock

FIXTURES = REPO / "tests" / "fixtures" / "locks-1.0"
# plan_hash of each fixture: the sha256 of its document as written. Pinned on purpose.
PINNED = {
    "plans/deepseek-v3-8xh100-offload.lock": "9d6130fee4bb8afd5d23d2ede3a8d1542feaf79c2cc018191990739206f787f6",
    "plans/llama-3.1-70b-2xa100-80gb.lock": "2faee0d3e8fcc1e2bc039f06a070f3392ad4a9325b1b9b9b9dd708222aa27548",
    "plans/qwen3-30b-a3b-3x4090.lock": "33a94b1906bd003c5fe6e36de32468f79af7f4a3f495fe565b18f46b998bc365",
    "plans/qwen3-8b-2080ti-3090.lock": "3684af2ec232aa68a3084b2abf9ee6ef3df6da1c5b407e1dc9a4cce1ef4ad5dd",
    "plans/qwen3-8b-2xv100.lock": "4f72b348144e3fed017c2b37004ee0b013d92c8f020c54ac0f19160a49052685",
    "plans/tiny-cpu.lock": "c4dc364e413c6d71eeec08110b3d5fd4e26fa4eae17d653259109eaf4c9777c5",
    "cases/disk-offload/plan.lock": "c4ed7be5ae5267b2940d5130b2fafe26efcd4407d907d0c87a9481670bca7788",
    "cases/explicit-card-balance/plan.lock": "8d780947a28af5ab28f89b2d6eb434f6deb169138f8ef67531c9c3458ba1af69",
    "cases/gemma2-eager-chunked/plan.lock": "4ac36b1f7a4850c4e53af6cfad31e12cc287fdc4f3405cd27a15d0049a683d01",
    "cases/tied-t4/plan.lock": "40916a97336a10e0f749a47f75b685811d0c2cd7afaa9aaf0ed643afd6a2ebb7",
}
# (spec, lock) pairs laid out as in the repository, so the locks' relative paths resolve.
CHECKED = [(f"examples/{Path(lock).stem}.yaml", lock) for lock in PINNED if lock.startswith("plans/")] + [
    (str(Path(lock).parent / "spec.yaml"), lock) for lock in PINNED if lock.startswith("cases/")
]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


# ------------------------------------------------------------------ format 1.0 keeps loading


def test_the_fixtures_are_the_pinned_format_1_0_locks():
    # A frozen copy of every plan and case committed when format 1.0 was current; locks added since
    # are not 1.0 fixtures.
    assert sorted(PINNED) == sorted(
        [f"plans/{p.name}" for p in (FIXTURES / "plans").glob("*.lock")]
        + [f"cases/{p.parent.name}/plan.lock" for p in (FIXTURES / "cases").glob("*/plan.lock")]
    )
    assert all(yaml.safe_load((FIXTURES / name).read_text())["format_version"] == "1.0" for name in PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_a_format_1_0_lock_loads_verifies_and_shows(name):
    path = FIXTURES / name
    plan = load_lock(path)
    assert plan.format_version == "1.0"
    assert plan.plan_hash == "sha256:" + PINNED[name]
    assert document_sha256(yaml.safe_load(path.read_text())) == plan.plan_hash
    result = invoke("show", str(path))
    assert result.exit_code == 0, result.output
    assert plan.plan_hash in result.output


@pytest.mark.parametrize("spec,lock", CHECKED, ids=[lock for _, lock in CHECKED])
def test_compile_check_on_a_format_1_0_lock_says_fresh_or_stale(spec, lock):
    result = invoke("compile", "--check", str(FIXTURES / spec), "-o", str(FIXTURES / lock))
    assert "plan_hash does not match" not in result.output
    if result.exit_code == 0:
        assert "is up to date" in result.output
    else:
        assert result.exit_code == 1 and " is stale: " in result.output, result.output


def test_the_current_compiler_writes_what_the_fixtures_hold_where_nothing_changed(tmp_path):
    """A plan whose compiler output has not moved is written with the fixture's very bytes: the
    format adds nothing (optional fields stay out of the bytes) to a plan that uses nothing new."""
    for name in PINNED:
        if (REPO / name.replace("cases/", "tests/cases/")).read_bytes() == (FIXTURES / name).read_bytes():
            plan = load_lock(FIXTURES / name)
            header = "".join((FIXTURES / name).read_text().splitlines(keepends=True)[1:2]).removeprefix(
                "# Regenerate with: "
            ).rstrip("\n")
            assert dump_lock(plan, header) == (FIXTURES / name).read_text()


# ------------------------------------------------------------------ a future MINOR


class _FuturePlan(Plan):
    """Plan as a later planc of major 1 might have it: one more optional field."""

    speculative_decoding: dict | None = optional("Draft model settings (a field added in a MINOR).")


def test_a_reader_that_knows_a_newer_optional_field_still_verifies_old_locks(monkeypatch):
    monkeypatch.setattr(plan_module, "FORMAT_VERSION", "1.1")
    monkeypatch.setattr(plan_module, "Plan", _FuturePlan)
    for name in PINNED:
        plan = plan_module.load_lock(FIXTURES / name)
        assert isinstance(plan, _FuturePlan) and plan.speculative_decoding is None
        assert plan.plan_hash == "sha256:" + PINNED[name]


def test_an_unset_optional_field_leaves_the_bytes_alone():
    plan = load_lock(FIXTURES / "plans/qwen3-8b-2xv100.lock")
    future = _FuturePlan.model_validate(plan.model_dump(mode="json"))
    assert dump_lock(future, "x") == dump_lock(plan, "x")
    assert future.sealed().plan_hash == plan.plan_hash


def test_a_newer_minor_is_refused_with_the_upgrade_message(tmp_path):
    data = yaml.safe_load((FIXTURES / "plans/qwen3-8b-2xv100.lock").read_text())
    major, minor = FORMAT_VERSION.split(".")
    newer = f"{major}.{int(minor) + 1}"
    data["format_version"] = newer
    data["speculative_decoding"] = {"draft": "Qwen/Qwen3-0.6B", "tokens": 4}
    data["plan_hash"] = document_sha256(data)  # a genuine lock of that newer planc
    lock = tmp_path / "plan.lock"
    lock.write_text(yaml.safe_dump(data, sort_keys=False))

    with pytest.raises(LockError, match=rf"lock format {newer} was written by a newer planc .* upgrade planc"):
        load_lock(lock)
    assert invoke("show", str(lock)).exit_code == 2


# ------------------------------------------------------------------ damaged locks


def _valid_text() -> str:
    return (FIXTURES / "plans/qwen3-8b-2xv100.lock").read_text()


def _resealed(**changes) -> str:
    data = yaml.safe_load(_valid_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    data["plan_hash"] = document_sha256(data)
    return yaml.safe_dump(data, sort_keys=False)


DAMAGED = {
    "empty": "",
    "truncated in a key": _valid_text()[:1500],
    "truncated mid-line": _valid_text()[: _valid_text().index("plan_hash") + 20],
    "a list": "- format_version: '1.0'\n- inputs: {}\n",
    "a scalar": "42\n",
    "no format_version": "inputs: {}\n",
    "format_version a float": _valid_text().replace("format_version: '1.0'", "format_version: 1.0"),
    "format_version unicode digits": _valid_text().replace("format_version: '1.0'", "format_version: '\u00b2.0'"),
    "format_version huge": _valid_text().replace("format_version: '1.0'", f"format_version: '{'9' * 5000}.0'"),
    "another major": _resealed(format_version="2.0"),
    "wrong type in a field": _resealed(workload__batch_size="two"),
    "unknown key": _resealed(extra_key=1),
    "a flag planc never writes": _resealed(attention__attn_implementation="flash_attention_2"),
    "an unknown SDPA backend": _resealed(attention__sdpa_backends=["flash", "turbo"]),
    "a device the lock does not list": _resealed(device_map={"model.embed_tokens": 7}),
    "a negative GPU index": _resealed(device_map={"model.embed_tokens": -1}),
    "a max_memory key that is not a device": _resealed(max_memory={"\u00b2": 1}),
    "a seed torch cannot take": _resealed(generation__seed=2**70),
    "no model source": _resealed(model__config=None),
    "a negative ledger figure": _resealed(memory=[{**yaml.safe_load(_valid_text())["memory"][0], "headroom": -(10**20)}]),
    "a NUL byte in a path": _resealed(model__config="config\x00.json"),
    "a batch above the bound": _resealed(workload__batch_size=10**20),
    "yaml aliases": "a: &x [1, 2]\nb: *x\nformat_version: '1.0'\n",
    "a billion laughs": "format_version: '1.0'\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
    "nested too deeply": "[" * 10000,
    "an impossible date": _valid_text().replace("format_version: '1.0'", "format_version: '1.0'\nwhen: 2024-13-01"),
    "python object tag": "!!python/object/apply:os.system ['true']\n",
    "markup in a string": _resealed(model__architecture="[/bold]Qwen3[link=x]"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_a_damaged_lock_is_one_line_and_exit_2(tmp_path, name):
    lock = tmp_path / "plan.lock"
    lock.write_text(DAMAGED[name])
    result = invoke("show", str(lock))
    if name == "markup in a string":  # valid: the string is shown as itself, not read as markup
        assert result.exit_code == 0 and "[/bold]Qwen3[link=x]" in result.output
        return
    assert result.exit_code == 2, result.output
    one_error_line(result)


def test_random_bytes_and_non_utf8_are_exit_2(tmp_path):
    lock = tmp_path / "plan.lock"
    lock.write_bytes(bytes([0x00, 0xFF, 0xFE, 0x20]) + os.urandom(64))
    result = invoke("show", str(lock))
    assert result.exit_code == 2 and "not UTF-8" in one_error_line(result)


def test_only_a_hash_mismatch_is_a_failed_check():
    text = _valid_text().replace("model.layers.17: 0", "model.layers.17: 1")
    with pytest.raises(TamperedLockError, match="plan_hash does not match"):
        parse_lock(text)
    assert TamperedLockError.exit_code == 1 and LockError.exit_code == 2


def test_a_lock_that_is_not_a_file_is_refused(tmp_path):
    assert "Is a directory" in one_error_line(invoke("show", str(tmp_path)))
    if Path("/dev/zero").exists():
        assert "not a regular file" in one_error_line(invoke("show", "/dev/zero"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in one_error_line(invoke("show", str(fifo)))  # and does not block


# ------------------------------------------------------------------ nothing lost on failure


@pytest.fixture
def compiled(tmp_path) -> tuple[Path, Path, bytes]:
    """A spec and the good lock it compiled to (config-only, so no torch weights involved)."""
    shutil.copy(FIXTURES / "examples/models/qwen3-8b/config.json", tmp_path / "config.json")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "planc: 1\nmodel: {config: config.json}\nhardware: {gpus: [{type: v100-16gb, count: 2}], cpu_memory: 64GiB}\n"
        "workload: {batch_size: 1, max_seq_len: 4096}\n"
    )
    result = invoke("-q", "compile", str(spec))
    assert result.exit_code == 0, result.output
    lock = tmp_path / "plan.lock"
    return spec, lock, lock.read_bytes()


def _infeasible(spec: Path) -> None:
    spec.write_text(spec.read_text().replace("max_seq_len: 4096", "max_seq_len: 999999"))


def _over_bound(spec: Path) -> None:
    spec.write_text(spec.read_text().replace("batch_size: 1", "batch_size: 99999999999999999999"))


def _not_utf8(spec: Path) -> None:
    spec.write_bytes(b"\xff" + spec.read_bytes())


def _unbuildable_config(spec: Path) -> None:
    config = spec.parent / "config.json"
    config.write_text(config.read_text().replace('"rope_theta"', '"rope_scaling": {"rope_type": "nonsense"}, "rope_theta"'))


@pytest.mark.parametrize("damage", [_infeasible, _over_bound, _not_utf8, _unbuildable_config])
def test_a_failed_compile_leaves_the_good_lock_byte_identical(compiled, damage):
    spec, lock, before = compiled
    damage(spec)
    result = invoke("compile", str(spec))
    assert result.exit_code == 2, result.output
    one_error_line(result)
    assert lock.read_bytes() == before
    assert sorted(p.name for p in lock.parent.iterdir()) == ["config.json", "plan.lock", "spec.yaml"]


def test_a_crash_while_writing_leaves_the_good_lock_and_no_temp_file(compiled, monkeypatch):
    spec, lock, before = compiled
    spec.write_text(spec.read_text().replace("batch_size: 1,", "batch_size: 2,"))

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    result = invoke("compile", str(spec))
    assert result.exit_code == 130 and one_error_line(result) == "error: interrupted"
    assert lock.read_bytes() == before
    assert sorted(p.name for p in lock.parent.iterdir()) == ["config.json", "plan.lock", "spec.yaml"]


def test_a_stale_report_is_one_line_whatever_the_lock_holds(tmp_path):
    """A package version with a newline (the campaign's third finding) still reports on one line."""
    for name in ("plans", "examples"):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    lock = tmp_path / "plans" / "qwen3-8b-2xv100.lock"
    data = yaml.safe_load(lock.read_text())
    data["inputs"]["packages"]["planc"] = "0.1\n.0"
    data["plan_hash"] = document_sha256(data)
    lock.write_text(yaml.safe_dump(data, sort_keys=False))
    result = invoke("compile", "--check", str(tmp_path / "examples" / "qwen3-8b-2xv100.yaml"), "-o", str(lock))
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "planc 0.1 .0 -> " in result.stderr


def test_no_rich_markup_tags_in_planc_output_code():
    """The console has markup off (a lock's strings print as themselves), so a "[dim]" in a
    message would print literally: styles are rich Text objects."""
    import io
    import re
    import tokenize

    tag = re.compile(r"\[/?(bold|dim|green|red|yellow|cyan|magenta|italic|blue)\]")
    offenders = [
        f"{path.relative_to(REPO)}:{token.start[0]}"
        for path in sorted((REPO / "src" / "planc").rglob("*.py"))
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        if token.type == tokenize.STRING and tag.search(token.string)
    ]
    assert not offenders, offenders

"""No input crashes or hangs planc: each bad spec, config.json or argument is one line and exit 2,
and anything planc did not expect is one line naming it, exit 3, never a raw traceback."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import CORPUS
from planc.cli import EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, main
from planc.compile import ModelInput, compile_plan, installed_packages
from planc.errors import PlancError
from planc.hardware import resolve_inventory
from planc.limits import MAX_BATCH_SIZE, MAX_GPUS, MAX_SEQ_LEN
from planc.model import build_model_graph
from planc.spec import parse_spec

SPEC = """\
planc: 1
model: {config: config.json}
hardware:
  gpus: [{type: v100-16gb, count: 2}]
  cpu_memory: 64GiB
workload: {batch_size: 1, max_seq_len: 4096}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(CORPUS / "qwen3-8b" / "config.json", tmp_path / "config.json")
    (tmp_path / "spec.yaml").write_text(SPEC)
    return tmp_path


def compile_in(project: Path, *extra: str):
    return CliRunner().invoke(main, ["compile", str(project / "spec.yaml"), *extra])


def error_line(result, exit_code: int = 2) -> str:
    """The one line a failure prints (other lines on stderr would be noise around it)."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip() == errors[0], result.stderr
    return errors[0]


# ------------------------------------------------------------------ spec files


@pytest.mark.parametrize(
    "content,message",
    [
        (bytes([0x00, 0xFF, 0xFE, 0x20]) + b"planc: 1\n", "not UTF-8 text (byte 0xff at offset 1)"),
        (b"", "expected a mapping at the top level"),
        (b"[" * 10000, "nested too deeply"),
        (b"planc: " + b"9" * 5000 + b"\n", "not valid YAML"),
        (b"planc: 1\nwhen: 2024-13-01\n", "not valid YAML"),
        (b"planc: !!timestamp 1\n", "not valid YAML"),
        (b"!!python/object/apply:os.system ['true']\n", "not valid YAML"),
        (b"planc: 1\n" + b"# padding\n" * 500_000, "larger than 4 MiB"),
    ],
    ids=["not-utf8", "empty", "deep", "huge-int", "bad-date", "bad-timestamp", "python-tag", "too-large"],
)
def test_a_spec_that_is_not_a_spec_is_one_line(project, content, message):
    (project / "spec.yaml").write_bytes(content)
    assert message in error_line(compile_in(project))
    assert not (project / "plan.lock").exists()


def test_a_spec_path_that_is_not_a_file_is_one_line(project):
    assert "Is a directory" in error_line(CliRunner().invoke(main, ["compile", str(project)]))
    if Path("/dev/zero").exists():  # would be read forever
        assert "not a regular file" in error_line(CliRunner().invoke(main, ["compile", "/dev/zero"]))


@pytest.mark.parametrize(
    "old,new,bound",
    [
        ("count: 2}", "count: 100000000}", MAX_GPUS),
        ("count: 2}", "count: 40}, {type: t4, count: 40}", f"80 GPUs: one node holds at most {MAX_GPUS}"),
        ("batch_size: 1", "batch_size: 99999999999999999999", MAX_BATCH_SIZE),
        ("max_seq_len: 4096", f"max_seq_len: {MAX_SEQ_LEN + 1}", MAX_SEQ_LEN),
        ("max_seq_len: 4096", f"max_seq_len: 4096, prefill_chunk_size: {10**12}", MAX_SEQ_LEN),
        ("cpu_memory: 64GiB", "cpu_memory: 99999999999999999999TiB", "1 PiB"),
        ("cpu_memory: 64GiB", f"cpu_memory: {'9' * 400}GiB", "1 PiB"),
    ],
    ids=["count", "total-gpus", "batch", "context", "chunk", "cpu-memory", "cpu-memory-inf"],
)
def test_huge_counts_are_refused_at_once_naming_the_bound(project, old, new, bound):
    (project / "spec.yaml").write_text(SPEC.replace(old, new))
    started = time.perf_counter()
    line = error_line(compile_in(project))
    assert time.perf_counter() - started < 5
    assert str(bound) in line, line


def test_a_model_path_the_filesystem_refuses_is_one_line(project):
    (project / "spec.yaml").write_text(SPEC.replace("{config: config.json}", "{config: '" + "9" * 400 + "'}"))
    assert "File name too long" in error_line(compile_in(project))


def test_a_path_with_a_nul_byte_is_one_line(project):
    (project / "spec.yaml").write_text(SPEC.replace("cpu_memory: 64GiB", 'cpu_memory: 64GiB\n  disk: "\\0"'))
    assert "hardware.disk: String should match pattern" in error_line(compile_in(project))


def test_a_lock_path_that_cannot_be_written_is_one_line(project):
    line = error_line(compile_in(project, "-o", str(project / "spec.yaml" / "plan.lock")))
    assert line.startswith("error: cannot write lock ") and "Not a directory" in line


def test_the_bounds_are_in_the_schema_with_their_reason():
    schema = json.loads(CliRunner().invoke(main, ["schema", "spec"]).output)
    workload = schema["$defs"]["Workload"]["properties"]
    assert workload["batch_size"]["maximum"] == MAX_BATCH_SIZE and "serving engines" in workload["batch_size"]["description"]
    assert workload["max_seq_len"]["maximum"] == MAX_SEQ_LEN and "Llama 4 Scout" in workload["max_seq_len"]["description"]
    assert schema["$defs"]["CatalogueGpu"]["properties"]["count"]["maximum"] == MAX_GPUS


# ------------------------------------------------------------------ config.json


def _config(project: Path, **changes) -> None:
    config = json.loads((project / "config.json").read_text())
    config.update(changes)
    (project / "config.json").write_text(json.dumps(config))


def test_a_config_transformers_validation_rejects_is_a_model_error(project):
    _config(project, num_hidden_layers=-3)
    line = error_line(compile_in(project))
    assert "config.json does not load in transformers (qwen3)" in line and "num_hidden_layers" in line


@pytest.mark.parametrize(
    "changes,exception",
    [({"rope_scaling": {"rope_type": "nonsense"}}, "KeyError"), ({"rope_theta": None}, "TypeError")],
)
def test_an_exception_while_building_the_architecture_is_a_model_error(project, changes, exception):
    _config(project, **changes)
    line = error_line(compile_in(project))
    assert line.startswith(f"error: cannot build Qwen3ForCausalLM (model_type qwen3) from its config: {exception}")


def test_a_config_that_is_not_utf8_json_is_one_line(project):
    (project / "config.json").write_bytes(b'{"model_type": "\xff"}')
    assert "not UTF-8" in error_line(compile_in(project))
    (project / "config.json").write_text("[" * 100000)
    assert "nested too deeply" in error_line(compile_in(project))


def test_an_unknown_model_type_gets_advice_planc_will_follow(project):
    import transformers

    # (A model_type transformers does not know whose architectures names a class it ships is planned
    # with that class: test_architectures.)
    _config(project, model_type="qwen9", architectures=["NoSuchModelForCausalLM"])
    line = error_line(compile_in(project))
    assert "trust_remote_code" not in line
    assert f"unknown to the installed transformers {transformers.__version__}" in line
    assert "a newer transformers may know it" in line and "does not run remote code" in line

    (project / "spec.yaml").write_text(SPEC.replace("{config: config.json}", "{config: config.json, trust_remote_code: true}"))
    assert "planc does not plan remote-code models" in error_line(compile_in(project))


# ------------------------------------------------------------------ the CLI boundary


def test_an_unexpected_exception_is_one_line_exit_3(project, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(sys.modules["planc.compile"], "compile_spec", broken)
    line = error_line(compile_in(project), EXIT_INTERNAL_ERROR)
    assert line == (
        "error: internal error: ZeroDivisionError: integer division or modulo by zero "
        "(a bug in planc; run with -v for the traceback)"
    )
    verbose = CliRunner().invoke(main, ["-v", "compile", str(project / "spec.yaml")])
    assert verbose.exit_code == EXIT_INTERNAL_ERROR and "Traceback" in verbose.stderr


def test_ctrl_c_is_one_line_exit_130(project, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["planc.compile"], "compile_spec", interrupted)
    assert error_line(compile_in(project), EXIT_INTERRUPTED) == "error: interrupted"


def test_click_usage_errors_keep_their_own_message(project):
    result = CliRunner().invoke(main, ["simulate", "x.lock", "--max-seq-len", str(MAX_SEQ_LEN + 1)])
    assert result.exit_code == 2 and "is not in the range" in result.output


# ------------------------------------------------------------------ every architecture (a sample)


def _sample_of_model_types(every: int = 23) -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    classes = {**MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, **MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}
    return sorted(classes.items())[::every]


@pytest.mark.parametrize("model_type,architecture", _sample_of_model_types())
def test_a_default_config_of_any_architecture_plans_or_is_a_planc_error(model_type, architecture):
    """A bounded sample of `python -m bench.no_crash_sweep` (every model type, outside the suite)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type).to_dict()
    except Exception:  # noqa: BLE001 - transformers rejecting its own default is not planc's input
        pytest.skip(f"transformers rejects its own default {model_type} config")
    config["architectures"] = [architecture]
    spec = parse_spec({"planc": 1, "model": {"config": "config.json"},
                       "hardware": {"gpus": [{"type": "h200", "count": 8}], "cpu_memory": "2TiB"},
                       "workload": {"batch_size": 1, "max_seq_len": 4096}, "policy": {"offload": "cpu"}})
    model = ModelInput(config, "sha256:0", {}, None, None, "config.json")
    try:
        compile_plan(spec, resolve_inventory(spec.hardware), model, installed_packages(), None, build_model_graph)
    except PlancError as exc:
        assert "\n" not in str(exc).strip()

"""Fuzzing: whatever spec, config.json or lock a user hands planc, the outcome is success or a
PlancError: exit 0, 1 or 2 with one line on stderr. Zero other exceptions (exit 3), no traceback.

Inputs are cheap (the bundled 4-layer config, config-only specs), driven through the CLI in
process (click's CliRunner): `compile`, `compile --check`, `show`, `run --check-only`.
The suite runs a small deterministic budget. A campaign explores at random with more:

    PLANC_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLES
from planc.cli import main
from planc.plan import document_sha256

CAMPAIGN = int(os.environ.get("PLANC_FUZZ_EXAMPLES", "0"))
CONFIG = json.loads((EXAMPLES / "models" / "tiny-qwen3" / "config.json").read_text())
SPEC = {
    "planc": 1,
    "model": {"config": "config.json", "dtype": "auto"},
    "hardware": {
        "gpus": [
            {"type": "t4", "count": 1},
            {"name": "lab-card", "memory": "24GiB", "compute_capability": "8.6", "bandwidth": "936GB/s"},
        ],
        "cpu_memory": "8GiB",
        "disk": "offload",
    },
    "workload": {"batch_size": 2, "max_seq_len": 1024},
    "policy": {
        "objective": "latency", "headroom": 0.05, "offload": "cpu", "versions": "compatible",
        "reserve": {"cuda_context": "512MiB", "cublas_workspace": "64MiB", "allocator_slack": 0.1},
    },
}


def budget(examples: int):
    """The suite's deterministic budget, or the campaign's random one."""
    return settings(
        max_examples=CAMPAIGN or examples,
        deadline=None,
        derandomize=not CAMPAIGN,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ------------------------------------------------------------------ strategies

ODD_STRINGS = [
    "", "0", "-1", "1e400", "nan", "24GiB", "0GiB", "99999999999999999999TiB", "936GB/s", "8.6", "99.99", "0.0",
    "auto", "float16", "bfloat16", "float32", "cpu", "disk", "none", "sdpa", "eager", "flash", "math",
    "[/bold]", "[link=x]", "{arch_list}", "%s", "../" * 8 + "etc", "/etc/passwd", "nul\x00byte", "line\nbreak",
    "\u00b2", "\u0663", "\U0001F600", "a" * 300, "h100-sxm", "NVIDIA H100 80GB HBM3", "qwen3", "llama",
    "linear_attention", "sliding_attention", "Qwen3ForCausalLM", "LD_PRELOAD", "PCI_BUS_ID", "9" * 400,
]
ODD_INTS = [0, 1, -1, 2, 3, 7, 72, 73, 4096, 4097, 10_485_760, 10_485_761, 2**31, 2**63, 2**64, 10**20, -(10**20)]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(ODD_INTS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _paths(child, (*prefix, index))


@st.composite
def mutated(draw, document: dict):
    """The document with one place changed: a value replaced, a key removed, or a key added."""
    doc = copy.deepcopy(document)
    paths = [p for p in _paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["alike", "alike", "alike", "replace", "replace", "remove", "add"]))
    if action == "remove":
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=10))] = draw(values)
    elif action == "alike":
        # A value of the same type often passes the schema and reaches the code behind it.
        parent[path[-1]] = draw(_alike(parent[path[-1]]))
    else:
        parent[path[-1]] = draw(values)
    return doc


def _alike(value):
    """Values of the type `value` has, biased to the edges (a list: shortened, repeated, reversed)."""
    if isinstance(value, bool):
        return st.just(not value)
    if isinstance(value, int):
        return st.one_of(st.sampled_from(ODD_INTS), st.integers(min_value=-(2**66), max_value=2**66),
                         st.integers(min_value=max(value // 2, 0), max_value=value * 2 + 1))
    if isinstance(value, float):
        return st.floats(allow_nan=True, allow_infinity=True)
    if isinstance(value, str):
        return st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=16), st.just(value[: len(value) // 2]))
    if isinstance(value, list) and value:
        return st.one_of(st.just(value[:-1]), st.just(value[::-1]), st.just(value + value[-1:]), st.just([]))
    return values


def _dump(document) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def _texts(base_text: str, base_doc: dict):
    """File contents: a mutated document, random YAML, a truncated valid file, random bytes or text."""
    return st.one_of(
        mutated(base_doc).map(_dump),
        mutated(base_doc).map(_dump),
        values.map(_dump),
        st.integers(min_value=0, max_value=len(base_text)).map(lambda n: base_text[:n]),
        st.binary(max_size=200),
        st.text(max_size=200),
    )


# ------------------------------------------------------------------ the property


def clean(result, command: str) -> None:
    """Success or a PlancError: exit 0, 1 or 2; a failure is one line; never a traceback or exit 3."""
    assert result.exit_code in (0, 1, 2), f"{command}: exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    if result.exit_code:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"{command}: {result.stderr}"
        assert lines[0].startswith("error: ") or " is stale: " in lines[0], lines[0]


def invoke(*args: str, command: str):
    result = CliRunner().invoke(main, ["-q", *args])
    clean(result, command)
    event(f"{command}: exit {result.exit_code}")
    return result


def _write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    return path


@pytest.fixture(scope="module", params=["dense", "bnb-4bit"])
def project(tmp_path_factory, request) -> Path:
    """A spec and config that compile, and the lock they compile to; once dense, once quantized at
    load (so the lock's quantization section and the spec's model.quantize are mutated too)."""
    folder = tmp_path_factory.mktemp("fuzz")
    spec = copy.deepcopy(SPEC)
    if request.param != "dense":
        spec["model"]["quantize"] = {"method": request.param, "quant_type": "nf4", "double_quant": True}
    _write(folder, "config.json", json.dumps(CONFIG))
    _write(folder, "spec.yaml", _dump(spec))
    result = CliRunner().invoke(main, ["-q", "compile", str(folder / "spec.yaml")])
    assert result.exit_code == 0, result.output
    assert ("quantization:" in (folder / "plan.lock").read_text()) == (request.param != "dense")
    return folder


def _scratch(project: Path) -> Path:
    folder = Path(tempfile.mkdtemp(dir=project))
    for name in ("spec.yaml", "config.json", "plan.lock"):
        shutil.copy(project / name, folder / name)
    return folder


@pytest.fixture(autouse=True)
def _no_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@budget(60)
@given(data=st.data())
def test_any_spec_compiles_or_is_one_line(project, data):
    folder = _scratch(project)
    spec = _write(folder, "spec.yaml", data.draw(_texts(_dump(SPEC), SPEC), label="spec"))
    lock = folder / "new.lock"
    result = invoke("compile", str(spec), "-o", str(lock), command="compile")
    if result.exit_code == 0:
        invoke("compile", "--check", str(spec), "-o", str(lock), command="compile --check")
        invoke("show", str(lock), command="show")
    else:
        assert not lock.exists()  # nothing written on failure


@budget(40)
@given(data=st.data())
def test_any_config_compiles_or_is_one_line(project, data):
    folder = _scratch(project)
    config = data.draw(st.one_of(mutated(CONFIG), mutated(CONFIG), values), label="config")
    _write(folder, "config.json", json.dumps(config) if data.draw(st.booleans()) else _dump(config))
    invoke("compile", str(folder / "spec.yaml"), "-o", str(folder / "new.lock"), command="compile")


@budget(80)
@given(data=st.data())
def test_any_lock_is_shown_checked_and_run_or_is_one_line(project, data):
    folder = _scratch(project)
    base_text = (project / "plan.lock").read_text()
    base = yaml.safe_load(base_text)
    kind = data.draw(st.sampled_from(["resealed", "resealed", "stale", "other"]), label="kind")
    if kind == "other":
        content = data.draw(_texts(base_text, base), label="lock")
    else:
        document = data.draw(mutated(base), label="lock")
        if kind == "resealed" and isinstance(document, dict):
            try:
                document["plan_hash"] = document_sha256(document)  # a lock anyone could have re-hashed
            except (TypeError, ValueError):
                pass
        content = _dump(document)
    lock = _write(folder, "plan.lock", content)
    invoke("show", str(lock), command="show")
    invoke("compile", "--check", str(folder / "spec.yaml"), "-o", str(lock), command="compile --check")
    invoke("run", str(lock), "--check-only", command="run --check-only")

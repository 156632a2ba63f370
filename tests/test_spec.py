"""Spec validation: strict keys, sizes as bytes, one clear line for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planc.errors import SpecError
from planc.schemas import SCHEMA_FILES, schema_text
from planc.spec import load_spec, parse_spec
from planc.units import parse_bandwidth, parse_size

REPO = Path(__file__).resolve().parent.parent
BASE = {
    "planc": 1,
    "model": {"config": "config.json"},
    "hardware": {"gpus": [{"type": "v100-16gb", "count": 2}], "cpu_memory": "64GiB"},
    "workload": {"batch_size": 1, "max_seq_len": 8192},
}


def with_(path: str, value):
    data = json.loads(json.dumps(BASE))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[last] = value
    return data


def test_sizes_parse_to_bytes():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size(1024) == 1024
    assert parse_bandwidth("936GB/s") == 936 * 10**9
    for bad in ("24 gigs", "-1", "1.5", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_equal_sizes_hash_equal():
    a = parse_spec(with_("hardware.cpu_memory", "64GiB"))
    b = parse_spec(with_("hardware.cpu_memory", 64 * 2**30))
    assert a.sha256() == b.sha256()
    assert a.policy.objective == "latency" and a.policy.headroom == 0.05 and a.policy.offload == "none"


@pytest.mark.parametrize(
    "data,message",
    [
        (with_("workload.batch_sz", 2), "workload.batch_sz: unknown key"),
        (with_("hardware.cpu_memory", "lots"), "hardware.cpu_memory: not a size"),
        (with_("policy", {"objective": "speed"}), "policy.objective"),
        (with_("model", {"id": "a/b", "path": "x"}), "exactly one of id, path, config (got id, path)"),
        (with_("hardware.gpus", [{"type": "t4", "memory": "16GiB"}]), "either type (catalogue) or name/memory"),
        (with_("hardware.gpus", [{"name": "x", "memory": "8GiB", "compute_capability": "8", "bandwidth": "1GB/s"}]),
         "compute_capability"),
        (with_("planc", 2), "planc"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_specs_fail_with_one_line(data, message):
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("planc: 1\nmodel: {config: [\n")
    with pytest.raises(SpecError, match="line"):
        load_spec(path)


def test_committed_schemas_equal_generated():
    for which, name in SCHEMA_FILES.items():
        committed = (REPO / "schemas" / name).read_text()
        assert committed == schema_text(which), f"schemas/{name} is stale: run `planc schema {which} > schemas/{name}`"


def test_every_spec_field_is_documented():
    def walk(node, defs, path=""):
        for name, prop in node.get("properties", {}).items():
            ref = prop.get("$ref") or next((a.get("$ref") for a in prop.get("anyOf", []) if "$ref" in a), None)
            if ref:
                walk(defs[ref.split("/")[-1]], defs, f"{path}{name}.")
            elif name != "planc":
                assert prop.get("description"), f"{path}{name} has no description"

    data = json.loads(schema_text("spec"))
    walk(data, data["$defs"])

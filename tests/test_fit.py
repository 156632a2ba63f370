"""`planc fit`: what it says fits is what `planc compile` places, card by card, row by row, remedy by remedy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import CORPUS, REPO
from planc.cli import main
from planc.compile import compile_plan, compile_spec, installed_packages, locate_model
from planc.errors import InfeasibleError
from planc.fit import fit_spec
from planc.hardware import Inventory, load_catalogue, resolve_inventory
from planc.model import build_model_graph
from planc.spec import load_spec, parse_spec

SPEC = {
    "planc": 1,
    "model": {"config": "config.json"},
    "hardware": {"gpus": [{"type": "rtx2080ti"}, {"type": "rtx3090"}], "cpu_memory": "64GiB"},
    "workload": {"batch_size": 4, "max_seq_len": 32768},
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(CORPUS / "qwen3-8b" / "config.json", tmp_path / "config.json")
    return tmp_path


def write(project: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = project / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Compiler:
    """compile_plan on any inventory for the spec's model, graphs cached as fit caches them."""

    def __init__(self, spec_path: Path):
        self.spec = load_spec(spec_path)
        self.model = locate_model(self.spec, spec_path.parent, spec_path.parent, hash_weights=False).model
        self.graphs: dict = {}

    def build(self, config, dtype, trust, quantization=None, kv_cache=None):
        key = (dtype, quantization, kv_cache)
        if key not in self.graphs:
            self.graphs[key] = build_model_graph(config, dtype, trust, quantization, kv_cache)
        return self.graphs[key]

    def fits(self, gpus: list[dict], **changes) -> bool:
        data = json.loads(self.spec.model_dump_json())
        data["hardware"]["gpus"] = gpus
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            data[section][key] = value
        spec = parse_spec(data)
        inventory = resolve_inventory(spec.hardware)
        try:
            compile_plan(spec, Inventory(inventory.gpus, inventory.cpu_memory, None), self.model,
                         installed_packages(), spec.hardware.disk, self.build)
        except InfeasibleError:
            return False
        return True


def test_every_card_count_is_the_fewest_that_compiles(project):
    spec = write(project, SPEC)
    report = fit_spec(spec, max_gpus=4)
    compiler = Compiler(spec)

    counts = {fit.card.key: fit.count for fit in report.cards}
    assert len(counts) == len(load_catalogue())  # the whole catalogue, each card once
    assert {count for count in counts.values() if count} >= {1, 2}  # the workload makes the counts differ
    for key, count in counts.items():
        if count is None:
            assert not compiler.fits([{"type": key, "count": 4}]), key
            continue
        assert compiler.fits([{"type": key, "count": count}]), key
        if count > 1:
            assert not compiler.fits([{"type": key, "count": count - 1}]), key
    fitting = [fit for fit in report.cards if fit.count]
    assert [fit.total_memory for fit in fitting] == sorted(fit.total_memory for fit in fitting)
    assert all(fit.count is None for fit in report.cards[len(fitting):])


def test_envelope_rows_are_the_edge_of_what_compiles(project):
    spec = write(project, SPEC)
    report = fit_spec(spec, max_gpus=1)
    compiler = Compiler(spec)
    gpus = SPEC["hardware"]["gpus"]

    rows = dict(report.inventory.largest_context)
    assert rows[4] == 20428  # the hint `planc compile` prints for this spec
    for batch in (1, 4):
        seq = rows[batch]
        assert compiler.fits(gpus, workload__batch_size=batch, workload__max_seq_len=seq)
        if seq < report.context_limit:
            assert not compiler.fits(gpus, workload__batch_size=batch, workload__max_seq_len=seq + 1)
    by_context = dict(report.inventory.largest_batch)
    batch = by_context[8192]
    assert compiler.fits(gpus, workload__batch_size=batch, workload__max_seq_len=8192)
    assert not compiler.fits(gpus, workload__batch_size=batch + 1, workload__max_seq_len=8192)


def test_each_remedy_applied_to_the_spec_compiles(project):
    spec = write(project, SPEC)
    report = fit_spec(spec, max_gpus=4)
    assert not report.inventory.fits
    assert "does not fit" in report.inventory.message

    kinds = [remedy.kind for remedy in report.remedies]
    assert kinds.count("gpus") == 2 and "offload" in kinds and kinds.count("workload") == 2
    # Quantization proposed as spec changes that compile (below), not as a note.
    assert {remedy.field for remedy in report.remedies if remedy.kind == "quantization"} <= {"model.quantize", "model.kv_cache"}
    assert all(remedy.field is not None for remedy in report.remedies)
    for remedy in report.remedies:
        if remedy.field is None:
            continue
        data = yaml.safe_load(spec.read_text())
        section, key = remedy.field.split(".")
        if remedy.field == "hardware.gpus":
            data[section][key].append(remedy.value)
        else:
            data.setdefault(section, {})[key] = remedy.value
        compile_spec(write(project, data, "remedied.yaml"))  # raises if it does not fit


def test_quantization_is_proposed_when_the_weights_are_what_does_not_fit(project):
    """16 GiB of bf16 weights on a 12 GiB card: bitsandbytes at load is the remedy, and it compiles."""
    spec = write(project, {**SPEC, "hardware": {"gpus": [{"type": "rtx3060"}], "cpu_memory": "64GiB"},
                           "workload": {"batch_size": 1, "max_seq_len": 4096}})
    report = fit_spec(spec, max_gpus=1)
    assert not report.inventory.fits
    (remedy,) = [remedy for remedy in report.remedies if remedy.field == "model.quantize"]
    assert remedy.value == "bnb-8bit"  # the first that fits, of 8-bit then 4-bit

    data = yaml.safe_load(spec.read_text())
    data["model"]["quantize"] = remedy.value
    plan, _ = compile_spec(write(project, data, "remedied.yaml"))
    assert plan.quantization.method == "bnb-8bit" and all(device != "cpu" for device in plan.device_map.values())


def test_a_spec_that_fits_reports_its_plan(project):
    spec = write(project, {**SPEC, "workload": {"batch_size": 1, "max_seq_len": 4096}})
    report = fit_spec(spec, max_gpus=1)
    plan, _ = compile_spec(spec)

    assert report.inventory.fits and not report.remedies
    assert report.inventory.decode_ms_per_token == plan.objective.decode_ms_per_token
    assert report.inventory.peak_utilisation == plan.objective.peak_utilisation


def test_prices_sort_cheapest_first(project):
    spec = write(project, SPEC)
    prices = project / "prices.yaml"
    # One card of each: an a100-80gb at 2.0 beats two l4s at 1.5; the unpriced come after the priced.
    prices.write_text("a100-sxm4-80gb: 2.0\nNVIDIA L4: 0.75\nh100-sxm: 3\n")
    report = fit_spec(spec, max_gpus=4, prices=prices)

    priced = [(fit.card.key, fit.count, fit.price) for fit in report.cards if fit.price is not None]
    assert [p for _, _, p in priced] == sorted(p for _, _, p in priced)
    assert {key for key, _, _ in priced} == {"a100-sxm4-80gb", "l4", "h100-sxm"}
    for key, count, price in priced:
        assert price == count * {"a100-sxm4-80gb": 2.0, "l4": 0.75, "h100-sxm": 3.0}[key]
    assert [fit.price is None for fit in report.cards if fit.count] == [False] * 3 + [True] * (
        sum(1 for fit in report.cards if fit.count) - 3
    )


@pytest.mark.parametrize(
    "content, expect",
    [
        ("h100-sxmm: 2\n", "unknown GPU type 'h100-sxmm'; closest: h100-sxm"),
        ("h100-sxm: cheap\n", "price must be a non-negative number"),
        ("- h100-sxm\n", "expected a mapping of GPU card to the price"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_prices_are_one_line_exit_2(project, content, expect):
    spec = write(project, SPEC)
    (project / "prices.yaml").write_text(content)

    result = CliRunner().invoke(main, ["fit", str(spec), "--prices", str(project / "prices.yaml")])

    assert result.exit_code == 2
    assert expect in result.output and result.output.count("\n") == 1


def test_cli_json_and_terminal(project):
    spec = write(project, SPEC)
    runner = CliRunner()

    as_json = subprocess.run(  # the one real process: what tools call
        [sys.executable, "-m", "planc", "fit", str(spec), "--max-gpus", "2", "--json"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=300,
    )
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["inventory"]["fits"] is False
    assert data["max_gpus"] == 2 and len(data["catalogue"]) == len(load_catalogue())
    missing = [card for card in data["catalogue"] if card["count"] is None]
    assert missing and all(card["reason"] for card in missing)
    assert {"field", "value", "change", "detail"} <= set(data["remedies"][0])

    text = runner.invoke(main, ["fit", str(spec), "--max-gpus", "2"])
    assert text.exit_code == 0
    assert "Fewest cards that fit" in text.output and "Largest context" in text.output
    assert "policy.offload: cpu" in text.output
    # The console reads no markup (lock strings print as themselves): styles are Text, never tags.
    assert "[/" not in text.output and "[bold]" not in text.output and "[dim]" not in text.output

    missing_spec = runner.invoke(main, ["fit", str(project / "nope.yaml")])
    assert missing_spec.exit_code == 2 and missing_spec.output.startswith("error: cannot read spec")

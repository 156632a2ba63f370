"""The GPU catalogue, name lookup, inventory resolution and machine detection."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from planc import detect
from planc.detect import DetectedGpu, DetectedMachine, detect_machine, machine_as_spec_yaml, match_catalogue
from planc.errors import SpecError
from planc.hardware import _normalise, load_catalogue, lookup_gpu, resolve_inventory
from planc.spec import CatalogueGpu, ExplicitGpu, Hardware
from planc.units import GiB

MiB = 2**20

# Every NVIDIA row of docs/reference/gpu-catalogue.md, by driver name.
REFERENCE_NAMES = [
    "Tesla V100-SXM2-16GB",
    "Tesla V100-SXM2-32GB",
    "Tesla V100-PCIE-16GB",
    "Tesla V100-PCIE-32GB",
    "Tesla T4",
    "NVIDIA GeForce RTX 2080 Ti",
    "NVIDIA GeForce RTX 3090",
    "NVIDIA GeForce RTX 4090",
    "NVIDIA GeForce RTX 5090",
    "NVIDIA A10",
    "NVIDIA A10G",
    "NVIDIA A30",
    "NVIDIA A40",
    "NVIDIA A100-PCIE-40GB",
    "NVIDIA A100 80GB PCIe",
    "NVIDIA A100-SXM4-40GB",
    "NVIDIA A100-SXM4-80GB",
    "NVIDIA L4",
    "NVIDIA L20",
    "NVIDIA L40",
    "NVIDIA L40S",
    "NVIDIA H20",
    "NVIDIA H20-3e",
    "NVIDIA H100 PCIe",
    "NVIDIA H100 80GB HBM3",
    "NVIDIA H100 NVL",
    "NVIDIA H200",
    "NVIDIA H200 NVL",
    "NVIDIA GH200 480GB",
    "NVIDIA GH200 144G HBM3e",
    "NVIDIA B200",
    "NVIDIA GB200",
    "NVIDIA RTX A6000",
    "NVIDIA RTX 6000 Ada Generation",
]
# Added from the coverage issue's list, by driver name (the RTX 3080 name covers its 10 and 12 GB cards).
ADDED_NAMES = [
    "NVIDIA GeForce RTX 3060",
    "NVIDIA GeForce RTX 3080",
    "NVIDIA GeForce RTX 3090 Ti",
    "NVIDIA GeForce RTX 4060 Ti",
    "NVIDIA GeForce RTX 4070 Ti SUPER",
    "NVIDIA GeForce RTX 4080",
    "NVIDIA GeForce RTX 4080 SUPER",
    "NVIDIA GeForce RTX 5070 Ti",
    "NVIDIA GeForce RTX 5080",
    "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
    "NVIDIA RTX PRO 6000 Blackwell Server Edition",
    "NVIDIA A800-SXM4-80GB",
    "NVIDIA H800",
    "NVIDIA B300 SXM6 AC",
]


def _spellings(model) -> list[str]:
    """Every normalised text that lookup_gpu accepts for `model`."""
    names = [model.name, model.key, *model.aliases, model.name.removeprefix("NVIDIA ")]
    return list(dict.fromkeys(_normalise(name) for name in names))


# Catalogue


def test_catalogue_covers_every_reference_row_and_the_added_cards():
    names = {model.name for model in load_catalogue()}
    assert set(REFERENCE_NAMES) <= names
    assert set(ADDED_NAMES) <= names


@pytest.mark.parametrize("model", load_catalogue(), ids=lambda model: model.key)
def test_entry_fields_are_sane(model):
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", model.key)
    assert re.fullmatch(r"\d+\.\d+", model.compute_capability)
    assert 8 * GiB <= model.memory <= 300 * GiB
    assert model.bandwidth > 0
    assert model.tflops_16bit is None or model.tflops_16bit > 0
    assert model.source.strip()


def test_interconnect_facts_name_catalogued_cards_and_every_architecture():
    """A card added to the catalogue must not silently fall back to another generation's links."""
    from planc.parallel.topology import facts

    cards = {model.key: model for model in load_catalogue()}
    assert set(facts()["nvlink_links"]) <= set(cards)
    assert {model.compute_capability for model in cards.values()} <= set(facts()["pcie_generation"])
    # Data-centre SXM / NVL / superchip parts all have NVLink; so do the export variants.
    for key, model in cards.items():
        if any(part in model.name for part in ("SXM", " NVL", "GH200", "GB200", "H800", "H20", "A800")):
            assert facts()["nvlink_links"].get(key, 0) > 0, key


def test_keys_and_aliases_name_one_entry_each_and_shared_driver_names_differ_in_memory():
    owner: dict[str, str] = {}
    names: dict[str, list] = {}
    for model in load_catalogue():
        names.setdefault(_normalise(model.name), []).append(model)
        for spelling in set(_spellings(model)) - {_normalise(model.name), _normalise(model.name.removeprefix("NVIDIA "))}:
            assert spelling not in owner, f"{spelling!r} names both {owner[spelling]} and {model.key}"
            owner[spelling] = model.key
    for spelling in owner:
        assert spelling not in names or [m.key for m in names[spelling]] == [owner[spelling]], spelling
    for variants in names.values():
        memories = sorted(model.memory for model in variants)
        assert all(b > a * 1.1 for a, b in zip(memories, memories[1:])), [m.key for m in variants]


def test_every_spelling_finds_its_own_entry():
    for model in load_catalogue():
        texts = (model.key, *model.aliases)
        if sum(m.name == model.name for m in load_catalogue()) == 1:
            texts += (model.name,)
        for text in texts:
            assert lookup_gpu(text) is model


def test_a_driver_name_of_several_variants_asks_for_the_key():
    with pytest.raises(SpecError, match=r"names 2 cards .* rtx3080-10gb \(9\.8 GiB\), rtx3080-12gb \(11\.6 GiB\)"):
        lookup_gpu("NVIDIA GeForce RTX 3080")
    assert lookup_gpu("3080-12gb").bandwidth == 912 * 10**9


def test_detection_tells_variants_of_one_driver_name_apart_by_memory():
    name = "NVIDIA GeForce RTX 3080"
    assert match_catalogue(_gpu(0, name, lookup_gpu("rtx3080-10gb").memory + 50 * MiB)).key == "rtx3080-10gb"
    assert match_catalogue(_gpu(0, name, 12 * GiB)).key == "rtx3080-12gb"
    # The 8 GB RTX 4060 Ti shares the 16 GB card's name and is not catalogued.
    assert match_catalogue(_gpu(0, "NVIDIA GeForce RTX 4060 Ti", 8 * GiB - 400 * MiB, "8.9")) is None
    assert match_catalogue(_gpu(0, "NVIDIA GeForce RTX 4060 Ti", 16722821120, "8.9")).key == "rtx4060ti-16gb"


def test_a_few_known_figures():
    assert lookup_gpu("rtx2080ti").memory == 11523260416
    assert lookup_gpu("v100-16gb").memory == 16945512448
    assert lookup_gpu("rtx-a6000").memory == 46068 * MiB
    assert lookup_gpu("h100").compute_capability == "9.0"
    assert lookup_gpu("rtx5090").compute_capability == "12.0"
    assert lookup_gpu("rtx3090ti").memory == 24114 * MiB
    assert lookup_gpu("rtx4060ti-16gb").memory == 16722821120
    assert lookup_gpu("rtx5080").memory == 15877 * MiB
    assert lookup_gpu("NVIDIA RTX PRO 6000 Blackwell Server Edition").memory == 97250 * MiB
    assert lookup_gpu("h800").memory == lookup_gpu("h100-sxm").memory
    assert lookup_gpu("b300").compute_capability == "10.3"
    for derived in ("rtx3080-12gb", "rtx4080-super", "rtx-pro-6000", "a800", "h800", "b300"):
        assert lookup_gpu(derived).source.startswith("memory derived:")


# Lookup


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
        ("a100-sxm4-80gb", "a100-sxm4-80gb"),
        ("a100-80gb", "a100-sxm4-80gb"),
        ("A100_80GB", "a100-sxm4-80gb"),
        ("nvidia a100-sxm4-80gb", "a100-sxm4-80gb"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA_H100_80GB_HBM3", "h100-sxm"),
        ("h100", "h100-sxm"),
        ("H100-80GB", "h100-sxm"),
        ("3090", "rtx3090"),
        ("rtx-3090", "rtx3090"),
        ("RTX3090", "rtx3090"),
        ("Tesla V100-SXM2-16GB", "v100-sxm2-16gb"),
        ("V100-16GB", "v100-sxm2-16gb"),
        ("Tesla T4", "t4"),
    ],
)
def test_lookup_by_name_key_or_alias_ignoring_case_and_punctuation(text, key):
    assert lookup_gpu(text).key == key


@pytest.mark.parametrize(
    ("old_name", "key"),
    [("GeForce RTX 2080 Ti", "rtx2080ti"), ("GeForce RTX 3090", "rtx3090"), ("GeForce RTX 4090", "rtx4090")],
)
def test_lookup_accepts_old_geforce_names_without_the_nvidia_prefix(old_name, key):
    assert lookup_gpu(old_name).key == key


def test_unknown_gpu_names_the_closest_entries():
    with pytest.raises(SpecError, match=r"unknown GPU type 'Tesla V100-SXM2-16G'.*v100-sxm2-16gb"):
        lookup_gpu("Tesla V100-SXM2-16G")


def test_unknown_gpu_without_close_match_points_to_the_list():
    with pytest.raises(SpecError, match="planc gpus"):
        lookup_gpu("Voodoo2")


# Inventory


def test_resolve_inventory_expands_counts_in_order():
    hardware = Hardware.model_validate(
        {
            "gpus": [
                {"type": "rtx3090", "count": 2},
                {"name": "Custom Card", "memory": "20GiB", "compute_capability": "8.6", "bandwidth": "500GB/s"},
                {"type": "NVIDIA A100-SXM4-80GB"},
            ],
            "cpu_memory": "64GiB",
        }
    )
    inventory = resolve_inventory(hardware)
    assert [gpu.index for gpu in inventory.gpus] == [0, 1, 2, 3]
    assert [gpu.catalogue for gpu in inventory.gpus] == ["rtx3090", "rtx3090", None, "a100-sxm4-80gb"]
    assert inventory.gpus[0].memory == lookup_gpu("rtx3090").memory
    assert inventory.gpus[2].memory == 20 * GiB
    assert inventory.gpus[2].bandwidth == 500 * 10**9
    assert inventory.gpus[3].sm == 80
    assert inventory.cpu_memory == 64 * GiB


def test_resolve_inventory_rejects_an_unknown_type():
    hardware = Hardware.model_validate({"gpus": [{"type": "rtx9090"}], "cpu_memory": "8GiB"})
    with pytest.raises(SpecError, match="rtx9090"):
        resolve_inventory(hardware)


# Detection


def _gpu(index: int, name: str, memory: int, cc: str = "8.6") -> DetectedGpu:
    return DetectedGpu(index=index, name=name, memory=memory, compute_capability=cc)


def test_match_catalogue():
    assert match_catalogue(_gpu(0, "NVIDIA GeForce RTX 3090", 25414860800)).key == "rtx3090"
    assert match_catalogue(_gpu(0, "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 97250 * MiB, "12.0")).key == (
        "rtx-pro-6000"
    )
    assert match_catalogue(_gpu(0, "NVIDIA RTX PRO 4000 Blackwell", 24 * GiB, "12.0")) is None


def test_spec_yaml_groups_catalogued_cards_and_validates():
    rtx3090 = lookup_gpu("rtx3090").memory
    machine = DetectedMachine(
        gpus=(
            _gpu(0, "NVIDIA GeForce RTX 3090", rtx3090),
            _gpu(1, "NVIDIA GeForce RTX 3090", rtx3090),
            _gpu(2, "NVIDIA GeForce RTX 4090", lookup_gpu("rtx4090").memory, "8.9"),
            _gpu(3, "NVIDIA GeForce RTX 3090", rtx3090),
        ),
        cpu_memory=62 * GiB + 900 * MiB,
    )
    text = machine_as_spec_yaml(machine)
    loaded = yaml.safe_load(text)
    assert loaded["hardware"] == {
        "gpus": [{"type": "rtx3090", "count": 2}, {"type": "rtx4090", "count": 1}, {"type": "rtx3090", "count": 1}],
        "cpu_memory": "62GiB",
    }
    hardware = Hardware.model_validate(loaded["hardware"])
    assert [gpu.catalogue for gpu in resolve_inventory(hardware).gpus] == ["rtx3090", "rtx3090", "rtx4090", "rtx3090"]


def test_spec_yaml_asks_for_the_bandwidth_of_an_uncatalogued_card():
    machine = DetectedMachine(
        gpus=(
            _gpu(0, "NVIDIA A10", lookup_gpu("a10").memory),
            _gpu(1, "NVIDIA RTX PRO 6000 Blackwell", 97250 * MiB + 123, "12.0"),
            _gpu(2, "NVIDIA RTX PRO 6000 Blackwell", 97250 * MiB + 123, "12.0"),
        ),
        cpu_memory=16 * GiB,
    )
    text = machine_as_spec_yaml(machine)
    assert "# bandwidth: FILL IN" in text
    gpus = yaml.safe_load(text)["hardware"]["gpus"]
    assert gpus[0] == {"type": "a10", "count": 1}
    assert gpus[1] == {
        "name": "NVIDIA RTX PRO 6000 Blackwell",
        "memory": "97250MiB",
        "compute_capability": "12.0",
        "count": 2,
    }
    # Left unfilled the spec is rejected; once the user fills the bandwidth in it is valid.
    with pytest.raises(ValueError, match="bandwidth"):
        Hardware.model_validate(yaml.safe_load(text)["hardware"])
    filled = yaml.safe_load(text.replace("# bandwidth: FILL IN", "bandwidth: 1792GB/s #"))["hardware"]
    entries = Hardware.model_validate(filled).gpus
    assert isinstance(entries[0], CatalogueGpu)
    assert isinstance(entries[1], ExplicitGpu)
    assert entries[1].memory == 97250 * MiB
    assert entries[1].bandwidth == 1792 * 10**9


def test_spec_yaml_writes_a_card_with_less_memory_than_the_catalogue_explicitly():
    # Windows (WDDM) drivers show an RTX 4090 with 23028 MiB: plan with that, not the catalogue's figure.
    catalogued = lookup_gpu("rtx4090")
    machine = DetectedMachine(gpus=(_gpu(0, catalogued.name, 23028 * MiB, "8.9"),), cpu_memory=32 * GiB)
    text = machine_as_spec_yaml(machine)
    (entry,) = Hardware.model_validate(yaml.safe_load(text)["hardware"]).gpus
    assert isinstance(entry, ExplicitGpu)
    assert entry.memory == 23028 * MiB
    assert entry.bandwidth == catalogued.bandwidth
    assert "catalogue entry rtx4090" in text


def test_spec_yaml_without_gpus():
    text = machine_as_spec_yaml(DetectedMachine(gpus=(), cpu_memory=8 * GiB - 1))
    assert yaml.safe_load(text) == {"hardware": {"gpus": [], "cpu_memory": "7GiB"}}


NVIDIA_SMI_OUTPUT = """\
0, NVIDIA H100 80GB HBM3, 81559, 480, 9.0
1, NVIDIA H100 80GB HBM3, 81559, 480, 9.0
2, NVIDIA GeForce RTX 3090, 24576, 338, 8.6
"""


def test_parse_nvidia_smi_subtracts_the_reserved_memory():
    gpus = detect.parse_nvidia_smi(NVIDIA_SMI_OUTPUT)
    assert gpus[0] == DetectedGpu(0, "NVIDIA H100 80GB HBM3", 81079 * MiB, "9.0")
    assert [gpu.index for gpu in gpus] == [0, 1, 2]
    assert gpus[2].compute_capability == "8.6"


def test_parse_nvidia_smi_without_reserved_field():
    fields = ("index", "name", "memory.total", "compute_cap")
    (gpu,) = detect.parse_nvidia_smi("0, Tesla T4, 15360, 7.5\n", fields)
    assert gpu == DetectedGpu(0, "Tesla T4", 15360 * MiB, "7.5")


def test_parse_nvidia_smi_gives_up_on_unusable_values():
    assert detect.parse_nvidia_smi("0, NVIDIA A100-SXM4-80GB, 81920, 0, [N/A]\n") is None


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, [0, 1, 2]),
        ("2,0", [2, 0]),
        ("1", [1]),
        ("", []),
        ("-1", []),
        ("0,7,1", [0]),  # CUDA ignores everything from the first invalid entry on
    ],
)
def test_cuda_visible_devices_selects_and_renumbers(visible, expected):
    gpus = detect.parse_nvidia_smi(NVIDIA_SMI_OUTPUT)
    chosen = detect._cuda_visible(gpus, visible)
    by_index = {gpu.index: gpu for gpu in gpus}
    assert [gpu.name for gpu in chosen] == [by_index[i].name for i in expected]
    assert [gpu.index for gpu in chosen] == list(range(len(expected)))


def test_cuda_visible_devices_by_uuid_is_left_to_cuda():
    gpus = detect.parse_nvidia_smi(NVIDIA_SMI_OUTPUT)
    assert detect._cuda_visible(gpus, "GPU-4e817856-1fb8-192a-7ab7-0e0e4476c184") is None


def test_missing_nvidia_smi_means_no_gpus_from_it(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert detect._gpus_from_nvidia_smi() is None


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has NVIDIA GPUs")
def test_detect_machine_on_a_machine_without_gpus():
    machine = detect_machine()
    assert machine.gpus == ()
    assert machine.cpu_memory > 0


def test_importing_detect_does_not_import_torch():
    code = "import sys, planc.detect; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---------------------------------------------------------------- GPU links (nvidia-smi topo -m)

TOPO = Path(__file__).parent / "data" / "topo"


@pytest.mark.parametrize(
    ("fixture", "size", "link", "islands"),
    [
        ("dgx-h100.txt", 8, "NV18", [tuple(range(8))]),
        ("dgx-a100-nics.txt", 8, "NV12", [tuple(range(8))]),
        ("dgx2-v100-16.txt", 16, "NV6", [tuple(range(16))]),
        ("2x-rtx5090-phb.txt", 2, "PHB", []),
        ("4x-bridged-pairs.txt", 4, "NV4", [(0, 1), (2, 3)]),
    ],
)
def test_topology_matrix_from_real_topo_outputs(fixture, size, link, islands):
    from planc.detect import parse_topology
    from planc.hardware import Gpu, Node
    from planc.parallel.topology import nvlink_islands

    matrix = parse_topology((TOPO / fixture).read_text())
    assert matrix is not None and len(matrix) == size and all(len(row) == size for row in matrix)
    assert matrix[0][0] == "X" and matrix[0][1] == link
    gpus = tuple(Gpu(i, "card", 80 * GiB, "9.0", 3 * 10**12, "h100-sxm") for i in range(size))
    assert nvlink_islands(Node(0, gpus, 64 * GiB, None, matrix)) == islands


def test_topology_written_into_the_detected_hardware_block():
    from planc.detect import DetectedGpu, DetectedMachine, machine_as_spec_yaml, parse_topology
    from planc.spec import Hardware

    matrix = parse_topology((TOPO / "4x-bridged-pairs.txt").read_text())
    gpus = tuple(DetectedGpu(i, "NVIDIA GeForce RTX 3090", 25_447_170_048, "8.6") for i in range(4))
    text = machine_as_spec_yaml(DetectedMachine(gpus, 64 * GiB, matrix))
    hardware = Hardware.model_validate(yaml.safe_load(text)["hardware"])
    assert hardware.interconnect.links[2] == ["SYS", "SYS", "X", "NV4"]


def test_unreadable_topology_is_none():
    from planc.detect import parse_topology

    assert parse_topology("") is None
    assert parse_topology("\tGPU0\tGPU1\nGPU0\t X \tNV4\nGPU1\tPHB\t X \n") is None  # not symmetric

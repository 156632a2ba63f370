"""What this machine has: its GPUs (nvidia-smi, else torch) and RAM, and that as a spec's `hardware:` block.

Detection is I/O at the edge: the compiler never calls it. cli.py prints
`machine_as_spec_yaml(detect_machine())` for the user to paste into a spec.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from itertools import groupby

import psutil

from planc.hardware import GpuModel, match_driver_name
from planc.units import GiB

MiB = 2**20

NVIDIA_SMI_TIMEOUT_S = 20
# Below this fraction of the catalogue's memory a detected card is written out with its own
# numbers, so a plan never counts on memory the driver does not give (ECC on, a newer driver).
CATALOGUE_MEMORY_TOLERANCE = 0.99

_NVIDIA_SMI_FIELDS = ("index", "name", "memory.total", "memory.reserved", "compute_cap")


@dataclass(frozen=True)
class DetectedGpu:
    """One GPU as the driver reports it."""

    index: int  # CUDA device index
    name: str  # driver product name, e.g. "NVIDIA H100 80GB HBM3"
    memory: int  # bytes CUDA can use (total less what the driver reserves)
    compute_capability: str  # "major.minor"


@dataclass(frozen=True)
class DetectedMachine:
    """The GPUs (in CUDA order) and RAM of the machine planc runs on."""

    gpus: tuple[DetectedGpu, ...]
    cpu_memory: int  # bytes of RAM
    # Per-pair GPU links as `nvidia-smi topo -m` writes them (X, NV18, PIX, SYS, ...), in CUDA order;
    # None when nvidia-smi cannot tell (no GPUs, no nvidia-smi, UUIDs in CUDA_VISIBLE_DEVICES).
    links: tuple[tuple[str, ...], ...] | None = None


def detect_machine(topology: bool = False) -> DetectedMachine:
    """Detect GPUs (nvidia-smi first, then torch.cuda) and total RAM; no GPU found gives an empty tuple.

    `topology` also reads the links between the GPUs (`nvidia-smi topo -m`).
    """
    gpus = _gpus_from_nvidia_smi()
    if gpus is None:
        gpus = _gpus_from_torch()
    links = _links_from_nvidia_smi(len(gpus)) if topology and len(gpus) > 1 else None
    return DetectedMachine(gpus=gpus, cpu_memory=psutil.virtual_memory().total, links=links)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GPU_NAME = re.compile(r"^GPU(\d+)$")
_LINK = re.compile(r"^(X|NV\d+|PIX|PXB|PHB|NODE|SYS|SOC)$")


def parse_topology(text: str) -> tuple[tuple[str, ...], ...] | None:
    """The GPU-to-GPU block of `nvidia-smi topo -m` output (NIC columns and rows, affinity columns and the
    legend ignored); None when the text holds no readable matrix. SOC, the old name of SYS, reads as SYS."""
    lines = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.split()[:1] == ["GPU0"]), None)
    if start is None:
        return None
    header = lines[start].split()
    count = 0
    while count < len(header) and _GPU_NAME.match(header[count]) and int(header[count][3:]) == count:
        count += 1
    rows: dict[int, tuple[str, ...]] = {}
    for line in lines[start + 1 :]:
        fields = line.split()
        if not fields or not (match := _GPU_NAME.match(fields[0])) or fields[0] == line.strip():
            continue
        cells = fields[1 : count + 1]
        if len(cells) != count or not all(_LINK.match(cell) for cell in cells):
            return None
        rows[int(match.group(1))] = tuple("SYS" if cell == "SOC" else cell for cell in cells)
    if sorted(rows) != list(range(count)) or count == 0:
        return None
    matrix = tuple(rows[i] for i in range(count))
    if any(matrix[i][i] != "X" or matrix[i][j] != matrix[j][i] for i in range(count) for j in range(count)):
        return None
    return matrix


def _links_from_nvidia_smi(visible_count: int) -> tuple[tuple[str, ...], ...] | None:
    try:
        result = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    matrix = parse_topology(result.stdout) if result.returncode == 0 else None
    if matrix is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # nvidia-smi numbers every GPU; CUDA renumbers the visible ones from 0.
        chosen = [int(token) for token in visible.split(",") if token.strip().isdigit()][:visible_count]
        if len(chosen) != visible_count or max(chosen, default=0) >= len(matrix):
            return None
        matrix = tuple(tuple(matrix[i][j] for j in chosen) for i in chosen)
    return matrix if len(matrix) == visible_count else None


def match_catalogue(gpu: DetectedGpu) -> GpuModel | None:
    """The catalogue entry for a detected GPU (driver name, then memory among variants of that
    name), or None when the card is not catalogued."""
    return match_driver_name(gpu.name, gpu.memory)


def machine_as_spec_yaml(machine: DetectedMachine) -> str:
    """The `hardware:` block of a spec describing `machine`.

    Catalogued cards become `{type: <key>, count: n}`; others are written with their own numbers,
    and since no driver reports memory bandwidth, that line is left as a comment to fill in.
    """
    lines = ["hardware:"]
    entries = [_spec_entry(gpu) for gpu in machine.gpus]
    if not entries:
        lines.append("  gpus: []")
    else:
        lines.append("  gpus:")
        for entry, group in groupby(entries):
            lines.extend(_entry_lines(entry, count=len(list(group))))
    lines.append(f"  cpu_memory: {machine.cpu_memory // GiB}GiB")
    if machine.links is not None:
        lines.append("  interconnect:  # nvidia-smi topo -m: NV<n> = n NVLinks; PIX/PXB/PHB/NODE/SYS = PCIe paths")
        lines.append("    links:")
        lines.extend(f"      - [{', '.join(row)}]" for row in machine.links)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Entry:
    """One line group of the gpus list; equal entries next to each other merge into a count."""

    type: str | None
    name: str
    memory: int
    compute_capability: str
    bandwidth: int | None
    note: str | None


def _spec_entry(gpu: DetectedGpu) -> _Entry:
    model = match_catalogue(gpu)
    if model is None:
        return _Entry(None, gpu.name, gpu.memory, gpu.compute_capability, None, "not in planc's GPU catalogue")
    if gpu.memory >= model.memory * CATALOGUE_MEMORY_TOLERANCE:
        return _Entry(model.key, model.name, model.memory, model.compute_capability, model.bandwidth, None)
    note = (
        f"catalogue entry {model.key} has {model.memory / GiB:.2f} GiB but this card reports "
        f"{gpu.memory / GiB:.2f} GiB (ECC on, or another driver)"
    )
    return _Entry(None, gpu.name, gpu.memory, gpu.compute_capability, model.bandwidth, note)


def _entry_lines(entry: _Entry, count: int) -> list[str]:
    if entry.type is not None:
        return [f"    - {{type: {entry.type}, count: {count}}}"]
    lines = []
    if entry.note:
        lines.append(f"    # {entry.note}")
    lines += [
        f"    - name: {json.dumps(entry.name)}",
        f"      memory: {entry.memory // MiB}MiB",
        f"      compute_capability: {json.dumps(entry.compute_capability)}",
    ]
    if entry.bandwidth is None:
        lines.append("      # bandwidth: FILL IN the card's memory bandwidth from its datasheet, e.g. 936GB/s")
    else:
        lines.append(f"      bandwidth: {_bandwidth_text(entry.bandwidth)}")
    lines.append(f"      count: {count}")
    return lines


def _bandwidth_text(bytes_per_second: int) -> str:
    if bytes_per_second % 10**9 == 0:
        return f"{bytes_per_second // 10**9}GB/s"
    return str(bytes_per_second)


def _gpus_from_nvidia_smi() -> tuple[DetectedGpu, ...] | None:
    """GPUs listed by nvidia-smi, or None when it is missing, fails or cannot be read."""
    # Drivers before R510 do not know memory.reserved; ask again without it.
    for fields in (_NVIDIA_SMI_FIELDS, tuple(f for f in _NVIDIA_SMI_FIELDS if f != "memory.reserved")):
        try:
            result = subprocess.run(
                ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=NVIDIA_SMI_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if result.returncode == 0:
            gpus = parse_nvidia_smi(result.stdout, fields)
            return None if gpus is None else _cuda_visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return None


def parse_nvidia_smi(text: str, fields: tuple[str, ...] = _NVIDIA_SMI_FIELDS) -> tuple[DetectedGpu, ...] | None:
    """Read `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` output; None if a value is unusable.

    Memory is memory.total less memory.reserved (both MiB): what CUDA's total_memory reports.
    """
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            values = dict(zip(fields, (value.strip() for value in line.split(",")), strict=True))
            memory_mib = int(values["memory.total"]) - int(values.get("memory.reserved", 0))
            major, minor = (int(part) for part in values["compute_cap"].split("."))
            gpus.append(DetectedGpu(int(values["index"]), values["name"], memory_mib * MiB, f"{major}.{minor}"))
        except ValueError:
            return None  # "[N/A]" and the like: let torch answer instead
    return tuple(gpus)


def _cuda_visible(gpus: tuple[DetectedGpu, ...], visible: str | None) -> tuple[DetectedGpu, ...] | None:
    """The GPUs a CUDA program sees under CUDA_VISIBLE_DEVICES, renumbered from 0.

    None when the variable names devices by UUID or MIG instance, which only CUDA itself can resolve.
    """
    if visible is None:
        return gpus
    by_index = {gpu.index: gpu for gpu in gpus}
    chosen: list[DetectedGpu] = []
    for token in (token.strip() for token in visible.split(",")):
        if token.startswith(("GPU-", "MIG-")):
            return None
        # CUDA stops at the first entry that is not a valid device index.
        if not token.isdigit() or int(token) not in by_index or by_index[int(token)] in chosen:
            break
        chosen.append(by_index[int(token)])
    return tuple(
        DetectedGpu(cuda_index, gpu.name, gpu.memory, gpu.compute_capability) for cuda_index, gpu in enumerate(chosen)
    )


def _gpus_from_torch() -> tuple[DetectedGpu, ...]:
    """GPUs torch.cuda sees; none when torch is missing or CUDA is unavailable."""
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append(
            DetectedGpu(index, properties.name, properties.total_memory, f"{properties.major}.{properties.minor}")
        )
    return tuple(gpus)

"""GPU catalogue (data/gpus.yaml) and the resolution of a spec's hardware into an inventory.

The inventory is a flat list of GPUs in CUDA order. Several nodes would become a list of
such inventories (`hardware.nodes`), each with its own CPU and disk; the solver already
works on a device list, so a distributed runner adds an outer level rather than a rewrite.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from planc.errors import SpecError
from planc.units import parse_bandwidth, parse_size


@dataclass(frozen=True)
class GpuModel:
    """One catalogue entry."""

    key: str
    name: str
    aliases: tuple[str, ...]
    memory: int
    compute_capability: str
    bandwidth: int
    tflops_16bit: float | None
    source: str


@dataclass(frozen=True)
class Gpu:
    """One planned GPU."""

    index: int
    name: str
    memory: int
    compute_capability: str
    bandwidth: int
    catalogue: str | None = None

    @property
    def capability(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    @property
    def sm(self) -> int:
        """Compute capability as the sm number (7.5 -> 75)."""
        major, minor = self.capability
        return major * 10 + minor


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    cpu_memory: int
    disk: str | None


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@lru_cache(maxsize=1)
def load_catalogue() -> tuple[GpuModel, ...]:
    """The bundled GPU catalogue."""
    raw = yaml.safe_load(resources.files("planc").joinpath("data/gpus.yaml").read_text())
    return tuple(
        GpuModel(
            key=entry["key"],
            name=entry["name"],
            aliases=tuple(entry.get("aliases", ())),
            memory=parse_size(entry["memory"]),
            compute_capability=str(entry["compute_capability"]),
            bandwidth=parse_bandwidth(entry["bandwidth"]),
            tflops_16bit=entry.get("tflops_16bit"),
            source=entry["source"],
        )
        for entry in raw["gpus"]
    )


def _spellings(model: GpuModel) -> set[str]:
    # Old drivers drop the "NVIDIA " prefix from GeForce names; accept both spellings.
    names = (model.name, model.key, *model.aliases, model.name.removeprefix("NVIDIA "))
    return {_normalise(n) for n in names}


def lookup_gpu(text: str) -> GpuModel:
    """Find a catalogue entry by exact driver name, key or alias (case and punctuation ignored).

    Raises SpecError naming the closest entries when nothing matches, and the keys to choose from
    when a driver name is shared by variants (the RTX 3080 is sold with 10 and 12 GB).
    """
    wanted = _normalise(text)
    found = [model for model in load_catalogue() if wanted in _spellings(model)]
    if len(found) == 1:
        return found[0]
    if found:
        choices = ", ".join(f"{m.key} ({m.memory / 2**30:.1f} GiB)" for m in found)
        raise SpecError(f"GPU type {text!r} names {len(found)} cards with the same driver name: give one of {choices}")
    choices = {}
    for model in load_catalogue():
        for n in (model.name, model.key, *model.aliases):
            choices[_normalise(n)] = f"{model.key} ({model.name})"
    close = difflib.get_close_matches(wanted, list(choices), n=3, cutoff=0.5)
    hint = ", ".join(dict.fromkeys(choices[c] for c in close)) or "see `planc gpus`"
    raise SpecError(f"unknown GPU type {text!r}; closest: {hint}")


def match_driver_name(name: str, memory: int) -> GpuModel | None:
    """The entry for a card the driver reports as `name` with `memory` bytes: among the entries of
    that driver name, the one closest in memory, and none when even that one is more than 10%
    off (a variant planc does not catalogue, such as the 8 GB RTX 4060 Ti)."""
    wanted = _normalise(name)
    candidates = [model for model in load_catalogue() if wanted in _spellings(model)]
    if not candidates:
        return None
    best = min(candidates, key=lambda model: abs(model.memory - memory))
    return best if abs(best.memory - memory) <= best.memory // 10 else None


def resolve_inventory(hardware) -> Inventory:
    """Turn a spec's `hardware` into numbered GPUs (catalogue entries looked up, counts expanded)."""
    gpus: list[Gpu] = []
    for entry in hardware.gpus:
        for _ in range(entry.count):
            if hasattr(entry, "type"):
                model = lookup_gpu(entry.type)
                gpu = Gpu(len(gpus), model.name, model.memory, model.compute_capability, model.bandwidth, model.key)
            else:
                gpu = Gpu(len(gpus), entry.name, entry.memory, entry.compute_capability, entry.bandwidth, None)
            gpus.append(gpu)
    return Inventory(gpus=tuple(gpus), cpu_memory=hardware.cpu_memory, disk=hardware.disk)

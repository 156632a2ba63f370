"""Does this machine match the plan? Packages, GPUs, RAM and model files, every mismatch at once.

Each check returns lines "what: plan X, machine Y"; `check_machine` gathers them so a user fixes
everything in one round instead of one error per run. Nothing here initialises CUDA: GPUs come
from `planc.detect` (nvidia-smi first), after the plan's environment has been applied.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from planc.detect import DetectedGpu, DetectedMachine, match_catalogue
from planc.errors import DriftError, ModelError, SpecError
from planc.plan import Device, Packages, Plan, WeightFile
from planc.units import fmt_gib

CHECKED_PACKAGES = ("torch", "transformers", "accelerate")


@dataclass(frozen=True)
class MachineCheck:
    """A machine that passed every check: what the run goes on with."""

    folder: Path | None  # the model folder; None for a plan compiled from a config only
    installed: Packages
    gpu_names: list[str]


@dataclass(frozen=True)
class ModelCheck:
    """What the model-file check found: the folder to load from, and the mismatches."""

    folder: Path | None
    config: dict | None  # None when config.json cannot be read
    config_matches: bool
    mismatches: list[str]


def check_machine(
    plan: Plan,
    lock_dir: Path,
    progress: Callable[[str, int, int], None] | None = None,
    node: int = 0,
    rank=None,
) -> MachineCheck:
    """Every check against the plan; raises DriftError listing all mismatches at once.

    Call it with the plan's environment applied: GPU detection may initialise the CUDA driver.
    `progress(name, done, total)` is told about weight hashing. A distributed plan is checked for
    one node (`node`), or for one rank's part of it (`rank`, a planc.run.distributed.RankContext):
    its GPU, its node's RAM, the files.
    """
    from planc.compile import installed_packages
    from planc.detect import detect_machine

    if rank is not None:
        node = rank.node
    installed = installed_packages()
    machine = detect_machine()
    packages = package_mismatches(plan, installed)
    mismatches = packages + gpu_mismatches(plan, machine, node, rank) + cpu_mismatches(plan, machine, node)
    mismatches += mixer_mismatches(plan)
    files = model_file_check(plan, lock_dir, progress)
    mismatches += files.mismatches
    # The lock's placement against the model's structure: only meaningful for the config and the
    # transformers the plan was made with.
    if files.config_matches and not packages:
        mismatches += _structure_mismatches(plan, files.config)
    if mismatches:
        where = f"rank {rank.rank}: " if rank is not None else (f"node {node}: " if node else "")
        raise DriftError([where + line for line in mismatches] if where else mismatches)
    return MachineCheck(files.folder, installed, [gpu.name for gpu in machine.gpus])


def _structure_mismatches(plan: Plan, config: dict) -> list[str]:
    from planc.run.load import build_meta_model, structure_mismatches

    if plan.distributed:
        from planc.run.distributed import structure_mismatches as rank_structure

        return rank_structure(plan, config)

    try:
        return structure_mismatches(plan, build_meta_model(plan, config))
    except ModelError as exc:
        return [f"model {plan.model.architecture}: plan builds it, machine's transformers cannot ({exc})"]


def package_mismatches(plan: Plan, installed: Packages) -> list[str]:
    """Installed torch/transformers/accelerate against the lock, under its `versions` policy."""
    policy = plan.inputs.versions
    mismatches = []
    for name in CHECKED_PACKAGES:
        locked, now = getattr(plan.inputs.packages, name), getattr(installed, name)
        if policy == "exact":
            same, rule = locked == now, "exact"
        else:
            same, rule = _major_minor(locked) == _major_minor(now), "compatible: same major.minor"
        if not same:
            mismatches.append(f"{name} version (policy {rule}): plan {locked}, machine {now}")
    return mismatches


def mixer_mismatches(plan: Plan) -> list[str]:
    """The kernel packages a kernels-path plan sized its linear-attention / SSM layers for.

    transformers binds each mixer function when its modeling module is imported, to the package's
    kernel if `importlib.import_module(package)` succeeds and to the torch fallback otherwise; the
    fallback's prefill needs far more memory than such a plan holds, so a package that does not
    import is refused here, the same test transformers makes. A fallback plan runs anywhere (with
    the kernels present it only needs less).
    """
    import importlib

    mixers = plan.mixers
    if mixers is None or mixers.path != "kernels":
        return []
    families = ", ".join(mixers.families)
    mismatches = []
    for module, distribution in mixers.requires.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure makes transformers fall back
            reason = type(exc).__name__ + (f": {str(exc).splitlines()[0]}" if str(exc) else "")
            mismatches.append(
                f"mixer kernels: plan runs its {families} layers on {distribution} (import {module}), machine "
                f"cannot import it ({reason}); install {distribution} or recompile with policy.mixer_kernels: fallback"
            )
    return mismatches


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def gpu_mismatches(plan: Plan, machine: DetectedMachine, node: int = 0, rank=None) -> list[str]:
    """Count, name, compute capability and memory of each GPU the plan uses (on `node`; only the rank's own
    GPU for a rank).

    Extra GPUs on the machine are fine: the plan addresses devices by index from 0.
    """
    needed, present = [device for device in plan.devices if device.node == node], machine.gpus
    if rank is not None:
        own = plan.parallel.ranks[rank.rank].device
        needed = [device for device in needed if device.index == own]
    if not needed:
        return []
    if not present:
        needs = f"{_count(len(needed), 'GPU')} ({_names(d.name for d in needed)})"
        return [f"the plan needs {needs}; this machine has none"]
    mismatches = []
    if len(present) < len(needed):
        mismatches.append(
            f"GPUs: plan {len(needed)} ({_names(d.name for d in needed)}), "
            f"machine {len(present)} ({_names(g.name for g in present)})"
        )
    ledgers: dict = {}
    for ledger in plan.memory:
        if isinstance(ledger.device, int) and ledger.node == node:
            ledgers[ledger.device] = ledger
    by_index = {gpu.index: gpu for gpu in present}
    for device in needed:
        gpu = by_index.get(device.index)
        if gpu is None:
            if rank is not None:  # the count line above only speaks for a whole node
                mismatches.append(f"GPU {device.index}: plan {device.name}, machine has no GPU {device.index}")
            continue
        where = f"GPU {device.index}"
        if not _same_card(device, gpu):
            mismatches.append(f"{where} model: plan {device.name}, machine {gpu.name}")
        if device.compute_capability != gpu.compute_capability:
            mismatches.append(
                f"{where} compute capability: plan {device.compute_capability}, machine {gpu.compute_capability}"
            )
        # The plan counts on its ledger plus the policy's headroom, not on the card's full size:
        # a card that reports a little less (ECC, another driver) still runs the plan if that fits.
        ledger = ledgers.get(device.index)
        if ledger is not None and gpu.memory < ledger.total + ledger.headroom:
            mismatches.append(
                f"{where} memory: plan needs {fmt_gib(ledger.total + ledger.headroom, 2)} "
                f"(ledger {fmt_gib(ledger.total, 2)} + headroom {fmt_gib(ledger.headroom, 2)}), "
                f"machine has {fmt_gib(gpu.memory, 2)}"
            )
    return mismatches


def _same_card(device: Device, gpu: DetectedGpu) -> bool:
    if device.name == gpu.name:
        return True
    model = match_catalogue(gpu)
    return model is not None and model.key == device.catalogue


def _names(names) -> str:
    return ", ".join(f"{name} x{count}" for name, count in Counter(names).items())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def cpu_mismatches(plan: Plan, machine: DetectedMachine, node: int = 0) -> list[str]:
    """RAM against the CPU ledger's total.

    The spec's cpu_memory is a ceiling the user allowed the plan (often the whole machine, as
    `planc detect` writes it); what the plan actually counts on is its CPU ledger: the process
    reserve, the weights kept in RAM, and the KV cache and activations of layers executing on the
    CPU. Demanding the ceiling would refuse a machine with a few MiB less than the one the plan was
    written on, though the plan uses a fraction of it.
    """
    needed = sum(ledger.total for ledger in plan.memory if ledger.device == "cpu" and ledger.node == node)
    if needed and machine.cpu_memory < needed:
        return [
            f"CPU memory: plan needs {fmt_gib(needed, 2)} (CPU ledger total), "
            f"machine has {fmt_gib(machine.cpu_memory, 2)}"
        ]
    return []


def model_file_check(
    plan: Plan, lock_dir: Path, progress: Callable[[str, int, int], None] | None = None
) -> ModelCheck:
    """config.json's sha256 and every weight file's sha256 and size against the lock."""
    from planc.checksums import hash_files
    from planc.model import read_model_files

    source = _describe_source(plan)
    try:
        files = read_model_files(plan.model, lock_dir)
    except (ModelError, SpecError) as exc:
        return ModelCheck(None, None, False, [f"model {source}: plan has it, machine cannot read it ({exc})"])
    mismatches = []
    if files.config_sha256 != plan.inputs.config_sha256:
        mismatches.append(
            f"model config.json sha256: plan {plan.inputs.config_sha256}, machine {files.config_sha256}"
        )
    found: dict[str, WeightFile] = {}
    if files.weight_files:
        found = hash_files(files.folder, files.weight_files, progress)
    for name in sorted(set(plan.inputs.weights) | set(found)):
        locked, now = plan.inputs.weights.get(name), found.get(name)
        if locked == now:
            continue
        if now is None:
            mismatches.append(f"weight file {name}: plan {locked.sha256}, machine missing")
        elif locked is None:
            mismatches.append(f"weight file {name}: plan does not list it, machine has {now.sha256}")
        else:
            mismatches.append(f"weight file {name} sha256: plan {locked.sha256}, machine {now.sha256}")
    return ModelCheck(files.folder, files.config, files.config_sha256 == plan.inputs.config_sha256, mismatches)


def _describe_source(plan: Plan) -> str:
    model = plan.model
    return model.id or model.path or model.config or "?"

"""The lock file: model, canonical dump, load with verification, atomic write.

The lock is a product people commit and diff, so its bytes are a contract:
- keys come in the order of the fields below (a fixed, logical order, not the dict order of
  whatever produced them); `device_map` is in execution order because accelerate takes the
  device of the first entry as its main device;
- no timestamps, hostnames or absolute paths; sizes are integer bytes;
- `plan_hash` is the sha256 of the document as written: the parsed YAML without `plan_hash`, as
  canonical JSON. It is never a dump of the model, whose fields grow: a lock written before an
  optional field existed keeps verifying after a reader learns that field (conda-lock's
  content_hash regret). It is a checksum against hand edits, not a signature.

Compatibility: `format_version` is "MAJOR.MINOR". A reader accepts every lock of its own MAJOR
up to its own MINOR; a MINOR bump only adds optional fields (absent from the bytes when unset, see
`optional`). A newer MINOR or another MAJOR is refused with what to install.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from planc.errors import LockError, TamperedLockError
from planc.files import YAML_LIMIT, parse_yaml, read_text
from planc.limits import MAX_BATCH_SIZE, MAX_IMAGE_SIZE, MAX_IMAGES_PER_SEQUENCE, MAX_SEQ_LEN
from planc.rules import ATTN_IMPLEMENTATIONS, BACKENDS, DTYPES, EXPERTS_IMPLEMENTATIONS, QUANTIZATION_METHODS
from planc.spec import PathText

FORMAT_VERSION = "1.1"
# What a plan that uses no field added since is written as, so its bytes do not move (a 1.1 field
# raises format_version when the plan is sealed, see `required_version`).
BASE_FORMAT_VERSION = "1.0"
# Fields that reach torch, transformers or accelerate as flags take only the values planc's rules
# produce: a lock is a file anyone can edit and re-hash, not a channel for arbitrary arguments.
GpuIndex = Annotated[int, Field(ge=0)]
DeviceKey = Union[GpuIndex, Literal["cpu", "disk"]]
GpuKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,4}$")]
MemoryKey = Annotated[str, StringConstraints(pattern=r"^([0-9]{1,4}|cpu)$")]
Backend = Literal[BACKENDS]


class _Lock(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def optional(description: str, default=None, since: str = FORMAT_VERSION, **constraints):
    """A field added in MINOR version `since`: omitted from the lock's bytes while it holds its default.

    So a plan that uses no newer feature is written as before, byte for byte and with the
    format_version it had, and older locks (which lack the key) read back with the default. A
    plan that sets the field is written with format_version `since` (at least), so a reader that
    predates the field refuses it instead of dropping what it does not know.
    """
    return Field(default, description=description, exclude_if=lambda value: value == default,
                 json_schema_extra={"since": since}, **constraints)


def required_version(model: BaseModel) -> str:
    """The lowest format version that holds every field `model` sets (1.0 when it sets no newer one)."""
    found = tuple(int(part) for part in BASE_FORMAT_VERSION.split("."))
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        since = (info.json_schema_extra or {}).get("since") if isinstance(info.json_schema_extra, dict) else None
        if since is not None and value != info.default:
            found = max(found, tuple(int(part) for part in since.split(".")))
        for child in value if isinstance(value, list) else value.values() if isinstance(value, dict) else [value]:
            if isinstance(child, BaseModel):
                found = max(found, tuple(int(part) for part in required_version(child).split(".")))
    return f"{found[0]}.{found[1]}"


def document_sha256(document: dict) -> str:
    """sha256 of a lock document (parsed YAML or a dump) without its plan_hash, as canonical JSON."""
    body = {key: value for key, value in document.items() if key != "plan_hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class WeightFile(_Lock):
    sha256: str = Field(description="sha256 of the file's bytes.")
    size: int = Field(description="File size in bytes.")


class Packages(_Lock):
    planc: str = Field(description="planc version that wrote the lock.")
    torch: str = Field(description="torch version the plan was made with (local build suffix dropped).")
    transformers: str = Field(description="transformers version the plan was made with.")
    accelerate: str = Field(description="accelerate version the plan was made with.")


class Inputs(_Lock):
    spec_sha256: str = Field(description="sha256 of the canonical spec (sizes in bytes, defaults filled).")
    config_sha256: str = Field(description="sha256 of the model's config.json bytes.")
    weights: dict[str, WeightFile] = Field(
        default_factory=dict, description="Weight files by name relative to the model folder; empty if absent."
    )
    packages: Packages
    versions: Literal["exact", "compatible"] = Field(description="How `planc run` compares package versions.")


class ModelInfo(_Lock):
    id: PathText | None = Field(None, description="Hugging Face repo id (resolved offline from the HF cache).")
    path: PathText | None = Field(None, description="Model folder, relative to the lock file.")
    config: PathText | None = Field(None, description="config.json, relative to the lock file (compile-only source).")
    revision: PathText | None = Field(None, description="Pinned revision for `id`.")
    trust_remote_code: bool = False
    architecture: str = Field(
        description="Model class transformers builds and `planc run` loads: config.architectures[0] when "
        "transformers ships it as a causal LM or image-text-to-text model, else the auto classes' pick."
    )
    model_type: str
    config_class: str | None = optional(
        "transformers config class config.json is read as, when its model_type is unknown to transformers and "
        "`architectures` names a class it ships (Kimi-K2's kimi_k2 as DeepseekV3Config); unset otherwise."
    )
    parameters: int = Field(description="Parameter count.")
    weight_bytes: int = Field(description="Bytes of all parameters and buffers at the plan's dtype.")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelInfo":
        given = [key for key in ("id", "path", "config") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError(f"exactly one of id, path, config names the model (got {', '.join(given) or 'none'})")
        return self


class Device(_Lock):
    index: int = Field(description="CUDA index under CUDA_DEVICE_ORDER=PCI_BUS_ID.")
    name: str = Field(description="Device name as the driver reports it.")
    memory: int = Field(description="Total memory the driver reports, bytes.")
    compute_capability: str
    bandwidth: int = Field(description="Memory bandwidth, bytes/s.")
    catalogue: str | None = Field(None, description="Catalogue key the entry came from, if any.")
    node: int = optional("Node the GPU is on (index in hardware.nodes); 0, and omitted, on one node.", 0)


class Host(_Lock):
    cpu_memory: int = Field(description="CPU RAM the plan may use, bytes.")
    disk: PathText | None = Field(None, description="Offload folder, relative to the lock file.")


class Workload(_Lock):
    batch_size: int = Field(ge=1, le=MAX_BATCH_SIZE)
    max_seq_len: int = Field(ge=1, le=MAX_SEQ_LEN)
    images_per_sequence: int = optional(
        "Images per prompt the vision tower was planned for (0: text only).", 0, ge=0, le=MAX_IMAGES_PER_SEQUENCE
    )
    image_size: int | None = optional(
        "Image side in pixels the vision peak was planned at; unset: the config's.", ge=1, le=MAX_IMAGE_SIZE
    )
    source_tokens: int = optional(
        "Encoder-decoder models: source tokens per sequence the encoder, its output and the cross-attention "
        "caches were planned for (max_seq_len then counts the decoder's tokens); 0 for decoder-only models.",
        0, ge=0, le=MAX_SEQ_LEN,
    )


class Attention(_Lock):
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] = Field(description="transformers attn_implementation.")
    sdpa_backends: list[Backend] = Field(
        description="SDPA backends enabled, in priority order, pinned with torch.nn.attention.sdpa_kernel."
    )
    per_device: dict[GpuKey, Backend] = Field(
        default_factory=dict, description="The backend the prefill is expected to use on each GPU."
    )


class Generation(_Lock):
    prefill_chunk_size: int | None = Field(
        None, ge=1, le=MAX_SEQ_LEN, description="Chunked prefill size in tokens; null = whole prompt."
    )
    experts_implementation: Literal[EXPERTS_IMPLEMENTATIONS] | None = Field(
        None, description="MoE experts implementation, when it is pinned."
    )
    do_sample: bool = False
    seed: int = Field(0, ge=0, lt=2**63, description="torch.manual_seed before generating.")
    cache_implementation: Literal["quantized"] | None = optional(
        "generate's cache_implementation when it is not the default DynamicCache (1.1): quantized."
    )
    cache_config: dict[Literal["backend"], Literal["fp8"]] | None = optional(
        "generate's cache_config for that cache (1.1), e.g. {backend: fp8}."
    )


class WeightQuantization(_Lock):
    """How the weights are quantized and held (1.1)."""

    method: Literal[QUANTIZATION_METHODS] = Field(
        description="fp8 | mxfp4 | compressed-tensors | compressed-tensors-fp8 | gptq | awq (from the checkpoint) "
        "or bnb-4bit | bnb-8bit (at load)."
    )
    origin: Literal["checkpoint", "load"] = Field(
        description="checkpoint: the release is quantized; load: transformers quantizes while loading."
    )
    weights: Literal["native", "dequantized"] = Field(
        description="native: the GPUs hold the quantized layout; dequantized: transformers converts it to the "
        "plan's dtype at load, and the plan is sized dense."
    )
    layout: str = Field(description="What the quantized weights are held as, in words.")
    config: dict[str, Any] = Field(description="The quantization_config `planc run` passes to from_pretrained.")
    dense_weight_bytes: int = Field(description="The same weights dense at the plan's dtype, bytes.")
    dense_modules: list[str] = Field(
        default_factory=list,
        description="Modules with weights left at the plan's dtype (layer numbers as *): lm_head, embeddings, "
        "routers, fused experts the method does not convert, modules_to_not_convert.",
    )
    requires_packages: list[str] = Field(
        default_factory=list, description="Requirements `planc run` checks before loading (the quantized kernels)."
    )
    requires_compute_capability: str | None = Field(
        None, description="Compute capability every GPU holding quantized weights needs."
    )


class Mixers(_Lock):
    """How the model's linear-attention, state-space and short-conv layers run (format 1.1)."""

    path: Literal["fallback", "kernels"] = Field(
        description="fallback: transformers' pure-torch implementations (any machine); kernels: the CUDA "
        "kernel packages, which `planc run` requires."
    )
    families: list[str] = Field(description="Mixer families of the model's layers (gated_deltanet, mamba2, ...).")
    requires: dict[str, str] = Field(
        default_factory=dict,
        description="For the kernels path: the packages transformers must import, import name -> distribution.",
    )


class Ledger(_Lock):
    device: DeviceKey
    capacity: int = Field(ge=0, description="Memory the device has (driver total; policy for CPU), bytes.")
    headroom: int = Field(ge=0, description="Left unplanned by policy, bytes.")
    reserve: int = Field(ge=0, description="CUDA context + cuBLAS workspace + allocator slack, bytes.")
    weights: int = Field(ge=0, description="Parameters and buffers resident here, bytes.")
    kv_cache: int = Field(ge=0, description="KV cache of the layers executing here at batch x max_seq_len, bytes.")
    activations: int = Field(ge=0, description="Peak transient tensors of a prefill/decode step here, bytes.")
    staging: int = Field(0, ge=0, description="Offloaded weights streamed in for execution here, bytes.")
    total: int = Field(ge=0, description="reserve + weights + kv_cache + activations + staging, bytes.")
    free: int = Field(description="capacity - headroom - total, bytes.")
    modules: list[str] = Field(description="First and last module placed here, in execution order.")
    communication: int = optional(
        "Collective buffers of a distributed rank (NCCL communicator, all-reduce and all-gather outputs), bytes.", 0
    )
    rank: int | None = optional("The distributed rank this ledger is for (tensor/pipeline plans).")
    node: int = optional("Node of the rank's device; 0, and omitted, on one node.", 0)


class Objective(_Lock):
    name: Literal["latency", "balance"]
    decode_ms_per_token: float = Field(description="Predicted decode time per token (memory-bound estimate), ms.")
    peak_utilisation: float = Field(description="Highest (total + headroom) / capacity over GPUs.")


class Rank(_Lock):
    rank: int = Field(description="Global rank (torch.distributed RANK).")
    node: int = Field(description="Node it runs on (index in hardware.nodes).")
    device: DeviceKey = Field(description="CUDA index on its node (LOCAL_RANK), or cpu.")
    stage: int = Field(description="Pipeline stage.")
    layers: list[int] = Field(description="[first, last + 1) of the decoder layers its stage runs.")


class StrategyOption(_Lock):
    strategy: str = Field(description="device_map, tensor, pipeline or tensor x pipeline.")
    engine: Literal["accelerate", "transformers", "vllm"]
    tensor_parallel_size: int
    pipeline_parallel_size: int
    fits: bool
    decode_ms_per_token: float | None = Field(None, description="Predicted decode time per token, ms (when planned).")
    detail: str = Field(description="The prediction by part, or why the strategy was not planned.")


class NodeHost(_Lock):
    index: int
    gpus: int = Field(description="GPUs on the node (ranks on it: one per GPU, or cpu_ranks).")
    cpu_memory: int = Field(description="CPU RAM the node's ranks may use, bytes.")
    ranks: int = Field(description="Ranks the plan runs on this node.")


class Parallel(_Lock):
    """How the plan spreads over processes: the chosen strategy, its ranks, and what else was weighed."""

    strategy: Literal["device_map", "tensor", "pipeline", "tensor x pipeline"]
    engine: Literal["accelerate", "transformers", "vllm"]
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    backend: str | None = Field(None, description="torch.distributed backend of the ranks: nccl (GPUs) or gloo (CPU).")
    ranks: list[Rank] = Field(default_factory=list)
    nodes: list[NodeHost] = Field(default_factory=list)
    considered: list[StrategyOption] = Field(description="Every strategy weighed, the chosen one included.")


class Decision(_Lock):
    id: str = Field(description="Rule or planner step that made the decision.")
    decision: str
    reason: str
    source: str = Field(description="Where the knowledge comes from.")


class Plan(_Lock):
    """A compiled deployment plan (the contents of plan.lock)."""

    format_version: str = Field(BASE_FORMAT_VERSION, description="MAJOR.MINOR: the lowest version that reads this lock.")
    inputs: Inputs
    model: ModelInfo
    devices: list[Device]
    host: Host
    workload: Workload
    dtype: Literal[DTYPES]
    quantization: WeightQuantization | None = optional("Quantized weights (1.1); absent for dense weights.")
    device_map: dict[str, DeviceKey] = Field(description="accelerate device_map, in execution order.")
    max_memory: dict[MemoryKey, Annotated[int, Field(ge=0)]] = Field(
        description="Per-device weight budget (bytes) after KV, activations and reserve: what accelerate's "
        "max_memory must be for its own planner to respect this workload."
    )
    no_split_module_classes: list[str]
    skip_keys: list[str] = Field(description="model._skip_keys_device_placement, passed to dispatch.")
    tied_parameters: list[list[str]] = Field(default_factory=list, description="Groups kept on one device.")
    attention: Attention
    env: dict[str, str] = Field(description="Environment set before CUDA initialises.")
    generation: Generation
    mixers: Mixers | None = optional(
        "How linear-attention / state-space / short-conv layers run; absent for models without them (1.1)."
    )
    memory: list[Ledger]
    objective: Objective
    decisions: list[Decision]
    parallel: Parallel | None = optional(
        "Strategy of a plan that weighed more than one way to spread the model (tensor, pipeline, several nodes)."
    )
    plan_hash: str = ""

    @model_validator(mode="after")
    def _devices_agree(self) -> "Plan":
        """Every device a field names is one of `devices` (numbered 0..n-1 per node), the CPU or the disk."""
        nodes = [device.node for device in self.devices]
        if nodes != sorted(nodes):
            raise ValueError(f"devices: nodes must come in order, got {nodes}")
        for node in sorted(set(nodes)):
            indices = [device.index for device in self.devices if device.node == node]
            if indices != list(range(len(indices))):
                where = f" of node {node}" if node else ""
                raise ValueError(f"devices{where}: indices must be 0..{len(indices) - 1} in order, got {indices}")
        known = {device.index for device in self.devices} | {"cpu", "disk"}
        named = {
            "device_map": set(self.device_map.values()),
            "memory": {ledger.device for ledger in self.memory},
            "max_memory": {int(key) if key.isdigit() else key for key in self.max_memory},
            "attention.per_device": {int(key) for key in self.attention.per_device},
        }
        for field_name, devices in named.items():
            unknown = sorted(map(str, devices - known))
            if unknown:
                raise ValueError(f"{field_name} names device {', '.join(unknown)}, which devices does not list")
        return self

    def sealed(self) -> "Plan":
        """A copy with format_version raised to what its fields need and plan_hash filled in (the hash
        of the document `dump_lock` writes)."""
        needed = max(required_version(self), self.format_version, key=lambda v: tuple(int(p) for p in v.split(".")))
        versioned = self.model_copy(update={"format_version": needed})
        return versioned.model_copy(update={"plan_hash": document_sha256(versioned.model_dump(mode="json"))})

    def gpu_indices(self) -> list[int]:
        return [device.index for device in self.devices]

    @property
    def distributed(self) -> bool:
        """Runs as several processes (torch.distributed ranks) rather than one accelerate device_map."""
        return self.parallel is not None and self.parallel.strategy != "device_map"


class _LockDumper(yaml.SafeDumper):
    """Block style, no aliases, and strings that YAML would re-read as another type quoted."""

    def ignore_aliases(self, data):  # noqa: D102 - aliases would make diffs unreadable
        return True


def dump_lock(plan: Plan, regenerate: str) -> str:
    """The lock's bytes: generated-file header, then the plan fields in their fixed order."""
    body = plan.model_dump(mode="json")
    text = yaml.dump(body, Dumper=_LockDumper, sort_keys=False, default_flow_style=False, width=1000, allow_unicode=True)
    header = (
        "# plan.lock generated by planc. Do not edit: plan_hash would no longer match.\n"
        f"# Regenerate with: {regenerate}\n"
    )
    return header + text


def parse_lock(text: str, source: str = "lock") -> Plan:
    """Parse lock text and verify format version and plan_hash."""
    data = parse_yaml(text, source, LockError, aliases=False)
    if not isinstance(data, dict) or "format_version" not in data:
        raise LockError(f"{source}: not a planc lock (no format_version)")
    _check_format_version(data["format_version"], source)
    # Validate before hashing: once the document has the lock's shape, hashing it is cheap and
    # cannot fail on types JSON lacks.
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise LockError(f"{source}: {where or 'lock'}: {err['msg'].removeprefix('Value error, ')}") from None
    try:
        expected = document_sha256(data)
    except (TypeError, ValueError):
        # Keys that are not strings, dates, NaN: nothing planc writes.
        raise LockError(f"{source}: not a planc lock (values YAML reads as non-JSON types)") from None
    if plan.plan_hash != expected:
        raise TamperedLockError(
            f"{source}: plan_hash does not match the contents (edited by hand?): "
            f"lock says {plan.plan_hash or 'nothing'}, contents hash to {expected}; recompile with planc compile"
        )
    return plan


def _check_format_version(value: object, source: str) -> None:
    """Accept MAJOR.MINOR of this reader's MAJOR and a MINOR no newer than its own."""
    major, minor = (int(part) for part in FORMAT_VERSION.split("."))
    text = str(value)
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{1,6}\.[0-9]{1,6}", text):
        raise LockError(f"{source}: format_version {text[:40]!r} is not a quoted \"MAJOR.MINOR\"")
    their_major, their_minor = (int(part) for part in text.split("."))
    if their_major != major:
        raise LockError(
            f"{source}: lock format {text} is not readable by this planc (reads {major}.0 to {FORMAT_VERSION}); "
            "install the planc that wrote it or recompile"
        )
    if their_minor > minor:
        raise LockError(
            f"{source}: lock format {text} was written by a newer planc (this one reads up to {FORMAT_VERSION}); "
            "upgrade planc to run it"
        )


def load_lock(path: str | Path) -> Plan:
    """Read and verify a lock file."""
    path = Path(path)
    return parse_lock(read_text(path, "lock", LockError, YAML_LIMIT), source=str(path))


def write_lock(path: str | Path, text: str) -> bool:
    """write_if_changed for a lock: a path that cannot take it (a file as folder, no permission) is a
    LockError naming it, and the lock that was there stays as it was."""
    try:
        return write_if_changed(path, text)
    except OSError as exc:
        raise LockError(f"cannot write lock {path}: {exc.strerror or exc}") from None


def write_if_changed(path: str | Path, text: str) -> bool:
    """Atomically replace `path` with `text` (temp file + os.replace); skip if the bytes are equal.

    Returns True when the file was written.
    """
    path = Path(path)
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True

"""The user's input: `spec.yaml` as strict pydantic models.

Every field carries a description with its unit; the same text is the JSON Schema in
`schemas/spec.schema.json`. Sizes are accepted as "24GiB" / "80GB" / bytes and stored as
integer bytes so that two spellings of one size hash the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    model_validator,
)

from planc.errors import SpecError
from planc.files import YAML_LIMIT, parse_yaml, read_text
from planc.limits import MAX_BATCH_SIZE, MAX_GPUS, MAX_IMAGE_SIZE, MAX_IMAGES_PER_SEQUENCE, MAX_NODES, MAX_SEQ_LEN
from planc.units import parse_bandwidth, parse_duration, parse_size

SPEC_FORMAT = 1

Bytes = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
# A path, repo id or revision: text a filesystem can hold (no NUL byte, at most PATH_MAX).
PathText = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$", max_length=4096)]
BytesPerSecond = Annotated[int, BeforeValidator(parse_bandwidth), Field(gt=0)]
Nanoseconds = Annotated[int, BeforeValidator(parse_duration), Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def added(default, description: str, **kwargs):
    """A field added after spec format 1 shipped: left out of the canonical JSON while it holds its
    default, so the spec_sha256 of every spec that does not use it (and every lock made from one)
    stays what it was."""
    return Field(default, description=description, exclude_if=lambda value: value == default, **kwargs)


class Quantize(_Strict):
    """Quantize a dense checkpoint while loading it (bitsandbytes through transformers' BitsAndBytesConfig)."""

    method: Literal["bnb-4bit", "bnb-8bit"] = Field(
        description="bnb-4bit: 4-bit weights (packed, absmax per 64 weights); bnb-8bit: LLM.int8() int8 weights "
        "with a scale per output row (sm75+)."
    )
    quant_type: Literal["fp4", "nf4"] = Field(
        "fp4", description="bnb-4bit's value table (bnb_4bit_quant_type); nf4 is what QLoRA uses. fp4 is "
        "transformers' default."
    )
    double_quant: bool = Field(
        False, description="bnb-4bit: quantize the absmax scales too (bnb_4bit_use_double_quant), about 0.37 bits "
        "per weight less."
    )
    skip_modules: list[str] = Field(
        default_factory=list, description="Module names or patterns left unquantized (llm_int8_skip_modules); when "
        "given they replace transformers' default skips (lm_head and tied modules)."
    )

    @model_validator(mode="after")
    def _four_bit_options(self) -> "Quantize":
        if self.method == "bnb-8bit" and (self.quant_type != "fp4" or self.double_quant):
            raise ValueError("quant_type and double_quant are bnb-4bit options")
        return self


def _quantize_shorthand(value: Any) -> Any:
    """`quantize: bnb-4bit` is `quantize: {method: bnb-4bit}` (one canonical form, one hash)."""
    return {"method": value} if isinstance(value, str) else value


class ModelSource(_Strict):
    """Where the model comes from: exactly one of `id`, `path`, `config`."""

    id: PathText | None = Field(None, description="Hugging Face repo id, resolved offline from the local HF cache.")
    path: PathText | None = Field(
        None, description="Folder holding config.json (weights optional to compile), relative to the spec file."
    )
    config: PathText | None = Field(None, description="A bare config.json, relative to the spec file; enough to compile.")
    revision: PathText | None = Field(None, description="Revision (branch, tag or commit) pinned for `id`.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight and compute dtype; `auto` lets the rules pick from the GPUs and the checkpoint."
    )
    trust_remote_code: bool = Field(False, description="Allow model code shipped with the checkpoint.")
    quantize: Annotated[
        Quantize | None,
        BeforeValidator(_quantize_shorthand, json_schema_input_type=Union[Literal["bnb-4bit", "bnb-8bit"], Quantize, None]),
    ] = added(
        None,
        "Quantize the weights while loading: bnb-4bit | bnb-8bit, or a mapping with options. Not for a checkpoint "
        "that is already quantized (fp8, mxfp4, GPTQ, AWQ, compressed-tensors are read from its config).",
    )
    kv_cache: Literal["fp8"] | None = added(
        None,
        "Store the KV cache quantized: fp8 (transformers' QuantizedCache backend fp8, 1 byte per element and a "
        "per-tensor scale per layer). Full-attention models only; unset keeps the model dtype.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "ModelSource":
        given = [key for key in ("id", "path", "config") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError(f"model: give exactly one of id, path, config (got {', '.join(given) or 'none'})")
        return self


class CatalogueGpu(_Strict):
    """GPUs named by catalogue entry."""

    type: str = Field(description="Catalogue entry: the exact nvidia-smi name or a short alias such as v100-16gb.")
    count: int = Field(1, ge=1, le=MAX_GPUS, description=f"How many of these cards (at most {MAX_GPUS}: one node).")


class ExplicitGpu(_Strict):
    """A card described by its numbers, for cards missing from the catalogue."""

    name: str = Field(description="Device name as the driver reports it (checked at run time).")
    memory: Bytes = Field(gt=0, description="Total memory the driver reports, in bytes (or e.g. 24GiB).")
    compute_capability: str = Field(
        pattern=r"^[0-9]{1,2}\.[0-9]{1,2}$", description="CUDA compute capability, e.g. '8.6'."
    )
    bandwidth: BytesPerSecond = Field(description="Memory bandwidth in bytes/s (or e.g. 936GB/s).")
    count: int = Field(1, ge=1, le=MAX_GPUS, description=f"How many of these cards (at most {MAX_GPUS}: one node).")


def _gpu_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "catalogue" if "type" in value else "explicit"
    return "catalogue" if isinstance(value, CatalogueGpu) else "explicit"


# Tagged by the presence of `type`, so an explicit card's error names its own fields.
GpuEntry = Annotated[
    Union[Annotated[CatalogueGpu, Tag("catalogue")], Annotated[ExplicitGpu, Tag("explicit")]],
    Discriminator(_gpu_kind),
]


LinkKind = Literal["nvswitch", "nvlink", "pcie"]
LINK_CODE = r"^(X|NV[0-9]+|PIX|PXB|PHB|NODE|SYS|SOC)$"


class Topology(_Strict):
    """Per-pair links between one node's GPUs, as `nvidia-smi topo -m` prints them (`planc detect` writes this)."""

    links: list[list[Annotated[str, Field(pattern=LINK_CODE)]]] = Field(
        description="Square matrix in CUDA order: X on the diagonal; NV<n> = n bonded NVLinks; PIX, PXB, PHB, "
        "NODE, SYS = PCIe paths (same switch, several switches, host bridge, within a NUMA node, across sockets)."
    )

    @model_validator(mode="after")
    def _square(self) -> "Topology":
        size = len(self.links)
        for i, row in enumerate(self.links):
            if len(row) != size:
                raise ValueError(f"links: row {i} has {len(row)} entries for {size} GPUs")
            if row[i] != "X":
                raise ValueError(f"links: entry [{i}][{i}] must be X (a GPU to itself)")
            for j, code in enumerate(row):
                if j != i and code == "X":
                    raise ValueError(f"links: X off the diagonal at [{i}][{j}]")
                if code != self.links[j][i]:
                    raise ValueError(f"links: [{i}][{j}] is {code} but [{j}][{i}] is {self.links[j][i]}")
        return self


def _interconnect_kind(value: Any) -> str:
    return "topology" if isinstance(value, (dict, Topology)) else "kind"


# Tagged by shape, so a malformed matrix reports its own error rather than "not one of nvswitch, ...".
Interconnect = Annotated[
    Union[Annotated[LinkKind, Tag("kind")], Annotated[Topology, Tag("topology")]],
    Discriminator(_interconnect_kind),
]
INTERCONNECT_DESCRIPTION = (
    "How this node's GPUs reach each other: nvswitch (every pair at the card's full NVLink bandwidth), nvlink "
    "(directly bridged or meshed, links shared among the peers), pcie, or the per-pair {links: ...} topology "
    "that `planc detect` reads from nvidia-smi. Unset: PCIe is assumed, and tensor parallelism is not planned."
)


class Node(_Strict):
    """One machine of a multi-node inventory."""

    gpus: list[GpuEntry] = Field(default_factory=list, description="This node's GPUs in PCI bus order.")
    cpu_memory: Bytes = Field(description="CPU RAM the run may use on this node, in bytes (or e.g. 2TiB).")
    disk: PathText | None = Field(None, description="Offload folder on this node, relative to the spec file.")
    interconnect: Interconnect | None = added(None, INTERCONNECT_DESCRIPTION)
    cpu_ranks: int | None = added(
        None, "CPU-only node: how many ranks (processes) a tensor- or pipeline-parallel plan runs here, e.g. one "
        "per socket; they share cpu_memory evenly.", ge=1
    )


class Network(_Strict):
    """The links between nodes (InfiniBand, RoCE, Ethernet)."""

    bandwidth: BytesPerSecond = Field(
        description="Bandwidth per node and direction in bytes/s (e.g. 400GB/s for 8 x 400 Gb/s NICs, 50GB/s for one)."
    )
    latency: Nanoseconds = Field(description="One small message between two nodes, in ns (or e.g. 5us).")


class Hardware(_Strict):
    """The machine the plan is for. GPU order is CUDA order (CUDA_DEVICE_ORDER=PCI_BUS_ID).

    One node is written with gpus / cpu_memory / disk / interconnect here; several nodes as `nodes`.
    """

    gpus: list[GpuEntry] = Field(
        default_factory=list,
        description=f"GPUs in PCI bus order; empty for a CPU-only plan. At most {MAX_GPUS} per node (an NVL72 "
        "rack, the largest single NVLink domain, has 72).",
    )
    cpu_memory: Bytes | None = added(None, "CPU RAM the run may use, in bytes (or e.g. 64GiB); per node under `nodes`.")
    disk: PathText | None = Field(None, description="Offload folder for `offload: disk`, relative to the spec file.")
    interconnect: Interconnect | None = added(None, INTERCONNECT_DESCRIPTION)
    cpu_ranks: int | None = added(
        None, "CPU-only plan: how many ranks (processes) a tensor- or pipeline-parallel plan runs, e.g. one per "
        "socket; they share cpu_memory evenly.", ge=1
    )
    nodes: list[Node] | None = added(
        None, "Several machines, each with its GPUs, CPU memory and disk (instead of gpus / cpu_memory here); "
        f"at most {MAX_NODES}.",
        min_length=1,
        max_length=MAX_NODES,
    )
    network: Network | None = added(None, "Links between the nodes; required with two or more nodes.")

    @model_validator(mode="after")
    def _one_form(self) -> "Hardware":
        if self.nodes is not None:
            flat = [key for key in ("gpus", "cpu_memory", "disk", "interconnect", "cpu_ranks") if getattr(self, key)]
            if flat:
                raise ValueError(f"give the nodes' {', '.join(flat)} inside `nodes`, not beside it")
            if len(self.nodes) > 1 and self.network is None:
                raise ValueError("network: required with several nodes (bandwidth per node, latency between nodes)")
        elif self.cpu_memory is None:
            raise ValueError("cpu_memory: field required")
        for number, node in enumerate(self.node_list()):
            total = sum(entry.count for entry in node.gpus)
            if total > MAX_GPUS:
                where = f"node {number}: " if self.nodes is not None else ""
                raise ValueError(f"{where}{total} GPUs: one node holds at most {MAX_GPUS} (e.g. an NVL72 rack)")
        return self

    def node_list(self) -> list[Node]:
        """The nodes of either form: `nodes`, or this block as the one node."""
        if self.nodes is not None:
            return list(self.nodes)
        return [Node(gpus=self.gpus, cpu_memory=self.cpu_memory, disk=self.disk, interconnect=self.interconnect,
                     cpu_ranks=self.cpu_ranks)]


class Workload(_Strict):
    """What the plan must run without running out of memory."""

    batch_size: int = Field(
        1, ge=1, le=MAX_BATCH_SIZE,
        description=f"Sequences generated together (at most {MAX_BATCH_SIZE}: serving engines batch a few "
        "hundred to a couple of thousand).",
    )
    max_seq_len: int = Field(
        ge=1, le=MAX_SEQ_LEN,
        description=f"Tokens per sequence, prompt plus generated (at most {MAX_SEQ_LEN}: Llama 4 Scout's 10M-token "
        "context, the longest a released model is configured for).",
    )
    prefill_chunk_size: int | None = Field(
        None, ge=1, le=MAX_SEQ_LEN,
        description=f"Prefill in chunks of this many tokens (at most {MAX_SEQ_LEN}); unset lets the compiler choose. "
        "Prompts with images prefill whole: transformers cannot split raw images into chunks.",
    )
    images_per_sequence: int = added(
        0,
        f"Images in each prompt (at most {MAX_IMAGES_PER_SEQUENCE}), for image-text-to-text models: the vision "
        "tower's activations are planned for batch_size x this many images per prefill. The tokens the images "
        "become count within max_seq_len.",
        ge=0, le=MAX_IMAGES_PER_SEQUENCE,
    )
    image_size: int | None = added(
        None,
        f"Side of each image in pixels (at most {MAX_IMAGE_SIZE}), as the vision tower sees it after the processor's "
        "resize; unset: the vision config's image_size (required for towers that take any resolution).",
        ge=1, le=MAX_IMAGE_SIZE,
    )
    source_tokens: int | None = added(
        None,
        f"Encoder-decoder models (T5, BART, Florence2, T5Gemma2, Udop, Pix2Struct, VisionEncoderDecoder): tokens the "
        f"encoder reads per sequence (at most {MAX_SEQ_LEN}), whose output and cross-attention K/V the decoder keeps "
        "for every step. A text encoder's: the prompt's tokens (unset: max_seq_len), image tokens included where the "
        "image's features take image-token positions of the source (Florence2: 577 per 768 x 768 image; T5Gemma2: "
        "its mm_tokens_per_image, 256) or its patches follow the prompt (Udop: all of one image's); Pix2Struct's: the processor's max_patches "
        "(unset: the vision config's seq_len); an encoder of fixed-size images takes one token per patch (PP-FormulaNet: "
        "the tokens its neck resamples the patches to), which the image decides (leave it unset). max_seq_len then counts the decoder's tokens: its start token plus "
        "the generated ones.",
        ge=1, le=MAX_SEQ_LEN,
    )

    @model_validator(mode="after")
    def _whole_prefill_with_images(self) -> "Workload":
        # generate() raises on a chunked first step that carries pixel values ("Chunked prefill
        # cannot split the raw multimodal inputs", GenerationMixin._prefill in transformers 5.23).
        if self.images_per_sequence and self.prefill_chunk_size and self.prefill_chunk_size < self.max_seq_len:
            raise ValueError(
                f"prefill_chunk_size {self.prefill_chunk_size} with images_per_sequence {self.images_per_sequence}: "
                "transformers' generate cannot split a prompt's images into prefill chunks; leave prefill_chunk_size "
                "unset (prompts with images prefill whole)"
            )
        return self


class RuntimeReserve(_Strict):
    """Memory every GPU keeps outside the plan's tensors. Defaults are documented in memory.py."""

    cuda_context: Bytes | None = Field(None, description="CUDA context and loaded kernels, bytes per GPU.")
    cublas_workspace: Bytes | None = Field(None, description="cuBLAS/cuBLASLt workspace, bytes per GPU.")
    allocator_slack: float | None = Field(
        None, ge=0, le=0.5, description="Fraction of the planned tensors added for caching-allocator fragmentation."
    )


class Policy(_Strict):
    """How to choose among the plans that fit."""

    objective: Literal["latency", "balance"] = Field(
        "latency",
        description="latency: least predicted decode time per token; balance: lowest peak utilisation of any GPU.",
    )
    headroom: float = Field(0.05, ge=0, lt=1, description="Fraction of each GPU's memory left unplanned.")
    offload: Literal["none", "cpu", "disk"] = Field(
        "none", description="Where layers may go when the GPUs are full: none (refuse), cpu, or cpu then disk."
    )
    reserve: RuntimeReserve = Field(default_factory=RuntimeReserve, description="Overrides of the runtime reserve.")
    versions: Literal["exact", "compatible"] = Field(
        "compatible",
        description="How `planc run` compares torch/transformers/accelerate to the lock: exact version, "
        "or same major.minor.",
    )
    parallelism: Literal["auto", "device_map", "tensor", "pipeline"] = added(
        "auto",
        "auto: the fastest predicted strategy that fits (accelerate's device_map in one process; transformers "
        "tensor parallelism within an NVLink/NVSwitch island; transformers pipeline parallelism across nodes; "
        "vLLM for tensor x pipeline); device_map, tensor or pipeline: only that strategy.",
    )
    mixer_kernels: Literal["fallback", "kernels"] = added(
        "fallback",
        "How linear-attention, state-space and short-convolution layers run (models that have them): "
        "fallback = transformers' pure-torch implementations, any machine, prefill transients of up to ~3 MiB "
        "per token per layer; kernels = the CUDA kernel packages transformers uses when they import "
        "(flash-linear-attention, causal-conv1d, mamba-ssm), which `planc run` then requires.",
    )


class Spec(_Strict):
    """A deployment spec: model, hardware, workload, policy."""

    planc: Literal[1] = Field(description="Spec format version.")
    model: ModelSource
    hardware: Hardware
    workload: Workload
    policy: Policy = Field(default_factory=Policy)

    def canonical_json(self) -> str:
        """The spec as canonical JSON (sorted keys, sizes in bytes, defaults filled): what the lock hashes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"] if part not in ("catalogue", "explicit", "kind", "topology"))
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "less_than_equal":
        message = f"{_short(err['input'])} is above planc's upper bound of {err['ctx']['le']} (see `planc schema spec`)"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where or 'spec'}: {message}{more}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_spec(data: Any, source: str = "spec") -> Spec:
    """Validate already-parsed YAML data as a Spec; raise SpecError with one line on failure."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level")
    gpus = (data.get("hardware") or {}).get("gpus") if isinstance(data.get("hardware"), dict) else None
    if isinstance(gpus, list):
        for i, gpu in enumerate(gpus):
            if isinstance(gpu, dict) and "type" in gpu and ("name" in gpu or "memory" in gpu):
                raise SpecError(f"{source}: hardware.gpus.{i}: give either type (catalogue) or name/memory (explicit)")
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{source}: {_first_error(exc)}") from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file."""
    path = Path(path)
    text = read_text(path, "spec", SpecError, YAML_LIMIT)
    return parse_spec(parse_yaml(text, str(path), SpecError), source=str(path))

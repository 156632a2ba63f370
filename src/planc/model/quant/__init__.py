"""Quantized weights: which method a model uses, and what transformers holds on the device for it.

Two origins:
- `checkpoint`: the release ships quantized tensors and a `quantization_config` in config.json
  (fine-grained fp8, mxfp4, compressed-tensors, GPTQ, AWQ);
- `load`: the spec asks transformers to quantize a dense checkpoint while loading it
  (`model.quantize: bnb-4bit | bnb-8bit`).

Whether the quantized layout is kept ("native") or transformers dequantizes it to the plan's dtype
at load is decided by rules from the plan's GPUs (`rules/quantization.yaml`), never by probing the
planning machine: a quantizer's `validate_environment` looks at the local GPU and flips the config to
`dequantize` on a machine without one.

One module per method knows its layout and swaps the model built on meta into it (`prepare`). Each
swapped module carries a `Held` record: what it keeps on its device beyond its parameters and
buffers (mxfp4's E8M0 scales and bitsandbytes' quant state are not module tensors), what it would
hold dense, and the transient its kernel allocates. The graph, the ledger, the simulation and
`planc run`'s structure check all read the same records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from planc.errors import ModelError

# quant_method values transformers knows that planc does not size, with the reason.
REFUSED: dict[str, str] = {
    "hqq": "HQQ quantizes on the fly into its own packed layout with per-group metadata planc does not model",
    "torchao": "torchao swaps weights for tensor subclasses whose storage depends on the torchao config and version",
    "bitnet": "BitNet packs ternary weights with its own kernels and scales",
    "gguf": "GGUF checkpoints are dequantized by transformers from a file layout planc does not read",
    "quanto": "optimum-quanto weights are tensor subclasses whose storage planc does not model",
    "eetq": "EETQ repacks int8 weights for its own kernels",
    "fbgemm_fp8": "FBGEMM fp8 keeps per-row scales and activation bounds planc does not model",
    "aqlm": "AQLM stores additive codebooks planc does not size",
    "vptq": "VPTQ stores vector-quantization codebooks planc does not size",
    "spqr": "SpQR stores sparse outliers whose count is data-dependent",
    "higgs": "HIGGS uses FLUTE lookup tables planc does not size",
    "fp_quant": "FP-Quant keeps Hadamard rotations and per-group scales planc does not size",
    "quark": "Quark's layout depends on its export config, which planc does not read",
    "sinq": "SINQ keeps dual scales planc does not size",
    "fouroversix": "4over6 keeps its own packed layout planc does not size",
    "nvfp4": "NVFP4 keeps two-level scales planc does not size yet",
    "auto-round": "AutoRound's packing depends on its backend choice",
    "metal": "Metal quantization runs on Apple GPUs only",
    "gemma": "Gemma's quantized checkpoints need their own loader",
}

# Bytes per element of the dtypes quantized layouts use.
ELEMENT_BYTES = {
    "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e8m0fnu": 1,
    "uint8": 1, "int8": 1, "int32": 4,
}


@dataclass(frozen=True)
class Quantization:
    """How the plan's weights are quantized and whether transformers keeps that layout on the GPUs."""

    method: str  # fp8 | mxfp4 | compressed-tensors | compressed-tensors-fp8 | gptq | awq | bnb-4bit | bnb-8bit
    origin: str  # "checkpoint" (pre-quantized release) or "load" (transformers quantizes while loading)
    config_json: str  # the quantization_config from_pretrained sees, as canonical JSON
    native: bool = True  # False: transformers dequantizes to the plan's dtype at load

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    def with_native(self, native: bool) -> "Quantization":
        return Quantization(self.method, self.origin, self.config_json, native)

    @property
    def module(self):
        """The method's module (layout, swap, transients)."""
        return _method_module(self.method)


def _canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Held:
    """What one quantized module keeps on its device, beyond what its own tensors say."""

    hidden: tuple[tuple[tuple[int, ...], str], ...] = ()  # (shape, dtype) of state that is not a module tensor
    dense_bytes: int = 0  # the module's tensors dense at the plan's dtype
    dense_parameters: int = 0  # its parameter count dense (packed layouts hold fewer elements)
    quantized_bytes: int = 0  # its tensors as quantized (parameters + buffers + hidden)
    prefill_transient: int = 0  # bytes one call allocates whatever the tokens (a dequantized weight)
    token_transient: int = 0  # bytes one call allocates per token in the batch
    experts_token_transient: int = 0  # fused MoE kernels: bytes per token replacing the eager experts' estimate
    offloadable: bool = True  # accelerate can keep it on the host and stream it in

    @property
    def hidden_bytes(self) -> int:
        return sum(_numel(shape) * ELEMENT_BYTES[dtype] for shape, dtype in self.hidden)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


HELD_ATTRIBUTE = "_planc_held"


def held(module) -> Held | None:
    """The Held record `prepare` attached to a swapped module, if any."""
    return getattr(module, HELD_ATTRIBUTE, None)


def mark(module, record: Held) -> None:
    object.__setattr__(module, HELD_ATTRIBUTE, record)


def record(original, swapped, hidden=(), **fields) -> Held:
    """The Held record of `swapped`, which replaced the dense module `original`."""
    hidden = tuple(hidden)
    return Held(
        hidden=hidden,
        dense_bytes=tensor_bytes(original),
        dense_parameters=sum(p.numel() for p in original.parameters()),
        quantized_bytes=tensor_bytes(swapped) + Held(hidden=hidden).hidden_bytes,
        **fields,
    )


def tensor_bytes(module, recurse: bool = True) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    tensors = {id(t): t for t in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------- which method


def _method_module(method: str):
    from planc.model.quant import awq, bnb, compressed, fp8, gptq, mxfp4

    return {
        "fp8": fp8,
        "mxfp4": mxfp4,
        "compressed-tensors": compressed,
        "compressed-tensors-fp8": compressed,
        "gptq": gptq,
        "awq": awq,
        "bnb-4bit": bnb,
        "bnb-8bit": bnb,
    }[method]


CHECKPOINT_METHODS = {"fp8": "fp8", "mxfp4": "mxfp4", "compressed-tensors": "compressed-tensors", "gptq": "gptq",
                      "awq": "awq"}


def checkpoint_quantization(config_dict: dict[str, Any]) -> Quantization | None:
    """The quantization a config.json declares, None for a dense checkpoint; refuses what planc does not size."""
    quant = config_dict.get("quantization_config")
    if not quant:
        text = config_dict.get("text_config")
        quant = text.get("quantization_config") if isinstance(text, dict) else None
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise ModelError("config.json: quantization_config is not a mapping")
    method = str(quant.get("quant_method", ""))
    if quant.get("load_in_4bit") or quant.get("load_in_8bit"):
        method = "bitsandbytes"
    if method == "bitsandbytes":
        raise ModelError(
            "quantized checkpoint (bitsandbytes, saved pre-quantized): planc sizes bitsandbytes only when it "
            "quantizes at load; plan the dense release with model.quantize: bnb-4bit or bnb-8bit instead"
        )
    if method in REFUSED:
        raise ModelError(f"quantized checkpoint ({method}): planc does not size {method} weights: {REFUSED[method]}")
    if method not in CHECKPOINT_METHODS:
        raise ModelError(
            f"quantized checkpoint ({method or 'no quant_method'}): not a quantization method planc knows "
            f"(it sizes {', '.join(sorted(CHECKPOINT_METHODS))}, and bitsandbytes at load)"
        )
    name = CHECKPOINT_METHODS[method]
    module = _method_module(name)
    name = module.variant(quant) if hasattr(module, "variant") else name
    module.validate(quant, config_dict)
    return Quantization(name, "checkpoint", _canonical(quant))


def load_quantization(requested, dtype: str) -> Quantization:
    """The BitsAndBytesConfig arguments for a spec's `model.quantize` (compute dtype = the plan's)."""
    from planc.model.quant import bnb

    return Quantization(requested.method, "load", _canonical(bnb.config_arguments(requested, dtype)))


def quantization_of(config_dict: dict[str, Any], requested, dtype: str) -> Quantization | None:
    """The plan's quantization: the checkpoint's, or the spec's `model.quantize`, or None."""
    from_checkpoint = checkpoint_quantization(config_dict)
    if requested is not None:
        if from_checkpoint is not None:
            raise ModelError(
                f"model.quantize {requested.method}: the checkpoint is already quantized ({from_checkpoint.method}); "
                "remove model.quantize, or plan a dense release"
            )
        return load_quantization(requested, dtype)
    return from_checkpoint


def quantization_of_lock(plan) -> tuple[Quantization | None, tuple[str, ...]]:
    """A lock's quantization, and the device_map entries bitsandbytes leaves dense (cpu/disk on a GPU plan)."""
    section = plan.quantization
    if section is None:
        return None, ()
    quantization = Quantization(section.method, section.origin, _canonical(dict(section.config)),
                                section.weights == "native")
    offloaded: tuple[str, ...] = ()
    if section.origin == "load" and plan.devices:
        offloaded = tuple(entry for entry, device in plan.device_map.items() if device in ("cpu", "disk"))
    return quantization, offloaded


# ---------------------------------------------------------------- the layout on meta


def prepare(model, quantization: Quantization, dtype: str, offloaded: tuple[str, ...] = ()) -> None:
    """Swap the meta model into the layout transformers holds for `quantization` (nothing when dequantized).

    `offloaded`: device_map entries on cpu/disk, which bitsandbytes leaves dense (its fp32-offload path).
    """
    quantization.module.prepare(model, quantization, dtype, offloaded)
    if quantization.native and not any(held(m) for m in model.modules()):
        raise ModelError(
            f"{quantization.method}: no module of {type(model).__name__} takes the quantized layout; "
            "planc will not plan the checkpoint as if it were dense"
        )


def simulated_forwards(model, quantization: Quantization) -> int:
    """Replace the forwards of kernels fake tensors cannot run by what they allocate (planc simulate).

    planc's own stand-ins (bitsandbytes, GPTQ, AWQ) carry such forwards already.
    """
    module = quantization.module
    if not quantization.native or not hasattr(module, "simulated_forwards"):
        return 0
    return module.simulated_forwards(model)


def hidden_tensors(model):
    """(module name, shape, dtype) of the state quantized modules keep outside their tensors."""
    for name, module in model.named_modules():
        record = held(module)
        if record is not None:
            for shape, dtype in record.hidden:
                yield name, shape, dtype


def dense_module_patterns(model) -> list[str]:
    """Modules with weights left at the plan's dtype, as patterns (layer numbers as *), norms left out."""
    patterns: dict[str, None] = {}
    quantized_inside = set()
    for name, module in model.named_modules():
        if held(module) is not None:
            quantized_inside.add(name)
    for name, module in model.named_modules():
        if held(module) is not None or any(name == q or name.startswith(q + ".") for q in quantized_inside):
            continue
        own = [t for t in module.parameters(recurse=False) if t.dim() >= 2]
        if not own or "norm" in type(module).__name__.lower():
            continue
        pattern = ".".join("*" if part.isdigit() else part for part in name.split("."))
        patterns[pattern] = None
    return list(patterns)

"""Load the model exactly as placed by the lock, and prove it landed there.

Two checks bracket `from_pretrained`:
- before (on the meta device, no weights read): every tensor of the model is placed by exactly the
  lock's device_map, no entry names a module the model lacks, and the model's
  `_skip_keys_device_placement` (what transformers hands to accelerate's dispatch, see
  transformers/integrations/accelerate.py `accelerate_dispatch`) equals the lock's skip_keys.
  transformers itself would silently put an unplaced tensor on the CPU and ignore unknown entries.
- after: per tensor, the device per `model.hf_device_map` and the tensor's own device agree with
  the lock, and accelerate's hooks execute each entry where the plan says, with the lock's skip_keys.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from planc.errors import RunError
from planc.plan import Plan

SHOWN_MISMATCHES = 3


def main_device(plan: Plan) -> int | str:
    """Where offloaded entries execute: the first GPU of the map in execution order, else the CPU."""
    return next((device for device in plan.device_map.values() if isinstance(device, int)), "cpu")


def normalise_device(device: Any) -> int | str:
    """0 / "cuda:0" / torch.device("cuda", 0) -> 0; "cpu", "disk", "meta" stay names."""
    text = str(device)
    if isinstance(device, int) or text.isdigit():
        return int(text)
    if text.startswith("cuda:"):
        return int(text.split(":", 1)[1])
    return 0 if text == "cuda" else text


def placement_per_tensor(device_map: dict[str, Any], names: list[str]) -> tuple[dict[str, int | str], list[str]]:
    """Each tensor's device under `device_map` (the longest entry that is the tensor's module or an
    ancestor of it wins, as in accelerate), and the tensors no entry places."""
    placed: dict[str, int | str] = {}
    unplaced: list[str] = []
    for name in names:
        owner = _owning_entry(device_map, name)
        if owner is None:
            unplaced.append(name)
        else:
            placed[name] = normalise_device(device_map[owner])
    return placed, unplaced


def _owning_entry(device_map: dict[str, Any], name: str) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts), -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in device_map:
            return prefix
    return None


def _tensor_names(model) -> list[str]:
    # remove_duplicate=False: a tied weight has a name under each module that uses it, and both count.
    return [name for name, _ in model.named_parameters(remove_duplicate=False)] + [
        name for name, _ in model.named_buffers(remove_duplicate=False)
    ]


def _listing(items: list[str]) -> str:
    more = len(items) - SHOWN_MISMATCHES
    return ", ".join(items[:SHOWN_MISMATCHES]) + (f" and {more} more" if more > 0 else "")


def build_meta_model(plan: Plan, config: dict):
    """The plan's model class on the meta device at the plan's dtype, in its quantized layout: structure only."""
    from planc.model.build import meta_model
    from planc.model.quant import quantization_of_lock

    quantization, offloaded = quantization_of_lock(plan)
    return meta_model(config, plan.dtype, plan.model.trust_remote_code, quantization=quantization, offloaded=offloaded)


def structure_mismatches(plan: Plan, model) -> list[str]:
    """The lock's device_map, skip_keys and no-split classes against the model's structure."""
    mismatches = []
    if type(model).__name__ != plan.model.architecture:
        mismatches.append(f"model class: plan {plan.model.architecture}, machine's transformers builds {type(model).__name__}")
    # An entry places a module, or a module's own parameter or buffer (gpt_bigcode's `transformer.bias`).
    known = {name for name, _ in model.named_modules()} | set(_tensor_names(model))
    unknown = [key for key in plan.device_map if key not in known]
    if unknown:
        mismatches.append(f"device_map entries: plan {_listing(unknown)}, machine's model has no such module")
    _, unplaced = placement_per_tensor(plan.device_map, _tensor_names(model))
    if unplaced:
        mismatches.append(
            f"device_map coverage: plan places no device for {_listing(unplaced)}, machine's model has them"
        )
    skip_keys = sorted(_as_set(model._skip_keys_device_placement))
    if skip_keys != sorted(plan.skip_keys):
        mismatches.append(f"skip_keys: plan {sorted(plan.skip_keys)}, machine's model {skip_keys}")
    no_split = sorted(_as_set(model._no_split_modules))
    if no_split != sorted(plan.no_split_module_classes):
        planned = sorted(plan.no_split_module_classes)
        mismatches.append(f"no_split_module_classes: plan {planned}, machine's model {no_split}")
    return mismatches


def _as_set(value) -> set[str]:
    if value is None:
        return set()
    return {value} if isinstance(value, str) else set(value)


def max_memory_argument(plan: Plan) -> dict[int | str, int]:
    """The lock's max_memory as accelerate takes it: GPU indices as ints, "cpu" as a name."""
    return {int(key) if key.isdigit() else key: value for key, value in plan.max_memory.items()}


def from_pretrained_settings(plan: Plan, offload_folder: str | None) -> dict[str, Any]:
    """from_pretrained's keyword arguments for the lock with the dtype as its name: no torch needed
    (exports write them out). `offload_folder` is the plan's host.disk as the caller resolves it."""
    arguments: dict[str, Any] = {
        "device_map": dict(plan.device_map),  # execution order kept: accelerate reads it in order
        "max_memory": max_memory_argument(plan),
        "dtype": plan.dtype,
        "attn_implementation": plan.attention.attn_implementation,
        "trust_remote_code": plan.model.trust_remote_code,
    }
    if "disk" in plan.device_map.values():
        if not plan.host.disk or offload_folder is None:
            raise RunError("the plan offloads to disk but names no host.disk folder")
        arguments["offload_folder"] = offload_folder
    if plan.generation.experts_implementation:
        arguments["experts_implementation"] = plan.generation.experts_implementation
    quantization = quantization_config_arguments(plan)
    if quantization is not None:
        arguments["quantization_config"] = quantization
    return arguments


def quantization_config_arguments(plan: Plan) -> dict[str, Any] | None:
    """The quantization_config from_pretrained must be given for the lock (as AutoQuantizationConfig's
    dict), or None when the checkpoint's own config says it all.

    Quantize at load: the BitsAndBytesConfig. A checkpoint the plan dequantizes: its own config with
    `dequantize` set, so the load matches the plan whatever GPU transformers' check looks at (only
    the current device). Natively the checkpoint's config stands.
    """
    section = plan.quantization
    if section is None:
        return None
    if section.origin == "load":
        return {**section.config, "quant_method": "bitsandbytes"}
    if section.weights == "dequantized" and "dequantize" in section.config:
        return dict(section.config)
    return None


def from_pretrained_arguments(plan: Plan, lock_dir: Path) -> dict[str, Any]:
    """Keyword arguments for the lock's model class's from_pretrained that enact the lock."""
    import torch

    folder = str((lock_dir / plan.host.disk).resolve()) if plan.host.disk else None
    arguments = from_pretrained_settings(plan, folder)
    arguments["dtype"] = getattr(torch, plan.dtype)
    if "quantization_config" in arguments:
        from transformers.quantizers.auto import AutoQuantizationConfig

        arguments["quantization_config"] = AutoQuantizationConfig.from_dict(arguments["quantization_config"])
    return arguments


def model_class_and_config(plan: Plan, folder: Path):
    """The class and config compile planned: config.json read and resolved as `planc.model.build` does
    (by `architectures` where the model_type is unknown), checked against the lock's class."""
    import json

    from planc.errors import PlancError
    from planc.model.build import resolve

    try:
        config_dict = json.loads((folder / "config.json").read_text())
        config, cls = resolve(config_dict, plan.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {folder / 'config.json'}: {exc}") from None
    except PlancError as exc:
        raise RunError(f"the model no longer builds: {exc}") from None
    if cls.__name__ != plan.model.architecture:
        raise RunError(f"the plan is for {plan.model.architecture}; this transformers resolves {cls.__name__}")
    return cls, config


def load_model(plan: Plan, folder: Path, lock_dir: Path, progress=None):
    """from_pretrained of the lock's class with the lock's placement; `progress` (a rich Progress) shows
    the weights loading."""
    cls, config = model_class_and_config(plan, folder)
    arguments = from_pretrained_arguments(plan, lock_dir)
    with _loading_display(progress):
        try:
            return cls.from_pretrained(folder, config=config, **arguments)
        except (OSError, ValueError, RuntimeError) as exc:
            raise RunError(f"loading {plan.model.architecture} from {folder} failed: {exc}") from None


@contextmanager
def _loading_display(progress) -> Iterator[None]:
    """Route transformers' tqdm bars to `progress` (or nowhere), and mute the planned-offload warning."""
    from transformers.utils import logging as hf_logging

    previous_hook = hf_logging.set_tqdm_hook(lambda _factory, args, kwargs: _RichTqdm(progress, *args, **kwargs))
    # accelerate warns that offloaded parameters sit on the meta device: here that is the plan.
    offload_logger = logging.getLogger("accelerate.big_modeling")
    previous_level = offload_logger.level
    offload_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous_hook)
        offload_logger.setLevel(previous_level)


class _RichTqdm:
    """Enough of tqdm's interface for transformers' loading loops, drawn as a rich task (or not at all)."""

    def __init__(self, progress, iterable=None, *args, total=None, desc=None, **kwargs):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.progress = progress
        self.task = progress.add_task(desc or "loading", total=total) if progress is not None else None

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        if self.task is not None:
            self.progress.advance(self.task, n)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):  # set_postfix, refresh, ...: nothing to draw
        return lambda *args, **kwargs: None


def placement_mismatches(plan: Plan, model) -> list[str]:
    """Where the loaded model's tensors and hooks are, against the lock."""
    names = _tensor_names(model)
    expected, _ = placement_per_tensor(plan.device_map, names)
    main = main_device(plan)
    mismatches = []
    hf_device_map = getattr(model, "hf_device_map", None)
    if hf_device_map is not None:
        loaded, _ = placement_per_tensor(hf_device_map, names)
        differ = [
            f"{name} ({_where(loaded.get(name))} instead of {_where(expected.get(name))})"
            for name in names
            if loaded.get(name) != expected.get(name)
        ]
        if differ:
            mismatches.append(f"hf_device_map after loading: {_listing(differ)}")
    # The tensors themselves: with one device for everything transformers attaches no hooks and
    # sets no hf_device_map, and this is the only check.
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    differ = []
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        want = _resident_device(expected.get(name), main, is_parameter=name in parameters)
        have = normalise_device(tensor.device)
        if have != want:
            differ.append(f"{name} ({_where(have)} instead of {_where(want)})")
    if differ:
        mismatches.append(f"tensors after loading: {_listing(differ)}")
    mismatches.extend(_hook_mismatches(plan, model, main))
    if getattr(model.config, "_attn_implementation", None) != plan.attention.attn_implementation:
        mismatches.append(
            f"attn_implementation: plan {plan.attention.attn_implementation}, "
            f"loaded model {getattr(model.config, '_attn_implementation', None)}"
        )
    if str(model.dtype).removeprefix("torch.") != plan.dtype:
        mismatches.append(f"dtype: plan {plan.dtype}, loaded model {str(model.dtype).removeprefix('torch.')}")
    section = plan.quantization
    # compressed-tensors' "dequantized" is reached at the first forward, not at load.
    if section is not None and (section.weights == "native" or "dequantize" in section.config):
        quantized = bool(getattr(model, "is_quantized", False))
        if quantized != (section.weights == "native"):
            held = "quantized" if quantized else "dense (dequantized)"
            mismatches.append(f"weights: plan {plan.quantization.method} {plan.quantization.weights}, loaded model {held}")
    return mismatches


def _where(device) -> str:
    return "unplaced" if device is None else f"GPU {device}" if isinstance(device, int) else str(device)


def _resident_device(planned, main, is_parameter: bool):
    """Where a tensor sits once dispatched: offloaded parameters stay on the meta device and are
    streamed in by their hook; entries on the main device's own memory (a GPU, or the CPU of a
    CPU-only plan) are resident; buffers are never offloaded (offload_buffers=False), so a buffer
    of an offloaded module lives on the device that executes it."""
    if isinstance(planned, int) or planned == main:
        return planned
    return "meta" if is_parameter else main


def _align_hook(hook):
    """The AlignDevicesHook inside accelerate's SequentialHook, if the module has several."""
    return next((inner for inner in getattr(hook, "hooks", ()) if hasattr(inner, "execution_device")), hook)


def _hook_mismatches(plan: Plan, model, main) -> list[str]:
    """accelerate's hooks: each device_map entry executes on its GPU (offloaded ones on the main
    device), and every hook carries the lock's skip_keys."""
    hooks = {
        name: _align_hook(module._hf_hook) for name, module in model.named_modules() if hasattr(module, "_hf_hook")
    }
    if not hooks:
        return []
    mismatches = []
    wrong_device = []
    for entry, device in plan.device_map.items():
        hook = hooks.get(entry)
        execution = getattr(hook, "execution_device", None)
        want = device if isinstance(device, int) else main
        if hook is not None and execution is not None and normalise_device(execution) != want:
            wrong_device.append(f"{entry} ({_where(normalise_device(execution))} instead of {_where(want)})")
    root = getattr(hooks.get(""), "execution_device", None)
    if root is not None and normalise_device(root) != main:
        wrong_device.insert(0, f"main device ({_where(normalise_device(root))} instead of {_where(main)})")
    if wrong_device:
        mismatches.append(f"execution devices after loading: {_listing(wrong_device)}")
    wanted = set(plan.skip_keys)
    wrong_keys = sorted(
        name or "<root>" for name, hook in hooks.items() if _as_set(getattr(hook, "skip_keys", None)) != wanted
    )
    if wrong_keys:
        mismatches.append(f"skip_keys after loading: plan {sorted(wanted)}, hooks of {_listing(wrong_keys)} differ")
    return mismatches

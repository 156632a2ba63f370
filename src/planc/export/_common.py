"""What every export target shares: the target record, where paths start, the settings every
target writes (model, environment, attention, decoding, workload), and Python rendering.

A target turns an ExportContext into a JSON-able settings dict (`settings`) and renders that dict
in each of its formats (`renderers`), so the JSON and the Python snippet of one target are the
same facts twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from planc.plan import Plan


@dataclass(frozen=True)
class ExportContext:
    """A lock being exported, and where the export's relative paths start."""

    plan: Plan
    lock_path: Path
    output_dir: Path  # the folder the export is written to (the current one for stdout)
    model: str | None = None  # overrides the model folder or id the lock names
    output_name: str | None = None  # the file the export is written to, when it is written to one

    def relative(self, path: str | Path) -> str:
        """An absolute or current-folder path re-expressed relative to the export's folder."""
        return Path(os.path.relpath(Path(path).resolve(), self.output_dir.resolve())).as_posix()

    def from_lock(self, lock_relative: str) -> str:
        """A path the lock gives relative to itself, relative to the export's folder."""
        return self.relative(self.lock_path.parent / lock_relative)


@dataclass(frozen=True)
class ExportTarget:
    """One tool planc exports to."""

    name: str  # the module's name: `planc export --to NAME`
    summary: str
    settings: Callable[[ExportContext], dict[str, Any]]
    renderers: dict[str, Callable[[dict[str, Any], ExportContext], str]]  # format -> text; the first is the default

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.renderers)


def model_reference(context: ExportContext) -> dict[str, Any]:
    """Where the weights are: {"path": folder relative to the export} or {"id", "revision"}."""
    plan = context.plan
    if context.model is not None:
        if Path(context.model).is_dir():
            return {"path": context.relative(context.model)}
        return {"id": context.model, "revision": None}
    if plan.model.id:
        return {"id": plan.model.id, "revision": plan.model.revision}
    if plan.model.path:
        return {"path": context.from_lock(plan.model.path)}
    # Compiled from a bare config.json: its folder is the best guess, and it holds no weights yet.
    return {"path": context.from_lock(str(Path(plan.model.config).parent)), "weights": False}


def one_process_only(context: ExportContext, target: str) -> None:
    """A tensor- or pipeline-parallel plan has no device_map for a one-process loader: say where it goes."""
    from planc.errors import SpecError

    plan = context.plan
    if plan.distributed:
        raise SpecError(
            f"--to {target} loads one process; this plan is {plan.parallel.strategy} over "
            f"{len(plan.parallel.ranks)} ranks: run it with planc run, or export it with --to vllm"
        )


def common_settings(context: ExportContext) -> dict[str, Any]:
    """The settings every target carries besides its loader's arguments."""
    from planc.run.apply import plan_environment
    from planc.run.generate import generation_settings, input_device

    plan = context.plan
    settings = {
        "plan_hash": plan.plan_hash,
        "model": model_reference(context),
        # Before anything initialises CUDA: the driver reads device order and visibility once.
        "env": plan_environment(plan, inherited={}),
        "sdpa_backends": list(plan.attention.sdpa_backends),
        "generation": generation_settings(plan),
        "seed": plan.generation.seed,
        "input_device": input_device(plan),
        "workload": {"batch_size": plan.workload.batch_size, "max_seq_len": plan.workload.max_seq_len},
        # The class compile planned and `planc run` loads (an image-text-to-text model is not an
        # AutoModelForCausalLM), and the config class where config.json's model_type is unknown.
        "model_class": plan.model.architecture,
    }
    if plan.model.config_class:
        settings["config_class"] = plan.model.config_class
    if plan.mixers is not None and plan.mixers.path == "kernels":
        # Sized for the CUDA kernels: without them transformers silently runs the torch fallback,
        # whose prefill needs more memory than the plan holds.
        settings["kernel_packages"] = dict(plan.mixers.requires)
    return settings


def offload_folder(context: ExportContext) -> str | None:
    """The plan's disk offload folder relative to the export, when the plan offloads to disk."""
    plan = context.plan
    if "disk" in plan.device_map.values() and plan.host.disk:
        return context.from_lock(plan.host.disk)
    return None


def render_json(settings: dict[str, Any], context: ExportContext) -> str:
    return json.dumps(settings, indent=2) + "\n"


# ------------------------------------------------------------------ Python snippets


class Code(str):
    """Python source written as is (an expression), not as a string literal."""


def literal(value: Any, indent: int = 0, width: int = 100) -> str:
    """A Python literal for JSON-able data (and Code), one line when it fits, else one item a line."""
    inline = _inline(value)
    if len(inline) + indent <= width or not isinstance(value, (dict, list)) or not value:
        return inline
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{_inline(key)}: {literal(item, indent + 4, width)}," for key, item in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{literal(item, indent + 4, width)}," for item in value]
    return "[\n" + "\n".join(items) + "\n" + " " * indent + "]"


def _inline(value: Any) -> str:
    if isinstance(value, Code):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_inline(k)}: {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return repr(value)


def model_expression(model: dict[str, Any]) -> Code:
    """The snippet's MODEL: a folder next to the snippet, or a Hugging Face id."""
    if "path" in model:
        return Code(f"str(HERE / {model['path']!r})")
    return Code(repr(model["id"]))


def source_arguments(plan: Plan, model: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained arguments that say which files to read: the revision of an id, remote code."""
    arguments: dict[str, Any] = {}
    if model.get("revision"):
        arguments["revision"] = model["revision"]
    if plan.model.trust_remote_code:
        arguments["trust_remote_code"] = True
    return arguments


def sdpa_expression(backends: list[str]) -> Code:
    from planc.run.apply import SDPA_BACKENDS

    return Code("[" + ", ".join(f"SDPBackend.{SDPA_BACKENDS[name]}" for name in backends) + "]")


def snippet_header(target: str, context: ExportContext, settings: dict[str, Any], what: str, imports: str) -> str:
    """Docstring, the plan's environment (set before torch is imported) and the shared constants."""
    plan = context.plan
    lock = context.relative(context.lock_path)
    weights = "" if settings["model"].get("weights", True) else (
        "\nThe plan was compiled from a config.json alone: point MODEL at the folder (or id) with the weights.\n"
    )
    return f'''\
"""{plan.model.architecture} {what}, as planc's plan places it: plain {target}, no planc.

Generated by `planc export --to {target}` from {lock} (plan_hash {plan.plan_hash}).
Run it: python THIS_FILE "a prompt" ["another prompt" ...] (at most {plan.workload.batch_size} prompts and
{plan.workload.max_seq_len} tokens per sequence, prompt and new tokens together), or import it and call
load() and generate().
{weights}"""

import contextlib
import os
import sys
from pathlib import Path

# The plan's environment, set before torch is imported: CUDA reads it once, when it initialises.
os.environ.update({literal(settings["env"], 0)})

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
{imports}
{_kernel_check(settings.get("kernel_packages"))}HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
MODEL = {model_expression(settings["model"])}
SOURCE = {literal(source_arguments(context.plan, settings["model"]), 0)}  # for every from_pretrained
SDPA_BACKENDS = {sdpa_expression(settings["sdpa_backends"])}  # only these, in this order of priority
GENERATION = {literal(settings["generation"], 0)}
INPUT_DEVICE = {settings["input_device"]!r}
MAX_BATCH_SIZE, MAX_SEQ_LEN = {plan.workload.batch_size}, {plan.workload.max_seq_len}
SEED = {settings["seed"]}
'''


def _kernel_check(packages: dict[str, str] | None) -> str:
    """For a plan sized on the CUDA kernels: refuse to start where one does not import, as planc run does."""
    if not packages:
        return ""
    return f'''
# The plan sized its linear-attention / SSM layers for these kernels (import name: distribution);
# transformers would run the torch fallback without them, which needs more memory than planned.
for _module, _distribution in {literal(packages, 0)}.items():
    try:
        __import__(_module)
    except Exception as _exc:
        sys.exit(f"this plan needs {{_distribution}} (import {{_module}} failed: {{_exc}}); install it or recompile with policy.mixer_kernels: fallback")

'''


def snippet_settings_code() -> str:
    """Deterministic kernels and the seed, as `planc run` sets them."""
    return '''\
def _torch_settings():
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(SEED)
'''


SNIPPET_GENERATE = '''\
def generate(model, tokenizer, prompts, max_new_tokens=32):
    """Greedy (or the plan's) decoding of one left-padded batch; the new token ids of each prompt."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    longest = batch["input_ids"].shape[1]
    if len(prompts) > MAX_BATCH_SIZE or longest + max_new_tokens > MAX_SEQ_LEN:
        raise ValueError(
            f"{len(prompts)} prompts of up to {longest} tokens + {max_new_tokens} new ones exceed the plan's "
            f"{MAX_BATCH_SIZE} x {MAX_SEQ_LEN} tokens"
        )
    batch = {name: tensor.to(INPUT_DEVICE) for name, tensor in batch.items()}
    pinned = sdpa_kernel(SDPA_BACKENDS, set_priority=True) if SDPA_BACKENDS else contextlib.nullcontext()
    with torch.inference_mode(), pinned:
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **GENERATION
        )
    eos = model.generation_config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    rows = []
    for row in output[:, longest:].tolist():
        stop = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        rows.append(row[:stop])
    return rows


if __name__ == "__main__":
    model, tokenizer = load()
    for ids in generate(model, tokenizer, sys.argv[1:] or ["Hello"]):
        print(tokenizer.decode(ids, skip_special_tokens=True))
'''


def config_code(settings: dict[str, Any]) -> str:
    """`_config()`: config.json read as compile read it (planc.model.build.resolve), for the snippets."""
    if "config_class" in settings:
        # config.json's model_type is unknown to transformers: its dict read as the class
        # `architectures` names, without the remote-code pointers (planc.model.config.make_config).
        reader = settings["config_class"]
        load = (
            f"data, _ = {reader}.get_config_dict(MODEL, **SOURCE)\n"
            "    data = {key: value for key, value in data.items() if key not in (\"model_type\", \"auto_map\")}\n"
            f"    config = {reader}(**data)"
        )
    else:
        reader = "AutoConfig"
        load = "config = AutoConfig.from_pretrained(MODEL, **SOURCE, trust_remote_code=False)"
    return f'''\
def _config():
    """config.json as {reader} reads it; a text-only class of a multimodal config takes its text config."""
    {load}
    if not isinstance(config, MODEL_CLASS.config_class):
        subs = [getattr(config, key, None) for key in getattr(config, "sub_configs", {{}}) or {{}}]
        config = next((sub for sub in subs if isinstance(sub, MODEL_CLASS.config_class)), config)
    return config
'''


def model_imports(settings: dict[str, Any]) -> str:
    names = sorted({settings["model_class"], settings.get("config_class", "AutoConfig"), "AutoTokenizer"})
    return f"from transformers import {', '.join(names)}\n"


TOKENIZER_CODE = '''\
def _tokenizer():
    # trust_remote_code=False: never the interactive prompt for a checkpoint that ships code.
    tokenizer = AutoTokenizer.from_pretrained(MODEL, **SOURCE, padding_side="left", trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
'''

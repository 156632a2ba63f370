"""`planc export --to accelerate`: the model built on the meta device, then
`load_checkpoint_and_dispatch` with the plan's device_map, max_memory, no-split classes, skip_keys
and offload folder, as JSON or as a script that loads and generates with plain accelerate.

With an explicit device_map, accelerate places exactly that map; max_memory and
no_split_module_classes are what its own planner would need (device_map="auto") to respect the
plan's workload. load_checkpoint_and_dispatch reads tensors by name as the checkpoint stores them,
with none of the renaming transformers applies at load, so the script loads with strict=True:
a checkpoint whose names differ fails instead of leaving weights unloaded.
"""

from __future__ import annotations

from typing import Any

from planc.export._common import (
    Code,
    ExportContext,
    ExportTarget,
    SNIPPET_GENERATE,
    TOKENIZER_CODE,
    common_settings,
    config_code,
    literal,
    model_imports,
    offload_folder,
    one_process_only,
    render_json,
    snippet_header,
    snippet_settings_code,
)


def _renamed_checkpoint(plan) -> str | None:
    """The model_type whose checkpoint keys transformers converts while loading (fused MoE experts,
    LLaVA's language_model prefix: conversion_mapping.py), or None.

    load_checkpoint_and_dispatch loads tensors by their names on disk, without those conversions,
    so such a checkpoint does not load into the model transformers builds. The table is
    transformers' own (it imports torch); without transformers here the script's strict load is
    what will say so.
    """
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return None

    names = [plan.model.architecture, plan.model.model_type]
    if plan.model.config_class:
        import transformers

        names.append(getattr(transformers, plan.model.config_class).model_type)
    return next((name for name in names if get_checkpoint_conversion_mapping(name)), None)


def settings(context: ExportContext) -> dict[str, Any]:
    one_process_only(context, "accelerate")
    renamed = _renamed_checkpoint(context.plan)
    if renamed is not None:
        from planc.errors import SpecError

        raise SpecError(
            f"--to accelerate loads tensors by their names on disk, and transformers converts {renamed} checkpoints "
            "while loading (its conversion_mapping: fused experts, renamed prefixes), which "
            "load_checkpoint_and_dispatch does not: use --to transformers"
        )
    if context.plan.quantization is not None:
        from planc.errors import SpecError

        raise SpecError(
            f"--to accelerate builds the dense model and loads tensors by name; this plan holds "
            f"{context.plan.quantization.method} weights, which only transformers' quantizer swaps in: use --to transformers"
        )
    from planc.run.load import max_memory_argument

    plan = context.plan
    base = common_settings(context)
    build: dict[str, Any] = {
        "class": plan.model.architecture,
        "dtype": plan.dtype,
        "attn_implementation": plan.attention.attn_implementation,
        "trust_remote_code": plan.model.trust_remote_code,
    }
    if plan.generation.experts_implementation:
        build["experts_implementation"] = plan.generation.experts_implementation
    dispatch: dict[str, Any] = {
        "checkpoint": base["model"].get("path"),  # an id is resolved to its local snapshot by the script
        "device_map": dict(plan.device_map),
        "max_memory": max_memory_argument(plan),
        "no_split_module_classes": list(plan.no_split_module_classes),
        "skip_keys": list(plan.skip_keys),
        "offload_folder": offload_folder(context),
        "offload_buffers": False,
        "dtype": plan.dtype,
        "strict": True,
    }
    return {"target": "accelerate", **base, "from_config": build, "load_checkpoint_and_dispatch": dispatch}


def python(data: dict[str, Any], context: ExportContext) -> str:
    build = {key: value for key, value in data["from_config"].items() if key != "class"}
    if not build["trust_remote_code"]:
        del build["trust_remote_code"]
    build["dtype"] = Code(f"torch.{build['dtype']}")
    dispatch = {key: value for key, value in data["load_checkpoint_and_dispatch"].items() if key != "checkpoint"}
    dispatch["dtype"] = Code(f"torch.{dispatch['dtype']}")
    if dispatch["offload_folder"] is not None:
        dispatch["offload_folder"] = Code(f"str(HERE / {dispatch['offload_folder']!r})")
    if "path" in data["model"]:
        checkpoint = "MODEL"
    else:
        checkpoint = "snapshot_download(MODEL, **{k: v for k, v in SOURCE.items() if k == 'revision'})"
    imports = (
        "from accelerate import init_empty_weights, load_checkpoint_and_dispatch\n"
        + ("" if "path" in data["model"] else "from huggingface_hub import snapshot_download\n")
        + model_imports(data)
    )
    return (
        snippet_header("accelerate", context, data, "dispatched with load_checkpoint_and_dispatch", imports)
        + f"MODEL_CLASS = {data['model_class']}\n"
        + "FROM_CONFIG = " + literal(build) + "\n"
        + "DISPATCH = " + literal(dispatch) + "\n\n\n"
        + snippet_settings_code() + "\n\n" + config_code(data) + "\n\n" + TOKENIZER_CODE + "\n\n"
        + f'''\
def load():
    """The model built on the meta device, then loaded and dispatched exactly as the plan places it."""
    _torch_settings()
    with init_empty_weights():
        model = MODEL_CLASS._from_config(_config(), **FROM_CONFIG)
    model.tie_weights()
    model = load_checkpoint_and_dispatch(model, {checkpoint}, **DISPATCH)
    model.eval()
    return model, _tokenizer()


'''
        + SNIPPET_GENERATE
    )


TARGET = ExportTarget(
    name="accelerate",
    summary="load_checkpoint_and_dispatch arguments (device_map, max_memory, no-split classes, skip_keys, offload)",
    settings=settings,
    renderers={"json": render_json, "python": python},
)

"""`planc export --to transformers`: from_pretrained's arguments, the decoding settings and the
environment, as JSON or as a script that loads and generates with plain transformers."""

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


def settings(context: ExportContext) -> dict[str, Any]:
    one_process_only(context, "transformers")
    from planc.run.load import from_pretrained_settings

    return {
        "target": "transformers",
        **common_settings(context),
        "from_pretrained": from_pretrained_settings(context.plan, offload_folder(context)),
    }


def python(data: dict[str, Any], context: ExportContext) -> str:
    arguments = {key: value for key, value in data["from_pretrained"].items() if key != "trust_remote_code"}
    arguments["dtype"] = Code(f"torch.{arguments['dtype']}")
    if "offload_folder" in arguments:
        arguments["offload_folder"] = Code(f"str(HERE / {arguments['offload_folder']!r})")
    imports = model_imports(data)
    if "quantization_config" in arguments:
        arguments["quantization_config"] = Code(f"AutoQuantizationConfig.from_dict({literal(arguments['quantization_config'])})")
        imports += "from transformers.quantizers.auto import AutoQuantizationConfig\n"
    return (
        snippet_header("transformers", context, data, "loaded with from_pretrained", imports)
        + f"MODEL_CLASS = {data['model_class']}\n"
        + "FROM_PRETRAINED = " + literal(arguments) + "\n\n\n"
        + snippet_settings_code() + "\n\n" + config_code(data) + "\n\n" + TOKENIZER_CODE + "\n\n"
        + '''\
def load():
    """The model placed as the plan says (device_map, max_memory, dtype, attention), and its tokenizer."""
    _torch_settings()
    model = MODEL_CLASS.from_pretrained(MODEL, **SOURCE, config=_config(), **FROM_PRETRAINED)
    return model, _tokenizer()


'''
        + SNIPPET_GENERATE
    )


TARGET = ExportTarget(
    name="transformers",
    summary="from_pretrained arguments of the plan's model class, decoding settings and environment",
    settings=settings,
    renderers={"json": render_json, "python": python},
)

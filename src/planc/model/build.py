"""The model transformers builds for a config, on the meta device: the one place planc instantiates it.

The compiler cuts it into units, the simulation re-creates its tensors on virtual devices, and
`planc run` checks a lock against its structure; all three must see the same model, built with the
same class, dtype and implementation switches as `from_pretrained` will use.

The class is resolved once, here (`model_class`): the class `config.architectures` names when
transformers ships it as a generative model (causal LM or image-text-to-text), otherwise the one
AutoModelForCausalLM, then AutoModelForImageTextToText, picks for the config. The lock records
its name (`model.architecture`) and `planc run` loads that class with the same config object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planc.errors import ModelError
from planc.model.config import make_config, shipped_class

if TYPE_CHECKING:
    from planc.model.quant import Quantization


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def generative_class_names() -> frozenset[str]:
    """Classes transformers maps as causal LMs, image-text-to-text or text-to-text (seq2seq) models."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    return (
        frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        | frozenset(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
        | frozenset(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values())
    )


def model_class(config, config_dict: dict[str, Any]):
    """The generative class for `config`: `architectures[0]` when shipped, else the auto classes' pick."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM

    architectures = config_dict.get("architectures") or []
    named = architectures[0] if architectures else None
    if named in generative_class_names():
        cls = shipped_class(named)
        if cls is not None:
            return cls
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
        except (ImportError, AttributeError, RuntimeError) as exc:
            raise _build_error(config_dict, auto.__name__, exc) from None
    named_text = f" (architectures names {named}, which is not one)" if named else ""
    raise ModelError(
        f"transformers has no causal-LM or image-text-to-text class (nor a seq2seq one) for model_type {config_dict.get('model_type')!r}"
        f"{named_text}: planc plans generative models only"
    )


def resolve(config_dict: dict[str, Any], trust_remote_code: bool = False):
    """(transformers config, model class) for a config.json dict.

    A text-only class of a multimodal config (Gemma3ForCausalLM for a gemma3 config) is built from
    the text config, as the auto classes do.
    """
    config = make_config(config_dict, trust_remote_code)
    cls = model_class(config, config_dict)
    expected = getattr(cls, "config_class", None)
    if expected is not None and not isinstance(config, expected):
        subs = [getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {}]
        config = next((sub for sub in subs if isinstance(sub, expected)), config)
    return config, cls


def _build_error(config_dict: dict[str, Any], name: str, exc: BaseException) -> ModelError:
    from importlib import metadata

    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    if isinstance(exc, ImportError):
        return ModelError(f"{name} needs a package that is not installed: {first}")
    version = metadata.version("transformers")
    return ModelError(
        f"cannot build {name} (model_type {str(config_dict.get('model_type'))[:60]}) from its config: "
        f"{type(exc).__name__}: {first[:300]} (transformers {version})"
    )


def meta_model(
    config_dict: dict[str, Any],
    dtype: str,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    quantization: "Quantization | None" = None,
    offloaded: tuple[str, ...] = (),
):
    """The generative model for `config_dict` on the meta device at `dtype`: structure and sizes, no weights.

    With `quantization`, the model is then swapped into the layout transformers holds for it (see
    planc.model.quant; nothing when it is dequantized), as `from_pretrained` swaps it before loading:
    building from the config alone ignores a config's quantization_config and builds it dense.
    `offloaded`: the device_map entries on cpu/disk (bitsandbytes leaves those dense).
    """
    from accelerate import init_empty_weights
    from transformers.modeling_utils import local_torch_dtype

    if quantization is None and config_dict.get("quantization_config"):
        # _from_config would silently build it dense: a quantized checkpoint is never sized that way.
        raise ModelError("a quantized checkpoint needs its Quantization to be built (planc.model.quant)")
    config, cls = resolve(config_dict, trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        with init_empty_weights(include_buffers=True), local_torch_dtype(torch_dtype(dtype)):
            model = cls._from_config(config, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers' constructors fail in many ways on odd configs
        raise _build_error(config_dict, cls.__name__, exc) from None
    keep_in_fp32(model, dtype)
    if quantization is not None:
        from planc.model.quant import prepare

        with init_empty_weights(include_buffers=True), local_torch_dtype(torch_dtype(dtype)):
            prepare(model, quantization, dtype, offloaded)
    return model


def keep_in_fp32(model, dtype: str) -> int:
    """Upcast what `from_pretrained` loads in fp32 whatever the requested half dtype: the tensors its
    `_keep_in_fp32_modules_strict` names (Inkling's short convolutions, MoE routers' correction
    biases), matched as transformers matches checkpoint keys (modeling_utils.py `_get_dtype_plan`,
    core_model_loading.py). `_from_config` builds them in the requested dtype. Returns how many."""
    import torch
    from transformers.core_model_loading import build_glob_alternation

    names = sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not names or dtype not in ("bfloat16", "float16"):
        return 0
    pattern, _, _ = build_glob_alternation(names)
    upcast = 0
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and parameter.is_floating_point() and parameter.dtype != torch.float32 and pattern.search(prefix + name):
                module._parameters[name] = torch.nn.Parameter(parameter.to(torch.float32), parameter.requires_grad)
                upcast += 1
        for name, buffer in list(module._buffers.items()):
            persistent = name not in module._non_persistent_buffers_set  # only checkpoint tensors are loaded
            if buffer is not None and persistent and buffer.is_floating_point() and buffer.dtype != torch.float32 and pattern.search(prefix + name):
                module._buffers[name] = buffer.to(torch.float32)
                upcast += 1
    return upcast

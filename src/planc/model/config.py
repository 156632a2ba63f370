"""A config.json as transformers reads it, and the numbers of it the memory model needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planc.errors import ModelError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = DTYPE_BYTES["float32"]  # what recurrent states, scores and upcasts are held in


@dataclass(frozen=True)
class Shapes:
    """The config numbers the memory model needs (of the text decoder)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # query/key head dim
    v_head_dim: int
    intermediate_size: int
    vocab_size: int
    num_layers: int
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    mla_latent_dim: int = 0  # kv_lora_rank + qk_rope_head_dim when the cache holds MLA latents
    mla_key_dim: int = 0  # kv_lora_rank: the part of the latent cached as "keys" (the rotary key is the "values")


def checkpoint_dtype(config: dict[str, Any]) -> str | None:
    """The dtype the checkpoint was saved in, normalised, or None when the config does not say."""
    value = config.get("dtype") or config.get("torch_dtype")
    if isinstance(value, str):
        value = value.removeprefix("torch.")
        return value if value in DTYPE_BYTES else None
    return None


def decode_special_floats(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The config with transformers' tagged floats (`{"__float__": "Infinity"}`) turned back into floats.

    JSON has no Infinity or NaN, so transformers 5 writes them as tagged objects (Mamba2-family
    configs carry `time_step_limit: [0.0, Infinity]`) and decodes them when it reads a config.json
    (`PreTrainedConfig._dict_from_json_file`); a dict handed to `AutoConfig.for_model` skips that
    step, so planc takes it here with transformers' own decoder. Older writers emitted a bare
    `Infinity`, which Python's json reads as a float already.
    """
    from transformers import PretrainedConfig

    return PretrainedConfig._decode_special_floats(config_dict)


def describe_model(config: dict[str, Any]) -> str:
    """'Qwen3ForCausalLM (model_type qwen3)' from a config dict, for messages."""
    architectures = config.get("architectures")
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    model_type = str(config.get("model_type"))[:60]
    return f"{str(name)[:80]} (model_type {model_type})" if name else f"model_type {model_type}"


def shipped_class(name: str | None):
    """The transformers model class called `name`, when transformers ships one (no remote code)."""
    import transformers

    if not name or not name.isidentifier():
        return None
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        return None
    return cls if isinstance(cls, type) and hasattr(cls, "config_class") and hasattr(cls, "_from_config") else None


def known_model_type(model_type: str) -> bool:
    """transformers has a config class registered for `model_type`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def make_config(config_dict: dict[str, Any], trust_remote_code: bool = False):
    """A transformers config object from a config.json dict (no files, no network).

    A `model_type` transformers does not know is read with the config class of the class named in
    `architectures` when transformers ships it (Kimi-K2: `kimi_k2` with an `auto_map` to remote
    code, `architectures: [DeepseekV3ForCausalLM]`), as vLLM resolves models; the checkpoint's own
    code is never run.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_dict["model_type"]
    if not isinstance(model_type, str):
        raise ModelError(f"config.json's model_type must be a string, not {type(model_type).__name__}")
    data = {k: v for k, v in decode_special_floats(config_dict).items() if k not in ("transformers_version",)}
    if model_type not in CONFIG_MAPPING:
        architectures = config_dict.get("architectures")
        first = architectures[0] if isinstance(architectures, list) and architectures else None
        cls = shipped_class(first if isinstance(first, str) else None)
        if cls is None:
            raise ModelError(_unknown_model_type(config_dict, trust_remote_code))
        data.pop("model_type")
        data.pop("auto_map", None)
        try:
            return cls.config_class(**data)
        except Exception as exc:  # noqa: BLE001 - as below
            message = " ".join(str(exc).split())[:400]
            raise ModelError(f"config.json does not load as {cls.config_class.__name__}: {type(exc).__name__}: {message}") from None
    try:
        return AutoConfig.for_model(**data)
    except Exception as exc:  # noqa: BLE001 - transformers' config validation raises many types
        # StrictDataclassError among them: transformers' own field and class validators
        # (huggingface_hub's @strict), e.g. num_hidden_layers: -3.
        message = " ".join(str(exc).split())[:400]
        raise ModelError(f"config.json does not load in transformers ({model_type}): {type(exc).__name__}: {message}") from None


def _unknown_model_type(config_dict: dict[str, Any], trust_remote_code: bool) -> str:
    """Why a model_type cannot be read, and advice that is true for this planc."""
    import transformers

    model_type = config_dict["model_type"]
    architectures = config_dict.get("architectures") or []
    head = f"model_type {model_type[:60]!r} is unknown to the installed transformers {transformers.__version__}"
    named = f" and architectures {str(architectures)[:120]} names no class transformers ships" if architectures else ""
    remote = " (its auto_map points to code shipped with the checkpoint)" if config_dict.get("auto_map") else ""
    advice = (
        ": planc does not run remote code; a newer transformers may know it, or set config.json's "
        "architectures to the transformers class it is built on"
    )
    if trust_remote_code:
        advice += " (model.trust_remote_code does not change that: planc does not plan remote-code models)"
    return head + named + remote + advice


def text_config(config):
    """The decoder's config: the config itself for text models, `text_config` for multimodal ones."""
    if not hasattr(config, "get_text_config"):
        return config
    try:
        return config.get_text_config(decoder=True)
    except ValueError:
        # Several text configs (MusicGen's text encoder and decoder): the decoder's.
        return getattr(config, "decoder", None) or config


def layer_configs(config) -> list:
    """Per decoder layer, the text config as that layer sees it (per_layer_config where the config varies
    head_dim, heads or experts by layer, as Gemma 4 and dots3 do)."""
    text = text_config(config)
    count = config_value(text, "num_hidden_layers", "n_layer", "num_layers") or 0
    if getattr(text, "is_heterogeneous", False):
        return [text.per_layer_config[i] for i in range(count)]
    return [text] * count


def config_value(config, *names, default=0):
    """The first of `names` the config sets (not None)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def shapes_of(config) -> Shapes:
    """The memory model's numbers from a transformers config (a per-layer view for heterogeneous ones)."""
    text = text_config(config)
    if getattr(text, "is_heterogeneous", False):
        text = text.per_layer_config[0]
    return _shapes(text)


def layer_shapes(config) -> list[Shapes]:
    """Shapes per decoder layer; one object repeated when the config does not vary by layer.

    A config varies them through per_layer_config (Gemma 4, dots3) or lists with one entry per
    layer (Gemma 3n's intermediate_size).
    """
    configs = layer_configs(config)
    if not configs:
        return []
    if all(c is configs[0] for c in configs):
        listed = any(isinstance(v, (list, tuple)) and len(v) == len(configs) and len(set(map(str, v))) > 1
                     for k, v in vars(configs[0]).items() if k in _SHAPE_FIELDS)
        if not listed:
            return [_shapes(configs[0])] * len(configs)
    return [_shapes(c, index) for index, c in enumerate(configs)]


_SHAPE_FIELDS = {"intermediate_size", "moe_intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_experts", "num_local_experts", "n_routed_experts"}


def _shapes(text, index: int | None = None) -> Shapes:
    def get(*names, default=0):
        value = config_value(text, *names, default=default)
        if isinstance(value, (list, tuple)):
            # One entry per layer: this layer's; otherwise (per-modality lists) the largest.
            numbers = [v for v in value if isinstance(v, (int, float))]
            if index is not None and len(value) > index and isinstance(value[index], (int, float)):
                return value[index]
            return max(numbers, default=0)
        return value

    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head", "num_heads")
    kv_heads = get("num_key_value_heads", default=heads)
    mla_rank = get("kv_lora_rank")
    if mla_rank:
        head_dim = get("qk_nope_head_dim") + get("qk_rope_head_dim")
        v_head_dim = get("v_head_dim", default=head_dim)
        mla_latent = mla_rank + get("qk_rope_head_dim")
    else:
        # Pure state-space models (Mamba, Mamba2) have no attention heads at all.
        head_dim = get("head_dim", "d_kv", default=hidden // heads if heads else 0)  # d_kv: T5's
        v_head_dim = head_dim
        mla_latent = 0
    intermediate = get("intermediate_size", "n_inner", "ffn_dim", "d_ff", default=4 * hidden)
    num_experts = get("num_experts", "num_local_experts", "n_routed_experts")
    moe_intermediate = get("moe_intermediate_size", default=intermediate if num_experts else 0)
    shared = get("shared_expert_intermediate_size")
    if not shared and get("n_shared_experts"):
        shared = get("n_shared_experts") * moe_intermediate
    return Shapes(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        intermediate_size=intermediate,
        vocab_size=get("vocab_size"),
        num_layers=get("num_hidden_layers", "n_layer", "num_layers"),
        num_experts=num_experts,
        experts_per_token=get("num_experts_per_tok", "num_experts_per_token", "top_k") if num_experts else 0,
        moe_intermediate_size=moe_intermediate,
        shared_intermediate_size=shared,
        mla_latent_dim=mla_latent,
        mla_key_dim=mla_rank,
    )

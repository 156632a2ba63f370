"""A config.json as transformers reads it, and the numbers of it the memory model needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planc.errors import ModelError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


def make_config(config_dict: dict[str, Any], trust_remote_code: bool = False):
    """A transformers config object from a config.json dict (no files, no network)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    quant = config_dict.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise ModelError(
            f"quantized checkpoint ({method}): planc does not size {method} weights yet and will not plan them as "
            "if they were dense; plan a dense (bf16/fp16) release of this model instead"
        )
    model_type = config_dict["model_type"]
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelError(_unknown_model_type(config_dict, trust_remote_code))
    data = {k: v for k, v in decode_special_floats(config_dict).items() if k not in ("transformers_version",)}
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as exc:
        # StrictDataclassError: transformers' own field and class validators (huggingface_hub's
        # @strict), e.g. num_hidden_layers: -3.
        message = " ".join(str(exc).split())
        raise ModelError(f"config.json does not load in transformers ({model_type}): {message}") from None


def _unknown_model_type(config_dict: dict[str, Any], trust_remote_code: bool) -> str:
    """Why a model_type cannot be built, and the advice that is true for this planc."""
    import transformers

    model_type = config_dict["model_type"]
    head = f"model_type {str(model_type)[:60]!r} is unknown to the installed transformers {transformers.__version__}"
    if trust_remote_code:
        return f"{head}, and planc does not plan remote-code models"
    architectures = config_dict.get("architectures")
    shipped = [
        name for name in (architectures if isinstance(architectures, list) else [])
        if isinstance(name, str) and name.isidentifier() and _ships(transformers, name)
    ]
    if shipped:
        return (
            f"{head}; config.architectures names {shipped[0]}, which it ships, but planc resolves a model by "
            "model_type only, not by architectures"
        )
    return f"{head}: a newer transformers may know it (planc does not plan remote-code models)"


def _ships(transformers, name: str) -> bool:
    try:
        return getattr(transformers, name, None) is not None
    except Exception:  # noqa: BLE001 - a lazy import that fails means: not usable here
        return False


def text_config(config):
    """The decoder's config: the config itself for text models, `text_config` for multimodal ones."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def shapes_of(config) -> Shapes:
    """The memory model's numbers from a transformers config."""
    text = text_config(config)
    get = lambda *names, default=0: next((getattr(text, n) for n in names if getattr(text, n, None) is not None), default)  # noqa: E731
    hidden = get("hidden_size")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads", default=heads)
    mla_rank = get("kv_lora_rank")
    if mla_rank:
        head_dim = get("qk_nope_head_dim") + get("qk_rope_head_dim")
        v_head_dim = get("v_head_dim", default=head_dim)
        mla_latent = mla_rank + get("qk_rope_head_dim")
    else:
        # Pure state-space models (Mamba, Mamba2) have no attention heads at all.
        head_dim = get("head_dim", default=hidden // heads if heads else 0)
        v_head_dim = head_dim
        mla_latent = 0
    intermediate = get("intermediate_size", "n_inner", default=4 * hidden)
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
        num_layers=get("num_hidden_layers"),
        num_experts=num_experts,
        experts_per_token=get("num_experts_per_tok", "num_experts_per_token", "top_k") if num_experts else 0,
        moe_intermediate_size=moe_intermediate,
        shared_intermediate_size=shared,
        mla_latent_dim=mla_latent,
    )

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


def make_config(config_dict: dict[str, Any], trust_remote_code: bool = False):
    """A transformers config object from a config.json dict (no files, no network)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_dict["model_type"]
    if model_type not in CONFIG_MAPPING:
        if not trust_remote_code:
            raise ModelError(
                f"model_type {model_type!r} is unknown to transformers; set model.trust_remote_code: true if the "
                "checkpoint ships its own code"
            )
        raise ModelError(f"model_type {model_type!r}: remote-code models are not supported by planc yet")
    data = {k: v for k, v in decode_special_floats(config_dict).items() if k not in ("transformers_version",)}
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"config.json does not load in transformers: {exc}") from None


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
        mla_key_dim=mla_rank,
    )

"""Tiny configs of the hybrid families transformers 5.23 ships: linear attention, state-space,
short-conv and indexed-attention layers, each with the layer pattern of its real models.

Each is the class default config (`AutoConfig.for_model`) with its dimensions shrunk, so tests
build real models of every family in milliseconds; one attention layer among the state layers
wherever the family has them (a cache with no attention layer cannot report its length).
"""

from __future__ import annotations

SMALL = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    vocab_size=128, moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, num_experts_per_token=2, shared_expert_intermediate_size=32,
    max_position_embeddings=256, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
    v_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
    linear_value_head_dim=12, linear_num_heads=4, linear_head_dim=8, mamba_n_heads=8, mamba_d_head=16,
    mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=16, mamba_d_conv=4, mamba_num_heads=8,
    mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=16, state_size=8, num_heads=8,
    time_step_rank=8, mamba_dt_rank=8, index_head_dim=16, index_n_heads=2, index_topk=8,
    pad_token_id=None, bos_token_id=None, eos_token_id=None,
)
LINEAR = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
MOE_AFTER_DENSE = dict(first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4)

# model_type -> overrides on top of SMALL: the layer pattern and what the family's validators need.
FAMILIES = {
    "qwen3_next": dict(layer_types=LINEAR),
    "qwen3_5_text": dict(layer_types=LINEAR),
    "qwen3_5_moe_text": dict(layer_types=LINEAR),
    "olmo_hybrid": dict(layer_types=LINEAR),
    "kimi_linear": dict(layer_types=LINEAR, num_key_value_heads=4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    "bailing_hybrid": dict(
        layer_types=LINEAR, num_key_value_heads=4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        layer_group_size=2, num_expert_group=1, topk_group=1, num_nextn_predict_layers=0,
    ),
    "bamba": dict(attn_layer_indices=[1]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "mamba"]),
    "nemotron_h": dict(layers_block_type=["mamba", "attention", "mlp", "moe"], expand=2),
    "falcon_h1": dict(mamba_d_ssm=None),
    "mamba2": dict(expand=2, head_dim=16),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "mamba": dict(),
    "falcon_mamba": dict(),
    "lfm2": dict(layer_types=["conv", "full_attention", "conv", "conv"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "conv"]),
    "lfm3": dict(layer_types=["conv", "full_attention", "sliding_attention", "conv"], sliding_window=16),
    "minimax": dict(layer_types=LINEAR, block_size=16),
    "deepseek_v32": MOE_AFTER_DENSE,
    "glm_moe_dsa": MOE_AFTER_DENSE,
    "axk2": MOE_AFTER_DENSE,
    "hy_v4": dict(),
}


def tiny_config(model_type: str, layers: int = 4) -> dict:
    """The shrunk config.json of one family, as a dict (what save_pretrained would write)."""
    from transformers import AutoConfig, PretrainedConfig

    config = AutoConfig.for_model(model_type).to_dict()
    for key, value in SMALL.items():
        if key in config:
            config[key] = value
    for key in ("layer_types", "layers_block_type", "mlp_layer_types", "block_types"):
        if isinstance(config.get(key), list):
            config[key] = (config[key] * layers)[:layers]
    config["num_hidden_layers"] = layers
    config.update(FAMILIES[model_type])
    config.pop("transformers_version", None)
    # As save_pretrained writes it: Mamba2-family `time_step_limit: [0.0, Infinity]` as tagged floats.
    return PretrainedConfig._encode_special_floats(config)

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
ZAMBA = ["linear_attention", "hybrid", "linear_attention", "linear_attention", "hybrid", "linear_attention"]
HYBRID = ["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"]
# Inkling's sliding layers have heads of their own; relative-position logits over a short extent.
INKLING = dict(sliding_window_size=16, swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_head_dim=8, d_rel=4,
               rel_extent=32)
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
    # Rates that divide 39 = prompt + decode steps in the tests: the compressors' buffers then hold
    # their peak, a full window's storage, as the ledger plans it.
    "deepseek_v4": dict(sliding_window=16, compress_rates={"heavily_compressed_attention": 13,
                                                           "compressed_sparse_attention": 3}),
    # Zamba's hybrid layers share one attention block (tied weights), so two of them.
    "zamba": dict(layers_block_type=ZAMBA, attention_hidden_size=128, attention_head_dim=32, n_mamba_heads=2,
                  num_key_value_heads=4),
    "zamba2": dict(layers_block_type=ZAMBA, attention_hidden_size=128, attention_head_dim=32, n_mamba_heads=2,
                   mamba_headdim=64, hybrid_layer_ids=[1, 4], mamba_ngroups=1, num_query_groups=4,
                   num_key_value_heads=4),
    # ZAYA's CCA: a depthwise and a grouped kernel of different widths (a window of 1 + 2 tokens).
    "zaya": dict(layer_types=HYBRID, sliding_window=16, router_hidden_size=16, cca_time1=3, num_experts_per_tok=1),
    "inkling_text": dict(layer_types=HYBRID, mlp_layer_types=["dense", "sparse", "sparse", "sparse"], **INKLING),
    "inkling2_text": dict(layer_types=HYBRID, n_layers_per_attn_res_block=2, **INKLING),
    # Image-text-to-text models: the text model shrunk as above, the vision tower to one block.
    "glm5_next": dict(
        text_config=dict(layer_types=["linear_attention", "indexed_attention", "linear_attention", "linear_attention"],
                         mlp_layer_types=["dense", "sparse", "sparse", "sparse"], qk_rope_head_dim=0, index_kpool=4,
                         num_key_value_heads=4),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                           projection_intermediate_size=64),
    ),
    "unlimited_ocr": dict(
        # A window shorter than the prompts: prefill tokens stay, generated ones slide.
        text_config=dict(layer_types=["reference_sliding_attention"] * 4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                         sliding_window=4),
        vision_config=dict(
            sam_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
                            global_attn_indexes=[0]),
            encoder_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        ),
    ),
}
LAYERS = {"zamba": 6, "zamba2": 6}
# Zamba2 with two shared blocks used in turn (hybrid layers 1 and 5 share one, 3 and 7 the other)
# and each hybrid layer's own LoRA adapters inside the shared blocks.
ZAMBA2_TWO_BLOCKS = dict(
    layers_block_type=["linear_attention", "hybrid"] * 4, num_hidden_layers=8, hybrid_layer_ids=[1, 3, 5, 7],
    num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=8,
)

# Families whose state transformers keeps outside DynamicCache layers (tests/test_recurrent.py):
# RecurrentGemma's module-held RG-LRU states (two recurrent blocks, then local attention), RWKV's
# `state` list, xLSTM's xLSTMCache.
RECURRENT = {
    "recurrent_gemma": dict(lru_width=96, attention_window_size=16),
    "rwkv": dict(attention_hidden_size=64, context_length=256),
    # xLSTMCache rounds qk_dim up to a multiple of 64 and the layers do not: 128 x 0.5 agrees.
    "xlstm": dict(hidden_size=128, embedding_dim=128, num_blocks=4, num_heads=4),
}


def tiny_config(model_type: str) -> dict:
    """The shrunk config.json of one family, as a dict (what save_pretrained would write)."""
    from transformers import AutoConfig, PretrainedConfig

    layers = LAYERS.get(model_type, 4)
    config = AutoConfig.for_model(model_type).to_dict()
    overrides = dict({**FAMILIES, **RECURRENT}[model_type])
    # A multimodal model's text model is shrunk like a text-only one.
    text = config.get("text_config") if "text_config" in overrides else config
    for key, value in SMALL.items():
        if key in text:
            text[key] = value
    for key in ("layer_types", "layers_block_type", "mlp_layer_types", "block_types"):
        if isinstance(text.get(key), list):
            text[key] = (text[key] * layers)[:layers]
    text["num_hidden_layers"] = layers
    for key in ("text_config", "vision_config"):
        if key in overrides:
            _merge(config[key], overrides.pop(key))
    config.update(overrides)
    config.pop("transformers_version", None)
    # As save_pretrained writes it: Mamba2-family `time_step_limit: [0.0, Infinity]` as tagged floats.
    return PretrainedConfig._encode_special_floats(config)


def _merge(into: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def tiny_model(config_dict: dict, dtype: str):
    """A random model of a tiny config, as `from_pretrained` holds it: the class planc plans
    (image-text-to-text where there is no causal LM), the tensors transformers keeps in fp32 in fp32."""
    import torch

    from planc.model.build import keep_in_fp32, resolve

    config, cls = resolve(config_dict)
    model = cls._from_config(config, dtype=getattr(torch, dtype))
    keep_in_fp32(model, dtype)
    return model.eval()


# Mixer families at their real sizes (the class default configs, which are released models'
# shapes), for holding the ledger's transient formulas to a fake-tensor execution of the module:
# model_type -> (config overrides, decoder layer of that kind).
AT_SCALE = {
    "qwen3_next": (dict(), 0),  # gated DeltaNet, Qwen3-Next-80B-A3B
    "qwen3_5_text": (dict(), 0),  # gated DeltaNet, z projected on its own
    "olmo_hybrid": (dict(), 0),  # gated DeltaNet, separate q/k/v projections, dk != dv
    "kimi_linear": (dict(), 0),  # Kimi delta attention, Kimi-Linear-48B-A3B
    "bamba": (dict(), 0),  # Mamba2, Bamba-9B
    "nemotron_h": (dict(layers_block_type=["mamba", "attention"], num_hidden_layers=2), 0),  # Mamba2, 8 groups
    "jamba": (dict(), 0),  # Mamba1, Jamba
    "lfm2": (dict(layer_types=["conv", "full_attention"], num_hidden_layers=2), 0),
    "minimax": (dict(layer_types=["linear_attention", "full_attention"], num_hidden_layers=2), 0),
    "zaya": (dict(), 0),  # CCA, ZAYA1-8B
    "inkling_text": (dict(), 0),  # residual short convolutions: the hidden-wide one
    "inkling2_text": (dict(layer_types=["hybrid_sliding", "hybrid"]), 1),  # the dynamic key convolution
}


def mixer_prefill_peak(model_type: str, tokens: int, batch: int, dtype: str = "bfloat16") -> tuple[int, object]:
    """(bytes the mixer of one layer allocates over a prefill of batch x tokens under fake tensors,
    the ledger's Mixer for that layer) at the family's real size."""
    import inspect

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

    from planc.model.cache import mixer_of
    from planc.simulate import forward_peak

    overrides, index = AT_SCALE[model_type]
    config = AutoConfig.for_model(model_type, **{"num_hidden_layers": 2, **overrides})
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    layer = model.model.layers[index] if hasattr(model, "model") else model.backbone.layers[index]
    layer_type = config.get_text_config().layer_types[index]
    mixer = mixer_of(model_type, layer_type, layer, index)
    module = type(mixer).module_of(layer, index)

    def inputs():
        # Inkling's residual convolutions run over their own channels (the keys' and values' for
        # some), Inkling2's dynamic ones with per-token taps projected from the hidden state.
        width = type(mixer).convolution_width(module) if hasattr(module, "conv_idx") else config.hidden_size
        hidden = torch.empty(batch, tokens, width, dtype=getattr(torch, dtype))
        if model_type == "minimax":
            from transformers.models.minimax.modeling_minimax import MiniMaxCache

            rotary = torch.empty(batch, tokens, module.head_dim, dtype=hidden.dtype)
            return (hidden,), {"past_key_values": MiniMaxCache(), "attention_mask": None,
                               "position_embeddings": (rotary, rotary)}
        cache = DynamicCache(config=model.config)
        arguments = inspect.signature(module.forward).parameters
        if "dynamic_input" in arguments:
            taps_input = torch.empty(batch, tokens, config.hidden_size, dtype=hidden.dtype)
            return (hidden, taps_input), {"past_key_values": cache, "conv_mask": None}
        keyword = "past_key_values" if "past_key_values" in arguments else "cache_params"
        # No padding: the mixer's mask argument (ZAYA's CCA calls it conv_mask) stays None.
        mask = "attention_mask" if "attention_mask" in arguments else "conv_mask"
        return (hidden,), {keyword: cache, mask: None}

    return forward_peak(module, inputs), mixer


def build_tiny_hybrid(folder, model_type: str, seed: int = 0, **overrides):
    """Save a tiny random model of one family (config `overrides` on top) with save_pretrained,
    beside the tests' tokenizer."""
    import torch

    from conftest import save_tiny_tokenizer

    tokenizer = save_tiny_tokenizer(folder)
    config = {**tiny_config(model_type), **overrides}
    tokens = dict(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.get("text_config", config).update(tokens)
    if "text_config" in config:
        config["text_config"].pop("tie_word_embeddings", None)
    torch.manual_seed(seed)
    tiny_model(config, "float32").save_pretrained(folder)
    return folder


def compile_for_a100s(folder, config: dict, gpus: int, seq: int, batch: int = 1, policy: str = ""):
    """Write `config` (a class default config, edited; special floats as save_pretrained writes
    them) and a spec for `gpus` A100-80GB, compile it into folder/plan.lock; return the plan."""
    import json

    from transformers import PretrainedConfig

    from planc.compile import compile_spec
    from planc.plan import write_if_changed

    config = {key: value for key, value in config.items() if key != "transformers_version"}
    (folder / "config.json").write_text(json.dumps(PretrainedConfig._encode_special_floats(config)))
    (folder / "spec.yaml").write_text(
        f"planc: 1\nmodel: {{config: config.json}}\nhardware: {{gpus: [{{type: a100-sxm4-80gb, count: {gpus}}}], "
        f"cpu_memory: 64GiB}}\nworkload: {{batch_size: {batch}, max_seq_len: {seq}}}\n"
        + (f"policy: {{{policy}}}\n" if policy else "")
    )
    plan, text = compile_spec(folder / "spec.yaml", folder / "plan.lock")
    write_if_changed(folder / "plan.lock", text)
    return plan


def simulate_lock(folder) -> tuple[object, dict]:
    """`planc simulate` of folder/plan.lock (prefill, one decode step), which must run: the report
    and, per GPU, (planned tensors - simulated peak) / simulated peak."""
    from planc.plan import load_lock
    from planc.simulate import simulate_plan

    report = simulate_plan(load_lock(folder / "plan.lock"), folder, decode_steps=1)
    assert report.ok, report.error
    return report, {device.index: round(device.ledger_error, 3) for device in report.devices}

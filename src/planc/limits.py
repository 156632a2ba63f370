"""Upper bounds on what a spec (and so a lock) may ask for, enforced by the schema and named in errors.

Generous on purpose: the largest real systems and models. They exist so that a typo such as
`count: 100000000` or `batch_size: 99999999999999999999` is refused at once instead of searched
for minutes or printed as absurd GiB.
"""

# One node: an NVL72 rack (GB200/GB300 NVL72) is the largest single NVLink domain sold, 72 GPUs.
MAX_GPUS = 72
# Nodes of one plan: the largest published single-model serving deployments span a few dozen
# nodes (DeepSeek's V3/R1 decode instances: 18 nodes of 8 H800); 64 leaves room.
MAX_NODES = 64
# Serving engines schedule a few hundred to a couple of thousand sequences per step (vLLM's
# max_num_seqs defaults to 256 or 1024); 4096 leaves room for offline batch jobs.
MAX_BATCH_SIZE = 4096
# The longest context a released model is configured for: Llama 4 Scout's 10M tokens
# (text_config.max_position_embeddings 10485760).
MAX_SEQ_LEN = 10_485_760
# Images in one prompt: multi-image chat models are configured for a few dozen at most (Llama 4's
# processor tiles up to 16 chunks per image; Qwen2.5-VL demos show 10-20 frames); 256 leaves room
# for video frames sent as images.
MAX_IMAGES_PER_SEQUENCE = 256
# Side of an image as the vision tower sees it: native-resolution towers (Qwen2.5-VL, Pixtral)
# accept up to a few thousand pixels (Pixtral 1024, Qwen2.5-VL's max_pixels about 3584 x 3584).
MAX_IMAGE_SIZE = 16384
# Counts in a config.json that transformers turns into that many modules before planc can look:
# the deepest released models have about 130 decoder layers (Llama 3.1 405B: 126); routed experts
# are mostly fused into one tensor (cheap at any count), but Doge's default config has 16384 tiny
# ones and builds in 5 s at 65536. Beyond these a config is a typo, and building it takes minutes.
MAX_CONFIG_LAYERS = 1024
MAX_CONFIG_EXPERTS = 65536
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_decoder_layers", "decoder_layers")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def config_scale_problem(config: dict, depth: int = 0) -> str | None:
    """The first layer or expert count of a config dict (or of its nested sub-configs) above the
    bounds, as 'key N is above ...', or None."""
    for keys, bound in ((_LAYER_KEYS, MAX_CONFIG_LAYERS), (_EXPERT_KEYS, MAX_CONFIG_EXPERTS)):
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > bound:
                return f"{key} {value} is above planc's upper bound of {bound}"
    if depth < 3:
        for value in config.values():
            if isinstance(value, dict):
                problem = config_scale_problem(value, depth + 1)
                if problem:
                    return problem
    return None

"""The model transformers builds for a config, on the meta device: the one place planc instantiates it.

The compiler cuts it into units, the simulation re-creates its tensors on virtual devices, and
`planc run` checks a lock against its structure; all three must see the same model, built with the
same class, dtype and implementation switches as `from_pretrained` will use.
"""

from __future__ import annotations

from typing import Any

from planc.errors import ModelError
from planc.model.config import make_config


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def meta_model(
    config_dict: dict[str, Any],
    dtype: str,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
):
    """The causal LM for `config_dict` on the meta device at `dtype`: structure and sizes, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = make_config(config_dict, trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        with init_empty_weights(include_buffers=True):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    except ValueError as exc:
        raise ModelError(f"transformers cannot build {config_dict.get('model_type')} as a causal LM: {exc}") from None

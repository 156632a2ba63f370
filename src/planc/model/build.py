"""The model transformers builds for a config, on the meta device: the one place planc instantiates it.

The compiler cuts it into units, the simulation re-creates its tensors on virtual devices, and
`planc run` checks a lock against its structure; all three must see the same model, built with the
same class, dtype and implementation switches as `from_pretrained` will use.
"""

from __future__ import annotations

from typing import Any

from planc.errors import ModelError, foreign_errors
from planc.model.config import describe_model, make_config


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
    # Whatever else transformers raises while building an architecture from a config it accepted
    # (ZeroDivisionError, AttributeError, ...) is a model planc cannot plan, not a crash.
    with foreign_errors(ModelError, f"cannot build {describe_model(config_dict)} from its config"):
        try:
            with init_empty_weights(include_buffers=True):
                return AutoModelForCausalLM.from_config(config, **kwargs)
        except ValueError as exc:
            # The auto-class refusal goes on to list every config class it knows: keep the first sentence.
            reason = " ".join(str(exc).split()).split(". Model type should be one of")[0][:300]
            raise ModelError(f"transformers cannot build {config_dict.get('model_type')} as a causal LM: {reason}") from None

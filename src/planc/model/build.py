"""The model transformers builds for a config, on the meta device: the one place planc instantiates it.

The compiler cuts it into units, the simulation re-creates its tensors on virtual devices, and
`planc run` checks a lock against its structure; all three must see the same model, built with the
same class, dtype and implementation switches as `from_pretrained` will use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planc.errors import ModelError
from planc.model.config import make_config

if TYPE_CHECKING:
    from planc.model.quant import Quantization


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def meta_model(
    config_dict: dict[str, Any],
    dtype: str,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    quantization: "Quantization | None" = None,
    offloaded: tuple[str, ...] = (),
):
    """The causal LM for `config_dict` on the meta device at `dtype`: structure and sizes, no weights.

    With `quantization`, the model is then swapped into the layout transformers holds for it (see
    planc.model.quant; nothing when it is dequantized), as `from_pretrained` swaps it before loading:
    `AutoModelForCausalLM.from_config` alone ignores a config's quantization_config and builds it
    dense. `offloaded`: the device_map entries on cpu/disk (bitsandbytes leaves those dense).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import local_torch_dtype

    if quantization is None and config_dict.get("quantization_config"):
        # from_config would silently build it dense: a quantized checkpoint is never sized that way.
        raise ModelError("a quantized checkpoint needs its Quantization to be built (planc.model.quant)")
    config = make_config(config_dict, trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        with init_empty_weights(include_buffers=True), local_torch_dtype(torch_dtype(dtype)):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
            if quantization is not None:
                from planc.model.quant import prepare

                prepare(model, quantization, dtype, offloaded)
            return model
    except ValueError as exc:
        raise ModelError(f"transformers cannot build {config_dict.get('model_type')} as a causal LM: {exc}") from None

"""What each decoder layer keeps between forward steps, per sequence: one entry per cache layer kind.

Mirrors transformers' `cache_utils.py`, where `DynamicCache(config=...)` builds one layer object
per `config.layer_types` entry. Each kind's byte formula lives in the module of its mixer
(`attention.py` for full / sliding / chunked attention); this module maps layer types to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from planc.errors import ModelError
from planc.workload import Workload


@dataclass(frozen=True)
class LayerCache:
    """One layer's cache, per sequence: a part that grows with tokens and a part that does not."""

    kind: str  # the transformers layer type (full_attention, sliding_attention, ...)
    bytes_per_token: int = 0
    window: int | None = None  # keeps at most this many tokens between steps
    state_bytes: int = 0  # fixed per sequence whatever the context (recurrent / convolution states)

    def tokens_held(self, workload: Workload) -> int:
        """Tokens of cache the layer holds at its peak.

        A sliding layer holds window - 1 + the step's tokens: transformers' DynamicSlidingWindowLayer
        keeps a *view* of the concatenated states, so the whole step stays alive until the next update.
        """
        if self.window is None:
            return workload.max_seq_len
        return min(workload.max_seq_len, self.window - 1 + workload.step_tokens)

    def bytes(self, workload: Workload) -> int:
        """Peak cache bytes of this layer for the whole batch."""
        return workload.batch_size * (self.tokens_held(workload) * self.bytes_per_token + self.state_bytes)


def layer_caches(config, shapes, dtype: str, per_layer=None) -> list[LayerCache]:
    """Per cache layer, the cache transformers builds for it (after its remap of legacy names).

    `per_layer` gives each layer's shapes where the config varies them (Gemma 4's full-attention
    layers have their own head_dim and KV heads); else `shapes` serves every layer.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    from planc.model import attention
    from planc.model.config import text_config

    layer_types, kwargs = get_layer_types_and_kwargs(text_config(config))
    caches = []
    for index, (layer_type, layer_kwargs) in enumerate(zip(layer_types, kwargs)):
        own = per_layer[index] if per_layer and index < len(per_layer) else shapes
        if layer_type in attention.LAYER_TYPES:
            caches.append(attention.layer_cache(layer_type, layer_kwargs, own, dtype))
        elif layer_type == "dummy":
            caches.append(LayerCache("dummy"))
        else:
            raise ModelError(f"layer type {layer_type!r} (linear/recurrent attention) is not sized by planc yet")
    return caches

"""Decode several sequences in one forward, each row computed exactly as if it were decoded alone.

A batched decode step normally changes a sequence's arithmetic: the BLAS picks another kernel for
an M-row matrix product than for one row (on MKL an M=1 product is a GEMV, M>1 a GEMM with another
summation order), and left padding changes the length and alignment of every attention reduction.
The logits then differ in their last bits and greedy decoding can pick another token where two
logits nearly tie, so a request's output would depend on what else is in flight.

Here only the row-wise work is batched, and each piece keeps the single-sequence arithmetic:
- attention (the modules that consume the KV cache) runs once per row on that row's own unpadded
  `DynamicCache`, with the mask that decoding it alone would build (`RowCaches`, `RowMasks`);
- every `F.linear` over several rows goes through `RowExactLinear`, which uses a batched GEMV (one
  matrix-vector product per row, `torch.bmm` over an expanded weight) where that has been checked
  to equal the one-row product bit for bit on this device, dtype and shape, and an explicit loop of
  one-row products otherwise;
- embeddings, norms, activations and residual additions are computed per row anyway.

`planc.serve.engine` proves the result on the loaded model at start-up (batched logits against
sequential ones) and decodes one sequence per forward where it does not hold.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class RowCaches:
    """One cache per row of a batched decode step; handed to the model as its `past_key_values`."""

    def __init__(self, caches: list):
        self.caches = caches

    def __len__(self) -> int:
        return len(self.caches)


class RowMasks:
    """Per row, the attention mask that decoding the row alone would pass (often None for SDPA)."""

    def __init__(self, masks: list):
        self.masks = masks


def row_masks(model, caches: list, positions: list[int], device) -> dict[str, RowMasks] | None:
    """The model's mask mapping for one decode step of each row, built as `generate` builds it for a
    single unpadded sequence (transformers' `create_masks_for_generate`); None if the model's masks
    are not keyed by layer type (then rows cannot be split and the caller decodes sequentially)."""
    from transformers.masking_utils import create_masks_for_generate

    mappings = []
    for cache, position in zip(caches, positions):
        mapping = create_masks_for_generate(
            config=model.config,
            inputs_embeds=torch.empty((1, 1, 0), dtype=model.dtype, device=device),
            attention_mask=None,
            past_key_values=cache,
            position_ids=torch.tensor([[position]], device=device),
        )
        if not isinstance(mapping, dict):
            return None
        mappings.append(mapping)
    return {layer_type: RowMasks([m[layer_type] for m in mappings]) for layer_type in mappings[0]}


def cache_consumers(model) -> list[torch.nn.Module]:
    """The innermost modules whose forward takes `past_key_values`: the attention blocks."""
    takes_cache = {
        name: module for name, module in model.named_modules() if "past_key_values" in _parameters(module.forward)
    }
    return [module for name, module in takes_cache.items() if not any(_inside(other, name) for other in takes_cache)]


def _inside(name: str, parent: str) -> bool:
    """Whether module `name` is a strict descendant of module `parent` ("" is the root)."""
    return name != parent and (not parent or name.startswith(parent + "."))


@functools.lru_cache(maxsize=None)
def _signature_of(function) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _parameters(forward) -> frozenset[str]:
    return _signature_of(getattr(forward, "__func__", forward))


def install_row_split(model) -> int:
    """Make each attention block split a `RowCaches` step into one call per row; returns how many
    blocks were wrapped. Idempotent; calls with any other cache pass straight through."""
    wrapped = 0
    for module in cache_consumers(model):
        if getattr(module, "_planc_row_split", False):
            continue
        module.forward = functools.partial(_row_split_forward, module.forward)
        module._planc_row_split = True
        wrapped += 1
    return wrapped


def _row_split_forward(original, *args, **kwargs):
    caches = kwargs.get("past_key_values")
    if not isinstance(caches, RowCaches):
        return original(*args, **kwargs)
    rows = len(caches)
    outputs = [
        original(*(_row(value, index, rows) for value in args), **{k: _row(v, index, rows) for k, v in kwargs.items()})
        for index in range(rows)
    ]
    return _joined(outputs)


def _row(value: Any, index: int, rows: int) -> Any:
    if isinstance(value, RowCaches):
        return value.caches[index]
    if isinstance(value, RowMasks):
        return value.masks[index]
    if isinstance(value, torch.Tensor):
        return value[index : index + 1] if value.dim() and value.shape[0] == rows else value
    if isinstance(value, tuple):
        return tuple(_row(item, index, rows) for item in value)
    if isinstance(value, list):
        return [_row(item, index, rows) for item in value]
    if isinstance(value, dict):
        return {key: _row(item, index, rows) for key, item in value.items()}
    return value


def _joined(outputs: list) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs, dim=0)
    if isinstance(first, tuple):
        return tuple(_joined([output[i] for output in outputs]) for i in range(len(first)))
    if first is None:
        return None
    raise TypeError(f"cannot join per-row attention outputs of type {type(first).__name__}")


class RowExactLinear(TorchFunctionMode):
    """`F.linear` over several rows with each row's result bit-identical to a one-row call.

    The batched GEMV is used for a (weight shape, dtype, device, bias, rows) only after it matched
    the explicit per-row loop once on real data: kernel choice depends on shapes and threads, not
    values, so one bitwise match means the same summation order. Until then, or where it did not
    match, the per-row loop itself is the answer.
    """

    def __init__(self):
        super().__init__()
        self.verdicts: dict[tuple, bool] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        rows = x.numel() // x.shape[-1] if x.dim() > 1 and x.shape[-1] else 1
        if rows <= 1:
            return func(*args, **kwargs)
        key = (tuple(weight.shape), weight.dtype, str(weight.device), bias is not None, rows, x.dtype)
        verdict = self.verdicts.get(key)
        if verdict:
            return _batched_gemv(x, weight, bias, rows)
        exact = _row_by_row(x, weight, bias, rows)
        if verdict is None:
            self.verdicts[key] = torch.equal(_batched_gemv(x, weight, bias, rows), exact)
        return exact


def _batched_gemv(x: torch.Tensor, weight: torch.Tensor, bias, rows: int) -> torch.Tensor:
    width = x.shape[-1]
    expanded = weight.t().unsqueeze(0).expand(rows, width, weight.shape[0])  # a view: no copy of the weight
    out = torch.bmm(x.reshape(rows, 1, width), expanded)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _row_by_row(x: torch.Tensor, weight: torch.Tensor, bias, rows: int) -> torch.Tensor:
    # Each row shaped as a lone sequence's decode input is: [1, ..., 1, in_features].
    flat = x.reshape(rows, x.shape[-1])
    single = (1,) * (x.dim() - 1) + (x.shape[-1],)
    out = torch.cat([F.linear(flat[i].reshape(single), weight, bias).reshape(1, -1) for i in range(rows)])
    return out.reshape(*x.shape[:-1], weight.shape[0])

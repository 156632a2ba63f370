"""Decode several sequences in one forward, each row computed exactly as if it were decoded alone.

A batched decode step normally changes a sequence's arithmetic: the BLAS picks another kernel for
an M-row matrix product than for one row (on MKL an M=1 product is a GEMV, M>1 a GEMM with another
summation order), and left padding changes the length and alignment of every attention reduction.
The logits then differ in their last bits and greedy decoding can pick another token where two
logits nearly tie, so a request's output would depend on what else is in flight.

Here the batch keeps each sequence's own arithmetic:
- every row keeps its own unpadded `DynamicCache`. The model's `past_key_values` is a `RowCaches`:
  its `update` appends each row's new key and value to that row's cache and hands the attention
  function every row's full keys and values (`RowKeys`), and the attention functions transformers
  dispatches to (sdpa, flash, flex) run once per row, with the mask that decoding the row alone
  would build ("kernel" split). Where a model's attention cannot take that (its own eager function,
  tensor work between the cache update and the kernel), the whole attention block runs once per
  row instead ("module" split);
- every `F.linear` over several rows goes through `RowExactLinear`, which uses a batched GEMV (one
  matrix-vector product per row, `torch.bmm` over an expanded weight) where that has been checked
  to equal the one-row product bit for bit on this device, dtype and shape, and an explicit loop of
  one-row products otherwise; `Conv1D`'s `torch.addmm` (GPT-2 and kin) the same way; MoE experts'
  grouped products (`torch._grouped_mm`) likewise per group;
- embeddings, norms, rotary embeddings, activations and residual additions are per row anyway.

`planc.serve.engine` proves the result on the loaded model at start-up (batched logits against
sequential ones, kernel split first, then module split) and decodes one sequence per forward where
neither holds.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class RowCaches:
    """A batched decode step's `past_key_values`: one cache per row, and per row the attention mask
    (or mapping of masks by layer type) that decoding the row alone would pass, often None."""

    def __init__(self, caches: list, masks: list):
        self.caches = caches
        self.masks = masks

    def __len__(self) -> int:
        return len(self.caches)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Each row's slice into its own cache; each row's whole keys and values back, unpadded."""
        keys, values = [], []
        for index, cache in enumerate(self.caches):
            key, value = cache.update(key_states[index : index + 1], value_states[index : index + 1], layer_idx,
                                      *args, **kwargs)
            keys.append(key)
            values.append(value)
        return RowKeys(keys, self.masks), RowKeys(values, self.masks)


class RowKeys:
    """Per-row keys (or values) of different lengths, on their way from `RowCaches.update` to the
    attention function; any other use fails, and start-up falls back to the module split."""

    def __init__(self, rows: list[torch.Tensor], masks: list):
        self.rows = rows
        self.masks = masks


def row_masks(model, caches: list, positions: list[int], device) -> list:
    """Each row's masks for one decode step, built as `generate` builds them for a single unpadded
    sequence (transformers' `create_masks_for_generate`, which mirrors the modeling files)."""
    from transformers.masking_utils import create_masks_for_generate

    return [
        create_masks_for_generate(
            config=model.config,
            inputs_embeds=torch.empty((1, 1, 0), dtype=model.dtype, device=device),
            attention_mask=None,
            past_key_values=cache,
            position_ids=torch.tensor([[position]], device=device),
        )
        for cache, position in zip(caches, positions)
    ]


def placeholder_mask(masks: list, rows: int, device):
    """What the model is handed as its batch's attention mask: a 4D tensor (or a mapping of them),
    which transformers' mask creation passes through untouched. The attention blocks ignore it and
    use each row's own mask from `RowCaches`."""
    placeholder = torch.ones((rows, 1, 1, 1), dtype=torch.bool, device=device)
    first = masks[0]
    return {key: placeholder for key in first} if isinstance(first, dict) else placeholder


def _mask_for(module, mask):
    """The row's mask for this attention block: by its layer type when masks are keyed by type."""
    if not isinstance(mask, dict):
        return mask
    layer_types = getattr(getattr(module, "config", None), "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if layer_types is not None and index is not None and index < len(layer_types):
        return mask[layer_types[index]]
    if len(mask) == 1:
        return next(iter(mask.values()))
    raise RuntimeError(f"cannot tell which of the masks {sorted(mask)} {type(module).__name__} uses")


def cache_consumers(model) -> list[torch.nn.Module]:
    """The innermost modules whose forward takes `past_key_values`: the attention blocks."""
    takes_cache = {
        name: module
        for name, module in model.named_modules()
        if getattr(module, "_planc_row_split", False) or "past_key_values" in _parameters(module.forward)
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


def install_kernel_split() -> None:
    """Make transformers' registered attention functions run once per row when handed `RowKeys`.
    Process-wide and idempotent; any other call passes straight through."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in list(ALL_ATTENTION_FUNCTIONS):
        function = ALL_ATTENTION_FUNCTIONS[name]
        if not getattr(function, "_planc_row_split", False):
            ALL_ATTENTION_FUNCTIONS[name] = _per_row_attention(function)


def _per_row_attention(function):
    @functools.wraps(function)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if not isinstance(key, RowKeys):
            return function(module, query, key, value, attention_mask, *args, **kwargs)
        rows = len(key.rows)
        outputs = []
        for index in range(rows):
            mask = _on_device(_mask_for(module, key.masks[index]), query)
            outputs.append(function(module, query[index : index + 1], key.rows[index], value.rows[index], mask,
                                    *(_row(a, index, rows) for a in args),
                                    **{k: _row(v, index, rows) for k, v in kwargs.items()}))
        return _joined(outputs)

    attention._planc_row_split = True
    return attention


def _on_device(mask, like):
    # accelerate moves a batch's mask to each layer's device; a row's mask travels outside its reach.
    if isinstance(mask, torch.Tensor) and isinstance(like, torch.Tensor) and mask.device != like.device:
        return mask.to(like.device)
    return mask


def install_row_split(model) -> int:
    """The module split: each attention block takes a `RowCaches` step one row at a time (before its
    cache update is reached); returns how many blocks were wrapped. Idempotent; calls with any other
    cache pass straight through."""
    wrapped = 0
    for module in cache_consumers(model):
        if getattr(module, "_planc_row_split", False):
            continue
        # Under an accelerate hook (offloaded weights), split inside it: the weights are fetched
        # once per step, not once per row.
        name = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
        setattr(module, name, functools.partial(_row_split_forward, module, getattr(module, name)))
        module._planc_row_split = True
        wrapped += 1
    return wrapped


def _row_split_forward(module, original, *args, **kwargs):
    caches = kwargs.get("past_key_values")
    if not isinstance(caches, RowCaches):
        return original(*args, **kwargs)
    rows = len(caches)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    outputs = []
    for index in range(rows):
        row_kwargs = {name: _row(value, index, rows) for name, value in kwargs.items()}
        row_kwargs["past_key_values"] = caches.caches[index]
        row_kwargs["attention_mask"] = _on_device(_mask_for(module, caches.masks[index]), hidden)
        outputs.append(original(*(_row(value, index, rows) for value in args), **row_kwargs))
    return _joined(outputs)


def _row(value: Any, index: int, rows: int) -> Any:
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
        if any(output.shape[1:] != first.shape[1:] for output in outputs):
            # Eager attention also returns its weights, [1, heads, 1, each row's own length]: they
            # cannot form a batch, and a decode step never asks for them.
            return None
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
        if func is F.linear:
            return self._linear(func, args, kwargs)
        if func is torch.addmm:
            return self._addmm(func, args, kwargs)
        if func is _GROUPED_MM:
            return self._grouped_mm(func, args, kwargs)
        return func(*args, **kwargs)

    def _linear(self, func, args, kwargs):
        # The leading dimension is the batch of sequences (a step's [rows, 1, features], or the
        # tokens routed to one expert); each slice along it is what that sequence alone would pass.
        x = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        rows = x.shape[0] if x.dim() > 1 else 1
        if rows <= 1:
            return func(*args, **kwargs)
        alone = lambda: torch.cat([F.linear(x[i : i + 1], weight, bias) for i in range(rows)])  # noqa: E731
        if x.numel() // x.shape[-1] != rows:
            return alone()  # slices of several positions each: no GEMV shortcut
        key = (tuple(weight.shape), weight.dtype, str(weight.device), bias is not None, rows, x.dtype)
        return self._exact_rows(key, alone, lambda: _batched_gemv(x, weight, bias, rows))

    def _exact_rows(self, key: tuple, alone, batched) -> torch.Tensor:
        """`batched()` where it was checked equal to `alone()` (the rows one by one) for this key, else
        `alone()`, checking the batched form against it the first time the key is seen."""
        verdict = self.verdicts.get(key)
        if verdict:
            return batched()
        exact = alone()
        if verdict is None:
            self.verdicts[key] = torch.equal(batched(), exact)
        return exact

    def _addmm(self, func, args, kwargs):
        """transformers' `Conv1D` (GPT-2 and kin): `addmm(bias, x.view(-1, features), weight)`, one
        row per sequence in a decode step. Over several rows the BLAS may pick a GEMM whose
        summation order differs from the one-row call's (on this build's CPU BLAS from 4 rows on one
        machine, at 2 or 3 on CI's), so each row runs alone unless the batched GEMV was checked equal."""
        if len(args) != 3 or kwargs:  # beta / alpha / out: not Conv1D's call
            return func(*args, **kwargs)
        bias, x, weight = args
        rows = x.shape[0] if x.dim() == 2 else 1
        if rows <= 1 or bias.dim() > 1:
            return func(*args, **kwargs)
        key = ("addmm", tuple(weight.shape), weight.dtype, str(weight.device), rows, x.dtype, tuple(bias.shape))
        return self._exact_rows(key, lambda: torch.cat([func(bias, x[i : i + 1], weight) for i in range(rows)]),
                                lambda: _batched_gemv(x, weight.t(), bias, rows))

    def _grouped_mm(self, func, args, kwargs):
        """MoE experts (transformers' grouped_mm implementation): a row alone is one group of one
        row, so every group of several rows must equal its rows computed one by one."""
        x, weight = args[0], args[1]
        offs = args[2] if len(args) > 2 else kwargs.get("offs")
        if offs is None or x.dim() != 2 or weight.dim() != 3:
            return func(*args, **kwargs)
        ends = offs.tolist()
        bounds = list(zip([0, *ends[:-1]], ends))
        if all(end - start <= 1 for start, end in bounds):
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        rest = {name: value for name, value in kwargs.items() if name != "offs"}
        for group, (start, end) in enumerate(bounds):
            if end - start <= 1:
                continue
            key = ("grouped_mm", tuple(weight.shape[1:]), weight.dtype, str(weight.device), end - start, x.dtype)
            verdict = self.verdicts.get(key)
            if verdict:
                continue
            alone = offs.new_tensor([0] * group + [1] * (len(ends) - group))
            rows = torch.cat([func(x[r : r + 1], weight, *args[3:], offs=alone, **rest) for r in range(start, end)])
            if verdict is None:
                self.verdicts[key] = torch.equal(rows, out[start:end])
            out[start:end] = rows
        return out


_GROUPED_MM = getattr(torch, "_grouped_mm", None)


def _batched_gemv(x: torch.Tensor, weight: torch.Tensor, bias, rows: int) -> torch.Tensor:
    width = x.shape[-1]
    expanded = weight.t().unsqueeze(0).expand(rows, width, weight.shape[0])  # a view: no copy of the weight
    out = torch.bmm(x.reshape(rows, 1, width), expanded)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])

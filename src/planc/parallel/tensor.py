"""Tensor parallelism: which sizes the model's TP plan can run at, and the model as one rank holds it.

The model graph carries, per unit, the tensors the model's own TP plan (`base_model_tp_plan` /
`_tp_plan`, read on the meta model in planc.model.graph) splits and the collectives its forward
makes. A rank holds the replicated bytes whole and ceil(dim / N) of each split dimension; its
layers run with 1/N of the split heads and feed-forward width. The ledger's formulas then apply
unchanged to this rank view (planc.model.attention, planc.model.mlp, planc.memory).
"""

from __future__ import annotations

from dataclasses import replace

from planc.model import ModelGraph, Unit


def unit_rank_bytes(unit: Unit, ranks: int) -> int:
    """Bytes of `unit` on the rank holding the most of it: replicated tensors whole, split ones ceil(dim / N) rows."""
    sharded = sum(nbytes for _, nbytes in unit.tp_shards)
    per_rank = sum(nbytes // dim * -(-dim // ranks) for dim, nbytes in unit.tp_shards)
    return unit.weight_bytes - sharded + per_rank


def tp_refusal(graph: ModelGraph, ranks: int, engine: str = "transformers") -> str | None:
    """Why the model cannot run at tensor-parallel size `ranks` (None when it can).

    transformers splits heads without replicating KV heads and does not check divisibility at load
    (a reshape fails at the first forward), so planc refuses what does not divide; vLLM replicates
    KV heads when the group is larger than their number.
    """
    support = graph.parallel
    shapes = graph.shapes
    if support is None or not support.tp_plan:
        return f"{graph.architecture} has no tensor-parallel plan in transformers (no base_model_tp_plan or _tp_plan)"
    if support.tp_unsized_styles:
        return f"its TP plan uses styles planc does not size: {', '.join(support.tp_unsized_styles)}"
    heads, kv_heads = shapes.num_attention_heads, shapes.num_key_value_heads
    if (support.heads_sharded or engine == "vllm") and heads % ranks:
        return f"num_attention_heads {heads} is not divisible by {ranks}"
    if engine == "vllm":
        if kv_heads and kv_heads % ranks and ranks % kv_heads:
            return f"num_key_value_heads {kv_heads} and {ranks} ranks: neither divides the other (vLLM needs one to)"
    elif support.kv_heads_sharded and kv_heads % ranks:
        return (
            f"num_key_value_heads {kv_heads} is not divisible by {ranks} (transformers splits KV heads and does not "
            "replicate them)"
        )
    return None


def kv_fraction(graph: ModelGraph, ranks: int, engine: str = "transformers") -> tuple[int, int]:
    """(numerator, denominator) of one layer's KV cache a rank holds."""
    support = graph.parallel
    kv_heads = graph.shapes.num_key_value_heads
    if graph.shapes.mla_latent_dim or support is None:
        return 1, 1  # MLA caches one latent per token, replicated on every rank
    if engine == "vllm":
        return max(1, kv_heads // ranks), kv_heads  # a group larger than the KV heads replicates them
    return (1, ranks) if support.kv_heads_sharded else (1, 1)


def rank_graph(graph: ModelGraph, ranks: int, engine: str = "transformers") -> ModelGraph:
    """The model as one of `ranks` tensor-parallel ranks holds and runs it."""
    if ranks == 1:
        return graph
    support = graph.parallel
    shapes = graph.shapes
    numerator, denominator = kv_fraction(graph, ranks, engine)

    def shard_unit(unit: Unit) -> Unit:
        weight = unit_rank_bytes(unit, ranks)
        cache = unit.cache
        if cache is not None and (numerator, denominator) != (1, 1):
            cache = replace(cache, bytes_per_token=cache.bytes_per_token * numerator // denominator)
        experts = unit.expert_bytes
        if experts and sum(nbytes for _, nbytes in unit.tp_shards) >= experts:
            experts = -(-experts // ranks)
        return replace(unit, weight_bytes=weight, cache=cache, expert_bytes=min(experts, weight))

    split_heads = support.heads_sharded or engine == "vllm"
    heads = shapes.num_attention_heads // ranks if split_heads else shapes.num_attention_heads
    kv_heads = shapes.num_key_value_heads * numerator // denominator
    rank_shapes = replace(
        shapes,
        num_attention_heads=max(1, heads),
        num_key_value_heads=max(1, kv_heads),
        intermediate_size=-(-shapes.intermediate_size // ranks),
        moe_intermediate_size=-(-shapes.moe_intermediate_size // ranks),
        shared_intermediate_size=-(-shapes.shared_intermediate_size // ranks),
    )
    return replace(graph, units=tuple(shard_unit(unit) for unit in graph.units), shapes=rank_shapes)

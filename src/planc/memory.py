"""The memory ledger: what a device must hold to run its part of the plan, term by term.

Every term is a function of the placement units on the device, the workload and the attention
backend, so the solver can evaluate a candidate segment in O(1) from running sums.

Terms (per device):
- weights: parameters and buffers resident there.
- kv_cache: for each layer executing there, the cache its layer kind keeps at batch x
  max_seq_len (`planc.model.cache.LayerCache`: KV per token, capped for sliding windows, plus the
  fixed per-sequence state of linear-attention, state-space, short-conv and recurrent layers);
  where transformers keeps every layer's state on the input device (RWKV, xLSTM), the whole of
  it with the input embeddings; the image hidden states (and pixel values) generate keeps
  between steps for Idefics' cross-attention blocks, on the main device with the vision units;
  an encoder-decoder's cross-attention K/V of the source tokens per decoder layer, and its
  encoder output (kept for every step) with the encoder's last unit.
- activations: the largest transient of one layer's forward (hidden-state copies, then the
  larger of its sequence mixer's transient and its feed-forward's: q/k/v and the attention scores
  when the backend materialises them, an indexer's scores, a linear-attention or SSM mixer's on
  the path the plan assumes (`model/cache.py: MIXER_PATHS`), the MLP or routed-expert
  intermediates; a vision block's over all images of the batch, `planc.model.vision`; a gated
  cross-attention block's over the step and every image token, `planc.model.gated_cross`; an
  encoder-decoder's encoder block over the source tokens and a decoder layer's cross-attention,
  `planc.model.encoder_decoder`; what a module keeps beyond those formulas: an fp32 rotary, an
  activation's branches, the scores an attention of its own keeps, some while the next layer
  runs), plus one
  layer's KV (torch.cat in DynamicCache.update copies the part that grows with tokens each step;
  states are updated in place), plus the logits of the last position on the device holding
  lm_head (generate keeps only the last position and upcasts it to fp32; every position of the
  step where the forward takes no logits_to_keep), and on the main device their copy; the main
  device also peaks while it builds the attention masks, before any layer runs
  (`attention.mask_build_bytes`), and the embeddings' device runs a parameter-free fp32 norm
  placed before the layers (`planc.model.norm`).
- staging: weights of offloaded (cpu/disk) units are copied to their execution device one unit
  at a time (accelerate's AlignDevicesHook); the largest such unit.
- reserve: CUDA context + cuBLAS workspace + allocator slack on (kv + activations + staging).
"""

from __future__ import annotations

from dataclasses import dataclass

from planc.model import attention, encoder_decoder, indexed, mlp, norm, vision
from planc.model.cache import FALLBACK
from planc.model.config import DTYPE_BYTES, Shapes
from planc.model.graph import ModelGraph, Unit
from planc.workload import Workload

MiB = 2**20
GiB = 2**30

# CUDA context with lazy module loading (CUDA >= 11.7 default) plus torch's kernels: measured
# 0.4-0.6 GiB on A100/H100 with torch 2.x; not visible to torch.cuda.memory_allocated.
DEFAULT_CUDA_CONTEXT = 512 * MiB
# cuBLAS + cuBLASLt workspaces for one stream (torch's default ":4096:8" config is 32 MiB on Hopper).
DEFAULT_CUBLAS_WORKSPACE = 64 * MiB
# Caching-allocator fragmentation on the tensors that come and go (KV growth, activations).
DEFAULT_ALLOCATOR_SLACK = 0.10
# Python + torch + transformers resident in the process before any weight is loaded.
CPU_PROCESS_RESERVE = 1 * GiB
# NCCL communicator buffers of a rank in a distributed plan, outside torch's allocator: NCCL_BUFFSIZE
# (4 MiB) per channel and protocol, a few channels per peer on NVLink; 2 x 4 MiB x 32 channels.
NCCL_COMMUNICATOR = 256 * MiB

# Bandwidths for the decode-time estimate of offloaded and CPU-executed units (bytes/s).
PCIE_BANDWIDTH = 25 * 10**9  # PCIe Gen4 x16 host-to-device, effective
DISK_BANDWIDTH = 2 * 10**9  # NVMe sequential read
CPU_BANDWIDTH = 50 * 10**9  # dual-channel-class DRAM bandwidth seen by one process


@dataclass(frozen=True)
class Reserve:
    cuda_context: int = DEFAULT_CUDA_CONTEXT
    cublas_workspace: int = DEFAULT_CUBLAS_WORKSPACE
    allocator_slack: float = DEFAULT_ALLOCATOR_SLACK

    @classmethod
    def from_policy(cls, reserve) -> "Reserve":
        return cls(
            cuda_context=DEFAULT_CUDA_CONTEXT if reserve.cuda_context is None else reserve.cuda_context,
            cublas_workspace=DEFAULT_CUBLAS_WORKSPACE if reserve.cublas_workspace is None else reserve.cublas_workspace,
            allocator_slack=DEFAULT_ALLOCATOR_SLACK if reserve.allocator_slack is None else reserve.allocator_slack,
        )


def unit_kv_bytes(unit: Unit, workload: Workload) -> int:
    """Peak cache bytes of a layer unit (0 for units that keep no cache)."""
    return unit.cache.bytes(workload) if unit.cache is not None else 0


def unit_kv_copy_bytes(unit: Unit, workload: Workload) -> int:
    """Bytes the cache update of a layer copies (torch.cat of the part that grows with tokens)."""
    return unit.cache.token_bytes(workload) if unit.cache is not None else 0


def mixer_activation_bytes(
    shapes: Shapes, unit: Unit, workload: Workload, dtype: str, backend: str, mixer_path: str = FALLBACK
) -> int:
    """Peak transient bytes of a layer's sequence mixing over the largest step, by layer kind.

    Attention (with an indexer's scoring for indexed layers), a linear-attention / SSM / conv
    mixer on `mixer_path`, or both for hybrid layers, which run them one after the other and keep
    the first's output (one hidden-wide row per token) while the second runs.
    """
    cache = unit.cache
    attends = cache is None or cache.attention
    mixing = attention.transient_bytes(shapes, cache, workload, dtype, backend) if attends else 0
    if cache is not None and cache.merged_cross:
        # One attention over the context and the source at once (T5Gemma2).
        mixing = encoder_decoder.merged_attention_transient_bytes(shapes, cache, workload, dtype, backend)
    elif cache is not None and cache.bytes_per_source_token:
        # An encoder-decoder's layer cross-attends after its self-attention (they do not overlap).
        mixing = max(mixing, encoder_decoder.cross_attention_transient_bytes(shapes, cache, workload, dtype, backend))
    if cache is not None and cache.indexer_heads:
        mixing += indexed.indexer_transient_bytes(cache, shapes, workload, dtype)
    if cache is not None and cache.mixer is not None:
        recurrent = cache.mixer.transient_bytes(workload, dtype, mixer_path)
        if attends:
            held = workload.batch_size * workload.step_tokens * shapes.hidden_size * DTYPE_BYTES[dtype]
            return max(mixing, recurrent) + held
        return recurrent
    return mixing


def rotary_tables_bytes(shapes: Shapes, workload: Workload, dtype: str) -> int:
    """The step's rotary cos and sin tables (b x t x head_dim each, in the model dtype)."""
    return 2 * workload.batch_size * workload.step_tokens * shapes.head_dim * DTYPE_BYTES[dtype]


def layer_activation_bytes(
    shapes: Shapes,
    unit: Unit,
    workload: Workload,
    dtype: str,
    backend: str,
    model_type: str = "",
    mixer_path: str = FALLBACK,
) -> int:
    """Peak transient bytes of one layer's forward over the largest step (no KV cache, no mask).

    The residual stream and its copies, plus the larger of the mixer's and the feed-forward's
    transients (they do not overlap). Checked against the fake-tensor simulation (planc simulate)
    on dense, GQA, MoE, MLA, sliding window and eager models: within a few per cent on the
    committed plans; linear-attention and SSM layers in tests/test_hybrid.py.
    """
    e = DTYPE_BYTES[dtype]
    b, t, h = workload.batch_size, workload.step_tokens, shapes.hidden_size
    # Residual stream, its normed copy, the incoming copy a device hop makes, the block output,
    # and the rotary cos/sin tables.
    hidden = 4 * b * t * h * e + rotary_tables_bytes(shapes, workload, dtype)
    mixer = mixer_activation_bytes(shapes, unit, workload, dtype, backend, mixer_path)
    # A quantized module's kernel allocates beside the block's own intermediates: bitsandbytes and
    # the int-packed kernels dequantize a whole weight for a prefill; fp8 quantizes its input.
    quantized = unit.quant_prefill_transient + unit.quant_token_transient * b * t
    feed_forward = mlp.transient_bytes(
        shapes, unit.moe, workload, dtype, model_type, unit.experts_token_transient, unit.every_expert,
        unit.mlp_activation,
    )
    return hidden + max(mixer, feed_forward) + quantized


def image_states_unit(graph: ModelGraph) -> str | None:
    """The unit charged with the image states generate keeps for gated cross-attention blocks: the
    last vision unit, which makes them (before the first layer, so on the main device, where the
    root module's hook returns them and every step reads them)."""
    if graph.gated_cross is None:
        return None
    return next((unit.name for unit in reversed(graph.units) if unit.vision), None)


def main_mask_bytes(graph: ModelGraph, workload: Workload) -> int:
    """Masks the main device holds through a step beyond the attention masks: Idefics' image mask."""
    if graph.gated_cross is None or graph.vision is None:
        return 0
    return graph.gated_cross.mask_bytes(graph.vision, workload, graph.dtype)


def logits_bytes(
    shapes: Shapes, workload: Workload, dtype: str, every_position: bool = False, soft_capped: bool = False
) -> int:
    """The step's logits in the model dtype and generate's fp32 copy of the last position's.

    generate passes logits_to_keep=1 to a forward that takes it, so the head computes the last
    position only; a forward without it (`every_position`: Whisper's and TrOCR's decoders,
    MiniCPM-V, xLSTM) computes all of the step's positions. `soft_capped`: xLSTM then upcasts them
    to fp32 and soft-caps them, three fp32 copies at once (xLSTMForCausalLM.forward:
    soft_cap(lm_head(h).float())).
    """
    positions = workload.step_tokens if every_position else 1
    per_logit = max(DTYPE_BYTES[dtype] + 4, 3 * 4) if every_position and soft_capped else DTYPE_BYTES[dtype]
    return workload.batch_size * shapes.vocab_size * (positions * per_logit + 4)


def returned_logits_bytes(graph: ModelGraph, workload: Workload) -> int:
    """What the root module's hook copies to the main device: the head's output (fp32 where xLSTM
    soft-caps it, else the model dtype) and generate's fp32 copy of the last position."""
    upcast = graph.logits_every_position and graph.logits_soft_capped
    return logits_bytes(graph.shapes, workload, "float32" if upcast else graph.dtype, graph.logits_every_position)


def decode_read_bytes(unit: Unit, shapes: Shapes, workload: Workload, offloaded: bool = False) -> int:
    """Bytes one decode step reads from this unit's weights and cache (memory-bound estimate).

    `offloaded`: the unit's weights live on the host (bitsandbytes keeps those dense).
    """
    weights = unit.host_weight_bytes if offloaded else unit.weight_bytes
    if unit.row_bytes:
        weights = min(weights, workload.batch_size * unit.row_bytes)
    if unit.expert_bytes and shapes.num_experts and not unit.every_expert:
        # A step touches only the experts its tokens route to: expected distinct experts for
        # batch x top_k independent picks out of E.
        active = 1 - (1 - shapes.experts_per_token / shapes.num_experts) ** workload.batch_size
        weights = weights - unit.expert_bytes + int(unit.expert_bytes * active)
    return weights + unit_kv_bytes(unit, workload)


@dataclass
class Load:
    """Running sums of what a device holds; grows one unit at a time."""

    weights: int = 0
    kv_cache: int = 0
    layer_activation: int = 0
    layer_kv: int = 0
    logits: int = 0
    staging: int = 0
    executes: bool = False
    layers: int = 0  # layers executing here
    carried: int = 0  # what a layer leaves alive while the next one runs (attention.kept_scores_bytes)
    mask: int = 0  # attention masks held while this device's layers run (see mask_bytes)
    main: bool = False  # the main device builds the masks, whether or not it runs layers
    mask_build: int = 0  # the main device's peak while it builds them, before any layer runs
    # The head's logits, which the root module's hook (io_same_device) copies to the main device
    # after every layer ran: held there alone, whichever device computed them.
    returned_logits: int = 0

    def add(self, cost: "UnitCost", resident: bool = True) -> None:
        """Account for one more unit executing here (its weights too when `resident`)."""
        if resident:
            self.weights += cost.weights
        self.kv_cache += cost.kv
        self.layer_activation = max(self.layer_activation, cost.activation)
        self.layer_kv = max(self.layer_kv, cost.kv_copy)
        self.logits = max(self.logits, cost.logits)
        self.carried = max(self.carried, cost.carried)
        self.layers += cost.is_layer
        self.executes = True

    def activations(self, shapes: Shapes, workload: Workload, dtype: str) -> int:
        if not self.executes:
            return 0
        # A device that runs only embeddings or the head still holds the hidden states passing through.
        floor = 2 * workload.batch_size * workload.step_tokens * shapes.hidden_size * DTYPE_BYTES[dtype]
        # Masks are built on the main device and copied only where attention layers run (a
        # device holding just lm_head gets none).
        mask = self.mask if (self.main or self.layer_activation) else 0
        step = max(self.layer_activation, floor) + mask
        if self.layers > 1:
            # A layer's kept output beside the next layer's peak, where both run here.
            step += self.carried
        # DynamicCache.update's torch.cat copies one layer's cache: at every decode step, and at
        # every prefill chunk after the first (while that chunk's activations are alive).
        if workload.step_tokens < workload.max_seq_len:
            step += self.layer_kv
        building = floor + self.mask_build if self.main else 0
        return max(max(step, self.layer_kv, building) + self.logits, self.returned_logits)


def reserve_bytes(reserve: Reserve, kv: int, activations: int, staging: int, gpu: bool) -> int:
    slack = int(reserve.allocator_slack * (kv + activations + staging))
    if gpu:
        return reserve.cuda_context + reserve.cublas_workspace + slack
    return CPU_PROCESS_RESERVE + slack


@dataclass(frozen=True)
class UnitCost:
    """Per-unit figures the solver sums."""

    weights: int
    kv: int
    activation: int
    logits: int
    decode_bytes: int
    host_weights: int = 0  # weights when the unit is offloaded (bitsandbytes: dense)
    host_decode_bytes: int = 0  # decode_bytes when offloaded
    offloadable: bool = True
    kv_copy: int = 0  # what one cache update copies (the token-growing part of kv)
    is_layer: bool = False
    carried: int = 0  # bytes of its output the model keeps while the next layer runs


def unit_costs(
    graph: ModelGraph, workload: Workload, backend_of, mixer_path: str = FALLBACK
) -> dict[str, dict[str, UnitCost]]:
    """UnitCost per unit and backend (backend_of lists the backends that occur); sequence mixers
    of linear-attention / SSM / conv layers run on `mixer_path`."""
    shapes = graph.shapes
    output = {}
    for backend in backend_of:
        per_unit = {}
        cross = graph.gated_cross
        vision_peak = (
            vision.transient_bytes(graph.vision, workload, graph.dtype, backend, shapes.hidden_size, cross is not None)
            if graph.vision else 0
        )
        if cross is not None and graph.vision is not None:
            # Then, on the main device before the layers: the resampler, and the image mask's building.
            vision_peak = max(vision_peak, cross.resampler_transient_bytes(graph.vision, workload, graph.dtype),
                              cross.mask_building_bytes(graph.vision, workload, graph.dtype, shapes.hidden_size))
        states_unit = image_states_unit(graph)
        encoder_peak = (
            encoder_decoder.transient_bytes(graph.encoder, workload, graph.dtype, backend) if graph.encoder else 0
        )
        for unit in graph.units:
            is_layer = unit.kind == "layer"
            if is_layer:
                activation = layer_activation_bytes(
                    graph.shapes_of(unit), unit, workload, graph.dtype, backend, graph.model_type, mixer_path
                )
            elif unit.kind == "cross":
                activation = cross.transient_bytes(shapes, graph.vision, workload, graph.dtype, backend)
            elif unit.encoder:
                activation = encoder_peak
            else:
                activation = vision_peak if unit.vision else 0
            if unit.fp32_norm_after:
                # The norm runs on this unit's device, beside the rotary cos/sin tables made there.
                normed = norm.fp32_norm_transient_bytes(shapes.hidden_size, workload, graph.dtype)
                activation = max(activation, normed + rotary_tables_bytes(shapes, workload, graph.dtype))
            per_unit[unit.name] = UnitCost(
                weights=unit.weight_bytes,
                # A layer's cache; the embedding unit's is the state some recurrent models keep
                # on the input device for every layer (model/graph.py: _state_on_input_device).
                kv=unit_kv_bytes(unit, workload)
                + (cross.kept_bytes(graph.vision, workload, graph.dtype) if unit.name == states_unit else 0),
                activation=activation,
                logits=logits_bytes(shapes, workload, graph.dtype, graph.logits_every_position, graph.logits_soft_capped)
                if unit.name == graph.logits_unit else 0,
                decode_bytes=decode_read_bytes(unit, graph.shapes_of(unit), workload),
                host_weights=unit.host_weight_bytes,
                host_decode_bytes=decode_read_bytes(unit, graph.shapes_of(unit), workload, offloaded=True),
                offloadable=unit.offloadable,
                kv_copy=unit_kv_copy_bytes(unit, workload) if is_layer else 0,
                is_layer=is_layer,
                carried=attention.kept_scores_bytes(graph.shapes_of(unit), unit.cache, workload, graph.dtype, backend)
                if is_layer else 0,
            )
        output[backend] = per_unit
    return output

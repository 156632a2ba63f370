"""Execute a plan on virtual GPUs: per-GPU peak memory and cross-device errors, without a GPU.

The model is built from the lock's config on the meta device at the plan's dtype, then every
parameter and buffer is created anew as a fake tensor (shape, dtype and device; no memory) where
the lock puts it: one virtual device `vgpu:N` per planned GPU. accelerate's own hooks are attached
with the arguments `dispatch_model` gives them (each entry executes on its GPU; cpu/disk entries
keep their weights on the host and execute on the main device; io_same_device on the root; the
plan's skip_keys; tied weights re-tied afterwards, as retie_parameters does). The model then runs
what `generate` runs: a prefill of batch x max_seq_len tokens (in the plan's chunks, the
DynamicCache fed from one chunk to the next) with logits_to_keep=1, then single-token decode
steps; an image-text-to-text plan with images first runs its vision tower over batch x
images_per_sequence images (`get_image_features`, where the tower takes pixel tensors); an
encoder-decoder plan runs its encoder over batch x source tokens, then its decoder one token a
step from a self-attention cache given the context's K/V (`_run_encoder_decoder`). A
TorchDispatchMode records the storage of every tensor an op produces, per device, and
drops it when the storage dies: the peak per GPU is what the caching allocator must hold, less
the CUDA context, workspaces and fragmentation, which fake tensors cannot see (the plan's
`reserve` stands in for them).

Modelled rather than executed, and why:
- SDPA: fake SDPA decomposes into the math path, which upcasts to fp32 and materialises the
  score matrix; a fused kernel allocates its output and logsumexp only. Each call takes the
  first backend that can serve it, from the plan's backend for the GPU on through the enabled
  ones after it (flash takes no mask and no value head dim unlike the query's, so a masked call
  on a flash GPU runs efficient); "math" keeps the decomposition.
- Linear-attention / SSM / short-conv layers on a plan that assumes their CUDA kernels: each
  kernel function transformers calls allocates the outputs the kernel returns, without its
  per-chunk workspace (the kernels need CUDA). On the fallback path the torch code runs as is.
- MoE experts run with experts_implementation "eager": the per-expert loop depends on the
  routing, which fake tensors do not have; one iteration runs with one expert receiving every
  token, which bounds every iteration of the real loop.
- Quantized kernels (fp8 and mxfp4 Triton kernels, compressed-tensors' row-wise fp8 matmul, and
  the bitsandbytes / GPTQ / AWQ kernels planc's stand-ins represent): they allocate their outputs
  and the transients their code allocates (an fp8 copy of the input and its scales; a prefill's
  dequantized weight), with the device check a real matmul makes; state the quantized modules
  keep outside their tensors (mxfp4 scales, bitsandbytes' quant state) is created where they sit.
- The main device is the first GPU in device_map order, as `planc run` uses it for the inputs;
  accelerate's default (the lowest GPU index) is the same for planc's maps.
- Batch 1 runs without an attention mask (for SDPA, generate's all-ones mask is skipped exactly
  like no mask); batch > 1 runs with a padding mask, the worst case: the 4-D mask is built and
  GQA keys and values are repeated per head, as for a padded batch on a GPU.

The `vgpu` device is registered with torch once per process and cannot be unregistered;
afterwards `torch.accelerator` reports it. `planc simulate` runs in its own process.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import types
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from planc.errors import ModelError
from planc.model.cache import cache_keyword, layer_tensors
from planc.model.encoder_decoder import patch_embedding
from planc.plan import Plan
from planc.run.trust import check_lock_trust

VIRTUAL_DEVICE = "vgpu"
FUSED_BACKENDS = ("flash", "efficient", "cudnn")
LEDGER_PARTS = ("reserve", "weights", "kv_cache", "activations", "staging", "total")

# Architectures planc compiles that the simulation cannot execute, with the reason. Every config
# in the shared corpus that compile accepts ran (dense, GQA, MoE with grouped_mm and eager
# experts, MLA, sliding window, eager-only Gemma-2 and gpt-oss, and the quantized checkpoints in
# their native layouts), so none is listed.
UNSUPPORTED: dict[str, str] = {}

_registration_lock = threading.Lock()


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class DeviceSimulation:
    """The lock's ledger against the simulated memory of one GPU, in bytes."""

    index: int
    name: str
    capacity: int
    budget: int  # capacity - headroom
    planned: dict[str, int]  # the lock's ledger: reserve, weights, kv_cache, activations, staging, total
    simulated_peak: int  # bytes of live tensors at the worst moment of the run
    simulated_prefill_peak: int
    simulated_decode_peak: int
    simulated_weights: int  # resident once placed
    simulated_kv_cache: int  # cache tensors held here after the last step

    @property
    def planned_tensors(self) -> int:
        """What the ledger plans for the tensors the simulation sees: total minus reserve."""
        return self.planned["total"] - self.planned["reserve"]

    @property
    def simulated_total(self) -> int:
        """Simulated peak plus the plan's reserve (context, workspace, slack: invisible to fake tensors)."""
        return self.simulated_peak + self.planned["reserve"]

    @property
    def ledger_error(self) -> float:
        """(planned tensors - simulated peak) / simulated peak; positive when the ledger is conservative."""
        return (self.planned_tensors - self.simulated_peak) / self.simulated_peak if self.simulated_peak else 0.0

    @property
    def verdict(self) -> str:
        if self.simulated_total > self.capacity:
            return "out of memory"
        if self.simulated_total > self.budget:
            return "fits, over budget"
        return "fits"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            planned_tensors=self.planned_tensors,
            simulated_total=self.simulated_total,
            ledger_error=round(self.ledger_error, 4),
            verdict=self.verdict,
        )
        return data


@dataclass(frozen=True)
class SimulationReport:
    """Outcome of executing a plan on virtual GPUs."""

    architecture: str
    dtype: str
    batch_size: int
    max_seq_len: int
    prefill_chunk_size: int | None
    decode_steps: int
    devices: list[DeviceSimulation]
    host_peak: int  # fake CPU tensors: offloaded weights, or everything on a CPU-only plan; bytes
    elapsed_seconds: float
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The run finished and every GPU's simulated peak plus reserve is within its capacity."""
        return self.error is None and all(device.simulated_total <= device.capacity for device in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "architecture": self.architecture,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "max_seq_len": self.max_seq_len,
            "prefill_chunk_size": self.prefill_chunk_size,
            "decode_steps": self.decode_steps,
            "devices": [device.to_json() for device in self.devices],
            "host_peak": self.host_peak,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "error": self.error,
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------- virtual devices


def _ensure_virtual_device() -> None:
    """Register `vgpu` as torch's PrivateUse1 backend with a Python device guard, once per process."""
    import torch
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    with _registration_lock:
        name = torch._C._get_privateuse1_backend_name()
        if name == VIRTUAL_DEVICE:
            return
        if name != "privateuseone":
            raise ModelError(
                f"torch's PrivateUse1 backend is already registered as {name!r} in this process; "
                f"planc simulate needs it as {VIRTUAL_DEVICE!r}: run it in a separate process"
            )
        _setup_privateuseone_for_python_backend(VIRTUAL_DEVICE)


def _vgpu(index: int) -> str:
    return f"{VIRTUAL_DEVICE}:{index}"


def _describe_device(device: str) -> str:
    if device.startswith(VIRTUAL_DEVICE + ":"):
        return f"GPU {device.split(':')[1]}"
    return device.upper() if device == "cpu" else device


def _execution_device(device, main_device: str) -> str:
    """Where a device_map entry runs: its GPU, or the main device for cpu/disk entries."""
    return _vgpu(device) if isinstance(device, int) else main_device


def _is_offloaded(device, main_device: str) -> bool:
    """Weights kept away from the executing device (accelerate: cpu and disk; only disk when the CPU runs)."""
    return device == "disk" or (device == "cpu" and main_device != "cpu")


# ---------------------------------------------------------------- memory tracking


def _make_tracker():
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    expired = torch.UntypedStorage._expired  # StorageWeakRef.expired without its two Python layers

    class MemoryTracker(TorchDispatchMode):
        """Bytes of live storages per device, with the running peak.

        Each storage an op produces is counted once (views share it) and dropped when its weak
        reference expires. Dead storages are only looked for when a device's count would set a
        new peak: the count is then exact at every peak, an op's inputs and outputs coexisting as
        on a GPU, and most ops cost no sweep. Storages made while `pinned` is set (the placed
        weights) are looked at between phases only.
        """

        def __init__(self) -> None:
            super().__init__()
            self.pinned = True
            self.paused = 0  # > 0 while a modelled kernel runs its torch stand-in (see _kernel_stand_ins)
            self._pinned: dict[int, tuple[Any, str, int]] = {}
            self._transient: dict[int, tuple[Any, str, int]] = {}
            self.current: dict[str, int] = defaultdict(int)  # an upper bound between sweeps
            self.peak: dict[str, int] = defaultdict(int)
            self.phase_peak: dict[str, int] = defaultdict(int)

        def start_phase(self) -> None:
            self._sweep(self._pinned)
            self._sweep(self._transient)
            self.phase_peak = defaultdict(int, self.current)

        def _sweep(self, live: dict[int, tuple[Any, str, int]]) -> None:
            for key in [key for key in live if expired(key)]:
                _, device, size = live.pop(key)
                self.current[device] -= size

        def _record(self, tensor) -> None:
            storage = tensor.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata in self._transient or ref.cdata in self._pinned:
                return
            device, size = str(tensor.device), storage.nbytes()
            (self._pinned if self.pinned else self._transient)[ref.cdata] = (ref, device, size)
            self.current[device] += size
            if self.current[device] > self.phase_peak[device] and not self.pinned:
                self._sweep(self._transient)
            self.peak[device] = max(self.peak[device], self.current[device])
            self.phase_peak[device] = max(self.phase_peak[device], self.current[device])

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if self.paused:
                return out
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                    self._record(leaf)
            return out

    return MemoryTracker()


def forward_peak(module, make_inputs) -> int:
    """Peak bytes one module's forward allocates, under fake tensors on the CPU: what the ledger's
    per-module transients are held to (its weights and the inputs `make_inputs()` builds excluded).

    `make_inputs()` runs inside the fake mode and returns (args, kwargs) for the forward.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = _make_tracker()
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), tracker:
        for child in module.modules():
            for registry in (child._parameters, child._buffers):
                for name, tensor in list(registry.items()):
                    if tensor is not None:
                        registry[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
        args, kwargs = make_inputs()
        tracker.start_phase()
        before = tracker.current["cpu"]
        tracker.pinned = False
        module(*args, **kwargs)
        return tracker.peak["cpu"] - before


def _sdpa_backends_by_device(plan: Plan) -> dict[str, list[str]]:
    """Per device, the SDPA backends a call may run: the plan's backend for it, then the later enabled ones."""
    if plan.attention.attn_implementation != "sdpa":
        return {}
    enabled = list(plan.attention.sdpa_backends)
    order = {}
    for index, backend in plan.attention.per_device.items():
        later = enabled[enabled.index(backend) + 1 :] if backend in enabled else []
        order[_vgpu(int(index))] = [backend, *later]
    if not plan.devices and "flash" in enabled:
        order["cpu"] = enabled  # a CPU-only plan runs PyTorch's CPU flash kernel
    return order


def _sdpa_backend(candidates: list[str], query, value, attn_mask) -> str:
    """The first backend that takes the call: flash needs no mask and equal query and value head dims."""
    for backend in candidates:
        if backend == "flash" and (attn_mask is not None or query.shape[-1] != value.shape[-1]):
            continue
        return backend
    return "math"


def _make_device_shims(backends_by_device: dict[str, list[str]]):
    """A TorchFunctionMode for what fake tensors on a Python backend cannot do, or would overstate."""
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.overrides import TorchFunctionMode

    def is_virtual(device) -> bool:
        return device is not None and torch.device(device).type == VIRTUAL_DEVICE

    def is_constant(tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and (not isinstance(tensor, FakeTensor) or tensor.constant is not None)

    class DeviceShims(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.tensor and is_virtual(kwargs.get("device")):
                # A constant made on a virtual device (DynamicLayer's lazy init): its values are
                # never read, so an empty fake tensor of its shape and dtype stands in.
                host = torch.tensor(*args, **{k: v for k, v in kwargs.items() if k != "device"})
                return torch.empty(host.shape, dtype=host.dtype, device=kwargs["device"])
            if func is torch.Tensor.to and args and is_constant(args[0]):
                device, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
                if is_virtual(device) and device != args[0].device:
                    # A constant (made at init, or by torch.tensor) moved to a virtual device:
                    # fake mode would copy its values with a kernel the Python backend lacks.
                    return torch.empty(args[0].shape, dtype=dtype or args[0].dtype, device=device)
            if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and is_virtual(args[0].device):
                # A list index (Falcon's `fused_qkv[..., [-2], :]`): torch makes it a tensor on
                # the indexed tensor's device below the Python dispatch, which a Python backend
                # cannot serve; a host index tensor selects the same shape.
                args = (args[0], _host_indices(args[1]), *args[2:])
            if func is F.scaled_dot_product_attention:
                query = args[0]
                value = args[2] if len(args) > 2 else kwargs["value"]
                attn_mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
                candidates = backends_by_device.get(str(query.device), ["math"])
                if _sdpa_backend(candidates, query, value, attn_mask) in FUSED_BACKENDS:
                    return _fused_attention_output(query, value)
            return func(*args, **kwargs)

    return DeviceShims()


def _host_indices(index):
    """An index with each (nested) list of ints made a CPU tensor; everything else as it was."""
    import torch

    if isinstance(index, tuple):
        return tuple(_host_indices(item) for item in index)
    if isinstance(index, list) and all(isinstance(item, (int, list)) and not isinstance(item, bool) for item in index):
        return torch.tensor(index)
    return index


def _delta_rule_outputs(query, key, value, initial_state=None, output_final_state=False, **_):
    """fla's chunk / recurrent delta-rule kernels: the output per value head, the fp32 final state."""
    import torch

    out = torch.empty(value.shape, dtype=query.dtype, device=value.device)
    if not output_final_state:
        return out, None
    batch, _, heads, v_dim = value.shape
    return out, torch.empty(batch, heads, key.shape[-1], v_dim, dtype=torch.float32, device=value.device)


def _mamba2_scan_outputs(hidden_states, B, return_final_states=False, **_):
    """mamba-ssm's mamba_chunk_scan_combined: y in x's dtype and the fp32 final state."""
    import torch

    out = torch.empty_like(hidden_states)
    if not return_final_states:
        return out
    batch, _, heads, head_dim = hidden_states.shape
    return out, torch.empty(batch, heads, head_dim, B.shape[-1], dtype=torch.float32, device=out.device)


def _selective_scan_outputs(hidden_states, A, return_last_state=False, **_):
    """mamba-ssm's selective_scan_fn: y like its input and the fp32 last state (d_inner x d_state)."""
    import torch

    out = torch.empty_like(hidden_states)
    if not return_last_state:
        return out
    batch, inner = hidden_states.shape[:2]
    return out, torch.empty(batch, inner, A.shape[-1], dtype=torch.float32, device=out.device)


def _like_first(hidden_states=None, x=None, **_):
    """causal-conv1d's convolutions and the single-step state updates: an output like the input
    (the conv / SSM state is updated in place)."""
    import torch

    return torch.empty_like(hidden_states if hidden_states is not None else x)


# What each kernel allocates, by the name transformers gives its fallback (modeling_*.py). Kernels
# not listed run their fallback untracked and return copies of its outputs.
_KERNEL_OUTPUTS = {
    "torch_chunk_gated_delta_rule": _delta_rule_outputs,
    "torch_recurrent_gated_delta_rule": _delta_rule_outputs,
    "chunk_kimi_delta_attention": _delta_rule_outputs,
    "recurrent_kimi_delta_attention": _delta_rule_outputs,
    "mamba2_chunk_scan": _mamba2_scan_outputs,
    "mamba_selective_scan": _selective_scan_outputs,
    "causal_conv1d_fn": _like_first,
    "causal_conv1d_update": _like_first,
    "mamba2_selective_state_update": _like_first,
    "mamba_selective_state_update": _like_first,
}


@contextmanager
def _kernel_stand_ins(model, plan: Plan, tracker):
    """On a plan whose linear-attention / SSM layers run their CUDA kernels, model those kernels:
    each kernel function transformers calls allocates the outputs the kernel returns (shapes and
    dtypes from its arguments; unknown ones run their torch fallback untracked and return copies).
    Its per-chunk workspace is not simulated, so the simulated peak is a lower bound there, as for
    a fused SDPA call."""
    import inspect
    import sys

    import torch
    from torch.utils._pytree import tree_map

    from planc.model import cache as cache_kinds

    if plan.mixers is None or plan.mixers.path != cache_kinds.KERNELS:
        yield 0
        return
    names = set()
    for family in plan.mixers.families:
        names.update(cache_kinds.kernel_functions(family))
    modules = {sys.modules[type(m).__module__] for m in model.modules() if type(m).__module__ in sys.modules}

    def stand_in(name, function):
        signature = inspect.signature(function)
        outputs = _KERNEL_OUTPUTS.get(name)

        def kernel(*args, **kwargs):
            if outputs is not None:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                return outputs(**bound.arguments)
            tracker.paused += 1
            try:
                out = function(*args, **kwargs)
            finally:
                tracker.paused -= 1
            return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

        return kernel

    patched = []
    for module in modules:
        for name in names & set(vars(module)):
            patched.append((module, name, getattr(module, name)))
            setattr(module, name, stand_in(name, getattr(module, name)))
    try:
        yield len(patched)
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


def _fused_attention_output(query, value):
    """What a fused SDPA kernel allocates: its output, and a logsumexp freed when the call returns."""
    import torch

    logsumexp = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    output = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    del logsumexp
    return output


def _eager_experts_worst_iteration(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop (e.g. Qwen3MoeExperts.forward) at its worst iteration.

    The loop visits the experts the router hit and gathers each one's tokens: both depend on
    values fake tensors do not have. Its live memory is the routing mask plus one expert's
    intermediates; an expert takes each token at most once, so one expert with every token
    bounds each iteration. The weights used are the module's own, so devices are checked too.
    """
    import torch
    import torch.nn.functional as F

    tokens = hidden_states.shape[0]
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0)
    token_index = torch.zeros(tokens, dtype=torch.long, device=hidden_states.device)
    top_k_position = torch.zeros(tokens, dtype=torch.long, device=hidden_states.device)
    current_state = hidden_states[token_index]
    up = self.gate_up_proj[0] if self.has_gate else self.up_proj[0]
    projected = current_state @ up if self.is_transposed else F.linear(current_state, up)
    if self.has_bias:
        projected = projected + (self.gate_up_proj_bias[0] if self.has_gate else self.up_proj_bias[0])
    projected = self._apply_gate(projected) if self.has_gate else self.act_fn(projected)
    out = projected @ self.down_proj[0] if self.is_transposed else F.linear(projected, self.down_proj[0])
    if self.has_bias:
        out = out + self.down_proj_bias[0]
    out = out * top_k_weights[token_index, top_k_position, None]
    final_hidden_states.index_add_(0, token_index, out.to(final_hidden_states.dtype))
    del expert_mask, expert_hit
    return final_hidden_states


def _all_pools_kept(self, packed_states):
    """GLM-5-Next's k-pool indexer (Glm5NextTextIndexer.get_pooled_states) keeping every pool.

    transformers drops the pools no sequence of the batch can use (`pool_keys[:, keep]`, a boolean
    index whose size depends on values fake tensors do not have); keeping them all bounds it.
    """
    import torch

    keys, gate_scores, valid_keys = torch.split(packed_states, [self.head_dim, self.head_dim, 1], dim=-1)
    valid_keys = valid_keys.bool().squeeze(-1)
    batch_size, seq_len = keys.shape[:2]
    number_of_pools = (seq_len + self.index_kpool - 1) // self.index_kpool
    first_key = torch.where(
        valid_keys.any(-1),
        valid_keys.long().argmax(-1),
        torch.full((batch_size,), seq_len, dtype=torch.long, device=keys.device),
    )
    pool_offsets = torch.arange(number_of_pools * self.index_kpool, device=keys.device)
    pool_indices = first_key[:, None, None] + pool_offsets.view(1, number_of_pools, self.index_kpool)
    batch_idx = torch.arange(batch_size, device=keys.device)[:, None, None]
    safe_indices = pool_indices.clamp(0, seq_len - 1)
    grouped_keys = keys[batch_idx, safe_indices]
    grouped_gate_scores = gate_scores[batch_idx, safe_indices]
    grouped_valid_keys = valid_keys[batch_idx, safe_indices] & (pool_indices < seq_len)
    pool_valid = grouped_valid_keys.all(-1)
    pool_indices = pool_indices.masked_fill(~grouped_valid_keys, -1)
    logits = grouped_gate_scores.float() + self.index_kpool_compress_ape.float()[None, None]
    logits = logits.masked_fill(~grouped_valid_keys[..., None], float("-inf"))
    probabilities = torch.nan_to_num(logits.softmax(dim=2)).to(grouped_keys.dtype)
    pool_keys = (probabilities * grouped_keys).sum(dim=2)
    return pool_keys, pool_indices, pool_valid


def _bound_pooled_indexers(model) -> int:
    """Run every k-pool indexer's pooling through `_all_pools_kept`; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "index_kpool") and hasattr(module, "get_pooled_states"):
            module.get_pooled_states = types.MethodType(_all_pools_kept, module)
            count += 1
    return count


def _bound_eager_experts(model) -> int:
    """Run every eager experts module through `_eager_experts_worst_iteration`; returns how many."""
    count = 0
    for module in model.modules():
        # Modules decorated with transformers' use_experts_implementation carry these attributes.
        if all(hasattr(module, name) for name in ("has_gate", "is_transposed", "num_experts", "down_proj")):
            module.forward = types.MethodType(_eager_experts_worst_iteration, module)
            count += 1
    return count


# ---------------------------------------------------------------- model, placement, hooks


def _build_meta_model(plan: Plan, lock_dir: Path):
    from planc.model import read_model_files
    from planc.model.build import meta_model
    from planc.model.quant import quantization_of_lock

    # Paths inside the lock's tree only (run.trust); simulate never runs code a checkpoint ships,
    # whatever the lock's trust_remote_code says: it builds the class transformers itself provides.
    check_lock_trust(plan, lock_dir, trust_remote_code=True, environment=False)
    files = read_model_files(plan.model, lock_dir)
    quantization, offloaded = quantization_of_lock(plan)
    model = meta_model(
        files.config,
        plan.dtype,
        False,
        attn_implementation=plan.attention.attn_implementation,
        experts_implementation=plan.generation.experts_implementation,
        quantization=quantization,
        offloaded=offloaded,
    )
    return model.eval()


def _entry_of(name: str, entries: list[str]) -> str | None:
    """The device_map entry that places a tensor: the longest entry that is its module or a parent."""
    best = None
    for entry in entries:
        if (entry == "" or name == entry or name.startswith(entry + ".")) and (best is None or len(entry) > len(best)):
            best = entry
    return best


def _place(model, device_map: dict[str, Any], main_device: str) -> dict[str, Any]:
    """Create every parameter and buffer anew, as a fake tensor, where the plan puts it.

    GPU entries: on their virtual device. Offloaded entries: parameters become fake host tensors
    in the returned weights map and stay on meta in the module; buffers go to the main device
    (accelerate's offload_buffers=False). A parameter shared by modules (tied weights) gets one
    tensor per device its entries name; simulate_plan then re-ties them (retie_parameters, as
    dispatch_model does), so one tensor is left, as after loading: accelerate's hook on a resident
    entry moves its inputs, never its weights.
    """
    import torch

    entries = list(device_map)
    made: dict[tuple[int, str, bool], Any] = {}
    offloaded: dict[str, Any] = {}

    def fresh(tensor, device: str, resident: bool = True):
        key = (id(tensor), device, resident)
        if key not in made:
            made[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            if resident and isinstance(tensor, torch.nn.Parameter):
                made[key] = torch.nn.Parameter(made[key], requires_grad=False)
        return made[key]

    from planc.model.quant import hidden_tensors

    # State a quantized module keeps outside its tensors (mxfp4 scales, bitsandbytes' quant state),
    # where its entry puts it; kept alive on the module for the whole run.
    for module_name, shape, dtype in hidden_tensors(model):
        entry = _entry_of(module_name, entries)
        if entry is None:
            raise ModelError(f"the plan's device_map places no device for {module_name}")
        device = device_map[entry]
        where = "cpu" if _is_offloaded(device, main_device) else _execution_device(device, main_device)
        module = model.get_submodule(module_name)
        module.__dict__.setdefault("_planc_hidden", []).append(torch.empty(shape, dtype=getattr(torch, dtype), device=where))

    for module_name, module in model.named_modules():
        for registry in (module._parameters, module._buffers):
            for local_name, tensor in list(registry.items()):
                if tensor is None:
                    continue
                full_name = f"{module_name}.{local_name}" if module_name else local_name
                entry = _entry_of(full_name, entries)
                if entry is None:
                    raise ModelError(f"the plan's device_map places no device for {full_name}")
                device = device_map[entry]
                if not _is_offloaded(device, main_device):
                    registry[local_name] = fresh(tensor, _execution_device(device, main_device))
                elif registry is module._buffers:
                    registry[local_name] = fresh(tensor, main_device)
                else:
                    offloaded[full_name] = fresh(tensor, "cpu", resident=False)
    return offloaded


def _staging_hook_class():
    from accelerate.hooks import AlignDevicesHook
    from accelerate.utils import find_device, named_module_tensors, send_to_device

    class FakeStagingHook(AlignDevicesHook):
        """accelerate's offload hook, with the parameter swap written so fake tensors allow it.

        AlignDevicesHook(offload=True) copies its module's direct tensors from the weights map to
        the execution device before the forward and puts meta back after. It rebuilds each
        parameter with type(param)(value), and under fake mode that type is FakeTensor, which
        cannot be called that way. The copies, and so the staging memory, are the same here.
        """

        def pre_forward(self, module, *args, **kwargs):
            if self.io_same_device:
                self.input_device = find_device([args, kwargs])
            self.resident = {}
            for name, _ in named_module_tensors(
                module, include_buffers=self.offload_buffers, recurse=self.place_submodules, remove_non_persistent=True
            ):
                owner, local = _owner(module, name)
                self.resident[name] = owner._parameters[local]
                owner._parameters[local] = self.weights_map[name].to(self.execution_device)
            return send_to_device(args, self.execution_device), send_to_device(
                kwargs, self.execution_device, skip_keys=self.skip_keys
            )

        def post_forward(self, module, output):
            for name, original in self.resident.items():
                owner, local = _owner(module, name)
                owner._parameters[local] = original
            self.resident = {}
            if self.io_same_device and self.input_device is not None:
                output = send_to_device(output, self.input_device, skip_keys=self.skip_keys)
            return output

    return FakeStagingHook


def _owner(module, name: str):
    *path, local = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, local


def _attach_hooks(model, device_map: dict[str, Any], main_device: str, skip_keys, offloaded: dict[str, Any]) -> None:
    """accelerate's hooks, attached with the arguments dispatch_model gives them."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook, attach_align_device_hook_on_blocks
    from accelerate.utils import OffloadedWeightsLoader

    execution_device = {name: _execution_device(device, main_device) for name, device in device_map.items()}
    execution_device[""] = main_device
    attach_align_device_hook_on_blocks(
        model,
        execution_device=execution_device,
        offload={name: _is_offloaded(device, main_device) for name, device in device_map.items()},
        weights_map=OffloadedWeightsLoader(state_dict=offloaded) if offloaded else None,
        skip_keys=skip_keys,
        tied_params_map=None,  # it keys tensors by data_ptr(), which fake tensors do not have
    )
    if offloaded:
        staging = _staging_hook_class()
        for module in model.modules():
            hook = getattr(module, "_hf_hook", None)
            for each in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
                if isinstance(each, AlignDevicesHook) and each.offload:
                    each.__class__ = staging


class _ModuleStack:
    """Names of the modules executing, innermost last: the module an error came from."""

    def __init__(self, model) -> None:
        self.stack: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(module, args):
            self.stack.append(name)

        return hook

    def _leave(self, module, args, output):
        self.stack.pop()

    def innermost(self) -> str:
        return self.stack[-1] if self.stack and self.stack[-1] else "model"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _execution_error(exc: Exception, module: str) -> str:
    """One line naming the module; for a cross-device mistake, both devices as vgpu and as GPU."""
    devices = [str(d) for d in (getattr(exc, "common_device", None), getattr(exc, "device", None)) if d is not None]
    if not devices:
        devices = re.findall(rf"\b(?:{VIRTUAL_DEVICE}:\d+|cpu|meta)\b", str(exc))
    devices = list(dict.fromkeys(devices))
    if "same device" in str(exc) and len(devices) >= 2:
        first, second = devices[:2]
        return f"{module}: tensors on {first} and {second} ({_describe_device(first)} and {_describe_device(second)})"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{module}: {type(exc).__name__}: {message}"


# ---------------------------------------------------------------- the run


def _initial_cache(plan: Plan, model):
    """The cache generate starts with (`_prepare_cache_for_generation`): transformers' QuantizedCache
    for a quantized KV cache; a DynamicCache of the text config for a model that takes one, made
    before the first forward (RecurrentGemma then allocates its module-held states per layer, on
    the layer's device, not all on the input device as its own `_setup_cache` would); else none,
    and the model makes its own (RWKV's state list, xLSTMCache, Mamba's cache_params)."""
    from transformers.cache_utils import DynamicCache, QuantizedCache

    if plan.generation.cache_implementation == "quantized":
        return QuantizedCache(config=model.config, **dict(plan.generation.cache_config or {}))
    if model._is_stateful and cache_keyword(model) == "past_key_values" and model._supports_default_dynamic_cache():
        return DynamicCache(config=model.config.get_text_config(decoder=True))
    return None


def _run_generation(
    model, batch: int, seq: int, chunk: int | None, decode_steps: int, input_device: str, tracker, cache=None,
    images: tuple[int, int] | None = None,
):
    """What generate runs: the prefill (whole or chunked) with logits_to_keep=1, then decode steps.

    `images` (per sequence, pixels per side): a model whose every forward takes the images
    (Idefics' gated cross-attention, planc.model.gated_cross) gets their pixels in the first
    step and, as generate carries them, the image states it returned in every later one."""
    import torch

    from planc.model import gated_cross

    input_ids = torch.empty(batch, seq, dtype=torch.long, device=input_device)
    mask = torch.ones(batch, seq + decode_steps, dtype=torch.long, device=input_device) if batch > 1 else None

    keyword = cache_keyword(model)
    kept: dict = {}  # what generate keeps between steps besides the cache (model_kwargs)

    def step(ids, cache, length: int):
        extra = {"attention_mask": mask[:, :length]} if mask is not None else {}
        if images and not kept:
            extra.update(gated_cross.prefill_inputs(model, batch, images[0], images[1], ids.shape[1], input_device))
        elif images:
            extra.update(gated_cross.step_inputs(model, kept["states"], batch, images[0], ids.shape[1], input_device))
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{keyword: cache}, **extra)
        if images:
            kept["states"] = out.image_hidden_states
        # generate keeps an fp32 copy of the last position's logits to pick the next token.
        next_tokens = torch.argmax(out.logits[:, -1, :].to(copy=True, dtype=torch.float32), dim=-1)
        # A model that updates the cache it is given in place and returns none (RecurrentGemma) keeps
        # it, as generate does (`_update_model_kwargs_for_generation` takes only a returned cache); one
        # that keeps none (OpenAI GPT) was given None and goes on without.
        returned = getattr(out, keyword, None)
        return next_tokens, cache if returned is None else returned

    tracker.start_phase()
    for start in range(0, seq, chunk or seq):
        end = min(start + (chunk or seq), seq)
        next_tokens, cache = step(input_ids[:, start:end], cache, end)
    prefill_peak = dict(tracker.phase_peak)
    tracker.start_phase()
    for position in range(seq, seq + decode_steps):
        if cache is None:
            # A model that keeps no cache (OpenAI GPT): generate runs the whole sequence again.
            whole = torch.empty(batch, position + 1, dtype=torch.long, device=input_device)
            next_tokens, cache = step(whole, None, position + 1)
        else:
            next_tokens, cache = step(next_tokens[:, None], cache, position + 1)
    return cache, prefill_peak, dict(tracker.phase_peak)


def _encoder_inputs(model, encoder, batch: int, source: int, input_device: str) -> dict:
    """What generate hands an encoder-decoder's encoder: the prompt's ids (with a padding mask for a
    batch), one image's pixels, or Pix2Struct's patch list with its mask; Udop's prompt with a box per
    token (float: its layout biases average the coordinates). Udop's image is not given: its
    combine_image_text_embeddings picks the patches outside the tokens' boxes by value (a Python loop
    over index tensors), which fake tensors cannot run, so the source runs as that many text tokens
    (the same blocks, bias and output; the ledger adds the pixels and the embedded patches)."""
    import torch

    name = encoder.main_input_name
    config = encoder.config
    embedding = patch_embedding(encoder)
    if embedding is not None:
        return {name: torch.zeros(batch, source, dtype=torch.long, device=input_device),
                "bbox": torch.zeros(batch, source, 4, device=input_device),
                "attention_mask": torch.ones(batch, source, dtype=torch.long, device=input_device)}
    if name == "pixel_values":
        side = config.image_size if isinstance(config.image_size, int) else max(config.image_size)
        channels = getattr(config, "num_channels", 3)
        return {name: torch.empty(batch, channels, side, side, dtype=model.dtype, device=input_device)}
    mask = torch.ones(batch, source, dtype=torch.long, device=input_device)
    if name == "flattened_patches":
        width = config.patch_embed_hidden_size + 2  # row and column indices, then the patch's pixels
        return {name: torch.empty(batch, source, width, dtype=model.dtype, device=input_device), "attention_mask": mask}
    inputs = {name: torch.empty(batch, source, dtype=torch.long, device=input_device)}
    return {**inputs, "attention_mask": mask} if batch > 1 else inputs


def _run_encoder_decoder(model, plan: Plan, batch: int, seq: int, decode_steps: int, input_device: str, tracker):
    """What generate runs for an encoder-decoder model: the encoder once over the source (its hook
    returning the output to the input device, as `_prepare_text_encoder_decoder_kwargs_for_generation`
    sets it), then the decoder one token a step over an EncoderDecoderCache, from its start token.

    Stepping the decoder through `seq` tokens one at a time would take a forward per token; instead
    its self-attention cache is given the `seq - 1` tokens' K/V those steps would have stored (each
    layer's, on its device, in the shapes its first step shows), and the first step then runs at the
    full context, filling the cross-attention cache, before `decode_steps` more steps. Returns
    (cache, encoder output, peak of the encoder and the first step, peak of the decode steps).
    """
    import inspect

    import torch
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    encoder = model.get_encoder()
    if hasattr(encoder, "_hf_hook"):
        encoder._hf_hook.io_same_device = True
    else:
        add_hook_to_module(encoder, AlignDevicesHook(io_same_device=True))
    inputs = _encoder_inputs(model, encoder, batch, plan.workload.source_tokens, input_device)
    decoder_config = model.config.get_text_config(decoder=True)
    extra = {"attention_mask": inputs["attention_mask"]} if "attention_mask" in inputs else {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1

    def fresh_cache():
        return EncoderDecoderCache(DynamicCache(config=decoder_config), DynamicCache(config=decoder_config))

    def step(ids, cache, encoder_outputs):
        out = model(decoder_input_ids=ids, encoder_outputs=encoder_outputs, past_key_values=cache, use_cache=True,
                    **extra)
        next_tokens = torch.argmax(out.logits[:, -1, :].to(copy=True, dtype=torch.float32), dim=-1)
        return next_tokens, out.past_key_values

    start = torch.zeros(batch, 1, dtype=torch.long, device=input_device)
    tracker.start_phase()
    encoder_outputs = encoder(**inputs, return_dict=True)
    cache = fresh_cache()
    if seq > 1:
        tracker.paused += 1  # a scratch step, for the shapes and devices of each layer's K/V
        try:
            scratch = fresh_cache()
            step(start, scratch, encoder_outputs)
            shapes = [(layer.keys.shape, layer.values.shape, layer.keys.dtype, layer.keys.device)
                      for layer in scratch.self_attention_cache.layers]
            del scratch
        finally:
            tracker.paused -= 1
        for index, (keys, values, dtype, device) in enumerate(shapes):
            cache.self_attention_cache.update(
                torch.empty(*keys[:-2], seq - 1, keys[-1], dtype=dtype, device=device),
                torch.empty(*values[:-2], seq - 1, values[-1], dtype=dtype, device=device),
                index,
            )
    next_tokens, cache = step(start, cache, encoder_outputs)
    prefill_peak = dict(tracker.phase_peak)
    tracker.start_phase()
    for _ in range(decode_steps):
        next_tokens, cache = step(next_tokens[:, None], cache, encoder_outputs)
    # generate keeps the whole encoder output: PP-FormulaNet's pooler_output (the decoder's source) and
    # its neck's last_hidden_state both.
    kept = [value for value in encoder_outputs.values() if isinstance(value, torch.Tensor)]
    return cache, kept, prefill_peak, dict(tracker.phase_peak)


def _run_vision(model, plan: Plan, input_device: str, tracker) -> str | None:
    """The vision tower over every image of the batch, as the prefill runs it first; a note when it
    cannot be driven from the config alone (towers taking patch lists and grids rather than images)."""
    import torch

    images = plan.workload.batch_size * plan.workload.images_per_sequence
    vision = getattr(model.config, "vision_config", None)
    if vision is None and getattr(model.config, "is_encoder_decoder", False):
        vision = getattr(model.get_encoder().config, "vision_config", None)  # T5Gemma2: the tower is the encoder's
    if not images or vision is None or not hasattr(model, "get_image_features"):
        return None
    side = plan.workload.image_size or getattr(vision, "image_size", None)
    channels = getattr(vision, "num_channels", 3)
    if not isinstance(side, int):
        return "vision tower not simulated: its config has no image_size"
    pixel_values = torch.empty(images, channels, side, side, dtype=model.dtype, device=input_device)
    try:
        model.get_image_features(pixel_values=pixel_values)
    except Exception as exc:  # noqa: BLE001 - the tower's input format is model-specific
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        return f"vision tower not simulated from {images} x {channels} x {side} x {side} pixels: {first}"
    return f"vision tower ran over {images} images of {side} x {side} pixels before the prefill"


def _images_every_step(model, plan: Plan) -> tuple[int, int] | None:
    """(images per sequence, pixels per side) for a model whose every forward takes the images
    (Idefics' gated cross-attention blocks); None for the others."""
    from planc.model.gated_cross import runs_image_cross_attention

    if not plan.workload.images_per_sequence or not runs_image_cross_attention(model):
        return None
    side = plan.workload.image_size or model.config.vision_config.image_size
    return plan.workload.images_per_sequence, side


def _cache_bytes(cache, model) -> dict[str, int]:
    """Bytes of cache tensors (KV, states, indexer keys, compressed entries, module-held states) per device."""
    held: dict[str, int] = defaultdict(int)
    for tensors in layer_tensors(cache, model):
        for tensor in tensors:
            held[str(tensor.device)] += tensor.untyped_storage().nbytes()
    return held


def simulate_plan(
    plan: Plan,
    lock_dir: Path,
    batch_size: int | None = None,
    max_seq_len: int | None = None,
    decode_steps: int = 2,
) -> SimulationReport:
    """Execute `plan` on virtual GPUs and compare each GPU's simulated peak with the lock's ledger.

    `lock_dir` resolves the lock's model source; batch_size and max_seq_len override the
    lock's workload (the ledger stays the lock's). Execution errors are reported, not raised.
    """
    import torch
    from accelerate.utils import find_tied_parameters, retie_parameters
    from torch._subclasses.fake_tensor import FakeTensorMode

    if plan.distributed:
        return _simulate_ranks(plan, lock_dir, batch_size, max_seq_len, decode_steps)
    started = time.perf_counter()
    _ensure_virtual_device()
    batch = batch_size or plan.workload.batch_size
    seq = max_seq_len or plan.workload.max_seq_len
    chunk = plan.generation.prefill_chunk_size
    gpus = [device for device in plan.device_map.values() if isinstance(device, int)]
    main_device = _vgpu(gpus[0]) if gpus else "cpu"
    notes = []
    if (batch, seq) != (plan.workload.batch_size, plan.workload.max_seq_len):
        notes.append(
            f"ran batch {batch} x {seq} tokens; the planned figures are the lock's, for batch "
            f"{plan.workload.batch_size} x {plan.workload.max_seq_len}"
        )

    from planc.model.quant import quantization_of_lock, simulated_forwards

    model = _build_meta_model(plan, lock_dir)
    quantization, _ = quantization_of_lock(plan)
    tied_groups = [list(group) for group in find_tied_parameters(model)]
    tracker = _make_tracker()
    stack = _ModuleStack(model)
    fake_logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_logger.level
    fake_logger.setLevel(logging.CRITICAL)  # fake mode logs every failing op; the report names it once
    error = None
    weights: dict[str, int] = {}
    prefill_peak: dict[str, int] = {}
    decode_peak: dict[str, int] = {}
    cache_held: dict[str, int] = {}
    try:
        shims = _make_device_shims(_sdpa_backends_by_device(plan))
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), tracker, shims:
            offloaded = _place(model, plan.device_map, main_device)
            if getattr(model.config, "_experts_implementation", None) == "eager" and _bound_eager_experts(model):
                notes.append("eager MoE experts: each loop simulated at its worst iteration (one expert, every token)")
            if _bound_pooled_indexers(model):
                notes.append("k-pool indexers score every pool (transformers drops the ones no sequence can use)")
            if quantization is not None and simulated_forwards(model, quantization):
                notes.append(
                    f"{quantization.method} kernels modelled as the memory they allocate (fake tensors cannot run them)"
                )
            _attach_hooks(model, plan.device_map, main_device, list(plan.skip_keys) or None, offloaded)
            retie_parameters(model, tied_groups)
            tracker.start_phase()
            weights = dict(tracker.current)
            tracker.pinned = False
            try:
                with _kernel_stand_ins(model, plan, tracker) as modelled:
                    if modelled:
                        notes.append(
                            f"{', '.join(plan.mixers.families)} kernels modelled by the outputs they allocate "
                            "(their per-chunk workspace is not simulated)"
                        )
                    tracker.start_phase()
                    images = _images_every_step(model, plan)
                    vision_note = _run_vision(model, plan, main_device, tracker) if images is None else (
                        f"{images[0]} images of {images[1]} x {images[1]} pixels per sequence given to the prefill; "
                        "their image states to every decode step, as generate carries them"
                    )
                    if vision_note:
                        notes.append(vision_note)
                    if getattr(model.config, "is_encoder_decoder", False):
                        cache, encoded, prefill_peak, decode_peak = _run_encoder_decoder(
                            model, plan, batch, seq, decode_steps, main_device, tracker
                        )
                        notes.append(f"encoder ran over {plan.workload.source_tokens} source tokens per sequence")
                        if plan.workload.images_per_sequence and patch_embedding(model.get_encoder()) is not None:
                            notes.append("the image's patches ran as text tokens of the source (Udop's "
                                         "combine_image_text_embeddings picks patches by value, which fake tensors "
                                         "cannot run)")
                    else:
                        cache, prefill_peak, decode_peak = _run_generation(
                            model, batch, seq, chunk, decode_steps, main_device, tracker, _initial_cache(plan, model),
                            images,
                        )
                        encoded = None
                cache_held = _cache_bytes(cache, model)
                # generate keeps the encoder output for every step: the ledger's cache term holds it.
                for tensor in encoded or ():
                    cache_held[str(tensor.device)] = cache_held.get(str(tensor.device), 0) + tensor.untyped_storage().nbytes()
                del cache, encoded
            except Exception as exc:  # noqa: BLE001 - any failure of the run is the plan's finding
                error = _execution_error(exc, stack.innermost())
    finally:
        stack.remove()
        fake_logger.setLevel(level)

    ledgers = {ledger.device: ledger for ledger in plan.memory}
    devices = []
    for device in plan.devices:
        key, ledger = _vgpu(device.index), ledgers.get(device.index)
        devices.append(
            DeviceSimulation(
                index=device.index,
                name=device.name,
                capacity=device.memory,
                budget=device.memory - (ledger.headroom if ledger else 0),
                planned={part: getattr(ledger, part) if ledger else 0 for part in LEDGER_PARTS},
                simulated_peak=tracker.peak.get(key, 0),
                simulated_prefill_peak=prefill_peak.get(key, 0),
                simulated_decode_peak=decode_peak.get(key, 0),
                simulated_weights=weights.get(key, 0),
                simulated_kv_cache=cache_held.get(key, 0),
            )
        )
    return SimulationReport(
        architecture=plan.model.architecture,
        dtype=plan.dtype,
        batch_size=batch,
        max_seq_len=seq,
        prefill_chunk_size=chunk,
        decode_steps=decode_steps,
        devices=devices,
        host_peak=tracker.peak.get("cpu", 0),
        elapsed_seconds=time.perf_counter() - started,
        error=error,
        notes=notes,
    )


# ---------------------------------------------------------------- tensor-parallel ranks


def _shard_tensor_parallel(model, ranks: int, device: str) -> None:
    """Give every parameter and buffer the shape one of `ranks` TP ranks holds, as fake tensors on `device`.

    The split follows the model's own TP plan with the same dimension table the ledger uses
    (planc.model.graph.TP_SHARD_DIM): ceil(dim / N) rows of a split dimension, the rest whole.
    """
    import torch

    from planc.model.graph import TP_SHARD_DIM

    expanded = model._expand_parallel_plan(dict(model.tp_plan))
    made: dict[int, Any] = {}
    for module_name, module in model.named_modules():
        for registry in (module._parameters, module._buffers):
            for local_name, tensor in list(registry.items()):
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    full_name = f"{module_name}.{local_name}" if module_name else local_name
                    style = expanded.get(full_name)
                    shape = list(tensor.shape)
                    rule = TP_SHARD_DIM.get(style) if registry is module._parameters else None
                    dim = rule(full_name, tensor.dim()) if rule is not None else None
                    if dim is not None:
                        shape[dim] = -(-shape[dim] // ranks)
                    fresh = torch.empty(shape, dtype=tensor.dtype, device=device)
                    made[id(tensor)] = torch.nn.Parameter(fresh, requires_grad=False) if registry is module._parameters else fresh
                registry[local_name] = made[id(tensor)]


def _install_collectives(model, ranks: int) -> list:
    """Forward hooks that allocate what the TP styles' collectives allocate.

    In transformers' inference path a rowwise Linear and the experts all-reduce their output in
    place (nothing new); a vocab-parallel embedding's redistribute returns a new tensor; a gathered
    output (the head) is all-gathered into a tensor the full width of the output.
    """
    import torch

    from planc.model.graph import TP_COLLECTIVE

    expanded = model._expand_parallel_plan(dict(model.tp_plan))
    modules = dict(model.named_modules())
    handles = []
    for name, style in expanded.items():
        module = modules.get(name)
        kind = TP_COLLECTIVE.get(style)
        if module is None or kind is None:
            continue
        if kind == "all_gather":
            def gather(module, args, output):
                return torch.empty(*output.shape[:-1], output.shape[-1] * ranks, dtype=output.dtype, device=output.device)

            handles.append(module.register_forward_hook(gather))
        elif style.startswith("embedding"):
            handles.append(module.register_forward_hook(lambda module, args, output: torch.empty_like(output)))
    return handles


def _simulate_one_rank(plan: Plan, lock_dir: Path, ranks: int, key: str, backends: list[str] | None, batch: int,
                       seq: int, chunk: int | None, decode_steps: int, notes: list[str]):
    """One rank's run on virtual device `key`: ((prefill, decode, cache, weights, overall) peaks, error)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _build_meta_model(plan, lock_dir)
    tracker = _make_tracker()
    stack = _ModuleStack(model)
    handles = []
    error = None
    prefill_peak, decode_peak, cache_held, weights = {}, {}, {}, {}
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), tracker:
            _shard_tensor_parallel(model, ranks, key)
            _bound_pooled_indexers(model)
            if getattr(model.config, "_experts_implementation", None) == "eager" and _bound_eager_experts(model):
                notes.append("eager MoE experts: each loop simulated at its worst iteration (one expert, every token)")
            handles = _install_collectives(model, ranks)
            tracker.start_phase()
            weights = dict(tracker.current)
            tracker.pinned = False
            with _make_device_shims({key: backends} if backends else {}):
                cache, prefill_peak, decode_peak = _run_generation(model, batch, seq, chunk, decode_steps, key, tracker)
            cache_held = _cache_bytes(cache, model)
            del cache
    except Exception as exc:  # noqa: BLE001 - any failure of the run is the plan's finding
        error = _execution_error(exc, stack.innermost())
    finally:
        for handle in handles:
            handle.remove()
        stack.remove()
    peaks = (prefill_peak.get(key, 0), decode_peak.get(key, 0), cache_held.get(key, 0), weights.get(key, 0),
             tracker.peak.get(key, 0))
    return peaks, error


def _rank_backends(plan: Plan, rank, key: str) -> dict[str, list[str]]:
    """The SDPA backends a rank's calls may take: its GPU's as in a one-process plan; a CPU rank the enabled
    ones (PyTorch's CPU flash kernel first), as a CPU-only plan."""
    if plan.attention.attn_implementation != "sdpa":
        return {}
    enabled = list(plan.attention.sdpa_backends)
    if not isinstance(rank.device, int):
        return {key: enabled}
    backend = plan.attention.per_device.get(str(rank.device), "math")
    later = enabled[enabled.index(backend) + 1 :] if backend in enabled else []
    return {key: [backend, *later]}


def _simulate_ranks(plan: Plan, lock_dir: Path, batch_size, max_seq_len, decode_steps: int) -> SimulationReport:
    """Each rank of a tensor-parallel plan on a virtual device of its own: its share of every tensor, the
    collectives' outputs allocated, the same prefill and decode steps as a one-process simulation."""
    from planc.memory import NCCL_COMMUNICATOR

    parallel = plan.parallel
    if parallel.strategy != "tensor":
        raise ModelError(
            f"planc simulate executes device_map and tensor-parallel plans; this one is {parallel.strategy} "
            f"(its ranks' ledgers are in `planc show`)"
        )
    started = time.perf_counter()
    _ensure_virtual_device()
    batch = batch_size or plan.workload.batch_size
    seq = max_seq_len or plan.workload.max_seq_len
    chunk = plan.generation.prefill_chunk_size
    notes = [f"{len(parallel.ranks)} tensor-parallel ranks, one virtual device each; collectives allocate their outputs"]
    if (batch, seq) != (plan.workload.batch_size, plan.workload.max_seq_len):
        notes.append(f"ran batch {batch} x {seq} tokens; the planned figures are the lock's")
    ledgers = {ledger.rank: ledger for ledger in plan.memory}
    devices = []
    error = None
    fake_logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_logger.level
    fake_logger.setLevel(logging.CRITICAL)
    try:
        # Every rank is given ceil(dim / N) of each split dimension, so ranks on the same kind of device
        # with the same attention backend run the same shapes: one run stands for all of them.
        runs: dict[tuple, tuple] = {}
        for rank in parallel.ranks:
            ledger = ledgers[rank.rank]
            key = _vgpu(rank.rank)
            name = next((d.name for d in plan.devices if d.index == rank.device and d.node == rank.node), "CPU rank")
            backends = _rank_backends(plan, rank, "device")
            kind = (name, tuple(backends.get("device", ())))
            if kind not in runs:
                runs[kind] = _simulate_one_rank(plan, lock_dir, parallel.tensor_parallel_size, key, backends.get("device"),
                                                batch, seq, chunk, decode_steps, notes)
                if len(runs) == 1 and len(parallel.ranks) > 1:
                    notes.append(f"rank {rank.rank}'s run stands for every rank on the same device kind (same shapes)")
            peaks, error = runs[kind]
            prefill_peak, decode_peak, cache_held, weights, peak = peaks
            # NCCL's communicator lives outside torch's allocator, like the CUDA context: with the reserve.
            nccl = NCCL_COMMUNICATOR if isinstance(rank.device, int) else 0
            planned = {part: getattr(ledger, part) for part in LEDGER_PARTS}
            planned["reserve"] += nccl
            devices.append(
                DeviceSimulation(
                    index=rank.rank, name=f"rank {rank.rank} " + name, capacity=ledger.capacity,
                    budget=ledger.capacity - ledger.headroom, planned=planned,
                    simulated_peak=peak, simulated_prefill_peak=prefill_peak,
                    simulated_decode_peak=decode_peak, simulated_weights=weights,
                    simulated_kv_cache=cache_held,
                )
            )
            if error:
                error = f"rank {rank.rank}: {error}"
                break
    finally:
        fake_logger.setLevel(level)
    return SimulationReport(
        architecture=plan.model.architecture, dtype=plan.dtype, batch_size=batch, max_seq_len=seq,
        prefill_chunk_size=chunk, decode_steps=decode_steps, devices=devices, host_peak=0,
        elapsed_seconds=time.perf_counter() - started, error=error, notes=list(dict.fromkeys(notes)),
    )

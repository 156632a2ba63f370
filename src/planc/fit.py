"""`planc fit`: before buying or renting, which inventories hold the spec's model and workload.

One model graph per dtype (built on the meta device once and reused), many solves, each the
compiler's own (`compile._place`, `compile._fits`, `compile_plan`), so whatever `fit` says fits,
`planc compile` places:
- the catalogue: for every card, the fewest of them (1 to `max_gpus`, one node) that hold the model
  on the GPUs alone (no offload: cards are what is being bought), cheapest first when the user gives
  prices, else by total memory;
- the spec's own inventory under the spec's own policy: does it fit, the largest context per batch
  size and the largest batch per context;
- when it does not fit: what would (a 16-bit dtype, quantization where planc can plan it, offload,
  more of the cards it has, a smaller workload).

Fitting is monotone in the number of identical cards (the solver may leave a card unused), so the
search per card starts at the count the weights alone need and stops at the first that fits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from planc.errors import InfeasibleError, ModelError, SpecError
from planc.hardware import Gpu, GpuModel, Inventory, load_catalogue, lookup_gpu, resolve_inventory
from planc.spec import Quantize, Spec, load_spec
from planc.units import GiB

DEFAULT_MAX_GPUS = 8
MAX_BATCH = 4096  # the largest batch the envelope looks for
UNBOUNDED_CONTEXT = 1 << 20  # context limit for configs that state none


@dataclass(frozen=True)
class CardFit:
    """The fewest cards of one catalogue kind that hold the workload, or why none do."""

    card: GpuModel
    count: int | None  # None: not within max_gpus (or the card cannot run the requested dtype)
    dtype: str | None = None
    decode_ms_per_token: float | None = None
    peak_utilisation: float | None = None
    prefill_chunk_size: int | None = None
    price: float | None = None  # count x the card's price, when prices were given
    reason: str | None = None  # why it does not fit
    weights_need: int | None = None  # cards the weights alone need, when that is more than max_gpus

    @property
    def total_memory(self) -> int:
        return (self.count or 0) * self.card.memory


@dataclass(frozen=True)
class Remedy:
    """One change that would make the spec fit, in the spec's own terms.

    `field` is a dotted spec key and `value` what to set it to; for `hardware.gpus` the value is
    an entry to append. Both are None for a remedy this planc cannot plan (it says why).
    """

    kind: str  # dtype | quantization | offload | gpus | workload
    field: str | None
    value: Any
    detail: str

    @property
    def change(self) -> str | None:
        if self.field is None:
            return None
        if self.field == "hardware.gpus":
            entry = ", ".join(f"{key}: {value}" for key, value in self.value.items())
            return f"hardware.gpus: + {{{entry}}}"
        return f"{self.field}: {self.value}"


@dataclass(frozen=True)
class InventoryFit:
    """The spec's own inventory under its own policy."""

    gpus: list[str]
    fits: bool
    decode_ms_per_token: float | None
    peak_utilisation: float | None
    prefill_chunk_size: int | None
    offloaded_units: int
    message: str | None  # the compiler's refusal when it does not fit
    largest_context: list[tuple[int, int]]  # (batch_size, largest max_seq_len; 0 = none)
    largest_batch: list[tuple[int, int]]  # (max_seq_len, largest batch_size; 0 = none)


@dataclass(frozen=True)
class FitReport:
    architecture: str
    parameters: int
    weight_bytes: int
    dtype: str
    batch_size: int
    max_seq_len: int
    context_limit: int
    max_gpus: int
    max_batch: int  # the largest batch the envelope looks for: a row at it means "at least"
    priced: bool
    cards: list[CardFit]  # fitting ones in order, then the ones that do not fit
    inventory: InventoryFit
    remedies: list[Remedy] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": {"architecture": self.architecture, "parameters": self.parameters,
                      "weight_bytes": self.weight_bytes, "dtype": self.dtype, "context_limit": self.context_limit},
            "workload": {"batch_size": self.batch_size, "max_seq_len": self.max_seq_len},
            "max_gpus": self.max_gpus,
            "max_batch_searched": self.max_batch,
            "order": "price" if self.priced else "total memory",
            "catalogue": [
                {
                    "card": fit.card.key, "name": fit.card.name, "count": fit.count,
                    "memory": fit.total_memory or None, "dtype": fit.dtype,
                    "decode_ms_per_token": fit.decode_ms_per_token, "peak_utilisation": fit.peak_utilisation,
                    "prefill_chunk_size": fit.prefill_chunk_size, "price": fit.price, "reason": fit.reason,
                    "weights_need": fit.weights_need,
                }
                for fit in self.cards
            ],
            "inventory": {
                "gpus": self.inventory.gpus, "fits": self.inventory.fits,
                "decode_ms_per_token": self.inventory.decode_ms_per_token,
                "peak_utilisation": self.inventory.peak_utilisation,
                "prefill_chunk_size": self.inventory.prefill_chunk_size,
                "offloaded_units": self.inventory.offloaded_units,
                "message": self.inventory.message,
                "largest_context": [{"batch_size": b, "max_seq_len": s} for b, s in self.inventory.largest_context],
                "largest_batch": [{"max_seq_len": s, "batch_size": b} for s, b in self.inventory.largest_batch],
            },
            "remedies": [
                {"kind": r.kind, "field": r.field, "value": r.value, "change": r.change, "detail": r.detail}
                for r in self.remedies
            ],
        }


class _Planner:
    """The spec's model, its graph built once per dtype, placed on any inventory by the compiler's own steps."""

    def __init__(self, spec: Spec, config: dict):
        self.spec = spec
        self.config = config
        self._graphs: dict[str, Any] = {}

    def build(self, config: dict, dtype: str, trust_remote_code: bool, quantization=None, kv_cache=None):
        """compile_plan's build_graph, cached: every inventory shares the graphs."""
        from planc.model import build_model_graph

        key = (dtype, quantization, kv_cache)
        if key not in self._graphs:
            self._graphs[key] = build_model_graph(config, dtype, trust_remote_code, quantization, kv_cache)
        return self._graphs[key]

    def runtime(self, gpus: tuple[Gpu, ...], requested_dtype: str | None = None, model=None):
        """(graph at the dtype the rules pick for these GPUs, runtime) as compile_plan decides them
        (a quantized model native or dequantized as the rules say for these GPUs). `model`: the
        spec's model section to plan (its quantize and kv_cache), the spec's own by default."""
        from planc.compile import _Builder, _model_facts
        from planc.model.quant import quantization_of
        from planc.rules import decide_runtime

        model = model or self.spec.model
        requested = requested_dtype or model.dtype
        probe_dtype = "bfloat16" if requested == "auto" else requested
        quantization = quantization_of(self.config, model.quantize, probe_dtype)
        builder = _Builder(self.config, model.trust_remote_code, model.kv_cache, quantization, model.quantize, self.build)
        dense = quantization.with_native(False) if quantization and quantization.origin == "checkpoint" else None
        probe = builder.graph(probe_dtype, dense)
        facts = _model_facts(probe, quantization.method if quantization else None)
        runtime = decide_runtime(gpus, facts, requested, self.spec.policy.mixer_kernels)
        return builder.for_runtime(runtime), runtime

    def place(self, inventory: Inventory, spec: Spec):
        """compile's placement for `spec`'s workload and policy on `inventory`: (graph, runtime, placement, chunk)."""
        from planc.compile import _place

        graph, runtime = self.runtime(inventory.gpus, spec.model.dtype, spec.model)
        placement, chunk, _ = _place(graph, inventory, runtime, spec)
        return graph, runtime, placement, chunk

    def fits(self, inventory: Inventory, spec: Spec, batch: int, seq: int) -> bool:
        from planc.compile import _fits

        graph, runtime = self.runtime(inventory.gpus, spec.model.dtype, spec.model)
        return _fits(graph, inventory, runtime, spec, batch, seq)


def _with_policy(spec: Spec, **changes) -> Spec:
    return spec.model_copy(update={"policy": spec.policy.model_copy(update=changes)})


def _with_model(spec: Spec, **changes) -> Spec:
    return spec.model_copy(update={"model": spec.model.model_copy(update=changes)})


def _cards(card: GpuModel, count: int) -> tuple[Gpu, ...]:
    return tuple(Gpu(i, card.name, card.memory, card.compute_capability, card.bandwidth, card.key) for i in range(count))


def read_prices(path: str | Path) -> dict[str, float]:
    """A YAML/JSON mapping of catalogue card (key, alias or driver name) to the price of one card."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read prices {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or not data:
        raise SpecError(f"{path}: expected a mapping of GPU card to the price of one card, e.g. 'h100-sxm: 2.49'")
    prices: dict[str, float] = {}
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise SpecError(f"{path}: {name}: price must be a non-negative number, got {value!r}")
        prices[lookup_gpu(str(name)).key] = float(value)
    return prices


def _fewest_cards(planner: _Planner, card: GpuModel, spec: Spec, max_gpus: int, price: float | None) -> CardFit:
    """The fewest cards of `card` that hold the model on the GPUs alone (spec's dtype, workload, policy)."""
    budget = int(card.memory * (1 - spec.policy.headroom))
    try:
        graph, _ = planner.runtime(_cards(card, 1), spec.model.dtype)
    except SpecError as exc:  # e.g. bfloat16 asked for on a card below sm80
        return CardFit(card, None, reason=str(exc))
    # The weights alone bound the count from below: every card holds its share plus more.
    start = max(1, -(-graph.weight_bytes // max(budget, 1)))
    for count in range(start, max_gpus + 1):
        inventory = Inventory(_cards(card, count), spec.hardware.cpu_memory, None)
        graph, runtime, placement, chunk = planner.place(inventory, spec)
        if placement is not None:
            return CardFit(
                card, count, runtime.dtype, round(placement.decode_seconds * 1000, 3),
                round(placement.peak_utilisation, 4), chunk, None if price is None else round(price * count, 6),
            )
    if start > max_gpus:
        reason = f"{graph.weight_bytes / GiB:.1f} GiB of weights in {graph.dtype} alone need {start}"
        return CardFit(card, None, graph.dtype, reason=reason, weights_need=start)
    return CardFit(card, None, graph.dtype, reason=f"weights, KV cache and activations need more than {max_gpus}")


def _catalogue(planner: _Planner, spec: Spec, max_gpus: int, prices: dict[str, float] | None) -> list[CardFit]:
    gpu_only = _with_policy(spec, offload="none")
    fits = [_fewest_cards(planner, card, gpu_only, max_gpus, (prices or {}).get(card.key)) for card in load_catalogue()]
    fitting = [fit for fit in fits if fit.count is not None]
    if prices is not None:
        # Priced cards cheapest first; cards without a price after them, by memory.
        fitting.sort(key=lambda f: (f.price is None, f.price or 0.0, f.total_memory, f.decode_ms_per_token))
    else:
        fitting.sort(key=lambda f: (f.total_memory, f.decode_ms_per_token, f.card.key))
    return fitting + [fit for fit in fits if fit.count is None]


def _context_limit(config: dict) -> int:
    """The longest context the model was made for (max_position_embeddings), or a large bound."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    limit = config.get("max_position_embeddings") or text.get("max_position_embeddings")
    return int(limit) if isinstance(limit, int) and limit > 0 else UNBOUNDED_CONTEXT


def _envelope(planner: _Planner, inventory: Inventory, spec: Spec, limit: int):
    """Largest context per batch size and largest batch per context, on the spec's inventory and policy."""
    from planc.compile import largest_below

    fits = lambda batch, seq: planner.fits(inventory, spec, batch, seq)  # noqa: E731
    batches = sorted({2**k for k in range(0, 7)} | {spec.workload.batch_size})
    contexts = sorted({2**k for k in range(10, 40) if 2**k < limit} | {limit, spec.workload.max_seq_len})
    by_batch = []
    for batch in batches:
        seq = largest_below(lambda s: fits(batch, s), limit + 1)
        by_batch.append((batch, seq))
        if not seq:
            break  # larger batches fit no context either
    by_context = []
    for seq in contexts:
        upper = 1
        while upper <= MAX_BATCH and fits(upper, seq):
            upper *= 2
        batch = largest_below(lambda b: fits(b, seq), min(upper, MAX_BATCH + 1))
        by_context.append((seq, batch))
        if not batch:
            break
    return by_batch, by_context


def _own_inventory(planner: _Planner, spec: Spec, model, limit: int) -> tuple[InventoryFit, Inventory]:
    """The spec compiled as `planc compile` compiles it (paths as if the lock lay beside the spec)."""
    from planc.compile import compile_plan, installed_packages

    inventory = resolve_inventory(spec.hardware)
    disk = spec.hardware.disk
    names = [gpu.name for gpu in inventory.gpus]
    by_batch, by_context = _envelope(planner, inventory, spec, limit)
    try:
        plan = compile_plan(spec, inventory, model, installed_packages(), disk, planner.build)
    except InfeasibleError as exc:
        return InventoryFit(names, False, None, None, None, 0, str(exc), by_batch, by_context), inventory
    offloaded = sum(1 for device in plan.device_map.values() if device in ("cpu", "disk"))
    return (
        InventoryFit(names, True, plan.objective.decode_ms_per_token, plan.objective.peak_utilisation,
                     plan.generation.prefill_chunk_size, offloaded, None, by_batch, by_context),
        inventory,
    )


def _remedies(planner: _Planner, spec: Spec, inventory: Inventory, own: InventoryFit, max_gpus: int) -> list[Remedy]:
    """What would make the spec's workload fit its inventory (called only when it does not)."""
    wl = spec.workload
    out: list[Remedy] = []

    def fits_with(candidate: Spec, on: Inventory = inventory) -> bool:
        try:
            return planner.place(on, candidate)[2] is not None
        except (SpecError, ModelError):
            return False  # the rules refuse it here (LLM.int8() below sm75), or transformers would

    if spec.model.dtype == "float32":
        if fits_with(_with_model(spec, dtype="auto")):
            out.append(Remedy("dtype", "model.dtype", "auto", "16-bit weights (the rules pick bfloat16 or float16) fit"))
    if inventory.gpus:
        for level in {"none": ["cpu", "disk"], "cpu": ["disk"], "disk": []}[spec.policy.offload]:
            placement = planner.place(inventory, _with_policy(spec, offload=level))[2]
            if placement is not None:
                folder = " (and hardware.disk: an offload folder)" if level == "disk" and not spec.hardware.disk else ""
                out.append(Remedy("offload", "policy.offload", level, f"{placement.offloaded_units} units offloaded"
                                  f"{folder}; {placement.decode_seconds * 1000:.1f} ms/token predicted"))
                break
    kinds: dict[tuple, Gpu] = {}
    for gpu in inventory.gpus:
        kinds.setdefault((gpu.name, gpu.memory, gpu.compute_capability, gpu.bandwidth), gpu)
    for gpu in kinds.values():
        for extra in range(1, max_gpus - len(inventory.gpus) + 1):
            added = tuple(
                Gpu(len(inventory.gpus) + i, gpu.name, gpu.memory, gpu.compute_capability, gpu.bandwidth, gpu.catalogue)
                for i in range(extra)
            )
            bigger = Inventory(inventory.gpus + added, inventory.cpu_memory, inventory.disk)
            if fits_with(spec, bigger):
                entry = (
                    {"type": gpu.catalogue, "count": extra}
                    if gpu.catalogue
                    else {"name": gpu.name, "memory": gpu.memory, "compute_capability": gpu.compute_capability,
                          "bandwidth": gpu.bandwidth, "count": extra}
                )
                out.append(Remedy("gpus", "hardware.gpus", entry, f"{len(bigger.gpus)} GPUs in all, the new ones last"))
                break
    seq = next((s for b, s in own.largest_context if b == wl.batch_size), 0)
    if seq:
        out.append(Remedy("workload", "workload.max_seq_len", seq, f"the longest context at batch {wl.batch_size}"))
    batch = next((b for s, b in own.largest_batch if s == wl.max_seq_len), 0)
    if batch and wl.batch_size > 1:
        out.append(Remedy("workload", "workload.batch_size", batch, f"the largest batch at {wl.max_seq_len} tokens"))
    # Quantization is what most people reach for first: bitsandbytes at load for a dense checkpoint,
    # an fp8 KV cache when the cache is what does not fit.
    if spec.model.quantize is None and not planner.config.get("quantization_config"):
        for method, what in (("bnb-8bit", "LLM.int8() weights"), ("bnb-4bit", "4-bit weights")):
            if fits_with(_with_model(spec, quantize=Quantize(method=method))):
                out.append(Remedy("quantization", "model.quantize", method, f"{what}, quantized by bitsandbytes at load"))
                break
    if spec.model.kv_cache is None and fits_with(_with_model(spec, kv_cache="fp8")):
        out.append(Remedy("quantization", "model.kv_cache", "fp8", "the KV cache at 1 byte per element (QuantizedCache)"))
    return out


def fit_spec(spec_path: str | Path, max_gpus: int = DEFAULT_MAX_GPUS, prices: str | Path | None = None) -> FitReport:
    """Which inventories hold the spec's model and workload, and what would make its own inventory fit."""
    from planc.compile import locate_model

    if max_gpus < 1:
        raise SpecError(f"max_gpus must be at least 1, got {max_gpus}")
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    price_list = read_prices(prices) if prices is not None else None
    location = locate_model(spec, spec_path.parent, spec_path.parent, hash_weights=False)
    config = location.model.config
    planner = _Planner(spec, config)
    # The envelope looks up to the model's own context limit, or the spec's context if it asks for more.
    limit = max(_context_limit(config), spec.workload.max_seq_len)
    own, inventory = _own_inventory(planner, spec, location.model, limit)
    cards = _catalogue(planner, spec, max_gpus, price_list)
    graph, runtime = planner.runtime(inventory.gpus)
    remedies = [] if own.fits else _remedies(planner, spec, inventory, own, max_gpus)
    return FitReport(
        architecture=graph.architecture, parameters=graph.parameters, weight_bytes=graph.weight_bytes,
        dtype=runtime.dtype, batch_size=spec.workload.batch_size, max_seq_len=spec.workload.max_seq_len,
        context_limit=limit, max_gpus=max_gpus, max_batch=MAX_BATCH, priced=price_list is not None, cards=cards, inventory=own,
        remedies=remedies,
    )


def fit_json(report: FitReport) -> str:
    return json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n"

"""Compatibility rules: the knowledge base in `rules/*.yaml` and the engine that applies it.

The knowledge (which dtype a GPU can run, which SDPA backend serves which architecture, which
environment a runner needs) lives in YAML so that it can be read, cited and reviewed on its own.
Each rule is

    - id: dtype.auto-fp16-below-sm80      # stable dotted name, recorded in the lock
      when: {requested_dtype: auto, any_gpu_sm_below: 80}
      effect: {dtype: float16}
      reason: "auto picks float16 because {gpus} ..."   # shown to users; {placeholders} allowed
      source: "huggingface/transformers#28731; ..."      # where the knowledge comes from

A file maps stage names to lists of rules. Stages run in the order of `STAGES`; inside a stage,
rules run in file order (files sorted by name) and every rule whose `when` holds applies. The
`kernels` stage is evaluated once per GPU. `when` is a conjunction of the keys in `_CONDITIONS`;
an unknown key, a key used before the stage that decides it, an unknown effect or placeholder is
an error when the file is loaded, not when a plan happens to reach the rule.

The engine is pure: no environment, clock, files (besides the bundled rules) or GPUs.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import yaml

from planc.errors import SpecError
from planc.hardware import Gpu

DTYPES = ("bfloat16", "float16", "float32")
BACKENDS = ("flash", "efficient", "cudnn", "math")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
STAGES = ("quantization", "dtype", "attention", "kernels", "sdpa", "env", "experts", "mixers", "dispatch")
WEIGHTS = ("native", "dequantized")
# The weight quantizations planc sizes: from a checkpoint's quantization_config, or at load (bnb-*).
QUANTIZATION_METHODS = ("fp8", "mxfp4", "compressed-tensors", "compressed-tensors-fp8", "gptq", "awq", "bnb-4bit", "bnb-8bit")
MIXER_PATHS = ("fallback", "kernels")
PER_GPU_STAGE = "kernels"

_RULE_KEYS = ("id", "when", "effect", "reason", "source")
_RULE_ID = re.compile(r"^[a-z0-9]+(\.[a-z0-9][a-z0-9-]*)+$")
_PLACEHOLDERS = frozenset(
    {
        "gpus",
        "sm",
        "gpu_count",
        "dtype",
        "requested_dtype",
        "checkpoint_dtype",
        "model_type",
        "head_dim",
        "attn_implementation",
        "arch_list",
        "skip_keys",
        "quantization",
        "mixer_families",
        "requested_mixer_kernels",
    }
)


@dataclass(frozen=True)
class ModelFacts:
    """What the rules need to know about the model (read from its config by the caller)."""

    model_type: str
    checkpoint_dtype: str | None
    is_moe: bool
    head_dim: int
    forced_attn_implementation: str | None
    skip_keys: tuple[str, ...]
    quantization: str | None = None  # planc's method name (planc.model.quant), None for dense weights
    # Families of the model's state-keeping sequence mixers (gated_deltanet, mamba2, ...), sorted.
    mixer_families: tuple[str, ...] = ()
    # transformers' generate runs the model in bfloat16 and float16 (not XLNet's: planc.model.attention.FP32_ONLY_ATTENTION).
    half_precision_generates: bool = True

    def __post_init__(self):
        # The caller normalises config.dtype; anything else here is a bug in the caller.
        if self.checkpoint_dtype not in (*DTYPES, None):
            raise ValueError(f"checkpoint_dtype must be one of {DTYPES} or None, got {self.checkpoint_dtype!r}")


@dataclass(frozen=True)
class RuleDecision:
    """One rule that applied: what it decided, why, and where that knowledge comes from."""

    id: str
    decision: str
    reason: str
    source: str


@dataclass(frozen=True)
class Runtime:
    """The runtime settings the rules chose for an inventory, a model and a requested dtype."""

    dtype: str
    attn_implementation: str
    sdpa_backends: tuple[str, ...]
    backend_per_gpu: dict[int, str]
    env: dict[str, str]
    experts_implementation: str | None
    decisions: tuple[RuleDecision, ...]
    quantized_weights: str | None = None  # native | dequantized, for a quantized model
    quantization_rule: str | None = None  # the rule that decided it
    requires_packages: tuple[str, ...] = ()  # requirement strings the run needs for the quantized kernels
    requires_sm: int | None = None  # the compute capability the quantized weights need on every GPU holding them
    # How linear-attention / SSM / conv layers run (None for models without them), and the
    # kernel packages that path needs: import name -> distribution.
    mixer_path: str | None = None
    mixer_requires: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    """One parsed rule. `when` holds (key, normalised value) pairs in file order."""

    id: str
    stage: str
    when: tuple[tuple[str, object], ...]
    effect: tuple[tuple[str, object], ...]
    reason: str
    source: str
    origin: str


@dataclass(frozen=True)
class RuleBook:
    """The loaded knowledge base: rules per stage, in evaluation order."""

    rules: tuple[Rule, ...]

    def stage(self, name: str) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.stage == name)


# --- evaluation state -------------------------------------------------------------------------


@dataclass
class _State:
    gpus: tuple[Gpu, ...]
    facts: ModelFacts
    requested_dtype: str
    requested_mixer_kernels: str = "fallback"
    dtype: str | None = None
    attn_implementation: str | None = None
    prefill_backend: str | None = None
    backend_priority: tuple[str, ...] = ()
    supported: dict[int, list[str]] = field(default_factory=dict)
    enabled: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    experts_implementation: str | None = None
    quantized_weights: str | None = None
    requires_packages: list[str] = field(default_factory=list)
    requires_sm: int | None = None
    mixer_path: str | None = None
    mixer_requires: dict[str, str] = field(default_factory=dict)
    setters: dict[str, str] = field(default_factory=dict)
    decisions: list[RuleDecision] = field(default_factory=list)
    gpu: Gpu | None = None  # the GPU a per-GPU rule is being evaluated for


# A condition answers None when it does not hold, otherwise the GPUs it is about (empty when it
# is not about particular GPUs); the GPUs fill the {gpus} and {sm} placeholders.
Match = tuple[Gpu, ...] | None


@dataclass(frozen=True)
class _Condition:
    parse: Callable[[object], object]
    test: Callable[[_State, object], Match]
    available_from: str = STAGES[0]
    per_gpu_only: bool = False


def _holds(flag: bool) -> Match:
    return () if flag else None


def _some(gpus: Iterable[Gpu]) -> Match:
    found = tuple(gpus)
    return found or None


def _parse_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _parse_range(value: object) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"expected [low, high], got {value!r}")
    low, high = (_parse_int(v) for v in value)
    if low > high:
        raise ValueError(f"empty range {value!r}")
    return low, high


def _parse_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _parse_choice(*allowed: str | None) -> Callable[[object], frozenset]:
    def parse(value: object) -> frozenset:
        values = value if isinstance(value, list) else [value]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise ValueError(f"expected one or a list of {list(allowed)}, got {value!r}")
        return frozenset(values)

    return parse


def _parse_names(value: object) -> frozenset:
    values = value if isinstance(value, list) else [value]
    if not values or not all(v is None or isinstance(v, str) for v in values):
        raise ValueError(f"expected a name or a list of names, got {value!r}")
    return frozenset(values)


def _in_range(gpu: Gpu, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= gpu.sm <= bounds[1]


def _supported_anywhere(state: _State, backends: frozenset) -> Match:
    return _some(g for g in state.gpus if backends.intersection(state.supported.get(g.index, ())))


def _not(state: _State, conditions: tuple[tuple[str, object], ...]) -> Match:
    return _holds(_evaluate(conditions, state) is None)


_CONDITIONS: dict[str, _Condition] = {
    "requested_dtype": _Condition(_parse_choice("auto", *DTYPES), lambda s, v: _holds(s.requested_dtype in v)),
    "requested_dtype_is_checkpoint_dtype": _Condition(
        _parse_bool, lambda s, v: _holds((s.requested_dtype == s.facts.checkpoint_dtype) == v)
    ),
    "checkpoint_dtype": _Condition(_parse_choice(*DTYPES, None), lambda s, v: _holds(s.facts.checkpoint_dtype in v)),
    "is_moe": _Condition(_parse_bool, lambda s, v: _holds(s.facts.is_moe == v)),
    "half_precision_generates": _Condition(_parse_bool, lambda s, v: _holds(s.facts.half_precision_generates == v)),
    "head_dim_at_most": _Condition(_parse_int, lambda s, v: _holds(s.facts.head_dim <= v)),
    "forced_attn_implementation": _Condition(
        _parse_names, lambda s, v: _holds(s.facts.forced_attn_implementation in v)
    ),
    "has_skip_keys": _Condition(_parse_bool, lambda s, v: _holds(bool(s.facts.skip_keys) == v)),
    # planc's name of the quantization method (planc.model.quant), null for dense weights.
    "quantization": _Condition(_parse_names, lambda s, v: _holds(s.facts.quantization in v)),
    "has_mixers": _Condition(_parse_bool, lambda s, v: _holds(bool(s.facts.mixer_families) == v)),
    # Some layer of the model has a sequence mixer of one of these families.
    "mixer_family": _Condition(_parse_names, lambda s, v: _holds(bool(v.intersection(s.facts.mixer_families)))),
    "requested_mixer_kernels": _Condition(
        _parse_choice(*MIXER_PATHS), lambda s, v: _holds(s.requested_mixer_kernels in v)
    ),
    "mixer_path": _Condition(_parse_choice(*MIXER_PATHS), lambda s, v: _holds(s.mixer_path in v), "mixers"),
    "has_gpus": _Condition(_parse_bool, lambda s, v: _holds(bool(s.gpus) == v)),
    "multi_gpu": _Condition(_parse_bool, lambda s, v: _holds((len(s.gpus) > 1) == v)),
    # Each any_gpu_* key needs some GPU of its own; they are not required to be the same GPU.
    "any_gpu_sm_below": _Condition(_parse_int, lambda s, v: _some(g for g in s.gpus if g.sm < v)),
    "any_gpu_sm_at_least": _Condition(_parse_int, lambda s, v: _some(g for g in s.gpus if g.sm >= v)),
    "any_gpu_sm_between": _Condition(_parse_range, lambda s, v: _some(g for g in s.gpus if _in_range(g, v))),
    # Holds vacuously without GPUs: pair it with `has_gpus: true`.
    "every_gpu_sm_at_least": _Condition(_parse_int, lambda s, v: _holds(all(g.sm >= v for g in s.gpus))),
    "dtype": _Condition(_parse_choice(*DTYPES), lambda s, v: _holds(s.dtype in v), available_from="attention"),
    "weights": _Condition(_parse_choice(*WEIGHTS), lambda s, v: _holds(s.quantized_weights in v), "dtype"),
    "attn_implementation": _Condition(
        _parse_choice(*ATTN_IMPLEMENTATIONS), lambda s, v: _holds(s.attn_implementation in v), "kernels"
    ),
    # Some GPU can run one of these backends (decided per GPU in the kernels stage).
    "backend_supported": _Condition(_parse_choice(*BACKENDS), _supported_anywhere, "sdpa"),
    # Per-GPU stage only: the GPU being evaluated.
    "sm_between": _Condition(_parse_range, lambda s, v: _holds(_in_range(s.gpu, v)), per_gpu_only=True),
    # `not` is parsed recursively in _parse_when; its value is a nested condition.
    "not": _Condition(lambda v: v, _not),
}


def _evaluate(conditions: tuple[tuple[str, object], ...], state: _State) -> Match:
    """None when a condition fails, else the union of the GPUs the conditions are about."""
    about: dict[int, Gpu] = {}
    for key, value in conditions:
        match = _CONDITIONS[key].test(state, value)
        if match is None:
            return None
        about.update((gpu.index, gpu) for gpu in match)
    return tuple(about[i] for i in sorted(about))


# --- effects ----------------------------------------------------------------------------------


def _parse_backends(value: object) -> tuple[str, ...]:
    return tuple(sorted(_parse_choice(*BACKENDS)(value), key=BACKENDS.index))


def _parse_priority(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or sorted(value) != sorted(BACKENDS):
        raise ValueError(f"expected every backend of {list(BACKENDS)} once, got {value!r}")
    return tuple(value)


def _parse_env(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"expected a mapping of names to quoted strings, got {value!r}")
    for text in value.values():
        _check_placeholders(text)
    return tuple(value.items())


def _parse_requirements(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"expected a list of requirement strings such as 'kernels>=0.18.2,<0.19', got {value!r}")
    from packaging.requirements import InvalidRequirement, Requirement

    for text in value:
        try:
            Requirement(text)
        except InvalidRequirement as err:
            raise ValueError(f"{text!r} is not a requirement: {err}") from None
    return tuple(value)


def _parse_text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a sentence, got {value!r}")
    _check_placeholders(value)
    return value


def _parse_true(value: object) -> bool:
    if value is not True:
        raise ValueError(f"expected true, got {value!r}")
    return True


def _parse_requires(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not value or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"expected a mapping of import names to distributions, got {value!r}")
    return tuple(value.items())


def _parse_one(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {list(allowed)}, got {value!r}")
        return value

    return parse


@dataclass(frozen=True)
class _Effect:
    parse: Callable[[object], object]
    stages: tuple[str, ...]


_PLAN_STAGES = tuple(stage for stage in STAGES if stage != PER_GPU_STAGE)
_EFFECTS: dict[str, _Effect] = {
    "error": _Effect(_parse_true, _PLAN_STAGES),
    "dtype": _Effect(_parse_one(*DTYPES, "requested", "checkpoint"), ("dtype",)),
    "attn_implementation": _Effect(_parse_one(*ATTN_IMPLEMENTATIONS), ("attention",)),
    "prefill_backend": _Effect(_parse_one(*BACKENDS), ("attention",)),
    "supports": _Effect(_parse_one(*BACKENDS), (PER_GPU_STAGE,)),
    "backend_priority": _Effect(_parse_priority, ("sdpa",)),
    "enable_backend": _Effect(_parse_backends, ("sdpa",)),
    "disable_backend": _Effect(_parse_backends, ("sdpa",)),
    "env": _Effect(_parse_env, ("sdpa", "env")),
    "experts_implementation": _Effect(_parse_one(*EXPERTS_IMPLEMENTATIONS), ("experts",)),
    "weights": _Effect(_parse_one(*WEIGHTS), ("quantization",)),
    "requires_packages": _Effect(_parse_requirements, ("quantization",)),
    "requires_sm": _Effect(_parse_int, ("quantization",)),
    "mixer_path": _Effect(_parse_one(*MIXER_PATHS), ("mixers",)),
    "requires": _Effect(_parse_requires, ("mixers",)),
    "note": _Effect(_parse_text, _PLAN_STAGES),
    "warn": _Effect(_parse_text, _PLAN_STAGES),
}


def _set_once(state: _State, rule: Rule, name: str, value: str) -> None:
    """Assign a single-valued setting; two rules disagreeing is a gap in the knowledge base."""
    current = getattr(state, name)
    if current is not None and current != value:
        raise RuntimeError(f"rules {state.setters[name]} and {rule.id} disagree on {name}: {current} vs {value}")
    setattr(state, name, value)
    state.setters[name] = rule.id


def _switch_backends(state: _State, rule: Rule, backends: tuple[str, ...], enable: bool) -> str:
    target, other = (state.enabled, state.disabled) if enable else (state.disabled, state.enabled)
    if set(backends) & set(other):
        raise RuntimeError(f"rule {rule.id} switches {', '.join(backends)} against an earlier rule")
    target.extend(b for b in backends if b not in target)
    return ", ".join(backends) + (" enabled" if enable else " disabled")


def _apply(rule: Rule, about: tuple[Gpu, ...], state: _State) -> None:
    """Carry out a rule's effects and record the decision."""
    text = _placeholders(state, about)
    phrases = []
    for key, value in rule.effect:
        if key == "error":
            raise SpecError(f"{rule.reason.format(**text)} (rule {rule.id})")
        if key == "dtype":
            chosen = {"requested": state.requested_dtype, "checkpoint": state.facts.checkpoint_dtype}.get(value, value)
            if chosen is None:
                raise RuntimeError(f"rule {rule.id} keeps the checkpoint's dtype, and the facts have none")
            _set_once(state, rule, "dtype", chosen)
            text["dtype"] = chosen
            phrases.append(f"dtype {chosen}")
        elif key in ("attn_implementation", "experts_implementation"):
            _set_once(state, rule, key, value)
            phrases.append(f"{key} {value}")
        elif key == "weights":
            _set_once(state, rule, "quantized_weights", value)
            phrases.append(f"{state.facts.quantization} weights {value}")
        elif key == "requires_packages":
            state.requires_packages.extend(v for v in value if v not in state.requires_packages)
            phrases.append("needs " + ", ".join(value))
        elif key == "requires_sm":
            _set_once(state, rule, "requires_sm", value)
            phrases.append(f"every GPU holding them sm{value}+")
        elif key == "mixer_path":
            _set_once(state, rule, key, value)
            phrases.append(f"{text['mixer_families']} layers on the {value} path")
        elif key == "requires":
            for module, distribution in value:
                state.mixer_requires.setdefault(module, distribution)
            phrases.append("requires " + ", ".join(f"{distribution} ({module})" for module, distribution in value))
        elif key == "prefill_backend":
            _set_once(state, rule, key, value)
            phrases.append(f"prefill attention on {value} on every GPU")
        elif key == "supports":
            for gpu in about:
                state.supported.setdefault(gpu.index, []).append(value)
            phrases.append(f"{value} eligible on {_gpu_indices(about)}")
        elif key == "backend_priority":
            state.backend_priority = value
            phrases.append("backend priority " + " > ".join(value))
        elif key in ("enable_backend", "disable_backend"):
            phrases.append(_switch_backends(state, rule, value, enable=key == "enable_backend"))
        elif key == "env":
            for name, template in value:
                setting = template.format(**text)
                if state.env.setdefault(name, setting) != setting:
                    raise RuntimeError(f"rule {rule.id} sets {name}={setting}, already {state.env[name]}")
            phrases.append(", ".join(f"{name}={state.env[name]}" for name, _ in value))
        elif key == "note":
            phrases.append(value.format(**text))
        elif key == "warn":
            phrases.append("warning: " + value.format(**text))
    state.decisions.append(RuleDecision(rule.id, "; ".join(phrases), rule.reason.format(**text), rule.source))


# --- placeholders -----------------------------------------------------------------------------


def _check_placeholders(template: str) -> None:
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if name not in _PLACEHOLDERS or spec or conversion:
            raise ValueError(f"unknown placeholder {{{name}}}; known: {', '.join(sorted(_PLACEHOLDERS))}")


def _index_list(indices: Sequence[int]) -> str:
    """0,1 / 0-7 / 0-3,6: runs of three or more collapse to a range."""
    parts: list[str] = []
    start = prev = indices[0]
    for index in [*indices[1:], None]:
        if index is not None and index == prev + 1:
            prev = index
            continue
        if prev - start >= 2:
            parts.append(f"{start}-{prev}")
        else:
            parts.extend(str(i) for i in range(start, prev + 1))
        if index is not None:
            start = prev = index
    return ",".join(parts)


def _gpu_indices(gpus: Sequence[Gpu]) -> str:
    return "GPU " + _index_list([g.index for g in gpus]) if gpus else "no GPU"


def _describe_gpus(gpus: Sequence[Gpu]) -> str:
    """GPU 0,1 (Tesla V100-SXM2-16GB, sm70), GPU 2 (NVIDIA GeForce RTX 3090, sm86)."""
    if not gpus:
        return "no GPU"
    groups: list[list[Gpu]] = []
    for gpu in gpus:
        if groups and (groups[-1][-1].name, groups[-1][-1].sm) == (gpu.name, gpu.sm):
            groups[-1].append(gpu)
        else:
            groups.append([gpu])
    return ", ".join(f"{_gpu_indices(group)} ({group[0].name}, sm{group[0].sm})" for group in groups)


def arch_list(gpus: Sequence[Gpu]) -> str:
    """TORCH_CUDA_ARCH_LIST for the inventory: every capability once, ascending, +PTX on the last."""
    capabilities = sorted({gpu.capability for gpu in gpus})
    entries = [f"{major}.{minor}" for major, minor in capabilities]
    if entries:
        entries[-1] += "+PTX"
    return " ".join(entries)


def _placeholders(state: _State, about: tuple[Gpu, ...]) -> dict[str, str]:
    facts = state.facts
    return {
        "gpus": _describe_gpus(about),
        "sm": "/".join(f"sm{sm}" for sm in sorted({g.sm for g in about})) or "no GPU",
        "gpu_count": str(len(state.gpus)),
        "dtype": state.dtype or state.requested_dtype,
        "requested_dtype": state.requested_dtype,
        "checkpoint_dtype": facts.checkpoint_dtype or "unspecified",
        "model_type": facts.model_type,
        "head_dim": str(facts.head_dim),
        "attn_implementation": state.attn_implementation or "undecided",
        "arch_list": arch_list(state.gpus),
        "skip_keys": ", ".join(facts.skip_keys) or "none",
        "quantization": facts.quantization or "none",
        "mixer_families": ", ".join(facts.mixer_families) or "no",
        "requested_mixer_kernels": state.requested_mixer_kernels,
    }


# --- loading ----------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_when(raw: object, stage: str) -> tuple[tuple[str, object], ...]:
    if not isinstance(raw, dict):
        raise ValueError(f"`when` must be a mapping, got {raw!r}")
    parsed = []
    for key, value in raw.items():
        condition = _CONDITIONS.get(key)
        if condition is None:
            raise ValueError(f"unknown condition key {key!r}; known: {', '.join(sorted(_CONDITIONS))}")
        if condition.per_gpu_only and stage != PER_GPU_STAGE:
            raise ValueError(f"condition {key!r} is only meaningful in the per-GPU stage {PER_GPU_STAGE!r}")
        if STAGES.index(stage) < STAGES.index(condition.available_from):
            raise ValueError(f"condition {key!r} is decided in stage {condition.available_from!r}, after {stage!r}")
        try:
            parsed.append((key, _parse_when(value, stage) if key == "not" else condition.parse(value)))
        except ValueError as err:
            raise ValueError(f"condition {key!r}: {err}") from None
    return tuple(parsed)


def _parse_effect(raw: object, stage: str) -> tuple[tuple[str, object], ...]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"`effect` must be a non-empty mapping, got {raw!r}")
    parsed = []
    for key, value in raw.items():
        effect = _EFFECTS.get(key)
        if effect is None:
            raise ValueError(f"unknown effect {key!r}; known: {', '.join(sorted(_EFFECTS))}")
        if stage not in effect.stages:
            raise ValueError(f"effect {key!r} is not allowed in stage {stage!r} (only in {', '.join(effect.stages)})")
        try:
            parsed.append((key, effect.parse(value)))
        except ValueError as err:
            raise ValueError(f"effect {key!r}: {err}") from None
    keys = {key for key, _ in parsed}
    if stage == PER_GPU_STAGE and keys != {"supports"}:
        raise ValueError(f"rules in stage {PER_GPU_STAGE!r} have exactly one effect, `supports`")
    if "error" in keys and len(keys) > 1:
        raise ValueError("a rule that fails has no other effect")
    return tuple(parsed)


def _parse_rule(raw: object, stage: str, origin: str) -> Rule:
    if not isinstance(raw, dict):
        raise ValueError(f"a rule must be a mapping, got {raw!r}")
    label = f"rule {raw.get('id', '?')!s}"
    missing = [key for key in _RULE_KEYS if key not in raw]
    if missing:
        raise ValueError(f"{label}: missing {', '.join(missing)}")
    extra = [str(key) for key in raw if key not in _RULE_KEYS]
    if extra:
        raise ValueError(f"{label}: unknown key {', '.join(extra)}; a rule has {', '.join(_RULE_KEYS)}")
    if not isinstance(raw["id"], str) or not _RULE_ID.match(raw["id"]):
        raise ValueError(f"{label}: id must be a dotted lowercase name like `dtype.bf16-needs-sm80`")
    if not isinstance(raw["source"], str) or not raw["source"].strip():
        raise ValueError(f"{label}: `source` must cite where the knowledge comes from")
    try:
        return Rule(
            id=raw["id"],
            stage=stage,
            when=_parse_when(raw["when"], stage),
            effect=_parse_effect(raw["effect"], stage),
            reason=" ".join(_parse_text(raw["reason"]).split()),
            source=" ".join(raw["source"].split()),
            origin=origin,
        )
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from None


def parse_rule_file(text: str, origin: str) -> tuple[Rule, ...]:
    """Parse one rules file (a mapping of stage name to a list of rules); SpecError if malformed."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
        if not isinstance(raw, dict):
            raise ValueError("expected a mapping of stage names to lists of rules")
        rules = []
        for stage, entries in raw.items():
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
            if not isinstance(entries, list):
                raise ValueError(f"stage {stage!r} must hold a list of rules")
            rules.extend(_parse_rule(entry, stage, origin) for entry in entries)
    except (ValueError, yaml.YAMLError) as err:
        raise SpecError(f"{origin}: {' '.join(str(err).split())}") from None
    return tuple(rules)


def build_rulebook(files: Iterable[tuple[str, str]]) -> RuleBook:
    """Combine (name, text) rule files into a RuleBook ordered by stage, then file name, then position."""
    rules: list[Rule] = []
    for origin, text in sorted(files):
        rules.extend(parse_rule_file(text, origin))
    seen: dict[str, str] = {}
    for rule in rules:
        if rule.id in seen:
            raise SpecError(f"{rule.origin}: rule id {rule.id} is also defined in {seen[rule.id]}")
        seen[rule.id] = rule.origin
    return RuleBook(tuple(sorted(rules, key=lambda rule: STAGES.index(rule.stage))))


@lru_cache(maxsize=1)
def load_rulebook() -> RuleBook:
    """The bundled knowledge base, planc/rules/*.yaml."""
    folder = resources.files("planc").joinpath("rules")
    return build_rulebook(
        (entry.name, entry.read_text(encoding="utf-8")) for entry in folder.iterdir() if entry.name.endswith(".yaml")
    )


# The one variable `planc run` sets itself rather than through a rule (planc.run.apply, on GPU plans:
# cuBLAS reads it when it initialises), with the values cuBLAS accepts (":4096:8", ":16:8", several).
CUBLAS_WORKSPACE_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
RUNNER_ENV = {CUBLAS_WORKSPACE_VARIABLE: r"(:[0-9]+:[0-9]+)+"}
# What a placeholder of an env template can become: GPU lists, arch lists, dtypes, model types.
_PLACEHOLDER_VALUE = r"[A-Za-z0-9_.+,;: -]*"


@lru_cache(maxsize=1)
def allowed_env() -> dict[str, re.Pattern]:
    """The environment a lock may set: each variable some rule (or the runner) produces, with the
    pattern of the values it can produce. `planc run` refuses a lock whose env goes beyond it."""
    allowed: dict[str, list[str]] = {name: [pattern] for name, pattern in RUNNER_ENV.items()}
    for rule in load_rulebook().rules:
        for key, value in rule.effect:
            if key == "env":
                for name, template in value:
                    allowed.setdefault(name, []).append(_template_pattern(template))
    return {name: re.compile("|".join(f"(?:{p})" for p in patterns)) for name, patterns in sorted(allowed.items())}


def allowed_requires() -> dict[str, str]:
    """The packages a lock may ask the runner to import (import name -> distribution): those some
    rule's `requires` names. `planc run` imports them to check a kernel path, so a lock naming any
    other module is refused rather than imported."""
    allowed: dict[str, str] = {}
    for rule in load_rulebook().rules:
        for key, value in rule.effect:
            if key == "requires":
                allowed.update(value)
    return dict(sorted(allowed.items()))


def allowed_requirements() -> set[str]:
    """The requirement strings a lock's quantization section may name: those some rule's
    `requires_packages` gives (a lock is a file anyone can edit and re-hash)."""
    return {
        requirement
        for rule in load_rulebook().rules
        for key, value in rule.effect
        if key == "requires_packages"
        for requirement in value
    }


def _template_pattern(template: str) -> str:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(_PLACEHOLDER_VALUE)
    return "".join(parts)


# --- the engine -------------------------------------------------------------------------------


def decide_runtime(
    gpus: Sequence[Gpu], facts: ModelFacts, requested_dtype: str, mixer_kernels: str = "fallback"
) -> Runtime:
    """Apply the knowledge base. requested_dtype is "auto" | "bfloat16" | "float16" | "float32";
    mixer_kernels ("fallback" | "kernels") is how the policy asks linear-attention / SSM layers to run.

    Raises SpecError when the request cannot work on the inventory (bfloat16 below sm80, CUDA
    kernels without a GPU).
    """
    if requested_dtype not in ("auto", *DTYPES):
        raise SpecError(f"dtype must be auto, {', '.join(DTYPES)}; got {requested_dtype!r}")
    if mixer_kernels not in MIXER_PATHS:
        raise SpecError(f"mixer_kernels must be one of {', '.join(MIXER_PATHS)}; got {mixer_kernels!r}")
    book = load_rulebook()
    state = _State(
        gpus=tuple(sorted(gpus, key=lambda g: g.index)),
        facts=facts,
        requested_dtype=requested_dtype,
        requested_mixer_kernels=mixer_kernels,
    )
    for stage in STAGES:
        for rule in book.stage(stage):
            if stage == PER_GPU_STAGE:
                about = tuple(gpu for gpu in state.gpus if _evaluate_for(rule, state, gpu) is not None)
                if about:
                    _apply(rule, about, state)
                continue
            about = _evaluate(rule.when, state)
            if about is not None:
                _apply(rule, about or state.gpus, state)
        if stage == "quantization" and facts.quantization and state.quantized_weights is None:
            raise RuntimeError(f"no quantization rule decides native or dequantized for {facts.quantization}")
        if stage == "dtype" and state.dtype is None:
            raise RuntimeError(f"no dtype rule matched requested {requested_dtype!r} on {_describe_gpus(state.gpus)}")
        if stage == "mixers" and facts.mixer_families and state.mixer_path is None:
            raise RuntimeError(f"no mixers rule chose a path for {', '.join(facts.mixer_families)} layers")
    return _runtime(state)


def _evaluate_for(rule: Rule, state: _State, gpu: Gpu) -> Match:
    state.gpu = gpu
    try:
        return _evaluate(rule.when, state)
    finally:
        state.gpu = None


def _runtime(state: _State) -> Runtime:
    if state.attn_implementation is None or not state.backend_priority:
        raise RuntimeError("the knowledge base set no attn_implementation or no SDPA backend priority")
    offered = set(state.enabled).union(*map(set, state.supported.values()))
    enabled = tuple(b for b in state.backend_priority if b in offered and b not in state.disabled)
    per_gpu = {}
    for gpu in state.gpus:
        if state.prefill_backend is not None:
            per_gpu[gpu.index] = state.prefill_backend
            continue
        usable = [b for b in enabled if b in state.supported.get(gpu.index, ())]
        if not usable:
            raise RuntimeError(f"no enabled SDPA backend serves {_describe_gpus([gpu])}")
        per_gpu[gpu.index] = usable[0]
    return Runtime(
        dtype=state.dtype,
        attn_implementation=state.attn_implementation,
        sdpa_backends=enabled,
        backend_per_gpu=per_gpu,
        env=dict(sorted(state.env.items())),
        experts_implementation=state.experts_implementation,
        decisions=tuple(state.decisions),
        quantized_weights=state.quantized_weights,
        quantization_rule=state.setters.get("quantized_weights"),
        requires_packages=tuple(state.requires_packages),
        requires_sm=state.requires_sm,
        mixer_path=state.mixer_path,
        mixer_requires=dict(sorted(state.mixer_requires.items())),
    )

"""Put the plan's settings in force: environment first (before CUDA initialises), then torch's switches.

Both are context managers that restore what they changed, so a Python caller (a test, a notebook)
gets its process back as it was; the CLI exits anyway. With `keep=True` (planc.load, which hands
the model to the caller's code) they stay in force after a successful block, and are restored
only when the block fails: a refused load leaves the process as it found it.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from planc.errors import RunError
from planc.plan import Plan
from planc.rules import CUBLAS_WORKSPACE_VARIABLE

SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
# cuBLAS picks non-deterministic reduction orders unless its workspace is fixed (PyTorch's
# "Reproducibility" notes); the variable is read when cuBLAS initialises, so it belongs to the env.
CUBLAS_WORKSPACE = ":4096:8"


def plan_environment(plan: Plan, inherited: dict[str, str] | None = None) -> dict[str, str]:
    """The variables the run sets: the lock's env (checked against rules.allowed_env by
    run.trust), plus the cuBLAS workspace on GPU plans (a workspace setting the process already
    has is kept). `inherited` defaults to os.environ; an export passes {} to write the plan's own
    values."""
    inherited = os.environ if inherited is None else inherited
    env = dict(plan.env)
    if plan.devices:
        env.setdefault(CUBLAS_WORKSPACE_VARIABLE, inherited.get(CUBLAS_WORKSPACE_VARIABLE, CUBLAS_WORKSPACE))
    return env


@contextmanager
def applied_environment(plan: Plan, keep: bool = False) -> Iterator[dict[str, str]]:
    """Set the plan's environment variables for the duration of the run (for good with `keep`).

    They must be in place before anything initialises CUDA, GPU detection included (the driver reads
    CUDA_DEVICE_ORDER and CUDA_VISIBLE_DEVICES once); a process that already did is refused rather
    than run under settings that silently do not apply.
    """
    env = plan_environment(plan)
    torch = sys.modules.get("torch")
    if env and torch is not None and torch.cuda.is_initialized():
        changed = sorted(name for name, value in env.items() if os.environ.get(name) != value)
        if changed:
            raise RunError(
                f"CUDA is already initialised in this process, so the plan's {', '.join(changed)} cannot take "
                "effect; run the plan in a fresh process (planc run)"
            )
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    try:
        yield env
    except BaseException:
        restore()
        raise
    if not keep:
        restore()


@contextmanager
def torch_settings(plan: Plan, keep: bool = False) -> Iterator[None]:
    """Seed and deterministic algorithms (warn-only: an op without a deterministic kernel still runs)."""
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(plan.generation.seed)

    def restore() -> None:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn

    try:
        yield
    except BaseException:
        restore()
        raise
    if not keep:
        restore()


def sdpa_backends(plan: Plan) -> list:
    """The lock's SDPA backends as torch enums, in the lock's priority order."""
    from torch.nn.attention import SDPBackend

    unknown = [name for name in plan.attention.sdpa_backends if name not in SDPA_BACKENDS]
    if unknown:
        raise RunError(f"the plan names SDPA backends this planc does not know: {', '.join(unknown)}")
    return [getattr(SDPBackend, SDPA_BACKENDS[name]) for name in plan.attention.sdpa_backends]


@contextmanager
def pinned_attention(plan: Plan) -> Iterator[None]:
    """Only the plan's SDPA backends, tried in its order (torch.nn.attention.sdpa_kernel, set_priority)."""
    from torch.nn.attention import sdpa_kernel

    backends = sdpa_backends(plan)
    if not backends:  # an eager plan never calls SDPA; an empty set would make any call fail
        yield
        return
    with sdpa_kernel(backends, set_priority=True):
        yield


def attach_plan(model, tokenizer, plan: Plan) -> None:
    """Make a model handed to the caller carry the plan by itself: its generation_config holds the
    plan's decoding settings (prefill chunk included), and each forward runs with only the plan's
    SDPA backends (hooks on the model, so other models in the process keep torch's defaults)."""
    from torch.nn.attention import sdpa_kernel

    from planc.run.generate import generation_settings

    for name, value in generation_settings(plan).items():
        setattr(model.generation_config, name, value)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    backends = sdpa_backends(plan)
    if not backends:
        return
    active: list = []

    def pin(module, args):
        context = sdpa_kernel(backends, set_priority=True)
        context.__enter__()
        active.append(context)

    def unpin(module, args, output):
        if active:
            active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(pin)
    model.register_forward_hook(unpin, always_call=True)  # also when the forward raises

"""planc as a library: the functions `import planc` offers, each the one the matching command calls.

Nothing here imports torch, transformers or accelerate until a function needs them (`load`,
`from_pretrained_kwargs`, and `compile`, which builds the model on the meta device). The other
commands' functions live in their modules: `planc.diff.diff_locks`, `planc.fit.fit_spec`,
`planc.export.export_plan`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from planc.errors import UsageError
from planc.plan import Plan

PathLike = Union[str, "os.PathLike[str]"]


def compile(spec_path: PathLike, lock_path: PathLike | None = None, *, write: bool = False) -> Plan:
    """Compile a spec into a plan (`planc compile`).

    Paths in the plan are relative to `lock_path` (default: plan.lock beside the spec); with
    `write=True` the lock is written there, atomically and only when its bytes change.
    Raises SpecError, ModelError or InfeasibleError (whose message says what would fit).
    """
    from planc.compile import compile_spec, default_lock_path
    from planc.plan import write_if_changed

    lock = Path(lock_path) if lock_path is not None else default_lock_path(Path(spec_path))
    plan, text = compile_spec(spec_path, lock)
    if write:
        write_if_changed(lock, text)
    return plan


def check(spec_path: PathLike, lock_path: PathLike | None = None) -> list[str]:
    """What makes a committed lock stale (`planc compile --check`); an empty list when it is fresh.

    Reads only the recorded inputs: no torch. Raises StalePlanError when the lock does not exist.
    """
    from planc.compile import check_lock

    return check_lock(spec_path, lock_path)


def load_plan(lock_path: PathLike) -> Plan:
    """Read a lock and verify its format version and plan_hash (LockError, TamperedLockError)."""
    from planc.plan import load_lock

    return load_lock(lock_path)


def load(lock_path: PathLike, *, progress: bool = False) -> tuple[Any, Any]:
    """`model, tokenizer = planc.load("plan.lock")`: what `planc run` does before it generates.

    Checks the machine, packages and model files against the lock (DriftError lists every
    mismatch), sets the plan's environment, loads with the lock's device_map, max_memory and dtype,
    and verifies the placement (RunError otherwise). What stays in force once it returns, since the
    model is used after it:
    - the plan's environment variables stay set (CUDA reads them once, at initialisation: restoring
      them would leave os.environ describing another process than the one running);
    - torch's deterministic algorithms (warn-only) and cuDNN's deterministic mode stay on, and the
      plan's seed has been set; `torch.use_deterministic_algorithms(False)` turns them off;
    - the model itself carries the plan's SDPA backends (a forward hook pins them for each of its
      forwards, not for the rest of the process) and its decoding settings
      (`model.generation_config`: greedy, the plan's prefill chunk, the tokenizer's pad token), so
      `model.generate(**inputs, max_new_tokens=...)` runs as `planc run` does.
    A failed load restores the environment and torch settings. Batches beyond the plan's
    batch_size x max_seq_len are not checked here, as `planc run` checks them: they may not fit.
    """
    from planc.plan import load_lock
    from planc.run.session import open_session

    lock_path = Path(lock_path)
    plan = load_lock(lock_path)
    console = None
    if progress:
        from planc.run.report import make_console

        console = make_console()
    with open_session(plan, lock_path.parent, console, keep=True) as session:
        return session.model, session.tokenizer


def from_pretrained_kwargs(plan: Plan | PathLike, lock_dir: PathLike | None = None) -> dict[str, Any]:
    """Keyword arguments for `AutoModelForCausalLM.from_pretrained` that place the model as the plan says.

    `plan` is a Plan or a lock's path. An offload folder is resolved against `lock_dir` (the lock's
    folder when a path is given). Nothing is checked and no environment is set: set the plan's
    `env` before CUDA initialises (`planc export --to transformers` writes both).
    """
    from planc.plan import load_lock
    from planc.run.load import from_pretrained_arguments

    if not isinstance(plan, Plan):
        lock_dir = Path(lock_dir) if lock_dir is not None else Path(plan).parent
        plan = load_lock(plan)
    if lock_dir is None:
        if "disk" in plan.device_map.values():
            raise UsageError("the plan offloads to disk: pass lock_dir, the folder its host.disk is relative to")
        lock_dir = "."
    return from_pretrained_arguments(plan, Path(lock_dir))

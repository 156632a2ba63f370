"""planc: compile a model, a GPU inventory and a workload into a locked deployment plan.

    import planc
    plan = planc.compile("spec.yaml")                 # a Plan; write=True writes plan.lock
    model, tokenizer = planc.load("plan.lock")        # checked, placed and pinned as planned
    kwargs = planc.from_pretrained_kwargs("plan.lock")

`import planc` is light: the names below load on first use, and only `load`, `compile` and
`from_pretrained_kwargs` import torch, when called.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from planc.api import check, compile, from_pretrained_kwargs, load, load_plan
    from planc.errors import (
        DriftError,
        InfeasibleError,
        LockError,
        ModelError,
        PlancError,
        RunError,
        SpecError,
        StalePlanError,
        TamperedLockError,
        UsageError,
    )
    from planc.plan import Plan

_FUNCTIONS = ("check", "compile", "from_pretrained_kwargs", "load", "load_plan")
_ERRORS = ("DriftError", "InfeasibleError", "LockError", "ModelError", "PlancError", "RunError", "SpecError",
           "StalePlanError", "TamperedLockError", "UsageError")
_API = {**{name: "planc.api" for name in _FUNCTIONS}, **{name: "planc.errors" for name in _ERRORS}, "Plan": "planc.plan"}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    # Resolved on first access (PEP 562), so `import planc` imports nothing else.
    if name not in _API:
        raise AttributeError(f"module 'planc' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """`planc.compile` is the API function although a submodule has that name: importing a submodule
    sets it as an attribute of its package, which would replace the function. The submodule stays in
    sys.modules, where `from planc.compile import ...` finds it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""The executor: `run_plan` checks a machine against a lock, applies it, loads the model and generates.

`open_session` is the part before generating (checks, environment, torch settings, load, placement
check), shared by `planc run`, the server and the Python API. The names below are imported on
first use, so that light consumers of the package's torch-free modules (`planc.run.load`'s
argument builders, `planc.run.apply`'s environment, used by `planc export`) pay for nothing else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planc.run.execute import RunOutcome, run_plan
    from planc.run.session import Session, open_session

_EXPORTS = {
    "RunOutcome": "planc.run.execute",
    "run_plan": "planc.run.execute",
    "Session": "planc.run.session",
    "open_session": "planc.run.session",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""The executor: `run_plan` checks a machine against a lock, applies it, loads the model and generates.

`open_session` is the part before generating (checks, environment, torch settings, load, placement
check), shared by `planc run`, the server and the Python API.
"""

from planc.run.execute import RunOutcome, run_plan
from planc.run.session import Session, open_session

__all__ = ["RunOutcome", "Session", "open_session", "run_plan"]

"""The executor: `run_plan` checks a machine against a lock, applies it, loads the model and generates."""

from planc.run.execute import RunOutcome, run_plan

__all__ = ["RunOutcome", "run_plan"]

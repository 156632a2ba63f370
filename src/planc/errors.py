"""Typed errors. The CLI maps each to one line on stderr and an exit code."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class PlancError(Exception):
    """Base of every error planc reports to a user (never a bug)."""

    exit_code = 2


class SpecError(PlancError):
    """The spec (or another input file) is malformed or names something unknown."""


class ModelError(PlancError):
    """The model cannot be read or is of a kind planc cannot plan correctly."""


class UsageError(PlancError):
    """A command's arguments ask for more than the plan was made for (more prompts, longer sequences)."""


class InfeasibleError(PlancError):
    """No placement fits the inventory under the policy."""


class LockError(PlancError):
    """A lock file cannot be read: missing, bad YAML, unknown format version, invalid fields."""


class TamperedLockError(LockError):
    """A lock's contents do not match its plan_hash: a failed check, not bad input."""

    exit_code = 1


class StalePlanError(PlancError):
    """The committed lock differs from what the spec compiles to."""

    exit_code = 1


class DriftError(PlancError):
    """The machine (or model files, or packages) no longer match the plan."""

    exit_code = 1

    def __init__(self, mismatches: list[str]):
        self.mismatches = list(mismatches)
        super().__init__("the machine does not match the plan: " + "; ".join(self.mismatches))


class RunError(PlancError):
    """Executing a plan failed after the checks passed."""

    exit_code = 1


@contextmanager
def foreign_errors(error: type[PlancError], what: str) -> Iterator[None]:
    """Run third-party code on user input: any exception but a PlancError becomes `error` (one line).

    transformers builds an architecture from whatever a config.json says, and many default or
    hand-edited configs make it (or planc's reading of the result) raise ZeroDivisionError,
    TypeError, KeyError, AttributeError, IndexError, AssertionError or its own classes. Each is a
    model planc cannot plan, not a crash: the message names what was being built and the exception.
    """
    try:
        yield
    except PlancError:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary around foreign code is the point
        message = " ".join(str(exc).split())
        if len(message) > 300:
            message = message[:297] + "..."
        raise error(f"{what}: {type(exc).__name__}: {message}" if message else f"{what}: {type(exc).__name__}") from exc

"""Byte sizes and bandwidths as users write them ("24GiB", "80GB", "936GB/s") and as planc prints them."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
GiB = 2**30
# No machine planc plans for has a PiB of memory or moves a PiB per second; a larger number is a
# typo, and past about 1e308 it would not even survive the float arithmetic of a message.
MAX_BYTES = 2**50


def parse_size(value: int | float | str) -> int:
    """Parse a byte count: an integer, or a number with a unit (B, KB..TB decimal, KiB..TiB binary)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return _bounded(value, value)
    if isinstance(value, float):
        if value < 0 or not value.is_integer():
            raise ValueError(f"size in bytes must be a whole number: {value}")
        return _bounded(value, value)
    if not isinstance(value, str):
        raise ValueError(f"not a size: {type(value).__name__} (write e.g. 24GiB, 80GB, 512MiB or a byte count)")
    match = _SIZE.match(value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (write e.g. 24GiB, 80GB, 512MiB or a byte count)")
    number, unit = match.groups()
    result = float(number) * _UNITS[unit.lower()]
    if not result.is_integer() and _UNITS[unit.lower()] == 1:
        raise ValueError(f"size in bytes must be a whole number: {value!r}")
    return _bounded(result, value)


def _bounded(result: int | float, value) -> int:
    if result > MAX_BYTES:  # also catches inf, before int() or round() would overflow
        shown = value if len(str(value)) <= 30 else str(value)[:27] + "..."
        raise ValueError(f"{shown} is above planc's upper bound of 1 PiB (2**50 bytes)")
    return int(round(result))


def parse_bandwidth(value: int | float | str) -> int:
    """Parse a bandwidth in bytes per second: a number, or a size followed by '/s' ("936GB/s")."""
    if isinstance(value, str):
        text = value.strip()
        if not text.lower().endswith("/s"):
            raise ValueError(f"not a bandwidth: {value!r} (write e.g. 936GB/s)")
        return parse_size(text[:-2])
    return parse_size(value)


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ns|us|µs|ms|s)\s*$")
_DURATION_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9}


def parse_duration(value: int | float | str) -> int:
    """Parse a duration as whole nanoseconds: a number of nanoseconds, or a number with ns/us/ms/s ("5us")."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or not float(value).is_integer():
            raise ValueError(f"duration in nanoseconds must be a whole, non-negative number: {value!r}")
        return int(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (write e.g. 5us, 0.02ms or a count of nanoseconds)")
    return int(round(float(match.group(1)) * _DURATION_UNITS[match.group(2)]))


def gib(n_bytes: int | float) -> float:
    """Bytes as GiB, for messages and tables."""
    return n_bytes / GiB


def fmt_gib(n_bytes: int | float, digits: int = 1) -> str:
    """Bytes formatted as 'X.Y GiB'."""
    return f"{n_bytes / GiB:.{digits}f} GiB"

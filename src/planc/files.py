"""Reading the files users hand planc (specs, locks, config.json, prompts, records): bounded and typed.

Every reader here turns what can go wrong with a file into the caller's PlancError with one line:
missing or unreadable, not a regular file (a FIFO or /dev/zero would block or never end), larger
than any real input of its kind, not UTF-8, not valid YAML or JSON, nested deeper than the parser's
recursion. Nothing here knows what the document means; spec.py and plan.py validate that.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from planc.errors import PlancError

# Real inputs are far smaller: a lock of DeepSeek-V3 on 8 GPUs is 12 KB, a config.json rarely
# 100 KB. The caps only stop a wrong file (a log, a checkpoint, a device) from being parsed for minutes.
YAML_LIMIT = 4 * 2**20
JSON_LIMIT = 16 * 2**20
TEXT_LIMIT = 64 * 2**20


def read_bytes(path: str | Path, what: str, error: type[PlancError], limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, or `error` saying why not."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer; regular files ignore it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise error(f"cannot read {what} {path}: not a regular file")
            data = handle.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a path with a NUL byte
        raise error(f"cannot read {what} {path!r}: {exc}") from None
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {limit // 2**20} MiB: not a {what}")
    return data


def decode_utf8(data: bytes, source: str, error: type[PlancError]) -> str:
    """Text of UTF-8 bytes (a leading BOM is dropped), or `error` naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def read_text(path: str | Path, what: str, error: type[PlancError], limit: int = TEXT_LIMIT) -> str:
    """A UTF-8 text file (see read_bytes and decode_utf8)."""
    return decode_utf8(read_bytes(path, what, error, limit), str(path), error)


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no Python objects)."""


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: documents planc writes never have them, and an alias chain
    (a "billion laughs") expands exponentially once the document is hashed or dumped."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor}: planc never writes YAML aliases", event.start_mark
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str, error: type[PlancError], aliases: bool = True) -> Any:
    """Parse YAML with the safe loader; syntax errors and absurd nesting become `error` (one line)."""
    try:
        return yaml.load(text, Loader=_SafeLoader if aliases else _NoAliasLoader)  # noqa: S506 - safe loaders
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
        raise error(f"{source}:{where} not valid YAML: {problem}") from None
    except RecursionError:
        raise error(f"{source}: not valid YAML: nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors fail in their own ways
        # A date like 2024-13-01 (ValueError), an integer of more digits than
        # sys.get_int_max_str_digits() (ValueError), `!!timestamp 1` (AttributeError): the text is
        # bad input whatever PyYAML raises for it.
        raise error(f"{source}: not valid YAML: {type(exc).__name__}: {exc}") from None


def parse_json(data: bytes | str, source: str, error: type[PlancError]) -> Any:
    """Parse JSON (UTF-8 when bytes); syntax errors, bad encoding and absurd nesting become `error`."""
    text = decode_utf8(data, source, error) if isinstance(data, bytes) else data
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{source}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise error(f"{source}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
        raise error(f"{source}: not valid JSON ({exc})") from None

"""sha256 of model files, cached by (path, size, mtime) so that a second check is instant."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from planc.errors import ModelError
from planc.plan import WeightFile, write_if_changed

CHUNK = 8 * 2**20


def cache_path() -> Path:
    root = os.environ.get("PLANC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "planc"
    )
    return Path(root) / "file-hashes.json"


def _load_cache() -> dict:
    """The cache, or an empty one when it is missing or damaged (it only saves time)."""
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached(entry: object, size: int, mtime_ns: int) -> str | None:
    if (
        isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]
    return None


def hash_files(
    folder: Path, files: Iterable[Path], progress: Callable[[str, int, int], None] | None = None
) -> dict[str, WeightFile]:
    """sha256 and size of each file, keyed by its path relative to `folder`.

    `progress(name, done_bytes, total_bytes)` is called while hashing files the cache cannot answer.
    """
    cache = _load_cache()
    result: dict[str, WeightFile] = {}
    changed = False
    for path in sorted(files):
        try:
            stat = path.stat()
            key = str(path.resolve())
            digest = _cached(cache.get(key), stat.st_size, stat.st_mtime_ns)
            if digest is None:
                digest = _sha256(path, stat.st_size, progress)
                cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
                changed = True
        except OSError as exc:
            raise ModelError(f"cannot read weight file {path}: {exc.strerror or exc}") from None
        result[path.relative_to(folder).as_posix()] = WeightFile(sha256=digest, size=stat.st_size)
    if changed:
        try:
            write_if_changed(cache_path(), json.dumps(cache, sort_keys=True, indent=0) + "\n")
        except OSError:
            pass  # a read-only home only costs speed
    return result


def _sha256(path: Path, size: int, progress: Callable[[str, int, int], None] | None) -> str:
    sha = hashlib.sha256()
    done = 0
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            sha.update(block)
            done += len(block)
            if progress:
                progress(path.name, done, size)
    return "sha256:" + sha.hexdigest()

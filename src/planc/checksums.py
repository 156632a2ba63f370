"""sha256 of model files, cached by (path, size, mtime) so that a second check is instant."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from planc.plan import WeightFile, write_if_changed

CHUNK = 8 * 2**20


def cache_path() -> Path:
    root = os.environ.get("PLANC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "planc"
    )
    return Path(root) / "file-hashes.json"


def _load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


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
        stat = path.stat()
        key = str(path.resolve())
        entry = cache.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            digest = entry["sha256"]
        else:
            sha = hashlib.sha256()
            done = 0
            with path.open("rb") as handle:
                while block := handle.read(CHUNK):
                    sha.update(block)
                    done += len(block)
                    if progress:
                        progress(path.name, done, stat.st_size)
            digest = "sha256:" + sha.hexdigest()
            cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
            changed = True
        result[path.relative_to(folder).as_posix()] = WeightFile(sha256=digest, size=stat.st_size)
    if changed:
        try:
            write_if_changed(cache_path(), json.dumps(cache, sort_keys=True, indent=0) + "\n")
        except OSError:
            pass  # a read-only home only costs speed
    return result

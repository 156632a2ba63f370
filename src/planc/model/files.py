"""Where a model's files are: config.json and weights, from a folder, a bare config or the HF cache."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planc.errors import ModelError, SpecError
from planc.files import JSON_LIMIT, parse_json, read_bytes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass(frozen=True)
class ModelFiles:
    """What was found on disk for the model source."""

    config: dict[str, Any]
    config_sha256: str
    folder: Path | None  # holds weights when present
    weight_files: tuple[Path, ...]


def _resolve_hf_id(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except ValueError as exc:  # huggingface_hub's HFValidationError: not a repo id at all
        raise ModelError(f"model id {repo_id!r} is not a Hugging Face repo id: {exc}") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ModelError(
            f"model {repo_id!r} is not in the local Hugging Face cache (planc resolves ids offline); "
            f"download it first (huggingface-cli download {repo_id}) or point model.path at a folder"
        ) from None


def read_model_files(source, base_dir: Path) -> ModelFiles:
    """Locate config.json (and weights, if any) for a spec's or lock's model source."""
    if source.id:
        folder: Path | None = _resolve_hf_id(source.id, source.revision)
        config_path = folder / "config.json"
    elif source.path:
        folder = (base_dir / source.path).resolve()
        config_path = folder / "config.json"
    else:
        folder = None
        config_path = (base_dir / source.config).resolve()
    raw = read_bytes(config_path, "model config", ModelError, JSON_LIMIT)
    config = parse_json(raw, str(config_path), ModelError)
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{config_path}: not a transformers config (no model_type)")
    weights: tuple[Path, ...] = ()
    if folder is not None and folder.is_dir():
        weights = tuple(
            sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and "training_args" not in p.name)
        )
    return ModelFiles(config, "sha256:" + hashlib.sha256(raw).hexdigest(), folder, weights)


def check_model_source_exists(source, base_dir: Path) -> None:
    """Raise SpecError early when a local model path is missing (a spec mistake, not a model problem)."""
    for field, value, kind, exists in (
        ("model.path", source.path, "folder", Path.is_dir), ("model.config", source.config, "file", Path.is_file)
    ):
        if not value:
            continue
        try:
            found = exists(base_dir / value)
        except OSError as exc:  # a name too long for the filesystem, a loop of symlinks
            raise SpecError(f"{field} {value[:60]!r}: {exc.strerror or exc}") from None
        if not found:
            raise SpecError(f"{field} {value[:60]!r}: no such {kind} (relative to {base_dir.name or '.'}/)")

"""Regenerate examples/models/tiny-qwen3: a 4-layer Qwen3 with seeded random weights and a small tokenizer."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))

from conftest import build_tiny_model  # noqa: E402

if __name__ == "__main__":
    build_tiny_model(HERE / "tiny-qwen3")

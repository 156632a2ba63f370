"""The model as planc sees it: its files, its config's numbers, its placement units and layer kinds.

Modules: `files` (config.json and weights on disk), `config` (the transformers config and the
numbers the ledger needs), `build` (the one place the model is instantiated, on meta), `graph`
(placement units), `cache` (per-layer cache kinds), and one module per layer kind's formulas
(`attention`, `mlp`).
"""

from planc.model.cache import LayerCache
from planc.model.config import DTYPE_BYTES, Shapes, checkpoint_dtype, make_config
from planc.model.files import ModelFiles, check_model_source_exists, read_model_files
from planc.model.graph import ModelGraph, Unit, build_model_graph

__all__ = [
    "DTYPE_BYTES",
    "LayerCache",
    "ModelFiles",
    "ModelGraph",
    "Shapes",
    "Unit",
    "build_model_graph",
    "check_model_source_exists",
    "checkpoint_dtype",
    "make_config",
    "read_model_files",
]

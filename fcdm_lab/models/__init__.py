"""Model families (FCDM, DiT, DiCo) behind one registry and one `(x, t, y)` interface.

Inside this package the imports form a graph without cycles and no module imports the package
itself (`from . import ...`): registry, layers, flops -> blocks -> fcdm, dit, dico -> factory ->
pretrained, matching, build, profile; this file only re-exports.
"""
from __future__ import annotations

from .blocks import resolve_block_spec
from .factory import FAMILY_CLASSES, create_model, model_family, valid_model_kwargs
from .fcdm import FCDM
from .registry import BLOCKS, MIXERS, MODELS

__all__ = ["BLOCKS", "FAMILY_CLASSES", "FCDM", "MIXERS", "MODELS", "create_model", "model_family",
           "resolve_block_spec", "valid_model_kwargs"]

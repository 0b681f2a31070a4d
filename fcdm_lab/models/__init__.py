"""Model families (FCDM, DiT, DiCo) behind one registry and one `(x, t, y)` interface."""
from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from ..errors import UserError, choices
from . import blocks, dico, dit, fcdm  # noqa: F401  (importing registers the components)
from .blocks import resolve_block_spec
from .fcdm import FCDM
from .registry import BLOCKS, MIXERS, MODELS

FAMILY_CLASSES = {"fcdm": FCDM, "dit": dit.DiT, "dico": dico.DiCo}


def model_family(name: str) -> str:
    return MODELS.meta(name)["family"]


def valid_model_kwargs(name: str) -> list[str]:
    """Constructor settings a model name accepts (FCDM takes L, C and block; baselines do not)."""
    if model_family(name) == "fcdm":
        return [p for p in inspect.signature(FCDM.__init__).parameters if p != "self"]
    return list(dit.COMMON_KWARGS)  # baselines: presets fix the architecture


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name; unknown names or settings raise UserError."""
    MODELS.get(name)
    valid = valid_model_kwargs(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r} for model {name!r}; valid: {choices(valid)}")
    return MODELS.get(name)(**kwargs)


__all__ = ["BLOCKS", "MIXERS", "MODELS", "FCDM", "create_model", "model_family", "resolve_block_spec"]

"""Build any registered model by name: `create_model("FCDM-S", C=96)` (timm's create_model).

Importing this module imports every family module, which registers its presets in MODELS.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict

import torch.nn as nn

from ..errors import UserError, choices
from .dico import DiCo
from .dit import DiT
from .fcdm import FCDM
from .registry import COMMON_KWARGS, MODELS

FAMILY_CLASSES: Dict[str, type] = {"fcdm": FCDM, "dit": DiT, "dico": DiCo}


def model_family(name: str) -> str:
    return MODELS.meta(name)["family"]


def valid_model_kwargs(name: str) -> list[str]:
    """Constructor settings a model name accepts (FCDM takes L, C and block; baselines do not)."""
    if model_family(name) == "fcdm":
        return [p for p in inspect.signature(FCDM.__init__).parameters if p != "self"]
    return list(COMMON_KWARGS)  # baselines: presets fix the architecture


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name; unknown names or settings raise UserError."""
    MODELS.get(name)
    valid = valid_model_kwargs(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r} for model {name!r}; valid: {choices(valid)}")
    return MODELS.get(name)(**kwargs)


__all__ = ["FAMILY_CLASSES", "create_model", "model_family", "valid_model_kwargs"]

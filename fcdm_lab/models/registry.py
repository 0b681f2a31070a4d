"""The registries of model components (the Registry class: fcdm_lab/registry.py), and how a preset
is registered. Tests loop the registries, so a new entry is tested without writing a test."""
from __future__ import annotations

from typing import Any

from ..errors import UserError, choices
from ..registry import Registry

MODELS = Registry("model")          # presets and baselines: name -> factory(**overrides) -> nn.Module
BLOCKS = Registry("block family")   # FCDM block families: name -> nn.Module class
MIXERS = Registry("channel mixer")  # channel mixers used inside blocks: name -> nn.Module class

# The settings every model accepts; a baseline preset (DiT, DiCo) fixes everything else.
COMMON_KWARGS = ("input_size", "in_channels", "num_classes", "learn_sigma", "class_dropout_prob", "grad_checkpointing")


def check_overrides(name: str, kwargs: dict[str, Any]) -> None:
    """Baseline presets fix the architecture; only the common settings may be overridden."""
    bad = sorted(set(kwargs) - set(COMMON_KWARGS))
    if bad:
        raise UserError(f"{name}: cannot override {choices(bad)}; valid overrides: {choices(COMMON_KWARGS)}")


def register_preset(cls: type, name: str, family: str, *, fixed: bool = True, **arch: Any) -> None:
    """Register `name` in MODELS as `cls(**arch, **overrides)`, with `family` and `arch` as its
    metadata. A baseline preset (`fixed`) fixes its architecture: only COMMON_KWARGS may be
    overridden. An FCDM preset's `arch` (L, C) are defaults any FCDM setting may override."""

    def factory(**kwargs: Any):
        if fixed:
            check_overrides(name, kwargs)
        return cls(**{**arch, **kwargs})

    factory.__name__ = factory.__qualname__ = name
    MODELS.register(name, family=family, **arch)(factory)


__all__ = ["BLOCKS", "COMMON_KWARGS", "MIXERS", "MODELS", "Registry", "check_overrides", "register_preset"]

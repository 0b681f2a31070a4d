"""The registries of model components (the Registry class: fcdm_lab/registry.py). Tests loop them,
so a new entry is tested without writing a test."""
from __future__ import annotations

from ..registry import Registry

MODELS = Registry("model")          # presets and baselines: name -> factory(**overrides) -> nn.Module
BLOCKS = Registry("block family")   # FCDM block families: name -> nn.Module class
MIXERS = Registry("channel mixer")  # channel mixers used inside blocks: name -> nn.Module class

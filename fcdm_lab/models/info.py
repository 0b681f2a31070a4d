"""What a config's model is, without building it for real: its data's shape and the model built on
the meta device (no memory, no init cost), for checks before a run and for study tables.

    data_info = data_info_for(cfg)           # name, channels, image_size, num_classes, fingerprint, ...
    info = model_info_for(cfg)               # build_model's info: name, family, params, gmacs, match, kwargs
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import torch

from ..data.build import CONFIG_KEYS, build_dataset
from .build import build_model


def data_config(cfg) -> Dict[str, Any]:
    """The [data] section as build_dataset's config (unset keys left out)."""
    return {k: v for k, v in dataclasses.asdict(cfg.data).items() if k in CONFIG_KEYS and v is not None}


def data_info_for(cfg) -> Dict[str, Any]:
    """build_dataset's info of the training split (a latent store: only its metadata is read)."""
    _, info = build_dataset(data_config(cfg), split="train")
    return info


def model_info_for(cfg, data_info: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """build_model's info for a config, built on the meta device."""
    data_info = data_info or data_info_for(cfg)
    with torch.device("meta"):
        _, info = build_model(cfg.model, input_size=data_info["image_size"], in_channels=data_info["channels"],
                              num_classes=data_info["num_classes"])
    return info


__all__ = ["data_config", "data_info_for", "model_info_for"]

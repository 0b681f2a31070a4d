"""Build a model from an experiment's [model] section: name, settings, compute matching, profile."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn

from ..errors import UserError
from .factory import create_model, model_family
from .flops import count_gmacs, count_params
from .matching import match_flops
from .registry import MODELS


def model_kwargs(model_cfg, *, input_size: int, in_channels: int, num_classes: int) -> Dict[str, Any]:
    """The exact create_model kwargs (JSON-able) for a ModelConfig and a dataset's shape."""
    kw: Dict[str, Any] = dict(
        input_size=input_size, in_channels=in_channels, num_classes=num_classes,
        learn_sigma=model_cfg.learn_sigma, class_dropout_prob=model_cfg.class_dropout_prob,
        grad_checkpointing=model_cfg.grad_checkpointing,
    )
    family = model_family(model_cfg.name)
    if family == "fcdm":
        meta = MODELS.meta(model_cfg.name)
        L = model_cfg.L if model_cfg.L is not None else meta.get("L")
        C = model_cfg.C if model_cfg.C is not None else meta.get("C")
        if L is None or C is None:
            raise UserError(f"model {model_cfg.name!r} needs model.L and model.C (or use a preset: FCDM-S, FCDM-B, FCDM-L, FCDM-XL)")
        kw.update(L=L, C=C, block=model_cfg.block, label_dropout=model_cfg.label_dropout)
    else:
        if model_cfg.L is not None or model_cfg.C is not None or model_cfg.match_flops:
            raise UserError(f"model.L, model.C and model.match_flops apply to FCDM models only, not {model_cfg.name!r}")
        if model_cfg.block and model_cfg.block != {"family": "convnext"}:
            raise UserError(f"model.block applies to FCDM models only, not {model_cfg.name!r}")
    return kw


def build_model(model_cfg, *, input_size: int, in_channels: int, num_classes: int,
                device: torch.device | str | None = None) -> tuple[nn.Module, Dict[str, Any]]:
    """Returns (model, info): info = name, family, params, gmacs, match (or None), kwargs."""
    kw = model_kwargs(model_cfg, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    match = None
    if model_cfg.match_flops:
        kw, result = match_flops(kw, model_cfg.match_flops, model_cfg.match_target_gmacs)
        match = result.to_dict()
    with torch.device("meta"):
        gmacs = count_gmacs(create_model(model_cfg.name, **kw), (in_channels, input_size, input_size))
    model = create_model(model_cfg.name, **kw)
    if device is not None:
        model = model.to(device)
    info = dict(name=model_cfg.name, family=model_family(model_cfg.name), params=count_params(model),
                gmacs=gmacs, match=match, kwargs=kw)
    return model, info

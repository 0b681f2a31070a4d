"""diffusers-native loading for every model family: `load_pretrained(folder)` and `FCDM.from_pretrained(folder)`.

A trained run folder (and its MLflow `pipeline/` artifact) is a diffusers pipeline folder:
`model_index.json`, `model/` (config.json + diffusion_pytorch_model.safetensors, the EMA weights)
and `scheduler/`. Every family's `from_pretrained` (layers.PretrainedMixin) accepts that folder as
well as the `model/` folder itself; `load_pretrained` also finds the family from config.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import UserError, choices
from .factory import FAMILY_CLASSES
from .layers import MODEL_SUBFOLDER, PretrainedMixin

__all__ = ["MODEL_SUBFOLDER", "PretrainedMixin", "load_pretrained", "model_folder"]


def model_folder(path: str | os.PathLike) -> Path | None:
    """The diffusers model folder in `path` (itself or its `model/`), or None."""
    path = Path(path)
    for folder in (path, path / MODEL_SUBFOLDER):
        if (folder / "config.json").is_file() and any(folder.glob("diffusion_pytorch_model*.safetensors")):
            return folder
    return None


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Any family's model from a diffusers folder (run folder, pipeline folder or model folder); the
    class comes from config.json's `_class_name`. In eval mode, gradients off."""
    folder = model_folder(path)
    if folder is None:
        raise UserError(f"{path} holds no diffusers model (config.json + diffusion_pytorch_model.safetensors, "
                        f"itself or in {MODEL_SUBFOLDER}/); pass a run folder written by `fcdm-lab train`")
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in FAMILY_CLASSES.values()}
    if name not in classes:
        raise UserError(f"{folder}/config.json names model class {name!r}; valid: {choices(sorted(classes))}")
    model = classes[name].from_pretrained(folder, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)

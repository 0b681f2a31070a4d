"""Loading trained models for inference: our checkpoints and the reference repository's, and the
diffusion objective (DDPM or flow, with its time scale) each one needs.

    model, cfg, info = load_checkpoint("runs/tiny/checkpoints/step_0001500.pt")   # EMA weights
    objective = objective_for(cfg, model, info)                                  # what it was trained with

Where the objective comes from (info["diffusion"]["source"]):
- "config": our checkpoints carry the whole experiment config in `args` (diffusion.objective,
  diffusion.time_scale); read even when the config no longer parses under this version's schema;
- "reference args": reference checkpoints carry their argparse `args`; a flow run's args have the
  flow settings (`path_type`, `prediction`, ...), so it is a flow model with the reference's time
  (t in [0, 1]) sampled by default with its SDE sampler; otherwise the DDPM recipe;
- "default": nothing recorded (e.g. a bare {"model", "ema"} file): the DDPM recipe;
- "override": `objective=` / `time_scale=` given explicitly (the CLI's --objective, --time-scale).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import ExperimentConfig, config_from_dict
from ..diffusion import OBJECTIVES, create_objective
from ..errors import UserError, choices
from ..models import create_model
from ..models.pretrained import load_pretrained, model_folder
from ..training import state as ckpt_io

# Keys of the reference's flow training arguments (train_gen_flow's parse_transport_args): their
# presence in a checkpoint's `args` marks a flow-matching model.
REFERENCE_FLOW_ARGS = ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps")


def _strip_prefixes(state: dict) -> dict:
    """Drop wrapper prefixes a saved state dict may carry (DDP 'module.', torch.compile '_orig_mod.')."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _args_dict(args: Any) -> dict:
    """A checkpoint's `args` (an argparse.Namespace in the reference's, a dict in ours) as a dict."""
    if isinstance(args, dict):
        return args
    if hasattr(args, "__dict__"):
        return dict(vars(args))
    return {}


def infer_fcdm_kwargs(state: dict, args: Any = None) -> dict:
    """create_model("FCDM", ...) kwargs from a reference state dict's shapes (facts section 10).

    x_embedder.weight (C, in, 3, 3); L = number of encoder_level_1 blocks; final conv out = 2 * in
    (learned sigma) or in. The label table y_embedder_1 has num_classes + 1 rows (the null class)
    when the model was trained with label dropout, num_classes rows without (class_dropout_prob = 0):
    `args.num_classes` tells which; without it the extra null row is assumed (the reference's
    default p = 0.1). The input size only matters for FLOP counts (the model is fully
    convolutional): image_size / 8 from the args when present, else 32 (256x256 images as latents).
    """
    try:
        C, in_channels = (int(s) for s in state["x_embedder.weight"].shape[:2])
        rows = int(state["y_embedder_1.embedding_table.weight"].shape[0])
        out_channels = int(state["final_layer.conv.weight"].shape[0])
    except KeyError as e:
        raise UserError(f"not an FCDM state dict: it has no {e.args[0]!r} (found e.g. "
                        f"{choices(sorted(state)[:5])})") from None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder_level_1\.(\d+)\.", k))}
    if not blocks:
        raise UserError("not an FCDM state dict: it has no encoder_level_1 blocks")
    args = _args_dict(args)
    named = args.get("num_classes")
    if isinstance(named, int) and not isinstance(named, bool):
        if rows not in (named, named + 1):
            raise UserError(f"the checkpoint's args say num_classes = {named} but its label table has {rows} rows "
                            f"(expected {named} without label dropout or {named + 1} with the null class)")
        num_classes, dropout = named, (0.1 if rows == named + 1 else 0.0)
    else:
        num_classes, dropout = rows - 1, 0.1
    image_size = args.get("image_size")
    input_size = int(image_size) // 8 if isinstance(image_size, int) and image_size % 32 == 0 else 32
    return dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes, L=max(blocks) + 1, C=C,
                learn_sigma=out_channels == 2 * in_channels, class_dropout_prob=dropout)


def reference_diffusion(args: Any) -> dict:
    """The objective a reference checkpoint needs, from its `args` (see the module docstring)."""
    args = _args_dict(args)
    if any(k in args for k in REFERENCE_FLOW_ARGS):
        path_type = args.get("path_type", "Linear")
        if path_type != "Linear" or args.get("prediction", "velocity") != "velocity":
            raise UserError(f"reference flow checkpoint with path_type={path_type!r}, prediction="
                            f"{args.get('prediction')!r}: fcdm-lab samples the Linear path with velocity "
                            f"prediction only (the reference's defaults)")
        return {"objective": "flow", "time_scale": 1.0, "sampler": "sde", "source": "reference args"}
    return {"objective": "ddpm", "time_scale": None, "sampler": "ddpm", "source": "reference args" if args
            else "default"}


def _config_diffusion(args: Any) -> dict:
    """Objective and time scale from our checkpoint's recorded config (a dict), parse or not."""
    section = (args or {}).get("diffusion") if isinstance(args, dict) else None
    if not isinstance(section, dict) or section.get("objective") not in OBJECTIVES:
        return {"objective": "ddpm", "time_scale": None, "sampler": None, "source": "default"}
    scale = section.get("time_scale")
    if section["objective"] == "flow" and scale is None:
        scale = 1000.0  # written before time_scale was recorded: the old default
    return {"objective": section["objective"], "time_scale": scale, "sampler": None, "source": "config"}


def _load_state(model: torch.nn.Module, state: dict, where: str) -> None:
    result = model.load_state_dict(_strip_prefixes(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} (e.g. {choices(result.missing_keys[:3])})")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} (e.g. {choices(result.unexpected_keys[:3])})")
        raise UserError(f"weights in {where} do not fit the model: {'; '.join(parts)}")


def _config_or_none(args: Any) -> ExperimentConfig | None:
    if not isinstance(args, dict):
        return None
    try:
        return config_from_dict(args)
    except UserError:  # written by another version of the config schema: the weights still load
        return None


ARTIFACTS = ("a run folder", "its model/ folder", "model/diffusion_pytorch_model.safetensors", "ema.safetensors",
             "checkpoints/step_*.pt", "a reference FCDM checkpoint")


def _resolve_path(path: Path) -> Path:
    """What a path given as a model means: a run folder its newest training checkpoint (raw and EMA
    weights), else its diffusers model, else its ema.safetensors; a diffusers model file (weights
    or config) its model folder; anything else itself."""
    if path.is_dir():
        found = ckpt_io.find_latest_checkpoint(path)
        if found is not None:
            return found[0]
        if model_folder(path) is not None:
            return model_folder(path)
        if (path / "ema.safetensors").is_file():
            return path / "ema.safetensors"
        raise UserError(f"{path} is a folder without a model; pass one of what a run writes: {choices(ARTIFACTS)}")
    if path.is_file() and model_folder(path.parent) == path.parent and (
            path.name.startswith("diffusion_pytorch_model") or path.name == "config.json"):
        return path.parent  # diffusers' weights file needs its config.json: load the folder
    if path.name == "model_index.json" and model_folder(path.parent) is not None:
        return model_folder(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, *, use_ema: bool = True, device: str | torch.device = "cpu"
                    ) -> tuple[torch.nn.Module, ExperimentConfig | None, dict]:
    """(model in eval mode on `device`, its config or None, info) from any model artefact a run
    writes (ARTIFACTS): our training checkpoints (`step_*.pt`), the diffusers model folder (also the
    run folder, the pipeline folder, or the weights file inside `model/`), the older
    `ema.safetensors`, a run folder (its newest checkpoint); and reference FCDM checkpoints
    {"model", "ema", "opt", "args"} (the architecture is inferred from the weights' shapes and args).
    info: path, source ("fcdm-lab" | "fcdm-lab-ema" | "diffusers" | "reference"), weights ("ema" |
    "model": which were loaded), step (or None), model_info, data_info (or None), diffusion
    ({objective, time_scale, sampler, source}: see the module docstring).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass one of what a run writes: {choices(ARTIFACTS)}")
    path = _resolve_path(path)
    if path.is_dir():
        if not use_ema:
            raise UserError(f"{path} holds the EMA weights only; for the raw weights pass a checkpoints/step_*.pt file")
        model, cfg, info = _load_diffusers(path, device)
    elif path.suffix == ".safetensors":
        model, cfg, info = _load_safetensors(path)
    else:
        ckpt = ckpt_io.read_checkpoint(path)
        if ckpt_io.is_training_checkpoint(ckpt):
            mi = ckpt["model_info"]
            model = create_model(mi["name"], **{**mi["kwargs"], "grad_checkpointing": False})
            cfg, source, step = _config_or_none(ckpt.get("args")), "fcdm-lab", ckpt["step"]
            data_info, diffusion = ckpt.get("data_info"), _config_diffusion(ckpt.get("args"))
        elif "model" in ckpt or "ema" in ckpt:
            weights = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
            if not isinstance(weights, dict):
                raise UserError(f"{path} has no state dict under 'model' or 'ema'")
            kwargs = infer_fcdm_kwargs(_strip_prefixes(weights), ckpt.get("args"))
            model = create_model("FCDM", **kwargs)
            mi = {"name": "FCDM", "family": "fcdm", "kwargs": kwargs}
            cfg, source, data_info, step = None, "reference", None, None
            diffusion = reference_diffusion(ckpt.get("args"))
        else:
            raise UserError(f"{path} is not a checkpoint: expected keys 'model'/'ema' (reference) or an "
                            f"fcdm-lab training checkpoint, found {choices(sorted(map(str, ckpt))[:8])}")
        use = "ema" if use_ema and ckpt.get("ema") is not None else "model"
        if ckpt.get(use) is None:
            hint = "; use the EMA weights (use_ema=True, the default)" if not use_ema else ""
            raise UserError(f"{path} holds no {use!r} weights{hint}")
        if use_ema and use == "model":
            warnings.warn(f"{path} holds no EMA weights; using the raw model weights", stacklevel=2)
        _load_state(model, ckpt[use], f"{path} ['{use}']")
        info = {"path": str(path), "source": source, "weights": use, "step": step, "model_info": mi,
                "data_info": data_info, "diffusion": diffusion}
    model.to(device).eval().requires_grad_(False)
    return model, cfg, info


MODEL_INFO_FILE = "fcdm_lab.json"  # next to a diffusers model's config.json: step, model/data info, run config


def _load_diffusers(folder: Path, device):
    """A diffusers model folder (our run folders' `model/`): the weights with the run's config, from
    the folder's fcdm_lab.json, else the run folder's config.toml (folders written before the file)."""
    import tomllib

    model = load_pretrained(folder, device=device)
    meta: dict = {}
    if (folder / MODEL_INFO_FILE).is_file():
        meta = json.loads((folder / MODEL_INFO_FILE).read_text())
    config = meta.get("config")
    if config is None:
        toml = next((f / "config.toml" for f in (folder, folder.parent) if (f / "config.toml").is_file()), None)
        config = tomllib.loads(toml.read_text()) if toml is not None else None
    kwargs = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    model_info = meta.get("model_info") or {"name": type(model).__name__, "kwargs": kwargs}
    info = {"path": str(folder), "source": "diffusers", "weights": "ema", "step": meta.get("step"),
            "model_info": model_info, "data_info": meta.get("data_info"), "diffusion": _config_diffusion(config)}
    return model, _config_or_none(config), info


def _load_safetensors(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
        meta = {k: json.loads(v) for k, v in raw.items()} if raw.get("format") == '"fcdm-lab-ema"' else raw
        state = load_file(str(path))
    except Exception as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != "fcdm-lab-ema":
        raise UserError(f"{path} has no fcdm-lab metadata (model name and settings), so its model cannot be "
                        f"rebuilt; pass one of what a run writes: {choices(ARTIFACTS)}")
    mi = meta["model_info"]
    model = create_model(mi["name"], **{**mi["kwargs"], "grad_checkpointing": False})
    _load_state(model, state, str(path))
    info = {"path": str(path), "source": "fcdm-lab-ema", "weights": "ema", "step": meta.get("step"),
            "model_info": mi, "data_info": meta.get("data_info"), "diffusion": _config_diffusion(meta.get("config"))}
    return model, _config_or_none(meta.get("config")), info


def objective_for(cfg: ExperimentConfig | None, model: torch.nn.Module, info: dict | None = None, *,
                  objective: str | None = None, time_scale: float | None = None):
    """The diffusion objective a model was trained with: the config's, else what `info["diffusion"]`
    (from load_checkpoint) recorded, else the DDPM recipe; `objective` / `time_scale` override both."""
    learn_sigma = bool(getattr(model.config, "learn_sigma", True))
    recorded = dict((info or {}).get("diffusion") or {})
    if cfg is not None:
        d = cfg.diffusion
        recorded.update(objective=d.objective, time_scale=d.time_scale)
        schedule = dict(num_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
    else:
        schedule = {}
    if objective is not None and objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; choose one of: {choices(OBJECTIVES)}")
    if objective is not None and objective != recorded.get("objective"):
        recorded["sampler"] = None  # the recorded default sampler belongs to the other objective
    name = objective or recorded.get("objective") or "ddpm"
    scale = time_scale if time_scale is not None else recorded.get("time_scale")
    if name == "flow":
        return create_objective("flow", time_scale=1.0 if scale is None else float(scale),
                                flow_sampler=recorded.get("sampler") or "euler")
    return create_objective("ddpm", learn_sigma=learn_sigma, **schedule)


def diffusion_settings(objective) -> dict:
    """What a run records about the objective used: name, time scale (flow), default sampler."""
    out = {"objective": objective.name, "default_sampler": objective.default_sampler}
    if objective.name == "flow":
        out["time_scale"] = objective.time_scale
    return out

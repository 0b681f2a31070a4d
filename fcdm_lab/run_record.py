"""What every MLflow run records: code state, package versions, block spec, tags, the resolved
config (params + config.toml) and model size/compute (split out of tracking.py by job).
"""
from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Mapping

from .errors import UserError

VERSION_PACKAGES = ("torch", "diffusers", "accelerate", "mlflow", "optuna", "torch-fidelity", "fcdm-lab")
MODEL_PARAM_KEYS = ("model.params", "model.gmacs", "model.match_knob", "model.match_value", "model.match_target")


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding the fcdm_lab sources; (None, None) when the
    package is not a tracked part of a git checkout (e.g. installed from a wheel)."""
    pkg = Path(__file__).resolve().parent
    if _git("ls-files", "--error-unmatch", "__init__.py", cwd=pkg) is None:
        return None, None
    commit = _git("rev-parse", "HEAD", cwd=pkg)
    status = _git("status", "--porcelain", "--", ".", cwd=pkg)
    return commit, (None if status is None else bool(status))


def package_versions() -> Dict[str, str]:
    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def block_spec_of(cfg, model_info: Mapping[str, Any] | None = None) -> Dict[str, Any] | None:
    """The resolved block spec actually built (after compute matching), None for baselines."""
    kwargs = (model_info or {}).get("kwargs") or {}
    spec = kwargs.get("block", cfg.model.block)
    from .models import model_family
    from .models.blocks import resolve_block_spec

    try:
        if model_family(cfg.model.name) != "fcdm":
            return None
    except UserError:
        return None
    return resolve_block_spec(spec)


def standard_tags(cfg, model_info: Mapping[str, Any] | None = None, data_info: Mapping[str, Any] | None = None,
                  *, study: str | None = None, variant: str | None = None, seed: int | None = None) -> Dict[str, str]:
    """Tags every run carries: what was trained (experiment, preset, block spec), where it sits
    (study, variant, seed), which code (git commit + dirty flag, package versions) and which data."""
    commit, dirty = git_state()
    block = block_spec_of(cfg, model_info)
    tags: Dict[str, Any] = {
        "experiment": cfg.name,
        "preset": (model_info or {}).get("name", cfg.model.name),
        "block": json.dumps(block, sort_keys=True) if block is not None else None,
        "study": study,
        "variant": variant,
        "seed": seed,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,  # shown by the MLflow UI as the run's source version
        "git_dirty": None if dirty is None else str(dirty).lower(),
        "data": (data_info or {}).get("name", cfg.data.name),
        "data_fingerprint": (data_info or {}).get("fingerprint"),
    }
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    return {k: str(v) for k, v in tags.items() if v is not None}


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def config_to_toml(cfg) -> str:
    """The resolved config as TOML (TOML has no null: unset optional keys are left out, which
    reloads to the same config since every optional field defaults to None)."""
    import tomli_w

    return tomli_w.dumps(_drop_none(cfg.to_dict()))


def config_from_toml(text: str):
    import tomllib

    from .config import config_from_dict

    return config_from_dict(tomllib.loads(text))


def run_environment() -> Dict[str, Any]:
    """Params of where a job ran: world size (processes) and device, from accelerate's state (set up
    by the trainer; in a process without one, this single process)."""
    from accelerate import PartialState

    state = PartialState()
    out: Dict[str, Any] = {"world_size": state.num_processes, "device": state.device.type}
    if state.device.type == "cuda":
        import torch

        out["device_name"] = torch.cuda.get_device_name(state.device)
    return out


def model_params(model_info: Mapping[str, Any]) -> Dict[str, Any]:
    """MLflow params describing a built model (MODEL_PARAM_KEYS): size, compute and the
    compute-matching outcome (knob, solved value, target GMACs)."""
    out: Dict[str, Any] = {"model.params": model_info["params"], "model.gmacs": round(float(model_info["gmacs"]), 6)}
    match = model_info.get("match")
    if match:
        out["model.match_knob"] = match["knob"]
        out["model.match_value"] = match.get("to_value", match.get("to"))
        out["model.match_target"] = round(float(match["target_gmacs"]), 6)
    return out


def log_run_config(tracker, cfg, model_info: Mapping[str, Any] | None = None) -> None:
    """Params = the flattened resolved config (+ params count, GMACs and the matched knob once the
    model is built); artifact `config.toml` = the resolved config, the input of `fcdm-lab rerun`."""
    params = dict(cfg.flat())
    if model_info is not None:
        params.update(model_params(model_info))
        tracker.log_dict(_drop_none(dict(model_info)), "model_info.json")
    tracker.log_params(params)
    tracker.log_text(config_to_toml(cfg), "config.toml")



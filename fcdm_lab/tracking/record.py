"""What every MLflow run records: code state, package versions, block spec, tags, the resolved
config (params + config.toml), model size and compute, the datasets as run inputs.

Where a new tag, param or input of every run goes: here (client.py opens and logs runs; the run
pipeline, fcdm_lab/runner.py, decides when to call these).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Mapping

from ..config import drop_none
from ..data.build import build_dataset
from ..errors import UserError
from ..eval.metrics import DIGITS_REFERENCES, FASHION_REFERENCES, reference_for
from ..models import model_family
from ..models.blocks import resolve_block_spec

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
    pkg = Path(__file__).resolve().parents[1]  # the fcdm_lab package
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
    model is built). The artifact `config.toml` (the input of `fcdm-lab rerun`) is the run folder's
    own file, logged by the run pipeline's tracking hook (fcdm_lab/runner.py): written once."""
    params = dict(cfg.flat())
    if model_info is not None:
        params.update(model_params(model_info))
        tracker.log_dict(drop_none(dict(model_info)), "model_info.json")
    tracker.log_params(params)



# ---------------------------------------------------------------------------------------------
# Datasets (MLflow run inputs): what a run trained on and what it was evaluated against
# ---------------------------------------------------------------------------------------------

TRAINING, EVALUATION = "training", "evaluation"    # MLflow's dataset context tag (mlflow.data.context)


def _image_dataset(name: str, digest: str, source, *, profile: Mapping[str, Any] | None = None,
                   shape: tuple | None = None, dtype: str = "float32", tensor: str = "image"):
    """An MLflow dataset that records metadata only (the data is never copied): MLflow's MetaDataset
    plus a profile (image size, count, ...), which MetaDataset itself does not carry."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    class ImageDataset(MetaDataset):
        @property
        def profile(self):
            return dict(profile) if profile else None

        def to_dict(self):
            out = super().to_dict()
            if profile:
                out["profile"] = json.dumps(dict(profile), sort_keys=True)
            return out

    schema = None
    if shape is not None:
        schema = Schema([TensorSpec(np.dtype(dtype), (-1, *shape), tensor), TensorSpec(np.dtype("int64"), (-1,), "label")])
    return ImageDataset(source, name=name, digest=digest, schema=schema)


def _local_source(path):
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # MLflow registers the local source twice and warns it picked one
        warnings.simplefilter("ignore")
        return resolve_dataset_source(str(Path(path).expanduser().resolve()))


def _code_source(**tags):
    from mlflow.data.code_dataset_source import CodeDatasetSource

    return CodeDatasetSource({k: str(v) for k, v in tags.items() if v is not None})


def _info_dataset(name: str, info: Mapping[str, Any], source, split: str, dtype: str = "float32"):
    profile = {k: info.get(k) for k in ("num_items", "image_size", "channels", "num_classes")}
    profile["split"] = split
    if info.get("vae"):
        profile["vae"] = (info["vae"] or {}).get("id")
    size, channels = info.get("image_size"), info.get("channels")
    shape = (channels, size, size) if size and channels else None
    return _image_dataset(name, str(info["fingerprint"]), source, profile=drop_none(profile), shape=shape,
                          dtype=dtype, tensor="latent" if info.get("vae") else "image")


def training_dataset(cfg, data_info: Mapping[str, Any]):
    """The training set as an MLflow dataset: name = data.name, digest = the data's content
    fingerprint (data/build.py), source = data.path when given, else the loader that made it."""
    path = getattr(cfg.data, "path", None)
    source = _local_source(path) if path else _code_source(loader="fcdm_lab.data.build_dataset",
                                                           dataset=data_info["name"], split="train")
    return _info_dataset(data_info["name"], data_info, source, "train")


def reference_dataset(reference):
    """The evaluation reference set as an MLflow dataset: a named split ("digits-test", "fashion-test",
    ...) with its content fingerprint, count and image size; a folder or .npz by its path, with a
    digest of its files' names, sizes and modification times (not of the pixels: an ADM reference is
    GBs, and the evaluation has already read it once)."""

    name = str(reference)
    for data, named in (("digits", DIGITS_REFERENCES), ("fashion-mnist", FASHION_REFERENCES)):
        if name in named:  # what eval/fidelity.py compares against: the split at its native size
            _, info = build_dataset({"name": data}, named[name])
            source = _code_source(loader="fcdm_lab.eval.fidelity.resolve_images", reference=name)
            return _info_dataset(name, info, source, named[name], dtype="uint8")
    path = Path(name).expanduser()
    if not path.exists():
        return None  # the evaluation itself says what is wrong with it
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return _image_dataset(path.name or name, h.hexdigest()[:16], _local_source(path), profile={"files": len(files)})


def log_datasets(tracker, cfg, data_info: Mapping[str, Any], *, evaluation: bool = False) -> None:
    """Record a run's datasets as MLflow inputs: the training set (context "training") and, when the
    run evaluates, the reference set its samples are scored against (context "evaluation")."""
    inputs = [(training_dataset(cfg, data_info), TRAINING)]
    if evaluation:
        inputs.append((reference_dataset(reference_for(cfg)), EVALUATION))
    tracker.log_inputs([(ds, context) for ds, context in inputs if ds is not None])

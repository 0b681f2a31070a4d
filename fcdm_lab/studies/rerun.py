"""`fcdm-lab rerun RUN_ID`: train a logged run again from what MLflow recorded.

The config comes from the run's `config.toml` artifact (the resolved config, seed included), or
from its params when the artifact is missing. It runs through the same pipeline as every run
(runner.py); a run that was evaluated is evaluated again with the same metrics and seed. The new run is tagged `fcdm.rerun_of` and is not attached to
the original study, so the study's statistics stay as they were. A warning says when the code
differs from the commit the run recorded: the same config and seed on other code need not give
the same numbers.
"""
from __future__ import annotations

import json
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional


from ..config import ExperimentConfig, config_from_dict
from ..display import output_console
from ..errors import UserError
from ..runner import run_experiment
from ..tracking.client import get_client, get_run, resolve_tracking_uri, tracked_run
from ..tracking.record import MODEL_PARAM_KEYS, git_state
from ..training.preflight import check_run


@dataclass
class RerunResult:
    source_run_id: str
    run_id: Optional[str]
    out_dir: Path
    train: Any                          # TrainResult
    metrics: Optional[Dict[str, float]]
    code_matches: Optional[bool]        # None when either commit is unknown


def _parse_param(text: str) -> Any:
    """A logged param string back to a value: None/True/False, JSON (numbers, lists, tables), TOML
    scalars, else the string itself."""
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_from_params(params: Dict[str, str]) -> ExperimentConfig:
    """Rebuild the config from flattened `section.key` params (fallback when config.toml is gone)."""
    data: Dict[str, Any] = {}
    sections = {f for f in ExperimentConfig.__dataclass_fields__}
    for key, text in params.items():
        head, _, rest = key.partition(".")
        if head not in sections or key in MODEL_PARAM_KEYS:  # measured, not configured
            continue
        value = _parse_param(text)
        if value is None:
            continue
        if rest:
            data.setdefault(head, {})[rest] = value
        else:
            data[head] = value
    return config_from_dict(data)


def recorded_config(client, run) -> ExperimentConfig:
    """The resolved config a run trained with: its config.toml artifact, else its params."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = Path(client.download_artifacts(run.info.run_id, "config.toml", tmp)).read_text()
        except Exception:
            text = None
    if text is not None:
        return config_from_dict(tomllib.loads(text))
    if not any(k.startswith("train.") for k in run.data.params):
        raise UserError(f"run {run.info.run_id} has neither a config.toml artifact nor config params: it is not "
                        f"a training run (study parents cannot be rerun; rerun one of their children)")
    return config_from_params(run.data.params)


def _free_folder(base: Path) -> Path:
    folder, i = base, 1
    while folder.exists() and any(folder.iterdir()):
        i += 1
        folder = base.with_name(f"{base.name}-{i}")
    return folder


def rerun(run_id: str, uri: str | None = None, *, out_dir=None, progress: bool = True, console=None) -> RerunResult:
    """Re-execute a logged training run (or study child) from its recorded config and seed."""
    console = console or output_console()
    uri = resolve_tracking_uri(uri)
    client = get_client(uri, existing=True)
    run = get_run(run_id, client=client)
    tags = run.data.tags
    if tags.get("kind") == "ablation":
        raise UserError(f"run {run_id} is a study parent; rerun the study with `fcdm-lab ablate {tags.get('study')}` "
                        f"or rerun one of its children")
    cfg = recorded_config(client, run)

    recorded, recorded_dirty = tags.get("git_commit"), tags.get("git_dirty") == "true"
    current, current_dirty = git_state()
    code_matches = None if (recorded is None or current is None) else (recorded == current and not recorded_dirty
                                                                      and not current_dirty)
    if code_matches is False:
        if recorded != current:
            msg = f"run {run_id} was recorded at commit {recorded[:12]}, the installed code is {current[:12]}"
        else:
            where = " and ".join(w for w, d in (("the recorded run", recorded_dirty), ("the installed code", current_dirty)) if d)
            msg = f"run {run_id} and the installed code share commit {current[:12]}, but {where} had uncommitted changes"
        msg += ": the rerun may not reproduce its numbers"
        console.print(f"[yellow]warning:[/] {msg}")  # and RerunResult.code_matches is False

    folder = Path(out_dir) if out_dir is not None else _free_folder(Path("runs") / "reruns" / run_id[:12])
    evaluated = "eval.weights" in tags
    study, variant, seed = tags.get("study"), tags.get("variant"), tags.get("seed")
    new_tags = {"kind": "rerun", "fcdm.rerun_of": run_id, "study": study, "variant": variant}
    console.print(f"Rerunning {run.info.run_name or run_id} ({cfg.name}, seed {cfg.train.seed}, "
                  f"{cfg.train.steps} steps) into {folder}")
    check_run(cfg, folder)  # nothing is created for a run that cannot train
    with tracked_run(f"rerun-{run.info.run_name or run_id[:8]}", uri=uri, tags=new_tags) as tracker:
        out = run_experiment(tracker, cfg, folder, progress=progress, study=study, variant=variant,
                           seed=None if seed is None else int(seed), evaluate=evaluated,
                           eval_seed=int(tags.get("eval.seed", cfg.train.seed)))
    result, metrics = out.train, out.metrics or None
    if metrics:
        before = run.data.metrics
        for k, v in metrics.items():
            if not k.endswith("_std"):
                old = before.get(k)
                console.print(f"  {k}: {v:.4g}" + (f" (recorded {old:.4g})" if old is not None else ""))
    console.print(f"New run {tracker.run_id} (tag fcdm.rerun_of = {run_id})")
    return RerunResult(run_id, tracker.run_id, folder, result, metrics, code_matches)

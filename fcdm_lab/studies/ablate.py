"""`fcdm-lab ablate`: train and evaluate every variant of a study, tracked as one MLflow parent run.

    result = run_ablation("grn-vs-cca")                 # the project's main job on tiny digits
    result = run_ablation("kernel-size", seeds=3, steps=500, overrides=["train.lr=3e-4"])

One parent run (tags study, kind=ablation, settings_hash) and one child run per variant and seed
(tags study, variant, seed), trained one after the other in this process. Variants with the same
seed share the data order and the noise (the trainer seeds everything from train.seed), so the
report's paired differences cancel most of the seed noise.

Re-running the same command resumes an interrupted study: the parent with the same study name and
settings hash that did not finish is reopened, FINISHED children are skipped, and unfinished ones
resume from the newest checkpoint in their folder. A child that fails (diverged, broken) is
marked FAILED and the study goes on with the others; at the end the report is written for what
finished and the call raises a UserError naming the failures (the parent ends FAILED, so running
the same command again retries just those). Ctrl+C stops the whole study (parent KILLED).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..errors import UserError
from ..tracking import (DEFAULT_EXPERIMENT, STATUS_FAILED, STATUS_FINISHED, browse_hint, experiment_id, get_client,
                        git_state, package_versions, resolve_tracking_uri, tracked_run, train_in_run)
from .report import STUDY_FILE, Report, build_report
from .spec import ChildPlan, StudyPlan, StudySpec, list_studies, load_study, plan_study


@dataclass
class ChildOutcome:
    variant: str
    seed: int
    run_id: Optional[str]
    status: str                          # FINISHED (now or before) | FAILED
    skipped: bool                        # already FINISHED before this call
    out_dir: Path
    metrics: Dict[str, float] = field(default_factory=dict)


@dataclass
class StudyResult:
    name: str
    parent_run_id: str
    settings_hash: str
    resumed: bool
    out_dir: Path
    children: List[ChildOutcome]
    report: Report
    report_paths: Dict[str, Path]


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------

def studies_table(specs: List[StudySpec] | None = None):
    """A rich table of the bundled studies (what `fcdm-lab ablate` with no name prints)."""
    from rich.table import Table

    specs = list_studies() if specs is None else specs
    t = Table(title="Studies (run one: fcdm-lab ablate NAME)")
    for col in ("study", "description", "variants", "base", "seeds", "steps"):
        t.add_column(col)
    for s in specs:
        names = [f"{v.name}*" if v.name == s.baseline else v.name for v in s.variants]
        t.add_row(s.name, s.description, ", ".join(names), s.base, str(s.seeds), str(s.steps or "-"))
    return t


def print_studies(console=None) -> List[StudySpec]:
    from rich.console import Console

    specs = list_studies()
    (console or Console()).print(studies_table(specs))
    return specs


# ---------------------------------------------------------------------------------------------
# Finding runs to resume
# ---------------------------------------------------------------------------------------------

def find_resumable_parent(client, exp_id: str, study: str, settings_hash: str):
    """The newest parent of this study with these settings that did not finish (or None)."""
    runs = client.search_runs([exp_id], filter_string=(f"tags.kind = 'ablation' and tags.study = '{study}' "
                                                       f"and tags.settings_hash = '{settings_hash}'"),
                              order_by=["attributes.start_time DESC"], max_results=50)
    return next((r for r in runs if r.info.status != STATUS_FINISHED), None)


def find_child(client, exp_id: str, parent_id: str, variant: str, seed: int):
    """The child run of (variant, seed): a FINISHED one if any, else the newest (or None)."""
    runs = client.search_runs([exp_id], filter_string=(f"tags.mlflow.parentRunId = '{parent_id}' and "
                                                       f"tags.variant = '{variant}' and tags.seed = '{seed}'"),
                              order_by=["attributes.start_time DESC"], max_results=50)
    return next((r for r in runs if r.info.status == STATUS_FINISHED), runs[0] if runs else None)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _study_info(plan: StudyPlan) -> Dict[str, Any]:
    """What the report needs besides the children: logged as the parent's study.json."""
    spec = plan.spec.to_dict()
    return {"spec": spec, "seeds_used": sorted({c.seed for c in plan.children}), "steps": plan.steps,
            "overrides": plan.overrides, "baseline_gmacs": plan.baseline_gmacs, "settings_hash": plan.settings_hash}


def _run_child(child: ChildPlan, *, spec: StudySpec, parent_id: str, existing, uri: str, folder: Path,
               progress: bool, console) -> ChildOutcome:
    from ..train.checkpoint import list_checkpoints
    from ..train.sampling import load_checkpoint
    from ..eval.evaluate import evaluate_model

    tags = {"study": spec.name, "variant": child.variant, "seed": child.seed, "seed_index": child.seed_index,
            "kind": "ablation-child"}
    resume = "latest" if list_checkpoints(folder) else None
    what = "resuming" if resume else "training"
    console.print(f"[bold]{spec.name}[/]: {what} {child.variant} (seed {child.seed}) in {folder}")
    with tracked_run(f"{child.variant}-seed{child.seed}", uri=uri, parent_run_id=parent_id, tags=tags,
                     run_id=existing.info.run_id if existing is not None else None) as tracker:
        result = train_in_run(tracker, child.cfg, folder, resume=resume, progress=progress, study=spec.name,
                              variant=child.variant, seed=child.seed)
        model, _, _ = load_checkpoint(result.checkpoint, use_ema=True, device="cpu")
        # Same seed for every variant: the evaluation noise is paired too.
        metrics = evaluate_model(model, child.cfg, tracker=tracker, step=result.step, weights="ema",
                                 data_info=result.data_info, seed=child.seed, save_dir=folder / "eval",
                                 progress=progress)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not k.endswith("_std"))
    console.print(f"  {child.variant} seed {child.seed}: {shown}")
    return ChildOutcome(child.variant, child.seed, tracker.run_id, STATUS_FINISHED, False, folder, metrics)


def run_ablation(name: str, *, seeds: int | None = None, steps: int | None = None,
                 overrides: Mapping[str, Any] | List[str] | None = None, uri: str | None = None,
                 out_dir=None, progress: bool = True, console=None,
                 experiment: str = DEFAULT_EXPERIMENT) -> StudyResult:
    """Run (or resume) a study; see the module docstring. overrides: `--set` items ("k=v" strings
    or a {dotted key: value} dict) applied to every variant. out_dir: the study's folder (default
    runs/studies/<study>-<parent run id>/), one sub-folder per child."""
    from rich.console import Console

    console = console or Console()
    spec = load_study(name)
    plan = plan_study(spec, seeds=seeds, steps=steps, overrides=overrides)  # every config checked first
    uri = resolve_tracking_uri(uri)
    client = get_client(uri)  # an unreachable store fails here, before any training
    exp_id = experiment_id(client, experiment)
    existing_parent = find_resumable_parent(client, exp_id, spec.name, plan.settings_hash)
    commit, dirty = git_state()
    parent_tags = {"study": spec.name, "kind": "ablation", "settings_hash": plan.settings_hash,
                   "git_commit": commit, "git_dirty": None if dirty is None else str(dirty).lower(),
                   **{f"version.{k}": v for k, v in package_versions().items()}}
    start = time.time()
    outcomes: List[ChildOutcome] = []
    failures: List[str] = []
    with tracked_run(spec.name, uri=uri, experiment=experiment, tags=parent_tags,
                     run_id=existing_parent.info.run_id if existing_parent is not None else None) as parent:
        root = Path(out_dir) if out_dir is not None else Path("runs") / "studies" / f"{spec.name}-{parent.run_id[:8]}"
        if existing_parent is None:
            info = _study_info(plan)
            parent.log_dict(info, STUDY_FILE)
            parent.log_artifact(spec.path, "study")
            parent.log_params({"study.name": spec.name, "study.base": spec.base, "study.seeds": plan.seeds,
                               "study.steps": plan.steps, "study.primary": spec.primary,
                               "study.baseline": spec.baseline, "study.metrics": spec.metrics,
                               "study.compute_matched": spec.compute_matched,
                               "study.baseline_gmacs": plan.baseline_gmacs,
                               "study.overrides": json.dumps(plan.overrides, sort_keys=True),
                               "study.out_dir": str(root.resolve())})
            console.print(f"Study [bold]{spec.name}[/]: {len(plan.children)} runs "
                          f"({len(spec.variants)} variants x {plan.seeds} seed(s)), parent run {parent.run_id}")
        else:
            console.print(f"Study [bold]{spec.name}[/]: resuming parent run {parent.run_id}")
        for child in plan.children:
            folder = root / f"{child.variant}-seed{child.seed}"
            found = find_child(client, exp_id, parent.run_id, child.variant, child.seed)
            if found is not None and found.info.status == STATUS_FINISHED:
                console.print(f"[dim]{spec.name}: {child.variant} (seed {child.seed}) already finished, skipped[/]")
                outcomes.append(ChildOutcome(child.variant, child.seed, found.info.run_id, STATUS_FINISHED, True,
                                             folder, dict(found.data.metrics)))
                continue
            try:
                outcomes.append(_run_child(child, spec=spec, parent_id=parent.run_id, existing=found, uri=uri,
                                           folder=folder, progress=progress, console=console))
            except Exception as e:  # one diverging or broken variant must not cost the others
                if not isinstance(e, UserError):
                    console.print_exception()
                console.print(f"[red]{spec.name}: {child.variant} (seed {child.seed}) failed:[/] {e}")
                failed = find_child(client, exp_id, parent.run_id, child.variant, child.seed)
                outcomes.append(ChildOutcome(child.variant, child.seed, failed.info.run_id if failed else None,
                                             STATUS_FAILED, False, folder))
                failures.append(f"{child.variant} seed {child.seed}: {e}")
        parent.log_metrics({"study.wall_time_s": time.time() - start,
                            "study.children_trained": sum(o.status == STATUS_FINISHED and not o.skipped
                                                          for o in outcomes)})
        report = build_report(parent.run_id, uri)
        report.log(parent)
        paths = report.write(root / "report")
        report.print(console)
        console.print(f"Report: {paths['markdown']}, plot {paths['plot']}")
        console.print(browse_hint(parent.run_id, uri, report=True))
        if failures:  # the parent ends FAILED, so the same command resumes it and retries these
            raise UserError(f"{len(failures)} of {len(plan.children)} runs of study {spec.name!r} failed (first: "
                            f"{failures[0]}); the report covers the rest; run the same command again to retry "
                            f"the failed ones")
    return StudyResult(spec.name, parent.run_id, plan.settings_hash, existing_parent is not None, root, outcomes,
                       report, paths)


__all__ = ["ChildOutcome", "StudyResult", "find_child", "find_resumable_parent", "print_studies", "run_ablation",
           "studies_table"]

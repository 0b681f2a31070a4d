"""`fcdm-lab ablate`: every (variant, seed) of a study trained, evaluated and compared with verdicts.

    result = run_ablation("grn-vs-cca")                          # the main job: 2 workers on 2 cores
    result = run_ablation("kernel-size", seeds=3, steps=500, overrides=["train.lr=3e-4"], workers=4)
    result = run_ablation("paper-ablation-fashion", until_decided=True, max_seeds=10)

A study is an Optuna study (storage.py; sqlite:///optuna.db by default, any RDB URL with
`--storage`) whose trials are the (variant, seed) grid, named after the study and a hash of its
resolved settings (not of the number of seeds: more seeds extend the same study), and one MLflow
parent run (tags study, kind=ablation, settings_hash; its id in the Optuna study's user attrs) with
one child run per variant and seed. Workers (launchers.py) run the trials on the engine
(engine.py): one single-thread worker per core on CPU, one per GPU on GPU machines. Variants with
the same seed share data order, diffusion noise and evaluation noise, so the report's paired
differences cancel most of the seed noise; the report (report.py, verdicts.py) gives each variant
better / worse / inconclusive per metric, Holm-adjusted over the variants.

`until_decided`: seeds in rounds. The first round trains the study's seeds (at least
MIN_SEQUENTIAL_SEEDS: the anytime-valid intervals are not finite before); after each round the
primary metric's verdicts use anytime-valid confidence sequences (sequential.py), and the next round
gives one more seed to the baseline and to each variant still undecided, until every variant is
decided, `max_seeds` is reached or the `budget_s` would be exceeded by another round.

Running the same command again joins the same study: finished children are kept, interrupted or
failed ones are queued again and resume from their newest checkpoint, reopening their MLflow run.
A second `ablate` of the same study started at the same time (or on another machine with the same
`--storage` and tracking store) works on the same queue: no child is trained twice. A child that
fails (diverged, broken) is marked FAILED and the others go on; at the end the report covers what
finished and the call raises a UserError naming the failures (the parent ends FAILED, and the same
command retries just those). Ctrl+C stops the study (parent and running children KILLED).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional


from ..display import output_console, report_files_line, studies_table
from ..errors import UserError
from ..eval.metrics import lower_is_better, metric_key
from ..runner import run_experiment
from ..tracking.client import (DEFAULT_EXPERIMENT, STATUS_FAILED, STATUS_FINISHED, STATUS_KILLED, STATUS_RUNNING,
                               Tracker, experiment_id, get_client, resolve_tracking_uri, tracked_run)
from ..tracking.record import git_state, package_versions
from ..tracking.ui import browse_hint
from ..training.preflight import check_config
from ..training.state import find_latest_checkpoint
from .engine import WorkerSlots, claim_waiting, nothing_left, work
from .launchers import Launcher, run_workers, threads_per_worker
from .report import Report, study_report
from .sequential import needs_more_seeds, sequential_verdicts
from .spec import ChildPlan, StudyPlan, StudySpec, list_studies, load_study, plan_study
from .stored import STUDY_FILE
from .storage import DEFAULT_STORAGE, check_storage_url, open_storage, redact, sqlite_init_lock
from .study import PARENT_ATTR, new_parent_run, open_study
from .sweep_file import load_sweep, sweep_names

PLAN_ATTR = "settings_hash"
ROOT_ATTR = "out_dir"
MIN_SEQUENTIAL_SEEDS = 4    # sequential.py: an anytime-valid interval is finite from 4 paired seeds


@dataclass
class ChildOutcome:
    variant: str
    seed: int
    run_id: Optional[str]
    status: str                          # FINISHED | FAILED | KILLED | RUNNING | missing
    skipped: bool                        # finished before this call (not trained by it)
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
    study_name: str = ""
    storage: str = ""
    trained_here: int = 0                # children trained by this call's workers
    rounds: int = 1                      # until_decided: rounds of seeds run by this call


def print_studies(console=None) -> List[StudySpec]:
    """`fcdm-lab ablate` with no name: every bundled study and sweep, one line each."""
    specs = list_studies()
    (console or output_console()).print(studies_table(specs, [load_sweep(n) for n in sweep_names()]))
    return specs


def find_child(client, exp_id: str, parent_id: str, variant: str, seed: int):
    """The child run of (variant, seed): a FINISHED one if any, else the newest (or None)."""
    runs = client.search_runs([exp_id], filter_string=(f"tags.mlflow.parentRunId = '{parent_id}' and "
                                                       f"tags.variant = '{variant}' and tags.seed = '{seed}'"),
                              order_by=["attributes.start_time DESC"], max_results=50)
    return next((r for r in runs if r.info.status == STATUS_FINISHED), runs[0] if runs else None)


def _key(frozen) -> tuple:
    return frozen.user_attrs.get("variant"), frozen.user_attrs.get("seed")


# ---------------------------------------------------------------------------------------------
# The job the engine runs, and the worker that builds it
# ---------------------------------------------------------------------------------------------

class AblationJob:
    """Trials are (variant, seed) children; each is trained, evaluated and logged by the run
    pipeline into a child run of the study's parent, in <root>/<variant>-seed<seed>/."""

    def __init__(self, plan: StudyPlan, *, parent_id: str, uri: str, root: Path, progress: bool, console,
                 experiment: str = DEFAULT_EXPERIMENT, threads: Optional[int] = None, worker: int = 0):
        self.plan, self.spec = plan, plan.spec
        self.children: Dict[tuple, ChildPlan] = {(c.variant, c.seed): c for c in plan.children}
        self.parent_id, self.uri, self.root = parent_id, uri, Path(root)
        self.progress, self.console, self.threads, self.worker = progress, console, threads, worker
        self.client = get_client(uri, probe=False)
        self.exp_id = experiment_id(self.client, experiment)

    def folder(self, variant: str, seed: int) -> Path:
        return self.root / f"{variant}-seed{seed}"

    def claim(self, study):
        """A queued child that no other trial has finished or is running (a lower-numbered RUNNING
        trial of the same child wins, so a child queued twice by two launchers runs once)."""
        from optuna.trial import TrialState  # optuna: loaded by the processes that run trials only

        while True:
            trial = claim_waiting(study)
            if trial is None:
                return None
            key = _key(trial)
            rivals = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                      if _key(t) == key and t.number != trial.number]
            twin = next((t for t in rivals if t.state == TrialState.COMPLETE or t.number < trial.number), None)
            if twin is None:
                return trial
            trial.set_user_attr("duplicate_of", twin.number)
            study.tell(trial, state=TrialState.PRUNED)

    def run(self, trial) -> float:
        variant, seed = _key(trial)
        child = self.children.get((variant, seed))
        if child is None:
            raise UserError(f"trial {trial.number} names {variant}/seed{seed}, which is not in this study's plan")
        trial.suggest_categorical("variant", self.spec.variant_names())  # as Optuna params, for dashboards
        trial.suggest_int("seed", min(k[1] for k in self.children), max(k[1] for k in self.children))
        cfg = child.cfg
        if self.threads is not None and cfg.train.threads is None:
            cfg.train.threads = self.threads
        folder = self.folder(variant, seed)
        existing = find_child(self.client, self.exp_id, self.parent_id, variant, seed)
        resume = "latest" if find_latest_checkpoint(folder) is not None else None
        what = "resuming" if resume else "training"
        self.console.print(f"[bold]{self.spec.name}[/]: {what} {variant} (seed {seed}) [dim](worker {self.worker}, "
                           f"trial {trial.number})[/]", highlight=False, soft_wrap=True)
        tags = {"study": self.spec.name, "variant": variant, "seed": seed, "seed_index": child.seed_index,
                "kind": "ablation-child", "optuna.trial": trial.number}
        with tracked_run(f"{variant}-seed{seed}", uri=self.uri, parent_run_id=self.parent_id, tags=tags,
                         run_id=existing.info.run_id if existing is not None else None) as tracker:
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            out = run_experiment(tracker, cfg, folder, resume=resume, evaluate=True, eval_seed=seed,
                                 progress=self.progress, study=self.spec.name, variant=variant, seed=seed)
        keys = [metric_key(m, out.metrics) for m in self.spec.metrics]  # the study's metrics; the run logs the rest
        shown = ", ".join(f"{k} {out.metrics[k]:.4g}" for k in keys if k is not None)
        self.console.print(f"  {variant} seed {seed}: {shown}", highlight=False, soft_wrap=True)
        key = metric_key(self.spec.primary, out.metrics)
        value = out.metrics.get(key) if key else None
        return float(value) if value is not None else float("nan")

    def finished(self, study) -> bool:
        return nothing_left(study)


@dataclass
class AblationWorker:
    """A worker of a study that exists already (engine WorkerJob: picklable, rebuilt in the worker)."""

    name: str
    study_name: str
    seeds: Optional[int]
    steps: Optional[int]
    overrides: Dict[str, Any]
    uri: str
    storage: str
    launch: str                             # the id of the command that started the worker
    progress: bool = True
    experiment: str = DEFAULT_EXPERIMENT

    def run(self, *, console, worker: int, threads: int, shared: bool) -> None:
        import optuna  # ~0.4 s: loaded by the processes that run trials only

        spec, plan, storage_url, uri = _prepare(self.name, seeds=self.seeds, steps=self.steps,
                                                overrides=self.overrides, uri=self.uri, storage=self.storage)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=self.study_name, storage=open_storage(storage_url))
        if study.user_attrs.get(PLAN_ATTR) != plan.settings_hash:
            raise UserError(f"Optuna study {self.study_name!r} was created from other study settings; use the same "
                            f"study file, --steps and --set as its creator")
        job = AblationJob(plan, parent_id=study.user_attrs[PARENT_ATTR], uri=uri,
                          root=Path(study.user_attrs[ROOT_ATTR]), progress=self.progress, console=console,
                          experiment=self.experiment, threads=threads, worker=worker)
        if shared:
            with WorkerSlots(threads) as slots:
                work(study, job, console=console, slots=slots, launch=self.launch)
        else:
            work(study, job, console=console, launch=self.launch)


# ---------------------------------------------------------------------------------------------
# Creating or joining the study
# ---------------------------------------------------------------------------------------------

def _study_info(plan: StudyPlan) -> Dict[str, Any]:
    """What the report needs besides the children: logged as the parent's study.json."""
    spec = plan.spec.to_dict()
    return {"spec": spec, "seeds_used": sorted({c.seed for c in plan.children}), "steps": plan.steps,
            "overrides": plan.overrides, "baseline_gmacs": plan.baseline_gmacs, "settings_hash": plan.settings_hash}


def _check_variants(plan: StudyPlan) -> None:
    """Build every variant's model on the meta device (and load the data, and check the memory) before
    anything trains or is created: a bad block option in the last variant fails now, not after the
    first ones trained."""
    seen = set()
    for child in plan.children:
        if child.variant in seen:
            continue
        seen.add(child.variant)
        try:
            check_config(child.cfg)
        except UserError as e:
            raise UserError(f"study {plan.spec.name!r}, variant {child.variant!r}: {e}") from None


def _parent_tags(plan: StudyPlan, study_name: str, storage_text: str) -> Dict[str, Any]:
    commit, dirty = git_state()
    return {"study": plan.spec.name, "kind": plan.spec.kind, "settings_hash": plan.settings_hash,
            "optuna.study": study_name, "optuna.storage": storage_text, "git_commit": commit,
            "git_dirty": None if dirty is None else str(dirty).lower(),
            **{f"version.{k}": v for k, v in package_versions().items()}}


def _log_parent_inputs(client, parent_id: str, plan: StudyPlan, root: Path) -> None:
    spec = plan.spec
    parent = Tracker(client, parent_id)
    parent.log_dict(_study_info(plan), STUDY_FILE)
    parent.log_artifact(spec.path, "study")
    parent.log_params({"study.name": spec.name, "study.base": spec.base, "study.seeds": plan.seeds,
                       "study.steps": plan.steps, "study.primary": spec.primary, "study.baseline": spec.baseline,
                       "study.metrics": spec.metrics, "study.compute_matched": spec.compute_matched,
                       "study.baseline_gmacs": plan.baseline_gmacs,
                       "study.overrides": json.dumps(plan.overrides, sort_keys=True),
                       "study.out_dir": str(root.resolve())})


def _enqueue(study, child: ChildPlan) -> None:
    """Queue one child: its (variant, seed) as fixed Optuna params and as user attrs (which the retry
    copy of a dead worker's trial inherits)."""
    study.enqueue_trial({"variant": child.variant, "seed": child.seed},
                        user_attrs={"variant": child.variant, "seed": child.seed})


def _queue(study, children: List[ChildPlan]) -> int:
    """Queue every child with no COMPLETE, WAITING or RUNNING trial (new, interrupted, failed, or out
    of retries): how a study starts, resumes or grows by seeds. Returns how many were queued."""
    from optuna.trial import TrialState  # optuna: ~0.4 s, loaded with the study

    live = {_key(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING,
                                                                      TrialState.RUNNING))}
    missing = [c for c in children if (c.variant, c.seed) not in live]
    for child in missing:  # seed-major: whole pairs finish first
        _enqueue(study, child)
    return len(missing)


def _prepare(name: str, *, seeds, steps, overrides, uri, storage, probe: bool = False) -> tuple:
    """Everything checked before anything is created: the study file, every child's config, the
    URLs (the tracking store probed when `probe`), every variant's model and the data."""
    spec = load_study(name)
    plan = plan_study(spec, seeds=seeds, steps=steps, overrides=overrides)  # every config checked first
    storage_url = check_storage_url(storage or DEFAULT_STORAGE)
    uri = resolve_tracking_uri(uri)
    if probe:
        get_client(uri)  # an unreachable store fails here, in seconds
    _check_variants(plan)
    return spec, plan, storage_url, uri


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------

def run_ablation(name: str, *, seeds: int | None = None, steps: int | None = None,
                 overrides: Mapping[str, Any] | List[str] | None = None, uri: str | None = None,
                 out_dir=None, progress: bool = True, console=None, experiment: str = DEFAULT_EXPERIMENT,
                 workers: Optional[int] = None, storage: Optional[str] = None,
                 launcher: Optional[Launcher] = None, until_decided: bool = False, max_seeds: int | None = None,
                 budget_s: float | None = None) -> StudyResult:
    """Run, join or resume a study; see the module docstring. overrides: `--set` items ("k=v"
    strings or a {dotted key: value} dict) applied to every variant. out_dir: the study's folder
    (default runs/studies/<study>-<parent run id>/), one sub-folder per child. workers: processes on
    this machine (default: one per core on CPU, one per GPU; one job under Slurm); storage: Optuna
    RDB URL; launcher: where the workers run (launchers.Launcher; default local processes).
    until_decided: seeds in rounds until every variant is decided on the primary metric, at most
    max_seeds (default 20) per variant, no new round when it would pass budget_s seconds."""
    import optuna  # ~0.4 s: the CLI refuses bad input before this
    from optuna.trial import TrialState

    console = console or output_console()
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    launcher = launcher or Launcher()
    storage, uri = launcher.shared_stores(check_storage_url(storage), resolve_tracking_uri(uri))
    spec0 = load_study(name)
    first = seeds if seeds is not None else spec0.seeds
    if until_decided:
        max_seeds = 20 if max_seeds is None else max_seeds
        first = max(first, MIN_SEQUENTIAL_SEEDS)
        if max_seeds < first:
            raise UserError(f"--max-seeds must be >= {first} (the first round: the anytime-valid intervals need "
                            f"{MIN_SEQUENTIAL_SEEDS} paired seeds), got {max_seeds}")
        if len(spec0.variants) < 2:
            raise UserError(f"study {spec0.name!r} has no variant besides its baseline: nothing to decide")
    elif max_seeds is not None or budget_s is not None:
        raise UserError("--max-seeds and --budget apply to --until-decided only")
    spec, plan, storage_url, uri = _prepare(name, seeds=first, steps=steps, overrides=overrides, uri=uri,
                                            storage=storage, probe=True)
    client = get_client(uri, probe=False)
    exp_id = experiment_id(client, experiment)
    storage_text = redact(storage_url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_obj = open_storage(storage_url)
    study_name = f"ablate-{spec.name}-{plan.settings_hash}"

    def on_create(study, parent: str) -> None:
        root = Path(out_dir) if out_dir is not None else Path("runs") / "studies" / f"{spec.name}-{parent[:8]}"
        _log_parent_inputs(client, parent, plan, root)
        study.set_user_attr(PLAN_ATTR, plan.settings_hash)
        study.set_user_attr(ROOT_ATTR, str(root.resolve()))

    with sqlite_init_lock(storage_url):  # one launcher at a time creates or re-queues on one machine
        study, parent_id, created = open_study(
            storage_obj, study_name, client=client, uri=uri, storage_text=storage_text, what="study",
            make_parent=lambda: new_parent_run(client, spec.name, _parent_tags(plan, study_name, storage_text),
                                               experiment),
            create={"direction": "minimize" if lower_is_better(spec.primary) else "maximize"},
            on_create=on_create)
        root = Path(study.user_attrs["out_dir"])
        queued = _queue(study, plan.children)
    done_before = {_key(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    todo = len([c for c in plan.children if (c.variant, c.seed) not in done_before])
    n = min(launcher.default_workers() if workers is None else workers, max(1, todo))
    mode = f"; until decided (at most {max_seeds} seeds)" if until_decided else ""
    if created:
        console.print(f"Study [bold]{spec.name}[/]: {len(plan.children)} runs ({len(spec.variants)} variants x "
                      f"{plan.seeds} seed(s)) on {n} worker(s){mode}\n  parent run {parent_id}; Optuna study "
                      f"{study_name} in {storage_text}", highlight=False, soft_wrap=True)
    else:
        console.print(f"Study [bold]{spec.name}[/]: joining parent run {parent_id} ({len(done_before)} of "
                      f"{len(plan.children)} runs finished, {queued} queued){mode} with {n} worker(s)",
                      highlight=False, soft_wrap=True)

    start = time.time()
    launch = uuid.uuid4().hex
    client.update_run(parent_id, status=STATUS_RUNNING)
    if until_decided:
        client.set_tag(parent_id, "study.mode", "until-decided")
        client.set_tag(parent_id, "study.max_seeds", str(max_seeds))
    worker_job = AblationWorker(name, study_name, first, steps, plan.overrides, uri, storage_url, launch,
                                progress=progress and n == 1 and not launcher.submits, experiment=experiment)
    rounds, round_times = 0, []
    try:
        while True:
            rounds += 1
            round_start = time.time()
            _run_round(study, worker_job, plan, n, launcher, console)
            round_times.append(time.time() - round_start)
            if not until_decided:
                break
            more = _next_round(spec, client, exp_id, parent_id, plan, max_seeds)
            if not more:
                break
            if budget_s is not None and time.time() - start + max(round_times) > budget_s:
                console.print(f"[yellow]{spec.name}[/]: stopping before round {rounds + 1}: another round (~"
                              f"{max(round_times):.0f} s) would pass the budget of {budget_s:.0f} s", highlight=False)
                break
            seeds_now = plan.seeds + 1
            plan = plan_study(spec, seeds=seeds_now, steps=steps, overrides=plan.overrides)
            wanted = [c for c in plan.children if c.seed_index == seeds_now - 1 and c.variant in {*more, spec.baseline}]
            worker_job.seeds = seeds_now
            with sqlite_init_lock(storage_url):
                _queue(study, wanted)
            console.print(f"[bold]{spec.name}[/]: round {rounds + 1}: seed {wanted[0].seed} for {spec.baseline} "
                          f"and the undecided {', '.join(more)}", highlight=False, soft_wrap=True)
    except BaseException as e:
        _close_children(client, exp_id, parent_id, study, STATUS_KILLED)
        client.set_terminated(parent_id, STATUS_KILLED if isinstance(e, KeyboardInterrupt) else STATUS_FAILED)
        if isinstance(e, KeyboardInterrupt):
            console.print(f"[yellow]interrupted[/]: run the same command again to resume study {spec.name!r}",
                          highlight=False)
        raise
    _close_children(client, exp_id, parent_id, study, STATUS_FAILED)
    return _finish(plan, study, client=client, exp_id=exp_id, parent_id=parent_id, uri=uri, root=root,
                   created=created, done_before=done_before, start=start, console=console, launch=launch,
                   study_name=study_name, storage_text=storage_text, rounds=rounds)


def _run_round(study, worker_job: AblationWorker, plan: StudyPlan, n: int, launcher: Launcher, console) -> None:
    """Work until nothing is queued or running: in this process with one local worker, else in
    worker processes or jobs (stopped by a signal: KeyboardInterrupt)."""
    if nothing_left(study):
        console.print(f"[dim]{plan.spec.name}: every queued run has finished[/]")
    elif n == 1 and not launcher.submits:
        worker_job.run(console=console, worker=0, threads=threads_per_worker(1), shared=True)
    else:
        codes = run_workers(worker_job, n, launcher, console)
        if any(c in (130, 143) for c in codes):  # the workers were stopped by a signal
            raise KeyboardInterrupt(f"a worker was stopped (exit codes {codes})")


def _next_round(spec: StudySpec, client, exp_id: str, parent_id: str, plan: StudyPlan,
                max_seeds: int) -> List[str]:
    """The variants that get another seed: undecided on the primary metric (anytime-valid, Bonferroni
    over the variants), below max_seeds. Empty when the study is decided or out of seeds."""
    values: Dict[str, Dict[int, float]] = {}
    for run in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
        if run.info.status != STATUS_FINISHED:
            continue
        key = metric_key(spec.primary, run.data.metrics)
        if key is not None:
            values.setdefault(run.data.tags.get("variant"), {})[int(run.data.tags.get("seed"))] = run.data.metrics[key]
    base = values.get(spec.baseline, {})
    diffs = {v.name: [values.get(v.name, {})[s] - base[s] for s in sorted(base) if s in values.get(v.name, {})]
             for v in spec.variants if v.name != spec.baseline}
    verdicts = sequential_verdicts(diffs, lower_is_better=lower_is_better(spec.primary), max_seeds=max_seeds)
    return needs_more_seeds(verdicts)


def _close_children(client, exp_id: str, parent_id: str, study, status: str) -> None:
    """Child runs left RUNNING by a worker that died without a retry (out of retries, or the study
    was stopped) end with `status`: nothing stays RUNNING in MLflow once the study ends."""
    from optuna.trial import TrialState  # optuna: loaded with the study

    running = {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for run in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = "
                                            f"'{STATUS_RUNNING}'"):
        if run.info.run_id not in running:
            client.set_terminated(run.info.run_id, status)


def _finish(plan: StudyPlan, study, *, client, exp_id, parent_id, uri, root, created, done_before, start, console,
            launch, study_name, storage_text, rounds) -> StudyResult:
    from optuna.trial import TrialState  # optuna: loaded with the study

    spec = plan.spec
    trials = study.get_trials(deepcopy=False)
    complete = {_key(t): t for t in trials if t.state == TrialState.COMPLETE}
    failed = [t for t in trials if t.state == TrialState.FAIL and _key(t) not in complete]
    queued = {_key(t) for t in trials}  # until_decided: decided variants' later seeds were never queued
    outcomes: List[ChildOutcome] = []
    for child in plan.children:
        key = (child.variant, child.seed)
        if key not in queued:
            continue
        run = find_child(client, exp_id, parent_id, child.variant, child.seed)
        status = run.info.status if run is not None else "missing"
        outcomes.append(ChildOutcome(child.variant, child.seed, run.info.run_id if run else None, status,
                                     key in done_before, root / f"{child.variant}-seed{child.seed}",
                                     dict(run.data.metrics) if run else {}))
    parent = Tracker(client, parent_id, resumed=True)
    trained = sum(t.user_attrs.get("launch") == launch for t in complete.values())  # by this command's workers
    parent.log_metrics({"study.wall_time_s": time.time() - start, "study.children_trained": trained,
                        "study.rounds": rounds})
    missing = [o for o in outcomes if o.status != STATUS_FINISHED]
    report = study_report(parent_id, uri)
    report.status = STATUS_FAILED if missing else STATUS_FINISHED  # what the parent ends as, just below
    paths = report.write(root / "report")
    report.log(parent, paths)  # the files just written, not rendered again
    report.print(console)
    console.print(report_files_line(paths), highlight=False, soft_wrap=True)
    console.print(browse_hint(parent_id, uri, report=True), highlight=False, soft_wrap=True)
    client.set_terminated(parent_id, report.status)
    if missing:  # the parent ends FAILED, so the same command resumes it and retries these
        errors = {_key(t): t.user_attrs.get("error", "failed") for t in failed}
        first = missing[0]
        raise UserError(f"{len(missing)} of {len(outcomes)} runs of study {spec.name!r} failed (first: "
                        f"{first.variant} seed {first.seed}: {errors.get((first.variant, first.seed), first.status)}); "
                        f"the report covers the rest; run the same command again to retry the failed ones")
    return StudyResult(spec.name, parent_id, plan.settings_hash, not created, root, outcomes, report, paths,
                       study_name=study_name, storage=storage_text, trained_here=trained, rounds=rounds)


__all__ = ["AblationJob", "AblationWorker", "ChildOutcome", "StudyResult", "find_child", "print_studies",
           "run_ablation"]

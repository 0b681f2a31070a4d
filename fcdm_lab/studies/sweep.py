"""Optuna sweeps: how does sample quality scale with FCDM's depth L and width C at a fixed budget?

A sweep file in studies/ (`kind = "sweep"`) names a base experiment, a search space over
experiment keys, one objective (optionally pruned on intermediate evaluations) or two (a metric and
GMACs: a Pareto front), a sampler and a training budget (steps, or compute = GMACs x steps):

    kind = "sweep"
    base = "tiny-digits"
    trials = 8
    objectives = [ { metric = "fid_digits", direction = "minimize" }, { metric = "gmacs", direction = "minimize" } ]
    sampler = "nsga2"
    budget = { steps = 800 }
    [space]
    L = { type = "int", low = 1, high = 2 }
    C = { type = "int", low = 16, high = 48, step = 8 }

Many workers: `fcdm-lab sweep NAME --storage URL` started on each process or machine joins one
Optuna study. `trials` is the study's target (finished + running trials), not a per-worker count,
so N workers share it and a rerun tops up failed or missing trials. The study's user attrs hold the
MLflow parent run id: every worker attaches its trials (child runs, logged from the objective, not
Optuna's deprecated MLflowCallback) to that one parent. Several workers on one machine should
use one torch thread each (`--set train.threads=1`).

Training is deterministic given `train.seed`, so a point proposed a second time (samplers do that
in small discrete spaces) reuses the finished trial's values instead of training again.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..config import ExperimentConfig, load_experiment, resolve_experiment_path, resolve_named_file, read_toml
from ..errors import UserError, choices
from .engine import PARENT_ATTR, URI_ATTR, claim_waiting, run_workers, work
from .storage import DEFAULT_STORAGE, STORAGE_FORMS, check_storage_url, open_storage, redact, sqlite_init_lock
from .spec import (STUDIES_DIR, SECTIONS, flatten_overrides, lower_is_better, model_info_for, normalize_overrides,
                   strict_table, typed_value)

SAMPLERS = ("nsga2", "tpe", "random", "grid")
PRUNERS = ("none", "median", "hyperband")
DIRECTIONS = ("minimize", "maximize")
PARAM_TYPES = ("int", "float", "categorical")
SHORT_KEYS = {"L": "model.L", "C": "model.C"}          # space names that stand for experiment keys
MODEL_METRICS = ("gmacs", "params")                    # known before training (meta-device build)
TRAIN_METRICS = ("final_loss", "images_per_s", "wall_time_s")
HIGHER_IS_BETTER = ("images_per_s",)
SPEC_ATTR = "sweep_spec"

SWEEP_KEYS: Dict[str, tuple] = {
    "kind": (str, True, 'must be "sweep"'),
    "description": (str, False, "one line saying what the sweep asks"),
    "base": (str, True, "an experiment name in experiments/ or a path (relative to the sweep file)"),
    "trials": (int, False, "the study's target number of trials (default 8)"),
    "objectives": (list, True, "[{metric, direction}] (one, or two for a Pareto front)"),
    "sampler": (str, False, f"{' | '.join(SAMPLERS)} (default tpe)"),
    "pruner": (str, False, f"{' | '.join(PRUNERS)} (default none; single objective only)"),
    "budget": (dict, True, "{steps = N} or {compute = GMACs x steps}"),
    "eval_every": (int, False, "intermediate evaluation every N steps (0 = only at the end)"),
    "set": (dict, False, "experiment overrides applied to every trial"),
    "space": (dict, True, "the space table: NAME = {type, low, high, step, log, choices}"),
    "seed": (int, False, "sampler seed (the worker that creates the study)"),
    "population": (int, False, "NSGA-II population size (default: trials // 2, at least 2, at most 50)"),
}
PARAM_KEYS = {
    "int": ("type", "low", "high", "step", "log"),
    "float": ("type", "low", "high", "step", "log"),
    "categorical": ("type", "choices"),
}


# ---------------------------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------------------------

@dataclass
class Objective:
    metric: str
    direction: str          # minimize | maximize


@dataclass
class Param:
    name: str               # as written in [space] and shown in tables ("L", "C", "train.lr")
    key: str                # the experiment key it sets ("model.L")
    type: str               # int | float | categorical
    low: Any = None
    high: Any = None
    step: Any = None
    log: bool = False
    choices: Optional[list] = None

    def suggest(self, trial) -> Any:
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_categorical(self.name, self.choices)

    def grid(self) -> list:
        """Every value (the grid sampler's axis); only for discrete parameters."""
        if self.type == "categorical":
            return list(self.choices)
        if (self.step is None and self.type == "float") or self.log:
            raise UserError(f"sampler 'grid' needs discrete parameters: give space.{self.name} a step "
                            f"(and no log), or use sampler = 'tpe' | 'nsga2' | 'random'")
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        return [self.low + i * step if self.type == "int" else round(self.low + i * step, 12) for i in range(n)]

    def extremes(self) -> tuple[Any, Any]:
        """The two ends of the range (checked against the experiment before any trial runs)."""
        if self.type == "categorical":
            return self.choices[0], self.choices[-1]
        high = self.grid()[-1] if self.type == "int" and not self.log else self.high  # the last value a step reaches
        return self.low, high


@dataclass
class Budget:
    steps: Optional[int] = None
    compute: Optional[float] = None     # GMACs (one image, one forward pass) x training steps

    def steps_for(self, gmacs: float) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, round(self.compute / gmacs))

    def describe(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"compute {self.compute:g} GMACs x steps"


@dataclass
class SweepSpec:
    name: str
    path: str
    base: str
    objectives: List[Objective]
    space: List[Param]
    budget: Budget
    description: str = ""
    trials: int = 8
    sampler: str = "tpe"
    pruner: str = "none"
    eval_every: int = 0
    set: Dict[str, Any] = field(default_factory=dict)
    seed: Optional[int] = None
    population: Optional[int] = None

    @property
    def metrics(self) -> List[str]:
        return [o.metric for o in self.objectives]

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    def base_path(self) -> str:
        """`base` relative to the sweep file when it is a path, else an experiment name."""
        base = Path(self.base)
        if base.suffix == ".toml" and not base.is_absolute():
            return str(Path(self.path).parent / base)
        return self.base

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _one_of(where: str, key: str, value: str, valid) -> str:
    if value not in valid:
        raise UserError(f"{where}: {key} = {value!r} is not valid; choose one of: {choices(valid)}")
    return value


def _parse_param(where: str, name: str, raw: Any) -> Param:
    where = f"{where}, space.{name}"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a table like {{ type = \"int\", low = 1, high = 4 }}, got {raw!r}")
    ptype = _one_of(where, "type", typed_value(where, "type", raw.get("type", ""), str), PARAM_TYPES)
    unknown = sorted(set(raw) - set(PARAM_KEYS[ptype]))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} for type {ptype!r}; valid keys: "
                        f"{choices(PARAM_KEYS[ptype])}")
    if "." not in name and name not in SHORT_KEYS:
        raise UserError(f"{where}: {name!r} is not an experiment key; use {choices(SHORT_KEYS)} or a dotted key "
                        f"such as \"train.lr\" (quoted in TOML)")
    key = SHORT_KEYS.get(name, name)
    if ptype == "categorical":
        values = typed_value(where, "choices", raw.get("choices"), list) if "choices" in raw else None
        if not values:
            raise UserError(f"{where}: a categorical parameter needs a non-empty 'choices' list")
        for v in values:
            if not isinstance(v, (str, int, float, bool)):
                raise UserError(f"{where}: choices must be strings, numbers or booleans, got {v!r}")
        return Param(name, key, ptype, choices=list(values))
    num = int if ptype == "int" else float
    for k in ("low", "high"):
        if k not in raw:
            raise UserError(f"{where}: missing key {k!r}")
    low, high = typed_value(where, "low", raw["low"], num), typed_value(where, "high", raw["high"], num)
    step = typed_value(where, "step", raw["step"], num) if "step" in raw else None
    log = typed_value(where, "log", raw.get("log", False), bool)
    if low > high:
        raise UserError(f"{where}: low ({low}) must be <= high ({high})")
    if step is not None and step <= 0:
        raise UserError(f"{where}: step must be > 0, got {step}")
    if log and (low <= 0 or (step is not None and step != 1)):
        raise UserError(f"{where}: log = true needs low > 0 and no step")
    return Param(name, key, ptype, low, high, step, log)


def sweep_names() -> List[str]:
    """Sweep files in studies/ (those with kind = "sweep")."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.toml") if is_sweep_file(p))


def is_sweep_file(path: str | Path) -> bool:
    """True when a study file declares `kind = "sweep"` (ablation studies have no kind or "ablation")."""
    try:
        return read_toml(Path(path)).get("kind") == "sweep"
    except (UserError, OSError):
        return False


def resolve_sweep_path(name_or_path: str | Path) -> Path:
    return resolve_named_file(name_or_path, STUDIES_DIR, "sweep", sweep_names(), accept=is_sweep_file)


def load_sweep(name_or_path: str | Path) -> SweepSpec:
    """Parse and check a sweep file strictly (unknown key or wrong type: a UserError naming it)."""
    path = resolve_sweep_path(name_or_path)
    data = read_toml(path)
    where = f"sweep {path.stem!r} ({path})"
    top = strict_table(where, data, SWEEP_KEYS)
    if top["kind"] != "sweep":
        raise UserError(f"{where}: kind = {top['kind']!r}; a sweep file needs kind = \"sweep\" "
                        f"(ablation studies run with `fcdm-lab ablate`)")

    objectives = []
    for i, raw in enumerate(top["objectives"]):
        owhere = f"{where}, objectives[{i}]"
        if not isinstance(raw, dict):
            raise UserError(f"{owhere} must be a table like {{ metric = \"fid_digits\", direction = \"minimize\" }}")
        o = strict_table(owhere, raw, {"metric": (str, True, "a metric name"),
                                  "direction": (str, False, "minimize | maximize")})
        metric = _check_metric(owhere, o["metric"])
        default = "maximize" if metric in HIGHER_IS_BETTER or not lower_is_better(metric) else "minimize"
        objectives.append(Objective(metric, _one_of(owhere, "direction", o.get("direction", default), DIRECTIONS)))
    if not 1 <= len(objectives) <= 2:
        raise UserError(f"{where}: give one objective, or two (a metric and gmacs) for a Pareto front; "
                        f"got {len(objectives)}")
    if len({o.metric for o in objectives}) != len(objectives):
        raise UserError(f"{where}: the two objectives must be different metrics")

    bwhere = f"{where}, budget"
    budget_raw = strict_table(bwhere, top["budget"], {"steps": (int, False, "training steps of every trial"),
                                                 "compute": (float, False, "GMACs x steps")})
    if len(budget_raw) != 1:
        raise UserError(f"{bwhere}: give exactly one of steps = N or compute = GMACs x steps")
    budget = Budget(**budget_raw)
    if (budget.steps is not None and budget.steps < 1) or (budget.compute is not None and budget.compute <= 0):
        raise UserError(f"{bwhere}: the budget must be positive, got {budget_raw}")

    space_raw: Dict[str, Any] = {}
    for name, raw in top["space"].items():  # unquoted `train.lr = {...}` arrives as {"train": {"lr": {...}}}
        if name in SECTIONS and isinstance(raw, dict) and "type" not in raw:
            space_raw.update({f"{name}.{k}": v for k, v in raw.items()})
        else:
            space_raw[name] = raw
    space = [_parse_param(where, name, raw) for name, raw in space_raw.items()]
    if not space:
        raise UserError(f"{where}: the space table is empty; add e.g. "
                        f"C = {{ type = \"int\", low = 16, high = 48, step = 8 }}")
    keys = [p.key for p in space]
    if len(set(keys)) != len(keys):
        raise UserError(f"{where}: two space entries set the same experiment key ({choices(keys)})")

    overrides = flatten_overrides(top.get("set", {}), where)
    clash = sorted(set(overrides) & (set(keys) | {"train.steps"}))
    if clash:
        raise UserError(f"{where}: set.{clash[0]} is decided by the sweep (the space table or the budget); remove it")
    spec = SweepSpec(
        name=path.stem, path=str(path), base=top["base"], objectives=objectives, space=space, budget=budget,
        description=top.get("description", ""), trials=top.get("trials", 8),
        sampler=_one_of(where, "sampler", top.get("sampler", "tpe"), SAMPLERS),
        pruner=_one_of(where, "pruner", top.get("pruner", "none"), PRUNERS),
        eval_every=top.get("eval_every", 0), set=overrides, seed=top.get("seed"), population=top.get("population"),
    )
    if spec.trials < 1:
        raise UserError(f"{where}: trials must be >= 1, got {spec.trials}")
    if spec.eval_every < 0:
        raise UserError(f"{where}: eval_every must be >= 0, got {spec.eval_every}")
    if spec.population is not None and spec.population < 2:
        raise UserError(f"{where}: population must be >= 2, got {spec.population}")
    _check_pruning(spec, where)
    if spec.sampler == "grid":
        for p in spec.space:
            p.grid()
    try:  # the base experiment with the sweep's `set`, through the same typed checks: fails at load time
        load_experiment(spec.base_path(), overrides)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return spec


def _check_metric(where: str, metric: str) -> str:
    from ..eval.evaluate import METRIC_NAMES

    valid = (*METRIC_NAMES, *MODEL_METRICS, *TRAIN_METRICS)
    if metric not in valid:
        raise UserError(f"{where}: unknown metric {metric!r}; valid: {choices(valid)}")
    return metric


def _check_pruning(spec: SweepSpec, where: str) -> None:
    if spec.pruner == "none":
        return
    if spec.multi:
        raise UserError(f"{where}: pruner = {spec.pruner!r} with {len(spec.objectives)} objectives: Optuna cannot "
                        f"prune multi-objective studies (trial.report raises there); use pruner = \"none\" or "
                        f"a single objective")
    if spec.eval_every <= 0:
        raise UserError(f"{where}: pruner = {spec.pruner!r} needs intermediate evaluations; set eval_every > 0 "
                        f"(steps between evaluations)")


def spec_fingerprint(spec: SweepSpec, overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """What must agree between workers of one study (the trial count and threads may differ)."""
    body = {"base": spec.base, "objectives": [dataclasses.asdict(o) for o in spec.objectives],
            "space": [dataclasses.asdict(p) for p in spec.space], "budget": dataclasses.asdict(spec.budget),
            "eval_every": spec.eval_every,
            "set": {k: v for k, v in {**spec.set, **overrides}.items() if k != "train.threads"}}
    text = json.dumps(body, sort_keys=True, default=str)
    return {"sha": hashlib.sha256(text.encode()).hexdigest()[:16], "spec": body}


# ---------------------------------------------------------------------------------------------
# Optuna storage, sampler, pruner, study
# ---------------------------------------------------------------------------------------------

def make_sampler(spec: SweepSpec, seed: Optional[int]):
    import optuna

    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({p.name: p.grid() for p in spec.space}, seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2":
        # The default population (50) would make a 10-trial sweep one random generation.
        population = spec.population or min(50, max(2, spec.trials // 2))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    # TPE: constant_liar keeps parallel workers from proposing the same point; fewer random
    # start-up trials than the default 10 so that small sweeps still get model-based proposals.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.trials // 2)),
                                      constant_liar=True, multivariate=True)


def make_pruner(spec: SweepSpec, steps: Optional[int]):
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.eval_every, max_resource=steps or "auto",
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    study_name: str
    storage: str                  # the URL, password hidden
    parent_run_id: str            # MLflow run holding every trial as a child
    tracking_uri: str
    metrics: List[str]            # the objectives, in order
    rows: List[Dict[str, Any]]    # per trial: trial, <space names>, params, gmacs, steps, <metrics>, state,
                                  # pareto, note, run_id, error
    best_trials: List[int]        # the Pareto front (multi-objective) or the best trial (single)
    out_dir: Path
    plot: Optional[Path]          # pareto.png (None when no trial completed)
    table_csv: Path
    table_md: Path
    ran_here: List[int] = field(default_factory=list)  # trials this worker ran

    def count(self, state: str) -> int:
        return sum(r["state"] == state for r in self.rows)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_rows(study, spec: SweepSpec) -> tuple[List[Dict[str, Any]], List[int]]:
    """Table rows of every trial and the numbers of the best (Pareto-optimal) ones."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = sorted(t.number for t in study.best_trials) if complete else []
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        row: Dict[str, Any] = {"trial": t.number}
        row.update({p.name: t.params.get(p.name) for p in spec.space})
        row["params"] = t.user_attrs.get("params")
        row["gmacs"] = t.user_attrs.get("gmacs")
        row["steps"] = t.user_attrs.get("steps")
        values = t.values or []
        for i, metric in enumerate(spec.metrics):
            if metric not in ("params", "gmacs"):
                row[metric] = values[i] if i < len(values) else t.user_attrs.get("metrics", {}).get(metric)
        row["state"] = t.state.name
        row["pareto"] = t.number in best
        row["note"] = _note(t)
        row["run_id"] = t.user_attrs.get("mlflow_run_id")
        row["error"] = t.user_attrs.get("error")
        rows.append(row)
    return rows, best


def _note(t) -> str:
    if "duplicate_of" in t.user_attrs:
        return f"same as trial {t.user_attrs['duplicate_of']}"
    if t.state.name == "PRUNED" and t.intermediate_values:
        return f"pruned at step {max(t.intermediate_values)}"
    error = t.user_attrs.get("error") or ""
    return error if len(error) <= 60 else error[:57] + "..."


def write_tables(rows: List[Dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """trials.csv (every column) and trials.md (a GitHub table; hand-written: pandas' to_markdown
    needs the extra `tabulate` package for six lines of formatting)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else ["trial", "state"]
    csv_path, md_path = out_dir / "trials.csv", out_dir / "trials.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    shown = [c for c in columns if c not in ("run_id", "error")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in shown) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_pareto(rows: List[Dict[str, Any]], spec: SweepSpec, path: Path, title: str) -> Optional[Path]:
    """Metric vs GMACs of every complete trial, the best / Pareto-optimal ones highlighted and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next((m for m in spec.metrics if m not in MODEL_METRICS), spec.metrics[0])
    if metric in MODEL_METRICS:  # e.g. a params-vs-gmacs sweep: plot the objective against GMACs anyway
        metric = "params" if metric == "gmacs" else metric
    done = [r for r in rows if r["state"] == "COMPLETE" and r.get(metric) is not None and r.get("gmacs") is not None]
    if not done:
        return None
    front = sorted((r for r in done if r["pareto"]), key=lambda r: r["gmacs"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter([r["gmacs"] for r in done], [r[metric] for r in done], c="0.6", s=28, label="trials", zorder=2)
    if front:
        label = "Pareto front" if spec.multi else "best"
        ax.plot([r["gmacs"] for r in front], [r[metric] for r in front], "-o", c="tab:red", ms=7, label=label,
                drawstyle="steps-post" if len(front) > 1 else "default", zorder=3)
    for r in done:
        name = ", ".join(f"{p.name}={_fmt(r[p.name])}" for p in spec.space)
        ax.annotate(name, (r["gmacs"], r[metric]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("GMACs per image (forward)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def print_trials(console, rows: List[Dict[str, Any]], spec: SweepSpec, title: str) -> None:
    from ..display import sweep_table

    console.print(sweep_table(rows, title, _fmt))
    for r in rows:
        if r["state"] == "FAIL" and r.get("error"):
            console.print(f"[red]trial {r['trial']} failed:[/] {r['error']}", highlight=False)


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------

def _trial_dir(out_dir: Path, number: int) -> Path:
    """out_dir/trial-0003; a leftover folder of an older study with the same name gets a suffix
    (the trainer refuses to start fresh over existing checkpoints)."""
    base = out_dir / f"trial-{number:04d}"
    candidate, i = base, 0
    while candidate.exists() and any(candidate.iterdir()):
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    return candidate


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class SweepObjective:
    """Optuna objective: one trial = suggest -> config -> train (in chunks when evaluating on the
    way) -> evaluate -> objective values, logged as a child MLflow run of the sweep's parent."""

    def __init__(self, spec: SweepSpec, *, target: int, overrides: Mapping[str, Any], study_name: str,
                 parent_run_id: str, uri: str, out_dir: Path, progress: bool, console):
        self.spec, self.target, self.overrides, self.study_name = spec, target, dict(overrides), study_name
        self.parent_run_id, self.uri, self.out_dir = parent_run_id, uri, out_dir
        self.progress, self.console = progress, console
        self.eval_metrics = [m for m in spec.metrics if m not in (*MODEL_METRICS, *TRAIN_METRICS)]
        self.ran: List[int] = []
        self.user_errors: List[str] = []

    def config(self, params: Mapping[str, Any]) -> tuple[ExperimentConfig, Dict[str, Any], int]:
        """The trial's experiment (base < sweep `set` < --set < the trial's parameters), its model
        info (meta-device build) and its step budget."""
        values = {p.key: params[p.name] for p in self.spec.space}
        cfg = load_experiment(self.spec.base_path(), {**self.spec.set, **self.overrides, **values})
        info = model_info_for(cfg)
        steps = int(self.overrides.get("train.steps") or self.spec.budget.steps_for(info["gmacs"]))
        cfg.train.steps = steps
        return cfg, info, steps

    def __call__(self, trial) -> float | tuple:
        import optuna

        # Workers decide "one more trial?" independently; trial numbers are handed out atomically by
        # the storage, so the trials numbered before this one decide whether it is one too many.
        earlier = [t for t in counted_trials(trial.study) if t.number < trial.number]
        if len(earlier) >= self.target:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned(f"the study already has its {self.target} trials")
        self.ran.append(trial.number)
        params = {p.name: p.suggest(trial) for p in self.spec.space}
        try:
            return self._run(trial, params)
        except optuna.TrialPruned:
            raise
        except UserError as e:
            self.user_errors.append(str(e))
            trial.set_user_attr("error", str(e))
            self.console.print(f"[red]trial {trial.number} ({_params_text(params)}) failed:[/] {e}", highlight=False)
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            self.console.print(f"[red]trial {trial.number} ({_params_text(params)}) failed:[/] "
                               f"{type(e).__name__}: {e}", highlight=False)
            raise

    def _run(self, trial, params: Dict[str, Any]) -> float | tuple:
        import optuna

        from ..eval.evaluate import metric_key
        from ..pipeline import run_pipeline
        from ..tracking import log_run_config, standard_tags, tracked_run

        n, single = trial.number, not self.spec.multi
        tags = {"kind": "sweep-trial", "trial": n, "optuna.study": self.study_name, "study": self.study_name,
                "variant": f"trial-{n:04d}"}
        short = {p.name: params[p.name] for p in self.spec.space if p.name != p.key}  # "L", "C"
        pruned_at = None
        # The child run opens first, so that a trial whose config is invalid is in MLflow too (FAILED).
        with tracked_run(f"{self.study_name}/trial-{n:04d}", uri=self.uri, tags=tags, params=short,
                         parent_run_id=self.parent_run_id) as tracker:
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            try:
                cfg, info, steps = self.config(params)
                for k, v in (("gmacs", float(info["gmacs"])), ("params", int(info["params"])), ("steps", steps)):
                    trial.set_user_attr(k, v)
                tracker.set_tags(standard_tags(cfg, info, study=self.study_name, variant=f"trial-{n:04d}",
                                               seed=cfg.train.seed))
                log_run_config(tracker, cfg, info)
                trial_dir = _trial_dir(self.out_dir, n)
                twin = _finished_twin(trial, params, steps)
                if twin is not None:  # training is deterministic given train.seed: the result is known
                    values = list(twin.values)
                    trial.set_user_attr("duplicate_of", twin.number)
                    trial.set_user_attr("metrics", twin.user_attrs.get("metrics", {}))
                    tracker.log_metrics({**{f"sweep.{m}": v for m, v in zip(self.spec.metrics, values)},
                                         **twin.user_attrs.get("metrics", {})}, step=steps)
                    tracker.set_tags({"optuna.state": "COMPLETE", "duplicate_of": twin.number})
                    self.console.print(f"trial {n}: {_params_text(params)} = trial {twin.number} (same config and "
                                       f"seed): its values are reused, nothing trained", highlight=False)
                    return values[0] if single else tuple(values)
                self.console.print(f"[bold]trial {n}[/]: {_params_text(params)} ({info['params']:,} params, "
                                   f"{info['gmacs']:.4g} GMACs, {steps} steps) -> {trial_dir}", highlight=False)

                # Train in chunks that end at each intermediate evaluation (resume="latest" continues
                # exactly where the previous chunk stopped), then at the budget.
                points = list(range(self.spec.eval_every, steps, self.spec.eval_every)) if self.spec.eval_every else []
                points.append(steps)
                base = {"gmacs": float(info["gmacs"]), "params": float(info["params"])}
                resume, measured = None, {}
                wanted = list(dict.fromkeys([*cfg.eval.metrics, *self.eval_metrics]))
                for k in points:  # the one run pipeline; evaluation of the in-memory EMA model
                    out = run_pipeline(tracker, cfg, trial_dir, resume=resume, progress=self.progress, max_steps=k,
                                       evaluate=bool(self.eval_metrics), eval_metrics=wanted,
                                       study=self.study_name, variant=f"trial-{n:04d}", seed=cfg.train.seed)
                    result, got = out.train, out.metrics
                    resume = "latest"
                    measured = {**base, "final_loss": result.final_loss, "images_per_s": result.images_per_s,
                                "wall_time_s": result.wall_time_s}
                    if self.eval_metrics:
                        for m in self.eval_metrics:
                            key = metric_key(m, got)
                            if key is None:
                                raise RuntimeError(f"evaluation returned no {m!r} (got {choices(sorted(got))})")
                            measured[m] = float(got[key])
                        measured.update({k2: float(v) for k2, v in got.items() if k2 not in measured})
                    tracker.log_metrics({f"sweep.{m}": measured[m] for m in self.spec.metrics
                                         if _finite(measured.get(m))}, step=k)
                    if single and k < steps:
                        trial.report(measured[self.spec.metrics[0]], k)
                        if trial.should_prune():
                            pruned_at = k
                            tracker.set_tags({"optuna.state": "PRUNED", "optuna.pruned_at": k})
                            break
                if pruned_at is None:
                    values = [measured[m] for m in self.spec.metrics]
                    bad = [m for m, v in zip(self.spec.metrics, values) if not _finite(v)]
                    if bad:
                        raise RuntimeError(f"objective {bad[0]} is {measured[bad[0]]} (not a finite number)")
                    trial.set_user_attr("metrics", {m: v for m, v in measured.items() if _finite(v)})
                    tracker.log_metrics(base, step=steps)
                    tracker.set_tags({"optuna.state": "COMPLETE"})
            except Exception as e:
                tracker.set_tags({"optuna.state": "FAIL", "error": f"{type(e).__name__}: {e}"[:4000]})
                raise
        if pruned_at is not None:  # the block ended cleanly (FINISHED); KILLED says it stopped before its end
            tracker.client.set_terminated(tracker.run_id, "KILLED")
            raise optuna.TrialPruned(f"pruned at step {pruned_at} ({self.spec.metrics[0]} = "
                                     f"{measured[self.spec.metrics[0]]:.4g})")
        return values[0] if single else tuple(values)


def counted_trials(study) -> list:
    """Trials that count toward the study's target: finished or running, not failed (a rerun tops
    failures up) and not a surplus trial of a worker that came one too late."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("surplus")]


def _finished_twin(trial, params: Mapping[str, Any], steps: int):
    """A complete trial of this study with the same parameters and budget, if any (samplers do
    propose a point twice in small discrete spaces)."""
    from optuna.trial import TrialState

    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == dict(params) and t.user_attrs.get("steps") == steps and t.values:
            return t
    return None


def _params_text(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

def _check_space_against_base(spec: SweepSpec, overrides: Mapping[str, Any]) -> ExperimentConfig:
    """Resolve the base experiment and the two corners of the space before any trial: a bad key,
    a bad value type or an invalid model (odd C) fails now, not in every trial."""
    base = {**spec.set, **overrides}
    cfg = load_experiment(spec.base_path(), base)
    for corner in (0, 1):
        values = {p.key: p.extremes()[corner] for p in spec.space}
        corner_cfg = load_experiment(spec.base_path(), {**base, **values})
        try:
            model_info_for(corner_cfg)
        except UserError as e:
            raise UserError(f"sweep {spec.name!r}: the search space corner {values} is not a valid model: "
                            f"{e}") from None
    return cfg


def _create_or_join(spec: SweepSpec, storage, study_name: str, *, uri: str, fingerprint: Dict[str, Any],
                    base_cfg: ExperimentConfig, storage_text: str):
    """Create the study (and its MLflow parent run) or join an existing one.

    Returns (study, parent_run_id, created). Creation is raced safely between workers started at
    once: each makes a parent run, but only the one whose create_study succeeds keeps it (the
    storage's unique study name decides); the others delete theirs and read the winner's id."""
    import optuna
    from optuna.exceptions import DuplicatedStudyError

    from ..tracking import experiment_id, get_client, standard_tags

    with sqlite_init_lock(uri):
        client = get_client(uri)
    directions = [o.direction for o in spec.objectives]

    def joined(study) -> tuple:
        if study.user_attrs.get(SPEC_ATTR, {}).get("sha") not in (None, fingerprint["sha"]):
            raise UserError(f"study {study_name!r} in {storage_text} was created from another sweep definition "
                            f"(space, objectives, budget or --set differ); use another --study-name or the same file")
        have = [d.name.lower() for d in study.directions]
        if have != directions:
            raise UserError(f"study {study_name!r} in {storage_text} has directions {have}, the sweep file asks "
                            f"{directions}; use another --study-name")
        parent = _wait_for_parent(study)
        if parent is None:  # a study made by other means, or whose creator died before writing the id
            parent = new_parent()
            study.set_user_attr(PARENT_ATTR, parent)
            study.set_user_attr(URI_ATTR, uri)
        try:
            client.get_run(parent)
        except Exception:
            where = study.user_attrs.get(URI_ATTR, "the creator's URI")
            raise UserError(f"the sweep's parent MLflow run {parent} is not in {uri}; workers must share one "
                            f"tracking store: pass --tracking-uri {where}") from None
        return study, parent, False

    def new_parent() -> str:
        from mlflow.tracking.context.registry import resolve_tags

        tags = {"kind": "sweep", "study": study_name, "sweep": spec.name, "optuna.study": study_name,
                "optuna.storage": storage_text, **standard_tags(base_cfg, study=study_name)}
        run = client.create_run(experiment_id(client), run_name=f"sweep:{study_name}", tags=resolve_tags(tags))
        return run.info.run_id

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        study = None
    if study is not None:
        return joined(study)
    parent = new_parent()
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, directions=directions,
                                    sampler=make_sampler(spec, spec.seed), pruner=make_pruner(spec, spec.budget.steps))
    except DuplicatedStudyError:
        client.delete_run(parent)
        return joined(optuna.load_study(study_name=study_name, storage=storage))
    study.set_user_attr(PARENT_ATTR, parent)
    study.set_user_attr(URI_ATTR, uri)
    study.set_user_attr(SPEC_ATTR, fingerprint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(spec.metrics)  # labels for optuna-dashboard
    return study, parent, True


def _wait_for_parent(study, timeout_s: float = 30.0) -> Optional[str]:
    """The parent run id, polling briefly: a concurrent creator writes it right after create_study."""
    deadline = time.time() + timeout_s
    while True:
        parent = study.user_attrs.get(PARENT_ATTR)
        if parent or time.time() > deadline:
            return parent
        time.sleep(0.5)  # user_attrs reads the storage on every access


class SweepJob:
    """The engine's job for a sweep: retry copies first, then new trials from the sampler while the
    study is below its target and this worker below its budget."""

    def __init__(self, objective: "SweepObjective", *, budget: int):
        self.objective, self.budget, self.asked = objective, budget, 0

    def claim(self, study):
        trial = claim_waiting(study)
        if trial is not None:
            return trial
        if self.asked >= self.budget or len(counted_trials(study)) >= self.objective.target:
            return None
        self.asked += 1
        return study.ask()

    def run(self, trial):
        return self.objective(trial)

    def finished(self, study) -> bool:
        from optuna.trial import TrialState

        return not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))

    def after(self, study, number: int) -> None:
        frozen = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
        if frozen.user_attrs.get("surplus"):
            return
        values = ", ".join(f"{m} {_fmt(v)}" for m, v in zip(self.objective.spec.metrics, frozen.values or []))
        took = (frozen.datetime_complete - frozen.datetime_start).total_seconds() if frozen.datetime_complete else 0
        self.objective.console.print(f"trial {frozen.number} {frozen.state.name} in {took:.0f} s"
                                     + (f": {values}" if values else ""), highlight=False)


def run_sweep_worker(name_or_path: str, *, trials: int, storage: str, study_name: str, uri: str,
                     overrides: Mapping[str, Any], out_dir: str, progress: bool = False, console=None,
                     worker: int = 0) -> None:
    """One spawned worker of a sweep that exists already (see `run_sweep`, engine.run_workers)."""
    import optuna

    spec = load_sweep(name_or_path)
    overrides = dict(overrides)
    if "train.steps" in overrides:
        spec.budget = Budget(steps=overrides["train.steps"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage), sampler=make_sampler(spec, None),
                              pruner=make_pruner(spec, spec.budget.steps))
    parent_id = study.user_attrs[PARENT_ATTR]
    objective = SweepObjective(spec, target=trials, overrides=overrides, study_name=study_name,
                               parent_run_id=parent_id, uri=uri, out_dir=Path(out_dir), progress=progress,
                               console=console)
    work(study, SweepJob(objective, budget=max(0, trials - len(counted_trials(study)))), console=console)


def run_sweep(name_or_path: str | Path, *, trials: Optional[int] = None, storage: Optional[str] = None,
              study_name: Optional[str] = None, uri: Optional[str] = None,
              overrides: Mapping[str, Any] | List[str] | None = None, out_dir: str | Path | None = None,
              progress: bool = True, threads: Optional[int] = None, console=None,
              workers: int = 1) -> SweepResult:
    """Run (or join, or resume) an Optuna sweep; see the module docstring.

    trials: the study's target number of trials (default: the file's); storage: an Optuna RDB URL
    (default sqlite:///optuna.db), the same URL on several workers joins one study; study_name:
    default the sweep file's name; uri: MLflow tracking URI; overrides: `--set` items (they apply to
    every trial; `train.steps` replaces the file's budget); out_dir: trial folders (default
    runs/<study>); threads: torch threads in this process (default train.threads); 1 when several
    workers share a machine; workers: processes on this machine running trials (engine.py; each
    gets cores / workers threads unless train.threads is set).
    """
    import optuna
    import torch
    from rich.console import Console

    from ..tracking import browse_hint, resolve_tracking_uri, tracked_run

    console = console or Console()
    storage_url = check_storage_url(storage)
    spec = load_sweep(name_or_path)
    overrides = normalize_overrides(overrides)
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        overrides["train.threads"] = threads
    clash = sorted(set(overrides) & {p.key for p in spec.space})
    if clash:
        raise UserError(f"--set {clash[0]} is searched by sweep {spec.name!r}; drop it or narrow the file's "
                        f"space table")
    if "train.steps" in overrides:
        if not isinstance(overrides["train.steps"], int) or overrides["train.steps"] < 1:
            raise UserError(f"train.steps must be an integer >= 1, got {overrides['train.steps']!r}")
        spec.budget = Budget(steps=overrides["train.steps"])
    target = spec.trials if trials is None else trials
    if target < 1:
        raise UserError(f"trials must be >= 1, got {target}")
    base_cfg = _check_space_against_base(spec, overrides)
    if base_cfg.train.threads is not None:
        torch.set_num_threads(base_cfg.train.threads)

    uri = resolve_tracking_uri(uri)
    storage_obj = open_storage(storage_url)
    storage_text = redact(storage_url)
    study_name = study_name or spec.name
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / study_name
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial instead
    fingerprint = spec_fingerprint(spec, overrides)
    study, parent_id, created = _create_or_join(spec, storage_obj, study_name, uri=uri, fingerprint=fingerprint,
                                                base_cfg=base_cfg, storage_text=storage_text)
    if not created:  # joiners bring their own sampler (a fresh seed: the same one would repeat the creator's points)
        study = optuna.load_study(study_name=study_name, storage=storage_obj, sampler=make_sampler(spec, None),
                                  pruner=make_pruner(spec, spec.budget.steps))

    have = len(counted_trials(study))
    remaining = max(0, target - have)
    console.print(f"[bold]sweep {study_name}[/] ({'created' if created else 'joined'}) in {storage_text}: "
                  f"{have}/{target} trials finished or running; this worker runs up to {remaining}. "
                  f"Objectives: {', '.join(f'{o.direction} {o.metric}' for o in spec.objectives)}; "
                  f"sampler {spec.sampler}, pruner {spec.pruner}, budget {spec.budget.describe()}. "
                  f"MLflow parent run {parent_id}.", highlight=False)

    objective = SweepObjective(spec, target=target, overrides=overrides, study_name=study_name,
                               parent_run_id=parent_id, uri=uri, out_dir=out_dir, progress=progress, console=console)
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    n = max(1, min(workers, remaining))
    worker_kwargs = dict(name_or_path=str(name_or_path), trials=target, storage=storage_url, study_name=study_name,
                         uri=uri, overrides=overrides, out_dir=str(out_dir), progress=False)

    try:
        with tracked_run(run_id=parent_id, uri=uri, tags={"optuna.trials_target": target}) as parent:
            if created:
                parent.log_params(_parent_params(spec, overrides))
                parent.log_text(Path(spec.path).read_text(), "sweep/sweep.toml")
            if remaining and n == 1:
                work(study, SweepJob(objective, budget=remaining), console=console)
            elif remaining:
                run_workers("sweep", worker_kwargs, n)
            rows, best, title, outputs = _summarize(study, spec, parent, out_dir, study_name, uri)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: study {study_name!r} is saved in {storage_text}; run the same command "
                      f"again to continue it", highlight=False)
        raise
    print_trials(console, rows, spec, title)
    console.print(browse_hint(parent_id, uri), highlight=False)
    console.print(f"Optuna: `optuna-dashboard {storage_text}` (pip install optuna-dashboard); "
                  f"table and plot in {out_dir}", highlight=False)
    if objective.ran and len(objective.user_errors) == len(objective.ran):
        raise UserError(f"every trial of this worker failed ({len(objective.ran)}); first error: "
                        f"{objective.user_errors[0]}")
    csv_path, md_path, plot = outputs
    return SweepResult(study_name=study_name, storage=storage_text, parent_run_id=parent_id, tracking_uri=uri,
                       metrics=spec.metrics, rows=rows, best_trials=best, out_dir=out_dir, plot=plot,
                       table_csv=csv_path, table_md=md_path, ran_here=list(objective.ran))


def _parent_params(spec: SweepSpec, overrides: Mapping[str, Any]) -> Dict[str, Any]:
    space = {p.name: {k: v for k, v in dataclasses.asdict(p).items() if v is not None and k != "name"}
             for p in spec.space}
    return {"sweep.file": spec.path, "sweep.base": spec.base, "sweep.sampler": spec.sampler,
            "sweep.pruner": spec.pruner, "sweep.budget": spec.budget.describe(), "sweep.eval_every": spec.eval_every,
            "sweep.objectives": [dataclasses.asdict(o) for o in spec.objectives], "sweep.space": space,
            "sweep.set": {**spec.set, **overrides}}


def _summarize(study, spec: SweepSpec, parent, out_dir: Path, study_name: str, uri: str):
    """The trials table (CSV + markdown) and the Pareto plot, written to out_dir and logged on the
    parent run with summary metrics; the children get their pareto tag."""
    rows, best = trial_rows(study, spec)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    title = f"{study_name}: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
    csv_path, md_path = write_tables(rows, out_dir)
    what = "Pareto front" if spec.multi else "best trial"
    plot = plot_pareto(rows, spec, out_dir / "pareto.png",
                       f"{study_name}: {what} ({counts['COMPLETE']} trials, {spec.budget.describe()})")
    for path in (csv_path, md_path, plot):
        if path is not None:
            parent.log_artifact(str(path), "sweep")
    summary: Dict[str, float] = {f"trials.{s.lower()}": n for s, n in counts.items()}
    summary["pareto_size"] = len(best)
    if best and not spec.multi:
        summary[f"best.{spec.metrics[0]}"] = study.best_value
    parent.log_metrics(summary, step=len(rows))
    parent.set_tags({"best_trials": ",".join(map(str, best))})
    _tag_children(rows, uri)
    return rows, best, title, (csv_path, md_path, plot)


def _tag_children(rows: List[Dict[str, Any]], uri: str) -> None:
    """Mark each trial's MLflow run pareto=true/false (filterable in the UI); the latest summary
    of any worker wins, as the front moves while the study grows."""
    from ..tracking import get_client

    client = get_client(uri, probe=False)
    for r in rows:
        if r.get("run_id") and r["state"] == "COMPLETE":
            try:
                client.set_tag(r["run_id"], "pareto", str(bool(r["pareto"])).lower())
            except Exception as e:  # a missing child run must not hide the sweep's results
                warnings.warn(f"could not tag MLflow run {r['run_id']}: {e}", stacklevel=2)

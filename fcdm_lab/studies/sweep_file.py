"""Sweep files: `kind = "sweep"` TOML in studies/ parsed strictly into a SweepSpec.

    spec = load_sweep("search-lc")         # base experiment, search space, objectives, budget

The format is described in sweep.py's docstring; this module only reads and checks files (moved
verbatim out of sweep.py: parsing is one of its jobs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..config import SECTIONS, check_base, load_experiment
from ..errors import UserError, choices
from ..eval.metrics import METRIC_NAMES, lower_is_better
from ..schema import flatten_overrides, read_toml, resolve_named_file, strict_table, typed_value
from .spec import STUDIES_DIR

SAMPLERS = ("nsga2", "tpe", "random", "grid")
PRUNERS = ("none", "median", "hyperband")
DIRECTIONS = ("minimize", "maximize")
PARAM_TYPES = ("int", "float", "categorical")
SHORT_KEYS = {"L": "model.L", "C": "model.C"}          # space names that stand for experiment keys
MODEL_METRICS = ("gmacs", "params")                    # known before training (meta-device build)
TRAIN_METRICS = ("final_loss", "images_per_s", "wall_time_s")
SPEC_ATTR = "sweep_spec"

SWEEP_KEYS: Dict[str, tuple] = {
    "kind": (str, True, 'must be "sweep"'),
    "description": (str, False, "one line saying what the sweep asks"),
    "wall_time": (str, False, "its measured wall time and machine, listed by `fcdm-lab ablate`"),
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
    wall_time: str = ""
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
        default = "minimize" if lower_is_better(metric) else "maximize"
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
    if (budget.steps is not None and budget.steps < 1) or (budget.compute is not None and not (
            math.isfinite(budget.compute) and budget.compute > 0)):
        raise UserError(f"{bwhere}: the budget must be a positive, finite number, got {budget_raw}")

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

    overrides = flatten_overrides(top.get("set", {}), where, SECTIONS)
    clash = sorted(set(overrides) & (set(keys) | {"train.steps"}))
    if clash:
        raise UserError(f"{where}: set.{clash[0]} is decided by the sweep (the space table or the budget); remove it")
    spec = SweepSpec(
        name=path.stem, path=str(path), base=top["base"], objectives=objectives, space=space, budget=budget,
        description=top.get("description", ""), wall_time=top.get("wall_time", ""), trials=top.get("trials", 8),
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
    check_base(path, spec.base)
    try:  # the base experiment with the sweep's `set`, through the same typed checks: fails at load time
        load_experiment(spec.base_path(), overrides)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return spec


def _check_metric(where: str, metric: str) -> str:
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

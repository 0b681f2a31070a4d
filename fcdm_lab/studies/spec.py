"""Study files: a base experiment, variants as config overrides, seeds, metrics, compute matching.

    description = "Does GRN beat compact channel attention (DiCo's CCA)?"
    base = "tiny-digits"          # an experiment in experiments/ (or a path)
    seeds = 1                     # seed of repeat i = train.seed + i, the same for every variant
    steps = 1500                  # optional: train.steps of every child
    metrics = ["fid_digits", "kid_digits", "class_acc_digits"]
    primary = "fid_digits"        # sorted by / plotted; acc, is, precision, recall are higher-is-better
    compute_matched = true        # variants with `match` get their knob solved to the baseline's GMACs
    baseline = "grn"              # paired differences are taken against it
    set = { "eval.num_samples" = 500 }

    [[variants]]
    name = "cca"
    set = { "model.block" = { family = "convnext", mixer = "cca" } }
    match = "ratio"
    paper = { gflops = 48.3, fid = 23.85, is = 61.60 }

Loading is strict (unknown key or wrong type: a UserError naming it). Every child's config is
resolved here, before anything trains, so a bad override fails at once.

Override order for a child: base experiment < study `set` < variant `set` < the command line's
`--set` < `--steps` / study `steps`; then the seed and the compute-matching target.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..bundled import STUDIES_DIR
from ..config import SECTIONS, ExperimentConfig, check_base, config_from_dict, experiment_data, resolve_experiment_path
from ..schema import (apply_overrides, flatten_overrides, parse_override, read_toml, resolve_named_file, strict_table,
                      typed_value)
from ..errors import UserError, choices
from ..eval.metrics import check_metric_names
from ..models.info import model_info_for
from ..models.matching import KNOBS
from ..models.profile import profile_model


# key -> (type, required, what it is)
STUDY_KEYS: Dict[str, tuple] = {
    "kind": (str, False, "'ablation' (default) | 'scaling' (a grid of model sizes and budgets: `axes`); "
                         "files with kind = 'sweep' are Optuna searches"),
    "description": (str, False, "one line saying what the study asks"),
    "wall_time": (str, False, "its measured wall time and machine, listed by `fcdm-lab ablate`"),
    "multiple_comparisons": (str, False, "holm (default: verdicts Holm-adjusted over the variants of each "
                                         "metric) | none"),
    "min_effect": (dict, False, "{ metric = effect } an effect of interest: the paired seeds needed to detect it"),
    "base": (str, True, "an experiment name in experiments/ or a path to one"),
    "seeds": (int, False, "repeats per variant (default 1)"),
    "steps": (int, False, "training steps of every child"),
    "metrics": (list, False, "metric names (default: the base experiment's eval.metrics)"),
    "primary": (str, False, "the metric to sort by and plot (default: the first metric)"),
    "compute_matched": (bool, False, "solve `match` knobs to the baseline's GMACs (default true)"),
    "baseline": (str, False, "variant the paired differences are taken against (default: the first)"),
    "set": (dict, False, "overrides applied to every variant"),
    "variants": (list, False, "[[variants]] tables (ablations)"),
    "axes": (dict, False, "scaling studies: { L = [1, 2], C = [16, 32] } (or dotted experiment keys): every combination"),
    "budgets": (list, False, "scaling studies: [{ steps = N } or { compute = GMACs x training images }, ...]"),
    "held_out": (list, False, "scaling studies: [{ L = 2, C = 48 }, ...] points trained but left out of the fit"),
}
SCALING_SHORT_KEYS = {"L": "model.L", "C": "model.C"}
VARIANT_KEYS: Dict[str, tuple] = {
    "name": (str, True, "short variant name"),
    "set": (dict, False, "config overrides of this variant"),
    "match": (str, False, "knob solved for compute matching: ratio | ffn_ratio | width"),
    "paper": (dict, False, "the paper's row: gflops, fid, is"),
}
PAPER_KEYS = ("gflops", "fid", "is")
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # used in folder names and MLflow filters


@dataclass
class Variant:
    name: str
    set: Dict[str, Any] = field(default_factory=dict)   # flattened dotted keys
    match: Optional[str] = None
    paper: Optional[Dict[str, float]] = None
    axes: Optional[Dict[str, Any]] = None               # scaling: the point's axis values ({"L": 1, "C": 16})
    budget: Optional[Dict[str, float]] = None           # scaling: {"steps": N} or {"compute": GMACs x images}
    held_out: bool = False                              # scaling: trained, left out of the fitted law


@dataclass
class StudySpec:
    name: str
    path: str
    base: str
    variants: List[Variant]
    description: str = ""
    seeds: int = 1
    steps: Optional[int] = None
    metrics: List[str] = field(default_factory=list)
    primary: str = ""
    compute_matched: bool = True
    baseline: str = ""
    set: Dict[str, Any] = field(default_factory=dict)
    wall_time: str = ""                                   # as measured, for the listing
    kind: str = "ablation"                                # ablation | scaling (run alike; reported apart)
    multiple_comparisons: str = "holm"                    # holm | none: the family of each metric's verdicts
    min_effect: Dict[str, float] = field(default_factory=dict)   # metric -> effect of interest (seeds to detect it)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise UserError(f"study {self.name!r} has no variant {name!r}; variants: {choices(self.variant_names())}")

    def variant_names(self) -> List[str]:
        return [v.name for v in self.variants]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ChildPlan:
    """One child run of a study: a variant trained with one seed."""

    variant: str
    seed_index: int
    seed: int
    cfg: ExperimentConfig


@dataclass
class StudyPlan:
    spec: StudySpec
    children: List[ChildPlan]
    seeds: int
    steps: Optional[int]
    overrides: Dict[str, Any]
    baseline_gmacs: Optional[float]
    settings_hash: str


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

KINDS = ("ablation", "scaling")  # study files run as variants x seeds (kind = "sweep": an Optuna search)


def study_kind(path: Path) -> str:
    """'ablation', 'scaling' or 'sweep' (the `kind` key; studies/ holds every kind of file)."""
    kind = read_toml(path).get("kind", "ablation")
    return kind if isinstance(kind, str) else "ablation"


def study_names(kind: str | tuple = KINDS) -> List[str]:
    """Names of the bundled study files of one kind (or several)."""
    kinds = (kind,) if isinstance(kind, str) else kind
    return sorted(p.stem for p in STUDIES_DIR.glob("*.toml") if study_kind(p) in kinds)


def resolve_study_path(name_or_path: str | Path) -> Path:
    """A study is a path to a TOML file or the name of one in `studies/`."""
    return resolve_named_file(name_or_path, STUDIES_DIR, "study", study_names())


def _axis_key(where: str, name: str) -> str:
    if "." not in name and name not in SCALING_SHORT_KEYS:
        raise UserError(f"{where}: axis {name!r} is not an experiment key; use {choices(SCALING_SHORT_KEYS)} or a "
                        f"dotted key such as \"model.block.kernel\" (quoted in TOML)")
    return SCALING_SHORT_KEYS.get(name, name)


def _budget(where: str, raw: Any) -> Dict[str, float]:
    table = strict_table(where, raw, {"steps": (int, False, "training steps"),
                                      "compute": (float, False, "GMACs per image x training images")})
    if len(table) != 1 or not next(iter(table.values())) > 0:
        raise UserError(f"{where}: give exactly one of steps = N or compute = X (positive), got {raw!r}")
    return table


def _point_name(axes: Dict[str, Any], budget: Optional[Dict[str, float]]) -> str:
    name = "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in axes.items())
    if budget is not None:
        (kind, value), = budget.items()
        name += f"-{'s' if kind == 'steps' else 'c'}{value:g}"
    return name.replace("+", "")


def scaling_variants(where: str, top: Dict[str, Any]) -> List[Variant]:
    """A scaling study's points: every combination of its axes at every budget, plus the held-out
    points (trained at every budget unless they name their own, left out of the fitted law)."""
    axes_raw = top.get("axes")
    if not axes_raw:
        raise UserError(f"{where}: a scaling study needs axes, e.g. axes = {{ L = [1, 2], C = [16, 32, 48] }}")
    axes: Dict[str, list] = {}
    for name, values in axes_raw.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: axes.{name} must be a non-empty list of values, got {values!r}")
        axes[name] = values
    budgets = [_budget(f"{where}, budgets[{i}]", b) for i, b in enumerate(top.get("budgets", []))] or [None]
    several = len(budgets) > 1
    points: List[tuple] = [(dict(zip(axes, combo)), False) for combo in itertools.product(*axes.values())]
    for i, raw in enumerate(top.get("held_out", [])):
        if not isinstance(raw, dict):
            raise UserError(f"{where}: held_out must be tables like {{ L = 2, C = 64 }}, got {raw!r}")
        unknown = sorted(set(raw) - set(axes) - {"steps", "compute"})
        if unknown:
            raise UserError(f"{where}, held_out[{i}]: {unknown[0]!r} is not an axis; axes: {choices(axes)}")
        own = {k: raw[k] for k in ("steps", "compute") if k in raw}
        points.append(({k: raw.get(k, axes[k][0]) for k in axes}, _budget(f"{where}, held_out[{i}]", own) if own else True))
    variants: List[Variant] = []
    for values, held in points:
        for budget in ([held] if isinstance(held, dict) else budgets):
            overrides = {_axis_key(where, k): v for k, v in values.items()}
            if budget is not None and "steps" in budget:
                overrides["train.steps"] = int(budget["steps"])
            name = _point_name(values, budget if (several or isinstance(held, dict)) else None)
            variants.append(Variant(name, overrides, axes=values, budget=budget, held_out=held is not False))
    return variants


def load_study(name_or_path: str | Path) -> StudySpec:
    path = resolve_study_path(name_or_path)
    data = read_toml(path)
    name = path.stem
    where = f"study {name!r} ({path})"
    if data.get("kind") == "sweep":
        raise UserError(f"{name!r} is an Optuna search, not a study of variants x seeds: run it with `fcdm-lab sweep "
                        f"{name}`; studies: {choices(study_names())}")
    top = strict_table(where, data, STUDY_KEYS)
    kind = top.get("kind", "ablation")
    if kind not in KINDS:
        raise UserError(f"{where}: kind = {kind!r}; valid: {choices(KINDS)}, sweep")
    scaling_keys = sorted(k for k in ("axes", "budgets", "held_out") if k in top)
    if kind == "ablation" and scaling_keys:
        raise UserError(f"{where}: {scaling_keys[0]!r} belongs to scaling studies (kind = \"scaling\")")
    if kind == "scaling" and "variants" in top:
        raise UserError(f"{where}: a scaling study's points come from its axes and budgets, not [[variants]]")
    if kind == "ablation" and "variants" not in top:
        raise UserError(f"{where}: missing key 'variants' ([[variants]] tables)")

    variants: List[Variant] = scaling_variants(where, top) if kind == "scaling" else []
    for i, raw in enumerate(top.get("variants", [])):
        if not isinstance(raw, dict):
            raise UserError(f"{where}: variants must be [[variants]] tables, got {raw!r}")
        vwhere = f"{where}, variant {raw.get('name', i + 1)!r}"
        v = strict_table(vwhere, raw, VARIANT_KEYS)
        paper = None
        if "paper" in v:
            paper = strict_table(f"{vwhere}, paper", v["paper"], {k: (float, False, "") for k in PAPER_KEYS})
        overrides = flatten_overrides(v.get("set", {}), vwhere, SECTIONS)
        if "train.seed" in overrides:
            raise UserError(f"{vwhere}: variants may not set train.seed (seeds are paired across variants; "
                            f"set it in the study's `set` instead)")
        if not VARIANT_NAME.match(v["name"]):
            raise UserError(f"{vwhere}: variant names may use letters, digits and _ . + - only")
        variants.append(Variant(v["name"], overrides, v.get("match"), paper))
    if not variants:
        raise UserError(f"{where}: needs at least one [[variants]] table")
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{where}: duplicate variant name {dupes[0]!r}")

    min_effect = {str(k): typed_value(where, f"min_effect.{k}", v, float) for k, v in top.get("min_effect", {}).items()}
    spec = StudySpec(name=name, path=str(path), base=top["base"], variants=variants,
                     description=top.get("description", ""), seeds=top.get("seeds", 1), steps=top.get("steps"),
                     metrics=list(top.get("metrics", [])), primary=top.get("primary", ""),
                     compute_matched=top.get("compute_matched", True), baseline=top.get("baseline", names[0]),
                     set=flatten_overrides(top.get("set", {}), where, SECTIONS), wall_time=top.get("wall_time", ""),
                     multiple_comparisons=top.get("multiple_comparisons", "holm"), min_effect=min_effect,
                     kind=kind)
    if kind == "scaling":
        spec.compute_matched = False  # the points differ in size on purpose
    if spec.multiple_comparisons not in ("holm", "none"):
        raise UserError(f"{where}: multiple_comparisons = {spec.multiple_comparisons!r}; valid: holm, none")
    for m, effect in min_effect.items():
        if m not in (top.get("metrics") or [m]) or not effect > 0:
            raise UserError(f"{where}: min_effect.{m} must be a positive effect of one of the study's metrics")
    for m in spec.metrics:
        typed_value(where, "metrics[]", m, str)
    if spec.seeds < 1:
        raise UserError(f"{where}: 'seeds' must be >= 1, got {spec.seeds}")
    if spec.steps is not None and spec.steps < 1:
        raise UserError(f"{where}: 'steps' must be >= 1, got {spec.steps}")
    if spec.baseline not in names:
        raise UserError(f"{where}: baseline {spec.baseline!r} is not a variant; variants: {choices(names)}")
    for v in variants:
        if v.match is not None and v.match not in KNOBS:
            raise UserError(f"{where}, variant {v.name!r}: match = {v.match!r}; valid knobs: {choices(KNOBS)}")
    if spec.variant(spec.baseline).match is not None:
        raise UserError(f"{where}: the baseline {spec.baseline!r} cannot have `match` (it is the compute target)")
    check_base(path, spec.base)
    resolve_experiment_path(_base_path(spec))  # unknown base experiment: fail at load time
    if not spec.metrics:
        spec.metrics = list(load_base(spec).eval.metrics)
    if not spec.primary:
        spec.primary = spec.metrics[0]
    if spec.primary not in spec.metrics:
        raise UserError(f"{where}: primary metric {spec.primary!r} is not in metrics ({choices(spec.metrics)})")
    check_metric_names(spec.metrics)
    base = experiment_data(_base_path(spec))
    for v in variants:  # every variant's config, block spec included, is checked before anything trains
        try:
            config_from_dict(apply_overrides(apply_overrides(base, spec.set), v.set))
        except UserError as e:
            raise UserError(f"{where}, variant {v.name!r}: {e}") from None
    return spec


def _base_path(spec: StudySpec) -> str:
    """`base` relative to the study file when it is a path, else an experiment name."""
    base = Path(spec.base)
    if base.suffix == ".toml" and not base.is_absolute():
        return str(Path(spec.path).parent / base)
    return spec.base


def load_base(spec: StudySpec) -> ExperimentConfig:
    data = experiment_data(_base_path(spec))
    return config_from_dict(apply_overrides(data, spec.set))


def list_studies() -> List[StudySpec]:
    return [load_study(n) for n in study_names()]


# ---------------------------------------------------------------------------------------------
# Resolving every child's config
# ---------------------------------------------------------------------------------------------

def normalize_overrides(overrides: Mapping[str, Any] | List[str] | None) -> Dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, (list, tuple)):
        return dict(parse_override(o) for o in overrides)
    return dict(overrides)


def plan_study(spec: StudySpec, *, seeds: int | None = None, steps: int | None = None,
               overrides: Mapping[str, Any] | List[str] | None = None, need_target: bool = True) -> StudyPlan:
    """Resolve the config of every (variant, seed) child; solves nothing heavy except the
    baseline's GMACs (meta device) when a variant is compute-matched."""
    seeds = spec.seeds if seeds is None else seeds
    steps = spec.steps if steps is None else steps
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    cli = normalize_overrides(overrides)
    data = experiment_data(_base_path(spec))

    def child_config(variant: Variant, extra: Dict[str, Any]) -> ExperimentConfig:
        d = apply_overrides(data, spec.set)
        d = apply_overrides(d, variant.set)
        d = apply_overrides(d, cli)
        d = apply_overrides(d, {"eval.metrics": list(spec.metrics), **({"train.steps": steps} if steps else {}),
                                **extra})
        try:
            return config_from_dict(d)
        except UserError as e:
            raise UserError(f"study {spec.name!r}, variant {variant.name!r}: {e}") from None

    base_seed = config_from_dict(apply_overrides(apply_overrides(data, spec.set), cli)).train.seed
    matched = [v for v in spec.variants if spec.compute_matched and v.match]
    target = None
    if matched and need_target:
        target = model_info_for(child_config(spec.variant(spec.baseline), {}))["gmacs"]

    # scaling points with a compute budget (GMACs per image x training images): the steps that spend it
    budget_steps: Dict[str, int] = {}
    if steps is not None and any(v.budget is not None for v in spec.variants):
        raise UserError(f"study {spec.name!r} has budgets: its points' steps follow from them, so --steps (or the "
                        f"file's steps) does not apply")
    for v in spec.variants:
        if v.budget is not None and "compute" in v.budget:
            cfg0 = child_config(v, {})
            images = v.budget["compute"] / model_info_for(cfg0)["gmacs"]
            budget_steps[v.name] = max(1, round(images / cfg0.train.batch_size))

    children: List[ChildPlan] = []
    for i in range(seeds):  # seed-major: an interrupted study has whole pairs done first
        for v in spec.variants:
            extra: Dict[str, Any] = {"train.seed": base_seed + i}
            if v.name in budget_steps:
                extra["train.steps"] = budget_steps[v.name]
            if v in matched:
                extra.update({"model.match_flops": v.match, "model.match_target_gmacs": target})
            children.append(ChildPlan(v.name, i, base_seed + i, child_config(v, extra)))

    # The study's identity: its settings and every variant's config at the first seed, not the number
    # of seeds, so that more seeds (--seeds, --until-decided rounds) extend the same study.
    settings = {"study": spec.name, "spec": spec.to_dict() | {"path": None, "seeds": None, "description": None,
                                                              "wall_time": None},
                "children": [[c.variant, c.seed, c.cfg.to_dict()] for c in children if c.seed_index == 0]}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return StudyPlan(spec, children, seeds, steps, cli, target, digest)


# ---------------------------------------------------------------------------------------------
# Profiling a study's variants at another model (`fcdm-lab profile FCDM-L --study paper-ablation`)
# ---------------------------------------------------------------------------------------------

PAPER_MODEL, PAPER_RESOLUTION = "FCDM-L", 256   # the setting of the paper's ablation table


def profile_study(study: str, model: str, *, resolutions=(256,), overrides: Mapping[str, Any] | None = None,
                  pixel: bool = False, **common: Any) -> List[Dict[str, Any]]:
    """Params and GMACs of every variant's block built at `model` (e.g. FCDM-L), with the study's
    compute matching solved to the baseline's GMACs at that model and resolution. Rows are
    `profile_model` dicts plus "variant"; at FCDM-L 256x256 "paper_gmacs" is the paper's FLOPs.
    overrides: profile-style model/block settings (L=3, kernel=5) applied to every variant."""
    spec = load_study(study)
    plan = plan_study(spec, seeds=1, need_target=False)
    blocks = {c.variant: c.cfg.model.block for c in plan.children}
    overrides = dict(overrides or {})
    rows: List[Dict[str, Any]] = []
    for res in resolutions:
        kw = dict(resolution=res, pixel=pixel, overrides=overrides, **common)
        target = profile_model(model, block=blocks[spec.baseline], **kw)["gmacs"]
        for v in spec.variants:
            knob = v.match if spec.compute_matched else None
            row = profile_model(model, block=blocks[v.name], match=knob, match_target=target if knob else None, **kw)
            row["variant"] = v.name
            if v.paper and "gflops" in v.paper and model == PAPER_MODEL and res == PAPER_RESOLUTION and not pixel \
                    and not overrides:
                row["paper_gmacs"] = v.paper["gflops"]
            rows.append(row)
    return rows

"""Sweep results: the trials table (rich, CSV, markdown) and the Pareto plot.

    rows, best = trial_rows(study, spec); write_tables(rows, out_dir); plot_pareto(rows, spec, path, title)
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..display import sweep_table
from .sweep_file import MODEL_METRICS, SweepSpec

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
    console.print(sweep_table(rows, title, _fmt))
    for r in rows:
        if r["state"] == "FAIL" and r.get("error"):
            console.print(f"[red]trial {r['trial']} failed:[/] {r['error']}", highlight=False)

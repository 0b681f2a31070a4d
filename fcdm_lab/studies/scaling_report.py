"""A scaling study's report, rebuilt from MLflow alone: every point with mean ± 95% CI over seeds,
the fitted laws with intervals, the IsoFLOP analysis (several compute budgets), and each held-out
point's prediction against its measurement.

    report = study_report(parent_run_id)      # studies/report.py: this report for a scaling study's parent
    report.print(console); paths = report.write("report/"); report.log(tracker, paths)

The statistics are studies/scaling.py's (bootstrap over paired seeds); this module gathers the
runs, renders and logs. A point's compute is GMACs per image x training images (steps x batch).
"""
from __future__ import annotations

import base64
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich import box
from rich.table import Table

from ..display import fmt_params, print_wide
from ..errors import UserError
from ..eval.metrics import lower_is_better, metric_key
from . import scaling as S
from .stored import study_children
from .verdicts import Stat, summarize

REPORT_DIR = "report"
NOTE_LIMIT = 7000      # MLflow keeps tag values up to 8000 characters


def _terminal_table(title: str, header: List[str], rows: List[List[str]]) -> Table:
    """A law or prediction table for a 120-column terminal. Its bookkeeping columns (points, seeds,
    refits, note) move to the caption as "name: value" when every row has the same value, and an empty
    note column is left out; the files (markdown, HTML) keep every column."""
    shared = []
    keep = list(range(len(header)))
    for i, h in enumerate(header):
        values = {row[i] for row in rows}
        if h in ("points", "seeds", "refits", "note") and len(values) == 1 and (len(rows) > 1 or h == "note"):
            keep.remove(i)
            if values != {""}:
                shared.append(f"{h}: {values.pop()}")
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, caption="; ".join(shared) or None,
              caption_justify="left")
    for i in keep:
        t.add_column(header[i], overflow="fold")
    for row in rows:
        t.add_row(*(row[i] for i in keep))
    return t


@dataclass
class PointRow:
    name: str
    axes: Dict[str, Any]
    held_out: bool
    seeds: List[int]
    params: Optional[float]
    gmacs: Optional[float]
    steps: Optional[int]
    images: Optional[float]
    budget: Optional[float]                  # the nominal compute budget, when the study gives one
    metrics: Dict[str, Stat] = field(default_factory=dict)
    values: Dict[str, List[Optional[float]]] = field(default_factory=dict)   # per metric, in `seeds` order

    @property
    def compute(self) -> Optional[float]:
        return None if self.gmacs is None or self.images is None else self.gmacs * self.images

    def point(self) -> S.ScalingPoint:
        return S.ScalingPoint(self.name, params=self.params, gmacs=self.gmacs, images=self.images,
                              values=self.values, seeds=self.seeds, L=self.axes.get("L"), C=self.axes.get("C"),
                              budget=self.budget, held_out=self.held_out)


@dataclass
class ScalingReport:
    run_id: str
    study: str
    description: str
    status: str
    primary: str
    metrics: List[str]
    rows: List[PointRow]
    laws: List[S.PowerLawFit] = field(default_factory=list)
    isoflop: Optional[S.IsoFLOPResult] = None
    checks: List[S.PredictionCheck] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)     # why a fit was not made
    missing: List[str] = field(default_factory=list)

    @property
    def points(self) -> List[S.ScalingPoint]:
        return [r.point() for r in self.rows if r.metrics]

    # -------------------------------------------------------------------------------- tables

    def point_table(self) -> Table:
        t = Table(title=f"Scaling study {self.study}: {self.description}", title_justify="left", box=box.SIMPLE_HEAD)
        for h in ("point", "n", "params", "GMACs/img", "steps", "compute", *self.metrics):
            t.add_column(h, justify="left" if h == "point" else "right", overflow="fold")
        for r in self.rows:
            t.add_row(r.name + (" (held out)" if r.held_out else ""), str(len(r.seeds)),
                      fmt_params(int(r.params) if r.params else None), f"{r.gmacs:.3g}" if r.gmacs else "-",
                      str(r.steps or "-"), f"{r.compute:.3g}" if r.compute else "-",
                      *[r.metrics[m].fmt() if m in r.metrics else "-" for m in self.metrics])
        return t

    def law_table(self) -> Table:
        return _terminal_table("Fitted laws (95% intervals: bootstrap over seeds)", *S.fit_table(self.laws, self.isoflop))

    def prediction_table(self) -> Optional[Table]:
        if not self.checks:
            return None
        return _terminal_table("Held-out points: predicted (95% interval) vs measured", *S.prediction_table(self.checks))

    def caption(self) -> str:
        text = ("compute = GMACs per image x training images; cells: mean ± 95% t-interval over paired seeds; "
                "law: metric = E + A x^-alpha fitted to the seed means, intervals from refits on seeds resampled "
                "together (scaling.py)")
        if self.notes:
            text += "; " + "; ".join(self.notes)
        if self.missing:
            text += f"; no results yet for {', '.join(self.missing)}"
        return text

    def print(self, console) -> None:
        print_wide(console, self.point_table(), max_width=120)
        print_wide(console, self.law_table(), max_width=120)
        if self.prediction_table() is not None:
            print_wide(console, self.prediction_table(), max_width=120)
        console.print(self.caption(), highlight=False)

    # -------------------------------------------------------------------------------- files

    def markdown(self) -> str:
        def md(header, rows):
            return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                    *["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]]

        points = [[r.name + (" (held out)" if r.held_out else ""), len(r.seeds),
                   fmt_params(int(r.params) if r.params else None), f"{r.gmacs:.4g}" if r.gmacs else "-",
                   r.steps or "-", f"{r.compute:.4g}" if r.compute else "-",
                   *[r.metrics[m].fmt() if m in r.metrics else "-" for m in self.metrics]] for r in self.rows]
        lines = [f"# Scaling study `{self.study}`", "", self.description, "", f"MLflow run `{self.run_id}`.", "",
                 *md(["point", "n", "params", "GMACs/img", "steps", "compute", *self.metrics], points), "",
                 "## Fitted laws", "", *md(*S.fit_table(self.laws, self.isoflop)), ""]
        if self.checks:
            lines += ["## Held-out predictions", "", *md(*S.prediction_table(self.checks)), ""]
        lines += [self.caption() + ".", ""]
        return "\n".join(lines)

    def summary(self) -> Dict[str, Any]:
        return {"study": self.study, "primary": self.primary, "metrics": self.metrics,
                "points": [{"name": r.name, "axes": r.axes, "held_out": r.held_out, "seeds": r.seeds,
                            "params": r.params, "gmacs": r.gmacs, "steps": r.steps, "compute": r.compute,
                            "values": r.values} for r in self.rows],
                "laws": [law.to_dict() for law in self.laws],
                "isoflop": self.isoflop.to_dict() if self.isoflop is not None else None,
                "checks": [c.to_dict() for c in self.checks], "notes": self.notes}

    def write(self, folder) -> Dict[str, Path]:
        """report.md, summary.json, scaling.png, isoflop.png (with several budgets), report.html;
        written aside and renamed into place (as the ablation report)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".writing-") as tmp:
            tmp = Path(tmp)
            made = {"markdown": tmp / "report.md", "summary": tmp / "summary.json"}
            made["markdown"].write_text(self.markdown())
            made["summary"].write_text(json.dumps(self.summary(), indent=2, default=str) + "\n")
            primary_law = next((law for law in self.laws if law.metric == self.primary and law.x_name == "compute"),
                               None)
            if self.points:
                made["plot"] = S.plot_scaling(self.points, self.primary, tmp / "scaling.png", law=primary_law,
                                              isoflop=self.isoflop, checks=self.checks,
                                              title=f"{self.study}: {self.primary} against compute")
            if self.isoflop is not None and self.isoflop.profiles:
                made["isoflop"] = S.plot_isoflop(self.isoflop, tmp / "isoflop.png")
            made["html"] = tmp / "report.html"
            made["html"].write_text(self.html(made))
            for p in made.values():
                os.replace(p, folder / p.name)
        return {key: folder / p.name for key, p in made.items()}

    def html(self, files: Dict[str, Path]) -> str:
        """One self-contained page: the tables as markdown-like HTML tables and the plots inline."""
        import html

        def table(header, rows) -> str:
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            return f"<table><tr>{head}</tr>{body}</table>"

        def image(path: Path) -> str:
            return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" alt="{path.name}">'

        points = [[r.name + (" (held out)" if r.held_out else ""), len(r.seeds), r.params, r.gmacs, r.steps,
                   f"{r.compute:.4g}" if r.compute else "-",
                   *[r.metrics[m].fmt() if m in r.metrics else "-" for m in self.metrics]] for r in self.rows]
        parts = [f"<h1>Scaling study {html.escape(self.study)}</h1>", f"<p>{html.escape(self.description)}</p>",
                 table(["point", "n", "params", "GMACs/img", "steps", "compute", *self.metrics], points),
                 "<h2>Fitted laws</h2>", table(*S.fit_table(self.laws, self.isoflop))]
        if self.checks:
            parts += ["<h2>Held-out predictions</h2>", table(*S.prediction_table(self.checks))]
        parts += [image(files[k]) for k in ("plot", "isoflop") if k in files]
        parts.append(f"<p>{html.escape(self.caption())}.</p>")
        style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
                 "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
        return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>" \
               f"{''.join(parts)}</body></html>\n"

    def log(self, tracker, paths: Dict[str, Path]) -> None:
        """The files under report/, the laws and predictions as metrics (law.<metric>.alpha, ...,
        predicted.<point>.<metric>), a rounded summary as tags, the fit in the run's description."""
        for p in paths.values():
            tracker.log_artifact(p, REPORT_DIR)
        tracker.log_metrics(S.mlflow_metrics(self.laws, self.checks, self.isoflop))
        tags = {f"law.{law.metric}.{law.x_name}": law.formula for law in self.laws}
        for c in self.checks:
            tags[f"predicted.{c.name}"] = (f"{c.metric} {c.predicted:.4g} [{c.pred_low:.4g}, {c.pred_high:.4g}] vs "
                                            f"{c.measured:.4g}: {'covered' if c.covered else 'NOT covered'}")
        note = self.markdown()
        if len(note) > NOTE_LIMIT:
            note = note[:NOTE_LIMIT] + f"\n\n... (cut; the whole report is the artifact {REPORT_DIR}/report.md)"
        tracker.set_tags({**tags, "mlflow.note.content": note})


# ---------------------------------------------------------------------------------------------
# Rebuilding from MLflow
# ---------------------------------------------------------------------------------------------

def _float(params: Dict[str, str], key: str) -> Optional[float]:
    try:
        return float(params[key])
    except (KeyError, ValueError):
        return None


def _fit(report: ScalingReport, metric: str, x: str) -> None:
    try:
        # law.<metric>.alpha for compute (the names), law.<metric>_vs_<x>.alpha otherwise
        name = metric if x == "compute" else f"{metric}_vs_{x}"
        report.laws.append(S.fit_scaling_law(report.points, metric, x=x, name=name))
    except UserError as e:
        report.notes.append(f"no law of {metric} against {x} ({e})")


def build_scaling_report(client, parent, info: Dict[str, Any]) -> ScalingReport:
    """The report of a scaling study's parent run (its study.json `info` and finished children)."""
    spec = info["spec"]
    finished: Dict[tuple, Any] = {}
    for run in study_children(client, parent):
        key = (run.data.tags.get("variant"), run.data.tags.get("seed"))
        if run.info.status == "FINISHED" and key not in finished:
            finished[key] = run
    all_keys = {k for run in finished.values() for k in run.data.metrics}
    metrics = [metric_key(m, all_keys) or m for m in spec["metrics"]]
    primary = metric_key(spec["primary"], all_keys) or spec["primary"]
    if not lower_is_better(primary):
        raise UserError(f"scaling laws fit lower-is-better metrics (losses, FID); {primary!r} is higher-is-better")
    seeds = sorted({int(s) for _, s in finished} | {int(s) for s in info.get("seeds_used", [])})
    rows: List[PointRow] = []
    missing = []
    for v in spec["variants"]:
        runs = [(s, finished[(v["name"], str(s))]) for s in seeds if (v["name"], str(s)) in finished]
        missing += [f"{v['name']}/seed{s}" for s in seeds if (v["name"], str(s)) not in finished
                    and s in info.get("seeds_used", [])]
        row = PointRow(v["name"], v.get("axes") or {}, bool(v.get("held_out")), [s for s, _ in runs],
                       None, None, None, None, (v.get("budget") or {}).get("compute"))
        if runs:
            params = runs[0][1].data.params
            row.params, row.gmacs = _float(params, "model.params"), _float(params, "model.gmacs")
            steps, batch = _float(params, "train.steps"), _float(params, "train.batch_size")
            row.steps = int(steps) if steps else None
            row.images = steps * batch if steps and batch else None
            for m in metrics:
                row.values[m] = [r.data.metrics.get(m, math.nan) for _, r in runs]
                stat = summarize([r.data.metrics.get(m) for _, r in runs])
                if stat is not None:
                    row.metrics[m] = stat
        rows.append(row)
    report = ScalingReport(parent.info.run_id, spec["name"], spec.get("description", ""), parent.info.status,
                           primary, metrics, rows, missing=missing)
    if len(report.points) >= 2:
        for m in metrics:
            _fit(report, m, "compute")
        _fit(report, primary, "params")
        budgets = {r.budget for r in rows if r.budget is not None and not r.held_out}
        if len(budgets) >= 2:
            try:
                report.isoflop = S.isoflop_analysis(report.points, primary)
            except UserError as e:
                report.notes.append(f"no IsoFLOP analysis ({e})")
        law = next((law for law in report.laws if law.metric == primary and law.x_name == "compute"), None)
        held = [p for p in report.points if p.held_out]
        if law is not None and held:
            report.checks = S.check_predictions(law, held)
    else:
        report.notes.append("fewer than 2 points with results: no law yet")
    return report


__all__ = ["PointRow", "ScalingReport", "build_scaling_report"]

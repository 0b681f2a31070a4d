"""Study reports rebuilt from MLflow alone: a table, the same table in markdown, and a plot.

    report = build_report(parent_run_id)      # reads the parent's study.json and its children
    console.print(report.table()); report.write("reports/x"); report.log(tracker)

Per variant: params, GMACs and whether they match the baseline's within 1% (with the solved
knob), every metric as mean +- 95% confidence half-width over seeds (Student t; one seed shows the
value and says n=1), the paired difference of the primary metric to the baseline over the seeds
both finished (same seed = same data order and noise, so the pairing removes most seed noise), and
the training wall time. `run_ablation` prints this very report at its end, so the table printed
there and the one `fcdm-lab report RUN_ID` prints agree by construction.
"""
from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import UserError
from .spec import lower_is_better

MATCH_TOLERANCE = 0.01   # "compute-matched" = GMACs within 1% of the baseline's
STUDY_FILE = "study.json"
REPORT_DIR = "report"


# ---------------------------------------------------------------------------------------------
# Statistics over seeds
# ---------------------------------------------------------------------------------------------

@dataclass
class Stat:
    """Mean and 95% t-interval half-width of one quantity over seeds (half is None for n = 1)."""

    mean: float
    half: Optional[float]
    n: int
    values: List[float]

    def fmt(self, signed: bool = False) -> str:
        """'0.7853' for one seed (the n column says n=1), '0.7853 ± 0.041' for several."""
        mean = f"{self.mean:+.4g}" if signed else f"{self.mean:.4g}"
        return mean if self.n == 1 or self.half is None else f"{mean} ± {self.half:.2g}"


def summarize(values: List[float]) -> Optional[Stat]:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Stat(mean, None, 1, values)
    from scipy import stats  # Student t quantile; scipy comes with scikit-learn

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Stat(mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n), n, values)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    variant: str
    is_baseline: bool
    seeds: List[int]
    params: Optional[int] = None
    gmacs: Optional[float] = None
    rel_gmacs: Optional[float] = None       # (gmacs - baseline) / baseline
    knob: Optional[str] = None
    knob_value: Optional[float] = None
    metrics: Dict[str, Stat] = field(default_factory=dict)
    diff: Optional[Stat] = None             # paired difference of the primary metric to the baseline
    wall_time_s: Optional[Stat] = None
    paper: Optional[Dict[str, float]] = None
    run_ids: List[str] = field(default_factory=list)

    @property
    def matched(self) -> Optional[bool]:
        return None if self.rel_gmacs is None else abs(self.rel_gmacs) <= MATCH_TOLERANCE


def _fmt_params(p: Optional[int]) -> str:
    if p is None:
        return "-"
    return f"{p / 1e6:.2f}M" if p >= 1e6 else f"{p / 1e3:.1f}k"


def _fmt_time(s: Optional[Stat]) -> str:
    if s is None:
        return "-"
    sec = s.mean
    return f"{sec:.0f}s" if sec < 120 else f"{sec / 60:.1f}min"


def _fmt_gmacs(row: Row) -> str:
    if row.gmacs is None:
        return "-"
    text = f"{row.gmacs:.4g}"
    return text if row.is_baseline or row.rel_gmacs is None else f"{text} ({row.rel_gmacs:+.1%})"


def _fmt_match(row: Row) -> str:
    if row.is_baseline:
        return "baseline"
    if row.rel_gmacs is None:
        return "-"
    text = "yes" if row.matched else "no"
    return f"{text}, {row.knob}={row.knob_value:.4g}" if row.knob else text


def _fmt_paper(paper: Optional[Dict[str, float]]) -> str:
    if not paper:
        return "-"
    return " / ".join(f"{paper[k]:g}" if k in paper else "-" for k in ("gflops", "fid", "is"))


@dataclass
class Report:
    run_id: str
    study: str
    description: str
    status: str
    baseline: str
    primary: str                          # the result key of the primary metric
    metrics: List[str]                    # result keys, one column each
    rows: List[Row]
    seeds: int
    steps: Optional[int]
    missing: List[str] = field(default_factory=list)   # "variant/seed" children without results

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.primary)

    @property
    def has_paper(self) -> bool:
        return any(r.paper for r in self.rows)

    def header(self) -> List[str]:
        cols = ["variant", "n", "params", "GMACs", "matched", *self.metrics, f"Δ {self.primary}", "train time"]
        if self.has_paper:
            cols.append("paper GFLOPs / FID / IS")
        return cols

    def cells(self) -> List[List[str]]:
        out = []
        for r in self.rows:
            row = [r.variant + (" *" if r.is_baseline else ""), f"n={len(r.seeds)}", _fmt_params(r.params),
                   _fmt_gmacs(r), _fmt_match(r)]
            row += [r.metrics[m].fmt() if m in r.metrics else "-" for m in self.metrics]
            row.append("-" if r.is_baseline else (r.diff.fmt(signed=True) if r.diff else "-"))
            row.append(_fmt_time(r.wall_time_s))
            if self.has_paper:
                row.append(_fmt_paper(r.paper))
            out.append(row)
        return out

    def caption(self) -> str:
        better = "lower" if self.lower_is_better else "higher"
        text = (f"n = seeds finished; mean ± 95% CI (t) over seeds, the value alone for n=1; Δ = paired "
                f"difference to the baseline (*) over shared seeds; sorted by {self.primary} ({better} is "
                f"better); matched = GMACs within 1% of the baseline's (solved knob shown)")
        if self.has_paper:
            text += "; paper = FCDM-L on ImageNet 256, FID-50K"
        if self.missing:
            text += f"; no results yet for {', '.join(self.missing)}"
        return text

    def table(self):
        from rich.table import Table

        from rich import box

        t = Table(title=f"Study {self.study}: {self.description}" if self.description else f"Study {self.study}",
                  caption=self.caption(), box=box.SIMPLE_HEAD)
        for i, h in enumerate(self.header()):  # fold, never cut: a truncated number is a wrong number
            t.add_column(h, justify="left" if i in (0, 4) else "right", overflow="fold")
        for row in self.cells():
            t.add_row(*row)
        return t

    def print(self, console) -> None:
        """Print the table; into a file or pipe at its natural width instead of wrapped to 80."""
        table = self.table()
        if console.is_terminal:
            console.print(table)  # rich folds cells to the terminal's width
            return
        old = console.width
        console.width = max(old, console.measure(table, options=console.options.update_width(1000)).maximum)
        try:
            console.print(table)
        finally:
            console.width = old

    def text(self, width: int = 200) -> str:
        """The rich table as plain text (what the terminal shows)."""
        from rich.console import Console

        console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
        console.print(self.table())
        return console.export_text()

    def markdown(self) -> str:
        lines = [f"# Study `{self.study}`", ""]
        if self.description:
            lines += [self.description, ""]
        lines += [f"MLflow run `{self.run_id}`; training steps per child: {self.steps or 'as configured'}.",
                  "", "| " + " | ".join(self.header()) + " |", "|" + "---|" * len(self.header())]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.cells()]
        lines += ["", self.caption() + ".", ""]
        return "\n".join(lines)

    def plot(self, path) -> Path:
        """Primary metric (mean ± CI) against GMACs, one labelled point per variant (PNG)."""
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        for r in self.rows:
            s = r.metrics.get(self.primary)
            if s is None or r.gmacs is None:
                continue
            ax.errorbar([r.gmacs], [s.mean], yerr=[[s.half or 0.0]], fmt="s" if r.is_baseline else "o",
                        capsize=4, color="black" if r.is_baseline else None, label=r.variant)
            ax.annotate(r.variant, (r.gmacs, s.mean), textcoords="offset points", xytext=(6, 4), fontsize=8)
        # matched variants sit on the same compute: show at least +-5% around it, not a zoomed-in sliver
        xs = [r.gmacs for r in self.rows if r.gmacs is not None]
        if xs:
            mid, half = (max(xs) + min(xs)) / 2, max((max(xs) - min(xs)) / 2 * 1.3, 0.05 * max(xs))
            ax.set_xlim(mid - half, mid + half)
        ax.margins(y=0.15)
        ax.set_xlabel("GMACs per image (forward)")
        ax.set_ylabel(f"{self.primary} ({'lower' if self.lower_is_better else 'higher'} is better)")
        ax.set_title(f"{self.study}: {self.primary} vs compute "
                     + ("(1 seed, no CI)" if self.seeds == 1 else f"({self.seeds} seeds, 95% CI)"))
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def write(self, folder) -> Dict[str, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(self.markdown())
        (folder / "summary.json").write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return {"markdown": folder / "report.md", "plot": self.plot(folder / "plot.png"),
                "summary": folder / "summary.json"}

    def log(self, tracker) -> None:
        """Log report.md, plot.png and summary.json under `report/` of the study's run."""
        with tempfile.TemporaryDirectory() as tmp:
            paths = self.write(tmp)
            for p in paths.values():
                tracker.log_artifact(p, REPORT_DIR)


# ---------------------------------------------------------------------------------------------
# Rebuilding from MLflow
# ---------------------------------------------------------------------------------------------

def load_study_info(client, run_id: str) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, STUDY_FILE, tmp)
        except Exception:
            raise UserError(f"run {run_id} has no {STUDY_FILE} artifact: it was not written by `fcdm-lab ablate`") from None
        return json.loads(Path(local).read_text())


def study_children(client, parent):
    """Every child run of a study parent (any status), newest first."""
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                              order_by=["attributes.start_time DESC"], max_results=10000)


def _float(params: Dict[str, str], key: str) -> Optional[float]:
    try:
        return float(params[key])
    except (KeyError, ValueError):
        return None


def build_report(run_id: str, uri: str | None = None) -> Report:
    """Rebuild a study's report from its MLflow parent run and children alone."""
    from ..eval.evaluate import metric_key
    from ..tracking import get_client, get_run

    client = get_client(uri)
    parent = get_run(run_id, client=client)
    tags = parent.data.tags
    if tags.get("kind") != "ablation":
        up = tags.get("mlflow.parentRunId")
        hint = f"; it is a child of run {up}: report that one" if up else ""
        raise UserError(f"run {run_id} is not a study run (tag kind=ablation){hint}")
    info = load_study_info(client, run_id)
    spec = info["spec"]
    variants = [v["name"] for v in spec["variants"]]
    papers = {v["name"]: v.get("paper") for v in spec["variants"]}
    baseline = spec["baseline"]

    # newest FINISHED child per (variant, seed)
    finished: Dict[tuple, Any] = {}
    for run in study_children(client, parent):
        t = run.data.tags
        key = (t.get("variant"), t.get("seed"))
        if run.info.status == "FINISHED" and key not in finished:
            finished[key] = run
    seeds = [int(s) for s in info["seeds_used"]]
    missing = [f"{v}/seed{s}" for s in seeds for v in variants if (v, str(s)) not in finished]

    all_keys = {k for run in finished.values() for k in run.data.metrics}
    columns = [metric_key(m, all_keys) or m for m in spec["metrics"]]
    primary = metric_key(spec["primary"], all_keys) or spec["primary"]

    def runs_of(v: str):
        return [(s, finished[(v, str(s))]) for s in seeds if (v, str(s)) in finished]

    base_gmacs = None
    base_runs = dict(runs_of(baseline))
    if base_runs:
        base_gmacs = _float(next(iter(base_runs.values())).data.params, "model.gmacs")
    rows: List[Row] = []
    for v in variants:
        runs = runs_of(v)
        row = Row(variant=v, is_baseline=v == baseline, seeds=[s for s, _ in runs], paper=papers.get(v),
                  run_ids=[r.info.run_id for _, r in runs])
        if runs:
            params = runs[0][1].data.params
            p = _float(params, "model.params")
            row.params = None if p is None else int(p)
            row.gmacs = _float(params, "model.gmacs")
            row.knob = params.get("model.match_knob")
            row.knob_value = _float(params, "model.match_value")
            if row.gmacs is not None and base_gmacs:
                row.rel_gmacs = (row.gmacs - base_gmacs) / base_gmacs
            for m in columns:
                stat = summarize([r.data.metrics[m] for _, r in runs if m in r.data.metrics])
                if stat is not None:
                    row.metrics[m] = stat
            row.wall_time_s = summarize([r.data.metrics.get("train.wall_time_s") for _, r in runs])
            if v != baseline:
                diffs = [r.data.metrics[primary] - base_runs[s].data.metrics[primary] for s, r in runs
                         if s in base_runs and primary in r.data.metrics and primary in base_runs[s].data.metrics]
                row.diff = summarize(diffs)
        rows.append(row)

    sign = 1.0 if lower_is_better(primary) else -1.0
    rows.sort(key=lambda r: (primary not in r.metrics, sign * r.metrics[primary].mean if primary in r.metrics else 0.0))
    return Report(run_id=run_id, study=spec["name"], description=spec.get("description", ""),
                  status=parent.info.status, baseline=baseline, primary=primary, metrics=columns, rows=rows,
                  seeds=len(seeds), steps=info.get("steps"), missing=missing)


def report_command(run_id: str, uri: str | None = None, out_dir=None, console=None) -> tuple[Report, Dict[str, Path]]:
    """The `fcdm-lab report RUN_ID` library function: rebuild the report, print the table, write
    report.md / plot.png / summary.json (default reports/<study>-<run id>/) and log them again."""
    from rich.console import Console

    from ..tracking import attach_run

    report = build_report(run_id, uri)
    console = console or Console()
    report.print(console)
    folder = Path(out_dir) if out_dir is not None else Path("reports") / f"{report.study}-{run_id[:8]}"
    paths = report.write(folder)
    report.log(attach_run(run_id, uri))
    console.print(f"Report written to {paths['markdown']} and {paths['plot']}, and logged to run {run_id}")
    return report, paths


write_report = report_command

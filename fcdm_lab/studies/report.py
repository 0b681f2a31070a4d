"""Study reports rebuilt from MLflow alone: a table, the same table in markdown, and a plot.

    report = build_report(parent_run_id)      # reads the parent's study.json and its children
    console.print(report.table()); report.write("reports/x"); report.log(tracker)

report.html (report_html.py) adds a forest plot of the paired differences, each variant's
evaluation samples and the loss curves: build_report fetches those histories and grids too.

Per variant: params, GMACs and whether they match the baseline's within 1% (with the solved
knob), every metric as mean +- 95% confidence half-width over seeds (Student t; one seed shows the
value and says n=1), and per metric the paired difference to the baseline over the seeds both
finished with its CI and a verdict (better / worse / inconclusive with the seeds a paired test
would need; verdicts.py); the caption gives the seed-to-seed sd pooled over variants (the noise floor).
`run_ablation` prints this very report at its end, so the table printed there and the one
`fcdm-lab report RUN_ID` prints agree by construction; the parent run carries the same verdicts
as metrics and tags. The rich table itself is rendered in display.py.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import UserError
from ..eval.metrics import lower_is_better, metric_key
from .verdicts import NO_ERROR_BAR, Stat, Verdict, paired_verdict, summarize

MATCH_TOLERANCE = 0.01   # "compute-matched" = GMACs within 1% of the baseline's
STUDY_FILE = "study.json"
REPORT_DIR = "report"
LOSS_METRIC = "loss"            # the trainer's step metric (train/trainer.py), overlaid in report.html
EVAL_IMAGES = "eval_samples"    # the evaluation's stepped sample grid (eval/evaluate.py), side by side in report.html
GRID_MAX_SIDE = 768             # grids are shrunk to this (pixels) for report.html: 256x256 grids run to MBs


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

@dataclass
class SampleGrid:
    """One child's evaluation sample grid, as PNG bytes (shrunk to GRID_MAX_SIDE)."""

    seed: int
    step: int
    png: bytes


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
    verdicts: Dict[str, Verdict] = field(default_factory=dict)   # per metric, against the baseline
    wall_time_s: Optional[Stat] = None
    paper: Optional[Dict[str, float]] = None
    run_ids: List[str] = field(default_factory=list)
    # For report.html only (not in summary.json): seed -> [(step, loss)], and one seed's sample grid
    loss_history: Dict[int, List[Tuple[int, float]]] = field(default_factory=dict)
    sample_grid: Optional[SampleGrid] = None

    @property
    def diff(self) -> Optional[Stat]:
        """Paired difference of the first metric (the primary) to the baseline."""
        first = next(iter(self.verdicts.values()), None)
        return None if first is None else first.diff

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
    paper_comparison: Optional[Any] = None   # studies/paper.py: the ordering against the paper's FIDs
    loss_metric: str = LOSS_METRIC

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.primary)

    @property
    def has_paper(self) -> bool:
        return any(r.paper for r in self.rows)

    def noise_floor(self) -> Dict[str, float]:
        """The seed-to-seed standard deviation per metric, pooled over every variant with >= 2 seeds
        (each variant's variance weighted by its n - 1). Not the baseline's alone: from 3 seeds one
        variant's sd is itself noisy (a 0.27 FID baseline sd sat next to variants' 0.9-1.9 in the
        Fashion-MNIST study), and the noise an effect must clear is every variant's."""
        pooled: Dict[str, Tuple[float, int]] = {}
        for r in self.rows:
            for m, s in r.metrics.items():
                if s.sd is not None and s.n >= 2 and math.isfinite(s.sd):
                    squares, df = pooled.get(m, (0.0, 0))
                    pooled[m] = (squares + (s.n - 1) * s.sd ** 2, df + s.n - 1)
        return {m: math.sqrt(squares / df) for m, (squares, df) in pooled.items() if df}

    def header(self) -> List[str]:
        cols = ["variant", "n", "params", "GMACs", "matched", *self.metrics, *[f"Δ {m} (verdict)" for m in self.metrics],
                "train time"]
        if self.has_paper:
            cols.append("paper GFLOPs / FID / IS")
        return cols

    def cells(self) -> List[List[str]]:
        out = []
        for r in self.rows:
            row = [r.variant + (" *" if r.is_baseline else ""), f"n={len(r.seeds)}", _fmt_params(r.params),
                   _fmt_gmacs(r), _fmt_match(r)]
            row += [r.metrics[m].fmt() if m in r.metrics else "-" for m in self.metrics]
            row += ["baseline" if r.is_baseline else (r.verdicts[m].fmt() if m in r.verdicts else "-")
                    for m in self.metrics]
            row.append(_fmt_time(r.wall_time_s))
            if self.has_paper:
                row.append(_fmt_paper(r.paper))
            out.append(row)
        return out

    def caption(self) -> str:
        better = "lower" if self.lower_is_better else "higher"
        text = (f"n = seeds finished; mean ± 95% CI (t) over seeds, the value alone for n=1; Δ = paired "
                f"difference to the baseline (*) over shared seeds ± 95% CI: better / worse when the CI excludes "
                f"0, else inconclusive (~N seeds = what a paired t-test needs for 80% power at this effect); "
                f"sorted by {self.primary} ({better} is better); matched = GMACs within 1% of the baseline's")
        floor = self.noise_floor()
        if floor:
            text += "; noise floor (seed-to-seed sd, pooled over variants): " + ", ".join(
                f"{m} {v:.2g}" for m, v in floor.items())
        elif self.seeds == 1:
            text += f"; {NO_ERROR_BAR}: run more seeds (--seeds 3) for error bars and verdicts"
        if self.has_paper:
            text += "; paper = FCDM-L on ImageNet 256, FID-50K"
        if self.missing:
            text += f"; no results yet for {', '.join(self.missing)}"
        return text

    def table(self):
        from ..display import report_table

        return report_table(self)

    def print(self, console) -> None:
        from ..display import paper_table, print_wide

        print_wide(console, self.table())
        if self.paper_comparison is not None:
            print_wide(console, paper_table(self.paper_comparison))

    def text(self, width: int = 200) -> str:
        """The rich table as plain text (what the terminal shows)."""
        from ..display import table_text

        return table_text(self.table(), width)

    def verdict_metrics(self) -> tuple[Dict[str, float], Dict[str, str]]:
        """The verdicts as parent-run metrics and tags: verdict.<variant>.<metric> = better | worse |
        inconclusive | n=1: no error bar (tag); .diff/.ci_low/.ci_high/.seeds_needed (metrics);
        noise_floor.<metric> = the seed-to-seed sd pooled over variants."""
        metrics: Dict[str, float] = {f"noise_floor.{m}": v for m, v in self.noise_floor().items()}
        tags: Dict[str, str] = {}
        for r in self.rows:
            for m, v in r.verdicts.items():
                if v.diff is None:
                    continue
                key = f"verdict.{r.variant}.{m}"
                tags[key] = v.verdict
                metrics[f"{key}.diff"] = v.diff.mean
                if v.diff.half is not None:
                    metrics[f"{key}.ci_low"], metrics[f"{key}.ci_high"] = v.diff.low, v.diff.high
                if v.seeds_needed:
                    metrics[f"{key}.seeds_needed"] = v.seeds_needed
        return metrics, tags

    def markdown(self) -> str:
        lines = [f"# Study `{self.study}`", ""]
        if self.description:
            lines += [self.description, ""]
        lines += [f"MLflow run `{self.run_id}`; training steps per child: {self.steps or 'as configured'}.",
                  "", "| " + " | ".join(self.header()) + " |", "|" + "---|" * len(self.header())]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.cells()]
        lines += ["", self.caption() + ".", ""]
        if self.paper_comparison is not None:
            lines += ["## Against the paper's ablation table", "", self.paper_comparison.markdown()]
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
        """The numbers (summary.json); the loss histories and sample grids stay in MLflow."""
        out = asdict(self)
        for row in out["rows"]:
            row.pop("loss_history", None)
            row.pop("sample_grid", None)
        return out

    def write(self, folder) -> Dict[str, Path]:
        from .report_html import write_html

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # Written aside, then each file renamed into place: two commands finishing one study at once
        # (or a reader, e.g. the MLflow upload of the other) never see a half-written file.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".writing-") as tmp:
            tmp = Path(tmp)
            (tmp / "report.md").write_text(self.markdown())
            (tmp / "summary.json").write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
            made = {"markdown": tmp / "report.md", "plot": self.plot(tmp / "plot.png"),
                    "summary": tmp / "summary.json", "html": write_html(self, tmp / "report.html")}
            for p in made.values():
                os.replace(p, folder / p.name)
        return {key: folder / p.name for key, p in made.items()}

    def log(self, tracker, paths: Optional[Dict[str, Path]] = None) -> None:
        """Log report.md, plot.png, summary.json and report.html under `report/` of the study's run
        (`paths`: what `write` returned, else they are written to a temporary folder first), and the
        verdicts as its metrics and tags."""
        with tempfile.TemporaryDirectory() as tmp:
            for p in (paths or self.write(tmp)).values():
                tracker.log_artifact(p, REPORT_DIR)
        metrics, tags = self.verdict_metrics()
        if self.paper_comparison is not None:
            metrics.update(self.paper_comparison.metrics())
        tracker.log_metrics(metrics)
        # The run page's description (MLflow renders it as markdown): the answer, not two clicks away.
        note = self.markdown()
        if len(note) > NOTE_LIMIT:
            note = note[:NOTE_LIMIT] + f"\n\n... (cut; the whole report is the artifact {REPORT_DIR}/report.md)"
        tracker.set_tags({**tags, "mlflow.note.content": note})


NOTE_LIMIT = 7000  # MLflow keeps tag values up to 8000 characters

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


def loss_history(client, run_id: str, key: str = LOSS_METRIC) -> List[Tuple[int, float]]:
    """[(step, value)] of a run's metric, by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _legacy_eval_grids(client, run_id: str) -> Dict[int, str]:
    """{step: path} of the evaluation grids runs logged before the stepped images existed (fcdm-lab
    <= the 2026-11-27 morning): plain artifacts `samples/eval_<weights>_step<N>.png`; EMA preferred."""
    import re

    found: Dict[int, tuple] = {}
    for item in client.list_artifacts(run_id, "samples"):
        m = re.fullmatch(r"samples/eval_(\w+?)_step(\d+)\.png", item.path)
        if m and not item.is_dir:
            rank = (int(m.group(2)), m.group(1) == "ema")
            step = int(m.group(2))
            if step not in found or rank > found[step][0]:
                found[step] = (rank, item.path)
    return {step: path for step, (_, path) in found.items()}


def sample_grid(client, runs) -> Optional[SampleGrid]:
    """The evaluation grid (EVAL_IMAGES, its latest step) of the first (seed, run) that logged one."""
    from PIL import Image

    from ..tracking.client import logged_images

    for seed, run in runs:
        images = logged_images(client, run.info.run_id, EVAL_IMAGES) or _legacy_eval_grids(client, run.info.run_id)
        if not images:
            continue
        step, path = max(images.items())
        with tempfile.TemporaryDirectory() as tmp:
            with Image.open(client.download_artifacts(run.info.run_id, path, tmp)) as image:
                image = image.convert("RGB")
                image.thumbnail((GRID_MAX_SIDE, GRID_MAX_SIDE))
                buf = io.BytesIO()
                image.save(buf, format="PNG", optimize=True)
        return SampleGrid(int(seed), int(step), buf.getvalue())
    return None


def build_report(run_id: str, uri: str | None = None, against_paper: Optional[bool] = None) -> Report:
    """Rebuild a study's report from its MLflow parent run and children alone. against_paper: add
    the comparison with the paper's table (studies/paper.py); None = when every variant has a paper FID."""
    from ..tracking.client import get_client, get_run

    client = get_client(uri, existing=True)
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
            row.loss_history = {s: h for s, r in runs if (h := loss_history(client, r.info.run_id))}
            row.sample_grid = sample_grid(client, runs)
            if v != baseline:
                paired = [(r.data.metrics, base_runs[s].data.metrics) for s, r in runs if s in base_runs]
                for m in [primary, *[c for c in columns if c != primary]]:
                    row.verdicts[m] = paired_verdict([a.get(m) for a, _ in paired], [b.get(m) for _, b in paired],
                                                     lower_is_better=lower_is_better(m))
        rows.append(row)

    sign = 1.0 if lower_is_better(primary) else -1.0
    rows.sort(key=lambda r: (primary not in r.metrics, sign * r.metrics[primary].mean if primary in r.metrics else 0.0))
    report = Report(run_id=run_id, study=spec["name"], description=spec.get("description", ""),
                    status=parent.info.status, baseline=baseline, primary=primary, metrics=columns, rows=rows,
                    seeds=len(seeds), steps=info.get("steps"), missing=missing)
    with_fid = [v for v in variants if (papers.get(v) or {}).get("fid") is not None]
    if against_paper and len(with_fid) < 3:
        raise UserError(f"study {spec['name']!r} gives the paper's FID for {len(with_fid)} variant(s) "
                        f"({', '.join(with_fid) or 'none'}); --against-paper needs at least 3 (paper = {{ fid = ... }})")
    if against_paper or (against_paper is None and len(with_fid) == len(variants) >= 3):
        from .paper import report_against_paper

        report.paper_comparison = report_against_paper(report)
    return report


def report_command(run_id: str, uri: str | None = None, out_dir=None, console=None,
                   against_paper: Optional[bool] = None) -> tuple[Report, Dict[str, Path]]:
    """The `fcdm-lab report RUN_ID` library function: rebuild the report, print the table, write
    report.md / plot.png / summary.json / report.html (default reports/<study>-<run id>/) and log them again."""
    from rich.console import Console

    from ..tracking.client import attach_run

    report = build_report(run_id, uri, against_paper=against_paper)
    console = console or Console()
    report.print(console)
    folder = Path(out_dir) if out_dir is not None else Path("reports") / f"{report.study}-{run_id[:8]}"
    paths = report.write(folder)
    report.log(attach_run(run_id, uri), paths)  # the files just written, not rendered again
    console.print(f"Report written to {paths['markdown']}, {paths['plot']} and {paths['html']}, and logged to run "
                  f"{run_id}", highlight=False)
    return report, paths


write_report = report_command

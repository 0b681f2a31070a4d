"""Study reports rebuilt from MLflow alone: a table, the same table in markdown, and a plot.

    report = build_report(parent_run_id)      # reads the parent's study.json and its children
    report.print(console); report.write("reports/x"); report.log(tracker)

report.html (report_html.py) adds a forest plot of the paired differences, each variant's
evaluation samples and the loss curves: build_report fetches those histories and grids too.

Per variant: params, GMACs and whether they match the baseline's within 1% (with the solved
knob), every metric as mean +- 95% confidence half-width over seeds (Student t; one seed shows the
value and says n=1), and per metric the paired difference to the baseline over the seeds both
finished, with a verdict valid for the whole study:

- a study of a fixed number of seeds: better / worse / inconclusive from paired t-tests,
  Holm-adjusted over the variants of each metric (`family_verdicts`; the study file's
  `multiple_comparisons = "none"` tests each variant alone), an inconclusive one with its minimum
  detectable effect (MDE) and, with the study file's `min_effect`, the seeds that detect that effect;
- a study run with `--until-decided` (parent tag study.mode): anytime-valid verdicts
  (`sequential_verdicts`, Bonferroni over the variants), from the seeds each variant has (decided
  variants stopped getting seeds), with why each variant stopped.

The caption gives the family and the seed-to-seed sd pooled over variants (the noise floor).
Two renderings of the same verdicts: the terminal table (`compact`: a few columns that fit 120
characters, short cells and a short caption; display.report_table) and the full table (`header`,
`cells`, `caption`: every column, long cells) of report.md and report.html. The parent run gets
the verdicts as metrics and rounded tags, and a description that starts with one line per variant.
`run_ablation` prints this very report at its end, so the table printed there and the one
`fcdm-lab report RUN_ID` prints agree by construction.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..display import fmt_params, output_console, paper_table, print_wide, report_files_line, report_table, table_text
from ..errors import UserError
from ..eval.metrics import lower_is_better, metric_key
from ..tracking.client import attach_run, get_client, get_run, logged_images
from .paper import report_against_paper
from .report_html import write_html
from .scaling_report import build_scaling_report
from .sequential import SequentialVerdict, sequential_verdicts
from .stored import read_study_file, study_children
from .verdicts import (ALPHA, BETTER, INCONCLUSIVE, NO_ERROR_BAR, NO_PAIRS, POWER, WORSE, Stat, Verdict,
                       family_verdicts, summarize)

MATCH_TOLERANCE = 0.01   # "compute-matched" = GMACs within 1% of the baseline's
REPORT_DIR = "report"
LOSS_METRIC = "loss"            # the trainer's step metric (train/trainer.py), overlaid in report.html
EVAL_IMAGES = "eval_samples"    # the evaluation's stepped sample grid (eval/evaluate.py), side by side in report.html
GRID_MAX_SIDE = 768             # grids are shrunk to this (pixels) for report.html: 256x256 grids run to MBs
FIXED, UNTIL_DECIDED = "fixed", "until-decided"   # Report.mode; UNTIL_DECIDED = the parent's tag study.mode
DEFAULT_MAX_SEEDS = 20          # ablate.py's default --max-seeds, for parents without the study.max_seeds tag
TABLE_WIDTH = 120               # the terminal table fits this many columns
MDE_MEANING = "MDE = the smallest true difference a paired test at alpha/K detects with {power:.0%} power at this n"


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
class AnytimeVerdict(SequentialVerdict):
    """A sequential (anytime-valid) verdict as the report keeps it: sequential.py's verdict plus the
    paired differences (diff: mean, n, values, sd; no t interval: the interval is low/high) and its
    family (K variants, alpha, max_seeds)."""

    diff: Optional[Stat] = None
    family_size: int = 1
    alpha: float = ALPHA
    max_seeds: int = DEFAULT_MAX_SEEDS

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def _decimals(self) -> int:
        """One digit past the interval's half-width's first; unbounded: two significant digits of the mean."""
        half = (self.high - self.low) / 2 if self.bounded else None
        if half:
            return _decimals(half)
        return _decimals(self.mean) if self.mean else 3

    def interval(self, compact: bool = False) -> str:
        """'[-0.59, -0.02]' ('[-0.59,-0.02]' compact); '[-inf, +inf]' while unbounded."""
        dec = self._decimals()
        num = (lambda v: f"{v:+.{dec}f}" if math.isfinite(v) else ("-inf" if v < 0 else "+inf"))
        return f"[{num(self.low)},{'' if compact else ' '}{num(self.high)}]"

    def delta(self) -> str:
        """'-0.31 [-0.59, -0.02]': the mean difference and its anytime-valid interval."""
        return f"{self.mean:+.{self._decimals()}f} {self.interval()}"

    def describe(self) -> str:
        if self.mean is None:
            return "no paired seeds yet"
        text = (f"mean difference {self.mean:+.{self._decimals()}f} over {self.n} paired seed(s), anytime-valid "
                f"{1 - self.alpha:.0%} interval {self.interval()}")
        if self.family_size > 1:
            text += f" (Bonferroni over {self.family_size} variants: each at level {self.alpha / self.family_size:.3g})"
        text += f": {self.verdict}; anytime-valid p={self.p_value:.2g}; {self.reason}"
        return text


AnyVerdict = Union[Verdict, AnytimeVerdict]


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
    verdicts: Dict[str, AnyVerdict] = field(default_factory=dict)   # per metric (the primary first), vs the baseline
    wall_time_s: Optional[Stat] = None
    paper: Optional[Dict[str, float]] = None
    run_ids: List[str] = field(default_factory=list)
    stopped: Optional[str] = None           # until-decided: why it got no more seeds (the primary's reason)
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


def _decimals(half: float) -> int:
    """Decimals that show a number to one digit past `half`'s first significant digit (verdicts.Stat.fmt)."""
    return max(0, 1 - math.floor(math.log10(abs(half))))


def _at_precision(x: float, half: Optional[float]) -> str:
    """x at the decimals of an interval's half-width (an MDE next to '± 0.020' as 0.031)."""
    if half and math.isfinite(half) and x != 0:
        return f"{x:.{_decimals(half)}f}"
    return f"{x:.2g}"


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


def _compact_gmacs(row: Row) -> str:
    """The baseline's GMACs; a variant's change to it, '!' when not within MATCH_TOLERANCE."""
    if row.gmacs is None:
        return "-"
    if row.is_baseline or row.rel_gmacs is None:
        return f"{row.gmacs:.3g}"
    return f"{row.rel_gmacs:+.1%}" + ("" if row.matched else "!")


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


def _tight(text: str) -> str:
    return text.replace(" ± ", "±")


def verdict_delta(v: AnyVerdict) -> str:
    """The difference a verdict rests on, rounded to its interval: '-0.0021 ± 0.0009', '+0.07'
    (one seed), '-0.31 [-0.59, -0.02]' (anytime-valid), '' without pairs."""
    if isinstance(v, AnytimeVerdict):
        return "" if v.mean is None else v.delta()
    return "" if v.diff is None else v.diff.fmt(signed=True)


def full_cell(v: AnyVerdict) -> str:
    """A verdict in the full table (report.md / report.html): Verdict.fmt ('+0.012 ± 0.020
    inconclusive (MDE 0.031)'), or '-0.31 [-0.59, -0.02] better' (anytime-valid)."""
    if isinstance(v, AnytimeVerdict):
        return NO_PAIRS if v.mean is None else f"{v.delta()} {v.verdict}"
    return v.fmt()


def compact_cell(v: AnyVerdict) -> str:
    """A verdict in the terminal table: '-0.21±0.05 better', '+0.012±0.020 ?' (inconclusive),
    '+0.07 (n=1)', '[-0.59,-0.02] better' (anytime-valid interval), '-' without pairs."""
    if isinstance(v, AnytimeVerdict):
        if v.mean is None:
            return NO_PAIRS
        word = "?" if v.verdict == INCONCLUSIVE else v.verdict
        return f"{v.interval(compact=True)} {word}"
    if v.diff is None:
        return NO_PAIRS
    if v.verdict == NO_ERROR_BAR:
        return f"{v.diff.fmt(signed=True)} (n=1)"
    return f"{_tight(v.diff.fmt(signed=True))} {'?' if v.verdict == INCONCLUSIVE else v.verdict}"


def _short_reason(v: AnytimeVerdict) -> str:
    """Why a variant got no more seeds, in a word or three: 'decided' ('decided at 7' when it has more
    seeds than the decision needed), 'max seeds', 'undecided' (below max seeds: stopped by --budget,
    or still running); the full reason is in report.md."""
    if v.mean is None:
        return "no seeds yet"
    if v.decided:
        return "decided" if v.decided_at == v.n else f"decided at {v.decided_at}"
    return "max seeds" if v.n >= v.max_seeds else "undecided"


def _short_names(metrics: List[str]) -> Tuple[Dict[str, str], str]:
    """({metric: its name without the suffix every metric shares}, the suffix): the terminal's
    headers 'fid', 'kid', 'class_acc' for fid_digits, kid_digits, class_acc_digits."""
    suffixes = {m.rsplit("_", 1)[1] if "_" in m else None for m in metrics}
    if len(metrics) < 2 or len(suffixes) != 1 or None in suffixes:
        return {m: m for m in metrics}, ""
    suffix = "_" + suffixes.pop()
    return {m: m[: -len(suffix)] for m in metrics}, suffix


@dataclass
class TableColumn:
    """One column of the terminal table: header, cells (one per row) and, for verdict cells, the
    verdict word of each (display.report_table colours them)."""
    header: str
    cells: List[str]
    justify: str = "right"
    verdicts: Optional[List[Optional[str]]] = None


# The terminal table's levels of compaction, tried in order until the table fits the width:
# what each one leaves out of the terminal (report.md and report.html keep everything).
COMPACT_LEVELS = ({}, {"time"}, {"time", "params"}, {"time", "params", "mean_ci"},
                  {"time", "params", "mean_ci", "other_means"})


@dataclass
class Report:
    compact_levels = COMPACT_LEVELS   # (a class attribute: display.report_table tries each)

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
    mode: str = FIXED                     # FIXED | UNTIL_DECIDED (the parent's tag study.mode)
    multiple_comparisons: str = "holm"    # the study file's: holm | none (FIXED mode)
    alpha: float = ALPHA
    max_seeds: Optional[int] = None       # UNTIL_DECIDED: the study's --max-seeds
    min_effect: Dict[str, float] = field(default_factory=dict)   # result key -> the study file's effect of interest

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.primary)

    @property
    def has_paper(self) -> bool:
        return any(r.paper for r in self.rows)

    @property
    def until_decided(self) -> bool:
        return self.mode == UNTIL_DECIDED

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

    # -- the family the verdicts hold for -----------------------------------------------------

    def _tested(self) -> List[Tuple[str, AnyVerdict]]:
        """(variant, verdict) of the verdicts that rest on a test (>= 2 paired seeds; anytime-valid:
        any seed)."""
        out = []
        for r in self.rows:
            for v in r.verdicts.values():
                if isinstance(v, AnytimeVerdict) and v.mean is not None:
                    out.append((r.variant, v))
                elif isinstance(v, Verdict) and v.diff is not None and v.diff.n >= 2:
                    out.append((r.variant, v))
        return out

    def family(self) -> Optional[str]:
        """What the verdicts are valid for, in words ('verdicts Holm-adjusted over the 6 variants of
        each metric (alpha 0.05)'); None when no verdict rests on a test (n=1)."""
        tested = self._tested()
        if self.until_decided:
            k = max((v.family_size for _, v in tested), default=len([r for r in self.rows if not r.is_baseline]))
            over = f", Bonferroni over the {k} variants" if k > 1 else ""
            return (f"verdicts anytime-valid (confidence sequences{over}, alpha {self.alpha:g}): valid however often "
                    f"seeds were added and looked at")
        if not tested:
            return None
        if self.multiple_comparisons == "none":
            k = len({name for name, _ in tested})
            return (f"verdicts not adjusted for multiple comparisons (the study's multiple_comparisons = \"none\"): "
                    f"each of the {k} variant(s) tested alone at alpha {self.alpha:g}")
        sizes = sorted({v.family_size for _, v in tested})
        if sizes == [1]:
            return f"verdicts from one paired t-test per metric (one variant: nothing to adjust; alpha {self.alpha:g})"
        if len(sizes) == 1:
            return f"verdicts Holm-adjusted over the {sizes[0]} variants of each metric (alpha {self.alpha:g})"
        return (f"verdicts Holm-adjusted over the variants with >= 2 paired seeds on each metric ({sizes[0]}-"
                f"{sizes[-1]} of them, alpha {self.alpha:g})")

    # -- the full table: report.md and report.html --------------------------------------------

    def header(self) -> List[str]:
        cols = ["variant", "n"] + (["stopped"] if self.until_decided else []) + ["params", "GMACs", "matched",
                                                                                  *self.metrics]
        delta = "anytime-valid 95% interval, verdict" if self.until_decided else "verdict"
        cols += [f"Δ {m} ({delta})" for m in self.metrics] + ["train time"]
        if self.has_paper:
            cols.append("paper GFLOPs / FID / IS")
        return cols

    def cells(self) -> List[List[str]]:
        out = []
        for r in self.rows:
            row = [r.variant + (" *" if r.is_baseline else ""), f"n={len(r.seeds)}"]
            if self.until_decided:
                row.append("baseline" if r.is_baseline else (r.stopped or "-"))
            row += [fmt_params(r.params), _fmt_gmacs(r), _fmt_match(r)]
            row += [r.metrics[m].fmt() if m in r.metrics else "-" for m in self.metrics]
            row += ["baseline" if r.is_baseline else (full_cell(r.verdicts[m]) if m in r.verdicts else "-")
                    for m in self.metrics]
            row.append(_fmt_time(r.wall_time_s))
            if self.has_paper:
                row.append(_fmt_paper(r.paper))
            out.append(row)
        return out

    def cell_verdicts(self) -> List[List[Optional[str]]]:
        """Parallel to cells(): the verdict word of each verdict cell (None elsewhere), for colours."""
        lead = len(self.header()) - 2 * len(self.metrics) - 1 - self.has_paper
        out = []
        for r in self.rows:
            marks: List[Optional[str]] = [None] * (lead + len(self.metrics))
            marks += [None if r.is_baseline or m not in r.verdicts or r.verdicts[m].verdict == NO_PAIRS
                      else r.verdicts[m].verdict for m in self.metrics]
            out.append(marks + [None] * (1 + self.has_paper))
        return out

    def caption(self) -> str:
        """The full caption (report.md, report.html): every column and the verdicts' family explained."""
        better = "lower" if self.lower_is_better else "higher"
        family = self.family()
        if self.until_decided:
            text = (f"n = seeds finished (decided variants get no more seeds); stopped = why a variant got no more "
                    f"seeds (its verdict on {self.primary}, at most {self.max_seeds} seeds); mean ± 95% CI (t) over "
                    f"seeds, the value alone for n=1; Δ = mean paired difference to the baseline (*) over shared seeds "
                    f"with its anytime-valid 95% interval; {family}: better / worse when the interval excludes 0, "
                    f"else inconclusive")
        else:
            text = ("n = seeds finished; mean ± 95% CI (t) over seeds, the value alone for n=1; Δ = paired difference "
                    "to the baseline (*) over shared seeds ± 95% CI (unadjusted)")
            if family and self.multiple_comparisons != "none":
                text += (f"; {family}: better / worse when its adjusted p <= {self.alpha:g}, else inconclusive with "
                         f"its MDE (or the Holm p when only the correction keeps it inconclusive); "
                         f"{MDE_MEANING.format(power=POWER)}")
            elif family:
                text += (f"; {family}: better / worse when its p <= {self.alpha:g}, else inconclusive with its MDE; "
                         + MDE_MEANING.format(power=POWER).replace("alpha/K", "alpha"))
            if family and self.min_effect:
                text += ("; effects of interest (the study's min_effect): "
                         + ", ".join(f"{m} {e:g}" for m, e in self.min_effect.items())
                         + f", the paired seeds that detect them with {POWER:.0%} power under 'Verdicts in words'")
        text += f"; sorted by {self.primary} ({better} is better); matched = GMACs within 1% of the baseline's"
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

    # -- the terminal table -------------------------------------------------------------------

    def compact(self, level: int = 0) -> Tuple[List[TableColumn], str]:
        """The terminal table at a level of COMPACT_LEVELS (0: everything it shows): its columns and
        its short caption (a few sentences, one per line)."""
        drop = COMPACT_LEVELS[min(level, len(COMPACT_LEVELS) - 1)]
        short, suffix = _short_names(self.metrics)
        rows = self.rows
        cols = [TableColumn("variant", [r.variant + (" *" if r.is_baseline else "") for r in rows], "left")]
        if self._uneven_seeds():  # else the caption says how many
            cols.append(TableColumn("n", [str(len(r.seeds)) for r in rows]))
        if self.until_decided:
            cols.append(TableColumn("stopped", ["" if r.is_baseline else _short_reason(r.verdicts[self.primary])
                                                if self.primary in r.verdicts else "-" for r in rows], "left"))
        if "params" not in drop:
            cols.append(TableColumn("params", [fmt_params(r.params) for r in rows]))
        cols.append(TableColumn("GMACs", [_compact_gmacs(r) for r in rows]))
        for m in self.metrics:
            if "other_means" in drop and m != self.primary:
                continue
            arrow = "↓" if lower_is_better(m) else "↑"
            cells = [(r.metrics[m].fmt() if "mean_ci" not in drop else r.metrics[m].fmt().split(" ± ")[0])
                     if m in r.metrics else "-" for r in rows]
            cols.append(TableColumn(f"{short[m]} {arrow}", [_tight(c) for c in cells]))
        for m in self.metrics:
            cells, words = [], []
            for r in rows:
                v = None if r.is_baseline else r.verdicts.get(m)
                cells.append("" if r.is_baseline else (compact_cell(v) if v is not None else "-"))
                words.append(None if v is None or v.verdict == NO_PAIRS else v.verdict)
            cols.append(TableColumn(f"Δ {short[m]}", cells, "left", words))
        if "time" not in drop:
            cols.append(TableColumn("time", [_fmt_time(r.wall_time_s) for r in rows]))
        empty = {"-", ""}  # a column nobody has a value in (a metric no child logged): report.md keeps it
        cols = [c for i, c in enumerate(cols) if i == 0 or not set(c.cells) <= empty]
        return cols, self.short_caption(drop, suffix)

    def _uneven_seeds(self) -> bool:
        """Whether the terminal table needs an n column: until-decided, or variants with different seeds."""
        return self.until_decided or len({len(r.seeds) for r in self.rows}) != 1

    def short_caption(self, drop=frozenset(), suffix: str = "") -> str:
        """The terminal table's caption: a few short sentences, one per line."""
        better = "lower" if self.lower_is_better else "higher"
        if "other_means" in drop:
            means = f"{self.primary}: its mean over seeds"
        elif "mean_ci" in drop:
            means = "means over seeds (their 95% CI in report.md)"
        else:
            means = "mean±95% CI over seeds"
        metrics = f" Metrics *{suffix}." if suffix else ""
        n = len(self.rows[0].seeds) if self.rows else 0
        seeds = "n = seeds" if self._uneven_seeds() else f"{n} seed{'s' if n != 1 else ''} each"
        lines = [f"* = baseline; sorted by {self.primary} ({better} is better); {seeds}; {means}.{metrics}"]
        family = self.family()
        if self.until_decided:
            k = max((v.family_size for _, v in self._tested()), default=1)
            over = f", Bonferroni over the {k} variants" if k > 1 else ""
            lines.append(f"Δ = [anytime-valid 95% interval] of the paired difference to the baseline (confidence sequences"
                         f"{over}, alpha {self.alpha:g}: valid however often seeds were added); better / worse / ? = "
                         f"inconclusive. stopped: decided, or undecided at max seeds ({self.max_seeds}) or before "
                         f"(--budget).")
        elif family:
            held = any(isinstance(v, Verdict) and v.holm_changed for _, v in self._tested())
            lines.append(f"Δ = paired difference to the baseline ±95% CI; better / worse / ? = inconclusive: "
                         f"{family}" + ("; a ? whose CI excludes 0 is one the correction keeps undecided" if held else "")
                         + ".")
        else:
            lines.append(f"Δ = paired difference to the baseline; {NO_ERROR_BAR}: run more seeds (--seeds 3) for "
                         f"error bars and verdicts.")
        short, _ = _short_names(self.metrics)
        mdes = [(r.variant, v) for r in self.rows if isinstance(v := r.verdicts.get(self.primary), Verdict)
                and v.verdict == INCONCLUSIVE and v.mde is not None]
        if mdes:
            level = "alpha/K" if self.multiple_comparisons != "none" and mdes[0][1].family_size > 1 else "alpha"
            lines.append(f"MDE on {short[self.primary]} (the smallest true difference detected with {POWER:.0%} power "
                         f"at this n and {level}): "
                         + ", ".join(f"{name} {_at_precision(v.mde, v.diff.half)}" for name, v in mdes) + ".")
        floor = self.noise_floor()
        gmacs = "GMACs: the baseline's, else the change (! = more than 1% off)."
        lines.append(gmacs + (" Noise floor (seed sd, pooled): " + ", ".join(
            f"{short.get(m, m)} {v:.2g}" for m, v in floor.items()) + "." if floor else ""))
        extra = (["MDEs", "p-values"] if not self.until_decided and family else []) + (
            ["the paper column"] if self.has_paper else [])
        lines.append("Every column in full" + (f" ({', '.join(extra)})" if extra else "") + ": report.md, report.html.")
        if self.missing:
            lines.append(f"No results yet for {', '.join(self.missing)}.")
        return "\n".join(lines)

    def table(self, width: int = TABLE_WIDTH):

        return report_table(self, width)

    def print(self, console) -> None:
        """The terminal table (and the paper table): in a terminal as wide as it is, into a file or
        pipe at TABLE_WIDTH columns at most."""

        width = console.width if console.is_terminal else TABLE_WIDTH
        print_wide(console, self.table(width), max_width=TABLE_WIDTH)
        if self.paper_comparison is not None:
            print_wide(console, paper_table(self.paper_comparison), max_width=TABLE_WIDTH)

    def text(self, width: int = TABLE_WIDTH) -> str:
        """The terminal table as plain text (what the terminal shows)."""

        return table_text(self.table(width), width)

    # -- the parent run: one line per variant, tags, metrics ---------------------------------

    def answer_lines(self) -> List[str]:
        """One markdown line per variant, its verdicts first: '**cca**: better on fid_digits (Δ
        -0.21 ± 0.05); inconclusive on kid_digits (Δ +0.002 ± 0.017) and class_acc_digits (...)'."""
        order = [BETTER, WORSE, INCONCLUSIVE, NO_ERROR_BAR]
        out = []
        for r in self.rows:
            if r.is_baseline:
                continue
            groups: Dict[str, List[str]] = {}
            for m, v in r.verdicts.items():
                if v.verdict == NO_PAIRS:
                    continue
                groups.setdefault(v.verdict, []).append(f"{m} (Δ {verdict_delta(v)})")
            parts = []
            for word in sorted(groups, key=lambda w: order.index(w) if w in order else len(order)):
                items = groups[word]
                listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
                parts.append(f"{'no error bar (n=1)' if word == NO_ERROR_BAR else word} on {listed}")
            text = "; ".join(parts) if parts else "no paired seeds yet"
            if self.until_decided and r.stopped:
                text += f"; {r.stopped}"
            out.append(f"- **{r.variant}**: {text}")
        return out

    def verdict_tags(self) -> Dict[str, str]:
        """verdict.<variant> = 'fid_digits: better (-0.21 ± 0.05); kid_digits: inconclusive (+0.002 ±
        0.017)': each difference rounded to its interval's precision."""
        tags = {}
        for r in self.rows:
            parts = []
            for m, v in r.verdicts.items():
                if v.verdict == NO_PAIRS:
                    continue
                word = "no error bar" if v.verdict == NO_ERROR_BAR else v.verdict
                parts.append(f"{m}: {word} ({verdict_delta(v)})")
            if parts:
                tags[f"verdict.{r.variant}"] = "; ".join(parts)
        return tags

    def verdict_metrics(self) -> tuple[Dict[str, float], Dict[str, str]]:
        """The verdicts as parent-run metrics and tags: tag verdict.<variant>.<metric> = better | worse |
        inconclusive | n=1: no error bar; tag verdict.<variant> = every metric's verdict with its rounded
        difference; tag study.verdicts = the family. Metrics verdict.<variant>.<metric>.diff, .ci_low,
        .ci_high (the 95% t-interval; until-decided: the anytime-valid one, while bounded), .p (paired
        t-test), .p_holm (Holm-adjusted; not with multiple_comparisons = "none"), .mde, .seeds_needed
        (with the study's min_effect); until-decided: .p_anytime (Bonferroni-adjusted) and .n instead of
        .p/.p_holm/.mde; noise_floor.<metric> = the seed-to-seed sd pooled over variants."""
        metrics: Dict[str, float] = {f"noise_floor.{m}": v for m, v in self.noise_floor().items()}
        tags: Dict[str, str] = self.verdict_tags()
        family = self.family()
        if family:
            tags["study.verdicts"] = family
        for r in self.rows:
            for m, v in r.verdicts.items():
                key = f"verdict.{r.variant}.{m}"
                if isinstance(v, AnytimeVerdict):
                    if v.mean is None:
                        continue
                    tags[key] = v.verdict
                    metrics.update({f"{key}.diff": v.mean, f"{key}.p_anytime": v.p_value, f"{key}.n": v.n})
                    if v.bounded:
                        metrics[f"{key}.ci_low"], metrics[f"{key}.ci_high"] = v.low, v.high
                    continue
                if v.diff is None:
                    continue
                tags[key] = v.verdict
                metrics[f"{key}.diff"] = v.diff.mean
                if v.diff.half is not None:
                    metrics[f"{key}.ci_low"], metrics[f"{key}.ci_high"] = v.diff.low, v.diff.high
                if v.p_value is not None:
                    metrics[f"{key}.p"] = v.p_value
                    if self.multiple_comparisons != "none":
                        metrics[f"{key}.p_holm"] = v.p_adjusted
                if v.mde is not None:
                    metrics[f"{key}.mde"] = v.mde
                if v.min_effect is not None and v.seeds_needed:
                    metrics[f"{key}.seeds_needed"] = v.seeds_needed
        return metrics, tags

    def note(self) -> str:
        """The parent run's description (MLflow renders it as markdown): one line per variant with its
        verdicts first, the family, then the whole report."""
        lines = self.answer_lines()
        family = self.family()
        lines += ["", f"*{(family[0].upper() + family[1:]) if family else 'No verdicts yet'}; baseline "
                      f"{self.baseline}; the whole report below and in {REPORT_DIR}/report.md.*", "", "---", ""]
        note = "\n".join(lines) + self.markdown()
        if len(note) > NOTE_LIMIT:
            note = note[:NOTE_LIMIT] + f"\n\n... (cut; the whole report is the artifact {REPORT_DIR}/report.md)"
        return note

    def verdicts_in_words(self) -> List[str]:
        """Markdown bullets: every variant's verdict per metric as a sentence (p-values, the family,
        the MDE, seeds for an effect of interest; or the anytime-valid interval and why it stopped)."""
        out = []
        for r in self.rows:
            for m, v in r.verdicts.items():
                if not r.is_baseline:
                    out.append(f"- **{r.variant}**, {m}: {v.describe()}")
        return out

    def markdown(self) -> str:
        lines = [f"# Study `{self.study}`", ""]
        if self.description:
            lines += [self.description, ""]
        lines += [f"MLflow run `{self.run_id}`; training steps per child: {self.steps or 'as configured'}.",
                  "", "| " + " | ".join(self.header()) + " |", "|" + "---|" * len(self.header())]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.cells()]
        lines += ["", self.caption() + ".", ""]
        words = self.verdicts_in_words()
        if words:
            family = self.family()
            lines += ["## Verdicts in words", ""]
            if family:
                lines += [family[0].upper() + family[1:] + ("." if self.until_decided else
                          f"; {MDE_MEANING.format(power=POWER)}."), ""]
            lines += [*words, ""]
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
        ns = sorted({len(r.seeds) for r in self.rows if r.seeds})
        seeds = f"{ns[0]}-{ns[-1]}" if len(ns) > 1 else str(self.seeds)
        ax.set_title(f"{self.study}: {self.primary} vs compute "
                     + ("(1 seed, no CI)" if self.seeds == 1 else f"({seeds} seeds, 95% CI)"))
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path

    def to_dict(self) -> Dict[str, Any]:
        """The numbers (summary.json; infinite interval ends as null); the loss histories and sample
        grids stay in MLflow."""
        out = asdict(self)
        for row in out["rows"]:
            row.pop("loss_history", None)
            row.pop("sample_grid", None)
        return _finite_or_none(out)

    def write(self, folder) -> Dict[str, Path]:

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
        (`paths`: what `write` returned, else they are written to a temporary folder first), the
        verdicts as its metrics and tags, and the description (note())."""
        with tempfile.TemporaryDirectory() as tmp:
            for p in (paths or self.write(tmp)).values():
                tracker.log_artifact(p, REPORT_DIR)
        metrics, tags = self.verdict_metrics()
        if self.paper_comparison is not None:
            metrics.update(self.paper_comparison.metrics())
        tracker.log_metrics(metrics)
        # The run page's description (MLflow renders it as markdown): the answer, not two clicks away.
        tracker.set_tags({**tags, "mlflow.note.content": self.note()})


NOTE_LIMIT = 7000  # MLflow keeps tag values up to 8000 characters


def _finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x

# ---------------------------------------------------------------------------------------------
# Rebuilding from MLflow
# ---------------------------------------------------------------------------------------------

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


def _seed(text) -> Optional[int]:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _fixed_verdicts(rows: Dict[str, Row], runs: Dict[str, Dict[int, Any]], baseline: str, columns: List[str],
                    primary: str, *, holm_correction: bool, min_effect: Dict[str, float]) -> None:
    """Per metric, the variants' paired t-test verdicts as one family (verdicts.family_verdicts)."""
    base = runs.get(baseline, {})
    tested = [v for v in rows if v != baseline and runs.get(v)]
    for m in [primary, *[c for c in columns if c != primary]]:
        pairs = {}
        for v in tested:
            shared = [s for s in sorted(runs[v]) if s in base]
            pairs[v] = ([runs[v][s].data.metrics.get(m) for s in shared], [base[s].data.metrics.get(m) for s in shared])
        for v, verdict in family_verdicts(pairs, lower_is_better=lower_is_better(m), holm_correction=holm_correction,
                                          min_effect=min_effect.get(m)).items():
            rows[v].verdicts[m] = verdict


def _anytime_verdicts(rows: Dict[str, Row], runs: Dict[str, Dict[int, Any]], baseline: str, columns: List[str],
                      primary: str, *, max_seeds: int) -> None:
    """Per metric, every variant's anytime-valid verdict from the seeds it has (sequential.py;
    Bonferroni over all the study's variants besides the baseline, as --until-decided decides)."""
    base = runs.get(baseline, {})
    others = [v for v in rows if v != baseline]
    for m in [primary, *[c for c in columns if c != primary]]:
        diffs: Dict[str, List[float]] = {}
        for v in others:
            d = []
            for s in sorted(runs.get(v, {})):  # seed order: the order the rounds added them
                a = runs[v][s].data.metrics.get(m)
                b = base[s].data.metrics.get(m) if s in base else None
                if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                    d.append(a - b)
            diffs[v] = d
        found = sequential_verdicts(diffs, lower_is_better=lower_is_better(m), max_seeds=max_seeds)
        for v, sv in found.items():
            if not runs.get(v):
                continue
            stat = summarize(diffs[v])
            rows[v].verdicts[m] = AnytimeVerdict(**asdict(sv), family_size=len(others), max_seeds=max_seeds,
                                                 diff=None if stat is None else Stat(stat.mean, None, stat.n,
                                                                                     stat.values, stat.sd))
    for v in others:
        if primary in rows[v].verdicts:
            rows[v].stopped = rows[v].verdicts[primary].reason


def build_report(run_id: str, uri: str | None = None, against_paper: Optional[bool] = None,
                 parent=None) -> Report:
    """Rebuild a study's report from its MLflow parent run and children alone. against_paper: add
    the comparison with the paper's table (studies/paper.py); None = when every variant has a paper FID.
    parent: the parent run, where the caller has read it already.

    Seeds: every seed a finished child has, plus the first round's (study.json's seeds_used). Missing:
    children without a finished run; with --until-decided (tag study.mode) a decided variant's later
    seeds were never trained, so only the first round's seeds and children that exist count."""
    client = get_client(uri, existing=True)
    parent = parent or get_run(run_id, client=client)
    tags = parent.data.tags
    if tags.get("kind") != "ablation":
        up = tags.get("mlflow.parentRunId")
        hint = f"; it is a child of run {up}: report that one" if up else ""
        raise UserError(f"run {run_id} is not a study run (tag kind=ablation or scaling){hint}")
    info = read_study_file(client, run_id)
    spec = info["spec"]
    variants = [v["name"] for v in spec["variants"]]
    papers = {v["name"]: v.get("paper") for v in spec["variants"]}
    baseline = spec["baseline"]
    mode = UNTIL_DECIDED if tags.get("study.mode") == UNTIL_DECIDED else FIXED
    max_seeds = _seed(tags.get("study.max_seeds")) or DEFAULT_MAX_SEEDS
    multiple = spec.get("multiple_comparisons") or "holm"   # studies logged before the key: Holm

    # newest FINISHED child per (variant, seed); every (variant, seed) that has a child at all
    finished: Dict[tuple, Any] = {}
    exists = set()
    for run in study_children(client, parent):
        t = run.data.tags
        seed = _seed(t.get("seed"))
        if seed is None:
            continue
        key = (t.get("variant"), seed)
        exists.add(key)
        if run.info.status == "FINISHED" and key not in finished:
            finished[key] = run
    first_round = sorted({int(s) for s in info["seeds_used"]})
    seeds = sorted(set(first_round) | {s for _, s in finished})
    if mode == UNTIL_DECIDED:
        expected = {(v, s) for v in variants for s in first_round} | exists
    else:
        expected = {(v, s) for v in variants for s in sorted(set(seeds) | {s for _, s in exists})}
    missing = [f"{v}/seed{s}" for s in sorted({s for _, s in expected}) for v in variants
               if (v, s) in expected and (v, s) not in finished]

    all_keys = {k for run in finished.values() for k in run.data.metrics}
    columns = [metric_key(m, all_keys) or m for m in spec["metrics"]]
    primary = metric_key(spec["primary"], all_keys) or spec["primary"]
    min_effect = {c: float(spec.get("min_effect", {})[m]) for m, c in zip(spec["metrics"], columns)
                  if m in (spec.get("min_effect") or {})}
    runs: Dict[str, Dict[int, Any]] = {v: {s: finished[(v, s)] for s in seeds if (v, s) in finished}
                                       for v in variants}

    base_gmacs = None
    if runs[baseline]:
        base_gmacs = _float(next(iter(runs[baseline].values())).data.params, "model.gmacs")
    rows: Dict[str, Row] = {}
    for v in variants:
        found = sorted(runs[v].items())
        row = Row(variant=v, is_baseline=v == baseline, seeds=[s for s, _ in found], paper=papers.get(v),
                  run_ids=[r.info.run_id for _, r in found])
        if found:
            params = found[0][1].data.params
            p = _float(params, "model.params")
            row.params = None if p is None else int(p)
            row.gmacs = _float(params, "model.gmacs")
            row.knob = params.get("model.match_knob")
            row.knob_value = _float(params, "model.match_value")
            if row.gmacs is not None and base_gmacs:
                row.rel_gmacs = (row.gmacs - base_gmacs) / base_gmacs
            for m in columns:
                stat = summarize([r.data.metrics[m] for _, r in found if m in r.data.metrics])
                if stat is not None:
                    row.metrics[m] = stat
            row.wall_time_s = summarize([r.data.metrics.get("train.wall_time_s") for _, r in found])
            row.loss_history = {s: h for s, r in found if (h := loss_history(client, r.info.run_id))}
            row.sample_grid = sample_grid(client, found)
        rows[v] = row
    if mode == UNTIL_DECIDED:
        _anytime_verdicts(rows, runs, baseline, columns, primary, max_seeds=max_seeds)
    else:
        _fixed_verdicts(rows, runs, baseline, columns, primary, holm_correction=multiple != "none",
                        min_effect=min_effect)

    sign = 1.0 if lower_is_better(primary) else -1.0
    ordered = sorted(rows.values(), key=lambda r: (primary not in r.metrics,
                                                   sign * r.metrics[primary].mean if primary in r.metrics else 0.0))
    report = Report(run_id=run_id, study=spec["name"], description=spec.get("description", ""),
                    status=parent.info.status, baseline=baseline, primary=primary, metrics=columns, rows=ordered,
                    seeds=len(seeds), steps=info.get("steps"), missing=missing, mode=mode,
                    multiple_comparisons=multiple, max_seeds=max_seeds if mode == UNTIL_DECIDED else None,
                    min_effect=min_effect)
    with_fid = [v for v in variants if (papers.get(v) or {}).get("fid") is not None]
    if against_paper and len(with_fid) < 3:
        raise UserError(f"study {spec['name']!r} gives the paper's FID for {len(with_fid)} variant(s) "
                        f"({', '.join(with_fid) or 'none'}); --against-paper needs at least 3 (paper = {{ fid = ... }})")
    if against_paper or (against_paper is None and len(with_fid) == len(variants) >= 3):

        report.paper_comparison = report_against_paper(report)
    return report


def study_report(run_id: str, uri: str | None = None, against_paper: Optional[bool] = None):
    """The report of a study's parent run, rebuilt from MLflow: a scaling study's (tag kind=scaling,
    studies/scaling_report.py) or an ablation study's (build_report)."""
    client = get_client(uri, existing=True)
    parent = get_run(run_id, client=client)
    if parent.data.tags.get("kind") != "scaling":
        return build_report(run_id, uri, against_paper=against_paper, parent=parent)
    if against_paper:
        raise UserError(f"--against-paper compares an ablation study with the paper's table; run {run_id} "
                        "is a scaling study")
    return build_scaling_report(client, parent, read_study_file(client, run_id))


def report_command(run_id: str, uri: str | None = None, out_dir=None, console=None,
                   against_paper: Optional[bool] = None) -> tuple[Any, Dict[str, Path]]:
    """The `fcdm-lab report RUN_ID` library function: rebuild an ablation or scaling study's report from
    MLflow, print its tables, write its files (default reports/<study>-<run id>/) and log them again."""
    report = study_report(run_id, uri, against_paper=against_paper)
    console = console or output_console()
    report.print(console)
    folder = Path(out_dir) if out_dir is not None else Path("reports") / f"{report.study}-{run_id[:8]}"
    paths = report.write(folder)
    report.log(attach_run(run_id, uri), paths)  # the files just written, not rendered again
    console.print(f"{report_files_line(paths)}\n  logged again to run {run_id}", highlight=False, soft_wrap=True)
    return report, paths


"""A study's results against the paper's ablation table (`fcdm-lab report RUN_ID --against-paper`).

    cmp = compare_with_paper(values, paper_fid, verdicts, baseline="default", lower_is_better=True)
    cmp.rho, cmp.low, cmp.high     # Spearman rank correlation of the variants' means with the paper's
                                   # FIDs, and its 95% bootstrap interval over seeds
    cmp.rows                       # per variant: the paper's FID change next to our verdict

The question is the ordering: does the study rank the variants as the paper's FID column does
(rho = +1: the same order, -1: reversed)? Our metric is a proxy FID at a tiny scale, so only ranks
are compared, never values. A metric where higher is better (class accuracy) is negated first, so
+1 still means "agrees with the paper".

The interval resamples each variant's seeds with replacement, independently per variant (scipy's
`stats.bootstrap` with paired=False), recomputes the means and rho, and takes the percentile
interval: it shows how much the ordering depends on which seeds were drawn. It needs at least two
seeds per variant; with one, there is a rho and no interval.

Pure functions of numbers (no MLflow), so they are tested on synthetic results with a known order.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from ..eval.metrics import finite_number, lower_is_better
from .verdicts import BETTER, CONFIDENCE, WORSE

N_BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0


@dataclass
class PaperRow:
    """One variant: the paper's FID and its change against the paper's baseline, next to ours."""

    variant: str
    paper_fid: float
    paper_delta: float                 # paper FID - paper baseline FID (+: the paper finds it worse)
    mean: Optional[float]              # our metric's mean over seeds
    n: int                             # our seeds with a result
    verdict: str                       # ours against our baseline (verdicts.py), "baseline" for it
    agrees: Optional[bool] = None      # our verdict's direction equals the paper's; None: no verdict

    def agreement(self) -> str:
        return {True: "agrees", False: "disagrees", None: "-"}[self.agrees]


@dataclass
class PaperComparison:
    metric: str
    rho: Optional[float]                  # Spearman rank correlation (None: fewer than 3 variants / constant)
    low: Optional[float] = None           # bootstrap interval (None: a variant has < 2 seeds)
    high: Optional[float] = None
    n_bootstrap: int = 0
    rows: List[PaperRow] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)   # variants without a paper FID or without results

    def summary(self) -> str:
        """One line: 'Spearman rho vs the paper's FID: +0.64 [95% bootstrap over seeds: +0.21, +0.89]; ...'."""
        if self.rho is None:
            return f"Spearman rho vs the paper's FID: not defined ({len(self.rows)} variants with results)"
        text = f"Spearman rank correlation of {self.metric} with the paper's FID: {self.rho:+.2f}"
        if self.low is not None:
            text += (f" [{CONFIDENCE:.0%} bootstrap interval over seeds: {self.low:+.2f}, {self.high:+.2f}; "
                     f"{self.n_bootstrap} resamples]")
        else:
            text += " (no interval: needs >= 2 seeds per variant)"
        agree = sum(r.agrees is True for r in self.rows)
        decided = sum(r.agrees is not None for r in self.rows)
        text += f"; verdicts agreeing with the paper's direction: {agree} of {decided} decided"
        if self.skipped:
            text += f"; left out: {', '.join(self.skipped)}"
        return text

    def header(self) -> List[str]:
        return ["variant", "paper FID", "paper Δ FID", f"{self.metric} (mean)", "n", "our verdict", "vs paper"]

    def cells(self) -> List[List[str]]:
        return [[r.variant, f"{r.paper_fid:g}", "-" if r.verdict == "baseline" else f"{r.paper_delta:+.2f}",
                 "-" if r.mean is None else f"{r.mean:.4g}", str(r.n), r.verdict, r.agreement()] for r in self.rows]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header()) + " |", "|" + "---|" * len(self.header())]
        lines += ["| " + " | ".join(c) + " |" for c in self.cells()]
        return self.summary() + "\n\n" + "\n".join(lines) + "\n"

    def metrics(self) -> Dict[str, float]:
        """For the parent run: paper.spearman (+ _low/_high)."""
        out = {} if self.rho is None else {"paper.spearman": self.rho}
        if self.low is not None:
            out.update({"paper.spearman_low": self.low, "paper.spearman_high": self.high})
        return out


def _finite(values: Sequence[Optional[float]]) -> List[float]:
    return [float(v) for v in values if finite_number(v)]


def spearman(ours: Sequence[float], paper: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation (ties get average ranks); None when undefined (n < 3 or a constant)."""
    if len(ours) < 3 or len(set(ours)) < 2 or len(set(paper)) < 2:
        return None
    from scipy import stats

    return float(stats.spearmanr(ours, paper).statistic)


def bootstrap_spearman(values: Sequence[Sequence[float]], paper: Sequence[float], *, n_resamples: int = N_BOOTSTRAP,
                       seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> Optional[tuple[float, float]]:
    """Percentile interval of Spearman(mean of each variant's seeds, paper) when each variant's seeds
    are resampled with replacement independently; None if a variant has fewer than 2 seeds."""
    if any(len(v) < 2 for v in values) or len(values) < 3:
        return None
    import numpy as np
    from scipy import stats

    def statistic(*samples):
        rho = spearman([float(np.mean(s)) for s in samples], paper)
        return np.nan if rho is None else rho  # a resample with tied means everywhere: undefined

    with warnings.catch_warnings():  # degenerate resamples (all rho equal) warn; the interval is still right
        warnings.simplefilter("ignore")
        res = stats.bootstrap([np.asarray(v, dtype=float) for v in values], statistic, paired=False,
                              vectorized=False, n_resamples=n_resamples, confidence_level=confidence,
                              method="percentile", random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return low, high


def compare_with_paper(values: Mapping[str, Sequence[Optional[float]]], paper_fid: Mapping[str, float],
                       verdicts: Mapping[str, str], *, baseline: str, lower_is_better: bool = True,
                       metric: str = "primary", n_resamples: int = N_BOOTSTRAP,
                       seed: int = BOOTSTRAP_SEED) -> PaperComparison:
    """Our per-seed values per variant (study order) against the paper's FID per variant.

    values: variant -> per-seed metric values (None / nan = no result); paper_fid: variant -> the
    paper's FID (variants without one are left out); verdicts: variant -> our verdict against our
    baseline (verdicts.py: better | worse | inconclusive | n=1: no error bar)."""
    rows: List[PaperRow] = []
    skipped: List[str] = []
    samples: List[List[float]] = []
    base_fid = paper_fid.get(baseline)
    for name, vals in values.items():
        vals = _finite(vals)
        if name not in paper_fid or not vals:
            skipped.append(name)
            continue
        fid = float(paper_fid[name])
        delta = 0.0 if base_fid is None else fid - float(base_fid)
        verdict = "baseline" if name == baseline else verdicts.get(name, "-")
        agrees = None
        if verdict in (BETTER, WORSE) and delta != 0:
            paper_worse = delta > 0  # FID: higher is worse
            agrees = (verdict == WORSE) == paper_worse
        rows.append(PaperRow(name, fid, delta, sum(vals) / len(vals), len(vals), verdict, agrees))
        samples.append(vals if lower_is_better else [-v for v in vals])
    paper = [r.paper_fid for r in rows]
    rho = spearman([sum(s) / len(s) for s in samples], paper)
    cmp = PaperComparison(metric, rho, rows=rows, skipped=skipped)
    if rho is not None:
        interval = bootstrap_spearman(samples, paper, n_resamples=n_resamples, seed=seed)
        if interval is not None:
            cmp.low, cmp.high = interval
            cmp.n_bootstrap = n_resamples
    return cmp


def paper_metric(report) -> str:
    """The study metric set against the paper's column: the paper's table reports FID, so the study's
    first FID-like metric (fid_*) where it has one, else its primary (a study judged on val_loss still
    compares its FID ordering with the paper's)."""
    return next((m for m in report.metrics if m.startswith("fid")), report.primary)


def report_against_paper(report) -> PaperComparison:
    """The comparison for a study report (report.Report): paper_metric's per-seed values, the paper's
    FIDs from the study file's `paper` rows, and the report's verdicts on that metric."""
    metric = paper_metric(report)
    values = {r.variant: list(r.metrics[metric].values) if metric in r.metrics else [] for r in report.rows}
    paper_fid = {r.variant: r.paper["fid"] for r in report.rows if r.paper and "fid" in r.paper}
    verdicts = {r.variant: r.verdicts[metric].verdict for r in report.rows if metric in r.verdicts}
    return compare_with_paper(values, paper_fid, verdicts, baseline=report.baseline,
                              lower_is_better=lower_is_better(metric), metric=metric)


__all__ = ["PaperComparison", "PaperRow", "bootstrap_spearman", "compare_with_paper", "paper_metric",
           "report_against_paper", "spearman"]

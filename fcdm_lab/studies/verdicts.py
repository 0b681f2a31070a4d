"""Verdicts over training seeds: is a variant's difference to the baseline a result or noise?

    v = paired_verdict(variant_values, baseline_values, lower_is_better=True)   # same seeds, same order
    v.verdict        # "better" | "worse" | "inconclusive" | "n=1: no error bar"
    v.seeds_needed   # for "inconclusive": seeds a paired t-test needs to resolve v.diff.mean at 80% power

Pure functions of numbers (no MLflow, no torch), shared by the study table, the markdown report, the
parent run's metrics/tags and `fcdm-lab report`. Seeds are paired: variants trained with the same
seed see the same data order, diffusion noise and evaluation noise, so the per-seed difference
cancels most of the seed-to-seed spread ("The FID Lottery": retraining moves FID ~3x more than
resampling; report error bars over training seeds).

scipy comes with scikit-learn (a dependency): scipy.stats.t gives the Student-t quantiles of the
intervals and scipy.stats.nct the noncentral t of the power calculation. The search over n for
the power target is hand-written (a few lines) because scipy has no sample-size solver and
statsmodels is not a dependency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

CONFIDENCE = 0.95
POWER = 0.80
MAX_SEEDS = 10_000           # "more than this" is reported as such
BETTER, WORSE, INCONCLUSIVE, NO_ERROR_BAR = "better", "worse", "inconclusive", "n=1: no error bar"


@dataclass
class Stat:
    """Mean, sample sd and the 95% t-interval half-width of one quantity over seeds (n = 1: no sd,
    no interval)."""

    mean: float
    half: Optional[float]
    n: int
    values: List[float]
    sd: Optional[float] = None

    @property
    def low(self) -> Optional[float]:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> Optional[float]:
        return None if self.half is None else self.mean + self.half

    def fmt(self, signed: bool = False) -> str:
        """'0.7853' for one seed; '0.785 ± 0.041' for several: the mean to one digit past the
        interval's first significant digit (more digits would be noise)."""
        sign = "+" if signed else ""
        if self.half is None or not math.isfinite(self.half):
            return f"{self.mean:{sign}.4g}"
        if self.half == 0:
            return f"{self.mean:{sign}.4g} ± 0"
        decimals = max(0, 1 - math.floor(math.log10(self.half)))
        return f"{self.mean:{sign}.{decimals}f} ± {self.half:.{decimals}f}"


def summarize(values: Sequence[Optional[float]], confidence: float = CONFIDENCE) -> Optional[Stat]:
    """Mean ± t-interval over the finite values (None when there are none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return Stat(mean, None, 1, vals)
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Stat(mean, half, n, vals, sd)


def paired_power(effect: float, sd_diff: float, n: int, alpha: float = 1 - CONFIDENCE) -> float:
    """Power of a two-sided paired t-test with n pairs to detect a true mean difference `effect`
    when the per-pair differences have standard deviation `sd_diff` (noncentral t)."""
    if n < 2:
        return 0.0
    if sd_diff <= 0:
        return 1.0 if effect != 0 else alpha
    from scipy import stats

    df, nc = n - 1, abs(effect) / sd_diff * math.sqrt(n)
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_for_power(effect: float, sd_diff: float, power: float = POWER, alpha: float = 1 - CONFIDENCE) -> Optional[int]:
    """Smallest number of paired seeds whose t-test reaches `power` for this effect and spread;
    None when the effect is 0 (no number of seeds resolves it) or it needs more than MAX_SEEDS."""
    if effect == 0 or not math.isfinite(effect) or not math.isfinite(sd_diff):
        return None
    if sd_diff <= 0:
        return 2
    # The normal approximation n = ((z_a + z_b) / d)^2 is a lower bound; walk up from it.
    from scipy import stats

    d = abs(effect) / sd_diff
    n = max(2, int(((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) / d) ** 2))
    while n <= MAX_SEEDS:
        if paired_power(effect, sd_diff, n, alpha) >= power:
            return n
        n += 1
    return None


@dataclass
class Verdict:
    """A variant against the baseline on one metric, over the seeds both finished."""

    diff: Optional[Stat]                 # per-seed variant - baseline
    verdict: str                         # BETTER | WORSE | INCONCLUSIVE | NO_ERROR_BAR | "-" (no pairs)
    seeds_needed: Optional[int] = None   # INCONCLUSIVE only: paired seeds for 80% power at the observed effect

    def fmt(self) -> str:
        """'+0.074 ± 0.24 inconclusive (~38 seeds)', '-0.12 ± 0.05 better', '+0.07 n=1: no error bar'."""
        if self.diff is None:
            return "-"
        text = f"{self.diff.fmt(signed=True)} {self.verdict}"
        if self.verdict == INCONCLUSIVE:
            if self.seeds_needed:
                text += f" (~{self.seeds_needed} seeds)"
            else:
                text += " (no difference)" if self.diff.mean == 0 else f" (> {MAX_SEEDS} seeds)"
        return text


def paired_verdict(variant: Sequence[Optional[float]], baseline: Sequence[Optional[float]], *,
                   lower_is_better: bool) -> Verdict:
    """Verdict from per-seed values in the same seed order (None where a seed has no result):
    better / worse when the 95% CI of the paired difference excludes 0, else inconclusive with
    the seeds a paired t-test would need; one pair has no error bar and no verdict."""
    diffs = [v - b for v, b in zip(variant, baseline)
             if v is not None and b is not None and math.isfinite(v) and math.isfinite(b)]
    diff = summarize(diffs)
    if diff is None:
        return Verdict(None, "-")
    if diff.n == 1:
        return Verdict(diff, NO_ERROR_BAR)
    if diff.low > 0 or diff.high < 0:
        smaller = diff.high < 0
        return Verdict(diff, BETTER if smaller == lower_is_better else WORSE)
    return Verdict(diff, INCONCLUSIVE, seeds_for_power(diff.mean, diff.sd))


__all__ = ["BETTER", "INCONCLUSIVE", "NO_ERROR_BAR", "Stat", "Verdict", "WORSE", "paired_power", "paired_verdict",
           "seeds_for_power", "summarize"]

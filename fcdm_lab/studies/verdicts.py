"""Verdicts over training seeds: is a variant's difference to the baseline a result or noise?

    vs = family_verdicts({"cca": (cca_values, grn_values), "k5": (k5_values, grn_values)},
                         lower_is_better=True, min_effect=0.05)   # same seeds, same order in each pair
    v = vs["cca"]
    v.verdict        # "better" | "worse" | "inconclusive" | "n=1: no error bar" | "-" (no pairs)
    v.p_value        # two-sided paired t-test, unadjusted
    v.p_adjusted     # Holm-adjusted over the variants tested on this metric; the verdict reads this one
    v.mde            # smallest true |difference| this many seeds detect with 80% power (see below)
    v.seeds_needed   # with min_effect: paired seeds needed to detect min_effect with 80% power
    v.fmt()          # '+0.012 ± 0.020 inconclusive (MDE 0.031)': a table cell
    v.describe()     # the same in a sentence, for reports

A study compares K variants with one baseline on each metric. Testing each comparison at 5% gives
a 1 - 0.95^K chance of at least one false "better"/"worse" per metric when nothing differs, so by
default the K comparisons of one metric are a family corrected with Holm-Bonferroni (the same
guarantee as Bonferroni, never less power). `paired_verdict` is the one-comparison case.

"Inconclusive" comes with the minimum detectable effect (MDE) at the current number of seeds: the
smallest true mean difference a two-sided paired t-test would detect with 80% power, given the
observed sd of the per-seed differences. It is computed at the Bonferroni level alpha / K, the
level the strictest step of Holm (the smallest p-value) must meet, so it is the effect this
comparison detects whatever the other variants do. It replaces "seeds needed for 80% power at the
observed difference", which is post-hoc power: a function of the p-value alone that says nothing
new and reads like a promise. With an effect of interest stated in the study file (`min_effect`),
`seeds_needed` is the number of paired seeds that detect that effect with 80% power at the same
level, from the observed sd (a planning number: the sd itself is uncertain at a few seeds).

Pure functions of numbers (numpy/scipy only; no MLflow, no torch), shared by the study table, the
markdown report, the parent run's metrics/tags and `fcdm-lab report`. Seeds are paired: variants
trained with the same seed see the same data order, diffusion noise and evaluation noise, so the
per-seed difference cancels most of the seed-to-seed spread ("The FID Lottery": retraining moves
FID ~3x more than resampling; report error bars over training seeds). For studies that add seeds
in rounds and look after each one, use `sequential.py`: these fixed-n verdicts are only valid for
a number of seeds chosen in advance.

scipy comes with scikit-learn (a dependency): scipy.stats for the t quantiles, the paired t-test
and the noncentral t of the power calculation, scipy.optimize for the MDE. Holm and the search
over n for a power target are hand-written (a few lines each): scipy has only Benjamini-Hochberg
(scipy.stats.false_discovery_control) and no sample-size solver, and statsmodels is not a
dependency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

CONFIDENCE = 0.95
ALPHA = 0.05                 # = 1 - CONFIDENCE
POWER = 0.80
MAX_SEEDS = 10_000           # "more than this" is reported as such
BETTER, WORSE, INCONCLUSIVE, NO_ERROR_BAR = "better", "worse", "inconclusive", "n=1: no error bar"
NO_PAIRS = "-"


def _decimals(half: float) -> int:
    """Decimals that show a number to one digit past `half`'s first significant digit."""
    return max(0, 1 - math.floor(math.log10(half)))


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
        decimals = _decimals(self.half)
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


def holm(p_values: Sequence[float]) -> List[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: reject hypothesis i at family-wise
    level alpha when its adjusted p <= alpha.

    Sorted ascending, the j-th smallest p (j = 1..K) is multiplied by K - j + 1, capped at 1, and
    made non-decreasing along the sorted order (a running max), so a hypothesis is never rejected
    while a smaller p-value is not. Hand-written: scipy has only Benjamini-Hochberg."""
    k = len(p_values)
    order = sorted(range(k), key=lambda i: p_values[i])
    adjusted, running = [1.0] * k, 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (k - j) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_power(effect: float, sd_diff: float, n: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided paired t-test with n pairs to detect a true mean difference `effect`
    when the per-pair differences have standard deviation `sd_diff` (noncentral t)."""
    if n < 2:
        return 0.0
    if sd_diff <= 0:
        return 1.0 if effect != 0 else alpha
    from scipy import stats

    df, nc = n - 1, abs(effect) / sd_diff * math.sqrt(n)
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    # The lower tail P(T <= -crit) as sf(crit) at -nc: nct.cdf(-crit, df, nc) returns nan for
    # large nc at small df (scipy 1.17), where the tail is ~0 anyway.
    return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))


def seeds_for_power(effect: float, sd_diff: float, power: float = POWER, alpha: float = ALPHA) -> Optional[int]:
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


def minimum_detectable_effect(sd_diff: float, n: int, power: float = POWER, alpha: float = ALPHA) -> Optional[float]:
    """The smallest |true mean difference| that a two-sided paired t-test with n pairs at level
    `alpha` detects with probability `power`, when the differences have sd `sd_diff`: the root of
    paired_power(effect) = power (brentq on the standardized effect; power grows with it).
    None for n < 2 or a non-finite sd; 0 when sd is 0."""
    if n < 2 or sd_diff is None or not math.isfinite(sd_diff):
        return None
    if sd_diff <= 0:
        return 0.0
    from scipy import optimize

    def gap(d: float) -> float:
        return paired_power(d, 1.0, n, alpha) - power

    high = 1.0
    while gap(high) < 0:  # n = 2 at alpha / K needs d in the hundreds
        high *= 4
    return float(optimize.brentq(gap, 0.0, high, xtol=1e-10)) * sd_diff


@dataclass
class Verdict:
    """A variant against the baseline on one metric, over the seeds both finished."""

    diff: Optional[Stat]                   # per-seed variant - baseline: mean ± 95% t half-width (unadjusted)
    verdict: str                           # BETTER | WORSE | INCONCLUSIVE | NO_ERROR_BAR | NO_PAIRS
    p_value: Optional[float] = None        # two-sided paired t-test, unadjusted (n >= 2)
    p_adjusted: Optional[float] = None     # Holm over the family; the verdict compares it with alpha
    family_size: int = 1                   # comparisons in the family (tested variants on this metric)
    alpha: float = ALPHA                   # family-wise level
    mde: Optional[float] = None            # min detectable |effect| at n, 80% power, level alpha / family_size
    min_effect: Optional[float] = None     # the effect of interest, when the study states one
    seeds_needed: Optional[int] = None     # paired seeds to detect min_effect (80% power, same level);
    #                                        None without min_effect, when decided, or above MAX_SEEDS

    @property
    def level(self) -> float:
        """The Bonferroni level alpha / K at which `mde` and `seeds_needed` are computed."""
        return self.alpha / max(1, self.family_size)

    @property
    def holm_changed(self) -> bool:
        """True when the unadjusted test alone would have decided but Holm leaves it inconclusive."""
        return (self.verdict == INCONCLUSIVE and self.p_value is not None and self.p_value <= self.alpha)

    def _num(self, x: float) -> str:
        """A number at the decimals of the difference's interval (MDE next to '± 0.020' as 0.031)."""
        half = self.diff.half if self.diff is not None else None
        if half and math.isfinite(half) and x != 0:
            return f"{x:.{_decimals(half)}f}"
        return f"{x:.2g}"

    def fmt(self) -> str:
        """A short table cell: '-0.0021 ± 0.0009 better', '+0.012 ± 0.020 inconclusive (MDE 0.031)',
        '-0.065 ± 0.049 inconclusive (Holm p=0.075)' when only the correction for the K variants
        keeps it undecided (its own 95% CI excludes 0; the MDE is in describe()), '+0.07 n=1: no
        error bar', '-' without pairs."""
        if self.diff is None:
            return NO_PAIRS
        text = f"{self.diff.fmt(signed=True)} {self.verdict}"
        if self.holm_changed:
            text += f" (Holm p={self.p_adjusted:.2g})"
        elif self.verdict == INCONCLUSIVE and self.mde is not None:
            text += f" (MDE {self._num(self.mde)})"
        return text

    def describe(self) -> str:
        """One or two sentences for reports: the interval, the test, the correction, the MDE and,
        with an effect of interest, the seeds it needs."""
        if self.diff is None:
            return "no paired seeds"
        d = self.diff
        if d.n == 1:
            return f"difference {d.fmt(signed=True)} from 1 paired seed: no error bar, no verdict"
        text = (f"difference {d.fmt(signed=True)} (95% t-interval, n={d.n} paired seeds): {self.verdict}; "
                f"paired t-test p={self.p_value:.2g}")
        if self.family_size > 1:
            text += f", Holm-adjusted p={self.p_adjusted:.2g} over {self.family_size} variants"
        text += f" (alpha {self.alpha:g})"
        if self.mde is not None:
            text += (f"; at n={d.n} a paired t-test at level {self.level:.3g} detects a true difference of "
                     f"{self._num(self.mde)} with {POWER:.0%} power (MDE)")
        if self.min_effect is not None:
            need = f"{self.seeds_needed} paired seeds" if self.seeds_needed else f"more than {MAX_SEEDS} paired seeds"
            text += f"; the effect of interest {self._num(abs(self.min_effect))} needs {need} at that level and power"
        return text


def _diffs(variant: Sequence[Optional[float]], baseline: Sequence[Optional[float]]) -> List[float]:
    """Per-seed variant - baseline over the seeds where both are finite."""
    return [v - b for v, b in zip(variant, baseline)
            if v is not None and b is not None and math.isfinite(v) and math.isfinite(b)]


def _p_value(diff: Stat) -> float:
    """Two-sided paired t-test: the differences' t statistic against 0 on n - 1 degrees of freedom
    (what scipy.stats.ttest_rel returns, from the mean and sd already at hand, without its
    precision-loss warning when the differences are nearly identical)."""
    if diff.sd == 0:  # no spread: any nonzero mean is certain
        return 1.0 if diff.mean == 0 else 0.0
    from scipy import stats

    t = diff.mean / (diff.sd / math.sqrt(diff.n))
    return float(2 * stats.t.sf(abs(t), diff.n - 1))


def family_verdicts(pairs: Mapping[str, Tuple[Sequence[Optional[float]], Sequence[Optional[float]]]], *,
                    lower_is_better: bool, holm_correction: bool = True, alpha: float = ALPHA,
                    min_effect: Optional[float] = None) -> Dict[str, Verdict]:
    """Verdicts of K variants against one baseline on one metric.

    pairs: variant -> (variant values, baseline values), per seed in the same seed order (None or
    nan where a seed has no result). The family is the variants with at least 2 pairs (the ones
    that get a test); with `holm_correction` (the default) their paired t-test p-values are
    Holm-adjusted over it, else the adjusted p is the raw one and the family size is 1.
    A variant is better / worse (by the sign of the mean difference and `lower_is_better`) when
    its adjusted p <= alpha, else inconclusive with the MDE (and seeds for `min_effect`, given)
    at level alpha / K; one pair: NO_ERROR_BAR; none: NO_PAIRS ("-")."""
    stats_ = {name: summarize(_diffs(v, b)) for name, (v, b) in pairs.items()}
    tested = [name for name, d in stats_.items() if d is not None and d.n >= 2]
    raw = {name: _p_value(stats_[name]) for name in tested}
    adjusted = dict(zip(tested, holm([raw[n] for n in tested]))) if holm_correction else raw
    k = len(tested) if holm_correction else 1
    out: Dict[str, Verdict] = {}
    for name, d in stats_.items():
        if d is None:
            out[name] = Verdict(None, NO_PAIRS, family_size=k, alpha=alpha)
        elif d.n == 1:
            out[name] = Verdict(d, NO_ERROR_BAR, family_size=k, alpha=alpha)
        else:
            v = Verdict(d, INCONCLUSIVE, raw[name], adjusted[name], k, alpha, min_effect=min_effect)
            if v.p_adjusted <= alpha and d.mean != 0:
                v.verdict = BETTER if (d.mean < 0) == lower_is_better else WORSE
            else:
                v.mde = minimum_detectable_effect(d.sd, d.n, alpha=v.level)
                if min_effect is not None:
                    v.seeds_needed = seeds_for_power(min_effect, d.sd, alpha=v.level)
            out[name] = v
    return out


def paired_verdict(variant: Sequence[Optional[float]], baseline: Sequence[Optional[float]], *,
                   lower_is_better: bool, alpha: float = ALPHA, min_effect: Optional[float] = None) -> Verdict:
    """One comparison on its own (a family of 1): better / worse when the paired t-test's p <=
    alpha, i.e. when the 95% CI of the paired difference excludes 0; else inconclusive with the
    MDE; one pair has no error bar and no verdict. With several variants use `family_verdicts`."""
    return family_verdicts({"variant": (variant, baseline)}, lower_is_better=lower_is_better, alpha=alpha,
                           min_effect=min_effect)["variant"]


__all__ = ["ALPHA", "BETTER", "INCONCLUSIVE", "NO_ERROR_BAR", "NO_PAIRS", "Stat", "Verdict", "WORSE",
           "family_verdicts", "holm", "minimum_detectable_effect", "paired_power", "paired_verdict",
           "seeds_for_power", "summarize"]

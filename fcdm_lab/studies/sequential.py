"""Seeds added in rounds until the answer is decided, with verdicts that stay valid however often
you look.

    vs = sequential_verdicts({"cca": [0.03, -0.02, 0.05], "k5": [-0.4, -0.5, -0.3]},   # per-seed variant - baseline
                             lower_is_better=True, max_seeds=20)
    vs["k5"].decided, vs["k5"].verdict, (vs["k5"].low, vs["k5"].high), vs["k5"].reason
    needs_more_seeds(vs)      # ["cca", "k5"] while undecided below max_seeds: train their next seed(s)

A study of K variants against one baseline starts with 2-3 paired seeds per variant, looks at the
verdicts, gives another seed (or several) to the variants still undecided, and so on up to
`max_seeds`. A decided variant gets no more seeds. Re-testing a fixed-n 95% t-interval after every
round is not valid: each look is another chance for noise to cross. Looking after every seed
from 3 to 20, a variant with no effect is called "better"/"worse" in ~24% of studies, a study of
three such variants has a false verdict in ~54%, and ~26% even with the t-tests at Bonferroni's
alpha / 3 (simulated in tests/test_sequential.py; this module: ~2.4%).

Method: a confidence sequence for the mean of Gaussian differences with unknown variance, from
the scale-invariant t-mixture martingale (Lai 1976, "On confidence sequences", Ann. Statist.;
the "safe t-test" of Grünwald, de Heide & Koolen 2024 and Pérez-Ortiz, Lardy, de Heide &
Grünwald 2024; the same statistic as Lindon et al. 2024's anytime-valid regression t-test).
For a hypothesised mean mu0, with n differences, their mean m and sum of squared deviations SS:

    E_n(mu0) = sqrt(r) * ((1 + x) / (1 + r x)) ** (n / 2),    x = n (m - mu0)^2 / SS,  r = 1 / (1 + n g)

the Bayes factor of "standardized effect (mu - mu0) / sigma ~ N(0, g)" against "mean = mu0" with
the scale-invariant (right Haar, 1/sigma) prior on the unknown sd (Rouder et al. 2009's one-sample
Bayes factor at a fixed g). Under mean = mu0 it is a nonnegative martingale with E = 1 for every
sigma (it is the likelihood ratio of the scale-invariant statistics x_2/|x_1|, ...), so Ville's
inequality gives P(E_n(mu0) >= 1/alpha for some n) <= alpha: exact for Gaussian differences at
every n from 2 on, with no asymptotics and no plug-in variance. The set {mu0 : E_n(mu0) < 1/alpha}
is then an interval around m that covers the true mean at all n simultaneously:

    |m - mu0| < sqrt(SS / n * (1 - a) / (a - r)),    a = (r alpha^2) ** (1 / n)   (unbounded while a <= r)

and a variant is decided (better / worse by the sign) once an interval excludes 0, the same as
"E_n(0) >= 1/alpha" (anytime-valid p-value 1 / max E_n(0) <= alpha). Because the guarantee holds
over all n at once, the verdict may use every prefix of the seeds (the intervals are intersected
and the p-value is a running minimum): the rounds a researcher happened to look at do not matter.

Why this and not the alternatives: validity at small n with unknown variance comes first, and
this holds exactly from n = 2, for any schedule of looks, any number of rounds and any stopping
rule, without planning the looks. A group-sequential design (alpha spending, e.g. O'Brien-Fleming)
has more power at a fixed final n but needs the looks planned in advance and its boundaries
assume a known variance (their t versions are approximations, poor at 3-10 seeds). confseq's
confidence sequences are for bounded observations or need the variance; `expectation` needs
Python >= 3.12; savvi implements the same t-mixture but one observation at a time through a
regression object (with cvxpy as a dependency), too slow to simulate thousands of studies. The
closed forms above are a few lines, written by hand.

Power: g, the prior variance of the standardized effect, is fixed in advance (`prior_sd` = 2,
g = 4): simulated over effects of 0.5-3 sd of the paired differences with K = 3 variants and up
to 20 seeds, it decides about as early as any g in 1..8 (an effect of 1.5 sd: 99% decided by 20
seeds, ~10 seeds on average; 3 sd: ~6; 1 sd: ~70% decided by 20). The price of validity: no
interval is finite before n = 4 seeds (5 at alpha / 10: the martingale cannot reach 1/alpha
sooner), and reaching 80% power takes ~1.6x the seeds of a fixed-n t-test planned for the effect
at the same level (13 vs 8 seeds at 1.5 sd, 23 vs 14 at 1 sd, K = 3), which cannot stop early.

Multiplicity over the K variants: Bonferroni, each variant's sequence at level alpha / K. The K
intervals then hold simultaneously at all times (probability >= 1 - alpha), whatever the
dependence between variants (they share the baseline's seeds), so every false "better"/"worse"
including a wrong direction is covered, and a verdict is exactly "its interval excludes 0", as
in the table. Holm on the anytime-valid p-values would also be valid (Holm is monotone and the
running-minimum p-values only fall), but it gives no intervals to show with the verdict, and with
a few variants its gain is small: alpha enters the boundary only through log(1 / alpha), so alpha/3
instead of alpha/2 costs log 1.5 = 0.4 in log E_n. K must be the number of variants planned for the
study: keep decided variants in the dict (their seeds stop growing; their verdict stays).

Assumptions to keep: the per-seed differences are independent and roughly Gaussian, and seeds are
used in a fixed order (seed k's result does not depend on when you look; never drop or reorder
seeds after seeing them). Pure numbers (numpy only); the array functions take differences along
the last axis and vectorise over the leading ones (the tests simulate thousands of studies).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

ALPHA = 0.05
PRIOR_SD = 2.0            # sd of the N(0, g) mixture over the standardized effect: g = PRIOR_SD ** 2
BETTER, WORSE, INCONCLUSIVE = "better", "worse", "inconclusive"   # the same words as verdicts.py


def _prefix_stats(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n, mean and sum of squared deviations of every prefix x[..., :n] along the last axis
    (sums shifted by the first value so that SS keeps its precision)."""
    x = np.asarray(x, dtype=float)
    n = np.arange(1, x.shape[-1] + 1, dtype=float)
    y = x - x[..., :1]
    mean_y = np.cumsum(y, axis=-1) / n
    ss = np.maximum(np.cumsum(y * y, axis=-1) - n * mean_y ** 2, 0.0)
    return n, mean_y + x[..., :1], ss


def log_e_value(x: np.ndarray, mu0: float = 0.0, prior_sd: float = PRIOR_SD) -> np.ndarray:
    """log E_n(mu0) for every prefix n = 1..N of the differences x[..., :N] (module docstring):
    the t-mixture martingale against "mean = mu0". E_1 = 1 (one value carries no scale)."""
    n, mean, ss = _prefix_stats(x)
    r = 1.0 / (1.0 + n * prior_sd ** 2)
    dev2 = n * (mean - mu0) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        q = dev2 / ss                                      # t^2 / (n - 1)
    q = np.where(ss > 0, q, np.where(dev2 > 0, np.inf, 0.0))
    # log((1 + q) / (1 + r q)), with its limit log(1 / r) for identical values away from mu0
    ratio = np.where(np.isinf(q), -np.log(r), np.log1p(np.where(np.isinf(q), 0.0, q))
                     - np.log1p(r * np.where(np.isinf(q), 0.0, q)))
    out = 0.5 * np.log(r) + 0.5 * n * ratio
    out[..., 0] = 0.0
    return out


def confidence_sequence(x: np.ndarray, alpha: float = ALPHA, prior_sd: float = PRIOR_SD,
                        intersect: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(low, high) of the level-(1 - alpha) confidence sequence for the mean after every prefix
    n = 1..N of x[..., :N]: -inf/+inf while unbounded (n < 4 at the usual levels). With
    `intersect`, the running intersection over the prefixes (still valid, never wider)."""
    n, mean, ss = _prefix_stats(x)
    r = 1.0 / (1.0 + n * prior_sd ** 2)
    a = (r * alpha ** 2) ** (1.0 / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        half = np.sqrt(ss / n * (1.0 - a) / (a - r))
    half = np.where(a > r, half, np.inf)
    low, high = mean - half, mean + half
    if intersect:
        low, high = np.maximum.accumulate(low, axis=-1), np.minimum.accumulate(high, axis=-1)
    return low, high


def first_decision(x: np.ndarray, alpha: float = ALPHA, prior_sd: float = PRIOR_SD) -> np.ndarray:
    """The number of seeds n at which E_n(0) first reaches 1 / alpha (the level-alpha sequence
    first excludes 0), 0 where it never does within x[..., :N]."""
    crossed = log_e_value(x, 0.0, prior_sd) >= math.log(1.0 / alpha)
    return np.where(crossed.any(axis=-1), crossed.argmax(axis=-1) + 1, 0)


@dataclass
class SequentialVerdict:
    """One variant's anytime-valid verdict against the baseline after the seeds so far."""

    n: int                      # paired seeds used
    mean: Optional[float]       # mean difference (variant - baseline); None without seeds
    low: float                  # anytime-valid interval for the mean difference at level alpha / K
    high: float                 #   (running intersection; -inf / +inf while unbounded)
    p_value: float              # anytime-valid p-value of "no difference", Bonferroni-adjusted (K x, capped at 1)
    decided: bool               # the interval excludes 0: the verdict is final, no more seeds
    verdict: str                # BETTER | WORSE | INCONCLUSIVE
    decided_at: Optional[int]   # seeds at which it was decided
    more_seeds: bool            # undecided and n < max_seeds: give it another round
    reason: str                 # "decided at n=7", "undecided at n=3 of 20", "undecided at max seeds (20)"

    def fmt(self) -> str:
        """A short cell: '-0.31 [-0.59, -0.02] better: decided at n=7', '-0.08 [-0.49, 0.34]
        inconclusive: undecided at n=5 of 20', '- : no seeds yet'."""
        if self.mean is None:
            return f"- : {self.reason}"
        width = self.high - self.low
        dec = max(0, 1 - math.floor(math.log10(width / 2))) if math.isfinite(width) and width > 0 else 3
        num = (lambda v: f"{v:.{dec}f}" if math.isfinite(v) else ("-inf" if v < 0 else "inf"))
        return f"{self.mean:+.{dec}f} [{num(self.low)}, {num(self.high)}] {self.verdict}: {self.reason}"


def sequential_verdicts(diffs: Mapping[str, Sequence[Optional[float]]], *, lower_is_better: bool,
                        alpha: float = ALPHA, max_seeds: int = 20, family_size: Optional[int] = None,
                        prior_sd: float = PRIOR_SD) -> Dict[str, SequentialVerdict]:
    """Anytime-valid verdicts for K variants on the primary metric.

    diffs: variant -> its per-seed paired differences (variant - baseline) so far, in seed order
    (None / nan entries are skipped). family_size: K, the number of variants planned (default:
    len(diffs)); each variant is judged at level alpha / K. A variant is decided (better / worse
    by the sign and `lower_is_better`) once its confidence sequence has excluded 0 at some prefix
    of its seeds; otherwise inconclusive, with `more_seeds` until it has `max_seeds` seeds."""
    k = family_size or len(diffs)
    level = alpha / max(1, k)
    out: Dict[str, SequentialVerdict] = {}
    for name, values in diffs.items():
        x = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))])
        n = len(x)
        if n == 0:
            out[name] = SequentialVerdict(0, None, -math.inf, math.inf, 1.0, False, INCONCLUSIVE, None,
                                          max_seeds > 0, "no seeds yet")
            continue
        low, high = (float(v[-1]) for v in confidence_sequence(x, level, prior_sd))
        if low > high:  # intervals that cannot all hold (probability <= alpha / K): show the latest alone
            low, high = (float(v[-1]) for v in confidence_sequence(x, level, prior_sd, intersect=False))
        log_e = log_e_value(x, 0.0, prior_sd)
        p = min(1.0, k * math.exp(-float(log_e.max())))
        at = int(first_decision(x, level, prior_sd))
        mean = float(x.mean())
        if at:
            sign = float(x[:at].mean())  # the direction at the decision
            verdict = BETTER if (sign < 0) == lower_is_better else WORSE
            out[name] = SequentialVerdict(n, mean, low, high, p, True, verdict, at, False, f"decided at n={at}")
        else:
            more = n < max_seeds
            reason = f"undecided at n={n} of {max_seeds}" if more else f"undecided at max seeds ({max_seeds})"
            out[name] = SequentialVerdict(n, mean, low, high, p, False, INCONCLUSIVE, None, more, reason)
    return out


def needs_more_seeds(verdicts: Mapping[str, SequentialVerdict]) -> List[str]:
    """The variants to give another round of seeds: undecided and below max_seeds."""
    return [name for name, v in verdicts.items() if v.more_seeds]


__all__ = ["ALPHA", "BETTER", "INCONCLUSIVE", "PRIOR_SD", "SequentialVerdict", "WORSE", "confidence_sequence",
           "first_decision", "log_e_value", "needs_more_seeds", "sequential_verdicts"]

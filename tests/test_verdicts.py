"""Verdict statistics on synthetic paired data: a clear effect is better/worse, a null effect is
inconclusive with a seed count, one seed has no error bar; the power calculation against closed forms."""
import math

import numpy as np
import pytest
from scipy import stats

from fcdm_lab.studies.verdicts import (BETTER, INCONCLUSIVE, NO_ERROR_BAR, WORSE, paired_power, paired_verdict,
                                       seeds_for_power, summarize)


def test_summarize_matches_the_t_interval():
    values = [0.708, 0.777, 0.834, 0.543]  # issue 7's four grn seeds
    s = summarize(values)
    sd = np.std(values, ddof=1)
    assert s.n == 4 and s.mean == pytest.approx(np.mean(values)) and s.sd == pytest.approx(sd)
    assert s.half == pytest.approx(stats.t.ppf(0.975, 3) * sd / 2)
    one = summarize([0.5, None, float("nan")])
    assert one.n == 1 and one.half is None and one.fmt() == "0.5"
    assert summarize([]) is None


def test_clear_effect_is_better_or_worse_by_direction():
    rng = np.random.default_rng(0)
    seed_noise = rng.normal(0, 0.13, 4)           # shared by both variants of a seed (paired)
    base = 0.7 + seed_noise
    variant = base + 0.2 + rng.normal(0, 0.01, 4)  # a real +0.2 shift, far above the paired noise
    assert paired_verdict(variant, base, lower_is_better=True).verdict == WORSE
    assert paired_verdict(variant, base, lower_is_better=False).verdict == BETTER
    v = paired_verdict(base - 0.2, base, lower_is_better=True)
    assert v.verdict == BETTER and v.diff.mean == pytest.approx(-0.2) and v.seeds_needed is None


def test_null_effect_is_inconclusive_with_seeds_needed():
    # issue 7's measured pairs: CCA wins at two of four seeds; paired diff +0.07 in [-0.17, +0.31]
    grn = [0.708, 0.777, 0.834, 0.543]
    cca = [0.783, 0.678, 0.862, 0.811]
    v = paired_verdict(cca, grn, lower_is_better=True)
    assert v.verdict == INCONCLUSIVE
    assert v.diff.mean == pytest.approx(0.068, abs=1e-3)
    assert v.diff.low == pytest.approx(-0.17, abs=0.01) and v.diff.high == pytest.approx(0.31, abs=0.01)
    assert v.seeds_needed == seeds_for_power(v.diff.mean, v.diff.sd) and v.seeds_needed > 4
    assert "inconclusive (~" in v.fmt()
    rng = np.random.default_rng(1)
    base = rng.normal(0.7, 0.1, 5)
    assert paired_verdict(base + rng.normal(0, 0.05, 5), base, lower_is_better=True).verdict == INCONCLUSIVE


def test_one_seed_has_no_error_bar_and_missing_pairs_are_skipped():
    v = paired_verdict([0.78], [0.71], lower_is_better=True)
    assert v.verdict == NO_ERROR_BAR and v.diff.n == 1 and v.fmt() == "+0.07 n=1: no error bar"
    v = paired_verdict([0.78, None, 0.9], [0.71, 0.8, None], lower_is_better=True)
    assert v.diff.n == 1
    assert paired_verdict([None], [0.7], lower_is_better=True).fmt() == "-"


def test_power_against_closed_forms():
    # Cohen's d = effect / sd of the differences; standard paired t-test table (two-sided,
    # alpha 0.05, power 0.8): d = 1 -> 10 pairs, d = 0.8 -> 15, d = 0.5 -> 34.
    assert seeds_for_power(1.0, 1.0) == 10
    assert seeds_for_power(0.8, 1.0) == 15
    assert seeds_for_power(-0.05, 0.1) == 34  # sign does not matter
    # large n: the normal approximation ((z_.975 + z_.8) / d)^2 plus ~2 for the t distribution
    d = 0.1
    closed = ((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / d) ** 2
    assert closed <= seeds_for_power(d, 1.0) <= closed + 3
    n = seeds_for_power(0.3, 1.0)
    assert paired_power(0.3, 1.0, n) >= 0.8 > paired_power(0.3, 1.0, n - 1)
    # at zero effect the test rejects at its level
    assert paired_power(0.0, 1.0, 20) == pytest.approx(0.05, abs=1e-9)
    assert seeds_for_power(0.0, 1.0) is None and math.isfinite(paired_power(1, 1, 2))

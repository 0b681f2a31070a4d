"""Verdict statistics on synthetic paired data: a clear effect is better/worse, a null effect is
inconclusive with its minimum detectable effect, one seed has no error bar; Holm over a family of
variants against a hand computation; the power calculations against closed forms and scipy's
noncentral t."""
import math

import numpy as np
import pytest
from scipy import stats

from fcdm_lab.studies.verdicts import (BETTER, INCONCLUSIVE, NO_ERROR_BAR, WORSE, family_verdicts, holm,
                                       minimum_detectable_effect, paired_power, paired_verdict, seeds_for_power,
                                       summarize)


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


def test_null_effect_is_inconclusive_with_the_minimum_detectable_effect():
    # issue 7's measured pairs: CCA wins at two of four seeds; paired diff +0.07 in [-0.17, +0.31]
    grn = [0.708, 0.777, 0.834, 0.543]
    cca = [0.783, 0.678, 0.862, 0.811]
    v = paired_verdict(cca, grn, lower_is_better=True)
    assert v.verdict == INCONCLUSIVE
    assert v.diff.mean == pytest.approx(0.068, abs=1e-3)
    assert v.diff.low == pytest.approx(-0.17, abs=0.01) and v.diff.high == pytest.approx(0.31, abs=0.01)
    assert v.p_value == pytest.approx(stats.ttest_rel(cca, grn).pvalue) and v.p_adjusted == v.p_value
    # no post-hoc "seeds needed at the observed effect": the MDE at n=4 instead, and seeds only for a stated effect
    assert v.seeds_needed is None and v.mde == pytest.approx(minimum_detectable_effect(v.diff.sd, 4))
    assert v.mde > abs(v.diff.mean) and v.fmt() == f"+0.07 ± 0.24 inconclusive (MDE {v.mde:.2f})"
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


def test_holm_against_a_hand_computation():
    # K = 4, p = 0.01, 0.04, 0.03, 0.005. Sorted: 0.005, 0.01, 0.03, 0.04, multiplied by 4, 3, 2, 1:
    # 0.02, 0.03, 0.06, 0.04; a running max along that order keeps the last at 0.06. In input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])   # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def _family(holm_correction=True, **kw):
    base = [0.70, 0.75, 0.80, 0.65]
    diffs = {"a": [-0.10, -0.05, -0.08, -0.03],   # paired t-test p = 0.025 on its own
             "b": [0.05, -0.04, 0.02, -0.01],     # p = 0.81
             "c": [0.10, -0.20, 0.15, -0.02]}     # p = 0.93
    pairs = {k: ([b + x for b, x in zip(base, d)], base) for k, d in diffs.items()}
    return family_verdicts(pairs, lower_is_better=True, holm_correction=holm_correction, **kw)


def test_holm_makes_a_lone_significant_variant_of_three_inconclusive():
    alone = _family(holm_correction=False)["a"]
    assert alone.verdict == BETTER and alone.p_value == pytest.approx(0.0249, abs=1e-4) and alone.family_size == 1
    vs = _family()
    a = vs["a"]
    assert a.family_size == 3 and a.p_adjusted == pytest.approx(3 * a.p_value)   # the smallest p: times K
    assert a.verdict == INCONCLUSIVE and a.holm_changed and a.diff.high < 0       # its own 95% CI excludes 0
    assert a.fmt() == "-0.065 ± 0.049 inconclusive (Holm p=0.075)"
    assert vs["b"].p_adjusted == vs["c"].p_adjusted == 1.0 and not vs["b"].holm_changed
    assert "Holm-adjusted p=0.075 over 3 variants" in a.describe()
    # the MDE is at the Bonferroni level alpha / K, the level of Holm's strictest step
    assert a.level == pytest.approx(0.05 / 3)
    assert a.mde == pytest.approx(minimum_detectable_effect(a.diff.sd, 4, alpha=0.05 / 3))
    assert a.mde > minimum_detectable_effect(a.diff.sd, 4)   # the same spread tested alone
    # a variant without pairs or with one pair is not tested and not counted in the family
    pairs = {"a": ([0.6, 0.7], [0.7, 0.8]), "one": ([0.5], [0.4]), "none": ([None], [0.4])}
    vs = family_verdicts(pairs, lower_is_better=True)
    assert vs["a"].family_size == 1 and vs["one"].verdict == NO_ERROR_BAR and vs["none"].fmt() == "-"


def test_mde_has_80_percent_power_by_scipys_noncentral_t_and_shrinks_with_n():
    sd, previous = 0.3, math.inf
    for n, level in [(3, 0.05), (5, 0.05 / 3), (10, 0.05 / 3), (30, 0.05 / 3)]:
        mde = minimum_detectable_effect(sd, n, alpha=level)
        crit = stats.t.ppf(1 - level / 2, n - 1)
        nc = mde / sd * math.sqrt(n)
        power = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
        assert power == pytest.approx(0.80, abs=1e-6)
        if level < 0.05:
            assert mde < previous
            previous = mde
    # a stricter level needs a larger effect; at large n the normal approximation (z_a/2 + z_b) sd / sqrt(n)
    assert minimum_detectable_effect(sd, 10, alpha=0.05 / 3) > minimum_detectable_effect(sd, 10)
    z = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * sd / math.sqrt(200)
    assert minimum_detectable_effect(sd, 200) == pytest.approx(z, rel=0.01)
    # n = 2 at a Bonferroni level: huge but finite (scipy's nct.cdf is nan there; paired_power avoids it)
    assert 30 < minimum_detectable_effect(1.0, 2, alpha=0.05 / 3) < 40
    assert minimum_detectable_effect(1.0, 1) is None and minimum_detectable_effect(0.0, 5) == 0.0


def test_seeds_for_a_stated_effect_of_interest():
    vs = _family(min_effect=0.05)
    b = vs["b"]
    assert b.verdict == INCONCLUSIVE and b.min_effect == 0.05
    n = b.seeds_needed
    assert n == seeds_for_power(0.05, b.diff.sd, alpha=0.05 / 3) and n > 4
    assert paired_power(0.05, b.diff.sd, n, 0.05 / 3) >= 0.8 > paired_power(0.05, b.diff.sd, n - 1, 0.05 / 3)
    assert f"the effect of interest 0.050 needs {n} paired seeds" in b.describe()
    # an effect far below the noise needs more than the cap: None, said as such
    tiny = _family(min_effect=1e-5)["b"]
    assert tiny.seeds_needed is None and "more than 10000 paired seeds" in tiny.describe()
    # decided variants need no planning numbers
    v = paired_verdict([0.5, 0.6, 0.7], [0.7, 0.8, 0.9], lower_is_better=True, min_effect=0.05)
    assert v.verdict == BETTER and v.seeds_needed is None and v.mde is None


def test_cells_stay_short():
    # the cell goes in a terminal table with several metrics: a few tens of characters at most
    cells = [*_family(min_effect=0.05).values(), paired_verdict([0.5, 0.6, 0.8], [0.7, 0.8, 0.9], lower_is_better=True)]
    for v in cells:
        assert len(v.fmt()) <= 44, v.fmt()

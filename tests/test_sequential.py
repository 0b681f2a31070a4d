"""Anytime-valid verdicts for studies that add seeds in rounds: the t-mixture against a numerical
Bayes factor, its intervals against the martingale, and simulated studies (vectorised over a few
thousand, seeded): no effect gives a false verdict in at most 5% of studies however often one
looks, while re-testing a plain 95% t-interval after each round does far more often; a real effect
is decided before max seeds."""
import math

import numpy as np
import pytest
from scipy import integrate, stats

from fcdm_lab.studies.sequential import (BETTER, INCONCLUSIVE, PRIOR_SD, WORSE, confidence_sequence,
                                         first_decision, log_e_value, needs_more_seeds, sequential_verdicts)

ALPHA, START, MAX_SEEDS, STUDIES = 0.05, 3, 20, 2000


def test_e_value_is_the_scale_invariant_bayes_factor():
    # E_n(mu0) = the Bayes factor of delta = (mu - mu0) / sigma ~ N(0, g) against delta = 0, both
    # with the 1/sigma prior on sigma: checked by integrating over sigma numerically. Given sigma,
    # the differences y = x - mu0 are jointly N(0, sigma^2 (I + g 11')) under the mixture (delta
    # integrated out) and N(0, sigma^2 I) under the null.
    x = np.array([0.9, 0.2, 1.4, 0.5, 1.1])
    n, g = len(x), PRIOR_SD ** 2
    cov = np.eye(n) + g * np.ones((n, n))
    for mu0 in (0.0, 0.3, 1.5):
        y = x - mu0
        alt = integrate.quad(lambda s: stats.multivariate_normal.pdf(y, cov=s * s * cov) / s, 0, np.inf)[0]
        null = integrate.quad(lambda s: np.prod(stats.norm.pdf(y, 0, s)) / s, 0, np.inf)[0]
        assert log_e_value(x, mu0)[-1] == pytest.approx(math.log(alt / null), abs=1e-6)
    assert log_e_value(x)[0] == 0.0   # one value carries no scale: E_1 = 1


def test_interval_endpoints_are_where_the_martingale_reaches_one_over_alpha():
    rng = np.random.default_rng(3)
    x = rng.normal(0.4, 1.0, 12)
    low, high = confidence_sequence(x, ALPHA, intersect=False)
    assert np.all(np.isinf(high[:3]))           # unbounded before 4 seeds at g = 4
    for n in range(4, 13):
        for end in (low[n - 1], high[n - 1]):
            assert log_e_value(x[:n], end)[-1] == pytest.approx(math.log(1 / ALPHA), abs=1e-8)
        assert log_e_value(x[:n], x[:n].mean())[-1] < math.log(1 / ALPHA)   # the mean is inside
    low_i, high_i = confidence_sequence(x, ALPHA)
    assert np.all(low_i >= low) and np.all(high_i <= high) and np.all(np.diff(high_i[3:]) <= 0)
    # deciding is the interval excluding 0 at some prefix
    at = first_decision(x, ALPHA)
    assert at == 0 or (low_i[at - 1] > 0 or high_i[at - 1] < 0) and not (low_i[at - 2] > 0 or high_i[at - 2] < 0)


def _rounds(x, declares):
    """Runs studies in rounds: START seeds per variant, then one more seed per round to each
    variant still undecided, up to MAX_SEEDS; `declares(seeds so far)` is the verdict rule looked
    at after every round. x: (studies, K, MAX_SEEDS) paired differences. Returns decided and the
    seeds at the decision, both (studies, K)."""
    decided = np.zeros(x.shape[:2], bool)
    at = np.zeros(x.shape[:2], int)
    for n in range(START, MAX_SEEDS + 1):
        now = declares(x[..., :n]) & ~decided   # decided variants got no more seeds: keep their verdict
        decided |= now
        at[now] = n
    return decided, at


def _anytime(k):
    return lambda seeds: first_decision(seeds, ALPHA / k) > 0


def _plain_t(seeds, alpha=ALPHA):
    """The fixed-n rule: the (1 - alpha) t-interval of the seeds so far excludes 0."""
    n = seeds.shape[-1]
    t = seeds.mean(-1) / (seeds.std(-1, ddof=1) / math.sqrt(n))
    return np.abs(t) > stats.t.ppf(1 - alpha / 2, n - 1)


MC_BOUND = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / STUDIES)


@pytest.mark.parametrize("k", [1, 3])
def test_no_effect_gives_a_false_verdict_in_at_most_5_percent_of_studies(k):
    x = np.random.default_rng(10 + k).normal(0.0, 0.7, (STUDIES, k, MAX_SEEDS))   # any sd: scale-invariant
    decided, _ = _rounds(x, _anytime(k))
    false_rate = decided.any(axis=1).mean()
    assert false_rate <= MC_BOUND
    # the same studies re-testing a plain 95% t-interval after every round: many more false verdicts
    naive = _rounds(x, _plain_t)[0].any(axis=1).mean()
    assert naive > 0.10 and naive > 5 * false_rate
    if k == 3:
        assert naive > 0.30
        # correcting each look for the K variants does not fix looking again and again
        bonferroni = _rounds(x, lambda seeds: _plain_t(seeds, ALPHA / k))[0].any(axis=1).mean()
        assert bonferroni > 0.10


def test_a_real_effect_is_decided_before_max_seeds_in_the_right_direction():
    rng = np.random.default_rng(7)
    k, sd = 3, 0.2
    x = rng.normal(0.0, sd, (STUDIES, k, MAX_SEEDS))
    x[:, 0] -= 1.5 * sd      # variant 0 really differs (1.5 sd of the paired differences); 1 and 2 do not
    decided, at = _rounds(x, _anytime(k))
    assert decided[:, 0].mean() > 0.95 and np.median(at[decided[:, 0], 0]) <= 12
    # its direction is right whenever decided (the sign at the decision)
    sign = np.array([x[i, 0, :at[i, 0]].mean() for i in np.flatnonzero(decided[:, 0])])
    assert np.all(sign < 0)
    assert decided[:, 1:].any(axis=1).mean() <= MC_BOUND


def test_api_round_loop_matches_the_vectorised_rule():
    # A researcher's loop: look, give the undecided variants a seed, look again.
    rng = np.random.default_rng(5)
    for study in range(25):
        full = {"null": rng.normal(0, 1, MAX_SEEDS), "big": rng.normal(-3, 1, MAX_SEEDS),
                "mid": rng.normal(1.5, 1, MAX_SEEDS)}
        seen = {name: list(v[:START]) for name, v in full.items()}
        while True:
            vs = sequential_verdicts(seen, lower_is_better=True, max_seeds=MAX_SEEDS)
            more = needs_more_seeds(vs)
            if not more:
                break
            for name in more:
                seen[name].append(full[name][len(seen[name])])
        for name, v in vs.items():
            at = int(first_decision(full[name], ALPHA / 3))
            at = at if at >= START else (START if at else 0)
            assert v.decided == bool(at) and (v.decided_at or 0) == at and v.n == (at or MAX_SEEDS)
            if v.decided:
                assert v.verdict == (BETTER if full[name][:at].mean() < 0 else WORSE)
                assert v.reason == f"decided at n={at}" and (v.high < 0 or v.low > 0) and v.p_value <= ALPHA
            else:
                assert v.verdict == INCONCLUSIVE and v.reason == f"undecided at max seeds ({MAX_SEEDS})"
                assert v.low <= 0 <= v.high and v.p_value > ALPHA and not v.more_seeds


def test_verdict_fields_and_edge_cases():
    vs = sequential_verdicts({"a": [0.1, -0.2], "b": [], "c": [0.5, None, float("nan")]}, lower_is_better=True)
    a = vs["a"]
    assert not a.decided and a.more_seeds and a.reason == "undecided at n=2 of 20" and a.verdict == INCONCLUSIVE
    assert math.isinf(a.low) and math.isinf(a.high)
    assert a.fmt() == "-0.050 [-inf, inf] inconclusive: undecided at n=2 of 20"
    assert vs["b"].n == 0 and vs["b"].more_seeds and vs["b"].fmt() == "- : no seeds yet"
    assert vs["c"].n == 1 and needs_more_seeds(vs) == ["a", "b", "c"]
    # a clear improvement on a higher-is-better metric, decided early and staying decided with more seeds
    up = [0.31, 0.29, 0.30, 0.32, 0.30, 0.28]
    v = sequential_verdicts({"x": up}, lower_is_better=False)["x"]
    assert v.verdict == BETTER and v.decided_at == 4 and 0 < v.low < 0.3 < v.high
    assert v.fmt().endswith("better: decided at n=4")
    worse = sequential_verdicts({"x": up}, lower_is_better=True)["x"]
    assert worse.verdict == WORSE
    # the family size sets the level: alone it decides sooner than as one of ten planned variants
    alone = sequential_verdicts({"x": up[:4]}, lower_is_better=False)["x"]
    ten = sequential_verdicts({"x": up[:4]}, lower_is_better=False, family_size=10)["x"]
    assert alone.decided and not ten.decided and ten.high - ten.low > alone.high - alone.low
    assert ten.p_value == pytest.approx(min(1.0, 10 * alone.p_value))

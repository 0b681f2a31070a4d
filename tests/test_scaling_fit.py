"""fcdm_lab.studies.scaling: power-law fits with bootstrap-over-seeds intervals, IsoFLOP profiles,
checked predictions, tables, MLflow names and plots, on synthetic points drawn from known laws.

Every expected value is derived from the law that generated the data (no hand-typed results).
Seed noise is paired like real runs: seed k of every point shares an offset (data order, noise)
plus a per-run part. Seeded RNG; the whole file runs in a few seconds on one core.
"""
import json
import math

import numpy as np
import pytest

from fcdm_lab.errors import UserError
from fcdm_lab.studies import scaling as S

E, A, ALPHA = 0.05, 2.0, 0.3                   # the law metric = E + A x^-alpha
X = np.geomspace(10.0, 1000.0, 6)              # 6 points over 2 decades
K = 8                                          # paired seeds


def law(x):
    return E + A * np.asarray(x, dtype=float) ** -ALPHA


def paired_values(rng, x, k=K, shared=0.01, own=0.01):
    """(points x seeds): the law plus a per-seed offset shared by all points plus per-run noise."""
    x = np.atleast_1d(x)
    return law(x)[:, None] + shared * rng.standard_normal(k)[None, :] + own * rng.standard_normal((x.size, k))


def points_from(x, Y, metric="val_loss", **kw):
    """ScalingPoints with compute = x (gmacs 1, images x) and params tied to x."""
    return [S.ScalingPoint(f"p{i}", params=1e6 * xi, gmacs=1.0, images=float(xi), values={metric: list(row)}, **kw)
            for i, (xi, row) in enumerate(zip(x, Y))]


# ---------------------------------------------------------------------------------------------
# (a) recovery and coverage of the power law
# ---------------------------------------------------------------------------------------------

def test_fit_recovers_the_law_and_is_unit_invariant():
    rng = np.random.default_rng(0)
    Y = paired_values(rng, X, shared=0.003, own=0.003)
    fit = S.fit_power_law(X, Y, metric="val_loss", n_boot=400, rng=1)
    half = (fit.alpha_high - fit.alpha_low) / 2
    assert abs(fit.alpha - ALPHA) < 0.05 and half < 0.05
    assert fit.alpha_low <= ALPHA <= fit.alpha_high
    # E and A: close, inside their own intervals (A moves with alpha: one draw need not cover it)
    assert abs(fit.E - E) < 0.01 and abs(fit.A / A - 1) < 0.1
    assert fit.E_low <= fit.E <= fit.E_high and fit.A_low <= fit.A <= fit.A_high
    assert (fit.n_points, fit.n_seeds, fit.n_boot, fit.n_refits) == (6, K, 400, 400)
    assert not fit.E_fixed and fit.note == ""
    # the seed means are what was fitted; the law's residuals are of the size of their noise
    assert np.allclose(fit.y, Y.mean(axis=1)) and fit.rmse < 0.01
    # predict: the law at new x (a scalar and an array) with an interval around the estimate
    p = fit.predict(3000.0)
    assert p.low <= p.value <= p.high and abs(p.value - law(3000.0)) < 3 * (p.high - p.low)
    arr = fit.predict(X)
    assert arr.value.shape == (6,) and np.all(arr.low <= arr.value) and np.all(arr.value <= arr.high)

    # compute in real units (GMACs x images ~1e9-1e11): same exponent and floor, A rescaled by scale^alpha
    scale = 1e9
    big = S.fit_power_law(X * scale, Y, metric="val_loss", n_boot=400, rng=1)
    assert big.alpha == pytest.approx(fit.alpha, rel=1e-6) and big.E == pytest.approx(fit.E, rel=1e-6)
    assert big.A == pytest.approx(fit.A * scale ** fit.alpha, rel=1e-5)
    assert big.alpha_low == pytest.approx(fit.alpha_low, rel=1e-5)
    assert big.predict(3000.0 * scale).value == pytest.approx(p.value, rel=1e-6)


def test_alpha_interval_covers_the_truth_in_about_95_percent_of_draws():
    """Repeated synthetic studies (6 points, 8 paired seeds) with 150 bootstrap refits each.

    The expanded percentile interval should cover the true alpha ~95% of the time; measured offline
    with this design: 0.944 over 250 draws at 1000 refits, 0.928 over 600 draws at 200 refits (few
    refits estimate the 0.6% / 99.4% percentiles from ~1 sample, slightly too narrow), against
    0.875-0.90 for the plain 2.5%/97.5% percentiles. With 120 draws the Monte-Carlo standard error
    of a coverage near 0.93 is sqrt(0.93 * 0.07 / 120) = 0.023, so the band 0.85-0.99 is about
    3.5 standard errors below and 2.5 above: it fails for a broken interval (e.g. the plain
    percentiles with a correlation-breaking resample fall to ~0.6-0.8, an interval of the fit's
    point noise alone to ~0.2), not for Monte-Carlo luck.

    The same draws check the held-out prediction interval: a 7th point at 3x the largest x from
    the same law and seeds, left out of the fit, should have its measured mean inside the interval
    as often (offline: 0.92 over 300 draws at 500 refits; same band).
    """
    rng = np.random.default_rng(12345)
    draws, n_boot = 120, 150
    x_new = 3 * X[-1]
    covered_alpha = covered_heldout = 0
    for _ in range(draws):
        Y = paired_values(rng, np.append(X, x_new))
        fit = S.fit_power_law(X, Y[:-1], metric="val_loss", n_boot=n_boot, rng=rng)
        covered_alpha += fit.alpha_low <= ALPHA <= fit.alpha_high
        held = S.ScalingPoint("big", params=0, gmacs=1.0, images=x_new, values={"val_loss": list(Y[-1])},
                              seeds=list(range(K)))
        (check,) = S.check_predictions(fit, [held])
        covered_heldout += check.covered
    assert 0.85 <= covered_alpha / draws <= 0.99, covered_alpha / draws
    assert 0.85 <= covered_heldout / draws <= 0.99, covered_heldout / draws


def test_expanded_levels_follow_the_t_correction():
    from scipy import stats

    for n in (2, 3, 8, 30):
        lo, hi = S.expanded_levels(n)
        z = -stats.norm.ppf(lo)
        assert z == pytest.approx(math.sqrt(n / (n - 1)) * stats.t.ppf(0.975, n - 1))
        assert lo == pytest.approx(1 - hi)
    assert S.expanded_levels(1) is None
    # many seeds: the plain 2.5% / 97.5% percentiles
    assert S.expanded_levels(10_000)[0] == pytest.approx(0.025, abs=2e-4)


def test_bootstrap_uses_the_same_seeds_for_every_point():
    """A seed offset shared by all points moves every mean together, which only shifts E: resampling
    the same seeds for every point keeps alpha's interval tight. The same values with each point's
    seeds shuffled independently (same noise per point, pairing broken) widen it several-fold."""
    rng = np.random.default_rng(3)
    Y = law(X)[:, None] + 0.03 * rng.standard_normal(K)[None, :] + 0.001 * rng.standard_normal((X.size, K))
    fit = S.fit_power_law(X, Y, n_boot=300, rng=0)
    idx = fit.boot_idx
    assert idx.shape == (300, K)
    # replicate b's mean of every point is over the same resampled seeds idx[b]
    means = S._replicate_means(Y, idx)
    assert np.allclose(means[5], Y[:, idx[5]].mean(axis=1))
    unpaired = np.array([rng.permutation(row) for row in Y])
    fit_unpaired = S.fit_power_law(X, unpaired, n_boot=300, rng=0)
    width = fit.alpha_high - fit.alpha_low
    assert fit_unpaired.alpha_high - fit_unpaired.alpha_low > 3 * width
    assert fit.alpha_low <= ALPHA <= fit.alpha_high


# ---------------------------------------------------------------------------------------------
# (b) IsoFLOP profiles: N_opt per budget, N_opt ∝ C^a, the frontier
# ---------------------------------------------------------------------------------------------

A_OPT, K_OPT = 0.5, 1e3                         # N_opt = K_OPT * C^A_OPT
BUDGETS = np.array([1e6, 1e7, 1e8, 1e9])
CURV = 0.02                                     # metric = frontier(C) + CURV * ln(N / N_opt)^2


def n_opt(c):
    return K_OPT * c ** A_OPT


def frontier(c):
    return law(np.asarray(c) / 1e5)              # the minimum of each profile follows the power law


def isoflop_points(rng, noise=0.002, k=6, budgets=BUDGETS, offsets=np.geomspace(1 / 5, 3, 5)):
    shared = noise * rng.standard_normal(k)
    pts = []
    for c in budgets:
        for j, n in enumerate(n_opt(c) * offsets):
            mu = frontier(c) + CURV * math.log(n / n_opt(c)) ** 2
            vals = mu + shared + noise * rng.standard_normal(k)
            # images = C / gmacs: the points of a budget have the same compute (the IsoFLOP design)
            gmacs = n / 1e6
            pts.append(S.ScalingPoint(f"C{c:.0e}-n{j}", params=n, gmacs=gmacs, images=c / gmacs,
                                      values={"val_loss": list(vals)}))
    return pts


def test_isoflop_exact_parabolas_give_the_exact_optimum_and_exponent():
    iso = S.isoflop_analysis(isoflop_points(np.random.default_rng(0), noise=0.0), "val_loss", n_boot=50)
    assert [p.budget for p in iso.profiles] == pytest.approx(list(BUDGETS))
    for p in iso.profiles:
        assert p.n_opt == pytest.approx(n_opt(p.budget), rel=1e-8)
        assert p.metric_opt == pytest.approx(frontier(p.budget), rel=1e-8)
        assert not p.outside and not p.opens_downward and p.usable
        assert p.curve([n_opt(p.budget)])[0] == pytest.approx(frontier(p.budget), rel=1e-8)
    assert iso.a == pytest.approx(A_OPT, rel=1e-8) and iso.k == pytest.approx(K_OPT, rel=1e-6)
    assert iso.predict_n_opt(1e11).value == pytest.approx(n_opt(1e11), rel=1e-6)
    fr = iso.frontier
    assert fr.name == "val_loss.frontier" and fr.n_points == len(BUDGETS)
    assert fr.alpha == pytest.approx(ALPHA, rel=1e-4) and fr.E == pytest.approx(E, rel=1e-3)


def test_isoflop_recovers_optimum_and_exponent_with_intervals():
    iso = S.isoflop_analysis(isoflop_points(np.random.default_rng(7)), "val_loss", n_boot=600, rng=2)
    for p in iso.profiles:
        truth = n_opt(p.budget)
        assert p.n_opt_low <= truth <= p.n_opt_high, (p.budget, p.n_opt_low, truth, p.n_opt_high)
        assert abs(math.log(p.n_opt / truth)) < 0.1 and p.n_refits == 600
        assert p.metric_opt_low <= p.metric_opt <= p.metric_opt_high
    assert iso.a_low <= A_OPT <= iso.a_high and abs(iso.a - A_OPT) < 0.02
    assert iso.n_refits == 600 and len(iso.budgets_used) == 4
    pred = iso.predict_n_opt(1e10)
    assert pred.low <= n_opt(1e10) <= pred.high
    fr = iso.frontier
    assert fr.has_interval and abs(fr.alpha - ALPHA) < 0.03 and fr.n_seeds == 6
    # the frontier's bootstrap reuses the same seed resampling as the profiles
    assert fr.boot_idx is not None and fr.boot_idx.shape == (600, 6)


def test_isoflop_flags_minima_outside_downward_parabolas_and_short_budgets():
    rng = np.random.default_rng(1)
    pts = isoflop_points(rng, budgets=BUDGETS[:3])
    # a budget whose sizes all lie below its optimum: the minimum is an extrapolation
    pts += isoflop_points(rng, budgets=BUDGETS[3:], offsets=np.geomspace(1 / 40, 1 / 10, 4))
    # a budget where the metric peaks in the middle: no minimum
    c = 1e10
    for j, n in enumerate(np.geomspace(1e6, 1e8, 4)):
        mu = 1.0 - CURV * math.log(n / 1e7) ** 2
        pts.append(S.ScalingPoint(f"down{j}", params=n, gmacs=1.0, images=c, values={"val_loss": [mu] * 3 + [mu + 1e-3] * 3}))
    # a budget with 2 sizes only
    pts += [S.ScalingPoint(f"two{j}", params=n, gmacs=1.0, images=1e11, values={"val_loss": [0.2 + j * 0.01] * 6})
            for j, n in enumerate((1e7, 1e8))]
    iso = S.isoflop_analysis(pts, "val_loss", n_boot=200)
    by_budget = {round(math.log10(p.budget)): p for p in iso.profiles}
    assert by_budget[9].outside and by_budget[9].n_opt is not None and "outside" in by_budget[9].note
    assert by_budget[10].opens_downward and by_budget[10].n_opt is None and "downward" in by_budget[10].note
    assert by_budget[11].coef is None and "2 size" in by_budget[11].note
    # only the 3 in-range budgets enter N_opt ∝ C^a, and they still recover it
    assert iso.budgets_used == pytest.approx(list(BUDGETS[:3]))
    assert iso.a_low <= A_OPT <= iso.a_high
    # include_outside adds the extrapolated one
    assert len(S.isoflop_analysis(pts, "val_loss", n_boot=50, include_outside=True).budgets_used) == 4


def test_isoflop_groups_by_compute_and_by_size_in_gmacs():
    pts = isoflop_points(np.random.default_rng(2))
    # jitter the images by up to 5%: the points of a budget still group together
    jit = np.random.default_rng(3).uniform(0.95, 1.05, len(pts))
    for p, j in zip(pts, jit):
        p.images *= j
    groups = S.group_budgets(pts)
    assert [len(m) for _, m in groups] == [5, 5, 5, 5]
    # gmacs is proportional to params here, so N_opt in GMACs is N_opt in params / 1e6 and a is the same
    by_params = S.isoflop_analysis(pts, "val_loss", n_boot=0)
    by_gmacs = S.isoflop_analysis(pts, "val_loss", size="gmacs", n_boot=0)
    assert by_gmacs.a == pytest.approx(by_params.a, rel=1e-6)
    assert by_gmacs.profiles[0].n_opt == pytest.approx(by_params.profiles[0].n_opt / 1e6, rel=1e-6)
    # an explicit budget overrides grouping by compute
    for p in pts[:5]:
        p.budget = 123.0
    assert S.group_budgets(pts)[0] == (123.0, [0, 1, 2, 3, 4])
    with pytest.raises(UserError, match="size"):
        S.isoflop_analysis(pts, "val_loss", size="flops")


# ---------------------------------------------------------------------------------------------
# (c) predictions checked on held-out points
# ---------------------------------------------------------------------------------------------

def test_held_out_prediction_covers_a_point_on_the_law_and_not_one_off_it():
    rng = np.random.default_rng(11)
    x_all = np.append(X, [3000.0, 3000.0])
    Y = paired_values(rng, x_all)
    off = Y[-1] * 1.25                               # 25% above the law: far outside the seed noise
    pts = points_from(X, Y[:-2])
    on_pt = S.ScalingPoint("on-law", params=0, gmacs=1.0, images=3000.0, values={"val_loss": list(Y[-2])}, held_out=True)
    off_pt = S.ScalingPoint("off-law", params=0, gmacs=1.0, images=3000.0, values={"val_loss": list(off)}, held_out=True)
    law_fit = S.fit_scaling_law(pts + [on_pt, off_pt], "val_loss", n_boot=500)
    assert law_fit.n_points == 6                     # held-out points are not fitted
    on, off_check = S.check_predictions(law_fit, S.split_held_out(pts + [on_pt, off_pt])[1])
    assert on.covered is True and on.pred_low <= on.measured <= on.pred_high
    assert on.paired and on.extrapolation == pytest.approx(3.0) and on.n_seeds == K
    assert on.measured == pytest.approx(Y[-2].mean()) and on.measured_low < on.measured < on.measured_high
    assert on.predicted == pytest.approx(law_fit.predict(3000.0).value)
    assert off_check.covered is False and off_check.measured > off_check.pred_high
    assert on.fit_low <= on.predicted <= on.fit_high


def test_held_out_with_other_seeds_or_no_values():
    rng = np.random.default_rng(4)
    fit = S.fit_power_law(X, paired_values(rng, X), n_boot=300)
    other = S.ScalingPoint("other-seeds", params=0, gmacs=1.0, images=2000.0,
                           values={"metric": list(law([2000.0] * 4) + 0.01 * rng.standard_normal(4))}, seeds=[20, 21, 22, 23])
    empty = S.ScalingPoint("empty", params=0, gmacs=1.0, images=2000.0, values={"metric": [None, float("nan")]})
    c_other, c_empty = S.check_predictions(fit, [other, empty])
    assert not c_other.paired and "independently" in c_other.note and c_other.covered is not None
    assert c_empty.measured is None and c_empty.covered is None and "no measured" in c_empty.note


# ---------------------------------------------------------------------------------------------
# (d) degenerate inputs
# ---------------------------------------------------------------------------------------------

def test_too_few_points_and_missing_values():
    rng = np.random.default_rng(5)
    Y = paired_values(rng, X)
    with pytest.raises(UserError, match="distinct"):
        S.fit_power_law([100.0] * 3, Y[:3])
    with pytest.raises(UserError, match="no finite"):
        S.fit_power_law(X, np.full((6, K), np.nan))
    with pytest.raises(UserError, match="positive"):
        S.fit_power_law(X, -Y)
    with pytest.raises(UserError, match="x values"):
        S.fit_power_law(X[:4], Y)
    # 2 distinct x: a pure power law through them, E fixed at 0, said so
    two = S.fit_power_law(X[[0, -1]], Y[[0, -1]], n_boot=100)
    assert two.E_fixed and two.E == 0 and "E fixed at 0" in two.note and two.E_low is None
    assert two.alpha_low <= two.alpha <= two.alpha_high and "A·" in two.formula
    assert "(fixed)" in S.fit_table([two])[1][0][4] and "passes through" in two.note
    # a point with no finite seed is left out; a missing run (NaN) is skipped in its mean
    Y2 = Y.copy()
    Y2[2] = np.nan
    Y2[4, :3] = np.nan
    fit = S.fit_power_law(X, Y2, n_boot=100)
    assert fit.n_points == 5 and "left out" in fit.note and fit.has_interval
    assert fit.y[3] == pytest.approx(np.mean(Y[4, 3:]))
    # one seed: estimates, no interval
    one = S.fit_power_law(X, Y[:, :1])
    assert one.n_seeds == 1 and not one.has_interval and "1 seed" in one.note
    assert math.isnan(one.predict(50.0).low)
    # E can be fixed by the caller
    assert S.fit_power_law(X, Y, fix_E=0.0, n_boot=50).E_fixed


def test_scaling_points_input_checks():
    p = S.ScalingPoint("bad", params=1, gmacs=1, images=1, values={"m": [1.0, 2.0]}, seeds=[0])
    with pytest.raises(UserError, match="seeds"):
        p.seed_values("m")
    with pytest.raises(UserError, match="unknown x"):
        S.fit_scaling_law([p], "m", x="flops")
    with pytest.raises(UserError, match="no points"):
        S.fit_scaling_law([S.ScalingPoint("h", 1, 1, 1, {"m": [1.0]}, held_out=True)], "m")
    # seed ids align the columns: a point missing seed 1 gets NaN there
    a = S.ScalingPoint("a", 1, 1, 1, {"m": [1.0, 2.0, 3.0]}, seeds=[0, 1, 2])
    b = S.ScalingPoint("b", 1, 1, 1, {"m": [4.0, 6.0]}, seeds=[0, 2])
    Y, seeds = S.seed_matrix([a, b], "m")
    assert seeds == [0, 1, 2] and np.isnan(Y[1, 1]) and Y[1, 2] == 6.0
    # IsoFLOP with no budget of 3 sizes: a result that says so, no exponent
    iso = S.isoflop_analysis([a, b], "m", n_boot=20)
    assert iso.a is None and iso.frontier is None and "needs 2" in iso.note


# ---------------------------------------------------------------------------------------------
# Tables, MLflow names, JSON
# ---------------------------------------------------------------------------------------------

def test_tables_metrics_and_dicts():
    rng = np.random.default_rng(6)
    Y = paired_values(rng, np.append(X, 3000.0))
    pts = points_from(X, Y[:-1])
    held = S.ScalingPoint("L8-C256+", params=0, gmacs=1.0, images=3000.0, values={"val_loss": list(Y[-1])}, held_out=True)
    fit = S.fit_scaling_law(pts + [held], "val_loss", n_boot=200)
    checks = S.check_predictions(fit, [held])
    iso = S.isoflop_analysis(isoflop_points(rng), "val_loss", n_boot=100)

    header, rows = S.fit_table([fit], iso)
    assert header == S.LAW_HEADER and all(len(r) == len(header) for r in rows)
    assert [r[0] for r in rows] == ["val_loss", "val_loss.frontier", "val_loss.n_opt"]
    assert rows[0][3].startswith(f"{fit.alpha:.4g} [") and rows[0][8] == "200/200"
    ph, prow = S.prediction_table(checks)
    assert len(prow[0]) == len(ph) and prow[0][6] in ("yes", "NO")

    m = S.mlflow_metrics([fit], checks, iso)
    for key in ("alpha", "alpha_low", "alpha_high", "E", "E_low", "E_high", "A"):
        assert m[f"law.val_loss.{key}"] == pytest.approx(getattr(fit, key))
    # point names are sanitised for MLflow ('+' is not allowed in a metric name)
    assert m["predicted.L8-C256_.val_loss"] == pytest.approx(checks[0].predicted)
    assert m["predicted.L8-C256_.val_loss_low"] == pytest.approx(checks[0].pred_low)
    assert m["predicted.L8-C256_.val_loss_high"] == pytest.approx(checks[0].pred_high)
    assert m["measured.L8-C256_.val_loss"] == pytest.approx(Y[-1].mean())
    assert m["covered.L8-C256_.val_loss"] in (0.0, 1.0)
    assert m["isoflop.val_loss.a"] == pytest.approx(iso.a) and "law.val_loss.frontier.alpha" in m
    assert "isoflop.val_loss.budget3.n_opt" in m
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())

    for obj in (fit, iso, checks[0], iso.profiles[0]):
        json.dumps(obj.to_dict())
    d = fit.to_dict()
    assert d["alpha"] == fit.alpha and d["points"] == [p.name for p in pts] and "boot_theta" not in d


# ---------------------------------------------------------------------------------------------
# (e) plots
# ---------------------------------------------------------------------------------------------

def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(8)
    pts = isoflop_points(rng)
    for p in pts:
        p.L, p.C = 2, int(round(p.params / 1e4))
    # a held-out point at a larger budget at its predicted optimum
    c_big = 1e10
    n_big = n_opt(c_big)
    held = S.ScalingPoint("big", params=n_big, gmacs=n_big / 1e6, images=c_big / (n_big / 1e6),
                          values={"val_loss": list(frontier(c_big) + 0.002 * rng.standard_normal(6))}, held_out=True)
    iso = S.isoflop_analysis(pts + [held], "val_loss", n_boot=100)
    checks = S.check_predictions(iso.frontier, [held])
    assert checks[0].covered is not None
    out1 = S.plot_scaling(pts + [held], "val_loss", tmp_path / "scaling.png", isoflop=iso, checks=checks)
    out2 = S.plot_isoflop(iso, tmp_path / "sub" / "isoflop.png")
    fit = S.fit_power_law(X, paired_values(rng, X), n_boot=50)
    out3 = S.plot_scaling(points_from(X, paired_values(rng, X)), "val_loss", tmp_path / "law.png", law=fit, logy=True)
    for out in (out1, out2, out3):
        assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000

"""Scaling laws from trained points with paired seeds: power-law fits, IsoFLOP profiles, checked predictions.

    pts = [ScalingPoint("L2-C64", params=1.3e6, gmacs=0.0086, images=2e5,
                        values={"val_loss": [0.412, 0.409, 0.415]}, L=2, C=64), ...]
    law = fit_scaling_law(pts, "val_loss")            # val_loss = E + A * compute^-alpha, bootstrap over seeds
    law.alpha, (law.alpha_low, law.alpha_high)         # exponent and its 95% interval
    law.predict(1e4)                                   # Prediction(value, low, high) at a compute
    iso = isoflop_analysis(pts, "val_loss")            # parabola per budget -> N_opt, N_opt ∝ C^a, frontier law
    checks = check_predictions(law, held_out_points)   # prediction interval vs the measured mean, covered?
    header, rows = fit_table([law], iso); mlflow_metrics([law], checks, iso)
    plot_scaling(pts, "val_loss", "scaling.png", law=law, isoflop=iso, checks=checks)
    plot_isoflop(iso, "isoflop.png")

Pure functions of numbers (numpy, scipy; matplotlib only inside the plot functions): the study
engine feeds them the metrics of trained runs and logs what they return. Anchors: Kaplan et al.
2020 (power laws in compute and parameters), Hoffmann et al. 2022 (Chinchilla, approach 2:
IsoFLOP profiles, a parabola in log model size per compute budget, N_opt ∝ C^a), Liang et al. 2024
(Scaling Laws for Diffusion Transformers: held-out loss = E + A * C^-alpha).

Conventions
-----------
* compute = GMACs per image x training images seen (units: GMAC; the same units everywhere, so
  the exponents do not depend on them).
* Metrics are lower-is-better and positive (loss, FID): the law is metric = E + A x^-alpha with
  E >= 0, A > 0, 0 < alpha <= 10.
* Seeds are paired: seed k of every point shares data order and noise. The seed values of all
  points form a matrix (points x seeds, aligned by seed id, NaN where a run is missing).

Fits (scipy)
------------
* The power law is fitted by scipy.optimize.leastsq (Levenberg-Marquardt, analytic Jacobian; E = s^2
  keeps E >= 0) to the seed means, in a scaled parametrisation: x / x_ref (x_ref the geometric mean of
  the x values) and metric / y_scale (the median seed mean), parameters (e, log a, alpha) with
  metric / y_scale = e + exp(log a - alpha * ln(x / x_ref)). Every parameter is then O(1) whatever
  the units (compute ~1e12 GMAC, FID ~100); E = e * y_scale and A = exp(log a) * y_scale *
  x_ref^alpha. The point estimate is the best of three starts (e = 0, 0.5 and 0.9 of the smallest
  mean, log a and alpha from a log-log line through the means minus e); bootstrap refits start
  from it.
* Too few points: a law with a free E needs >= 3 distinct x. With exactly 2 distinct x, E is fixed
  at 0 (a pure power law, Kaplan's form; `E_fixed` is True and `note` says so); with fewer it is a
  UserError. A caller can fix E itself (`fix_E=0.0`).
* IsoFLOP parabolas (metric against ln size, per budget) and the N_opt ∝ C^a line (ln N_opt against
  ln C) are numpy.polyfit fits (degree 2 and 1).

Intervals: bootstrap over seeds (hand-written, a few lines)
-----------------------------------------------------------
Each bootstrap replicate draws K seed indices with replacement (K = seeds) and uses the SAME
resampled seeds for every point (seeds are paired: the replicate keeps the per-seed offsets shared
across points), recomputes every point's mean over its finite resampled values, and refits. One
index matrix drives everything that is derived from the same runs (the law, every IsoFLOP
parabola, N_opt ∝ C^a, the frontier law, the held-out points' resampled means), so derived
quantities stay consistent replicate by replicate.

Checked against scipy: scipy.stats.bootstrap(..., paired=True, vectorized=False) does resample the
seed index jointly across points when each point's seed vector is passed as one sample, and can
refit inside `statistic`. It is not used because (1) one failed refit (NaN) makes its interval NaN,
while here failed refits are dropped and counted (`n_refits`); (2) it does not hand back the
resampled indices, which the held-out checks and the IsoFLOP chain need to reuse; (3) its methods
(percentile, basic, BCa) have no small-sample correction, and studies have 3-8 seeds.

The interval is the *expanded percentile* interval (Hesterberg 2015, "What teachers should know about
the bootstrap"): the bootstrap spread of a mean over n units is sqrt((n-1)/n) too narrow and uses
normal instead of Student-t quantiles. The expanded interval takes the percentiles at Φ(±z') with
z' = sqrt(n/(n-1)) * t_{0.975, n-1} (n = 8: the 0.57% and 99.43% percentiles; n = 3: the
bootstrap's extremes). Measured on synthetic studies (6 points over 2 decades, paired seed noise):
alpha's 95% interval covered the true alpha in 94% of 250 draws with 8 seeds and 1000 refits (the
plain 2.5/97.5% percentiles: 90%), 93% with 200 refits (plain: 88%); with 4 seeds 85% (plain: 80%).
With 1 seed there is no interval (None). With 2-3 seeds there are only 3-10 distinct resamples: the
interval is coarse and still too narrow; more seeds are the cure.

Held-out checks (`check_predictions`): the interval a held-out point's measured seed mean should
fall in is the prediction plus the bootstrap spread of (measured mean - prediction), both taken
on the same resampled seeds. It holds the fit's uncertainty, the held-out point's own seed noise
and their correlation (a seed that is lucky everywhere moves the fit and the held-out point
together, so it partly cancels). Measured: 92% of 300 synthetic draws covered (8 seeds, 500
refits, the point at 3x the largest fitted compute).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import UserError

CONFIDENCE = 0.95
N_BOOT = 1000                    # bootstrap replicates by default (~1 s for one law)
ALPHA_MAX = 10.0                 # upper bound of the exponent
MIN_REFITS = 20                  # fewer successful refits than this: no interval
BUDGET_RTOL = 0.10               # points within 10% of compute share an IsoFLOP budget (unless `budget` is set)
SIZE_KINDS = ("params", "gmacs")
X_KINDS = ("compute", "params", "gmacs", "images")
X_LABELS = {"compute": "compute (GMACs per image x images)", "params": "parameters",
            "gmacs": "GMACs per image", "images": "training images"}

RngLike = Union[int, np.random.Generator, None]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclass
class ScalingPoint:
    """One trained configuration (model size and budget) with its per-seed metrics.

    values: metric name -> per-seed values aligned with `seeds` (NaN or None for a missing run).
    seeds: the seed ids of those values (default 0..K-1); points are paired by seed id.
    budget: the nominal compute budget (IsoFLOP group); default: points with compute within 10%.
    held_out: trained but kept out of the fits (checked against the predictions instead).
    """

    name: str
    params: float
    gmacs: float                          # per image (the model's GMACs for one image)
    images: float                         # training images seen
    values: Mapping[str, Sequence[Optional[float]]]
    seeds: Sequence[int] = ()
    L: Optional[int] = None
    C: Optional[int] = None
    budget: Optional[float] = None
    held_out: bool = False

    @property
    def compute(self) -> float:
        """GMACs per image x images seen (GMAC)."""
        return float(self.gmacs) * float(self.images)

    def x(self, kind: str) -> float:
        """The point's coordinate for a law in `kind` (compute, params, gmacs, images)."""
        if kind not in X_KINDS:
            raise UserError(f"unknown x {kind!r}: choose one of {', '.join(X_KINDS)}")
        return self.compute if kind == "compute" else float(getattr(self, kind))

    def seed_values(self, metric: str) -> Dict[int, float]:
        """{seed id: value} of one metric (NaN for a missing run)."""
        vals = list(self.values.get(metric, ()))
        ids = list(self.seeds) if self.seeds else list(range(len(vals)))
        if len(ids) != len(vals):
            raise UserError(f"point {self.name}: {len(vals)} values of {metric} for {len(ids)} seeds")
        return {int(s): _float(v) for s, v in zip(ids, vals)}

    @property
    def size_label(self) -> str:
        if self.L is not None and self.C is not None:
            return f"L{self.L} C{self.C}"
        return f"{_si(self.params)} params"


def seed_matrix(points: Sequence[ScalingPoint], metric: str,
                seeds: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, List[int]]:
    """The (points x seeds) matrix of one metric, columns aligned by seed id (the union of the
    points' seeds, sorted, unless `seeds` is given), NaN where a run is missing."""
    per_point = [p.seed_values(metric) for p in points]
    if seeds is None:
        seeds = sorted({s for d in per_point for s in d})
    seeds = [int(s) for s in seeds]
    Y = np.full((len(points), len(seeds)), np.nan)
    for i, d in enumerate(per_point):
        for j, s in enumerate(seeds):
            Y[i, j] = d.get(s, np.nan)
    return Y, seeds


def split_held_out(points: Sequence[ScalingPoint]) -> Tuple[List[ScalingPoint], List[ScalingPoint]]:
    """(points to fit, held-out points)."""
    return [p for p in points if not p.held_out], [p for p in points if p.held_out]


# ---------------------------------------------------------------------------------------------
# Small helpers: numbers, seed means, the bootstrap
# ---------------------------------------------------------------------------------------------

def _float(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def _opt(v: Any) -> Optional[float]:
    """A finite float or None (JSON, MLflow)."""
    f = _float(v)
    return None if math.isnan(f) else f


def _si(v: float) -> str:
    """1.3e6 -> '1.3M' (3 significant digits)."""
    v = float(f"{v:.3g}")
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _row_means(Y: np.ndarray) -> np.ndarray:
    """Mean over the finite values of each row (last axis); NaN for a row without any."""
    ok = np.isfinite(Y)
    n = ok.sum(axis=-1)
    total = np.where(ok, Y, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Tuple[float, Optional[float], Optional[float], int]:
    """(mean, low, high, n) over the finite values: the Student-t interval over seeds (low/high None
    for one value; mean NaN for none)."""
    from scipy import stats

    v = np.asarray([_float(x) for x in values], dtype=float)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return float("nan"), None, None, 0
    mean = float(v.mean())
    if n == 1:
        return mean, None, None, 1
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def _rng(rng: RngLike) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def resample_seeds(n_seeds: int, n_boot: int, rng: RngLike = 0) -> np.ndarray:
    """(n_boot x n_seeds) seed column indices drawn with replacement: row b is replicate b's seeds,
    used for every point (paired seeds)."""
    return _rng(rng).integers(0, n_seeds, size=(n_boot, n_seeds))


def _replicate_means(Y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(replicates x points) means of each point over each replicate's resampled seeds."""
    return _row_means(Y[:, idx]).T          # Y[:, idx]: points x replicates x seeds


def expanded_levels(n_units: int, confidence: float = CONFIDENCE) -> Optional[Tuple[float, float]]:
    """The percentile levels of the expanded percentile interval over n bootstrap units (seeds):
    Φ(±z'), z' = sqrt(n/(n-1)) t_{(1+confidence)/2, n-1}; None for n < 2 (no interval)."""
    if n_units < 2:
        return None
    from scipy import stats

    z = math.sqrt(n_units / (n_units - 1)) * float(stats.t.ppf(0.5 + confidence / 2, n_units - 1))
    low = float(stats.norm.cdf(-z))
    return low, 1.0 - low


def _interval(samples: np.ndarray, levels: Optional[Tuple[float, float]]) -> Tuple[Optional[float], Optional[float]]:
    """Percentiles of the finite samples at `levels` (None, None when there is no interval)."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if levels is None or s.size < MIN_REFITS:
        return None, None
    lo, hi = np.quantile(s, levels)
    return float(lo), float(hi)


class Prediction(NamedTuple):
    """A predicted value and its 95% interval (floats for a scalar x, arrays for an array x)."""

    value: Any
    low: Any
    high: Any


# ---------------------------------------------------------------------------------------------
# The power law: metric = E + A * x^-alpha
# ---------------------------------------------------------------------------------------------

def _law_curve(theta: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Scaled law e + exp(log a - alpha u) for parameter rows theta (..., 3) at u = ln(x / x_ref)."""
    theta = np.asarray(theta, dtype=float)
    return theta[..., 0:1] + np.exp(theta[..., 1:2] - theta[..., 2:3] * u)


def _least_squares_law(u: np.ndarray, y: np.ndarray, start: np.ndarray, fix_e: Optional[float]) -> Optional[np.ndarray]:
    """Fit (e, log a, alpha) to the scaled means y at u; e fixed when fix_e is given. None on failure.

    Levenberg-Marquardt (scipy.optimize.leastsq, MINPACK: what curve_fit runs without bounds) with
    e = s^2, so e >= 0 without a bounded solver: least_squares' bounded trust-region method gives the
    same fits but costs ~5x more per call (its Python loop), which matters for 1000 bootstrap refits.
    alpha is checked afterwards: a refit with alpha outside (0, ALPHA_MAX] (a flat or increasing law)
    counts as failed.
    """
    from scipy import optimize

    if fix_e is None:
        def resid(p):
            return p[0] ** 2 + np.exp(p[1] - p[2] * u) - y

        def jac(p):
            t = np.exp(p[1] - p[2] * u)
            return np.column_stack([2 * p[0] * np.ones_like(u), t, -u * t])

        # s = 0 is a stationary point of s^2: start e at a small positive value
        p0 = np.array([math.sqrt(max(float(start[0]), 1e-3 * float(np.min(y)))), start[1], start[2]])
    else:
        def resid(p):
            return fix_e + np.exp(p[0] - p[1] * u) - y

        def jac(p):
            t = np.exp(p[0] - p[1] * u)
            return np.column_stack([t, -u * t])

        p0 = np.array(start[1:], dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        p, _, _, _, ier = optimize.leastsq(resid, p0, Dfun=jac, full_output=True, maxfev=2000)
    if ier not in (1, 2, 3, 4) or not np.all(np.isfinite(p)):
        return None
    theta = np.array([p[0] ** 2, p[1], p[2]]) if fix_e is None else np.array([fix_e, p[0], p[1]])
    return theta if 0 < theta[2] <= ALPHA_MAX else None


def _starts(u: np.ndarray, y: np.ndarray, fix_e: Optional[float]) -> List[np.ndarray]:
    """Starting values: e a fraction of the smallest mean, (log a, alpha) from a log-log line through
    the means minus e."""
    es = [fix_e] if fix_e is not None else [0.0, 0.5 * y.min(), 0.9 * y.min()]
    starts = []
    for e in es:
        slope, icpt = np.polyfit(u, np.log(np.maximum(y - e, 1e-12)), 1)
        starts.append(np.array([e, icpt, float(np.clip(-slope, 0.01, ALPHA_MAX - 0.01))]))
    return starts


def _fit_scaled(u: np.ndarray, y: np.ndarray, fix_e: Optional[float],
                start: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Best fit over the starts (or from `start`, the bootstrap refits); None when none converges."""
    best, best_cost = None, np.inf
    for s in ([start] if start is not None else _starts(u, y, fix_e)):
        theta = _least_squares_law(u, y, s, fix_e)
        if theta is None:
            continue
        cost = float(np.sum((_law_curve(theta, u) - y) ** 2))
        if cost < best_cost:
            best, best_cost = theta, cost
    return best


@dataclass(eq=False)          # holds numpy arrays: compare fields, not objects
class PowerLawFit:
    """metric = E + A * x^-alpha fitted across points, with bootstrap-over-seeds 95% intervals.

    Estimates come from the seed means; `*_low`/`*_high` are expanded-percentile intervals over the
    `n_refits` successful refits (None when there is no interval: one seed, too few refits, or a
    fit on one value per x without bootstrap replicates). `E_fixed`: E was not fitted (2 distinct x,
    or `fix_E`). `predict(x)` gives the law at x with the interval of the refits' predictions.
    """

    name: str                    # key in tables and MLflow names (law.<name>.alpha)
    metric: str
    x_name: str                  # compute | params | gmacs | images
    alpha: float
    E: float
    A: float
    alpha_low: Optional[float] = None
    alpha_high: Optional[float] = None
    E_low: Optional[float] = None
    E_high: Optional[float] = None
    A_low: Optional[float] = None
    A_high: Optional[float] = None
    E_fixed: bool = False
    n_points: int = 0
    n_seeds: int = 0
    n_boot: int = 0
    n_refits: int = 0
    rmse: float = float("nan")   # of the seed means around the law (metric units)
    x_ref: float = 1.0           # the scale of x in the fit (geometric mean of x)
    y_scale: float = 1.0         # the scale of the metric in the fit (median of the means)
    point_names: List[str] = field(default_factory=list)
    x: List[float] = field(default_factory=list)       # the fitted points' x
    y: List[float] = field(default_factory=list)       # and their seed means
    confidence: float = CONFIDENCE
    note: str = ""
    seeds: List[int] = field(default_factory=list, repr=False)              # seed ids of the bootstrap columns
    boot_idx: Optional[np.ndarray] = field(default=None, repr=False)        # (n_boot x n_seeds) resampled columns
    boot_theta: Optional[np.ndarray] = field(default=None, repr=False)      # (n_boot x 3) scaled params, NaN = failed

    @property
    def has_interval(self) -> bool:
        return self.alpha_low is not None

    def _theta(self) -> np.ndarray:
        """The estimate in the scaled parametrisation (e, log a, alpha)."""
        return np.array([self.E / self.y_scale, math.log(self.A / self.y_scale) - self.alpha * math.log(self.x_ref),
                         self.alpha])

    def predict(self, x: Union[float, Sequence[float], np.ndarray]) -> Prediction:
        """The law at x (same units as the fit) with the 95% interval of the bootstrap refits'
        predictions (low/high NaN when the fit has no interval)."""
        scalar = np.ndim(x) == 0
        xs = np.atleast_1d(np.asarray(x, dtype=float))
        u = np.log(xs / self.x_ref)
        value = _law_curve(self._theta(), u) * self.y_scale
        low = np.full_like(value, np.nan)
        high = np.full_like(value, np.nan)
        levels = expanded_levels(self.n_seeds, self.confidence)
        if self.has_interval and self.boot_theta is not None and levels is not None:
            ok = np.all(np.isfinite(self.boot_theta), axis=1)
            curves = _law_curve(self.boot_theta[ok], u) * self.y_scale          # refits x points
            low, high = np.quantile(curves, levels, axis=0)
        if scalar:
            return Prediction(float(value[0]), float(low[0]), float(high[0]))
        return Prediction(value, low, high)

    def boot_predictions(self, x: float) -> np.ndarray:
        """The law at x under each bootstrap replicate (NaN where the refit failed), aligned with
        `boot_idx` rows."""
        if self.boot_theta is None:
            return np.empty(0)
        u = np.array([math.log(float(x) / self.x_ref)])
        return _law_curve(self.boot_theta, u)[:, 0] * self.y_scale

    @property
    def formula(self) -> str:
        if self.E_fixed and self.E == 0:
            return f"{self.metric} = A·{self.x_name}^-α"
        return f"{self.metric} = E + A·{self.x_name}^-α"

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe summary (no bootstrap arrays; NaN as None)."""
        return {"name": self.name, "metric": self.metric, "x": self.x_name, "formula": self.formula,
                "alpha": _opt(self.alpha), "alpha_low": _opt(self.alpha_low), "alpha_high": _opt(self.alpha_high),
                "E": _opt(self.E), "E_low": _opt(self.E_low), "E_high": _opt(self.E_high),
                "A": _opt(self.A), "A_low": _opt(self.A_low), "A_high": _opt(self.A_high),
                "E_fixed": self.E_fixed, "n_points": self.n_points, "n_seeds": self.n_seeds,
                "n_boot": self.n_boot, "n_refits": self.n_refits, "rmse": _opt(self.rmse),
                "x_ref": self.x_ref, "confidence": self.confidence, "points": list(self.point_names),
                "x_values": [float(v) for v in self.x], "y_values": [_opt(v) for v in self.y], "note": self.note}


def _fit_law_replicates(x: np.ndarray, y: np.ndarray, Yb: Optional[np.ndarray], *, n_seeds: int,
                        metric: str, x_name: str, name: Optional[str], fix_E: Optional[float],
                        confidence: float, point_names: Sequence[str], seeds: Sequence[int],
                        boot_idx: Optional[np.ndarray], notes: List[str]) -> PowerLawFit:
    """The shared engine: fit the means y at x, refit each bootstrap replicate row of Yb (NaN =
    point missing in that replicate), summarise."""
    name = name or (metric if x_name == "compute" else f"{metric}.{x_name}")
    ok = np.isfinite(y) & np.isfinite(x) & (x > 0)
    if not np.all(ok):
        notes.append(f"{int((~ok).sum())} point(s) without a finite mean or x > 0 left out")
    x, y = x[ok], y[ok]
    point_names = [n for n, k in zip(point_names, ok) if k]
    if Yb is not None:
        Yb = Yb[:, ok]
    distinct = np.unique(x).size
    if distinct < 2:
        raise UserError(f"law of {metric} against {x_name}: {distinct} distinct {x_name} value(s) with data; "
                        "a power law needs at least 2 (3 to fit its floor E)")
    if np.any(y <= 0):
        raise UserError(f"law of {metric}: the metric must be positive (a lower-is-better loss or distance), "
                        f"got a mean of {float(y.min()):.4g}")
    fix_e_raw = fix_E
    if fix_E is None and distinct < 3:
        fix_e_raw = 0.0
        notes.append(f"only 2 distinct {x_name} values: E fixed at 0 (a pure power law); 3 or more fit E")
    x_ref = float(np.exp(np.mean(np.log(x))))
    y_scale = float(np.median(y))
    u = np.log(x / x_ref)
    fix_e = None if fix_e_raw is None else float(fix_e_raw) / y_scale
    theta = _fit_scaled(u, y / y_scale, fix_e)
    if theta is None:
        raise UserError(f"law of {metric} against {x_name}: the fit did not converge")
    rmse = float(np.sqrt(np.mean((_law_curve(theta, u) * y_scale - y) ** 2)))
    if x.size == (2 if fix_e is not None else 3):
        notes.append(f"{x.size} points for {x.size} parameters: the law passes through them (its shape is not tested)")

    def unscale(t: np.ndarray) -> Tuple[float, float, float]:
        return t[0] * y_scale, np.exp(t[1] + t[2] * np.log(x_ref)) * y_scale, t[2]

    E, A, alpha = unscale(theta)
    fit = PowerLawFit(name=name, metric=metric, x_name=x_name, alpha=float(alpha), E=float(E), A=float(A),
                      E_fixed=fix_e is not None, n_points=int(x.size), n_seeds=int(n_seeds), rmse=rmse,
                      x_ref=x_ref, y_scale=y_scale, point_names=list(point_names), x=[float(v) for v in x],
                      y=[float(v) for v in y], confidence=confidence, seeds=list(seeds), boot_idx=boot_idx)
    if n_seeds < 2:
        notes.append("1 seed: no interval")
    elif Yb is None:
        notes.append("no bootstrap replicates: no interval")
    else:
        # The bootstrap over seeds (hand-written, see the module docstring): each row of Yb holds the
        # points' means over one replicate's resampled seeds; refit from the estimate, NaN = failed.
        boot = np.full((Yb.shape[0], 3), np.nan)
        for b, yb in enumerate(Yb):
            have = np.isfinite(yb)
            if np.unique(x[have]).size < (2 if fix_e is not None else 3) or np.any(yb[have] <= 0):
                continue
            t = _fit_scaled(u[have], yb[have] / y_scale, fix_e, start=theta)
            if t is not None:
                boot[b] = t
        good = np.all(np.isfinite(boot), axis=1)
        fit.n_boot, fit.n_refits, fit.boot_theta = int(Yb.shape[0]), int(good.sum()), boot
        levels = expanded_levels(n_seeds, confidence)
        if fit.n_refits < MIN_REFITS:
            notes.append(f"{fit.n_refits} of {fit.n_boot} bootstrap refits succeeded: no interval")
        else:
            if fit.n_refits < 0.9 * fit.n_boot:
                notes.append(f"only {fit.n_refits} of {fit.n_boot} bootstrap refits succeeded")
            Es, As, alphas = unscale(boot[good].T)
            fit.alpha_low, fit.alpha_high = _interval(alphas, levels)
            fit.A_low, fit.A_high = _interval(As, levels)
            if fix_e is None:
                fit.E_low, fit.E_high = _interval(Es, levels)
            if n_seeds <= 3:
                notes.append(f"{n_seeds} seeds: the bootstrap interval is coarse")
    fit.note = "; ".join(notes)
    return fit


def fit_power_law(x: Sequence[float], values: Any, *, metric: str = "metric", x_name: str = "compute",
                  name: Optional[str] = None, seeds: Optional[Sequence[int]] = None,
                  point_names: Optional[Sequence[str]] = None, fix_E: Optional[float] = None,
                  n_boot: int = N_BOOT, rng: RngLike = 0, confidence: float = CONFIDENCE,
                  boot_idx: Optional[np.ndarray] = None) -> PowerLawFit:
    """metric = E + A x^-alpha across points, from a (points x seeds) matrix of values (NaN = missing
    run; seeds paired by column), with bootstrap-over-seeds intervals.

    Points with no finite value are left out (noted). Raises UserError for fewer than 2 distinct x
    or a non-positive mean. `boot_idx` reuses a resampling (rows of seed column indices) instead of
    drawing `n_boot` new ones.
    """
    x = np.asarray(x, dtype=float)
    Y = np.asarray(values, dtype=float)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.shape[0] != x.size:
        raise UserError(f"law of {metric}: {x.size} x values for {Y.shape[0]} rows of values")
    keep_cols = np.isfinite(Y).any(axis=0)
    seeds = list(seeds) if seeds is not None else list(range(Y.shape[1]))
    notes: List[str] = []
    if not keep_cols.all() and boot_idx is None:
        notes.append(f"{int((~keep_cols).sum())} seed(s) without any value left out")
        Y = Y[:, keep_cols]
        seeds = [s for s, k in zip(seeds, keep_cols) if k]
    if Y.shape[1] == 0 or not np.isfinite(Y).any():
        raise UserError(f"law of {metric}: no finite values")
    names = list(point_names) if point_names is not None else [f"p{i}" for i in range(x.size)]
    K = Y.shape[1]
    Yb = None
    if K >= 2 and n_boot > 0:
        if boot_idx is None:
            boot_idx = resample_seeds(K, n_boot, rng)
        Yb = _replicate_means(Y, boot_idx)
    return _fit_law_replicates(x, _row_means(Y), Yb, n_seeds=K, metric=metric, x_name=x_name, name=name,
                               fix_E=fix_E, confidence=confidence, point_names=names, seeds=seeds,
                               boot_idx=boot_idx, notes=notes)


def fit_power_law_series(x: Sequence[float], y: Sequence[float], y_boot: Optional[np.ndarray] = None, *,
                         n_seeds: int = 1, metric: str = "metric", x_name: str = "compute",
                         name: Optional[str] = None, point_names: Optional[Sequence[str]] = None,
                         fix_E: Optional[float] = None, confidence: float = CONFIDENCE,
                         seeds: Sequence[int] = (), boot_idx: Optional[np.ndarray] = None) -> PowerLawFit:
    """The same law on one value per x (e.g. the frontier: the metric at each budget's N_opt).

    y_boot: (replicates x points) values of the same series under each bootstrap-over-seeds
    replicate (from the upstream analysis, NaN = unavailable) for intervals; n_seeds: the seeds
    those replicates resampled (sets the expanded percentile). Without y_boot: no interval.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    names = list(point_names) if point_names is not None else [f"p{i}" for i in range(x.size)]
    Yb = None if y_boot is None else np.asarray(y_boot, dtype=float)
    return _fit_law_replicates(x, y, Yb, n_seeds=n_seeds, metric=metric, x_name=x_name, name=name, fix_E=fix_E,
                               confidence=confidence, point_names=names, seeds=list(seeds), boot_idx=boot_idx,
                               notes=[])


def fit_scaling_law(points: Sequence[ScalingPoint], metric: str, *, x: str = "compute",
                    name: Optional[str] = None, fix_E: Optional[float] = None, n_boot: int = N_BOOT,
                    rng: RngLike = 0, confidence: float = CONFIDENCE) -> PowerLawFit:
    """metric = E + A x^-alpha over the points (held-out ones skipped), x = compute, params, gmacs or
    images; the seeds are the union of the points' seed ids."""
    if x not in X_KINDS:
        raise UserError(f"unknown x {x!r}: choose one of {', '.join(X_KINDS)}")
    fit_points, _ = split_held_out(points)
    if not fit_points:
        raise UserError(f"law of {metric}: no points to fit")
    Y, seeds = seed_matrix(fit_points, metric)
    return fit_power_law([p.x(x) for p in fit_points], Y, metric=metric, x_name=x, name=name, seeds=seeds,
                         point_names=[p.name for p in fit_points], fix_E=fix_E, n_boot=n_boot, rng=rng,
                         confidence=confidence)


# ---------------------------------------------------------------------------------------------
# IsoFLOP profiles (Chinchilla approach 2)
# ---------------------------------------------------------------------------------------------

@dataclass
class IsoFLOPProfile:
    """One compute budget: the metric against ln(size), a parabola, its minimum N_opt.

    n_opt is None when the parabola opens downward (no minimum) or there are < 3 sizes; `outside`:
    the minimum lies outside the sampled sizes (an extrapolation, left out of N_opt ∝ C^a unless
    asked). Intervals: bootstrap over seeds (replicates whose parabola opens downward count as
    failed refits).
    """

    budget: float                         # compute (GMAC)
    names: List[str]
    sizes: List[float]
    means: List[float]
    ci_low: List[Optional[float]]
    ci_high: List[Optional[float]]
    coef: Optional[List[float]] = None    # parabola in v = ln(size) - u_center: c2 v^2 + c1 v + c0
    u_center: float = 0.0
    n_opt: Optional[float] = None
    n_opt_low: Optional[float] = None
    n_opt_high: Optional[float] = None
    metric_opt: Optional[float] = None    # the parabola's minimum value
    metric_opt_low: Optional[float] = None
    metric_opt_high: Optional[float] = None
    opens_downward: bool = False
    outside: bool = False
    n_refits: int = 0
    note: str = ""

    @property
    def usable(self) -> bool:
        return self.n_opt is not None

    def curve(self, sizes: Sequence[float]) -> np.ndarray:
        """The fitted parabola at these sizes."""
        if self.coef is None:
            return np.full(len(sizes), np.nan)
        return np.polyval(self.coef, np.log(np.asarray(sizes, dtype=float)) - self.u_center)

    def to_dict(self) -> Dict[str, Any]:
        return {"budget": self.budget, "points": list(self.names), "sizes": list(self.sizes),
                "means": [_opt(v) for v in self.means], "coef": self.coef, "u_center": self.u_center,
                "n_opt": _opt(self.n_opt), "n_opt_low": _opt(self.n_opt_low), "n_opt_high": _opt(self.n_opt_high),
                "metric_opt": _opt(self.metric_opt), "metric_opt_low": _opt(self.metric_opt_low),
                "metric_opt_high": _opt(self.metric_opt_high), "opens_downward": self.opens_downward,
                "outside": self.outside, "n_refits": self.n_refits, "note": self.note}


@dataclass(eq=False)
class IsoFLOPResult:
    """IsoFLOP analysis of one metric: a profile per budget, N_opt = k C^a across the usable budgets
    (a's interval with >= 3 budgets), and the frontier law (metric at N_opt against compute)."""

    metric: str
    size: str                              # params | gmacs
    profiles: List[IsoFLOPProfile]
    a: Optional[float] = None
    a_low: Optional[float] = None
    a_high: Optional[float] = None
    k: Optional[float] = None              # N_opt = k * C^a
    budgets_used: List[float] = field(default_factory=list)
    n_refits: int = 0                      # of the a fit
    frontier: Optional[PowerLawFit] = None
    n_seeds: int = 0
    n_boot: int = 0
    confidence: float = CONFIDENCE
    note: str = ""
    boot_ak: Optional[np.ndarray] = field(default=None, repr=False)   # (n_boot x 2): a, ln k per replicate

    def predict_n_opt(self, compute: float) -> Prediction:
        """The compute-optimal size at a budget from N_opt = k C^a, with the bootstrap interval."""
        if self.a is None or self.k is None:
            return Prediction(float("nan"), float("nan"), float("nan"))
        value = self.k * float(compute) ** self.a
        low = high = float("nan")
        levels = expanded_levels(self.n_seeds, self.confidence)
        if self.a_low is not None and self.boot_ak is not None and levels is not None:
            ok = np.all(np.isfinite(self.boot_ak), axis=1)
            logs = self.boot_ak[ok, 1] + self.boot_ak[ok, 0] * math.log(float(compute))
            low, high = (float(v) for v in np.exp(np.quantile(logs, levels)))
        return Prediction(value, low, high)

    def to_dict(self) -> Dict[str, Any]:
        return {"metric": self.metric, "size": self.size, "a": _opt(self.a), "a_low": _opt(self.a_low),
                "a_high": _opt(self.a_high), "k": _opt(self.k), "budgets_used": list(self.budgets_used),
                "n_refits": self.n_refits, "n_seeds": self.n_seeds, "n_boot": self.n_boot, "note": self.note,
                "profiles": [p.to_dict() for p in self.profiles],
                "frontier": None if self.frontier is None else self.frontier.to_dict()}


def group_budgets(points: Sequence[ScalingPoint], rtol: float = BUDGET_RTOL) -> List[Tuple[float, List[int]]]:
    """[(budget, point indices)] sorted by budget: the points' `budget` when set, else compute
    values within `rtol` of the group's smallest (the budget is then their geometric mean)."""
    groups: Dict[float, List[int]] = {}
    free = []
    for i, p in enumerate(points):
        if p.budget is not None:
            groups.setdefault(float(p.budget), []).append(i)
        else:
            free.append(i)
    free.sort(key=lambda i: points[i].compute)
    run: List[int] = []
    for i in free + [None]:                                   # None flushes the last group
        if run and (i is None or points[i].compute > points[run[0]].compute * (1 + rtol)):
            budget = float(np.exp(np.mean([math.log(points[j].compute) for j in run])))
            groups.setdefault(budget, []).extend(run)
            run = []
        if i is not None:
            run.append(i)
    return sorted(groups.items())


def _parabola_min(v: np.ndarray, Yb: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit c2 v^2 + c1 v + c0 to each row of Yb (rows with NaN: refitted on their finite entries);
    returns (coef rows, v at the minimum, value at the minimum), NaN where the parabola opens
    downward or fewer than 3 distinct sizes have data."""
    n = Yb.shape[0]
    coef = np.full((n, 3), np.nan)
    full = np.all(np.isfinite(Yb), axis=1)
    if full.any() and np.unique(v).size >= 3:
        coef[full] = np.polyfit(v, Yb[full].T, 2).T           # numpy fits many columns at once
    for r in np.flatnonzero(~full):
        have = np.isfinite(Yb[r])
        if np.unique(v[have]).size >= 3:
            coef[r] = np.polyfit(v[have], Yb[r, have], 2)
    c2, c1, c0 = coef.T
    with np.errstate(invalid="ignore", divide="ignore"):
        up = c2 > 0
        vmin = np.where(up, -c1 / (2 * c2), np.nan)
        ymin = np.where(up, c0 - c1 ** 2 / (4 * c2), np.nan)
    return coef, vmin, ymin


def isoflop_analysis(points: Sequence[ScalingPoint], metric: str, *, size: str = "params",
                     include_outside: bool = False, n_boot: int = N_BOOT, rng: RngLike = 0,
                     confidence: float = CONFIDENCE, budget_rtol: float = BUDGET_RTOL) -> IsoFLOPResult:
    """Chinchilla approach 2 on the points (held-out ones skipped).

    Per budget with >= 3 sizes: a parabola of the metric (seed means) against ln(size) (size =
    params or gmacs) and its minimum N_opt, with a bootstrap-over-seeds interval. Across the usable
    budgets (minimum inside the sampled sizes, unless include_outside): ln N_opt = ln k + a ln C
    (>= 2 budgets; a's interval needs >= 3), and the frontier law metric_opt = E + A C^-alpha over
    the same budgets (fit_power_law_series: E fixed at 0 with 2 budgets). One resampling of the
    seeds drives every budget, the a fit and the frontier.
    """
    if size not in SIZE_KINDS:
        raise UserError(f"unknown size {size!r}: choose one of {', '.join(SIZE_KINDS)}")
    fit_points, _ = split_held_out(points)
    if not fit_points:
        raise UserError(f"IsoFLOP analysis of {metric}: no points")
    Y, seeds = seed_matrix(fit_points, metric)
    keep = np.isfinite(Y).any(axis=0)
    Y, seeds = Y[:, keep], [s for s, k in zip(seeds, keep) if k]
    K = Y.shape[1]
    if K == 0:
        raise UserError(f"IsoFLOP analysis of {metric}: no finite values")
    idx = resample_seeds(K, n_boot, rng) if K >= 2 and n_boot > 0 else None
    means = _row_means(Y)
    Yb = _replicate_means(Y, idx) if idx is not None else None
    levels = expanded_levels(K, confidence)
    notes: List[str] = []
    profiles: List[IsoFLOPProfile] = []
    used: List[Tuple[IsoFLOPProfile, Optional[np.ndarray], Optional[np.ndarray]]] = []  # (profile, ln N_opt, metric_opt per replicate)
    for budget, members in group_budgets(fit_points, budget_rtol):
        members = [i for i in members if np.isfinite(means[i])]
        members.sort(key=lambda i: getattr(fit_points[i], size))
        sz = np.array([float(getattr(fit_points[i], size)) for i in members])
        cis = [mean_ci(Y[i], confidence) for i in members]
        prof = IsoFLOPProfile(budget=budget, names=[fit_points[i].name for i in members], sizes=[float(s) for s in sz],
                              means=[float(means[i]) for i in members], ci_low=[c[1] for c in cis],
                              ci_high=[c[2] for c in cis])
        profiles.append(prof)
        if np.unique(sz).size < 3:
            prof.note = f"{np.unique(sz).size} size(s) with data: a parabola needs 3"
            continue
        u = np.log(sz)
        prof.u_center = float(u.mean())
        v = u - prof.u_center
        coef, vmin, ymin = _parabola_min(v, means[members][None, :])
        prof.coef = [float(c) for c in coef[0]]
        if not np.isfinite(vmin[0]):
            prof.opens_downward = True
            prof.note = "the parabola opens downward: no minimum (sizes too far from the optimum or too noisy)"
            continue
        prof.n_opt = float(np.exp(vmin[0] + prof.u_center))
        prof.metric_opt = float(ymin[0])
        prof.outside = not (v.min() <= vmin[0] <= v.max())
        if prof.outside:
            prof.note = "the minimum lies outside the sampled sizes (extrapolated)"
        bu = by = None
        if Yb is not None:
            _, bv, by = _parabola_min(v, Yb[:, members])
            bu = bv + prof.u_center
            prof.n_refits = int(np.isfinite(bv).sum())
            lo, hi = _interval(bu, levels)
            if lo is not None:
                prof.n_opt_low, prof.n_opt_high = float(np.exp(lo)), float(np.exp(hi))
                prof.metric_opt_low, prof.metric_opt_high = _interval(by, levels)
            if prof.n_refits < 0.9 * len(bv):
                prof.note = "; ".join(filter(None, [prof.note, f"{len(bv) - prof.n_refits} of {len(bv)} bootstrap "
                                                               "parabolas open downward"]))
        if include_outside or not prof.outside:
            used.append((prof, bu, by))
    result = IsoFLOPResult(metric=metric, size=size, profiles=profiles, n_seeds=K,
                           n_boot=0 if idx is None else int(idx.shape[0]), confidence=confidence,
                           budgets_used=[p.budget for p, _, _ in used])
    if len(used) < 2:
        notes.append(f"{len(used)} budget(s) with a usable minimum: N_opt ∝ C^a needs 2 (3 for an interval)")
    else:
        budgets = [p.budget for p, _, _ in used]
        lc = np.log(budgets)
        a, lnk = np.polyfit(lc, np.log([p.n_opt for p, _, _ in used]), 1)
        result.a, result.k = float(a), float(np.exp(lnk))
        have_boot = Yb is not None
        if len(used) < 3:
            notes.append("2 budgets: N_opt ∝ C^a without an interval (3 or more give one)")
        elif have_boot:
            B = np.column_stack([bu for _, bu, _ in used])    # replicates x budgets
            ok = np.all(np.isfinite(B), axis=1)
            ak = np.full((B.shape[0], 2), np.nan)
            if ok.any():
                ak[ok] = np.polyfit(lc, B[ok].T, 1).T
            result.boot_ak, result.n_refits = ak, int(ok.sum())
            result.a_low, result.a_high = _interval(ak[:, 0], levels)
        result.frontier = fit_power_law_series(
            budgets, [p.metric_opt for p, _, _ in used],
            np.column_stack([by for _, _, by in used]) if have_boot else None, n_seeds=K, metric=metric,
            x_name="compute", name=f"{metric}.frontier", point_names=[f"budget {_si(b)}" for b in budgets],
            confidence=confidence, seeds=seeds, boot_idx=idx)
    result.note = "; ".join(notes)
    return result


# ---------------------------------------------------------------------------------------------
# Predictions checked against held-out points
# ---------------------------------------------------------------------------------------------

@dataclass
class PredictionCheck:
    """A held-out point: the law's prediction with its 95% interval next to the measured mean.

    pred_low/pred_high: the interval the measured seed mean should fall in if the law holds: the
    prediction plus the bootstrap spread of (measured mean - prediction) over the SAME resampled
    seeds, so it holds both the fit's uncertainty and the held-out point's own seed noise, and the
    pairing between them (a seed that is lucky everywhere shifts both). fit_low/fit_high: the law's
    own interval at x (`PowerLawFit.predict`), narrower. covered: pred_low <= measured <= pred_high
    (None without an interval or a measurement).
    """

    name: str
    metric: str
    x_name: str
    x: float
    predicted: float
    pred_low: Optional[float]
    pred_high: Optional[float]
    fit_low: Optional[float]
    fit_high: Optional[float]
    measured: Optional[float]
    measured_low: Optional[float]          # Student-t 95% interval over the point's seeds
    measured_high: Optional[float]
    n_seeds: int
    covered: Optional[bool]
    paired: bool                           # resampled with the fit's seeds (all its seeds among them)
    extrapolation: float                   # x / the largest fitted x
    law: str = ""
    note: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "law": self.law, "x": self.x_name, "x_value": self.x,
                "predicted": _opt(self.predicted), "pred_low": _opt(self.pred_low), "pred_high": _opt(self.pred_high),
                "fit_low": _opt(self.fit_low), "fit_high": _opt(self.fit_high), "measured": _opt(self.measured),
                "measured_low": _opt(self.measured_low), "measured_high": _opt(self.measured_high),
                "n_seeds": self.n_seeds, "covered": self.covered, "paired": self.paired,
                "extrapolation": self.extrapolation, "note": self.note}


def check_predictions(law: PowerLawFit, held_out: Sequence[ScalingPoint], *, rng: RngLike = 1) -> List[PredictionCheck]:
    """Each held-out point's predicted metric (at its x in the law's units) with the 95% interval for
    its measured seed mean, the measured mean with its seed interval, and whether it is covered.

    Paired when the point's seeds are all among the fit's: its values are resampled with the fit's
    bootstrap rows. Otherwise its seeds are resampled on their own (independent draws, `rng`).
    The interval's percentiles are expanded for the fit's seed count (module docstring).
    """
    checks = []
    levels = expanded_levels(law.n_seeds, law.confidence)
    for p in held_out:
        xv = p.x(law.x_name)
        fit_pred = law.predict(xv)
        vals = p.seed_values(law.metric)
        m, m_lo, m_hi, n = mean_ci(list(vals.values()), law.confidence)
        notes = []
        pred_low = pred_high = None
        paired = bool(law.seeds) and set(vals) <= set(law.seeds)
        if n == 0:
            notes.append("no measured value")
        elif law.has_interval and law.boot_idx is not None and levels is not None:
            P_b = law.boot_predictions(xv)
            if paired:
                v = np.array([vals.get(s, np.nan) for s in law.seeds])
                M_b = _row_means(v[law.boot_idx])
            else:
                own = np.array(list(vals.values()), dtype=float)
                M_b = _row_means(own[resample_seeds(own.size, law.boot_idx.shape[0], rng)])
                notes.append("seeds not shared with the fit: resampled independently")
            d_b = (M_b - P_b) - (m - fit_pred.value)             # bootstrap deviations of measured - predicted
            lo, hi = _interval(d_b, levels)
            if lo is not None:
                pred_low, pred_high = fit_pred.value + lo, fit_pred.value + hi
            if n == 1:
                notes.append("1 measured seed: its own seed noise is not in the interval")
        else:
            notes.append("the law has no interval")
        covered = None if pred_low is None or n == 0 else bool(pred_low <= m <= pred_high)
        x_max = max(law.x) if law.x else float("nan")
        checks.append(PredictionCheck(
            name=p.name, metric=law.metric, x_name=law.x_name, x=xv, predicted=fit_pred.value,
            pred_low=pred_low, pred_high=pred_high, fit_low=_opt(fit_pred.low), fit_high=_opt(fit_pred.high),
            measured=_opt(m), measured_low=m_lo, measured_high=m_hi, n_seeds=n, covered=covered, paired=paired,
            extrapolation=xv / x_max, law=law.name, note="; ".join(notes)))
    return checks


# ---------------------------------------------------------------------------------------------
# Tables and MLflow metric names
# ---------------------------------------------------------------------------------------------

def _g(v: Optional[float]) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _with_interval(v: Optional[float], lo: Optional[float], hi: Optional[float]) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return _g(v) if lo is None else f"{_g(v)} [{_g(lo)}, {_g(hi)}]"


LAW_HEADER = ["law", "metric", "x", "exponent [95% CI]", "E [95% CI]", "A", "points", "seeds", "refits", "note"]


def fit_table(laws: Sequence[PowerLawFit] = (), isoflop: Optional[IsoFLOPResult] = None) -> Tuple[List[str], List[List[str]]]:
    """(header, rows of strings) summarising the laws: one row per power law (exponent alpha), and
    with an IsoFLOP result a row for N_opt ∝ C^a (exponent a) and one for its frontier law. Ready for
    a terminal or markdown table; the numbers themselves are in each object's to_dict()."""
    rows = []
    all_laws = list(laws) + ([isoflop.frontier] if isoflop is not None and isoflop.frontier is not None else [])
    for law in all_laws:
        e = _g(law.E) + " (fixed)" if law.E_fixed else _with_interval(law.E, law.E_low, law.E_high)
        rows.append([law.name, law.metric, law.x_name, _with_interval(law.alpha, law.alpha_low, law.alpha_high),
                     e, _g(law.A), str(law.n_points), str(law.n_seeds), f"{law.n_refits}/{law.n_boot}", law.note])
    if isoflop is not None:
        rows.append([f"{isoflop.metric}.n_opt", isoflop.metric, f"N_opt({isoflop.size}) ∝ compute^a",
                     _with_interval(isoflop.a, isoflop.a_low, isoflop.a_high), "-", _g(isoflop.k),
                     str(len(isoflop.budgets_used)), str(isoflop.n_seeds),
                     f"{isoflop.n_refits}/{isoflop.n_boot}" if isoflop.a_low is not None else "-", isoflop.note])
    return list(LAW_HEADER), rows


PREDICTION_HEADER = ["point", "metric", "law", "x", "predicted [95% PI]", "measured [95% CI]", "covered", "note"]


def prediction_table(checks: Sequence[PredictionCheck]) -> Tuple[List[str], List[List[str]]]:
    """(header, rows of strings) of checked predictions."""
    rows = []
    for c in checks:
        cov = "-" if c.covered is None else ("yes" if c.covered else "NO")
        rows.append([c.name, c.metric, c.law, f"{_g(c.x)} ({c.extrapolation:.3g}x)",
                     _with_interval(c.predicted, c.pred_low, c.pred_high),
                     _with_interval(c.measured, c.measured_low, c.measured_high) + f" n={c.n_seeds}", cov, c.note])
    return list(PREDICTION_HEADER), rows


def _key(name: str) -> str:
    """A point or law name as part of an MLflow metric name (letters, digits, _ - . / and spaces
    only: anything else becomes '_', e.g. 'L4-C128-1e+06' -> 'L4-C128-1e_06')."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", str(name))


def mlflow_metrics(laws: Sequence[PowerLawFit] = (), checks: Sequence[PredictionCheck] = (),
                   isoflop: Optional[IsoFLOPResult] = None) -> Dict[str, float]:
    """Flat MLflow metric names -> finite values (missing or non-finite values are left out):
    law.<name>.{alpha,alpha_low,alpha_high,E,E_low,E_high,A,A_low,A_high,n_refits},
    predicted.<point>.<metric>{,_low,_high}, measured.<point>.<metric>{,_low,_high},
    covered.<point>.<metric> (1/0) (names sanitised for MLflow: `_key`), and with IsoFLOP: isoflop.<metric>.{a,a_low,a_high,k} and
    isoflop.<metric>.budget<i>.{compute,n_opt,n_opt_low,n_opt_high,metric_opt} plus the frontier's
    law.<metric>.frontier.*."""
    out: Dict[str, Optional[float]] = {}
    all_laws = list(laws) + ([isoflop.frontier] if isoflop is not None and isoflop.frontier is not None else [])
    for law in all_laws:
        for key in ("alpha", "alpha_low", "alpha_high", "E", "E_low", "E_high", "A", "A_low", "A_high", "n_refits"):
            out[f"law.{_key(law.name)}.{key}"] = getattr(law, key)
    for c in checks:
        pm = f"{_key(c.name)}.{_key(c.metric)}"
        out[f"predicted.{pm}"] = c.predicted
        out[f"predicted.{pm}_low"] = c.pred_low
        out[f"predicted.{pm}_high"] = c.pred_high
        out[f"measured.{pm}"] = c.measured
        out[f"measured.{pm}_low"] = c.measured_low
        out[f"measured.{pm}_high"] = c.measured_high
        out[f"covered.{pm}"] = None if c.covered is None else float(c.covered)
    if isoflop is not None:
        base = f"isoflop.{_key(isoflop.metric)}"
        for key in ("a", "a_low", "a_high", "k"):
            out[f"{base}.{key}"] = getattr(isoflop, key)
        for i, p in enumerate(isoflop.profiles):
            for key in ("n_opt", "n_opt_low", "n_opt_high", "metric_opt"):
                out[f"{base}.budget{i}.{key}"] = getattr(p, key)
            out[f"{base}.budget{i}.compute"] = p.budget
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(points: Sequence[ScalingPoint], metric: str, path: Union[str, Path], *, x: str = "compute",
                 law: Optional[PowerLawFit] = None, isoflop: Optional[IsoFLOPResult] = None,
                 checks: Sequence[PredictionCheck] = (), title: Optional[str] = None,
                 logy: bool = False) -> Path:
    """scaling.png: the metric against x (log axis), one series per model size (seed means with 95%
    t-interval error bars; held-out points hollow), the fitted law with its 95% band, the frontier
    law of an IsoFLOP result (dashed, its budgets' minima as stars), and each held-out prediction's
    interval next to the measured mean (green covered, red not). Returns the path."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 5))
    series: Dict[Any, List[ScalingPoint]] = {}
    for p in points:
        key = (p.L, p.C) if p.L is not None and p.C is not None else p.params
        series.setdefault(key, []).append(p)
    order = sorted(series, key=lambda k: series[k][0].params)
    cmap = plt.get_cmap("viridis")
    many = len(order) > 8                                     # a colour bar instead of a long legend
    xs_all = []
    for n, key in enumerate(order):
        color = cmap(0.1 + 0.8 * n / max(1, len(order) - 1))
        pts = sorted(series[key], key=lambda p: p.x(x))
        fitted = [p for p in pts if not p.held_out]
        stats_ = [(p.x(x), *mean_ci(list(p.seed_values(metric).values()))) for p in pts]
        xs_all += [s[0] for s in stats_]
        line = [(s[0], s[1]) for p, s in zip(pts, stats_) if not p.held_out and math.isfinite(s[1])]
        if line:
            ax.plot(*zip(*line), "-", color=color, lw=0.8, alpha=0.6)
        for p, (xv, m, lo, hi, _) in zip(pts, stats_):
            if not math.isfinite(m):
                continue
            err = None if lo is None else [[m - lo], [hi - m]]
            ax.errorbar([xv], [m], yerr=err, fmt="o", ms=5, color=color, capsize=2, lw=1,
                        mfc="white" if p.held_out else color,
                        label=None if many or p is not (fitted[0] if fitted else pts[0]) else pts[0].size_label)
    if law is not None and law.x_name == x:
        _plot_law(ax, law, xs_all, color="black", ls="-", label=f"fit: α={_with_interval(law.alpha, law.alpha_low, law.alpha_high)}")
    if isoflop is not None and isoflop.frontier is not None and x == "compute":
        fr = isoflop.frontier
        _plot_law(ax, fr, xs_all, color="tab:red", ls="--",
                  label=f"frontier: α={_with_interval(fr.alpha, fr.alpha_low, fr.alpha_high)}")
        ax.plot(fr.x, fr.y, "*", color="tab:red", ms=10, label="IsoFLOP minima")
    for c in checks:
        if c.x_name != x:
            continue
        color = "tab:gray" if c.covered is None else ("tab:green" if c.covered else "tab:red")
        xp = c.x * 1.06                                       # beside the measured point
        if c.pred_low is not None:
            ax.errorbar([xp], [c.predicted], yerr=[[c.predicted - c.pred_low], [c.pred_high - c.predicted]],
                        fmt="D", ms=5, color=color, capsize=3, lw=1.5)
        else:
            ax.plot([xp], [c.predicted], "D", ms=5, color=color)
        ax.annotate(f"{c.name}: {'covered' if c.covered else 'missed' if c.covered is False else 'predicted'}",
                    (xp, c.pred_high if c.pred_high is not None else c.predicted), xytext=(4, 8),
                    textcoords="offset points", fontsize=7, color=color, ha="right")
    if many:
        import matplotlib.colors as mcolors

        params = [series[k][0].params for k in order]
        colors = mcolors.ListedColormap([cmap(0.1 + 0.8 * n / (len(order) - 1)) for n in range(len(order))])
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=mcolors.Normalize(-0.5, len(order) - 0.5), cmap=colors), ax=ax,
                           pad=0.01, fraction=0.04)
        step = max(1, len(order) // 6)
        bar.set_ticks(range(0, len(order), step))
        bar.set_ticklabels([_si(params[i]) for i in range(0, len(order), step)])
        bar.set_label("model size (parameters)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title(title or f"{metric} against {x}: seed means ± 95% CI; ◇ predictions ± 95% PI", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best", ncol=2 if len(order) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_law(ax, law: PowerLawFit, xs: Sequence[float], *, color: str, ls: str, label: str) -> None:
    lo, hi = min(list(xs) + law.x), max(list(xs) + law.x)
    grid = np.geomspace(lo / 1.3, hi * 1.3, 200)
    pred = law.predict(grid)
    ax.plot(grid, pred.value, ls, color=color, lw=1.3, label=label)
    if np.all(np.isfinite(pred.low)):
        ax.fill_between(grid, pred.low, pred.high, color=color, alpha=0.12, lw=0)


def plot_isoflop(isoflop: IsoFLOPResult, path: Union[str, Path], *, title: Optional[str] = None) -> Path:
    """isoflop.png: per budget the metric against model size (log axis; seed means ± 95% CI), the
    fitted parabola and its minimum N_opt (star, horizontal bar = its 95% interval; hollow when
    outside the sampled sizes), and N_opt ∝ C^a in the title. Returns the path."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = plt.get_cmap("plasma")
    n = len(isoflop.profiles)
    for i, p in enumerate(isoflop.profiles):
        color = cmap(0.05 + 0.8 * i / max(1, n - 1))
        if not p.sizes:
            continue
        err = [[m - lo if lo is not None else 0 for m, lo in zip(p.means, p.ci_low)],
               [hi - m if hi is not None else 0 for m, hi in zip(p.means, p.ci_high)]]
        ax.errorbar(p.sizes, p.means, yerr=err, fmt="o", ms=4, color=color, capsize=2, lw=1,
                    label=f"C = {_si(p.budget)} GMAC" + ("" if p.usable else " (no minimum)" if p.opens_downward else ""))
        if p.coef is not None:
            lo_s, hi_s = min(p.sizes), max(p.sizes)
            if p.n_opt is not None:
                lo_s, hi_s = min(lo_s, p.n_opt), max(hi_s, p.n_opt)
            grid = np.geomspace(lo_s / 1.2, hi_s * 1.2, 100)
            ax.plot(grid, p.curve(grid), "-", color=color, lw=1.2)
        if p.n_opt is not None:
            xerr = None
            if p.n_opt_low is not None:
                xerr = [[p.n_opt - p.n_opt_low], [p.n_opt_high - p.n_opt]]
            ax.errorbar([p.n_opt], [p.metric_opt], xerr=xerr, fmt="*", ms=12, color=color, capsize=3,
                        mfc="white" if p.outside else color, mec=color)
    ax.set_xscale("log")
    ax.set_xlabel("parameters" if isoflop.size == "params" else "GMACs per image")
    ax.set_ylabel(f"{isoflop.metric} (lower is better)")
    law = "N_opt ∝ C^a: " + ("too few budgets" if isoflop.a is None else
                             f"a = {_with_interval(isoflop.a, isoflop.a_low, isoflop.a_high)}")
    ax.set_title(title or f"IsoFLOP profiles of {isoflop.metric}; ★ minima ± 95% CI; {law}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Compute-matched variants: solve one free knob so a variant's GMACs equal a target.

The paper's last three ablation rows keep the default's total compute (facts section 6) but do not
say how; here each variant names its knob:
  ratio      expansion of the block's main path (hidden = ratio * C), continuous in steps of 1 channel
  ffn_ratio  expansion of the extra feed-forward module
  width      the base width C (even integers: steps of ~4/C in compute, coarse at tiny C)
GMACs are counted on the meta device (no memory, no compute), so solving costs a few forward traces:
about six per solve, each remembered for the process (a study's child solves its match three times:
when the study checks its variants, in the memory preflight and when the model is built).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict

import torch

from ..errors import UserError, choices
from .blocks import resolve_block_spec
from .fcdm import FCDM
from .flops import count_gmacs

KNOBS = ("ratio", "ffn_ratio", "width")
TOLERANCE = 0.01


@dataclass
class MatchResult:
    knob: str
    from_value: float
    to_value: float
    target_gmacs: float
    gmacs: float

    @property
    def rel_err(self) -> float:
        return (self.gmacs - self.target_gmacs) / self.target_gmacs

    @property
    def matched(self) -> bool:
        return abs(self.rel_err) <= TOLERANCE

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(rel_err=self.rel_err, matched=self.matched)
        return d


# GMACs of FCDM settings already counted in this process, by their JSON text: a count is a pure
# function of the settings, and the same ones come back (a child's target and solve, three times)
_GMACS: Dict[str, float] = {}


def fcdm_gmacs(kwargs: Dict[str, Any]) -> float:
    key = json.dumps(kwargs, sort_keys=True, default=repr)
    if key not in _GMACS:
        with torch.device("meta"):
            model = FCDM(**kwargs)
        shape = (kwargs.get("in_channels", 4), kwargs.get("input_size", 32), kwargs.get("input_size", 32))
        _GMACS[key] = count_gmacs(model, shape)
    return _GMACS[key]


def default_target(kwargs: Dict[str, Any]) -> float:
    """GMACs of the default FCDM block at the same L, C and resolution."""
    return fcdm_gmacs({**kwargs, "block": None})


def _solve_channels(f: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """The whole number of channels h in [lo, hi] whose GMACs f(h) are closest to `target` (ties: the
    smaller h). f is non-decreasing and nearly affine in h (every layer the expansion feeds is linear
    in it), so interpolating inside the bracket lands within a channel of the answer in one or two
    counts. Hand-written: scipy's root finders work on reals, and f is a step function of the ratio,
    where they stall (the earlier real-valued solve took ~45 counts to find what this finds in ~6)."""
    a, b = lo, hi
    fa, fb = f(a), f(b)
    if target < fa or target > fb:
        raise UserError(f"cannot match compute: target {target:.4g} GMACs is outside what the knob reaches "
                        f"({fa:.4g}..{fb:.4g})")
    while b - a > 1 and fa < target < fb:
        h = a + round((target - fa) * (b - a) / (fb - fa))
        h = min(max(h, a + 1), b - 1)
        fh = f(h)
        if fh <= target:
            a, fa = h, fh
        if fh >= target:
            b, fb = h, fh
    return a if target - fa <= fb - target else b


def match_flops(kwargs: Dict[str, Any], knob: str, target_gmacs: float | None = None) -> tuple[Dict[str, Any], MatchResult]:
    """Return FCDM kwargs with `knob` solved so GMACs land on the target, and what moved.

    `kwargs` are FCDM constructor settings (L, C, block, input_size, in_channels, num_classes...).
    """
    if knob not in KNOBS:
        raise UserError(f"unknown compute-matching knob {knob!r}; valid: {choices(KNOBS)}")
    kwargs = copy.deepcopy(kwargs)
    spec = resolve_block_spec(kwargs.get("block"))
    if target_gmacs is not None and not (math.isfinite(target_gmacs) and target_gmacs > 0):
        raise UserError(f"the compute-matching target must be a positive number of GMACs, got {target_gmacs}")
    target = default_target(kwargs) if target_gmacs is None else float(target_gmacs)

    if knob == "width":
        C0 = kwargs["C"]

        def gm(c: int) -> float:
            return fcdm_gmacs({**kwargs, "C": c, "block": spec})

        # GMACs grow ~C^2: start from the square-root guess, then walk even widths to the closest.
        g0 = gm(C0)
        c = max(8, int(round(C0 * (target / g0) ** 0.5 / 2)) * 2)
        best = min((c - 2, c, c + 2), key=lambda v: abs(gm(v) - target) if v >= 8 else float("inf"))
        while True:
            nxt = [v for v in (best - 2, best + 2) if v >= 8 and abs(gm(v) - target) < abs(gm(best) - target)]
            if not nxt:
                break
            best = nxt[0]
        kwargs["C"] = best
        kwargs["block"] = spec
        return kwargs, MatchResult("width", C0, best, target, gm(best))

    if knob not in spec:
        raise UserError(
            f"block family {spec['family']!r} has no {knob!r} option to match compute; "
            f"valid knobs for it: {choices([k for k in KNOBS if k in spec or k == 'width'])}")
    if knob == "ffn_ratio" and not spec.get("ffn"):
        raise UserError("knob 'ffn_ratio' needs the extra feed-forward module (block option ffn = true)")
    if knob == "ratio" and spec.get("bottleneck") is False:
        raise UserError("knob 'ratio' has no effect with bottleneck = false; use knob 'width'")
    x0 = spec[knob]

    C = kwargs["C"]

    def gm_channels(h: int) -> float:
        return fcdm_gmacs({**kwargs, "block": {**spec, knob: h / C}})

    # ratio on the grid h / C: whole channels at the first level (blocks.hidden_channels: round(ratio * C));
    # the wider levels follow
    r = _solve_channels(gm_channels, target, 1, 64 * C) / C
    kwargs["block"] = {**spec, knob: r}
    return kwargs, MatchResult(knob, x0, r, target, gm_channels(round(r * C)))

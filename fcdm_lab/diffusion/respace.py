"""Timestep respacing as in ADM's `respace.py`: sample with a subset of the training chain's steps.

`space_timesteps` picks which of the T training steps to keep ("250" = 250 of 1000 evenly, the DiT
sampling default; "10,15,20" = that many in each equal section; "ddim50" = DDIM's fixed integer
stride). `respace_betas` turns the kept steps into the betas of a shorter chain with the same
alphas_cumprod at every kept step. Both are plain float64 numpy, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import UserError


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """The steps of a `num_timesteps` chain to keep.

    section_counts: an int or "N" (N steps spread evenly over the chain), "a,b,c" or a list (the
    chain cut into equal sections, a steps taken evenly from the first, and so on), or "ddimN"
    (range(0, T, stride) for the integer stride that gives exactly N steps).
    Bad specs raise UserError naming the accepted forms.
    """
    forms = '"N" (e.g. "250"), "a,b,c" (steps per equal section) or "ddimN" (e.g. "ddim50")'
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim") :])
            except ValueError:
                raise UserError(f"bad timestep respacing {spec!r}; use {forms}") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise UserError(
                f"cannot take exactly {desired} of {num_timesteps} steps with an integer stride "
                f"({spec!r}); use a plain count such as {desired!r} instead"
            )
        try:
            section_counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise UserError(f"bad timestep respacing {spec!r}; use {forms}") from None
    counts = list(section_counts)
    if not counts or any(c < 1 for c in counts):
        raise UserError(f"timestep respacing needs positive step counts, got {counts}; use {forms}")

    # Equal sections (the first `extra` ones one step longer); within each, `count` steps at a
    # fractional stride, rounded with Python's round() exactly as ADM does.
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    steps: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise UserError(f"cannot take {count} steps from a section of {size} of {num_timesteps} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def respace_betas(alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the shorter chain that keeps `use_timesteps`, and the map from its steps to the original.

    The new chain has beta_k = 1 - abar[t_k] / abar[t_{k-1}] (abar[t_{-1}] = 1), so its cumulative
    product equals the original alphas_cumprod at every kept step.
    Returns (betas (K,) float64, timestep_map (K,) int64 of original step indices, ascending).
    """
    kept = np.array(sorted(set(use_timesteps)), dtype=np.int64)
    if len(kept) == 0 or kept[0] < 0 or kept[-1] >= len(alphas_cumprod):
        raise UserError(f"respaced steps must lie in 0..{len(alphas_cumprod) - 1}")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)[kept]
    abar_prev = np.append(1.0, abar[:-1])
    return 1.0 - abar / abar_prev, kept

"""Gaussian diffusion (DDPM) as ADM / DiT define it.

Float64 numpy schedules, epsilon prediction, a learned-range variance trained with the iDDPM hybrid
loss (MSE on epsilon + the variational-bound term with the mean detached), the ancestral (DDPM)
sampler and DDIM. Written by hand, following the structure of openai/guided-diffusion and
facebookresearch/DiT `diffusion/gaussian_diffusion.py`, because no installed library has the
training side: diffusers' schedulers sample, but have neither the hybrid loss nor float64 schedules
(`tests/test_diffusion.py` checks this code against diffusers' DDPMScheduler / DDIMScheduler).

Conventions (as ADM): t is an int64 tensor of step indices 0..T-1 with 0 the least noisy; schedule
values are gathered from float64 arrays and cast to float32; the model sees the step of the
*original* 1000-step chain even when sampling a respaced chain (`timestep_map`).
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UserError, choices
from ..progress import track
from .respace import respace_betas, space_timesteps

ModelFn = Callable[..., torch.Tensor]  # model_fn(x, t, **model_kwargs) -> (B, C or 2C, ...)


# ----------------------------------------------------------------------------------------------
# Small helpers shared by both objectives
# ----------------------------------------------------------------------------------------------


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def resolve_sampler(sampler: str | None, samplers: Sequence[str], default: str) -> str:
    """None -> the default; an unknown name -> UserError listing the valid ones."""
    if sampler is None:
        return default
    if sampler not in samplers:
        raise UserError(f"unknown sampler {sampler!r}; choose one of: {choices(samplers)}")
    return sampler


def initial_noise(
    shape: Sequence[int],
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    model_fn: object = None,
) -> torch.Tensor:
    """The starting point of a sampler: `noise` if given (checked against `shape`), else N(0, I).

    The device comes from, in order: `device`, the generator, the model's parameters, the CPU.
    """
    shape = tuple(int(s) for s in shape)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise UserError(f"noise has shape {tuple(noise.shape)} but the sample shape is {shape}")
        return noise
    if device is None and generator is not None:
        device = generator.device
    if device is None and isinstance(model_fn, torch.nn.Module):
        device = next(model_fn.parameters()).device
    return torch.randn(shape, generator=generator, device=device or "cpu")


# ----------------------------------------------------------------------------------------------
# Gaussian densities in the form the variational bound needs (ADM's diffusion_utils)
# ----------------------------------------------------------------------------------------------


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that ADM uses (kept for exact parity)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data scaled to [-1, 1] under a Gaussian.

    Each value owns a bin of width 2/255; the two edge bins extend to -inf / +inf.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


# ----------------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------------


class VarType(enum.Enum):
    """What the reverse-step variance is."""

    LEARNED_RANGE = "learned_range"  # model outputs v in [-1, 1]: log-interpolate posterior var .. beta
    FIXED_SMALL = "fixed_small"  # the posterior variance beta~_t
    FIXED_LARGE = "fixed_large"  # beta_t (ADM/DiT default without learned sigma)


class LossType(enum.Enum):
    """How the training loss combines its terms (ADM names; DiT uses MSE)."""

    MSE = "mse"  # mse + vb
    RESCALED_MSE = "rescaled_mse"  # mse + vb * T / 1000 (iDDPM's original scale)


def linear_beta_schedule(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """ADM's "linear" schedule, float64.

    beta_start / beta_end are the values for T = 1000; other T scale them by 1000 / T (as ADM's
    `get_named_beta_schedule("linear", T)`), so every T ends at about the same noise level.
    """
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


class GaussianDiffusion:
    """The forward process q, the model's reverse step p, the hybrid loss and the samplers.

    betas: (T,) float64. timestep_map: for a respaced chain, the original step index of each of its
    steps (what the model is told); None for the identity.
    """

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        *,
        var_type: VarType = VarType.LEARNED_RANGE,
        loss_type: LossType = LossType.MSE,
        timestep_map: np.ndarray | Sequence[int] | None = None,
    ):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise UserError(f"a diffusion needs at least 2 steps, got {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise UserError("betas must lie in (0, 1]; lower beta_end or raise num_timesteps")
        self.betas = betas
        self.var_type = VarType(var_type)
        self.loss_type = LossType(loss_type)
        self.num_timesteps = T = len(betas)
        self.timestep_map = np.arange(T) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        assert self.timestep_map.shape == (T,)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0). The posterior variance is 0 at t = 0, so its log takes the t = 1 value
        # there (ADM's "clipped" log variance).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Reverse-step variances: the ends of the learned range, and the fixed choices ("large" starts
        # at the posterior variance for a better decoder likelihood, as ADM).
        self.log_betas = np.log(betas)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.fixed_small_variance = self.posterior_variance
        self.fixed_small_log_variance = self.posterior_log_variance_clipped
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """The numpy table `name` as a tensor on `device`, copied once: float64 schedules become float32
        (ADM gathers in float64 and casts, which gives the same values), step maps int64."""
        key = (name, device)
        if key not in self._device_tables:
            arr = getattr(self, name)
            dtype = torch.long if arr.dtype.kind == "i" else torch.float32
            self._device_tables[key] = torch.as_tensor(arr, dtype=dtype, device=device)
        return self._device_tables[key]

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Table `name` at steps t, shaped (B, 1, ..., 1) to broadcast against ndim-d tensors."""
        return self._table(name, t.device)[t].reshape(-1, *([1] * (ndim - 1)))

    @property
    def learn_sigma(self) -> bool:
        return self.var_type is VarType.LEARNED_RANGE

    def respace(self, section_counts: str | int | Sequence[int]) -> GaussianDiffusion:
        """A shorter chain over the steps `space_timesteps` picks ("250", "ddim50", ...)."""
        betas, kept = respace_betas(self.alphas_cumprod, space_timesteps(self.num_timesteps, section_counts))
        return GaussianDiffusion(
            betas, var_type=self.var_type, loss_type=self.loss_type, timestep_map=self.timestep_map[kept]
        )

    # --- forward process -------------------------------------------------------------------------

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log variance of q(x_t | x_0)."""
        n = x_start.ndim
        mean = self._extract("sqrt_alphas_cumprod", t, n) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, n).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, n).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        n = x_start.ndim
        return (
            self._extract("sqrt_alphas_cumprod", t, n) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, n) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = (
            self._extract("posterior_mean_coef1", t, n) * x_start
            + self._extract("posterior_mean_coef2", t, n) * x_t
        )
        variance = self._extract("posterior_variance", t, n).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, n).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, n) * eps
        )

    def predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        n = x_t.ndim
        scale = self._extract("sqrt_recipm1_alphas_cumprod", t, n)
        return (self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart) / scale

    # --- the model's reverse step -----------------------------------------------------------------

    def call_model(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """model_fn(x, original step of t, **model_kwargs)."""
        steps = self._table("timestep_map", t.device)[t]
        return model_fn(x, steps, **(model_kwargs or {}))

    def split_output(
        self, model_output: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, variance values or None): a learned variance needs 2C output channels, a fixed one C."""
        C = x.shape[1]
        expected = 2 * C if self.learn_sigma else C
        if model_output.shape[1] != expected or model_output.shape[2:] != x.shape[2:]:
            raise UserError(
                f"model output {tuple(model_output.shape)} does not fit input {tuple(x.shape)}: "
                f"learn_sigma={self.learn_sigma} needs {expected} channels"
            )
        if self.learn_sigma:
            eps, var_values = model_output.split(C, dim=1)
            return eps, var_values
        return model_output, None

    def p_mean_variance_from_output(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a model output: dict of "mean", "variance", "log_variance", "pred_xstart"."""
        eps, var_values = self.split_output(model_output, x)
        n = x.ndim
        if var_values is not None:
            # The model's v in [-1, 1] interpolates the log variance between the posterior variance
            # (v = -1) and beta_t (v = +1). v is not clamped, as in ADM.
            min_log = self._extract("posterior_log_variance_clipped", t, n)
            max_log = self._extract("log_betas", t, n)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            prefix = self.var_type.value  # "fixed_small" / "fixed_large"
            variance = self._extract(f"{prefix}_variance", t, n).expand_as(x)
            log_variance = self._extract(f"{prefix}_log_variance", t, n).expand_as(x)

        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the model and return p(x_{t-1} | x_t) (see `p_mean_variance_from_output`)."""
        return self.p_mean_variance_from_output(
            self.call_model(model_fn, x, t, model_kwargs), x, t, clip_denoised
        )

    # --- training ---------------------------------------------------------------------------------

    def vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """One term of the variational bound, in bits per dimension, shape (B,).

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0; at t = 0 the negative log-likelihood
        of x_0 under the discretized Gaussian decoder p(x_0 | x_1).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        log_likelihood = discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        nats_to_bits = 1.0 / math.log(2.0)
        return torch.where(t == 0, -mean_flat(log_likelihood), mean_flat(kl)) * nats_to_bits

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The iDDPM hybrid loss at given steps: per-sample "loss", "mse" and (learned sigma) "vb", each (B,).

        mse = mean-flat (eps - eps_hat)^2. vb = `vb_terms_bpd` computed with the predicted mean
        DETACHED, so the bound trains only the variance and the mean is trained by the MSE alone.
        loss = mse + vb (LossType.MSE, DiT) or mse + vb * T / 1000 (RESCALED_MSE).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self.call_model(model_fn, x_t, t, model_kwargs)
        eps, var_values = self.split_output(model_output, x_t)

        terms: dict[str, torch.Tensor] = {}
        if var_values is not None:
            frozen_output = torch.cat([eps.detach(), var_values], dim=1)
            vb = self.vb_terms_bpd(frozen_output, x_start, x_t, t)
            if self.loss_type is LossType.RESCALED_MSE:
                vb = vb * (self.num_timesteps / 1000.0)  # iDDPM: keeps the vb term from swamping the mse
            terms["vb"] = vb
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # --- sampling ---------------------------------------------------------------------------------

    def p_sample(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (no noise at t = 0)."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, model_kwargs)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        eta: float = 0.0,
        clip_denoised: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        out = self.p_mean_variance(model_fn, x, t, clip_denoised, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])  # re-derived: consistent with clipping
        n = x.ndim
        abar = self._extract("alphas_cumprod", t, n)
        abar_prev = self._extract("alphas_cumprod_prev", t, n)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        sample = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (n - 1)))
            sample = sample + nonzero * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def sample_loop(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        *,
        sampler: str = "ddpm",
        eta: float = 0.0,
        clip_denoised: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Run the whole chain from x_T = noise down to x_0 with "ddpm" (ancestral) or "ddim" steps."""
        sampler = resolve_sampler(sampler, ("ddpm", "ddim"), "ddpm")
        x = noise
        for i in track(
            reversed(range(self.num_timesteps)), progress, f"{sampler} sampling", self.num_timesteps
        ):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            if sampler == "ddpm":
                out = self.p_sample(
                    model_fn,
                    x,
                    t,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                    generator=generator,
                )
            else:
                out = self.ddim_sample(
                    model_fn,
                    x,
                    t,
                    eta=eta,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                    generator=generator,
                )
            x = out["sample"]
        return x


# ----------------------------------------------------------------------------------------------
# The DDPM objective (the `Objective` interface of fcdm_lab.diffusion)
# ----------------------------------------------------------------------------------------------


class DDPMObjective:
    """Trains on the full T-step chain; samples on a respaced one (250 of 1000 steps by default)."""

    name = "ddpm"
    samplers: tuple[str, ...] = ("ddpm", "ddim")
    default_sampler = "ddpm"
    default_steps = 250

    def __init__(self, diffusion: GaussianDiffusion):
        self.diffusion = diffusion
        self._respaced: dict[str, GaussianDiffusion] = {}

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    def respaced(self, steps: int | str) -> GaussianDiffusion:
        """The (cached) sampling chain for `steps`: an int count or a spec ("250", "ddim50", "10,20")."""
        T = self.num_timesteps
        if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
            steps = int(steps)
        if isinstance(steps, bool) or not isinstance(steps, (int, str)):
            raise UserError(
                f"steps must be an int or a respacing string such as '250' or 'ddim50', got {steps!r}"
            )
        if isinstance(steps, int) and not 2 <= steps <= T:
            raise UserError(f"steps must be between 2 and {T} for the ddpm objective, got {steps}")
        key = str(steps).strip()
        if key not in self._respaced:
            self._respaced[key] = self.diffusion.respace(key)
        return self._respaced[key]

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: torch.Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Hybrid loss at t ~ U{0..T-1}; t then the noise are drawn from `generator`, in that order.

        Returns (B,) tensors "loss", "mse", "vb" (learned sigma only) and "t_frac" = t / T.
        """
        T = self.num_timesteps
        t = torch.randint(0, T, (x_start.shape[0],), generator=generator, device=x_start.device)
        noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        terms = self.diffusion.training_losses(model_fn, x_start, t, model_kwargs, noise=noise)
        terms["t_frac"] = t.to(torch.float32) / T
        return terms

    def sample(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        *,
        sampler: str | None = None,
        steps: int | str | None = None,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        clip_denoised: bool = False,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Samples of `shape` from noise (drawn from `generator` unless given) on a respaced chain.

        sampler "ddpm" (ancestral, default) or "ddim" (with `eta`); steps: respacing, default 250.
        clip_denoised=False as DiT does for latents; True clamps each x_0 prediction to [-1, 1].
        """
        sampler = resolve_sampler(sampler, self.samplers, self.default_sampler)
        if eta != 0.0 and sampler != "ddim":
            raise UserError(f"eta is a DDIM setting; sampler {sampler!r} takes no eta (use sampler 'ddim')")
        if eta < 0:
            raise UserError(f"eta must be >= 0, got {eta}")
        chain = self.respaced(self.default_steps if steps is None else steps)
        x = initial_noise(shape, noise, generator, device, model_fn)
        return chain.sample_loop(
            model_fn,
            x,
            sampler=sampler,
            eta=eta,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            generator=generator,
            progress=progress,
        )

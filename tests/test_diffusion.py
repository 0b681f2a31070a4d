"""The DDPM objective: schedules and steps against diffusers, the hybrid loss against a hand
computation, training on one batch, the samplers, respacing and classifier-free guidance."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import DDIMScheduler, DDPMScheduler

from fcdm_lab.diffusion import (
    OBJECTIVES,
    GaussianDiffusion,
    LossType,
    Objective,
    VarType,
    create_objective,
    guided_model_fn,
    linear_beta_schedule,
    space_timesteps,
)
from fcdm_lab.errors import UserError
from fcdm_lab.models.layers import GuidedModelMixin

T = 1000


def ddpm_scheduler(variance_type: str = "learned_range", **kwargs) -> DDPMScheduler:
    # The DiT recipe in diffusers' terms (its defaults clip x_0 and space timesteps differently).
    kwargs = {"timestep_spacing": "linspace", **kwargs}
    return DDPMScheduler(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type=variance_type,
        clip_sample=False,
        **kwargs,
    )


def in_float64(sched):
    """The scheduler with float64 alphas_cumprod, as ADM's.

    diffusers recomputes each step's beta as 1 - abar_t / abar_prev from float32 values, which is
    off by up to ~3e-4 (relative) at small t and moves a step by ~3e-4; in float64 the two codes
    agree to float32 rounding, so the comparisons below can be tight.
    """
    sched.betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed smooth function of (x, t) with 2C outputs: eps guess, then variance values in (-1, 1)."""
    s = torch.sin(t.float() / 137.0).reshape(-1, 1, 1, 1)
    eps = 0.3 * x * s + 0.1 * torch.cos(x)
    v = torch.tanh(x + s)
    return torch.cat([eps, v], dim=1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- schedule, forward process and single steps against diffusers ---------------------------------


def test_schedule_and_q_sample_match_diffusers():
    obj = create_objective("ddpm")
    d = obj.diffusion
    sched = ddpm_scheduler()
    assert d.betas.dtype == np.float64 and d.num_timesteps == T
    np.testing.assert_allclose(d.betas, sched.betas.double().numpy(), rtol=1e-6)
    # diffusers keeps alphas_cumprod in float32; ours are float64 as in ADM.
    np.testing.assert_allclose(d.alphas_cumprod, sched.alphas_cumprod.double().numpy(), rtol=1e-5)

    x0 = torch.randn(4, 3, 5, 5, generator=gen(0))
    noise = torch.randn(4, 3, 5, 5, generator=gen(1))
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(d.q_sample(x0, t, noise), sched.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_posterior_mean_and_variance_match_diffusers_fixed_small():
    # With a model that predicts x_0 exactly, diffusers' DDPM step is a draw from the posterior
    # q(x_{t-1} | x_t, x_0): mean + sqrt(posterior variance) * noise.
    d = GaussianDiffusion(linear_beta_schedule(T), var_type=VarType.FIXED_SMALL)
    sched = in_float64(ddpm_scheduler("fixed_small", prediction_type="sample"))
    x0 = torch.randn(2, 3, 4, 4, generator=gen(0))
    x_t = torch.randn(2, 3, 4, 4, generator=gen(1))
    for step in (1, 10, 500, 999):
        t = torch.full((2,), step)
        mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, t)
        torch.testing.assert_close(torch.exp(log_var), var, rtol=1e-5, atol=0)
        noise = torch.randn(x0.shape, generator=gen(step))
        expected = sched.step(x0, step, x_t, generator=gen(step)).prev_sample
        torch.testing.assert_close(mean + var.sqrt() * noise, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1000, 250])
def test_learned_range_step_matches_diffusers(steps):
    obj = create_objective("ddpm")
    chain = obj.respaced(steps)
    sched = in_float64(ddpm_scheduler("learned_range"))
    sched.set_timesteps(steps)
    # ADM's "250 of 1000" is diffusers' linspace spacing.
    np.testing.assert_array_equal(chain.timestep_map, sched.timesteps.numpy()[::-1])
    x = torch.randn(2, 3, 4, 4, generator=gen(0))
    for k in (1, 2, steps // 2, steps - 1):
        t = torch.full((2,), k)
        ours = chain.p_sample(toy_model, x, t, generator=gen(k))
        orig = int(chain.timestep_map[k])
        ref = sched.step(toy_model(x, torch.full((2,), orig)), orig, x, generator=gen(k))
        torch.testing.assert_close(ours["pred_xstart"], ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours["sample"], ref.prev_sample, rtol=1e-5, atol=1e-5)


def test_ddpm_250_sampling_loop_matches_diffusers():
    obj = create_objective("ddpm")
    noise = torch.randn(2, 3, 4, 4, generator=gen(0))
    ours = obj.sample(toy_model, noise.shape, noise=noise, steps=250, generator=gen(1))

    sched = in_float64(ddpm_scheduler("learned_range"))
    sched.set_timesteps(250)
    g, x = gen(1), noise
    for t in sched.timesteps:
        x = sched.step(toy_model(x, t.repeat(2)), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_loop_matches_diffusers(eta):
    obj = create_objective("ddpm")
    noise = torch.randn(2, 3, 4, 4, generator=gen(0))
    ours = obj.sample(
        toy_model, noise.shape, sampler="ddim", steps="ddim50", eta=eta, noise=noise, generator=gen(1)
    )

    sched = in_float64(
        DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    )
    sched.set_timesteps(50)
    np.testing.assert_array_equal(obj.respaced("ddim50").timestep_map, sched.timesteps.numpy()[::-1])
    g, x = gen(1), noise
    for t in sched.timesteps:
        eps = toy_model(x, t.repeat(2))[:, :3]
        x = sched.step(eps, t, x, eta=eta, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


# --- respacing ----------------------------------------------------------------------------------


def test_space_timesteps_forms():
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, 250) == space_timesteps(1000, "250")
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    # Sections: 300 steps cut in three 100-step sections, taking 10, 15, 20 steps from them.
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45 and steps[0] == 0 and steps[9] == 99 and steps[10] == 100 and steps[-1] == 299
    for bad in ("ddim999", "ddimX", "abc", "0", "2000"):
        with pytest.raises(UserError):
            space_timesteps(1000, bad)


def test_respaced_chain_keeps_alphas_cumprod():
    d = create_objective("ddpm").diffusion
    spaced = d.respace("250")
    assert spaced.num_timesteps == 250 and spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == 999
    np.testing.assert_allclose(spaced.alphas_cumprod, d.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    # beta_k = 1 - abar[t_k] / abar[t_{k-1}]
    abar = d.alphas_cumprod[spaced.timestep_map]
    np.testing.assert_allclose(spaced.betas[1:], 1 - abar[1:] / abar[:-1], rtol=1e-12)

    seen = []
    spaced.call_model(lambda x, t: seen.append(t) or x, torch.zeros(2, 1), torch.tensor([0, 249]))
    assert seen[0].tolist() == [0, 999]  # the model is told the original step


# --- the hybrid loss ----------------------------------------------------------------------------


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def test_hybrid_loss_matches_hand_computation():
    # Two samples, one at t = 0 (decoder NLL) and one at t = 500 (Gaussian KL); C = 1, 2x2 pixels.
    x0 = torch.tensor([[[[-1.0, 0.2], [1.0, -0.4]]], [[[0.5, -0.3], [0.9, 0.0]]]])
    noise = torch.tensor([[[[0.3, -1.2], [0.5, 0.8]]], [[[-0.7, 0.4], [1.1, -0.2]]]])
    eps_hat = noise + torch.tensor([[[[0.1, -0.2], [0.05, 0.3]]], [[[0.4, -0.1], [0.2, -0.5]]]])
    v_hat = torch.tensor([[[[-0.5, 0.0], [0.5, 0.9]]], [[[-0.9, 0.3], [0.0, 0.6]]]])
    t = torch.tensor([0, 500])
    output = torch.cat([eps_hat, v_hat], dim=1)

    d = create_objective("ddpm").diffusion
    terms = d.training_losses(lambda x, tt: output, x0, t, noise=noise)

    # Independent float64 computation from the DDPM / iDDPM formulas.
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    X0, N, E, V = (a.double().numpy()[:, 0] for a in (x0, noise, eps_hat, v_hat))
    expected_mse, expected_vb = [], []
    for i, step in enumerate(t.tolist()):
        ab, ab_prev, beta = abar[step], abar_prev[step], betas[step]
        x_t = math.sqrt(ab) * X0[i] + math.sqrt(1 - ab) * N[i]
        c1 = beta * math.sqrt(ab_prev) / (1 - ab)
        c2 = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
        x0_hat = (x_t - math.sqrt(1 - ab) * E[i]) / math.sqrt(ab)
        mean_hat = c1 * x0_hat + c2 * x_t
        min_log = math.log(post_var[max(step, 1)])  # the posterior variance is 0 at t = 0
        frac = (V[i] + 1) / 2
        var_hat = np.exp(frac * math.log(beta) + (1 - frac) * min_log)
        if step == 0:
            s = np.sqrt(var_hat)
            x = X0[i]
            upper = _normal_cdf((x + 1 / 255 - mean_hat) / s)
            lower = _normal_cdf((x - 1 / 255 - mean_hat) / s)
            prob = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
            vb_nats = -np.log(prob)
        else:
            mean_true = c1 * X0[i] + c2 * x_t
            var_true = post_var[step]
            vb_nats = 0.5 * (
                np.log(var_hat / var_true) + (var_true + (mean_true - mean_hat) ** 2) / var_hat - 1
            )
        expected_vb.append(vb_nats.mean() / math.log(2))
        expected_mse.append(((N[i] - E[i]) ** 2).mean())

    np.testing.assert_allclose(terms["mse"].double().numpy(), expected_mse, rtol=1e-6)
    # t = 0 uses ADM's tanh approximation of the normal CDF: allow 0.002 bit against the exact CDF.
    np.testing.assert_allclose(terms["vb"][0].item(), expected_vb[0], atol=2e-3)
    np.testing.assert_allclose(terms["vb"][1].item(), expected_vb[1], rtol=1e-4)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    d = create_objective("ddpm").diffusion
    x0 = torch.randn(4, 2, 3, 3, generator=gen(0))
    output = torch.randn(4, 4, 3, 3, generator=gen(1), requires_grad=True)
    terms = d.training_losses(lambda x, t: output, x0, torch.tensor([0, 3, 300, 999]))
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert grad_vb[:, :2].abs().max() == 0 and grad_vb[:, 2:].abs().max() > 0
    assert grad_mse[:, 2:].abs().max() == 0 and grad_mse[:, :2].abs().max() > 0


def test_rescaled_mse_scales_vb_by_t_over_1000():
    x0 = torch.randn(3, 1, 4, 4, generator=gen(0))
    noise = torch.randn(3, 1, 4, 4, generator=gen(1))
    t = torch.tensor([0, 40, 99])
    plain = GaussianDiffusion(linear_beta_schedule(100), loss_type=LossType.MSE)
    rescaled = GaussianDiffusion(linear_beta_schedule(100), loss_type=LossType.RESCALED_MSE)
    a = plain.training_losses(toy_model, x0, t, noise=noise)
    b = rescaled.training_losses(toy_model, x0, t, noise=noise)
    torch.testing.assert_close(b["vb"], a["vb"] * 0.1)
    torch.testing.assert_close(b["mse"], a["mse"])


def test_training_losses_paired_by_generator():
    obj = create_objective("ddpm")
    x0 = torch.randn(6, 3, 4, 4, generator=gen(0))
    a = obj.training_losses(toy_model, x0, generator=gen(7))
    b = obj.training_losses(toy_model, x0, generator=gen(7))
    assert set(a) == {"loss", "mse", "vb", "t_frac"}
    for key in a:
        assert a[key].shape == (6,)
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert ((a["t_frac"] >= 0) & (a["t_frac"] < 1)).all()
    # The generator draws t first, then the noise.
    g = gen(7)
    t = torch.randint(0, T, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(a["t_frac"], t.float() / T)
    torch.testing.assert_close(
        a["loss"], obj.diffusion.training_losses(toy_model, x0, t, noise=noise)["loss"]
    )


def test_fixed_variance_is_plain_mse_and_checks_channels():
    obj = create_objective("ddpm", learn_sigma=False)
    assert obj.diffusion.var_type is VarType.FIXED_LARGE
    x0 = torch.randn(2, 3, 4, 4, generator=gen(0))
    terms = obj.training_losses(lambda x, t: 0.5 * x, x0, generator=gen(1))
    assert set(terms) == {"loss", "mse", "t_frac"}
    torch.testing.assert_close(terms["loss"], terms["mse"])
    with pytest.raises(UserError, match="learn_sigma=False needs 3 channels"):
        obj.training_losses(toy_model, x0, generator=gen(1))
    with pytest.raises(UserError, match="learn_sigma=True needs 6 channels"):
        create_objective("ddpm").training_losses(lambda x, t: x, x0, generator=gen(1))


class TinyEpsNet(nn.Module):
    """Three 3x3 convs on (x, t / 1000); outputs eps and variance values (2C channels)."""

    def __init__(self, channels: int = 1, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tmap = (t.float() / 1000).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.net(torch.cat([x, tmap], dim=1))


def test_hybrid_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    obj = create_objective("ddpm")
    net = TinyEpsNet()
    x0 = torch.rand(8, 1, 8, 8, generator=gen(0)) * 2 - 1
    big = x0.repeat(8, 1, 1, 1)  # 64 fixed (t, noise) draws to measure the loss without noise

    def held_loss() -> tuple[float, float]:
        with torch.no_grad():
            terms = obj.training_losses(net, big, generator=gen(123))
        return terms["loss"].mean().item(), terms["mse"].mean().item()

    before = held_loss()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = gen(1)
    for _ in range(100):
        loss = obj.training_losses(net, x0, generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    assert after[0] < 0.6 * before[0], (before, after)
    assert after[1] < 0.6 * before[1], (before, after)


# --- samplers -----------------------------------------------------------------------------------


def test_sample_shapes_and_determinism():
    obj = create_objective("ddpm")
    net = toy_model  # bounded variance values; an untrained net's unbounded ones can blow up
    shape = (3, 3, 4, 4)
    for sampler in ("ddpm", "ddim"):
        out = obj.sample(net, shape, sampler=sampler, steps=10, generator=gen(0))
        assert out.shape == shape and torch.isfinite(out).all() and not out.requires_grad
    assert obj.default_sampler == "ddpm" and obj.samplers == ("ddpm", "ddim")

    noise = torch.randn(shape, generator=gen(5))
    a = obj.sample(net, shape, sampler="ddim", steps=10, noise=noise, generator=gen(1))
    b = obj.sample(net, shape, sampler="ddim", steps=10, noise=noise, generator=gen(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # eta = 0: the noise decides everything
    c = obj.sample(net, shape, sampler="ddpm", steps=10, noise=noise, generator=gen(1))
    d = obj.sample(net, shape, sampler="ddpm", steps=10, noise=noise, generator=gen(1))
    e = obj.sample(net, shape, sampler="ddpm", steps=10, noise=noise, generator=gen(2))
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert not torch.allclose(c, e)


def test_default_steps_and_clip_denoised():
    obj = create_objective("ddpm")
    calls = []

    def wild(x, t):  # a huge eps pushes x_0 predictions far outside [-1, 1]
        calls.append(int(t[0]))
        return torch.cat([torch.full_like(x, -50.0), torch.zeros_like(x)], dim=1)

    out = obj.sample(wild, (2, 1, 3, 3), generator=gen(0))
    assert len(calls) == 250 and calls[0] == 999 and calls[-1] == 0
    assert out.abs().max() > 1
    clipped = obj.sample(wild, (2, 1, 3, 3), steps=20, clip_denoised=True, generator=gen(0))
    assert clipped.abs().max() <= 1


def test_bad_names_and_settings_raise_user_error():
    with pytest.raises(UserError, match="ddpm, flow"):
        create_objective("edm")
    assert OBJECTIVES == ("ddpm", "flow")
    obj = create_objective("ddpm")
    assert isinstance(obj, Objective)
    with pytest.raises(UserError, match="ddpm, ddim"):
        obj.sample(toy_model, (1, 3, 2, 2), sampler="euler")
    for steps in (1, 5000, "ddim999", "fifty"):
        with pytest.raises(UserError):
            obj.sample(toy_model, (1, 3, 2, 2), steps=steps)
    with pytest.raises(UserError, match="eta"):
        obj.sample(toy_model, (1, 3, 2, 2), sampler="ddpm", eta=0.5)
    with pytest.raises(UserError, match="noise has shape"):
        obj.sample(toy_model, (1, 3, 2, 2), noise=torch.zeros(2, 3, 2, 2))
    with pytest.raises(UserError):
        create_objective("ddpm", num_timesteps=1)
    with pytest.raises(UserError):
        create_objective("ddpm", beta_start=0.03, beta_end=0.02)


# --- classifier-free guidance -------------------------------------------------------------------


class FakeClassModel(GuidedModelMixin, nn.Module):
    """Output (B, 2C, H, W) that depends on the label, with DiT's forward_with_cfg."""

    def __init__(self, num_classes: int = 10, in_channels: int = 4):
        super().__init__()
        self.config = SimpleNamespace(num_classes=num_classes, in_channels=in_channels)
        self.label_scale = nn.Parameter(torch.linspace(0.5, 2.0, num_classes + 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.label_scale[y].reshape(-1, 1, 1, 1)
        out = torch.cat([x * s + t.float().reshape(-1, 1, 1, 1) / 1000, torch.tanh(x) * s], dim=1)
        return out


def test_guided_model_fn():
    model = FakeClassModel()
    x = torch.randn(3, 4, 2, 2, generator=gen(0))
    t = torch.tensor([10, 500, 900])
    y = torch.tensor([1, 4, 7])
    torch.testing.assert_close(guided_model_fn(model, 1.0)(x, t, y), model(x, t, y))

    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 10))
    mixed = uncond + 4.0 * (cond - uncond)
    out = guided_model_fn(model, 4.0)(x, t, y)
    assert out.shape == cond.shape
    torch.testing.assert_close(out[:, :4], mixed[:, :4])
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])  # variance channels: conditional

    legacy = guided_model_fn(model, 4.0, guidance_channels=3)(x, t, y)
    torch.testing.assert_close(legacy[:, :3], mixed[:, :3])
    torch.testing.assert_close(legacy[:, 3:], cond[:, 3:])

    # Works as the model function of a sampler, labels passed through model_kwargs.
    obj = create_objective("ddpm")
    with torch.no_grad():
        samples = obj.sample(
            guided_model_fn(model, 1.5), (3, 4, 2, 2), steps=5, model_kwargs={"y": y}, generator=gen(0)
        )
    assert samples.shape == (3, 4, 2, 2)

    with pytest.raises(UserError, match="guidance_channels"):
        guided_model_fn(model, 2.0, guidance_channels=5)
    with pytest.raises(UserError, match="cfg_scale"):
        guided_model_fn(model, -1.0)

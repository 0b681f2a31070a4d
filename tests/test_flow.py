"""Flow matching: the interpolant and target, the time the model sees, the ODE samplers, and
learning a two-Gaussian mixture in 2-D."""

import math

import pytest
import torch
import torch.nn as nn

from fcdm_lab.diffusion import FlowMatching, Objective, create_objective
from fcdm_lab.errors import UserError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Recorder:
    """A model function that records what it is called with; outputs 2C channels (learned sigma)."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        return torch.cat([0.5 * x, torch.full_like(x, 99.0)], dim=1)


def test_training_losses_interpolant_target_and_time_scale():
    obj = create_objective("flow")
    assert isinstance(obj, FlowMatching) and isinstance(obj, Objective)
    assert obj.samplers == ("euler", "heun", "sde") and obj.default_sampler == "euler"
    x1 = torch.randn(5, 2, 3, 3, generator=gen(0))
    model = Recorder()
    terms = obj.training_losses(model, x1, generator=gen(4))
    assert set(terms) == {"loss", "mse", "t_frac"}
    assert all(v.shape == (5,) for v in terms.values())

    # The generator gives t ~ U(0, 1) first, then the noise x0.
    g = gen(4)
    t = torch.rand(5, generator=g)
    x0 = torch.randn(x1.shape, generator=g)
    tb = t.reshape(-1, 1, 1, 1)
    x_t = tb * x1 + (1 - tb) * x0
    ((seen_x, seen_t),) = model.calls
    torch.testing.assert_close(terms["t_frac"], t)
    torch.testing.assert_close(seen_t, t)  # the reference's time: t in [0, 1]
    torch.testing.assert_close(seen_x, x_t)
    # Only the first C channels are the velocity (the 99s are ignored); target x1 - x0.
    expected = ((0.5 * x_t - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["mse"], expected)

    again = obj.training_losses(Recorder(), x1, generator=gen(4))
    torch.testing.assert_close(again["loss"], terms["loss"], rtol=0, atol=0)

    scaled = create_objective("flow", time_scale=1000.0)  # the named setting: the DDPM range
    model = Recorder()
    scaled.training_losses(model, x1, generator=gen(4))
    torch.testing.assert_close(model.calls[0][1], t * 1000.0)


def test_euler_and_heun_integrate_from_0_to_1():
    # dx/dt = a x from x(0) = 1: n Euler steps give (1 + h a)^n, n Heun steps (1 + h a + (h a)^2 / 2)^n,
    # h = 1 / n; both tend to e^a, Heun with a much smaller error.
    obj = create_objective("flow")
    a, n = 0.8, 20
    times: list[float] = []

    def linear_field(x, t):
        times.extend(t.tolist())
        return a * x

    x0 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    euler = obj.sample(linear_field, x0.shape, noise=x0, sampler="euler", steps=n).item()
    assert len(times) == n and min(times) == 0.0 and max(times) == pytest.approx(0.95)  # t = 0 .. 0.95
    times.clear()
    heun = obj.sample(linear_field, x0.shape, noise=x0, sampler="heun", steps=n).item()
    assert len(times) == 2 * n and max(times) == pytest.approx(1.0)
    h = 1 / n
    assert euler == pytest.approx((1 + h * a) ** n, rel=1e-12)
    assert heun == pytest.approx((1 + h * a + (h * a) ** 2 / 2) ** n, rel=1e-12)
    assert abs(heun - math.exp(a)) < 0.02 * abs(euler - math.exp(a))


class PointMLP(nn.Module):
    """Velocity field for 2-D points shaped (B, 2, 1, 1); the time enters as t in [0, 1]."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.flatten(1), t[:, None]], dim=1)
        return self.net(h)[:, :, None, None]


MODES = torch.tensor([[2.0, 2.0], [-2.0, -2.0]])


def mixture(n: int, g: torch.Generator) -> torch.Tensor:
    which = torch.randint(0, 2, (n,), generator=g)
    return (MODES[which] + 0.2 * torch.randn(n, 2, generator=g))[:, :, None, None]


def test_flow_learns_two_gaussian_mixture():
    torch.manual_seed(0)
    obj = create_objective("flow")
    net = PointMLP()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g_data, g_obj = gen(0), gen(1)
    for _ in range(400):
        loss = obj.training_losses(net, mixture(256, g_data), generator=g_obj)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    net.eval()
    for sampler, steps in (("euler", 50), ("heun", 50), ("sde", 250)):
        x = obj.sample(net, (400, 2, 1, 1), sampler=sampler, steps=steps, generator=gen(2)).flatten(1)
        dist = torch.cdist(x, MODES)  # (400, 2)
        nearest = dist.argmin(dim=1)
        close = dist.min(dim=1).values < 0.75
        assert close.float().mean() > 0.9, (sampler, close.float().mean())
        share = nearest.float().mean().item()
        assert 0.3 < share < 0.7, (sampler, share)  # both modes, about half each


def test_flow_bad_settings_raise_user_error():
    obj = create_objective("flow")
    model = Recorder()
    with pytest.raises(UserError, match="euler, heun, sde"):
        obj.sample(model, (1, 2, 2, 2), sampler="ddim")
    with pytest.raises(UserError, match="eta"):
        obj.sample(model, (1, 2, 2, 2), eta=1.0)
    for steps in (0, -3, "ddim50", 2.5):
        with pytest.raises(UserError, match="steps"):
            obj.sample(model, (1, 2, 2, 2), steps=steps)
    with pytest.raises(UserError, match="channels"):
        obj.training_losses(lambda x, t: torch.cat([x, x, x], dim=1), torch.zeros(2, 2, 2, 2))
    with pytest.raises(UserError, match="time_scale"):
        create_objective("flow", time_scale=0.0)


def test_flow_sample_defaults_and_clip():
    obj = create_objective("flow")
    model = Recorder()
    out = obj.sample(model, (3, 2, 4, 4), generator=gen(0))
    assert out.shape == (3, 2, 4, 4) and len(model.calls) == 50
    obj.sample(model, (3, 2, 4, 4), steps="7", sampler="heun", generator=gen(0))  # a count from a CLI
    assert len(model.calls) == 50 + 14
    big = obj.sample(
        lambda x, t: torch.full_like(x, 5.0), (2, 1, 2, 2), steps=4, clip_denoised=True, generator=gen(0)
    )
    assert big.max() == 1.0


def _gaussian_velocity(m: float, s: float):
    """The exact velocity for data N(m, s^2) (per element) under x_t = t x1 + (1 - t) x0:
    E[x1 - x0 | x_t = x] = m + k(t) (x - t m), k = (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2)."""

    def k(t: float) -> float:
        return (t * s * s - (1 - t)) / (t * t * s * s + (1 - t) ** 2)

    def field(x, t):
        tt = t.reshape(-1, 1, 1, 1).to(x.dtype)
        kk = (tt * s * s - (1 - tt)) / (tt * tt * s * s + (1 - tt) ** 2)
        return m + kk * (x - tt * m)

    return field, k


def test_sde_sampler_matches_the_hand_computed_gaussian_chain():
    # With the exact velocity of Gaussian data every SDE step is affine in x plus Gaussian noise,
    # x' = a x + b + c w, so the sampler's output is exactly Gaussian with a mean and variance that a
    # two-line recurrence gives (SiT's sampler: Euler-Maruyama with w(t) = 1 - t on
    # linspace(0, 0.96, N), drift v + w * score, score = (t v - x) / (1 - t), then x + 0.04 * drift).
    m, s, N = 1.5, 0.5, 250
    field, k = _gaussian_velocity(m, s)
    seen: list[float] = []

    def model(x, t):
        seen.append(float(t[0]))
        return field(x, t)

    obj = create_objective("flow")  # time scale 1: the model sees t itself
    x = obj.sample(model, (200_000, 1, 1, 1), sampler="sde", steps=N, generator=gen(0)).double()
    assert len(seen) == N and seen[0] == 0.0
    assert seen[-2] == pytest.approx(0.96 * (N - 2) / (N - 1), abs=1e-7) and seen[-1] == pytest.approx(0.96)

    mean, var = 0.0, 1.0  # x0 ~ N(0, 1)
    dt = 0.96 / (N - 1)
    for i in range(N - 1):
        t = 0.96 * i / (N - 1)
        a = 1 + dt * ((1 + t) * k(t) - 1)
        b = dt * (1 + t) * m * (1 - k(t) * t)
        mean, var = a * mean + b, a * a * var + 2 * (1 - t) * dt
    t, h = 0.96, 0.04
    a, b = 1 + h * ((1 + t) * k(t) - 1), h * (1 + t) * m * (1 - k(t) * t)
    mean, var = a * mean + b, a * a * var
    n = x.numel()
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / n)
    assert abs(x.var().item() / var - 1) < 4 * math.sqrt(2 / n)
    # ... and that distribution is the data's, up to the discretisation
    assert mean == pytest.approx(m, abs=0.02) and math.sqrt(var) == pytest.approx(s, rel=0.05)


def test_sde_sampler_defaults_noise_and_steps():
    obj = create_objective("flow", flow_sampler="sde")
    assert obj.default_sampler == "sde" and obj.steps_for(None) == 250 and obj.steps_for("euler") == 50
    model = Recorder()
    a = obj.sample(model, (2, 2, 4, 4), steps=5, generator=gen(3))
    assert len(model.calls) == 5
    b = obj.sample(model, (2, 2, 4, 4), steps=5, generator=gen(3))
    c = obj.sample(model, (2, 2, 4, 4), steps=5, generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)  # the per-step noise comes from the generator
    with pytest.raises(UserError, match="steps >= 2"):
        obj.sample(model, (1, 2, 2, 2), steps=1)

"""The held-out loss (eval/heldout.py): the training objective's own loss of a model on fixed held-out
(image, t, noise) triples. The triples depend on the evaluation seed only (common random numbers:
not on the model, the variant or the training seed), t is stratified, the value equals a hand
computation, the flow objective works, the hook logs along training and at the end, and a latent
store's held-out split is data.test_path, disjoint from the training store."""
import copy
import math

import numpy as np
import pytest
import torch

from fcdm_lab.config import config_from_dict
from fcdm_lab.data.build import build_dataset
from fcdm_lab.diffusion import create_objective
from fcdm_lab.errors import UserError
from fcdm_lab.eval.heldout import (HeldoutLoss, HeldoutSet, HeldoutSettings, check_heldout_request, heldout_loss,
                                   time_quantiles)
from fcdm_lab.eval.metrics import HELDOUT_METRICS, check_metric_names, lower_is_better, plan_metrics
from fcdm_lab.models.build import build_model
from fcdm_lab.models.info import data_config
from fcdm_lab.training.trainer import train

QUARTERS = ("val_loss_q1", "val_loss_q2", "val_loss_q3", "val_loss_q4")


def tiny(**sections):
    """A ~100k-parameter FCDM on the 8x8 digits (the trainer tests' tiny run), sections merged in."""
    d = {"name": "heldout-test", "model": {"name": "FCDM", "L": 1, "C": 8},
         "data": {"name": "digits"},
         "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 2, "ckpt_every": 6, "keep_last": 1,
                   "ema_decay": 0.99, "ema_warmup": True, "threads": 1},
         "eval": {"sampler": "ddim", "steps": 2, "heldout_images": 40, "heldout_draws": 4}}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return config_from_dict(d)


def model_for(cfg, seed=0, channels=1, size=8):
    """The config's model with every weight drawn at random (a fresh FCDM's output layers are zero)."""
    torch.manual_seed(seed)
    model, _ = build_model(cfg.model, input_size=size, in_channels=channels, num_classes=10)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def objective(cfg):
    d = cfg.diffusion
    return create_objective(d.objective, num_timesteps=d.num_timesteps, beta_start=d.beta_start,
                            beta_end=d.beta_end, learn_sigma=cfg.model.learn_sigma, time_scale=d.time_scale)


class Spy(torch.nn.Module):
    """A model that records what it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return self.model(x, t, y=y)


# ---------------------------------------------------------------------------------------------

def test_metric_names_are_valid_lower_is_better_and_never_sampled():
    assert check_metric_names(["val_loss", "val_mse", "val_vb", *QUARTERS, "fid_digits"])
    assert all(lower_is_better(m) for m in HELDOUT_METRICS)
    plan = plan_metrics(["val_loss", "val_loss_q2", "class_acc_digits"])
    assert plan["heldout"] == ["val_loss", "val_loss_q2"]  # torch-fidelity gets none of them
    assert plan["digits"] == [] and plan["inception"] == [] and plan["labels"] == "digits"


def test_two_copies_of_a_model_give_the_same_value_with_every_term():
    cfg = tiny()
    model = model_for(cfg)
    a = heldout_loss(model, cfg)
    b = heldout_loss(copy.deepcopy(model), cfg)
    c = heldout_loss(model_for(cfg), cfg)  # built again from the same seed
    assert a == b == c
    assert set(a) == {"val_loss", "val_mse", "val_vb", *QUARTERS}
    # float32 sums in another order: equal to float32 precision
    assert a["val_loss"] == pytest.approx(a["val_mse"] + a["val_vb"], rel=1e-6)
    assert a["val_loss"] == pytest.approx(sum(a[q] for q in QUARTERS) / 4, rel=1e-6)  # equal draws per quarter
    assert all(math.isfinite(v) for v in a.values())
    other = heldout_loss(model_for(cfg, seed=1), cfg)
    assert other["val_loss"] != a["val_loss"]


def test_the_triples_do_not_depend_on_the_model_the_variant_or_the_training_seed():
    base = tiny()
    variant = tiny(model={"block": {"family": "convnext", "mixer": "cca"}}, train={"seed": 7})
    bigger = tiny(model={"C": 16}, train={"seed": 3})
    sets = [HeldoutSet.from_config(c) for c in (base, variant, bigger)]
    obj = objective(base)
    ref = list(sets[0].batches(obj, batch_size=16))
    for s in sets[1:]:
        for got, want in zip(s.batches(obj, batch_size=16), ref, strict=True):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # what the models are fed: the same noisy inputs, steps and labels for every model
    spies = [Spy(model_for(c, seed=i)) for i, c in enumerate((base, variant, bigger))]
    for spy, s in zip(spies, sets):
        s.loss(spy, obj)
    for spy in spies[1:]:
        assert len(spy.calls) == len(spies[0].calls)
        for got, want in zip(spy.calls, spies[0].calls):
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    # another evaluation seed draws other triples
    other = next(HeldoutSet.from_config(tiny(eval={"heldout_seed": 1})).batches(obj, batch_size=16))
    assert not torch.equal(other["noise"], ref[0]["noise"])


def test_t_is_stratified_and_the_subset_is_fixed():
    cfg = tiny(eval={"heldout_images": 50, "heldout_draws": 8})
    hold = HeldoutSet.from_config(cfg)
    n, K = 50, 8
    assert len(hold) == n * K and hold.u.shape == (n, K)
    # each image's draws cover the K strata of [0, 1) once; together they are the evenly spaced grid
    assert torch.equal((hold.u * K).floor().long(), torch.arange(K).expand(n, K))
    grid = (torch.arange(n * K, dtype=torch.float64) + 0.5) / (n * K)
    assert torch.allclose(hold.u.reshape(-1).sort().values, grid, atol=1e-12)
    # ddpm: t = floor(u T), again one per stratum of 0..T-1 for every image
    t = torch.cat([b["t"] for b in hold.batches(objective(cfg))]).reshape(n, K)
    assert torch.equal(t * K // 1000, torch.arange(K).expand(n, K))
    # 50 of the 297 digits, the same ones every time, chosen by the seed
    assert len(hold.indices) == 50 and torch.equal(hold.indices, hold.indices.sort().values)
    assert torch.equal(HeldoutSet.from_config(cfg).indices, hold.indices)
    assert not torch.equal(HeldoutSet.from_config(tiny(eval={"heldout_images": 50, "heldout_seed": 5})).indices,
                           hold.indices)
    assert len(HeldoutSet.from_config(tiny(eval={"heldout_images": 1000})).indices) == 297  # all of a small split
    assert torch.equal(time_quantiles(n, K, 0), hold.u)


def test_the_value_is_the_hybrid_loss_computed_by_hand():
    """iDDPM's mse + vb written out in float64 numpy from the DDPM formulas (not the objective's code),
    on the same triples."""
    cfg = tiny(eval={"heldout_images": 3, "heldout_draws": 4})
    model = model_for(cfg, seed=2)
    hold = HeldoutSet.from_config(cfg)
    got = hold.loss(model, objective(cfg))

    T = 1000
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef1, coef2 = betas * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    losses, mses, vbs, quarters = [], [], [], []
    for b in hold.batches(objective(cfg), batch_size=4):
        x, noise, y, t = b["x"].double().numpy(), b["noise"].double().numpy(), b["y"], b["t"].numpy()
        assert (t > 0).all()  # the decoder term at t = 0 is not in this hand computation
        s = (slice(None), None, None, None)
        ts = t[s]
        x_t = np.sqrt(abar[t])[s] * x + np.sqrt(1 - abar[t])[s] * noise
        with torch.no_grad():
            out = model(torch.from_numpy(x_t).float(), torch.from_numpy(t), y=y).double().numpy()
        eps, v = out[:, :1], out[:, 1:]
        mse = ((noise - eps) ** 2).mean(axis=(1, 2, 3))
        x0_hat = np.sqrt(1 / abar[ts]) * x_t - np.sqrt(1 / abar[ts] - 1) * eps
        mean_hat = coef1[ts] * x0_hat + coef2[ts] * x_t
        logvar_hat = (v + 1) / 2 * np.log(betas[ts]) + (1 - v) / 2 * post_logvar[ts]
        mean_true, logvar_true = coef1[ts] * x + coef2[ts] * x_t, post_logvar[ts]
        kl = 0.5 * (-1 + logvar_hat - logvar_true + np.exp(logvar_true - logvar_hat)
                    + (mean_true - mean_hat) ** 2 * np.exp(-logvar_hat))
        vb = kl.mean(axis=(1, 2, 3)) / np.log(2)
        losses += list(mse + vb)
        mses += list(mse)
        vbs += list(vb)
        quarters += list(t * 4 // T)
    losses, quarters = np.array(losses), np.array(quarters)
    assert len(losses) == 12
    assert got["val_loss"] == pytest.approx(losses.mean(), rel=2e-4)
    assert got["val_mse"] == pytest.approx(np.mean(mses), rel=2e-4)
    assert got["val_vb"] == pytest.approx(np.mean(vbs), rel=2e-4, abs=1e-7)
    for q in range(4):
        assert got[f"val_loss_q{q + 1}"] == pytest.approx(losses[quarters == q].mean(), rel=2e-4)


def test_the_flow_objective_scores_the_velocity_mse():
    cfg = tiny(diffusion={"objective": "flow", "time_scale": 1000.0}, eval={"heldout_images": 4, "heldout_draws": 4})
    model = model_for(cfg, seed=3)
    hold = HeldoutSet.from_config(cfg)
    obj = objective(cfg)
    got = hold.loss(model, obj)
    assert set(got) == {"val_loss", *QUARTERS}
    expected = []
    for b in hold.batches(obj):
        t = b["t"]
        assert t.dtype == torch.float32 and torch.equal((t * 4).floor(), torch.arange(4.0).repeat(4))
        tt = t[:, None, None, None]
        x_t, target = tt * b["x"] + (1 - tt) * b["noise"], b["x"] - b["noise"]
        with torch.no_grad():
            v = model(x_t, t * 1000.0, y=b["y"])[:, :1]
        expected.append(((v - target) ** 2).mean(dim=(1, 2, 3)).double())
    assert got["val_loss"] == pytest.approx(float(torch.cat(expected).mean()), rel=1e-6)
    with pytest.raises(UserError, match="val_vb needs the ddpm objective"):
        check_heldout_request(cfg, ["val_loss", "val_vb"])


def test_the_model_is_scored_in_eval_mode_and_left_as_it_was():
    cfg = tiny(model={"class_dropout_prob": 0.5}, eval={"heldout_images": 10, "heldout_draws": 2})
    model = model_for(cfg).train()
    first = heldout_loss(model, cfg)
    assert model.training  # restored
    assert heldout_loss(model, cfg) == first  # no label dropout draws: the conditional loss, every time


class Logged:
    def __init__(self):
        self.calls = []

    def __call__(self, metrics, step):
        self.calls.append((step, dict(metrics)))


def test_the_hook_logs_every_n_steps_and_at_the_end(tmp_path):
    cfg = tiny(eval={"heldout_every": 2, "heldout_images": 20, "heldout_draws": 2})
    log = Logged()
    hook = HeldoutLoss(log_metrics=log)
    result = train(cfg, tmp_path / "run", hooks=[hook], progress=False)
    assert [s for s, _ in log.calls] == [2, 4, 6]  # the last step once (by on_end)
    assert all({"val_loss", "val_mse", "val_vb", "heldout.wall_time_s"} <= set(m) for _, m in log.calls)
    assert hook.final_step == 6 and hook.final == {k: v for k, v in log.calls[-1][1].items() if k.startswith("val")}
    assert hook.final == heldout_loss(result.ema_model, cfg)  # the EMA model, as evaluated afterwards
    # resumed with nothing left to do: computed again, not logged again at a logged step
    again = HeldoutLoss(log_metrics=log, logged_through=6)
    train(cfg, tmp_path / "run", resume="latest", hooks=[again], progress=False)
    assert [s for s, _ in log.calls] == [2, 4, 6] and again.final == hook.final


def test_run_experiment_logs_and_returns_val_loss_without_sampling(store, tmp_path, monkeypatch):
    import fcdm_lab.runner as runner
    from fcdm_lab.tracking.client import tracked_run

    def no_sampling(*a, **k):
        raise AssertionError("val_loss alone must not sample or call torch-fidelity")

    monkeypatch.setattr(runner, "evaluate_model", no_sampling)
    cfg = tiny(eval={"metrics": ["val_loss"], "heldout_every": 3, "heldout_images": 20, "heldout_draws": 2},
               train={"steps": 4})
    with tracked_run("t") as tracker:
        out = runner.run_experiment(tracker, cfg, tmp_path / "run", evaluate=True, progress=False)
    assert set(out.metrics) == {"val_loss", "val_mse", "val_vb", *QUARTERS}
    history = store.get_metric_history(tracker.run_id, "val_loss")
    assert [m.step for m in history] == [3, 4] and history[-1].value == pytest.approx(out.metrics["val_loss"])
    assert store.get_run(tracker.run_id).data.tags["eval.weights"] == "ema"  # an evaluated run (rerun evaluates too)
    # not evaluating: still logged at the end, nothing returned
    with tracked_run("u") as tracker:
        out = runner.run_experiment(tracker, tiny(train={"steps": 2}), tmp_path / "run2", progress=False)
    assert out.metrics == {} and [m.step for m in store.get_metric_history(tracker.run_id, "val_loss")] == [2]


def test_bad_settings_and_impossible_requests_are_user_errors():
    with pytest.raises(UserError, match="eval.heldout_draws must be an integer >= 1"):
        HeldoutSettings.from_config(tiny(eval={"heldout_draws": 0}))
    with pytest.raises(UserError, match="heldout_images = 0"):
        check_heldout_request(tiny(eval={"heldout_images": 0}), ["val_loss"])
    with pytest.raises(UserError, match="val_vb needs"):
        check_heldout_request(tiny(model={"learn_sigma": False}), ["val_vb"])
    check_heldout_request(tiny(), ["val_loss", "val_vb", "fid_digits"])


def write_store(path, seed, n=24):
    from fcdm_lab.data.latents import write_latent_store

    rng = np.random.default_rng(seed)
    write_latent_store(str(path), [(rng.standard_normal((n, 4, 8, 8)).astype(np.float32), np.arange(n) % 10)],
                       {"vae": "none", "scale_factor": 0.18215, "flip": False, "num_classes": 10}, dtype="float32")


def test_a_latent_store_is_held_out_by_its_test_path(tmp_path):
    write_store(tmp_path / "train", seed=0)
    write_store(tmp_path / "val", seed=1, n=30)
    data = {"name": "latents", "path": str(tmp_path / "train"), "test_path": str(tmp_path / "val")}
    cfg = tiny(data=data, eval={"heldout_images": 10, "heldout_draws": 2})
    hold = HeldoutSet.from_config(cfg)
    assert len(hold.dataset) == 30 and len(hold.indices) == 10 and hold.info["channels"] == 4
    from fcdm_lab.data.latents import LatentStore

    train_items = {LatentStore(str(tmp_path / "train"))[i][0].numpy().tobytes() for i in range(24)}
    assert not any(hold.dataset[int(i)][0].numpy().tobytes() in train_items for i in hold.indices)  # disjoint
    values = hold.loss(model_for(cfg, channels=4), objective(cfg))
    assert math.isfinite(values["val_loss"])

    no_test = tiny(data={"name": "latents", "path": str(tmp_path / "train")})
    with pytest.raises(UserError, match="no held-out split for data 'latents': set data.test_path"):
        check_heldout_request(no_test, ["val_loss"])
    same = tiny(data={**data, "test_path": str(tmp_path / "train")})
    with pytest.raises(UserError, match="data.test_path is data.path"):
        HeldoutSet.from_config(same)
    import shutil

    shutil.copytree(tmp_path / "train", tmp_path / "copy")
    copied = tiny(data={**data, "test_path": str(tmp_path / "copy")})
    train_info = build_dataset(data_config(copied), "train")[1]
    with pytest.raises(UserError, match="holds the same data as data.path"):
        HeldoutSet.from_config(copied, train_fingerprint=train_info["fingerprint"])  # as the training hook does
    with pytest.raises(UserError, match="holds the same data as data.path"):
        train(copied, tmp_path / "run0", hooks=[HeldoutLoss(required=True)], progress=False)

    # a latent run without a held-out store trains, warns, and logs no held-out loss
    log = Logged()
    cfg = tiny(data={"name": "latents", "path": str(tmp_path / "train")}, train={"steps": 2, "ckpt_every": 2})
    with pytest.warns(UserWarning, match="held-out loss off"):
        train(cfg, tmp_path / "run", hooks=[HeldoutLoss(log_metrics=log)], progress=False)
    assert log.calls == []
    with pytest.raises(UserError, match="set data.test_path"):  # unless val_loss is required
        train(cfg, tmp_path / "run2", hooks=[HeldoutLoss(required=True)], progress=False)


def test_a_heldout_fraction_carves_a_fixed_disjoint_split_from_the_training_store(tmp_path):
    """data.heldout_fraction without a second store: that share of data.path (a fixed permutation, not
    the store's last items) is the held-out split and training leaves it out; the same items for every
    run; refused beside data.test_path, for datasets with their own test split, and out of range."""
    write_store(tmp_path / "train", seed=0, n=40)
    data = {"name": "latents", "path": str(tmp_path / "train"), "heldout_fraction": 0.1}
    train_set, train_info = build_dataset(data, "train")
    test_set, test_info = build_dataset(data, "test")
    assert (len(train_set), len(test_set)) == (36, 4) and train_info["num_items"] == 36
    assert sorted(train_set.indices + test_set.indices) == list(range(40))          # disjoint, nothing lost
    assert test_set.indices != [36, 37, 38, 39] and test_set.indices == sorted(test_set.indices)
    assert build_dataset(data, "test")[0].indices == test_set.indices               # fixed, run to run
    whole = build_dataset({"name": "latents", "path": str(tmp_path / "train")}, "train")[1]["fingerprint"]
    assert len({whole, train_info["fingerprint"], test_info["fingerprint"]}) == 3   # what a run logs differs

    cfg = tiny(data=data, eval={"heldout_images": 10, "heldout_draws": 2})
    check_heldout_request(cfg, ["val_loss"])
    hold = HeldoutSet.from_config(cfg, train_fingerprint=train_info["fingerprint"])
    assert len(hold.dataset) == 4 and math.isfinite(hold.loss(model_for(cfg, channels=4), objective(cfg))["val_loss"])

    log = Logged()
    cfg = tiny(data=data, train={"steps": 2, "ckpt_every": 2}, eval={"heldout_draws": 2})
    train(cfg, tmp_path / "run", hooks=[HeldoutLoss(log_metrics=log, required=True)], progress=False)
    assert "val_loss" in log.calls[-1][1]

    write_store(tmp_path / "val", seed=1)
    for bad, message in (({**data, "test_path": str(tmp_path / "val")}, "set one of them"),
                         ({"name": "digits", "heldout_fraction": 0.1}, "has its own test split"),
                         ({**data, "heldout_fraction": 0.5}, r"in \[0, 0.5\)")):
        with pytest.raises(UserError, match=message):
            build_dataset(bad, "train")
    with pytest.raises(UserError, match="data.heldout_fraction"):
        tiny(data={**data, "heldout_fraction": -0.1})

"""The reference implementation's protocol around the model (issue 8): label dropout per level,
reference checkpoints recognised from their args, the flow objective end to end."""
import argparse
import math

import pytest
import torch

from fcdm_lab.config import load_experiment
from fcdm_lab.errors import UserError
from fcdm_lab.models import create_model


def _dropped_levels(mode: str, n: int, p: float = 0.1) -> torch.Tensor:
    """(n, 3) bool: which of the three label embedders saw the null label for n training samples."""
    torch.manual_seed(0)
    model = create_model("FCDM", input_size=8, in_channels=1, num_classes=10, L=1, C=8,
                         class_dropout_prob=p, label_dropout=mode).train()
    seen = []
    hooks = [getattr(model, f"y_embedder_{i}").embedding_table.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0] == 10)) for i in (1, 2, 3)]
    with torch.no_grad():
        model.condition(torch.zeros(n), torch.randint(0, 10, (n,)))
    for h in hooks:
        h.remove()
    return torch.stack(seen, dim=1)


@pytest.mark.parametrize("mode", ["per_level", "shared"])
def test_label_dropout_fractions_over_many_draws(mode):
    n, p = 400_000, 0.1
    dropped = _dropped_levels(mode, n, p).sum(dim=1)
    fully, partly = (dropped == 3).float().mean().item(), ((dropped > 0) & (dropped < 3)).float().mean().item()
    if mode == "per_level":  # independent draws: p^3 fully, 1 - (1-p)^3 - p^3 partly
        expect_fully, expect_partly = p ** 3, 1 - (1 - p) ** 3 - p ** 3
    else:                    # one draw for all three levels
        expect_fully, expect_partly = p, 0.0
    for got, want in ((fully, expect_fully), (partly, expect_partly)):
        assert abs(got - want) <= 5 * math.sqrt(max(want * (1 - want), 1e-12) / n), (mode, got, want)
    # each level on its own still drops with probability p
    per_level = _dropped_levels(mode, n, p).float().mean(dim=0)
    assert torch.allclose(per_level, torch.full((3,), p), atol=5 * math.sqrt(p * (1 - p) / n))


def test_label_dropout_setting_reaches_the_model_and_is_checked():
    assert load_experiment("tiny-digits").model.label_dropout == "shared"
    with pytest.raises(UserError, match="model.label_dropout.*per_level, shared"):
        load_experiment("tiny-digits", {"model.label_dropout": "independent"})
    with pytest.raises(UserError, match="label_dropout"):
        create_model("FCDM", input_size=8, in_channels=1, num_classes=10, L=1, C=8, label_dropout="x")
    # eval mode never drops; the same labels give the same conditioning at every level
    model = create_model("FCDM", input_size=8, in_channels=1, num_classes=10, L=1, C=8).eval()
    assert model.config.label_dropout == "per_level"  # the reference's FCDM
    y = torch.arange(10)
    c_a, c_b = model.condition(torch.zeros(10), y), model.condition(torch.zeros(10), y)
    assert all(torch.equal(a, b) for a, b in zip(c_a, c_b))


# ---- reference checkpoints: the objective from their args, num_classes without a null row ------------

def _tiny_fcdm(in_channels=3, num_classes=4, dropout=0.1, learn_sigma=True, seed=0):
    torch.manual_seed(seed)
    return create_model("FCDM", input_size=8, in_channels=in_channels, num_classes=num_classes, L=1, C=8,
                        class_dropout_prob=dropout, learn_sigma=learn_sigma)


def _save_reference(path, model, **args):
    sd = model.state_dict()
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(**args)}, path)
    return path


def test_reference_flow_checkpoint_samples_as_flow_without_flags(tmp_path):
    from fcdm_lab.diffusion import FlowMatching
    from fcdm_lab.inference.checkpoints import load_checkpoint, objective_for
    from fcdm_lab.inference.samples import sample_checkpoint

    # the reference's flow runs: learn_sigma=False, args with the transport settings
    model = _tiny_fcdm(learn_sigma=False)
    path = _save_reference(tmp_path / "flow.pt", model, num_classes=4, path_type="Linear", prediction="velocity",
                           loss_weight=None, train_eps=None, sample_eps=None)
    loaded, cfg, info = load_checkpoint(path)
    assert cfg is None and info["diffusion"] == {"objective": "flow", "time_scale": 1.0, "sampler": "sde",
                                                 "source": "reference args"}
    obj = objective_for(cfg, loaded, info)
    assert isinstance(obj, FlowMatching) and obj.time_scale == 1.0 and obj.default_sampler == "sde"
    res = sample_checkpoint(path, tmp_path / "s", num=2, steps=3, batch_size=2, progress=False)
    assert (res["objective"], res["time_scale"], res["sampler"], res["diffusion_source"]) == (
        "flow", 1.0, "sde", "reference args")
    # explicit overrides win
    ddpm = objective_for(cfg, loaded, info, objective="ddpm")
    assert ddpm.name == "ddpm"
    assert objective_for(cfg, loaded, info, time_scale=1000.0).time_scale == 1000.0
    with pytest.raises(UserError, match="unknown objective"):
        objective_for(cfg, loaded, info, objective="edm")
    # a DDPM reference checkpoint (no flow args) stays DDPM
    _save_reference(tmp_path / "ddpm.pt", _tiny_fcdm(), num_classes=4, image_size=64)
    _, _, info = load_checkpoint(tmp_path / "ddpm.pt")
    assert info["diffusion"]["objective"] == "ddpm" and info["model_info"]["kwargs"]["input_size"] == 8


def test_num_classes_without_a_null_row(tmp_path):
    from fcdm_lab.inference.checkpoints import load_checkpoint

    model = _tiny_fcdm(num_classes=4, dropout=0.0)  # no label dropout: a 4-row table, no null class
    assert model.y_embedder_1.embedding_table.num_embeddings == 4
    loaded, _, info = load_checkpoint(_save_reference(tmp_path / "a.pt", model, num_classes=4))
    assert loaded.config.num_classes == 4 and info["model_info"]["kwargs"]["class_dropout_prob"] == 0.0
    loaded, _, _ = load_checkpoint(_save_reference(tmp_path / "b.pt", _tiny_fcdm(num_classes=4), num_classes=4))
    assert loaded.config.num_classes == 4 and loaded.y_embedder_1.embedding_table.num_embeddings == 5
    with pytest.raises(UserError, match="num_classes = 7"):
        load_checkpoint(_save_reference(tmp_path / "c.pt", model, num_classes=7))


def test_flow_model_trained_with_time_scale_1_samples_with_every_sampler(tmp_path):
    from fcdm_lab.inference.checkpoints import load_checkpoint, objective_for
    from fcdm_lab.inference.generation import generate
    from fcdm_lab.training.trainer import train

    cfg = load_experiment("tiny-digits", {"diffusion.objective": "flow", "train.steps": 20, "train.log_every": 10,
                                          "train.ckpt_every": 20, "train.sample_every": 0, "model.C": 16,
                                          "eval.sampler": "sde"})
    assert cfg.diffusion.time_scale == 1.0
    result = train(cfg, tmp_path / "run")
    model, loaded_cfg, info = load_checkpoint(result.checkpoint)
    assert info["diffusion"]["source"] == "config" and info["diffusion"]["time_scale"] == 1.0
    obj = objective_for(loaded_cfg, model, info)
    assert obj.name == "flow" and obj.time_scale == 1.0
    for sampler, steps in (("euler", 4), ("heun", 4), ("sde", 5)):
        images, labels = generate(model, obj, num=6, sampler=sampler, steps=steps, batch_size=3, progress=False)
        assert images.shape == (6, 1, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [0, 1, 2, 3, 4, 5]
        again, _ = generate(model, obj, num=6, sampler=sampler, steps=steps, batch_size=3, progress=False)
        assert torch.equal(images, again)


# ---- the ADM protocol: FID from the reference batch's statistics, resumable sharded sampling -----------

@pytest.fixture
def standin_inception(tmp_path, monkeypatch):
    """torch-fidelity's Inception replaced by a cheap stand-in (same contract); returns its weights file."""
    from _fidelity_standin import StandInInception
    from fcdm_lab.eval import fidelity

    monkeypatch.setattr(fidelity, "INCEPTION_NETWORK", StandInInception)
    return StandInInception.save_weights(tmp_path / "standin-inception.pth")


def _standin_features(images: torch.Tensor):
    from _fidelity_standin import StandInInception

    net = StandInInception("inception-v3-compat", ["2048"])
    with torch.no_grad():
        return net(images)[0].double().numpy()


def _closed_form_fid(mu1, s1, mu2, s2) -> float:
    import numpy as np
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_evaluate_adm_protocol_end_to_end_uses_the_reference_statistics(tmp_path, standin_inception):
    import numpy as np

    from fcdm_lab.eval.evaluate import evaluate_checkpoint
    from fcdm_lab.eval.samples_io import load_samples

    ckpt = _save_reference(tmp_path / "ref.pt", _tiny_fcdm(), num_classes=4)
    # a synthetic ADM reference batch: images, and mu/sigma that are NOT those images' statistics
    g = np.random.default_rng(0)
    a = g.normal(size=(64, 64)) / 8
    ref_mu, ref_sigma = g.normal(size=64) / 4, a @ a.T + 0.01 * np.eye(64)
    ref_images = g.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    reference = tmp_path / "VIRTUAL_ref.npz"
    np.savez(reference, arr_0=ref_images, mu=ref_mu, sigma=ref_sigma)

    out = tmp_path / "adm"
    values = evaluate_checkpoint(ckpt, protocol="adm", reference=str(reference), num_samples=40, steps=4,
                                 batch_size=20, out_dir=out, inception_weights=standin_inception, track=False,
                                 progress=False)
    assert set(values) == {"fid40", "is40", "is40_std", "precision40", "recall40"}
    with np.load(out / "samples.npz") as data:
        assert "arr" in data.files and data["arr"].shape == (40, 32, 32, 3)  # the reference's key
        labels = data["labels"]
    assert len(set(labels.tolist())) > 1 and labels.tolist() != [i % 4 for i in range(40)]  # random labels
    feats = _standin_features(load_samples(out / "samples.npz"))
    expected = _closed_form_fid(feats.mean(0), np.cov(feats, rowvar=False), ref_mu, ref_sigma)
    assert values["fid40"] == pytest.approx(expected, rel=1e-4)
    ref_feats = _standin_features(torch.from_numpy(ref_images).permute(0, 3, 1, 2))
    from_images = _closed_form_fid(feats.mean(0), np.cov(feats, rowvar=False), ref_feats.mean(0),
                                   np.cov(ref_feats, rowvar=False))
    assert abs(from_images - expected) > 1e-2 * expected  # the statistics, not the reference images, were used

    # the same samples scored again from disk, without a checkpoint and without sampling
    again = evaluate_checkpoint(None, samples=out / "samples.npz", reference=str(reference),
                                inception_weights=standin_inception, track=False, progress=False)
    assert again["fid40"] == pytest.approx(values["fid40"], rel=1e-9)
    # a reference that holds only the statistics serves FID and IS
    np.savez(tmp_path / "stats_only.npz", mu=ref_mu, sigma=ref_sigma)
    only = evaluate_checkpoint(None, samples=out / "samples.npz", reference=str(tmp_path / "stats_only.npz"),
                               inception_weights=standin_inception, track=False, progress=False)
    assert set(only) == {"fid40", "is40", "is40_std"} and only["fid40"] == pytest.approx(values["fid40"], rel=1e-9)
    with pytest.raises(UserError, match="no images"):
        from fcdm_lab.eval.fidelity import compute_metrics

        compute_metrics(out / "samples.npz", tmp_path / "stats_only.npz", extractor="inception",
                        metrics=("fid", "prc"), inception_weights=standin_inception)


def test_killed_protocol_sampling_resumes_without_resampling_finished_shards(tmp_path, monkeypatch):
    from fcdm_lab.diffusion import create_objective
    from fcdm_lab.eval.protocol import sample_for_protocol
    import fcdm_lab.inference.generation as generation
    from fcdm_lab.inference.shards import shard_path

    model, obj = _tiny_fcdm(), create_objective("ddpm")
    kw = dict(num_samples=50, steps=3, batch_size=10, progress=False, cfg_scale=1.5)
    clean = sample_for_protocol(model, obj, tmp_path / "clean", **kw)
    real_call = generation.BatchSampler.__call__
    calls = []

    def killed_after_two(self, b):
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill mid-run
        calls.append(b)
        return real_call(self, b)

    monkeypatch.setattr(generation.BatchSampler, "__call__", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sample_for_protocol(model, obj, tmp_path / "run", **kw)
    assert [p.name for p in sorted((tmp_path / "run" / "shards").glob("shard_*.npz"))] == [
        shard_path(tmp_path, b).name for b in calls]
    assert not (tmp_path / "run" / "samples.npz").exists()

    def counting(self, b):
        calls.append(b)
        return real_call(self, b)

    monkeypatch.setattr(generation.BatchSampler, "__call__", counting)
    done_before = list(calls)
    resumed = sample_for_protocol(model, obj, tmp_path / "run", **kw)
    assert (resumed["reused"], resumed["sampled"]) == (2, 3)
    assert sorted(calls[len(done_before):]) == [b for b in range(5) if b not in done_before]  # only the missing ones
    import numpy as np

    with np.load(clean["npz"]) as a, np.load(resumed["npz"]) as b:
        assert np.array_equal(a["arr"], b["arr"]) and np.array_equal(a["labels"], b["labels"])
    with pytest.raises(UserError, match="other settings.*cfg_scale"):
        sample_for_protocol(model, obj, tmp_path / "run", **{**kw, "cfg_scale": 4.0})


def test_sample_npz_keys_arr_and_arr_0_are_both_read(tmp_path):
    from fcdm_lab.eval.samples_io import load_samples, save_npz

    images = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    for key in ("arr", "arr_0"):
        path = save_npz(tmp_path / f"{key}.npz", images, key=key)
        import numpy as np

        with np.load(path) as data:
            assert data.files == [key]
        assert torch.equal(load_samples(path), images)
    with pytest.raises(UserError, match="npz key"):
        save_npz(tmp_path / "x.npz", images, key="images")

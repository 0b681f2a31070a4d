"""diffusers-native models and FCDMPipeline: round trips from a run folder and from its MLflow
artifact (equal outputs, channels_last restored), diffusers' schedulers against our samplers, the
pipeline's save/load and the three-line use from a run folder."""
import json

import pytest
import torch

from fcdm_lab.config import config_from_dict
from fcdm_lab.diffusers_pipeline import FCDMPipeline, adm_scheduler
from fcdm_lab.diffusion import create_objective
from fcdm_lab.errors import UserError
from fcdm_lab.models import FCDM, create_model
from fcdm_lab.models.pretrained import load_pretrained
from fcdm_lab.inference.checkpoints import load_checkpoint
from fcdm_lab.inference.generation import generate
from fcdm_lab.rng import derive_seed


def tiny_cfg():
    return config_from_dict({
        "name": "tiny-diffusers", "model": {"name": "FCDM", "L": 1, "C": 8}, "data": {"name": "digits"},
        "train": {"steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 2, "ckpt_every": 4, "ema_decay": 0.9,
                  "ema_warmup": True, "threads": 1},
        "eval": {"sampler": "ddim", "steps": 2}})


def layout_of(model):
    """4-D weights not in channels_last memory (must be none for FCDM)."""
    return [n for n, p in model.named_parameters() if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last)]


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([10, 500, 999]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        return model.eval()(x, t, y)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step tracked training run: (run folder, MLflow artifact folder pipeline/)."""
    from fcdm_lab.runner import run_experiment
    from fcdm_lab.tracking.client import tracked_run

    root = tmp_path_factory.mktemp("diffusers-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracked_run("tiny", uri=uri) as tracker:
        run_experiment(tracker, tiny_cfg(), root / "run", progress=False)
    artifacts = tracker.client.download_artifacts(tracker.run_id, "pipeline", str(root / "downloaded"))
    return root / "run", artifacts


def test_run_folder_and_mlflow_artifact_round_trip(trained_run):
    run, artifact = trained_run
    assert (run / "model" / "config.json").is_file() and (run / "model" / "diffusion_pytorch_model.safetensors").is_file()
    reference, _, info = load_checkpoint(run / "checkpoints" / "step_0000004.pt")  # the final EMA weights
    assert info["weights"] == "ema"
    for folder in (run, run / "model", artifact):
        model = FCDM.from_pretrained(folder)
        assert layout_of(model) == [], f"{folder}: weights not channels_last"
        assert torch.equal(outputs(model), outputs(reference)), folder
    loaded = load_pretrained(artifact)
    assert type(loaded) is FCDM and not loaded.training and torch.equal(outputs(loaded), outputs(reference))


@pytest.mark.parametrize("name", ["FCDM", "DiT-S/2", "DiCo-S"])
def test_every_family_restores_its_layout(name, tmp_path):
    kw = dict(input_size=8, in_channels=4, num_classes=10)
    if name == "FCDM":
        kw.update(L=1, C=8)
    torch.manual_seed(0)
    model = create_model(name, **kw)
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    fresh = {n: p.stride() for n, p in model.named_parameters()}
    assert {n: p.stride() for n, p in loaded.named_parameters()} == fresh  # same memory layout as built
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 900]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), loaded(x, t, y))


def test_load_pretrained_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="no diffusers model"):
        load_pretrained(tmp_path)


@pytest.fixture(scope="module")
def random_model():
    """An untrained FCDM with small random weights everywhere (zero-init layers would output zeros)."""
    torch.manual_seed(0)
    model = FCDM(input_size=8, in_channels=1, num_classes=10, L=1, C=8).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("sampler, steps, ours", [("ddpm", 20, 20), ("ddim", 10, "ddim10")])
def test_diffusers_schedulers_reproduce_our_samplers(random_model, sampler, steps, ours):
    labels = torch.tensor([0, 3, 7, 9])
    pipe = FCDMPipeline(model=random_model, scheduler=adm_scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(class_labels=labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                  output_type="latent").images
    g = torch.Generator().manual_seed(5)  # the same noise drawn in the same order
    noise = torch.randn(theirs.shape, generator=g)
    mine = create_objective("ddpm").sample(random_model, theirs.shape, sampler=sampler, steps=ours, noise=noise,
                                           model_kwargs={"y": labels}, generator=g)
    # diffusers keeps alphas_cumprod in float32, we in float64: they agree to float32 precision
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)


def test_pipeline_images_equal_fcdm_lab_sample(random_model):
    """What `fcdm-lab sample --sampler ddpm --steps 20 --seed 0` makes (generate), image for image."""
    labels = [0, 1, 2, 3, 4]
    pipe = FCDMPipeline(model=random_model, scheduler=adm_scheduler("ddpm"))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(class_labels=labels, num_inference_steps=20, output_type="pt",
                  generator=torch.Generator().manual_seed(derive_seed(0, 0))).images  # batch 0's seed
    mine, _ = generate(random_model, create_objective("ddpm"), num=5, class_labels=labels, sampler="ddpm", steps=20,
                       seed=0, progress=False)
    assert theirs.dtype == torch.uint8 and torch.equal(theirs, mine)


def test_pipeline_saves_and_loads_as_one_folder(random_model, tmp_path):
    pipe = FCDMPipeline(model=random_model, scheduler=adm_scheduler("ddpm"))
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["model"] == ["fcdm_lab.models.fcdm", "FCDM"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    loaded = FCDMPipeline.from_pretrained(tmp_path / "pipe")
    assert layout_of(loaded.model) == [] and loaded.vae is None
    kw = dict(class_labels=[1, 2], num_inference_steps=5, output_type="np", guidance_scale=2.0)
    a = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    b = loaded(generator=torch.Generator().manual_seed(1), **kw).images
    assert a.shape == (2, 8, 8, 1) and (a == b).all()
    with pytest.raises(UserError, match="class_labels must be"):
        loaded(class_labels=[10])


def test_three_lines_from_a_run_folder(trained_run):
    run, _ = trained_run
    # The README's three lines:
    pipe = FCDMPipeline.from_pretrained(run)
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=20).images
    assert len(images) == 3 and images[0].size == (8, 8) and images[0].mode == "L"

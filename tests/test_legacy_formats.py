"""Run folders written by fcdm-lab 0.1.0 still load, sample identically and resume.

tests/fixtures/legacy-run was written by the code at commit 52ef2f3 (before the model files became
one format), with tests/fixtures/make_legacy_run.py: a 4-step tiny FCDM on the digits, its
checkpoint (format version 1), its ema.safetensors with JSON metadata, its diffusers folder without
fcdm_lab.json, and the samples that code drew from the checkpoint and from ema.safetensors
(expected_samples.npz: DDIM-3, labels 0-3, seed 0).
"""
import shutil
from pathlib import Path

import numpy as np
import pytest

from fcdm_lab.inference.checkpoints import load_checkpoint, objective_for
from fcdm_lab.inference.generation import generate
from fcdm_lab.training.trainer import train

LEGACY = Path(__file__).parent / "fixtures" / "legacy-run"


@pytest.fixture
def legacy(tmp_path):
    return shutil.copytree(LEGACY, tmp_path / "legacy-run")  # a copy: nothing writes into the fixture


def samples_of(path):
    model, cfg, info = load_checkpoint(path)
    images, _ = generate(model, objective_for(cfg, model, info), num=4, class_labels=[0, 1, 2, 3], sampler="ddim",
                         steps=3, seed=0, progress=False)
    return images.numpy(), cfg, info


@pytest.mark.parametrize("artefact", ["", "model", "model/diffusion_pytorch_model.safetensors", "ema.safetensors",
                                      "checkpoints/step_0000004.pt"])
def test_every_old_artefact_loads_and_samples_the_same_images(legacy, artefact):
    expected = np.load(LEGACY / "expected_samples.npz")
    images, cfg, info = samples_of(legacy / artefact)
    assert np.array_equal(images, expected["checkpoint"]) and np.array_equal(images, expected["ema"])
    assert cfg is not None and cfg.name == "legacy-tiny" and info["weights"] == "ema"


def test_an_old_checkpoint_resumes(legacy):
    cfg = load_checkpoint(legacy)[1]  # the config the old checkpoint records
    cfg.train.steps = 6
    result = train(cfg, legacy, resume="latest", progress=False)
    assert result.step == 6 and (legacy / "model" / "fcdm_lab.json").is_file()


def test_an_old_run_folder_is_a_diffusers_pipeline(legacy):
    from fcdm_lab.diffusers_pipeline import FCDMPipeline

    pipe = FCDMPipeline.from_pretrained(legacy)
    assert pipe(class_labels=[1], num_inference_steps=2, output_type="pt").images.shape == (1, 1, 8, 8)

"""The public Python API: a light `import fcdm_lab`, the README's example, load_model from a folder
and from an MLflow run id, sample, run_ablation's wiring."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fcdm_lab
from fcdm_lab.config import config_from_dict
from fcdm_lab.errors import UserError

README = Path(__file__).resolve().parent.parent / "README.md"


def test_import_is_light_and_lazy():
    code = ("import sys, fcdm_lab; heavy = [m for m in ('torch', 'mlflow', 'optuna', 'torch_fidelity', 'diffusers') "
            "if m in sys.modules]; assert not heavy, heavy; assert callable(fcdm_lab.load_model); "
            "print(sorted(fcdm_lab.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "run_ablation" in out.stdout and "train" in out.stdout


def readme_python_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs():
    code = readme_python_example()
    assert "steps=1000" in code
    namespace = {}
    exec(compile(code.replace("steps=1000", "steps=4"), "README.md", "exec"), namespace)  # tiny settings
    images, pil_images = namespace["images"], namespace["pil_images"]
    assert images.dtype == torch.uint8 and tuple(images.shape) == (10, 1, 8, 8)
    assert len(pil_images) == 3 and pil_images[0].size == (8, 8)
    assert namespace["result"].step == 4 and (Path("runs/tiny-digits") / "model_index.json").is_file()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, run id, tracking uri) of a 4-step tracked run."""
    from fcdm_lab.runner import run_experiment
    from fcdm_lab.tracking.client import tracked_run

    root = tmp_path_factory.mktemp("api-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = config_from_dict({"name": "tiny-api", "model": {"name": "FCDM", "L": 1, "C": 8}, "data": {"name": "digits"},
                            "train": {"steps": 4, "batch_size": 8, "ckpt_every": 4, "threads": 1},
                            "eval": {"sampler": "ddim", "steps": 2}})
    with tracked_run("tiny-api", uri=uri) as tracker:
        run_experiment(tracker, cfg, root / "run", progress=False)
    return root / "run", tracker.run_id, uri


def test_load_model_from_folder_checkpoint_and_run_id(run):
    folder, run_id, uri = run
    from_folder = fcdm_lab.load_model(folder)
    from_run = fcdm_lab.load_model(run_id, tracking_uri=uri)
    from_ckpt = fcdm_lab.load_model(next((folder / "checkpoints").glob("step_*.pt")))
    a = fcdm_lab.sample(from_folder, class_labels=[1, 2], sampler="ddim", steps=5, seed=3)
    assert tuple(a.shape) == (2, 1, 8, 8) and a.dtype == torch.uint8
    for other in (from_run, from_ckpt, folder):  # a path is loaded by sample() itself
        assert torch.equal(fcdm_lab.sample(other, class_labels=[1, 2], sampler="ddim", steps=5, seed=3), a)
    with pytest.raises(UserError, match="neither a file or folder nor an MLflow run id"):
        fcdm_lab.load_model("no-such-run")
    with pytest.raises(UserError, match="no MLflow run"):
        fcdm_lab.load_model("0" * 32, tracking_uri=uri)


def test_run_ablation_is_the_study_runner():
    with pytest.raises(UserError, match="grn-vs-cca"):  # an unknown study lists the shipped ones
        fcdm_lab.run_ablation("no-such-study")

"""Bad input and faults found by the round-3 reliability audit (issue 16): each class of input is one
line naming the problem and the valid choices, exit 2, within seconds, and leaves nothing behind:
no MLflow run or database, no run folder, nothing already written changed."""
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from fcdm_lab.cli import main
from fcdm_lab.errors import UserError

TINY_SET = [f"--set={k}={v}" for k, v in TINY.items()]


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def refused(capsys, *args, needle: str) -> str:
    code, out, err = run(capsys, *args)
    assert code == 2, out + err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err
    return err


def runs_in_store(path: Path = Path("mlflow.db")) -> int:
    """MLflow runs in a SQLite store (0 when there is no store)."""
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        except sqlite3.OperationalError:  # a database without MLflow's tables
            return 0


def nothing_left(*folders: str) -> None:
    assert runs_in_store() == 0
    for folder in folders:
        assert not Path(folder).exists(), folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tracked-less training (30 steps) and what it wrote."""
    import os

    folder = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["train", "tiny-digits", "--steps", "4", "--out", "RUN", "--no-track", *TINY_SET])
        assert exc.value.code == 0
    finally:
        os.chdir(cwd)
    return folder / "RUN"


# ---------------------------------------------------------------------------------------------
# Numbers out of range: refused before any run, folder or file (tracked `train`, `ablate`, `profile`)

@pytest.mark.parametrize("setting,needle", [
    ("--seed=-5", "train.seed must be an integer from 0 to 4294967295, got -5"),
    ("--seed=99999999999999999999999", "train.seed must be an integer from 0"),
    ("--set=train.threads=100000", "train.threads must be an integer from 1 to 1024"),
    ("--set=model.C=16384", "parameters: training needs at least"),
    ("--set=model.C=100000", "C (width) must be at most 16384"),
    ("--set=model.block={family=\"convnext\",kernel=10001}", "kernel must be an odd integer from 1 to 63"),
    ("--set=train.lr=nan", "train.lr must be a finite number, got nan"),
    ("--set=train.compile_mode=fast", "train.compile_mode = 'fast' is not valid; choose one of: default, reduce-overhead"),
])
def test_train_refuses_out_of_range_settings_before_a_run_opens(capsys, setting, needle):
    refused(capsys, "train", "tiny-digits", "--out", "run", setting, needle=needle)
    nothing_left("run")


def test_resume_from_another_model_is_refused_before_a_run_opens(capsys, trained):
    before = sorted(p.name for p in trained.rglob("*"))
    refused(capsys, "train", "tiny-digits", "--out", "other", "--resume", trained / "checkpoints" / "step_0000004.pt",
            *TINY_SET, "--set=model.C=16", needle="trained with another model")
    nothing_left("other")
    assert sorted(p.name for p in trained.rglob("*")) == before


def test_resume_accepts_a_run_folder(capsys, trained, tmp_path):
    import shutil

    shutil.copytree(trained, "copy")
    code, out, err = run(capsys, "train", "tiny-digits", "--steps", "6", "--out", "copy", "--resume", "copy",
                         "--no-track", *TINY_SET)
    assert code == 0, err
    assert "resumed from copy/checkpoints/step_0000004.pt at step 4" in out + err


@pytest.mark.parametrize("args,needle", [
    (["profile", "FCDM-S", "-r", "1000000000"], "resolution must be an image side from 1 to 16384 pixels"),
    (["profile", "FCDM", "--set", "L=100000", "--set", "C=32"], "L (blocks per level) must be at most 64"),
    (["profile", "FCDM-S", "--match", "ratio", "--match-target", "nan"], "positive number of GMACs, got nan"),
    (["profile", "FCDM-S", "--pixel", "--in-channels", "0"], "in_channels must be >= 1, got 0"),
    (["ablate", "grn-vs-cca", "--set", "train.seed=-1"], "train.seed must be an integer from 0"),
    (["ui", "--port", "99999"], "'--port'"), (["ui", "--port", "-1"], "'--port'"),
    (["ui", "--host", "999.1.1.1"], "--host '999.1.1.1' is not an address"),
    (["data", "extract-latents", "--images", ".", "--vae", "x", "--out", "store", "--image-size", "100000"],
     "image size must be a multiple of 8 from 8 to 2048"),
])
def test_numbers_out_of_range_are_one_line(capsys, args, needle):
    refused(capsys, *args, needle=needle)
    nothing_left("runs", "store")


# ---------------------------------------------------------------------------------------------
# Files that are not what they should be

@pytest.mark.parametrize("command", ["train", "ablate"])
def test_a_file_that_is_not_utf8_toml_is_one_line(capsys, command):
    Path("bad.toml").write_bytes(b'name = "caf\xe9"\n')
    refused(capsys, command, "bad.toml", needle="not UTF-8 text")
    Path("folder.toml").mkdir()
    refused(capsys, command, "folder.toml", needle="is a folder, not a .toml file")


def test_base_may_not_name_an_absolute_path(capsys):
    Path("exp.toml").write_text('base = "/etc/hostname"\n')
    refused(capsys, "train", "exp.toml", needle="not an absolute path")
    Path("study.toml").write_text('base = "/etc/hostname"\n[[variants]]\nname = "a"\n')
    refused(capsys, "ablate", "study.toml", needle="not an absolute path")


@pytest.mark.parametrize("budget", ["nan", "inf"])
def test_a_sweep_budget_must_be_finite(capsys, budget):
    Path("sweep.toml").write_text(f'kind = "sweep"\nbase = "tiny-digits"\nobjectives = [{{ metric = "fid_digits" }}]\n'
                                  f'budget = {{ compute = {budget} }}\n[space]\nC = {{ type = "int", low = 8, high = 16, '
                                  f'step = 8 }}\n')
    refused(capsys, "sweep", "sweep.toml", needle="finite number")


def test_sample_onto_an_existing_file_fails_before_sampling(capsys, trained):
    Path("taken").write_text("x")
    refused(capsys, "sample", "--checkpoint", trained, "--out", "taken", needle="is an existing file")
    assert Path("taken").read_text() == "x"


def test_vae_given_as_a_file_is_named_a_file(capsys):
    from fcdm_lab.data.latents import load_vae

    Path("vae.bin").write_text("x")
    with pytest.raises(UserError, match="is a file; pass the folder of an AutoencoderKL"):
        load_vae("vae.bin")


# ---------------------------------------------------------------------------------------------
# Every model artefact a run writes is a valid --checkpoint, and gives the same samples

def test_every_model_artefact_samples_the_same_images(capsys, trained):
    paths = [trained, trained / "model", trained / "model" / "diffusion_pytorch_model.safetensors",
             trained / "model_index.json", trained / "checkpoints" / "step_0000004.pt"]  # (older artefacts:
    # tests/test_legacy_formats.py)
    images = []
    for i, path in enumerate(paths):
        code, out, err = run(capsys, "sample", "--checkpoint", path, "--num", "4", "--steps", "3", "--out", f"s{i}")
        assert code == 0, err
        images.append(np.load(f"s{i}/samples.npz")["arr_0"])
    for other in images[1:]:
        assert (other == images[0]).all()
    Path("plain.safetensors").write_bytes((trained / "model" / "diffusion_pytorch_model.safetensors").read_bytes())
    refused(capsys, "sample", "--checkpoint", "plain.safetensors", needle="pass one of what a run writes")


# ---------------------------------------------------------------------------------------------
# evaluate: bad input refused before an evaluation run is opened

def _npz(name, **arrays):
    np.savez(name, **arrays)
    return name


@pytest.mark.parametrize("make,needle", [
    (lambda: _npz("f.npz", arr_0=np.zeros((4, 8, 8, 1), np.float32)), "must be uint8 NHWC"),
    (lambda: _npz("c.npz", arr_0=np.zeros((4, 8, 8, 2), np.uint8)), "channels in NHWC layout"),
    (lambda: _npz("l.npz", arr_0=np.zeros((4, 1, 8, 8), np.uint8)), "channels in NHWC layout"),
    (lambda: _npz("k.npz", images=np.zeros((4, 8, 8, 1), np.uint8)), "has no 'arr_0' or 'arr' array"),
    (lambda: _npz("e.npz", arr_0=np.zeros((0, 8, 8, 1), np.uint8)), "N >= 1 images"),
    (lambda: _npz("o.npz", arr_0=np.array([object()], dtype=object)), "must be uint8 NHWC"),
    (lambda: "missing.npz", "does not exist"),
    (lambda: _npz("few.npz", arr_0=np.zeros((4, 8, 8, 1), np.uint8)), "hold 4 images; the protocol's metrics need"),
])
def test_evaluate_refuses_bad_samples_before_a_run(capsys, make, needle):
    refused(capsys, "evaluate", "--samples", make(), "--reference", "digits-test", needle=needle)
    nothing_left()


@pytest.mark.parametrize("args,needle", [
    (["--metrics", "fid_bogus"], "unknown metric 'fid_bogus'"),
    (["--metrics", "fid_fashion"], "need data.name = 'fashion-mnist'"),
    (["--metrics", "fid_inception", "--inception-weights", "missing.pth"], "does not exist"),
    (["--reference", "nowhere"], "is neither an existing folder / .npz file nor a reference name"),
])
def test_evaluate_refuses_bad_settings_before_a_run(capsys, trained, args, needle):
    refused(capsys, "evaluate", "--checkpoint", trained, *args, needle=needle)
    nothing_left()


@pytest.mark.parametrize("args", [["report", "0" * 32], ["rerun", "0" * 32],
                                  ["evaluate", "--samples", "s.npz", "--reference", "digits-test", "--run-id", "0" * 32]])
def test_a_missing_run_id_creates_no_store(capsys, args):
    _npz("s.npz", arr_0=np.zeros((12, 8, 8, 1), np.uint8))
    refused(capsys, *args, needle="no MLflow store at")
    assert not Path("mlflow.db").exists()


def test_a_corrupt_store_is_one_line(capsys, monkeypatch):
    Path("bad.db").write_bytes(b"\x00garbage" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{Path('bad.db').resolve()}")
    refused(capsys, "train", "tiny-digits", "--out", "run", *TINY_SET, needle="is not a readable SQLite database")
    nothing_left("run")


# ---------------------------------------------------------------------------------------------
# One training per folder: a refused second `train` changes nothing of the first

def test_a_refused_second_train_leaves_the_running_ones_run_alone(capsys, trained):
    """The lock is taken before any run is opened or file written: the refused command neither opens
    a run nor rewrites the first training's pointer, with or without --resume latest."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(trained, "busy")
    Path("busy/mlflow_run.json").write_text(json.dumps({"run_id": "a" * 32, "tracking_uri": "x"}))
    before = Path("busy/mlflow_run.json").read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fcdm_lab.training.preflight import "
                               "run_folder_lock\nwith run_folder_lock('busy'):\n    print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # the first training holds the folder
        for extra in ([], ["--resume", "latest"]):
            refused(capsys, "train", "tiny-digits", "--out", "busy", *TINY_SET, *extra,
                    needle=f"is in use by another training (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    assert runs_in_store() == 0 and Path("busy/mlflow_run.json").read_text() == before


# ---------------------------------------------------------------------------------------------
# A full disk while writing the final model is one line; the file that was there stays

def test_disk_full_while_writing_is_one_line_and_keeps_the_old_file(tmp_path):
    import errno

    from fcdm_lab.fileio import DiskFull, atomic_write, replaced_folder

    target = tmp_path / "ema.safetensors"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                           "\"No space left on device\" })")

    with pytest.raises(DiskFull, match="no space left to write .*ema.safetensors"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ema.safetensors"]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w").write_text("old")
    with pytest.raises(DiskFull):
        with replaced_folder(tmp_path / "model") as folder:
            (folder / "w").write_text("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (tmp_path / "model" / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors", "model"]

"""The trainer: exact resume after SIGKILL, a real 2-process accelerate run, checkpoints, NaN stop."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fcdm_lab.config import config_from_dict, load_experiment
from fcdm_lab.errors import UserError
from fcdm_lab.training import state as ckpt_io
from fcdm_lab.training.components import ResumableSampler
from fcdm_lab.training.state import read_checkpoint
from fcdm_lab.training.hooks import RunFiles, SampleGrids, TrainHook
from fcdm_lab.training.trainer import TrainingDiverged, train

WORKER = Path(__file__).parent / "_train_worker.py"
REPO = Path(__file__).resolve().parent.parent


def tiny(**train):
    """A ~100k-parameter FCDM on the 8x8 digits; a step takes a few milliseconds."""
    return {"name": "tiny-test", "model": {"name": "FCDM", "L": 1, "C": 8},
            "data": {"name": "digits"},
            "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 2, "ckpt_every": 2, "keep_last": 2,
                      "ema_decay": 0.99, "ema_warmup": True, "threads": 1, **train},
            "eval": {"sampler": "ddim", "steps": 2}}


def worker_env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_worker(tmp_path, job, cmd=None, env=None, timeout=180):
    job_file = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.json"
    job_file.write_text(json.dumps(job))
    cmd = (cmd or [sys.executable]) + [str(WORKER), str(job_file)]
    return subprocess.run(cmd, env=env or worker_env(), capture_output=True, text=True, timeout=timeout)


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def assert_same_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), f"optimizer state {i}.{k} differs"


# ---------------------------------------------------------------------------------------------

def test_resume_after_sigkill_is_bit_identical(tmp_path):
    # Flips and label dropout draw from the global RNG, t and noise from the noise generator, the EMA
    # warms up: all of it must continue exactly from the step-10 checkpoint.
    data = {"name": "digits", "random_flip": True}
    cfg_dict = {**tiny(steps=24, ckpt_every=10, log_every=1, keep_last=5), "data": data}
    killed = run_worker(tmp_path, {"config": cfg_dict, "out_dir": str(tmp_path / "killed"), "kill_at": 15})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path / "killed")] == [10]

    resumed = run_worker(tmp_path, {"config": cfg_dict, "out_dir": str(tmp_path / "killed"), "resume": "latest"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    full = train(config_from_dict(cfg_dict), tmp_path / "full", progress=False)
    a = read_checkpoint(full.checkpoint)
    b = read_checkpoint(tmp_path / "killed" / "checkpoints" / "step_0000024.pt")
    assert a["step"] == b["step"] == 24 and a["data_pos"] == b["data_pos"] == 24 * 8
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["ema"], b["ema"], "ema")
    assert_same_optimizer(a["opt"], b["opt"])
    assert torch.equal(a["rng"][0]["noise"], b["rng"][0]["noise"])


def test_two_process_accelerate_run(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = tmp_path / "report"
    report.mkdir()
    cfg_dict = tiny(steps=4, batch_size=8, ckpt_every=2)
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    sample = {"num": 10, "steps": 3, "sampler": "ddim", "batch_size": 3, "seed": 5}
    job = {"config": cfg_dict, "out_dir": str(tmp_path / "run"), "report": str(report),
           "sample": {**sample, "out_dir": str(tmp_path / "samples-2p")}}
    proc = run_worker(tmp_path, job, cmd=cmd, env=worker_env(ACCELERATE_USE_CPU="true"), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(json.loads(p.read_text())["rank"] for p in report.glob("rank_*.json"))
    worlds = {json.loads(p.read_text())["world"] for p in report.glob("rank_*.json")}
    assert ranks == [0, 1] and worlds == {2}
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000004.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # each process has its own noise stream, and the global batch of 8 was split 4 + 4
    assert not torch.equal(ckpt["rng"][0]["noise"], ckpt["rng"][1]["noise"])
    assert ckpt["data_pos"] == 4 * 8 and np.isfinite(ckpt["loss"])
    assert (tmp_path / "run" / "model" / "diffusion_pytorch_model.safetensors").is_file()
    # sampling shared by the two processes (batches 0, 2 and 1, 3) gives what one process gives
    from fcdm_lab.inference.samples import sample_checkpoint

    sample_checkpoint(tmp_path / "run", tmp_path / "samples-1p", progress=False, **sample)
    two, one = np.load(tmp_path / "samples-2p" / "samples.npz"), np.load(tmp_path / "samples-1p" / "samples.npz")
    assert two["arr_0"].shape == (10, 8, 8, 1)
    assert np.array_equal(two["arr_0"], one["arr_0"]) and np.array_equal(two["labels"], one["labels"])


class Recorder(TrainHook):
    """A hook that records what the loop reports: metrics per log step, checkpoint steps, images."""

    def __init__(self):
        self.logged, self.images, self.checkpoints = [], [], []

    def on_log(self, run, metrics):
        self.logged.append((run.step, metrics))

    def on_checkpoint(self, run, path):
        self.checkpoints.append(run.step)

    def log_image(self, image, key, step):
        self.images.append((np.asarray(image).shape, key, step))


def test_checkpoint_layout_keep_last_and_final_files(tmp_path):
    cfg = config_from_dict(tiny(steps=6, ckpt_every=2, keep_last=2, sample_every=3))
    rec = Recorder()
    result = train(cfg, tmp_path / "run", hooks=[RunFiles(), SampleGrids(log_image=rec.log_image), rec], progress=False)
    logged, images = rec.logged, rec.images
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path / "run")] == [4, 6]
    ckpt = read_checkpoint(result.checkpoint)
    assert {"model", "ema", "opt", "args", "step", "rng", "data_pos", "model_info", "data_info",
            "version"} <= set(ckpt)
    assert ckpt["step"] == result.step == 6 and ckpt["args"] == cfg.to_dict()
    assert ckpt["model_info"]["kwargs"]["C"] == 8 and ckpt["data_info"]["channels"] == 1
    assert not any(p.name.startswith(".") for p in (tmp_path / "run" / "checkpoints").iterdir())
    # metrics every log_every steps, with per-quartile losses
    assert [s for s, _ in logged] == [2, 4, 6]
    assert {"loss", "lr", "images_per_s"} <= set(logged[0][1])
    assert any(k.startswith("loss_q") for k in logged[0][1])
    # sample grids at step 3 and at the end (a row of 8 per class, enlarged tiles), as PNG and tracker images
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png")) == ["step_0000003.png",
                                                                                      "step_0000006.png"]
    assert [(k, s) for _, k, s in images] == [("samples", 3), ("samples", 6)] and images[-1][0][2] == 3
    # the final EMA model, in its one format (the diffusers folder: == the final checkpoint's EMA), and the
    # resolved config, which reloads as it was
    from safetensors.torch import load_file

    assert result.model_dir == tmp_path / "run" / "model" and rec.checkpoints == [2, 4, 6]  # keep_last then pruned 2
    ema = load_file(result.model_dir / "diffusion_pytorch_model.safetensors")
    assert set(ema) == set(ckpt["ema"]) and all(torch.equal(ema[k], v) for k, v in ckpt["ema"].items())
    assert not (tmp_path / "run" / "ema.safetensors").exists()
    reloaded = load_experiment(str(tmp_path / "run" / "config.toml"))
    assert reloaded.to_dict() == cfg.to_dict()
    assert np.isfinite(result.final_loss) and result.images_per_s > 0


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from fcdm_lab.training import trainer

    real = trainer.create_objective

    class PoisonedAt:
        """The real objective, except that the 7th training step's loss is NaN."""

        def __init__(self, objective):
            self.objective, self.calls = objective, 0

        def __getattr__(self, name):
            return getattr(self.objective, name)

        def training_losses(self, *args, **kwargs):
            self.calls += 1
            terms = self.objective.training_losses(*args, **kwargs)
            if self.calls == 7:
                terms["loss"] = terms["loss"] * float("nan")
            return terms

    monkeypatch.setattr(trainer, "create_objective", lambda *a, **k: PoisonedAt(real(*a, **k)))
    with pytest.raises(TrainingDiverged, match=r"step 7\b.*step_0000006\.pt"):
        train(config_from_dict(tiny(steps=10, ckpt_every=3, keep_last=5)), tmp_path / "run", progress=False)
    assert isinstance(TrainingDiverged("x"), UserError)
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path / "run")] == [3, 6]
    assert not (tmp_path / "run" / "ema.safetensors").exists()
    good = read_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000006.pt")
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "step_0000002.pt"
    ckpt_io.atomic_torch_save({"w": torch.ones(3)}, target)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.atomic_torch_save({"w": torch.zeros(3)}, target)
    with pytest.raises(OSError):
        ckpt_io.atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "checkpoints" / "step_0000004.pt")
    assert sorted(p.name for p in target.parent.iterdir()) == ["step_0000002.pt"]
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(target)["w"], torch.ones(3))


def test_latest_skips_unreadable_and_nothing_to_resume_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        train(config_from_dict(tiny()), tmp_path / "empty", resume="latest", progress=False)
    result = train(config_from_dict(tiny(steps=4)), tmp_path / "run", progress=False)
    (tmp_path / "run" / "checkpoints" / "step_0000009.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint .*step_0000009\.pt"):
        path, ckpt = ckpt_io.find_latest_checkpoint(tmp_path / "run")
    assert path == result.checkpoint and ckpt["step"] == 4
    with pytest.raises(UserError, match="already has checkpoints"):
        train(config_from_dict(tiny(steps=4)), tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="is not a checkpoint: it is a text file"):
        read_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000009.pt")
    (tmp_path / "run" / "checkpoints" / "step_0000010.pt").write_bytes(b"PK\x03\x04\x00\x01")  # a cut-short zip
    with pytest.raises(UserError, match="is not a checkpoint: it is truncated"):
        read_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000010.pt")
    with pytest.raises(UserError, match="does not exist"):
        train(config_from_dict(tiny()), tmp_path / "x", resume=str(tmp_path / "nope.pt"), progress=False)


def test_resume_with_data_of_other_channels_is_a_user_error(tmp_path):
    from fcdm_lab.data.latents import write_latent_store

    train(config_from_dict(tiny(steps=2)), tmp_path / "run", progress=False)
    rng = np.random.default_rng(0)
    store = tmp_path / "latents"
    write_latent_store(str(store), [(rng.standard_normal((20, 4, 8, 8)).astype(np.float32), np.arange(20) % 10)],
                       {"vae": "none", "scale_factor": 0.18215, "flip": False, "num_classes": 10}, dtype="float32")
    cfg = config_from_dict({**tiny(steps=4), "data": {"name": "latents", "path": str(store)}})
    with pytest.raises(UserError, match="latent channels do not match the model.*in_channels: checkpoint 1, now 4"):
        train(cfg, tmp_path / "run", resume="latest", progress=False)


def test_bad_batch_split_and_fp16_on_cpu_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="divisible"):
        train(config_from_dict(tiny(batch_size=9, grad_accum=2)), tmp_path / "a", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="fp16"):
            train(config_from_dict(tiny(mixed_precision="fp16")), tmp_path / "b", progress=False)


def test_unknown_eval_sampler_fails_before_training(tmp_path):
    cfg = config_from_dict({**tiny(), "eval": {"sampler": "euler"}})
    with pytest.raises(UserError, match="unknown sampler 'euler'.*ddpm, ddim"):
        train(cfg, tmp_path / "run", progress=False)
    assert not ckpt_io.list_checkpoints(tmp_path / "run")


def test_grad_accum_and_max_steps(tmp_path):
    cfg = config_from_dict(tiny(steps=8, grad_accum=2, grad_clip=1.0, warmup_steps=4))
    rec = Recorder()
    result = train(cfg, tmp_path / "run", hooks=[rec], progress=False, max_steps=4)
    logged = [m for _, m in rec.logged]
    assert result.step == 4 and read_checkpoint(result.checkpoint)["data_pos"] == 4 * 8
    assert [m["lr"] for m in logged] == [pytest.approx(1e-3 * 2 / 4), pytest.approx(1e-3)]
    assert all("grad_norm" in m for m in logged)
    resumed = train(cfg, tmp_path / "run", resume="latest", progress=False)  # continues to train.steps
    assert resumed.step == 8


def test_data_order_is_seeded_strided_and_resumable():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    one = take(ResumableSampler(10, seed=3), 25)
    assert sorted(one[:10]) == list(range(10)) and sorted(one[10:20]) == list(range(10)) and one[:10] != one[10:20]
    assert one[:10] == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    r0, r1 = take(ResumableSampler(10, 3, rank=0, world=2), 12), take(ResumableSampler(10, 3, rank=1, world=2), 12)
    assert one[0:24:2] == r0 and one[1:24:2] == r1
    assert take(ResumableSampler(10, 3, start=7), 10) == one[7:17]

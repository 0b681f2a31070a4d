"""Cluster-grade runs (issue 9): signals stop a training with a checkpoint and an honest exit code,
logs written to files show progress, names cannot escape the output folder, environment failures
are one line and exit 2, one training per folder."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import sigint_default

from fcdm_lab import signals
from fcdm_lab.cli import main
from fcdm_lab.config import config_from_dict
from fcdm_lab.errors import UserError
from fcdm_lab.training import state as ckpt_io
from fcdm_lab.training.state import read_checkpoint
from fcdm_lab.training.trainer import train
from fcdm_lab.fileio import check_output_dir
from fcdm_lab.training.preflight import LOCK_FILE, run_folder_lock

REPO = Path(__file__).resolve().parent.parent


def tiny(**train_overrides):
    """A ~100k-parameter FCDM on the 8x8 digits (a step takes a few milliseconds)."""
    return {"name": "tiny-test", "model": {"name": "FCDM", "L": 1, "C": 8}, "data": {"name": "digits"},
            "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 2, "ckpt_every": 2, "keep_last": 2,
                      "ema_decay": 0.99, "ema_warmup": True, "threads": 1, **train_overrides},
            "eval": {"sampler": "ddim", "steps": 2}}


def write_experiment(path: Path, cfg: dict) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(cfg))
    return path


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def one_line_exit_2(code, out, err, needle):
    assert code == 2, err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err


def cli_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def start_cli(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "fcdm_lab", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)


def wait_for_line(proc, pattern, timeout=120):
    """Read the child's stdout (a pipe: not a terminal) until a line matches; returns the lines."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r}; stdout: {''.join(lines)}; stderr: {proc.stderr.read()}")


# ---------------------------------------------------------------------------------------------
# Signals (items 1 and 2)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig,code,tracked", [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)])
def test_signal_stops_with_checkpoint_exit_code_and_resume_is_bit_identical(tmp_path, capsys, sig, code, tracked):
    from mlflow import MlflowClient

    # 60 steps of a few milliseconds: the signal lands a few steps after the first progress line
    cfg = tiny(steps=60, log_every=1, ckpt_every=1000, keep_last=5)
    exp = write_experiment(tmp_path / "exp.toml", cfg)
    proc = start_cli("train", str(exp), "--out", "run", *([] if tracked else ["--no-track"]), cwd=tmp_path)
    lines = wait_for_line(proc, r"step \d+/60")  # in the loop: a plain progress line (stdout is a pipe)
    seen = int(re.search(r"step (\d+)/60", lines[-1]).group(1))

    # a second training into the same folder is refused while the first runs (item +: the lock)
    one_line_exit_2(*run(capsys, "train", str(exp), "--out", str(tmp_path / "run"), "--no-track"),
                    "is in use by another training")

    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    m = re.search(r"stopped by (\w+) \(at step (\d+) of 60; checkpoint (\S+)\); resume: `(.+)`$", line)
    assert m and m.group(1) == signal.Signals(sig).name, line
    step = int(m.group(2))
    assert step > seen  # the step under way was finished, then saved
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path / "run")] == [step]
    assert read_checkpoint(tmp_path / m.group(3))["step"] == step

    if not tracked:
        return
    # the run is KILLED in MLflow
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("fcdm-lab").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]

    # the printed command resumes; the result is bit-identical to an uninterrupted run
    resume = m.group(4).split()
    assert resume[:2] == ["fcdm-lab", "train"] and resume[-2:] == ["--resume", "latest"]
    code, out, err = run(capsys, *resume[1:], "--no-track")  # in this process (tmp_path is the cwd)
    assert code == 0, err
    full = train(config_from_dict(cfg), tmp_path / "full", progress=False)
    a, b = read_checkpoint(full.checkpoint), read_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000060.pt")
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


def test_ctrl_c_outside_training_exits_130_with_one_line(capsys, monkeypatch):
    from fcdm_lab.models import profile as prof

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prof, "profile_model", interrupted)
    code, out, err = run(capsys, "profile", "FCDM-S")
    assert code == 130 and err.strip() == "interrupted: stopped by SIGINT (Ctrl-C)", err


def test_stop_on_signals_sets_a_flag_restores_handlers_and_nests():
    before = signal.getsignal(signal.SIGTERM)
    with signals.stop_on_signals() as stop:
        assert not stop.requested and stop.agree(step=3, world=1) is False
        with signals.stop_on_signals() as inner:  # a study around train(): one shared request
            assert inner is stop
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.agree(step=3, world=1)
        e = stop.interrupted("at step 3")
        assert isinstance(e, KeyboardInterrupt) and e.exit_code == 143 and "SIGUSR1" in str(e)
    assert signal.getsignal(signal.SIGTERM) is before
    assert [signals.exit_code_for(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)] == [130, 143, 143]


def test_sigterm_outside_training_raises_interrupted():
    with pytest.raises(signals.Interrupted) as exc:
        with signals.raise_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert exc.value.exit_code == 143


# ---------------------------------------------------------------------------------------------
# Logs in files (item 3)
# ---------------------------------------------------------------------------------------------

def test_non_tty_log_has_a_progress_line_per_log_step(tmp_path, capsys):
    exp = write_experiment(tmp_path / "exp.toml", tiny(steps=6, log_every=2))
    code, out, err = run(capsys, "train", str(exp), "--out", str(tmp_path / "run"), "--no-track")
    assert code == 0, err
    progress = [line for line in out.splitlines() if " step " in line]
    assert [re.search(r"step (\d+)/6", line).group(1) for line in progress] == ["2", "4", "6"]
    assert all(re.search(r"loss \d+\.\d{4}  \d+ images/s  ETA \d+:\d\d:\d\d$", line) for line in progress), progress


# ---------------------------------------------------------------------------------------------
# Names (item 6) and one-line errors (items 7 and 9)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "a/b", ".hidden", ""])
def test_unsafe_names_are_refused_and_nothing_is_written(tmp_path, capsys, name):
    one_line_exit_2(*run(capsys, "train", "tiny-digits", "--set", f"name={json.dumps(name)}"), "is not allowed")
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


@pytest.mark.parametrize("setting,needle", [
    ("train.lr=-1", "train.lr must be > 0, got -1"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.ema_decay=1.5", "train.ema_decay must be in [0, 1)"),
    ("eval.guidance_channels=0", "eval.guidance_channels must be >= 1"),
    ("diffusion.beta_end=0.00001", "beta_start (0.0001) must be <= diffusion.beta_end"),
    ("model.C=16384", "parameters: training needs at least"),
    ("model.C=100000", "C (width) must be at most 16384"),
    ("train.seed=-5", "train.seed must be an integer from 0 to 4294967295, got -5"),
    ("train.threads=100000", "train.threads must be an integer from 1 to 1024"),
])
def test_bad_numbers_and_a_model_too_big_are_one_line(tmp_path, capsys, setting, needle):
    one_line_exit_2(*run(capsys, "train", "tiny-digits", "--set", setting, "--out", "run", "--no-track"), needle)
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    one_line_exit_2(*run(capsys, "train", "tiny-digits", "--out", "taken", "--no-track"), "is an existing file")


def _in_private_tmpfs(tmp_path, mount_opts, script):
    """Run `script` (sh) with a fresh tmpfs at tmp_path/mnt in a user + mount namespace; skip where
    the system does not allow that (the filesystem conditions are real, not simulated)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {mount_opts} tmpfs {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {mount_opts} tmpfs {mnt} && {script}"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)


def test_read_only_output_folder_is_one_line(tmp_path):
    exp = write_experiment(tmp_path / "exp.toml", tiny())
    proc = _in_private_tmpfs(tmp_path, "ro", f"{sys.executable} -m fcdm_lab train {exp} --out mnt/run --no-track")
    assert proc.returncode == 2, proc.stderr
    assert "read-only filesystem" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path):
    # One checkpoint of this model is ~1.7 MB: the first fits into 2.6 MB, the second does not.
    exp = write_experiment(tmp_path / "exp.toml", tiny(steps=4))
    proc = _in_private_tmpfs(tmp_path, "size=2600k", f"{sys.executable} -m fcdm_lab train {exp} --out mnt/run "
                             f"--no-track; echo rc=$?; cp -r mnt/run {tmp_path / 'copy'}")
    assert "rc=2" in proc.stdout, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"no space left to write checkpoint \S+step_0000004\.pt: it needs about 1\.\d MB, "
                     r"0\.\d MB is free there; earlier checkpoints are intact \(newest: \S+step_0000002\.pt\)", err[0])
    assert read_checkpoint(tmp_path / "copy" / "checkpoints" / "step_0000002.pt")["step"] == 2
    assert [p.name for p in (tmp_path / "copy" / "checkpoints").iterdir()] == ["step_0000002.pt"]


def test_a_write_failing_with_enospc_names_the_space(tmp_path, monkeypatch):
    import errno

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", full)
    with pytest.raises(UserError, match="no space left to write checkpoint .* needs about 0.1 MB"):
        ckpt_io.atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "checkpoints" / "step_0000002.pt")
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_text_file_as_checkpoint_and_guidance_channels_out_of_range(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("my notes\n")
    one_line_exit_2(*run(capsys, "sample", "--checkpoint", "notes.txt"), "is not a checkpoint: it is a text file")
    exp = write_experiment(tmp_path / "exp.toml", tiny(steps=2))
    one_line_exit_2(*run(capsys, "train", str(exp), "--out", "run", "--no-track", "--resume", "notes.txt"),
                    "is not a checkpoint: it is a text file")
    assert run(capsys, "train", str(exp), "--out", "run", "--no-track")[0] == 0
    one_line_exit_2(*run(capsys, "sample", "--checkpoint", "run", "--num", "2", "--steps", "2",
                         "--guidance-channels", "99"), "guidance_channels must be between 1 and 1")


# ---------------------------------------------------------------------------------------------
# One training per folder
# ---------------------------------------------------------------------------------------------

def test_folder_lock_refuses_a_second_holder_and_is_released_when_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from fcdm_lab.training.preflight import run_folder_lock\n"
        "with run_folder_lock(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()"),
        str(tmp_path / "run")], env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by another training \(pid {holder.pid}\)"):
            with run_folder_lock(tmp_path / "run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_folder_lock(tmp_path / "run"):  # SIGKILLed holder: the OS released the lock
        with run_folder_lock(tmp_path / "run"):  # nested in one process: no self-deadlock
            pass
    # a refused run leaves no folder behind; a folder it did not create stays
    with pytest.raises(UserError):
        with run_folder_lock(tmp_path / "new" / "run"):
            raise UserError("refused")
    assert not (tmp_path / "new").exists() and (tmp_path / "run" / LOCK_FILE).exists()


def test_unsafe_study_name_is_refused(tmp_path, capsys):
    one_line_exit_2(*run(capsys, "sweep", "search-lc", "--study-name", "../x"), "study name '../x' is not allowed")
    assert list(tmp_path.iterdir()) == []


def test_check_output_dir_creates_nothing(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []

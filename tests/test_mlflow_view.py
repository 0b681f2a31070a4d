"""What a researcher meets in the MLflow UI: experiments tagged as model training, printed links that
open the runs table (not MLflow 3's GenAI overview) in a real headless Chromium, the git commit as
MLflow's source version, world size and device as params."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fcdm_lab.config import config_from_dict
from fcdm_lab.runner import train_tracked
from fcdm_lab.tracking.client import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, get_client, tracked_run
from fcdm_lab.tracking.record import git_state
from fcdm_lab.tracking.ui import browse_hint

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_text(url: str, profile: Path) -> str:
    """The page as headless Chromium renders it (scripts run for up to 15 s of virtual time), tags stripped."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=15000", "--dump-dom", url]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.skipif(CHROMIUM is None, reason="needs a browser: apt-get install -y chromium")
def test_printed_link_opens_the_runs_table(tmp_path):
    with tracked_run("tiny-view-run") as tracker:
        tracker.log_metrics({"loss": 0.5}, step=1)
    client = get_client()
    exp = client.get_experiment(client.get_run(tracker.run_id).info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert "?workflowType=machine_learning" in browse_hint(tracker.run_id)

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ui = subprocess.Popen([sys.executable, "-m", "fcdm_lab", "ui", "--port", str(port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ui.stdout.readline()  # printed before the server starts
        link = re.search(r"(http://\S+)", line).group(1)
        assert link == f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "the MLflow UI did not start"
                time.sleep(0.5)
        text = page_text(link, tmp_path / "profile")  # a fresh profile: no sidebar choice remembered
    finally:
        ui.send_signal(signal.SIGTERM)  # fcdm-lab ui stops its server on SIGTERM
        ui.wait(timeout=30)
    assert "Runs - Experiment" in text and "tiny-view-run" in text, text[:500]
    assert "Traces 0" not in text and "No data available" not in text  # the GenAI overview's empty dashboard


def test_training_run_records_world_size_device_and_source_commit(tmp_path):
    cfg = config_from_dict({"name": "tiny-view", "model": {"name": "FCDM", "L": 1, "C": 8}, "data": {"name": "digits"},
                            "train": {"steps": 2, "batch_size": 8, "ckpt_every": 2, "threads": 1},
                            "eval": {"sampler": "ddim", "steps": 2}})
    _, run_id = train_tracked(cfg, tmp_path / "run", progress=False)
    run = get_client().get_run(run_id)
    assert run.data.params["world_size"] == "1" and run.data.params["device"] == "cpu"
    commit, _ = git_state()
    if commit is not None:
        assert run.data.tags["mlflow.source.git.commit"] == commit
    assert {a.path for a in get_client().list_artifacts(run_id)} >= {"pipeline", "config.toml"}

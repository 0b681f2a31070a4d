"""The README's CPU multi-process recipe, end to end through the CLI: two processes train one run,
the MLflow run records world size 2, and only the main process prints."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from fcdm_lab.tracking.client import get_client

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run_records_world_size_and_prints_once(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    # The README's recipe (section "Clusters"), with a tiny model and 4 steps.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "fcdm_lab", "train", "tiny-digits", "--steps", "4", "--out", str(tmp_path / "run"),
           "--set", "model.C=8", "--set", "train.batch_size=8", "--set", "eval.steps=2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done") == 1, proc.stdout  # one line, from the main process
    client = get_client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    assert runs[0].data.params["world_size"] == "2" and runs[0].data.params["device"] == "cpu"
    assert runs[0].info.status == "FINISHED"

"""Test settings.

Threads: one torch thread per process by default (two busy processes with 2 threads each run
~100x slower on a 2-core machine); `.ci/run` sets FCDM_TEST_THREADS=2 for the single pytest process.
Subprocesses started by tests get OMP_NUM_THREADS=1. MLflow stores and fcdm-lab's caches live in
temporary folders, so tests never touch the user's stores.
"""
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("FCDM_LAB_CACHE", tempfile.mkdtemp(prefix="fcdm-lab-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FCDM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _isolated_stores(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    yield

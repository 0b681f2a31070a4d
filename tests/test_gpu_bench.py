"""benchmarks/gpu.py runs on the CPU (tiny model) with only the GPU machines' packages importable,
and the trainer's batched latent reads equal the per-item ones."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fcdm_lab.data.latents import LatentStore, write_latent_store

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = '''
import importlib.abc
import importlib.machinery
import sys

class _Refuse(importlib.abc.Loader):  # importing a blocked package fails; looking it up does not
    def create_module(self, spec):
        raise ImportError(f"{spec.name} is blocked: the benchmark path must not import it")

    def exec_module(self, module):
        pass

class _Block:  # the GPU machines have torch, accelerate, diffusers (carried) but none of these
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"mlflow", "optuna", "torch_fidelity"}:
            return importlib.machinery.ModuleSpec(name, _Refuse())
        return None

sys.meta_path.insert(0, _Block())
'''


def test_gpu_benchmark_quick_on_cpu_without_tracking_packages(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), OMP_NUM_THREADS="1")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    row = res["rows"][0]
    assert "error" not in row and row["train_img_s"] > 0 and row["infer_img_s"] > 0 and 0 < row["mfu"] < 1
    assert row["gmacs"] > 0 and res["matmul_tflops"] > 0
    trainer = res["trainer"][0]  # fcdm-lab's own train() on a synthetic latent store
    assert trainer["steps"] == 6 and trainer["trainer_img_s"] > 0
    assert {r["change"] for r in res["loop"]} == {"baseline", "sync_each_step", "tf32_off", "grad_checkpointing"}
    assert all("error" not in r for r in res["loop"])
    assert "trainer: FCDM-tiny" in proc.stdout and "% of the bare loop" in proc.stdout


def test_latent_store_batched_reads_equal_item_reads(tmp_path):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((25, 4, 2, 2)).astype(np.float32)
    lab = rng.integers(0, 3, 25)
    batches = [(lat[i:i + 7], lab[i:i + 7]) for i in range(0, 25, 7)]
    write_latent_store(str(tmp_path / "s"), batches, {"vae": "v", "scale_factor": 0.5, "flip": False,
                                                      "num_classes": 3}, shard_size=10, dtype="float32")
    store = LatentStore(str(tmp_path / "s"))
    idx = [24, 0, 9, 10, 10, 3, -1, 17]  # across shards, repeated, unsorted, negative
    batch = store.__getitems__(idx)
    for i, (x, y) in zip(idx, batch):
        x1, y1 = store[i]
        assert torch.equal(x, x1) and y == y1
    loader = torch.utils.data.DataLoader(store, batch_size=8, shuffle=False)
    x, y = next(iter(loader))  # DataLoader uses __getitems__ and collates as before
    assert x.shape == (8, 4, 2, 2) and torch.equal(x[3], store[3][0]) and y.tolist() == lab[:8].tolist()

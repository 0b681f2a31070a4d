"""benchmarks/gpu.py runs every section on the CPU (tiny models) with only the GPU machines' packages
importable, skips gracefully past its time budget, its reference-layout FCDM computes fcdm-lab's
function, and the trainer's batched latent reads equal the per-item ones."""
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


def run_bench(tmp_path, *extra):
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), OMP_NUM_THREADS="1")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--json", str(out), *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_gpu_benchmark_quick_on_cpu_without_tracking_packages(tmp_path):
    res, stdout = run_bench(tmp_path)  # --quick: every section, tiny models
    assert res["sections"] == ["paper-protocol", "profile", "train-xl", "eager", "512", "trainer", "loop", "compile"]
    assert stdout.startswith("sections: paper-protocol, profile, train-xl")
    assert not [s for s in res["skipped"] if "failed" in s], res["skipped"]
    row = res["rows"][0]
    assert "error" not in row and row["train_img_s"] > 0 and row["infer_img_s"] > 0 and 0 < row["mfu"] < 1
    assert row["gmacs"] > 0 and res["matmul_tflops"] > 0
    trainer = res["trainer"][0]  # fcdm-lab's own train() on a synthetic latent store
    assert trainer["steps"] == 6 and trainer["trainer_img_s"] > 0
    assert {r["change"] for r in res["loop"]} == {"baseline", "sync_each_step", "tf32_off", "grad_checkpointing"}
    assert all("error" not in r for r in res["loop"])
    assert "trainer: FCDM-tiny" in stdout and "% of the bare loop" in stdout

    # 1. the paper protocol: 3 settings x 4 models, both timings, a ratio per setting, flags restored
    pp = res["paper_protocol"]
    assert pp["protocol"]["warmup"] == 2 and pp["paper_ratio_fcdm_over_dit"] == 3.39
    assert set(pp["models"]) == {"dit", "dico", "fcdm_ref", "fcdm_lab"}
    assert pp["models"]["fcdm_ref"]["layout"].startswith("reference FCDM: NCHW")
    rows = {(r["setting"], r["role"]): r for r in pp["rows"]}
    assert len(rows) == 12 and not [r for r in pp["rows"] if "error" in r]
    for r in pp["rows"]:
        assert r["dico_img_s"] > 0 and r["synced_img_s"] > 0 and r["tail_s"] >= 0 and r["synced_tflops"] > 0
    assert rows[("fp32-defaults", "dit")]["flags"] == {"matmul_allow_tf32": False, "cudnn_allow_tf32": True,
                                                       "cudnn_benchmark": False}
    assert rows[("tf32-matmul", "dit")]["flags"]["matmul_allow_tf32"] is True
    assert rows[("bf16-autocast", "dit")]["autocast"] == "bfloat16"
    assert rows[("fp32-defaults", "dit")]["autocast"] is None
    assert pp["flags_restored"] and pp["flags_after"] == res["default_flags"] | {"matmul_allow_tf32": True}
    ratios = {(q["setting"], q["timing"]): q for q in pp["ratios"]}
    assert set(ratios) == {(s, t) for s in ("fp32-defaults", "tf32-matmul", "bf16-autocast") for t in ("synced", "dico")}
    for q in ratios.values():
        assert q["fcdm_ref_over_dit"] > 0 and q["fcdm_lab_over_dit"] > 0 and q["dico_over_dit"] > 0 and q["paper"] == 3.39
    assert any("scaled_dot_product" in k for k in pp["attention"]["kernels"]["fp32-defaults/dit"])
    assert "Paper protocol" in stdout and "FCDMref/DiT" in stdout

    # 2. the per-op profile: groups per block component, fractions of the step summing to <= 100%
    prof = {p["model"]: p for p in res["profile"]}
    assert set(prof) == {"FCDM-tiny", "DiT-tiny"}
    for p in prof.values():
        assert "error" not in p, p
        g = p["groups"]
        assert {"depthwise_conv_fwd", "depthwise_conv_bwd", "layernorm_modulation", "grn", "gemm", "attention",
                "optimizer", "other"} <= set(g)
        total = sum(v["fraction_of_step"] for v in g.values())
        assert 0.5 < total <= 1.0 + 1e-9, total
        assert abs(sum(v["fraction_of_device_time"] for v in g.values()) - 1) < 1e-6
        assert abs(sum(p["attribution"].values()) - 1) < 1e-6 and p["top_kernels"]
        assert g["gemm"]["ms_per_step"] > 0 and g["optimizer"]["ms_per_step"] > 0
        assert g["layernorm_modulation"]["fwd_ms"] > 0 and g["layernorm_modulation"]["bwd_ms"] > 0
    f, d = prof["FCDM-tiny"]["groups"], prof["DiT-tiny"]["groups"]
    assert f["depthwise_conv_fwd"]["ms_per_step"] > 0 and f["depthwise_conv_bwd"]["ms_per_step"] > 0
    assert f["grn"]["fwd_ms"] > 0 and f["grn"]["bwd_ms"] > 0 and f["attention"]["ms_per_step"] == 0
    assert d["attention"]["ms_per_step"] > 0 and d["depthwise_conv_fwd"]["ms_per_step"] == 0
    assert "profile FCDM-tiny batch 8" in stdout

    # 3. the XL trio (tiny here), eager and compiled alike, adaptive repeats with their spread
    xl = [r for r in res["rows"] if r.get("section") == "train-xl"]
    assert {(r["model"], r["compile"]) for r in xl} == {(m, c) for m in ("FCDM-tiny", "DiT-tiny", "DiCo-tiny")
                                                        for c in (False, True)}
    for r in xl:
        assert "error" not in r and 2 <= len(r["train_img_s_all"]) <= 3 and r["train_rel_se"] is not None
    assert all(r["compile_kwargs"] == {"dynamic": "False", "backend": "eager"} for r in xl if r["compile"])
    for mode in ("eager", "compiled"):
        assert res["train_xl"][mode]["fcdm_over_dit"] > 0 and res["train_xl"][mode]["dico_over_dit"] > 0
    assert res["train_xl"]["compile_gain"]["dico"] > 0


def test_gpu_benchmark_budget_skips_and_still_writes_json(tmp_path):
    res, stdout = run_bench(tmp_path, "--sections", "paper-protocol,profile,train-xl", "--budget-s", "0")
    assert res["sections"] == ["paper-protocol", "profile", "train-xl"]
    assert res["paper_protocol"]["rows"] == [] and res["profile"] == [] and res["rows"] == []
    assert any("time budget" in s for s in res["skipped"]) and "total_s" in res
    assert "skipped: profile FCDM-tiny (time budget)" in stdout


def test_reference_layout_fcdm_computes_fcdm_labs_function():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reference_models import RefFCDM

    from fcdm_lab.models import create_model

    torch.manual_seed(0)
    lab = create_model("FCDM", L=1, C=16, input_size=8, in_channels=4, num_classes=10).eval()
    with torch.no_grad():
        for p in lab.parameters():  # every weight non-zero, so the comparison is not 0 == 0
            p.copy_(torch.randn_like(p) * 0.1)
    for ckpt in ("off", "always"):
        ref = RefFCDM(L=1, C=16, in_channels=4, num_classes=10, checkpointing=ckpt).eval()
        ref.load_state_dict(lab.state_dict())  # same names and shapes (facts section 10)
        x = torch.randn(2, 4, 8, 8)
        for t, y in ((torch.tensor([3, 900]), torch.tensor([1, 7])), (torch.ones(1).int(), torch.ones(1).int())):
            with torch.no_grad():
                a, b = lab(x, t, y), ref(x, t, y)
            assert b.shape == (2, 8, 8, 8) and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert all(p.is_contiguous() for p in ref.parameters())  # NCHW weights, as the reference (lab's: channels_last)
    import gpu

    _, info = gpu.make_model({"name": "FCDM-XL-ref"}, 32, torch.device("meta"))
    assert info["params"] == 698_754_056 and round(info["gmacs"], 3) == 64.530  # facts section 4


def test_profile_name_fallback_and_adaptive_repeats():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    assert gpu.name_group("GeluBackward0", True) == "elementwise"
    assert gpu.name_group("aten::addcmul", True) == "elementwise"
    assert gpu.name_group("aten::addcmul", False) == "other"  # outside a block: loss arithmetic
    assert gpu.name_group("aten::addmm", False) == "gemm" and gpu.name_group("MmBackward0", True) == "gemm"
    assert gpu.name_group("ScaledDotProductEfficientAttentionBackward0", True) == "attention"
    assert gpu.name_group("_GRNFunctionBackward", True) == "grn"
    assert gpu.name_group("NativeLayerNormBackward0", True) == "layernorm_modulation"
    steady = iter([100.0] * 10)
    xs, s = gpu.adaptive(lambda: next(steady), min_n=3, max_n=10, target=0.02, cap_s=60)
    assert len(xs) == 3 and s["rel_se_median"] == 0  # certain after the minimum
    noisy = iter([100.0, 130.0, 80.0, 120.0, 90.0, 125.0, 85.0, 110.0, 95.0, 105.0])
    xs, s = gpu.adaptive(lambda: next(noisy), min_n=3, max_n=6, target=0.02, cap_s=60)
    assert len(xs) == 6 and s["rel_se_median"] > 0.02 and abs(s["half_range"] - 25 / 110) < 1e-12  # capped
    before = gpu.flags()
    try:
        with gpu.precision(True, False, cudnn_benchmark=True):
            assert gpu.flags() == {"matmul_allow_tf32": True, "cudnn_allow_tf32": False, "cudnn_benchmark": True}
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert gpu.flags() == before  # restored, even on an error


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


def test_profile_summary_on_gpu_shaped_events():
    """The CUDA path of the profile summary, on hand-made events shaped like torch.profiler's: kernels
    hang on the host op that launched them; the GPU mirror of a record_function label (also attached
    as a "kernel") is not counted twice; backward kernels reach their forward label through the
    autograd sequence number; a kernel linked to no host op counts as other."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    class Range:
        def __init__(self, start, us):
            self.start, self.us = start, us

        def elapsed_us(self):
            return self.us

    def ev(name, parent=None, *, seq=-1, thread=1, fwd_thread=0, kernels=(), start=0, ann=False, dev=DeviceType.CPU, us=0):
        return NS(name=name, cpu_parent=parent, sequence_nr=seq, thread=thread, fwd_thread=fwd_thread,
                  kernels=[NS(name=k, duration=d) for k, d in kernels], time_range=Range(start, us),
                  is_user_annotation=ann, device_type=dev, is_async=False, self_cpu_time_total=0)

    dw = ev("fcdm_bench::dwconv", ann=True, kernels=[("fcdm_bench::dwconv", 400)])
    conv = ev("aten::convolution", dw, seq=5, start=1, kernels=[("conv_depthwise2d_forward_kernel", 100)])
    node = ev("autograd::engine::evaluate_function: ConvolutionBackward0", seq=5, thread=2, fwd_thread=1)
    bwd = ev("aten::convolution_backward", node, thread=2, kernels=[("conv_depthwise2d_backward_kernel", 150)])
    opt = ev("Optimizer.step#AdamW.step", ann=True)
    adam = ev("aten::_fused_adamw_", opt, kernels=[("multi_tensor_apply_kernel", 50)])
    gpu_side = [ev(k, dev=DeviceType.CUDA, us=u) for k, u in
                (("conv_depthwise2d_forward_kernel", 100), ("conv_depthwise2d_backward_kernel", 150),
                 ("multi_tensor_apply_kernel", 50), ("orphan_kernel", 20))]
    gpu_side.append(ev("fcdm_bench::dwconv", dev=DeviceType.CUDA, us=400, ann=True))
    s = gpu.summarise_profile([dw, conv, node, bwd, opt, adam, *gpu_side], steps=1, step_s=0.001, cuda=True)
    g = {k: v["ms_per_step"] * 1e3 for k, v in s["groups"].items()}  # microseconds
    assert g["depthwise_conv_fwd"] == 100 and g["depthwise_conv_bwd"] == 150 and g["optimizer"] == 50
    assert g["other"] == 20 and sum(g.values()) == 320
    assert s["kernel_time_check"] == {"linked_us": 300, "all_device_us": 320}
    assert abs(s["busy_fraction"] - 0.32) < 1e-9 and abs(s["groups"]["other"]["fraction_of_step"] - 0.02) < 1e-9
    assert set(s["attribution"]) == {"label", "backward -> forward op -> label", "unlinked kernel"}
    assert s["top_kernels"][0] == {"name": "conv_depthwise2d_backward_kernel", "ms_per_step": 0.15,
                                   "fraction_of_device_time": 150 / 320, "group": "depthwise_conv_bwd"}

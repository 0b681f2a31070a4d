"""GPU speed of FCDM, DiT and DiCo, the paper's speed column re-measured and explained, in ONE command.

THE COMMAND for the GPU machine (one H100/H200; torch, accelerate, diffusers; no network needed), from
the repository root; give the device call a timeout of at least 500 s:

    python benchmarks/gpu.py --json "$OUT/gpu-results.json" 2>&1 | tee "$OUT/gpu-log.txt"

The lent GPU machines have torch, accelerate and timm but not diffusers (fcdm_lab.models builds on
its ModelMixin). Bring it along as a folder, built here for the machine's Python version X.Y
(`python -V` there; the folder is gitignored and travels with the device call's `carry`):

    pip install --target .gpu-site --no-deps --only-binary=:all: --python-version X.Y \
        diffusers huggingface_hub safetensors regex importlib_metadata zipp pyyaml tqdm
    # device call: carry [".gpu-site"], command prefixed with PYTHONPATH=.gpu-site

It prints first which sections will run with a time estimate each, stops STARTING new work once
--budget-s (default 380 s) has passed (what is skipped is listed in the JSON and at the end), writes
the JSON after every measurement (by rename, so a killed run leaves the last complete file), and
prints the tables at the end. Expected: about 6-7 minutes in all on one H100/H200 (a fresh machine,
no compile cache). `--sections all` runs everything (20+ minutes; raise --budget-s). On the CPU:

    python benchmarks/gpu.py --device cpu --quick     # tiny models, every section, ~25 s on one thread

(what tests/test_gpu_bench.py runs, with mlflow, optuna and torch-fidelity made unimportable).

Sections (--sections, comma-separated; default paper-protocol,profile,train-xl; "all" = every one;
--quick defaults to all):

  paper-protocol  The paper's speed column (FCDM copies DiCo's table: facts sections 7, 15) re-measured
                  with DiCo's own protocol (`test_model_throughout`): inference only, model.eval(),
                  torch.no_grad(), batch 64, float32 input torch.rand(64, 4, 32, 32), timesteps and
                  labels torch.ones(1).int() (one of each, broadcast over the batch, as DiCo passes them),
                  torch.cuda.empty_cache() before each loop, 20 warm-up then 20 timed forwards. Timed
                  twice: as DiCo does (time.time() around the loop, no cuda.synchronize: the clock stops
                  when the host has QUEUED the last forward, not when the GPU has run it; `tail_s` is the
                  GPU work still outstanding then, `gpu_idle_at_start` says whether empty_cache left the
                  GPU drained at the start) and correctly (synchronize before and after, 20 more
                  forwards). Models: DiT-XL/2 (fcdm_lab.models.dit: attention through
                  F.scaled_dot_product_attention, the call timm's Attention makes with its default
                  fused_attn, which DiCo's DiT uses; the SDPA kernels that ran are recorded), DiCo-XL
                  (fcdm_lab.models.dico, NCHW nn.Conv2d like its reference), FCDM-XL in the REFERENCE
                  layout (benchmarks/reference_models.py: NCHW, nn.Conv2d 1x1, checkpointing off for
                  inference) and fcdm-lab's own FCDM-XL (channels_last, 1x1 convs as F.linear).
                  --paper-dit-math adds DiT-XL/2 under the math (unfused) SDPA backend.
                  Settings, each restoring the global flags afterwards:
                    fp32-defaults  PyTorch's defaults, the paper's: matmul TF32 OFF, cuDNN TF32 ON,
                                   cudnn.benchmark off, no autocast;
                    tf32-matmul    torch.backends.cuda.matmul.allow_tf32 = True as well;
                    bf16-autocast  the defaults plus torch.autocast(bfloat16).
                  Reports images/s, achieved TFLOP/s (2 x MACs), and per setting the FCDM-XL / DiT-XL/2
                  ratio (reference and fcdm-lab layouts) and DiCo-XL / DiT-XL/2, next to the paper's 3.4x
                  (272.7 vs 80.5 it/s) and what facts section 15 expects; the fp32/TF32/bf16 matmul
                  peaks are measured at the start for comparison.
  profile         torch.profiler of one training step (iDDPM loss, backward, fused AdamW, bf16
                  autocast) of FCDM-XL and DiT-XL/2 (--profile-models) at batch 256 (128, 64 if it does
                  not fit): device time (CPU time on the CPU) per block component: depthwise conv forward
                  and backward, LayerNorm + modulation, GRN, GEMMs (linear / 1x1 conv / matmul),
                  attention (SDPA + its reshapes; q/k/v and output projections are GEMMs), dense k x k
                  convs, elementwise (GELU, gates, residuals), optimizer, other; as fractions of an
                  unprofiled step (they sum to the busy fraction, <= 100%), and the top kernels.
                  Attribution: the model's modules are labelled with torch.profiler.record_function by
                  forward hooks (the modulation functions by wrappers, in this process only), so a
                  forward kernel belongs to the innermost label around the op that launched it; a
                  backward kernel is traced to its forward op through the autograd sequence number and
                  takes that op's label; the rest falls back to op-name patterns. Reliable where a
                  label or a sequence number exists (exact); the name fallback is a guess (e.g. a bare
                  mul in a block counts as elementwise). `attribution` in the JSON says how much device
                  time each route attributed; `kernel_time_check` compares the kernels linked to host
                  ops with all kernels the profiler saw.
  train-xl        Training (and eager inference) images/s of FCDM-XL, DiT-XL/2, DiCo-XL at batch 32,
                  eager, then all three compiled the same way (regional compilation of the repeated
                  blocks, static shapes: dynamic=False, so no model gets dynamic-shape kernels; training
                  only, to save compile time), with adaptive repeats: at least --repeats, more until the
                  relative standard error of the median is below --target-spread (2%) or
                  --max-repeats (10); the spread is reported. Ratios to DiT-XL/2 and compile gains.
  eager           every model at 256 (12 presets), XL models also at the largest of 256/128/64 that fits
  512             FCDM-XL and DiT-XL/2 at 512x512 (the "doubling the resolution" claim)
  trainer         fcdm-lab's own train() on a synthetic latent store against the bare loop
  loop            the training loop's choices one at a time (host sync, TF32 off, checkpointing)
  compile         the eager models compiled (XL first), while the budget lasts

Training timing: a first step (compilation, cuDNN heuristics), warm-up steps, then CUDA events
around --iters steps per repeat; tables show medians. Training sections run with TF32 on, as
fcdm-lab trains. Only torch, accelerate and fcdm_lab's model/trainer code are imported (plus
diffusers for the models' base class): no mlflow, optuna or torch-fidelity.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import reference_models  # noqa: E402
from fcdm_lab.accel import configure_tf32  # noqa: E402
from fcdm_lab.config import ModelConfig, config_from_dict  # noqa: E402
from fcdm_lab.diffusion import create_objective  # noqa: E402
from fcdm_lab.models.build import build_model  # noqa: E402
from fcdm_lab.models.flops import count_gmacs, count_params  # noqa: E402
from reference_models import RefFCDM  # noqa: E402

MODELS_256 = ["FCDM-S", "FCDM-B", "FCDM-L", "FCDM-XL", "DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2",
              "DiCo-S", "DiCo-B", "DiCo-L", "DiCo-XL"]
MODELS_512 = ["FCDM-XL", "DiT-XL/2"]
XL = ["FCDM-XL", "DiT-XL/2", "DiCo-XL"]
BIG_BATCHES = (256, 128, 64)  # the XL models also run at the largest of these that fits
PAPER_IT_S = {"FCDM-XL": 272.7, "DiT-XL/2": 80.5, "DiCo-XL": 174.2}  # facts section 7 (DiCo's table)
PAPER_RATIO = PAPER_IT_S["FCDM-XL"] / PAPER_IT_S["DiT-XL/2"]  # 3.39x
SECTIONS = ["paper-protocol", "profile", "train-xl", "eager", "512", "trainer", "loop", "compile"]
DEFAULT_SECTIONS = "paper-protocol,profile,train-xl"

# The paper protocol's models by role; --quick swaps in tiny models of the same code.
PAPER_ROLES = {"dit": "DiT-XL/2", "dico": "DiCo-XL", "fcdm_ref": "FCDM-XL-ref", "fcdm_lab": "FCDM-XL"}
QUICK_ROLES = {"dit": "DiT-tiny", "dico": "DiCo-tiny", "fcdm_ref": "FCDM-tiny-ref", "fcdm_lab": "FCDM-tiny"}
DICO_PROTOCOL = {"batch": 64, "latent": 32, "warmup": 20, "iters": 20}
QUICK_PROTOCOL = {"batch": 8, "latent": 8, "warmup": 2, "iters": 2}
# What facts section 15 expects of FCDM-XL / DiT-XL/2 (reference layout) under each setting
EXPECTED_RATIO = {"fp32-defaults": "~3x", "tf32-matmul": "1.2-1.7x", "bf16-autocast": "1.1-1.25x"}
# name, matmul TF32, cuDNN TF32, autocast dtype
PAPER_SETTINGS = [("fp32-defaults", False, True, None), ("tf32-matmul", True, True, None),
                  ("bf16-autocast", False, True, torch.bfloat16)]

# Rough seconds per item on one H100/H200, for the budget planner (a fresh machine: no compile cache).
EST_S = {"startup": 20, "paper_build": 4, "paper_fp32_dit": 25, "paper_fp32": 12, "paper_fast": 5,
         "profile": 30, "train_eager": 15, "train_compiled": 45, "eager": 15, "eager_xl": 40, "512": 20,
         "trainer": 60, "loop": 60, "compile": 60}


# ---------------------------------------------------------------------------------------------
# Timing helpers

class Timer:
    """CUDA events on a GPU (device time, no host round trip per step); perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, iters: int) -> float:
        """Seconds for `iters` calls of fn."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(xs: list[float]) -> dict:
    """Median, relative standard error of the median (1.2533 sd / sqrt(n) / median) and half-range."""
    med = statistics.median(xs)
    n = len(xs)
    se = 1.2533 * statistics.stdev(xs) / math.sqrt(n) / med if n > 1 and med else None
    return {"median": med, "n": n, "rel_se_median": se,
            "half_range": (max(xs) - min(xs)) / 2 / med if med else None}


def adaptive(rate, *, min_n: int, max_n: int, target: float, cap_s: float) -> tuple[list[float], dict]:
    """Call rate() (one repeat's images/s) at least min_n times, then until the relative standard
    error of the median is below target, max_n repeats, or cap_s seconds have passed."""
    xs, t0 = [], time.perf_counter()
    while len(xs) < max(max_n, min_n):
        xs.append(rate())
        if len(xs) >= min_n:
            s = spread(xs)
            if (s["rel_se_median"] or 0.0) <= target or time.perf_counter() - t0 > cap_s:
                break
    return xs, spread(xs)


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "cpu_threads": torch.get_num_threads(), "host": platform.node()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["cpu"] = platform.processor() or platform.machine()
    for mod in ("diffusers", "accelerate", "timm"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent is an answer
            env[mod] = None
    return env


def flags() -> dict:
    """The global precision flags the paper protocol cares about, as PyTorch reports them. Only the
    legacy allow_tf32 flags are read and set (as fcdm_lab.accel and DiT do): torch >= 2.9 refuses
    get_float32_matmul_precision() once the legacy and the new fp32_precision APIs are mixed."""
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


@contextlib.contextmanager
def precision(matmul_tf32: bool, cudnn_tf32: bool, cudnn_benchmark: bool = False):
    """Set the TF32 flags (and cudnn.benchmark) for a block; restore the previous values after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.backends.cudnn.benchmark = saved[2]


def matmul_peak(device: torch.device, n: int, repeats: int, dtype=None) -> float:
    """TFLOP/s of an n x n x n matmul (bf16 on GPU, fp32 on CPU unless dtype), median of `repeats`."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timer = Timer(device)
    timer(lambda: a @ b, 3)
    iters = 10 if device.type == "cuda" else 2
    times = [timer(lambda: a @ b, iters) / iters for _ in range(repeats)]
    return 2 * n ** 3 / statistics.median(times) / 1e12


# ---------------------------------------------------------------------------------------------
# Models by name: fcdm-lab's registry, the reference-layout FCDM ("<preset>-ref"), tiny stand-ins

TINY_CONFIG = {"FCDM-tiny": {"name": "FCDM", "L": 1, "C": 32}}
FCDM_DIMS = {"FCDM-S": (2, 128), "FCDM-B": (2, 256), "FCDM-L": (2, 512), "FCDM-XL": (3, 512), "FCDM-tiny": (1, 32)}


def _tiny_dit(latent: int) -> nn.Module:
    from fcdm_lab.models.dit import DiT
    return DiT(input_size=latent, depth=2, hidden_size=64, num_heads=2, num_classes=1000)


def _tiny_dico(latent: int) -> nn.Module:
    from fcdm_lab.models.dico import DiCo
    return DiCo(input_size=latent, hidden_size=32, depth=(1, 1, 1, 1, 1), num_classes=1000)


TINY_CUSTOM = {"DiT-tiny": _tiny_dit, "DiCo-tiny": _tiny_dico}


def layout_of(name: str) -> str:
    if name.endswith("-ref"):
        return "reference FCDM: NCHW, 1x1 convs as nn.Conv2d"
    if name.startswith("FCDM"):
        return "fcdm-lab FCDM: channels_last, 1x1 convs as F.linear"
    if name.startswith("DiT"):
        return "DiT: tokens, nn.Linear, attention by F.scaled_dot_product_attention"
    return "DiCo: NCHW, 1x1 convs as nn.Conv2d"


def make_model(spec: dict, latent: int, device: torch.device) -> tuple[nn.Module, dict]:
    """(model built directly on `device`, info: params, gmacs per image, layout)."""
    name = spec["name"]
    extra = {k: v for k, v in spec.items() if k != "name"}
    if name.endswith("-ref"):
        L, C = FCDM_DIMS[name[:-4]]
        ckpt = "train" if extra.pop("grad_checkpointing", False) else "off"
        ctor = functools.partial(RefFCDM, L=L, C=C, in_channels=4, num_classes=1000, checkpointing=ckpt)
    elif name in TINY_CUSTOM:
        ctor = functools.partial(TINY_CUSTOM[name], latent)
    else:
        cfg = ModelConfig(**{**TINY_CONFIG.get(name, {"name": name}), **extra})
        with torch.device(device):
            model, info = build_model(cfg, input_size=latent, in_channels=4, num_classes=1000)
        return model, {"params": info["params"], "gmacs": info["gmacs"], "layout": layout_of(name)}
    with torch.device("meta"):
        gmacs = count_gmacs(ctor(), (4, latent, latent))
    with torch.device(device):
        model = ctor()
    return model, {"params": count_params(model), "gmacs": gmacs, "layout": layout_of(name)}


def compile_blocks(model: nn.Module, args) -> dict:
    """Regional compilation: each module whose class is in model._repeated_blocks compiled alike."""
    kw = {}
    if args.compile_dynamic == "false":
        kw["dynamic"] = False
    if args.compile_backend != "inductor":
        kw["backend"] = args.compile_backend
    try:  # static shapes: FCDM and DiCo have 3 widths x train/eval; keep them under the recompile limit
        import torch._dynamo
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 16))
                break
    except Exception:  # noqa: BLE001
        pass
    names = set(getattr(model, "_repeated_blocks", ()))
    for m in model.modules():
        if type(m).__name__ in names:
            m.compile(**kw)
    return {k: str(v) for k, v in kw.items()}


# ---------------------------------------------------------------------------------------------
# The bare model loop

def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Bench:
    """One model on one device: the real objective, fused AdamW, bf16 autocast on the GPU."""

    def __init__(self, spec: dict, resolution: int, device: torch.device):
        self.device = device
        self.latent = resolution // 8
        torch.manual_seed(0)
        self.model, self.info = make_model(spec, self.latent, device)
        learn_sigma = getattr(self.model, "out_channels", 8) == 8
        self.objective = create_objective("ddpm", learn_sigma=learn_sigma)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.gen = torch.Generator(device=device).manual_seed(0)

    def batch(self, n: int):
        x = torch.randn(n, 4, self.latent, self.latent, device=self.device)
        y = torch.randint(0, 1000, (n,), device=self.device)
        return x, y

    sync_each_step = False  # the old trainer's habit: read the loss on the host every step

    def train_step(self, x, y) -> None:
        with self.amp:
            loss = self.objective.training_losses(self.model, x, {"y": y}, generator=self.gen)["loss"].mean()
        loss.backward()
        if self.sync_each_step:
            loss.item()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step(self, x, y) -> None:
        t = torch.randint(0, 1000, (x.shape[0],), device=self.device)
        with self.amp:
            self.model(x, t, y)

    def measure(self, batch: int, *, iters: int, repeats: int, warmup: int, max_repeats: int | None = None,
                target: float = 0.0, cap_s: float = 30.0, infer: bool = True) -> dict:
        """Train (and inference) images/s: medians of adaptive repeats, peak memory, first-step time."""
        timer = Timer(self.device)
        x, y = self.batch(batch)
        max_repeats = max(max_repeats or repeats, repeats)
        self.model.train()
        t0 = time.perf_counter()
        self.train_step(x, y)
        sync(self.device)
        first = time.perf_counter() - t0  # includes compilation when compiled, cuDNN autotuning otherwise
        timer(lambda: self.train_step(x, y), max(warmup - 1, 0))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        train, tstat = adaptive(lambda: batch * iters / timer(lambda: self.train_step(x, y), iters),
                                min_n=repeats, max_n=max_repeats, target=target, cap_s=cap_s)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        out = {"batch": batch, "train_img_s": tstat["median"], "train_img_s_all": train,
               "train_rel_se": tstat["rel_se_median"], "train_half_range": tstat["half_range"],
               "peak_mem_gib": peak, "first_train_step_s": first, "step_s": batch / tstat["median"],
               "infer_img_s": None, "first_infer_step_s": None}
        if infer:
            self.model.eval()
            t0 = time.perf_counter()
            self.infer_step(x, y)
            sync(self.device)
            out["first_infer_step_s"] = time.perf_counter() - t0
            timer(lambda: self.infer_step(x, y), max(warmup - 1, 0))
            inf, istat = adaptive(lambda: batch * iters / timer(lambda: self.infer_step(x, y), iters),
                                  min_n=repeats, max_n=max_repeats, target=target, cap_s=cap_s)
            out.update(infer_img_s=istat["median"], infer_img_s_all=inf, infer_rel_se=istat["rel_se_median"])
        return out


def run_model(name: str, spec: dict, resolution: int, device: torch.device, *, batches, compile_: bool,
              args, peak_tflops: float, infer: bool = True) -> list[dict]:
    """All measurements of one model at one resolution; OOM at a batch moves on to the next."""
    rows = []
    bench = Bench(spec, resolution, device)
    gmacs = bench.info["gmacs"]
    compile_kw = compile_blocks(bench.model, args) if compile_ else None
    tried_big = False
    for batch in batches:
        if batch in BIG_BATCHES and tried_big:
            continue
        try:
            m = bench.measure(batch, iters=args.iters, repeats=args.repeats, warmup=args.warmup,
                              max_repeats=args.max_repeats, target=args.target_spread, infer=infer)
        except Exception as e:  # noqa: BLE001 - OOM is an expected outcome of the batch search
            if not is_oom(e):
                raise
            bench.opt.zero_grad(set_to_none=True)
            free(device)
            rows.append({"model": name, "resolution": resolution, "compile": compile_, "batch": batch,
                         "error": "out of memory"})
            continue
        tried_big = tried_big or batch in BIG_BATCHES
        m.update(model=name, resolution=resolution, compile=compile_, params=bench.info["params"],
                 gmacs=round(gmacs, 3))
        if compile_:  # the first step compiles; its extra time over a steady step is the compile time
            m["compile_s"] = round(m["first_train_step_s"] - m["step_s"] + (m["first_infer_step_s"] or 0.0), 1)
            m["compile_kwargs"] = compile_kw
            m["compile_backend"] = args.compile_backend
        m["mfu"] = m["train_img_s"] * 3 * 2 * gmacs * 1e9 / (peak_tflops * 1e12) if peak_tflops else None
        rows.append(m)
    del bench
    free(device)
    return rows


def loop_ablations(name: str, base: dict, batch: int, device: torch.device, args) -> list[dict]:
    """The training loop's choices measured one at a time against the bare loop (same model, batch):
    a host sync per step, TF32 off, gradient checkpointing on (the reference always wraps blocks)."""
    out = []
    for change in args.loop_changes.split(","):
        spec = {**base, "grad_checkpointing": change == "grad_checkpointing"}
        bench = Bench(spec, 256 if not args.quick else 64, device)
        bench.sync_each_step = change == "sync_each_step"
        configure_tf32(change != "tf32_off")
        try:
            m = bench.measure(batch, iters=args.iters, repeats=args.repeats, warmup=args.warmup, infer=False)
            out.append({"model": name, "batch": batch, "change": change, "train_img_s": m["train_img_s"],
                        "peak_mem_gib": m["peak_mem_gib"]})
        except Exception as e:  # noqa: BLE001
            out.append({"model": name, "batch": batch, "change": change, "error": f"{type(e).__name__}: {e}"[:200]})
        finally:
            configure_tf32(True)
            del bench
            free(device)
        print(json.dumps(out[-1]), flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# The paper's protocol (DiCo's test_model_throughout), three precision settings

def dico_throughput(model, x, t, y, device: torch.device, *, warmup: int, iters: int, autocast) -> dict:
    """DiCo's loop as written (no synchronisation around time.time()), then the same loop timed
    correctly. The model is already in eval mode; everything runs under torch.no_grad()."""
    cuda = device.type == "cuda"
    amp = (torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext())
    bs = x.shape[0]

    def empty_cache():
        if cuda:
            torch.cuda.empty_cache()

    with torch.no_grad(), amp:
        empty_cache()
        for _ in range(warmup):
            model(x, t, y)
        empty_cache()
        idle_at_start = torch.cuda.current_stream(device).query() if cuda else True
        start = time.time()
        for _ in range(iters):
            model(x, t, y)
        end = time.time()
        sync(device)
        drained = time.time()
        # correctly: drained GPU before, synchronised after
        sync(device)
        p0 = time.perf_counter()
        for _ in range(iters):
            model(x, t, y)
        sync(device)
        p1 = time.perf_counter()
    return {"dico_img_s": iters * bs / (end - start), "synced_img_s": iters * bs / (p1 - p0),
            "dico_s": end - start, "synced_s": p1 - p0, "tail_s": drained - end,
            "gpu_idle_at_start": bool(idle_at_start)}


def attention_kernels(model, x, t, y, device: torch.device, autocast) -> list[str]:
    """The attention kernels (GPU) or SDPA ops (CPU) one forward of DiT runs, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.no_grad(), amp, profile(activities=acts) as prof:
        model(x, t, y)
        sync(device)
    keys = ("attention", "attn", "fmha", "flash", "sdpa", "softmax", "scaled_dot_product")
    names = set()
    for e in prof.events():
        for n in [e.name] + [k.name for k in getattr(e, "kernels", [])]:
            if any(k in n.lower() for k in keys):
                names.add(n[:160])
    return sorted(names)


def paper_protocol(device: torch.device, args, results: dict, over, save) -> None:
    quick = args.quick
    proto = dict(QUICK_PROTOCOL if quick else DICO_PROTOCOL)
    roles = dict(QUICK_ROLES if quick else PAPER_ROLES)
    if args.paper_dit_math:
        roles["dit_math"] = roles["dit"]
    out = results["paper_protocol"] = {
        "protocol": {**proto, "source": "DiCo dico_models.py test_model_throughout (facts section 15)",
                     "input": f"torch.rand({proto['batch']}, 4, {proto['latent']}, {proto['latent']}) float32",
                     "timesteps_labels": "torch.ones(1).int() each (broadcast over the batch, as DiCo)",
                     "mode": "model.eval(), torch.no_grad(); the reference-layout FCDM (benchmarks/reference_models.py) "
                             "without the checkpoint wrappers the reference puts around its blocks even in inference",
                     "dico_timing": "time.time() around the timed loop, no cuda.synchronize (as DiCo)",
                     "synced_timing": "synchronize, perf_counter, the same number of forwards, synchronize"},
        "paper_it_s": PAPER_IT_S, "paper_ratio_fcdm_over_dit": round(PAPER_RATIO, 2),
        "models": {}, "rows": [], "ratios": [], "attention": {
            "dit": "fcdm_lab.models.dit.Attention: F.scaled_dot_product_attention(q, k, v), the call timm's "
                   "Attention makes with fused_attn on (its default), which DiCo's DiT uses",
            "kernels": {}}}
    out["flags_before"] = flags()
    torch.manual_seed(0)
    x = torch.rand(proto["batch"], 4, proto["latent"], proto["latent"], device=device)
    t = torch.ones(1, device=device).int()
    y = torch.ones(1, device=device).int()
    models = {}
    for role, name in roles.items():
        same = next((r for r in models if roles[r] == name), None)
        if same is not None:  # dit_math: the same DiT, timed under the math SDPA backend
            models[role], out["models"][role] = models[same], dict(out["models"][same])
            continue
        if over(f"paper-protocol: build {name}", EST_S["paper_build"] if not quick else 0):
            continue
        try:
            model, info = make_model({"name": name}, proto["latent"], device)
            model.eval()
            models[role] = model
            out["models"][role] = {"name": name, **info}
        except Exception as e:  # noqa: BLE001
            out["models"][role] = {"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            free(device)
    for setting, mm_tf32, cudnn_tf32, autocast in PAPER_SETTINGS:
        with precision(mm_tf32, cudnn_tf32, cudnn_benchmark=False):
            setting_flags = flags()
            for role, model in models.items():
                name = roles[role]
                need = 0 if quick else (EST_S["paper_fp32_dit"] if setting == "fp32-defaults" and "dit" in role
                                        else EST_S["paper_fp32"] if setting == "fp32-defaults" else EST_S["paper_fast"])
                if over(f"paper-protocol {setting} {name}", need):
                    continue
                row = {"setting": setting, "role": role, "model": name, "flags": setting_flags,
                       "autocast": str(autocast).replace("torch.", "") if autocast else None,
                       "layout": out["models"][role]["layout"]}
                try:
                    math_ctx = contextlib.nullcontext()
                    if role == "dit_math":
                        from torch.nn.attention import SDPBackend, sdpa_kernel
                        math_ctx = sdpa_kernel(SDPBackend.MATH)
                    with math_ctx:
                        row.update(dico_throughput(model, x, t, y, device, warmup=proto["warmup"],
                                                   iters=proto["iters"], autocast=autocast))
                        if role.startswith("dit"):
                            try:
                                found = attention_kernels(model, x, t, y, device, autocast)
                            except Exception as e:  # noqa: BLE001 - the timing stands without it
                                found = [f"profiler failed: {type(e).__name__}: {str(e)[:120]}"]
                            out["attention"]["kernels"][f"{setting}/{role}"] = found
                    gm = out["models"][role]["gmacs"]
                    row["synced_tflops"] = row["synced_img_s"] * 2 * gm / 1e3
                    row["dico_over_synced"] = row["dico_img_s"] / row["synced_img_s"]
                except Exception as e:  # noqa: BLE001 - one failure must not lose the others
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    free(device)
                out["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "flags"}, default=str), flush=True)
                save()
        out["ratios"].extend(paper_ratios(out["rows"], setting))
    out["flags_after"] = flags()
    out["flags_restored"] = out["flags_after"] == out["flags_before"]
    models.clear()
    free(device)
    save()


def paper_ratios(rows: list[dict], setting: str) -> list[dict]:
    """Per setting and timing: FCDM-XL (reference and fcdm-lab layouts) and DiCo-XL over DiT-XL/2."""
    got = {r["role"]: r for r in rows if r["setting"] == setting and "error" not in r}
    out = []
    dit = got.get("dit")
    for timing in ("synced", "dico"):
        entry = {"setting": setting, "timing": timing, "paper": round(PAPER_RATIO, 2),
                 "expected_fcdm_ref_over_dit": EXPECTED_RATIO.get(setting)}
        for role, key in (("fcdm_ref", "fcdm_ref_over_dit"), ("fcdm_lab", "fcdm_lab_over_dit"),
                          ("dico", "dico_over_dit")):
            entry[key] = (got[role][f"{timing}_img_s"] / dit[f"{timing}_img_s"]
                          if dit and role in got else None)
        entry["paper_dico_over_dit"] = round(PAPER_IT_S["DiCo-XL"] / PAPER_IT_S["DiT-XL/2"], 2)
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# Per-op profile of a training step

LABEL = "fcdm_bench::"
GROUPS = ["depthwise_conv_fwd", "depthwise_conv_bwd", "layernorm_modulation", "grn", "cca", "gemm",
          "attention", "dense_conv", "elementwise", "optimizer", "other"]
GROUP_TITLES = {"depthwise_conv_fwd": "depthwise conv forward", "depthwise_conv_bwd": "depthwise conv backward",
                "layernorm_modulation": "LayerNorm + modulation", "grn": "GRN", "cca": "channel attention (CCA)",
                "gemm": "GEMMs (linear / 1x1 conv / matmul)", "attention": "attention (SDPA + reshapes)",
                "dense_conv": "dense kxk convs (stem, resample, head)", "elementwise": "GELU, gates, residuals",
                "optimizer": "optimizer (AdamW)", "other": "other (loss, embedders, copies, unattributed)"}
LABEL_GROUP = {"dwconv": "depthwise_conv", "norm_mod": "layernorm_modulation", "grn": "grn", "cca": "cca",
               "gemm": "gemm", "attention": "attention", "dense_conv": "dense_conv", "act": "elementwise"}


def module_label(qualname: str, m: nn.Module) -> str | None:
    cls = type(m).__name__
    if cls == "GRN":
        return "grn"
    if cls == "CompactChannelAttention" or qualname.endswith(".ca"):
        return "cca"
    if cls == "Attention":
        return "attention"
    if isinstance(m, nn.Conv2d):
        if m.kernel_size == (1, 1):
            return "gemm"
        return "dwconv" if m.groups > 1 and m.groups == m.in_channels else "dense_conv"
    if isinstance(m, nn.Linear):
        return "gemm"
    if isinstance(m, nn.LayerNorm):
        return "norm_mod"
    if isinstance(m, (nn.GELU, nn.SiLU, nn.Sigmoid)):
        return "act"
    if hasattr(m, "adaLN_modulation"):
        return "block"  # a block or a final layer: ops not inside a sub-label are sorted by name
    return None


def install_labels(model: nn.Module) -> tuple[callable, list[str]]:
    """record_function labels around labelled modules (forward hooks) and around the modulation
    functions of fcdm_lab and of the reference model (wrappers, this process only). Returns an
    undo function and the list of wrapped functions."""
    handles, patched = [], []

    def pre(mod, inputs):
        rf = torch.profiler.record_function(LABEL + mod._bench_label)
        rf.__enter__()
        mod._bench_rf.append(rf)

    def post(mod, inputs, output):
        mod._bench_rf.pop().__exit__(None, None, None)

    for qualname, m in model.named_modules():
        lbl = module_label(qualname, m)
        if lbl:
            m._bench_label, m._bench_rf = lbl, []
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    import importlib

    undo = []
    for modname, attr in (("fcdm_lab.models.blocks", "layer_norm_modulate"), ("fcdm_lab.models.fcdm", "layer_norm_modulate"),
                          ("fcdm_lab.models.dit", "modulate_tokens"), ("fcdm_lab.models.dico", "modulate"),
                          ("fcdm_lab.models.layers", "modulate")):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        fn = getattr(mod, attr, None)
        if not callable(fn):
            continue

        def wrapped(*a, __fn=fn, **k):
            with torch.profiler.record_function(LABEL + "norm_mod"):
                return __fn(*a, **k)

        setattr(mod, attr, wrapped)
        undo.append((mod, attr, fn))
        patched.append(f"{modname}.{attr}")
    reference_models.LABELS_ON = True
    patched.append("reference_models.label")

    def remove():
        for h in handles:
            h.remove()
        for mod, attr, fn in undo:
            setattr(mod, attr, fn)
        reference_models.LABELS_ON = False

    return remove, patched


ELEMENTWISE = ("gelu", "silu", "sigmoid", "mul", "add", "addcmul", "sub", "div", "where")


def name_group(op: str, in_block: bool) -> str:
    """Fallback: the group of an op ("aten::gelu") or a backward node ("GeluBackward0") by name."""
    n = op.lower().removeprefix("aten::")
    base = n.replace("backward", "").rstrip("0123456789").strip("_")
    if "scaled_dot_product" in n or "attention" in n or "flash" in n:
        return "attention"
    if "layer_norm" in n or "layernorm" in n:
        return "layernorm_modulation"
    if "grn" in n:
        return "grn"
    if "depthwiseconv" in n:  # fcdm_lab's hand-written CPU depthwise backward (_DepthwiseConvFunctionBackward)
        return "depthwise_conv"
    if base in ("linear", "addmm", "mm", "bmm", "matmul", "baddbmm"):
        return "gemm"
    if in_block and base in ELEMENTWISE:
        return "elementwise"
    return "other"


def _chain(e):
    while e is not None:
        yield e
        e = e.cpu_parent


def _forward_group(e) -> tuple[str, str]:
    """(group, route) of a forward op from the labels around it."""
    in_block = False
    outer_op = e.name
    for a in _chain(e):
        if a.name.startswith(LABEL):
            lbl = a.name[len(LABEL):]
            if lbl == "block":
                in_block = True
                break
            g = LABEL_GROUP.get(lbl, "other")
            return g, "label"
        if a.name.startswith("aten::"):
            outer_op = a.name
    return name_group(outer_op, in_block), "name" if in_block else "name (outside blocks)"


def classify(e, fwd_index: dict) -> tuple[str, str, str]:
    """(group, direction fwd|bwd|step, route) of one profiler event's own time."""
    bwd = None
    for a in _chain(e):
        if a.name.startswith("Optimizer."):
            return "optimizer", "step", "label"
        if bwd is None and a.name.startswith("autograd::engine::evaluate_function: "):
            bwd = a
    if bwd is not None:
        f = fwd_index.get((bwd.fwd_thread, bwd.sequence_nr)) if bwd.sequence_nr >= 0 else None
        if f is not None:
            g, _ = _forward_group(f)
            return g, "bwd", "backward -> forward op -> label"
        node = bwd.name.split(": ", 1)[1]
        return name_group(node, in_block=True), "bwd", "backward node name"
    g, route = _forward_group(e)
    return g, "fwd", route


def summarise_profile(events, *, steps: int, step_s: float, cuda: bool) -> dict:
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    # forward ops by (thread, autograd sequence number): the last op to take a number created its node
    fwd_index = {}
    for e in cpu:
        if e.sequence_nr < 0 or not e.name.startswith("aten::"):
            continue
        if any(a.name.startswith("autograd::engine::evaluate_function") for a in _chain(e)):
            continue
        key = (e.thread, e.sequence_nr)
        if key not in fwd_index or e.time_range.start >= fwd_index[key].time_range.start:
            fwd_index[key] = e
    annotations = {e.name for e in events if getattr(e, "is_user_annotation", False)}
    groups = {g: {"fwd": 0.0, "bwd": 0.0, "step": 0.0} for g in GROUPS}
    routes, kernels = defaultdict(float), defaultdict(lambda: defaultdict(float))
    linked = 0.0
    for e in cpu:
        if cuda:
            ks = [(k.name, k.duration) for k in e.kernels
                  if k.name not in annotations and not k.name.startswith((LABEL, "Optimizer.", "ProfilerStep"))]
        else:
            ks = [(e.name, e.self_cpu_time_total)]
        us = sum(d for _, d in ks)
        if us <= 0:
            continue
        g, direction, route = classify(e, fwd_index)
        if g == "depthwise_conv":
            g = "depthwise_conv_fwd" if direction == "fwd" else "depthwise_conv_bwd"
        groups[g][direction] += us
        routes[route] += us
        linked += us
        for name, d in ks:
            kernels[name][g] += d
    total, all_k = linked, None
    if cuda:  # kernels the profiler could not link to a host op (should be none): count them as other
        all_k = sum(e.time_range.elapsed_us() for e in events
                    if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False))
        if all_k > linked:
            groups["other"]["step"] += all_k - linked
            routes["unlinked kernel"] += all_k - linked
            total = all_k
    check = {"linked_us": linked, "all_device_us": all_k if cuda else None}
    per_step_ms = total / 1e3 / steps
    denom_ms = max(step_s * 1e3, per_step_ms)  # unprofiled step time; never below the busy time
    out_groups = {}
    for g in GROUPS:
        ms = sum(groups[g].values()) / 1e3 / steps
        out_groups[g] = {"title": GROUP_TITLES[g], "ms_per_step": ms, "fraction_of_step": ms / denom_ms,
                         "fraction_of_device_time": ms / per_step_ms if per_step_ms else 0.0,
                         "fwd_ms": groups[g]["fwd"] / 1e3 / steps, "bwd_ms": groups[g]["bwd"] / 1e3 / steps}
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1].values()))[:15]
    return {"groups": out_groups, "device_ms_per_step": per_step_ms, "step_ms": step_s * 1e3,
            "busy_fraction": per_step_ms / denom_ms,
            "attribution": {r: us / total for r, us in sorted(routes.items(), key=lambda kv: -kv[1])} if total else {},
            "top_kernels": [{"name": n[:200], "ms_per_step": sum(gs.values()) / 1e3 / steps,
                             "fraction_of_device_time": sum(gs.values()) / total if total else 0.0,
                             "group": max(gs, key=gs.get)} for n, gs in top],
            "time_kind": "CUDA kernel time" if cuda else "CPU self time of ops (no GPU)",
            "kernel_time_check": check}


def profile_one(name: str, batch: int, device: torch.device, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    bench = Bench({"name": name}, 64 if args.quick else 256, device)
    try:
        x, y = bench.batch(batch)
        bench.model.train()
        for _ in range(args.profile_warmup):
            bench.train_step(x, y)
        sync(device)
        n_time = 3 if not args.quick else 2
        t0 = time.perf_counter()
        for _ in range(n_time):
            bench.train_step(x, y)
        sync(device)
        step_s = (time.perf_counter() - t0) / n_time
        remove, patched = install_labels(bench.model)
        try:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                for _ in range(args.profile_steps):
                    bench.train_step(x, y)
                sync(device)
        finally:
            remove()
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        t0 = time.perf_counter()
        summary = summarise_profile(prof.events(), steps=args.profile_steps, step_s=step_s, cuda=cuda)
        summary.update(model=name, batch=batch, img_s=batch / step_s, peak_mem_gib=peak, labels=patched,
                       precision="bf16 autocast" if cuda else "fp32 (CPU)", steps=args.profile_steps,
                       analysis_s=round(time.perf_counter() - t0, 1), gmacs=bench.info["gmacs"],
                       layout=bench.info["layout"])
        return summary
    finally:
        del bench
        free(device)


def profile_section(device: torch.device, args, results: dict, over, save) -> None:
    names = args.profile_models.split(",") if args.profile_models else (
        ["FCDM-tiny", "DiT-tiny"] if args.quick else ["FCDM-XL", "DiT-XL/2"])
    batches = [8] if args.quick else [b for b in BIG_BATCHES if b <= args.profile_batch] or [args.profile_batch]
    for name in names:
        if over(f"profile {name}", 0 if args.quick else EST_S["profile"]):
            continue
        entry = {"model": name, "error": "no batch fitted"}
        for batch in batches:
            try:
                entry = profile_one(name, batch, device, args)
                break
            except Exception as e:  # noqa: BLE001
                free(device)
                entry = {"model": name, "batch": batch, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                if not is_oom(e):
                    break
        results["profile"].append(entry)
        print(json.dumps({k: entry.get(k) for k in ("model", "batch", "step_ms", "busy_fraction", "error")
                          if k in entry}, default=str), flush=True)
        save()


# ---------------------------------------------------------------------------------------------
# The trainer on a synthetic latent store

def trainer_run(spec: dict, resolution: int, batch: int, steps: int, device: torch.device, workdir: Path) -> dict:
    """fcdm-lab's own `train()` (EMA, data loader, logging) for `steps` steps; images/s of the windows
    after the first (the first holds cuDNN autotuning), as the trainer itself logs them."""
    import numpy as np

    from fcdm_lab.data.latents import write_latent_store
    from fcdm_lab.training.hooks import TrainHook, default_hooks
    from fcdm_lab.training.trainer import train

    latent = resolution // 8
    n = batch * (steps + 2)
    rng = np.random.default_rng(0)

    def batches():
        for i in range(0, n, 1024):
            k = min(1024, n - i)
            yield (rng.standard_normal((k, 4, latent, latent), dtype=np.float32),
                   rng.integers(0, 1000, k))

    store = workdir / "latents"
    write_latent_store(str(store), batches(), {"vae": "synthetic", "scale_factor": 0.18215, "flip": False,
                                               "num_classes": 1000, "image_size": resolution},
                       dtype="float32")
    log_every = max(steps // 5, 1)
    cfg = config_from_dict({
        "name": "gpu-bench-trainer",
        "model": dict(spec),
        "data": {"name": "latents", "path": str(store), "num_workers": 2 if device.type == "cuda" else 0},
        "train": {"steps": steps, "batch_size": batch, "lr": 1e-4,
                  "mixed_precision": "bf16" if device.type == "cuda" else "no",
                  "log_every": log_every, "ckpt_every": steps, "keep_last": 1, "sample_every": 0,
                  "ema_decay": 0.9999},
    })

    class Collect(TrainHook):  # keeps the metrics the loop reports at each log step
        def __init__(self):
            self.metrics = []

        def on_log(self, run, metrics):
            self.metrics.append(dict(metrics, step=run.step))

    tracker = Collect()
    t0 = time.perf_counter()
    result = train(cfg, workdir / "run", hooks=[*default_hooks(), tracker], progress=False)
    wall = time.perf_counter() - t0
    rates = [m["images_per_s"] for m in tracker.metrics[1:]] or [result.images_per_s]
    return {"model": spec["name"], "resolution": resolution, "batch": batch, "steps": steps,
            "trainer_img_s": statistics.median(rates), "trainer_img_s_windows": rates,
            "trainer_img_s_whole_run": result.images_per_s, "wall_s": wall}


# ---------------------------------------------------------------------------------------------
# Report

def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_paper(pp: dict) -> None:
    roles = [r for r in ("dit", "dico", "fcdm_ref", "fcdm_lab", "dit_math") if r in pp["models"]]
    p = pp["protocol"]
    print(f"\nPaper protocol (DiCo's test_model_throughout: batch {p['batch']}, {p['latent']}x{p['latent']}x4, "
          f"{p['warmup']} warm-up + {p['iters']} timed forwards, eval, no_grad)")
    print("images/s synchronised [DiCo's unsynchronised time.time()]; paper = DiCo's table as FCDM copies it")
    titles = {r: pp["models"][r]["name"] + (" math" if r == "dit_math" else "") for r in roles}
    head = f"{'setting':14} " + " ".join(f"{titles[r]:>20}" for r in roles) + \
        f" {'FCDMref/DiT':>12} {'FCDMlab/DiT':>12} {'DiCo/DiT':>9}"
    print(head)
    print("-" * len(head))
    paper = {"dit": PAPER_IT_S["DiT-XL/2"], "dico": PAPER_IT_S["DiCo-XL"], "fcdm_ref": PAPER_IT_S["FCDM-XL"]}
    print(f"{'paper':14} " + " ".join(f"{fmt(paper.get(r)):>20}" for r in roles)
          + f" {PAPER_RATIO:>11.2f}x {'-':>12} {PAPER_IT_S['DiCo-XL'] / PAPER_IT_S['DiT-XL/2']:>8.2f}x")
    for setting, *_ in PAPER_SETTINGS:
        rows = {r["role"]: r for r in pp["rows"] if r["setting"] == setting}
        if not rows:
            continue
        cells = []
        for r in roles:
            row = rows.get(r)
            if row is None:
                cells.append(f"{'skipped':>20}")
            elif "error" in row:
                cells.append(f"{'error':>20}")
            else:
                cells.append(f"{row['synced_img_s']:>9.1f} [{row['dico_img_s']:>8.1f}]")
        rat = next((q for q in pp["ratios"] if q["setting"] == setting and q["timing"] == "synced"), {})
        rd = next((q for q in pp["ratios"] if q["setting"] == setting and q["timing"] == "dico"), {})
        ratio = [f"{fmt(rat.get(k), '.2f')}x [{fmt(rd.get(k), '.2f')}]" for k in
                 ("fcdm_ref_over_dit", "fcdm_lab_over_dit", "dico_over_dit")]
        print(f"{setting:14} " + " ".join(cells) + f" {ratio[0]:>12} {ratio[1]:>12} {ratio[2]:>9}")
    for row in pp["rows"]:
        if "error" in row:
            print(f"  error {row['setting']} {row['model']}: {row['error']}")
    print("expected FCDM-XL ref / DiT-XL/2 (facts section 15): "
          + ", ".join(f"{k} {v}" for k, v in EXPECTED_RATIO.items()))
    print("DiCo's clock stops when the host has queued the last forward, not when the GPU has run it: with the "
          "GPU behind, the window covers leftover warm-up work at the start and misses the queued tail at the end")
    fp = [r for r in pp["rows"] if r["setting"] == "fp32-defaults" and "error" not in r]
    if fp:
        print("achieved TFLOP/s at fp32 defaults: " + ", ".join(f"{titles[r['role']]} {r['synced_tflops']:.3g}"
                                                              for r in fp)
              + f"  (paper implies DiT-XL/2 {PAPER_IT_S['DiT-XL/2'] * 2 * 118.621 / 1e3:.1f}, "
                f"FCDM-XL {PAPER_IT_S['FCDM-XL'] * 2 * 64.530 / 1e3:.1f})")
        tails = [f"{titles[r['role']]} {r['tail_s'] * 1e3:.0f} ms" for r in fp]
        print("GPU work still queued when DiCo's clock stopped (fp32 defaults): " + ", ".join(tails))
    for k, v in pp["attention"]["kernels"].items():
        print(f"DiT attention [{k}]: {', '.join(v[:4]) or '-'}")


def print_profile(prof: list[dict]) -> None:
    for p in prof:
        if "error" in p:
            print(f"\nprofile {p['model']}: {p['error']}")
            continue
        print(f"\nprofile {p['model']} batch {p['batch']} ({p['precision']}, {p['time_kind']}): step "
              f"{p['step_ms']:.1f} ms, busy {100 * p['busy_fraction']:.0f}%; attributed by "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in p["attribution"].items()))
        for g, v in sorted(p["groups"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
            if v["ms_per_step"] > 0:
                split = f"(fwd {v['fwd_ms']:.2f}, bwd {v['bwd_ms']:.2f})" if v["fwd_ms"] or v["bwd_ms"] else "(step)"
                print(f"  {v['title']:46} {v['ms_per_step']:9.2f} ms {100 * v['fraction_of_step']:5.1f}% {split}")
        for k in p["top_kernels"][:5]:
            print(f"    top: {100 * k['fraction_of_device_time']:4.1f}% {k['group']:20} {k['name'][:90]}")
    ok = [p for p in prof if "error" not in p]
    if len(ok) > 1:  # side by side: % of each model's step
        print(f"\n{'% of the training step':46} " + " ".join(f"{p['model'] + ' b' + str(p['batch']):>16}" for p in ok))
        for g in GROUPS:
            print(f"{GROUP_TITLES[g]:46} " + " ".join(f"{100 * p['groups'][g]['fraction_of_step']:>15.1f}%" for p in ok))
        print(f"{'step ms':46} " + " ".join(f"{p['step_ms']:>16.1f}" for p in ok))


def print_table(results: dict) -> None:
    env = results["environment"]
    print(f"\n{env.get('gpu', env.get('cpu'))}  driver {env.get('driver')}  torch {env['torch']}  "
          f"CUDA {env.get('cuda')}  cuDNN {env.get('cudnn')}")
    print(f"matmul peak: {results['matmul_tflops']:.1f} TFLOP/s "
          f"({'bf16' if env['device'].startswith('cuda') else 'fp32'}, n={results['matmul_n']}); by precision: "
          + ", ".join(f"{k} {v:.1f}" for k, v in results.get("matmul_tflops_by_precision", {}).items()))
    if results.get("paper_protocol"):
        print_paper(results["paper_protocol"])
    print_profile(results.get("profile", []))
    if results["rows"]:
        head = (f"\n{'model':10} {'res':>4} {'compile':>7} {'batch':>5} {'train img/s':>11} {'+-se':>5} "
                f"{'n':>3} {'infer img/s':>11} {'peak GiB':>8} {'MFU':>6} {'GMACs':>8} {'compile s':>9}")
        print(head)
        print("-" * len(head))
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['model']:10} {r['resolution']:>4} {str(r['compile']):>7} {r['batch']:>5} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        se = f"{100 * r['train_rel_se']:.1f}%" if r.get("train_rel_se") is not None else "-"
        print(f"{r['model']:10} {r['resolution']:>4} {str(r['compile']):>7} {r['batch']:>5} "
              f"{r['train_img_s']:>11.1f} {se:>5} {len(r.get('train_img_s_all', [])):>3} "
              f"{fmt(r['infer_img_s']):>11} {fmt(r['peak_mem_gib']):>8} {mfu:>6} "
              f"{r['gmacs']:>8.2f} {fmt(r.get('compile_s')):>9}")
    for t in results["trainer"]:
        bare = next((r for r in results["rows"] if "error" not in r and r["model"] == t["model"]
                     and r["resolution"] == t["resolution"] and r["batch"] == t["batch"] and not r["compile"]), None)
        base = [r["train_img_s"] for r in results.get("loop", []) if r.get("change") == "baseline" and "error" not in r]
        bare_img_s = statistics.median(base) if base else bare["train_img_s"] if bare else None
        ratio = f" = {100 * t['trainer_img_s'] / bare_img_s:.1f}% of the bare loop ({bare_img_s:.1f})" if bare_img_s else ""
        print(f"trainer: {t['model']} {t['resolution']} batch {t['batch']}: {t['trainer_img_s']:.1f} img/s "
              f"(median of logged windows){ratio}")
    for r in results.get("loop", []):
        print(f"loop: {r['model']} batch {r['batch']} {r['change']:>18}: "
              + (f"{r['train_img_s']:.1f} img/s, peak {fmt(r['peak_mem_gib'])} GiB" if "error" not in r else r["error"]))
    for line in results.get("ratios", []):
        print(line)
    for s in results["skipped"]:
        print(f"skipped: {s}")


def train_ratios(rows: list[dict], names: dict, batch: int, resolution: int) -> dict:
    """Training-throughput ratios over DiT from rows of this run at one batch, eager and compiled."""
    def get(model, compile_):
        return next((r["train_img_s"] for r in rows if "error" not in r and r["model"] == model
                     and r["resolution"] == resolution and r["batch"] == batch and r["compile"] == compile_), None)

    out = {}
    for compile_ in (False, True):
        f, d, c = (get(names[k], compile_) for k in ("fcdm", "dit", "dico"))
        out["compiled" if compile_ else "eager"] = {
            "batch": batch, "fcdm_img_s": f, "dit_img_s": d, "dico_img_s": c,
            "fcdm_over_dit": f / d if f and d else None, "dico_over_dit": c / d if c and d else None,
            "paper_fcdm_over_dit": round(PAPER_RATIO, 2)}
    f_e, f_c = get(names["fcdm"], False), get(names["fcdm"], True)
    d_e, d_c = get(names["dit"], False), get(names["dit"], True)
    c_e, c_c = get(names["dico"], False), get(names["dico"], True)
    out["compile_gain"] = {"fcdm": f_c / f_e if f_c and f_e else None, "dit": d_c / d_e if d_c and d_e else None,
                           "dico": c_c / c_e if c_c and c_e else None}
    return out


def ratios(rows: list[dict], names: dict, res: int, batch: int) -> list[str]:
    """The paper's two claims, from rows measured in this run at the same batch."""
    def get(model, r, compile_=False):
        return next((x["train_img_s"] for x in rows if "error" not in x and x["model"] == model
                     and x["resolution"] == r and x["batch"] == batch and x["compile"] == compile_), None)

    out = []
    fcdm, dit, dico = names["fcdm"], names["dit"], names["dico"]
    for compile_ in (False, True):
        tag = "compiled" if compile_ else "eager"
        f256, d256, c256 = get(fcdm, res, compile_), get(dit, res, compile_), get(dico, res, compile_)
        f512, d512 = get(fcdm, 512, compile_), get(dit, 512, compile_)
        if f256 and d256:
            out.append(f"[{tag}] {fcdm} / {dit} training throughput at {res}, batch {batch}: {f256 / d256:.2f}x "
                       f"(paper 3.4x)" + (f"; {dico} / {dit}: {c256 / d256:.2f}x (paper 2.2x)" if c256 else ""))
        if f512 and d512:
            out.append(f"[{tag}] {fcdm} / {dit} training throughput at 512: {f512 / d512:.2f}x")
        if f256 and f512 and res == 256:
            out.append(f"[{tag}] 256 -> 512 throughput loss: {fcdm} {f256 / f512:.2f}x"
                       + (f", {dit} {d256 / d512:.2f}x" if d256 and d512 else "") + " (paper: ~2x vs ~4x)")
    return out


# ---------------------------------------------------------------------------------------------

def plan(sections: list[str], args, device: torch.device) -> list[tuple[str, float]]:
    """The sections that will run, in order, with a rough GPU time estimate each."""
    if args.quick or device.type != "cuda":
        return [(s, 0.0) for s in sections]
    n_models = len(args.models or MODELS_256)
    est = {"paper-protocol": 4 * EST_S["paper_build"] + EST_S["paper_fp32_dit"] + 3 * EST_S["paper_fp32"]
           + 8 * EST_S["paper_fast"], "profile": 2 * EST_S["profile"],
           "train-xl": 3 * (EST_S["train_eager"] + EST_S["train_compiled"]),
           "eager": n_models * EST_S["eager"] + 3 * EST_S["eager_xl"], "512": 2 * EST_S["512"],
           "trainer": EST_S["trainer"], "loop": EST_S["loop"], "compile": n_models * EST_S["compile"]}
    return [(s, est[s]) for s in sections]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny models at 64x64 (8x8 latents): every section in "
                                                        "seconds on the CPU (what the test suite runs)")
    p.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}, or all "
                                                    f"(default {DEFAULT_SECTIONS}; with --quick: all)")
    p.add_argument("--budget-s", type=float, default=380.0,
                   help="stop starting new measurements after this (the JSON is written either way)")
    p.add_argument("--json", default="gpu-results.json")
    p.add_argument("--models", nargs="*", help="models at 256 for the eager/compile sections (default: all twelve)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3, help="minimum timed repeats per measurement")
    p.add_argument("--max-repeats", type=int, default=10, help="repeat up to this while the median is uncertain")
    p.add_argument("--target-spread", type=float, default=0.02,
                   help="stop repeating when the relative standard error of the median is below this")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trainer-steps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true", help="skip every compiled measurement")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-dynamic", choices=("false", "default"), default="false",
                   help="false: static shapes for every compiled block; default: torch.compile's automatic "
                        "dynamic shapes (what `train.compile = true` uses)")
    p.add_argument("--paper-dit-math", action="store_true",
                   help="paper protocol: also DiT-XL/2 with the math SDPA backend (unfused attention)")
    p.add_argument("--profile-models", default=None, help="comma-separated (default FCDM-XL,DiT-XL/2; "
                                                          "FCDM-XL-ref = the reference layout)")
    p.add_argument("--profile-batch", type=int, default=256, help="largest profile batch (then 128, 64 on OOM)")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--profile-warmup", type=int, default=3)
    p.add_argument("--loop-changes", default="baseline,sync_each_step,tf32_off,grad_checkpointing",
                   help="the loop ablation's changes, in order (repeat one to check its spread)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    raw = args.sections or ("all" if args.quick else DEFAULT_SECTIONS)
    sections = SECTIONS if raw == "all" else [s for s in SECTIONS if s in raw.split(",")]
    unknown = set(raw.split(",")) - set(SECTIONS) - {"all"}
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    t_start = time.perf_counter()
    results = {"environment": environment(device), "sections": sections, "rows": [], "trainer": [],
               "profile": [], "skipped": [], "args": vars(args), "default_flags": flags()}
    planned = plan(sections, args, device)
    print(f"sections: {', '.join(f'{s} (~{e:.0f} s)' if e else s for s, e in planned)}; "
          f"budget {args.budget_s:.0f} s" + (f"; estimated {sum(e for _, e in planned) + EST_S['startup']:.0f} s"
                                             if any(e for _, e in planned) else ""), flush=True)
    results["plan"] = dict(planned)

    def over(what: str, need_s: float = 0.0) -> bool:
        if time.perf_counter() - t_start + need_s > args.budget_s:
            results["skipped"].append(f"{what} (time budget {args.budget_s:.0f} s)")
            print(f"skipped: {what} (time budget)", flush=True)
            return True
        return False

    def save():
        path = Path(args.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        os.replace(tmp, path)

    if args.quick:
        tiny = {"name": "FCDM", "L": 1, "C": 32}
        plan_256 = [("FCDM-tiny", tiny)]
        plan_512, resolution, big, mm_n = [], 64, False, 256
        args.trainer_steps = min(args.trainer_steps, 6)
        args.iters, args.repeats, args.warmup = min(args.iters, 2), min(args.repeats, 2), min(args.warmup, 1)
        args.max_repeats = min(args.max_repeats, 3)
        args.profile_steps, args.profile_warmup = 1, 1
        if args.compile_backend == "inductor":
            args.compile_backend = "eager"  # dynamo's tracing only: the code path, not the speed
        xl_names = {"fcdm": "FCDM-tiny", "dit": "DiT-tiny", "dico": "DiCo-tiny"}
        compile_plan = [] if args.no_compile or "compile" not in sections else [("FCDM-tiny", {"name": "FCDM-tiny"})]
    else:
        names = args.models or MODELS_256
        plan_256 = [(n, {"name": n}) for n in names]
        plan_512 = [(n, {"name": n}) for n in MODELS_512 if n in names]
        resolution, big, mm_n = 256, True, 8192
        xl_names = {"fcdm": "FCDM-XL", "dit": "DiT-XL/2", "dico": "DiCo-XL"}
        xl_first = [n for n in XL if n in names] + [n for n in names if n not in XL]
        compile_plan = [] if args.no_compile or "compile" not in sections else [(n, {"name": n}) for n in xl_first]
    configure_tf32(True)  # the training sections run as fcdm-lab trains (the paper protocol sets its own)
    results["matmul_n"] = mm_n
    results["matmul_tflops"] = matmul_peak(device, mm_n, 5)
    by_prec = {}
    if device.type == "cuda":
        with precision(False, True):
            by_prec["fp32"] = matmul_peak(device, mm_n, 3, torch.float32)
        with precision(True, True):
            by_prec["tf32"] = matmul_peak(device, mm_n, 3, torch.float32)
        by_prec["bf16"] = results["matmul_tflops"]
    else:
        by_prec["fp32"] = results["matmul_tflops"]
    results["matmul_tflops_by_precision"] = by_prec
    peak = results["matmul_tflops"]
    print(f"matmul peak {peak:.1f} TFLOP/s; " + ", ".join(f"{k} {v:.1f}" for k, v in by_prec.items()), flush=True)
    save()

    def record(name, spec, res, batches, compile_, section, infer=True):
        t0 = time.perf_counter()
        try:
            rows = run_model(name, spec, res, device, batches=batches, compile_=compile_, args=args,
                             peak_tflops=peak, infer=infer)
        except Exception as e:  # noqa: BLE001 - one failing model must not lose the others' numbers
            rows = [{"model": name, "resolution": res, "compile": compile_, "batch": batches[0],
                     "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}]
            free(device)
        for r in rows:
            r["seconds"] = round(time.perf_counter() - t0, 1)
            r["section"] = section
            results["rows"].append(r)
            print(json.dumps({k: v for k, v in r.items() if not k.endswith("_all")}, default=str), flush=True)
        save()

    def run_section(name, fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a section's failure must not lose the others
            results["skipped"].append(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            print(f"{name} failed: {e!r}", flush=True)
            free(device)
        results.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
        save()

    # A. the paper's protocol (inference, fp32 defaults / TF32 matmul / bf16 autocast)
    if "paper-protocol" in sections:
        run_section("paper-protocol", lambda: paper_protocol(device, args, results, over, save))
    # B. per-op profile of a training step
    if "profile" in sections:
        run_section("profile", lambda: profile_section(device, args, results, over, save))

    # C. the three XL models, eager then all compiled alike, adaptive repeats
    def train_xl():
        order = [xl_names[k] for k in ("fcdm", "dit", "dico")]
        for name in order:
            if not over(f"train-xl {name} eager", 0 if args.quick else EST_S["train_eager"]):
                record(name, {"name": name}, resolution, [args.batch], False, "train-xl")
        for name in order if not args.no_compile else []:
            if not over(f"train-xl {name} compiled", 0 if args.quick else EST_S["train_compiled"]):
                record(name, {"name": name}, resolution, [args.batch], True, "train-xl", infer=False)
        results["train_xl"] = train_ratios(results["rows"], xl_names, args.batch, resolution)

    if "train-xl" in sections:
        run_section("train-xl", train_xl)

    # D. eager, every model at 256 (XL models also at the largest big batch that fits)
    def eager():
        for name, spec in plan_256:
            xl = name.endswith("-XL") or name.endswith("-XL/2")
            if over(f"{name} eager 256", 0 if args.quick else EST_S["eager_xl" if xl else "eager"]):
                continue
            batches = [args.batch] + (list(BIG_BATCHES) if big and xl else [])
            record(name, spec, resolution, batches, False, "eager")

    if "eager" in sections:
        run_section("eager", eager)
    # E. eager at 512
    if "512" in sections:
        run_section("512", lambda: [record(n, s, 512, [args.batch], False, "512")
                                    for n, s in plan_512 if not over(f"{n} eager 512", EST_S["512"])])
    # F. the trainer against the bare loop
    trainer_spec = ("FCDM-XL", {"name": "FCDM-XL"}) if not args.quick else plan_256[0]

    def trainer():
        if over("trainer run", 0 if args.quick else EST_S["trainer"]):
            return
        # /dev/shm where there is one: the trainer's final checkpoint of FCDM-XL is ~11 GB
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and device.type == "cuda" else None
        with tempfile.TemporaryDirectory(prefix="fcdm-gpu-bench-", dir=shm) as tmp:
            try:
                t = trainer_run(trainer_spec[1], resolution, args.batch, args.trainer_steps, device, Path(tmp))
                t["model"] = trainer_spec[0]
                results["trainer"].append(t)
                print(json.dumps(t), flush=True)
            except Exception as e:  # noqa: BLE001
                results["skipped"].append(f"trainer run failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")

    if "trainer" in sections:
        run_section("trainer", trainer)
    # G. the loop's choices, one at a time
    if "loop" in sections and not over("loop ablations", 0 if args.quick else EST_S["loop"]):
        run_section("loop", lambda: results.__setitem__(
            "loop", loop_ablations(trainer_spec[0], trainer_spec[1], args.batch, device, args)))

    # H. compiled (XL first; then the 512 pair; then the rest while the budget lasts)
    def compiled():
        done = {r["model"] for r in results["rows"] if r.get("compile") and r["resolution"] == resolution
                and r["batch"] == args.batch and "error" not in r}
        for name, spec in compile_plan:
            if name not in done and not over(f"{name} compiled 256", 0 if args.quick else EST_S["compile"]):
                record(name, spec, resolution, [args.batch], True, "compile")
            if name == compile_plan[min(2, len(compile_plan) - 1)][0]:
                for n5, s5 in plan_512 if "512" in sections else []:
                    if not over(f"{n5} compiled 512", EST_S["compile"]):
                        record(n5, s5, 512, [args.batch], True, "compile")

    if compile_plan:
        run_section("compile", compiled)
    elif "compile" in sections:
        results["skipped"].append("compile (--no-compile)")

    results["ratios"] = ratios(results["rows"], xl_names, resolution, args.batch)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print_table(results)
    print(f"total {results['total_s']} s; JSON: {args.json}")
    return results


if __name__ == "__main__":
    main()

"""GPU speed of FCDM, DiT and DiCo, and of fcdm-lab's own training loop, in ONE command.

    python benchmarks/gpu.py                      # one GPU, about 6-8 minutes; table + gpu-results.json
    python benchmarks/gpu.py --device cpu --quick # a tiny model on the CPU (what the test suite runs)

Measures, on one device, side by side in one run:
  - the environment (GPU, driver, torch, CUDA, cuDNN) and the peak of a large bf16 matmul (the
    ceiling for model-FLOP utilisation, measured here rather than taken from a datasheet);
  - for every model at 256x256 (32x32x4 latents, 1000 classes): training-step images/s (the real
    iDDPM loss, backward, fused AdamW, bf16 autocast) at batch 32 and, for the XL models, the largest
    of 256/128/64 that fits; inference images/s; peak memory; model-FLOP utilisation
    (training FLOPs = 3 x forward MACs x 2 per image, over the measured matmul peak);
  - FCDM-XL and DiT-XL/2 at 512x512, for the paper's "doubling the resolution" claim;
  - each with torch.compile off and on (regional compilation of the repeated blocks; the compile
    time is reported separately), as far as the time budget allows (--budget-s);
  - fcdm-lab's trainer itself on a synthetic latent store (EMA, data loader, logging included), so
    its overhead shows against the bare loop's images/s for the same model and batch.

Timing: warm-up steps first, then CUDA events around `--iters` steps, repeated `--repeats` times;
the table shows the median. Only torch, accelerate and fcdm_lab's model/trainer code are imported
(plus diffusers for the models' base class): no mlflow, optuna or torch-fidelity.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcdm_lab.accel import configure_tf32  # noqa: E402
from fcdm_lab.config import ModelConfig, config_from_dict  # noqa: E402
from fcdm_lab.diffusion import create_objective  # noqa: E402
from fcdm_lab.models.build import build_model  # noqa: E402

MODELS_256 = ["FCDM-S", "FCDM-B", "FCDM-L", "FCDM-XL", "DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2",
              "DiCo-S", "DiCo-B", "DiCo-L", "DiCo-XL"]
MODELS_512 = ["FCDM-XL", "DiT-XL/2"]
BIG_BATCHES = (256, 128, 64)  # the XL models also run at the largest of these that fits
PAPER_IT_S = {"FCDM-XL": 272.7, "DiT-XL/2": 80.5, "DiCo-XL": 174.2}  # facts section 7 (their GPUs)


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
    return env


def matmul_peak(device: torch.device, n: int, repeats: int) -> float:
    """TFLOP/s of an n x n x n matmul (bf16 on GPU, fp32 on CPU), median of `repeats` timings."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timer = Timer(device)
    timer(lambda: a @ b, 3)
    iters = 10 if device.type == "cuda" else 2
    times = [timer(lambda: a @ b, iters) / iters for _ in range(repeats)]
    return 2 * n ** 3 / statistics.median(times) / 1e12


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
        cfg = ModelConfig(**spec)
        self.model, self.info = build_model(cfg, input_size=self.latent, in_channels=4, num_classes=1000,
                                            device=device)
        self.objective = create_objective("ddpm", learn_sigma=cfg.learn_sigma)
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

    def measure(self, batch: int, *, iters: int, repeats: int, warmup: int) -> dict:
        """Train and inference images/s (medians), peak memory, and the first steps' extra time."""
        timer = Timer(self.device)
        x, y = self.batch(batch)
        self.model.train()
        t0 = time.perf_counter()
        self.train_step(x, y)
        sync(self.device)
        first = time.perf_counter() - t0  # includes compilation when compiled, cuDNN autotuning otherwise
        timer(lambda: self.train_step(x, y), max(warmup - 1, 0))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        train = [batch * iters / timer(lambda: self.train_step(x, y), iters) for _ in range(repeats)]
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        self.model.eval()
        t0 = time.perf_counter()
        self.infer_step(x, y)
        sync(self.device)
        first_infer = time.perf_counter() - t0
        timer(lambda: self.infer_step(x, y), max(warmup - 1, 0))
        infer = [batch * iters / timer(lambda: self.infer_step(x, y), iters) for _ in range(repeats)]
        train_med = statistics.median(train)
        return {"batch": batch, "train_img_s": train_med, "train_img_s_all": train,
                "infer_img_s": statistics.median(infer), "peak_mem_gib": peak,
                "first_train_step_s": first, "first_infer_step_s": first_infer,
                "step_s": batch / train_med}


def run_model(name: str, spec: dict, resolution: int, device: torch.device, *, batches, compile_: bool,
              args, peak_tflops: float) -> list[dict]:
    """All measurements of one model at one resolution; OOM at a batch moves on to the next."""
    rows = []
    bench = Bench(spec, resolution, device)
    gmacs = bench.info["gmacs"]
    if compile_:
        bench.model.compile_repeated_blocks()
    tried_big = False
    for batch in batches:
        if batch in BIG_BATCHES and tried_big:
            continue
        try:
            m = bench.measure(batch, iters=args.iters, repeats=args.repeats, warmup=args.warmup)
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
            m["compile_s"] = round(m["first_train_step_s"] - m["step_s"] + m["first_infer_step_s"], 1)
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
            m = bench.measure(batch, iters=args.iters, repeats=args.repeats, warmup=args.warmup)
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
# The trainer on a synthetic latent store

def trainer_run(spec: dict, resolution: int, batch: int, steps: int, device: torch.device, workdir: Path) -> dict:
    """fcdm-lab's own `train()` (EMA, data loader, logging) for `steps` steps; images/s of the windows
    after the first (the first holds cuDNN autotuning), as the trainer itself logs them."""
    import numpy as np

    from fcdm_lab.data.latents import write_latent_store
    from fcdm_lab.train.trainer import train

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

    class Collect:  # the trainer's tracker interface, keeping only the logged metrics
        def __init__(self):
            self.metrics = []

        def log_metrics(self, metrics, step):
            self.metrics.append(dict(metrics, step=step))

        def log_image(self, *a, **k):
            pass

        def log_artifact(self, *a, **k):
            pass

    tracker = Collect()
    t0 = time.perf_counter()
    result = train(cfg, workdir / "run", tracker=tracker, progress=False)
    wall = time.perf_counter() - t0
    rates = [m["images_per_s"] for m in tracker.metrics[1:]] or [result.images_per_s]
    return {"model": spec["name"], "resolution": resolution, "batch": batch, "steps": steps,
            "trainer_img_s": statistics.median(rates), "trainer_img_s_windows": rates,
            "trainer_img_s_whole_run": result.images_per_s, "wall_s": wall}


# ---------------------------------------------------------------------------------------------
# Report

def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: dict) -> None:
    env = results["environment"]
    print(f"\n{env.get('gpu', env.get('cpu'))}  driver {env.get('driver')}  torch {env['torch']}  "
          f"CUDA {env.get('cuda')}  cuDNN {env.get('cudnn')}")
    print(f"matmul peak: {results['matmul_tflops']:.1f} TFLOP/s "
          f"({'bf16' if env['device'].startswith('cuda') else 'fp32'}, n={results['matmul_n']})")
    head = (f"{'model':10} {'res':>4} {'compile':>7} {'batch':>5} {'train img/s':>11} {'infer img/s':>11} "
            f"{'peak GiB':>8} {'MFU':>6} {'GMACs':>8} {'compile s':>9}")
    print(head)
    print("-" * len(head))
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['model']:10} {r['resolution']:>4} {str(r['compile']):>7} {r['batch']:>5} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{r['model']:10} {r['resolution']:>4} {str(r['compile']):>7} {r['batch']:>5} "
              f"{r['train_img_s']:>11.1f} {r['infer_img_s']:>11.1f} {fmt(r['peak_mem_gib']):>8} {mfu:>6} "
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


def ratios(rows: list[dict]) -> list[str]:
    """The paper's two claims, from rows measured in this run at the same batch."""
    def get(model, res, batch=32, compile_=False):
        return next((r["train_img_s"] for r in rows if "error" not in r and r["model"] == model
                     and r["resolution"] == res and r["batch"] == batch and r["compile"] == compile_), None)

    out = []
    for compile_ in (False, True):
        tag = "compiled" if compile_ else "eager"
        f256, d256 = get("FCDM-XL", 256, compile_=compile_), get("DiT-XL/2", 256, compile_=compile_)
        f512, d512 = get("FCDM-XL", 512, compile_=compile_), get("DiT-XL/2", 512, compile_=compile_)
        if f256 and d256:
            out.append(f"[{tag}] FCDM-XL / DiT-XL/2 training throughput at 256: {f256 / d256:.2f}x (paper 3.4x)")
        if f512 and d512:
            out.append(f"[{tag}] FCDM-XL / DiT-XL/2 training throughput at 512: {f512 / d512:.2f}x")
        if f256 and f512:
            out.append(f"[{tag}] 256 -> 512 throughput loss: FCDM-XL {f256 / f512:.2f}x"
                       + (f", DiT-XL/2 {d256 / d512:.2f}x" if d256 and d512 else "") + " (paper: ~2x vs ~4x)")
    return out


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a tiny FCDM at 64x64 (8x8 latents), no compile: for tests")
    p.add_argument("--models", nargs="*", help="models at 256 (default: all twelve)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trainer-steps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    p.add_argument("--json", default="gpu-results.json")
    p.add_argument("--sections", default="eager,512,trainer,loop,compile",
                   help="comma-separated subset of eager,512,trainer,loop,compile (to rerun a part)")
    p.add_argument("--loop-changes", default="baseline,sync_each_step,tf32_off,grad_checkpointing",
                   help="the loop ablation's changes, in order (repeat one to check its spread)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sections = set(args.sections.split(","))
    configure_tf32(True)
    t_start = time.perf_counter()
    results = {"environment": environment(device), "rows": [], "trainer": [], "skipped": [], "args": vars(args)}

    def over(what: str, need_s: float = 0.0) -> bool:
        if time.perf_counter() - t_start + need_s > args.budget_s:
            results["skipped"].append(f"{what} (time budget {args.budget_s:.0f} s)")
            return True
        return False

    def save():
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))

    if args.quick:
        tiny = {"name": "FCDM", "L": 1, "C": 32}
        plan_256 = [("FCDM-tiny", tiny)]
        plan_512, resolution, big, mm_n = [], 64, False, 256
        args.trainer_steps = min(args.trainer_steps, 6)
        args.iters, args.repeats, args.warmup = min(args.iters, 2), min(args.repeats, 2), min(args.warmup, 1)
        compile_plan = []
    else:
        names = args.models or MODELS_256
        plan_256 = [(n, {"name": n}) for n in names]
        plan_512 = [(n, {"name": n}) for n in MODELS_512 if n in names]
        resolution, big, mm_n = 256, True, 8192
        xl_first = [n for n in ("FCDM-XL", "DiT-XL/2") if n in names] + [n for n in names if n not in ("FCDM-XL", "DiT-XL/2")]
        compile_plan = [] if args.no_compile or "compile" not in sections else [(n, {"name": n}) for n in xl_first]
    results["matmul_n"] = mm_n
    results["matmul_tflops"] = matmul_peak(device, mm_n, 5)
    peak = results["matmul_tflops"]
    print(f"matmul peak {peak:.1f} TFLOP/s", flush=True)

    def record(name, spec, res, batches, compile_):
        t0 = time.perf_counter()
        try:
            rows = run_model(name, spec, res, device, batches=batches, compile_=compile_, args=args,
                             peak_tflops=peak)
        except Exception as e:  # noqa: BLE001 - one failing model must not lose the others' numbers
            rows = [{"model": name, "resolution": res, "compile": compile_, "batch": batches[0],
                     "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}]
            free(device)
        for r in rows:
            r["seconds"] = round(time.perf_counter() - t0, 1)
            results["rows"].append(r)
            print(json.dumps({k: v for k, v in r.items() if not k.endswith("_all")}, default=str), flush=True)
        save()

    # 1. eager, every model at 256 (XL models also at the largest big batch that fits)
    for name, spec in plan_256 if "eager" in sections else []:
        if over(f"{name} eager 256"):
            continue
        xl = name.endswith("-XL") or name.endswith("-XL/2")
        batches = [args.batch] + (list(BIG_BATCHES) if big and xl else [])
        record(name, spec, resolution, batches, False)
    # 2. eager at 512
    for name, spec in plan_512 if "512" in sections else []:
        if not over(f"{name} eager 512"):
            record(name, spec, 512, [args.batch], False)
    # 3. the trainer against the bare loop
    trainer_spec = ("FCDM-XL", {"name": "FCDM-XL"}) if not args.quick else plan_256[0]
    if "trainer" in sections and not over("trainer run", 60 if not args.quick else 0):
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
        save()
    # 4. the loop's choices, one at a time
    if "loop" in sections and not over("loop ablations", 40 if not args.quick else 0):
        results["loop"] = loop_ablations(trainer_spec[0], trainer_spec[1], args.batch, device, args)
        save()
    # 5. compiled (XL first; then the 512 pair; then the rest while the budget lasts)
    for name, spec in compile_plan[:2]:
        if not over(f"{name} compiled 256", 60):
            record(name, spec, resolution, [args.batch], True)
    for name, spec in plan_512 if compile_plan and "512" in sections else []:
        if not over(f"{name} compiled 512", 60):
            record(name, spec, 512, [args.batch], True)
    for name, spec in compile_plan[2:]:
        if not over(f"{name} compiled 256", 45):
            record(name, spec, resolution, [args.batch], True)

    results["ratios"] = ratios(results["rows"])
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print_table(results)
    print(f"total {results['total_s']} s; JSON: {args.json}")
    return results


if __name__ == "__main__":
    main()

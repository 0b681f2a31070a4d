"""Training-step speed of the FCDM model (forward, backward, AdamW step), images/s.

Compares, in ONE process with alternating repeats (the machine is shared and noisy, so ratios
measured side by side are what count):
  reference, as shipped   tests/reference_fcdm.py: NCHW, permutes around LayerNorm, checkpointing on
  reference, no ckpt      the same without gradient checkpointing
  fcdm-lab                fcdm_lab's FCDM (channels_last, NHWC LayerNorm/GRN/linears, hand-written
                          GRN and depthwise-conv backward), fused AdamW
  fcdm-lab, plain AdamW   the same model with the reference's for-loop AdamW (model speed alone)
Configs of facts section 9: tiny (C=32, L=1, 16x16x1, batch 64, 10 classes) and FCDM-S (32x32x4,
batch 8, 1000 classes). Prints medians with min-max over the repeats, and the speed-up ratios,
and the machine's load averages before and after (a load near or above the core count means another
process shared the cores: ratios still compare, absolute images/s do not).

    python benchmarks/speed.py [--repeats 5] [--threads 2] [--configs tiny fcdm-s] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference_fcdm import ReferenceFCDM  # noqa: E402

from fcdm_lab.models import FCDM  # noqa: E402

CONFIGS = {
    "tiny": dict(L=1, C=32, in_channels=1, size=16, classes=10, batch=64, steps=8),
    "fcdm-s": dict(L=2, C=128, in_channels=4, size=32, classes=1000, batch=8, steps=3),
}


def make(kind: str, cfg: dict):
    if kind.startswith("reference"):
        m = ReferenceFCDM(cfg["in_channels"], cfg["classes"], cfg["L"], cfg["C"], checkpointing=kind == "reference, as shipped")
        return m, torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0)
    m = FCDM(input_size=cfg["size"], in_channels=cfg["in_channels"], num_classes=cfg["classes"], L=cfg["L"], C=cfg["C"])
    return m, torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0, fused=kind == "fcdm-lab")


def images_per_s(model, opt, cfg: dict, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    B = cfg["batch"]
    x = torch.randn(B, cfg["in_channels"], cfg["size"], cfg["size"], generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, cfg["classes"], (B,), generator=g)
    model.train()

    def step():
        loss = model(x, t, y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, mkldnn primitive caches)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return B * steps / (time.perf_counter() - t0)


KINDS = ("reference, as shipped", "reference, no ckpt", "fcdm-lab", "fcdm-lab, plain AdamW")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    load_before = os.getloadavg()
    print(f"load average before: {' '.join(f'{v:.2f}' for v in load_before)} ({os.cpu_count()} cores)")
    results = {}
    for name in args.configs:
        cfg = CONFIGS[name]
        torch.manual_seed(0)
        built = {k: make(k, cfg) for k in KINDS}
        runs = {k: [] for k in KINDS}
        for _ in range(args.repeats):  # alternate, so noise hits every variant alike
            for k in KINDS:
                runs[k].append(images_per_s(*built[k], cfg, cfg["steps"]))
        med = {k: statistics.median(v) for k, v in runs.items()}
        results[name] = {k: {"median": med[k], "min": min(v), "max": max(v), "runs": v} for k, v in runs.items()}
        print(f"\n{name}: batch {cfg['batch']}, C={cfg['C']}, L={cfg['L']}, {cfg['size']}x{cfg['size']}x{cfg['in_channels']}")
        for k in KINDS:
            print(f"  {k:24s} {med[k]:8.1f} img/s  (min {min(runs[k]):.1f}, max {max(runs[k]):.1f})")
        ours = med["fcdm-lab"]
        print(f"  speed-up vs reference as shipped: {ours / med['reference, as shipped']:.2f}x (target >= 2.0x); "
              f"vs no-ckpt: {ours / med['reference, no ckpt']:.2f}x (target >= 1.5x); "
              f"model alone (plain AdamW) vs no-ckpt: {med['fcdm-lab, plain AdamW'] / med['reference, no ckpt']:.2f}x")
    load_after = os.getloadavg()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in load_after)} ({os.cpu_count()} cores)")
    if args.json:
        results["load_average"] = {"before": load_before, "after": load_after, "cores": os.cpu_count()}
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Time the tiny-digits experiment end to end and check that it learns the classes.

    OMP_NUM_THREADS=1 python benchmarks/tiny_digits_time.py [--threads 2] [--set train.steps=800 ...]

Trains `experiments/tiny-digits.toml` (plus overrides) in a temporary folder, then draws 500
class-conditional samples from the EMA weights with the experiment's [eval] sampler and reports
wall time, steps/s, images/s and class consistency (the digits classifier's agreement with the
conditioning label). Prints one JSON line. The machine is shared: run it a few times and report the
spread.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="tiny-digits")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: train.threads or torch's)")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--out", default=None, help="keep the run here instead of a temporary folder")
    args = parser.parse_args()

    import torch

    from fcdm_lab.config import load_experiment
    from fcdm_lab.eval.classifier import class_consistency, get_digits_classifier
    from fcdm_lab.inference.checkpoints import load_checkpoint, objective_for
    from fcdm_lab.inference.generation import generate
    from fcdm_lab.training.trainer import train

    overrides = list(args.overrides) + ([f"train.threads={args.threads}"] if args.threads else [])
    cfg = load_experiment(args.experiment, overrides)
    classifier = get_digits_classifier()  # trained and cached outside the timed part
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "run")
        t0 = time.perf_counter()
        result = train(cfg, out, progress=False)
        train_s = time.perf_counter() - t0
        model, loaded_cfg, info = load_checkpoint(result.checkpoint)
        t1 = time.perf_counter()
        images, labels = generate(model, objective_for(loaded_cfg, model), num=args.num_samples,
                                  sampler=cfg.eval.sampler, steps=cfg.eval.steps, eta=cfg.eval.eta,
                                  cfg_scale=cfg.eval.cfg_scale, batch_size=cfg.eval.batch_size, seed=1,
                                  progress=False)
        sample_s = time.perf_counter() - t1
        consistency = class_consistency(images, labels, classifier)
    print(json.dumps({
        "experiment": args.experiment, "overrides": args.overrides, "threads": torch.get_num_threads(),
        "steps": result.step, "train_wall_s": round(train_s, 1), "steps_per_s": round(result.step / train_s, 2),
        "images_per_s": round(result.images_per_s, 1), "final_loss": round(result.final_loss, 4),
        "sample_s": round(sample_s, 1), "num_samples": args.num_samples, "weights": info["weights"],
        "class_consistency": round(consistency, 4), "total_s": round(train_s + sample_s, 1),
        "params": result.model_info["params"],
    }))


if __name__ == "__main__":
    main()

"""Runs `train` in a separate process for the tests that need one (SIGKILL, accelerate launch).

    python tests/_train_worker.py job.json
    accelerate launch --multi_gpu --num_processes 2 ... tests/_train_worker.py job.json

job.json: {"config": {...experiment dict...}, "out_dir": str, "resume": str | null,
           "kill_at": int | null (SIGKILL this process when that step is logged),
           "report": str | null (folder; each process writes rank_<i>.json there),
           "sample": {sample_checkpoint keyword arguments, with "out_dir"} | null (after training)}
"""
import json
import os
import signal
import sys

import torch

from fcdm_lab.config import config_from_dict
from fcdm_lab.inference.samples import sample_checkpoint
from fcdm_lab.training.hooks import TrainHook, default_hooks
from fcdm_lab.training.trainer import train


class KillAt(TrainHook):
    """A hook that kills its own process, hard, right after step `step` is logged."""

    def __init__(self, step):
        self.step = step

    def on_log(self, run, metrics):
        if run.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(job_file):
    with open(job_file) as f:
        job = json.load(f)
    torch.set_num_threads(1)
    cfg = config_from_dict(job["config"])
    hooks = [*default_hooks(), *([KillAt(job["kill_at"])] if job.get("kill_at") else [])]
    result = train(cfg, job["out_dir"], resume=job.get("resume"), hooks=hooks, progress=False)
    if job.get("sample"):
        kwargs = dict(job["sample"])
        sample_checkpoint(result.checkpoint, kwargs.pop("out_dir"), progress=False, **kwargs)
    if job.get("report"):
        from accelerate import PartialState

        state = PartialState()
        with open(os.path.join(job["report"], f"rank_{state.process_index}.json"), "w") as f:
            json.dump({"rank": state.process_index, "world": state.num_processes, "step": result.step,
                       "final_loss": result.final_loss, "checkpoint": str(result.checkpoint)}, f)


if __name__ == "__main__":
    main(sys.argv[1])

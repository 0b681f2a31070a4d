"""Time the main job, `fcdm-lab ablate grn-vs-cca` with no other argument, as from a fresh clone.

    flock /tmp/fcdm-cpu.lock python benchmarks/main_job.py [-- --set train.lr=2e-3 ...]

Runs the command in a new empty folder (fresh MLflow store and Optuna storage) with an empty
fcdm-lab cache (so the digits judge is trained as on a first run), prints its output, then one
JSON line: wall time, the machine's load average before and after, the seeds per variant, the
noise floor (the baseline's seed-to-seed sd per metric) and each verdict. Extra arguments after
`--` go to `fcdm-lab ablate`. The machine is shared: hold the CPU lock while measuring and report
the load it saw.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def main() -> None:
    extra = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    with tempfile.TemporaryDirectory(prefix="fcdm-main-job-") as tmp:
        env = {**os.environ, "FCDM_LAB_CACHE": os.path.join(tmp, "cache"), "COLUMNS": "250"}
        env.pop("MLFLOW_TRACKING_URI", None)
        load_before = os.getloadavg()
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "fcdm_lab", "ablate", "grn-vs-cca", *extra], cwd=tmp, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.time() - start
        load_after = os.getloadavg()
        print(proc.stdout)
        summary_path = next((os.path.join(d, "summary.json") for d, _, files in os.walk(os.path.join(tmp, "runs"))
                             if "summary.json" in files), None)
        result = {"exit_code": proc.returncode, "wall_s": round(wall, 1), "cpus": os.cpu_count(),
                  "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
                  "args": extra}
        if summary_path:
            summary = json.load(open(summary_path))
            base = next(r for r in summary["rows"] if r["is_baseline"])
            result["seeds"] = {r["variant"]: len(r["seeds"]) for r in summary["rows"]}
            result["noise_floor_sd"] = {m: s["sd"] for m, s in base["metrics"].items()}
            result["verdicts"] = {f"{r['variant']}.{m}": [v["diff"]["mean"], v["diff"]["half"], v["verdict"],
                                                         v["seeds_needed"]]
                                  for r in summary["rows"] for m, v in r["verdicts"].items() if v["diff"]}
        print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Time the main job, `fcdm-lab ablate grn-vs-cca` with no other argument, as from a fresh clone.

    flock /tmp/fcdm-cpu.lock python benchmarks/main_job.py [-- --set train.lr=2e-3 ...]

Runs the command in a new empty folder (fresh MLflow store and Optuna storage) with an empty
fcdm-lab cache (so the digits judge is trained as on a first run), prints its output, then one
JSON line: wall time, the machine's load average before and after, the seeds per variant, each
metric's mean and seed-to-seed sd per variant, and each verdict (the paired difference, its 95%
half-width, the Holm-adjusted verdict and p, the MDE). Extra arguments after
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
        # no COLUMNS: the output is a pipe, as a user's log file is (fcdm-lab prints 120 columns there)
        env = {**os.environ, "FCDM_LAB_CACHE": os.path.join(tmp, "cache")}
        for key in ("MLFLOW_TRACKING_URI", "COLUMNS"):
            env.pop(key, None)
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
            result["seeds"] = {r["variant"]: len(r["seeds"]) for r in summary["rows"]}
            result["sd"] = {r["variant"]: {m: s["sd"] for m, s in r["metrics"].items()} for r in summary["rows"]}
            result["mean"] = {r["variant"]: {m: s["mean"] for m, s in r["metrics"].items()} for r in summary["rows"]}
            result["verdicts"] = {f"{r['variant']}.{m}": {k: v.get(k) for k in ("verdict", "p_value", "p_adjusted",
                                                                                 "mde")} | {"diff": v["diff"]["mean"],
                                                                                            "half": v["diff"].get("half")}
                                  for r in summary["rows"] for m, v in r["verdicts"].items() if v.get("diff")}
        print(json.dumps(result))


if __name__ == "__main__":
    main()

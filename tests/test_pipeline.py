"""The one run pipeline (issue 9 items 4, 5, 8): a refused train leaves the pointer file and the
MLflow store unchanged (no FAILED-run litter); resuming a run folder continues the same MLflow run;
evaluation uses the in-memory EMA model with the training seed."""
import json
from pathlib import Path

import pytest

from fcdm_lab.config import load_experiment
from fcdm_lab.errors import UserError
from fcdm_lab.runner import train_tracked
from fcdm_lab.tracking.client import RUN_FILE

TINY = {"model.C": 8, "model.L": 1, "train.batch_size": 16, "train.log_every": 1, "train.sample_every": 0,
        "train.ckpt_every": 2, "train.steps": 4, "eval.num_samples": 20, "eval.steps": 4, "eval.batch_size": 20,
        "eval.metrics": ["class_acc_digits"]}


def all_runs(store):
    return store.search_runs([e.experiment_id for e in store.search_experiments()])


def test_refused_train_leaves_pointer_and_store_unchanged(store, tmp_path):
    cfg = load_experiment("tiny-digits", TINY)
    _, run_id = train_tracked(cfg, "runs/a", progress=False)
    pointer = (Path("runs/a") / RUN_FILE).read_text()
    before = {r.info.run_id: r.info.status for r in all_runs(store)}
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(next(Path("runs/a/checkpoints").glob("*.pt")).read_bytes()[:100])
    refused = [
        (dict(out_dir="runs/a"), "already has checkpoints"),                          # fresh over checkpoints
        (dict(out_dir="runs/a", resume=str(tmp_path / "missing.pt")), "does not exist"),
        (dict(out_dir="runs/a", resume=str(tmp_path / "notes.txt")), "cannot be read|not a checkpoint|not an fcdm-lab|truncated|corrupt"),
        (dict(out_dir="runs/a", resume=str(truncated)), "cannot be read|not a checkpoint|not an fcdm-lab|truncated|corrupt"),
        (dict(out_dir="runs/empty", resume="latest"), "nothing to resume"),
        (dict(out_dir="runs/a/mlflow_run.json"), "is an existing file"),
    ]
    for kwargs, message in refused:
        out = kwargs.pop("out_dir")
        with pytest.raises(UserError, match=message):
            train_tracked(cfg, out, progress=False, **kwargs)
    bad = load_experiment("tiny-digits", TINY)
    bad.model.block = {"family": "convnext", "mixer": "ssee"}  # fails the model build, before any run
    with pytest.raises(UserError):
        train_tracked(bad, "runs/bad", progress=False)
    assert (Path("runs/a") / RUN_FILE).read_text() == pointer
    assert {r.info.run_id: r.info.status for r in all_runs(store)} == before == {run_id: "FINISHED"}
    assert not Path("runs/empty").exists() and not Path("runs/bad").exists()


def test_resume_continues_the_same_mlflow_run(store):
    cfg = load_experiment("tiny-digits", TINY)
    first, run_id = train_tracked(cfg, "runs/r", progress=False, max_steps=2)
    assert first.step == 2 and store.get_run(run_id).info.status == "FINISHED"
    second, again = train_tracked(cfg, "runs/r", resume="latest", progress=False, evaluate=True)
    assert again == run_id and second.step == 4
    assert [r.info.run_id for r in all_runs(store)] == [run_id]
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED" and json.loads((Path("runs/r") / RUN_FILE).read_text())["run_id"] == run_id
    assert [m.step for m in store.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]  # one history, both parts
    # evaluated in memory with the training seed: the same number as evaluating the saved EMA weights
    from fcdm_lab.eval.evaluate import evaluate_checkpoint

    assert run.data.tags["eval.seed"] == "0" and "class_acc_digits" in run.data.metrics
    again_metrics = evaluate_checkpoint(second.checkpoint, metrics=["class_acc_digits"], num_samples=20, seed=0,
                                        steps=4, run_id=run_id, progress=False)
    assert again_metrics["class_acc_digits"] == pytest.approx(run.data.metrics["class_acc_digits"])


def test_a_killed_runs_resume_logs_no_step_twice_and_config_is_one_file(store):
    """A hard kill (SIGKILL) after steps were logged but before their checkpoint: the resume recomputes
    those steps (bit-identically on CPU) and does not log them again. config.toml in MLflow is the
    run folder's own file (one serializer, written once)."""
    cfg = load_experiment("tiny-digits", TINY)
    _, run_id = train_tracked(cfg, "runs/k", progress=False)
    first = {m.step: m.value for m in store.get_metric_history(run_id, "loss")}
    Path("runs/k/checkpoints/step_0000004.pt").unlink()  # as if killed after step 4 was logged
    train_tracked(cfg, "runs/k", resume="latest", progress=False)
    history = store.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4] and {m.step: m.value for m in history} == first
    logged = Path(store.download_artifacts(run_id, "config.toml", "downloaded")).read_bytes()
    assert logged == Path("runs/k/config.toml").read_bytes()

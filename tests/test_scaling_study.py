"""Scaling studies (kind = "scaling") on the one study engine: a grid of sizes x budgets x paired
seeds, each (point, seed) trained exactly once by two workers under one MLflow parent, the law and
the held-out prediction logged; compute budgets give each size its steps; bad files are one line."""
from pathlib import Path

import optuna
import pytest
from rich.console import Console
from conftest import TINY

from fcdm_lab.errors import UserError
from fcdm_lab.studies.report import report_command
from fcdm_lab.studies.spec import load_study, plan_study
from fcdm_lab.studies.sweep import sweep_command
from fcdm_lab.tracking.client import get_client

SETTINGS = {k: v for k, v in TINY.items() if not k.startswith("model.")}


def write_study(tmp_path, body: str) -> Path:
    path = tmp_path / "scale.toml"
    overrides = ", ".join(f'"{k}" = {v}' for k, v in SETTINGS.items())
    path.write_text(f'kind = "scaling"\ndescription = "tiny"\nbase = "tiny-digits"\nmetrics = ["val_loss"]\n'
                    f'set = {{ {overrides}, "eval.heldout_images" = 64, "eval.heldout_draws" = 2 }}\n{body}')
    return path


def test_two_workers_train_each_point_and_seed_once_and_log_the_law(tmp_path, store):
    path = write_study(tmp_path, 'seeds = 1\nbudgets = [ { steps = 6 } ]\nheld_out = [ { C = 16 } ]\n'
                                 '[axes]\nL = [1]\nC = [8, 10, 12]\n')
    result = sweep_command(path, seeds=2, workers=2, storage="sqlite:///optuna.db")
    (summary,) = optuna.get_all_study_summaries("sqlite:///optuna.db")
    trials = optuna.load_study(study_name=summary.study_name, storage="sqlite:///optuna.db").trials
    done = sorted((t.user_attrs["variant"], t.user_attrs["seed"]) for t in trials if t.state.name == "COMPLETE")
    assert done == sorted((f"L1-C{c}", s) for c in (8, 10, 12, 16) for s in (0, 1))  # each exactly once
    client = get_client()
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 8 and {c.info.status for c in children} == {"FINISHED"}
    assert parent.data.tags["kind"] == "scaling"
    report = result.report
    assert [r.name for r in report.rows] == ["L1-C8", "L1-C10", "L1-C12", "L1-C16"] and report.rows[-1].held_out
    assert all(len(r.seeds) == 2 and "val_loss" in r.metrics for r in report.rows)
    law = next(law for law in report.laws if law.metric == "val_loss" and law.x_name == "compute")
    assert law.n_points == 3 and law.n_seeds == 2  # the held-out point is not in the fit
    metrics = parent.data.metrics
    assert {"law.val_loss.alpha", "law.val_loss.E"} <= set(metrics)
    assert any(k.startswith("predicted.L1-C16.val_loss") for k in metrics)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/scaling.png", "report/report.html", "report/report.md"} <= artifacts
    # `fcdm-lab report` rebuilds a scaling study's report from MLflow alone (the line the study printed says so)
    console = Console(width=120, record=True)
    rebuilt, paths = report_command(result.parent_run_id, out_dir=tmp_path / "again", console=console)
    assert [r.name for r in rebuilt.rows] == [r.name for r in report.rows] and paths["html"].is_file()
    shown = console.export_text()
    assert "Fitted laws" in shown and "logged again to run" in shown
    assert max(len(line.rstrip()) for line in shown.splitlines() if not line.startswith("Report: ")) <= 120
    with pytest.raises(UserError, match="is a scaling study"):
        report_command(result.parent_run_id, out_dir=tmp_path / "again", console=console, against_paper=True)


def test_compute_budgets_give_smaller_models_more_steps(tmp_path):
    spec = load_study(write_study(tmp_path, 'budgets = [ { compute = 2.0 }, { compute = 4.0 } ]\n'
                                            '[axes]\nL = [1]\nC = [8, 16]\n'))
    plan = plan_study(spec)
    steps = {c.variant: c.cfg.train.steps for c in plan.children}
    assert set(steps) == {"L1-C8-c2", "L1-C8-c4", "L1-C16-c2", "L1-C16-c4"}
    assert steps["L1-C8-c2"] > steps["L1-C16-c2"] and steps["L1-C8-c4"] == pytest.approx(2 * steps["L1-C8-c2"], abs=1)


@pytest.mark.parametrize("body,needle", [
    ("[axes]\nL = []\n", "non-empty list"),
    ("[axes]\nwidth = [8]\n", "not an experiment key"),
    ("budgets = [ { steps = 4, compute = 2.0 } ]\n[axes]\nC = [8]\n", "exactly one of steps"),
    ("held_out = [ { D = 3 } ]\n[axes]\nC = [8]\n", "'D' is not an axis"),
    ("[[variants]]\nname = \"a\"\n[axes]\nC = [8]\n", r"not \[\[variants\]\]"),
    ("budgets = [ { steps = 4 } ]\nsteps = 5\n[axes]\nC = [8]\n", "does not apply"),
])
def test_bad_scaling_files_are_one_line(tmp_path, body, needle):
    with pytest.raises(UserError, match=needle):
        plan_study(load_study(write_study(tmp_path, body)))


def test_options_that_do_not_apply_are_refused(tmp_path):
    path = write_study(tmp_path, "[axes]\nC = [8]\n")
    with pytest.raises(UserError, match="--trials is for Optuna searches"):
        sweep_command(path, trials=3)
    with pytest.raises(UserError, match="--seeds applies to scaling studies"):
        sweep_command("search-lc", seeds=2)

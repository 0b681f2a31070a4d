"""Studies end to end on a tiny model: an interrupted 2-variant ablation resumes (finished children
skipped), the report rebuilt from MLflow alone equals the one printed at the end; train ->
evaluate -> rerun; bad study files, unknown studies and unreachable stores fail with UserError."""
import socket
import time
from pathlib import Path

import pytest
from conftest import TINY

import fcdm_lab.runner as evaluate_mod  # the run pipeline: where the children's evaluation is called
from fcdm_lab.config import load_experiment
from fcdm_lab.errors import UserError
from fcdm_lab.eval.evaluate import evaluate_checkpoint
from fcdm_lab.studies.ablate import run_ablation
from fcdm_lab.studies.report import build_report, report_command
from fcdm_lab.studies.rerun import rerun
from fcdm_lab.studies.spec import load_study, study_names
from fcdm_lab.runner import train_tracked
from fcdm_lab.tracking.client import RUN_FILE


STUDY = """
description = "tiny GRN vs CCA"
base = "tiny-digits"
seeds = 1
steps = 4
metrics = ["fid_digits", "kid_digits", "class_acc_digits"]
primary = "fid_digits"
compute_matched = true
baseline = "grn"
set = { %s }

[[variants]]
name = "grn"
set = { "model.block" = { family = "convnext", mixer = "grn" } }
paper = { gflops = 48.3, fid = 19.97, is = 69.19 }

[[variants]]
name = "cca"
set = { "model.block" = { family = "convnext", mixer = "cca" } }
match = "ratio"
""" % ", ".join(f'"{k}" = {v}' for k, v in TINY.items())


@pytest.fixture
def tiny_study(tmp_path):
    path = tmp_path / "tiny-study.toml"
    path.write_text(STUDY)
    return path


def test_interrupted_study_resumes_and_report_rebuilds(store, tiny_study, monkeypatch):
    real = evaluate_mod.evaluate_model

    def failing_cca(error):
        def evaluate_model(model, cfg, **kw):
            if cfg.model.block.get("mixer") == "cca":
                raise error
            return real(model, cfg, **kw)
        return evaluate_model

    def statuses(parent_id):
        runs = store.search_runs(["1"], f"tags.mlflow.parentRunId = '{parent_id}'")
        return {r.data.tags["variant"]: r.info.status for r in runs}

    # Ctrl+C in the second child stops the study: parent and that child KILLED
    monkeypatch.setattr(evaluate_mod, "evaluate_model", failing_cca(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_ablation(str(tiny_study), progress=False, workers=1)
    (parent,) = store.search_runs(["1"], "tags.kind = 'ablation'")
    assert parent.info.status == "KILLED"
    assert statuses(parent.info.run_id) == {"grn": "FINISHED", "cca": "KILLED"}
    import optuna

    (summary,) = optuna.get_all_study_summaries("sqlite:///optuna.db")  # the engine's Optuna study
    trials = optuna.load_study(study_name=summary.study_name, storage="sqlite:///optuna.db").trials
    assert {t.user_attrs["variant"]: t.state.name for t in trials} == {"grn": "COMPLETE", "cca": "FAIL"}

    # the same command resumes it; a child that fails is reported, the parent ends FAILED
    monkeypatch.setattr(evaluate_mod, "evaluate_model", failing_cca(RuntimeError("broken variant")))
    with pytest.raises(UserError, match="1 of 2 runs of study 'tiny-study' failed .*cca seed 0: .*broken variant"):
        run_ablation(str(tiny_study), progress=False, workers=1)
    assert store.get_run(parent.info.run_id).info.status == "FAILED"
    assert statuses(parent.info.run_id) == {"grn": "FINISHED", "cca": "FAILED"}

    monkeypatch.setattr(evaluate_mod, "evaluate_model", real)
    result = run_ablation(str(tiny_study), progress=False, workers=1)
    assert result.resumed and result.parent_run_id == parent.info.run_id
    assert [(c.variant, c.skipped) for c in result.children] == [("grn", True), ("cca", False)]

    assert store.get_run(parent.info.run_id).info.status == "FINISHED"
    children = store.search_runs(["1"], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2  # the interrupted child was reopened twice, never duplicated
    for child in children:
        tags, metrics = child.data.tags, child.data.metrics
        assert child.info.status == "FINISHED" and tags["study"] == "tiny-study" and tags["seed"] == "0"
        assert tags["eval.weights"] == "ema"
        assert {"fid_digits", "kid_digits", "class_acc_digits", "train.wall_time_s"} <= set(metrics)
        assert 0.0 <= metrics["class_acc_digits"] <= 1.0 and child.data.params["train.steps"] == "4"
        inputs = {(i.dataset.name, i.tags[0].value) for i in child.inputs.dataset_inputs}
        assert inputs == {("digits", "training"), (tags["eval.reference"], "evaluation")}  # what it was scored against
    cca = next(c for c in children if c.data.tags["variant"] == "cca")
    assert cca.data.params["model.match_knob"] == "ratio" and float(cca.data.params["model.match_value"]) < 3.0

    parent_files = {a.path for a in store.list_artifacts(parent.info.run_id)}
    assert {"study.json", "study", "report"} <= parent_files
    assert {a.path for a in store.list_artifacts(parent.info.run_id, "report")} == {
        "report/report.md", "report/plot.png", "report/summary.json", "report/report.html"}

    report = result.report
    rows = {r.variant: r for r in report.rows}
    assert rows["grn"].is_baseline and rows["cca"].matched and rows["cca"].knob == "ratio"
    assert rows["cca"].diff is not None and rows["cca"].diff.n == 1
    assert rows["cca"].verdicts["fid_digits"].verdict == "n=1: no error bar"
    assert '<span class="status FINISHED">' in result.report_paths["html"].read_text()  # what the parent ended as
    # report.html's data, from the children's MLflow runs: the loss history, the eval_samples grid at its step
    assert all([s for s, _ in r.loss_history[0]] == [2, 4] and r.sample_grid.step == 4 for r in report.rows)
    assert "n=1: no error bar" in report.text() and "paper GFLOPs / FID / IS" in report.markdown()
    parent_run = store.get_run(parent.info.run_id)
    assert parent_run.data.tags["verdict.cca.fid_digits"] == "n=1: no error bar"
    assert "verdict.cca.fid_digits.diff" in parent_run.data.metrics
    rebuilt = build_report(result.parent_run_id)
    assert rebuilt.markdown() == report.markdown() and rebuilt.text() == report.text()

    # evaluating a child's checkpoint again must not overwrite the numbers the study reported
    grn = next(c for c in result.children if c.variant == "grn")
    evaluate_checkpoint(grn.out_dir, metrics=["class_acc_digits"], num_samples=10, progress=False)
    (linked,) = store.search_runs(["1"], f"tags.`fcdm.source_run` = '{grn.run_id}'")
    assert linked.data.tags["kind"] == "evaluation" and "class_acc_digits" in linked.data.metrics
    assert build_report(result.parent_run_id).markdown() == report.markdown()

    out = Path("my-report")
    _, paths = report_command(result.parent_run_id, out_dir=out)
    assert paths["markdown"].read_text() == report.markdown() and paths["plot"].stat().st_size > 1000
    assert paths["html"] == out / "report.html" and "Forest plot" in paths["html"].read_text()


def test_train_evaluate_rerun(store):
    cfg = load_experiment("tiny-digits", {**TINY, "train.steps": 3})
    result, run_id = train_tracked(cfg, "runs/t", progress=False)
    assert (Path("runs/t") / RUN_FILE).is_file()
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED" and int(run.data.params["model.params"]) == result.model_info["params"]
    assert {a.path for a in store.list_artifacts(run_id, "pipeline/model")} >= {
        "pipeline/model/diffusion_pytorch_model.safetensors", "pipeline/model/fcdm_lab.json"}

    metrics = evaluate_checkpoint(result.checkpoint, metrics=["class_acc_digits", "fid_digits"], progress=False)
    assert set(metrics) == {"class_acc_digits", "fid_digits"}
    logged = store.get_run(run_id)  # logged into the training run, found through mlflow_run.json
    assert logged.data.metrics["fid_digits"] == metrics["fid_digits"] and logged.data.tags["eval.weights"] == "ema"
    assert store.get_metric_history(run_id, "fid_digits")[0].step == 3

    with pytest.raises(UserError, match="Inception weights file 'missing.pth' does not exist"):
        evaluate_checkpoint(result.checkpoint, metrics=["fid_inception"], inception_weights="missing.pth",
                            progress=False)
    with pytest.raises(UserError, match="unknown metric 'fid_digit'; valid: fid_digits"):
        evaluate_checkpoint(result.checkpoint, metrics=["fid_digit"], progress=False)

    again = rerun(run_id, out_dir="runs/again", progress=False)
    new = store.get_run(again.run_id)
    assert new.data.tags["fcdm.rerun_of"] == run_id and new.info.status == "FINISHED"
    assert {k: v for k, v in new.data.params.items()} == logged.data.params  # same config, seed included
    assert again.train.step == 3 and again.metrics is not None
    # same code, config and seeds on CPU: the same weights, hence the same samples and metrics
    assert again.metrics["fid_digits"] == pytest.approx(metrics["fid_digits"], rel=1e-5)


def test_unknown_and_malformed_studies(tmp_path):
    with pytest.raises(UserError, match="unknown study 'nope'; available: .*grn-vs-cca"):
        load_study("nope")
    assert set(study_names()) >= {"grn-vs-cca", "kernel-size", "extra-ffn", "no-bottleneck", "resnet-block",
                                  "paper-ablation"}
    cases = {
        "bogus = 1\n": "unknown key 'bogus'",
        'seeds = "two"\n': "seeds must be int",  # one coercion policy (config.check_value)
        'baseline = "nope"\n': "baseline 'nope' is not a variant",
        'metrics = ["fid"]\n': "unknown metric 'fid'",
    }
    for i, (line, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(f'base = "tiny-digits"\n{line}\n[[variants]]\nname = "a"\n')
        with pytest.raises(UserError, match=message):
            load_study(path)
    path = tmp_path / "badvariant.toml"
    path.write_text(STUDY + '\n[[variants]]\nname = "x"\nsett = {}\n')
    with pytest.raises(UserError, match="variant 'x'.*unknown key 'sett'"):
        load_study(path)
    path.write_text(STUDY + '\n[[variants]]\nname = "x"\nset = { "model.blok" = 1 }\n')
    with pytest.raises(UserError, match="variant 'x'.*unknown key.*blok"):
        run_ablation(str(path))
    path.write_text(STUDY + '\n[[variants]]\nname = "x"\nset = { "train.lr" = "fast" }\n')
    with pytest.raises(UserError, match="variant 'x'.*train.lr must be float"):
        run_ablation(str(path))


def test_unreachable_store_fails_before_training(tiny_study):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.time()
    with pytest.raises(UserError, match="unreachable"):
        run_ablation(str(tiny_study), uri=f"http://127.0.0.1:{port}", progress=False)
    with pytest.raises(UserError, match="malformed tracking URI"):
        run_ablation(str(tiny_study), uri="localhost:5000", progress=False)
    assert time.time() - start < 10 and not Path("runs").exists()


def test_listing_shows_every_study():
    from rich.console import Console

    from fcdm_lab.studies.ablate import print_studies

    console = Console(width=120, record=True)
    print_studies(console)
    text = console.export_text()
    for name in study_names():
        assert name in text
    assert "grn*, cca" in text

"""`fcdm-lab ablate NAME --until-decided`: seeds in rounds on the study engine with two workers; a
variant decided by its anytime-valid interval gets no more seeds, an undecided one continues to
max_seeds, every (variant, seed) trains exactly once, and the report says why each stopped."""
import optuna
import pytest
from conftest import TINY

from fcdm_lab.errors import UserError
from fcdm_lab.studies.ablate import run_ablation

SETTINGS = {**TINY, "train.steps": 6, "eval.metrics": ["val_loss"], "eval.heldout_images": 64,
            "eval.heldout_draws": 2}


def write_study(tmp_path):
    path = tmp_path / "decide.toml"
    overrides = ", ".join(f'"{k}" = {v!r}'.replace("'", '"') for k, v in SETTINGS.items())
    path.write_text(f'base = "tiny-digits"\nseeds = 2\nmetrics = ["val_loss"]\nset = {{ {overrides} }}\n'
                    '[[variants]]\nname = "base"\n'
                    '[[variants]]\nname = "frozen"\nset = { "train.lr" = 1e-9 }\n'    # learns nothing: worse
                    '[[variants]]\nname = "k5"\nset = { "model.block" = { family = "convnext", kernel = 5 } }\n')
    return path


def test_rounds_until_decided_or_max_seeds(tmp_path, store):
    result = run_ablation(str(write_study(tmp_path)), until_decided=True, max_seeds=6, workers=2, progress=False,
                          storage="sqlite:///optuna.db")
    (summary,) = optuna.get_all_study_summaries("sqlite:///optuna.db")
    trials = optuna.load_study(study_name=summary.study_name, storage="sqlite:///optuna.db").trials
    done = [(t.user_attrs["variant"], t.user_attrs["seed"]) for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == len(set(done))  # every (variant, seed) once
    seeds = {v: sorted(s for w, s in done if w == v) for v in ("base", "frozen", "k5")}
    assert seeds["frozen"] == [0, 1, 2, 3]        # decided in the first round (4 seeds: the first finite interval)
    assert seeds["base"] == seeds["k5"] == list(range(6))  # k5 undecided: seeds until max_seeds, with its baseline
    assert result.rounds == 3
    rows = {r.variant: r for r in result.report.rows}
    assert rows["frozen"].verdicts["val_loss"].verdict == "worse"
    assert "decided" in result.report.markdown() and "max seeds" in result.report.markdown()


def test_until_decided_options_are_checked(tmp_path):
    with pytest.raises(UserError, match="--max-seeds must be >= 4"):
        run_ablation(str(write_study(tmp_path)), until_decided=True, max_seeds=3)
    with pytest.raises(UserError, match="apply to --until-decided only"):
        run_ablation(str(write_study(tmp_path)), max_seeds=8)

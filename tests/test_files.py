"""Every bundled file parses and builds: each experiment's model and each study's variants (on the
meta device: no memory, no init), with compute matching solved where a study asks for it."""
import functools
import json
import tomllib
from pathlib import Path

import pytest
import torch

from fcdm_lab.config import SECTIONS, EXPERIMENTS_DIR, config_from_dict, experiment_data, experiment_names, load_experiment
from fcdm_lab.errors import UserError
from fcdm_lab.models.build import build_model
from fcdm_lab.models.matching import TOLERANCE
from fcdm_lab.models.info import model_info_for
from fcdm_lab.schema import apply_overrides, flatten_overrides
from fcdm_lab.studies.spec import STUDIES_DIR, load_study, plan_study, study_kind

# Shapes of datasets that are not on this machine: (input side, channels, classes).
KNOWN_SHAPES = {"mnist": (28, 1, 10), "fashion-mnist": (28, 1, 10), "cifar10": (32, 3, 10)}


def data_shape(cfg):
    """The data's shape from the data itself when present, else from what the dataset is."""
    from fcdm_lab.models.info import data_info_for

    try:
        info = data_info_for(cfg)
        return info["image_size"], info["channels"], info["num_classes"]
    except UserError:  # data not on this machine (latent stores, image folders, downloads)
        size = cfg.data.image_size
        if cfg.data.name == "latents":
            return ((size or 256) // 8, 4, 1000)
        if cfg.data.name == "imagefolder":
            return (size, 3, 1000)
        return KNOWN_SHAPES[cfg.data.name]


@functools.lru_cache(maxsize=None)
def _info(model_and_data: str):
    from fcdm_lab.config import ExperimentConfig, ModelConfig, DataConfig

    d = json.loads(model_and_data)
    return model_info_for(ExperimentConfig(model=ModelConfig(**d["model"]), data=DataConfig(**d["data"])))


def info_of(cfg):
    """model_info_for, memoised over the test session: the studies share most variants, and
    solving a compute match takes a few dozen GMAC counts."""
    return _info(json.dumps({"model": cfg.to_dict()["model"], "data": cfg.to_dict()["data"]}, sort_keys=True))


def _bases() -> set:
    """Bundled experiments other bundled experiments name as `base` (a recipe may leave the model unset)."""
    return {tomllib.loads((EXPERIMENTS_DIR / f"{n}.toml").read_text()).get("base") for n in experiment_names()}


@pytest.mark.parametrize("name", experiment_names())
def test_experiment_builds(name):
    base_only = name in _bases() and "name" not in tomllib.loads((EXPERIMENTS_DIR / f"{name}.toml").read_text()).get("model", {})
    cfg = load_experiment(name, {"model.name": "FCDM-S"} if base_only else None)
    size, channels, classes = data_shape(cfg)
    with torch.device("meta"):
        model, info = build_model(cfg.model, input_size=size, in_channels=channels, num_classes=classes)
    assert info["params"] > 0 and info["gmacs"] > 0
    assert next(model.parameters()).device.type == "meta"


def _write(folder, name, text):
    (folder / f"{name}.toml").write_text(text)
    return str(folder / f"{name}.toml")


def test_experiment_base_states_only_what_differs(tmp_path):
    """A child file's keys replace the base's section by section; a table value (model.block) is
    replaced whole; `name` is the child's own; bases chain; the ImageNet presets share one base."""
    _write(tmp_path, "parent", 'base = "tiny-digits"\n[model]\nblock = { family = "convnext", kernel = 5 }\n'
                               '[train]\nlr = 3e-4\n')
    child = _write(tmp_path, "child", 'base = "parent.toml"\n[model]\nblock = { family = "resnet" }\n[train]\nsteps = 7\n')
    cfg, tiny = load_experiment(child), load_experiment("tiny-digits")
    assert cfg.name == "child" and cfg.model.block == {"family": "resnet"}
    assert (cfg.train.steps, cfg.train.lr, cfg.train.batch_size) == (7, 3e-4, tiny.train.batch_size)
    assert (cfg.model.L, cfg.model.C, cfg.eval) == (tiny.model.L, tiny.model.C, tiny.eval)
    presets = {n: load_experiment(f"fcdm-{n}-imagenet256") for n in ("s", "b", "l", "xl")}
    for n, p in presets.items():
        assert p.model.name == f"FCDM-{n.upper()}" and p.name == f"fcdm-{n}-imagenet256"
        assert (p.train, p.eval, p.diffusion, p.data) == (presets["s"].train, presets["s"].eval,
                                                          presets["s"].diffusion, presets["s"].data)
    assert presets["xl"].train.steps == 400_000 and presets["xl"].train.mixed_precision == "bf16"


def test_experiment_base_errors_are_one_line(tmp_path):
    a = _write(tmp_path, "a", 'base = "b.toml"\n')
    _write(tmp_path, "b", 'base = "a.toml"\n')
    with pytest.raises(UserError, match=r"^experiment base cycle: a -> b -> a$"):
        load_experiment(a)
    self_ref = _write(tmp_path, "self", 'base = "self.toml"\n')
    with pytest.raises(UserError, match=r"cycle: self -> self"):
        load_experiment(self_ref)
    bad = _write(tmp_path, "bad", 'base = "no-such-experiment"\n')
    with pytest.raises(UserError, match=r"bad.toml: base: unknown experiment 'no-such-experiment'; available: .*tiny-digits") as e:
        load_experiment(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="base must be an experiment name"):
        load_experiment(_write(tmp_path, "num", "base = 3\n"))


STUDY_FILES = sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))


@pytest.mark.parametrize("name", STUDY_FILES)
def test_study_file_parses_and_builds(name):
    path = STUDIES_DIR / f"{name}.toml"
    if study_kind(path) == "sweep":
        # Optuna sweeps are run and tested by the sweep module; here: the base and its overrides load.
        data = tomllib.loads(path.read_text())
        config_from_dict(apply_overrides(experiment_data(data["base"]), flatten_overrides(data.get("set", {}), name, SECTIONS)))
        with pytest.raises(UserError, match="is an Optuna search"):
            load_study(name)
        return
    spec = load_study(name)
    assert spec.description and spec.primary in spec.metrics and len(spec.variants) >= 2
    plan = plan_study(spec)
    assert len(plan.children) == spec.seeds * len(spec.variants)
    assert len({c.cfg.train.seed for c in plan.children}) == spec.seeds  # paired: one seed per repeat
    infos = {c.variant: info_of(c.cfg) for c in plan.children}
    base = infos[spec.baseline]["gmacs"]
    for v in spec.variants:
        match = infos[v.name]["match"]
        if spec.compute_matched and v.match:
            assert match["knob"] == v.match and match["target_gmacs"] == pytest.approx(base)
            # continuous knobs land within 1%; the width moves in steps of 2 channels (coarse at C=32)
            assert abs(match["rel_err"]) <= (TOLERANCE if v.match != "width" else 0.05)
        else:
            assert match is None


def test_paper_ablation_has_the_papers_seven_rows():
    spec = load_study("paper-ablation")
    rows = {v.name: (v.paper["gflops"], v.paper["fid"], v.paper["is"]) for v in spec.variants}
    assert rows == {"default": (48.3, 19.97, 69.19), "k5": (48.2, 20.48, 66.69), "k3": (48.1, 21.28, 64.11),
                    "cca": (48.3, 23.85, 61.60), "extra-ffn": (48.2, 28.52, 47.16),
                    "no-bottleneck": (48.3, 28.76, 52.20), "resnet": (48.4, 31.14, 49.10)}
    matched = {v.name: v.match for v in spec.variants if v.match}
    assert matched == {"cca": "ratio", "extra-ffn": "ratio", "no-bottleneck": "width", "resnet": "ratio"}


def test_profile_study_at_the_papers_setting():
    """`fcdm-lab profile FCDM-L --study grn-vs-cca`: the compute-matched CCA block at FCDM-L lands
    on the default's GMACs and within 0.5% of the paper's FLOPs for its row."""
    from fcdm_lab.studies.spec import profile_study

    rows = {r["variant"]: r for r in profile_study("grn-vs-cca", "FCDM-L")}
    assert rows["grn"]["gmacs"] == pytest.approx(48.231, abs=1e-3) and "match" not in rows["grn"]
    assert rows["cca"]["match"]["knob"] == "ratio" and abs(rows["cca"]["match"]["rel_err"]) < TOLERANCE
    for row in rows.values():
        assert abs(row["gmacs"] - row["paper_gmacs"]) / row["paper_gmacs"] < 0.005


def test_paper_ablation_at_fcdm_l_matches_the_papers_flops():
    """All seven rows at FCDM-L, 256x256: each within 0.5% of the paper's FLOPs (~15 s)."""
    from fcdm_lab.studies.spec import profile_study

    for row in profile_study("paper-ablation", "FCDM-L"):
        assert abs(row["gmacs"] - row["paper_gmacs"]) / row["paper_gmacs"] < 0.005, row["variant"]


# One coercion policy for experiments, --set overrides, block options, studies and sweeps:
# ints take whole floats, floats take ints, nothing else converts (strings never become numbers).
@pytest.mark.parametrize("key, value, expected", [
    ("train.steps", 1000.0, 1000), ("train.batch_size", 64.0, 64), ("train.batch_size", 1e2, 100),
    ("train.lr", 1, 1.0), ("model.block", {"kernel": 5.0}, {"kernel": 5}),
    ("model.block", {"family": "resnet", "ratio": 2}, {"family": "resnet", "ratio": 2.0}),
])
def test_coercion_policy_accepts(key, value, expected):
    cfg = load_experiment("tiny-digits", {key: value})
    section, name = key.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == expected and type(got) is type(expected)
    if isinstance(expected, dict):
        assert all(type(got[k]) is type(v) for k, v in expected.items())


@pytest.mark.parametrize("key, value, message", [
    ("train.batch_size", 64.5, "train.batch_size must be int (a whole number), got 64.5"),
    ("train.lr", "1e-3", "train.lr must be float (a number), got '1e-3'"),
    ("train.steps", True, "train.steps must be int (a whole number), got True"),
    ("train.ema_warmup", 1, "train.ema_warmup must be bool (true or false), got 1"),
    ("data.name", 3, "data.name must be str (a quoted string), got 3"),
    ("eval.metrics", ["fid_digits", 2], "eval.metrics[] must be str (a quoted string), got 2"),
    ("model.block", {"kernel": "5"}, "model.block.kernel must be int (a whole number), got '5'"),
    ("model.block", {"ffn": "true"}, "model.block.ffn must be bool (true or false), got 'true'"),
    ("model.block", {"mixer": "ssee"}, "model.block.mixer: unknown channel mixer 'ssee'; valid: "),
    ("model.block", {"kernal": 5}, "model.block: unknown option 'kernal' for block family 'convnext'; valid: "),
])
def test_coercion_policy_refuses_with_one_line(key, value, message):
    with pytest.raises(UserError) as e:
        load_experiment("tiny-digits", {key: value})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_study_and_sweep_files_use_the_same_policy(tmp_path):
    from fcdm_lab.studies.sweep import load_sweep

    study = tmp_path / "s.toml"
    study.write_text('base = "tiny-digits"\nseeds = 2.0\nsteps = 1e2\n[[variants]]\nname = "a"\n'
                     '[[variants]]\nname = "b"\nset = { "model.block" = { family = "convnext", kernel = 5.0 } }\n')
    spec = load_study(study)
    assert (spec.seeds, spec.steps) == (2, 100) and type(spec.seeds) is int
    study.write_text(study.read_text().replace("seeds = 2.0", 'seeds = "2"'))
    with pytest.raises(UserError, match=r"s.toml\): seeds must be int \(a whole number\), got '2'$"):
        load_study(study)
    sweep = (STUDIES_DIR / "search-lc.toml").read_text()
    assert "\ntrials = 10\n" in sweep
    (tmp_path / "w.toml").write_text(sweep.replace("\ntrials = 10\n", "\ntrials = 2.5\n"))
    with pytest.raises(UserError, match=r"trials must be int \(a whole number\), got 2.5"):
        load_sweep(tmp_path / "w.toml")


def test_bad_block_option_in_a_variant_fails_when_the_study_loads(tmp_path, capsys):
    """A typo in the last variant's block spec stops `load_study` (and `fcdm-lab ablate`) before the
    first variant trains: one line, exit 2, no run folder, no MLflow run."""
    from fcdm_lab.cli import main

    study = tmp_path / "typo.toml"
    study.write_text('base = "tiny-digits"\nsteps = 2\n[[variants]]\nname = "grn"\n'
                     '[[variants]]\nname = "se"\nset = { "model.block" = { family = "convnext", mixer = "ssee" } }\n')
    with pytest.raises(UserError, match=r"variant 'se': model.block.mixer: unknown channel mixer 'ssee'; valid: grn"):
        load_study(study)
    with pytest.raises(SystemExit) as exc:
        main(["ablate", str(study)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown channel mixer 'ssee'" in err and len(err.strip().splitlines()) == 1
    assert not Path("runs").exists() and not Path("mlruns").exists()

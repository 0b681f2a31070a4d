"""The CLI: profile output, and bad input -> one line on stderr, exit code 2, no traceback."""
import json
from pathlib import Path
import subprocess
import sys

import pytest

from fcdm_lab.cli import main
from fcdm_lab.models.registry import BLOCKS, MIXERS


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


EXPECTED = {  # facts sections 4 and 5
    "FCDM-S": (32_699_912, 3.073), "FCDM-B": (127_675_400, 12.136),
    "FCDM-L": (504_453_128, 48.231), "FCDM-XL": (698_754_056, 64.530),
    "DiT-S/2": (32_963_360, 6.056), "DiT-B/2": (130_512_416, 23.005),
    "DiT-L/2": (458_102_816, 80.698), "DiT-XL/2": (675_129_632, 118.621),
    "DiCo-S": (33_137_672, 4.236), "DiCo-B": (129_992_712, 16.856),
    "DiCo-L": (463_897_992, 60.169), "DiCo-XL": (701_151_368, 87.221),
}


def test_profile_json_fcdm_xl(capsys):
    code, out, _ = run(capsys, "profile", "FCDM-XL", "--json")
    assert code == 0
    row = json.loads(out)
    assert row["params"] == 698_754_056 and row["model"] == "FCDM-XL" and row["resolution"] == 256
    assert row["gmacs"] == pytest.approx(64.53, rel=0.005)


def test_profile_all_json_every_preset_and_baseline(capsys):
    code, out, _ = run(capsys, "profile", "--all", "--json")
    assert code == 0
    rows = {r["model"]: r for r in json.loads(out)["models"]}
    assert set(rows) == set(EXPECTED)
    for name, (params, gmacs) in EXPECTED.items():
        assert rows[name]["params"] == params, name
        assert rows[name]["gmacs"] == pytest.approx(gmacs, rel=0.005), name


def test_profile_throughput_json_and_resolution_table(capsys):
    code, out, _ = run(capsys, "profile", "FCDM", "--set", "L=1", "--set", "C=8", "--pixel", "-r", "8",
                       "--in-channels", "1", "--num-classes", "10", "--throughput", "--batch-size", "4", "--json")
    assert code == 0
    row = json.loads(out)
    for key in ("train_img_per_s", "infer_img_per_s", "peak_mem_mb"):
        assert row[key] >= 0
    code, out, _ = run(capsys, "profile", "FCDM-S", "--json", "-r", "256", "-r", "512")
    rows = json.loads(out)["models"]
    assert rows[1]["gmacs"] / rows[0]["gmacs"] == pytest.approx(4.0, rel=0.01)


def test_profile_match_shows_knob(capsys):
    code, out, _ = run(capsys, "profile", "FCDM-L", "--set", "family=resnet", "--match", "ratio", "--json")
    row = json.loads(out)
    assert row["match"]["knob"] == "ratio" and row["match"]["matched"]
    assert row["block"]["ratio"] == pytest.approx(row["match"]["to_value"])


def test_blocks_lists_families_and_mixers(capsys):
    code, out, _ = run(capsys, "blocks")
    assert code == 0
    for word in ("convnext", "resnet", "grn", "cca", "none", "kernel", "ffn_ratio", "bottleneck"):
        assert word in out


@pytest.mark.parametrize("args,needle", [
    (["profile", "FCDM-XXL"], "unknown model 'FCDM-XXL'; valid: "),
    (["profile", "FCDM-S", "--set", "family=transformer"], f"valid: {', '.join(BLOCKS.names())}"),
    (["profile", "FCDM-S", "--set", "mixer=no-such-mixer"], f"valid: {', '.join(MIXERS.names())}"),
    (["profile", "FCDM-S", "--set", "kernel=4"], "odd"),
    (["profile", "FCDM", "--set", "L=0", "--set", "C=32"], "L (blocks per level) must be >= 1"),
    (["profile", "FCDM", "--set", "L=1", "--set", "C=31"], "even integer >= 8"),
    (["profile", "FCDM", "--set", "L=1", "--set", "C=4"], "even integer >= 8"),
    (["profile", "FCDM-S", "--pixel", "-r", "30"], "divisible by 4"),
    (["profile", "FCDM-S", "--set", "depth=3"], "unknown --set key 'depth'"),
    (["profile", "FCDM-S", "--set", "kernel=big"], "must be int"),
    (["profile", "FCDM-S", "--set", "L=two"], "--set L must be int (a whole number), got 'two'"),
    (["profile", "FCDM-S", "-r", "abc"], "Invalid value for '--resolution'"),
    (["profile", "DiT-S/2", "--set", "kernel=5"], "unknown --set key 'kernel'"),
    (["profile", "FCDM-S", "--match", "depth"], "valid: ratio, ffn_ratio, width"),
    (["nope"], "No such command"),
])
def test_bad_input_one_line_exit_2(capsys, args, needle):
    code, out, err = run(capsys, *args)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out


def test_console_script_bad_input_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fcdm_lab", "profile", "FCDM-XXL"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["train", "no-such-experiment"], "unknown experiment 'no-such-experiment'; available: "),
    (["train", "tiny-digits", "--set", "data.name=imagenet"], "unknown dataset 'imagenet'"),
    (["train", "tiny-digits", "--set", "data.name=imagefolder", "--set", "data.path=/no/such/dir"], "/no/such/dir"),
    (["train", "tiny-digits", "--set", "train.lr=fast"], "train.lr must be float"),
    (["train", "tiny-digits", "--set", "train.colour=1"], "unknown key 'train.colour'"),
    (["train", "tiny-digits", "--set", "model.block={family=\"transformer\"}"], f"valid: {', '.join(BLOCKS.names())}"),
    (["sample", "--checkpoint", "no-such.pt"], "no-such.pt"),
    (["ablate", "no-such-study"], "unknown study 'no-such-study'; available: "),
    (["sweep", "search-lc", "--storage", "notaurl"], "storage"),
])
def test_bad_input_train_sample_studies(capsys, args, needle):
    code, out, err = run(capsys, *args, *(["--no-track"] if args[0] == "train" else []))
    assert code == 2, err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (Path("runs").exists() and any(Path("runs").rglob("*.pt")))


def test_train_then_resume_latest_from_the_cli(capsys):
    base = ["train", "tiny-digits", "--no-track", "--out", "run", "--set", "model.C=8", "--set", "train.ckpt_every=5",
            "--set", "train.sample_every=0", "--set", "eval.num_samples=10"]
    code, out, err = run(capsys, *base, "--steps", "10", "--max-steps", "5")
    assert code == 0, err
    assert sorted(p.name for p in Path("run/checkpoints").glob("*.pt")) == ["step_0000005.pt"]
    code, out, err = run(capsys, *base, "--steps", "10")
    assert code == 2 and "resume" in err  # refuses to overwrite an existing run silently
    code, out, err = run(capsys, *base, "--steps", "10", "--resume", "latest")
    assert code == 0, err
    assert "10 steps" in out
    assert (Path("run/checkpoints") / "step_0000010.pt").exists()

"""CLI conveniences: --version, -h next to --help, shell completion, help text on every option."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

import fcdm_lab
from fcdm_lab.cli import app, main

REPO = Path(__file__).resolve().parent.parent


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().out


def test_version(capsys):
    code, out = run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"fcdm-lab {fcdm_lab.__version__}"


@pytest.mark.parametrize("command", [[], ["sample"], ["data", "extract-latents"]])
def test_short_help_is_help(capsys, command):
    code_long, long = run_main(capsys, *command, "--help")
    code_short, short = run_main(capsys, *command, "-h")
    assert code_long == code_short == 0 and short == long and "Usage: fcdm-lab" in short


def test_every_option_and_argument_has_help():
    missing = []

    def walk(cmd, path):
        missing.extend(f"{path} {p.name}" for p in cmd.params if not getattr(p, "help", None))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "fcdm-lab")
    assert missing == []


def test_shell_completion():
    env = {**os.environ, "PYTHONPATH": str(REPO), "_FCDM_LAB_COMPLETE": "complete_bash",
           "COMP_WORDS": "fcdm-lab sample --chec", "COMP_CWORD": "2"}
    out = subprocess.run([sys.executable, "-m", "fcdm_lab"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["--checkpoint"], out.stderr
    env.update(COMP_WORDS="fcdm-lab ab", COMP_CWORD="1")
    out = subprocess.run([sys.executable, "-m", "fcdm_lab"], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["ablate"]

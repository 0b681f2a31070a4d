"""A wheel built from the repo works without the source tree: the bundled experiments and studies
ship as package data, so `fcdm-lab` lists them and runs them from a plain (non-editable) install."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# generated or local-only things that must not be packaged (and make the copy slow)
IGNORE = shutil.ignore_patterns(".git", ".whl", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                ".cache", "runs", "mlruns", "mlartifacts", "*.db", "checkpoints", "outputs", "samples")


def _run(*cmd, cwd, env=None):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def test_wheel_ships_bundled_files_and_runs_outside_the_repo(tmp_path):
    """Build a wheel (from a copy, so the checkout gets no build/ folder), install it with --no-deps in a
    fresh venv that borrows the dependencies from the interpreter running the tests, then from a folder
    outside the repo: `fcdm-lab ablate` lists the bundled studies and `fcdm-lab profile FCDM-L --study
    paper-ablation` builds all seven variants (~30-45 s on 2 cores)."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=IGNORE)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", src, "-w", tmp_path / "dist",
         cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("fcdm_lab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("fcdm_lab/bundled/") and n.endswith(".toml")}
    assert shipped == {p.name for p in [*REPO.glob("experiments/*.toml"), *REPO.glob("studies/*.toml")]}

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    # The dependencies come from the site-packages of the interpreter running the tests, as plain path
    # entries (a .pth file). Not `--system-site-packages`: inside a venv that borrows from the BASE
    # interpreter, which has none of them. Plain entries: their own .pth files (our editable install's
    # finder among them) are not run, so the wheel's copy is the only fcdm_lab there.
    ours = {p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))}
    venv_site = Path(_run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (venv_site / "_borrowed_deps.pth").write_text("\n".join(sorted(p for p in ours if Path(p).is_dir())) + "\n")
    _run(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("FCDM_TEST_THREADS", "1"), "COLUMNS": "200"}
    where = _run(py, "-c", "import fcdm_lab.bundled as b; print(b.STUDIES_DIR)", cwd=work, env=env)
    assert Path(where.strip()).is_relative_to(venv), where  # the installed copy, not the checkout
    cli = venv / "bin" / "fcdm-lab"
    listing = _run(cli, "ablate", cwd=work, env=env)
    for name in ("grn-vs-cca", "paper-ablation", "kernel-size"):
        assert name in listing
    table = _run(cli, "profile", "FCDM-L", "--study", "paper-ablation", cwd=work, env=env)
    for variant in ("default", "k5", "k3", "cca", "extra-ffn", "no-bottleneck", "resnet"):
        assert variant in table
    assert "48.2" in table  # the default block's GMACs at FCDM-L 256x256
    assert not list(work.iterdir())  # listing and profiling write nothing

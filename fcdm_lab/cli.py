"""The `fcdm-lab` command line. Thin by design: each command parses, calls one library function,
prints. Library imports are lazy so `fcdm-lab --help` stays fast.

Errors: a `UserError` (bad input) or a usage error prints one line on stderr and exits with 2;
a signal stops with 130 (SIGINT) or 143 (SIGTERM, SIGUSR1) and one line saying how to resume.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
# typer >= 0.20 vendors click; its exceptions live here (the public names cover only a few)
from typer._click import exceptions as click_exc
from rich.markup import escape

from .display import output_console
from .errors import UserError

console = output_console()
err_console = output_console(stderr=True)

app = typer.Typer(
    name="fcdm-lab",
    help="Ablations, sweeps and experiment tracking for FCDM, the fully convolutional diffusion model.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Dataset tools (latent stores).", no_args_is_help=True)
app.add_typer(data_app, name="data")

def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"fcdm-lab {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Ablations, sweeps and experiment tracking for FCDM, the fully convolutional diffusion model."""


SetOpt = typer.Option(None, "--set", help="Override KEY=VALUE (TOML value), repeatable.")
UriOpt = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")


def _overrides(items: Optional[List[str]]) -> dict:
    from .schema import parse_override

    return dict(parse_override(i) for i in (items or []))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

@app.command()
def profile(
    models: Optional[List[str]] = typer.Argument(None, help="Model or preset names (see --all); several to compare."),
    all_models: bool = typer.Option(False, "--all", help="Profile every preset and baseline."),
    resolution: List[int] = typer.Option([256], "--resolution", "-r", help="Image side in pixels; repeat to compare."),
    pixel: bool = typer.Option(False, "--pixel", help="Pixel-space input instead of SD-VAE latents (side/8, 4 channels)."),
    in_channels: Optional[int] = typer.Option(None, "--in-channels", help="Input channels (default: 4 latent channels, 3 with --pixel)."),
    num_classes: int = typer.Option(1000, "--num-classes", help="Classes of the label embedder (1000 = ImageNet)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Block option or model setting KEY=VALUE (kernel=5, mixer=cca, family=resnet, L=3)."),
    match: Optional[str] = typer.Option(None, "--match", help="Solve this knob (ratio | ffn_ratio | width) to the default block's GMACs."),
    match_target: Optional[float] = typer.Option(None, "--match-target", help="Explicit GMACs target for --match."),
    study: Optional[str] = typer.Option(None, "--study", help="Profile every variant of a study file at MODEL (e.g. FCDM-L --study paper-ablation)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Batch size for --throughput."),
    throughput: bool = typer.Option(False, "--throughput", help="Also measure images/s and peak memory on this device."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Exact parameters and GMACs (the paper's FLOPs), optionally measured throughput."""
    from .models import profile as prof
    from .display import print_profile_table

    common = dict(pixel=pixel, in_channels=in_channels, num_classes=num_classes, batch_size=batch_size,
                  throughput=throughput)
    models = models or []
    if study:
        if len(models) != 1:
            raise UserError("--study needs a MODEL to build the variants at, e.g. `fcdm-lab profile FCDM-L --study paper-ablation`")
        from .studies.spec import profile_study

        rows = profile_study(study, models[0], resolutions=resolution, overrides=_overrides(set_), **common)
    elif all_models:
        if models:
            raise UserError("give either MODEL names or --all, not both")
        rows = prof.profile_many(prof.all_model_names(), resolution, **common)
    elif models:
        rows = [prof.profile_model(m, resolution=r, overrides=_overrides(set_), match=match,
                                   match_target=match_target, **common) for m in models for r in resolution]
    else:
        raise UserError("name a MODEL (e.g. FCDM-XL) or pass --all")
    if as_json:
        print(json.dumps(rows[0] if len(rows) == 1 else {"models": rows}, indent=None))
    else:
        print_profile_table(rows, console)


@app.command()
def blocks():
    """List block families, channel mixers and their options (the ablation axes)."""
    from .display import print_blocks

    print_blocks(console)


# ---------------------------------------------------------------------------------------------
# Training and sampling
# ---------------------------------------------------------------------------------------------

@app.command()
def train(
    experiment: str = typer.Argument("tiny-digits", help="Experiment name in experiments/ or a .toml path."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps (overrides train.steps)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Training seed (overrides train.seed): data order, noise, init."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<experiment>)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="latest | PATH to a checkpoint."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop at this step (the schedule stays that of train.steps; resume later)."),
    set_: Optional[List[str]] = SetOpt,
    tracking_uri: Optional[str] = UriOpt,
    track: bool = typer.Option(True, "--track/--no-track", help="Log the run to MLflow."),
):
    """Train an experiment (plain: one process; `accelerate launch -m fcdm_lab train ...`: many)."""
    from .config import load_experiment

    overrides = _overrides(set_)
    if steps is not None:
        overrides["train.steps"] = steps
    if seed is not None:
        overrides["train.seed"] = seed
    cfg = load_experiment(experiment, overrides)
    out_dir = out or Path("runs") / cfg.name
    if track:
        from .runner import train_tracked

        result, run_id = train_tracked(cfg, out_dir, uri=tracking_uri, resume=resume, max_steps=max_steps)
    else:
        from .training.trainer import train as train_untracked

        result, run_id = train_untracked(cfg, out_dir, resume=resume, max_steps=max_steps), None
    from .tracking.client import is_main_process
    from .tracking.ui import browse_hint

    if result is not None and is_main_process():  # under `accelerate launch` every process gets here
        console.print(f"[bold green]done[/]: {result.step} steps in {result.wall_time_s:.0f} s "
                      f"({result.images_per_s:.0f} images/s), final loss {result.final_loss:.4f}")
        console.print(f"checkpoint: {result.checkpoint}")
        if run_id:
            console.print(browse_hint(run_id, tracking_uri), highlight=False, soft_wrap=True)  # a link stays whole


@app.command()
def sample(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint file (ours or a reference FCDM one)."),
    num: int = typer.Option(64, "--num", min=1, help="Number of images."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Sampling steps (default 250; the flow ODE samplers 50)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddpm | ddim (iDDPM) or euler | heun | sde (flow; sde = the reference's). Default: the checkpoint's."),
    objective: Optional[str] = typer.Option(None, "--objective", help="ddpm | flow: override what the checkpoint records (config or reference args)."),
    time_scale: Optional[float] = typer.Option(None, "--time-scale", help="Flow: the model sees t * this (1 = the reference's t in [0, 1])."),
    random_labels: bool = typer.Option(False, "--random-labels", help="Labels uniform at random (the ADM protocol) instead of cycling the classes."),
    npz_key: str = typer.Option("arr_0", "--npz-key", help="Key of the images in samples.npz: arr_0 (ADM) | arr (the reference's sampler)."),
    tf32: bool = typer.Option(True, "--tf32/--no-tf32", help="TF32 matmuls/convolutions on CUDA (the reference's setting; no effect on CPU)."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta (0 = deterministic)."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Classifier-free guidance scale (1 = none)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE directory or hub name to decode latents (default: the run's)."),
    class_labels: Optional[List[int]] = typer.Option(None, "--class-labels", help="Repeatable; default cycles the classes."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights (default) or the raw ones."),
    guidance_channels: Optional[int] = typer.Option(None, "--guidance-channels", help="3 = the reference's legacy first-3-channels guidance."),
    seed: int = typer.Option(0, "--seed", help="Noise seed: the same seed gives the same images."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per batch."),
    out: Path = typer.Option(Path("samples"), "--out", help="Output folder (images/, grid.png, samples.npz)."),
):
    """Write PNGs, a grid and an ADM-format .npz of samples from a checkpoint."""
    from .inference.samples import sample_checkpoint

    if random_labels and class_labels:
        raise UserError("give either --class-labels or --random-labels, not both")
    res = sample_checkpoint(checkpoint, out, num=num, steps=steps, sampler=sampler, eta=eta, cfg_scale=cfg_scale, vae=vae,
                            class_labels="random" if random_labels else class_labels, use_ema=ema,
                            guidance_channels=guidance_channels, seed=seed, batch_size=batch_size, objective=objective,
                            time_scale=time_scale, tf32=tf32, npz_key=npz_key)
    for key, value in res.items():
        console.print(f"{key}: {value}")


@app.command()
def evaluate(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint file (ours or a reference FCDM one), ema.safetensors or run folder."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="adm: the paper's FID-50K (50K samples, random labels, 250-step DDPM / flow SDE, ADM reference batch; fid50k, is50k, precision50k, recall50k)."),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Score this sample folder or .npz (arr or arr_0) instead of sampling (no checkpoint needed)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Local AutoencoderKL folder (or hub name) to decode latents (default: the run's)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="ddpm | flow: override what the checkpoint records."),
    time_scale: Optional[float] = typer.Option(None, "--time-scale", help="Flow: the model sees t * this (1 = the reference's)."),
    guidance_channels: Optional[int] = typer.Option(None, "--guidance-channels", help="Guided channels (--protocol adm: 3, the reference's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per sampling batch (one shard each under --protocol)."),
    out: Optional[Path] = typer.Option(None, "--out", help="--protocol: folder for the shards and samples.npz (default <run>/eval/adm-...); rerun to resume."),
    tf32: bool = typer.Option(True, "--tf32/--no-tf32", help="TF32 matmuls/convolutions on CUDA (the reference's setting)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", min=2, help="Samples to generate (default: the run's eval.num_samples)."),
    metrics: Optional[List[str]] = typer.Option(None, "--metrics", help="Repeatable: {fid,kid,is,precision,recall}_{digits,inception}, class_acc_digits; or fid, kid, is, prc (digits network on digits data, Inception otherwise)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="digits-train | digits-test | image folder | .npz"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler (default: the run's eval.sampler)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Sampling steps (default: the run's eval.steps)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Guidance scale (default: the run's eval.cfg_scale)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights (default) or the raw ones."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Local Inception weights file for FID/IS offline."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Log into this MLflow run (default: the checkpoint's run)."),
    tracking_uri: Optional[str] = UriOpt,
):
    """Sample from a checkpoint and compute FID/KID/IS (torch-fidelity), logged to MLflow."""
    from .eval.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(checkpoint, num_samples=num_samples, metrics=metrics, reference=reference,
                              sampler=sampler, steps=steps, cfg_scale=cfg_scale, use_ema=ema,
                              inception_weights=str(inception_weights) if inception_weights else None,
                              run_id=run_id, uri=tracking_uri, protocol=protocol, samples=samples, vae=vae,
                              objective=objective, time_scale=time_scale, batch_size=batch_size, out_dir=out,
                              guidance_channels="protocol" if guidance_channels is None else guidance_channels,
                              tf32=tf32)
    for key, value in res.items():
        console.print(f"{key}: {value}")


@data_app.command("extract-latents")
def extract_latents(
    images: Path = typer.Option(..., "--images", help="ImageFolder root (class sub-folders)."),
    vae: str = typer.Option(..., "--vae", help="Hub name (stabilityai/sd-vae-ft-ema) or a local directory."),
    out: Path = typer.Option(..., "--out", help="Latent store folder to create."),
    image_size: int = typer.Option(256, "--image-size", min=8, help="Resize and center-crop images to this side before encoding."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per VAE batch."),
    flip: str = typer.Option("random", "--flip", help="random: one copy per image, mirrored or not (the reference's) | both: also a mirrored copy | none."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (the reference's) | float16 (half the disk)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing latent store."),
):
    """Encode an image folder with an AutoencoderKL into a sharded latent store."""
    from .data.latents import extract_latents as run

    meta = run(str(images), vae, str(out), image_size=image_size, batch_size=batch_size, flip=flip, dtype=dtype,
               overwrite=overwrite)
    console.print(f"wrote {meta['count']} latents of shape {tuple(meta['shape'])} to {out}")


# ---------------------------------------------------------------------------------------------
# Studies
# ---------------------------------------------------------------------------------------------

# Where the workers of a study or sweep run (studies/engine.py: Launcher)
LauncherOpt = typer.Option("processes", "--launcher", help="Where the workers run: processes (on this machine) | submitit-local (each worker a submitit job on this machine, logs in --job-logs) | slurm (each worker a Slurm job, one job array, through submitit).")
PartitionOpt = typer.Option(None, "--partition", help="Slurm partition of the worker jobs (--launcher slurm; default: the cluster's).")
GpusOpt = typer.Option(None, "--gpus-per-worker", min=0, help="GPUs of each worker job (--launcher slurm; default 0).")
TimeLimitOpt = typer.Option(None, "--time-limit", min=1, help="Wall-clock limit of each worker job, in MINUTES (required with --launcher slurm); 90 s before it the worker checkpoints and stops, and the same command resumes.")
CpusOpt = typer.Option(None, "--cpus-per-worker", min=1, help="CPU cores and torch threads of each worker job (slurm: default 1; submitit-local: default cores / workers).")
JobLogsOpt = typer.Option(None, "--job-logs", help="Folder of the worker jobs' submitit scripts, pickles and stdout/stderr logs (default runs/submitit/<Optuna study name>).")
WorkersOpt = typer.Option(None, "--workers", min=1, help="Workers: processes on this machine, or jobs with --launcher slurm / submitit-local (default: one 1-thread worker per CPU core, one per GPU; one job with slurm).")


def _launcher(kind, partition, gpus, time_limit, cpus, job_logs):
    from .studies.launchers import Launcher

    return Launcher.from_options(kind, partition=partition, gpus_per_worker=gpus, time_limit_min=time_limit,
                                 cpus_per_worker=cpus, job_logs=job_logs)


@app.command()
def ablate(
    name: Optional[str] = typer.Argument(None, help="Study name in studies/ (omit to list them)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Seeds per variant (default: the study file's)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps per run (default: the study file's)."),
    set_: Optional[List[str]] = SetOpt,
    tracking_uri: Optional[str] = UriOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the children's runs (default runs/studies/<study>-<run id>)."),
    workers: Optional[int] = WorkersOpt,
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default sqlite:///optuna.db); the same URL on other machines joins the study."),
    launcher: str = LauncherOpt,
    partition: Optional[str] = PartitionOpt,
    gpus_per_worker: Optional[int] = GpusOpt,
    time_limit: Optional[int] = TimeLimitOpt,
    cpus_per_worker: Optional[int] = CpusOpt,
    job_logs: Optional[Path] = JobLogsOpt,
    until_decided: bool = typer.Option(False, "--until-decided", help="Add seeds in rounds (one per round to the baseline and each undecided variant) until every variant is decided on the primary metric, with anytime-valid verdicts."),
    max_seeds: Optional[int] = typer.Option(None, "--max-seeds", min=2, help="--until-decided: at most this many seeds per variant (default 20)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="--until-decided: no new round once it would pass this wall time (e.g. 90m, 2h, 1h30m, 3600s)."),
):
    """Run a study: one MLflow parent run, one child per variant and seed, verdicts (no name: list them)."""
    from .schema import parse_duration
    from .studies import ablate as ab

    launch = _launcher(launcher, partition, gpus_per_worker, time_limit, cpus_per_worker, job_logs)
    budget_s = parse_duration("--budget", budget) if budget is not None else None
    if name is None:
        ab.print_studies(console)
        return
    ab.run_ablation(name, seeds=seeds, steps=steps, overrides=_overrides(set_), uri=tracking_uri,
                    out_dir=out, console=console, workers=workers, storage=storage, launcher=launch,
                    until_decided=until_decided, max_seeds=max_seeds, budget_s=budget_s)


@app.command()
def sweep(
    name: str = typer.Argument(..., help="A scaling study (kind = \"scaling\": a grid of L, C and budgets) or an Optuna search (kind = \"sweep\") in studies/, or a path."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Scaling studies: paired seeds per point (default: the file's)."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Optuna searches: trials to run (default: the file's)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default sqlite:///optuna.db); the same URL on many workers joins one study."),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="Optuna searches: the study name (default: derived from the file)."),
    set_: Optional[List[str]] = SetOpt,
    tracking_uri: Optional[str] = UriOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the runs, tables and plots."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps of every run (replaces the file's budget)."),
    workers: Optional[int] = WorkersOpt,
    launcher: str = LauncherOpt,
    partition: Optional[str] = PartitionOpt,
    gpus_per_worker: Optional[int] = GpusOpt,
    time_limit: Optional[int] = TimeLimitOpt,
    cpus_per_worker: Optional[int] = CpusOpt,
    job_logs: Optional[Path] = JobLogsOpt,
):
    """Scaling study with seeds and fitted laws, or an Optuna search over L and C (Pareto front)."""
    from .studies.sweep import sweep_command

    launch = _launcher(launcher, partition, gpus_per_worker, time_limit, cpus_per_worker, job_logs)
    sweep_command(name, seeds=seeds, trials=trials, steps=steps, study_name=study_name, storage=storage,
                  uri=tracking_uri, overrides=_overrides(set_), out_dir=out, workers=workers, launcher=launch,
                  console=console)


@app.command()
def report(run_id: str = typer.Argument(..., help="MLflow run id of a study's parent run."), tracking_uri: Optional[str] = UriOpt,
           against_paper: Optional[bool] = typer.Option(None, "--against-paper/--no-against-paper", help="Rank correlation with the paper's FID column (bootstrap over seeds) and each verdict next to the paper's change; default: when every variant has a paper FID.")):
    """Rebuild a study's table, markdown report and plot from MLflow alone."""
    from .studies.report import report_command

    report_command(run_id, uri=tracking_uri, console=console, against_paper=against_paper)


@app.command()
def rerun(run_id: str = typer.Argument(..., help="MLflow run id to re-execute."), tracking_uri: Optional[str] = UriOpt):
    """Re-execute a logged run from its recorded config and seed."""
    from .studies.rerun import rerun as rerun_fn

    rerun_fn(run_id, uri=tracking_uri)


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="Port to listen on (1-65535)."),
    tracking_uri: Optional[str] = UriOpt,
):
    """Start the MLflow UI on the same store (loopback by default)."""
    from .tracking.ui import launch_ui

    code = launch_ui(tracking_uri, host=host, port=port)
    if code:
        raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------

def _error(message: str, label: str = "error") -> None:
    err_console.print(f"[bold red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _resume_hint(args: List[str], e) -> str:
    """How to go on after a stop: the same command line, for `train` with `--resume latest` on the
    run folder that holds the checkpoint just written."""
    import shlex

    command = args[0] if args else ""
    if command == "train" and getattr(e, "checkpoint", None) is not None:
        rest, skip = [], False
        for a in args:
            if skip:
                skip = False
            elif a == "--resume":
                skip = True
            elif not a.startswith("--resume="):
                rest.append(a)
        if not any(a == "--out" or a.startswith("--out=") for a in rest) and e.out_dir is not None:
            rest += ["--out", str(e.out_dir)]
        return f"; resume: `{shlex.join(['fcdm-lab', *rest, '--resume', 'latest'])}`"
    if command in ("train", "ablate", "sweep"):
        return f"; resume with the same command: `{shlex.join(['fcdm-lab', *args])}`"
    return ""


# Filesystem errors that are the user's environment, not a bug: one line and exit 2.
_IO_ERRORS = {errno.ENOSPC: "free some space or choose another --out", errno.EDQUOT: "free some space or choose another --out",
              errno.EROFS: "choose another --out", errno.EACCES: "check the permissions or choose another path",
              errno.EPERM: "check the permissions or choose another path"}


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point and exit codes: 0 done; 2 bad input (a `UserError`, a usage error, a folder that
    cannot be written), one line and no traceback; 130 Ctrl-C; 143 SIGTERM or SIGUSR1 (a training
    first finishes its step and writes a checkpoint); the stop line says how to resume."""
    import warnings

    from .signals import Interrupted, raise_on_signals

    args = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning
    command = typer.main.get_command(app)
    # Shell completion: the installed script calls us with _FCDM_LAB_COMPLETE set; answer and exit
    # (app() does this itself; make_context below does not).
    command._main_shell_completion({}, "fcdm-lab", None)
    try:
        # make_context + invoke rather than app(standalone_mode=False): typer's wrapper turns a
        # KeyboardInterrupt (Interrupted is one) into a bare 130 and drops what it carries.
        with raise_on_signals(), command.make_context("fcdm-lab", args) as ctx:
            command.invoke(ctx)
    except KeyboardInterrupt as e:
        if not isinstance(e, Interrupted):
            e = Interrupted(signal.SIGINT, "stopped by SIGINT (Ctrl-C)")
        if int(os.environ.get("RANK", "0")) == 0:  # under a launcher, one line for the job, not one per process
            _error(f"{e}{_resume_hint(args, e)}", label="interrupted")
        sys.exit(e.exit_code)
    except UserError as e:
        _error(str(e))
        sys.exit(2)
    except click_exc.NoArgsIsHelpError:
        sys.exit(0)  # the help is already printed
    except click_exc.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        _error(e.format_message() + hint)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _error("aborted", label="interrupted")
        sys.exit(130)
    except click_exc.ClickException as e:
        _error(e.format_message())
        sys.exit(e.exit_code)
    except BrokenPipeError:  # `fcdm-lab ... | head`: stop quietly (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        if e.errno not in _IO_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        _error(f"{e.strerror or e}{where}; {_IO_ERRORS[e.errno]}")
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()

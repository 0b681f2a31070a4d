"""Typed experiment configuration with strict overrides (nanoGPT style, read from TOML files).

An experiment file has the sections [model], [data], [diffusion], [train], [eval]. Loading is
strict: an unknown key or a value of the wrong type is a `UserError` naming the key and the valid
choices. `--set section.key=value` overrides use TOML syntax for the value (`train.lr=3e-4`,
`model.block={family="resnet"}`); a bare word is taken as a string (`data.name=mnist`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .bundled import EXPERIMENTS_DIR
from .errors import UserError, choices
from .schema import apply_overrides, check_name, from_dict, parse_override, read_toml, resolve_named_file



@dataclass
class ModelConfig:
    name: str = "FCDM"                      # a registry name: FCDM (give L, C), FCDM-S..XL, DiT-*, DiCo-*
    L: Optional[int] = None                 # blocks per level (FCDM only; presets fix it)
    C: Optional[int] = None                 # base width (FCDM only; presets fix it)
    block: Dict[str, Any] = field(default_factory=lambda: {"family": "convnext"})
    match_flops: Optional[str] = None       # knob solved to match the default block's GMACs: ratio | ffn_ratio | width
    match_target_gmacs: Optional[float] = None  # explicit target instead of the default block's
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    label_dropout: str = "shared"          # FCDM: per_level (the reference's: each width's embedder drops on its own) | shared (one draw)
    grad_checkpointing: bool = False


@dataclass
class DataConfig:
    name: str = "digits"                    # digits | fashion-mnist | imagefolder | mnist | cifar10 | latents
    path: Optional[str] = None
    test_path: Optional[str] = None
    heldout_fraction: float = 0.0           # no test_path: this share of data.path is the held-out split, left out of training
    image_size: Optional[int] = None        # None = the dataset's native size
    random_flip: Optional[bool] = None      # None = the dataset's sensible default
    download: bool = False
    num_workers: int = 0


@dataclass
class DiffusionConfig:
    objective: str = "ddpm"                 # ddpm (iDDPM, learned variance) | flow (flow matching)
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    time_scale: float = 1.0                 # flow: the model sees t * time_scale (1 = t in [0, 1], the reference's)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64                    # global batch (split over processes)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accum: int = 1
    grad_clip: Optional[float] = None
    mixed_precision: str = "no"             # no | fp16 | bf16
    ema_decay: float = 0.9999
    ema_warmup: bool = False                # decay min(ema_decay, (1+n)/(10+n)) for short runs
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    keep_last: int = 3
    sample_every: int = 0                   # 0 = only at the end
    compile: bool = False                   # torch.compile each repeated block (regional compilation)
    compile_mode: str = "default"           # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    tf32: bool = True                       # TF32 matmuls/convs on CUDA (the reference's setting); no effect on CPU
    threads: Optional[int] = None           # torch intra-op threads per process (None = torch default / launcher)
    fused_adamw: bool = True


@dataclass
class EvalConfig:
    num_samples: int = 500
    sampler: Optional[str] = None           # None = the objective's default (ddpm / euler)
    steps: int = 50
    eta: float = 0.0
    cfg_scale: float = 1.0
    guidance_channels: Optional[int] = None  # None = all channels; 3 = the reference's legacy behaviour
    metrics: List[str] = field(default_factory=lambda: ["fid_digits", "kid_digits", "class_acc_digits"])
    reference: Optional[str] = None         # "digits-train" | "digits-test" | folder | .npz
    inception_weights: Optional[str] = None
    use_ema: bool = True
    batch_size: int = 250                   # images per sampling batch; held-out (image, t, noise) triples per forward
    # Held-out loss (eval/heldout.py): the training objective's loss of the EMA model on the test split
    # (latent stores / image folders: data.test_path), metrics val_loss (ddpm: + val_mse, val_vb) and
    # val_loss_q1..q4, logged at the end of every training and returned as evaluation metrics.
    heldout_images: int = 1000              # images scored: all of a smaller split, else a subset fixed by heldout_seed; 0 = off
    heldout_draws: int = 8                  # (t, noise) draws per image; t stratified over evenly spaced quantiles
    heldout_seed: int = 0                   # seeds the triples: the same for every model, variant and train.seed
    heldout_every: int = 0                  # also every N training steps (held-out learning curves); 0 = only at the end


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> Dict[str, Any]:
        """Flattened `section.key` view (for MLflow params)."""
        out: Dict[str, Any] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for k, v in values.items():
                    out[f"{section}.{k}"] = v
            else:
                out[section] = values
        return out


# ---------------------------------------------------------------------------------------------
# Strict conversion from plain dicts
# ---------------------------------------------------------------------------------------------

def _check_block(model: "ModelConfig", where: str) -> Dict[str, Any]:
    """An FCDM block spec checked against its family's declared options (and coerced by the same
    policy) when the config loads, so a typo fails before anything trains. Only the keys given are
    kept: defaults stay implicit."""
    from .models import model_family
    from .models.blocks import resolve_block_spec

    if model_family(model.name) != "fcdm":
        return model.block  # build_model refuses block options for DiT / DiCo with its own message
    resolved = resolve_block_spec(model.block, where=where)
    return {k: resolved[k] for k in model.block}


def config_from_dict(data: Dict[str, Any]) -> ExperimentConfig:
    cfg = from_dict(ExperimentConfig, data)
    cfg.model.block = _check_block(cfg.model, "model.block")
    validate(cfg)
    return cfg


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
MAX_SEED = 2**32 - 1        # numpy's and most tools' seed range; study seeds add the seed index
MAX_THREADS = 1024          # torch threads per process (100000 crashed the process)


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    from .diffusion import OBJECTIVES

    def one_of(key: str, value: Any, valid) -> None:
        if value not in valid:
            raise UserError(f"{key} = {value!r} is not valid; choose one of: {choices(valid)}")

    one_of("diffusion.objective", cfg.diffusion.objective, OBJECTIVES)
    one_of("model.label_dropout", cfg.model.label_dropout, ("per_level", "shared"))  # models.fcdm.LABEL_DROPOUT (not imported: slow)
    one_of("train.mixed_precision", cfg.train.mixed_precision, ("no", "fp16", "bf16"))
    one_of("train.compile_mode", cfg.train.compile_mode, COMPILE_MODES)
    if cfg.model.match_flops is not None:
        from .models.matching import KNOBS
        one_of("model.match_flops", cfg.model.match_flops, KNOBS)
    check_name("experiment name", cfg.name)
    t, d, e = cfg.train, cfg.diffusion, cfg.eval
    # Numeric ranges, checked here because a wrong sign fails late or not at all (a negative lr
    # "trains" uphill): key -> (value, low, high, low included); None values are unset options.
    ranges = {
        "train.steps": (t.steps, 1, None, True), "train.batch_size": (t.batch_size, 1, None, True),
        "train.grad_accum": (t.grad_accum, 1, None, True), "train.keep_last": (t.keep_last, 1, None, True),
        "train.log_every": (t.log_every, 1, None, True), "train.ckpt_every": (t.ckpt_every, 1, None, True),
        "train.sample_every": (t.sample_every, 0, None, True), "train.warmup_steps": (t.warmup_steps, 0, None, True),
        "train.lr": (t.lr, 0, None, False), "train.weight_decay": (t.weight_decay, 0, None, True),
        "train.grad_clip": (t.grad_clip, 0, None, False), "train.threads": (t.threads, 1, MAX_THREADS + 1, True),
        "train.seed": (t.seed, 0, MAX_SEED + 1, True),
        "train.ema_decay": (t.ema_decay, 0, 1, True), "data.num_workers": (cfg.data.num_workers, 0, None, True),
        "data.image_size": (cfg.data.image_size, 1, None, True),
        "data.heldout_fraction": (cfg.data.heldout_fraction, 0, 0.5, True),
        "model.class_dropout_prob": (cfg.model.class_dropout_prob, 0, 1, True),
        "model.match_target_gmacs": (cfg.model.match_target_gmacs, 0, None, False),
        "diffusion.num_timesteps": (d.num_timesteps, 1, None, True), "diffusion.beta_start": (d.beta_start, 0, 1, False),
        "diffusion.beta_end": (d.beta_end, 0, 1, False), "diffusion.time_scale": (d.time_scale, 0, None, False),
        "eval.num_samples": (e.num_samples, 1, None, True), "eval.steps": (e.steps, 1, None, True),
        "eval.eta": (e.eta, 0, None, True), "eval.cfg_scale": (e.cfg_scale, 0, None, True),
        "eval.guidance_channels": (e.guidance_channels, 1, None, True), "eval.batch_size": (e.batch_size, 1, None, True),
    }
    for key, (value, low, high, closed) in ranges.items():
        if value is None:
            continue
        ok = (value >= low if closed else value > low) and (high is None or value < high) and math.isfinite(value)
        if not ok:
            if high is None:
                want = f"{'>=' if closed else '>'} {low}"
            elif isinstance(value, int) and closed:
                want = f"an integer from {low} to {high - 1}"
            else:
                want = f"in {'[' if closed else '('}{low}, {high})"
            raise UserError(f"{key} must be {want}, got {value}")
    if d.beta_start > d.beta_end:
        raise UserError(f"diffusion.beta_start ({d.beta_start}) must be <= diffusion.beta_end ({d.beta_end})")


# ---------------------------------------------------------------------------------------------
# Files and overrides
# ---------------------------------------------------------------------------------------------

def experiment_names() -> List[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def resolve_experiment_path(name_or_path: str) -> Path:
    """An experiment is a path to a TOML file or the name of one in `experiments/`."""
    return resolve_named_file(name_or_path, EXPERIMENTS_DIR, "experiment", experiment_names())


# The experiment's sections: [model], [data], ... (its dataclass-typed fields)
SECTIONS = tuple(name for name, tp in typing.get_type_hints(ExperimentConfig).items() if dataclasses.is_dataclass(tp))


def merge_experiment(base: Dict[str, Any], data: Dict[str, Any]) -> Dict[str, Any]:
    """`data` over `base`, section by section: a key set in `data` replaces the base's value whole
    (a `model.block` table or an `eval.metrics` list is not merged key by key)."""
    out = copy.deepcopy(base)
    out.pop("name", None)  # a file's name is its own (its `name` key or its file name)
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_base(path: Path, base: str) -> None:
    """`base` (of an experiment, study or sweep file) names a bundled experiment or a .toml file by a
    path RELATIVE to the file: a file shared with others cannot make them read any file on their disk."""
    if Path(base).is_absolute() or base.startswith("~"):
        raise UserError(f"{path}: base {base!r} must be a bundled experiment ({choices(experiment_names())}) or a "
                        f"path relative to the file, not an absolute path")


def read_experiment(path: Path, _chain: tuple = ()) -> Dict[str, Any]:
    """An experiment file as a plain dict, with its `base` chain merged in (`merge_experiment`).
    `base` is a bundled experiment's name or a path relative to the file; an unknown base or a
    cycle is a one-line UserError."""
    path = Path(path)
    if path.resolve() in [p.resolve() for p in _chain]:
        cycle = " -> ".join(p.stem for p in (*_chain, path))
        raise UserError(f"experiment base cycle: {cycle}")
    data = read_toml(path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str):
        raise UserError(f"{path}: base must be an experiment name or a path to a .toml file, got {base!r}")
    check_base(path, base)
    relative = path.parent / base
    try:
        base_path = resolve_experiment_path(relative if relative.suffix == ".toml" else base)
    except UserError as e:
        raise UserError(f"{path}: base: {e}") from None
    return merge_experiment(read_experiment(base_path, (*_chain, path)), data)


def experiment_data(name_or_path: str | Path) -> Dict[str, Any]:
    """The plain dict of an experiment (name or path), base merged, `name` defaulting to the file's."""
    path = resolve_experiment_path(str(name_or_path))
    data = read_experiment(path)
    data.setdefault("name", path.stem)
    return data


def load_experiment(name_or_path: str, overrides: Dict[str, Any] | List[str] | None = None) -> ExperimentConfig:
    data = experiment_data(name_or_path)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data)


# ---------------------------------------------------------------------------------------------
# The resolved config as a file: one serializer for the run folder's config.toml and MLflow's
# ---------------------------------------------------------------------------------------------

def drop_none(value: Any) -> Any:
    """`value` without None entries (TOML and JSON artefacts leave unset keys out), in dicts and lists."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [drop_none(v) for v in value if v is not None]
    return value


def config_to_toml(cfg: ExperimentConfig) -> str:
    """The resolved config as TOML (TOML has no null: unset optional keys are left out, which
    reloads to the same config since every optional field defaults to None)."""
    import tomli_w  # small, but only runs that write a config need it

    return tomli_w.dumps(drop_none(cfg.to_dict()))


def config_from_toml(text: str) -> ExperimentConfig:
    return config_from_dict(tomllib.loads(text))

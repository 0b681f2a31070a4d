"""Held-out loss: the training objective's own loss on held-out data, with common random numbers.

    values = heldout_loss(model, cfg)                 # {"val_loss", "val_mse", "val_vb", "val_loss_q1".."q4"}
    hold = HeldoutSet.from_config(cfg)                # the held-out images and their fixed (t, noise) draws
    values = hold.loss(model, objective)              # the same, reusing `hold` (the training hook does)
    train(cfg, out, hooks=[..., HeldoutLoss(log_metrics=tracker.log_metrics)])   # logged along training

Why: FID-like metrics of the tiny studies move 10-40% from seed to seed; the held-out loss of the same
models 0.4-1.4% (facts section 14), so it answers "which variant is better?" with fewer seeds.

What is measured (lower is better; metric names in eval/metrics.py, HELDOUT_METRICS):
  ddpm (learned sigma)  val_loss = val_mse + val_vb, the iDDPM hybrid loss the trainer minimises
                        (GaussianDiffusion.training_losses at the given t and noise); val_mse, val_vb
  ddpm (fixed sigma)    val_loss = val_mse (epsilon MSE)
  flow                  val_loss: the velocity MSE (FlowMatching.interpolate / .velocity at the given
                        t and noise, the two pieces FlowMatching.training_losses is made of)
  val_loss_q1..q4       val_loss over the draws whose t / T (flow: t) lies in each quarter of [0, 1),
                        the quartiles of the trainer's loss_q1..q4
of the model given (the EMA model in training and studies) in eval mode (label dropout off: the
class-conditional loss) under torch.no_grad, in batches of eval.batch_size (image, t, noise) triples.
Mean over all triples, each weighing the same.

The held-out split is the dataset's test split, build_dataset(data, split="test"): the digits' fixed
297 images, Fashion-MNIST's, MNIST's and CIFAR-10's test sets, and for image folders and latent stores
`data.test_path` (a second folder / store, e.g. the ImageNet validation images extracted with the same
VAE), or `data.heldout_fraction`: that share of data.path, chosen by a fixed permutation
(data/build.py carve_heldout), which the training split then leaves out. Those are disjoint from the
training data by construction; a test_path that is the training folder itself (same path or same
content fingerprint) is refused. With neither, a latent or image-folder run has no held-out loss (a
warning; an error when val_* metrics are requested).

Common random numbers: the triples depend only on the held-out split, eval.heldout_seed (default 0),
eval.heldout_images, eval.heldout_draws and the objective's time grid (T, or flow's [0, 1)), never on
the model, the variant or the training seed, so every model of a study is scored on the same draws and
differences between models are not blurred by the draws. From the seed (rng.derive_seed streams):
  images  all of the split when it holds <= eval.heldout_images (default 1000), else that many chosen
          by a seeded permutation (sorted; e.g. 1000 of Fashion-MNIST's 10,000)
  t       stratified: image i gets K = eval.heldout_draws (default 8) draws at the quantiles
          u_ik = (k + o_i) / K, k = 0..K-1, with offsets o_i = (pi(i) + 1/2) / N for a seeded
          permutation pi of the N images. Every image covers the K strata of [0, 1) once, and the N*K
          values together are exactly the evenly spaced grid (j + 1/2) / (N K): the draw of t adds no
          variance. ddpm: t = floor(u T); flow: t = u.
  noise   per image, from its own generator seeded by (seed, dataset index): (K, C, H, W) standard
          normal, the same for an image whatever subset or batch size it is scored in.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from ..data.build import build_dataset
from ..data.registry import dataset_spec
from ..diffusion.gaussian import mean_flat
from ..errors import UserError
from ..inference.checkpoints import objective_for
from ..models.info import data_config
from ..rng import all_gather, derive_seed
from ..training.hooks import TrainHook, TrainingRun
from .metrics import HELDOUT_METRICS, is_heldout_metric

STREAM = 0x48454C44  # "HELD": the held-out streams, apart from every training and sampling stream
_SUBSET, _OFFSETS, _NOISE = 0, 1, 2
QUARTILES = 4
MAX_SEED = 2**32 - 1


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeldoutSettings:
    """eval.heldout_* (and eval.batch_size), checked."""
    images: int = 1000        # images scored (a seeded subset when the split is larger); 0 = off
    draws: int = 8            # (t, noise) draws per image, t stratified
    seed: int = 0             # the triples' seed (common random numbers)
    every: int = 0            # also evaluate every N training steps (0 = only at the end)
    batch_size: int = 250     # triples per forward pass

    @classmethod
    def from_config(cls, cfg) -> "HeldoutSettings":
        ev = cfg.eval
        s = cls(images=ev.heldout_images, draws=ev.heldout_draws, seed=ev.heldout_seed, every=ev.heldout_every,
                batch_size=ev.batch_size)
        s.check()
        return s

    def check(self) -> None:
        for key, value, low, high in (("heldout_images", self.images, 0, None), ("heldout_draws", self.draws, 1, None),
                                      ("heldout_seed", self.seed, 0, MAX_SEED), ("heldout_every", self.every, 0, None),
                                      ("batch_size", self.batch_size, 1, None)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
                want = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
                raise UserError(f"eval.{key} must be {want}, got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.images > 0


# ---------------------------------------------------------------------------------------------
# The held-out split
# ---------------------------------------------------------------------------------------------

def heldout_split(cfg, train_fingerprint: str | None = None):
    """(dataset, info) of the held-out split: build_dataset(data, "test"). A UserError when there is none
    (an image folder or latent store without data.test_path) or when it is the training data itself:
    data.test_path is data.path, or (given the training split's `train_fingerprint`, as the training
    hook does) the two hold the same content."""
    data = data_config(cfg)
    name = data.get("name", "digits")
    spec = dataset_spec(name)
    carved = bool(data.get("heldout_fraction"))  # build_dataset keeps that share of data.path out of training
    if spec.path and not carved:  # a folder per split: the held-out one is data.test_path
        if not data.get("test_path"):
            raise UserError(f"no held-out split for data {name!r}: set data.test_path to a held-out {spec.path} "
                            f"(disjoint from data.path) or data.heldout_fraction (e.g. 0.01: that share of "
                            f"data.path, left out of training), or eval.heldout_images = 0 to turn the held-out "
                            f"loss off")
        if data.get("path") and _same_path(data["path"], data["test_path"]):
            raise UserError(f"data.test_path is data.path ({data['path']}): the held-out loss needs held-out data")
    dataset, info = build_dataset(data, split="test")
    if spec.path and not carved and info["fingerprint"] == train_fingerprint:
        raise UserError(f"data.test_path {data['test_path']} holds the same data as data.path: the held-out loss "
                        f"needs held-out data")
    return dataset, info


def _same_path(a: str, b: str) -> bool:
    a, b = (os.path.realpath(os.path.expanduser(os.fspath(p))) for p in (a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# The triples: images, stratified t, noise (independent of any model)
# ---------------------------------------------------------------------------------------------

def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def select_images(num_items: int, images: int, seed: int) -> torch.Tensor:
    """Dataset indices scored (sorted int64): all when num_items <= images, else a seeded subset."""
    if num_items <= images:
        return torch.arange(num_items)
    return torch.randperm(num_items, generator=_generator(seed, STREAM, _SUBSET))[:images].sort().values


def time_quantiles(n: int, draws: int, seed: int) -> torch.Tensor:
    """(n, draws) float64 quantiles u_ik = (k + o_i) / draws in (0, 1), o_i = (pi(i) + 1/2) / n."""
    pi = torch.randperm(n, generator=_generator(seed, STREAM, _OFFSETS)).to(torch.float64)
    offsets = (pi + 0.5) / n
    return (torch.arange(draws, dtype=torch.float64)[None, :] + offsets[:, None]) / draws


def image_noise(index: int, draws: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """(draws, *shape) float32 standard normal noise of dataset item `index`."""
    return torch.randn((draws, *shape), generator=_generator(seed, STREAM, _NOISE, int(index)))


def objective_times(objective, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t as the objective takes it, t_frac in [0, 1)) for quantiles u: ddpm int64 floor(u T), flow float32 u."""
    if _is_flow(objective):
        t = u.to(torch.float32)
        return t, t
    T = int(objective.num_timesteps)
    t = (u * T).floor().long().clamp_(0, T - 1)
    return t, t.to(torch.float32) / T


def quartile_of(t_frac: torch.Tensor) -> torch.Tensor:
    """0..3: the quarter of [0, 1) t_frac lies in (the trainer's loss_q1..q4 rule)."""
    return (t_frac * QUARTILES).long().clamp_(0, QUARTILES - 1)


def _is_flow(objective) -> bool:
    return getattr(objective, "name", None) == "flow"


def _item(dataset, index: int):
    x, y = dataset[int(index)]
    return torch.as_tensor(x, dtype=torch.float32), int(y)


@dataclass
class HeldoutSet:
    """The held-out images and their fixed (t, noise) draws; `loss(model, objective)` scores a model."""
    dataset: Any
    indices: torch.Tensor          # (N,) dataset indices scored
    u: torch.Tensor                # (N, K) stratified time quantiles
    settings: HeldoutSettings
    info: Optional[dict] = None    # build_dataset's info of the held-out split

    @classmethod
    def from_config(cls, cfg, train_fingerprint: str | None = None) -> "HeldoutSet":
        settings = HeldoutSettings.from_config(cfg)
        if not settings.enabled:
            raise UserError("eval.heldout_images is 0: the held-out loss is off")
        dataset, info = heldout_split(cfg, train_fingerprint)
        return cls.from_dataset(dataset, settings, info)

    @classmethod
    def from_dataset(cls, dataset, settings: HeldoutSettings, info: dict | None = None) -> "HeldoutSet":
        settings.check()
        if len(dataset) < 1:
            raise UserError("the held-out split is empty")
        indices = select_images(len(dataset), settings.images, settings.seed)
        return cls(dataset, indices, time_quantiles(len(indices), settings.draws, settings.seed), settings, info)

    def __len__(self) -> int:
        """Triples scored: images x draws."""
        return self.u.numel()

    def batches(self, objective, batch_size: int | None = None) -> Iterator[Dict[str, torch.Tensor]]:
        """The triples in order (image-major), `batch_size` at a time (whole images per batch, at least
        one): dicts x (B, C, H, W), y (B,), t (B,), noise (B, C, H, W), t_frac (B,), index (B,) on the CPU."""
        K = self.settings.draws
        per_batch = max(1, (batch_size or self.settings.batch_size) // K)
        t_all, frac_all = objective_times(objective, self.u)
        for start in range(0, len(self.indices), per_batch):
            rows = range(start, min(start + per_batch, len(self.indices)))
            xs, ys, noises = [], [], []
            for r in rows:
                index = int(self.indices[r])
                x, y = _item(self.dataset, index)
                xs.append(x.expand(K, *x.shape))
                ys.append(torch.full((K,), y, dtype=torch.long))
                noises.append(image_noise(index, K, x.shape, self.settings.seed))
            sel = slice(rows.start, rows.stop)
            yield {"x": torch.cat(xs), "y": torch.cat(ys), "noise": torch.cat(noises),
                   "t": t_all[sel].reshape(-1), "t_frac": frac_all[sel].reshape(-1),
                   "index": self.indices[sel].repeat_interleave(K)}

    @torch.no_grad()
    def loss(self, model: torch.nn.Module, objective, *, device=None, batch_size: int | None = None
             ) -> Dict[str, float]:
        """The held-out metrics of `model` (in eval mode for the call; its mode is restored)."""
        device = torch.device(device) if device is not None else next(model.parameters()).device
        was_training = model.training
        model.eval()
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}

        def add(key: str, values: torch.Tensor) -> None:
            sums[key] = sums.get(key, 0.0) + float(values.double().sum())
            counts[key] = counts.get(key, 0) + values.numel()

        try:
            for b in self.batches(objective, batch_size):
                b = {k: v.to(device) for k, v in b.items()}
                terms = objective_terms(objective, model, b["x"], b["y"], b["t"], b["noise"])
                add("val_loss", terms["loss"])
                if not _is_flow(objective):
                    add("val_mse", terms["mse"])
                    if "vb" in terms:
                        add("val_vb", terms["vb"])
                q = quartile_of(b["t_frac"])
                for k in range(QUARTILES):
                    sel = terms["loss"][q == k]
                    if sel.numel():
                        add(f"val_loss_q{k + 1}", sel)
        finally:
            model.train(was_training)
        return {k: sums[k] / counts[k] for k in HELDOUT_METRICS if k in sums}


def objective_terms(objective, model_fn: Callable, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample (B,) loss terms of the objective at the given t and noise, by its own code:
    ddpm: GaussianDiffusion.training_losses ("loss", "mse", "vb" with learned sigma); flow: the velocity
    MSE from FlowMatching.interpolate and .velocity ("loss" = "mse"), as FlowMatching.training_losses."""
    kwargs = {"y": y}
    if _is_flow(objective):
        x_t, target = objective.interpolate(noise, x, t)
        mse = mean_flat((objective.velocity(model_fn, x_t, t, kwargs) - target) ** 2)
        return {"loss": mse, "mse": mse}
    return objective.diffusion.training_losses(model_fn, x, t, kwargs, noise=noise)


def heldout_loss(model: torch.nn.Module, cfg, *, objective=None, device=None) -> Dict[str, float]:
    """The held-out metrics of a model trained with `cfg` (objective: cfg's by default)."""
    if objective is None:
        objective = objective_for(cfg, model)
    return HeldoutSet.from_config(cfg).loss(model, objective, device=device)


# ---------------------------------------------------------------------------------------------
# Requests (studies, sweeps, run_experiment)
# ---------------------------------------------------------------------------------------------

def split_metric_names(names: Sequence[str]) -> tuple[List[str], List[str]]:
    """(held-out metric names, the others: sample metrics), each in the given order."""
    names = list(names)
    return [n for n in names if is_heldout_metric(n)], [n for n in names if not is_heldout_metric(n)]


def check_heldout_request(cfg, names: Sequence[str]) -> None:
    """Refuse, before training, bad eval.heldout_* settings and held-out metrics a run cannot produce:
    held-out loss off, no held-out split, or val_mse / val_vb from an objective without those terms."""
    settings = HeldoutSettings.from_config(cfg)
    names = [n for n in names if is_heldout_metric(n)]
    if not names:
        return
    if not settings.enabled:
        raise UserError(f"{names[0]} is requested but eval.heldout_images = 0 turns the held-out loss off")
    flow = cfg.diffusion.objective == "flow"
    for name in names:
        if name == "val_mse" and flow:
            raise UserError("val_mse is a ddpm metric; the flow objective's held-out loss is val_loss")
        if name == "val_vb" and (flow or not cfg.model.learn_sigma):
            raise UserError("val_vb needs the ddpm objective with learned sigma (model.learn_sigma = true)")
    heldout_split(cfg)


# ---------------------------------------------------------------------------------------------
# The training hook
# ---------------------------------------------------------------------------------------------

class HeldoutLoss(TrainHook):
    """The EMA model's held-out metrics every `eval.heldout_every` steps (0: never) and at the end of
    training, logged with `log_metrics(values, step)` (with heldout.wall_time_s) for steps after
    `logged_through` (a resumed run does not log a step twice). `final` holds the values at the end
    (`final_step` their step). The main process computes; the others wait for it.

    Without a held-out split (data.test_path unset for latents / image folders) it warns and does
    nothing, or raises (at the start of training) when `required`."""

    def __init__(self, log_metrics: Callable[[Mapping[str, float], int], None] | None = None,
                 logged_through: int = 0, required: bool = False):
        self.log_metrics, self.logged_through, self.required = log_metrics, logged_through, required
        self.heldout: HeldoutSet | None = None
        self.settings: HeldoutSettings | None = None
        self.final: Dict[str, float] = {}
        self.final_step: int | None = None

    def on_start(self, run: TrainingRun) -> None:
        self.settings = HeldoutSettings.from_config(run.cfg)
        problem = None
        if run.main and self.settings.enabled:
            try:
                self.heldout = HeldoutSet.from_config(run.cfg, run.data_info.get("fingerprint"))
            except UserError as e:
                if self.required:
                    problem = str(e)
                else:
                    warnings.warn(f"held-out loss off: {e}", stacklevel=2)
        if run.world > 1:  # every process must stop, or the others would wait for the main one forever
            problem = next((p for p in all_gather(problem) if p), None)
        if problem:
            raise UserError(problem)

    def evaluate(self, run: TrainingRun) -> Dict[str, float]:
        values: Dict[str, float] = {}
        if run.main and self.heldout is not None:
            start = time.perf_counter()
            # fork_rng: the evaluation draws from its own generators, and must not move the training's streams
            with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
                values = self.heldout.loss(run.ema_model, run.objective, device=run.device)
            self.final, self.final_step = values, run.step
            if self.log_metrics is not None and run.step > self.logged_through and values:
                finite = {k: v for k, v in values.items() if math.isfinite(v)}
                self.log_metrics({**finite, "heldout.wall_time_s": time.perf_counter() - start}, run.step)
        run.accelerator.wait_for_everyone()
        return values

    def on_step(self, run: TrainingRun) -> None:
        every = self.settings.every if self.settings is not None else 0
        if every > 0 and run.step % every == 0 and run.step < run.end_step:  # the end: on_end
            self.evaluate(run)

    def on_end(self, run: TrainingRun) -> None:
        self.evaluate(run)


__all__ = ["HeldoutLoss", "HeldoutSet", "HeldoutSettings", "check_heldout_request", "heldout_loss",
           "heldout_split", "image_noise", "objective_terms", "objective_times", "quartile_of", "select_images",
           "split_metric_names", "time_quantiles"]

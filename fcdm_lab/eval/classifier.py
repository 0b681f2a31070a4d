"""Small per-dataset CNNs: the feature extractors for FID/KID on small grayscale data, and the
judges of class consistency for conditional samples.

Inception-v3 features say little about 8x8 digits or 28x28 clothing (and need weights from the
internet), so these metrics use a small classifier's 128-d penultimate layer instead, one per dataset
(`CLASSIFIERS`): "digits" (8x8 scikit-learn digits, a few seconds, >= 95% on the held-out split) and
"fashion" (28x28 Fashion-MNIST, about 3 minutes on one CPU thread, >= 90% on its test split). The
trained weights are cached on disk under a key that hashes the training data and every setting below,
so a change to either retrains instead of silently reusing stale weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock
from safetensors.torch import load_file, save

from fcdm_lab.errors import UserError
from fcdm_lab.data.digits import digits_arrays
from fcdm_lab.data.fashion import fashion_arrays  # a UserError with the install hint when the files are absent
from fcdm_lab.fileio import atomic_write

NATIVE_SIZE = 8  # the digits'
NUM_CLASSES = 10
FEATURE_DIM = 128
CACHE_ENV = "FCDM_LAB_CACHE"


def cache_root() -> Path:
    """The project's cache folder: `$FCDM_LAB_CACHE`, else `~/.cache/fcdm-lab`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fcdm-lab"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights besides the data (part of the cache key)."""
    widths: tuple = (32, 64, 128)
    feature_dim: int = FEATURE_DIM
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    version: int = 2  # bump when the training code changes in a way the fields above do not show


class ImageClassifier(nn.Module):
    """CNN for (1, S, S) images in [-1, 1] (S = 8 for digits, 28 for Fashion-MNIST): three 3x3 conv
    layers, two 2x2 max-pools, then a 128-d feature layer and a 10-way linear head. GELU rather than ReLU: ReLU left ~40% of the feature
    units dead (constant zero), wasting feature dimensions for FID.

    `features` are scaled by one constant (`feature_scale`, set after training) so their mean square
    over the train split is 1: KID's kernel (x.y/d + 1)^3 assumes features of order one (as
    Inception's are); unscaled, the cubic term dominated and KID's spread blew up.

    Inputs of another size (e.g. 16x16 samples of a model trained at 16) are resized to S x S
    bilinearly (antialiased when shrinking); RGB inputs are averaged to grayscale.
    """

    def __init__(self, widths=(32, 64, 128), feature_dim: int = FEATURE_DIM, size: int = NATIVE_SIZE):
        super().__init__()
        if size % 4:
            raise UserError(f"classifier input size must be divisible by 4 (two 2x2 pools), got {size}")
        self.size = size
        c1, c2, c3 = widths
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.GELU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),                                    # S -> S/2 (digits: 8x8 -> 4x4)
            nn.Conv2d(c2, c3, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),                                    # S/2 -> S/4
            nn.Flatten(),
            nn.Linear(c3 * (size // 4) ** 2, feature_dim), nn.GELU(),  # penultimate features (N, 128)
        )
        self.head = nn.Linear(feature_dim, NUM_CLASSES)
        self.register_buffer("feature_scale", torch.ones(()))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [-1, 1] with C in {1, 3} -> (N, 1, S, S)."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"the classifier expects images (N, 1 or 3, H, W); got {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=min(x.shape[-2:]) > self.size)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128) of images (N, C, H, W) in [-1, 1], times `feature_scale`."""
        return self.body(self.prepare(x)) * self.feature_scale

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one pass: features (N, 128) and logits (N, 10)."""
        h = self.body(self.prepare(x))
        return h * self.feature_scale, self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) of images (N, C, H, W) in [-1, 1]."""
        return self.head(self.body(self.prepare(x)))


def _digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_arrays("train")
    return torch.from_numpy(x), torch.from_numpy(y)


def _digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_arrays("test")
    return torch.from_numpy(x), torch.from_numpy(y)


def _fashion_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = fashion_arrays(split)
    return torch.from_numpy(x), torch.from_numpy(y)


@dataclass(frozen=True)
class ClassifierSpec:
    """One dataset's judge: its native size, training settings, cache file prefix and data."""
    name: str                                   # the metric tag: fid_<name>, class_acc_<name>
    data: str                                   # the data.name it judges
    size: int
    cfg: TrainConfig
    file_prefix: str
    train_data: Callable[[], tuple]             # () -> (x float (N, 1, S, S) in [-1, 1], y int64 (N,))
    test_data: Callable[[], tuple]


CLASSIFIERS = {
    "digits": ClassifierSpec("digits", "digits", NATIVE_SIZE, TrainConfig(), "digits-cnn", _digits_train,
                             _digits_test),
    # Narrower than the digits net: at 28x28 one epoch of (32, 64, 128) took 230 s on one thread,
    # (16, 32, 64) 90 s; two epochs reach >= 90% test accuracy.
    "fashion": ClassifierSpec("fashion", "fashion-mnist", 28,
                              TrainConfig(widths=(16, 32, 64), epochs=2, batch_size=64, lr=1e-3, version=1),
                              "fashion-cnn", lambda: _fashion_split("train"), lambda: _fashion_split("test")),
}


def classifier_spec(name: str) -> ClassifierSpec:
    if name not in CLASSIFIERS:
        raise UserError(f"unknown classifier {name!r}; valid: {', '.join(CLASSIFIERS)}")
    return CLASSIFIERS[name]


def _cache_key(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(f"{tuple(x.shape)}:{x.dtype}:{tuple(y.shape)}:{y.dtype}".encode())
    h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _single_thread():
    """Train on one intra-op thread: the float reduction order, hence the weights, then do not depend
    on the machine's core count (and the net is too small to gain from threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _train_classifier(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> ImageClassifier:
    """Adam on cross-entropy; the seed fixes both the init and the batch order."""
    # enable_grad: callers may ask for the classifier inside a no_grad block (first use trains it)
    with _single_thread(), torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(cfg.seed)
        model = ImageClassifier(cfg.widths, cfg.feature_dim, x.shape[-1])
        order = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        model.train()
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(x), generator=order)
            for i in range(0, len(x), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():  # in chunks: 60k Fashion-MNIST activations at once would need ~3 GB
            feats = torch.cat([model.features(x[i:i + 4096]) for i in range(0, len(x), 4096)])
            model.feature_scale.fill_(feats.pow(2).mean().rsqrt().item())
    return model


@torch.no_grad()
def accuracy(model: ImageClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of images (N, C, H, W) in [-1, 1] whose predicted class equals `y`."""
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        pred = model(x[i:i + batch_size].to(device)).argmax(dim=1).cpu()
        correct += (pred == y[i:i + batch_size].cpu()).sum().item()
    return correct / max(len(x), 1)


def _atomic_save(state: dict, path: Path, metadata: dict) -> None:
    """Write to a private temp file in the same folder, then rename: readers and racing writers only
    ever see a complete file (both racers write identical weights; the last rename wins)."""
    data = save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def _train_tensors_and_path(spec: ClassifierSpec, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """The spec's train split and the cache path for it and `cfg`."""
    x, y = spec.train_data()
    return x, y, cache_root() / "classifiers" / f"{spec.file_prefix}-{_cache_key(x, y, cfg)}.safetensors"


def classifier_cache_path(cfg: TrainConfig | None = None, name: str = "digits") -> Path:
    """Where the classifier `name` for its current train split and `cfg` is (or will be) cached."""
    spec = classifier_spec(name)
    return _train_tensors_and_path(spec, cfg or spec.cfg)[2]


def _load_cached(path: Path) -> dict | None:
    """The cached weights at `path`, or None when absent or unreadable (e.g. a disk filled mid-write)."""
    if not path.exists():
        return None
    try:
        return load_file(path)
    except Exception:  # unreadable: retrain
        return None


def get_classifier(name: str = "digits", device: str | torch.device = "cpu",
                   cfg: TrainConfig | None = None) -> ImageClassifier:
    """Classifier `name` ("digits" | "fashion") in eval mode on `device`: loaded from the cache, or
    trained on one CPU thread (digits: seconds; fashion: minutes) and cached on first use, with its
    test-split accuracy in the file's metadata."""
    spec = classifier_spec(name)
    cfg = cfg or spec.cfg
    x, y, path = _train_tensors_and_path(spec, cfg)
    model = ImageClassifier(cfg.widths, cfg.feature_dim, spec.size)
    state = _load_cached(path)
    if state is None:
        # Workers of one study share the cache: the first trains, the others wait for its file
        # (filelock: a cross-process lock that also works on NFS-less shared folders and Windows).
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            state = _load_cached(path)
            if state is None:
                trained = _train_classifier(x, y, cfg)
                xt, yt = spec.test_data()
                test_acc = accuracy(trained, xt, yt)
                state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
                _atomic_save(state, path, {"test_accuracy": f"{test_acc:.6f}",
                                           "config": json.dumps(asdict(cfg))})
    model.load_state_dict(state)
    model.requires_grad_(False)
    return model.eval().to(device)


def get_digits_classifier(device: str | torch.device = "cpu", cfg: TrainConfig = TrainConfig()) -> ImageClassifier:
    """The digits classifier (see `get_classifier`)."""
    return get_classifier("digits", device, cfg)


@torch.no_grad()
def class_consistency(images: torch.Tensor, labels, classifier: ImageClassifier | None = None,
                      batch_size: int = 512, name: str = "digits") -> float:
    """Fraction of conditional samples that classifier `name` (or the given one) labels as their
    conditioning class.

    `images`: (N, C, H, W), float in [-1, 1] or uint8 in [0, 255]; `labels`: N class ids in 0..9.
    """
    labels = torch.as_tensor(labels).long().flatten().cpu()
    if not torch.is_tensor(images) or images.dim() != 4:
        raise UserError(f"images must be a tensor (N, C, H, W); got {getattr(images, 'shape', type(images))}")
    if len(labels) != len(images):
        raise UserError(f"got {len(images)} images but {len(labels)} labels; they must match one to one")
    if len(labels) == 0:
        raise UserError("class consistency needs at least one image")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise UserError(f"{name} labels must be in 0..{NUM_CLASSES - 1}; got {labels.min()}..{labels.max()}")
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    model = classifier if classifier is not None else get_classifier(name)
    return accuracy(model, images, labels, batch_size)

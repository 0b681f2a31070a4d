"""One entry point from a config section to a dataset and a description of it.

    dataset, info = build_dataset({"name": "digits", "image_size": 16}, split="train")

info = {"name", "channels", "image_size" (side of the x tensors), "num_classes", "num_items",
        "fingerprint" (16 hex chars identifying the content as delivered), "vae": None | {"id", "scale_factor"}}
"""
from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

# Each dataset module registers its datasets in DATASETS when imported (digits; fashion-mnist;
# imagefolder, mnist, cifar10; latents), in this order, the order error messages list them. A builder
# added to one of these modules, or registered by user code, needs nothing here; a new module is
# imported here too.
from fcdm_lab.data import digits, fashion, images, latents  # noqa: F401  (registration)
from fcdm_lab.data.registry import DATASETS, DataRequest, dataset_spec
from fcdm_lab.errors import UserError, choices

SPLITS = ("train", "test")
CONFIG_KEYS = ("name", "path", "test_path", "heldout_fraction", "image_size", "random_flip", "download")
MAX_HELDOUT_FRACTION = 0.5
HELDOUT_SPLIT_SEED = 0   # the permutation that carves data.heldout_fraction: fixed, the same for every run
_RENAMED = {"fashionmnist": "fashion-mnist"}  # one name per dataset; an old config says what to write


class RandomFlip(Dataset):
    """Random horizontal flip on top of a dataset of (x, y) tensors (one that does not flip itself:
    digits, fashion-mnist)."""

    def __init__(self, base: Dataset, p: float = 0.5):
        self.base, self.p = base, p

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return (x.flip(-1) if torch.rand(()) < self.p else x), y


def build_dataset(cfg: dict, split: str = "train") -> tuple[Dataset, dict]:
    """Dataset for `split` ("train" | "test") from a data config; see the module docstring for info.

    cfg: name (a registered dataset: DATASETS.names()), path (required for imagefolder and latents; the
    download root for torchvision datasets), test_path (imagefolder/latents data for split="test"),
    heldout_fraction (imagefolder/latents without test_path: that share of data.path, chosen by a fixed
    permutation, is split="test" and is left out of split="train"; see carve_heldout),
    image_size (int or None = native), random_flip (default: the dataset's, on for cifar10/imagefolder,
    off otherwise; never on the test split), download (mnist/cifar10: default true; fashion-mnist:
    default false, true fetches the files with torchvision when they are not installed).
    """
    if not isinstance(cfg, dict):
        raise UserError(f"data config must be a mapping with keys {choices(CONFIG_KEYS)}, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(f"unknown data config key(s) {choices(unknown)}; valid keys: {choices(CONFIG_KEYS)}")
    name = cfg.get("name", "digits")
    if name in _RENAMED:
        raise UserError(f"dataset {name!r} is now called {_RENAMED[name]!r} (data.download = true fetches its "
                        f"files when they are not installed); valid names: {choices(DATASETS.names())}")
    if not isinstance(name, str) or name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid names: {choices(DATASETS.names())}")
    spec = dataset_spec(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid splits: {choices(SPLITS)}")
    image_size = cfg.get("image_size")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise UserError(f"data.image_size must be a positive integer or null (native size), got {image_size!r}")
    flip = cfg.get("random_flip")
    if spec.random_flip is None:  # the dataset has no random flip
        flip = False
    flip = (spec.random_flip if flip is None else bool(flip)) and split == "train"
    fraction = _heldout_fraction(cfg, name, spec)
    folder_split = "train" if fraction else split  # a carved split: both halves come from data.path
    path = _path(cfg, name, folder_split, spec.path) if spec.path else cfg.get("path")
    if spec.requires_image_size and image_size is None:
        raise UserError(f"data.image_size is required for {name} ({spec.requires_image_size})")

    built = spec.build(DataRequest(split=folder_split, image_size=image_size, random_flip=flip, path=path,
                                   download=cfg.get("download")))
    dataset, fingerprint = built.dataset, built.fingerprint
    if fraction:
        dataset, fingerprint = carve_heldout(dataset, fraction, split), _carved_fingerprint(fingerprint, fraction, split)
    dataset = RandomFlip(dataset) if flip and not built.flipped else dataset
    info = {"name": name, "channels": int(built.channels), "image_size": int(built.image_size),
            "num_classes": int(built.num_classes), "num_items": len(dataset), "fingerprint": fingerprint,
            "vae": built.vae}
    return dataset, info


def carve_heldout(dataset: Dataset, fraction: float, split: str) -> Subset:
    """The held-out part of `dataset` (split "test": ceil(fraction * N) items, at least 1) or the rest
    (split "train"), each in index order. The items are chosen by a permutation from a fixed seed, not
    taken from the end: a store written class by class (an ImageFolder walk) would otherwise hold out
    its last classes. The choice depends only on N and the fraction: every run, variant and seed
    trains on the same items and is scored on the same held-out ones."""
    n = len(dataset)
    k = min(max(1, math.ceil(fraction * n)), n - 1)
    order = np.random.default_rng(HELDOUT_SPLIT_SEED).permutation(n)
    return Subset(dataset, sorted(int(i) for i in (order[:k] if split == "test" else order[k:])))


def _carved_fingerprint(fingerprint: str, fraction: float, split: str) -> str:
    return hashlib.sha256(f"{fingerprint}:heldout={fraction!r}:{split}".encode()).hexdigest()[:16]


def _heldout_fraction(cfg: dict, name: str, spec) -> float:
    """data.heldout_fraction, checked: a number in [0, 0.5), for datasets read from data.path only,
    and not beside data.test_path (two held-out splits)."""
    fraction = cfg.get("heldout_fraction") or 0.0
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            math.isfinite(fraction) and 0 <= fraction < MAX_HELDOUT_FRACTION):
        raise UserError(f"data.heldout_fraction must be a number in [0, {MAX_HELDOUT_FRACTION}), got {fraction!r}")
    if fraction and not spec.path:
        folders = [n for n in DATASETS.names() if dataset_spec(n).path]
        raise UserError(f"data.heldout_fraction applies to data read from data.path ({choices(folders)}); "
                        f"dataset {name!r} has its own test split")
    if fraction and cfg.get("test_path"):
        raise UserError("data.heldout_fraction and data.test_path each give a held-out split; set one of them")
    return float(fraction)


def _path(cfg: dict, name: str, split: str, what: str) -> str:
    """The split's folder (data.path on train, data.test_path on test): given and existing."""
    key = "path" if split == "train" else "test_path"
    path = cfg.get(key)
    if not path:
        raise UserError(f"data.{key} (the {what}) is required for dataset {name!r}"
                        + (" on the test split" if split == "test" else ""))
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise UserError(f"data.{key} {path!r} does not exist")
    return path

"""One entry point from a config section to a dataset and a description of it.

    dataset, info = build_dataset({"name": "digits", "image_size": 16}, split="train")

info = {"name", "channels", "image_size" (side of the x tensors), "num_classes", "num_items",
        "fingerprint" (16 hex chars identifying the content as delivered), "vae": None | {"id", "scale_factor"}}
"""
from __future__ import annotations

import hashlib
import os

import torch
from torch.utils.data import Dataset

from fcdm_lab.data import digits as digits_mod
from fcdm_lab.errors import UserError, choices

DATASETS = ("digits", "fashion-mnist", "imagefolder", "mnist", "cifar10", "latents")
SPLITS = ("train", "test")
CONFIG_KEYS = ("name", "path", "test_path", "image_size", "random_flip", "download")
# Mirroring helps natural images; it would turn digits into other glyphs.
_DEFAULT_FLIP = {"digits": False, "mnist": False, "cifar10": True, "imagefolder": True, "latents": False,
                 "fashion-mnist": False}
_RENAMED = {"fashionmnist": "fashion-mnist"}  # one name per dataset; an old config says what to write


class RandomFlip(Dataset):
    """Random horizontal flip on top of a dataset of (x, y) tensors (for the in-memory digits)."""

    def __init__(self, base: Dataset, p: float = 0.5):
        self.base, self.p = base, p

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return (x.flip(-1) if torch.rand(()) < self.p else x), y


def build_dataset(cfg: dict, split: str = "train") -> tuple[Dataset, dict]:
    """Dataset for `split` ("train" | "test") from a data config; see the module docstring for info.

    cfg: name (one of DATASETS), path (required for imagefolder and latents; the download root for
    torchvision datasets), test_path (imagefolder/latents data for split="test"), image_size (int or
    None = native), random_flip (default: on for cifar10/imagefolder, off otherwise; never on the test
    split), download (mnist/cifar10: default true; fashion-mnist: default false, true fetches the files with
    torchvision when they are not installed).
    """
    if not isinstance(cfg, dict):
        raise UserError(f"data config must be a mapping with keys {choices(CONFIG_KEYS)}, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(f"unknown data config key(s) {choices(unknown)}; valid keys: {choices(CONFIG_KEYS)}")
    name = cfg.get("name", "digits")
    if name in _RENAMED:
        raise UserError(f"dataset {name!r} is now called {_RENAMED[name]!r} (data.download = true fetches its "
                        f"files when they are not installed); valid names: {choices(DATASETS)}")
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid names: {choices(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid splits: {choices(SPLITS)}")
    image_size = cfg.get("image_size")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise UserError(f"data.image_size must be a positive integer or null (native size), got {image_size!r}")
    flip = cfg.get("random_flip")
    flip = _DEFAULT_FLIP[name] if flip is None else bool(flip)
    flip = flip and split == "train"
    vae = None

    if name == "digits":
        dataset = digits_mod.load_digits_split(split, image_size)
        if flip:
            dataset = RandomFlip(dataset)
        channels, size, num_classes = 1, image_size or digits_mod.NATIVE_SIZE, digits_mod.NUM_CLASSES
        fingerprint = digits_mod.digits_fingerprint(split, image_size)
    elif name == "fashion-mnist":  # IDX files: Debian's dataset-fashion-mnist, data.path, or downloaded
        from fcdm_lab.data.fashion import NUM_CLASSES, FashionMNIST

        dataset = FashionMNIST(split, image_size, cfg.get("path"), download=bool(cfg.get("download", False)))
        channels, size, num_classes = 1, dataset.image_size, NUM_CLASSES
        fingerprint = dataset.fingerprint()
        if flip:
            dataset = RandomFlip(dataset)
    elif name == "imagefolder":
        from fcdm_lab.data.images import ImageFolderDataset

        path = _path(cfg, name, split)
        if image_size is None:
            raise UserError("data.image_size is required for imagefolder (images are centre-cropped to it)")
        dataset = ImageFolderDataset(path, image_size, random_flip=flip)
        channels, size, num_classes = dataset.channels, image_size, dataset.num_classes
        fingerprint = dataset.fingerprint()
    elif name == "latents":
        from fcdm_lab.data.latents import LatentStore

        dataset = LatentStore(_path(cfg, name, split))
        pixel_size = dataset.meta.get("image_size")
        if image_size is not None and image_size not in (pixel_size, dataset.shape[-1]):
            raise UserError(f"data.image_size {image_size} does not match latent store {dataset.path} "
                            f"(images {pixel_size}, latents {dataset.shape[-1]}); set it to null")
        channels, size, num_classes = dataset.shape[0], dataset.shape[-1], dataset.num_classes
        fingerprint = hashlib.sha256(dataset.fingerprint.encode()).hexdigest()[:16]
        vae = {"id": dataset.vae, "scale_factor": dataset.scale_factor}
    else:  # torchvision datasets
        from fcdm_lab.data.images import TorchvisionDataset

        dataset = TorchvisionDataset(name, cfg.get("path"), split, image_size, random_flip=flip,
                                     download=cfg.get("download", True))
        channels, size, num_classes = dataset.channels, dataset.image_size, dataset.num_classes
        fingerprint = dataset.fingerprint()

    info = {"name": name, "channels": int(channels), "image_size": int(size), "num_classes": int(num_classes),
            "num_items": len(dataset), "fingerprint": fingerprint, "vae": vae}
    return dataset, info


def _path(cfg: dict, name: str, split: str) -> str:
    key = "path" if split == "train" else "test_path"
    path = cfg.get(key)
    if not path:
        what = "image folder root" if name == "imagefolder" else "latent store folder"
        raise UserError(f"data.{key} (the {what}) is required for dataset {name!r}"
                        + (" on the test split" if split == "test" else ""))
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise UserError(f"data.{key} {path!r} does not exist")
    return path

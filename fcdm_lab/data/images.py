"""Pixel datasets: image folders in the ImageNet layout, and torchvision's small datasets by name.

Every item is (x, y): x float32 (C, H, W) in [-1, 1], y an int class label.
"""
from __future__ import annotations

import functools
import hashlib
import os
import socket

import numpy as np
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets

from fcdm_lab.data.registry import DATASETS, DataRequest, DataSplit
from fcdm_lab.errors import UserError, choices


# ---------------------------------------------------------------------------------------------
# Image folders (root/class_name/*.png|jpg)
# ---------------------------------------------------------------------------------------------

def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's preprocessing (guided-diffusion, used by DiT): halve with BOX filtering while the short
    side is at least 2*image_size, BICUBIC-resize the short side to image_size, then centre crop.

    Copied rather than composed from torchvision transforms because Resize + CenterCrop resamples
    differently, and FID against the ADM reference batch depends on matching this exactly.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def _load_image(path: str, mode: str) -> Image.Image:
    """torchvision's pil_loader, but a broken file raises a UserError that names it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert(mode)  # convert() forces the full decode while the file is open
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from e


class ImageFolderDataset(tv_datasets.ImageFolder):
    """torchvision's ImageFolder with ADM's centre crop, an optional random horizontal flip, and
    outputs scaled to [-1, 1]. Classes are the sorted sub-folder names (labels 0..K-1)."""

    def __init__(self, root: str, image_size: int, random_flip: bool = True, channels: int = 3):
        root = os.fspath(root)
        if channels not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got {channels!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise UserError(f"image_size must be a positive integer for an image folder, got {image_size!r}")
        if not os.path.isdir(root):
            raise UserError(f"image folder {root!r} does not exist (expected root/class_name/*.png|jpg)")
        self.image_size = image_size
        self.channels = channels
        self.random_flip = random_flip
        transform = T.Compose([
            T.Lambda(functools.partial(center_crop_arr, image_size=image_size)),
            *([T.RandomHorizontalFlip()] if random_flip else []),
            T.ToTensor(),                                         # uint8 HWC -> float (C, H, W) in [0, 1]
            T.Normalize([0.5] * channels, [0.5] * channels),     # [0, 1] -> [-1, 1]
        ])
        loader = functools.partial(_load_image, mode="RGB" if channels == 3 else "L")
        try:
            super().__init__(root, transform=transform, loader=loader)
        except FileNotFoundError as e:  # no class folders, or class folders without images
            raise UserError(f"image folder {root!r} holds no images in class sub-folders "
                            f"(expected root/class_name/*.png|jpg): {e}") from e

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """Short sha256 of the sorted (relative path, label, size in bytes) list and the resolution.

        File sizes rather than contents: hashing every byte of ImageNet would take minutes."""
        h = hashlib.sha256(f"imagefolder:{self.image_size}:{self.channels}".encode())
        for path, label in sorted(self.samples):
            rel = os.path.relpath(path, self.root)
            h.update(f"{rel}\0{label}\0{os.path.getsize(path)}\n".encode())
        return h.hexdigest()[:16]


# Mirroring helps natural images: a random flip by default. The dataset flips itself (its transform).
@DATASETS.register("imagefolder", random_flip=True, path="image folder root",
                   requires_image_size="images are centre-cropped to it")
def build_image_folder(req: DataRequest) -> DataSplit:
    dataset = ImageFolderDataset(req.path, req.image_size, random_flip=req.random_flip)
    return DataSplit(dataset, channels=dataset.channels, image_size=req.image_size,
                     num_classes=dataset.num_classes, fingerprint=dataset.fingerprint(), flipped=True)


# ---------------------------------------------------------------------------------------------
# torchvision datasets by name
# ---------------------------------------------------------------------------------------------

# name -> (torchvision class, channels, native side)
TORCHVISION_DATASETS = {
    "mnist": (tv_datasets.MNIST, 1, 28),
    "cifar10": (tv_datasets.CIFAR10, 3, 32),
}
# What torchvision downloads: these, and Fashion-MNIST's IDX files, which data/fashion.py reads itself
# (one dataset name, `fashion-mnist`, whether the files came from Debian, a folder or a download).
_DOWNLOADS = {**{name: entry[0] for name, entry in TORCHVISION_DATASETS.items()},
              "fashion-mnist": tv_datasets.FashionMNIST}
DOWNLOAD_TIMEOUT_S = 30  # per socket operation: a stalled mirror fails instead of hanging


def default_data_root() -> str:
    """Where torchvision datasets go when no path is given: $FCDM_LAB_DATA or ~/.cache/fcdm-lab/datasets."""
    return os.environ.get("FCDM_LAB_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "fcdm-lab",
                                                           "datasets")


def _manual_instructions(name: str, root: str) -> str:
    cls = _DOWNLOADS[name]
    if name == "cifar10":
        return (f"download {cls.url} and put {cls.filename} in {root} (unpacked on the next run with "
                f"download=true), or unpack it there so that {os.path.join(root, cls.base_folder)} exists")
    urls = " ".join(f"{cls.mirrors[0]}{filename}" for filename, _ in cls.resources)
    raw = os.path.join(root, cls.__name__, "raw")
    return f"download {urls} and put the .gz files in {raw} (unpacked on the next run with download=true)"


def open_torchvision(name: str, root: str, *, train: bool, transform=None, download: bool = True):
    """torchvision's dataset object `name` under `root`, downloaded first when `download`; a failed
    download or missing files are one UserError that says where to put the files by hand."""
    cls = _DOWNLOADS[name]
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torchvision's urlopen calls pass no timeout
    try:
        return cls(root, train=train, transform=transform, download=download)
    except (RuntimeError, OSError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__  # torchvision's errors span lines
        if download:
            raise UserError(f"could not download dataset {name!r} to {root} ({reason}); "
                            f"without internet, {_manual_instructions(name, root)}") from e
        raise UserError(f"dataset {name!r} not found in {root} and download is off; set download: true, "
                        f"or {_manual_instructions(name, root)}") from e
    finally:
        socket.setdefaulttimeout(old_timeout)


class TorchvisionDataset(Dataset):
    """A torchvision dataset (mnist | cifar10) resized to image_size, in [-1, 1]."""

    def __init__(self, name: str, root: str | None = None, split: str = "train", image_size: int | None = None,
                 random_flip: bool = False, download: bool = True):
        if name not in TORCHVISION_DATASETS:
            raise UserError(f"unknown torchvision dataset {name!r}; valid names: {choices(TORCHVISION_DATASETS)}")
        if split not in ("train", "test"):
            raise UserError(f"unknown split {split!r} for {name}; valid splits: train, test")
        cls, channels, native = TORCHVISION_DATASETS[name]
        size = native if image_size is None else image_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UserError(f"image_size must be a positive integer or None (native {native}), got {image_size!r}")
        root = os.path.abspath(os.path.expanduser(os.fspath(root or default_data_root())))
        self.name, self.root, self.split = name, root, split
        self.channels, self.image_size, self.num_classes = channels, size, 10
        transform = T.Compose([
            *([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)] if size != native else []),
            *([T.RandomHorizontalFlip()] if random_flip else []),
            T.ToTensor(),
            T.Normalize([0.5] * channels, [0.5] * channels),
        ])
        self.base = open_torchvision(name, root, train=split == "train", transform=transform, download=download)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return x, int(y)

    def fingerprint(self) -> str:
        """Short sha256 of the raw pixels and labels, plus the delivered resolution."""
        h = hashlib.sha256(f"{self.name}:{self.split}:{self.image_size}".encode())
        h.update(np.ascontiguousarray(np.asarray(self.base.data)).tobytes())
        h.update(np.asarray(self.base.targets, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def build_torchvision(name: str, req: DataRequest) -> DataSplit:
    """One of TORCHVISION_DATASETS; data.path is the download root, data.download defaults to true."""
    dataset = TorchvisionDataset(name, req.path, req.split, req.image_size, random_flip=req.random_flip,
                                 download=True if req.download is None else req.download)
    return DataSplit(dataset, channels=dataset.channels, image_size=dataset.image_size,
                     num_classes=dataset.num_classes, fingerprint=dataset.fingerprint(), flipped=True)


# Mirroring helps natural images (cifar10); it would turn digits into other glyphs (mnist).
DATASETS.register("mnist", random_flip=False)(functools.partial(build_torchvision, "mnist"))
DATASETS.register("cifar10", random_flip=True)(functools.partial(build_torchvision, "cifar10"))

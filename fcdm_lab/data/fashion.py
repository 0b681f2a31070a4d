"""Fashion-MNIST from local IDX files: 70,000 28x28 grayscale clothing images, 10 classes, offline.

Debian ships the four standard files as the package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz). Any other folder
holding them works too (`data.path`), gzipped or not, also torchvision's layout (ROOT/FashionMNIST/raw).
Where they are missing, `data.download = true` has torchvision fetch them (into data.path, else
$FCDM_LAB_DATA or ~/.cache/fcdm-lab/datasets, which is also searched when no path is given).

    dataset, info = build_dataset({"name": "fashion-mnist", "image_size": 16}, split="train")

Items are (x float32 (1, S, S) in [-1, 1], y int64 scalar tensor), held in memory (47 MB of uint8
at 28x28), like the digits: a CPU trainer then spends no time decoding images.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fcdm_lab.data.registry import DATASETS, DataRequest, DataSplit
from fcdm_lab.data.images import default_data_root, open_torchvision
from fcdm_lab.errors import UserError, choices

NAME = "fashion-mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
PATH_ENV = "FCDM_LAB_FASHION_MNIST"  # another default folder (tests point it at synthetic files)
NATIVE_SIZE = 28
NUM_CLASSES = 10
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
SPLITS = ("train", "test")
_PREFIX = {"train": "train", "test": "t10k"}
# sub-folders searched under a given folder: the folder itself, torchvision's layout, a bare raw/
_LAYOUTS = ("", os.path.join("FashionMNIST", "raw"), "raw")
INSTALL_HINT = ("install it with `apt-get install dataset-fashion-mnist` (files in " + DEBIAN_DIR + "), set "
                "data.path to a folder holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz], or set data.download = true")


def default_dir() -> str:
    """$FCDM_LAB_FASHION_MNIST if set, else Debian's install location."""
    return os.environ.get(PATH_ENV) or DEBIAN_DIR


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An unsigned-byte IDX file (plain or .gz) as a uint8 array of the shape its header declares.

    Hand-written (15 lines) because torchvision's `read_image_file` / `read_label_file` open the path
    with plain `open()` (no gzip, although Debian ships .gz files) and fail with bare asserts."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read IDX file {path}: {e}") from e
    # header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then each
    # dimension as a big-endian uint32
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise UserError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path}: header declares shape {shape} ({int(np.prod(shape))} bytes), file holds "
                        f"{body.size}")
    return body.reshape(shape)


def _find(folder: str, stem: str) -> Path | None:
    for layout in _LAYOUTS:
        for suffix in ("", ".gz"):
            p = Path(folder, layout, stem + suffix)
            if p.is_file():
                return p
    return None


def _split_files(folder: str, split: str) -> tuple[Path, Path] | None:
    found = [_find(folder, f"{_PREFIX[split]}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
    return None if None in found else (found[0], found[1])


def resolve_dir(folder: str | os.PathLike | None, split: str = "train", download: bool = False) -> str:
    """The folder that holds `split`'s files: `folder`, or with none given `default_dir()` and then
    the download folder; downloaded there first when `download`, else a UserError that says how to
    install the data."""
    if split not in SPLITS:
        raise UserError(f"unknown {NAME} split {split!r}; valid splits: {choices(SPLITS)}")
    candidates = [os.path.expanduser(os.fspath(folder))] if folder else [default_dir(), default_data_root()]
    for candidate in candidates:
        if _split_files(candidate, split) is not None:
            return candidate
    target = candidates[-1]
    if download:  # torchvision writes TARGET/FashionMNIST/raw, one of the layouts searched
        open_torchvision(NAME, os.path.abspath(target), train=split == "train", download=True)
        if _split_files(target, split) is not None:
            return target
    where = "not installed" if candidates[0] == DEBIAN_DIR else f"not found in {candidates[0]!r}"
    raise UserError(f"Fashion-MNIST {split} files are {where}: {INSTALL_HINT}")


def find_files(folder: str | None, split: str) -> tuple[Path, Path]:
    """(images, labels) IDX paths of `split` (see `resolve_dir`), or a UserError that says how to
    install the data."""
    return _split_files(resolve_dir(folder, split), split)


@functools.lru_cache(maxsize=4)
def _raw_arrays(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of a split; cached, read-only."""
    images_path, labels_path = find_files(folder, split)
    x, y = read_idx(images_path), read_idx(labels_path).astype(np.int64)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"{images_path} / {labels_path}: expected images (N, H, W) and N labels, got shapes "
                        f"{x.shape} and {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise UserError(f"{labels_path}: labels must be in 0..{NUM_CLASSES - 1}, got {y.min()}..{y.max()}")
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def fashion_arrays(split: str, image_size: int | None = None, folder: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 (N, 1, S, S) in [-1, 1] and labels int64 (N,); S = 28 unless `image_size` is
    given (bilinear resize, antialiased when shrinking, as the digits). Fresh, writable arrays."""
    # cache by the folder actually read: `None` would keep serving the default folder's arrays after
    # $FCDM_LAB_FASHION_MNIST (or the default) changed within the process
    x, y = _raw_arrays(resolve_dir(folder, split), split)
    x = torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0)[:, None]
    size = x.shape[-1] if image_size is None else image_size
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1]).clamp_(-1.0, 1.0)
    return x.numpy(), y.copy()


class FashionMNIST(Dataset):
    """One split in memory: uint8 at the native size (converted per item), float32 when resized."""

    def __init__(self, split: str = "train", image_size: int | None = None, folder: str | None = None,
                 download: bool = False):
        # the folder actually read (see fashion_arrays: the cache is keyed by it)
        self.split, self.folder = split, resolve_dir(folder, split, download)
        raw_x, raw_y = _raw_arrays(self.folder, split)
        self.image_size = raw_x.shape[-1] if image_size is None else image_size
        if self.image_size == raw_x.shape[-1]:
            self.images = torch.from_numpy(raw_x.copy())[:, None]           # uint8 (N, 1, 28, 28)
        else:
            self.images = torch.from_numpy(fashion_arrays(split, self.image_size, self.folder)[0])
        self.labels = torch.from_numpy(raw_y.copy())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = self.images[index]
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        return x, self.labels[index]

    def fingerprint(self) -> str:
        """Short sha256 of the raw pixels and labels, plus the delivered resolution."""
        raw_x, raw_y = _raw_arrays(self.folder, self.split)
        h = hashlib.sha256(f"{NAME}:{self.split}:{self.image_size}".encode())
        h.update(raw_x.tobytes())
        h.update(raw_y.tobytes())
        return h.hexdigest()[:16]


# IDX files: Debian's dataset-fashion-mnist, data.path, or downloaded (data.download, default false).
@DATASETS.register(NAME, random_flip=False)
def build_fashion(req: DataRequest) -> DataSplit:
    dataset = FashionMNIST(req.split, req.image_size, req.path, download=bool(req.download))
    return DataSplit(dataset, channels=1, image_size=dataset.image_size, num_classes=NUM_CLASSES,
                     fingerprint=dataset.fingerprint())

"""The bundled default dataset: scikit-learn's 8x8 handwritten digits.

1,797 grayscale images (values 0..16, 10 classes) ship inside scikit-learn, so this works offline and
trains a small FCDM in minutes on a CPU. A fixed stratified split keeps 297 images held out for
evaluation (1,500 for training), the same split the project's feasibility figures used.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from fcdm_lab.data.registry import DATASETS, DataRequest, DataSplit
from fcdm_lab.errors import UserError, choices

SPLITS = ("train", "test")
NUM_CLASSES = 10
NATIVE_SIZE = 8
TEST_SIZE = 297
SPLIT_SEED = 0


@functools.lru_cache(maxsize=None)
def _split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 split as (images float32 (N, 1, 8, 8) in [-1, 1], labels int64 (N,)); cached, read-only."""
    from sklearn.datasets import load_digits  # imported here: sklearn costs ~1 s to import
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # 0..16 -> [-1, 1], (N, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown digits split {split!r}; valid splits: {choices(SPLITS)}")


def _check_size(image_size) -> int:
    if image_size is None:
        return NATIVE_SIZE
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive integer or None (native 8), got {image_size!r}")
    return image_size


def digits_arrays(split: str, image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 (N, 1, S, S) in [-1, 1] and labels int64 (N,) of one split ("train" | "test").

    S is 8 (native) unless `image_size` is given: then bilinear resizing (antialiased when shrinking).
    Returns fresh, writable arrays.
    """
    _check_split(split)
    size = _check_size(image_size)
    x, y = _split_arrays(split)
    if size != NATIVE_SIZE:
        t = F.interpolate(torch.from_numpy(x.copy()), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=size < NATIVE_SIZE)
        # Bilinear weights are convex, so the range holds up to rounding; clamp that rounding away.
        x = t.clamp_(-1.0, 1.0).numpy()
    return x.copy(), y.copy()


def load_digits_split(split: str, image_size: int | None = None) -> TensorDataset:
    """The split as a TensorDataset of (x float32 (1, S, S) in [-1, 1], y int64 scalar tensor)."""
    x, y = digits_arrays(split, image_size)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def digits_fingerprint(split: str, image_size: int | None = None) -> str:
    """Short sha256 of the split's arrays as delivered (so it changes with the resolution)."""
    x, y = digits_arrays(split, image_size)
    h = hashlib.sha256()
    h.update(f"digits:{split}:{x.shape}".encode())
    h.update(x.tobytes())
    h.update(y.tobytes())
    return h.hexdigest()[:16]


# Mirroring would turn digits into other glyphs: no random flip by default.
@DATASETS.register("digits", random_flip=False)
def build_digits(req: DataRequest) -> DataSplit:
    return DataSplit(load_digits_split(req.split, req.image_size), channels=1,
                     image_size=req.image_size or NATIVE_SIZE, num_classes=NUM_CLASSES,
                     fingerprint=digits_fingerprint(req.split, req.image_size))

"""The dataset registry: one entry per `data.name`, registered by the module that implements it.

A dataset is one builder function, registered with what `build_dataset` needs to know about it:

    @DATASETS.register("noise", random_flip=False)
    def build_noise(req: DataRequest) -> DataSplit:
        g = torch.Generator().manual_seed(0 if req.split == "train" else 1)
        x, y = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.arange(64) % 10
        return DataSplit(TensorDataset(x, y), channels=1, image_size=8, num_classes=10,
                         fingerprint=hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16])

Registration keywords (all optional; `DatasetSpec` holds them, a misspelt one is a TypeError):
    random_flip        default of data.random_flip on the train split (True / False); None: the dataset
                       has no random flip and data.random_flip is ignored (latent stores: the flip mode
                       chosen at extraction is the augmentation)
    path               what data.path / data.test_path hold when every split needs its own folder
                       ("image folder root"): build_dataset then requires the split's one and checks that
                       it exists; None: data.path is an optional root, passed through as given
    requires_image_size  why data.image_size must be given ("images are centre-cropped to it"); None:
                       image_size None means the native size

build_dataset does the rest: config keys, split, image_size type, the flip default and test-split
rule, RandomFlip on top of a dataset that does not flip itself (`DataSplit.flipped`), the info dict.
Importing this module registers nothing; `fcdm_lab.data.build` imports the dataset modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from fcdm_lab.registry import Registry

DATASETS = Registry("dataset")  # data.name -> builder(DataRequest) -> DataSplit


@dataclass(frozen=True)
class DataRequest:
    """One split as build_dataset asks a builder for it (checked by build_dataset)."""
    split: str                    # "train" | "test"
    image_size: Optional[int]     # a positive int, or None (native size)
    random_flip: bool             # apply a random horizontal flip (never on the test split)
    path: Optional[str]           # path= datasets: the split's folder (expanded, exists); else data.path as given
    download: Any = None          # data.download as given; None: the dataset's own default


@dataclass(frozen=True)
class DataSplit:
    """What a builder returns: the dataset of (x float32 (C, S, S), y int) and its description."""
    dataset: Any                  # a torch Dataset
    channels: int
    image_size: int               # side of the x tensors
    num_classes: int
    fingerprint: str              # 16 hex chars identifying the content as delivered
    vae: Optional[Dict[str, Any]] = None  # latents: {"id", "scale_factor"}
    flipped: bool = False         # the dataset applies req.random_flip itself (no RandomFlip on top)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its builder and registration keywords (see the module docstring)."""
    name: str
    build: Callable[[DataRequest], DataSplit]
    random_flip: Optional[bool] = False
    path: Optional[str] = None
    requires_image_size: Optional[str] = None


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset `name` (a UserError listing the valid names when there is none)."""
    return DatasetSpec(name, DATASETS.get(name), **DATASETS.meta(name))


__all__ = ["DATASETS", "DataRequest", "DataSplit", "DatasetSpec", "dataset_spec"]

"""Training data: every item is (x float32 (C, H, W), y int class label).

x is pixels in [-1, 1] (digits, image folders, torchvision datasets) or VAE latents already multiplied
by the store's scale factor. `build_dataset(cfg, split)` is the entry point from a config; the
datasets it knows are the registry `DATASETS` (fcdm_lab/data/registry.py: a new dataset is one
registered builder).
"""
from fcdm_lab.data.build import build_dataset
from fcdm_lab.data.registry import DATASETS, DataRequest, DataSplit
from fcdm_lab.data.digits import digits_arrays, load_digits_split
from fcdm_lab.data.images import ImageFolderDataset, TorchvisionDataset, center_crop_arr
from fcdm_lab.data.latents import DIT_SCALE_FACTOR, LatentStore, extract_latents, load_vae, write_latent_store

__all__ = [
    "DATASETS", "DataRequest", "DataSplit", "build_dataset", "digits_arrays", "load_digits_split",
    "ImageFolderDataset", "TorchvisionDataset", "center_crop_arr", "DIT_SCALE_FACTOR", "LatentStore", "extract_latents",
    "load_vae", "write_latent_store",
]

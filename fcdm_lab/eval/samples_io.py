"""Sample sets on disk: a folder of PNGs or an ADM-style `.npz` (NHWC uint8 under the key `arr_0`, as
ADM's evaluator and numpy's default name it, or `arr`, as the reference implementation's sampler
writes it; both are read).

Evaluation reads samples back from disk so metrics can be recomputed after a crash or with another
feature extractor, without sampling again. In memory a sample set is a uint8 tensor (N, C, H, W)
with C = 1 (grayscale) or 3 (RGB), the form torch-fidelity consumes.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fcdm_lab.errors import UserError, choices

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CHANNELS = (1, 3)
NPZ_KEYS = ("arr_0", "arr")  # ADM / numpy's default name; the reference implementation's sample files


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255], same shape (values outside are clamped).

    Rounds to the nearest level, as ADM and DiT do too (they compute floor(127.5 x + 128), i.e. round
    half up; here ties round to even, which differs only at exact .5 levels): with rounding,
    uint8 -> [-1, 1] -> uint8 is the identity, so a saved sample set reloads bit-exactly.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise UserError(f"to_uint8 expects a float tensor in [-1, 1], got {type(x).__name__} "
                        f"{getattr(x, 'dtype', '')}".rstrip())
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1] (the inverse of `to_uint8`)."""
    return x.float() / 127.5 - 1.0


def check_images_uint8(images, what: str = "images") -> torch.Tensor:
    """Validate a sample set: a uint8 tensor (N, C, H, W) with N >= 1 and C in {1, 3}."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images) or images.dtype != torch.uint8:
        raise UserError(f"{what} must be a uint8 tensor (N, C, H, W); got "
                        f"{getattr(images, 'dtype', type(images).__name__)} (convert [-1, 1] floats "
                        f"with fcdm_lab.eval.to_uint8)")
    if images.dim() != 4 or images.shape[0] < 1 or images.shape[1] not in CHANNELS:
        raise UserError(f"{what} must have shape (N, C, H, W) with N >= 1 and C in "
                        f"{{{choices(CHANNELS)}}}; got {tuple(images.shape)}")
    return images


def save_npz(path: str | os.PathLike, images: torch.Tensor, key: str = "arr_0") -> Path:
    """Write uint8 (N, C, H, W) images as an ADM-style `.npz` (NHWC uint8 under `key`: "arr_0", or
    "arr" as the reference implementation writes for the ADM protocol); returns the path."""
    if key not in NPZ_KEYS:
        raise UserError(f"npz key {key!r} is not one of {choices(NPZ_KEYS)}")
    images = check_images_uint8(images)
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"sample file {str(path)!r} must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{key: images.permute(0, 2, 3, 1).contiguous().cpu().numpy()})
    return path


def save_png_folder(folder: str | os.PathLike, images: torch.Tensor) -> Path:
    """Write uint8 (N, C, H, W) images as `000000.png`, ... (grayscale or RGB); returns the folder."""
    from PIL import Image

    images = check_images_uint8(images)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hwc = images.permute(0, 2, 3, 1).cpu().numpy()
    width = max(6, len(str(len(hwc) - 1)))
    for i, img in enumerate(hwc):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:0{width}d}.png")
    return folder


def _load_npz(path: Path) -> torch.Tensor:
    try:
        with np.load(path) as data:
            key = next((k for k in NPZ_KEYS if k in data.files), None)
            if key is None:
                raise UserError(f"sample file {str(path)!r} has no 'arr_0' or 'arr' array (NHWC uint8 images, "
                                f"as ADM and the reference write them); its arrays: {choices(data.files) or 'none'}")
            arr = data[key]
    except UserError:
        raise
    except Exception as e:  # a truncated or foreign file: say which one, not a zipfile traceback
        raise UserError(f"cannot read sample file {str(path)!r} as .npz: {e}") from None
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise UserError(f"sample file {str(path)!r}: {key} must be uint8 NHWC (or NHW for grayscale); "
                        f"got {arr.dtype} with shape {arr.shape}")
    if arr.ndim == 3:
        arr = arr[..., None]
    return check_images_uint8(torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))),
                              f"{key} of {str(path)!r}")


def _load_folder(path: Path) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"sample folder {str(path)!r} has no images (looked for "
                        f"{choices(IMAGE_EXTENSIONS)})")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("L") if im.mode in ("L", "1", "I;16", "I") else
                                         im.convert("RGB")))
        except Exception as e:
            raise UserError(f"cannot read image {str(f)!r}: {e}") from None
    # One grayscale image among RGB ones: promote the whole set to RGB rather than refuse it.
    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"images in {str(path)!r} differ in size: {sorted(shapes)[:3]}")
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    return torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)))


def _npz_header(path: Path) -> tuple[str, np.dtype, tuple]:
    """(key, dtype, shape) of the image array of an .npz, read from the array's header only."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            key = next((k for k in NPZ_KEYS if k in names), None)
            if key is None:
                raise UserError(f"sample file {str(path)!r} has no 'arr_0' or 'arr' array (NHWC uint8 images, "
                                f"as ADM and the reference write them); its arrays: {choices(names) or 'none'}")
            with z.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _fortran, dtype = read(f)
    except UserError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read sample file {str(path)!r} as .npz: {e}") from None
    return key, np.dtype(dtype), tuple(shape)


def check_sample_source(path: str | os.PathLike, what: str = "samples") -> int:
    """Check a folder of images or an .npz of samples the way `load_samples` will read it, from the
    file headers only (seconds for GBs): so that an evaluation refuses bad input before it creates
    a run or samples anything. Returns the number of images; a one-line UserError otherwise."""
    path = Path(path)
    if path.is_dir():
        count = sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())
        if not count:
            raise UserError(f"{what} folder {str(path)!r} has no images (looked for {choices(IMAGE_EXTENSIONS)})")
        return count
    if path.is_file() and path.suffix == ".npz":
        key, dtype, shape = _npz_header(path)
        if dtype != np.uint8 or len(shape) not in (3, 4):
            raise UserError(f"{what} file {str(path)!r}: {key} must be uint8 NHWC (or NHW for grayscale); got "
                            f"{dtype} with shape {shape}")
        if shape[0] < 1 or (len(shape) == 4 and shape[-1] not in CHANNELS):
            raise UserError(f"{what} file {str(path)!r}: {key} must hold N >= 1 images of {choices(CHANNELS)} "
                            f"channels in NHWC layout; got shape {shape}")
        return int(shape[0])
    if path.is_file():
        raise UserError(f"cannot read {what} from {str(path)!r}: expected a folder of images "
                        f"({choices(IMAGE_EXTENSIONS)}) or an .npz file")
    raise UserError(f"{what} path {str(path)!r} does not exist (expected a folder of images or an .npz)")


def load_samples(path: str | os.PathLike) -> torch.Tensor:
    """A sample set from disk as uint8 (N, C, H, W): a folder of images (sorted by file name;
    grayscale stays 1 channel) or an ADM `.npz` (`arr_0` or `arr`, NHWC uint8)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if path.is_file() and path.suffix == ".npz":
        return _load_npz(path)
    if path.is_file():
        raise UserError(f"cannot read samples from {str(path)!r}: expected a folder of images "
                        f"({choices(IMAGE_EXTENSIONS)}) or an .npz file")
    raise UserError(f"sample path {str(path)!r} does not exist (expected a folder of images or an .npz)")

"""Pre-extracted VAE latents: the store format, its writer and reader, and the extraction itself.

A store is a folder:
    meta.json                        format, version, shape (C, H, W), count, dtype, scale_factor, vae,
                                     flip, num_classes, shards [{latents, labels, count}], fingerprint
    shard_00000.latents.npy          (n, C, H, W) float16 | float32, already multiplied by scale_factor
    shard_00000.labels.npy           (n,) int64
Plain .npy shards rather than one big file: numpy memory-maps them (no loading on open, cheap random
access from many DataLoader workers), and a shard is small enough to rewrite.

As in DiT, training on latents skips the VAE entirely; the latents are `latent_dist.sample()` times
0.18215. The flip augmentation (`flip`, recorded as meta flip_mode): "random" stores one copy per
image, mirrored or not at random (the reference implementation's extract_features.py); "both" stores
a mirrored copy of every image as extra entries; "none" stores the images as they are. The reference
stores float32 (`dtype`); float16 halves the disk and page-cache footprint.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterable
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import Dataset

from fcdm_lab.data.registry import DATASETS, DataRequest, DataSplit
from fcdm_lab.data.images import ImageFolderDataset
from fcdm_lab.errors import UserError, choices
from fcdm_lab.progress import track
from fcdm_lab.rng import derive_seed

FORMAT = "fcdm-lab-latents"
FORMAT_VERSION = 1
DIT_SCALE_FACTOR = 0.18215  # DiT's constant for the Stable-Diffusion VAE
STORE_DTYPES = ("float16", "float32")
FLIP_MODES = ("random", "none", "both")
REFERENCE_MODE = {"dtype": "float32", "flip": "random"}  # the reference's extraction (facts section 12)
_FLIP_STREAM = 1  # derive_seed(seed, 1): the random-flip decisions, apart from the VAE's sampling noise
_REQUIRED_META = ("format", "version", "shape", "count", "dtype", "scale_factor", "vae", "flip",
                  "num_classes", "shards", "fingerprint")


def _new_hash(shape, dtype: str):
    return hashlib.sha256(f"{FORMAT}:{tuple(shape)}:{dtype}".encode())


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------

def write_latent_store(out: str, batches: Iterable, meta: dict, shard_size: int = 10000,
                       dtype: str = "float16", overwrite: bool = False) -> dict:
    """Write (latents (B, C, H, W), labels (B,)) batches (numpy or torch) as a store at `out`.

    `meta` carries the descriptive fields (vae, scale_factor, flip, num_classes, and any extras such as
    classes or image_size); the writer adds format, version, shape, count, dtype, shards, fingerprint.
    Atomic: everything goes into `out.tmp-*` and is renamed to `out` only once meta.json is written,
    so an interrupted run never leaves a folder at `out`. Returns the final meta.
    """
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    if dtype not in STORE_DTYPES:
        raise UserError(f"latent store dtype {dtype!r} is not supported; valid: {choices(STORE_DTYPES)}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise UserError(f"shard_size must be a positive integer, got {shard_size!r}")
    _check_replaceable(out, overwrite)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        meta = _write_shards(tmp, batches, dict(meta), shard_size, dtype)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(out):  # overwrite: move the old store aside first, drop it once the new one is in
            old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=parent)
            os.rename(out, os.path.join(old, "store"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _check_replaceable(out: str, overwrite: bool) -> None:
    if not os.path.exists(out):
        return
    if not overwrite:
        raise UserError(f"{out} already exists; choose another output path or pass overwrite")
    # Overwrite replaces only an earlier store or an empty folder, never, say, the image folder itself.
    is_store = os.path.isfile(os.path.join(out, "meta.json"))
    if is_store:
        try:
            with open(os.path.join(out, "meta.json")) as f:
                is_store = json.load(f).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            is_store = False
    if not (is_store or (os.path.isdir(out) and not os.listdir(out))):
        raise UserError(f"{out} exists and is not a latent store; refusing to overwrite it")


def _write_shards(folder: str, batches: Iterable, meta: dict, shard_size: int, dtype: str) -> dict:
    shards, pending, pending_n = [], [], 0
    shape, digest, count = None, None, 0

    def flush(lat: np.ndarray, lab: np.ndarray) -> None:
        nonlocal count
        i = len(shards)
        names = (f"shard_{i:05d}.latents.npy", f"shard_{i:05d}.labels.npy")
        np.save(os.path.join(folder, names[0]), lat)
        np.save(os.path.join(folder, names[1]), lab)
        digest.update(lat.tobytes())
        digest.update(lab.tobytes())
        shards.append({"latents": names[0], "labels": names[1], "count": int(len(lat))})
        count += len(lat)

    for lat, lab in batches:
        lat = lat.detach().cpu().numpy() if torch.is_tensor(lat) else np.asarray(lat)
        lab = lab.detach().cpu().numpy() if torch.is_tensor(lab) else np.asarray(lab)
        lat = np.ascontiguousarray(lat, dtype=dtype)
        lab = np.ascontiguousarray(lab, dtype=np.int64).reshape(-1)
        if lat.ndim != 4 or len(lat) != len(lab):
            raise ValueError(f"expected latents (B, C, H, W) and labels (B,), got {lat.shape} and {lab.shape}")
        if shape is None:
            shape = lat.shape[1:]
            digest = _new_hash(shape, dtype)
        elif lat.shape[1:] != shape:
            raise ValueError(f"latent shape changed from {shape} to {lat.shape[1:]} between batches")
        pending.append((lat, lab))
        pending_n += len(lat)
        if pending_n >= shard_size:  # emit full shards, keep the remainder pending
            lat_all = np.concatenate([p[0] for p in pending])
            lab_all = np.concatenate([p[1] for p in pending])
            full = (pending_n // shard_size) * shard_size
            for s in range(0, full, shard_size):
                flush(lat_all[s: s + shard_size], lab_all[s: s + shard_size])
            pending = [(lat_all[full:], lab_all[full:])] if full < pending_n else []
            pending_n -= full
    if pending_n:
        flush(np.concatenate([p[0] for p in pending]), np.concatenate([p[1] for p in pending]))
    if count == 0:
        raise UserError("no latents to write: the input held no images")

    labels = np.concatenate([np.load(os.path.join(folder, s["labels"])) for s in shards])
    num_classes = meta.get("num_classes")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}")
    meta.update({
        "format": FORMAT, "version": FORMAT_VERSION, "shape": [int(s) for s in shape], "count": int(count),
        "dtype": dtype, "scale_factor": float(meta.get("scale_factor", DIT_SCALE_FACTOR)),
        "vae": meta.get("vae"), "flip": bool(meta.get("flip", False)), "num_classes": num_classes,
        "shards": shards, "fingerprint": digest.hexdigest(),
    })
    return meta


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------

class LatentStore(Dataset):
    """A validated latent store; items are (x float32 (C, H, W), y int).

    Opening checks meta.json against every shard's header and the labels (count, shape, dtype,
    label range) but reads no latents; those are memory-mapped on first access in each process.
    `verify=True` also recomputes the content fingerprint (reads everything).
    """

    def __init__(self, path: str, verify: bool = False):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.meta = _read_meta(self.path)
        self._labels, self._offsets = self._validate()
        self._latents = None  # per-process memory maps, opened lazily (not pickled into workers)
        if verify:
            self.verify()

    # -- properties read from meta
    shape = property(lambda self: tuple(self.meta["shape"]))
    scale_factor = property(lambda self: float(self.meta["scale_factor"]))
    vae = property(lambda self: self.meta["vae"])
    flip = property(lambda self: bool(self.meta["flip"]))
    flip_mode = property(lambda self: self.meta.get("flip_mode", "both" if self.meta["flip"] else "none"))
    num_classes = property(lambda self: int(self.meta["num_classes"]))
    fingerprint = property(lambda self: self.meta["fingerprint"])

    @property
    def labels(self) -> np.ndarray:
        """All labels, int64 (N,)."""
        return self._labels

    def _fail(self, problem: str):
        raise UserError(f"latent store {self.path} is invalid: {problem}")

    def _validate(self):
        try:
            return self._check_shards()
        except UserError:
            raise
        except (KeyError, TypeError, ValueError) as e:  # hand-edited meta.json with wrong types
            self._fail(f"meta.json is malformed ({type(e).__name__}: {e})")

    def _check_shards(self):
        m = self.meta
        shape, count = tuple(int(s) for s in m["shape"]), int(m["count"])
        if count < 1:
            self._fail(f"meta count is {count}")
        if m["dtype"] not in STORE_DTYPES:
            self._fail(f"dtype {m['dtype']!r} is not one of {choices(STORE_DTYPES)}")
        if not isinstance(m["shards"], list) or not m["shards"]:
            self._fail("meta.json lists no shards")
        shard_total = sum(int(s["count"]) for s in m["shards"])
        if shard_total != count:
            self._fail(f"meta count is {count} but the shard counts sum to {shard_total}")
        labels, offsets = [], [0]
        for s in m["shards"]:
            lat = self._load(s["latents"])
            lab = self._load(s["labels"])
            if lat.shape != (s["count"], *shape):
                self._fail(f"shard {s['latents']} has shape {lat.shape}, meta says ({s['count']}, "
                           f"{', '.join(map(str, shape))})")
            if lat.dtype != np.dtype(m["dtype"]):
                self._fail(f"shard {s['latents']} is {lat.dtype}, meta says {m['dtype']}")
            if lab.shape != (s["count"],) or not np.issubdtype(lab.dtype, np.integer):
                self._fail(f"label shard {s['labels']} has {lab.shape[0] if lab.ndim else 0} {lab.dtype} "
                           f"labels, meta says {s['count']} integer labels")
            labels.append(np.asarray(lab, dtype=np.int64))
            offsets.append(offsets[-1] + s["count"])
        labels = np.concatenate(labels)
        if labels.min() < 0 or labels.max() >= m["num_classes"]:
            self._fail(f"labels span {labels.min()}..{labels.max()} but meta says {m['num_classes']} classes")
        return labels, offsets

    def _load(self, name: str) -> np.ndarray:
        file = os.path.join(self.path, name)
        if not os.path.isfile(file):
            self._fail(f"shard file {name} is missing")
        try:
            return np.load(file, mmap_mode="r")
        except (OSError, ValueError) as e:  # truncated or not a .npy
            self._fail(f"shard file {name} cannot be read ({e})")

    def verify(self) -> None:
        """Recompute the content fingerprint; UserError if it differs from meta.json's."""
        digest = _new_hash(self.shape, self.meta["dtype"])
        for s in self.meta["shards"]:
            digest.update(np.ascontiguousarray(self._load(s["latents"])).tobytes())
            digest.update(np.ascontiguousarray(self._load(s["labels"]), dtype=np.int64).tobytes())
        if digest.hexdigest() != self.fingerprint:
            self._fail("content fingerprint differs from meta.json (shards changed after writing)")

    def __len__(self) -> int:
        return int(self.meta["count"])

    def __getitem__(self, index: int):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a latent store of {n} items")
        if self._latents is None:
            self._latents = [np.load(os.path.join(self.path, s["latents"]), mmap_mode="r")
                             for s in self.meta["shards"]]
        shard = bisect.bisect_right(self._offsets, index) - 1
        x = np.array(self._latents[shard][index - self._offsets[shard]], dtype=np.float32)
        return torch.from_numpy(x), int(self._labels[index])

    def __getitems__(self, indices):
        """A whole batch at once (DataLoader calls this when it exists): one fancy-indexed read per
        shard instead of a Python call, a bisect and a copy per item; the training loop's data cost."""
        idx = np.asarray(indices, dtype=np.int64)
        n = len(self)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"indices out of range for a latent store of {n} items")
        if self._latents is None:
            self._latents = [np.load(os.path.join(self.path, s["latents"]), mmap_mode="r")
                             for s in self.meta["shards"]]
        out = np.empty((len(idx), *self.shape), dtype=np.float32)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self._latents[k][idx[sel] - self._offsets[k]]
        return list(zip(torch.from_numpy(out).unbind(0), self._labels[idx].tolist()))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_latents"] = None  # a pickled memmap would copy the whole shard into each worker
        return state


def _read_meta(path: str) -> dict:
    if not os.path.isdir(path):
        raise UserError(f"latent store {path} does not exist (make one with extract_latents)")
    file = os.path.join(path, "meta.json")
    if not os.path.isfile(file):
        raise UserError(f"{path} is not a latent store: meta.json is missing "
                        "(an interrupted extraction leaves only a .tmp-* folder)")
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"latent store {path} is invalid: meta.json cannot be parsed ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a latent store: meta.json format is not {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise UserError(f"latent store {path} has format version {meta.get('version')!r}; "
                        f"this fcdm-lab reads version {FORMAT_VERSION}")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise UserError(f"latent store {path} is invalid: meta.json lacks {choices(missing)}")
    return meta


# data.path / data.test_path: a store each. No random flip: the store's flip mode, chosen at extraction,
# is the augmentation (data.random_flip is ignored). data.image_size may name the store's pixel or
# latent side; it changes nothing.
@DATASETS.register("latents", random_flip=None, path="latent store folder")
def build_latents(req: DataRequest) -> DataSplit:
    store = LatentStore(req.path)
    pixel_size = store.meta.get("image_size")
    if req.image_size is not None and req.image_size not in (pixel_size, store.shape[-1]):
        raise UserError(f"data.image_size {req.image_size} does not match latent store {store.path} "
                        f"(images {pixel_size}, latents {store.shape[-1]}); set it to null")
    return DataSplit(store, channels=store.shape[0], image_size=store.shape[-1], num_classes=store.num_classes,
                     fingerprint=hashlib.sha256(store.fingerprint.encode()).hexdigest()[:16],
                     vae={"id": store.vae, "scale_factor": store.scale_factor})


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

def _local_dir_hint(name: str) -> str:
    return ("pass a local directory instead (on a machine with internet: "
            f"AutoencoderKL.from_pretrained({name!r}).save_pretrained(DIR), then copy DIR here)")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else the user typed is meant as a directory.
    return name.startswith((".", "/", "~")) or os.path.isabs(name) or name.count("/") > 1 or "\\" in name


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so an offline machine fails at once instead of retrying ~20 s."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe says nothing; let the download try
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(cls, name: str, **kwargs):
    with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument; not ours to fix
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return cls.from_pretrained(name, **kwargs)


def load_vae(vae: str):
    """diffusers AutoencoderKL from a local directory (also a pipeline folder with a vae/ sub-folder)
    or a hub name; every failure is a UserError that says to pass a local directory."""
    from diffusers import AutoencoderKL  # imported here: diffusers takes seconds to import

    path = os.path.abspath(os.path.expanduser(vae))
    if os.path.isfile(path):
        raise UserError(f"VAE {path} is a file; pass the folder of an AutoencoderKL (config.json and weights, as "
                        f"AutoencoderKL.save_pretrained writes it), or a hub name such as stabilityai/sd-vae-ft-ema")
    if os.path.isdir(path):
        sub = "vae" if (not os.path.isfile(os.path.join(path, "config.json"))
                        and os.path.isfile(os.path.join(path, "vae", "config.json"))) else None
        try:
            return _from_pretrained(AutoencoderKL, path, subfolder=sub, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"could not load an AutoencoderKL from directory {path} "
                            f"(expected config.json and weights from save_pretrained): {e}") from e
    if _looks_like_path(vae):
        raise UserError(f"VAE directory {path} does not exist; pass a directory written by "
                        "AutoencoderKL.save_pretrained, or a hub name such as stabilityai/sd-vae-ft-ema")
    try:  # the local Hugging Face cache first: works offline and needs no network round trip
        return _from_pretrained(AutoencoderKL, vae, local_files_only=True)
    except (OSError, ValueError):
        pass
    if _env_true("HF_HUB_OFFLINE"):
        raise UserError(f"VAE {vae!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                        + _local_dir_hint(vae))
    if not _hub_reachable():
        raise UserError(f"cannot reach the Hugging Face hub to download VAE {vae!r}, and it is not in the "
                        "local cache; " + _local_dir_hint(vae))
    try:
        return _from_pretrained(AutoencoderKL, vae)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load VAE {vae!r} from the hub ({first}); " + _local_dir_hint(vae)) from e


MAX_IMAGE_SIZE = 2048  # the VAE's activations at 100000 px filled 22 GB before it was killed


def extract_latents(images: str, vae: str, out: str, image_size: int = 256, batch_size: int = 32,
                    flip: str | bool = "random", shard_size: int = 10000, device=None, progress: bool = True, *,
                    scale_factor: float = DIT_SCALE_FACTOR, dtype: str = "float32", seed: int = 0,
                    num_workers: int = 0, overwrite: bool = False) -> dict:
    """Encode an image folder (ADM centre crop) into a latent store; returns its meta.

    Latents are `vae.encode(x).latent_dist.sample() * scale_factor` with a seeded generator (the same
    inputs give the same store). The defaults are the reference's (REFERENCE_MODE): float32, and
    flip="random": one copy per image, mirrored where a uniform draw from a generator seeded with
    derive_seed(seed, 1) is < 0.5 (one draw per image, in order). flip="both" (or True) also encodes
    every batch mirrored and stores it as extra entries after the originals (count doubles);
    flip="none" (or False) stores the images as they are. dtype "float16" halves the store.
    """
    flip = {True: "both", False: "none"}.get(flip, flip) if isinstance(flip, bool) else flip
    if not (isinstance(image_size, int) and 8 <= image_size <= MAX_IMAGE_SIZE and image_size % 8 == 0):
        raise UserError(f"image size must be a multiple of 8 from 8 to {MAX_IMAGE_SIZE} pixels (the SD-VAE's factor), "
                        f"got {image_size}")
    if flip not in FLIP_MODES:
        raise UserError(f"flip mode {flip!r} is not valid; choose one of: {choices(FLIP_MODES)}")
    if dtype not in STORE_DTYPES:
        raise UserError(f"latent store dtype {dtype!r} is not supported; valid: {choices(STORE_DTYPES)}")

    out_abs = os.path.abspath(os.path.expanduser(os.fspath(out)))
    _check_replaceable(out_abs, overwrite)  # fail before the slow VAE load
    dataset = ImageFolderDataset(images, image_size, random_flip=False, channels=3)
    model = load_vae(vae)
    factor = 2 ** (len(model.config.block_out_channels) - 1)  # the VAE's spatial downsampling
    if image_size % factor:
        raise UserError(f"image_size {image_size} must be a multiple of {factor} for this VAE")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    generator = torch.Generator(device).manual_seed(seed)
    flip_draws = torch.Generator().manual_seed(derive_seed(seed, _FLIP_STREAM))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")

    def encode(x: torch.Tensor) -> torch.Tensor:
        return model.encode(x).latent_dist.sample(generator=generator) * scale_factor

    def batches():
        with torch.inference_mode():
            for x, y in track(loader, progress, f"encoding {len(dataset)} images"):
                x = x.to(device, non_blocking=True)
                if flip == "random":
                    mirrored = (torch.rand(len(x), generator=flip_draws) < 0.5).to(device)
                    x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
                yield encode(x), y
                if flip == "both":
                    yield encode(x.flip(-1)), y

    vae_id = os.path.abspath(os.path.expanduser(vae)) if os.path.isdir(os.path.expanduser(vae)) else vae
    meta = {"vae": vae_id, "scale_factor": float(scale_factor), "flip": flip != "none", "flip_mode": flip,
            "num_classes": len(dataset.classes), "classes": list(dataset.classes),
            "image_size": image_size, "num_images": len(dataset), "source": os.path.abspath(dataset.root),
            "seed": seed}
    return write_latent_store(out_abs, batches(), meta, shard_size=shard_size, dtype=dtype, overwrite=overwrite)

"""FID / KID / IS / precision-recall with torch-fidelity's metric code, with three feature extractors.

- "digits": the 128-d penultimate layer of the digits CNN (`classifier.py`), registered with
  torch-fidelity as "digits-cnn". Metric names end in `_digits` (`fid_digits`, never plain "fid"):
  these numbers are not comparable with Inception FIDs. "fashion" is the same for Fashion-MNIST
  ("fashion-cnn", `fid_fashion`).
- "inception": torch-fidelity's "inception-v3-compat" (the TF-FID network). Names carry the sample
  count (`fid_inception_5k`), so a 5k proxy FID is never mistaken for FID-50K.

Nothing here unpickles a file that could run code. torch-fidelity loads Inception weights and its
feature/statistics cache with `torch.load(weights_only=False)`, so neither its loader nor its cache is
used: the weights are read here as tensors only (`torch.load(weights_only=True)` or safetensors),
checked against the network's keys and shapes (and, for the published file, its sha256), and handed
to torch-fidelity's network class built without its loader (`VerifiedInceptionV3`); features come
from torch-fidelity's feature loop and the numbers from its metric functions, so they are the values
its `calculate_metrics` gives. The reference set's features and FID statistics are cached here as
.npz files read with `allow_pickle=False`, named by a fingerprint of the reference's content and of
the extractor's weights: other data or other weights get other entries instead of stale statistics.
A cache file that does not read as the expected arrays is ignored and rewritten.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import pickle  # only for its exception type: nothing here unpickles
import threading
import urllib.error
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    BasicConv2d,
    FeatureExtractorInceptionV3,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE_1,
    InceptionE_2,
)
from torch_fidelity.helpers import text_to_dtype
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from fcdm_lab.errors import UserError, choices
from fcdm_lab.fileio import atomic_write
from fcdm_lab.data.digits import digits_arrays
from fcdm_lab.data.fashion import fashion_arrays
from fcdm_lab.eval.classifier import (
    FEATURE_DIM,
    cache_root,
    class_consistency,
    classifier_cache_path,
    get_classifier,
)
from fcdm_lab.eval.metrics import DIGITS_REFERENCES, FASHION_REFERENCES, ISC_SPLITS, REFERENCES, count_tag
from fcdm_lab.eval.samples_io import NPZ_KEYS, check_images_uint8, from_uint8, load_samples, to_uint8

DIGITS_EXTRACTOR = "digits-cnn"
FASHION_EXTRACTOR = "fashion-cnn"
INCEPTION_EXTRACTOR = "inception-v3-compat"
EXTRACTORS = {"digits": DIGITS_EXTRACTOR, "inception": INCEPTION_EXTRACTOR, "fashion": FASHION_EXTRACTOR}
CLASSIFIER_EXTRACTORS = ("digits", "fashion")  # our own CNNs (classifier.CLASSIFIERS); they also judge labels
METRICS = ("fid", "kid", "is", "prc")
INCEPTION_WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
# sha256 and size of that file. torch-fidelity publishes only the digest's first 8 hex digits (torch
# hub's file-name convention); the full digest and size are the values several independent projects
# pin for this file and for pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the same bytes, same
# digest), and agree with that prefix. Not checked against a download here (written offline).
# A file by either name must match it.
INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_WEIGHTS_SIZE = 95_628_359
PUBLISHED_INCEPTION_FILES = (INCEPTION_WEIGHTS_FILE, "pt_inception-2015-12-05-6726825d.pth")
KID_MAX_SUBSET = 1000  # torch-fidelity's default subset size, lowered when a set is smaller
PRC_NEIGHBORHOOD = 3
BATCH_SIZE = DEFAULTS["batch_size"]  # torch-fidelity's: the same batches, the same numbers

log = logging.getLogger(__name__)


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity view of the digits CNN: uint8 (N, 1|3, H, W) -> the 128-d features and the logits.
    Subclasses name another of classifier.CLASSIFIERS."""

    classifier_name = "digits"

    def __init__(self, name, features_list, **kwargs):  # kwargs: all calculate_metrics options, unused
        super().__init__(name, features_list)
        self.classifier = get_classifier(self.classifier_name, "cpu")  # torch-fidelity moves us to CUDA when asked

    @staticmethod
    def get_provided_features_list():
        return str(FEATURE_DIM), "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": str(FEATURE_DIM), "kid": str(FEATURE_DIM), "prc": str(FEATURE_DIM)}[metric]

    @staticmethod
    def can_be_compiled():
        return False  # a few thousand 8x8 images: compiling would cost more than it saves

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8):
            raise ValueError(f"{EXTRACTORS[self.classifier_name]} expects uint8 image batches")
        feats, logits = self.classifier.features_and_logits(from_uint8(x))
        out = {str(FEATURE_DIM): feats, "logits": logits}
        return tuple(out[name] for name in self.features_list)


class FashionFeatureExtractor(DigitsFeatureExtractor):
    """torch-fidelity view of the Fashion-MNIST CNN (28x28)."""

    classifier_name = "fashion"

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)


class VerifiedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's inception-v3-compat network (its layers and its forward) built without its
    loader, which unpickles the weights file with `torch.load(weights_only=False)`: the weights come
    in as `state_dict`, tensors read and checked by `load_inception_weights`.

    The layers below are torch-fidelity's `FeatureExtractorInceptionV3.__init__` minus its loading
    (tests/test_fidelity_security.py checks that the two networks have the same state-dict keys and
    shapes and give the same features)."""

    def __init__(self, name, features_list, state_dict=None, feature_extractor_internal_dtype=None, **kwargs):
        FeatureExtractorBase.__init__(self, name, features_list)
        if feature_extractor_internal_dtype not in ("float32", "float64", None):
            raise ValueError("Only 32 and 64 bit floats are supported for internal dtype of this feature extractor")
        self.feature_extractor_internal_dtype = text_to_dtype(feature_extractor_internal_dtype, "float32")

        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = torch.nn.MaxPool2d(kernel_size=3, stride=2)

        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = torch.nn.MaxPool2d(kernel_size=3, stride=2)

        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)

        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE_1(1280)
        self.Mixed_7c = InceptionE_2(2048)
        self.AvgPool = torch.nn.AdaptiveAvgPool2d(output_size=(1, 1))

        self.fc = torch.nn.Linear(2048, 1008)

        if state_dict is not None:  # None: the bare architecture (its keys and shapes, on the meta device)
            self.load_state_dict(state_dict)
        self.to(self.feature_extractor_internal_dtype)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def expected_state_dict_shapes(cls) -> dict[str, tuple[int, ...]]:
        """{key: shape} of the network's state dict, from the architecture alone (nothing allocated)."""
        return _state_dict_shapes(cls)


@functools.lru_cache(maxsize=None)
def _state_dict_shapes(cls) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = cls(INCEPTION_EXTRACTOR, [cls.get_default_feature_layer_for_metric("fid")])
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


# The network class of the "inception" extractor: (name, features_list, state_dict=...) plus the
# classmethod expected_state_dict_shapes(). Tests swap in a cheap stand-in with the same contract.
INCEPTION_NETWORK = VerifiedInceptionV3


_register_lock = threading.Lock()
_EXTRACTOR_CLASSES = {"digits": DigitsFeatureExtractor, "fashion": FashionFeatureExtractor}


def register_classifier_extractor(extractor: str = "digits") -> str:
    """Register one of our CNNs ("digits" -> "digits-cnn", "fashion" -> "fashion-cnn") with
    torch-fidelity once per process (a second registration raises there); returns the name."""
    name = EXTRACTORS[extractor]
    with _register_lock:
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, _EXTRACTOR_CLASSES[extractor])
    return name


def register_digits_extractor() -> str:
    return register_classifier_extractor("digits")


class UInt8Images(Dataset):
    """A uint8 (N, C, H, W) tensor as the Dataset torch-fidelity wants: items are bare CHW tensors
    (a tuple-returning TensorDataset is rejected)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def fingerprint(images: torch.Tensor) -> str:
    """Short sha256 of a uint8 sample set's shape and bytes."""
    h = hashlib.sha256(f"{tuple(images.shape)}:{images.dtype}".encode())
    h.update(images.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_images(images, what: str = "samples") -> torch.Tensor:
    """A sample set as uint8 (N, C, H, W) from a tensor, a path (PNG folder or ADM .npz), or a
    split name ("digits-train", "digits-test", "fashion-train", "fashion-test")."""
    if isinstance(images, (str, os.PathLike)):
        if isinstance(images, str) and images in DIGITS_REFERENCES:
            return to_uint8(torch.from_numpy(digits_arrays(DIGITS_REFERENCES[images])[0]))
        if isinstance(images, str) and images in FASHION_REFERENCES:
            return to_uint8(torch.from_numpy(fashion_arrays(FASHION_REFERENCES[images])[0]))
        if not Path(images).exists():
            raise UserError(f"{what} {str(images)!r} is neither an existing folder / .npz file nor a "
                            f"reference name ({choices(REFERENCES)})")
        return load_samples(images)
    return check_images_uint8(images, what).cpu()  # the loader pins CPU memory when CUDA is used


def _inception_weights(inception_weights) -> Path:
    """The local Inception-v3 weights file: the given path, else torch hub's cache (downloading it
    there when online, checked against the published sha256). Offline without the file: a UserError
    saying how to provide it."""
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise UserError(f"Inception weights file {str(path)!r} does not exist (expected torch-fidelity's "
                            f"{INCEPTION_WEIGHTS_FILE}, from {URL_INCEPTION_V3})")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # the same download torch-fidelity would do, done here so a failure gets a useful message
            # (torch hub downloads aside and moves the file in place only when its sha256 matches)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), hash_prefix=INCEPTION_WEIGHTS_SHA256,
                                           progress=False)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise UserError(
                f"Inception-v3 weights are not cached and could not be downloaded ({e}); download "
                f"{URL_INCEPTION_V3} where there is internet, then pass --inception-weights PATH "
                f"(inception_weights=PATH in Python) or put the file {INCEPTION_WEIGHTS_FILE} in "
                f"$TORCH_HOME/hub/checkpoints/ (here: {path.parent})") from None
        except RuntimeError as e:  # torch hub's "invalid hash value"
            raise UserError(f"the download of {URL_INCEPTION_V3} is not the published file ({e}); "
                            f"try again, or pass --inception-weights PATH") from None
    return path


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unsafe_reason(e: Exception) -> str:
    """Why torch's weights-only unpickler refused a file, without its advice to load it unsafely."""
    lines = [line.strip() for line in str(e).splitlines()]
    found = [line for line in lines if "unsupported" in line.lower()]
    if isinstance(e, pickle.UnpicklingError):
        detail = f": {_one_line(found[0], 120)}" if found else ""
        return f"it holds objects other than tensors, which could run code when loaded{detail}"
    return f"it does not read as a PyTorch file ({type(e).__name__}{': ' + _one_line(e, 120) if str(e) else ''})"


def _expectation() -> str:
    return (f"expected a state dict of Inception-v3 tensors: torch-fidelity's {INCEPTION_WEIGHTS_FILE} "
            f"(from {URL_INCEPTION_V3}), or that network's state dict saved with torch.save or as .safetensors")


def load_inception_weights(inception_weights=None) -> tuple[dict[str, torch.Tensor], str]:
    """Read and verify an Inception weights file (default: torch hub's copy of the published one,
    downloaded when missing): (state dict, sha256 hex digest of the file).

    Tensors only: `torch.load(weights_only=True)` (or safetensors for *.safetensors), so a file that
    holds anything else is refused without running it. The file must be a flat {str: tensor} dict with
    exactly the network's keys and shapes (`INCEPTION_NETWORK.expected_state_dict_shapes()`; the
    BatchNorm counters `num_batches_tracked` may be missing, as load_state_dict allows); a file named
    like the published one must have its sha256. Anything else: a one-line UserError naming the file."""
    path = _inception_weights(inception_weights)
    what = f"Inception weights {str(path)!r}"
    try:
        data = path.read_bytes()  # hashed and loaded from the same bytes
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if path.name in PUBLISHED_INCEPTION_FILES and digest != INCEPTION_WEIGHTS_SHA256:
        raise UserError(f"{what} are not the published {path.name}: sha256 {digest[:16]}..., expected "
                        f"{INCEPTION_WEIGHTS_SHA256} ({len(data)} bytes, expected {INCEPTION_WEIGHTS_SIZE}); a "
                        f"damaged or replaced file: delete it and download {URL_INCEPTION_V3} again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load as load_safetensors

        try:
            state = load_safetensors(data)
        except Exception as e:  # safetensors' header / size errors
            raise UserError(f"{what} do not read as safetensors ({_one_line(e, 120)}); {_expectation()}") \
                from None
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError (refused object), EOFError, RuntimeError (not a torch file)...
            raise UserError(f"{what} refused: {_unsafe_reason(e)}; {_expectation()}") from None
    del data
    _check_state_dict(state, what)
    return state, digest


def _check_state_dict(state, what: str) -> None:
    if not isinstance(state, dict):
        raise UserError(f"{what} hold a {type(state).__name__}, not a state dict; {_expectation()}")
    bad = [k for k, v in state.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor) or v.layout != torch.strided]
    if bad:
        k = bad[0]
        raise UserError(f"{what}: entry {k!r} is a {type(state[k]).__name__}, not a dense tensor "
                        f"({len(bad)} such entries); {_expectation()}")
    expected = INCEPTION_NETWORK.expected_state_dict_shapes()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(f"{what} do not fit the Inception-v3 network: keys {' and '.join(parts)}; "
                        f"{_expectation()}")
    for k, v in state.items():
        if tuple(v.shape) != expected[k]:
            raise UserError(f"{what} do not fit the Inception-v3 network: {k} has shape {tuple(v.shape)}, the "
                            f"network {expected[k]}; {_expectation()}")
        if k in optional:
            if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
                raise UserError(f"{what}: {k} is {v.dtype}, expected an integer counter; {_expectation()}")
        elif not v.is_floating_point():
            raise UserError(f"{what}: {k} is {v.dtype}, expected floating point; {_expectation()}")


def check_inception_weights(inception_weights=None) -> Path:
    """Early check of the Inception weights an evaluation will use, before any sampling: the file
    exists (without a path: torch hub's copy, downloaded when missing), reads as tensors only, fits the
    network, and the published file has its sha256. Returns the file's path; a one-line UserError
    otherwise. compute_metrics verifies the file again when it loads it."""
    path = _inception_weights(inception_weights)
    load_inception_weights(path)
    return path


def inception_network(features_list, inception_weights=None, *, state_dict=None) -> FeatureExtractorBase:
    """The "inception" extractor's network (`INCEPTION_NETWORK`) with verified weights, on the CPU:
    from `state_dict` when given (already verified), else from `load_inception_weights`."""
    if state_dict is None:
        state_dict, _ = load_inception_weights(inception_weights)
    try:
        net = INCEPTION_NETWORK(INCEPTION_EXTRACTOR, list(features_list), state_dict=state_dict)
    except RuntimeError as e:  # load_state_dict's complaint about what the checks let through
        raise UserError(f"Inception weights do not load into the network: {_one_line(e)}") from None
    net.requires_grad_(False)
    return net.eval()


def reference_statistics(reference) -> dict | None:
    """{"mu", "sigma", "has_images"} of an .npz reference that carries precomputed FID statistics, as
    the ADM reference batches do (Inception pool3 statistics of the whole training set, next to 10k
    sample images under arr_0); None for anything else."""
    if not isinstance(reference, (str, os.PathLike)) or Path(reference).suffix != ".npz" \
            or not Path(reference).is_file():
        return None
    try:
        with np.load(reference) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                return None
            mu, sigma = np.asarray(data["mu"]), np.asarray(data["sigma"])
            has_images = any(k in data.files for k in NPZ_KEYS)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read reference {str(reference)!r} as .npz: {e}") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"reference {str(reference)!r}: mu must be (d,) and sigma (d, d); got {mu.shape} and "
                        f"{sigma.shape}")
    return {"mu": mu, "sigma": sigma, "has_images": has_images}


def _statistics_for_fid(stats: dict) -> dict:
    """Precomputed reference statistics in the dtypes torch-fidelity computes for the samples (float32
    features: float32 mu, float64 sigma); its FID refuses statistics of different dtypes."""
    return {"mu": stats["mu"].astype(np.float32), "sigma": stats["sigma"].astype(np.float64)}


# ---- the reference cache: .npz files, read with allow_pickle=False ---------------------------------------

def _cache_path(cache: Path, ref_id: str, extractor_name: str, kind: str, layer: str) -> Path:
    """torch-fidelity's cache names (`<input>-<extractor>-features-<layer>`, `...-stat-fid-<layer>`) as
    .npz: `ref-<ref_id>-inception-v3-compat-stat-fid-2048.npz`."""
    return cache / f"ref-{ref_id}-{extractor_name}-{kind}-{layer}.npz"


def _read_cache(path: Path, shapes: dict[str, tuple], dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file when it holds exactly `shapes` (None in a shape: any length) in
    `dtypes`; None when it is missing or anything else. Never unpickles: allow_pickle=False refuses
    object arrays and pickled files."""
    if not path.is_file():
        return None
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError(f"not an .npz of {', '.join(sorted(shapes))}")
        with data:
            if sorted(data.files) != sorted(shapes):
                raise ValueError(f"not an .npz of {', '.join(sorted(shapes))}")
            arrays = {k: data[k] for k in shapes}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        log.warning("ignoring the cache file %s (%s); computing it again", path, _one_line(e, 120))
        return None
    for k, a in arrays.items():
        shape = shapes[k]
        if a.dtype != dtypes[k] or a.ndim != len(shape) \
                or any(n is not None and n != m for n, m in zip(shape, a.shape)):
            log.warning("ignoring the cache file %s (%s is %s %s, expected %s %s); computing it again", path, k,
                        a.dtype, a.shape, np.dtype(dtypes[k]), shape)
            return None
    return arrays


def _write_cache(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically (fileio.atomic_write: a reader sees the old file or the whole new one,
    and two writers do not mix). A read-only or full cache folder costs the cache, not the evaluation."""
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except (OSError, UserError) as e:
        log.warning("could not write the cache file %s: %s", path, e)


def _features(images: torch.Tensor, net: FeatureExtractorBase, cuda: bool) -> dict[str, torch.Tensor]:
    """{layer: float32 CPU features} of a uint8 image set, through torch-fidelity's own loop (batches of
    BATCH_SIZE, no loader workers: the 2-core machines oversubscribe otherwise)."""
    return get_featuresdict_from_dataset(UInt8Images(images), net, BATCH_SIZE, cuda, True, False)


def compute_metrics(samples, reference, *, extractor: str = "digits", metrics: Iterable[str] = ("fid", "kid"),
                    inception_weights: str | os.PathLike | None = None, labels=None,
                    cache_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """Distribution metrics of `samples` against `reference` with torch-fidelity.

    samples: uint8 tensor (N, C, H, W) with C in {1, 3}, a folder of PNGs, an ADM .npz (arr_0, NHWC
        uint8), or a split name. reference: the same kinds ("digits-train" / "digits-test" /
        "fashion-train" / "fashion-test").
    extractor: "digits" (the digits CNN, any image size: resized to 8x8), "fashion" (the Fashion-MNIST
        CNN, resized to 28x28) or "inception"
        (inception-v3-compat; grayscale is repeated to 3 channels).
    metrics: any of "fid", "kid", "is" (Inception Score; for digits from the CNN's logits), "prc"
        (precision/recall, k=3).
    labels: conditioning classes of the samples (digits / fashion only): adds class_acc_<extractor>.
    cache_dir: the cache of the reference's features and FID statistics (.npz)
        (default: $FCDM_LAB_CACHE/fidelity or ~/.cache/fcdm-lab/fidelity).

    Returns floats keyed `<metric>_<tag>`, tag = "digits" or "inception_<count>" (e.g. "inception_5k"):
    fid_*, kid_* (mean), kid_*_std, is_*, is_*_std, precision_*, recall_*, and class_acc_digits|fashion.
    """
    if extractor not in EXTRACTORS:
        raise UserError(f"unknown feature extractor {extractor!r}; valid: {choices(EXTRACTORS)}")
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"unknown metric(s) {choices(bad)}; valid: {choices(METRICS)}")
    if labels is not None and extractor not in CLASSIFIER_EXTRACTORS:
        raise UserError("labels (class consistency) need extractor='digits' or 'fashion': the judge is that "
                        "dataset's classifier")
    if not metrics and labels is None:
        raise UserError(f"nothing to compute: give metrics (valid: {choices(METRICS)}) or labels")

    fake = resolve_images(samples, "samples")
    stats = reference_statistics(reference) if extractor == "inception" else None
    if stats is not None and not stats["has_images"]:
        if set(metrics) - {"fid", "is"}:
            raise UserError(f"reference {str(reference)!r} holds FID statistics (mu, sigma) but no images: "
                            f"kid and precision/recall need the images; ask for fid and is only")
        real = fake  # a placeholder never read: the FID statistics are the reference's
    else:
        real = resolve_images(reference, "reference")
    out: dict[str, float] = {}
    if labels is not None:
        out[f"class_acc_{extractor}"] = class_consistency(fake, labels, name=extractor)
    if not metrics:
        return out

    n_min = min(len(fake), len(real))
    if "kid" in metrics and n_min < 2:
        raise UserError(f"KID needs at least 2 images in each set; got {len(fake)} samples, {len(real)} reference")
    if "prc" in metrics and n_min < PRC_NEIGHBORHOOD + 1:
        raise UserError(f"precision/recall need at least {PRC_NEIGHBORHOOD + 1} images in each set; "
                        f"got {len(fake)} samples, {len(real)} reference")
    if "is" in metrics and len(fake) < ISC_SPLITS:
        raise UserError(f"Inception Score needs at least {ISC_SPLITS} samples (one per split); got {len(fake)}")

    cuda = torch.cuda.is_available()
    state_dict = None
    if extractor in CLASSIFIER_EXTRACTORS:
        register_classifier_extractor(extractor)
        net_cls = FEATURE_EXTRACTORS_REGISTRY[EXTRACTORS[extractor]]
        # hashes the classifier's training data and settings
        weights_id = classifier_cache_path(name=extractor).stem
        tag = extractor
    else:
        net_cls = INCEPTION_NETWORK
        state_dict, digest = load_inception_weights(inception_weights)  # tensors only, checked
        weights_id = f"inception-{digest[:16]}"
        tag = f"inception_{count_tag(len(fake))}"
        # Inception wants RGB; grayscale digits become 3 equal channels.
        fake = fake.expand(-1, 3, -1, -1) if fake.shape[1] == 1 else fake
        real = real.expand(-1, 3, -1, -1) if real.shape[1] == 1 else real
    name = EXTRACTORS[extractor]
    tf_names = {"fid": "fid", "kid": "kid", "is": "isc", "prc": "prc"}
    layer = {m: net_cls.get_default_feature_layer_for_metric(tf_names[m]) for m in metrics}

    # The reference: FID statistics and features from the cache, the rest computed with the samples'.
    ref_id = hashlib.sha256(f"{fingerprint(real)}:{weights_id}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "fidelity"
    ref_layers = {layer[m] for m in ("kid", "prc") if m in metrics}
    ref_stats = None
    if "fid" in metrics:
        if stats is not None:
            ref_stats = _statistics_for_fid(stats)
        else:
            cached = _read_cache(_cache_path(cache, ref_id, name, "stat-fid", layer["fid"]),
                                 {"mu": (None,), "sigma": (None, None)}, {"mu": np.float32, "sigma": np.float64})
            if cached is not None and cached["sigma"].shape == cached["mu"].shape * 2:
                ref_stats = cached
    ref_features = {}
    for lay in sorted(ref_layers | ({layer["fid"]} if "fid" in metrics and ref_stats is None else set())):
        cached = _read_cache(_cache_path(cache, ref_id, name, "features", lay), {"features": (len(real), None)},
                             {"features": np.float32})
        if cached is not None:
            ref_features[lay] = torch.from_numpy(cached["features"])

    layers = sorted(set(layer.values()) | ref_layers)  # the reference's layers are the samples' (not IS's)
    if extractor in CLASSIFIER_EXTRACTORS:
        net = create_feature_extractor(name, layers, cuda=cuda, verbose=False)
    else:
        net = inception_network(layers, state_dict=state_dict)
        del state_dict
        if cuda:
            net.cuda()
    fake_features = _features(fake, net, cuda)
    width = {lay: f.shape[1] for lay, f in fake_features.items()}
    for lay in [lay for lay, f in ref_features.items() if f.shape[1] != width[lay]]:
        log.warning("ignoring the cache file %s (%d-d features, the network gives %d-d); computing it again",
                    _cache_path(cache, ref_id, name, "features", lay), ref_features[lay].shape[1], width[lay])
        del ref_features[lay]
    if "fid" in metrics and stats is None and ref_stats is not None and ref_stats["mu"].shape != (width[layer["fid"]],):
        log.warning("ignoring the cache file %s (%d-d statistics, the network gives %d-d); computing it again",
                    _cache_path(cache, ref_id, name, "stat-fid", layer["fid"]), len(ref_stats["mu"]),
                    width[layer["fid"]])
        ref_stats = None
    if "fid" in metrics and ref_stats is None:
        ref_layers.add(layer["fid"])
    missing = ref_layers - set(ref_features)
    if missing:
        computed = _features(real, net, cuda)
        for lay in sorted(missing):
            ref_features[lay] = computed[lay]
            _write_cache(_cache_path(cache, ref_id, name, "features", lay), features=computed[lay].numpy())
    if "fid" in metrics and ref_stats is None:
        ref_stats = fid_featuresdict_to_statistics(ref_features, layer["fid"])
        _write_cache(_cache_path(cache, ref_id, name, "stat-fid", layer["fid"]), **ref_stats)

    # torch-fidelity's metric functions, with the options calculate_metrics was given before
    options = dict(kid_subset_size=min(KID_MAX_SUBSET, n_min), prc_neighborhood=PRC_NEIGHBORHOOD,
                   isc_splits=ISC_SPLITS, save_cpu_ram=True, verbose=False, cuda=cuda)
    if "fid" in metrics:
        fake_stats = fid_featuresdict_to_statistics(fake_features, layer["fid"])
        if fake_stats["mu"].shape != ref_stats["mu"].shape:
            raise UserError(f"reference {str(reference)!r}: its FID statistics are {len(ref_stats['mu'])}-d, the "
                            f"{name} features {len(fake_stats['mu'])}-d")
        out[f"fid_{tag}"] = float(fid_statistics_to_metric(fake_stats, ref_stats, False)["frechet_inception_distance"])
    if "kid" in metrics:
        result = kid_featuresdict_to_metric(fake_features, ref_features, layer["kid"], **options)
        out[f"kid_{tag}"] = float(result["kernel_inception_distance_mean"])
        out[f"kid_{tag}_std"] = float(result["kernel_inception_distance_std"])
    if "is" in metrics:
        result = isc_featuresdict_to_metric(fake_features, layer["is"], **options)
        out[f"is_{tag}"] = float(result["inception_score_mean"])
        out[f"is_{tag}_std"] = float(result["inception_score_std"])
    if "prc" in metrics:
        result = prc_featuresdict_to_metric(fake_features, ref_features, layer["prc"], **options)
        out[f"precision_{tag}"] = float(result["precision"])
        out[f"recall_{tag}"] = float(result["recall"])
    return out
